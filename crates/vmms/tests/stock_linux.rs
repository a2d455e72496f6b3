//! The stock Debian cloud kernel, unmodified, as the real client of everything below the
//! service: one VM managed by `verdigris serve`, one boot on 2 VPs shared by every check (a
//! boot takes many minutes on hosts that emulate guest ring 0). Needs the guest assets from
//! `guests/linux/fetch-assets.sh` (the test suite's script fetches them first).
//!
//! The guest runs `/etc/verdigris.d/checks.sh` from our initramfs: it reports its kernel and
//! CPU count and the VMBus devices it found, uses the two SCSI disks the VM has (ext4 on a
//! VHDX, a read-only raw disk), sets its clock back to 2001, then reports the year and its KVP
//! pool every two seconds until the host shuts it down. A second boot (`readback.sh`, with the
//! integration services turned off) checks the file system and reads the files back.
//!
//! What it shows, by issue: the foundation (boot to user space on 2 VPs, commands run, power-off
//! ends the worker with exit 0 and the quirk counts), VMBus and the integration services
//! (offers with their class GUIDs, heartbeat, time sync through the worker's control socket,
//! KVP both ways, a clean shutdown through the shutdown service), storage (ext4 through
//! hv_storvsc on a VHDX that `qemu-img check` then finds consistent and that holds the guest's
//! file; a read-only LUN) and the management service (the VM's definition, start, the API's
//! console, heartbeat and KVP endpoints, the emulation counters, a clean stop-vm, the event log).

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
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

