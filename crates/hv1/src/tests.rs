//! Unit tests against fake guest RAM, a recording interrupt sink and a settable clock.

use crate::defs::{cpuid as c, msr as m, MAX_QUEUED_PER_SINT, MESSAGE_PENDING_BIT};
use crate::testing::{FakeClock, FakeRam, RecordingSink};
use crate::*;
use std::sync::Mutex;

const TSC_HZ: u64 = 2_500_000_000;
const RAM: usize = 1 << 20;
const SIMP_GPA: u64 = 0x10000;
const SIEFP_GPA: u64 = 0x11000;
const HC_GPA: u64 = 0x20000;
const TSC_GPA: u64 = 0x21000;
const INPUT_GPA: u64 = 0x22000;
const VECTOR: u8 = 0xf3;

struct Env {
    hv: Hv1,
    ram: FakeRam,
    irq: RecordingSink,
    clock: Arc<FakeClock>,
}

fn env_with(vps: u32, time_scale: f64) -> Env {
    let clock = Arc::new(FakeClock::new(0));
    let hv = Hv1::new(
        Config {
            vp_count: vps,
            tsc_hz: TSC_HZ,
            time_scale,
        },
        clock.clone(),
    )
    .unwrap();
    Env {
        hv,
        ram: FakeRam::new(RAM),
        irq: RecordingSink::default(),
        clock,
    }
}

fn env() -> Env {
    env_with(2, 1.0)
}

impl Env {
    fn wr(&self, vp: u32, msr: u32, value: u64) -> Result<(), MsrError> {
        self.hv.wrmsr(vp, msr, value, &self.ram, &self.irq)
    }

    fn rd(&self, vp: u32, msr: u32) -> Option<u64> {
        self.hv.rdmsr(vp, msr)
    }

    /// What Linux's hv_synic_enable_regs does, with per-VP pages.
    fn enable_synic(&self, vp: u32) {
        let off = vp as u64 * 0x2000;
        self.wr(vp, m::SIMP, (SIMP_GPA + off) | 1).unwrap();
        self.wr(vp, m::SIEFP, (SIEFP_GPA + off) | 1).unwrap();
        self.wr(vp, m::SINT0 + 2, VECTOR as u64).unwrap();
        self.wr(vp, m::SCONTROL, 1).unwrap();
    }

    fn slot(&self, vp: u32, sint: u64) -> u64 {
        SIMP_GPA + vp as u64 * 0x2000 + sint * 256
    }

    fn enable_hypercalls(&self) {
        self.wr(0, m::GUEST_OS_ID, 0x8100_0000_0601_0000).unwrap();
        self.wr(0, m::HYPERCALL, HC_GPA | 1).unwrap();
    }

    fn post(&self, vp: u32, sint: u8, ty: u32, payload: &[u8]) -> Result<Posted, SynicError> {
        self.hv
            .post_message(vp, sint, ty, payload, &self.ram, &self.irq)
    }

    fn signal(&self, vp: u32, sint: u8, flag: u32) -> Result<bool, SynicError> {
        self.hv.signal_event(vp, sint, flag, &self.ram, &self.irq)
    }

    /// What the guest does after consuming a slot: clear the type, EOM if pending.
    fn consume(&self, vp: u32, sint: u64) -> bool {
        let slot = self.slot(vp, sint);
        self.ram.write(slot, &0u32.to_le_bytes()).unwrap();
        let pending = self.ram.bytes::<1>(slot + 5)[0] & 1 != 0;
        if pending {
            self.wr(vp, m::EOM, 0).unwrap();
        }
        pending
    }
}

fn sig(regs: [u32; 3]) -> Vec<u8> {
    regs.iter().flat_map(|r| r.to_le_bytes()).collect()
}

// ---------------------------------------------------------------- CPUID

#[test]
fn cpuid_vendor_and_interface_signatures() {
    let e = env();
    let [eax, ebx, ecx, edx] = e.hv.cpuid(0x4000_0000, 0).unwrap();
    assert_eq!(eax, 0x4000_000A);
    assert_eq!(sig([ebx, ecx, edx]), b"Microsoft Hv");
    let [eax, ..] = e.hv.cpuid(0x4000_0001, 0).unwrap();
    assert_eq!(&eax.to_le_bytes(), b"Hv#1");
    let [build, ver, ..] = e.hv.cpuid(0x4000_0002, 0).unwrap();
    assert!(build > 0 && ver >> 16 >= 6);
}

