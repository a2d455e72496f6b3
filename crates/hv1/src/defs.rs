//! Numbers from Microsoft's Hypervisor Top Level Functional Specification (TLFS), the ones
//! this crate implements. Names follow the TLFS (and Linux's `hyperv-tlfs.h`, which copies
//! them) so that a reader can look each one up.

/// CPUID leaves ("Feature and Interface Discovery").
pub mod cpuid {
    /// EAX = highest hypervisor leaf, EBX:ECX:EDX = vendor "Microsoft Hv".
    pub const VENDOR_AND_MAX_FUNCTIONS: u32 = 0x4000_0000;
    /// EAX = interface signature "Hv#1".
    pub const INTERFACE: u32 = 0x4000_0001;
    /// Hypervisor version (build, major.minor, service pack, branch/number).
    pub const VERSION: u32 = 0x4000_0002;
    /// Partition privileges (EAX low half, EBX high half) and features (EDX).
    pub const FEATURES: u32 = 0x4000_0003;
    /// Implementation recommendations ("enlightenment info", hints).
    pub const ENLIGHTENMENT_INFO: u32 = 0x4000_0004;
    /// Implementation limits (maximum virtual/logical processors).
    pub const IMPLEMENTATION_LIMITS: u32 = 0x4000_0005;
    /// Hardware features in use by the hypervisor.
    pub const HARDWARE_FEATURES: u32 = 0x4000_0006;
    /// Highest leaf we report (nested features; zero here).
    pub const MAX_LEAF: u32 = 0x4000_000A;

    /// Interface signature "Hv#1" as CPUID returns it in EAX (little-endian bytes).
    pub const INTERFACE_SIGNATURE: u32 = u32::from_le_bytes(*b"Hv#1");

    // 0x40000003 EAX: partition privileges, low half ("Group A").
    /// HV_X64_MSR_TIME_REF_COUNT available.
    pub const PRIV_TIME_REF_COUNT: u32 = 1 << 1;
    /// SCONTROL..EOM and SINT0..15 available.
    pub const PRIV_SYNIC: u32 = 1 << 2;
    /// GUEST_OS_ID and HYPERCALL available.
    pub const PRIV_HYPERCALL: u32 = 1 << 5;
    /// VP_INDEX available.
    pub const PRIV_VP_INDEX: u32 = 1 << 6;
    /// REFERENCE_TSC available.
    pub const PRIV_REFERENCE_TSC: u32 = 1 << 9;
    /// TSC_FREQUENCY and APIC_FREQUENCY available.
    pub const PRIV_FREQUENCY_MSRS: u32 = 1 << 11;
    /// Synthetic timers (not offered: Linux keeps the LAPIC timer).
    pub const PRIV_SYNTIMER: u32 = 1 << 3;
    /// TSC invariant controls (not offered: it would make Linux pick the raw TSC).
    pub const PRIV_TSC_INVARIANT: u32 = 1 << 15;

    // 0x40000003 EBX: partition privileges, high half ("Group B").
    /// HvPostMessage allowed.
    pub const PRIV_POST_MESSAGES: u32 = 1 << 4;
    /// HvSignalEvent allowed.
    pub const PRIV_SIGNAL_EVENTS: u32 = 1 << 5;
    /// HvGetPartitionId allowed. Never offered: Linux BUG()s if that hypercall fails.
    pub const PRIV_ACCESS_PARTITION_ID: u32 = 1 << 1;
    /// CPU management: marks the root partition. Never offered.
    pub const PRIV_CPU_MANAGEMENT: u32 = 1 << 12;
    /// Extended hypercalls. Never offered (we implement none).
    pub const PRIV_EXTENDED_HYPERCALLS: u32 = 1 << 20;
    /// Isolation (SEV-SNP/TDX). Never offered.
    pub const PRIV_ISOLATION: u32 = 1 << 22;

    // 0x40000003 EDX: features.
    /// The frequency MSRs are available (Linux needs this and PRIV_FREQUENCY_MSRS).
    pub const FEATURE_FREQUENCY_MSRS_AVAILABLE: u32 = 1 << 8;

