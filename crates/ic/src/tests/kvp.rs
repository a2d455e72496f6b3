//! KVP round trips through the fake Linux kernel driver + daemon.

use std::time::{Duration, Instant};

use super::guest::{Behavior, Harness, TIMEOUT};
use super::{services, wait_phase};
use crate::kvp::KVP_CLASS;
use crate::protocol::kvp::{MAX_KEY_UNITS, MAX_VALUE_UNITS};
use crate::protocol::{ProtocolError, HV_E_FAIL};
use crate::{kvp, IcError, KvpConfig, KvpHandle, KvpPool, Phase};

fn ready_kvp() -> (Harness, KvpHandle) {
    let (vsps, h) = services();
    let kvp = h.kvp.unwrap();
    let harness = Harness::start(vsps, Behavior::default(), &[KVP_CLASS]);
    wait_phase("kvp", || kvp.status(), Phase::Ready);
    (harness, kvp)
}

fn pool(h: &Harness, p: KvpPool) -> Vec<(String, String)> {
    h.log().pools[usize::from(p.number())].clone()
}

#[test]
fn set_get_delete_enumerate_round_trip() {
    let (h, kvp) = ready_kvp();
    let ext = KvpPool::External;
    kvp.set(ext, "VmName", "verdigris-1").unwrap();
    kvp.set(ext, "Role", "web").unwrap();
    // The daemon stores UTF-8, per pool.
    assert_eq!(
        pool(&h, ext),
        vec![
            ("VmName".to_string(), "verdigris-1".to_string()),
            ("Role".to_string(), "web".to_string())
        ]
    );
    assert!(pool(&h, KvpPool::Guest).is_empty());
    assert_eq!(kvp.get(ext, "Role").unwrap().as_deref(), Some("web"));
    assert_eq!(kvp.get(ext, "Missing").unwrap(), None);
    // Overwrite.
    kvp.set(ext, "Role", "db").unwrap();
    assert_eq!(
        kvp.enumerate(ext).unwrap(),
        vec![
            ("VmName".to_string(), "verdigris-1".to_string()),
            ("Role".to_string(), "db".to_string())
        ]
    );
    assert!(kvp.delete(ext, "VmName").unwrap());
    assert!(!kvp.delete(ext, "VmName").unwrap());
    assert_eq!(
        kvp.enumerate(ext).unwrap(),
        vec![("Role".to_string(), "db".to_string())]
    );
    // Other pools are separate.
    kvp.set(KvpPool::Guest, "Role", "guest-side").unwrap();
    assert_eq!(kvp.get(ext, "Role").unwrap().as_deref(), Some("db"));
    assert_eq!(
        kvp.get(KvpPool::Guest, "Role").unwrap().as_deref(),
        Some("guest-side")
    );
    assert!(kvp.enumerate(KvpPool::AutoInternal).unwrap().is_empty());
}

#[test]
fn auto_pool_reports_the_guest_intrinsics() {
    let (_h, kvp) = ready_kvp();
    let items = kvp.enumerate(KvpPool::Auto).unwrap();
    assert!(items.contains(&("OSName".to_string(), "Debian GNU/Linux".to_string())));
    assert_eq!(
        kvp.get(KvpPool::Auto, "FullyQualifiedDomainName")
            .unwrap()
            .as_deref(),
        Some("guest.example")
    );
}

#[test]
fn utf16_edge_cases_round_trip() {
    let (h, kvp) = ready_kvp();
    let p = KvpPool::External;
    // Empty value.
    kvp.set(p, "empty", "").unwrap();
    assert_eq!(kvp.get(p, "empty").unwrap().as_deref(), Some(""));
    // Non-ASCII: BMP and astral (surrogate pairs).
    kvp.set(p, "clé-中", "välue 😀 ✓").unwrap();
    assert_eq!(pool(&h, p)[1], ("clé-中".into(), "välue 😀 ✓".into()));
    assert_eq!(kvp.get(p, "clé-中").unwrap().as_deref(), Some("välue 😀 ✓"));
    // Maximum lengths that survive Linux unchanged.
    let key = "k".repeat(MAX_KEY_UNITS);
    let value = format!("{}😀", "v".repeat(MAX_VALUE_UNITS - 2));
    kvp.set(p, &key, &value).unwrap();
    assert_eq!(kvp.get(p, &key).unwrap(), Some(value.clone()));
    let items = kvp.enumerate(p).unwrap();
    assert!(items.contains(&(key.clone(), value)));
    assert!(kvp.delete(p, &key).unwrap());
}

#[test]
fn invalid_arguments_are_refused_before_sending() {
    let (h, kvp) = ready_kvp();
    let p = KvpPool::External;
    let sent = h.log().requests[&KVP_CLASS];
    for (key, value) in [
        ("", "v"),
        ("a\0b", "v"),
        ("k", "v\0"),
        (&*"k".repeat(MAX_KEY_UNITS + 1), "v"),
        ("k", &*"v".repeat(MAX_VALUE_UNITS + 1)),
        // Fits the UTF-16 field but not Linux's 511-byte UTF-8 key buffer.
        (&*"中".repeat(200), "v"),
    ] {
        let e = kvp.set(p, key, value).unwrap_err();
        assert!(matches!(e, IcError::InvalidArgument { .. }), "{e}");
    }
    assert!(matches!(
        kvp.delete(p, ""),
        Err(IcError::InvalidArgument { .. })
    ));
    assert!(matches!(
        kvp.get(p, ""),
        Err(IcError::InvalidArgument { .. })
    ));
    assert_eq!(h.log().requests[&KVP_CLASS], sent);
    assert!(pool(&h, p).is_empty());
}

