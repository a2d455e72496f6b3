//! Drives a two-VP `Hv1` with sequences decoded from arbitrary bytes, as a hostile guest and a
//! busy host would: synthetic MSR writes and reads (page addresses inside, at the edge of and
//! outside the 64 KiB fake RAM), hypercalls with arbitrary control values and parameter
//! addresses, guest writes anywhere in RAM (input pages, message slots, the TSC page), slots
//! consumed with EOM, host messages and events, clock jumps, and save/restore round trips.
//!
//! The hypercall handler behaves like the VMBus server: it answers a guest message by posting
//! one back synchronously (this must not deadlock). Checked on every step: nothing panics, a
//! hypercall's result is a status this crate or the handler produces, queues stay bounded,
//! and a saved state restores.
#![no_main]

use std::sync::Arc;

use hv1::defs::{msr, MAX_QUEUED_PER_SINT, SINT_COUNT};
use hv1::testing::{FakeClock, FakeRam, RecordingSink};
use hv1::{Config, GuestMemory, Hv1, HvStatus, HypercallHandler, HypercallRegs};
use libfuzzer_sys::fuzz_target;

const RAM: u64 = 64 << 10;
const VPS: u32 = 2;

/// Reads fields off the input; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A guest physical address: mostly inside RAM, sometimes at its edge or anywhere.
    fn gpa(&mut self) -> u64 {
        match self.u8() % 4 {
            0 | 1 => self.u16() as u64 % RAM,
            2 => RAM - (self.u8() as u64 + 1) * 8,
            _ => self.u64(),
        }
    }

    /// An MSR value: page addresses with low control bits, or raw bits.
    fn msr_value(&mut self) -> u64 {
        match self.u8() % 3 {
            0 => (self.gpa() & !0xfff) | (self.u8() as u64 & 3),
            1 => self.u8() as u64 | ((self.u8() as u64 & 7) << 16),
            _ => self.u64(),
        }
    }

    fn msr(&mut self) -> u32 {
        const MSRS: [u32; 15] = [
            msr::GUEST_OS_ID,
            msr::HYPERCALL,
            msr::VP_INDEX,
            msr::TIME_REF_COUNT,
            msr::REFERENCE_TSC,
            msr::TSC_FREQUENCY,
            msr::APIC_FREQUENCY,
            msr::VP_ASSIST_PAGE,
            msr::SCONTROL,
            msr::SVERSION,
            msr::SIEFP,
            msr::SIMP,
            msr::EOM,
            msr::STIMER0_CONFIG,
            0x4000_0003,
        ];
        let i = self.u8();
        if (i as usize) < MSRS.len() {
            MSRS[i as usize]
        } else if i < 0xf0 {
            msr::SINT0 + (i as u32 % 16)
        } else {
            self.u32()
        }
    }
}

/// Like the VMBus server: answers a message with a message back to the caller.
struct Echo<'a> {
    hv: &'a Hv1,
    ram: &'a FakeRam,
    irq: &'a RecordingSink,
}

impl HypercallHandler for Echo<'_> {
    fn post_message(&self, vp: u32, conn: u32, ty: u32, payload: &[u8]) -> HvStatus {
        assert!(payload.len() <= 240 && ty != 0 && ty & 0x8000_0000 == 0);
        if conn % 3 == 0 {
            return HvStatus::INVALID_CONNECTION_ID;
        }
        match self.hv.post_message(vp, 2, ty, payload, self.ram, self.irq) {
            Ok(_) => HvStatus::SUCCESS,
            Err(_) => HvStatus::INSUFFICIENT_BUFFERS,
        }
    }
    fn signal_event(&self, vp: u32, conn: u32, flag: u16) -> HvStatus {
        let _ = self
            .hv
            .signal_event(vp, (conn % 16) as u8, flag as u32, self.ram, self.irq);
        HvStatus::SUCCESS
    }
}

