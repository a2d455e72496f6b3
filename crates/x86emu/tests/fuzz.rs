//! Random instruction bytes and random vCPU state: `emulate` never panics, and its outcome
//! keeps its promises (Unsupported changes nothing, a fault changes no register, Done moves
//! RIP past one instruction).

mod common;

use common::{MockCpu, Rng};
use iced_x86::Register;
use x86emu::{emulate, Mode, Outcome, QuirkCounters};

/// Opcode beginnings that reach the emulated instructions, so random tails exercise them.
const STEMS: &[&[u8]] = &[
    &[0x0f, 0xae],
    &[0x48, 0x0f, 0xae],
    &[0x0f, 0xc7],
    &[0x48, 0x0f, 0xc7],
    &[0xf0, 0x48, 0x0f, 0xc7],
    &[0x66, 0x0f],
    &[0x66, 0x48, 0x0f],
    &[0xf3, 0x0f],
    &[0xf2, 0x0f],
    &[0x0f],
    &[0xc5],
    &[0xc5, 0xf9, 0x6f],
    &[0xc5, 0xfe, 0x7f],
    &[0xc5, 0xf9, 0x7e],
    &[0xc5, 0xf5, 0xef],
    &[0xc4, 0xe1],
    &[0xf3, 0x48, 0x0f, 0xb8],
    &[0x64, 0xf3, 0x0f, 0xb8],
    &[0x0f, 0x01],
    &[0xcc],
    &[0x9b],
    &[0x67, 0x66, 0x0f],
    &[0x62],
];

fn random_cpu(rng: &mut Rng) -> MockCpu {
    let mut cpu = MockCpu::new().with_avx512();
    cpu.mode = [
        Mode::Long64,
        Mode::Long64,
        Mode::Protected32,
        Mode::Protected16,
        Mode::Real,
        Mode::Virtual8086,
    ][rng.below(6) as usize];
    cpu.cpl = [0, 0, 0, 3][rng.below(4) as usize];
    if rng.below(4) == 0 {
        cpu.cr0 ^= 1 << rng.below(6);
    }
    if rng.below(4) == 0 {
        cpu.cr4 ^= 1 << [9, 12, 18][rng.below(3) as usize];
    }
    cpu.xcr0 = [0x7, 0x3, 0x2e7, 0x1, 0x6e7][rng.below(5) as usize];
    cpu.xss = [0, 0, 1 << 11][rng.below(3) as usize];
    cpu.rflags = 0x2 | (rng.next() & 0x2_4fd5);
    cpu.rip = if cpu.mode == Mode::Long64 {
        0xffff_ffff_8100_0000 + rng.below(0x1000)
    } else {
        rng.below(0x1_0000)
    };
    for i in 0..6 {
        cpu.seg[i] = rng.below(4) * 0x1000;
    }
    // Registers: small addresses into the mapped window, or anything.
    for i in 0..16 {
        cpu.gpr[i] = match rng.below(4) {
            0 => rng.next(),
            1 => rng.below(0x40) * 64,
            _ => 0x1000 + rng.below(0x2000),
        };
    }
    cpu.map(0, 0x4000);
    if rng.below(2) == 0 {
        cpu.readonly.insert(1);
    }
    cpu.mmio.insert(3);
    // Random bytes in memory, so xrstor/fxrstor meet random headers and MXCSR values.
    for _ in 0..64 {
        let a = rng.below(0x3000);
        cpu.poke(a, &rng.next().to_le_bytes());
    }
    for i in 0..16 {
        cpu.xmm[i] = rng.u128();
        cpu.ymmh[i] = rng.u128();
    }
    cpu.mxcsr = (rng.next() as u32) & 0xffff;
    cpu.fpu.fsw = rng.next() as u16;
    cpu
}

fn registers(cpu: &MockCpu) -> MockCpu {
    let mut c = cpu.clone();
    c.pages.clear();
    c
}

#[test]
fn random_bytes_never_panic_and_outcomes_keep_their_promises() {
    // X86EMU_FUZZ_SEED / X86EMU_FUZZ_ROUNDS run other or longer sequences.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mut rng = Rng(env("X86EMU_FUZZ_SEED", 0xdead_beef_cafe_f00d) | 1);
    let mut counters = QuirkCounters::new();
    for round in 0..env("X86EMU_FUZZ_ROUNDS", 60_000) {
        let mut bytes: Vec<u8> = Vec::new();
        if rng.below(4) != 0 {
            bytes.extend_from_slice(STEMS[rng.below(STEMS.len() as u64) as usize]);
        }
        let tail = rng.below(16) as usize;
        bytes.extend((0..tail).map(|_| rng.next() as u8));
        let mut cpu = random_cpu(&mut rng);
        let before = cpu.clone();
        let outcome = emulate(&mut cpu, &bytes);
        counters.record(&outcome);
        let mask = match cpu.mode.bitness() {
            64 => u64::MAX,
            32 => 0xffff_ffff,
            _ => 0xffff,
        };
        match &outcome {
            Outcome::Unsupported(msg) => {
                assert!(!msg.is_empty());
                if msg.contains("MMIO") {
                    // A multi-part store may have written its first parts.
                    assert_eq!(registers(&cpu), registers(&before), "round {round}: {msg}");
                } else {
                    assert_eq!(cpu, before, "round {round}: {bytes:02x?} {msg}");
                }
            }
            Outcome::Exception { exception, .. } if !exception.is_software() => {
                assert_eq!(
                    registers(&cpu),
                    registers(&before),
                    "round {round}: {bytes:02x?} {outcome}"
                );
            }
            Outcome::Exception { .. } | Outcome::Done(_) => {
                let advanced = cpu.rip.wrapping_sub(before.rip) & mask;
                assert!(
                    (1..=15).contains(&advanced),
                    "round {round}: {bytes:02x?} advanced {advanced}"
                );
            }
        }
        // The mock's accessor asserts also catch sub-register misuse (gpr() with non-64-bit).
        let _ = cpu.get(Register::RAX);
    }
    // The stems must reach the emulated instructions, not only the error paths.
    let report = counters.report();
    for name in [
        "xsave",
        "xrstor",
        "fxsave",
        "cmpxchg16b",
        "sse_move",
        "avx_move",
        "popcnt",
    ] {
        assert!(
            report.contains(&format!("{name}=")),
            "{name} never reached: {report}"
        );
    }
    eprintln!("{report}");
}
