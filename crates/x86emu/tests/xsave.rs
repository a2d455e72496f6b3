//! fxsave/fxrstor and the xsave family: layout, round trips, header rules, faults, and
//! comparison with the host's own xsave/xsavec/fxsave images.

mod common;

use common::{i64, insn, MockCpu, Rng};
use iced_x86::Register::{RAX, RDI, RDX};
use x86emu::{bits::*, Exception, FpuState, Kind, Mode, Outcome};

const AREA: u64 = 0x10000;

fn exc(kind: Kind, vector: u8, error_code: Option<u32>) -> Outcome {
    Outcome::Exception {
        kind,
        exception: Exception {
            vector,
            error_code,
            cr2: None,
        },
    }
}

/// A CPU with every register holding a distinct value.
fn busy_cpu(seed: u64) -> MockCpu {
    let mut rng = Rng(seed);
    let mut cpu = MockCpu::new();
    cpu.fpu = FpuState {
        fcw: 0x027f,
        fsw: 0x3800,
        ftw: 0x81,
        fop: 0x05d9,
        fip: 0xffff_ffff_8123_4567,
        fcs: 0x10,
        fdp: 0xffff_8880_0000_1234,
        fds: 0x18,
        st: [[0; 10]; 8],
    };
    for st in cpu.fpu.st.iter_mut() {
        for b in st.iter_mut() {
            *b = rng.next() as u8;
        }
    }
    cpu.mxcsr = 0x1fa0;
    for i in 0..16 {
        cpu.xmm[i] = rng.u128();
        cpu.ymmh[i] = rng.u128();
    }
    cpu.map(AREA, 0x4000);
    cpu.poke(AREA, &[0xcc; 512]);
    cpu.set(RDI, AREA);
    cpu.set(RAX, 0xffff_ffff);
    cpu.set(RDX, 0xffff_ffff);
    cpu
}

/// Registers of `cpu` that xsave/xrstor cover. The 64-bit image formats hold no FCS/FDS,
/// so a round trip through them clears those.
fn ext_state(cpu: &MockCpu) -> (FpuState, u32, [u128; 16], [u128; 16]) {
    (cpu.fpu, cpu.mxcsr, cpu.xmm, cpu.ymmh)
}

fn without_selectors(
    mut state: (FpuState, u32, [u128; 16], [u128; 16]),
) -> (FpuState, u32, [u128; 16], [u128; 16]) {
    state.0.fcs = 0;
    state.0.fds = 0;
    state
}

fn scramble(cpu: &mut MockCpu) {
    cpu.fpu = FpuState::default();
    cpu.fpu.fcw = 0x1234 & 0x1f3f;
    cpu.mxcsr = 0x1f80;
    cpu.xmm = [7; 16];
    cpu.ymmh = [8; 16];
}

