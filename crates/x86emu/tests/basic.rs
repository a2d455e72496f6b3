//! int3, clac/stac, popcnt, fwait, ldmxcsr/stmxcsr, movnti, cmpxchg8b/16b, addressing, and
//! the counters.

mod common;

use common::{i64, insn, MockCpu, Rng};
use iced_x86::Register::{RAX, RBP, RBX, RCX, RDI, RDX, RSI};
use x86emu::{bits::*, Exception, Kind, Mode, Outcome, QuirkCounters};

fn exc(kind: Kind, vector: u8, error_code: Option<u32>, cr2: Option<u64>) -> Outcome {
    Outcome::Exception {
        kind,
        exception: Exception {
            vector,
            error_code,
            cr2,
        },
    }
}

fn gp0(kind: Kind) -> Outcome {
    exc(kind, 13, Some(0), None)
}

const ARITH: u64 = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF;

#[test]
fn int3_is_a_software_exception_after_the_instruction() {
    let mut cpu = MockCpu::new();
    let rip = cpu.rip;
    let out = cpu.run(&i64("cc", "int3"));
    assert_eq!(out, exc(Kind::Int3, 3, None, None));
    if let Outcome::Exception { exception, .. } = out {
        assert!(exception.is_software());
    }
    assert_eq!(cpu.rip, rip + 1);
}

#[test]
fn int3_in_v86_needs_iopl3() {
    let mut cpu = MockCpu::new();
    cpu.mode = Mode::Virtual8086;
    cpu.rip = 0x100;
    assert_eq!(cpu.run(&[0xcc]), gp0(Kind::Int3));
    assert_eq!(cpu.rip, 0x100);
    cpu.rflags |= RFLAGS_IOPL;
    assert_eq!(cpu.run(&[0xcc]), exc(Kind::Int3, 3, None, None));
    assert_eq!(cpu.rip, 0x101);
}

#[test]
fn clac_stac_flip_ac_only() {
    let mut cpu = MockCpu::new();
    cpu.rflags = 0x2 | RFLAGS_AC | RFLAGS_CF | RFLAGS_RF;
    let rip = cpu.rip;
    // Followed by other bytes: only the first instruction runs.
    let mut bytes = i64("0f 01 ca", "clac");
    bytes.extend_from_slice(&[0x0f, 0x01, 0xcb]);
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Clac));
    assert_eq!(cpu.rflags, 0x2 | RFLAGS_CF, "AC and RF cleared");
    assert_eq!(cpu.rip, rip + 3);
    assert_eq!(cpu.run(&i64("0f 01 cb", "stac")), Outcome::Done(Kind::Stac));
    assert_eq!(cpu.rflags, 0x2 | RFLAGS_CF | RFLAGS_AC);
    assert_eq!(cpu.rip, rip + 6);
}

#[test]
fn clac_faults_outside_ring0_and_with_lock() {
    let mut cpu = MockCpu::new();
    cpu.cpl = 3;
    let before = cpu.clone();
    assert_eq!(cpu.run(&[0x0f, 0x01, 0xca]), exc(Kind::Clac, 6, None, None));
    assert_eq!(cpu, before);
    cpu.cpl = 0;
    assert_eq!(
        cpu.run(&[0xf0, 0x0f, 0x01, 0xcb]),
        exc(Kind::Stac, 6, None, None)
    );
    assert_eq!(cpu, before.clone_with_cpl(0));
    // Real mode has no CPL check.
    cpu.mode = Mode::Real;
    cpu.rip = 0x7c00;
    assert_eq!(cpu.run(&[0x0f, 0x01, 0xcb]), Outcome::Done(Kind::Stac));
    assert_eq!(cpu.rip, 0x7c03);
}

trait CloneWith {
    fn clone_with_cpl(&self, cpl: u8) -> Self;
}

