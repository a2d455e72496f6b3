//! Hypervisor CPUID leaves (TLFS "Feature and Interface Discovery").

use crate::defs::cpuid::*;
use crate::Hv1;

/// Hypervisor version reported in 0x40000002: build 17763 of 10.0 (Windows Server 2019's
/// hypervisor). Guests only print it.
const VERSION_BUILD: u32 = 17763;
const VERSION_MAJOR_MINOR: u32 = 10 << 16;

/// 0x40000003 EAX: what we implement. Deliberately clear: VP runtime, synthetic timers,
/// APIC-access MSRs, reset, statistics, guest idle, reenlightenment, TSC invariant.
const FEATURES_EAX: u32 = PRIV_TIME_REF_COUNT
    | PRIV_SYNIC
    | PRIV_HYPERCALL
    | PRIV_VP_INDEX
    | PRIV_REFERENCE_TSC
    | PRIV_FREQUENCY_MSRS;
/// 0x40000003 EBX: post messages and signal events, nothing else (see the notes: partition
/// id, CPU management, extended hypercalls and isolation would each derail a Linux guest).
const FEATURES_EBX: u32 = PRIV_POST_MESSAGES | PRIV_SIGNAL_EVENTS;
/// 0x40000003 EDX.
const FEATURES_EDX: u32 = FEATURE_FREQUENCY_MSRS_AVAILABLE;
/// 0x40000004 EAX. AutoEOI deprecated is mandatory with a KVM LAPIC; relaxed timing because
/// guest ring 0 is slow on our hosts (it tells guests to disable interrupt-latency watchdogs).
const HINTS_EAX: u32 = HINT_DEPRECATING_AEOI | HINT_RELAXED_TIMING;
/// 0x40000004 EBX: spinlock retries before notifying the hypervisor; all ones = never.
const HINTS_EBX: u32 = u32::MAX;

impl Hv1 {
    /// The hypervisor CPUID leaf `leaf` as [EAX, EBX, ECX, EDX], for 0x40000000..=0x4000000A;
    /// `None` for any other leaf (the worker answers those). `subleaf` is unused.
    pub fn cpuid(&self, leaf: u32, _subleaf: u32) -> Option<[u32; 4]> {
        let sig = |s: &[u8; 4]| u32::from_le_bytes(*s);
        Some(match leaf {
            VENDOR_AND_MAX_FUNCTIONS => [MAX_LEAF, sig(b"Micr"), sig(b"osof"), sig(b"t Hv")],
            INTERFACE => [INTERFACE_SIGNATURE, 0, 0, 0],
            VERSION => [VERSION_BUILD, VERSION_MAJOR_MINOR, 0, 0],
            FEATURES => [FEATURES_EAX, FEATURES_EBX, 0, FEATURES_EDX],
            ENLIGHTENMENT_INFO => [HINTS_EAX, HINTS_EBX, 0, 0],
            IMPLEMENTATION_LIMITS => [self.config.vp_count, self.config.vp_count, 0, 0],
            // Hardware features "in use" by the hypervisor (SLAT, MSR bitmaps, DMA/interrupt
            // remapping...). Informational; which of them a (possibly nested) KVM uses varies
            // by host, so claim none. Linux 6.1 does not read this leaf.
            HARDWARE_FEATURES => [0; 4],
            0x4000_0007..=MAX_LEAF => [0; 4],
            _ => return None,
        })
    }
}