#[test]
fn xsave64_standard_layout_and_xrstor64_round_trip() {
    let mut cpu = busy_cpu(1);
    let orig = without_selectors(ext_state(&cpu));
    let xsave64 = i64("48 0f ae 27", "xsave64 [rdi]");
    assert_eq!(cpu.run(&xsave64), Outcome::Done(Kind::Xsave));

    assert_eq!(
        cpu.peek(AREA, 8),
        [0x7f, 0x02, 0x00, 0x38, 0x81, 0x00, 0xd9, 0x05]
    );
    assert_eq!(cpu.peek_u64(AREA + 8), 0xffff_ffff_8123_4567, "64-bit FIP");
    assert_eq!(cpu.peek_u64(AREA + 16), 0xffff_8880_0000_1234, "64-bit FDP");
    assert_eq!(cpu.peek_u32(AREA + 24), 0x1fa0);
    assert_eq!(cpu.peek_u32(AREA + 28), 0xffff, "MXCSR_MASK");
    assert_eq!(cpu.peek(AREA + 32, 10), cpu.fpu.st[0]);
    assert_eq!(cpu.peek(AREA + 32 + 7 * 16, 10), cpu.fpu.st[7]);
    assert_eq!(cpu.peek_u128(AREA + 160), cpu.xmm[0]);
    assert_eq!(cpu.peek_u128(AREA + 160 + 15 * 16), cpu.xmm[15]);
    assert_eq!(
        cpu.peek(AREA + 416, 96),
        vec![0xcc; 96],
        "reserved area untouched"
    );
    assert_eq!(cpu.peek_u64(AREA + 512), 0x7, "XSTATE_BV");
    assert_eq!(cpu.peek_u64(AREA + 520), 0, "XCOMP_BV");
    assert_eq!(cpu.peek_u128(AREA + 576), cpu.ymmh[0]);
    assert_eq!(cpu.peek_u128(AREA + 576 + 15 * 16), cpu.ymmh[15]);

    scramble(&mut cpu);
    assert_eq!(
        cpu.run(&i64("48 0f ae 2f", "xrstor64 [rdi]")),
        Outcome::Done(Kind::Xrstor)
    );
    assert_eq!(ext_state(&cpu), orig);
}

#[test]
fn xsave_32bit_format_and_rfbm_masking() {
    let mut cpu = busy_cpu(2);
    // Old XSTATE_BV has bit 0 set; only SSE is requested.
    cpu.poke(AREA + 512, &1u64.to_le_bytes());
    cpu.set(RAX, 0x2);
    cpu.set(RDX, 0);
    let xsave = i64("0f ae 27", "xsave [rdi]");
    assert_eq!(cpu.run(&xsave), Outcome::Done(Kind::Xsave));
    assert_eq!(cpu.peek(AREA, 24), vec![0xcc; 24], "x87 not requested");
    assert_eq!(cpu.peek_u32(AREA + 24), 0x1fa0, "MXCSR saved with SSE");
    assert_eq!(cpu.peek_u128(AREA + 160), cpu.xmm[0]);
    assert_eq!(cpu.peek_u128(AREA + 576), 0, "AVX not requested");
    assert_eq!(cpu.peek_u64(AREA + 512), 0x3);

    // x87 only, 32-bit format: FIP/FCS/FDP/FDS.
    cpu.set(RAX, 0x1);
    assert_eq!(cpu.run(&xsave), Outcome::Done(Kind::Xsave));
    assert_eq!(cpu.peek_u32(AREA + 8), 0x8123_4567);
    assert_eq!(
        u16::from_le_bytes(cpu.peek(AREA + 12, 2).try_into().unwrap()),
        0x10
    );
    assert_eq!(cpu.peek_u32(AREA + 16), 0x1234);
    assert_eq!(
        u16::from_le_bytes(cpu.peek(AREA + 20, 2).try_into().unwrap()),
        0x18
    );

    // EDX:EAX bits outside XCR0 are ignored.
    cpu.set(RAX, 0xffff_fff8);
    cpu.set(RDX, 0xffff_ffff);
    let before = cpu.pages.clone();
    assert_eq!(cpu.run(&xsave), Outcome::Done(Kind::Xsave));
    assert_eq!(cpu.pages, before);
}