#[test]
fn cpuid_privileges_and_hints() {
    let e = env_with(3, 1.0);
    let [eax, ebx, _, edx] = e.hv.cpuid(0x4000_0003, 0).unwrap();
    for bit in [1, 2, 5, 6, 9, 11] {
        assert_ne!(eax & (1 << bit), 0, "EAX bit {bit} must be set");
    }
    for bit in [0, 3, 4, 15] {
        assert_eq!(eax & (1 << bit), 0, "EAX bit {bit} must be clear");
    }
    assert_ne!(ebx & c::PRIV_POST_MESSAGES, 0);
    assert_ne!(ebx & c::PRIV_SIGNAL_EVENTS, 0);
    for bit in [1, 12, 20, 22] {
        assert_eq!(
            ebx & (1 << bit),
            0,
            "EBX bit {bit} (partition id/root/ext/isolation)"
        );
    }
    assert_ne!(edx & (1 << 8), 0, "frequency MSRs available");
    let [hints, spin, ..] = e.hv.cpuid(0x4000_0004, 0).unwrap();
    assert_ne!(
        hints & (1 << 9),
        0,
        "AEOI deprecated hint is mandatory with a KVM LAPIC"
    );
    for bit in [2, 3, 10, 11, 14] {
        assert_eq!(hints & (1 << bit), 0, "hint bit {bit} must be clear");
    }
    assert_eq!(spin, u32::MAX);
    assert_eq!(e.hv.cpuid(0x4000_0005, 0).unwrap()[0], 3);
}

#[test]
fn cpuid_range() {
    let e = env();
    for leaf in 0x4000_0006..=0x4000_000A {
        assert_eq!(e.hv.cpuid(leaf, 0), Some([0; 4]), "leaf {leaf:#x}");
    }
    for leaf in [0, 1, 0x3fff_ffff, 0x4000_000B, 0x4000_0100, 0x8000_0000] {
        assert_eq!(e.hv.cpuid(leaf, 0), None, "leaf {leaf:#x}");
    }
}

#[test]
fn config_is_validated() {
    let clock: Arc<dyn Clock> = Arc::new(FakeClock::new(0));
    let cfg = |vp_count, tsc_hz, time_scale| Config {
        vp_count,
        tsc_hz,
        time_scale,
    };
    for bad in [
        cfg(0, TSC_HZ, 1.0),
        cfg(MAX_VPS + 1, TSC_HZ, 1.0),
        cfg(1, TSC_HZ, 0.0),
        cfg(1, TSC_HZ, -1.0),
        cfg(1, TSC_HZ, f64::NAN),
        cfg(1, TSC_HZ, f64::INFINITY),
        cfg(1, 10_000_000, 1.0), // guest TSC must be faster than 10 MHz
        cfg(1, TSC_HZ, 1000.0),  // 2.5 MHz
        cfg(1, u64::MAX, 1e-9),
    ] {
        assert!(Hv1::new(bad, clock.clone()).is_err(), "{bad:?}");
    }
    assert!(Hv1::new(cfg(1, TSC_HZ, 0.1), clock).is_ok());
}

// ---------------------------------------------------------------- MSRs

#[test]
fn msr_round_trips() {
    let e = env();
    for (msr, v) in [
        (m::GUEST_OS_ID, 0x8100_0000_0601_0000u64),
        (m::VP_ASSIST_PAGE, 0x5000 | 1),
        (m::SCONTROL, 1),
        (m::SIEFP, 0x7000 | 1),
        (m::SIMP, 0x8000 | 1),
        (m::SINT0 + 5, 0x20 | m::SINT_AUTO_EOI),
        (m::SINT15, 0xfe),
    ] {
        e.wr(1, msr, v).unwrap();
        assert_eq!(e.rd(1, msr), Some(v), "MSR {msr:#x}");
    }
    // Per-VP registers stay per VP.
    assert_eq!(e.rd(0, m::SIMP), Some(0));
    assert_eq!(e.rd(0, m::SINT15), Some(m::SINT_RESET));
    // Partition-wide ones are shared.
    assert_eq!(e.rd(0, m::GUEST_OS_ID), Some(0x8100_0000_0601_0000));
    assert_eq!(e.rd(0, m::VP_INDEX), Some(0));
    assert_eq!(e.rd(1, m::VP_INDEX), Some(1));
    assert_eq!(e.rd(0, m::SVERSION), Some(1));
    assert_eq!(e.rd(0, m::EOM), Some(0));
    e.wr(0, m::EOM, 0).unwrap();
}

