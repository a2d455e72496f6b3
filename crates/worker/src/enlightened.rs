//! The enlightened partition: the worker's side of `hv1` (the Hyper-V synthetic interface).
//!
//! Implements hv1's three traits over this VM (guest RAM, SynIC interrupts as MSIs to a VP's
//! LAPIC, the guest TSC), and routes the VP intercepts hv1 owns: synthetic MSRs (a KVM MSR
//! filter sends 0x40000000..=0x400000ff to user space), the hypercall port, and the CPUID
//! leaves 0x40000000+. Also the ACPI device `\_SB.VMBS` (`_HID "VMBus"`) through which Linux
//! finds VMBus.

use hv1::{GuestMemory, Hv1, HvStatus, HypercallHandler, MemError};
use hypervisor::Partition;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    pub hv: Arc<Hv1>,
    pub ram: Ram,
    pub irq: Irq,
    pub handler: Arc<dyn HypercallHandler + Send + Sync>,
}

/// Guest RAM for the VMBus server (rings and GPADL buffers): bounds-checked; ring indices
/// are accessed atomically because the guest updates them concurrently.
pub struct VmbusRam(pub Arc<GuestMemoryMmap>);

impl VmbusRam {
    fn atomic_u32(&self, gpa: u64) -> Result<&AtomicU32, vmbus_server::GuestRamError> {
        let err = vmbus_server::GuestRamError { gpa, len: 4 };
        if !gpa.is_multiple_of(4) || !vmbus_server::GuestRam::is_ram(self, gpa, 4) {
            return Err(err);
        }
        let host = self
            .0
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| err)?;
        // SAFETY: 4-byte aligned, inside guest RAM (checked above) that stays mapped for the
        // VM's life; the guest accesses ring indices with plain or locked 32-bit accesses.
        Ok(unsafe { AtomicU32::from_ptr(host.cast::<u32>()) })
    }
}

impl vmbus_server::GuestRam for VmbusRam {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        len == 0
            || gpa
                .checked_add(len - 1)
                .is_some_and(|_| self.0.check_range(GuestAddress(gpa), len as usize))
    }
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), vmbus_server::GuestRamError> {
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| vmbus_server::GuestRamError {
                gpa,
                len: buf.len() as u64,
            })
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), vmbus_server::GuestRamError> {
        self.0
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| vmbus_server::GuestRamError {
                gpa,
                len: data.len() as u64,
            })
    }
    fn load_u32(&self, gpa: u64) -> Result<u32, vmbus_server::GuestRamError> {
        Ok(self.atomic_u32(gpa)?.load(Ordering::Acquire))
    }
    fn store_u32(&self, gpa: u64, value: u32) -> Result<(), vmbus_server::GuestRamError> {
        self.atomic_u32(gpa)?.store(value, Ordering::Release);
        Ok(())
    }
}

/// The server's way to the guest: SynIC messages and event flags through hv1.
pub struct Synic {
    pub hv: Arc<Hv1>,
    pub ram: Ram,
    pub irq: Irq,
}

impl vmbus_server::GuestSynic for Synic {
    fn post_message(&self, vp: u32, sint: u8, message_type: u32, payload: &[u8]) -> Result<(), ()> {
        self.hv
            .post_message(vp, sint, message_type, payload, &self.ram, &self.irq)
            .map(|_| ())
            .map_err(|_| ())
    }
    fn signal_event(&self, vp: u32, sint: u8, flag: u32) {
        let _ = self.hv.signal_event(vp, sint, flag, &self.ram, &self.irq);
    }
}

/// The guest's hypercalls reach the VMBus server.
pub struct ToServer(pub Arc<vmbus_server::VmbusServer>);

impl HypercallHandler for ToServer {
    fn post_message(
        &self,
        vp: u32,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> HvStatus {
        HvStatus(
            self.0
                .post_message(vp, connection_id, message_type, payload),
        )
    }
    fn signal_event(&self, vp: u32, connection_id: u32, flag_number: u16) -> HvStatus {
        HvStatus(self.0.signal_event(vp, connection_id, flag_number))
    }
}

/// A VSP that echoes every in-band packet back (and completes it when asked): the test
/// guest's VMBus test talks to it (`--vmbus-echo`).
pub struct EchoVsp {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoVsp {
    pub const CLASS: vmbus_protocol::Guid =
        vmbus_protocol::Guid::from_str_const("8a1c5e2e-7c19-4a7e-9a4b-5645c0ffee01");
    pub const INSTANCE: vmbus_protocol::Guid =
        vmbus_protocol::Guid::from_str_const("8a1c5e2e-7c19-4a7e-9a4b-5645c0ffee02");

