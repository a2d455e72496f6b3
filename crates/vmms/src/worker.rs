//! Worker processes as the service sees them: spawning one detached per VM, talking to its
//! control socket, telling whether a recorded process is still that worker, waiting for it to
//! end, and turning how it ended into a reason a user can read.

use crate::db::WorkerRecord;
use crate::model::{Boot, Vm};
use serde_json::Value;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The `verdigris` subcommand that runs one VM.
pub const WORKER_SUBCOMMAND: &str = "run";

/// Longest answer read from a control socket.
const MAX_REPLY: u64 = 1 << 20;

/// Files of one VM's worker, under `<state>/vms/<id>/`.
#[derive(Debug, Clone)]
pub struct WorkerPaths {
    pub dir: PathBuf,
    pub control: PathBuf,
    pub console: PathBuf,
    pub log: PathBuf,
}

impl WorkerPaths {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        let dir = state_dir.join("vms").join(id);
        WorkerPaths {
            control: dir.join("control.sock"),
            console: dir.join("console.sock"),
            log: dir.join("worker.log"),
            dir,
        }
    }
}

/// The worker's command line for `vm` (after the executable).
pub fn worker_args(vm: &Vm, p: &WorkerPaths) -> Vec<String> {
    let Boot::Linux {
        kernel,
        initrd,
        cmdline,
    } = &vm.boot;
    let mut a = vec![
        WORKER_SUBCOMMAND.to_string(),
        "--kernel".into(),
        kernel.clone(),
    ];
    if let Some(i) = initrd {
        a.push("--initrd".into());
        a.push(i.clone());
    }
    a.extend([
        "--cmdline".into(),
        cmdline.clone(),
        "--memory".into(),
        format!("{}M", vm.memory_bytes >> 20),
        "--cpus".into(),
        vm.processors.to_string(),
        "--serial".into(),
        format!("unix:{}", p.console.display()),
        "--control".into(),
        p.control.display().to_string(),
        "--on-reboot".into(),
        "restart".into(),
    ]);
    if !vm.enlightenments {
        a.push("--no-enlightenments".into());
    }
    // Each disk at its own controller and LUN, in (controller, LUN) order.
    let mut disks: Vec<_> = vm.disks.iter().collect();
    disks.sort_by_key(|d| (d.controller, d.lun));
    for d in disks {
        a.push("--disk".into());
        a.push(format!(
            "{},controller={},lun={}{}",
            d.path,
            d.controller,
            d.lun,
            if d.read_only { ",ro" } else { "" }
        ));
    }
    if !vm.integration_services {
        a.extend(
            [
                "--no-heartbeat",
                "--no-shutdown-service",
                "--no-timesync",
                "--no-kvp",
            ]
            .map(String::from),
        );
    }
    a
}

/// Starts a worker in its own session (so it outlives the service and no terminal signal
/// reaches it), stdin from /dev/null, stdout and stderr appended to its log.
pub fn spawn(
    exe: &Path,
    args: &[String],
    p: &WorkerPaths,
) -> std::io::Result<(tokio::process::Child, WorkerRecord)> {
    use std::io::Write;
    std::fs::create_dir_all(&p.dir)?;
    // Stale sockets of a worker that was killed: the worker would replace them, but a client
    // must not reach a dead one meanwhile.
    let _ = std::fs::remove_file(&p.control);
    let _ = std::fs::remove_file(&p.console);
    rotate_log(&p.log);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)?;
    writeln!(
        log,
        "=== {} starting worker: {} {}",
        crate::model::format_time_ms(crate::model::now_ms()),
        exe.display(),
        args.join(" ")
    )?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2),
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0) as i32;
    let start_ticks = proc_start_ticks(pid).unwrap_or(0);
    Ok((
        child,
        WorkerRecord {
            pid,
            start_ticks,
            started_ms: crate::model::now_ms(),
        },
    ))
}

/// Keeps the log from growing without bound: past 1 MiB it becomes `worker.log.1`.
fn rotate_log(log: &Path) {
    if std::fs::metadata(log)
        .map(|m| m.len() > 1 << 20)
        .unwrap_or(false)
    {
        let _ = std::fs::rename(log, log.with_extension("log.1"));
    }
}

/// Fields of `/proc/PID/stat` after the command name: (state, start time in clock ticks).
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, start))
}

pub fn proc_start_ticks(pid: i32) -> Option<u64> {
    proc_stat(pid).map(|(_, t)| t)
}

