//! Shared helpers of the integration tests: the `verdigris` executable (for workers), the test
//! guest, a service on a temporary state directory, the CLI, and raw HTTP on the API socket.
//!
//! The workers are started from the `verdigris` executable: `$VERDIGRIS_BIN` if set, else
//! `<target dir>/<profile>/verdigris` next to this test (a workspace `cargo test` builds it);
//! when missing it is built with `cargo build -p verdigris` (with `--release` for a release
//! test build).
#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vmms::cli::{ApiArgs, Cli};

pub use test_guest_build::repo_root;

/// The `verdigris` executable workers are started from.
pub fn verdigris_bin() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        if let Some(p) = std::env::var_os("VERDIGRIS_BIN") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "VERDIGRIS_BIN={} does not exist", p.display());
            return p;
        }
        // <target>/<profile>/deps/<this test>
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let target_dir = profile_dir.parent().unwrap().to_path_buf();
        let bin = profile_dir.join("verdigris");
        if !bin.is_file() {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.args(["build", "--quiet", "-p", "verdigris", "--target-dir"])
                .arg(&target_dir)
                .current_dir(repo_root());
            if release {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("running cargo build -p verdigris");
            assert!(st.success(), "building the verdigris executable failed");
        }
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

pub use test_guest_build::test_guest;

/// What a CLI verb did.
#[derive(Debug)]
pub struct Out {
    pub code: u8,
    pub out: String,
    pub err: String,
}

/// A service (in-process, or none) on a temporary state directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub service: Option<vmms::ServiceThread>,
}

impl Env {
    /// A fresh state directory and a service on it (VMs are turned off when it stops).
    pub fn new() -> Env {
        let e = Env::without_service();
        let mut e = e;
        e.start_service();
        e
    }

    pub fn without_service() -> Env {
        let dir = tempfile::Builder::new().prefix("vmms").tempdir().unwrap();
        let state = dir.path().join("state");
        Env {
            socket: state.join("api.sock"),
            state,
            dir,
            service: None,
        }
    }

    pub fn options(&self) -> vmms::ServeOptions {
        let mut o = vmms::ServeOptions::new(&self.state);
        o.init = true;
        o.worker_exe = Some(verdigris_bin().to_path_buf());
        o.stop_vms_on_exit = true;
        o.stop_timeout_secs = 0;
        o
    }

    pub fn start_service(&mut self) {
        let o = self.options();
        self.start_service_with(o);
    }

    pub fn start_service_with(&mut self, o: vmms::ServeOptions) {
        self.service = Some(vmms::ServiceThread::start(o).expect("starting the service"));
    }

    pub fn api(&self) -> ApiArgs {
        ApiArgs {
            api: self.socket.display().to_string(),
            api_token_file: None,
        }
    }

    /// Runs a CLI verb, e.g. `cli(&["start-vm", "a"])`.
    pub fn cli(&self, args: &[&str]) -> Out {
        cli_with(&self.api(), args)
    }

    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        http(&self.socket, method, path, body)
    }

    /// GET /v1/vms/NAME, which must succeed.
    pub fn vm(&self, name: &str) -> Value {
        let (s, v) = self.http("GET", &format!("/v1/vms/{name}"), None);
        assert_eq!(s, 200, "{v}");
        v
    }

    pub fn state_of(&self, name: &str) -> String {
        self.vm(name)["state"].as_str().unwrap().to_string()
    }

    /// Waits until the VM is in `state`; returns the VM.
    pub fn wait_state(&self, name: &str, state: &str, limit: Duration) -> Value {
        let end = Instant::now() + limit;
        loop {
            let v = self.vm(name);
            if v["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < end,
                "VM {name} did not become {state}: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Defines a test-guest VM running `test=<test>`.
    pub fn new_guest_vm(&self, name: &str, test: &str) {
        let g = test_guest().display().to_string();
        let o = self.cli(&[
            "new-vm",
            name,
            "--kernel",
            &g,
            "--cmdline",
            &format!("test={test}"),
            "--memory",
            "64M",
        ]);
        assert_eq!(o.code, 0, "{o:?}");
    }

    pub fn events(&self, name: &str) -> Vec<Value> {
        let (s, v) = self.http("GET", &format!("/v1/events?vm={name}&limit=1000"), None);
        assert_eq!(s, 200, "{v}");
        v.as_array().unwrap().clone()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.service.take() {
            let _ = s.stop();
        }
        kill_workers_under(&self.state);
    }
}

/// Kills every process whose command line mentions `dir` (workers a failed test left).
pub fn kill_workers_under(dir: &Path) {
    let want = dir.as_os_str().as_encoded_bytes().to_vec();
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmd.windows(want.len()).any(|w| w == want.as_slice()) {
            // SAFETY: kill(2) of a process started for this test's state directory.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

pub fn cli_with(api: &ApiArgs, args: &[&str]) -> Out {
    use clap::Parser;
    let mut argv = vec!["verdigris"];
    argv.extend_from_slice(args);
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            return Out {
                code: 2,
                out: String::new(),
                err: e.to_string(),
            }
        }
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = vmms::cli::execute(api, cli.command, &mut out, &mut err);
    Out {
        code,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// One HTTP request on a fresh connection: (status, JSON body or Null).
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut s = UnixStream::connect(socket).expect("connecting to the API socket");
    raw_exchange(&mut s, method, path, body, &[])
}

pub fn raw_exchange<S: Read + Write>(
    s: &mut S,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    parse_response(&resp)
}

pub fn parse_response(resp: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(resp);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    (status, v)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Attaches to a VM's console through the API (raw upgrade); returns the stream after the 101.
pub fn console(socket: &Path, vm: &str) -> Result<UnixStream, (u16, Value)> {
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "GET /v1/vms/{vm}/console HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: verdigris-console\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    if text.starts_with("HTTP/1.1 101") {
        return Ok(s);
    }
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    head.extend(rest);
    Err(parse_response(&head))
}

/// Reads from `s` until `pattern` has been seen (or the time is up); returns all bytes.
pub fn read_until(s: &mut UnixStream, pattern: &str, limit: Duration) -> String {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if String::from_utf8_lossy(&got).contains(pattern) {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Is /dev/kvm usable? (Tests that boot guests need it.)
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