#[test]
fn msr_gp_cases() {
    let e = env();
    for msr in [
        m::VP_INDEX,
        m::TIME_REF_COUNT,
        m::TSC_FREQUENCY,
        m::APIC_FREQUENCY,
        m::SVERSION,
    ] {
        assert_eq!(e.wr(0, msr, 5), Err(MsrError::ReadOnly(msr)));
    }
    // A SINT vector below 16 is refused unless masked; the register is unchanged.
    e.wr(0, m::SINT0 + 3, 0x40).unwrap();
    assert!(matches!(
        e.wr(0, m::SINT0 + 3, 15),
        Err(MsrError::InvalidValue { .. })
    ));
    assert_eq!(e.rd(0, m::SINT0 + 3), Some(0x40));
    e.wr(0, m::SINT0 + 3, m::SINT_MASKED).unwrap();
    assert_eq!(e.rd(0, m::SINT0 + 3), Some(m::SINT_MASKED));
    // Not ours: synthetic timers (not offered), reset, crash, anything else; bad VP index.
    for msr in [
        m::STIMER0_CONFIG,
        0x4000_0003,
        0x4000_0105,
        0x4000_0070,
        0xc000_0082,
    ] {
        assert_eq!(e.rd(0, msr), None, "{msr:#x}");
        assert_eq!(e.wr(0, msr, 0), Err(MsrError::Unhandled(msr)));
    }
    assert_eq!(e.rd(2, m::VP_INDEX), None);
    assert_eq!(
        e.wr(2, m::SCONTROL, 1),
        Err(MsrError::Unhandled(m::SCONTROL))
    );
}

#[test]
fn hypercall_page_bytes_and_enable_rules() {
    let e = env();
    // Without a guest OS id, enabling is ignored (and nothing is written).
    e.wr(0, m::HYPERCALL, HC_GPA | 1).unwrap();
    assert_eq!(e.rd(0, m::HYPERCALL), Some(HC_GPA));
    assert!(!e.hv.hypercalls_enabled());
    assert_eq!(e.ram.bytes::<3>(HC_GPA), [0, 0, 0]);

    e.enable_hypercalls();
    assert!(e.hv.hypercalls_enabled());
    assert_eq!(e.rd(1, m::HYPERCALL), Some(HC_GPA | 1));
    // out $0xe2, %al ; ret
    assert_eq!(
        e.ram.bytes::<3>(HC_GPA),
        [0xe6, Hv1::HYPERCALL_PORT as u8, 0xc3]
    );
    assert_eq!(e.ram.bytes::<1>(HC_GPA + 4095), [0xcc]);
    assert_eq!(e.ram.bytes::<1>(HC_GPA + 4096), [0]);

    // Clearing the guest OS id disables hypercalls.
    e.wr(0, m::GUEST_OS_ID, 0).unwrap();
    assert!(!e.hv.hypercalls_enabled());

    // A page outside RAM: #GP, register unchanged.
    e.wr(0, m::GUEST_OS_ID, 1).unwrap();
    let before = e.rd(0, m::HYPERCALL);
    for gpa in [RAM as u64, 0xffff_ffff_ffff_f000] {
        assert!(matches!(
            e.wr(0, m::HYPERCALL, gpa | 1),
            Err(MsrError::Memory { .. })
        ));
    }
    assert_eq!(e.rd(0, m::HYPERCALL), before);

    // Locked: later writes are ignored.
    e.wr(0, m::HYPERCALL, HC_GPA | 1 | m::HYPERCALL_LOCKED)
        .unwrap();
    e.wr(0, m::HYPERCALL, 0).unwrap();
    assert_eq!(e.rd(0, m::HYPERCALL), Some(HC_GPA | 3));
    assert!(e.hv.hypercalls_enabled());
}

// ---------------------------------------------------------------- time

/// Reads the TSC page and evaluates it the way the guest does.
fn page_time(ram: &FakeRam, tsc: u64) -> Option<u64> {
    let seq = ram.u32_at(TSC_GPA);
    if seq == 0 {
        return None;
    }
    let scale = ram.u64_at(TSC_GPA + 8);
    let offset = ram.u64_at(TSC_GPA + 16);
    Some((((tsc as u128 * scale as u128) >> 64) as u64).wrapping_add(offset))
}

#[test]
fn tsc_page_math_and_agreement_with_time_ref_count() {
    for time_scale in [1.0, 0.1, 0.25, 0.5, 2.0] {
        let e = env_with(1, time_scale);
        let guest_hz = (TSC_HZ as f64 / time_scale).round() as u64;
        assert_eq!(e.rd(0, m::TSC_FREQUENCY), Some(guest_hz));
        assert_eq!(
            e.rd(0, m::APIC_FREQUENCY),
            Some((1e9 / time_scale).round() as u64)
        );
        e.clock.set(12_345);
        e.wr(0, m::REFERENCE_TSC, TSC_GPA | 1).unwrap();
        assert_eq!(e.rd(0, m::REFERENCE_TSC), Some(TSC_GPA | 1));
        assert_ne!(e.ram.u32_at(TSC_GPA), 0, "sequence must be valid");
        let expect_scale = ((10_000_000u128 << 64) / guest_hz as u128) as u64;
        assert_eq!(e.ram.u64_at(TSC_GPA + 8), expect_scale);

        for tsc in [0u64, 1, 999_999, TSC_HZ, 7 * TSC_HZ + 3, 1 << 40, 1 << 50] {
            e.clock.set(tsc);
            let msr = e.rd(0, m::TIME_REF_COUNT).unwrap();
            assert_eq!(
                Some(msr),
                page_time(&e.ram, tsc),
                "scale {time_scale} tsc {tsc}"
            );
            assert_eq!(msr, e.hv.reference_time());
            // Reference time = guest TSC seconds in 100 ns units (floor, within one tick).
            let exact = (tsc as u128 * 10_000_000 / guest_hz as u128) as u64;
            assert!(msr == exact || msr + 1 == exact, "{msr} vs {exact}");
        }
        // One wall second of TSC ticks is `time_scale` guest seconds.
        e.clock.set(1 << 33);
        let t0 = e.hv.reference_time();
        e.clock.advance(TSC_HZ);
        let dt = e.hv.reference_time() - t0;
        let want = (time_scale * 1e7).round() as u64;
        assert!(dt.abs_diff(want) <= 1, "scale {time_scale}: {dt} vs {want}");
    }
}

