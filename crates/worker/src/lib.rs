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
mod quirks;
pub mod services;
pub mod trampoline;
mod vcpu;

pub use console::SerialTarget;
pub use host::HostFacts;

use devices::{GuestTime, IrqLine, PlatformEvents, PowerEvent};
use hypervisor::{CancelHandle, Hypervisor, MapFlags, MsrIntercepts, Partition, PartitionConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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

/// Parses sizes like `512M`, `2G`, `65536K`, `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => {
                    return Err(format!(
                        "invalid size '{s}': unknown unit '{c}' (use K, M, G)"
                    ))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}' (expected e.g. 512M or 2G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// One boot of the VM, as seen by its threads and by the control socket.
pub(crate) struct Control {
    /// Bumped to ask every VP to report its registers (diagnostics: VERDIGRIS_SAMPLE_SECS).
    sample: std::sync::atomic::AtomicU64,
    reason: Mutex<Option<StopReason>>,
    cond: Condvar,
    cancels: Mutex<Vec<CancelHandle>>,
    paused: Mutex<bool>,
    resumed: Condvar,
    /// Each VP's counters, published by its thread.
    live: Mutex<Vec<Stats>>,
}

impl vcpu::VmState for Control {
    fn stopped(&self) -> bool {
        Control::stopped(self)
    }
    fn sample(&self) -> u64 {
        self.sample.load(Ordering::Relaxed)
    }
    fn wait_while_paused(&self) {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *p && !self.stopped() {
            p = self.resumed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn publish(&self, vp: u32, stats: &Stats) {
        let mut l = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = l.get_mut(vp as usize) {
            *slot = stats.clone();
        }
    }
}

impl Control {
    fn new(vps: u32) -> Self {
        Control {
            sample: std::sync::atomic::AtomicU64::new(0),
            reason: Mutex::new(None),
            cond: Condvar::new(),
            cancels: Mutex::new(Vec::new()),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            live: Mutex::new(vec![Stats::default(); vps as usize]),
        }
    }

    /// Stops every VP in KVM until [`Control::resume`] (guest time keeps running).
    pub(crate) fn pause(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
        for c in self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.cancel();
        }
    }

    pub(crate) fn resume(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.resumed.notify_all();
    }

    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sum of every VP's counters right now.
    pub(crate) fn live_stats(&self) -> Stats {
        let mut t = Stats::default();
        for s in self.live.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.merge(s);
        }
        t
    }

    pub(crate) fn stop(&self, r: StopReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        drop(g);
        for c in self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.cancel();
        }
        self.cond.notify_all();
        self.resumed.notify_all();
    }

    fn stopped(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

struct Events(Arc<Control>);

impl PlatformEvents for Events {
    fn request(&self, e: PowerEvent) {
        self.0.stop(match e {
            PowerEvent::PowerOff => StopReason::PowerOff,
            PowerEvent::Reset => StopReason::Reboot,
        });
    }
}

struct KvmIrq {
    part: Arc<Partition>,
    gsi: u32,
}

impl IrqLine for KvmIrq {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.part.set_irq_line(self.gsi, high) {
            tracing::warn!("IRQ {} line: {e}", self.gsi);
        }
    }
}

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
        for (param, why) in host::linux_requirements(&facts, scale) {
            let key = param.split('=').next().unwrap_or(&param).to_string();
            if cmdline
                .split_whitespace()
                .any(|w| w.split('=').next() == Some(&key))
            {
                continue; // the user chose their own value
            }
            notes.push(format!("adding kernel parameter {param}: {why}"));
            cmdline.push(' ');
            cmdline.push_str(&param);
        }
    }
    for n in &notes {
        eprintln!("verdigris: {n}");
    }
    let console = Console::open(std::mem::replace(&mut cfg.serial, SerialTarget::None))?;
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

/// The console's host side, kept across reboots.
struct Console {
    out: Arc<Mutex<Box<dyn std::io::Write + Send>>>,
    hub: Option<Arc<console::SocketHub>>,
    input: Mutex<Option<Box<dyn std::io::Read + Send>>>,
    escape: bool,
    _raw: Option<console::RawMode>,
    input_stop: Arc<AtomicBool>,
}

