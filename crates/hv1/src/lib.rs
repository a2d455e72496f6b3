//! `hv1`: the guest-visible Hyper-V synthetic interface, emulated in user space.
//!
//! # What it is
//!
//! The part of Microsoft's hypervisor that a child partition sees, as specified by the
//! Hypervisor Top Level Functional Specification (TLFS), for a KVM that has no in-kernel
//! Hyper-V support. It is pure logic: no KVM, no threads, no I/O. Each part implements these
//! TLFS sections (and the facts in `shared/notes/linux-guest-on-hyperv.md`):
//!
//! | part | TLFS section / facts |
//! |---|---|
//! | [`Hv1::cpuid`] | "Feature and Interface Discovery": leaves 0x40000000..=0x4000000A, vendor "Microsoft Hv", interface "Hv#1", privileges, recommendations (AutoEOI deprecated), limits |
//! | [`Hv1::rdmsr`], [`Hv1::wrmsr`] | "Partition Properties"/"Virtual Processors": GUEST_OS_ID, VP_INDEX, VP_ASSIST_PAGE (accepted, stored); "Hypercall Interface — Establishing the Hypercall Interface": HYPERCALL (enable, locked, page frame); "Timers": TIME_REF_COUNT, REFERENCE_TSC, TSC/APIC_FREQUENCY; "Synthetic Interrupt Controller": SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0..15 |
//! | [`Hv1::hypercall`] | "Hypercall Interface": x64 register ABI, control value (call code, fast bit, rep fields, reserved bits), common status codes, 8-byte-aligned parameter blocks that do not span pages; "HvCallPostMessage" (0x5c) and "HvCallSignalEvent" (0x5d) |
//! | [`Hv1::post_message`] | "Inter-Partition Communication — SynIC Messages": 256-byte slots in the SIM page, message queued while the slot is busy, MessagePending flag, EOM rescans the queue, edge interrupt on the SINT vector unless masked |
//! | [`Hv1::signal_event`] | "Inter-Partition Communication — Event Flags": atomic bit set in the SIEF page, interrupt only on a 0→1 change |
//! | [`Hv1::reference_time`] | "Timers — Partition Reference Counter" and "Reference TSC Page": `((tsc * scale) >> 64) + offset` in 100 ns units |
//!
//! The hypercall page: the TLFS says the hypervisor fills it with code that makes the
//! hypercall. Real Hyper-V uses `vmcall`; on our KVM `vmcall` does not exit to user space, so
//! the page holds `out $HYPERCALL_PORT, %al; ret` instead ([`Hv1::HYPERCALL_PORT`] explains
//! the port). The immediate-port form of `out` reads only AL, and the x64 hypercall ABI puts
//! the control value in RCX, the input in RDX and the output GPA in R8: the stub touches none
//! of them (DX is not used as the port), and RAX is the result register anyway.
//!
//! # What it talks to
//!
//! Only the caller: the worker calls it from its VP threads (CPUID/MSR/port exits) and from the
//! VMBus server (messages and events to the guest). Everything it needs from outside comes
//! through three small traits the worker implements: [`GuestMemory`] (guest RAM, bounds
//! checked by the implementation), [`InterruptSink`] (a fixed, edge-triggered vector to one
//! VP's LAPIC, e.g. `KVM_SIGNAL_MSI`) and [`Clock`] (the TSC value the guest reads now).
//! Hypercalls the guest makes reach the VMBus server through [`HypercallHandler`].
//!
//! # What it must never do
//!
//! - Trust the guest: every MSR value, hypercall register and parameter page is hostile. Bad
//!   input becomes `#GP` ([`MsrError`]) or an `HV_STATUS` code, never a panic.
//! - Touch memory outside guest RAM: all guest accesses go through [`GuestMemory`], whose
//!   errors are propagated (an MSR pointing outside RAM is refused with `#GP`; a parameter
//!   block outside RAM is `HV_STATUS_INVALID_ALIGNMENT`, as the TLFS says).
//! - Grow without bound: at most [`defs::MAX_QUEUED_PER_SINT`] messages wait per VP and SINT;
//!   past that [`Hv1::post_message`] fails with [`SynicError::QueueFull`].
//! - Call out while holding its locks: interrupts are raised and the [`HypercallHandler`] is
//!   called with no lock held, so the handler may post messages back synchronously.
//! - Advertise what it does not implement: synthetic timers, APIC-access MSRs, partition-id,
//!   TSC-invariant, crash MSRs and enlightened VMCS stay clear in CPUID; the notes explain
//!   why each would hurt a Linux guest.
//!
//! # Why hand-written
//!
//! No crate on crates.io emulates the TLFS guest interface for a user-space VMM independent of
//! a particular VMM's memory and interrupt model (OpenVMM's implementation is bound to its own
//! stack and may not be copied); the surface needed by Linux 6.1 is small.
//!
//! # Known limits
//!
//! - x64 calling convention only (a 32-bit guest's EDX:EAX / EBX:ECX convention is not decoded).
//! - Message retries happen on EOM, on a new post, and when the guest (re-)enables SCONTROL or
//!   SIMP or unmasks a SINT. The TLFS also rescans on LAPIC EOI, which the in-kernel LAPIC does
//!   not report; Linux writes EOM whenever MessagePending was set, so this does not matter to it.
//! - A SINT's auto-EOI bit is stored but not honoured (the AEOI-deprecated hint tells guests not
//!   to use it); the polling bit is stored.
//! - Overlay pages (hypercall page, TSC page) are written into ordinary guest RAM: when the guest
//!   disables them, the previous contents do not reappear.

