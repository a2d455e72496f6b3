//! # verdigris — the command
//!
//! One binary for every role: `verdigris run` is the per-VM worker (in the foreground, or
//! started by the management service), `verdigris serve` is the management service, and the
//! VM verbs (`new-vm`, `start-vm`, ...) and disk verbs (`new-vhd`, ...) are its CLI.
//!
//! It talks to: the `worker` crate. It must never: print a Rust panic for bad input — every
//! error is one line on stderr with a distinct exit code.
//!
//! Exit codes of `run`: 0 the guest powered off (or the user quit with Ctrl-]); 1 the worker
//! failed (KVM error); 2 bad command line or input files; 3 the guest triple-faulted; 4 the
//! guest did something the VM cannot handle (it was stopped); 10 the guest rebooted and
//! `--on-reboot exit` was given.

mod disk_cli;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "verdigris",
    version,
    about = "The Hyper-V architecture on Linux/KVM"
)]
struct Cli {
    #[command(flatten)]
    api: vmms::cli::ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one VM in the foreground with its serial console on this terminal.
    Run(RunArgs),
    /// Talk to a running worker's control socket (`run --control PATH`).
    Control(ControlArgs),
    /// The management service: VM inventory, one worker per VM, REST API.
    Serve(vmms::ServeArgs),
    #[command(flatten)]
    Disk(disk_cli::DiskCommand),
    #[command(flatten)]
    Vm(vmms::cli::Command),
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The worker's control socket.
    socket: PathBuf,
    #[command(subcommand)]
    op: ControlOp,
}

#[derive(Subcommand)]
enum ControlOp {
    /// State, uptime and counters.
    Status,
    /// Ask the guest to shut down cleanly (integration service, else ACPI power button).
    Shutdown {
        /// Restart instead of powering off.
        #[arg(long)]
        reboot: bool,
    },
    /// Press the virtual power button.
    PowerButton,
    /// Pull the plug: stop the VM at once.
    TurnOff,
    /// Stop every virtual processor until `resume`.
    Pause,
    Resume,
    /// The guest's heartbeat as the heartbeat integration service sees it.
    Heartbeat,
    /// Push host time to the guest now (it steps its clock).
    Timesync,
    /// Read a KVP item.
    KvpGet {
        pool: u8,
        key: String,
    },
    /// Write a KVP item into the guest's pool.
    KvpSet {
        pool: u8,
        key: String,
        value: String,
    },
    /// Delete a KVP item.
    KvpDelete {
        pool: u8,
        key: String,
    },
    /// List a KVP pool.
    KvpList {
        pool: u8,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnReboot {
    Restart,
    Exit,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel: a bzImage or an ELF executable (e.g. the test guest).
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of virtual processors.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// COM1: `stdio`, `file:PATH`, `unix:PATH` (a listening socket; output is replayed to
    /// each new client) or `none`.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// What a guest reboot does.
    #[arg(long, value_enum, default_value = "restart")]
    on_reboot: OnReboot,
    /// Guest seconds per wall second, in (0, 1]. Default: chosen for this host (0.1 where guest
    /// ring 0 is emulated, 1.0 elsewhere).
    #[arg(long)]
    time_scale: Option<f64>,
    /// Let the guest decompress a bzImage itself instead of the host.
    #[arg(long)]
    no_host_decompress: bool,
    /// Do not append the kernel parameters this host requires of Linux guests.
    #[arg(long)]
    no_host_kernel_params: bool,
    /// A plain PC: no Hyper-V synthetic interface (for guests that are not enlightened).
    #[arg(long)]
    no_enlightenments: bool,
    /// Listen for control requests (JSON lines: status, shutdown, pause, KVP, ...) on this
    /// unix socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Do not offer the heartbeat integration service.
    #[arg(long)]
    no_heartbeat: bool,
    /// Do not offer the shutdown integration service.
    #[arg(long)]
    no_shutdown_service: bool,
    /// Do not offer the time synchronization integration service.
    #[arg(long)]
    no_timesync: bool,
    /// Do not offer the key-value pair exchange integration service.
    #[arg(long)]
    no_kvp: bool,
    /// Attach a disk (VHDX, raw image or block device) to a SCSI controller:
    /// `PATH[,ro][,controller=N][,lun=M][,buffered]`. Repeatable. Disks bypass the host's
    /// page cache (as Hyper-V opens them) unless `buffered` is given.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,
    /// The VM's id (a GUID); it seeds the stable instance ids of its devices.
    #[arg(long)]
    id: Option<String>,
    /// Offer an echo device on VMBus (for tests).
    #[arg(long, hide = true)]
    vmbus_echo: bool,
}

fn serial_target(s: &str) -> Result<worker::SerialTarget, String> {
    let bad = || format!("invalid --serial '{s}' (use stdio, none, file:PATH or unix:PATH)");
    match s {
        "stdio" => Ok(worker::SerialTarget::Stdio),
        "none" => Ok(worker::SerialTarget::None),
        _ => {
            if let Some(p) = s.strip_prefix("file:").filter(|p| !p.is_empty()) {
                Ok(worker::SerialTarget::File(p.into()))
            } else if let Some(p) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
                Ok(worker::SerialTarget::Socket(p.into()))
            } else {
                Err(bad())
            }
        }
    }
}

/// Parses a GUID ("xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") into its 16 bytes (as written).
fn parse_guid(s: &str) -> Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let bad = || format!("invalid --id '{s}' (expected a GUID like 6f1c3e4a-...)");
    if hex.len() != 32 || s.len() != 36 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Parses `PATH[,ro][,controller=N][,lun=M][,buffered]`.
fn parse_disk(spec: &str) -> Result<worker::DiskSpec, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("--disk '{spec}': no path"))?;
    let mut d = worker::DiskSpec {
        path: path.into(),
        read_only: false,
        controller: 0,
        lun: None,
        unbuffered: true,
    };
    for p in parts {
        match p.split_once('=') {
            None if p == "ro" => d.read_only = true,
            None if p == "rw" => d.read_only = false,
            None if p == "buffered" => d.unbuffered = false,
            Some(("controller", v)) => {
                d.controller = v
                    .parse()
                    .map_err(|_| format!("--disk '{spec}': bad controller '{v}'"))?
            }
            Some(("lun", v)) => {
                d.lun = Some(
                    v.parse()
                        .map_err(|_| format!("--disk '{spec}': bad lun '{v}'"))?,
                )
            }
            _ => {
                return Err(format!(
                    "--disk '{spec}': unknown option '{p}' (ro, controller=N, lun=M, buffered)"
                ))
            }
        }
    }
    Ok(d)
}

