//! Hyper-V integration services (ICs) for the Verdigris worker: heartbeat, shutdown, time
//! synchronization and key-value pair exchange (KVP), as VMBus devices.
//!
//! **What it is.** One VSP per service, each matching what the stock Linux `hv_utils` driver
//! (and, for KVP, the `hv_kvp_daemon` user-space daemon) expects of a Hyper-V host:
//!
//! | service | class | host does |
//! |---|---|---|
//! | [`heartbeat`] | `57164f39-9115-4e78-ab55-382f3bd5422d` | sends a numbered heartbeat every interval, tracks the guest's answers ([`HeartbeatStatus`]) |
//! | [`shutdown`] | `0e0b6031-5213-4934-818b-38d90ced39db` | asks the guest to power off, reboot or hibernate, reports whether it accepted |
//! | [`timesync`] | `9527e630-d0ae-497b-adce-e80ab0175caf` | pushes host time (FILETIME) with the guest's reference time: SYNC first, SAMPLEs after |
//! | [`kvp`] | `a9a0f4e7-5a45-4d96-b827-8a841e8c03e6` | sets, deletes, enumerates and reads the guest's key-value pools |
//!
//! All four share the IC framing and version negotiation ([`protocol`]) and one channel
//! engine ([`IcVsp`]): the guest opens the channel, the host sends NEGOTIATE, and from then
//! on the host is the requester — one transaction outstanding per service, each answered in
//! the same packet format. Each service is created or not per VM, by the worker:
//! [`create`] (or each module's `new`) returns the VSPs to add to the VM's
//! `vmbus_server::VmbusServer` and a cheap, cloneable, thread-safe handle per service for the
//! worker's control socket ([`IcHandles`]).
//!
//! **What it talks to.**
//! - `vmbus_server`: each [`IcVsp`] is a `vmbus_server::Vsp`; when the guest opens its
//!   channel it gets a `vmbus_server::Channel` and serves it on a thread of its own, until
//!   the guest closes the channel (driver unload), the host rescinds it, or the VM resets.
//!   The guest may close and reopen as often as it likes; each open starts afresh
//!   (renegotiation; time sync sends SYNC again).
//! - The worker: it passes a VM-specific seed (stable instance ids, see [`instance_id`]),
//!   the guest reference-time source (hv1's reference counter) for time sync, and calls the
//!   handles from its control socket.
//!
//! **What it must never do.**
//! - Trust guest data. Every answer is parsed by the pure [`protocol`] module (fuzzed in
//!   `crates/ic/fuzz`): sizes, message type, versions, transaction ids and status are
//!   checked; a malformed answer fails only that request and is counted; a bad NEGOTIATE
//!   answer or a corrupted ring disables only that service until the guest reopens it.
//!   Nothing a guest sends panics the worker.
//! - Block the VMBus control thread: `open` spawns, `close` joins a thread that is already
//!   stopping; the channel thread never waits for ring space.
//! - Wait without bound or grow without bound: every host request has a timeout (the guest's
//!   daemon may be absent: KVP then fails with "not ready"/"timed out" errors naming
//!   `hv_kvp_daemon`), enumeration is capped, nothing queues up.
//!
//! Why hand-written: no published crate implements the host side of the Hyper-V ICs for
//! our VMBus server. Facts come from Linux (`drivers/hv/hv_util.c`, `hv_kvp.c`,
//! `channel_mgmt.c`, `include/linux/hyperv.h`, `include/uapi/linux/hyperv.h`,
//! `tools/hv/hv_kvp_daemon.c`).

mod framework;
pub mod heartbeat;
pub mod kvp;
pub mod protocol;
pub mod shutdown;
#[cfg(test)]
mod tests;
pub mod timesync;

use std::time::Duration;

pub use framework::{Counters, IcVsp, Phase, ServiceStatus};
pub use heartbeat::{HeartbeatConfig, HeartbeatHandle, HeartbeatReport, HeartbeatStatus};
pub use kvp::{KvpConfig, KvpHandle};
pub use protocol::kvp::KvpPool;
pub use protocol::{Negotiated, ProtocolError, TimeSample, Version};
pub use shutdown::{ShutdownAction, ShutdownConfig, ShutdownHandle, ShutdownRequest};
pub use timesync::{TimesyncConfig, TimesyncHandle, TimesyncReport};
pub use vmbus_server::Guid;