#[test]
fn xrstor_initialises_components_not_in_xstate_bv() {
    let mut cpu = busy_cpu(3);
    // All-zero header: every requested component goes to its initial configuration, but the
    // standard form still loads MXCSR from memory.
    cpu.poke(AREA + 512, &[0; 64]);
    cpu.poke(AREA + 24, &0x7f80u32.to_le_bytes());
    let xrstor = i64("0f ae 2f", "xrstor [rdi]");
    assert_eq!(cpu.run(&xrstor), Outcome::Done(Kind::Xrstor));
    assert_eq!(cpu.fpu, FpuState::default());
    assert_eq!(cpu.fpu.fcw, 0x37f);
    assert_eq!(cpu.xmm, [0; 16]);
    assert_eq!(cpu.ymmh, [0; 16]);
    assert_eq!(cpu.mxcsr, 0x7f80);

    // RFBM without AVX leaves YMM high alone; x87 loaded from memory.
    let mut cpu = busy_cpu(4);
    let ymmh = cpu.ymmh;
    cpu.poke(AREA + 512, &3u64.to_le_bytes());
    cpu.poke(AREA + 24, &0x1f80u32.to_le_bytes());
    cpu.poke(AREA, &0x037fu16.to_le_bytes());
    cpu.set(RAX, 0x3);
    assert_eq!(cpu.run(&xrstor), Outcome::Done(Kind::Xrstor));
    assert_eq!(cpu.ymmh, ymmh);
    assert_eq!(cpu.fpu.fcw, 0x37f);
    assert_eq!(cpu.fpu.ftw, 0xcc);
    assert_eq!(cpu.xmm[0], u128::from_le_bytes([0xcc; 16]));
}

#[test]
fn xrstor_header_and_mxcsr_faults_change_nothing() {
    let xrstor = i64("0f ae 2f", "xrstor [rdi]");
    let gp = exc(Kind::Xrstor, 13, Some(0));
    let cases: [(u64, &[u8]); 4] = [
        (512, &0x8u64.to_le_bytes()),     // XSTATE_BV bit not in XCR0
        (520, &0x4u64.to_le_bytes()),     // standard form, XCOMP_BV not zero
        (528, &[1]),                      // bytes 16..23 not zero
        (24, &0x1_0000u32.to_le_bytes()), // MXCSR reserved bit
    ];
    for (offset, data) in cases {
        let mut cpu = busy_cpu(5);
        cpu.poke(AREA + 512, &[0; 64]);
        cpu.poke(AREA + 24, &0x1f80u32.to_le_bytes());
        cpu.poke(AREA + offset, data);
        let before = cpu.clone();
        assert_eq!(cpu.run(&xrstor), gp, "offset {offset}");
        assert_eq!(cpu, before);
    }
    // Compacted form: XSTATE_BV must be a subset of XCOMP_BV.
    let mut cpu = busy_cpu(6);
    cpu.poke(AREA + 512, &[0; 64]);
    cpu.poke(AREA + 512, &0x3u64.to_le_bytes());
    cpu.poke(AREA + 520, &((1u64 << 63) | 1).to_le_bytes());
    let before = cpu.clone();
    assert_eq!(cpu.run(&xrstor), gp);
    assert_eq!(cpu, before);
}

#[test]
fn xsave_family_faults() {
    let xsave = i64("0f ae 27", "xsave [rdi]");
    let xrstor = i64("0f ae 2f", "xrstor [rdi]");
    let mut cpu = busy_cpu(7);
    cpu.set(RDI, AREA + 16);
    assert_eq!(cpu.run(&xsave), exc(Kind::Xsave, 13, Some(0)), "misaligned");
    assert_eq!(cpu.run(&xrstor), exc(Kind::Xrstor, 13, Some(0)));
    cpu.set(RDI, AREA);
    cpu.cr0 |= CR0_TS;
    assert_eq!(cpu.run(&xsave), exc(Kind::Xsave, 7, None));
    cpu.cr4 &= !CR4_OSXSAVE;
    assert_eq!(cpu.run(&xsave), exc(Kind::Xsave, 6, None), "#UD before #NM");
    cpu.cr4 |= CR4_OSXSAVE;
    cpu.cr0 &= !CR0_TS;

    // xrstor from an area whose AVX part is unmapped: #PF, nothing loaded.
    let mut cpu = busy_cpu(8);
    let area = AREA + 4096 - 576; // AVX component starts on the next page.
    cpu.poke(area, &[0; 576]);
    cpu.poke(area + 512, &7u64.to_le_bytes());
    cpu.poke(area + 24, &0x1f80u32.to_le_bytes());
    cpu.set(RDI, area);
    cpu.pages.remove(&((AREA + 4096) / 4096));
    let before = cpu.clone();
    assert_eq!(
        cpu.run(&xrstor),
        Outcome::Exception {
            kind: Kind::Xrstor,
            exception: Exception {
                vector: 14,
                error_code: Some(0),
                cr2: Some(AREA + 4096)
            }
        }
    );
    assert_eq!(cpu, before);

    // xsaves/xrstors are ring-0 only; xrstors needs the compacted form.
    let mut cpu = busy_cpu(9);
    cpu.cpl = 3;
    assert_eq!(
        cpu.run(&i64("0f c7 2f", "xsaves [rdi]")),
        exc(Kind::Xsaves, 13, Some(0))
    );
    cpu.cpl = 0;
    cpu.poke(AREA + 512, &[0; 64]);
    assert_eq!(
        cpu.run(&i64("48 0f c7 1f", "xrstors64 [rdi]")),
        exc(Kind::Xrstors, 13, Some(0))
    );
}

