//! # worker — one Verdigris VM (Hyper-V's VM worker process, VMWP)
//!
//! Builds and runs a child partition: guest RAM (`vm-memory`), the partition and its VPs (through
//! `hypervisor`), the legacy platform (`devices`), ACPI tables and the direct Linux boot, one
//! thread per VP that dispatches intercepts, and the work-arounds this host's KVM needs:
//! instruction emulation for what KVM's emulator cannot do (`x86emu`), the SYSCALL fix-up, and a
//! guest time scale.
//!
//! It talks to: `hypervisor` (never KVM directly), `devices`, `x86emu`, the console (stdio, a
//! file or a stream) and, later, the management service over a control channel.
//!
//! It must never: let guest input panic or hang the process, touch memory outside the
//! partition's RAM, or keep device state anywhere but the devices' plain state structs.

pub mod acpi;
pub mod boot;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod enlightened;
pub mod host;
pub mod layout;
mod platform;
mod quirks;
pub mod services;
mod state;
pub mod trampoline;
mod vcpu;

pub use console::SerialTarget;
pub use host::HostFacts;

use devices::{GuestTime, IrqLine};
use hypervisor::{Hypervisor, MapFlags, MsrIntercepts, PartitionConfig};
pub(crate) use state::{Control, Events};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// What to do when the guest reboots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootAction {
    Restart,
    Exit,
}

/// A VM's configuration.
#[derive(Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory: u64,
    pub cpus: u32,
    pub serial: SerialTarget,
    pub on_reboot: RebootAction,
    /// Guest seconds per wall second; None = chosen from the host probe.
    pub time_scale: Option<f64>,
    /// Decompress bzImage payloads on the host.
    pub host_decompress: bool,
    /// Append the kernel parameters this host requires of a Linux guest (see `host.rs`).
    pub host_kernel_params: bool,
    /// Present the Hyper-V synthetic interface (an enlightened partition); off = a plain PC.
    pub enlightenments: bool,
    /// Offer the echo test VSP on VMBus (for the test guest).
    pub vmbus_echo: bool,
    /// Listen for control requests on this unix socket (see [`control`]).
    pub control: Option<PathBuf>,
    /// Which integration services an enlightened VM offers.
    pub ic: services::IcSettings,
    /// The VM's identity: seeds its stable device instance GUIDs.
    pub id: [u8; 16],
    /// Disks on SCSI controllers (storvsp over VMBus; needs enlightenments).
    pub disks: Vec<DiskSpec>,
}

/// A disk to attach: an image file (VHDX or raw) or a host block device (passthrough).
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// SCSI controller index (one VMBus storage device each).
    pub controller: u32,
    /// LUN on that controller; None = the next free one.
    pub lun: Option<u8>,
    /// Bypass the host's page cache for the disk's data (`disk::DiskOptions::unbuffered`),
    /// as Hyper-V does; where the file system cannot, the disk stays buffered.
    pub unbuffered: bool,
}

/// Opens every disk (refusing bad images before anything else starts) and assigns LUNs.
fn open_disks(cfg: &VmConfig) -> Result<Vec<enlightened::AttachedDisk>, WorkerError> {
    if !cfg.disks.is_empty() && !cfg.enlightenments {
        return Err(WorkerError::Config(
            "disks are attached through the SCSI storage VSP over VMBus: they need enlightenments"
                .into(),
        ));
    }
    let mut out: Vec<enlightened::AttachedDisk> = Vec::new();
    for d in &cfg.disks {
        if d.controller > 63 {
            return Err(WorkerError::Config(format!(
                "SCSI controller {} is out of range (0-63)",
                d.controller
            )));
        }
        let opts = disk::DiskOptions {
            read_only: d.read_only,
            unbuffered: d.unbuffered,
        };
        let backend = disk::open_disk_with(&d.path, None, opts)
            .map_err(|e| WorkerError::Config(format!("disk {}: {e}", d.path.display())))?;
        if d.unbuffered && !backend.unbuffered() {
            tracing::warn!(
                "disk {}: the host file system cannot do direct I/O; using the host's cache",
                d.path.display()
            );
        }
        let used = |l: u8| {
            out.iter()
                .any(|o| o.controller == d.controller && o.lun == l)
        };
        let lun = match d.lun {
            Some(l) if used(l) => {
                return Err(WorkerError::Config(format!(
                    "LUN {l} of SCSI controller {} is given twice",
                    d.controller
                )))
            }
            Some(l) => l,
            None => (0..64u8).find(|l| !used(*l)).ok_or_else(|| {
                WorkerError::Config(format!("SCSI controller {} is full", d.controller))
            })?,
        };
        out.push(enlightened::AttachedDisk {
            backend: Arc::from(backend),
            controller: d.controller,
            lun,
            read_only: d.read_only,
        });
    }
    Ok(out)
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    PowerOff,
    Reboot,
    TripleFault {
        vp: u32,
        rip: u64,
    },
    /// The guest did something we cannot handle (unsupported instruction, entry failure).
    GuestFailure(String),
    /// The worker itself failed (a KVM call failed).
    HostFailure(String),
    UserQuit,
    /// Turned off through the control socket (the plug pulled: no guest shutdown).
    TurnedOff,
}

