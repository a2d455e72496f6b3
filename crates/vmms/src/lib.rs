//! # vmms — the Verdigris management service (Hyper-V's VMMS) and its CLI client
//!
//! `verdigris serve` ([`serve`]) owns the VM inventory and each VM's lifecycle:
//!
//! - **Inventory**: an SQLite database (`<state>/inventory.db`, [`db`]) with the VM definitions
//!   (name, GUID, boot source, processors, memory, SCSI disks, network adapters, integration
//!   services, enlightenments, notes), their state, their worker's pid, and the event log.
//!   Schema changes are migrations. A missing or damaged state directory is reported, never
//!   silently recreated (`--init` creates a new one).
//! - **Lifecycle**: Hyper-V's states (Off, Starting, Running, Paused, Saving, Saved, Stopping)
//!   plus a Critical marker with a reason; every transition is an event ([`model::VmState`]).
//! - **Workers**: one `verdigris run` process per running VM, started detached (own session,
//!   output to `<state>/vms/<id>/worker.log`) and driven over its control socket; its serial
//!   console is its console socket ([`worker`]). The service supervises each one: if it ends,
//!   only its VM becomes Off, with the reason ([`service`]).
//! - **API**: REST + JSON on a unix socket, optionally on TCP with a bearer token, an SSE event
//!   stream, and the serial console as an HTTP upgrade ([`api`], `docs/openapi.yaml`).
//! - **CLI**: Hyper-V's verbs (`new-vm`, `get-vm`, `start-vm`, ...), talking to the API
//!   ([`cli`], [`client`]).
//!
//! It talks to: the workers' control and console sockets, the inventory database, the
//! `verdigris` executable (to start workers), and API clients.
//!
//! It must never:
//! - sit on a data path: disk and network I/O go from the guest to the worker, and the
//!   console is the only byte stream it relays, for a user who attached;
//! - kill VMs on its own restart or exit: workers outlive the service and are re-adopted
//!   (`--stop-vms-on-exit` is the explicit exception);
//! - trust a request: sizes are limited, every field is validated, a bad request changes
//!   nothing, and TCP clients must present the token;
//! - let one VM's failure or slow operation affect another VM.

pub mod api;
pub mod cli;
pub mod client;
pub mod db;
pub mod model;
pub mod service;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/verdigris";
/// The inventory's file name in the state directory.
pub const INVENTORY: &str = "inventory.db";
/// The API socket's file name in the state directory (the default `--socket`).
pub const API_SOCKET: &str = "api.sock";

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where the inventory, sockets and logs live.
    pub state_dir: PathBuf,
    /// Create the state directory and inventory when missing.
    pub init: bool,
    /// The API's unix socket (default `<state>/api.sock`).
    pub socket: Option<PathBuf>,
    /// Also serve the API on TCP (needs `token_file`).
    pub listen: Option<SocketAddr>,
    /// The bearer token for TCP clients (the file's contents, trimmed; at least 16 bytes).
    pub token_file: Option<PathBuf>,
    /// The `verdigris` executable workers are started from (default: this executable).
    pub worker_exe: Option<PathBuf>,
    /// On exit, shut every VM down (turned off after `stop_timeout_secs`) instead of leaving
    /// them running.
    pub stop_vms_on_exit: bool,
    pub stop_timeout_secs: u64,
}

impl ServeOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ServeOptions {
            state_dir: state_dir.into(),
            init: false,
            socket: None,
            listen: None,
            token_file: None,
            worker_exe: None,
            stop_vms_on_exit: false,
            stop_timeout_secs: 30,
        }
    }
}

/// `verdigris serve`'s command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// State directory: inventory, sockets, worker logs.
    #[arg(long, env = "VERDIGRIS_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Create the state directory and an empty inventory if they do not exist (an existing
    /// inventory is used as it is, never replaced).
    #[arg(long)]
    pub init: bool,
    /// The API's unix socket [default: <state-dir>/api.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also serve the API on TCP at ADDR:PORT (requires --token-file).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send (at least 16 characters).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// When the service stops, shut down every VM (turned off after --stop-timeout) instead of
    /// leaving them running.
    #[arg(long)]
    pub stop_vms_on_exit: bool,
    /// Seconds a VM gets for a clean shutdown with --stop-vms-on-exit.
    #[arg(long, default_value_t = 30)]
    pub stop_timeout: u64,
    /// The verdigris executable to start workers from [default: this one].
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,
}

