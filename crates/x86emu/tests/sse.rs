//! SSE/AVX moves and logic: register forms cross-checked by executing the same bytes on the
//! host, memory forms and faults against the mock.

mod common;

use common::{i64, insn, MockCpu, Rng};
use core::arch::x86_64::{__m128i, __m256i};
use iced_x86::Register::{RAX, RBX, RCX, RDI};
use x86emu::{bits::*, Exception, Kind, Mode, Outcome};

fn parse(bytes: &str) -> Vec<u8> {
    bytes
        .split(',')
        .map(|b| u8::from_str_radix(b.trim().trim_start_matches("0x"), 16).unwrap())
        .collect()
}

fn to_m128(v: u128) -> __m128i {
    // SAFETY: both types are 16 plain bytes.
    unsafe { std::mem::transmute::<u128, __m128i>(v) }
}

fn from_m128(v: __m128i) -> u128 {
    // SAFETY: both types are 16 plain bytes.
    unsafe { std::mem::transmute::<__m128i, u128>(v) }
}

/// Runs `bytes` (an instruction on xmm0/xmm1) on the host and on the mock from the same
/// inputs, and compares both registers.
macro_rules! cross_xmm {
    ($bytes:literal, $kind:expr, $rng:expr) => {{
        let bytes = parse($bytes);
        for _ in 0..50 {
            let (x0, x1) = ($rng.u128(), $rng.u128());
            let mut h0 = to_m128(x0);
            let mut h1 = to_m128(x1);
            // SAFETY: the bytes are one SSE instruction on xmm0/xmm1, both declared.
            unsafe {
                std::arch::asm!(concat!(".byte ", $bytes),
                    inout("xmm0") h0, inout("xmm1") h1, options(nostack, nomem));
            }
            let mut cpu = MockCpu::new();
            cpu.xmm[0] = x0;
            cpu.xmm[1] = x1;
            cpu.ymmh[0] = 0x5555;
            assert_eq!(cpu.run(&bytes), Outcome::Done($kind), "{}", $bytes);
            assert_eq!(cpu.xmm[0], from_m128(h0), "xmm0 after {}", $bytes);
            assert_eq!(cpu.xmm[1], from_m128(h1), "xmm1 after {}", $bytes);
            assert_eq!(cpu.ymmh[0], 0x5555, "legacy SSE keeps bits 255:128");
        }
    }};
}

/// Same with rax and xmm0.
macro_rules! cross_gpr {
    ($bytes:literal, $rng:expr) => {{
        let bytes = parse($bytes);
        for _ in 0..50 {
            let (x0, r) = ($rng.u128(), $rng.next());
            let mut h0 = to_m128(x0);
            let mut hr = r;
            // SAFETY: the bytes are one SSE instruction on xmm0 and rax, both declared.
            unsafe {
                std::arch::asm!(concat!(".byte ", $bytes),
                    inout("xmm0") h0, inout("rax") hr, options(nostack, nomem));
            }
            let mut cpu = MockCpu::new();
            cpu.xmm[0] = x0;
            cpu.set(RAX, r);
            assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::SseMove), "{}", $bytes);
            assert_eq!(cpu.xmm[0], from_m128(h0), "xmm0 after {}", $bytes);
            assert_eq!(cpu.get(RAX), hr, "rax after {}", $bytes);
        }
    }};
}

