//! Guest answers on the IC channels: framing, NEGOTIATE, heartbeat, shutdown and time-sync
//! answers go through the same parsers the channel engine uses. Nothing may panic, and what
//! is accepted must respect the bounds checked.

#![no_main]

use ic::protocol::{
    self, Negotiated, Version, FRAMEWORK_VERSIONS, HEARTBEAT_VERSIONS, IC_HEADER_SIZE,
    KVP_VERSIONS, MSGTYPE_HEARTBEAT, MSGTYPE_NEGOTIATE, MSGTYPE_SHUTDOWN, MSGTYPE_TIMESYNC,
    SHUTDOWN_VERSIONS, TIMESYNC_VERSIONS,
};
use libfuzzer_sys::fuzz_target;

const SERVICES: [&[Version]; 4] = [
    HEARTBEAT_VERSIONS,
    SHUTDOWN_VERSIONS,
    TIMESYNC_VERSIONS,
    KVP_VERSIONS,
];

fuzz_target!(|data: &[u8]| {
    // Negotiate bodies on their own (the engine parses the body of a NEGOTIATE answer).
    for versions in SERVICES {
        if let Ok(n) = protocol::parse_negotiate_response(data, FRAMEWORK_VERSIONS, versions) {
            assert!(FRAMEWORK_VERSIONS.contains(&n.framework));
            assert!(versions.contains(&n.message));
        }
    }
    let _ = protocol::parse_heartbeat_body(data);

    let Ok(m) = protocol::parse_message(data) else {
        return;
    };
    assert!(IC_HEADER_SIZE + m.body.len() <= data.len());
    for t in [
        MSGTYPE_NEGOTIATE,
        MSGTYPE_HEARTBEAT,
        MSGTYPE_SHUTDOWN,
        MSGTYPE_TIMESYNC,
    ] {
        if m.check_response(t).is_ok() {
            assert_eq!(m.msg_type, t);
        }
    }
    for versions in SERVICES {
        if let Ok(n) = protocol::parse_negotiate_response(m.body, FRAMEWORK_VERSIONS, versions) {
            // A request built with the agreed versions is accepted by the same checks.
            let req = protocol::build_heartbeat(n, 7, 7);
            let r = protocol::parse_message(&req).unwrap();
            assert!(r.check_versions(n).is_ok());
        }
    }
    let neg = Negotiated {
        framework: m.framework,
        message: m.message,
    };
    assert!(m.check_versions(neg).is_ok());
    let _ = protocol::parse_heartbeat_body(m.body);
});
