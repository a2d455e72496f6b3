//! The CLI: Hyper-V's verbs, talking to the service's API.
//!
//! Output: a success prints one line (or a table, or JSON with `--json`) on stdout; a failure
//! prints `verdigris: error: <message>` on stderr, one line, and exits with:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | refused in the VM's current state, or the operation failed (HTTP 409, 5xx) |
//! | 2 | bad command line or invalid input (HTTP 400, 413) |
//! | 3 | no such VM or disk (HTTP 404) |
//! | 4 | the service cannot be reached |
//! | 5 | the service refused the credentials (HTTP 401) |
//! | 6 | the guest did not do it in time (HTTP 504, e.g. `stop-vm` without `--force`) |
//!
//! With several VM names (`start-vm a b c`), the operations run at once and the exit code is
//! the first failure's.

use crate::client::{encode_query, encode_segment, Client, ClientError, Endpoint, Reply};
use crate::model::{format_size, format_time_ms, Event, Vm};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_UNREACHABLE: u8 = 4;
pub const EXIT_UNAUTHORIZED: u8 = 5;
pub const EXIT_TIMEOUT: u8 = 6;

/// The console's escape key: Ctrl-] detaches (the VM keeps running).
pub const ESCAPE: u8 = 0x1d;

/// Options of every CLI verb: where the service is. Flatten into the top-level parser.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The management service: its unix socket, or http://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "VERDIGRIS_API",
        default_value = "/var/lib/verdigris/api.sock",
        value_name = "SOCKET|URL"
    )]
    pub api: String,
    /// File with the bearer token for an http:// API (or set VERDIGRIS_API_TOKEN).
    #[arg(
        long,
        global = true,
        env = "VERDIGRIS_API_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub api_token_file: Option<PathBuf>,
}

/// A stand-alone parser with just the CLI verbs (tests, and an example of the flattening).
#[derive(Debug, clap::Parser)]
#[command(name = "verdigris")]
pub struct Cli {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The CLI's verbs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Define a new VM (it starts Off).
    NewVm(NewVmArgs),
    /// List VMs (a table), or show one.
    GetVm {
        /// A VM name or id (default: all VMs).
        name: Option<String>,
        /// JSON instead of text (an array without NAME, an object with it).
        #[arg(long)]
        json: bool,
    },
    /// Change a VM's settings (processors, memory, boot, ... only while it is Off).
    SetVm(SetVmArgs),
    /// Start VMs.
    StartVm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Shut VMs down cleanly (shutdown integration service, else the ACPI power button).
    StopVm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Pull the plug at once: no clean shutdown.
        #[arg(long, conflicts_with_all = ["force", "timeout"])]
        turn_off: bool,
        /// Turn the VM off if the guest has not shut down within the timeout.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to shut down.
        #[arg(long, default_value_t = crate::service::DEFAULT_SHUTDOWN_TIMEOUT)]
        timeout: u64,
    },
    /// Restart VMs: a reset, or with --reboot a reboot by the guest itself.
    RestartVm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Ask the guest to reboot (shutdown integration service) instead of resetting it.
        #[arg(long)]
        reboot: bool,
    },
    /// Pause VMs (their processors stop; memory stays).
    SuspendVm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Resume paused VMs.
    ResumeVm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove VM definitions (refused while running; disk files are kept).
    RemoveVm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Attach a disk image to a VM's SCSI controller (while the VM is Off).
    AddDisk {
        name: String,
        /// The disk image (absolute path, or relative to the current directory).
        path: PathBuf,
        /// SCSI controller, 0-3.
        #[arg(long, default_value_t = 0)]
        controller: u32,
        /// LUN, 0-63 [default: the first free one].
        #[arg(long)]
        lun: Option<u32>,
        /// Attach read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a disk from a VM (while it is Off); the file is kept.
    RemoveDisk {
        name: String,
        /// The disk's image path (or give --controller and --lun).
        #[arg(required_unless_present = "lun")]
        path: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        controller: u32,
        #[arg(long)]
        lun: Option<u32>,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches; the VM keeps running).
    Connect { name: String },
    /// Show the event log (state changes and configuration), oldest first.
    GetVmEvent {
        /// Only this VM's events.
        name: Option<String>,
        /// Events after this sequence number.
        #[arg(long)]
        since: Option<i64>,
        /// At most this many (the newest ones, without --since).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Read a KVP pool of a running VM (or one key of it).
    GetVmKvp {
        name: String,
        /// 0 external (host to guest), 1 guest, 2 auto, 3 auto-external, 4 auto-internal.
        #[arg(long, default_value_t = 3)]
        pool: u8,
        key: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct NewVmArgs {
    pub name: String,
    /// Linux kernel (bzImage or ELF) for direct boot.
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Virtual processors.
    #[arg(long, visible_alias = "cpus", default_value_t = 1)]
    pub processors: u32,
    /// A disk image: PATH or PATH,ro (repeatable; SCSI 0:0, 0:1, ...).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    pub disks: Vec<String>,
    /// A plain PC without the Hyper-V synthetic interface.
    #[arg(long)]
    pub no_enlightenments: bool,
    /// Without integration services (heartbeat, shutdown, KVP, ...).
    #[arg(long)]
    pub no_integration_services: bool,
    #[arg(long, default_value = "")]
    pub notes: String,
    /// Start the VM once it is defined.
    #[arg(long)]
    pub start: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SetVmArgs {
    pub name: String,
    #[arg(long)]
    pub new_name: Option<String>,
    #[arg(long, visible_alias = "cpus")]
    pub processors: Option<u32>,
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long, conflicts_with = "no_initrd")]
    pub initrd: Option<PathBuf>,
    /// Boot without an initrd.
    #[arg(long)]
    pub no_initrd: bool,
    #[arg(long)]
    pub cmdline: Option<String>,
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new(), value_name = "on|off")]
    pub enlightenments: Option<bool>,
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new(), value_name = "on|off")]
    pub integration_services: Option<bool>,
    #[arg(long)]
    pub notes: Option<String>,
}