#[test]
fn xsavec_compacted_layout_with_avx512_and_round_trip() {
    let mut cpu = busy_cpu(10).with_avx512();
    // A made-up 16-byte component 10 that must be 64-byte aligned in the compacted form.
    cpu.xcr0 |= 1 << 10;
    cpu.layouts.insert(
        10,
        x86emu::XstateComponent {
            offset: 2752,
            size: 16,
            align64: true,
        },
    );
    let mut rng = Rng(11);
    for (c, size) in [(5u32, 64usize), (6, 512), (7, 1024), (9, 8), (10, 16)] {
        cpu.other
            .insert(c, (0..size).map(|_| rng.next() as u8).collect());
    }
    let orig = (without_selectors(ext_state(&cpu)), cpu.other.clone());
    assert_eq!(
        cpu.run(&i64("48 0f c7 27", "xsavec64 [rdi]")),
        Outcome::Done(Kind::Xsavec)
    );
    assert_eq!(cpu.peek_u64(AREA + 512), 0x6e7);
    assert_eq!(cpu.peek_u64(AREA + 520), 0x6e7 | 1 << 63);
    assert_eq!(cpu.peek_u128(AREA + 576), cpu.ymmh[0]);
    // AVX 576, opmask 832, ZMM_Hi256 896, Hi16_ZMM 1408, PKRU 2432, component 10 at 2496
    // (2440 rounded up to 64).
    assert_eq!(cpu.peek(AREA + 832, 64), cpu.other[&5]);
    assert_eq!(cpu.peek(AREA + 896, 512), cpu.other[&6]);
    assert_eq!(cpu.peek(AREA + 1408, 1024), cpu.other[&7]);
    assert_eq!(cpu.peek(AREA + 2432, 8), cpu.other[&9]);
    assert_eq!(
        cpu.peek(AREA + 2440, 56),
        vec![0; 56],
        "alignment gap untouched"
    );
    assert_eq!(cpu.peek(AREA + 2496, 16), cpu.other[&10]);

    scramble(&mut cpu);
    cpu.other.clear();
    assert_eq!(
        cpu.run(&i64("48 0f ae 2f", "xrstor64 [rdi]")),
        Outcome::Done(Kind::Xrstor)
    );
    assert_eq!((ext_state(&cpu), cpu.other.clone()), orig);

    // xrstors restores a compacted area too; components not in XSTATE_BV are initialised,
    // and MXCSR takes its initial value when SSE is not in XSTATE_BV.
    cpu.poke(AREA + 512, &0x201u64.to_le_bytes());
    assert_eq!(
        cpu.run(&i64("48 0f c7 1f", "xrstors64 [rdi]")),
        Outcome::Done(Kind::Xrstors)
    );
    assert_eq!(cpu.mxcsr, 0x1f80);
    assert_eq!(cpu.xmm, [0; 16]);
    assert_eq!(cpu.ymmh, [0; 16]);
    assert_eq!(cpu.other[&5], vec![0; 64]);
    assert_eq!(cpu.other[&9], orig.1[&9]);
    assert_eq!(cpu.fpu, orig.0 .0);

    // Fewer components: the packing changes (no AVX: opmask at 576, PKRU at 2176).
    cpu.other = orig.1.clone();
    cpu.set(RAX, 0x2e3);
    assert_eq!(
        cpu.run(&i64("0f c7 27", "xsavec [rdi]")),
        Outcome::Done(Kind::Xsavec)
    );
    assert_eq!(cpu.peek_u64(AREA + 520), 0x2e3 | 1 << 63);
    assert_eq!(cpu.peek(AREA + 576, 64), cpu.other[&5]);
    assert_eq!(cpu.peek(AREA + 2176, 8), cpu.other[&9]);
}

