//! The heartbeat service: is the guest alive?
//!
//! **What it is.** Every [`HeartbeatConfig::interval`] (1 s of wall time by default) the host
//! sends a heartbeat (IC message type 1, `heartbeat_msg_data {u64 seq_num, u32
//! reserved[8]}`); Linux answers with `seq_num + 1` (`heartbeat_onchannelcallback`). We use
//! the VMBus transaction id as the sequence number, so every answer, even a late one, can be
//! checked on its own. The host keeps the time of the last valid answer and reports
//! [`HeartbeatStatus`]: `Healthy` while the last answer is at most
//! [`HeartbeatConfig::timeout`] old, `NoContact` once an answer is overdue, `Unknown` before
//! that (channel closed, or just opened).
//!
//! **What it talks to.** Its channel through the IC engine (`crate::framework`), and the
//! worker's control socket through [`HeartbeatHandle`].
//!
//! **What it must never do.** Count a malformed answer (wrong sequence, failure status,
//! bad header) as a sign of life; queue heartbeats (at most one is outstanding, and one
//! that is not answered within an interval is given up); block the channel thread.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::framework::{Core, Ctx, IcVsp, Reply, Service, ServiceSpec, ServiceStatus, Start};
use crate::protocol::{self, ProtocolError, HEARTBEAT_VERSIONS, HV_S_OK, MSGTYPE_HEARTBEAT};
use crate::{Guid, IcError};

/// The heartbeat device class.
pub const HEARTBEAT_CLASS: Guid = Guid::from_str_const("57164f39-9115-4e78-ab55-382f3bd5422d");

static SPEC: ServiceSpec = ServiceSpec {
    name: "heartbeat",
    class_id: HEARTBEAT_CLASS,
    msg_type: MSGTYPE_HEARTBEAT,
    versions: HEARTBEAT_VERSIONS,
    hint: "",
};

/// Heartbeat settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time between heartbeats.
    pub interval: Duration,
    /// An answer older than this (or none this long after the channel opened) means
    /// [`HeartbeatStatus::NoContact`].
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What the host knows about the guest's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatStatus {
    /// The channel is closed, or opened less than a timeout ago with no answer yet.
    Unknown,
    /// The last answer is recent.
    Healthy,
    /// The channel is open and no answer came within the timeout.
    NoContact,
}

/// A heartbeat report for the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatReport {
    /// The status now.
    pub status: HeartbeatStatus,
    /// Wall-clock time of the last valid answer (any channel open).
    pub last_answer: Option<SystemTime>,
    /// How long ago that was.
    pub since_last_answer: Option<Duration>,
    /// Heartbeats sent.
    pub sent: u64,
    /// Valid answers.
    pub answered: u64,
    /// Heartbeats not answered within an interval.
    pub missed: u64,
    /// Answers rejected (wrong sequence number, failure status, malformed).
    pub bad_answers: u64,
    /// The channel.
    pub service: ServiceStatus,
}

#[derive(Default)]
struct State {
    opened_at: Option<Instant>,
    next_beat: Option<Instant>,
    /// First transaction id sent on this open: older answers are not this open's.
    first_id: Option<u64>,
    answered_this_open: Option<Instant>,
    last_answer: Option<(Instant, SystemTime)>,
    sent: u64,
    answered: u64,
    missed: u64,
    bad: u64,
}

struct Heartbeat {
    config: HeartbeatConfig,
    state: Mutex<State>,
}

impl Heartbeat {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(reply: &Reply) -> Result<(), IcError> {
        if reply.status != HV_S_OK {
            return Err(IcError::Refused {
                service: SPEC.name,
                status: reply.status,
            });
        }
        let seq =
            protocol::parse_heartbeat_body(&reply.body).map_err(|error| IcError::BadResponse {
                service: SPEC.name,
                error,
            })?;
        let expected = reply.id.wrapping_add(1);
        if seq != expected {
            return Err(IcError::BadResponse {
                service: SPEC.name,
                error: ProtocolError::HeartbeatSequence { expected, got: seq },
            });
        }
        Ok(())
    }

    fn record(st: &mut State) {
        let now = Instant::now();
        st.answered += 1;
        st.answered_this_open = Some(now);
        st.last_answer = Some((now, SystemTime::now()));
    }

