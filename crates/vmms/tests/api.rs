//! The API and CLI without booting guests: the OpenAPI document against the router, the
//! inventory operations, bad input of every kind, TCP authentication, and the state directory
//! checks.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::Duration;

/// A kernel file for VMs that are defined but never started.
fn kernel(env: &Env) -> String {
    let p = env.dir.path().join("vmlinux");
    if !p.exists() {
        std::fs::write(&p, b"not really a kernel").unwrap();
    }
    p.display().to_string()
}

#[test]
fn openapi_document_matches_the_router() {
    let doc: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("docs/openapi.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        doc["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let m = method.as_str().unwrap();
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&m)
            {
                documented.insert((m.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = vmms::api::route_table().into_iter().collect();
    let missing_in_doc: Vec<_> = routed.difference(&documented).collect();
    let missing_in_router: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing_in_doc.is_empty(),
        "routes not in docs/openapi.yaml: {missing_in_doc:?}"
    );
    assert!(
        missing_in_router.is_empty(),
        "documented but not routed: {missing_in_router:?}"
    );

    // Every $ref points at something.
    fn refs(v: &serde_yaml::Value, out: &mut Vec<String>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() == Some("$ref") {
                        out.push(v.as_str().unwrap().to_string());
                    }
                    refs(v, out);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20);
    for r in all {
        let mut node = &doc;
        for part in r.trim_start_matches("#/").split('/') {
            node = &node[part];
        }
        assert!(!node.is_null(), "dangling $ref {r}");
    }

    // The live router answers every documented route (no "no-endpoint" / 405), and the
    // document it serves is this one.
    let env = Env::new();
    for (m, p) in &documented {
        let path = p
            .replace("{vm}", "no-such-vm")
            .replace("{controller}", "0")
            .replace("{lun}", "0");
        // (The query keeps the event stream from streaming: it names an unknown VM.)
        let (status, body) = env.http(m, &format!("{path}?vm=no-such-vm"), None);
        assert_ne!(body["code"], "no-endpoint", "{m} {p}: {body}");
        assert_ne!(status, 405, "{m} {p}");
    }
    let (s, body) = env.http("GET", "/v1/nothing", None);
    assert_eq!((s, body["code"].as_str()), (404, Some("no-endpoint")));
    let (s, body) = env.http("PUT", "/v1/vms", None);
    assert_eq!(
        (s, body["code"].as_str()),
        (405, Some("method-not-allowed"))
    );
    let (s, served) = env.http("GET", "/v1/openapi.yaml", None);
    assert_eq!(s, 200);
    assert_eq!(served.as_str().unwrap(), vmms::api::OPENAPI);
}

#[test]
fn inventory_operations_through_cli_and_http() {
    let env = Env::new();
    let k = kernel(&env);
    let o = env.cli(&[
        "new-vm", "web", "--kernel", &k, "--memory", "256M", "--cpus", "2", "--notes", "first",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.starts_with("VM 'web' created (id "), "{}", o.out);
    let vm = env.vm("web");
    assert_eq!(vm["state"], "Off");
    assert_eq!(vm["processors"], 2);
    assert_eq!(vm["memory_bytes"], 256u64 << 20);
    assert_eq!(vm["notes"], "first");
    assert_eq!(vm["boot"]["kernel"], k);
    // By id, and by name in another case.
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(env.vm(&id)["name"], "web");
    assert_eq!(env.vm("WEB")["id"], id.as_str());

    // The table and JSON forms of get-vm.
    let o = env.cli(&["new-vm", "db", "--kernel", &k, "--memory", "1G"]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = env.cli(&["get-vm"]);
    assert_eq!(o.code, 0);
    let lines: Vec<&str> = o.out.lines().collect();
    assert!(lines[0].starts_with("Name"), "{}", o.out);
    assert!(
        lines[2].starts_with("db ") && lines[2].contains("Off") && lines[2].contains("1 GiB"),
        "{}",
        o.out
    );
    assert!(
        lines[3].starts_with("web ") && lines[3].contains("256 MiB"),
        "{}",
        o.out
    );
    let o = env.cli(&["get-vm", "--json"]);
    let all: Value = serde_json::from_str(&o.out).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let o = env.cli(&["get-vm", "web"]);
    assert!(o.out.contains("Processors            2"), "{}", o.out);

    // set-vm, add-disk, remove-disk.
    let o = env.cli(&[
        "set-vm",
        "web",
        "--memory",
        "512M",
        "--processors",
        "4",
        "--new-name",
        "web2",
        "--enlightenments",
        "off",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    let vm = env.vm("web2");
    assert_eq!(
        (vm["memory_bytes"].as_u64(), vm["processors"].as_u64()),
        (Some(512 << 20), Some(4))
    );
    assert_eq!(vm["enlightenments"], false);
    let disk = env.dir.path().join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let o = env.cli(&["add-disk", "web2", disk.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = env.cli(&["add-disk", "web2", disk.to_str().unwrap(), "--lun", "5"]);
    assert_eq!(o.code, 1, "the same disk twice: {o:?}");
    assert!(o.err.contains("already attached"), "{}", o.err);
    let disk2 = env.dir.path().join("data2.img");
    std::fs::write(&disk2, vec![0u8; 1 << 20]).unwrap();
    let o = env.cli(&[
        "add-disk",
        "web2",
        disk2.to_str().unwrap(),
        "--controller",
        "1",
        "--read-only",
    ]);
    assert_eq!(o.code, 0, "{o:?}");
    let d = &env.vm("web2")["disks"];
    assert_eq!(d.as_array().unwrap().len(), 2);
    assert_eq!(d[0]["controller"], 0);
    assert_eq!(d[1]["controller"], 1);
    assert_eq!(d[1]["read_only"], true);
    // A disk may be attached to two VMs that are Off (only one can run at a time).
    let o = env.cli(&["add-disk", "db", disk.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.out.contains("also attached to: web2"), "{}", o.out);
    let o = env.cli(&["remove-disk", "web2", disk.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = env.cli(&["remove-disk", "web2", "--controller", "3", "--lun", "9"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert_eq!(env.vm("web2")["disks"].as_array().unwrap().len(), 1);
    assert!(disk.exists(), "remove-disk keeps the file");

    // The event log recorded all of it, oldest first.
    let evs = env.events("web2");
    let kinds: Vec<&str> = evs.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "created",
            "configured",
            "disk-attached",
            "disk-attached",
            "disk-detached"
        ]
    );
    let o = env.cli(&["get-vm-event", "web2"]);
    assert_eq!(o.out.lines().count(), 5, "{}", o.out);

    // remove-vm.
    let o = env.cli(&["remove-vm", "web2", "db"]);
    assert_eq!(o.code, 0, "{o:?}");
    let (s, _) = env.http("GET", "/v1/vms/web2", None);
    assert_eq!(s, 404);
    assert!(disk2.exists(), "remove-vm keeps disks");
    assert_eq!(env.http("GET", "/v1/vms", None).1, json!([]));
}

/// The inventory as the API shows it, and the number of events.
fn snapshot(env: &Env) -> (Value, usize) {
    let (_, vms) = env.http("GET", "/v1/vms", None);
    let (_, evs) = env.http("GET", "/v1/events?limit=10000", None);
    (vms, evs.as_array().unwrap().len())
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let env = Env::new();
    let k = kernel(&env);
    assert_eq!(
        env.cli(&["new-vm", "a", "--kernel", &k, "--memory", "64M"])
            .code,
        0
    );
    let before = snapshot(&env);

    let check_cli = |args: &[&str], code: u8, needle: &str| {
        let o = env.cli(args);
        assert_eq!(o.code, code, "{args:?}: {o:?}");
        assert_eq!(o.err.lines().count(), 1, "one line: {o:?}");
        assert!(o.err.starts_with("verdigris: error: "), "{o:?}");
        assert!(
            o.err.contains(needle),
            "{args:?}: {:?} lacks {needle:?}",
            o.err
        );
        assert_eq!(snapshot(&env), before, "{args:?} changed the inventory");
    };
    check_cli(&["get-vm", "nope"], 3, "no VM named or with id 'nope'");
    check_cli(&["start-vm", "nope"], 3, "nope");
    check_cli(&["remove-vm", "nope"], 3, "nope");
    check_cli(
        &["new-vm", "A", "--kernel", &k],
        1,
        "a VM named 'A' already exists",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--memory", "1M"],
        2,
        "out of range",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--memory", "2T"],
        2,
        "out of range",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--memory", "65M"],
        2,
        "multiple of 2 MiB",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--memory", "lots"],
        2,
        "invalid size",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--cpus", "0"],
        2,
        "processor count 0 is out of range",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--cpus", "300"],
        2,
        "processor count 300 is out of range",
    );
    check_cli(
        &["new-vm", "b", "--kernel", "/no/such/kernel"],
        2,
        "kernel '/no/such/kernel'",
    );
    check_cli(
        &["new-vm", "b", "--kernel", &k, "--disk", "/no/such.vhdx"],
        2,
        "disk '/no/such.vhdx'",
    );
    check_cli(&["new-vm", "", "--kernel", &k], 2, "name is empty");
    check_cli(&["new-vm", "x/y", "--kernel", &k], 2, "'/'");
    check_cli(&["add-disk", "a", "/no/such.img"], 2, "No such file");
    check_cli(&["set-vm", "a", "--memory", "8G0"], 2, "invalid size");
    check_cli(&["set-vm", "a", "--cpus", "0"], 2, "out of range");
    check_cli(&["stop-vm", "a"], 1, "is Off");
    check_cli(&["suspend-vm", "a"], 1, "only a Running VM can be paused");
    check_cli(&["connect", "a"], 1, "not running");
    check_cli(&["get-vm-kvp", "a"], 1, "not running");

    // Raw HTTP: status codes and JSON error bodies.
    let check_http = |m: &str, p: &str, body: Option<&str>, status: u16, needle: &str| {
        let (s, v) = env.http(m, p, body);
        assert_eq!(s, status, "{m} {p} {body:?}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {v}"));
        assert!(msg.contains(needle), "{m} {p}: {msg:?} lacks {needle:?}");
        assert!(v["code"].is_string());
        assert_eq!(
            snapshot(&env),
            before,
            "{m} {p} {body:?} changed the inventory"
        );
    };
    let kb = serde_json::to_string(&k).unwrap();
    check_http(
        "POST",
        "/v1/vms",
        Some("{\"name\": \"b\", "),
        400,
        "malformed JSON",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some("{\"name\": \"b\" \"boot\"}"),
        400,
        "malformed JSON",
    );
    check_http("POST", "/v1/vms", None, 400, "needs a JSON body");
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"linux","kernel":{kb}}},"colour":"red"}}"#
        )),
        400,
        "unknown field `colour`",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"bios","kernel":{kb}}}}}"#
        )),
        400,
        "unknown variant `bios`",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"linux","kernel":{kb}}},"processors":-1}}"#
        )),
        400,
        "invalid value",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"a","boot":{{"kind":"linux","kernel":{kb}}}}}"#
        )),
        409,
        "already exists",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"linux","kernel":{kb}}},"memory":"16G0"}}"#
        )),
        400,
        "invalid size",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"linux","kernel":{kb}}},"network_adapters":[{{"name":"n","mac":"zz"}}]}}"#
        )),
        400,
        "invalid MAC",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"linux","kernel":{kb}}},"disks":[{{"path":{kb},"controller":4}}]}}"#
        )),
        400,
        "controller 4 is out of range",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"b","boot":{{"kind":"linux","kernel":{kb}}},"disks":[{{"path":{kb},"lun":64}}]}}"#
        )),
        400,
        "LUN 64 is out of range",
    );
    check_http(
        "POST",
        "/v1/vms",
        Some(r#"{"name":"b","boot":{"kind":"linux","kernel":"relative/path"}}"#),
        400,
        "not absolute",
    );
    check_http(
        "PATCH",
        "/v1/vms/a",
        Some("{\"memory\": 1}"),
        400,
        "out of range",
    );
    check_http(
        "PATCH",
        "/v1/vms/a",
        Some("{\"id\": \"x\"}"),
        400,
        "unknown field",
    );
    check_http(
        "PATCH",
        "/v1/vms/nope",
        Some("{\"notes\": \"x\"}"),
        404,
        "nope",
    );
    check_http(
        "POST",
        "/v1/vms/a/stop",
        Some("{\"timeout_secs\": \"soon\"}"),
        400,
        "invalid request",
    );
    check_http(
        "POST",
        "/v1/vms/a/start",
        Some("{\"now\": true}"),
        400,
        "unknown field",
    );
    check_http("DELETE", "/v1/vms/a/disks/x/0", None, 400, "invalid path");
    check_http(
        "DELETE",
        "/v1/vms/a/disks/0/0",
        None,
        404,
        "no disk at SCSI 0:0",
    );
    check_http("GET", "/v1/events?limit=many", None, 400, "invalid query");
    check_http("GET", "/v1/events?vm=nope", None, 404, "nope");
    check_http("GET", "/v1/vms/a/kvp", None, 400, "invalid query");
    check_http("GET", "/v1/vms/a/console", None, 426, "Upgrade");
    // Oversize bodies: 413, whether the length is announced or not.
    let big = format!(r#"{{"name":"b","notes":"{}"}}"#, "x".repeat(100 << 10));
    check_http("POST", "/v1/vms", Some(&big), 413, "larger than 64 KiB");
    // A name that is a GUID would be ambiguous.
    check_http(
        "POST",
        "/v1/vms",
        Some(&format!(
            r#"{{"name":"4f9a3c52-2f0e-4a57-9b7e-0d6c1f0a2b3c","boot":{{"kind":"linux","kernel":{kb}}}}}"#
        )),
        400,
        "GUID",
    );
}

#[test]
fn a_client_that_disconnects_mid_request_changes_nothing() {
    let env = Env::new();
    let k = kernel(&env);
    assert_eq!(env.cli(&["new-vm", "a", "--kernel", &k]).code, 0);
    let before = snapshot(&env);
    let body = format!(
        r#"{{"name":"b","boot":{{"kind":"linux","kernel":{}}}}}"#,
        serde_json::to_string(&k).unwrap()
    );
    // Headers and half the body, then gone.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        write!(
            s,
            "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..body.len() / 2]
        )
        .unwrap();
    }
    // Half the headers, then gone.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        write!(s, "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Le").unwrap();
    }
    // Garbage instead of HTTP: the connection gets 400 and is closed.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        s.write_all(b"\x16\x03\x01\x02\x00hello\r\n\r\n").unwrap();
        let mut r = Vec::new();
        let _ = s.read_to_end(&mut r);
        assert!(
            r.is_empty() || r.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&r)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(snapshot(&env), before);
    // A complete request whose client leaves before the answer still completes whole.
    {
        let mut s = std::os::unix::net::UnixStream::connect(&env.socket).unwrap();
        write!(
            s,
            "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    }
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = env.http("GET", "/v1/vms/b", None);
        if s == 200 {
            assert_eq!(v["state"], "Off");
            break;
        }
        assert!(std::time::Instant::now() < end, "the request was lost");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(env.events("b").len(), 1, "created once, recorded once");
    // The service still serves.
    assert_eq!(env.cli(&["get-vm"]).code, 0);
}

#[test]
fn tcp_needs_the_bearer_token() {
    let mut env = Env::without_service();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token_file = env.dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-0123456789\n").unwrap();

    // Refused without a token file, or with a short token.
    let mut o = env.options();
    o.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let e = vmms::ServiceThread::start(o.clone())
        .err()
        .expect("TCP without a token must be refused");
    assert!(e.to_string().contains("--token-file"), "{e}");
    let short = env.dir.path().join("short");
    std::fs::write(&short, "abc").unwrap();
    o.token_file = Some(short);
    let e = vmms::ServiceThread::start(o.clone())
        .err()
        .expect("short token");
    assert!(e.to_string().contains("at least 16"), "{e}");

    o.token_file = Some(token_file.clone());
    env.service = Some(vmms::ServiceThread::start(o).unwrap());
    let tcp = |headers: &[(&str, &str)]| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        raw_exchange(&mut s, "GET", "/v1/vms", None, headers)
    };
    let (s, v) = tcp(&[]);
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        tcp(&[("Authorization", "Bearer wrong-token-0123456789")]).0,
        401
    );
    assert_eq!(tcp(&[("Authorization", "Basic czNjcmV0")]).0, 401);
    assert_eq!(
        tcp(&[("Authorization", "Bearer s3cret-token-0123456789")]),
        (200, json!([]))
    );
    // The unix socket needs no token.
    assert_eq!(env.http("GET", "/v1/vms", None).0, 200);
    // The CLI over TCP.
    let url = format!("http://127.0.0.1:{port}");
    let api = vmms::cli::ApiArgs {
        api: url.clone(),
        api_token_file: Some(token_file),
    };
    assert_eq!(cli_with(&api, &["get-vm"]).code, 0);
    let bad = env.dir.path().join("bad");
    std::fs::write(&bad, "nope-nope-nope-nope").unwrap();
    let api = vmms::cli::ApiArgs {
        api: url,
        api_token_file: Some(bad),
    };
    let o = cli_with(&api, &["get-vm"]);
    assert_eq!(o.code, 5, "{o:?}");
}

