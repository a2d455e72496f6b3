//! The disk verbs end to end, checked against qemu-img (the independent VHDX implementation).

mod common;
use common::*;
use std::process::Command;

fn ok(args: &[&str], dir: &std::path::Path) -> String {
    let o = verdigris().args(args).current_dir(dir).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu(args: &[&str], dir: &std::path::Path) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .expect("qemu-utils (qemu-img, qemu-io) must be installed")
        .status
        .success()
}

#[test]
fn new_info_check_convert_merge_resize() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    ok(
        &[
            "new-vhd",
            "base.vhdx",
            "--size",
            "64M",
            "--block-size",
            "1M",
        ],
        p,
    );
    assert!(qemu(&["qemu-img", "check", "-f", "vhdx", "base.vhdx"], p));
    assert!(qemu(
        &[
            "qemu-io",
            "-f",
            "vhdx",
            "-c",
            "write -P 0x11 0 3M",
            "base.vhdx"
        ],
        p
    ));
    ok(&["new-vhd", "child.vhdx", "--parent", "base.vhdx"], p);
    let info = ok(&["vhd-info", "child.vhdx", "--json"], p);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["vhd_type"], "differencing");
    assert_eq!(v["virtual_size"], 64 << 20);
    assert!(ok(&["check-vhd", "child.vhdx"], p).contains("no errors"));
    // Flattened copy reads as the chain does; qemu agrees byte for byte.
    ok(
        &["convert-vhd", "child.vhdx", "flat.raw", "--format", "raw"],
        p,
    );
    assert!(qemu(
        &[
            "qemu-img",
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            "base.vhdx",
            "flat.raw"
        ],
        p
    ));
    ok(&["merge-vhd", "child.vhdx"], p);
    assert!(!p.join("child.vhdx").exists(), "child removed after merge");
    ok(&["resize-vhd", "base.vhdx", "--size", "96M"], p);
    assert!(qemu(&["qemu-img", "check", "-f", "vhdx", "base.vhdx"], p));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["vhd-info", "base.vhdx", "--json"], p)).unwrap();
    assert_eq!(v["virtual_size"], 96 << 20);
}

#[test]
fn bad_disk_input_is_one_line_and_nonzero() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    std::fs::write(p.join("junk.vhdx"), vec![0x5au8; 200_000]).unwrap();
    for (args, code) in [
        (vec!["check-vhd", "junk.vhdx"], 1),
        (vec!["vhd-info", "missing.vhdx"], 1),
        (vec!["new-vhd", "x.vhdx", "--size", "lots"], 2),
        (vec!["new-vhd", "x.vhdx"], 2),
        (vec!["new-vhd", "y.vhdx", "--parent", "missing.vhdx"], 1),
    ] {
        let o = verdigris().args(&args).current_dir(p).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(
        !p.join("x.vhdx").exists() && !p.join("y.vhdx").exists(),
        "nothing left behind"
    );
}