#[test]
fn tsc_page_rewrite_bumps_sequence_and_bad_gpa_is_refused() {
    let e = env();
    e.wr(0, m::REFERENCE_TSC, TSC_GPA | 1).unwrap();
    let s1 = e.ram.u32_at(TSC_GPA);
    e.wr(0, m::REFERENCE_TSC, TSC_GPA | 1).unwrap();
    let s2 = e.ram.u32_at(TSC_GPA);
    assert!(s1 != 0 && s2 != 0 && s1 != s2);
    assert!(matches!(
        e.wr(0, m::REFERENCE_TSC, (RAM as u64) | 1),
        Err(MsrError::Memory { .. })
    ));
    assert_eq!(e.rd(0, m::REFERENCE_TSC), Some(TSC_GPA | 1));
    // Disabling does not touch the page.
    e.wr(0, m::REFERENCE_TSC, 0).unwrap();
    assert_eq!(e.ram.u32_at(TSC_GPA), s2);
    assert_eq!(time::next_sequence(u32::MAX - 1), 1);
    assert_eq!(time::next_sequence(u32::MAX), 1);
}

// ---------------------------------------------------------------- messages

#[test]
fn post_message_to_free_slot() {
    let e = env();
    e.enable_synic(1);
    let payload: Vec<u8> = (1..=20).collect();
    assert_eq!(e.post(1, 2, 1, &payload), Ok(Posted::Delivered));
    let slot = e.slot(1, 2);
    assert_eq!(e.ram.u32_at(slot), 1);
    assert_eq!(e.ram.bytes::<2>(slot + 4), [20, 0]); // size, flags (no pending)
    assert_eq!(e.ram.bytes::<20>(slot + 16).to_vec(), payload);
    assert_eq!(e.irq.take(), vec![(1, VECTOR)]);
    // The other VP's page is untouched.
    assert_eq!(e.ram.u32_at(e.slot(0, 2)), 0);
}

#[test]
fn busy_slot_pending_flag_then_eom_delivers() {
    let e = env();
    e.enable_synic(0);
    assert_eq!(e.post(0, 2, 1, b"first"), Ok(Posted::Delivered));
    assert_eq!(e.post(0, 2, 1, b"second"), Ok(Posted::Queued));
    assert_eq!(e.post(0, 2, 1, b"third"), Ok(Posted::Queued));
    let slot = e.slot(0, 2);
    assert_eq!(e.irq.take(), vec![(0, VECTOR)]);
    assert_eq!(&e.ram.bytes::<5>(slot + 16), b"first");
    assert_ne!(e.ram.u64_at(slot) & MESSAGE_PENDING_BIT, 0);

    // EOM while the slot is still busy delivers nothing.
    e.wr(0, m::EOM, 0).unwrap();
    assert!(e.irq.take().is_empty());
    assert_eq!(&e.ram.bytes::<5>(slot + 16), b"first");

    assert!(e.consume(0, 2));
    assert_eq!(e.irq.take(), vec![(0, VECTOR)]);
    assert_eq!(&e.ram.bytes::<6>(slot + 16), b"second");
    assert_eq!(e.ram.bytes::<1>(slot + 4), [6]);
    // "third" still waits, so "second" carries MessagePending.
    assert_eq!(e.ram.bytes::<1>(slot + 5), [1]);

    assert!(e.consume(0, 2));
    assert_eq!(&e.ram.bytes::<5>(slot + 16), b"third");
    assert_eq!(e.ram.bytes::<1>(slot + 5), [0]);
    assert_eq!(e.irq.take(), vec![(0, VECTOR)]);
    assert!(!e.consume(0, 2));
    assert!(e.hv.save().vps[0].queued.is_empty());
}

