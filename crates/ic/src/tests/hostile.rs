//! A hostile guest: malformed answers never panic, fail only the request they answer (or
//! disable the service until reopen, for NEGOTIATE), and are counted.

use std::time::Duration;

use super::guest::{Behavior, Harness, Hostile, TIMEOUT};
use super::{services, wait_for, wait_phase};
use crate::heartbeat::HEARTBEAT_CLASS;
use crate::kvp::KVP_CLASS;
use crate::protocol::{ProtocolError, ICFLAG_RESPONSE, ICFLAG_TRANSACTION};
use crate::shutdown::{ShutdownConfig, SHUTDOWN_CLASS};
use crate::{shutdown, HeartbeatStatus, IcError, KvpPool, Phase};

/// The request turned into a well-formed answer, then spoiled by `f`.
fn answer_with(f: impl Fn(&mut Vec<u8>) + Send + 'static) -> Hostile {
    Box::new(move |id, req| {
        let mut b = req.to_vec();
        if b.len() >= 28 {
            b[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
        }
        f(&mut b);
        vec![(id, b, false)]
    })
}

#[test]
fn malformed_shutdown_answers_fail_only_that_request() {
    let (vsp, sd) = shutdown::new(
        b"vm",
        ShutdownConfig {
            timeout: Duration::from_millis(400),
        },
    );
    let h = Harness::start(vec![vsp], Behavior::default(), &[SHUTDOWN_CLASS]);
    wait_phase("ready", || sd.status(), Phase::Ready);

    // (what, answer, whether it is a bad answer — else the request times out)
    let cases: Vec<(&str, Hostile, bool)> = vec![
        (
            "short packet",
            Box::new(|id, _| vec![(id, vec![1, 2, 3], false)]),
            true,
        ),
        (
            "empty packet",
            Box::new(|id, _| vec![(id, Vec::new(), false)]),
            true,
        ),
        (
            "huge icmsgsize",
            answer_with(|b| b[8 + 10..8 + 12].copy_from_slice(&u16::MAX.to_le_bytes())),
            true,
        ),
        (
            "header only, body claimed",
            answer_with(|b| b.truncate(28)),
            true,
        ),
        (
            "wrong message type",
            answer_with(|b| b[8 + 4..8 + 6].copy_from_slice(&1u16.to_le_bytes())),
            true,
        ),
        ("not a response", answer_with(|b| b[8 + 17] = 2), true),
        (
            "wrong versions",
            answer_with(|b| b[8..8 + 4].copy_from_slice(&[1, 0, 0, 0])),
            true,
        ),
        (
            "random bytes",
            Box::new(|id, _| vec![(id, (0..200u32).map(|i| (i * 37) as u8).collect(), false)]),
            true,
        ),
        // Not an in-band packet: dropped; the request times out.
        (
            "completion packet",
            Box::new(|id, req| vec![(id, req.to_vec(), true)]),
            false,
        ),
        // An answer for another transaction: dropped; the request times out.
        (
            "wrong transaction id",
            Box::new(|id, req| {
                let mut b = req.to_vec();
                b[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
                vec![(id ^ 0x55, b, false)]
            }),
            false,
        ),
        // Silence.
        ("no answer", Box::new(|_, _| Vec::new()), false),
    ];
    for (what, hostile, is_bad) in cases {
        h.behavior().hostile.insert(SHUTDOWN_CLASS, hostile);
        let before = sd.status().counters;
        let e = sd.request_shutdown(false).unwrap_err();
        let after = sd.status().counters;
        if is_bad {
            assert!(matches!(e, IcError::BadResponse { .. }), "{what}: {e}");
            assert_eq!(after.malformed, before.malformed + 1, "{what}");
        } else {
            assert!(matches!(e, IcError::Timeout { .. }), "{what}: {e}");
            assert_eq!(after.timeouts, before.timeouts + 1, "{what}");
        }
        assert_eq!(sd.status().phase, Phase::Ready, "{what}");
    }
    let c = sd.status().counters;
    assert!(c.malformed >= 9, "{c:?}"); // 8 bad answers + the completion packet
                                        // The guest behaves again: requests succeed.
    h.behavior().hostile.clear();
    sd.request_shutdown(true).unwrap();
    // A flood of junk for unknown transactions is counted and dropped.
    h.behavior().hostile.insert(
        SHUTDOWN_CLASS,
        Box::new(|id, req| {
            let mut out: Vec<(u64, Vec<u8>, bool)> = (0..50)
                .map(|i| (1_000_000 + i, vec![0xee; 64], false))
                .collect();
            let mut b = req.to_vec();
            b[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
            out.push((id, b, false));
            out
        }),
    );
    let before = sd.status().counters.malformed;
    sd.request_shutdown(false).unwrap();
    wait_for("junk counted", TIMEOUT, || {
        sd.status().counters.malformed >= before + 50
    });
}

#[test]
fn malformed_negotiate_answers_disable_until_reopen() {
    let (vsps, hs) = services();
    let kvp = hs.kvp.unwrap();
    let h = Harness::start(vsps, Behavior::default(), &[]);
    type ReasonCheck = fn(&str) -> bool;
    let cases: Vec<(&str, Hostile, ReasonCheck)> = vec![
        (
            "unknown version",
            answer_with(|b| {
                b[28..32].copy_from_slice(&[1, 0, 1, 0]);
                b[36..44].copy_from_slice(&[3, 0, 0, 0, 9, 0, 9, 0]);
                b[8 + 10..8 + 12].copy_from_slice(&16u16.to_le_bytes());
            }),
            |r| r.contains("9.9"),
        ),
        (
            "counts beyond the body",
            answer_with(|b| {
                b[28..32].copy_from_slice(&[1, 0, 1, 0]);
                b[8 + 10..8 + 12].copy_from_slice(&10u16.to_le_bytes());
            }),
            |r| r.contains("bytes"),
        ),
        (
            "too many versions",
            answer_with(|b| b[28..32].copy_from_slice(&[2, 0, 3, 0])),
            |r| r.contains("2 framework"),
        ),
        (
            "short",
            Box::new(|id, _| vec![(id, vec![0; 12], false)]),
            |r| r.contains("28"),
        ),
    ];
    for (what, hostile, reason_ok) in cases {
        h.behavior().hostile.insert(KVP_CLASS, hostile);
        h.open(KVP_CLASS).unwrap();
        wait_phase(what, || kvp.status(), Phase::Broken);
        let reason = kvp.status().broken_reason.unwrap();
        assert!(reason_ok(&reason), "{what}: {reason}");
        assert!(matches!(
            kvp.set(KvpPool::External, "k", "v"),
            Err(IcError::Broken { .. })
        ));
        h.close(KVP_CLASS).unwrap();
        wait_phase("closed", || kvp.status(), Phase::Closed);
    }
    h.behavior().hostile.clear();
    h.open(KVP_CLASS).unwrap();
    wait_phase("ready", || kvp.status(), Phase::Ready);
    kvp.set(KvpPool::External, "k", "v").unwrap();
    assert_eq!(kvp.status().counters.opens, 5);
}

#[test]
fn wrong_heartbeat_answers_are_not_signs_of_life() {
    let (vsps, hs) = services();
    let hb = hs.heartbeat.unwrap();
    let mut b = Behavior::default();
    // Sequence number not incremented.
    b.hostile.insert(
        HEARTBEAT_CLASS,
        Box::new(|id, req| {
            let mut b = req.to_vec();
            if u16::from_le_bytes([b[8 + 4], b[8 + 5]]) != 0 {
                b[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
                return vec![(id, b, false)];
            }
            // Answer NEGOTIATE properly (Linux-like): framework 3.0, heartbeat 3.0.
            b[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
            b[8 + 10..8 + 12].copy_from_slice(&16u16.to_le_bytes());
            b[28..32].copy_from_slice(&[1, 0, 1, 0]);
            b[36..44].copy_from_slice(&[3, 0, 0, 0, 3, 0, 0, 0]);
            vec![(id, b, false)]
        }),
    );
    let h = Harness::start(vsps, b, &[HEARTBEAT_CLASS]);
    wait_for("bad answers", TIMEOUT, || hb.report().bad_answers >= 5);
    wait_for("no contact", TIMEOUT, || {
        hb.status() == HeartbeatStatus::NoContact
    });
    let r = hb.report();
    assert_eq!(r.answered, 0);
    assert_eq!(r.last_answer, None);
    assert_eq!(r.service.phase, Phase::Ready);
    // A failure status is not a sign of life either.
    h.behavior().hostile.insert(
        HEARTBEAT_CLASS,
        answer_with(|b| {
            let seq = u64::from_le_bytes(b[28..36].try_into().unwrap()) + 1;
            b[28..36].copy_from_slice(&seq.to_le_bytes());
            b[8 + 12..8 + 16].copy_from_slice(&0x8000_4005u32.to_le_bytes());
        }),
    );
    let bad = hb.report().bad_answers;
    wait_for("more bad answers", TIMEOUT, || {
        hb.report().bad_answers > bad + 3
    });
    assert_eq!(hb.report().answered, 0);
    // Correct answers: healthy.
    h.behavior().hostile.clear();
    wait_for("healthy", TIMEOUT, || {
        hb.status() == HeartbeatStatus::Healthy
    });
}

#[test]
fn hostile_kvp_answers() {
    let (vsps, hs) = services();
    let kvp = hs.kvp.unwrap();
    let h = Harness::start(vsps, Behavior::default(), &[KVP_CLASS]);
    wait_phase("ready", || kvp.status(), Phase::Ready);
    let cases: Vec<(&str, Hostile, ProtocolError)> = vec![
        (
            "other pool",
            answer_with(|b| b[29] = 4),
            ProtocolError::KvpMismatch {
                op: 3,
                pool: 0,
                got_op: 3,
                got_pool: 4,
            },
        ),
        (
            "truncated body",
            answer_with(|b| {
                b.truncate(28 + 40);
                b[8 + 10..8 + 12].copy_from_slice(&40u16.to_le_bytes());
            }),
            ProtocolError::TooShort {
                what: "KVP ENUMERATE answer",
                need: 2580,
                got: 40,
            },
        ),
        (
            "key size beyond the field",
            answer_with(|b| {
                b[36..40].copy_from_slice(&1u32.to_le_bytes());
                b[40..44].copy_from_slice(&4096u32.to_le_bytes());
            }),
            ProtocolError::BadFieldSize {
                field: "key",
                size: 4096,
                max: 512,
            },
        ),
        (
            "value type",
            answer_with(|b| b[36..40].copy_from_slice(&8u32.to_le_bytes())),
            ProtocolError::KvpValueType(8),
        ),
    ];
    for (what, hostile, error) in cases {
        h.behavior().hostile.insert(KVP_CLASS, hostile);
        let e = kvp.enumerate(KvpPool::External).unwrap_err();
        assert_eq!(
            e,
            IcError::BadResponse {
                service: "kvp",
                error
            },
            "{what}"
        );
    }
    h.behavior().hostile.clear();
    kvp.set(KvpPool::External, "a", "b").unwrap();
    assert_eq!(kvp.enumerate(KvpPool::External).unwrap().len(), 1);
}