/// Is `rec` still the same, living worker process (not a zombie, not a recycled pid), and is
/// it the worker of the VM whose control socket is `control`?
pub fn is_same_worker(rec: &WorkerRecord, control: &Path) -> bool {
    match proc_stat(rec.pid) {
        Some((state, ticks)) if state != 'Z' && state != 'X' && ticks == rec.start_ticks => {}
        _ => return false,
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", rec.pid)) else {
        return false;
    };
    let want = control.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// Is the process alive (exists and not a zombie)?
pub fn alive(pid: i32, ticks: u64) -> bool {
    matches!(proc_stat(pid), Some((s, t)) if s != 'Z' && s != 'X' && t == ticks)
}

/// Waits until a process that is not our child ends (pidfd; /proc polling where pidfds are
/// unavailable).
pub async fn wait_foreign(pid: i32, ticks: u64) {
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `owned` is an open pidfd that the AsyncFd owns until it is dropped; its
        // `as_raw_fd` always returns that same descriptor.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
        };
        if let Ok(afd) = registered {
            // The pidfd turns readable when the process ends. It was opened after we checked
            // the start time, so re-check that it is still the same process.
            if alive(pid, ticks) {
                let _ = afd.readable().await;
            }
            return;
        }
    }
    while alive(pid, ticks) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Sends SIGKILL to the worker if it is still the recorded process.
pub fn kill(rec: &WorkerRecord) {
    if alive(rec.pid, rec.start_ticks) {
        // SAFETY: kill(2) on a pid we checked is our worker just now.
        unsafe {
            libc::kill(rec.pid, libc::SIGKILL);
        }
    }
}

/// One request on the worker's control socket; returns the answer without `ok`, or the
/// worker's error message.
pub async fn control(path: &Path, req: &Value, timeout: Duration) -> Result<Value, ControlError> {
    let fut = async {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| ControlError::Unreachable(e.to_string()))?;
        let (r, mut w) = s.into_split();
        let mut line = serde_json::to_vec(req).unwrap_or_default();
        line.push(b'\n');
        w.write_all(&line)
            .await
            .map_err(|e| ControlError::Unreachable(e.to_string()))?;
        let mut reader = BufReader::new(r.take(MAX_REPLY));
        let mut buf = String::new();
        let n = reader
            .read_line(&mut buf)
            .await
            .map_err(|e| ControlError::Unreachable(e.to_string()))?;
        if n == 0 {
            return Err(ControlError::Unreachable(
                "the worker closed the connection".into(),
            ));
        }
        let mut v: Value = serde_json::from_str(buf.trim())
            .map_err(|e| ControlError::Failed(format!("malformed answer from the worker: {e}")))?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            if let Some(o) = v.as_object_mut() {
                o.remove("ok");
            }
            Ok(v)
        } else {
            Err(ControlError::Failed(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the worker refused the request")
                    .to_string(),
            ))
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ControlError::Unreachable(format!(
            "no answer within {} s",
            timeout.as_secs()
        ))),
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    /// The socket did not answer (the worker is gone or hung).
    #[error("the worker's control socket did not answer: {0}")]
    Unreachable(String),
    /// The worker answered with an error.
    #[error("{0}")]
    Failed(String),
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Not our child (re-adopted): the status is not known.
    Unknown,
}

impl Exit {
    pub fn from_status(s: std::process::ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            _ => Exit::Unknown,
        }
    }
}

/// The reason (and whether it is a failure) for a worker that ended with `exit`, using its
/// log's last message for details.
pub fn exit_reason(exit: Exit, log: &Path) -> (String, bool) {
    let last = last_message(log);
    let detail = |base: &str| match &last {
        Some(m) => format!("{base}: {m}"),
        None => base.to_string(),
    };
    match exit {
        Exit::Code(0) => (last.unwrap_or_else(|| "the worker ended".into()), false),
        Exit::Code(1) => (detail("the worker failed (exit code 1)"), true),
        Exit::Code(2) => (
            detail("the worker refused its configuration (exit code 2)"),
            true,
        ),
        Exit::Code(3) => (detail("the guest triple-faulted (exit code 3)"), true),
        Exit::Code(4) => (
            detail("the guest did something the VM cannot handle (exit code 4)"),
            true,
        ),
        Exit::Code(c) => (detail(&format!("the worker exited with code {c}")), true),
        Exit::Signal(s) => (
            format!(
                "worker exited unexpectedly (signal {s}{})",
                signal_name(s).map(|n| format!(", {n}")).unwrap_or_default()
            ),
            true,
        ),
        Exit::Unknown => match last {
            Some(m) if is_clean_message(&m) => (m, false),
            Some(m) => (
                format!("the worker ended while the service was not its parent: {m}"),
                true,
            ),
            None => (
                "worker exited unexpectedly (no exit message: killed?)".into(),
                true,
            ),
        },
    }
}