struct SharedOut(Arc<Mutex<Box<dyn std::io::Write + Send>>>);

impl std::io::Write for SharedOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

impl Console {
    fn open(target: SerialTarget) -> Result<Self, WorkerError> {
        let input_stop = Arc::new(AtomicBool::new(false));
        let mut hub = None;
        let (out, input, escape, raw): (
            Box<dyn std::io::Write + Send>,
            Option<Box<dyn std::io::Read + Send>>,
            bool,
            _,
        ) = match target {
            SerialTarget::Stdio => {
                let raw = console::RawMode::enable();
                let esc = raw.is_some();
                (
                    Box::new(console::StdoutSink),
                    Some(Box::new(std::io::stdin())),
                    esc,
                    raw,
                )
            }
            SerialTarget::File(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| {
                        WorkerError::Config(format!(
                            "cannot open serial output {}: {e}",
                            p.display()
                        ))
                    })?;
                (Box::new(f), None, false, None)
            }
            SerialTarget::Socket(p) => {
                let h = console::SocketHub::bind(p.clone(), input_stop.clone()).map_err(|e| {
                    WorkerError::Config(format!("cannot listen on {}: {e}", p.display()))
                })?;
                hub = Some(h.clone());
                (Box::new(console::HubWriter(h)), None, false, None)
            }
            SerialTarget::Stream { out, input } => (out, input, false, None),
            SerialTarget::None => (Box::new(std::io::sink()), None, false, None),
        };
        Ok(Console {
            out: Arc::new(Mutex::new(out)),
            hub,
            input: Mutex::new(input),
            escape,
            _raw: raw,
            input_stop,
        })
    }

    fn shutdown(&self) {
        self.input_stop.store(true, Ordering::Relaxed);
        let _ = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
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
    console: &Console,
    stats: &mut Stats,
    cmos_state: &mut Option<devices::cmos::CmosState>,
    hub: &Arc<control::ControlHub>,
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
    let events: Arc<dyn PlatformEvents> = Arc::new(Events(control.clone()));
    let time = Arc::new(GuestTime::new(scale));
    let irq = |gsi| -> Arc<dyn IrqLine> {
        Arc::new(KvmIrq {
            part: part.clone(),
            gsi,
        })
    };
    let mut bus = devices::IoBus::new();
    let uart = Arc::new(Mutex::new(devices::serial::Uart::new(
        irq(devices::serial::COM1_IRQ),
        Box::new(SharedOut(console.out.clone())),
    )));
    let pit = devices::pit::PitShared::new(devices::pit::Pit::new(time.clone()));
    let low = cfg.memory.min(layout::LOW_RAM_MAX);
    let ins = |bus: &mut devices::IoBus, base, len, d: Arc<Mutex<dyn devices::PortDevice>>| {
        bus.insert(base, len, d)
            .map_err(|e| WorkerError::Host(e.to_string()))
    };
    let pm = Arc::new(Mutex::new(devices::acpi_pm::AcpiPm::new(
        time.clone(),
        irq(devices::acpi_pm::SCI_IRQ),
        events.clone(),
    )));
    // 0x60 and 0x64 are one device: the same controller at both ports.
    let kbc = Arc::new(Mutex::new(devices::i8042::I8042::new(
        irq(devices::i8042::KBD_IRQ),
        events.clone(),
    )));
    ins(&mut bus, devices::serial::COM1_BASE, 8, uart.clone())?;
    ins(
        &mut bus,
        devices::i8042::DATA_PORT,
        1,
        Arc::new(Mutex::new(I8042Port(kbc.clone(), 0))),
    )?;
    ins(
        &mut bus,
        devices::i8042::CMD_PORT,
        1,
        Arc::new(Mutex::new(I8042Port(kbc, 4))),
    )?;
    let cmos = {
        let mut c = devices::cmos::Cmos::new(time.clone(), low, cfg.memory - low);
        if let Some(st) = cmos_state.take() {
            c.state = st;
        }
        Arc::new(Mutex::new(c))
    };
    ins(&mut bus, devices::cmos::BASE, 2, cmos.clone())?;
    ins(
        &mut bus,
        devices::pit::BASE,
        4,
        Arc::new(Mutex::new(devices::pit::PitPorts(pit.clone()))),
    )?;
    ins(
        &mut bus,
        devices::pit::PORT_B,
        1,
        Arc::new(Mutex::new(devices::pit::PortB(pit.clone()))),
    )?;
    ins(
        &mut bus,
        devices::acpi_pm::BASE,
        devices::acpi_pm::LEN,
        pm.clone(),
    )?;
    ins(
        &mut bus,
        devices::acpi_pm::RESET_PORT,
        1,
        Arc::new(Mutex::new(devices::acpi_pm::ResetPort::new(events.clone()))),
    )?;
    let bus = Arc::new(bus);

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
    let mut vmbus: Option<Arc<vmbus_server::VmbusServer>> = None;
    let mut services = services::Services::default();
    let enl = if cfg.enlightenments {
        msr_ranges.push(hypervisor::MsrRange {
            base: enlightened::SYNTHETIC_MSRS.0,
            count: enlightened::SYNTHETIC_MSRS.1,
            read: true,
            write: true,
        });
        let hv = hv1::Hv1::new(
            hv1::Config {
                vp_count: cfg.cpus,
                tsc_hz: u64::from(facts.tsc_khz) * 1000,
                time_scale: scale,
            },
            tsc_clock.clone(),
        )
        .map_err(|e| WorkerError::Host(format!("synthetic interface: {e}")))?;
        let hv = Arc::new(hv);
        let synic = Arc::new(enlightened::Synic {
            hv: hv.clone(),
            ram: enlightened::Ram(mem.clone()),
            irq: enlightened::Irq(part.clone()),
        });
        let server = Arc::new(
            vmbus_server::VmbusServer::new(
                vmbus_server::ServerConfig {
                    vp_count: cfg.cpus,
                    ..Default::default()
                },
                synic,
                Arc::new(enlightened::VmbusRam(mem.clone())),
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
        services.ic = handles;
        if cfg.vmbus_echo {
            server
                .add_device(Box::new(enlightened::EchoVsp::new()))
                .map_err(|e| WorkerError::Host(format!("adding the echo device: {e}")))?;
        }
        vmbus = Some(server.clone());
        Some(Arc::new(enlightened::Enlightened {
            hv,
            ram: enlightened::Ram(mem.clone()),
            irq: enlightened::Irq(part.clone()),
            handler: Arc::new(enlightened::ToServer(server)),
        }))
    } else {
        None
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
            pit.clone(),
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
        hub.set_uart(uart.clone());
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
            uart.clone(),
            console.input_stop.clone(),
            console.escape,
            move || c.stop(StopReason::UserQuit),
        );
    }
    hub.boot_started(Arc::new(control::BootHandles {
        control: control.clone(),
        pm: pm.clone(),
        services: services.clone(),
    }));
    let mut handles = Vec::new();
    for vp in vps {
        let ctx = vcpu::VpContext {
            bus: bus.clone(),
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
        let sample_every = std::env::var("VERDIGRIS_SAMPLE_SECS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|s| *s > 0)
            .map(std::time::Duration::from_secs);
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
    devices::pit::Ticker::wake(&pit);
    let _ = ticker.join();
    let _ = console
        .out
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .flush();
    hub.boot_ended(stats);
    *cmos_state = Some(cmos.lock().unwrap_or_else(|e| e.into_inner()).state.clone());
    if let Some(v) = vmbus {
        v.shutdown();
    }
    drop(bus);
    drop(part);
    Ok(reason)
}

/// One of the i8042's two ports on the bus (offset 0 = data 0x60, 4 = command/status 0x64).
struct I8042Port(Arc<Mutex<devices::i8042::I8042>>, u16);

impl devices::PortDevice for I8042Port {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        devices::PortDevice::read(
            &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()),
            self.1,
            data,
        );
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        devices::PortDevice::write(
            &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()),
            self.1,
            data,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert!(parse_size("").is_err());
    }
}