impl From<ServeArgs> for ServeOptions {
    fn from(a: ServeArgs) -> Self {
        ServeOptions {
            state_dir: a.state_dir,
            init: a.init,
            socket: a.socket,
            listen: a.listen,
            token_file: a.token_file,
            worker_exe: a.worker_exe,
            stop_vms_on_exit: a.stop_vms_on_exit,
            stop_timeout_secs: a.stop_timeout,
        }
    }
}

/// Why the service could not run (one line for the user).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

/// `verdigris serve`: runs until SIGINT or SIGTERM; exit code 0, or 1 with one error line.
pub fn serve_main(args: ServeArgs) -> ExitCode {
    match serve(args.into()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verdigris: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the service until SIGINT or SIGTERM.
pub fn serve(opts: ServeOptions) -> Result<(), Error> {
    serve_until(opts, async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut i), Ok(mut t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    })
}

/// Runs the service until `shutdown` completes (on its own runtime).
pub fn serve_until(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vmms")
        .enable_all()
        .build()
        .map_err(|e| Error(format!("cannot start the runtime: {e}")))?;
    let r = rt.block_on(run_inner(opts, shutdown, None));
    // Connection tasks (an attached console, an event stream) end with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

/// The service on the current runtime, until `shutdown` completes.
pub async fn run(opts: ServeOptions, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    run_inner(opts, shutdown, None).await
}

async fn run_inner(
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
    ready: Option<std::sync::mpsc::Sender<()>>,
) -> Result<(), Error> {
    let state = prepare_state_dir(&opts.state_dir, opts.init)?;
    let _lock = LockFile::acquire(&state.join("service.lock"))?;
    let db = db::Db::open(&state.join(INVENTORY), opts.init).map_err(Error)?;
    let worker_exe = match opts.worker_exe.clone() {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| Error(format!("cannot find the verdigris executable: {e}")))?,
    };
    if !worker_exe.is_file() {
        return Err(Error(format!(
            "the worker executable {} does not exist",
            worker_exe.display()
        )));
    }
    let token = match (&opts.listen, &opts.token_file) {
        (Some(_), None) => {
            return Err(Error(
                "--listen needs --token-file: the API is never served on TCP without a token"
                    .into(),
            ))
        }
        (_, Some(f)) => Some(read_token(f)?),
        (None, None) => None,
    };
    let svc = service::Service::open(&state, db, worker_exe)
        .await
        .map_err(Error)?;
    let socket_path = opts
        .socket
        .clone()
        .unwrap_or_else(|| state.join(API_SOCKET));
    let unix = bind_unix(&socket_path)?;
    let tcp = match opts.listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| Error(format!("cannot listen on {a}: {e}")))?,
        ),
        None => None,
    };
    let router = api::router(svc.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(accept_loop(
        Listener::Unix(unix),
        router.clone(),
        stop_rx.clone(),
    )));
    if let (Some(l), Some(t)) = (tcp, token) {
        let addr = l.local_addr().ok();
        tasks.push(tokio::spawn(accept_loop(
            Listener::Tcp(l),
            api::with_token(router.clone(), t),
            stop_rx.clone(),
        )));
        if let Some(a) = addr {
            eprintln!("verdigris: API on tcp:{a} (bearer token required)");
        }
    }
    eprintln!(
        "verdigris: serving the API on unix:{} (state directory {})",
        socket_path.display(),
        state.display()
    );
    if let Some(r) = ready {
        let _ = r.send(());
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&socket_path);
    if opts.stop_vms_on_exit {
        eprintln!("verdigris: stopping every VM (--stop-vms-on-exit)");
        svc.stop_all(opts.stop_timeout_secs).await;
    } else {
        eprintln!("verdigris: service stopped; running VMs keep running and are re-adopted at the next start");
    }
    Ok(())
}

