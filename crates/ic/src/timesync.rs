//! The time-synchronization service: give the guest the host's wall-clock time.
//!
//! **What it is.** The host sends IC message type 4 carrying host time as a Windows
//! FILETIME (100 ns since 1601-01-01 UTC). With service version 4.0 the message is
//! `ictimesync_ref_data {u64 parenttime, u64 vmreferencetime, u8 flags, ...}`, where
//! `vmreferencetime` is the guest's reference counter (100 ns) read together with the host
//! time: Linux adds the reference time elapsed since then before using the sample, so delays
//! in delivery do not skew it. Versions 3.0 and 1.0 use `ictimesync_data {parenttime,
//! childtime, roundtriptime, flags}`.
//!
//! Flags (Linux `hv_util.c`, `adj_guesttime`): SYNC (1) makes the guest step its clock
//! (`do_settimeofday64`) — we send it as the first message after every channel open, and on
//! [`TimesyncHandle::sync_now`] (e.g. after the worker restores a VM); SAMPLE (2) only
//! refreshes the guest's record of host time (its PTP clock, `/dev/ptp_hyperv`), stepping
//! the clock only with `timesync_implicit`. We send a SAMPLE every
//! [`TimesyncConfig::interval`] (5 s by default).
//!
//! **What it talks to.** Its channel through the IC engine; two closures from the worker:
//! the host clock ([`TimesyncConfig::host_time`], `SystemTime::now` by default) and the
//! guest reference counter ([`TimesyncConfig::reference_time`], hv1's reference time), so
//! tests can fake both; the control socket through [`TimesyncHandle`].
//!
//! **What it must never do.** Queue samples (one outstanding; skipped when the guest's ring
//! is full), block the channel thread, or accept a malformed answer as an acknowledgement.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::framework::{Core, Ctx, IcVsp, Reply, Service, ServiceSpec, ServiceStatus, Start};
use crate::protocol::{
    self, TimeSample, HV_S_OK, MSGTYPE_TIMESYNC, TIMESYNC_FLAG_SAMPLE, TIMESYNC_FLAG_SYNC,
    TIMESYNC_VERSIONS,
};
use crate::{Guid, IcError};

/// The time-sync device class.
pub const TIMESYNC_CLASS: Guid = Guid::from_str_const("9527e630-d0ae-497b-adce-e80ab0175caf");

static SPEC: ServiceSpec = ServiceSpec {
    name: "timesync",
    class_id: TIMESYNC_CLASS,
    msg_type: MSGTYPE_TIMESYNC,
    versions: TIMESYNC_VERSIONS,
    hint: "",
};

/// Retry delay for the initial SYNC when it could not be sent.
const SYNC_RETRY: Duration = Duration::from_millis(50);

/// The host's wall clock.
pub type HostClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;
/// The guest's reference counter, 100 ns units (hv1's TIME_REF_COUNT).
pub type ReferenceClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Time-sync settings.
#[derive(Clone)]
pub struct TimesyncConfig {
    /// Time between SAMPLE messages.
    pub interval: Duration,
    /// How long [`TimesyncHandle::sync_now`] waits for the guest's answer (periodic
    /// messages wait one interval).
    pub timeout: Duration,
    /// The host clock.
    pub host_time: HostClock,
    /// The guest reference counter.
    pub reference_time: ReferenceClock,
}

impl TimesyncConfig {
    /// Defaults (5 s interval, 10 s timeout, `SystemTime::now`) with the guest reference
    /// counter `reference_time`.
    pub fn new(reference_time: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            host_time: Arc::new(SystemTime::now),
            reference_time: Arc::new(reference_time),
        }
    }

    fn sample(&self, flags: u8) -> TimeSample {
        // Read the reference counter first: the host time is then at least as fresh, and the
        // guest adds the reference time elapsed since, never too much.
        let reference_time = (self.reference_time)();
        let host_time = protocol::system_time_to_filetime((self.host_time)());
        TimeSample {
            flags,
            host_time,
            reference_time,
        }
    }
}

impl std::fmt::Debug for TimesyncConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimesyncConfig")
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A time-sync report for the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimesyncReport {
    /// Messages sent (SYNC and SAMPLE).
    pub sent: u64,
    /// SYNC messages among them.
    pub syncs: u64,
    /// Answers with status OK.
    pub acknowledged: u64,
    /// Answers with a failure status.
    pub refused: u64,
    /// Malformed answers.
    pub bad_answers: u64,
    /// Whether this open's initial SYNC was sent.
    pub initial_sync_sent: bool,
    /// The last message sent.
    pub last_sent: Option<TimeSample>,
    /// The channel.
    pub service: ServiceStatus,
}

