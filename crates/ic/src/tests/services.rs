//! Negotiation, heartbeat, shutdown, time sync, and channel life cycle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::guest::{Behavior, Harness, TIMEOUT};
use super::{services, wait_for, wait_phase};
use crate::heartbeat::HEARTBEAT_CLASS;
use crate::kvp::KVP_CLASS;
use crate::protocol::{
    system_time_to_filetime, Negotiated, Version, HV_E_FAIL, TIMESYNC_FLAG_SAMPLE,
    TIMESYNC_FLAG_SYNC,
};
use crate::shutdown::SHUTDOWN_CLASS;
use crate::timesync::TIMESYNC_CLASS;
use crate::{
    create, timesync, HeartbeatStatus, IcConfig, IcError, Phase, ShutdownAction, ShutdownRequest,
    TimesyncConfig,
};

const ALL: [crate::Guid; 4] = [HEARTBEAT_CLASS, SHUTDOWN_CLASS, TIMESYNC_CLASS, KVP_CLASS];

fn neg(f: (u16, u16), s: (u16, u16)) -> Option<Negotiated> {
    Some(Negotiated {
        framework: Version::new(f.0, f.1),
        message: Version::new(s.0, s.1),
    })
}

#[test]
fn negotiation_picks_the_versions_linux_prefers() {
    let (vsps, h) = services();
    let classes: Vec<_> = vsps.iter().map(vmbus_server::Vsp::class_id).collect();
    assert_eq!(classes, ALL);
    let hb = h.heartbeat.unwrap();
    let sd = h.shutdown.unwrap();
    let ts = h.timesync.unwrap();
    let kvp = h.kvp.unwrap();
    let harness = Harness::start(vsps, Behavior::default(), &ALL);
    wait_phase("heartbeat", || hb.report().service, Phase::Ready);
    wait_phase("shutdown", || sd.status(), Phase::Ready);
    wait_phase("timesync", || ts.report().service, Phase::Ready);
    wait_phase("kvp", || kvp.status(), Phase::Ready);
    assert_eq!(hb.report().service.negotiated, neg((3, 0), (3, 0)));
    assert_eq!(sd.status().negotiated, neg((3, 0), (3, 2)));
    assert_eq!(ts.report().service.negotiated, neg((3, 0), (4, 0)));
    assert_eq!(kvp.status().negotiated, neg((3, 0), (4, 0)));
    // The guest saw the same choice.
    let log = harness.log();
    for (class, status) in [
        (HEARTBEAT_CLASS, hb.report().service),
        (SHUTDOWN_CLASS, sd.status()),
        (KVP_CLASS, kvp.status()),
    ] {
        let n = status.negotiated.unwrap();
        assert_eq!(log.negotiated[&class], Some((n.framework, n.message)));
    }
    assert_eq!(sd.status().counters.opens, 1);
}

#[test]
fn older_guest_gets_older_versions_and_layouts() {
    let (vsps, h) = services();
    let mut b = Behavior::default();
    b.versions.insert(
        TIMESYNC_CLASS,
        (vec![Version::new(1, 0)], vec![Version::new(3, 0)]),
    );
    let ts = h.timesync.unwrap();
    let harness = Harness::start(vsps, b, &[TIMESYNC_CLASS]);
    wait_phase("timesync", || ts.report().service, Phase::Ready);
    assert_eq!(ts.report().service.negotiated, neg((1, 0), (3, 0)));
    wait_for("a time message", TIMEOUT, || {
        !harness.log().timesync.is_empty()
    });
    let (ver, flags, _, reference) = harness.log().timesync[0];
    // Version 3 carries ictimesync_data: no reference time.
    assert_eq!(ver, Version::new(3, 0));
    assert_eq!(flags, TIMESYNC_FLAG_SYNC);
    assert_eq!(reference, None);
}