/// Checks the state directory; creates it only with `init`.
fn prepare_state_dir(dir: &Path, init: bool) -> Result<PathBuf, Error> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error(format!(
                "the state directory {} is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !init {
                return Err(Error(format!(
                    "the state directory {} does not exist (for a new one: verdigris serve --init --state-dir {})",
                    dir.display(),
                    dir.display()
                )));
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error(format!("cannot create {}: {e}", dir.display())))?;
        }
        Err(e) => return Err(Error(format!("{}: {e}", dir.display()))),
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| Error(format!("{}: {e}", dir.display())))?;
    let inventory = dir.join(INVENTORY);
    if !inventory.exists() && dir.join("vms").exists() {
        return Err(Error(format!(
            "the state directory {} has VM directories but no inventory ({INVENTORY}): it is damaged; restore the inventory from a backup (nothing was changed)",
            dir.display()
        )));
    }
    if !inventory.exists() && !init {
        return Err(Error(format!(
            "{} holds no inventory ({INVENTORY}) (for a new state directory: verdigris serve --init)",
            dir.display()
        )));
    }
    // Unix socket paths are limited to 107 bytes: `<state>/vms/<36-char id>/control.sock`.
    let longest = worker::WorkerPaths::new(&dir, &uuid::Uuid::nil().to_string())
        .control
        .as_os_str()
        .len();
    if longest > 107 {
        return Err(Error(format!(
            "the state directory path {} is too long for the workers' unix sockets",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir.join("vms"))
        .map_err(|e| Error(format!("cannot create {}/vms: {e}", dir.display())))?;
    Ok(dir)
}

fn read_token(f: &Path) -> Result<String, Error> {
    let t = std::fs::read_to_string(f)
        .map_err(|e| Error(format!("token file {}: {e}", f.display())))?;
    let t = t.trim().to_string();
    if t.len() < 16 || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error(format!(
            "the token in {} must be at least 16 characters without white space",
            f.display()
        )));
    }
    Ok(t)
}

/// Binds the API socket, replacing a stale one (never a live one, never another kind of file).
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(Error(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error(format!(
                "another service is listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| Error(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error(format!("{}: {e}", path.display())))?;
    Ok(l)
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

async fn accept_loop(
    l: Listener,
    router: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = async {
                match &l {
                    Listener::Unix(u) => u.accept().await.map(|(s, _)| Conn::Unix(s)),
                    Listener::Tcp(t) => t.accept().await.map(|(s, _)| Conn::Tcp(s)),
                }
            } => a,
        };
        match accepted {
            Ok(Conn::Unix(s)) => serve_conn(s, router.clone()),
            Ok(Conn::Tcp(s)) => serve_conn(s, router.clone()),
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

fn serve_conn<S>(s: S, router: axum::Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // A request received whole is carried out whole, even if its client has already
        // closed its end (the answer is then lost, the operation is not).
        .half_close(true)
        .max_buf_size(64 << 10)
        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
        .with_upgrades();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection: {e}");
        }
    });
}

/// `<state>/service.lock`: one service per state directory (two would both adopt the same
/// workers). Released when the process ends, however it ends.
struct LockFile(#[allow(dead_code)] std::fs::File);

impl LockFile {
    fn acquire(path: &Path) -> Result<LockFile, Error> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error(format!("{}: {e}", path.display())))?;
        // SAFETY: flock(2) on a file descriptor we own, for the life of `f`.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            return Err(Error(format!(
                "another verdigris service (pid {}) is using this state directory",
                pid.trim()
            )));
        }
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = write!(f, "{}", std::process::id());
        Ok(LockFile(f))
    }
}

/// A handle on a service run in-process on its own thread (tests, benchmarks).
pub struct ServiceThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), Error>>>,
    pub socket: PathBuf,
}

impl ServiceThread {
    /// Starts the service and waits until its socket answers.
    pub fn start(opts: ServeOptions) -> Result<ServiceThread, Error> {
        let socket = opts
            .socket
            .clone()
            .unwrap_or_else(|| opts.state_dir.join(API_SOCKET));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmms-service".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("vmms")
                    .enable_all()
                    .build()
                    .map_err(|e| Error(format!("cannot start the runtime: {e}")))?;
                let shutdown = async {
                    let _ = rx.await;
                };
                let r = rt.block_on(run_inner(opts, shutdown, Some(ready_tx)));
                rt.shutdown_timeout(Duration::from_secs(1));
                r
            })
            .map_err(|e| Error(e.to_string()))?;
        // Either the service is ready, or it ended (and dropped the sender) with its error.
        if ready_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            return match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(Error("the service did not come up".into())),
            };
        }
        Ok(ServiceThread {
            stop: Some(tx),
            thread: Some(thread),
            socket,
        })
    }

    /// Stops the service (VMs keep running unless it was started with `stop_vms_on_exit`).
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error("the service thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for ServiceThread {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}