mod cpuid;
pub mod defs;
mod hypercall;
mod msr;
mod synic;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod time;

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use defs::{msr as m, MAX_QUEUED_PER_SINT, MESSAGE_PAYLOAD_MAX, SINT_COUNT};
pub use hypercall::{HvStatus, HypercallHandler, HypercallRegs};
pub use synic::Posted;
use synic::{QueuedMessage, VpState};
use time::Timebase;
pub use time::MAX_VPS;

/// A guest physical range that is not (entirely) guest RAM, or an unaligned atomic access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest physical range {gpa:#x}+{len:#x} is not accessible guest RAM")]
pub struct MemError {
    pub gpa: u64,
    pub len: u64,
}

/// What hv1 needs from the worker: access to guest RAM. Implementations must refuse (with
/// [`MemError`]) any range not entirely inside guest RAM — including ranges whose end wraps
/// past 2^64, which guest-chosen page addresses can produce — and must never panic.
pub trait GuestMemory: Send + Sync {
    /// Copies guest bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `buf` into guest RAM at `gpa`.
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError>;
    /// Atomic OR of the little-endian u64 at `gpa` (always 8-byte aligned when hv1 calls it)
    /// with `bits`; returns the previous value. Other VPs access these words concurrently
    /// (event flags, message headers), so this must be a real atomic read-modify-write.
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError>;
}

/// Delivers a fixed, edge-triggered interrupt with `vector` to VP `vp`'s local APIC.
pub trait InterruptSink: Send + Sync {
    fn interrupt(&self, vp: u32, vector: u8);
}

/// The guest's time stamp counter.
pub trait Clock: Send + Sync {
    /// The TSC value the guest reads now (all VPs share one TSC).
    fn guest_tsc(&self) -> u64;
}

/// Partition parameters chosen by the worker.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Number of virtual processors; VP indexes are `0..vp_count`.
    pub vp_count: u32,
    /// How fast the TSC the guest reads ticks, per wall-clock second.
    pub tsc_hz: u64,
    /// Guest seconds per wall second (1.0 = real time; 0.1 = guest time runs 10x slower).
    pub time_scale: f64,
}

/// A [`Config`] that cannot describe a partition.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("vp_count {0} is outside 1..={MAX_VPS}")]
    VpCount(u32),
    #[error(
        "time_scale {0} must be a finite number > 0 giving an APIC frequency of at least 1 Hz"
    )]
    TimeScale(f64),
    #[error(
        "tsc_hz {tsc_hz} / time_scale {time_scale} must lie between 10 MHz (exclusive) and 2^62 Hz"
    )]
    GuestTscHz { tsc_hz: u64, time_scale: f64 },
}

/// Why a synthetic MSR access must fail; the worker injects `#GP(0)` for every variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsrError {
    /// Not an MSR hv1 implements (or VP index out of range): the caller may offer it to
    /// another handler, else inject #GP like hardware.
    #[error("MSR {0:#x} is not a synthetic MSR hv1 implements")]
    Unhandled(u32),
    #[error("MSR {0:#x} is read-only")]
    ReadOnly(u32),
    #[error("value {value:#x} is invalid for MSR {msr:#x}")]
    InvalidValue { msr: u32, value: u64 },
    /// The page the value points at is not guest RAM.
    #[error("MSR {msr:#x}: {source}")]
    Memory { msr: u32, source: MemError },
}

