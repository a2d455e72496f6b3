//! The stock Debian cloud kernel, unmodified, as a real client: one boot on 2 VPs, shared by
//! every check (it takes minutes on our hosts). Needs the assets from
//! `guests/linux/fetch-assets.sh` (the test suite's script fetches them first).

mod common;
use common::*;
use std::collections::HashMap;
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

#[test]
fn stock_kernel_reaches_user_space_runs_a_command_and_powers_off() {
    let a = assets();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("com1");
    let mut child = verdigris()
        .args(["run", "--kernel", &a["KERNEL"], "--initrd", &a["INITRD"]])
        // A user's plain command line plus the initramfs's script selector: whatever this
        // host needs of the guest, the worker adds itself.
        .args(["--cmdline", "console=ttyS0 verdigris.script=smoke"])
        .args(["--memory", "512M", "--cpus", "2"])
        .arg("--serial")
        .arg(format!("file:{}", out.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Poll with a generous deadline; never assert on timing.
    let deadline = Instant::now() + Duration::from_secs(40 * 60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let console = std::fs::read_to_string(&out).unwrap_or_default();
            panic!("no power-off within the deadline; console so far:\n{console}");
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let console = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    let ctx = format!("stderr:\n{err}\nconsole tail:\n{}", tail(&console, 3000));
    // The kernel booted (its own banner on our COM1).
    assert!(console.contains("Linux version"), "{ctx}");
    // User space: our /init ran, and ran commands (uname, nproc) whose output is the real one.
    assert!(console.contains("verdigris-guest: init"), "{ctx}");
    let want = format!(
        "verdigris-guest: smoke uname={} cpus=2",
        a["KERNEL_VERSION"]
    );
    assert!(console.contains(&want), "expected '{want}'\n{ctx}");
    // `poweroff -f` reached our ACPI power-off: exit code 0.
    assert_eq!(status.code(), Some(0), "{ctx}");
    assert!(err.contains("the guest powered off"), "{ctx}");
    // The worker said what it did for this host, and counted the quirks it handled.
    assert!(err.contains("quirks handled:"), "{ctx}");
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
