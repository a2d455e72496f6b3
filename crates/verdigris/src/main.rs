//! # verdigris — the command
//!
//! One binary for every role: `verdigris run` is the per-VM worker in the foreground (later the
//! management service starts the same code as `verdigris worker`), and the disk and management
//! verbs arrive with their issues.
//!
//! It talks to: the `worker` crate. It must never: print a Rust panic for bad input — every
//! error is one line on stderr with a distinct exit code.
//!
//! Exit codes of `run`: 0 the guest powered off (or the user quit with Ctrl-]); 1 the worker
//! failed (KVM error); 2 bad command line or input files; 3 the guest triple-faulted; 4 the
//! guest did something the VM cannot handle (it was stopped); 10 the guest rebooted and
//! `--on-reboot exit` was given.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one VM in the foreground with its serial console on this terminal.
    Run(RunArgs),
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

fn run(a: RunArgs) -> ExitCode {
    let memory = match worker::parse_size(&a.memory) {
        Ok(m) => m,
        Err(e) => return fail(2, &format!("--memory: {e}")),
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
    }
}