impl StopReason {
    /// The worker's exit code for this reason (documented in the CLI help).
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::PowerOff | StopReason::UserQuit | StopReason::TurnedOff => 0,
            StopReason::HostFailure(_) => 1,
            StopReason::TripleFault { .. } => 3,
            StopReason::GuestFailure(_) => 4,
            StopReason::Reboot => 10,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::PowerOff => write!(f, "the guest powered off"),
            StopReason::Reboot => write!(f, "the guest rebooted"),
            StopReason::TripleFault { vp, rip } => {
                write!(
                    f,
                    "triple fault on VP {vp} at RIP {rip:#x}: the VM was stopped"
                )
            }
            StopReason::GuestFailure(m) => write!(f, "the VM was stopped: {m}"),
            StopReason::HostFailure(m) => write!(f, "the worker failed: {m}"),
            StopReason::UserQuit => write!(f, "stopped by the user"),
            StopReason::TurnedOff => write!(f, "turned off"),
        }
    }
}

/// Errors before the VM runs.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad configuration or input files (exit code 2).
    #[error("{0}")]
    Config(String),
    /// The host cannot run the VM (exit code 1).
    #[error("{0}")]
    Host(String),
}

/// Counters reported at exit.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub msr_exits: u64,
    pub unclaimed_io: u64,
    pub syscall_fixups: u64,
    pub hypercalls: u64,
    pub quirks: x86emu::QuirkCounters,
}

impl Stats {
    fn merge(&mut self, o: &Stats) {
        self.io_exits += o.io_exits;
        self.mmio_exits += o.mmio_exits;
        self.msr_exits += o.msr_exits;
        self.unclaimed_io += o.unclaimed_io;
        self.syscall_fixups += o.syscall_fixups;
        self.hypercalls += o.hypercalls;
        self.quirks.merge(&o.quirks);
    }

    /// The counters as JSON (control socket, management service).
    pub fn to_json(&self) -> serde_json::Value {
        let quirks: serde_json::Map<String, serde_json::Value> = x86emu::Kind::ALL
            .iter()
            .filter(|k| self.quirks.get(**k) > 0)
            .map(|k| (k.name().to_string(), self.quirks.get(*k).into()))
            .collect();
        serde_json::json!({
            "quirks": quirks,
            "quirk_exceptions": self.quirks.exceptions(),
            "syscall_fixups": self.syscall_fixups,
            "hypercalls": self.hypercalls,
            "io_exits": self.io_exits,
            "mmio_exits": self.mmio_exits,
            "msr_exits": self.msr_exits,
        })
    }

    /// One line: "quirks handled: clac=12 stac=12 ...; syscall fix-ups: 500".
    pub fn report(&self) -> String {
        format!(
            "quirks handled: {}; syscall fix-ups: {}; hypercalls: {}; exits: io={} mmio={} msr={}",
            self.quirks.report(),
            self.syscall_fixups,
            self.hypercalls,
            self.io_exits,
            self.mmio_exits,
            self.msr_exits
        )
    }
}

/// The outcome of [`run`].
#[derive(Debug)]
pub struct RunSummary {
    pub reason: StopReason,
    pub stats: Stats,
    pub boots: u32,
    pub notes: Vec<String>,
}

/// Sizes like `512M`, `2G`, `65536K`, `1048576` (bytes), shared with the service's CLI.
pub use cliutil::parse_size;