#[test]
fn register_forms_match_host() {
    let mut rng = Rng(99);
    cross_xmm!("0xf3,0x0f,0x10,0xc1", Kind::SseMove, rng); // movss xmm0,xmm1
    cross_xmm!("0xf3,0x0f,0x11,0xc8", Kind::SseMove, rng); // movss xmm0,xmm1 (store form)
    cross_xmm!("0xf2,0x0f,0x10,0xc1", Kind::SseMove, rng); // movsd
    cross_xmm!("0xf2,0x0f,0x11,0xc8", Kind::SseMove, rng);
    cross_xmm!("0xf3,0x0f,0x7e,0xc1", Kind::SseMove, rng); // movq xmm0,xmm1
    cross_xmm!("0x66,0x0f,0xd6,0xc8", Kind::SseMove, rng); // movq xmm0,xmm1 (66 0F D6)
    cross_xmm!("0x0f,0x28,0xc1", Kind::SseMove, rng); // movaps
    cross_xmm!("0x0f,0x29,0xc8", Kind::SseMove, rng);
    cross_xmm!("0x66,0x0f,0x28,0xc1", Kind::SseMove, rng); // movapd
    cross_xmm!("0x0f,0x10,0xc1", Kind::SseMove, rng); // movups
    cross_xmm!("0x66,0x0f,0x11,0xc8", Kind::SseMove, rng); // movupd
    cross_xmm!("0x66,0x0f,0x6f,0xc1", Kind::SseMove, rng); // movdqa
    cross_xmm!("0xf3,0x0f,0x7f,0xc8", Kind::SseMove, rng); // movdqu (store form)
    cross_xmm!("0x0f,0x12,0xc1", Kind::SseMove, rng); // movhlps
    cross_xmm!("0x0f,0x16,0xc1", Kind::SseMove, rng); // movlhps
    cross_xmm!("0x66,0x0f,0xef,0xc1", Kind::SseLogic, rng); // pxor
    cross_xmm!("0x66,0x0f,0xef,0xc0", Kind::SseLogic, rng); // pxor xmm0,xmm0
    cross_xmm!("0x0f,0x57,0xc1", Kind::SseLogic, rng); // xorps
    cross_xmm!("0x66,0x0f,0x57,0xc1", Kind::SseLogic, rng); // xorpd
    cross_xmm!("0x66,0x0f,0xeb,0xc1", Kind::SseLogic, rng); // por
    cross_xmm!("0x0f,0x56,0xc1", Kind::SseLogic, rng); // orps
    cross_xmm!("0x66,0x0f,0x56,0xc1", Kind::SseLogic, rng); // orpd
    cross_xmm!("0x66,0x0f,0xdb,0xc1", Kind::SseLogic, rng); // pand
    cross_xmm!("0x0f,0x54,0xc1", Kind::SseLogic, rng); // andps
    cross_xmm!("0x66,0x0f,0x54,0xc1", Kind::SseLogic, rng); // andpd
    cross_xmm!("0x66,0x0f,0xdf,0xc1", Kind::SseLogic, rng); // pandn
    cross_xmm!("0x0f,0x55,0xc1", Kind::SseLogic, rng); // andnps
    cross_xmm!("0x66,0x0f,0x55,0xc1", Kind::SseLogic, rng); // andnpd
    cross_gpr!("0x66,0x0f,0x6e,0xc0", rng); // movd xmm0,eax
    cross_gpr!("0x66,0x48,0x0f,0x6e,0xc0", rng); // movq xmm0,rax
    cross_gpr!("0x66,0x0f,0x7e,0xc0", rng); // movd eax,xmm0
    cross_gpr!("0x66,0x48,0x0f,0x7e,0xc0", rng); // movq rax,xmm0
}

