//! The enlightened partition: the worker's side of `hv1` (the Hyper-V synthetic interface).
//!
//! Implements hv1's three traits over this VM (guest RAM, SynIC interrupts as MSIs to a VP's
//! LAPIC, the guest TSC), and routes the VP intercepts hv1 owns: synthetic MSRs (a KVM MSR
//! filter sends 0x40000000..=0x400000ff to user space), the hypercall port, and the CPUID
//! leaves 0x40000000+. Also the ACPI device `\_SB.VMBS` (`_HID "VMBus"`) through which Linux
//! finds VMBus.

use hv1::{GuestMemory, Hv1, HvStatus, HypercallHandler, MemError};
use hypervisor::Partition;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Synthetic MSRs the filter must send to user space.
pub const SYNTHETIC_MSRS: (u32, u32) = (0x4000_0000, 0x100);

/// Guest RAM for hv1 (and the VMBus server): bounds-checked, never outside the partition.
pub struct Ram(pub Arc<GuestMemoryMmap>);

impl GuestMemory for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError {
                gpa,
                len: buf.len() as u64,
            })
    }
    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        self.0
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError {
                gpa,
                len: buf.len() as u64,
            })
    }
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        let err = MemError { gpa, len: 8 };
        if !gpa.is_multiple_of(8) {
            return Err(err);
        }
        // An aligned u64 never straddles a region, so checking its last byte is enough.
        let host = self
            .0
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| err)?;
        self.0
            .get_host_address(GuestAddress(gpa + 7))
            .map_err(|_| MemError { gpa, len: 8 })?;
        // SAFETY: `host` is 8-byte aligned (guest RAM regions are page aligned), points into
        // guest RAM that stays mapped for the VM's life, and is only ever accessed atomically
        // or by the guest (which uses locked instructions on event flags).
        let word = unsafe { AtomicU64::from_ptr(host.cast::<u64>()) };
        Ok(word.fetch_or(bits, Ordering::SeqCst))
    }
}

/// SynIC interrupts: a fixed, edge-triggered vector to a VP's LAPIC (APIC id = VP index).
pub struct Irq(pub Arc<Partition>);

impl hv1::InterruptSink for Irq {
    fn interrupt(&self, vp: u32, vector: u8) {
        if let Err(e) = self.0.interrupt_vp(vp, vector) {
            tracing::warn!("SynIC interrupt to VP {vp}: {e}");
        }
    }
}

/// The guest TSC: the host TSC plus the offset KVM applies (measured once at start).
#[derive(Default)]
pub struct GuestTsc {
    pub offset: std::sync::atomic::AtomicI64,
}

pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC is unprivileged on every x86-64 host this runs on.
    unsafe { core::arch::x86_64::_rdtsc() }
}

impl hv1::Clock for GuestTsc {
    fn guest_tsc(&self) -> u64 {
        host_tsc().wrapping_add(self.offset.load(Ordering::Relaxed) as u64)
    }
}

/// Until a VMBus server is attached: every message and event is refused the way Hyper-V
/// refuses an unknown connection, so a guest's VMBus driver gives up cleanly.
pub struct NoVmbus;

impl HypercallHandler for NoVmbus {
    fn post_message(&self, _vp: u32, _c: u32, _t: u32, _p: &[u8]) -> HvStatus {
        HvStatus::INVALID_CONNECTION_ID
    }
    fn signal_event(&self, _vp: u32, _c: u32, _f: u16) -> HvStatus {
        HvStatus::INVALID_CONNECTION_ID
    }
}

/// Everything the VP threads need for the synthetic interface.
pub struct Enlightened {
    pub hv: Hv1,
    pub ram: Ram,
    pub irq: Irq,
    pub handler: Arc<dyn HypercallHandler + Send + Sync>,
}

/// AML for `\_SB.VMBS`, the ACPI device Linux's `hv_vmbus` binds to.
pub fn vmbus_acpi_device() -> Vec<u8> {
    use acpi_tables::{aml, Aml};
    let irq = aml::Interrupt::new(true, true, false, false, 7);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let hid = aml::Name::new("_HID".into(), &"VMBus");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ddn = aml::Name::new("_DDN".into(), &"VMBUS");
    let n_crs = aml::Name::new("_CRS".into(), &crs);
    let mut v = Vec::new();
    aml::Device::new("VMBS".into(), vec![&hid, &uid, &ddn, &n_crs]).to_aml_bytes(&mut v);
    v
}
