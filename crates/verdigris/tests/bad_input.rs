//! Bad input: one clear error line naming the problem, exit code 2, no panic.

mod common;
use common::*;

fn expect_error(args: &[&str], needle: &str) {
    let o = verdigris().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.to_lowercase().contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
}

#[test]
fn bad_inputs_are_refused_with_one_line() {
    let tg = test_guest().to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let junk = junk.to_str().unwrap();
    expect_error(
        &["run", "--kernel", "/nonexistent/kernel"],
        "cannot read kernel",
    );
    expect_error(&["run", "--kernel", junk], "neither a bzimage nor an elf");
    expect_error(
        &["run", "--kernel", &tg, "--initrd", "/nonexistent"],
        "cannot read initrd",
    );
    expect_error(&["run", "--kernel", &tg, "--memory", "1M"], "too small");
    expect_error(
        &["run", "--kernel", &tg, "--memory", "65537K"],
        "multiple of 4 kib",
    );
    expect_error(
        &["run", "--kernel", &tg, "--memory", "lots"],
        "invalid size",
    );
    expect_error(&["run", "--kernel", &tg, "--cpus", "0"], "at least 1");
    expect_error(
        &["run", "--kernel", &tg, "--cpus", "100000"],
        "more than this host supports",
    );
    expect_error(
        &["run", "--kernel", &tg, "--frobnicate"],
        "unexpected argument",
    );
    expect_error(
        &["run", "--kernel", &tg, "--serial", "tcp:1"],
        "invalid --serial",
    );
    expect_error(&["run", "--kernel", &tg, "--time-scale", "3"], "time-scale");
    expect_error(
        &[
            "run",
            "--kernel",
            &tg,
            "--serial",
            "file:/nonexistent/dir/x",
        ],
        "cannot open serial output",
    );
    expect_error(
        &["run", "--kernel", &tg, "--serial", &format!("unix:{junk}")],
        "not a socket",
    );
}