/// Validates the configuration and reads the input files.
fn load_inputs(cfg: &VmConfig, max_vps: usize) -> Result<(Vec<u8>, Option<Vec<u8>>), WorkerError> {
    let c = |m: String| WorkerError::Config(m);
    if cfg.cpus == 0 {
        return Err(c("--cpus must be at least 1".into()));
    }
    let max = max_vps.min(255) as u32;
    if cfg.cpus > max {
        return Err(c(format!(
            "--cpus {} is more than this host supports ({max})",
            cfg.cpus
        )));
    }
    if cfg.memory < layout::MIN_MEMORY {
        return Err(c(format!(
            "--memory {} MiB is too small (at least {} MiB)",
            cfg.memory >> 20,
            layout::MIN_MEMORY >> 20
        )));
    }
    if !cfg.memory.is_multiple_of(4096) {
        return Err(c(format!(
            "--memory {} is not a multiple of 4 KiB",
            cfg.memory
        )));
    }
    if cfg.memory > (1 << 40) {
        return Err(c("--memory is larger than 1 TiB".into()));
    }
    if let Some(s) = cfg.time_scale {
        if !(s.is_finite() && s > 0.0 && s <= 1.0) {
            return Err(c(format!("--time-scale {s} must be in (0, 1]")));
        }
    }
    let kernel = std::fs::read(&cfg.kernel)
        .map_err(|e| c(format!("cannot read kernel {}: {e}", cfg.kernel.display())))?;
    if boot::kernel_kind(&kernel).is_none() {
        return Err(c(format!(
            "kernel {} is neither a bzImage nor an ELF executable",
            cfg.kernel.display()
        )));
    }
    let initrd = match &cfg.initrd {
        Some(p) => Some(
            std::fs::read(p).map_err(|e| c(format!("cannot read initrd {}: {e}", p.display())))?,
        ),
        None => None,
    };
    Ok((kernel, initrd))
}