impl CloneWith for MockCpu {
    fn clone_with_cpl(&self, cpl: u8) -> Self {
        let mut c = self.clone();
        c.cpl = cpl;
        c
    }
}

/// The host's popcnt with the given input flags: (result register, flags).
fn host_popcnt64(dst: u64, src: u64, flags: u64) -> (u64, u64) {
    let out: u64;
    let f: u64;
    // SAFETY: only registers and the stack (pushfq/popfq) are used; flags written are the
    // arithmetic ones.
    unsafe {
        std::arch::asm!(
            "push {f}", "popfq",
            "popcnt {d}, {s}",
            "pushfq", "pop {f}",
            d = inout(reg) dst => out,
            s = in(reg) src,
            f = inout(reg) flags => f,
        );
    }
    (out, f)
}

fn host_popcnt16(dst: u64, src: u64, flags: u64) -> (u64, u64) {
    let out: u64;
    let f: u64;
    // SAFETY: as in host_popcnt64.
    unsafe {
        std::arch::asm!(
            "push {f}", "popfq",
            "popcnt {d:x}, {s:x}",
            "pushfq", "pop {f}",
            d = inout(reg) dst => out,
            s = in(reg) src,
            f = inout(reg) flags => f,
        );
    }
    (out, f)
}

fn host_popcnt32(dst: u64, src: u64, flags: u64) -> (u64, u64) {
    let out: u64;
    let f: u64;
    // SAFETY: as in host_popcnt64.
    unsafe {
        std::arch::asm!(
            "push {f}", "popfq",
            "popcnt {d:e}, {s:e}",
            "pushfq", "pop {f}",
            d = inout(reg) dst => out,
            s = in(reg) src,
            f = inout(reg) flags => f,
        );
    }
    (out, f)
}

#[test]
fn popcnt_matches_host_for_all_sizes() {
    let p64 = i64("f3 48 0f b8 c3", "popcnt rax,rbx");
    let p32 = i64("f3 0f b8 c3", "popcnt eax,ebx");
    let p16 = i64("66 f3 0f b8 c3", "popcnt ax,bx");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut samples: Vec<u64> = vec![0, 1, u64::MAX, 0xffff_0000_0000_0000, 0x1_0000];
    samples.extend((0..300).map(|_| rng.next() & (rng.next() | rng.next())));
    for (i, &src) in samples.iter().enumerate() {
        let dst = rng.next();
        let flags = if i % 2 == 0 { 0x2 | ARITH } else { 0x2 };
        type HostFn = fn(u64, u64, u64) -> (u64, u64);
        let cases: [(&[u8], HostFn); 3] = [
            (&p64, host_popcnt64),
            (&p32, host_popcnt32),
            (&p16, host_popcnt16),
        ];
        for (bytes, host) in cases {
            let mut cpu = MockCpu::new();
            cpu.set(RAX, dst);
            cpu.set(RBX, src);
            cpu.rflags = flags;
            assert_eq!(cpu.run(bytes), Outcome::Done(Kind::Popcnt));
            let (want, want_flags) = host(dst, src, flags);
            assert_eq!(cpu.get(RAX), want, "{bytes:02x?} src {src:#x} dst {dst:#x}");
            assert_eq!(
                cpu.rflags & ARITH,
                want_flags & ARITH,
                "flags, src {src:#x}"
            );
            assert_eq!(cpu.get(RBX), src);
        }
    }
}