fn signal_name(s: i32) -> Option<&'static str> {
    Some(match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGBUS => "SIGBUS",
        _ => return None,
    })
}

fn is_clean_message(m: &str) -> bool {
    m == "the guest powered off" || m == "turned off" || m == "stopped by the user"
}

/// The worker's last own message in its log (lines `verdigris: ...`, without the host notes
/// and the counter report), trimmed to one short line.
pub fn last_message(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(16 << 10))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    // Only this start's part of the log.
    let text = text.rsplit("=== ").next().unwrap_or(&text);
    let line = text.lines().rev().find_map(|l| {
        let m = l.strip_prefix("verdigris: ")?;
        let boring = m.starts_with("quirks handled:")
            || m.starts_with("host:")
            || m.starts_with("adding kernel parameter");
        (!boring).then_some(m)
    })?;
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let mut s: String = line.chars().filter(|c| !c.is_control()).take(300).collect();
    if line.chars().count() > 300 {
        s.push('…');
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Disk;

    #[test]
    fn reasons_from_exit_and_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        std::fs::write(
            &log,
            "=== old start\nverdigris: triple fault\n=== 2026 starting worker: x\nverdigris: host: ...\nverdigris: the guest powered off\nverdigris: quirks handled: none; syscall fix-ups: 0\n",
        )
        .unwrap();
        assert_eq!(
            exit_reason(Exit::Code(0), &log),
            ("the guest powered off".into(), false)
        );
        assert!(!exit_reason(Exit::Unknown, &log).1);
        let (r, crit) = exit_reason(Exit::Signal(9), &log);
        assert!(crit);
        assert_eq!(r, "worker exited unexpectedly (signal 9, SIGKILL)");
        std::fs::write(
            &log,
            "=== s\nverdigris: error: --cpus 300 is more than this host supports (255)\n",
        )
        .unwrap();
        let (r, crit) = exit_reason(Exit::Code(2), &log);
        assert!(crit);
        assert!(
            r.ends_with("--cpus 300 is more than this host supports (255)"),
            "{r}"
        );
        let (r, crit) = exit_reason(Exit::Unknown, &dir.path().join("none"));
        assert!(crit && r.contains("unexpectedly"), "{r}");
    }

    #[test]
    fn worker_args_place_disks_and_switch_integration_services() {
        let mut vm = crate::model::test_vm("a");
        vm.processors = 2;
        vm.disks = vec![
            Disk {
                controller: 1,
                lun: 0,
                path: "/b.vhdx".into(),
                read_only: false,
            },
            Disk {
                controller: 0,
                lun: 5,
                path: "/a.raw".into(),
                read_only: true,
            },
        ];
        let p = WorkerPaths::new(Path::new("/state"), "id");
        let a = worker_args(&vm, &p);
        let disks: Vec<&str> = a
            .windows(2)
            .filter(|w| w[0] == "--disk")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            disks,
            ["/a.raw,controller=0,lun=5,ro", "/b.vhdx,controller=1,lun=0"]
        );
        assert!(!a.iter().any(|x| x.starts_with("--no-")), "{a:?}");
        vm.integration_services = false;
        vm.enlightenments = false;
        let a = worker_args(&vm, &p);
        for f in [
            "--no-heartbeat",
            "--no-shutdown-service",
            "--no-timesync",
            "--no-kvp",
            "--no-enlightenments",
        ] {
            assert!(a.iter().any(|x| x == f), "{f} missing: {a:?}");
        }
    }

    #[test]
    fn own_process_is_alive_and_not_our_worker() {
        let me = std::process::id() as i32;
        let t = proc_start_ticks(me).unwrap();
        assert!(alive(me, t));
        assert!(!alive(me, t + 1), "another start time is another process");
        let rec = WorkerRecord {
            pid: me,
            start_ticks: t,
            started_ms: 0,
        };
        assert!(!is_same_worker(
            &rec,
            Path::new("/nonexistent/control.sock")
        ));
        assert!(!alive(0, 0));
    }
}