/// Why a host → guest message or event could not be delivered or queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SynicError {
    #[error("no virtual processor {0}")]
    InvalidVp(u32),
    #[error("SINT {0} is out of range (0..=15)")]
    InvalidSint(u8),
    #[error("event flag {0} is out of range (0..2048)")]
    InvalidFlag(u32),
    #[error("message payload of {0} bytes exceeds 240")]
    PayloadTooLarge(usize),
    #[error("message type 0 means an empty slot and cannot be posted")]
    InvalidMessageType,
    #[error("the guest has not enabled the SynIC (SCONTROL) on this VP")]
    SynicDisabled,
    #[error("the guest has not enabled its message page (SIMP) on this VP")]
    MessagePageDisabled,
    #[error("the guest has not enabled its event flags page (SIEFP) on this VP")]
    EventPageDisabled,
    #[error("{MAX_QUEUED_PER_SINT} messages already wait for SINT {0}; retry after the guest consumes them")]
    QueueFull(u8),
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// A saved state that does not fit this partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("saved state has {saved} VPs, this partition has {actual}")]
    VpCount { saved: usize, actual: u32 },
    #[error("saved state for VP {vp}: invalid SINT{sint} value {value:#x}")]
    Sint { vp: u32, sint: u8, value: u64 },
    #[error("saved state for VP {vp}: invalid queued message")]
    Message { vp: u32 },
    #[error(
        "saved state for VP {vp}: more than {MAX_QUEUED_PER_SINT} messages queued for one SINT"
    )]
    Queue { vp: u32 },
    #[error("rewriting the reference TSC page: {0}")]
    Memory(MemError),
}

/// Plain-data, guest-visible state of the synthetic interface (for save, restore, migration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hv1State {
    pub guest_os_id: u64,
    pub hypercall: u64,
    pub reference_tsc: u64,
    pub tsc_sequence: u32,
    /// Reference time (100 ns) when the state was saved; restore continues from it.
    pub reference_time: u64,
    pub vps: Vec<VpSynicState>,
}

/// One VP's synthetic registers and the messages still waiting for its slots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpSynicState {
    pub vp_assist_page: u64,
    pub scontrol: u64,
    pub siefp: u64,
    pub simp: u64,
    pub sint: [u64; SINT_COUNT],
    /// In delivery order per SINT.
    pub queued: Vec<QueuedMessageState>,
}

/// A host message waiting for its slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMessageState {
    pub sint: u8,
    pub message_type: u32,
    pub payload: Vec<u8>,
}

/// Partition-wide synthetic registers.
#[derive(Clone, Copy, Debug, Default)]
struct Partition {
    guest_os_id: u64,
    hypercall: u64,
    reference_tsc: u64,
    tsc_sequence: u32,
}

/// The synthetic interface of one partition: partition-wide state plus one SynIC per VP.
/// Internally synchronized; share it between VP threads with `Arc`.
pub struct Hv1 {
    config: Config,
    timebase: Timebase,
    clock: Arc<dyn Clock>,
    /// TSC page offset (as u64, wrapping): reference time = ticks(tsc) + offset.
    offset: AtomicU64,
    partition: Mutex<Partition>,
    vps: Box<[Mutex<VpState>]>,
}