#[test]
fn popcnt_memory_operand_with_fs_override_and_rip_relative() {
    let mut cpu = MockCpu::new();
    cpu.seg[4] = 0x7000_0000; // FS base
    cpu.seg[3] = 0xdead_0000; // DS base: ignored in 64-bit mode
    cpu.set(RSI, 0x10);
    let bytes = i64("64 f3 48 0f b8 44 b6 08", "popcnt rax,fs:[rsi+rsi*4+8h]");
    // rsi + rsi*4 = 0x50: put the value there instead.
    cpu.poke(0x7000_0000 + 0x58, &0x0f0f_0f0f_u64.to_le_bytes());
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Popcnt));
    assert_eq!(cpu.get(RAX), 16);

    // RIP-relative: disp32 from the end of the instruction.
    let mut cpu = MockCpu::new();
    cpu.rip = 0xffff_ffff_8100_0000;
    let bytes = i64("f3 0f b8 05 f9 0f 00 00", "popcnt eax,[1001h]");
    cpu.poke(0xffff_ffff_8100_1001, &7u32.to_le_bytes());
    cpu.set(RAX, u64::MAX);
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Popcnt));
    assert_eq!(cpu.get(RAX), 3, "32-bit destination zero-extends");
    assert_eq!(cpu.rflags & RFLAGS_ZF, 0);
}

#[test]
fn popcnt_page_fault_is_propagated_without_changes() {
    let mut cpu = MockCpu::new();
    cpu.map(0x4000, 0x1000);
    cpu.set(RAX, 77);
    // An 8-byte read at 0x4ffc crosses into the unmapped page 0x5000.
    cpu.set(RDI, 0x4ffc);
    let before = cpu.clone();
    let out = cpu.run(&i64("f3 48 0f b8 07", "popcnt rax,[rdi]"));
    assert_eq!(out, exc(Kind::Popcnt, 14, Some(0), Some(0x5000)));
    assert_eq!(cpu, before);
}

#[test]
fn fwait_checks_ts_mp_and_pending_x87_errors() {
    let mut cpu = MockCpu::new();
    let rip = cpu.rip;
    let fwait = i64("9b", "wait");
    assert_eq!(cpu.run(&fwait), Outcome::Done(Kind::Fwait));
    assert_eq!(cpu.rip, rip + 1);
    // fwait followed by fninit bytes is still only fwait.
    assert_eq!(cpu.run(&[0x9b, 0xdb, 0xe3]), Outcome::Done(Kind::Fwait));
    assert_eq!(cpu.rip, rip + 2);

    cpu.cr0 |= CR0_TS;
    assert_eq!(cpu.run(&fwait), exc(Kind::Fwait, 7, None, None));
    cpu.cr0 &= !CR0_MP;
    assert_eq!(cpu.run(&fwait), Outcome::Done(Kind::Fwait), "TS without MP");
    cpu.cr0 &= !CR0_TS;

    cpu.fpu.fsw = 0x0081; // IE + ES
    let rip = cpu.rip;
    assert_eq!(cpu.run(&fwait), exc(Kind::Fwait, 16, None, None));
    assert_eq!(cpu.rip, rip);
    cpu.cr0 &= !CR0_NE;
    assert!(matches!(cpu.run(&fwait), Outcome::Unsupported(m) if m.contains("CR0.NE")));
}

#[test]
fn ldmxcsr_stmxcsr() {
    let mut cpu = MockCpu::new();
    cpu.set(RBX, 0x9000);
    cpu.poke(0x9000, &0x7f80u32.to_le_bytes());
    let ld = i64("0f ae 13", "ldmxcsr [rbx]");
    let st = i64("0f ae 5b 08", "stmxcsr [rbx+8h]");
    assert_eq!(cpu.run(&ld), Outcome::Done(Kind::Ldmxcsr));
    assert_eq!(cpu.mxcsr, 0x7f80);
    cpu.mxcsr = 0xffc0;
    assert_eq!(cpu.run(&st), Outcome::Done(Kind::Stmxcsr));
    assert_eq!(cpu.peek_u32(0x9008), 0xffc0);

    // VEX forms.
    cpu.poke(0x9000, &0x1f80u32.to_le_bytes());
    assert_eq!(
        cpu.run(&i64("c5 f8 ae 13", "vldmxcsr [rbx]")),
        Outcome::Done(Kind::Ldmxcsr)
    );
    assert_eq!(cpu.mxcsr, 0x1f80);
    assert_eq!(
        cpu.run(&i64("c5 f8 ae 5b 08", "vstmxcsr [rbx+8h]")),
        Outcome::Done(Kind::Stmxcsr)
    );
    assert_eq!(cpu.peek_u32(0x9008), 0x1f80);
}

