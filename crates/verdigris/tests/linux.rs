//! The stock Debian cloud kernel, unmodified, as a real client: one boot on 2 VPs, shared by
//! every check (it takes minutes on our hosts). Needs the assets from
//! `guests/linux/fetch-assets.sh` (the test suite's script fetches them first).
//!
//! The guest runs `/etc/verdigris.d/ic.sh` from our initramfs: it reports its kernel and CPU
//! count, the VMBus devices it found, sets its clock back to 2001, then reports the year and
//! its KVP pool every two seconds. The host side drives it through the worker's control socket.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

fn assets() -> HashMap<String, String> {
    let cache = std::env::var("VERDIGRIS_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/verdigris", std::env::var("HOME").unwrap()));
    let env = std::fs::read_to_string(format!("{cache}/linux/assets.env")).unwrap_or_else(|e| {
        panic!("guest assets missing ({e}): run guests/linux/fetch-assets.sh first")
    });
    env.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn control(sock: &Path, req: Value) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("control socket");
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or(Value::Null)
}

struct Vm {
    child: std::process::Child,
    console: std::path::PathBuf,
    sock: std::path::PathBuf,
}

impl Vm {
    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Polls the console until `pred` holds; generous deadline, never a timing assertion.
    fn wait_console(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(40 * 60);
        loop {
            let c = self.console();
            if pred(&c) {
                return c;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!(
                    "the VM ended ({s}) before {what}; console:\n{}",
                    tail(&c, 4000)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what}; console:\n{}",
                tail(&c, 4000)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Repeats a control request until `pred` accepts the answer.
    fn poll_control(&mut self, what: &str, req: Value, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20 * 60);
        loop {
            let v = control(&self.sock, req.clone());
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: last answer {v}; console:\n{}",
                tail(&self.console(), 3000)
            );
            std::thread::sleep(Duration::from_secs(3));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[test]
fn stock_kernel_boots_uses_vmbus_integration_services_and_shuts_down_on_request() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("com1");
    let sock = dir.path().join("control.sock");
    let child = verdigris()
        .args(["run", "--kernel", &a["KERNEL"], "--initrd", &a["INITRD"]])
        // A user's plain command line plus the initramfs's script selector: whatever this
        // host needs of the guest, the worker adds itself.
        .args(["--cmdline", "console=ttyS0 verdigris.script=ic"])
        .args(["--memory", "512M", "--cpus", "2"])
        .arg("--serial")
        .arg(format!("file:{}", console.display()))
        .arg("--control")
        .arg(&sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut vm = Vm {
        child,
        console,
        sock,
    };

    // Issue 2: the kernel boots, reaches user space on 2 VPs and runs commands.
    let want = format!(
        "verdigris-guest: smoke uname={} cpus=2",
        a["KERNEL_VERSION"]
    );
    let c = vm.wait_console("user space", |c| c.contains(&want));
    assert!(c.contains("Linux version"), "kernel banner");
    assert!(
        c.contains("Hypervisor detected: Microsoft Hyper-V"),
        "enlightened by default"
    );

    // Issue 3: VMBus offers, with the integration services' class GUIDs.
    let c = vm.wait_console("the VMBus device list", |c| {
        c.contains("verdigris-guest: ic ready")
    });
    assert!(
        c.contains("verdigris-guest: vmbus loaded"),
        "{}",
        tail(&c, 3000)
    );
    for class in [
        "57164f39-9115-4e78-ab55-382f3bd5422d", // heartbeat
        "0e0b6031-5213-4934-818b-38d90ced39db", // shutdown
        "9527e630-d0ae-497b-adce-e80ab0175caf", // time synchronization
        "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6", // KVP
    ] {
        assert!(
            c.contains(&format!("verdigris-guest: vmbus device {{{class}}}")),
            "offer {class} not seen in /sys/bus/vmbus/devices:\n{}",
            tail(&c, 3000)
        );
    }
    // The host sees heartbeats.
    vm.poll_control("heartbeat", json!({"op": "heartbeat"}), |v| {
        v["heartbeat"]["status"] == "healthy"
    });
    // Time sync moves the wrong guest clock (2001) to host time.
    assert!(c.contains("verdigris-guest: clock set back to 2001"));
    let r = control(&vm.sock, json!({"op": "timesync"}));
    assert_eq!(r["ok"], true, "{r}");
    let year = {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        1970 + secs / 31_556_952
    };
    vm.wait_console("the clock corrected by time sync", |c| {
        c.contains(&format!("verdigris-guest: year {year}"))
    });
    // KVP: an item the host writes appears in the guest's pool file...
    let r = vm.poll_control(
        "kvp-set",
        json!({"op": "kvp-set", "pool": 0, "key": "VerdigrisTest", "value": "hello-from-host"}),
        |v| v["ok"] == true,
    );
    assert_eq!(r["ok"], true);
    vm.wait_console("the host's KVP item in the guest pool", |c| {
        c.contains("VerdigrisTest hello-from-host")
    });
    // ...and the guest's own items (host name, OS) are visible on the host.
    let v = vm.poll_control("kvp-list auto", json!({"op": "kvp-list", "pool": 2}), |v| {
        v["items"]["FullyQualifiedDomainName"].is_string()
    });
    let fqdn = v["items"]["FullyQualifiedDomainName"]
        .as_str()
        .unwrap_or("");
    assert!(fqdn.starts_with("verdigris-guest"), "{v}");
    assert!(v["items"]["OSName"].is_string(), "{v}");

    // A host-requested clean shutdown: the guest's own shutdown path runs, exit code 0.
    let r = control(&vm.sock, json!({"op": "shutdown"}));
    assert_eq!(r["via"], "shutdown integration service", "{r}");
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    let status = loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no power-off after the shutdown request"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let mut err = String::new();
    vm.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let c = vm.console();
    assert!(
        c.contains("verdigris-guest: orderly power-off requested"),
        "{}",
        tail(&c, 2000)
    );
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("the guest powered off"), "{err}");
    assert!(err.contains("quirks handled:"), "{err}");
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