#[test]
fn guest_freeing_slot_without_eom_is_caught_by_next_post() {
    // The slot was busy (pending set), the guest cleared it but has not written EOM yet:
    // the next post delivers the queued message first, in order.
    let e = env();
    e.enable_synic(0);
    e.post(0, 2, 1, b"a").unwrap();
    e.post(0, 2, 1, b"b").unwrap();
    e.ram.write(e.slot(0, 2), &0u32.to_le_bytes()).unwrap();
    e.irq.take();
    assert_eq!(e.post(0, 2, 1, b"c"), Ok(Posted::Queued));
    assert_eq!(&e.ram.bytes::<1>(e.slot(0, 2) + 16), b"b");
    assert_eq!(e.irq.take(), vec![(0, VECTOR)]);
}

#[test]
fn masked_sint_gets_message_but_no_interrupt() {
    let e = env();
    e.enable_synic(0);
    e.wr(0, m::SINT0 + 2, VECTOR as u64 | m::SINT_MASKED)
        .unwrap();
    assert_eq!(e.post(0, 2, 1, b"x"), Ok(Posted::Delivered));
    assert_eq!(e.ram.u32_at(e.slot(0, 2)), 1);
    assert!(e.irq.take().is_empty());
    // Another SINT, never configured (masked at reset): delivered, no interrupt.
    assert_eq!(e.post(0, 7, 9, b"y"), Ok(Posted::Delivered));
    assert!(e.irq.take().is_empty());
}

#[test]
fn message_queue_is_bounded() {
    let e = env();
    e.enable_synic(0);
    assert_eq!(e.post(0, 2, 1, b"in slot"), Ok(Posted::Delivered));
    for i in 0..MAX_QUEUED_PER_SINT {
        assert_eq!(e.post(0, 2, 1, &[i as u8]), Ok(Posted::Queued));
    }
    assert_eq!(
        e.post(0, 2, 1, b"one too many"),
        Err(SynicError::QueueFull(2))
    );
    // Other SINTs have their own queue.
    assert_eq!(e.post(0, 3, 1, b"other"), Ok(Posted::Delivered));
    // Draining delivers them all, in order.
    for i in 0..MAX_QUEUED_PER_SINT {
        e.consume(0, 2);
        assert_eq!(e.ram.bytes::<1>(e.slot(0, 2) + 16), [i as u8]);
    }
    assert_eq!(e.post(0, 2, 1, b"room again"), Ok(Posted::Queued));
}

#[test]
fn post_message_errors() {
    let e = env();
    assert_eq!(e.post(0, 2, 1, b""), Err(SynicError::SynicDisabled));
    e.wr(0, m::SCONTROL, 1).unwrap();
    assert_eq!(e.post(0, 2, 1, b""), Err(SynicError::MessagePageDisabled));
    e.enable_synic(0);
    assert_eq!(e.post(0, 16, 1, b""), Err(SynicError::InvalidSint(16)));
    assert_eq!(e.post(0, 2, 0, b""), Err(SynicError::InvalidMessageType));
    assert_eq!(
        e.post(0, 2, 1, &[0; 241]),
        Err(SynicError::PayloadTooLarge(241))
    );
    assert_eq!(e.post(5, 2, 1, b""), Err(SynicError::InvalidVp(5)));
    assert_eq!(e.post(0, 2, 1, &[7; 240]), Ok(Posted::Delivered));
    // SIM page outside RAM (the guest may program any GPA): error, nothing queued.
    for simp in [RAM as u64, 0xffff_ffff_ffff_f000] {
        e.wr(1, m::SIMP, simp | 1).unwrap();
        e.wr(1, m::SCONTROL, 1).unwrap();
        assert!(matches!(e.post(1, 15, 1, b"z"), Err(SynicError::Memory(_))));
        assert!(e.hv.save().vps[1].queued.is_empty());
    }
    assert!(e.irq.take().len() == 1);
}

#[test]
fn queued_messages_wait_while_simp_disabled() {
    let e = env();
    e.enable_synic(0);
    e.post(0, 2, 1, b"a").unwrap();
    e.post(0, 2, 1, b"b").unwrap();
    e.wr(0, m::SIMP, SIMP_GPA).unwrap(); // disabled
    e.ram.write(e.slot(0, 2), &0u32.to_le_bytes()).unwrap();
    e.wr(0, m::EOM, 0).unwrap();
    assert_eq!(
        e.ram.u32_at(e.slot(0, 2)),
        0,
        "nothing delivered while disabled"
    );
    e.irq.take();
    e.wr(0, m::SIMP, SIMP_GPA | 1).unwrap(); // re-enabling retries
    assert_eq!(&e.ram.bytes::<1>(e.slot(0, 2) + 16), b"b");
    assert_eq!(e.irq.take(), vec![(0, VECTOR)]);
}

// ---------------------------------------------------------------- events