#[test]
fn ldmxcsr_faults() {
    let mut cpu = MockCpu::new();
    cpu.set(RBX, 0x9000);
    let ld = i64("0f ae 13", "ldmxcsr [rbx]");
    for reserved in [0x1_0000u32, 0x8000_1f80] {
        cpu.poke(0x9000, &reserved.to_le_bytes());
        let before = cpu.clone();
        assert_eq!(cpu.run(&ld), gp0(Kind::Ldmxcsr), "{reserved:#x}");
        assert_eq!(cpu, before);
    }
    cpu.poke(0x9000, &0x1f80u32.to_le_bytes());
    cpu.cr0 |= CR0_TS;
    assert_eq!(cpu.run(&ld), exc(Kind::Ldmxcsr, 7, None, None));
    cpu.cr0 |= CR0_EM;
    assert_eq!(cpu.run(&ld), exc(Kind::Ldmxcsr, 6, None, None), "#UD wins");
    cpu.cr0 &= !(CR0_EM | CR0_TS);
    cpu.cr4 &= !CR4_OSFXSR;
    assert_eq!(cpu.run(&ld), exc(Kind::Ldmxcsr, 6, None, None));
    cpu.cr4 |= CR4_OSFXSR;
    cpu.set(RBX, 0x20_0000);
    assert_eq!(
        cpu.run(&ld),
        exc(Kind::Ldmxcsr, 14, Some(0), Some(0x20_0000))
    );
    cpu.cpl = 3;
    assert_eq!(
        cpu.run(&ld),
        exc(Kind::Ldmxcsr, 14, Some(4), Some(0x20_0000))
    );
    // vldmxcsr needs OSXSAVE.
    cpu.cpl = 0;
    cpu.set(RBX, 0x9000);
    cpu.cr4 &= !CR4_OSXSAVE;
    assert_eq!(
        cpu.run(&[0xc5, 0xf8, 0xae, 0x13]),
        exc(Kind::Ldmxcsr, 6, None, None)
    );
}

#[test]
fn movnti_stores_gpr() {
    let mut cpu = MockCpu::new();
    cpu.set(RDI, 0x3000);
    cpu.set(RAX, 0x1122_3344_5566_7788);
    cpu.map(0x3000, 16);
    assert_eq!(
        cpu.run(&i64("48 0f c3 07", "movnti [rdi],rax")),
        Outcome::Done(Kind::Movnti)
    );
    assert_eq!(cpu.peek_u64(0x3000), 0x1122_3344_5566_7788);
    assert_eq!(
        cpu.run(&i64("0f c3 47 08", "movnti [rdi+8h],eax")),
        Outcome::Done(Kind::Movnti)
    );
    assert_eq!(cpu.peek_u64(0x3008), 0x5566_7788);
}

/// The host's `lock cmpxchg16b` / `lock cmpxchg8b` with full register state:
/// (memory after, rax, rdx, zf).
fn host_cmpxchg(
    size: usize,
    mem: u128,
    rax: u64,
    rdx: u64,
    rbx: u64,
    rcx: u64,
) -> (u128, u64, u64, bool) {
    #[repr(align(16))]
    struct Cell(u128);
    let mut cell = Cell(mem);
    let (mut a, mut d) = (rax, rdx);
    let zf: u8;
    // SAFETY: `cell` is a live, 16-byte aligned local; RBX is swapped in and restored.
    unsafe {
        if size == 16 {
            // Fixed registers: a `reg` operand could be given RBX (or BL) itself.
            std::arch::asm!(
                "xchg rsi, rbx",
                "lock cmpxchg16b xmmword ptr [rdi]",
                "setz r8b",
                "mov rbx, rsi",
                in("rdi") &mut cell.0,
                inout("rsi") rbx => _,
                out("r8b") zf,
                in("rcx") rcx,
                inout("rax") a,
                inout("rdx") d,
            );
        } else {
            // Fixed registers: a `reg` operand could be given RBX (or BL) itself.
            std::arch::asm!(
                "xchg rsi, rbx",
                "lock cmpxchg8b qword ptr [rdi]",
                "setz r8b",
                "mov rbx, rsi",
                in("rdi") &mut cell.0,
                inout("rsi") rbx => _,
                out("r8b") zf,
                in("rcx") rcx,
                inout("rax") a,
                inout("rdx") d,
            );
        }
    }
    (cell.0, a, d, zf != 0)
}