#[test]
fn invalid_utf16_from_the_guest_is_an_error_and_the_service_continues() {
    let (h, kvp) = ready_kvp();
    kvp.set(KvpPool::External, "k", "v").unwrap();
    // The guest answers ENUMERATE with an unpaired surrogate in the value.
    h.behavior().hostile.insert(
        KVP_CLASS,
        Box::new(|id, req| {
            let mut b = req.to_vec();
            b[8 + 17] = 5; // TRANSACTION | RESPONSE
            let d = 28 + 8;
            b[d..d + 4].copy_from_slice(&1u32.to_le_bytes());
            b[d + 4..d + 8].copy_from_slice(&4u32.to_le_bytes());
            b[d + 12..d + 16].copy_from_slice(&[b'k', 0, 0, 0]);
            b[d + 8..d + 12].copy_from_slice(&4u32.to_le_bytes());
            b[d + 12 + 512..d + 12 + 516].copy_from_slice(&[0x00, 0xdc, 0, 0]);
            vec![(id, b, false)]
        }),
    );
    let e = kvp.enumerate(KvpPool::External).unwrap_err();
    assert_eq!(
        e,
        IcError::BadResponse {
            service: "kvp",
            error: ProtocolError::InvalidUtf16 { field: "value" }
        }
    );
    // A well-formed frame with bad content: a KVP-level error, not a malformed packet.
    assert_eq!(kvp.status().counters.malformed, 0);
    h.behavior().hostile.clear();
    assert_eq!(
        kvp.enumerate(KvpPool::External).unwrap(),
        vec![("k".to_string(), "v".to_string())]
    );
}

#[test]
fn without_the_daemon_requests_fail_cleanly_and_work_once_it_starts() {
    let (vsps, h) = crate::create(
        b"vm",
        crate::IcConfig {
            kvp: Some(KvpConfig {
                timeout: Duration::from_millis(300),
                max_items: 16,
            }),
            ..crate::IcConfig::default()
        },
    );
    let kvp = h.kvp.unwrap();
    let b = Behavior {
        kvp_daemon: false,
        ..Behavior::default()
    };
    let harness = Harness::start(vsps, b, &[KVP_CLASS]);
    let t = Instant::now();
    let e = kvp.set(KvpPool::External, "k", "v").unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(matches!(e, IcError::NotReady { service: "kvp", .. }));
    assert!(e.to_string().contains("hv_kvp_daemon"), "{e}");
    assert_eq!(kvp.status().phase, Phase::Negotiating);
    // The daemon starts: Linux answers the pending NEGOTIATE and serves requests.
    harness.behavior().kvp_daemon = true;
    wait_phase("ready", || kvp.status(), Phase::Ready);
    kvp.set(KvpPool::External, "k", "v").unwrap();
    // The daemon dies: Linux stops reading; requests time out with the hint.
    harness.behavior().kvp_daemon = false;
    let e = kvp.enumerate(KvpPool::External).unwrap_err();
    assert!(matches!(e, IcError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("hv_kvp_daemon"), "{e}");
    // It comes back; the late answer is dropped, the next request works.
    harness.behavior().kvp_daemon = true;
    super::wait_for("late answer", TIMEOUT, || kvp.status().counters.late >= 1);
    assert_eq!(
        kvp.get(KvpPool::External, "k").unwrap().as_deref(),
        Some("v")
    );
}

#[test]
fn a_failing_daemon_is_reported_with_its_status() {
    let (h, kvp) = ready_kvp();
    h.behavior().kvp_daemon_fails = true;
    assert_eq!(
        kvp.set(KvpPool::External, "k", "v"),
        Err(IcError::Refused {
            service: "kvp",
            status: HV_E_FAIL
        })
    );
    assert!(matches!(
        kvp.enumerate(KvpPool::Auto),
        Err(IcError::Refused { .. })
    ));
}

#[test]
fn enumeration_is_capped() {
    let (vsp, kvp) = kvp::new(
        b"vm",
        KvpConfig {
            timeout: Duration::from_secs(2),
            max_items: 3,
        },
    );
    let h = Harness::start(vec![vsp], Behavior::default(), &[KVP_CLASS]);
    wait_phase("kvp", || kvp.status(), Phase::Ready);
    for i in 0..3 {
        kvp.set(KvpPool::Guest, &format!("k{i}"), "v").unwrap();
    }
    assert_eq!(kvp.enumerate(KvpPool::Guest).unwrap().len(), 3);
    kvp.set(KvpPool::Guest, "k3", "v").unwrap();
    assert_eq!(
        kvp.enumerate(KvpPool::Guest),
        Err(IcError::TooManyItems {
            service: "kvp",
            limit: 3
        })
    );
    assert_eq!(pool(&h, KvpPool::Guest).len(), 4);
}