    fn status(&self, open: bool) -> HeartbeatStatus {
        let st = self.lock();
        if !open {
            return HeartbeatStatus::Unknown;
        }
        let timeout = self.config.timeout;
        match (st.answered_this_open, st.opened_at) {
            (Some(t), _) if t.elapsed() <= timeout => HeartbeatStatus::Healthy,
            (Some(_), _) => HeartbeatStatus::NoContact,
            (None, Some(o)) if o.elapsed() > timeout => HeartbeatStatus::NoContact,
            _ => HeartbeatStatus::Unknown,
        }
    }
}

impl Service for Heartbeat {
    fn on_open(&self) {
        let mut st = self.lock();
        st.opened_at = Some(Instant::now());
        st.next_beat = None;
        st.first_id = None;
        st.answered_this_open = None;
    }

    fn on_ready(&self, _ctx: &Ctx<'_>) {
        self.lock().next_beat = Some(Instant::now());
    }

    fn poll(&self, ctx: &Ctx<'_>, now: Instant) -> Option<Instant> {
        let interval = self.config.interval;
        let due = self.lock().next_beat.is_some_and(|t| t <= now);
        if due {
            // Given up after an interval, so the next heartbeat finds the slot free.
            let r = ctx.start(0, interval, |neg, id| {
                protocol::build_heartbeat(neg, id, id)
            });
            let mut st = self.lock();
            if let Start::Sent(id) = r {
                st.sent += 1;
                st.first_id.get_or_insert(id);
            }
            st.next_beat = Some(now + interval);
        }
        self.lock().next_beat
    }

    fn on_async_reply(&self, _ctx: &Ctx<'_>, _tag: u64, reply: Result<Reply, IcError>) {
        let ok = reply.and_then(|r| Self::check(&r));
        let mut st = self.lock();
        match ok {
            Ok(()) => Self::record(&mut st),
            Err(e) => {
                st.bad += 1;
                tracing::debug!("heartbeat answer rejected: {e}");
            }
        }
    }

    fn on_async_timeout(&self, _tag: u64, _id: u64) {
        self.lock().missed += 1;
    }

    fn on_late_reply(&self, reply: &Reply) -> bool {
        let mut st = self.lock();
        // A late but valid answer to one of this open's heartbeats still proves life.
        if st.first_id.is_some_and(|f| reply.id >= f) && Self::check(reply).is_ok() {
            Self::record(&mut st);
            true
        } else {
            st.bad += 1;
            false
        }
    }

    fn on_close(&self) {
        let mut st = self.lock();
        st.opened_at = None;
        st.next_beat = None;
        st.answered_this_open = None;
    }
}

/// The heartbeat service's handle: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct HeartbeatHandle {
    core: Arc<Core>,
    hb: Arc<Heartbeat>,
}

impl std::fmt::Debug for HeartbeatHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatHandle").finish_non_exhaustive()
    }
}

impl HeartbeatHandle {
    /// The status now.
    pub fn status(&self) -> HeartbeatStatus {
        self.hb.status(self.core.is_open())
    }

    /// The full report.
    pub fn report(&self) -> HeartbeatReport {
        let status = self.status();
        let st = self.hb.lock();
        HeartbeatReport {
            status,
            last_answer: st.last_answer.map(|(_, w)| w),
            since_last_answer: st.last_answer.map(|(i, _)| i.elapsed()),
            sent: st.sent,
            answered: st.answered,
            missed: st.missed,
            bad_answers: st.bad,
            service: self.core.status(),
        }
    }
}

/// A heartbeat VSP and its handle; the instance id derives from `seed`.
pub fn new(seed: &[u8], config: HeartbeatConfig) -> (IcVsp, HeartbeatHandle) {
    let core = Core::new(&SPEC);
    let hb = Arc::new(Heartbeat {
        config,
        state: Mutex::new(State::default()),
    });
    let vsp = IcVsp::new(
        core.clone(),
        hb.clone(),
        crate::instance_id(seed, HEARTBEAT_CLASS),
    );
    (vsp, HeartbeatHandle { core, hb })
}