/// Runs a verb with stdout/stderr; returns the process exit code.
pub fn run(api: &ApiArgs, cmd: Command) -> ExitCode {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    ExitCode::from(execute(api, cmd, &mut out, &mut err))
}

/// Runs a verb, writing to `out` and `err`; returns the exit code. (Not from inside an async
/// runtime: it runs its own.)
pub fn execute(api: &ApiArgs, cmd: Command, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let r = (|| -> Result<u8, Fail> {
        let client = client_for(api)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
        rt.block_on(dispatch(&client, cmd, out, err))
    })();
    match r {
        Ok(code) => code,
        Err(Fail(code, msg)) => {
            let _ = writeln!(err, "verdigris: error: {msg}");
            code
        }
    }
}

/// A failure: exit code and one line.
#[derive(Debug)]
struct Fail(u8, String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable(..) => Fail(EXIT_UNREACHABLE, e.to_string()),
            ClientError::Protocol(_) => Fail(EXIT_FAILED, e.to_string()),
        }
    }
}

fn fail_from(r: &Reply) -> Fail {
    let code = match r.status {
        StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => EXIT_INVALID,
        StatusCode::NOT_FOUND => EXIT_NOT_FOUND,
        StatusCode::UNAUTHORIZED => EXIT_UNAUTHORIZED,
        StatusCode::GATEWAY_TIMEOUT => EXIT_TIMEOUT,
        _ => EXIT_FAILED,
    };
    Fail(code, r.error_message())
}

fn client_for(api: &ApiArgs) -> Result<Client, Fail> {
    let token = match &api.api_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Fail(EXIT_INVALID, format!("token file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("VERDIGRIS_API_TOKEN").ok(),
    };
    Endpoint::parse(&api.api, token)
        .map(Client::new)
        .map_err(|e| Fail(EXIT_INVALID, e))
}

async fn call(c: &Client, method: Method, path: &str, body: Option<Value>) -> Result<Value, Fail> {
    let r = c.request(method, path, body.as_ref()).await?;
    if r.status.is_success() {
        Ok(r.body)
    } else {
        Err(fail_from(&r))
    }
}

fn vm_path(name: &str) -> String {
    format!("/v1/vms/{}", encode_segment(name))
}

fn abs(p: &std::path::Path) -> Result<String, Fail> {
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Fail(EXIT_FAILED, e.to_string()))?
            .join(p)
    };
    p.into_os_string()
        .into_string()
        .map_err(|_| Fail(EXIT_INVALID, "the path is not UTF-8".into()))
}