#[test]
fn refused_negotiation_disables_the_service_until_reopen() {
    let (vsps, h) = services();
    let mut b = Behavior::default();
    // A guest that only knows a service version we do not offer.
    b.versions.insert(
        SHUTDOWN_CLASS,
        (vec![Version::new(3, 0)], vec![Version::new(2, 0)]),
    );
    let sd = h.shutdown.unwrap();
    let harness = Harness::start(vsps, b, &[SHUTDOWN_CLASS]);
    wait_phase("broken", || sd.status(), Phase::Broken);
    assert_eq!(harness.log().negotiated[&SHUTDOWN_CLASS], None);
    let reason = sd.status().broken_reason.unwrap();
    assert!(reason.contains("none of the versions"), "{reason}");
    assert!(matches!(
        sd.request_shutdown(false),
        Err(IcError::Broken { .. })
    ));
    assert!(harness.log().shutdowns.is_empty());
    // The guest driver is updated and reloaded: the service works again.
    harness.behavior().versions.clear();
    harness.close(SHUTDOWN_CLASS).unwrap();
    wait_phase("closed", || sd.status(), Phase::Closed);
    harness.open(SHUTDOWN_CLASS).unwrap();
    wait_phase("ready", || sd.status(), Phase::Ready);
    sd.request_shutdown(false).unwrap();
    assert_eq!(sd.status().counters.opens, 2);
}

#[test]
fn heartbeat_goes_healthy_then_no_contact_then_healthy() {
    let (vsps, h) = services();
    let hb = h.heartbeat.unwrap();
    // Not opened yet: unknown.
    let harness = Harness::start(vsps, Behavior::default(), &[]);
    assert_eq!(hb.status(), HeartbeatStatus::Unknown);
    assert_eq!(hb.report().last_answer, None);
    let before = SystemTime::now();
    harness.open(HEARTBEAT_CLASS).unwrap();
    wait_for("healthy", TIMEOUT, || {
        hb.status() == HeartbeatStatus::Healthy
    });
    let r = hb.report();
    assert!(r.answered >= 1 && r.sent >= r.answered);
    assert!(r.last_answer.unwrap() >= before);
    assert!(r.since_last_answer.unwrap() < Duration::from_millis(300));
    assert_eq!(r.bad_answers, 0);

    // The guest hangs (still reads, never answers).
    harness.behavior().heartbeat_answers = false;
    let stopped = Instant::now();
    wait_for("no contact", TIMEOUT, || {
        hb.status() == HeartbeatStatus::NoContact
    });
    assert!(stopped.elapsed() >= Duration::from_millis(250));
    let r = hb.report();
    assert!(r.missed > 0);
    assert!(r.since_last_answer.unwrap() > Duration::from_millis(300));
    // Heartbeats kept coming, one at a time, not piling up.
    let seen = harness.log().heartbeats;
    assert!(seen > r.answered);

    // It recovers.
    harness.behavior().heartbeat_answers = true;
    wait_for("healthy again", TIMEOUT, || {
        hb.status() == HeartbeatStatus::Healthy
    });

    // Channel closed: unknown again; the last answer is remembered.
    harness.close(HEARTBEAT_CLASS).unwrap();
    wait_for("unknown", TIMEOUT, || {
        hb.status() == HeartbeatStatus::Unknown
    });
    assert!(hb.report().last_answer.is_some());
}

#[test]
fn heartbeat_without_any_answer_becomes_no_contact() {
    let (vsps, h) = services();
    let hb = h.heartbeat.unwrap();
    let b = Behavior {
        heartbeat_answers: false,
        ..Behavior::default()
    };
    let _harness = Harness::start(vsps, b, &[HEARTBEAT_CLASS]);
    assert_eq!(hb.status(), HeartbeatStatus::Unknown);
    wait_for("no contact", TIMEOUT, || {
        hb.status() == HeartbeatStatus::NoContact
    });
    assert_eq!(hb.report().last_answer, None);
}