#[test]
fn cmpxchg16b_and_8b_match_host() {
    let c16 = i64("f0 48 0f c7 0f", "lock cmpxchg16b [rdi]");
    let c8 = i64("0f c7 0f", "cmpxchg8b [rdi]");
    let mut rng = Rng(42);
    for round in 0..400 {
        let size = if round % 2 == 0 { 16 } else { 8 };
        let (rax, rdx, rbx, rcx) = (rng.next(), rng.next(), rng.next(), rng.next());
        let mem = match round % 4 {
            // Equal to the comparand (upper register halves are ignored by cmpxchg8b).
            0 => (u128::from(rdx) << 64) | u128::from(rax),
            1 => {
                (u128::from(rng.next()) << 64)
                    | (u128::from(rdx as u32) << 32)
                    | u128::from(rax as u32)
            }
            _ => rng.u128(),
        };
        let (want_mem, want_rax, want_rdx, want_zf) = host_cmpxchg(size, mem, rax, rdx, rbx, rcx);

        let mut cpu = MockCpu::new();
        cpu.set(RDI, 0x6000);
        cpu.poke(0x6000, &mem.to_le_bytes());
        cpu.set(RAX, rax);
        cpu.set(RDX, rdx);
        cpu.set(RBX, rbx);
        cpu.set(RCX, rcx);
        cpu.rflags = 0x2 | RFLAGS_CF | RFLAGS_SF | if round % 3 == 0 { RFLAGS_ZF } else { 0 };
        let kind = if size == 16 {
            Kind::Cmpxchg16b
        } else {
            Kind::Cmpxchg8b
        };
        let out = cpu.run(if size == 16 { &c16 } else { &c8 });
        assert_eq!(out, Outcome::Done(kind));
        assert_eq!(cpu.peek_u128(0x6000), want_mem, "memory, round {round}");
        assert_eq!(cpu.get(RAX), want_rax, "rax, round {round}");
        assert_eq!(cpu.get(RDX), want_rdx, "rdx, round {round}");
        assert_eq!(cpu.rflags & RFLAGS_ZF != 0, want_zf, "zf, round {round}");
        assert_eq!(
            cpu.rflags & (RFLAGS_CF | RFLAGS_SF),
            RFLAGS_CF | RFLAGS_SF,
            "other flags kept"
        );
        if round % 4 == 0 {
            assert!(want_zf, "round {round} should succeed");
        }
    }
}

#[test]
fn host_helpers_match_emulation() {
    let mut rng = Rng(7);
    for _ in 0..100 {
        #[repr(align(16))]
        struct Cell(u128);
        let start = rng.u128();
        let expected = if rng.below(2) == 0 { start } else { rng.u128() };
        let new = rng.u128();
        let mut cell = Cell(start);
        // SAFETY: `cell` is live and aligned.
        let found = unsafe { x86emu::host::cmpxchg16b(&mut cell.0, expected, new) };
        assert_eq!(found, start);
        assert_eq!(cell.0, if start == expected { new } else { start });

        let start8 = start as u64;
        let expected8 = if rng.below(2) == 0 {
            start8
        } else {
            rng.next()
        };
        let mut word = start8;
        // SAFETY: `word` is live.
        let found = unsafe { x86emu::host::cmpxchg8b(&mut word, expected8, new as u64) };
        assert_eq!(found, start8);
        assert_eq!(
            word,
            if start8 == expected8 {
                new as u64
            } else {
                start8
            }
        );
    }
}

