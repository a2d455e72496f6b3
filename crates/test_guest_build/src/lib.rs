//! Builds the project's no_std test guest (`guests/test-guest`, its own Cargo workspace) for the
//! host-side tests and benchmarks that boot it, once per process, and returns the ELF's path.
//!
//! Talks to: `cargo` (the one running the tests, or `cargo` on PATH) in the guest's directory.
//! Must never: leak the outer cargo's settings (`CARGO_*`, `RUSTFLAGS`, wrappers) into the
//! guest's build, which has its own target, linker script and profile; or be a normal
//! dependency of a shipped crate (dev-dependencies only).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

/// Builds the test guest (release) the first time it is called in a process; its ELF path.
/// Panics if the build fails: every caller is a test or benchmark that cannot go on without it.
pub fn test_guest() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = repo_root().join("guests/test-guest");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "--release", "--quiet"])
            .current_dir(&dir);
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
