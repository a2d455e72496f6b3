//! The real service driving real workers that boot the test guest: the lifecycle, worker
//! crashes, a restart of the service with VMs running, and eight VMs started at once.
//! (`test=panic` prints one line and halts forever: a VM that stays up.)

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn pid_of(v: &Value) -> i32 {
    v["worker_pid"].as_i64().expect("a worker pid") as i32
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            state != "Z" && state != "X"
        })
        .unwrap_or(false)
}

#[test]
fn test_guest_lifecycle() {
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let env = Env::new();
    env.new_guest_vm("g1", "panic");

    // start-vm → Running, a worker, the guest's output on the console.
    let o = env.cli(&["start-vm", "g1"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.contains("VM 'g1' started (worker pid"), "{}", o.out);
    let vm = env.vm("g1");
    assert_eq!(vm["state"], "Running");
    assert_eq!(vm["critical"], false);
    let pid = pid_of(&vm);
    assert!(process_alive(pid));
    let mut con = console(&env.socket, "g1").expect("console");
    let text = read_until(&mut con, "PANIC: requested by test=panic", T);
    assert!(text.contains("PANIC: requested by test=panic"), "{text:?}");
    drop(con);
    // start-vm again: refused, nothing changes.
    let o = env.cli(&["start-vm", "g1"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.err.contains("already Running"), "{}", o.err);
    assert_eq!(pid_of(&env.vm("g1")), pid);

    // Live figures from the worker.
    let (s, st) = env.http("GET", "/v1/vms/g1/status", None);
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["worker"]["state"], "running");
    assert_eq!(st["worker"]["vps"], 1);
    assert_eq!(st["worker"]["memory_bytes"], 64u64 << 20);
    // The handled-emulation counters (the worker fills them in as its VPs report).
    assert!(st["worker"]["counters"]["io_exits"].is_u64(), "{st}");
    assert!(st["worker"]["counters"]["quirks"].is_object(), "{st}");
    let o = env.cli(&["get-vm", "g1"]);
    assert!(
        o.out.contains("Uptime") && o.out.contains("Counters"),
        "{}",
        o.out
    );
    let (s, hb) = env.http("GET", "/v1/vms/g1/heartbeat", None);
    assert_eq!(s, 200, "{hb}");

    // Settings that need the VM Off, and remove-vm, are refused while it runs.
    let o = env.cli(&["set-vm", "g1", "--memory", "128M"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.err.contains("only while it is Off"), "{}", o.err);
    let o = env.cli(&["set-vm", "g1", "--notes", "live note"]);
    assert_eq!(o.code, 0, "notes may change while running: {o:?}");
    let o = env.cli(&["remove-vm", "g1"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.err.contains("turn it off before removing it"),
        "{}",
        o.err
    );
    let disk = env.dir.path().join("d.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    let o = env.cli(&["add-disk", "g1", disk.to_str().unwrap()]);
    assert_eq!(o.code, 1, "{o:?}");

    // Pause and resume.
    let o = env.cli(&["suspend-vm", "g1"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(env.state_of("g1"), "Paused");
    let (_, st) = env.http("GET", "/v1/vms/g1/status", None);
    assert_eq!(st["worker"]["state"], "paused");
    let o = env.cli(&["stop-vm", "g1", "--timeout", "1"]);
    assert_eq!(o.code, 1, "a paused VM cannot shut down cleanly: {o:?}");
    let o = env.cli(&["resume-vm", "g1"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(env.state_of("g1"), "Running");
    let o = env.cli(&["resume-vm", "g1"]);
    assert_eq!(o.code, 1, "{o:?}");

    // Clean shutdown: the test guest has neither the shutdown integration service nor an ACPI
    // power-button handler, so it never shuts down. Without --force: a timeout, still running.
    let o = env.cli(&["stop-vm", "g1", "--timeout", "1"]);
    assert_eq!(o.code, 6, "{o:?}");
    assert!(o.err.contains("did not shut down within 1 s"), "{}", o.err);
    let vm = env.vm("g1");
    assert_eq!(vm["state"], "Running");
    assert_eq!(pid_of(&vm), pid);
    // With --force: the fallback turns it off.
    let o = env.cli(&["stop-vm", "g1", "--timeout", "1", "--force"]);
    assert_eq!(o.code, 0, "{o:?}");
    let vm = env.vm("g1");
    assert_eq!(vm["state"], "Off");
    assert_eq!(vm["critical"], false);
    assert!(
        vm["reason"]
            .as_str()
            .unwrap()
            .contains("did not shut down within 1 s"),
        "{vm}"
    );
    assert!(vm["worker_pid"].is_null());
    assert!(!process_alive(pid), "the worker is gone");

    // Start again, restart (a reset: a new worker), then turn off.
    assert_eq!(env.cli(&["start-vm", "g1"]).code, 0);
    let pid2 = pid_of(&env.vm("g1"));
    assert_ne!(pid2, pid);
    let o = env.cli(&["restart-vm", "g1"]);
    assert_eq!(o.code, 0, "{o:?}");
    let vm = env.vm("g1");
    assert_eq!(vm["state"], "Running");
    let pid3 = pid_of(&vm);
    assert_ne!(pid3, pid2);
    assert!(!process_alive(pid2));
    let o = env.cli(&["restart-vm", "g1", "--reboot"]);
    assert_eq!(o.code, 1, "the test guest cannot reboot itself: {o:?}");
    let o = env.cli(&["stop-vm", "g1", "--turn-off"]);
    assert_eq!(o.code, 0, "{o:?}");
    let vm = env.vm("g1");
    assert_eq!(
        (vm["state"].as_str(), vm["reason"].as_str()),
        (Some("Off"), Some("turned off"))
    );
    let o = env.cli(&["stop-vm", "g1", "--turn-off"]);
    assert_eq!(o.code, 1, "already off: {o:?}");

    // Every transition is in the event log, in order.
    let states: Vec<String> = env
        .events("g1")
        .iter()
        .filter(|e| e["kind"] == "state")
        .map(|e| {
            format!(
                "{}>{}",
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            "Off>Starting",
            "Starting>Running",
            "Running>Paused",
            "Paused>Running",
            "Running>Stopping",
            "Stopping>Running",
            "Running>Stopping",
            "Stopping>Off",
            "Off>Starting",
            "Starting>Running",
            "Running>Stopping",
            "Stopping>Off",
            "Off>Starting",
            "Starting>Running",
            "Running>Stopping",
            "Stopping>Off",
        ]
    );

    // Now it can be reconfigured and removed.
    assert_eq!(env.cli(&["set-vm", "g1", "--memory", "128M"]).code, 0);
    assert_eq!(env.cli(&["remove-vm", "g1"]).code, 0);
    assert!(!env
        .state
        .join("vms")
        .join(vm["id"].as_str().unwrap())
        .exists());
}

#[test]
fn guests_that_end_by_themselves() {
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let env = Env::new();
    // A guest that powers off: Off, not critical, with the worker's reason.
    env.new_guest_vm("hello", "hello");
    let o = env.cli(&["start-vm", "hello"]);
    assert_eq!(o.code, 0, "{o:?}");
    let vm = env.wait_state("hello", "Off", T);
    assert_eq!(vm["critical"], false, "{vm}");
    assert_eq!(vm["reason"], "the guest powered off");
    // A guest that triple-faults: Off and critical, with the reason.
    env.new_guest_vm("tf", "triplefault");
    let _ = env.cli(&["start-vm", "tf"]);
    let vm = env.wait_state("tf", "Off", T);
    assert_eq!(vm["critical"], true, "{vm}");
    assert!(vm["reason"].as_str().unwrap().contains("triple"), "{vm}");
    // A worker that refuses its configuration (a kernel that is no kernel): start fails with
    // the worker's own message.
    env.new_guest_vm("bad", "panic");
    let junk = env.dir.path().join("junk-kernel");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    assert_eq!(
        env.cli(&["set-vm", "bad", "--kernel", junk.to_str().unwrap()])
            .code,
        0
    );
    let o = env.cli(&["start-vm", "bad"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.err.contains(
            "VM 'bad' failed to start: the worker refused its configuration (exit code 2)"
        ),
        "{}",
        o.err
    );
    let vm = env.vm("bad");
    assert_eq!(
        (vm["state"].as_str(), vm["critical"].as_bool()),
        (Some("Off"), Some(true))
    );
    let o = env.cli(&["get-vm"]);
    assert!(o.out.contains("Critical: "), "{}", o.out);
}

#[test]
fn killing_one_worker_affects_only_its_vm() {
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let env = Env::new();
    env.new_guest_vm("victim", "panic");
    env.new_guest_vm("bystander", "panic");
    let o = env.cli(&["start-vm", "victim", "bystander"]);
    assert_eq!(o.code, 0, "{o:?}");
    let victim = pid_of(&env.vm("victim"));
    let bystander = pid_of(&env.vm("bystander"));

    // Watch the event stream while it happens.
    let socket = env.socket.clone();
    let sse = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        write!(
            s,
            "GET /v1/events/stream?vm=victim HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let end = Instant::now() + T;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end && !String::from_utf8_lossy(&got).contains("\"to\":\"Off\"") {
            if let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) of the worker this test started.
    unsafe {
        libc::kill(victim, libc::SIGKILL);
    }
    let vm = env.wait_state("victim", "Off", T);
    assert_eq!(vm["critical"], true);
    assert_eq!(
        vm["reason"],
        "worker exited unexpectedly (signal 9, SIGKILL)"
    );
    assert!(vm["worker_pid"].is_null());
    let stream = sse.join().unwrap();
    assert!(stream.starts_with("HTTP/1.1 200"), "{stream}");
    assert!(stream.contains("text/event-stream"), "{stream}");
    assert!(stream.contains("event: vm"), "{stream}");
    assert!(
        stream.contains("worker exited unexpectedly (signal 9, SIGKILL)"),
        "{stream}"
    );

    // The other VM did not notice.
    let other = env.vm("bystander");
    assert_eq!(other["state"], "Running");
    assert_eq!(pid_of(&other), bystander);
    assert!(process_alive(bystander));
    let (s, st) = env.http("GET", "/v1/vms/bystander/status", None);
    assert_eq!((s, st["worker"]["state"].as_str()), (200, Some("running")));
    assert!(env
        .events("bystander")
        .iter()
        .all(|e| e["critical"] == false));
    // The crashed VM starts again.
    assert_eq!(env.cli(&["start-vm", "victim"]).code, 0);
    let vm = env.vm("victim");
    assert_eq!(
        (vm["state"].as_str(), vm["critical"].as_bool()),
        (Some("Running"), Some(false))
    );
}

#[test]
fn eight_vms_start_at_once() {
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let env = Env::new();
    let names: Vec<String> = (0..8).map(|i| format!("vm{i}")).collect();
    for n in &names {
        env.new_guest_vm(n, "panic");
    }
    // Eight clients at once, each starting one VM.
    let started = Instant::now();
    let threads: Vec<_> = names
        .iter()
        .map(|n| {
            let socket = env.socket.clone();
            let n = n.clone();
            std::thread::spawn(move || http(&socket, "POST", &format!("/v1/vms/{n}/start"), None))
        })
        .collect();
    for t in threads {
        let (s, v) = t.join().unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["vm"]["state"], "Running", "{v}");
    }
    eprintln!("8 VMs started in {:?}", started.elapsed());
    let mut pids = std::collections::BTreeSet::new();
    for n in &names {
        let vm = env.vm(n);
        assert_eq!(vm["state"], "Running");
        assert!(process_alive(pid_of(&vm)));
        pids.insert(pid_of(&vm));
        let mut c = console(&env.socket, n).expect("console");
        assert!(read_until(&mut c, "PANIC: requested", T).contains("PANIC: requested"));
    }
    assert_eq!(pids.len(), 8);
    // All eight off with one CLI call (run concurrently).
    let mut args = vec!["stop-vm", "--turn-off"];
    args.extend(names.iter().map(String::as_str));
    let o = env.cli(&args);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.out.lines().count(), 8);
    for n in &names {
        assert_eq!(env.state_of(n), "Off");
    }
    for p in pids {
        assert!(!process_alive(p));
    }
}

/// The service as a separate process (this test executable re-run for this one test), so that
/// it can be killed like a real daemon.
#[test]
#[ignore = "helper process of service_restart_keeps_vms_running"]
fn service_child() {
    let Ok(state) = std::env::var("VMMS_CHILD_STATE") else {
        return;
    };
    let mut o = vmms::ServeOptions::new(state);
    o.init = true;
    o.worker_exe = Some(std::env::var("VMMS_CHILD_WORKER").unwrap().into());
    if let Err(e) = vmms::serve(o) {
        eprintln!("service: {e}");
        std::process::exit(1);
    }
}

struct ChildService(std::process::Child);

impl ChildService {
    fn start(env: &Env) -> ChildService {
        let c = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "service_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("VMMS_CHILD_STATE", &env.state)
            .env("VMMS_CHILD_WORKER", verdigris_bin())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + T;
        while std::os::unix::net::UnixStream::connect(&env.socket).is_err() {
            assert!(Instant::now() < end, "the service did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        ChildService(c)
    }

    fn signal(mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: a signal to the service process this test started.
        unsafe {
            libc::kill(self.0.id() as i32, sig);
        }
        self.0.wait().unwrap()
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn service_restart_keeps_vms_running() {
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let env = Env::without_service();
    let svc = ChildService::start(&env);
    env.new_guest_vm("a", "panic");
    env.new_guest_vm("b", "panic");
    env.new_guest_vm("c", "panic");
    assert_eq!(env.cli(&["start-vm", "a", "b", "c"]).code, 0);
    assert_eq!(env.cli(&["suspend-vm", "b"]).code, 0);
    let pa = pid_of(&env.vm("a"));
    let pb = pid_of(&env.vm("b"));
    let pc = pid_of(&env.vm("c"));

    // kill -9 of the service: the VMs do not notice.
    let st = svc.signal(libc::SIGKILL);
    assert!(!st.success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(process_alive(pa) && process_alive(pb) && process_alive(pc));
    // While no service watches, one worker dies.
    // SAFETY: kill(2) of a worker this test started.
    unsafe {
        libc::kill(pc, libc::SIGKILL);
    }
    std::thread::sleep(Duration::from_millis(200));

    // A new service re-adopts the survivors and records the dead one.
    let svc = ChildService::start(&env);
    let a = env.vm("a");
    assert_eq!((a["state"].as_str(), pid_of(&a)), (Some("Running"), pa));
    let b = env.vm("b");
    assert_eq!((b["state"].as_str(), pid_of(&b)), (Some("Paused"), pb));
    let c = env.vm("c");
    assert_eq!(c["state"], "Off");
    assert_eq!(c["critical"], true);
    assert!(
        c["reason"]
            .as_str()
            .unwrap()
            .contains("ended while the service was not running"),
        "{c}"
    );
    assert!(env.events("a").iter().any(|e| e["kind"] == "adopted"));
    // The console is still attachable, with the output from before the restart replayed.
    let mut con = console(&env.socket, "a").expect("console after the restart");
    assert!(read_until(&mut con, "PANIC: requested by test=panic", T)
        .contains("PANIC: requested by test=panic"));
    drop(con);
    // And the adopted workers are driven and supervised as before.
    assert_eq!(env.cli(&["resume-vm", "b"]).code, 0);
    let (s, st) = env.http("GET", "/v1/vms/b/status", None);
    assert_eq!((s, st["worker"]["state"].as_str()), (200, Some("running")));
    // SAFETY: kill(2) of a worker this test started.
    unsafe {
        libc::kill(pb, libc::SIGKILL);
    }
    let b = env.wait_state("b", "Off", T);
    assert_eq!(b["critical"], true);
    assert!(
        b["reason"].as_str().unwrap().contains("unexpectedly"),
        "{b}"
    );

    // A clean stop of the service (SIGTERM) leaves the VMs running too.
    let st = svc.signal(libc::SIGTERM);
    assert!(st.success(), "{st:?}");
    assert!(process_alive(pa));
    let _svc = ChildService::start(&env);
    let a = env.vm("a");
    assert_eq!((a["state"].as_str(), pid_of(&a)), (Some("Running"), pa));
    assert_eq!(env.cli(&["stop-vm", "a", "--turn-off"]).code, 0);
    assert!(!process_alive(pa));
}

/// Does this `verdigris run` take `--disk`? (The storage issue adds it.)
fn worker_takes_disks() -> bool {
    std::process::Command::new(verdigris_bin())
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--disk"))
        .unwrap_or(false)
}

#[test]
fn a_disk_in_use_by_a_running_vm_is_refused_elsewhere() {
    if !have_kvm() {
        eprintln!("skipped: /dev/kvm is not usable");
        return;
    }
    let mut env = Env::without_service();
    // The worker is started through a wrapper that records its arguments (and drops the
    // --disk options when this worker does not take them yet).
    let args_log = env.dir.path().join("worker-args");
    let wrapper = env.dir.path().join("worker.sh");
    let drop_disks = if worker_takes_disks() { "no" } else { "yes" };
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nif [ {drop_disks} = yes ]; then\n  for a do shift; if [ \"$skip\" = 1 ]; then skip=0; continue; fi\n    if [ \"$a\" = --disk ]; then skip=1; continue; fi; set -- \"$@\" \"$a\"; done\nfi\nexec '{}' \"$@\"\n",
            args_log.display(),
            verdigris_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut o = env.options();
    o.worker_exe = Some(wrapper);
    env.start_service_with(o);

    let disk = env.dir.path().join("shared.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk2 = env.dir.path().join("other.img");
    std::fs::write(&disk2, vec![0u8; 1 << 20]).unwrap();
    let d = disk.to_str().unwrap();
    env.new_guest_vm("a", "panic");
    env.new_guest_vm("b", "panic");
    env.new_guest_vm("c", "panic");
    assert_eq!(env.cli(&["add-disk", "a", d]).code, 0);
    assert_eq!(
        env.cli(&["add-disk", "a", disk2.to_str().unwrap(), "--read-only"])
            .code,
        0
    );
    assert_eq!(env.cli(&["add-disk", "b", d, "--read-only"]).code, 0);
    let o = env.cli(&["start-vm", "a"]);
    assert_eq!(o.code, 0, "{o:?}");
    // The worker got the disks in SCSI order, each at its place, read-only marked.
    let args = std::fs::read_to_string(&args_log).unwrap();
    assert!(
        args.contains(&format!(
            "--disk {d},controller=0,lun=0 --disk {},controller=0,lun=1,ro",
            disk2.display()
        )),
        "{args}"
    );
    let snap = || {
        (
            env.http("GET", "/v1/vms", None).1,
            env.http("GET", "/v1/events?limit=10000", None).1,
        )
    };
    let before = snap();
    let o = env.cli(&["start-vm", "b"]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.err.contains("is attached to VM 'a', which is Running"),
        "{}",
        o.err
    );
    let o = env.cli(&["add-disk", "c", d]);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(
        o.err.contains("is attached to VM 'a', which is Running"),
        "{}",
        o.err
    );
    let g = test_guest().display().to_string();
    let o = env.cli(&["new-vm", "e", "--kernel", &g, "--disk", d]);
    assert_eq!(o.code, 1, "{o:?}");
    assert_eq!(env.state_of("b"), "Off");
    assert_eq!(snap(), before, "inventory and event log unchanged");
    // Once a is off, b may run.
    assert_eq!(env.cli(&["stop-vm", "a", "--turn-off"]).code, 0);
    let o = env.cli(&["start-vm", "b"]);
    assert_eq!(o.code, 0, "{o:?}");
}
