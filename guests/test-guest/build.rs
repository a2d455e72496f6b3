//! Link the test guest as a static, non-PIE ELF64 executable at physical 0x200000 with its own
//! linker script, and refuse to build without the code-generation flags of .cargo/config.toml
//! (without them the kernel would be built with a red zone and crash on the first interrupt).

use std::env;
use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());

    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let flags: Vec<&str> = flags.split('\x1f').collect();
    for needed in ["relocation-model=static", "no-redzone=yes"] {
        if !flags.iter().any(|f| f.ends_with(needed)) {
            eprintln!(
                "error: the test guest must be built with `-C {needed}`; run cargo from \
                 guests/test-guest so that its .cargo/config.toml applies"
            );
            std::process::exit(1);
        }
    }
    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" {
        eprintln!("error: the test guest builds only for x86_64-unknown-linux-gnu (got {target})");
        std::process::exit(1);
    }
}
