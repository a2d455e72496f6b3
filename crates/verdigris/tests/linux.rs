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

impl Vm {
    /// Waits (generously) for the worker to exit; its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(20 * 60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "the VM did not power off");
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn boot(a: &HashMap<String, String>, dir: &Path, name: &str, script: &str, disks: bool) -> Vm {
    let console = dir.join(format!("{name}.com1"));
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = verdigris();
    cmd.args(["run", "--kernel", &a["KERNEL"], "--initrd", &a["INITRD"]])
        // A user's plain command line plus the initramfs's script selector: whatever this
        // host needs of the guest, the worker adds itself.
        .arg("--cmdline")
        .arg(format!("console=ttyS0 verdigris.script={script}"))
        .args(["--memory", "512M", "--cpus", "2"]);
    if disks {
        cmd.arg("--disk")
            .arg(dir.join("disk.vhdx"))
            .arg("--disk")
            .arg(format!("{},ro", dir.join("ro.raw").display()));
    }
    let child = cmd
        .arg("--serial")
        .arg(format!("file:{}", console.display()))
        .arg("--control")
        .arg(&sock)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    Vm {
        child,
        console,
        sock,
    }
}

/// "verdigris-guest: md5 <sum> <file>" lines.
fn checksums(console: &str) -> Vec<(String, String)> {
    console
        .lines()
        .filter_map(|l| l.split("verdigris-guest: md5 ").nth(1))
        .filter_map(|r| r.trim().split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
#[ignore = "boots the stock Debian kernel: tens of minutes on hosts that emulate guest ring 0; run with VERDIGRIS_LINUX_TESTS=1 scripts/test.sh or cargo test --release --test linux -- --ignored"]
fn stock_kernel_boots_and_uses_vmbus_integration_services_until_shut_down_by_the_host() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&a, dir.path(), "ic", "ic", false);

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

#[test]
#[ignore = "boots the stock Debian kernel: tens of minutes on hosts that emulate guest ring 0; run with VERDIGRIS_LINUX_TESTS=1 scripts/test.sh or cargo test --release --test linux -- --ignored"]
fn stock_kernel_keeps_files_on_a_vhdx_through_storvsc_across_boots() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    // A 64 MiB dynamic VHDX (read-write) and a 16 MiB raw disk with a pattern (read-only).
    let o = verdigris()
        .args(["new-vhd"])
        .arg(dir.path().join("disk.vhdx"))
        .args(["--size", "64M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ro: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("ro.raw"), &ro).unwrap();
    let ro_md5 = md5_hex(&ro[..1 << 20]);

    // First boot: ext4 made on the VHDX through hv_storvsc, files written; the read-only LUN
    // reads back our bytes and refuses writes. The script then powers off.
    let mut vm = boot(&a, dir.path(), "first", "storage1", true);
    let c = vm.wait_console("the storage step", |c| {
        c.contains("verdigris-guest: ro write")
            || c.contains("verdigris-guest: script storage1 exit")
    });
    assert!(
        c.contains("verdigris-guest: storage written"),
        "{}",
        tail(&c, 3000)
    );
    assert!(
        c.contains(&format!("verdigris-guest: ro md5 {ro_md5}")),
        "{}",
        tail(&c, 3000)
    );
    assert!(
        c.contains("verdigris-guest: ro write refused"),
        "{}",
        tail(&c, 3000)
    );
    let written = checksums(&c);
    assert_eq!(written.len(), 3, "{}", tail(&c, 3000));
    assert_eq!(vm.wait_exit(), Some(0));
    drop(vm);

    // The VHDX is consistent for qemu-img after the guest's writes and a clean power-off...
    let q = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(dir.path().join("disk.vhdx"))
        .output()
        .expect("qemu-img");
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stdout));
    // ...and a second boot reads every file back byte-exact.
    let mut vm = boot(&a, dir.path(), "second", "storage2", true);
    let c = vm.wait_console("the read-back", |c| {
        c.contains("verdigris-guest: storage read back") || c.contains("storage FAILED")
    });
    assert!(
        c.contains("verdigris-guest: storage read back"),
        "{}",
        tail(&c, 3000)
    );
    assert_eq!(checksums(&c), written);
    assert_eq!(vm.wait_exit(), Some(0));
}

/// MD5 as busybox's md5sum prints it (a tiny local implementation: RFC 1321).
fn md5_hex(data: &[u8]) -> String {
    let s: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4294967296.0) as u32)
        .collect();
    let (mut a0, mut b0, mut c0, mut d0) =
        (0x67452301u32, 0xefcdab89u32, 0x98badcfeu32, 0x10325476u32);
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_le_bytes());
    for chunk in msg.chunks(64) {
        let m: Vec<u32> = chunk
            .chunks(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(k[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(s[i]));
        }
        a0 = a0.wrapping_add(a);
        b0 = b0.wrapping_add(b);
        c0 = c0.wrapping_add(c);
        d0 = d0.wrapping_add(d);
    }
    [a0, b0, c0, d0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn md5_matches_the_reference_vectors() {
    assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    let long = vec![b'a'; 1000];
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("head -c 1000 /dev/zero | tr '\\0' a | md5sum")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&md5_hex(&long)));
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