/// A host request to an integration service failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IcError {
    /// The guest has not opened the service's channel.
    #[error("the guest has not opened the {service} channel (hv_utils not loaded, or the guest is not running)")]
    NotConnected {
        /// Service name.
        service: &'static str,
    },
    /// The channel is open but the guest has not answered version negotiation.
    #[error("the guest has not completed version negotiation on the {service} channel{hint}")]
    NotReady {
        /// Service name.
        service: &'static str,
        /// What to check.
        hint: &'static str,
    },
    /// The guest broke the protocol; the service works again once the guest reopens it.
    #[error("the {service} service is disabled: {reason} (it recovers when the guest reopens the channel)")]
    Broken {
        /// Service name.
        service: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer from the guest's {service} service within {timeout:?}{hint}")]
    Timeout {
        /// Service name.
        service: &'static str,
        /// The timeout.
        timeout: Duration,
        /// What to check.
        hint: &'static str,
    },
    /// The guest is not reading its channel.
    #[error("the guest is not reading its {service} channel (ring full)")]
    RingFull {
        /// Service name.
        service: &'static str,
    },
    /// The channel closed while the request was in flight.
    #[error("the guest closed the {service} channel during the request")]
    Closed {
        /// Service name.
        service: &'static str,
    },
    /// The channel failed.
    #[error("{service} channel error: {error}")]
    Channel {
        /// Service name.
        service: &'static str,
        /// The channel's error.
        error: String,
    },
    /// The guest answered with a failure status.
    #[error("the guest refused the {service} request: status {status:#010x} ({})", status_name(*status))]
    Refused {
        /// Service name.
        service: &'static str,
        /// The `HV_*` status.
        status: u32,
    },
    /// The guest's answer was malformed.
    #[error("malformed answer from the guest's {service} service: {error}")]
    BadResponse {
        /// Service name.
        service: &'static str,
        /// What was wrong.
        error: ProtocolError,
    },
    /// The request itself is invalid (key too long, ...).
    #[error("invalid {service} request: {reason}")]
    InvalidArgument {
        /// Service name.
        service: &'static str,
        /// Why.
        reason: String,
    },
    /// More items than the configured limit.
    #[error("the guest's {service} answer exceeds the limit of {limit} items")]
    TooManyItems {
        /// Service name.
        service: &'static str,
        /// The limit.
        limit: usize,
    },
}

/// A readable name for an `HV_*` status.
pub fn status_name(status: u32) -> &'static str {
    match status {
        protocol::HV_S_OK => "success",
        protocol::HV_E_FAIL => "HV_E_FAIL: failed",
        protocol::HV_S_CONT => "HV_S_CONT: not found / no more items",
        protocol::HV_ERROR_NOT_SUPPORTED => "not supported",
        protocol::HV_INVALIDARG => "invalid argument",
        _ => "unknown status",
    }
}