fn run(data: &[u8]) {
    let mut b = Bytes(data);
    let first = b.u8();
    let time_scale = [1.0, 0.1, 0.5, 3.0][first as usize % 4];
    let clock = Arc::new(FakeClock::new(b.u32() as u64));
    let hv = Hv1::new(
        Config {
            vp_count: VPS,
            tsc_hz: 2_000_000_000,
            time_scale,
        },
        clock.clone(),
    )
    .expect("valid config");
    let ram = FakeRam::new(RAM as usize);
    let irq = RecordingSink::default();
    let handler = Echo {
        hv: &hv,
        ram: &ram,
        irq: &irq,
    };

    if first & 0x80 != 0 {
        // Start where a booted Linux guest is: hypercalls, TSC page and SynICs enabled, so
        // short inputs reach message delivery and the hypercall decoders.
        let setup = [
            (0, msr::GUEST_OS_ID, 0x8100_0000_0601_0000),
            (0, msr::HYPERCALL, 0x1000 | 1),
            (0, msr::REFERENCE_TSC, 0x2000 | 1),
            (0, msr::SIMP, 0x3000 | 1),
            (0, msr::SIEFP, 0x4000 | 1),
            (0, msr::SINT0 + 2, 0xf3),
            (0, msr::SCONTROL, 1),
            (1, msr::SIMP, 0x5000 | 1),
            (1, msr::SIEFP, 0x6000 | 1),
            (1, msr::SINT0 + 2, 0xf3),
            (1, msr::SCONTROL, 1),
        ];
        for (vp, m, v) in setup {
            hv.wrmsr(vp, m, v, &ram, &irq).expect("setup");
        }
    }

    for _ in 0..512 {
        if b.is_empty() {
            break;
        }
        let vp = b.u8() as u32 % (VPS + 1); // sometimes out of range
        match b.u8() % 10 {
            0 => {
                let (m, v) = (b.msr(), b.msr_value());
                let _ = hv.wrmsr(vp, m, v, &ram, &irq);
            }
            1 => {
                let _ = hv.rdmsr(vp, b.msr());
            }
            2 => {
                let code = match b.u8() % 4 {
                    0 => 0x5c,
                    1 => 0x5d,
                    2 => 0x5d | 1 << 16,
                    _ => b.u16() as u64,
                };
                let high = if b.u8() % 4 == 0 {
                    b.u64() & !0xffff
                } else {
                    0
                };
                let mut regs = HypercallRegs {
                    rax: b.u64(),
                    rcx: code | high,
                    rdx: if b.u8() % 2 == 0 { b.gpa() } else { b.u64() },
                    r8: b.u64(),
                };
                let before = regs;
                if hv.hypercall(vp, &mut regs, &ram, &handler) {
                    assert!(
                        matches!(regs.rax, 0 | 2 | 3 | 4 | 5 | 18 | 19),
                        "unexpected result {:#x}",
                        regs.rax
                    );
                    assert_eq!(
                        (regs.rcx, regs.rdx, regs.r8),
                        (before.rcx, before.rdx, before.r8)
                    );
                } else {
                    assert_eq!(regs, before);
                }
            }
            3 => {
                let gpa = b.gpa();
                let len = b.u16() as usize % 300;
                let bytes: Vec<u8> = (0..len).map(|_| b.u8()).collect();
                let _ = ram.write(gpa, &bytes);
            }
            4 => {
                let (sint, ty) = (b.u8() % 17, b.u32());
                let payload: Vec<u8> = (0..b.u8() as usize % 250).map(|i| i as u8).collect();
                let _ = hv.post_message(vp, sint, ty, &payload, &ram, &irq);
            }
            5 => {
                let (sint, flag) = (b.u8() % 17, b.u16() as u32 % 2100);
                let _ = hv.signal_event(vp, sint, flag, &ram, &irq);
            }
            6 => {
                let _ = hv.wrmsr(vp, msr::EOM, b.u64(), &ram, &irq);
            }
            7 => {
                // The guest consumes a slot: clear its type, EOM if MessagePending was set.
                let sint = b.u8() as u64 % SINT_COUNT as u64;
                if let Some(simp) = hv.rdmsr(vp, msr::SIMP) {
                    let slot = (simp & !0xfff).wrapping_add(sint * 256);
                    if ram.write(slot, &[0; 4]).is_ok() {
                        let mut flags = [0u8; 1];
                        if ram.read(slot + 5, &mut flags).is_ok() && flags[0] & 1 != 0 {
                            let _ = hv.wrmsr(vp, msr::EOM, 0, &ram, &irq);
                        }
                    }
                }
            }
            8 => clock.advance(b.u32() as u64),
            _ => {
                let saved = hv.save();
                hv.restore(&saved, &ram).expect("a saved state restores");
                let mut again = hv.save();
                again.reference_time = saved.reference_time;
                again.tsc_sequence = saved.tsc_sequence;
                assert_eq!(again, saved);
            }
        }
        for vp in hv.save().vps {
            for sint in 0..SINT_COUNT as u8 {
                let n = vp.queued.iter().filter(|q| q.sint == sint).count();
                assert!(n <= MAX_QUEUED_PER_SINT);
            }
        }
        irq.take();
    }
}

fuzz_target!(|data: &[u8]| run(data));
