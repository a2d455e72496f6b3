//! Benchmarks of the management service (`cargo bench -p vmms --bench service`):
//!
//! 1. API round trip of `get-vm` (all VMs) with 100 VMs defined: raw HTTP on a new unix
//!    connection per request, and the whole CLI verb (`vmms::cli::execute`);
//! 2. `start-vm` to the test guest's first console byte (through the API's console);
//! 3. the service's resident memory (a separate process) with 100 VMs defined and 5 running.
//!
//! Needs /dev/kvm, the `verdigris` executable and the test guest (found or built as the
//! integration tests do).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::io::Read;
use std::time::{Duration, Instant};

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "n={} median {:.3} ms, p95 {:.3} ms, min {:.3} ms, max {:.3} ms",
        v.len(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.95).as_secs_f64() * 1e3,
        v[0].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    )
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .map(|r| r.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Child mode: the service itself.
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let mut o = vmms::ServeOptions::new(&args[i + 1]);
        o.init = true;
        o.worker_exe = Some(args[i + 2].clone().into());
        o.stop_vms_on_exit = true;
        o.stop_timeout_secs = 0;
        vmms::serve(o).unwrap();
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let env = Env::without_service();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--serve")
        .arg(&env.state)
        .arg(verdigris_bin())
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while std::os::unix::net::UnixStream::connect(&env.socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let service_pid = child.id();
    let rss_empty = rss_kib(service_pid, "VmRSS:");

    for i in 0..100 {
        env.new_guest_vm(&format!("vm{i:03}"), "panic");
    }

    // 1. get-vm round trips.
    let mut raw = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let (s, v) = env.http("GET", "/v1/vms", None);
        raw.push(t.elapsed());
        assert_eq!(s, 200);
        assert_eq!(v.as_array().unwrap().len(), 100);
    }
    let mut cli = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let o = env.cli(&["get-vm"]);
        cli.push(t.elapsed());
        assert_eq!(o.code, 0);
        assert_eq!(o.out.lines().count(), 102);
    }
    let mut one = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        let (s, _) = env.http("GET", &format!("/v1/vms/vm{:03}", i % 100), None);
        one.push(t.elapsed());
        assert_eq!(s, 200);
    }

    // 2. start-vm → first console byte.
    let mut start_api = Vec::new();
    let mut first_byte = Vec::new();
    for i in 0..5 {
        let name = format!("vm{i:03}");
        let t = Instant::now();
        let (s, v) = env.http("POST", &format!("/v1/vms/{name}/start"), None);
        start_api.push(t.elapsed());
        assert_eq!(s, 200, "{v}");
        let mut c = console(&env.socket, &name).expect("console");
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        first_byte.push(t.elapsed());
    }

    // 3. the service's memory, 100 VMs defined, 5 running, after the work above.
    let rss = rss_kib(service_pid, "VmRSS:");
    let hwm = rss_kib(service_pid, "VmHWM:");

    println!(
        "get-vm, 100 VMs, raw HTTP GET /v1/vms (new unix connection each): {}",
        stats(raw)
    );
    println!(
        "get-vm, 100 VMs, whole CLI verb (runtime + connection + table):  {}",
        stats(cli)
    );
    println!(
        "get-vm NAME, raw HTTP GET /v1/vms/NAME:                         {}",
        stats(one)
    );
    println!(
        "start-vm API call (worker spawned, host probe, VM running):      {}",
        stats(start_api)
    );
    println!(
        "start-vm to the test guest's first console byte:                 {}",
        stats(first_byte)
    );
    println!("service RSS: {rss_empty} KiB empty; {rss} KiB with 100 VMs defined and 5 running (peak {hwm} KiB)");

    // SAFETY: SIGTERM to the service process started above; it turns the VMs off and exits.
    unsafe {
        libc::kill(service_pid as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}