/// Runs a VM until it powers off (or fails). Reboots restart it if so configured.
pub fn run(mut cfg: VmConfig) -> Result<RunSummary, WorkerError> {
    let hv = Hypervisor::open().map_err(|e| WorkerError::Host(e.to_string()))?;
    let (kernel, initrd) = load_inputs(&cfg, hv.capabilities().max_vps)?;
    let disks = open_disks(&cfg)?;
    let facts = host::probe(&hv).map_err(WorkerError::Host)?;
    let scale = cfg.time_scale.unwrap_or_else(|| facts.default_time_scale());
    let mut notes = vec![format!(
        "host: guest ring 0 ≈ {:.0} ns/instruction, SYSCALL from ring 3 {}, TSC {} kHz; guest time scale {scale}",
        facts.ring0_ns_per_insn,
        if facts.syscall_broken { "broken (fix-up installed)" } else { "works" },
        facts.tsc_khz
    )];
    let mut cmdline = cfg.cmdline.trim().to_string();
    if cfg.host_kernel_params && boot::kernel_kind(&kernel) == Some(true) {
        let (line, added) =
            host::add_kernel_params(&cmdline, &host::linux_requirements(&facts, scale));
        cmdline = line;
        notes.extend(added);
    }
    for n in &notes {
        eprintln!("verdigris: {n}");
    }
    let console = console::Console::open(std::mem::replace(&mut cfg.serial, SerialTarget::None))?;
    let hub = control::ControlHub::new(cfg.cpus, cfg.memory);
    let _socket = match &cfg.control {
        Some(p) => Some(
            control::ControlSocket::bind(p.clone(), hub.clone()).map_err(|e| {
                WorkerError::Config(format!("cannot listen on {}: {e}", p.display()))
            })?,
        ),
        None => None,
    };
    let mut stats = Stats::default();
    let mut boots = 0;
    // CMOS RAM survives a reset, as on hardware (the rest of the machine starts afresh).
    let mut cmos: Option<devices::cmos::CmosState> = None;
    let reason = loop {
        boots += 1;
        let reason = run_once(
            &hv,
            &cfg,
            &facts,
            scale,
            &kernel,
            initrd.as_deref(),
            &cmdline,
            &console,
            &mut stats,
            &mut cmos,
            &hub,
            &disks,
        )?;
        if reason == StopReason::Reboot && cfg.on_reboot == RebootAction::Restart && boots < 1000 {
            continue;
        }
        break reason;
    };
    console.shutdown();
    Ok(RunSummary {
        reason,
        stats,
        boots,
        notes,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_once(
    hv: &Hypervisor,
    cfg: &VmConfig,
    facts: &HostFacts,
    scale: f64,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    console: &console::Console,
    stats: &mut Stats,
    cmos_state: &mut Option<devices::cmos::CmosState>,
    hub: &Arc<control::ControlHub>,
    disks: &[enlightened::AttachedDisk],
) -> Result<StopReason, WorkerError> {
    let herr =
        |what: &'static str| move |e: hypervisor::Error| WorkerError::Host(format!("{what}: {e}"));
    let part = Arc::new(
        hv.create_partition(&PartitionConfig::default())
            .map_err(herr("creating the partition"))?,
    );
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(cfg.memory)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| {
        WorkerError::Host(format!(
            "allocating {} MiB of guest memory: {e}",
            cfg.memory >> 20
        ))
    })?);
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| WorkerError::Host(format!("guest memory: {e}")))?;
        // SAFETY: the region belongs to `mem`, which outlives the partition: the partition is
        // dropped at the end of this function before `mem` (both are local; VP threads holding
        // clones are joined first).
        unsafe {
            part.map_gpa(
                region.start_addr().0,
                host,
                region.len(),
                MapFlags::default(),
            )
        }
        .map_err(herr("mapping guest memory"))?;
    }

    // Boot image.
    let loaded = boot::load_kernel(&mem, kernel, cfg.host_decompress)
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    tracing::info!("kernel: {} (entry {:#x})", loaded.description, loaded.entry);
    let initrd_at = match initrd {
        Some(data) => {
            let max = loaded.setup_header.map(|h| h.initrd_addr_max).unwrap_or(0);
            Some(
                boot::load_initrd(&mem, cfg.memory, data, loaded.end, max)
                    .map_err(|e| WorkerError::Config(e.to_string()))?,
            )
        }
        None => None,
    };
    let extra_aml = if cfg.enlightenments {
        vec![enlightened::vmbus_acpi_device()]
    } else {
        vec![]
    };
    let (tables, rsdp) = acpi::build(cfg.cpus, &extra_aml).map_err(WorkerError::Config)?;
    for (gpa, blob) in &tables {
        vm_memory::Bytes::write_slice(&*mem, blob, GuestAddress(*gpa))
            .map_err(|e| WorkerError::Host(format!("writing ACPI tables: {e}")))?;
    }
    boot::write_boot_params(&mem, cfg.memory, &loaded, cmdline, initrd_at, rsdp)
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    boot::write_page_tables(&mem).map_err(|e| WorkerError::Host(e.to_string()))?;

    // Platform.
    let control = Arc::new(Control::new(cfg.cpus));
    let time = Arc::new(GuestTime::new(scale));
    let platform = platform::Platform::build(
        &part,
        &time,
        Arc::new(Events(control.clone())),
        Box::new(console::SharedOut(console.out.clone())),
        cfg.memory,
        cmos_state.take(),
    )?;
    let irq = |gsi| -> Arc<dyn IrqLine> { platform::irq_line(&part, gsi) };

    let syscall_fixup = if facts.syscall_broken {
        Some(Arc::new(
            trampoline::Trampoline::new(&mem).map_err(WorkerError::Host)?,
        ))
    } else {
        None
    };
    let mut msr_ranges = Vec::new();
    if facts.syscall_broken {
        msr_ranges.push(hypervisor::MsrRange {
            base: trampoline::MSR_LSTAR,
            count: 1,
            read: false,
            write: true,
        });
    }
    // The enlightened partition: hv1 behind the synthetic MSRs, the hypercall port and CPUID.
    let tsc_clock = Arc::new(enlightened::GuestTsc::default());
    let (enl, vmbus, services) = if cfg.enlightenments {
        msr_ranges.push(hypervisor::MsrRange {
            base: enlightened::SYNTHETIC_MSRS.0,
            count: enlightened::SYNTHETIC_MSRS.1,
            read: true,
            write: true,
        });
        let (e, v, s) =
            enlightened::build(cfg, facts, scale, &part, &mem, tsc_clock.clone(), disks)?;
        (Some(e), Some(v), s)
    } else {
        (None, None, services::Services::default())
    };
    if !msr_ranges.is_empty() {
        part.set_msr_intercepts(&MsrIntercepts { ranges: msr_ranges })
            .map_err(herr("installing MSR intercepts"))?;
    }
    let hv_leaves: Vec<(u32, [u32; 4])> = match &enl {
        Some(e) => (0x4000_0000..=0x4000_000a)
            .filter_map(|l| e.hv.cpuid(l, 0).map(|r| (l, r)))
            .collect(),
        None => Vec::new(),
    };

    // VPs.
    let supported = hv
        .supported_cpuid()
        .map_err(herr("reading supported CPUID"))?;
    let mut vps = Vec::new();
    for i in 0..cfg.cpus {
        let vp = part.create_vp(i).map_err(herr("creating a VP"))?;
        vp.set_cpuid(&cpuid::policy_with(&supported, i, &hv_leaves))
            .map_err(herr("setting CPUID"))?;
        // Fast strings on; everything else as KVM resets it.
        vp.set_msrs(&[(0x1a0, 1)]).map_err(herr("setting MSRs"))?;
        if i == 0 {
            // The guest TSC's offset from ours, for the reference time (hv1's clock).
            let guest = vp.get_msrs(&[0x10]).map_err(herr("reading the TSC"))?[0];
            let host = enlightened::host_tsc();
            tsc_clock
                .offset
                .store(guest.wrapping_sub(host) as i64, Ordering::Relaxed);
            let mut sregs = vp.sregs().map_err(herr("reading registers"))?;
            let mut regs = vp.regs().map_err(herr("reading registers"))?;
            boot::entry_registers(&mut sregs, &mut regs, loaded.entry);
            vp.set_sregs(&sregs).map_err(herr("setting registers"))?;
            vp.set_regs(&regs).map_err(herr("setting registers"))?;
        }
        control
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(vp.cancel_handle());
        vps.push(vp);
    }

    // Threads.
    let stop_ticker = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (pit, time, irq0, stop) = (
            platform.pit.clone(),
            time.clone(),
            irq(devices::pit::IRQ),
            stop_ticker.clone(),
        );
        std::thread::Builder::new()
            .name("pit".into())
            .spawn(move || devices::pit::Ticker::run(pit, time, irq0, stop))
            .map_err(|e| WorkerError::Host(format!("starting the PIT thread: {e}")))?
    };
    if let Some(hub) = &console.hub {
        hub.set_uart(platform.uart.clone());
    }
    if let Some(input) = console
        .input
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        let c = control.clone();
        console::pump_input(
            input,
            platform.uart.clone(),
            console.input_stop.clone(),
            console.escape,
            move || c.stop(StopReason::UserQuit),
        );
    }
    hub.boot_started(Arc::new(control::BootHandles {
        control: control.clone(),
        pm: platform.pm.clone(),
        services: services.clone(),
    }));
    let mut handles = Vec::new();
    for vp in vps {
        let ctx = vcpu::VpContext {
            bus: platform.bus.clone(),
            mem: mem.clone(),
            syscall_fixup: syscall_fixup.clone(),
            enlightened: enl.clone(),
        };
        let control = control.clone();
        let index = vp.index();
        let h = std::thread::Builder::new()
            .name(format!("vp{index}"))
            .spawn(move || {
                let (reason, stats) = vcpu::run_vp(vp, ctx, &*control);
                if let Some(r) = reason {
                    control.stop(r);
                }
                stats
            })
            .map_err(|e| WorkerError::Host(format!("starting VP thread: {e}")))?;
        handles.push(h);
    }

    // Wait.
    let reason = {
        // Diagnostics: VERDIGRIS_SAMPLE_SECS=N or VERDIGRIS_SAMPLE_MS=N makes every VP print its
        // registers that often (a poor man's profiler for guest boots; see docs/PERFORMANCE.md).
        let env_u64 = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|s| *s > 0)
        };
        let sample_every = env_u64("VERDIGRIS_SAMPLE_MS")
            .map(std::time::Duration::from_millis)
            .or_else(|| env_u64("VERDIGRIS_SAMPLE_SECS").map(std::time::Duration::from_secs));
        let mut g = control.reason.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            match sample_every {
                Some(d) => {
                    let (ng, t) = control
                        .cond
                        .wait_timeout(g, d)
                        .unwrap_or_else(|e| e.into_inner());
                    g = ng;
                    if t.timed_out() && g.is_none() {
                        control.sample.fetch_add(1, Ordering::Relaxed);
                        for c in control
                            .cancels
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .iter()
                        {
                            c.cancel();
                        }
                    }
                }
                None => g = control.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        }
        g.clone().unwrap_or(StopReason::PowerOff)
    };
    for h in handles {
        match h.join() {
            Ok(s) => stats.merge(&s),
            Err(_) => tracing::error!("a VP thread panicked"),
        }
    }
    stop_ticker.store(true, Ordering::Relaxed);
    devices::pit::Ticker::wake(&platform.pit);
    let _ = ticker.join();
    let _ = console
        .out
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .flush();
    hub.boot_ended(stats);
    *cmos_state = Some(platform.cmos_state());
    if let Some(v) = vmbus {
        v.shutdown();
    }
    drop(platform);
    drop(part);
    Ok(reason)
}