async fn dispatch(
    c: &Client,
    cmd: Command,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, Fail> {
    let w = |out: &mut dyn Write, s: &str| {
        let _ = writeln!(out, "{s}");
    };
    match cmd {
        Command::NewVm(a) => {
            let mut disks = Vec::new();
            for d in &a.disks {
                let (path, ro) = match d.strip_suffix(",ro") {
                    Some(p) => (p, true),
                    None => (d.as_str(), false),
                };
                disks.push(json!({"path": abs(std::path::Path::new(path))?, "read_only": ro}));
            }
            let mut boot = json!({
                "kind": "linux",
                "kernel": abs(&a.kernel)?,
                "cmdline": a.cmdline,
            });
            if let Some(i) = &a.initrd {
                boot["initrd"] = json!(abs(i)?);
            }
            let body = json!({
                "name": a.name,
                "boot": boot,
                "processors": a.processors,
                "memory": a.memory,
                "disks": disks,
                "enlightenments": !a.no_enlightenments,
                "integration_services": !a.no_integration_services,
                "notes": a.notes,
            });
            let v = call(c, Method::POST, "/v1/vms", Some(body)).await?;
            let vm: Vm = serde_json::from_value(v).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
            w(out, &format!("VM '{}' created (id {})", vm.name, vm.id));
            if a.start {
                let v = call(c, Method::POST, &format!("{}/start", vm_path(&vm.id)), None).await?;
                w(out, v["message"].as_str().unwrap_or("started"));
            }
            Ok(EXIT_OK)
        }
        Command::GetVm { name: None, json } => {
            let v = call(c, Method::GET, "/v1/vms", None).await?;
            if json {
                w(out, &serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let vms: Vec<Vm> =
                    serde_json::from_value(v).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
                let _ = out.write_all(vm_table(&vms).as_bytes());
            }
            Ok(EXIT_OK)
        }
        Command::GetVm {
            name: Some(n),
            json,
        } => {
            let v = call(c, Method::GET, &vm_path(&n), None).await?;
            let vm: Vm =
                serde_json::from_value(v.clone()).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
            // Live figures from the worker (heartbeat, counters) when it runs.
            let live = if vm.state.has_worker() {
                call(c, Method::GET, &format!("{}/status", vm_path(&vm.id)), None)
                    .await
                    .ok()
            } else {
                None
            };
            if json {
                let mut v = v;
                if let Some(l) = live {
                    v["live"] = l["worker"].clone();
                }
                w(out, &serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let _ =
                    out.write_all(vm_details(&vm, live.as_ref().map(|l| &l["worker"])).as_bytes());
            }
            Ok(EXIT_OK)
        }
        Command::SetVm(a) => {
            let mut body = serde_json::Map::new();
            if let Some(n) = a.new_name {
                body.insert("name".into(), json!(n));
            }
            if let Some(p) = a.processors {
                body.insert("processors".into(), json!(p));
            }
            if let Some(m) = a.memory {
                body.insert("memory".into(), json!(m));
            }
            if let Some(k) = &a.kernel {
                body.insert("kernel".into(), json!(abs(k)?));
            }
            if let Some(i) = &a.initrd {
                body.insert("initrd".into(), json!(abs(i)?));
            }
            if a.no_initrd {
                body.insert("initrd".into(), json!(""));
            }
            if let Some(cl) = a.cmdline {
                body.insert("cmdline".into(), json!(cl));
            }
            if let Some(b) = a.enlightenments {
                body.insert("enlightenments".into(), json!(b));
            }
            if let Some(b) = a.integration_services {
                body.insert("integration_services".into(), json!(b));
            }
            if let Some(n) = a.notes {
                body.insert("notes".into(), json!(n));
            }
            if body.is_empty() {
                return Err(Fail(
                    EXIT_INVALID,
                    "nothing to change: give at least one setting".into(),
                ));
            }
            let v = call(
                c,
                Method::PATCH,
                &vm_path(&a.name),
                Some(Value::Object(body)),
            )
            .await?;
            w(out, v["message"].as_str().unwrap_or("done"));
            Ok(EXIT_OK)
        }
        Command::StartVm { names } => {
            many(c, names, out, err, |n| {
                (Method::POST, format!("{}/start", vm_path(n)), None)
            })
            .await
        }
        Command::StopVm {
            names,
            turn_off,
            force,
            timeout,
        } => {
            let body = json!({"turn_off": turn_off, "force": force, "timeout_secs": timeout});
            let body = if turn_off {
                json!({"turn_off": true})
            } else {
                body
            };
            many(c, names, out, err, move |n| {
                (
                    Method::POST,
                    format!("{}/stop", vm_path(n)),
                    Some(body.clone()),
                )
            })
            .await
        }
        Command::RestartVm { names, reboot } => {
            many(c, names, out, err, move |n| {
                (
                    Method::POST,
                    format!("{}/restart", vm_path(n)),
                    Some(json!({"reboot": reboot})),
                )
            })
            .await
        }
        Command::SuspendVm { names } => {
            many(c, names, out, err, |n| {
                (Method::POST, format!("{}/pause", vm_path(n)), None)
            })
            .await
        }
        Command::ResumeVm { names } => {
            many(c, names, out, err, |n| {
                (Method::POST, format!("{}/resume", vm_path(n)), None)
            })
            .await
        }
        Command::RemoveVm { names } => {
            many(c, names, out, err, |n| (Method::DELETE, vm_path(n), None)).await
        }
        Command::AddDisk {
            name,
            path,
            controller,
            lun,
            read_only,
        } => {
            let mut body =
                json!({"path": abs(&path)?, "controller": controller, "read_only": read_only});
            if let Some(l) = lun {
                body["lun"] = json!(l);
            }
            let v = call(
                c,
                Method::POST,
                &format!("{}/disks", vm_path(&name)),
                Some(body),
            )
            .await?;
            w(out, v["message"].as_str().unwrap_or("attached"));
            Ok(EXIT_OK)
        }
        Command::RemoveDisk {
            name,
            path,
            controller,
            lun,
        } => {
            let (controller, lun) = match (path, lun) {
                (_, Some(l)) => (controller, l),
                (Some(p), None) => {
                    let want = abs(&p)?;
                    let canonical = std::fs::canonicalize(&want)
                        .ok()
                        .and_then(|p| p.into_os_string().into_string().ok());
                    let v = call(c, Method::GET, &vm_path(&name), None).await?;
                    let vm: Vm =
                        serde_json::from_value(v).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
                    let d = vm
                        .disks
                        .iter()
                        .find(|d| d.path == want || Some(&d.path) == canonical.as_ref())
                        .ok_or_else(|| {
                            Fail(
                                EXIT_NOT_FOUND,
                                format!("VM '{}' has no disk {want}", vm.name),
                            )
                        })?;
                    (d.controller, d.lun)
                }
                (None, None) => {
                    return Err(Fail(EXIT_INVALID, "give the disk's path or --lun".into()))
                }
            };
            let v = call(
                c,
                Method::DELETE,
                &format!("{}/disks/{controller}/{lun}", vm_path(&name)),
                None,
            )
            .await?;
            w(out, v["message"].as_str().unwrap_or("removed"));
            Ok(EXIT_OK)
        }
        Command::Connect { name } => {
            let banner = format!("verdigris: connected to the console of '{name}'; Ctrl-] detaches (the VM keeps running)");
            let r = console_session(
                c,
                &name,
                Box::new(std::io::stdin()),
                out,
                Some((err, banner)),
            )
            .await;
            match r? {
                Detach::Escape => {
                    let _ = writeln!(
                        err,
                        "\r\nverdigris: detached from '{name}' (it keeps running)"
                    );
                }
                Detach::InputEnded => {}
                Detach::ConsoleClosed => {
                    let _ = writeln!(
                        err,
                        "\r\nverdigris: the console of '{name}' closed (the VM stopped?)"
                    );
                }
            }
            Ok(EXIT_OK)
        }
        Command::GetVmEvent {
            name,
            since,
            limit,
            follow,
            json,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(n) = &name {
                q.push(format!("vm={}", encode_query(n)));
            }
            if let Some(s) = since {
                q.push(format!("since={s}"));
            }
            let v = call(c, Method::GET, &format!("/v1/events?{}", q.join("&")), None).await?;
            let evs: Vec<Event> =
                serde_json::from_value(v).map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
            let mut last = since.unwrap_or(0);
            for e in &evs {
                print_event(out, e, json);
                last = last.max(e.seq);
            }
            if follow {
                let mut q = vec![format!("since={last}")];
                if let Some(n) = &name {
                    q.push(format!("vm={}", encode_query(n)));
                }
                follow_events(c, &format!("/v1/events/stream?{}", q.join("&")), out, json).await?;
            }
            Ok(EXIT_OK)
        }
        Command::GetVmKvp { name, pool, key } => {
            let mut path = format!("{}/kvp?pool={pool}", vm_path(&name));
            if let Some(k) = &key {
                path.push_str(&format!("&key={}", encode_query(k)));
            }
            let v = call(c, Method::GET, &path, None).await?;
            w(out, &serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(EXIT_OK)
        }
    }
}

/// Runs one request per VM name, all at once; prints each message; returns the first
/// failure's exit code.
async fn many(
    c: &Client,
    names: Vec<String>,
    out: &mut dyn Write,
    err: &mut dyn Write,
    req: impl Fn(&str) -> (Method, String, Option<Value>),
) -> Result<u8, Fail> {
    let futs = names.iter().map(|n| {
        let (m, p, b) = req(n);
        async move { call(c, m, &p, b).await }
    });
    let results = futures_util::future::join_all(futs).await;
    let mut code = EXIT_OK;
    for r in results {
        match r {
            Ok(v) => {
                let _ = writeln!(out, "{}", v["message"].as_str().unwrap_or("done"));
            }
            Err(Fail(c, m)) => {
                let _ = writeln!(err, "verdigris: error: {m}");
                if code == EXIT_OK {
                    code = c;
                }
            }
        }
    }
    Ok(code)
}

fn print_event(out: &mut dyn Write, e: &Event, json: bool) {
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let what = match (e.from, e.to) {
        (Some(f), Some(t)) => format!("{f} -> {t}"),
        (None, Some(t)) => format!("-> {t}"),
        _ => e.kind.clone(),
    };
    let _ = writeln!(
        out,
        "{:>6}  {}  {:<20} {:<22} {}{}",
        e.seq,
        format_time_ms(e.time_ms),
        e.vm_name,
        what,
        if e.critical { "CRITICAL: " } else { "" },
        e.message
    );
}

/// Prints server-sent events until the stream ends.
async fn follow_events(
    c: &Client,
    path: &str,
    out: &mut dyn Write,
    json: bool,
) -> Result<(), Fail> {
    use http_body_util::BodyExt;
    let resp = c.send(Method::GET, path, None).await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let b = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(fail_from(&Reply {
            status,
            body: serde_json::from_slice(&b).unwrap_or(Value::Null),
        }));
    }
    let mut body = resp.into_body();
    let mut buf = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(i) = buf.find("\n\n") {
            let block: String = buf.drain(..i + 2).collect();
            for line in block.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    if let Ok(e) = serde_json::from_str::<Event>(d.trim_start()) {
                        print_event(out, &e, json);
                        let _ = out.flush();
                    }
                }
            }
        }
    }
    Ok(())
}