#[test]
fn cmpxchg16b_faults() {
    let c16 = i64("f0 48 0f c7 0f", "lock cmpxchg16b [rdi]");
    let mut cpu = MockCpu::new();
    cpu.map(0x6000, 0x1000);
    cpu.set(RDI, 0x6008);
    let before = cpu.clone();
    assert_eq!(cpu.run(&c16), gp0(Kind::Cmpxchg16b), "misaligned");
    assert_eq!(cpu, before);

    // Not present: reported as a write access (locked read-modify-write).
    cpu.set(RDI, 0x8000);
    assert_eq!(
        cpu.run(&c16),
        exc(Kind::Cmpxchg16b, 14, Some(2), Some(0x8000))
    );

    // A read-only page faults on the write even when the comparison fails.
    cpu.set(RDI, 0x6000);
    cpu.poke(0x6000, &[0xaa; 16]);
    cpu.readonly.insert(6);
    let before = cpu.clone();
    assert_eq!(
        cpu.run(&c16),
        exc(Kind::Cmpxchg16b, 14, Some(3), Some(0x6000))
    );
    assert_eq!(cpu, before);

    // Non-canonical address: #GP(0); through RSP/RBP (SS): #SS(0).
    cpu.set(RDI, 0x0000_8000_0000_0000);
    assert_eq!(cpu.run(&c16), gp0(Kind::Cmpxchg16b));
    cpu.set(RBP, 0x0000_8000_0000_0000);
    let via_rbp = i64("48 0f c7 4d 00", "cmpxchg16b [rbp]");
    assert_eq!(cpu.run(&via_rbp), exc(Kind::Cmpxchg16b, 12, Some(0), None));
    // With LA57 the same address is canonical (and unmapped here).
    cpu.cr4 |= CR4_LA57;
    assert_eq!(
        cpu.run(&via_rbp),
        exc(Kind::Cmpxchg16b, 14, Some(2), Some(0x0000_8000_0000_0000))
    );
}

#[test]
fn protected_mode_addressing_uses_segment_bases() {
    // 32-bit: DS base added, address wraps at 4 GiB.
    let mut cpu = MockCpu::new();
    cpu.mode = Mode::Protected32;
    cpu.rip = 0xc100_0000;
    cpu.seg[3] = 0x1000_0000;
    cpu.set(RBX, 0xffff_ffff_0000_2000); // upper half ignored by 32-bit addressing
    cpu.poke(0x1000_2000, &0x3u32.to_le_bytes());
    let bytes = insn(32, "f3 0f b8 03", "popcnt eax,[ebx]");
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Popcnt));
    assert_eq!(cpu.get(RAX), 2);
    assert_eq!(cpu.rip, 0xc100_0004);

    cpu.seg[3] = 0xffff_f000;
    cpu.set(RBX, 0x2000);
    cpu.poke(0x1000, &0xffu32.to_le_bytes());
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Popcnt));
    assert_eq!(cpu.get(RAX), 8);

    // Real mode: 16-bit addressing, IP wraps at 64 KiB.
    let mut cpu = MockCpu::new();
    cpu.mode = Mode::Real;
    cpu.rip = 0xfffe;
    cpu.seg[3] = 0x1230 << 4;
    cpu.set(RSI, 0x1_0004); // only SI is used
    cpu.poke((0x1230 << 4) + 4, &0x0101u16.to_le_bytes());
    let bytes = insn(16, "f3 0f b8 04", "popcnt ax,[si]");
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Popcnt));
    assert_eq!(cpu.get(RAX) & 0xffff, 2);
    assert_eq!(cpu.rip, 0x0002);
}