#[target_feature(enable = "avx")]
fn host_ymm(bytes_id: u32, y0: [u128; 2], y1: [u128; 2], rax: u64) -> ([u128; 2], [u128; 2]) {
    // SAFETY: [u128; 2] and __m256i are both 32 plain bytes.
    let (mut h0, mut h1) = unsafe {
        (
            std::mem::transmute::<[u128; 2], __m256i>(y0),
            std::mem::transmute::<[u128; 2], __m256i>(y1),
        )
    };
    // SAFETY: each block is one AVX instruction on ymm0/ymm1/rax, all declared.
    unsafe {
        match bytes_id {
            0 => {
                std::arch::asm!(".byte 0xc5,0xfe,0x6f,0xc1", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
            1 => {
                std::arch::asm!(".byte 0xc5,0xfa,0x6f,0xc1", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
            2 => {
                std::arch::asm!(".byte 0xc5,0xf5,0xef,0xc1", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
            3 => {
                std::arch::asm!(".byte 0xc5,0xf0,0x57,0xc1", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
            4 => {
                std::arch::asm!(".byte 0xc5,0xf9,0x6e,0xc0", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
            5 => {
                std::arch::asm!(".byte 0xc5,0xfa,0x7e,0xc1", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
            _ => {
                std::arch::asm!(".byte 0xc5,0xfc,0x28,0xc1", inout("ymm0") h0, inout("ymm1") h1, in("rax") rax, options(nostack, nomem))
            }
        }
    }
    // SAFETY: as above.
    unsafe {
        (
            std::mem::transmute::<__m256i, [u128; 2]>(h0),
            std::mem::transmute::<__m256i, [u128; 2]>(h1),
        )
    }
}

#[test]
fn vex_register_forms_match_host() {
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("host has no AVX; skipped");
        return;
    }
    let cases = [
        (0, "c5 fe 6f c1", "vmovdqu ymm0,ymm1"),
        (1, "c5 fa 6f c1", "vmovdqu xmm0,xmm1"),
        (2, "c5 f5 ef c1", "vpxor ymm0,ymm1,ymm1"),
        (3, "c5 f0 57 c1", "vxorps xmm0,xmm1,xmm1"),
        (4, "c5 f9 6e c0", "vmovd xmm0,eax"),
        (5, "c5 fa 7e c1", "vmovq xmm0,xmm1"),
        (6, "c5 fc 28 c1", "vmovaps ymm0,ymm1"),
    ];
    let mut rng = Rng(5);
    for (id, hex, text) in cases {
        let bytes = i64(hex, text);
        for _ in 0..30 {
            let y0 = [rng.u128(), rng.u128()];
            let y1 = [rng.u128(), rng.u128()];
            let rax = rng.next();
            // SAFETY: AVX is present (checked above).
            let (h0, h1) = unsafe { host_ymm(id, y0, y1, rax) };
            let mut cpu = MockCpu::new();
            (cpu.xmm[0], cpu.ymmh[0]) = (y0[0], y0[1]);
            (cpu.xmm[1], cpu.ymmh[1]) = (y1[0], y1[1]);
            cpu.set(RAX, rax);
            assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::AvxMove), "{text}");
            assert_eq!([cpu.xmm[0], cpu.ymmh[0]], h0, "ymm0 after {text}");
            assert_eq!([cpu.xmm[1], cpu.ymmh[1]], h1, "ymm1 after {text}");
        }
    }
}

#[test]
fn movd_ecx_to_xmm15_as_seen_in_debian() {
    let mut cpu = MockCpu::new();
    cpu.set(RCX, 0xffff_ffff_8765_4321);
    cpu.xmm[15] = u128::MAX;
    cpu.ymmh[15] = 7;
    let rip = cpu.rip;
    assert_eq!(
        cpu.run(&i64("66 44 0f 6e f9", "movd xmm15,ecx")),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[15], 0x8765_4321);
    assert_eq!(cpu.ymmh[15], 7);
    assert_eq!(cpu.rip, rip + 5);
}

#[test]
fn memory_loads_and_stores() {
    let mut cpu = MockCpu::new();
    let v: u128 = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
    cpu.poke(0x5000, &v.to_le_bytes());
    cpu.poke(0x5010, &[0; 64]);
    cpu.set(RAX, 0x5000);
    cpu.set(RBX, 0x5001);

    let run = |cpu: &mut MockCpu, hex: &str, text: &str| cpu.run(&i64(hex, text));
    assert_eq!(
        run(&mut cpu, "66 0f 6f 00", "movdqa xmm0,[rax]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[0], v);
    let before = cpu.clone();
    assert_eq!(
        run(&mut cpu, "66 0f 6f 0b", "movdqa xmm1,[rbx]"),
        Outcome::Exception {
            kind: Kind::SseMove,
            exception: Exception {
                vector: 13,
                error_code: Some(0),
                cr2: None
            }
        }
    );
    assert_eq!(cpu, before);
    assert_eq!(
        run(&mut cpu, "f3 0f 6f 0b", "movdqu xmm1,[rbx]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[1], v >> 8, "byte 16 (at 0x5010) is zero");
    assert_eq!(
        run(&mut cpu, "0f 10 13", "movups xmm2,[rbx]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[2], v >> 8);

    // Stores.
    cpu.xmm[3] = u128::MAX - 1;
    assert_eq!(
        run(&mut cpu, "0f 29 58 10", "movaps [rax+10h],xmm3"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.peek_u128(0x5010), u128::MAX - 1);
    assert_eq!(
        run(&mut cpu, "66 0f e7 58 20", "movntdq [rax+20h],xmm3"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.peek_u128(0x5020), u128::MAX - 1);

    // movss/movsd from memory zero-extend; to memory write only their width.
    cpu.xmm[4] = u128::MAX;
    assert_eq!(
        run(&mut cpu, "f3 0f 10 20", "movss xmm4,[rax]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[4], 0x0302_0100);
    cpu.xmm[4] = u128::MAX;
    assert_eq!(
        run(&mut cpu, "f2 0f 10 20", "movsd xmm4,[rax]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[4], 0x0706_0504_0302_0100);
    cpu.xmm[5] = 0xaabb_ccdd;
    assert_eq!(
        run(&mut cpu, "f3 0f 11 68 30", "movss [rax+30h],xmm5"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.peek_u64(0x5030), 0xaabb_ccdd);

    // movlps/movhps merge halves; stores write 8 bytes.
    cpu.xmm[6] = u128::MAX;
    assert_eq!(
        run(&mut cpu, "0f 12 30", "movlps xmm6,[rax]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[6], (u128::MAX << 64) | 0x0706_0504_0302_0100);
    assert_eq!(
        run(&mut cpu, "66 0f 16 30", "movhpd xmm6,[rax]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(
        cpu.xmm[6],
        (0x0706_0504_0302_0100u128 << 64) | 0x0706_0504_0302_0100
    );
    cpu.xmm[7] = (1u128 << 64) | 2;
    assert_eq!(
        run(&mut cpu, "0f 17 78 40", "movhps [rax+40h],xmm7"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.peek_u64(0x5040), 1);

    // movd/movq with memory.
    assert_eq!(
        run(&mut cpu, "66 0f 7e 78 48", "movd [rax+48h],xmm7"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.peek_u64(0x5048), 2);
    assert_eq!(
        run(&mut cpu, "66 0f d6 78 50", "movq [rax+50h],xmm7"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.peek_u64(0x5050), 2);
    assert_eq!(
        run(&mut cpu, "66 48 0f 6e 00", "movq xmm0,[rax]"),
        Outcome::Done(Kind::SseMove)
    );
    assert_eq!(cpu.xmm[0], 0x0706_0504_0302_0100);

    // pxor with a misaligned memory operand: #GP(0).
    assert!(matches!(
        run(&mut cpu, "66 0f ef 03", "pxor xmm0,[rbx]"),
        Outcome::Exception {
            exception: Exception { vector: 13, .. },
            ..
        }
    ));
    // Page fault on a store.
    cpu.set(RDI, 0x9_0000);
    assert_eq!(
        run(&mut cpu, "66 0f 7f 07", "movdqa [rdi],xmm0"),
        Outcome::Exception {
            kind: Kind::SseMove,
            exception: Exception {
                vector: 14,
                error_code: Some(2),
                cr2: Some(0x9_0000)
            }
        }
    );
}

#[test]
fn sse_needs_osfxsr_and_honours_em_ts() {
    let pxor = i64("66 0f ef c0", "pxor xmm0,xmm0");
    let mut cpu = MockCpu::new();
    cpu.xmm[0] = 5;
    let check = |cpu: &mut MockCpu, vector: u8| {
        let before = cpu.clone();
        assert_eq!(
            cpu.run(&pxor),
            Outcome::Exception {
                kind: Kind::SseLogic,
                exception: Exception {
                    vector,
                    error_code: None,
                    cr2: None
                }
            }
        );
        assert_eq!(*cpu, before);
    };
    cpu.cr0 |= CR0_TS;
    check(&mut cpu, 7);
    cpu.cr0 &= !CR0_TS;
    cpu.cr0 |= CR0_EM;
    check(&mut cpu, 6);
    cpu.cr0 &= !CR0_EM;
    cpu.cr4 &= !CR4_OSFXSR;
    check(&mut cpu, 6);
    cpu.cr4 |= CR4_OSFXSR;
    assert_eq!(cpu.run(&pxor), Outcome::Done(Kind::SseLogic));
    assert_eq!(cpu.xmm[0], 0);
}

#[test]
fn vex_writes_zero_upper_bits_including_zmm() {
    let mut cpu = MockCpu::new().with_avx512();
    cpu.other.insert(6, vec![0xee; 512]);
    cpu.xmm[2] = 1;
    cpu.ymmh[2] = 2;
    cpu.xmm[3] = 3;
    cpu.ymmh[3] = 4;
    assert_eq!(
        cpu.run(&i64("c5 f9 6f d3", "vmovdqa xmm2,xmm3")),
        Outcome::Done(Kind::AvxMove)
    );
    assert_eq!((cpu.xmm[2], cpu.ymmh[2]), (3, 0));
    let zmm = &cpu.other[&6];
    assert!(
        zmm[64..96].iter().all(|&b| b == 0),
        "ZMM2 bits 511:256 zeroed"
    );
    assert!(
        zmm[..64].iter().chain(&zmm[96..]).all(|&b| b == 0xee),
        "others kept"
    );

    // vzeroupper: all 16 registers, YMM high and ZMM high, XMM kept.
    assert_eq!(
        cpu.run(&i64("c5 f8 77", "vzeroupper")),
        Outcome::Done(Kind::AvxMove)
    );
    assert_eq!(cpu.xmm[3], 3);
    assert_eq!(cpu.ymmh, [0; 16]);
    assert!(cpu.other[&6].iter().all(|&b| b == 0));

    // vmovdqu ymm load from unaligned memory; vmovdqa ymm needs 32-byte alignment.
    cpu.poke(0x7008, &(0..32).collect::<Vec<u8>>());
    cpu.set(RAX, 0x7008);
    assert_eq!(
        cpu.run(&i64("c5 fe 6f 00", "vmovdqu ymm0,[rax]")),
        Outcome::Done(Kind::AvxMove)
    );
    assert_eq!(
        cpu.xmm[0],
        u128::from_le_bytes((0..16).collect::<Vec<u8>>().try_into().unwrap())
    );
    assert_eq!(
        cpu.ymmh[0],
        u128::from_le_bytes((16..32).collect::<Vec<u8>>().try_into().unwrap())
    );
    assert!(matches!(
        cpu.run(&i64("c5 fd 6f 00", "vmovdqa ymm0,[rax]")),
        Outcome::Exception {
            exception: Exception { vector: 13, .. },
            ..
        }
    ));
    // ... and a store of ymm.
    cpu.set(RBX, 0x7040);
    cpu.map(0x7040, 32);
    assert_eq!(
        cpu.run(&i64("c5 fd 7f 03", "vmovdqa [rbx],ymm0")),
        Outcome::Done(Kind::AvxMove)
    );
    assert_eq!(cpu.peek(0x7040, 32), (0..32).collect::<Vec<u8>>());

    // vzeroall in 32-bit mode touches only 8 registers.
    let mut cpu = MockCpu::new();
    cpu.mode = Mode::Protected32;
    cpu.rip = 0x1000;
    cpu.xmm = [9; 16];
    cpu.ymmh = [9; 16];
    assert_eq!(
        cpu.run(&insn(32, "c5 fc 77", "vzeroall")),
        Outcome::Done(Kind::AvxMove)
    );
    assert_eq!(&cpu.xmm[..8], &[0; 8]);
    assert_eq!(&cpu.ymmh[..8], &[0; 8]);
    assert_eq!(&cpu.xmm[8..], &[9; 8]);
}

#[test]
fn vex_requires_xsave_avx_state() {
    let bytes = i64("c5 f9 6f d3", "vmovdqa xmm2,xmm3");
    let mut cpu = MockCpu::new();
    cpu.xcr0 = 0x3;
    let before = cpu.clone();
    assert!(matches!(
        cpu.run(&bytes),
        Outcome::Exception {
            exception: Exception { vector: 6, .. },
            ..
        }
    ));
    assert_eq!(cpu, before);
    cpu.xcr0 = 0x7;
    cpu.cr0 |= CR0_TS;
    assert!(matches!(
        cpu.run(&bytes),
        Outcome::Exception {
            exception: Exception { vector: 7, .. },
            ..
        }
    ));
    // AVX-512 state on, but the backend cannot provide ZMM_Hi256: unsupported, nothing changed.
    cpu.cr0 &= !CR0_TS;
    cpu.xcr0 = 0xe7;
    cpu.xmm[3] = 1;
    let before = cpu.clone();
    assert!(matches!(cpu.run(&bytes), Outcome::Unsupported(m) if m.contains("ZMM_Hi256")));
    assert_eq!(cpu, before);
    // EVEX is not emulated.
    assert!(matches!(
        cpu.run(&[0x62, 0xf1, 0x7c, 0x48, 0x28, 0xc1]),
        Outcome::Unsupported(m) if m.contains("vmovaps zmm0")
    ));
}