#[test]
fn shutdown_requests_accepted_and_refused() {
    let (vsps, h) = services();
    let sd = h.shutdown.unwrap();
    let harness = Harness::start(vsps, Behavior::default(), &[]);
    // Not open: a clear error at once.
    let t = Instant::now();
    assert_eq!(
        sd.request_shutdown(false),
        Err(IcError::NotConnected {
            service: "shutdown"
        })
    );
    assert!(t.elapsed() < Duration::from_millis(500));
    harness.open(SHUTDOWN_CLASS).unwrap();
    wait_phase("ready", || sd.status(), Phase::Ready);

    sd.request_shutdown(false).unwrap();
    sd.request_shutdown(true).unwrap();
    let mut forced = ShutdownRequest::new(true);
    forced.force = true;
    forced.message = "maintenance".into();
    sd.request(&forced).unwrap();
    // Linux refuses hibernation it cannot do.
    let hibernate = ShutdownRequest {
        action: ShutdownAction::Hibernate,
        ..ShutdownRequest::new(false)
    };
    assert_eq!(
        sd.request(&hibernate),
        Err(IcError::Refused {
            service: "shutdown",
            status: HV_E_FAIL
        })
    );
    harness.behavior().hibernation = true;
    sd.request(&hibernate).unwrap();
    // A guest that refuses everything.
    harness.behavior().shutdown_accepts = false;
    let e = sd.request_shutdown(false).unwrap_err();
    assert!(matches!(
        e,
        IcError::Refused {
            status: HV_E_FAIL,
            ..
        }
    ));
    assert!(e.to_string().contains("0x80004005"), "{e}");
    assert_eq!(harness.log().shutdowns, vec![0, 2, 3, 4, 4, 0]);
    let c = sd.status().counters;
    assert_eq!(c.replies, 7); // NEGOTIATE + 6 requests
    assert_eq!(c.malformed, 0);
}

#[test]
fn timesync_sends_sync_first_then_samples_with_fake_clocks() {
    let host_ticks = Arc::new(AtomicU64::new(0));
    let base = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let reference = Arc::new(AtomicU64::new(5_000));
    let mut cfg = {
        let reference = reference.clone();
        TimesyncConfig::new(move || reference.fetch_add(10, Ordering::SeqCst))
    };
    cfg.host_time = {
        let host_ticks = host_ticks.clone();
        Arc::new(move || base + Duration::from_secs(host_ticks.fetch_add(1, Ordering::SeqCst)))
    };
    cfg.interval = Duration::from_millis(30);
    let (vsp, ts) = timesync::new(b"vm", cfg);
    let harness = Harness::start(vec![vsp], Behavior::default(), &[TIMESYNC_CLASS]);
    wait_for("4 messages", TIMEOUT, || harness.log().timesync.len() >= 4);
    let log: Vec<_> = harness.log().timesync.clone();
    let (ver, flags, first_time, first_ref) = log[0];
    assert_eq!(ver, Version::new(4, 0));
    assert_eq!(flags, TIMESYNC_FLAG_SYNC);
    assert_eq!(first_time, system_time_to_filetime(base));
    assert_eq!(first_ref, Some(5_000));
    for (i, &(_, flags, t, r)) in log.iter().enumerate().skip(1) {
        assert_eq!(flags, TIMESYNC_FLAG_SAMPLE);
        assert_eq!(
            t,
            system_time_to_filetime(base + Duration::from_secs(i as u64))
        );
        assert_eq!(r, Some(5_000 + 10 * i as u64));
    }
    wait_for("acks", TIMEOUT, || ts.report().acknowledged >= 3);

    // sync_now: a SYNC, acknowledged, reported.
    let s = ts.sync_now().unwrap();
    assert_eq!(s.flags, TIMESYNC_FLAG_SYNC);
    wait_for("the SYNC arrives", TIMEOUT, || {
        harness
            .log()
            .timesync
            .iter()
            .any(|&(_, f, t, _)| f == TIMESYNC_FLAG_SYNC && t == s.host_time)
    });
    let r = ts.report();
    assert!(r.syncs >= 2 && r.initial_sync_sent && r.refused == 0 && r.bad_answers == 0);

    // Reopen (driver reload): SYNC first again.
    harness.close(TIMESYNC_CLASS).unwrap();
    let n = harness.log().timesync.len();
    harness.open(TIMESYNC_CLASS).unwrap();
    wait_for("a message after reopen", TIMEOUT, || {
        harness.log().timesync.len() > n
    });
    assert_eq!(harness.log().timesync[n].1, TIMESYNC_FLAG_SYNC);
}

#[test]
fn timesync_with_the_real_clock_sends_plausible_filetimes() {
    let (vsp, ts) = timesync::new(b"vm", TimesyncConfig::new(|| 42));
    let harness = Harness::start(vec![vsp], Behavior::default(), &[TIMESYNC_CLASS]);
    wait_for("a message", TIMEOUT, || !harness.log().timesync.is_empty());
    let now = system_time_to_filetime(SystemTime::now());
    let (_, flags, t, r) = harness.log().timesync[0];
    assert_eq!(flags, TIMESYNC_FLAG_SYNC);
    assert_eq!(r, Some(42));
    // Within a minute of now, and after 2020 (FILETIME 132223104000000000).
    assert!(t > 132_223_104_000_000_000);
    assert!(now.abs_diff(t) < 60 * 10_000_000, "{t} vs {now}");
    assert_eq!(ts.report().last_sent.unwrap().host_time, t);
}