#[test]
fn state_directory_problems_are_reported_not_papered_over() {
    let env = Env::without_service();
    let mut o = env.options();
    o.init = false;
    // Missing.
    let e = vmms::ServiceThread::start(o.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not exist") && e.contains("--init"), "{e}");
    assert!(!env.state.exists(), "not created without --init");
    // Created with --init; reused as it is afterwards.
    let mut init = o.clone();
    init.init = true;
    vmms::ServiceThread::start(init.clone())
        .unwrap()
        .stop()
        .unwrap();
    let mut s = vmms::ServiceThread::start(o.clone()).unwrap();
    {
        let k = env.dir.path().join("k");
        std::fs::write(&k, b"x").unwrap();
        let api = vmms::cli::ApiArgs {
            api: env.socket.display().to_string(),
            api_token_file: None,
        };
        assert_eq!(
            cli_with(&api, &["new-vm", "keep", "--kernel", k.to_str().unwrap()]).code,
            0
        );
    }
    // A second service on the same directory is refused.
    let e = vmms::ServiceThread::start(o.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another verdigris service"), "{e}");
    s.stop().unwrap();
    s = vmms::ServiceThread::start(init.clone()).unwrap();
    assert_eq!(
        http(&env.socket, "GET", "/v1/vms/keep", None).0,
        200,
        "--init keeps the inventory"
    );
    s.stop().unwrap();

    // A damaged inventory: refused, left byte for byte as it was, even with --init.
    let inv = env.state.join("inventory.db");
    let _ = std::fs::remove_file(env.state.join("inventory.db-wal"));
    let _ = std::fs::remove_file(env.state.join("inventory.db-shm"));
    let mut bytes = std::fs::read(&inv).unwrap();
    for b in bytes.iter_mut().skip(100).take(4000) {
        *b = 0xA5;
    }
    std::fs::write(&inv, &bytes).unwrap();
    let e = vmms::ServiceThread::start(init.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("inventory"), "{e}");
    assert_eq!(std::fs::read(&inv).unwrap(), bytes);
    // Missing inventory next to VM directories: damaged, not a fresh start.
    std::fs::remove_file(&inv).unwrap();
    let e = vmms::ServiceThread::start(init).err().unwrap().to_string();
    assert!(e.contains("damaged"), "{e}");
    assert!(!inv.exists());
    // The CLI, with no service: exit code 4.
    let api = vmms::cli::ApiArgs {
        api: env.socket.display().to_string(),
        api_token_file: None,
    };
    let o = cli_with(&api, &["get-vm"]);
    assert_eq!(o.code, 4, "{o:?}");
    assert!(o.err.contains("cannot reach the service"), "{}", o.err);
}