#[test]
fn signal_event_sets_bit_and_interrupts_on_rising_edge_only() {
    let e = env();
    e.enable_synic(1);
    let siefp = SIEFP_GPA + 0x2000;
    let word = siefp + 2 * 256 + (130 / 64) * 8;
    assert_eq!(e.signal(1, 2, 130), Ok(true));
    assert_eq!(e.ram.u64_at(word), 1 << (130 % 64));
    assert_eq!(e.irq.take(), vec![(1, VECTOR)]);
    assert_eq!(e.signal(1, 2, 130), Ok(false));
    assert!(e.irq.take().is_empty());
    // Another flag in the same word: its own rising edge.
    assert_eq!(e.signal(1, 2, 131), Ok(true));
    assert_eq!(e.irq.take(), vec![(1, VECTOR)]);
    assert_eq!(e.ram.u64_at(word), 0b11 << 2);
    // The guest test-and-clears; the next signal interrupts again.
    e.ram.write(word, &0u64.to_le_bytes()).unwrap();
    assert_eq!(e.signal(1, 2, 130), Ok(true));
    assert_eq!(e.irq.take(), vec![(1, VECTOR)]);
    // Last flag of the SINT lands in the SINT's last word.
    assert_eq!(e.signal(1, 2, 2047), Ok(true));
    assert_eq!(e.ram.u64_at(siefp + 3 * 256 - 8), 1 << 63);
    e.irq.take();
    // Masked SINT: the bit is set, no interrupt.
    assert_eq!(e.signal(1, 4, 0), Ok(true));
    assert_eq!(e.ram.u64_at(siefp + 4 * 256), 1);
    assert!(e.irq.take().is_empty());
}

#[test]
fn signal_event_errors() {
    let e = env();
    assert_eq!(e.signal(0, 2, 1), Err(SynicError::SynicDisabled));
    e.wr(0, m::SCONTROL, 1).unwrap();
    assert_eq!(e.signal(0, 2, 1), Err(SynicError::EventPageDisabled));
    e.enable_synic(0);
    assert_eq!(e.signal(0, 2, 2048), Err(SynicError::InvalidFlag(2048)));
    assert_eq!(e.signal(0, 16, 0), Err(SynicError::InvalidSint(16)));
    assert_eq!(e.signal(9, 2, 0), Err(SynicError::InvalidVp(9)));
    e.wr(0, m::SIEFP, 0xffff_ffff_ffff_f001).unwrap();
    assert!(matches!(e.signal(0, 15, 2047), Err(SynicError::Memory(_))));
    assert!(e.irq.take().is_empty());
}