    // 0x40000004 EAX: recommendations.
    /// Relaxed timing: no watchdogs that rely on timely interrupts (our ring 0 is slow).
    pub const HINT_RELAXED_TIMING: u32 = 1 << 5;
    /// Do not use auto-EOI (a KVM LAPIC cannot auto-EOI a SINT vector).
    pub const HINT_DEPRECATING_AEOI: u32 = 1 << 9;
    /// Use MSRs for APIC access (not offered: we do not emulate EOI/ICR/TPR MSRs).
    pub const HINT_APIC_ACCESS: u32 = 1 << 3;
    /// Remote TLB flush hypercalls (not offered).
    pub const HINT_REMOTE_TLB_FLUSH: u32 = 1 << 2;
    /// Cluster IPI hypercalls (not offered).
    pub const HINT_CLUSTER_IPI: u32 = 1 << 10;
    /// ExProcessorMasks hypercalls (not offered).
    pub const HINT_EX_PROCESSOR_MASKS: u32 = 1 << 11;
    /// Enlightened VMCS (not offered).
    pub const HINT_ENLIGHTENED_VMCS: u32 = 1 << 14;
}

/// Synthetic MSR numbers.
pub mod msr {
    pub const GUEST_OS_ID: u32 = 0x4000_0000;
    pub const HYPERCALL: u32 = 0x4000_0001;
    pub const VP_INDEX: u32 = 0x4000_0002;
    pub const TIME_REF_COUNT: u32 = 0x4000_0020;
    pub const REFERENCE_TSC: u32 = 0x4000_0021;
    pub const TSC_FREQUENCY: u32 = 0x4000_0022;
    pub const APIC_FREQUENCY: u32 = 0x4000_0023;
    pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
    pub const SCONTROL: u32 = 0x4000_0080;
    pub const SVERSION: u32 = 0x4000_0081;
    pub const SIEFP: u32 = 0x4000_0082;
    pub const SIMP: u32 = 0x4000_0083;
    pub const EOM: u32 = 0x4000_0084;
    pub const SINT0: u32 = 0x4000_0090;
    pub const SINT15: u32 = 0x4000_009F;
    /// First synthetic timer MSR (STIMER0_CONFIG); the timers are not offered.
    pub const STIMER0_CONFIG: u32 = 0x4000_00B0;

    /// Bit 0 of HYPERCALL, REFERENCE_TSC, VP_ASSIST_PAGE, SCONTROL, SIEFP and SIMP.
    pub const ENABLE: u64 = 1;
    /// HYPERCALL bit 1: once set, the MSR is immutable until reset.
    pub const HYPERCALL_LOCKED: u64 = 1 << 1;
    /// Bits 12..63 of the page-address MSRs: the guest page frame, shifted.
    pub const PAGE_MASK: u64 = !0xfff;
    /// SINTx bits 0..7.
    pub const SINT_VECTOR_MASK: u64 = 0xff;
    /// SINTx bit 16.
    pub const SINT_MASKED: u64 = 1 << 16;
    /// SINTx bit 17 (stored; auto-EOI cannot be honoured with a KVM LAPIC).
    pub const SINT_AUTO_EOI: u64 = 1 << 17;
    /// Value of every SINTx at reset: masked, vector 0.
    pub const SINT_RESET: u64 = SINT_MASKED;
    /// Value SVERSION reads.
    pub const SYNIC_VERSION: u64 = 1;
    /// Lowest vector a SINT may use.
    pub const FIRST_VALID_VECTOR: u64 = 16;
}

/// Hypercall call codes.
pub mod call {
    pub const POST_MESSAGE: u16 = 0x005c;
    pub const SIGNAL_EVENT: u16 = 0x005d;
    /// Control value bit 16: register ("fast") calling convention.
    pub const FAST: u64 = 1 << 16;
}

/// Size of one SynIC message slot (the SIM page holds 16).
pub const MESSAGE_SIZE: usize = 256;
/// Message header size; the payload follows it.
pub const MESSAGE_HEADER_SIZE: usize = 16;
/// Largest message payload.
pub const MESSAGE_PAYLOAD_MAX: usize = 240;
/// Number of synthetic interrupt sources per VP.
pub const SINT_COUNT: usize = 16;
/// Event flags per SINT in the SIEF page (256 bytes of bits).
pub const EVENT_FLAGS_PER_SINT: u32 = 2048;
/// Message header byte 5 bit 0, as a bit of the slot's first little-endian u64.
pub const MESSAGE_PENDING_BIT: u64 = 1 << 40;
/// Messages the host may queue per (VP, SINT) while the slot is busy; more is refused.
pub const MAX_QUEUED_PER_SINT: usize = 64;
/// Guest page size the TLFS uses for every overlay page and hypercall parameter page.
pub const PAGE_SIZE: u64 = 4096;
/// Reference time runs at 10 MHz (100 ns units).
pub const REFERENCE_HZ: u64 = 10_000_000;
