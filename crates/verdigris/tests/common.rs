//! Shared helpers for the integration tests: building the test guest and running `verdigris`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn verdigris() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_verdigris"));
    c.stdin(Stdio::null());
    c
}

/// Builds the no_std test guest once per test process and returns its ELF path.
pub fn test_guest() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = repo_root().join("guests/test-guest");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--release", "--quiet"])
            .current_dir(&dir);
        // The outer cargo's settings must not leak into the guest build.
        for (k, _) in std::env::vars() {
            if k.starts_with("CARGO_") || k == "RUSTFLAGS" || k == "RUSTC_WRAPPER" {
                cmd.env_remove(k);
            }
        }
        let st = cmd.status().expect("running cargo for the test guest");
        assert!(st.success(), "building the test guest failed");
        dir.join("target/x86_64-unknown-linux-gnu/release/test-guest")
    })
}

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