#[test]
fn close_during_a_request_fails_it_promptly_and_reopen_works() {
    let (vsps, h) = services();
    let sd = h.shutdown.unwrap();
    let harness = Harness::start(vsps, Behavior::default(), &[SHUTDOWN_CLASS]);
    wait_phase("ready", || sd.status(), Phase::Ready);
    // The guest swallows requests.
    harness
        .behavior()
        .hostile
        .insert(SHUTDOWN_CLASS, Box::new(|_, _| Vec::new()));
    let t = Instant::now();
    let sd2 = sd.clone();
    let pending = std::thread::spawn(move || sd2.request_shutdown(false));
    wait_for("the request reaches the guest", TIMEOUT, || {
        harness.log().requests.get(&SHUTDOWN_CLASS).copied() == Some(2)
    });
    harness.close(SHUTDOWN_CLASS).unwrap();
    assert_eq!(
        pending.join().unwrap(),
        Err(IcError::Closed {
            service: "shutdown"
        })
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    harness.behavior().hostile.clear();
    harness.open(SHUTDOWN_CLASS).unwrap();
    wait_phase("ready again", || sd.status(), Phase::Ready);
    sd.request_shutdown(true).unwrap();
}

#[test]
fn rescind_closes_the_service_cleanly() {
    let (vsps, h) = services();
    let kvp = h.kvp.unwrap();
    let hb = h.heartbeat.unwrap();
    let harness = Harness::start(vsps, Behavior::default(), &ALL);
    wait_phase("kvp", || kvp.status(), Phase::Ready);
    wait_for("healthy", TIMEOUT, || {
        hb.status() == HeartbeatStatus::Healthy
    });
    harness
        .server
        .remove_device(harness.devices[&KVP_CLASS])
        .unwrap();
    assert_eq!(kvp.status().phase, Phase::Closed);
    assert_eq!(
        kvp.set(crate::KvpPool::External, "k", "v"),
        Err(IcError::NotConnected { service: "kvp" })
    );
    harness
        .server
        .remove_device(harness.devices[&HEARTBEAT_CLASS])
        .unwrap();
    assert_eq!(hb.status(), HeartbeatStatus::Unknown);
}

#[test]
fn a_guest_that_stops_reading_fills_its_ring_without_blocking_anything() {
    let cfg = IcConfig {
        heartbeat: Some(crate::HeartbeatConfig {
            interval: Duration::from_millis(2),
            timeout: Duration::from_millis(300),
        }),
        ..IcConfig::default()
    };
    let (vsps, h) = create(b"vm", cfg);
    let hb = h.heartbeat.unwrap();
    let b = Behavior {
        deaf: vec![HEARTBEAT_CLASS],
        ..Behavior::default()
    };
    // The guest opens the channel but never reads it (not even NEGOTIATE).
    let harness = Harness::start(vsps, b, &[HEARTBEAT_CLASS]);
    std::thread::sleep(Duration::from_millis(100));
    let r = hb.report();
    assert_eq!(r.service.phase, Phase::Negotiating);
    assert_eq!(r.service.counters.requests, 1);
    assert_eq!(r.sent, 0);
    // Reading resumes: negotiation completes, heartbeats flow.
    harness.behavior().deaf.clear();
    wait_for("healthy", TIMEOUT, || {
        hb.status() == HeartbeatStatus::Healthy
    });
    // Now deaf while ready: heartbeats are given up one by one and the ring fills; the
    // host never blocks and counts what it could not send.
    harness.behavior().deaf.push(HEARTBEAT_CLASS);
    wait_for("ring full", Duration::from_secs(10), || {
        hb.report().service.counters.ring_full > 0
    });
    wait_for("no contact", TIMEOUT, || {
        hb.status() == HeartbeatStatus::NoContact
    });
    // Closing still works at once.
    let t = Instant::now();
    harness.close(HEARTBEAT_CLASS).unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(hb.report().service.phase, Phase::Closed);
}