/// FNV-1a, 64 bits, from `basis`. Hand-written (a few lines) because the instance id must be
/// stable across Rust releases, which `std`'s hashers do not promise.
fn fnv1a(basis: u64, parts: &[&[u8]]) -> u64 {
    let mut h = basis;
    for part in parts {
        // Length-prefix each part so that ("ab", "c") and ("a", "bc") differ.
        for &b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The instance id of service `class_id` for a VM whose seed is `seed` (e.g. its UUID
/// bytes): stable for a given seed (guests may remember devices by instance id), different
/// across VMs and services. An RFC 9562 version-8 (custom) UUID.
pub fn instance_id(seed: &[u8], class_id: Guid) -> Guid {
    let tag: &[u8] = b"verdigris-ic-instance";
    let class = zerocopy::IntoBytes::as_bytes(&class_id);
    let hi = fnv1a(0xcbf2_9ce4_8422_2325, &[tag, class, seed]);
    let lo = fnv1a(0x6c62_272e_07bb_0142, &[tag, seed, class]);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC variant
    Guid::from_fields(
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
        [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
    )
}

/// Which services a VM gets, and their settings (`None`: not offered).
#[derive(Clone, Debug, Default)]
pub struct IcConfig {
    /// Heartbeat.
    pub heartbeat: Option<HeartbeatConfig>,
    /// Shutdown.
    pub shutdown: Option<ShutdownConfig>,
    /// Time synchronization (needs the guest reference-time source).
    pub timesync: Option<TimesyncConfig>,
    /// Key-value pair exchange.
    pub kvp: Option<KvpConfig>,
}

/// The handles of the services a VM got.
#[derive(Clone, Debug, Default)]
pub struct IcHandles {
    /// Heartbeat.
    pub heartbeat: Option<HeartbeatHandle>,
    /// Shutdown.
    pub shutdown: Option<ShutdownHandle>,
    /// Time synchronization.
    pub timesync: Option<TimesyncHandle>,
    /// Key-value pair exchange.
    pub kvp: Option<KvpHandle>,
}

/// Create the configured services for a VM: the VSPs (add each to the VM's
/// `VmbusServer` with `add_device(Box::new(vsp))`) and their handles.
pub fn create(seed: &[u8], config: IcConfig) -> (Vec<IcVsp>, IcHandles) {
    let mut vsps = Vec::new();
    let mut handles = IcHandles::default();
    if let Some(c) = config.heartbeat {
        let (v, h) = heartbeat::new(seed, c);
        vsps.push(v);
        handles.heartbeat = Some(h);
    }
    if let Some(c) = config.shutdown {
        let (v, h) = shutdown::new(seed, c);
        vsps.push(v);
        handles.shutdown = Some(h);
    }
    if let Some(c) = config.timesync {
        let (v, h) = timesync::new(seed, c);
        vsps.push(v);
        handles.timesync = Some(h);
    }
    if let Some(c) = config.kvp {
        let (v, h) = kvp::new(seed, c);
        vsps.push(v);
        handles.kvp = Some(h);
    }
    (vsps, handles)
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn handles_and_vsps_can_cross_threads() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        fn vsp<T: vmbus_server::Vsp + 'static>() {}
        shareable::<HeartbeatHandle>();
        shareable::<ShutdownHandle>();
        shareable::<TimesyncHandle>();
        shareable::<KvpHandle>();
        shareable::<IcHandles>();
        vsp::<IcVsp>();
        let (vsps, h) = create(
            b"vm",
            IcConfig {
                heartbeat: Some(HeartbeatConfig::default()),
                kvp: Some(KvpConfig::default()),
                ..IcConfig::default()
            },
        );
        let names: Vec<_> = vsps.iter().map(IcVsp::service_name).collect();
        assert_eq!(names, ["heartbeat", "kvp"]);
        assert!(h.heartbeat.is_some() && h.kvp.is_some());
        assert!(h.shutdown.is_none() && h.timesync.is_none());
        // Nothing is open yet.
        let hb = h.heartbeat.unwrap();
        assert_eq!(hb.status(), HeartbeatStatus::Unknown);
        assert_eq!(hb.report().service.phase, Phase::Closed);
    }

    #[test]
    fn instance_ids_are_stable_and_distinct() {
        let a = instance_id(b"vm-1", heartbeat::HEARTBEAT_CLASS);
        assert_eq!(a, instance_id(b"vm-1", heartbeat::HEARTBEAT_CLASS));
        assert_ne!(a, instance_id(b"vm-2", heartbeat::HEARTBEAT_CLASS));
        assert_ne!(a, instance_id(b"vm-1", shutdown::SHUTDOWN_CLASS));
        // Version 8, RFC variant.
        assert_eq!(a.data3.get() >> 12, 8);
        assert_eq!(a.data4[0] >> 6, 0b10);
        // Pinned: changing the derivation would change every VM's devices.
        assert_eq!(
            instance_id(b"verdigris", heartbeat::HEARTBEAT_CLASS).to_string(),
            "8646d73d-6aba-82f7-b75d-6db372c04ed2"
        );
    }
}