/// One request on a worker's own control socket (JSON lines).
fn worker_control(sock: &Path, req: Value) -> Value {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("worker control socket");
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or(Value::Null)
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// "verdigris-guest: <tag> <sum> <file>" lines.
fn checksums(console: &str, tag: &str) -> Vec<(String, String)> {
    let tag = format!("verdigris-guest: {tag} ");
    console
        .lines()
        .filter_map(|l| l.split(tag.as_str()).nth(1))
        .filter_map(|r| r.trim().split_once(' '))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Asserts that the console has the guest's line "verdigris-guest: {line}" (or a line that
/// starts so), showing the console's end if not.
fn assert_guest_said(c: &str, line: &str) {
    assert!(
        c.contains(&format!("verdigris-guest: {line}")),
        "the guest did not say '{line}'; console:\n{}",
        tail(c, 3000)
    );
}

/// The VM's serial console, read through the service's API by a background thread.
struct Console {
    text: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    fn attach(env: &Env, vm: &str) -> Console {
        let mut s = console(&env.socket, vm).expect("console attach through the API");
        let text = Arc::new(Mutex::new(Vec::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Console { text }
    }

    fn get(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }

    /// Polls until `pred` holds; a generous deadline, never a timing assertion.
    fn wait(&self, env: &Env, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60 * 60);
        loop {
            let c = self.get();
            if pred(&c) {
                return c;
            }
            let state = env.state_of("linux");
            // The guest may have printed the line and powered off since the read above.
            if state != "Running" {
                let c = self.get();
                if pred(&c) {
                    return c;
                }
            }
            assert!(
                state == "Running",
                "the VM is {state} before {what}: {}; console:\n{}",
                env.vm("linux")["reason"],
                tail(&c, 4000)
            );
            assert!(
                Instant::now() < deadline,
                "no {what}; console:\n{}",
                tail(&c, 4000)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

/// Reports how far a boot got, for the suite's log and docs/PERFORMANCE.md (never asserted):
/// wall seconds since the test started, and the kernel's own timestamps (guest time, which runs
/// at the VM's time scale) of user space and of the last VMBus driver the initramfs loads.
fn milestone(t0: Instant, what: &str, c: &str) {
    let stamp = |needle: &str| {
        c.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.strip_prefix('['))
            .and_then(|l| l.split(']').next())
            .map(|t| format!("{} s", t.trim()))
            .unwrap_or_else(|| "-".into())
    };
    eprintln!(
        "stock_linux: {what} at {:.0} s wall (guest clock: /init {}, hv_storvsc {})",
        t0.elapsed().as_secs_f64(),
        stamp("Run /init as init process"),
        stamp("registering driver hv_storvsc"),
    );
}

/// `start-vm linux`; once it runs, its id and its console.
fn start(env: &Env) -> (String, Console) {
    let o = env.cli(&["start-vm", "linux"]);
    assert_eq!(o.code, 0, "{o:?}");
    let vm = env.wait_state("linux", "Running", Duration::from_secs(120));
    let id = vm["id"].as_str().unwrap().to_string();
    (id, Console::attach(env, "linux"))
}

/// Repeats an API request until `pred` accepts the answer.
fn poll_http(env: &Env, con: &Console, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    loop {
        let (status, v) = env.http("GET", path, None);
        if status == 200 && pred(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: last answer {status} {v}; console:\n{}",
            tail(&con.get(), 3000)
        );
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn stock_linux_under_the_service_uses_vmbus_integration_services_and_a_vhdx_until_stopped() {
    assert!(have_kvm(), "this test needs /dev/kvm");
    let t0 = Instant::now();
    let a = assets();
    let env = Env::new();
    let dir = env.dir.path();

    // A 64 MiB dynamic VHDX (read-write) and a 16 MiB raw disk with a pattern (read-only).
    let vhdx = dir.join("disk.vhdx");
    let o = std::process::Command::new(verdigris_bin())
        .arg("new-vhd")
        .arg(&vhdx)
        .args(["--size", "64M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ro_path = dir.join("ro.raw");
    let ro: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&ro_path, &ro).unwrap();
    let ro_md5 = md5_hex(&ro[..1 << 20]);

    // The VM: a user's plain command line plus the initramfs's script selector (whatever this
    // host needs of the guest, the worker adds itself).
    let o = env.cli(&[
        "new-vm",
        "linux",
        "--kernel",
        &a["KERNEL"],
        "--initrd",
        &a["INITRD"],
        "--cmdline",
        "console=ttyS0 verdigris.script=checks",
        "--memory",
        "512M",
        "--processors",
        "2",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = env.cli(&["add-disk", "linux", vhdx.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = env.cli(&[
        "add-disk",
        "linux",
        ro_path.to_str().unwrap(),
        "--lun",
        "3",
        "--read-only",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    let (id, con) = start(&env);

    // Foundation: the kernel boots, reaches user space on 2 VPs and runs commands.
    let want = format!(
        "verdigris-guest: smoke uname={} cpus=2",
        a["KERNEL_VERSION"]
    );
    con.wait(&env, "user space", |c| c.contains(&want));
    // The script's host-independent part: the device list and the storage checks.
    let c = con.wait(&env, "the guest's checks", |c| {
        c.contains("verdigris-guest: ready for the host")
    });
    milestone(t0, "first boot: the guest's own checks done", &c);
    assert!(c.contains("Linux version"), "kernel banner");
    assert!(
        c.contains("Hypervisor detected: Microsoft Hyper-V"),
        "enlightened by default"
    );
    assert_guest_said(&c, "vmbus loaded");

    // VMBus offers, with the integration services' class GUIDs and the SCSI controller's.
    for class in [
        "57164f39-9115-4e78-ab55-382f3bd5422d", // heartbeat
        "0e0b6031-5213-4934-818b-38d90ced39db", // shutdown
        "9527e630-d0ae-497b-adce-e80ab0175caf", // time synchronization
        "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6", // KVP
        "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f", // SCSI controller
    ] {
        assert_guest_said(&c, &format!("vmbus device {{{class}}}"));
    }

    // Storage: ext4 on the VHDX through hv_storvsc, read back after the page cache is
    // dropped; the read-only LUN reads our bytes and refuses a write.
    for step in [
        "disks rw=/dev/sd",
        "storage written",
        "storage read back",
        "ro write refused",
    ] {
        assert_guest_said(&c, step);
    }
    let written = checksums(&c, "md5");
    assert_eq!(written.len(), 3, "{}", tail(&c, 3000));
    assert_eq!(checksums(&c, "reread"), written);
    assert_guest_said(&c, &format!("ro md5 {ro_md5}"));

    // Heartbeat, through the service.
    poll_http(&env, &con, "/v1/vms/linux/heartbeat", |v| {
        v["heartbeat"]["status"] == "healthy"
    });
    // Time sync (asked on the worker's own control socket) moves the wrong guest clock to
    // host time.
    assert!(c.contains("verdigris-guest: clock set back to 2001"));
    let control = env.state.join("vms").join(&id).join("control.sock");
    let r = worker_control(&control, json!({"op": "timesync"}));
    assert_eq!(r["ok"], true, "{r}");
    let year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    con.wait(&env, "the clock corrected by time sync", |c| {
        c.contains(&format!("verdigris-guest: year {year}"))
    });
    // KVP: an item the host writes appears in the guest's pool file...
    let deadline = Instant::now() + Duration::from_secs(20 * 60);
    loop {
        let (s, v) = env.http(
            "PUT",
            "/v1/vms/linux/kvp",
            Some(r#"{"pool": 0, "key": "VerdigrisTest", "value": "hello-from-host"}"#),
        );
        // 200 once the worker has passed the item to the guest's KVP service.
        if s == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "kvp-set: {s} {v}");
        std::thread::sleep(Duration::from_secs(3));
    }
    con.wait(&env, "the host's KVP item in the guest pool", |c| {
        c.contains("verdigris-guest: kvp0 item VerdigrisTest=hello-from-host")
    });
    // ...and the guest's own items (host name, OS) are visible on the host.
    let v = poll_http(&env, &con, "/v1/vms/linux/kvp?pool=2", |v| {
        v["items"]["FullyQualifiedDomainName"].is_string()
    });
    let fqdn = v["items"]["FullyQualifiedDomainName"]
        .as_str()
        .unwrap_or("");
    assert!(fqdn.starts_with("verdigris-guest"), "{v}");
    assert_eq!(
        v["items"]["OSBuildNumber"],
        a["KERNEL_VERSION"].as_str(),
        "{v}"
    );
    let os_name = v["items"]["OSName"].as_str().unwrap_or("").to_string();
    assert!(!os_name.is_empty(), "{v}");
    let o = env.cli(&["get-vm-kvp", "linux", "--pool", "2", "OSName"]);
    assert_eq!(o.code, 0, "{o:?}");
    let got: Value = serde_json::from_str(&o.out).unwrap_or(Value::Null);
    assert_eq!(got["value"], os_name.as_str(), "{o:?}");

    // The handled-emulation counters and the uptime, through the service.
    let (s, st) = env.http("GET", "/v1/vms/linux/status", None);
    assert_eq!(s, 200, "{st}");
    assert!(st["worker"].to_string().contains("syscall"), "{st}");
    assert!(env.vm("linux")["uptime_secs"].as_u64().unwrap_or(0) > 0);

    // stop-vm: a clean shutdown through the shutdown integration service; the guest's own
    // shutdown path runs and the worker ends with exit 0.
    let o = env.cli(&["stop-vm", "linux", "--timeout", "1800"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.contains("shutdown integration service"), "{o:?}");
    let vm = env.wait_state("linux", "Off", Duration::from_secs(60));
    assert_eq!(vm["critical"], false, "{vm}");
    let c = con.get();
    milestone(t0, "first boot: off after stop-vm", &c);
    assert!(
        c.contains("verdigris-guest: orderly power-off requested"),
        "{}",
        tail(&c, 2000)
    );
    let log = std::fs::read_to_string(env.state.join("vms").join(&id).join("worker.log"))
        .unwrap_or_default();
    assert!(log.contains("the guest powered off"), "{log}");
    assert!(log.contains("quirks handled:"), "{log}");
    let states: Vec<String> = env
        .events("linux")
        .iter()
        .filter_map(|e| e["to"].as_str().map(String::from))
        .collect();
    for s in ["Starting", "Running", "Stopping", "Off"] {
        assert!(states.iter().any(|x| x == s), "{s} not in {states:?}");
    }

    // The guest's writes are in the VHDX: qemu-img finds it consistent, and the file the
    // guest wrote is in the image's data.
    let q = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&vhdx)
        .output()
        .expect("qemu-img");
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stdout));
    let raw = dir.join("disk.raw");
    let o = std::process::Command::new(verdigris_bin())
        .arg("convert-vhd")
        .arg(&vhdx)
        .arg(&raw)
        .args(["--format", "raw"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = std::fs::read(&raw).unwrap();
    let marker = b"verdigris marker: written by the guest through hv_storvsc\n";
    let at = data
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("the guest's file in the VHDX");
    let note = &written.iter().find(|(_, f)| f == "dir/note").unwrap().0;
    assert_eq!(&md5_hex(&data[at..at + marker.len()]), note);

    // A second boot, by a new worker that opens the VHDX again, this time without the
    // integration services: the guest finds the ext4 it made clean and its files byte-exact,
    // then powers itself off.
    let o = env.cli(&[
        "set-vm",
        "linux",
        "--cmdline",
        "console=ttyS0 verdigris.script=readback",
        "--integration-services",
        "off",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    let (_, con) = start(&env);
    let c = con.wait(&env, "the second boot's read-back", |c| {
        c.contains("verdigris-guest: script readback exit=")
    });
    milestone(t0, "second boot: read-back done", &c);
    assert_guest_said(&c, &format!("second boot uname={}", a["KERNEL_VERSION"]));
    assert_guest_said(&c, "vmbus device {ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}");
    assert!(
        !c.contains("verdigris-guest: vmbus device {57164f39-9115-4e78-ab55-382f3bd5422d}"),
        "no heartbeat offer with the integration services off: {}",
        tail(&c, 3000)
    );
    assert_guest_said(&c, "fsck clean");
    assert_guest_said(&c, "read back after reboot");
    assert_eq!(checksums(&c, "second-boot"), written, "{}", tail(&c, 3000));
    let vm = env.wait_state("linux", "Off", Duration::from_secs(600));
    assert_eq!(vm["critical"], false, "{vm}");
    let starts = env
        .events("linux")
        .iter()
        .filter(|e| e["to"] == "Starting")
        .count();
    assert_eq!(starts, 2, "{:?}", env.events("linux"));
}