#[test]
fn unsupported_and_invalid_instructions_change_nothing() {
    let mut cpu = MockCpu::new();
    let before = cpu.clone();
    for (bytes, needle) in [
        (vec![0x0f, 0x05], "syscall"),
        (vec![0xc5, 0xf5, 0xfe, 0x00], "vpaddd"),
        (vec![0x0f], "truncated"),
        (vec![0x48, 0x0f, 0xc7, 0xcf], "invalid"),
        (vec![], "truncated"),
    ] {
        match cpu.run(&bytes) {
            Outcome::Unsupported(msg) => assert!(msg.contains(needle), "{msg}"),
            other => panic!("{bytes:02x?}: {other:?}"),
        }
        assert_eq!(cpu, before);
    }
    // LOCK on an emulated instruction that forbids it: #UD.
    assert_eq!(
        cpu.run(&[0xf0, 0x66, 0x0f, 0xef, 0xc0]),
        exc(Kind::SseLogic, 6, None, None)
    );
    assert_eq!(cpu, before);
    // Memory the backend cannot access.
    cpu.mmio.insert(0xfee00);
    cpu.set(RDI, 0xfee0_0000);
    let before = cpu.clone();
    match cpu.run(&[0xf3, 0x0f, 0xb8, 0x07]) {
        Outcome::Unsupported(msg) => assert!(msg.contains("MMIO"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(cpu, before);
}

#[test]
fn counters_count_and_merge() {
    let mut a = QuirkCounters::new();
    let mut cpu = MockCpu::new();
    for _ in 0..3 {
        a.record(&cpu.run(&[0x0f, 0x01, 0xca]));
    }
    a.record(&cpu.run(&[0x0f, 0x01, 0xcb]));
    a.record(&cpu.run(&[0xcc]));
    a.record(&cpu.run(&[0x0f, 0x05]));
    assert_eq!(a.get(Kind::Clac), 3);
    assert_eq!(
        a.report(),
        "int3=1 clac=3 stac=1 exceptions=1 unsupported=1"
    );
    let mut b = QuirkCounters::new();
    assert_eq!(b.report(), "none");
    b.record(&Outcome::Done(Kind::Popcnt));
    b.record(&Outcome::Done(Kind::Clac));
    b.merge(&a);
    assert_eq!(
        b.report(),
        "int3=1 clac=4 stac=1 popcnt=1 exceptions=1 unsupported=1"
    );
    assert_eq!(b.total(), 8);
    assert_eq!(b.to_string(), b.report());
    // Names are unique and stable.
    let names: std::collections::BTreeSet<_> = Kind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(names.len(), Kind::ALL.len());
    for (i, k) in Kind::ALL.iter().enumerate() {
        assert_eq!(*k as usize, i, "Kind::ALL is in declaration order");
    }
    assert_eq!(Kind::Cmpxchg16b.to_string(), "cmpxchg16b");
}

#[test]
fn mode_from_kvm_state() {
    let pe = 1;
    let lma = 1 << 10;
    let vm = 1 << 17;
    assert_eq!(Mode::from_state(0, 0x2, 0, false, false), Mode::Real);
    assert_eq!(Mode::from_state(pe, 0x2, 0, false, true), Mode::Protected32);
    assert_eq!(
        Mode::from_state(pe, 0x2, 0, false, false),
        Mode::Protected16
    );
    assert_eq!(
        Mode::from_state(pe, 0x2 | vm, 0, false, false),
        Mode::Virtual8086
    );
    assert_eq!(
        Mode::from_state(pe | 1 << 31, 0x2, lma, true, false),
        Mode::Long64
    );
    assert_eq!(
        Mode::from_state(pe | 1 << 31, 0x2, lma, false, true),
        Mode::Protected32,
        "compat"
    );
    assert_eq!(Mode::Long64.bitness(), 64);
    assert_eq!(Mode::Virtual8086.bitness(), 16);
}

#[test]
fn xgetbv_reads_xcr0_and_checks_osxsave_and_index() {
    let bytes = i64("0f 01 d0", "xgetbv");
    let mut cpu = MockCpu::new();
    cpu.xcr0 = 0x2e7;
    cpu.set(RAX, 0xdead);
    cpu.set(RDX, 0xbeef);
    cpu.set(RCX, 0);
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Xgetbv));
    assert_eq!((cpu.get(RAX), cpu.get(RDX)), (0x2e7, 0));
    // Another XCR: #GP(0), registers unchanged.
    let mut cpu = MockCpu::new();
    cpu.set(RCX, 1);
    cpu.set(RAX, 7);
    match cpu.run(&bytes) {
        Outcome::Exception { exception, .. } => assert_eq!(exception.vector, 13),
        o => panic!("{o:?}"),
    }
    assert_eq!(cpu.get(RAX), 7);
    // Without CR4.OSXSAVE: #UD.
    let mut cpu = MockCpu::new();
    cpu.cr4 &= !x86emu::bits::CR4_OSXSAVE;
    cpu.set(RCX, 0);
    match cpu.run(&bytes) {
        Outcome::Exception { exception, .. } => assert_eq!(exception.vector, 6),
        o => panic!("{o:?}"),
    }
}

#[test]
fn verw_and_verr_check_the_descriptor_and_set_only_zf() {
    // verw [rip+0x10] with the selector in memory; verw ax; verr ax.
    let mut cpu = MockCpu::new();
    cpu.gdt.insert(2, 0x00af_9b00_0000_ffff); // kernel code (readable, not writable)
    cpu.gdt.insert(3, 0x00cf_9300_0000_ffff); // kernel data, DPL 0, writable
    cpu.gdt.insert(5, 0x00cf_f300_0000_ffff); // user data, DPL 3
    let verw_ax = i64("0f 00 e8", "verw eax");
    let verr_ax = i64("0f 00 e0", "verr eax");
    let check = |cpu: &mut MockCpu, bytes: &[u8], sel: u64, want_zf: bool| {
        cpu.set(RAX, sel);
        cpu.rflags = 0x2 | ARITH;
        let k = cpu.run(bytes);
        assert!(matches!(k, Outcome::Done(Kind::Verw | Kind::Verr)), "{k:?}");
        assert_eq!(cpu.rflags & RFLAGS_ZF != 0, want_zf, "selector {sel:#x}");
        assert_eq!(
            cpu.rflags & (ARITH & !RFLAGS_ZF),
            ARITH & !RFLAGS_ZF,
            "other flags untouched"
        );
    };
    check(&mut cpu, &verw_ax, 0x18, true);
    check(&mut cpu, &verw_ax, 0x10, false); // code is never writable
    check(&mut cpu, &verr_ax, 0x10, true); // but readable
    check(&mut cpu, &verw_ax, 0x0, false); // null selector
    check(&mut cpu, &verw_ax, 0x40, false); // beyond the table
    check(&mut cpu, &verw_ax, 0x2b, true); // user data from ring 0
    cpu.cpl = 3;
    check(&mut cpu, &verw_ax, 0x18, false); // DPL 0 from ring 3
                                            // Memory operand form, as Linux's mds_clear_cpu_buffers uses.
    let mut cpu = MockCpu::new();
    cpu.gdt.insert(3, 0x00cf_9300_0000_ffff);
    let bytes = i64("0f 00 2d 00 01 00 00", "verw [107h]");
    let at = cpu.rip + 7 + 0x100;
    cpu.map(at & !0xfff, 4096);
    cpu.poke(at, &0x18u16.to_le_bytes());
    cpu.rflags = 0x2;
    assert_eq!(cpu.run(&bytes), Outcome::Done(Kind::Verw));
    assert_ne!(cpu.rflags & RFLAGS_ZF, 0);
}