#[derive(Default)]
struct State {
    sync_pending: bool,
    next_sample: Option<Instant>,
    sent: u64,
    syncs: u64,
    acknowledged: u64,
    refused: u64,
    bad: u64,
    last: Option<TimeSample>,
}

struct Timesync {
    config: TimesyncConfig,
    state: Mutex<State>,
}

impl Timesync {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note_sent(&self, sample: TimeSample) {
        let mut st = self.lock();
        st.sent += 1;
        if sample.flags & TIMESYNC_FLAG_SYNC != 0 {
            st.syncs += 1;
        }
        st.last = Some(sample);
    }

    fn note_reply(&self, reply: &Result<Reply, IcError>) {
        let mut st = self.lock();
        match reply {
            Ok(r) if r.status == HV_S_OK => st.acknowledged += 1,
            Ok(_) => st.refused += 1,
            Err(IcError::BadResponse { .. }) => st.bad += 1,
            Err(_) => {}
        }
    }

    /// Send one message from the channel thread; the sample is read just before sending.
    fn send(&self, ctx: &Ctx<'_>, flags: u8) -> bool {
        let mut sample = None;
        let r = ctx.start(0, self.config.interval, |neg, id| {
            let s = self.config.sample(flags);
            sample = Some(s);
            protocol::build_timesync(neg, id, &s)
        });
        match (r, sample) {
            (Start::Sent(_), Some(s)) => {
                self.note_sent(s);
                true
            }
            _ => false,
        }
    }
}

impl Service for Timesync {
    fn on_open(&self) {
        let mut st = self.lock();
        st.sync_pending = true;
        st.next_sample = None;
    }

    fn poll(&self, ctx: &Ctx<'_>, now: Instant) -> Option<Instant> {
        let (sync_pending, due) = {
            let st = self.lock();
            (st.sync_pending, st.next_sample.is_none_or(|t| t <= now))
        };
        if sync_pending {
            let sent = self.send(ctx, TIMESYNC_FLAG_SYNC);
            let mut st = self.lock();
            if sent {
                st.sync_pending = false;
                st.next_sample = Some(now + self.config.interval);
            } else {
                st.next_sample = Some(now + SYNC_RETRY);
            }
        } else if due {
            self.send(ctx, TIMESYNC_FLAG_SAMPLE);
            self.lock().next_sample = Some(now + self.config.interval);
        }
        self.lock().next_sample
    }

    fn on_async_reply(&self, _ctx: &Ctx<'_>, _tag: u64, reply: Result<Reply, IcError>) {
        self.note_reply(&reply);
    }
}

/// The time-sync service's handle: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct TimesyncHandle {
    core: Arc<Core>,
    ts: Arc<Timesync>,
}

impl std::fmt::Debug for TimesyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimesyncHandle").finish_non_exhaustive()
    }
}

impl TimesyncHandle {
    /// Send a SYNC now (the guest steps its clock) and wait for the guest's answer; returns
    /// what was sent.
    pub fn sync_now(&self) -> Result<TimeSample, IcError> {
        let mut sample = None;
        let reply = self.core.transact(self.ts.config.timeout, |neg, id| {
            let s = self.ts.config.sample(TIMESYNC_FLAG_SYNC);
            sample = Some(s);
            protocol::build_timesync(neg, id, &s)
        });
        if let Some(s) = sample {
            // Only what reached the ring counts as sent.
            if matches!(
                reply,
                Ok(_) | Err(IcError::Timeout { .. } | IcError::BadResponse { .. })
            ) {
                self.ts.note_sent(s);
            }
        }
        self.ts.note_reply(&reply);
        let reply = reply?;
        if reply.status != HV_S_OK {
            return Err(IcError::Refused {
                service: SPEC.name,
                status: reply.status,
            });
        }
        sample.ok_or(IcError::Closed { service: SPEC.name })
    }

    /// The report.
    pub fn report(&self) -> TimesyncReport {
        let st = self.ts.lock();
        TimesyncReport {
            sent: st.sent,
            syncs: st.syncs,
            acknowledged: st.acknowledged,
            refused: st.refused,
            bad_answers: st.bad,
            initial_sync_sent: self.core.is_open() && !st.sync_pending,
            last_sent: st.last,
            service: self.core.status(),
        }
    }
}

/// A time-sync VSP and its handle; the instance id derives from `seed`.
pub fn new(seed: &[u8], config: TimesyncConfig) -> (IcVsp, TimesyncHandle) {
    let core = Core::new(&SPEC);
    let ts = Arc::new(Timesync {
        config,
        state: Mutex::new(State::default()),
    });
    let vsp = IcVsp::new(
        core.clone(),
        ts.clone(),
        crate::instance_id(seed, TIMESYNC_CLASS),
    );
    (vsp, TimesyncHandle { core, ts })
}