/// Locks `m`, recovering the data if a thread panicked while holding it (the state is plain
/// registers, valid at every step, so poisoning carries no meaning here).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hv1 {
    /// A partition in its power-on state. Cheap: a few words per VP, no guest access. Reference
    /// time counts from guest TSC 0 (the guest TSC starts near 0 when the VM is created).
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Hv1, ConfigError> {
        let timebase = Timebase::new(&config)?;
        Ok(Hv1 {
            config,
            timebase,
            clock,
            offset: AtomicU64::new(0),
            partition: Mutex::new(Partition::default()),
            vps: (0..config.vp_count)
                .map(|_| Mutex::new(VpState::default()))
                .collect(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The TSC frequency the guest is told (HV_X64_MSR_TSC_FREQUENCY): `tsc_hz / time_scale`.
    pub fn guest_tsc_hz(&self) -> u64 {
        self.timebase.guest_tsc_hz
    }

    /// The LAPIC timer frequency the guest is told (HV_X64_MSR_APIC_FREQUENCY). KVM's LAPIC
    /// timer counts at 1 GHz of wall time, i.e. `1e9 / time_scale` per guest second.
    pub fn apic_hz(&self) -> u64 {
        self.timebase.apic_hz
    }

    /// Partition reference time in 100 ns units: the value TIME_REF_COUNT returns and the
    /// reference TSC page yields for the current guest TSC.
    pub fn reference_time(&self) -> u64 {
        self.reference_time_at(self.clock.guest_tsc())
    }

    fn reference_time_at(&self, tsc: u64) -> u64 {
        self.timebase
            .ticks(tsc)
            .wrapping_add(self.offset.load(Ordering::Acquire))
    }

    fn vp(&self, vp: u32) -> Option<&Mutex<VpState>> {
        self.vps.get(vp as usize)
    }

    /// Back to the power-on state (guest reset): all synthetic registers cleared, SINTs
    /// masked, queued messages dropped. Reference time keeps counting (as on Hyper-V, where it
    /// is the partition's time since creation).
    pub fn reset(&self) {
        *lock(&self.partition) = Partition::default();
        for vp in self.vps.iter() {
            *lock(vp) = VpState::default();
        }
    }

    /// The guest-visible state, as plain data. Take it with the VPs stopped; the reference
    /// time recorded is the one at this call.
    pub fn save(&self) -> Hv1State {
        let p = *lock(&self.partition);
        let vps = self
            .vps
            .iter()
            .map(|vp| {
                let s = lock(vp);
                let mut queued = Vec::new();
                for (sint, q) in s.queues.iter().enumerate() {
                    for msg in q {
                        queued.push(QueuedMessageState {
                            sint: sint as u8,
                            message_type: msg.message_type,
                            payload: msg.payload().to_vec(),
                        });
                    }
                }
                VpSynicState {
                    vp_assist_page: s.vp_assist,
                    scontrol: s.scontrol,
                    siefp: s.siefp,
                    simp: s.simp,
                    sint: s.sint,
                    queued,
                }
            })
            .collect();
        Hv1State {
            guest_os_id: p.guest_os_id,
            hypercall: p.hypercall,
            reference_tsc: p.reference_tsc,
            tsc_sequence: p.tsc_sequence,
            reference_time: self.reference_time(),
            vps,
        }
    }

    /// Loads a saved state. Call it with the VPs stopped, after the guest's RAM and TSC are
    /// restored: reference time continues from the saved value (the TSC page offset is
    /// recomputed for the current guest TSC and this host's frequencies, and the page is
    /// rewritten with a new sequence number). All-or-nothing: on error nothing changes.
    pub fn restore(&self, s: &Hv1State, mem: &dyn GuestMemory) -> Result<(), RestoreError> {
        if s.vps.len() != self.vps.len() {
            return Err(RestoreError::VpCount {
                saved: s.vps.len(),
                actual: self.config.vp_count,
            });
        }
        // Validate and build everything before touching live state.
        let mut new_vps = Vec::with_capacity(s.vps.len());
        for (i, v) in s.vps.iter().enumerate() {
            let vp = i as u32;
            for (sint, &value) in v.sint.iter().enumerate() {
                if !msr::sint_value_ok(value) {
                    return Err(RestoreError::Sint {
                        vp,
                        sint: sint as u8,
                        value,
                    });
                }
            }
            let mut state = VpState {
                vp_assist: v.vp_assist_page,
                scontrol: v.scontrol,
                siefp: v.siefp,
                simp: v.simp,
                sint: v.sint,
                queues: Default::default(),
            };
            for q in &v.queued {
                if q.sint as usize >= SINT_COUNT
                    || q.message_type == 0
                    || q.payload.len() > MESSAGE_PAYLOAD_MAX
                {
                    return Err(RestoreError::Message { vp });
                }
                let queue: &mut VecDeque<QueuedMessage> = &mut state.queues[q.sint as usize];
                if queue.len() >= MAX_QUEUED_PER_SINT {
                    return Err(RestoreError::Queue { vp });
                }
                queue.push_back(QueuedMessage::new(q.message_type, &q.payload));
            }
            new_vps.push(state);
        }

        let mut p = lock(&self.partition);
        let tsc = self.clock.guest_tsc();
        let offset = s.reference_time.wrapping_sub(self.timebase.ticks(tsc));
        let mut sequence = s.tsc_sequence;
        if s.reference_tsc & m::ENABLE != 0 {
            sequence = time::next_sequence(sequence);
            self.write_tsc_page(mem, s.reference_tsc & m::PAGE_MASK, sequence, offset)
                .map_err(RestoreError::Memory)?;
        }
        *p = Partition {
            guest_os_id: s.guest_os_id,
            hypercall: s.hypercall,
            reference_tsc: s.reference_tsc,
            tsc_sequence: sequence,
        };
        self.offset.store(offset, Ordering::Release);
        for (slot, state) in self.vps.iter().zip(new_vps) {
            *lock(slot) = state;
        }
        Ok(())
    }

    /// Writes the reference TSC page at `gpa`: invalidates it (sequence 0, so a guest reading
    /// concurrently falls back to TIME_REF_COUNT), fills scale and offset, then publishes
    /// `sequence`.
    fn write_tsc_page(
        &self,
        mem: &dyn GuestMemory,
        gpa: u64,
        sequence: u32,
        offset: u64,
    ) -> Result<(), MemError> {
        let mut body = [0u8; 20]; // reserved1 u32, scale u64, offset i64
        body[4..12].copy_from_slice(&self.timebase.scale.to_le_bytes());
        body[12..20].copy_from_slice(&offset.to_le_bytes());
        mem.write(gpa, &0u32.to_le_bytes())?;
        mem.write(gpa + 4, &body)?; // gpa is page aligned: no overflow
        mem.write(gpa, &sequence.to_le_bytes())
    }
}