#[test]
fn concurrent_signals_set_every_bit_once() {
    let e = Arc::new(env());
    e.enable_synic(0);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                for f in 0..256u32 {
                    // Each thread signals every flag; only one 0→1 per flag.
                    let _ = e.signal(0, 2, (f * 7 + t) % 256);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for w in 0..4 {
        assert_eq!(e.ram.u64_at(SIEFP_GPA + 512 + w * 8), u64::MAX);
    }
    assert_eq!(e.irq.take().len(), 256);
}

// ---------------------------------------------------------------- hypercalls

/// (vp, connection id, message type, payload)
type PostRecord = (u32, u32, u32, Vec<u8>);

#[derive(Default)]
struct Recorder {
    posts: Mutex<Vec<PostRecord>>,
    signals: Mutex<Vec<(u32, u32, u16)>>,
    status: Mutex<Option<HvStatus>>,
}

impl HypercallHandler for Recorder {
    fn post_message(&self, vp: u32, conn: u32, ty: u32, payload: &[u8]) -> HvStatus {
        self.posts
            .lock()
            .unwrap()
            .push((vp, conn, ty, payload.to_vec()));
        self.status.lock().unwrap().unwrap_or(HvStatus::SUCCESS)
    }
    fn signal_event(&self, vp: u32, conn: u32, flag: u16) -> HvStatus {
        self.signals.lock().unwrap().push((vp, conn, flag));
        self.status.lock().unwrap().unwrap_or(HvStatus::SUCCESS)
    }
}

fn post_input(conn: u32, rsvd: u32, ty: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [conn, rsvd, ty, size] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn call(e: &Env, h: &Recorder, vp: u32, rcx: u64, rdx: u64) -> u64 {
    let mut regs = HypercallRegs {
        rax: 0xdead,
        rcx,
        rdx,
        r8: 0,
    };
    assert!(e.hv.hypercall(vp, &mut regs, &e.ram, h));
    assert_eq!(
        (regs.rcx, regs.rdx, regs.r8),
        (rcx, rdx, 0),
        "inputs preserved"
    );
    regs.rax
}

#[test]
fn hypercall_needs_enabled_page() {
    let e = env();
    let h = Recorder::default();
    let mut regs = HypercallRegs {
        rax: 7,
        rcx: 0x5d | 1 << 16,
        rdx: 1,
        r8: 0,
    };
    let before = regs;
    assert!(!e.hv.hypercall(0, &mut regs, &e.ram, &h));
    assert_eq!(regs, before);
    assert!(h.signals.lock().unwrap().is_empty());
}

#[test]
fn hypercall_post_message_good_input() {
    let e = env();
    e.enable_hypercalls();
    let h = Recorder::default();
    e.ram
        .write(INPUT_GPA, &post_input(4, 0, 1, 5, b"hello"))
        .unwrap();
    assert_eq!(call(&e, &h, 1, 0x5c, INPUT_GPA), 0);
    assert_eq!(*h.posts.lock().unwrap(), vec![(1, 4, 1, b"hello".to_vec())]);
    // The handler's status is returned as is; so is a full 240-byte payload at page end.
    *h.status.lock().unwrap() = Some(HvStatus::INVALID_CONNECTION_ID);
    let gpa = INPUT_GPA + 4096 - 256;
    e.ram
        .write(gpa, &post_input(1, 0, 0x7fff_ffff, 240, &[0xab; 240]))
        .unwrap();
    assert_eq!(call(&e, &h, 0, 0x5c, gpa), 18);
    assert_eq!(h.posts.lock().unwrap()[1].3, vec![0xab; 240]);
}

#[test]
fn hypercall_hostile_inputs() {
    let e = env();
    e.enable_hypercalls();
    let h = Recorder::default();
    e.ram
        .write(INPUT_GPA, &post_input(4, 0, 1, 5, b"hello"))
        .unwrap();
    let cases: &[(&str, u64, u64, u64)] = &[
        ("unknown code", 0x99, INPUT_GPA, 2),
        ("code 0", 0, INPUT_GPA, 2),
        ("rep count", 0x5c | 1 << 32, INPUT_GPA, 3),
        ("rep start", 0x5c | 1 << 48, INPUT_GPA, 3),
        ("var header", 0x5c | 1 << 17, INPUT_GPA, 3),
        ("nested bit", 0x5c | 1 << 31, INPUT_GPA, 3),
        ("reserved 63", 0x5d | 1 << 16 | 1 << 63, 1, 3),
        ("fast post", 0x5c | 1 << 16, INPUT_GPA, 3),
        ("unaligned", 0x5c, INPUT_GPA + 4, 4),
        ("crosses page", 0x5c, INPUT_GPA + 4096 - 248, 4),
        ("outside RAM", 0x5c, RAM as u64, 4),
        ("beyond 4G", 0x5c, 1 << 40, 4),
        ("wraps 2^64", 0x5c, !7, 4),
        ("wraps 2^64 page", 0x5c, 0xffff_ffff_ffff_f000, 4),
        ("slow signal unaligned", 0x5d, INPUT_GPA + 1, 4),
        ("slow signal outside", 0x5d, RAM as u64 + 8, 4),
    ];
    for &(what, rcx, rdx, want) in cases {
        assert_eq!(call(&e, &h, 0, rcx, rdx), want, "{what}");
    }
    let bad_blocks: &[(&str, Vec<u8>)] = &[
        ("oversize payload", post_input(4, 0, 1, 241, &[])),
        ("huge payload size", post_input(4, 0, 1, u32::MAX, &[])),
        ("reserved field", post_input(4, 1, 1, 5, b"hello")),
        ("type 0", post_input(4, 0, 0, 5, b"hello")),
        ("type MSB", post_input(4, 0, 0x8000_0001, 5, b"hello")),
    ];
    for (what, block) in bad_blocks {
        e.ram.write(INPUT_GPA + 512, block).unwrap();
        assert_eq!(call(&e, &h, 0, 0x5c, INPUT_GPA + 512), 5, "{what}");
    }
    assert!(h.posts.lock().unwrap().is_empty(), "handler saw bad input");
    assert!(h.signals.lock().unwrap().is_empty());
}

#[test]
fn hypercall_signal_event_fast_and_slow() {
    let e = env();
    e.enable_hypercalls();
    let h = Recorder::default();
    assert_eq!(call(&e, &h, 1, 0x5d | 1 << 16, 0x1_2345 | 3 << 32), 0);
    e.ram
        .write(INPUT_GPA, &(9u64 | 0xffff << 32).to_le_bytes())
        .unwrap();
    assert_eq!(call(&e, &h, 0, 0x5d, INPUT_GPA), 0);
    assert_eq!(
        *h.signals.lock().unwrap(),
        vec![(1, 0x1_2345, 3), (0, 9, 0xffff)]
    );
    // RsvdZ bits 48..63 of the parameter.
    assert_eq!(call(&e, &h, 0, 0x5d | 1 << 16, 1 << 48), 5);
    *h.status.lock().unwrap() = Some(HvStatus::INSUFFICIENT_BUFFERS);
    assert_eq!(call(&e, &h, 0, 0x5d | 1 << 16, 5), 19);
    assert_eq!(h.signals.lock().unwrap().len(), 3);
}

// ---------------------------------------------------------------- state

#[test]
fn save_restore_round_trip_keeps_time_and_queues() {
    let e = env_with(2, 0.5);
    e.enable_hypercalls();
    e.enable_synic(0);
    e.enable_synic(1);
    e.wr(1, m::VP_ASSIST_PAGE, 0x9001).unwrap();
    e.wr(0, m::REFERENCE_TSC, TSC_GPA | 1).unwrap();
    e.post(1, 2, 1, b"delivered").unwrap();
    e.post(1, 2, 1, b"queued 1").unwrap();
    e.post(1, 2, 3, b"queued 2").unwrap();
    e.clock.set(40 * TSC_HZ);
    let saved = e.hv.save();
    assert_eq!(saved.vps[1].queued.len(), 2);
    let json = serde_json::to_string(&saved).unwrap();
    let back: Hv1State = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    // A new partition whose guest TSC is elsewhere (e.g. another host).
    let f = env_with(2, 0.5);
    f.clock.set(3 * TSC_HZ);
    let mut image = vec![0u8; 0x30000];
    e.ram.read(0, &mut image).unwrap();
    f.ram.write(0, &image).unwrap();
    f.hv.restore(&back, &f.ram).unwrap();
    assert_eq!(f.rd(0, m::TIME_REF_COUNT), Some(saved.reference_time));
    assert_eq!(page_time(&f.ram, 3 * TSC_HZ), Some(saved.reference_time));
    assert_ne!(f.ram.u32_at(TSC_GPA), e.ram.u32_at(TSC_GPA), "new sequence");
    f.clock.advance(TSC_HZ);
    assert_eq!(f.rd(0, m::TIME_REF_COUNT), page_time(&f.ram, 4 * TSC_HZ));
    assert!(f.hv.hypercalls_enabled());
    assert_eq!(f.rd(1, m::VP_ASSIST_PAGE), Some(0x9001));
    let mut again = f.hv.save();
    again.reference_time = saved.reference_time;
    again.tsc_sequence = saved.tsc_sequence;
    assert_eq!(again, saved);
    // The queue survives: EOM after consuming delivers the next one.
    assert!(f.consume(1, 2));
    assert_eq!(&f.ram.bytes::<8>(f.slot(1, 2) + 16), b"queued 1");
    assert_eq!(f.irq.take(), vec![(1, VECTOR)]);
}

#[test]
fn restore_rejects_bad_state_and_changes_nothing() {
    let e = env();
    e.enable_synic(0);
    let good = e.hv.save();
    let f = env();
    f.wr(0, m::GUEST_OS_ID, 77).unwrap();
    let before = f.hv.save();

    let mut s = good.clone();
    s.vps.pop();
    assert!(matches!(
        f.hv.restore(&s, &f.ram),
        Err(RestoreError::VpCount { .. })
    ));
    let mut s = good.clone();
    s.vps[0].sint[3] = 5; // unmasked vector < 16
    assert!(matches!(
        f.hv.restore(&s, &f.ram),
        Err(RestoreError::Sint { .. })
    ));
    let mut s = good.clone();
    s.vps[0].queued.push(QueuedMessageState {
        sint: 2,
        message_type: 1,
        payload: vec![0; 241],
    });
    assert!(matches!(
        f.hv.restore(&s, &f.ram),
        Err(RestoreError::Message { .. })
    ));
    let mut s = good.clone();
    s.vps[0].queued = (0..=MAX_QUEUED_PER_SINT)
        .map(|_| QueuedMessageState {
            sint: 2,
            message_type: 1,
            payload: vec![],
        })
        .collect();
    assert!(matches!(
        f.hv.restore(&s, &f.ram),
        Err(RestoreError::Queue { .. })
    ));
    let mut s = good.clone();
    s.reference_tsc = (RAM as u64) | 1;
    assert!(matches!(
        f.hv.restore(&s, &f.ram),
        Err(RestoreError::Memory(_))
    ));
    assert_eq!(f.hv.save().vps, before.vps);
    assert_eq!(f.rd(0, m::GUEST_OS_ID), Some(77));
}

#[test]
fn reset_returns_to_power_on_state() {
    let e = env();
    e.enable_hypercalls();
    e.enable_synic(0);
    e.post(0, 2, 1, b"a").unwrap();
    e.post(0, 2, 1, b"b").unwrap();
    e.clock.set(TSC_HZ);
    let t = e.hv.reference_time();
    e.hv.reset();
    assert!(!e.hv.hypercalls_enabled());
    assert_eq!(e.rd(0, m::SCONTROL), Some(0));
    assert_eq!(e.rd(0, m::SINT0 + 2), Some(m::SINT_RESET));
    assert!(e.hv.save().vps[0].queued.is_empty());
    assert_eq!(e.hv.reference_time(), t, "reference time keeps counting");
}

#[test]
fn hv1_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Hv1>();
}