    pub fn new() -> Self {
        Self { thread: None }
    }
}

impl Default for EchoVsp {
    fn default() -> Self {
        Self::new()
    }
}

impl vmbus_server::Vsp for EchoVsp {
    fn class_id(&self) -> vmbus_protocol::Guid {
        Self::CLASS
    }
    fn instance_id(&self) -> vmbus_protocol::Guid {
        Self::INSTANCE
    }
    fn open(&mut self, ch: vmbus_server::Channel) -> Result<(), ()> {
        let t = std::thread::Builder::new()
            .name("vsp-echo".into())
            .spawn(move || {
                while let Ok(p) = ch.recv() {
                    let r = if p.completion_requested() {
                        ch.send_completion(p.transaction_id, &p.payload)
                    } else {
                        ch.send_inband(p.transaction_id, &p.payload, false)
                    };
                    if r.is_err() {
                        break;
                    }
                }
            })
            .map_err(|_| ())?;
        self.thread = Some(t);
        Ok(())
    }
    fn close(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

/// Zero-copy guest RAM for the storage data path.
pub struct DirectRam(pub Arc<GuestMemoryMmap>);

// SAFETY: `host_ptr` returns a pointer only when the whole range is guest RAM in one
// contiguous host mapping (checked with `check_range` and by taking the region's own pointer);
// the mapping lives as long as the `GuestMemoryMmap` this object holds an `Arc` of, and it is
// the same memory `VmbusRam` reads and writes.
unsafe impl storvsp::GuestMemoryMap for DirectRam {
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<std::ptr::NonNull<u8>> {
        use vm_memory::GuestMemoryRegion;
        if len == 0 || !self.0.check_range(GuestAddress(gpa), len) {
            return None;
        }
        let region = self.0.find_region(GuestAddress(gpa))?;
        let off = gpa - region.start_addr().0;
        if off.checked_add(len as u64)? > region.len() {
            return None; // spans two regions: not contiguous on the host
        }
        let p = region
            .get_host_address(vm_memory::MemoryRegionAddress(off))
            .ok()?;
        std::ptr::NonNull::new(p)
    }
}

/// A disk attached to a VM's SCSI controllers.
#[derive(Clone)]
pub struct AttachedDisk {
    pub backend: Arc<dyn disk::BlockBackend>,
    pub controller: u32,
    pub lun: u8,
    pub read_only: bool,
}

/// Builds the enlightened side of a partition: hv1, the VMBus server with the configured
/// devices (integration services, the echo test device), and the handles the control socket
/// uses.
pub(crate) fn build(
    cfg: &crate::VmConfig,
    facts: &crate::HostFacts,
    scale: f64,
    part: &Arc<Partition>,
    mem: &Arc<GuestMemoryMmap>,
    tsc_clock: Arc<GuestTsc>,
    disks: &[AttachedDisk],
) -> Result<
    (
        Arc<Enlightened>,
        Arc<vmbus_server::VmbusServer>,
        crate::services::Services,
    ),
    crate::WorkerError,
> {
    use crate::WorkerError;
    let hv = Arc::new(
        Hv1::new(
            hv1::Config {
                vp_count: cfg.cpus,
                tsc_hz: u64::from(facts.tsc_khz) * 1000,
                time_scale: scale,
            },
            tsc_clock,
        )
        .map_err(|e| WorkerError::Host(format!("synthetic interface: {e}")))?,
    );
    let synic = Arc::new(Synic {
        hv: hv.clone(),
        ram: Ram(mem.clone()),
        irq: Irq(part.clone()),
    });
    let server = Arc::new(
        vmbus_server::VmbusServer::new(
            vmbus_server::ServerConfig {
                vp_count: cfg.cpus,
                ..Default::default()
            },
            synic,
            Arc::new(VmbusRam(mem.clone())),
        )
        .map_err(|e| WorkerError::Host(format!("starting VMBus: {e}")))?,
    );
    let ic_cfg = ic::IcConfig {
        heartbeat: cfg.ic.heartbeat.then(ic::HeartbeatConfig::default),
        shutdown: cfg.ic.shutdown.then(ic::shutdown::ShutdownConfig::default),
        timesync: cfg.ic.timesync.then(|| {
            let hv = hv.clone();
            ic::timesync::TimesyncConfig::new(move || hv.reference_time())
        }),
        kvp: cfg.ic.kvp.then(ic::KvpConfig::default),
    };
    let (vsps, handles) = ic::create(&cfg.id, ic_cfg);
    for v in vsps {
        server
            .add_device(Box::new(v))
            .map_err(|e| WorkerError::Host(format!("adding an integration service: {e}")))?;
    }
    let mut controllers: Vec<u32> = disks.iter().map(|d| d.controller).collect();
    controllers.sort_unstable();
    controllers.dedup();
    for c in controllers {
        let mut config =
            storvsp::ControllerConfig::new(storvsp::controller::instance_id(&cfg.id, c));
        config.guest_memory = Some(Arc::new(DirectRam(mem.clone())));
        // Multi-queue: one sub-channel per VP beyond the first (Linux opens min(its CPUs - 1,
        // this)), at most 8; a 1-VP VM reports no multi-channel support.
        config.max_sub_channels = cfg.cpus.saturating_sub(1).min(8) as u16;
        let (vsp, handle) = storvsp::controller::StorageController::new(config);
        for d in disks.iter().filter(|d| d.controller == c) {
            handle
                .add_lun(
                    d.lun,
                    d.backend.clone(),
                    storvsp::controller::LunOptions {
                        read_only: d.read_only,
                        unmap: !d.read_only,
                    },
                )
                .map_err(|e| {
                    WorkerError::Config(format!("SCSI controller {c}, LUN {}: {e}", d.lun))
                })?;
        }
        server
            .add_device(Box::new(vsp))
            .map_err(|e| WorkerError::Host(format!("adding SCSI controller {c}: {e}")))?;
    }
    if cfg.vmbus_echo {
        server
            .add_device(Box::new(EchoVsp::new()))
            .map_err(|e| WorkerError::Host(format!("adding the echo device: {e}")))?;
    }
    let enl = Arc::new(Enlightened {
        hv,
        ram: Ram(mem.clone()),
        irq: Irq(part.clone()),
        handler: Arc::new(ToServer(server.clone())),
    });
    Ok((enl, server, crate::services::Services { ic: handles }))
}
