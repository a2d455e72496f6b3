//! Shared helpers for the integration tests: building the test guest and running `verdigris`.
#![allow(dead_code)]

use std::process::{Command, Output, Stdio};

pub fn verdigris() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_verdigris"));
    c.stdin(Stdio::null());
    c
}

pub use test_guest_build::test_guest;

/// Runs the test guest with `test=<name>` and returns (exit code, COM1 bytes, stderr).
pub fn run_test_guest(name: &str, cpus: u32, extra: &[&str]) -> (i32, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("com1");
    let o: Output = verdigris()
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", &format!("test={name}"), "--memory", "64M"])
        .args(["--cpus", &cpus.to_string()])
        .arg("--serial")
        .arg(format!("file:{}", out.display()))
        .args(extra)
        .output()
        .unwrap();
    let com1 = std::fs::read(&out).unwrap_or_default();
    (
        o.status.code().unwrap_or(-1),
        com1,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