fn run(a: RunArgs) -> ExitCode {
    let memory = match worker::parse_size(&a.memory) {
        Ok(m) => m,
        Err(e) => return fail(2, &format!("--memory: {e}")),
    };
    let disks = match a
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(d) => d,
        Err(e) => return fail(2, &e),
    };
    let id = match a.id.as_deref().map(parse_guid).transpose() {
        Ok(id) => id.unwrap_or(*b"verdigris-vm-id!"),
        Err(e) => return fail(2, &e),
    };
    let serial = match serial_target(&a.serial) {
        Ok(s) => s,
        Err(e) => return fail(2, &e),
    };
    let cfg = worker::VmConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        memory,
        cpus: a.cpus,
        serial,
        on_reboot: match a.on_reboot {
            OnReboot::Restart => worker::RebootAction::Restart,
            OnReboot::Exit => worker::RebootAction::Exit,
        },
        time_scale: a.time_scale,
        host_decompress: !a.no_host_decompress,
        host_kernel_params: !a.no_host_kernel_params,
        enlightenments: !a.no_enlightenments,
        vmbus_echo: a.vmbus_echo,
        control: a.control,
        ic: worker::services::IcSettings {
            heartbeat: !a.no_heartbeat,
            shutdown: !a.no_shutdown_service,
            timesync: !a.no_timesync,
            kvp: !a.no_kvp,
        },
        id,
        disks,
    };
    match worker::run(cfg) {
        Ok(s) => {
            eprintln!("verdigris: {}", s.reason);
            eprintln!("verdigris: {}", s.stats.report());
            ExitCode::from(s.reason.exit_code() as u8)
        }
        Err(worker::WorkerError::Config(m)) => fail(2, &m),
        Err(worker::WorkerError::Host(m)) => fail(1, &m),
    }
}

fn control(a: ControlArgs) -> ExitCode {
    use serde_json::json;
    use std::io::{BufRead, Write};
    let req = match a.op {
        ControlOp::Status => json!({"op": "status"}),
        ControlOp::Shutdown { reboot } => json!({"op": "shutdown", "reboot": reboot}),
        ControlOp::PowerButton => json!({"op": "power-button"}),
        ControlOp::TurnOff => json!({"op": "turn-off"}),
        ControlOp::Pause => json!({"op": "pause"}),
        ControlOp::Resume => json!({"op": "resume"}),
        ControlOp::Heartbeat => json!({"op": "heartbeat"}),
        ControlOp::Timesync => json!({"op": "timesync"}),
        ControlOp::KvpGet { pool, key } => json!({"op": "kvp-get", "pool": pool, "key": key}),
        ControlOp::KvpSet { pool, key, value } => {
            json!({"op": "kvp-set", "pool": pool, "key": key, "value": value})
        }
        ControlOp::KvpDelete { pool, key } => json!({"op": "kvp-delete", "pool": pool, "key": key}),
        ControlOp::KvpList { pool } => json!({"op": "kvp-list", "pool": pool}),
    };
    let mut s = match std::os::unix::net::UnixStream::connect(&a.socket) {
        Ok(s) => s,
        Err(e) => return fail(1, &format!("cannot connect to {}: {e}", a.socket.display())),
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(120)));
    if writeln!(s, "{req}").is_err() {
        return fail(1, "the worker closed the control connection");
    }
    let mut line = String::new();
    if std::io::BufReader::new(&s)
        .read_line(&mut line)
        .unwrap_or(0)
        == 0
    {
        return fail(1, "no answer from the worker");
    }
    match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(v) if v["ok"] == json!(true) => {
            let mut v = v;
            if let Some(o) = v.as_object_mut() {
                o.remove("ok");
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(v) => fail(
            1,
            v["error"]
                .as_str()
                .unwrap_or("the worker refused the request"),
        ),
        Err(_) => fail(1, "the worker sent a malformed answer"),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("verdigris: error: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VERDIGRIS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Run(a) => run(a),
        Command::Control(a) => control(a),
        Command::Disk(c) => disk_cli::run(c),
        Command::Serve(a) => vmms::serve_main(a),
        Command::Vm(c) => vmms::cli::run(&cli.api, c),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_disk;

    #[test]
    fn disks_are_unbuffered_unless_asked_and_options_combine() {
        let d = parse_disk("/v/a.vhdx").unwrap();
        assert!(d.unbuffered && !d.read_only && d.controller == 0 && d.lun.is_none());
        let d = parse_disk("/v/a.vhdx,ro,controller=2,lun=5,buffered").unwrap();
        assert!(!d.unbuffered && d.read_only && d.controller == 2 && d.lun == Some(5));
        let e = parse_disk("/v/a.vhdx,cached").err().unwrap();
        assert!(e.contains("unknown option 'cached'"), "{e}");
        assert!(parse_disk(",ro").is_err());
    }
}