/// Why a console session ended.
#[derive(Debug, PartialEq)]
pub enum Detach {
    /// The user pressed Ctrl-].
    Escape,
    /// The input ended (a pipe).
    InputEnded,
    /// The service or the worker closed the console (the VM stopped).
    ConsoleClosed,
}

/// Relays a console: `input` to the VM up to the escape byte, the VM's output to `out`.
/// `interactive` (the error stream and a banner) puts a terminal in raw mode.
async fn console_session(
    c: &Client,
    name: &str,
    input: Box<dyn Read + Send>,
    out: &mut dyn Write,
    interactive: Option<(&mut dyn Write, String)>,
) -> Result<Detach, Fail> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = match c.console(name).await? {
        Ok(s) => s,
        Err(reply) => return Err(fail_from(&reply)),
    };
    // Raw mode (restored when dropped) only for an interactive session on a terminal.
    let _raw = match interactive {
        Some((err, banner)) => {
            let _ = writeln!(err, "{banner}");
            cliutil::RawMode::enable()
        }
        None => None,
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    // Blocking reads of the input on a thread of their own.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut input = input;
            let mut buf = [0u8; 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .map_err(|e| Fail(EXIT_FAILED, e.to_string()))?;
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => {
                match n {
                    Ok(0) | Err(_) => return Ok(Detach::ConsoleClosed),
                    Ok(n) => {
                        let _ = out.write_all(&buf[..n]);
                        let _ = out.flush();
                    }
                }
            }
            data = rx.recv() => {
                let Some(data) = data else {
                    let _ = wr.flush().await;
                    return Ok(Detach::InputEnded);
                };
                let (data, esc) = match data.iter().position(|b| *b == ESCAPE) {
                    Some(i) => (&data[..i], true),
                    None => (&data[..], false),
                };
                if !data.is_empty() && wr.write_all(data).await.is_err() {
                    return Ok(Detach::ConsoleClosed);
                }
                if esc {
                    let _ = wr.flush().await;
                    return Ok(Detach::Escape);
                }
            }
        }
    }
}