#[test]
fn xsave_standard_form_with_avx512_components() {
    let mut cpu = busy_cpu(12).with_avx512();
    cpu.other.insert(9, vec![1, 2, 3, 4, 0, 0, 0, 0]);
    assert_eq!(
        cpu.run(&i64("0f ae 37", "xsaveopt [rdi]")),
        Outcome::Done(Kind::Xsaveopt)
    );
    assert_eq!(cpu.peek_u64(AREA + 512), 0x2e7);
    assert_eq!(cpu.peek(AREA + 2688, 8), vec![1, 2, 3, 4, 0, 0, 0, 0]);

    // A backend that lacks a component: unsupported, nothing written.
    let mut cpu = busy_cpu(13);
    cpu.xcr0 = 0x207;
    let before = cpu.clone();
    match cpu.run(&i64("0f ae 27", "xsave [rdi]")) {
        Outcome::Unsupported(m) => assert!(m.contains("PKRU"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(cpu, before);
}

#[test]
fn fxsave_fxrstor() {
    let mut cpu = busy_cpu(14);
    let orig = without_selectors(ext_state(&cpu));
    let fxsave64 = i64("48 0f ae 07", "fxsave64 [rdi]");
    assert_eq!(cpu.run(&fxsave64), Outcome::Done(Kind::Fxsave));
    assert_eq!(cpu.peek_u64(AREA + 8), 0xffff_ffff_8123_4567);
    assert_eq!(cpu.peek_u32(AREA + 24), 0x1fa0);
    assert_eq!(cpu.peek_u128(AREA + 160 + 15 * 16), cpu.xmm[15]);
    assert_eq!(cpu.peek(AREA + 416, 96), vec![0xcc; 96]);
    scramble(&mut cpu);
    let ymmh = cpu.ymmh;
    assert_eq!(
        cpu.run(&i64("48 0f ae 0f", "fxrstor64 [rdi]")),
        Outcome::Done(Kind::Fxrstor)
    );
    assert_eq!((cpu.fpu, cpu.mxcsr, cpu.xmm), (orig.0, orig.1, orig.2));
    assert_eq!(cpu.ymmh, ymmh, "fxrstor leaves YMM high alone");

    // 32-bit mode: 8 XMM registers, 32-bit FIP + FCS.
    let mut cpu = busy_cpu(15);
    cpu.mode = Mode::Protected32;
    cpu.rip = 0x1000;
    assert_eq!(
        cpu.run(&insn(32, "0f ae 07", "fxsave [edi]")),
        Outcome::Done(Kind::Fxsave)
    );
    assert_eq!(cpu.peek_u32(AREA + 8), 0x8123_4567);
    assert_eq!(cpu.peek_u128(AREA + 160 + 7 * 16), cpu.xmm[7]);
    assert_eq!(
        cpu.peek(AREA + 288, 16),
        vec![0xcc; 16],
        "no XMM8 outside 64-bit mode"
    );

    // Faults: alignment 16, CR0.EM/TS -> #NM, MXCSR reserved bits -> #GP.
    let mut cpu = busy_cpu(16);
    let fxrstor = i64("0f ae 0f", "fxrstor [rdi]");
    cpu.set(RDI, AREA + 8);
    assert_eq!(cpu.run(&fxsave64), exc(Kind::Fxsave, 13, Some(0)));
    cpu.set(RDI, AREA);
    cpu.cr0 |= CR0_EM;
    assert_eq!(cpu.run(&fxrstor), exc(Kind::Fxrstor, 7, None));
    cpu.cr0 &= !CR0_EM;
    cpu.poke(AREA + 24, &0xffff_ffffu32.to_le_bytes());
    let before = cpu.clone();
    assert_eq!(cpu.run(&fxrstor), exc(Kind::Fxrstor, 13, Some(0)));
    assert_eq!(cpu, before);

    // Without CR4.OSFXSR only the x87 state moves.
    let mut cpu = busy_cpu(17);
    cpu.cr4 &= !CR4_OSFXSR;
    assert_eq!(cpu.run(&fxsave64), Outcome::Done(Kind::Fxsave));
    assert_eq!(cpu.peek(AREA + 24, 8), vec![0xcc; 8]);
    assert_eq!(cpu.peek(AREA + 160, 16), vec![0xcc; 16]);

    // Fast FXSAVE (EFER.FFXSR) skips XMM in 64-bit ring 0.
    let mut cpu = busy_cpu(18);
    cpu.efer |= EFER_FFXSR;
    assert_eq!(cpu.run(&fxsave64), Outcome::Done(Kind::Fxsave));
    assert_eq!(cpu.peek_u32(AREA + 24), 0x1fa0);
    assert_eq!(cpu.peek(AREA + 160, 16), vec![0xcc; 16]);
}

// ---- comparison with the host's own images ----

#[repr(C, align(64))]
struct Area([u8; 8192]);

fn host_xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: xgetbv(0) only reads XCR0; the host OS enabled XSAVE (checked by the caller).
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Loads ymm0-15 and MXCSR, puts two values on the x87 stack, then runs the host's
/// `xsave64`/`xsavec64`/`fxsave64` (`which` 0/1/2) with RFBM `rfbm` into `area`, and restores
/// the x87 and MXCSR state.
#[target_feature(enable = "avx")]
fn host_save(which: u32, ymm: &[u8; 512], mxcsr: u32, rfbm: u64, area: &mut Area) {
    macro_rules! save {
        ($ins:literal) => {
            // SAFETY: reads `ymm`/`mxcsr`, writes `area` (64-aligned, large enough); every
            // vector register used is declared clobbered, the x87 stack is emptied again and
            // the caller's MXCSR restored.
            unsafe {
                let mut saved_mxcsr = 0u32;
                std::arch::asm!(
                    "stmxcsr [{old}]",
                    "vmovdqu ymm0, [{y}]", "vmovdqu ymm1, [{y}+32]", "vmovdqu ymm2, [{y}+64]",
                    "vmovdqu ymm3, [{y}+96]", "vmovdqu ymm4, [{y}+128]", "vmovdqu ymm5, [{y}+160]",
                    "vmovdqu ymm6, [{y}+192]", "vmovdqu ymm7, [{y}+224]", "vmovdqu ymm8, [{y}+256]",
                    "vmovdqu ymm9, [{y}+288]", "vmovdqu ymm10, [{y}+320]", "vmovdqu ymm11, [{y}+352]",
                    "vmovdqu ymm12, [{y}+384]", "vmovdqu ymm13, [{y}+416]", "vmovdqu ymm14, [{y}+448]",
                    "vmovdqu ymm15, [{y}+480]",
                    "ldmxcsr [{m}]",
                    "fninit", "fld1", "fldpi",
                    $ins,
                    "fninit",
                    "ldmxcsr [{old}]",
                    y = in(reg) ymm.as_ptr(),
                    m = in(reg) &mxcsr,
                    old = in(reg) &mut saved_mxcsr,
                    a = in(reg) area.0.as_mut_ptr(),
                    in("eax") rfbm as u32,
                    in("edx") (rfbm >> 32) as u32,
                    out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                    out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                    out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                    options(nostack),
                );
            }
        };
    }
    match which {
        0 => save!("xsave64 [{a}]"),
        1 => save!("xsavec64 [{a}]"),
        _ => save!("fxsave64 [{a}]"),
    }
}

fn host_has_xsave_avx() -> bool {
    std::arch::is_x86_feature_detected!("xsave") && std::arch::is_x86_feature_detected!("avx")
}

/// Mock whose memory holds `image` at AREA, with the host's XSAVE layouts.
fn cpu_with_image(image: &[u8]) -> MockCpu {
    let mut cpu = MockCpu::new();
    cpu.xcr0 = host_xcr0();
    cpu.layouts = (2..63)
        .filter_map(|c| x86emu::host::xstate_layout(c).map(|l| (c, l)))
        .collect();
    cpu.poke(AREA, image);
    cpu.set(RDI, AREA);
    cpu.set(RAX, 0xffff_ffff);
    cpu.set(RDX, 0xffff_ffff);
    cpu
}

#[test]
fn host_layout_of_avx_is_standard() {
    if !host_has_xsave_avx() {
        return;
    }
    assert_eq!(x86emu::host::xstate_layout(2), Some(x86emu::AVX_LAYOUT));
    assert_eq!(x86emu::host::xstate_layout(0), None);
    assert_eq!(x86emu::host::xstate_layout(62), None);
}

#[test]
fn emulated_images_match_host_images() {
    if !host_has_xsave_avx() {
        eprintln!("host lacks XSAVE/AVX; skipped");
        return;
    }
    let mut rng = Rng(2024);
    let ymm: [u8; 512] = std::array::from_fn(|_| rng.next() as u8);
    let mxcsr = 0x1f80 | 0x40 | 0x6000; // DAZ, round toward zero
    let xcr0 = host_xcr0();
    assert_eq!(xcr0 & 7, 7, "host XCR0 enables x87/SSE/AVX");

    // The emulator's own images, from a mock holding the same values.
    let mut mock = cpu_with_image(&[0; 4096]);
    for i in 0..16 {
        mock.xmm[i] = u128::from_le_bytes(ymm[32 * i..32 * i + 16].try_into().unwrap());
        mock.ymmh[i] = u128::from_le_bytes(ymm[32 * i + 16..32 * i + 32].try_into().unwrap());
    }
    mock.mxcsr = mxcsr;

    // Standard form: SSE region, MXCSR(+mask) and AVX component match byte for byte; the
    // x87 image decodes and re-encodes to the host's bytes.
    let mut host = Area([0; 8192]);
    // SAFETY: AVX and XSAVE are present (checked above).
    unsafe { host_save(0, &ymm, mxcsr, 7, &mut host) };
    let mut cpu = mock.clone();
    cpu.set(RAX, 7);
    cpu.set(RDX, 0);
    assert_eq!(
        cpu.run(&i64("48 0f ae 27", "xsave64 [rdi]")),
        Outcome::Done(Kind::Xsave)
    );
    let emu = cpu.peek(AREA, 832);
    assert_eq!(emu[24..32], host.0[24..32], "MXCSR and MXCSR_MASK");
    assert_eq!(emu[160..416], host.0[160..416], "XMM0-15");
    assert_eq!(emu[576..832], host.0[576..832], "YMM_Hi128");
    assert_eq!(host.0[512] & 7, 7, "host XSTATE_BV");
    assert_eq!(emu[512..520], host.0[512..520], "XSTATE_BV");

    // Host image -> emulated xrstor64 -> emulated xsave64 gives the host image back.
    let mut cpu = cpu_with_image(&host.0[..4096]);
    cpu.set(RAX, 7);
    cpu.set(RDX, 0);
    assert_eq!(
        cpu.run(&i64("48 0f ae 2f", "xrstor64 [rdi]")),
        Outcome::Done(Kind::Xrstor)
    );
    assert_eq!(cpu.mxcsr, mxcsr);
    assert_eq!(cpu.fpu.fcw, 0x37f);
    assert_ne!(cpu.fpu.ftw, 0, "two x87 registers in use");
    cpu.set(RDI, AREA + 4096);
    cpu.map(AREA + 4096, 4096);
    assert_eq!(
        cpu.run(&i64("48 0f ae 27", "xsave64 [rdi]")),
        Outcome::Done(Kind::Xsave)
    );
    assert_eq!(
        cpu.peek(AREA + 4096, 416),
        host.0[..416].to_vec(),
        "legacy region"
    );
    assert_eq!(cpu.peek(AREA + 4096 + 576, 256), host.0[576..832].to_vec());

    // Compacted form with every component the host enabled: round trip through the
    // emulator reproduces each component the host marked in use.
    let rfbm = xcr0;
    let mut host = Area([0; 8192]);
    // SAFETY: as above; xsavec is checked here.
    if std::arch::is_x86_feature_detected!("xsavec") {
        unsafe { host_save(1, &ymm, mxcsr, rfbm, &mut host) };
        let xstate_bv = u64::from_le_bytes(host.0[512..520].try_into().unwrap());
        let xcomp_bv = u64::from_le_bytes(host.0[520..528].try_into().unwrap());
        assert_eq!(xcomp_bv, rfbm | 1 << 63);
        let mut cpu = cpu_with_image(&host.0);
        assert_eq!(
            cpu.run(&i64("48 0f ae 2f", "xrstor64 [rdi]")),
            Outcome::Done(Kind::Xrstor)
        );
        cpu.set(RDI, AREA + 0x4000);
        cpu.map(AREA + 0x4000, 8192);
        assert_eq!(
            cpu.run(&i64("48 0f c7 27", "xsavec64 [rdi]")),
            Outcome::Done(Kind::Xsavec)
        );
        let emu = cpu.peek(AREA + 0x4000, 8192);
        assert_eq!(emu[520..528], host.0[520..528], "XCOMP_BV");
        let emu_bv = u64::from_le_bytes(emu[512..520].try_into().unwrap());
        assert_eq!(emu_bv & xstate_bv, xstate_bv);
        assert_eq!(emu[..416], host.0[..416], "legacy region");
        let mut offset = 576usize;
        for c in 2..63 {
            if rfbm & (1 << c) == 0 {
                continue;
            }
            let l = x86emu::host::xstate_layout(c).unwrap();
            if l.align64 {
                offset = offset.next_multiple_of(64);
            }
            let size = l.size as usize;
            if xstate_bv & (1 << c) != 0 {
                assert_eq!(
                    emu[offset..offset + size],
                    host.0[offset..offset + size],
                    "component {c}"
                );
            }
            offset += size;
        }
    }

    // fxsave64: host image -> emulated fxrstor64 -> emulated fxsave64 gives the same bytes.
    let mut host = Area([0; 8192]);
    // SAFETY: as above.
    unsafe { host_save(2, &ymm, mxcsr, 0, &mut host) };
    let mut cpu = cpu_with_image(&host.0[..512]);
    assert_eq!(
        cpu.run(&i64("48 0f ae 0f", "fxrstor64 [rdi]")),
        Outcome::Done(Kind::Fxrstor)
    );
    cpu.set(RDI, AREA + 1024);
    cpu.map(AREA + 1024, 512);
    assert_eq!(
        cpu.run(&i64("48 0f ae 07", "fxsave64 [rdi]")),
        Outcome::Done(Kind::Fxsave)
    );
    assert_eq!(cpu.peek(AREA + 1024, 416), host.0[..416].to_vec());
}