/// Attaches to a VM's console with any input and output (tests, scripts): input bytes go to
/// the guest until Ctrl-] or the end of the input, the output goes to `out`.
pub fn console_attach(
    api: &ApiArgs,
    name: &str,
    input: Box<dyn Read + Send>,
    out: &mut dyn Write,
) -> Result<Detach, (u8, String)> {
    let client = client_for(api).map_err(|Fail(c, m)| (c, m))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (EXIT_FAILED, e.to_string()))?;
    rt.block_on(console_session(&client, name, input, out, None))
        .map_err(|Fail(c, m)| (c, m))
}

fn uptime(secs: Option<u64>) -> String {
    match secs {
        None => String::new(),
        Some(s) => {
            let (d, h, m, s) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60);
            if d > 0 {
                format!("{d}.{h:02}:{m:02}:{s:02}")
            } else {
                format!("{h:02}:{m:02}:{s:02}")
            }
        }
    }
}

fn status_text(vm: &Vm) -> String {
    if vm.critical {
        format!("Critical: {}", vm.reason)
    } else {
        vm.reason.clone()
    }
}

/// The `get-vm` table.
pub fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<[String; 6]> = vms
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.state.to_string(),
                v.processors.to_string(),
                format_size(v.memory_bytes),
                uptime(v.uptime_secs),
                status_text(v),
            ]
        })
        .collect();
    let head = ["Name", "State", "CPUs", "Memory", "Uptime", "Status"];
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(head.to_vec());
    s.push_str(&line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for r in &rows {
        s.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    s
}

/// The `get-vm NAME` text.
pub fn vm_details(vm: &Vm, live: Option<&Value>) -> String {
    let crate::model::Boot::Linux {
        kernel,
        initrd,
        cmdline,
    } = &vm.boot;
    let mut s = String::new();
    let mut kv = |k: &str, v: &str| s.push_str(&format!("{k:<22}{v}\n"));
    kv("Name", &vm.name);
    kv("Id", &vm.id);
    kv("State", vm.state.as_str());
    kv("Status", &status_text(vm));
    kv("Since", &format_time_ms(vm.state_changed_ms));
    if let Some(u) = vm.uptime_secs {
        kv("Uptime", &uptime(Some(u)));
    }
    if let Some(p) = vm.worker_pid {
        kv("Worker pid", &p.to_string());
    }
    kv("Processors", &vm.processors.to_string());
    kv("Memory", &format_size(vm.memory_bytes));
    kv("Boot", "direct Linux boot");
    kv("  Kernel", kernel);
    kv("  Initrd", initrd.as_deref().unwrap_or("(none)"));
    kv("  Command line", cmdline);
    kv(
        "Enlightenments",
        if vm.enlightenments { "on" } else { "off" },
    );
    kv(
        "Integration services",
        if vm.integration_services { "on" } else { "off" },
    );
    if vm.disks.is_empty() {
        kv("Disks", "(none)");
    }
    for d in &vm.disks {
        kv(
            &format!("Disk SCSI {}:{}", d.controller, d.lun),
            &format!(
                "{}{}",
                d.path,
                if d.read_only { " (read-only)" } else { "" }
            ),
        );
    }
    for n in &vm.network_adapters {
        kv(
            "Network adapter",
            &format!(
                "{} (switch {}, MAC {}; not connected yet)",
                n.name,
                n.switch.as_deref().unwrap_or("none"),
                n.mac.as_deref().unwrap_or("auto")
            ),
        );
    }
    if !vm.notes.is_empty() {
        kv("Notes", &vm.notes);
    }
    kv("Created", &format_time_ms(vm.created_ms));
    if let Some(l) = live {
        if let Some(h) = l.get("heartbeat") {
            kv("Heartbeat", &h.to_string());
        }
        if let Some(b) = l.get("boots") {
            kv("Boots", &b.to_string());
        }
        if let Some(c) = l.get("counters") {
            kv("Counters", &c.to_string());
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Boot, VmState};
    use clap::Parser;

    #[test]
    fn parses_verbs_and_global_api() {
        let c = Cli::try_parse_from(["verdigris", "start-vm", "a", "b", "--api", "/tmp/x.sock"])
            .unwrap();
        assert_eq!(c.api.api, "/tmp/x.sock");
        assert!(matches!(c.command, Command::StartVm { ref names } if names.len() == 2));
        assert!(
            Cli::try_parse_from(["verdigris", "stop-vm", "a", "--turn-off", "--force"]).is_err()
        );
        assert!(Cli::try_parse_from(["verdigris", "start-vm"]).is_err());
        let c =
            Cli::try_parse_from(["verdigris", "set-vm", "a", "--enlightenments", "off"]).unwrap();
        assert!(matches!(c.command, Command::SetVm(ref s) if s.enlightenments == Some(false)));
    }

    /// The way the `verdigris` binary embeds the verbs and `serve` (clap's debug checks catch
    /// clashing names).
    #[test]
    fn flattens_into_the_verdigris_command() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Top {
            #[command(flatten)]
            api: ApiArgs,
            #[command(subcommand)]
            command: TopCommand,
        }
        #[derive(clap::Subcommand)]
        enum TopCommand {
            Run {
                #[arg(long)]
                kernel: String,
                #[arg(long)]
                control: Option<String>,
            },
            Serve(crate::ServeArgs),
            #[command(flatten)]
            Vm(Command),
        }
        Top::command().debug_assert();
        let t = Top::try_parse_from([
            "verdigris",
            "--api",
            "/s",
            "serve",
            "--init",
            "--state-dir",
            "/x",
        ])
        .unwrap();
        assert!(
            matches!(t.command, TopCommand::Serve(ref a) if a.init && a.state_dir == std::path::Path::new("/x"))
        );
        assert_eq!(t.api.api, "/s");
        let t = Top::try_parse_from(["verdigris", "get-vm", "web", "--json"]).unwrap();
        assert!(matches!(
            t.command,
            TopCommand::Vm(Command::GetVm { json: true, .. })
        ));
        let t = Top::try_parse_from(["verdigris", "run", "--kernel", "k"]).unwrap();
        assert!(matches!(t.command, TopCommand::Run { .. }));
        Cli::command().debug_assert();
    }

    #[test]
    fn table_lines_up() {
        let vm = Vm {
            id: "x".into(),
            name: "web".into(),
            boot: Boot::Linux {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            processors: 2,
            memory_bytes: 512 << 20,
            disks: vec![],
            network_adapters: vec![],
            integration_services: true,
            enlightenments: true,
            notes: String::new(),
            state: VmState::Running,
            critical: false,
            reason: "started".into(),
            state_changed_ms: 0,
            created_ms: 0,
            uptime_secs: Some(3725),
            worker_pid: Some(1),
        };
        let t = vm_table(&[vm]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[2].starts_with("web   Running  2     512 MiB  01:02:05  started"),
            "{t}"
        );
    }
}
