//! The channel engine every IC service runs on.
//!
//! **What it is.** [`IcVsp`] is the `vmbus_server::Vsp` of one integration service. When the
//! guest opens the channel it starts a thread that owns the channel for that open: it sends
//! NEGOTIATE, receives every packet the guest sends, matches answers to the one outstanding
//! transaction, runs the service's timers (heartbeat, time samples) and goes back to waiting
//! for the guest's signal. Host-side requests (a shutdown request, a KVP set, ...) come from
//! the service handles on the caller's thread through [`Core::transact`]: they wait for the
//! channel to be ready and the transaction slot to be free, send, and wait for the answer the
//! channel thread hands over — each step bounded by the caller's timeout.
//!
//! Exactly one transaction is outstanding per service at any time, like Hyper-V does (Linux's
//! KVP driver relies on it). Transaction ids are the VMBus packet transaction ids, which the
//! guest echoes; they grow monotonically over the service's life, so an answer from an
//! earlier open can never match a later request.
//!
//! **What it talks to.** A `vmbus_server::Channel` (from the server's control thread, via
//! [`vmbus_server::Vsp::open`]), the service logic behind the crate-private `Service` trait,
//! and the handles the worker's control socket uses.
//!
//! **What it must never do.**
//! - Trust the guest: answers are parsed by [`crate::protocol`] and checked (response flag,
//!   message type, negotiated versions, transaction id). A malformed answer fails only the
//!   request it answers (the caller gets [`IcError::BadResponse`]) and is counted; a bad
//!   NEGOTIATE answer or a corrupted ring marks the service broken until the guest reopens
//!   the channel. Nothing a guest sends can panic this code.
//! - Block the VMBus control thread: `open` spawns the thread and returns; `close` only
//!   joins a thread whose channel calls already fail with `Closed`. The channel thread never
//!   waits for room in the ring (periodic messages are skipped when the ring is full).
//! - Grow without bound: one slot, no queues; packets are handled as they are read; warnings
//!   about a misbehaving guest are rate-limited.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus_server::{
    Channel, ChannelError, Guid, IncomingKind, IncomingPacket, OutgoingPacket, TrySendError, Vsp,
};

use crate::protocol::{
    self, Negotiated, ProtocolError, Version, FRAMEWORK_VERSIONS, HV_S_OK, MSGTYPE_NEGOTIATE,
};
use crate::IcError;

/// The longest the channel thread sleeps without looking at its timers.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Retry delay when NEGOTIATE could not be sent (ring full).
const NEGOTIATE_RETRY: Duration = Duration::from_millis(50);
/// How often a caller waiting for ring space looks again (besides the guest's signals).
const SEND_POLL: Duration = Duration::from_millis(20);
/// Warnings about a misbehaving guest per channel open; the rest go to debug.
const WARNINGS_PER_OPEN: u32 = 16;

/// What a service is, for the engine.
pub(crate) struct ServiceSpec {
    /// Short name for logs and errors ("heartbeat").
    pub name: &'static str,
    /// The VMBus device class.
    pub class_id: Guid,
    /// The service's IC message type.
    pub msg_type: u16,
    /// Service versions offered, newest first.
    pub versions: &'static [Version],
    /// Appended to "not ready" and "timed out" errors (e.g. the KVP daemon hint).
    pub hint: &'static str,
}

/// Where a service's channel stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The guest has not opened the channel (or closed it).
    Closed,
    /// Open; our NEGOTIATE is not answered yet.
    Negotiating,
    /// Versions agreed; requests can be made.
    Ready,
    /// The guest broke the protocol (see [`ServiceStatus::broken_reason`]); nothing more is
    /// sent until it reopens the channel.
    Broken,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Closed => "closed",
            Phase::Negotiating => "negotiating",
            Phase::Ready => "ready",
            Phase::Broken => "broken",
        })
    }
}

/// Counters over the service's life (all channel opens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Times the guest opened the channel.
    pub opens: u64,
    /// Requests sent (NEGOTIATE included).
    pub requests: u64,
    /// Well-formed answers to the outstanding request.
    pub replies: u64,
    /// Packets rejected: malformed, wrong type or version, not in-band, ...
    pub malformed: u64,
    /// Well-formed answers to no outstanding request (late, or unknown ids).
    pub late: u64,
    /// Requests the guest did not answer in time.
    pub timeouts: u64,
    /// Requests not sent because the guest's ring was full.
    pub ring_full: u64,
}

/// A snapshot of a service's channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceStatus {
    /// The service's name.
    pub service: &'static str,
    /// Where the channel stands.
    pub phase: Phase,
    /// The versions agreed on this open.
    pub negotiated: Option<Negotiated>,
    /// Why the service is [`Phase::Broken`].
    pub broken_reason: Option<String>,
    /// Counters.
    pub counters: Counters,
}

/// A validated answer (response flag, message type and versions checked; body bounded by
/// `icmsgsize`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reply {
    /// The VMBus transaction id.
    pub id: u64,
    /// The guest's status.
    pub status: u32,
    /// The versions in force.
    pub negotiated: Negotiated,
    /// The body.
    pub body: Vec<u8>,
}

enum SlotKind {
    Negotiate,
    /// Started by the channel thread (timers); answered through `Service::on_async_reply`.
    Async(u64),
    /// Started by a caller, who waits for the answer stored here.
    Caller(Option<Result<Reply, IcError>>),
}

struct Slot {
    id: u64,
    kind: SlotKind,
    /// Only for `Async` (callers keep their own deadline).
    deadline: Option<Instant>,
}

struct State {
    /// Bumped on every open and close: stale threads and callers notice.
    generation: u64,
    channel: Option<Channel>,
    phase: Phase,
    negotiated: Option<Negotiated>,
    broken: Option<String>,
    slot: Option<Slot>,
    next_id: u64,
    counters: Counters,
    warnings_left: u32,
}

/// The shared state of one service: its channel, phase and transaction slot.
pub(crate) struct Core {
    pub spec: &'static ServiceSpec,
    state: Mutex<State>,
    cond: Condvar,
}

/// How a request could not be sent.
enum SendError {
    Full,
    Closed,
    Other(String),
}

/// What [`Ctx::start`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Sent with this transaction id.
    Sent(u64),
    /// Another transaction is outstanding.
    Busy,
    /// The guest's ring is full.
    RingFull,
    /// The channel is not ready (closing, broken, not negotiated).
    NotReady,
}

/// The service logic behind an [`IcVsp`]. Callbacks run on the channel thread with no lock of
/// the engine held; they must not block.
pub(crate) trait Service: Send + Sync + 'static {
    /// The guest opened the channel (before NEGOTIATE is sent).
    fn on_open(&self) {}
    /// NEGOTIATE was answered; the channel is ready.
    fn on_ready(&self, _ctx: &Ctx<'_>) {}
    /// Timers: called on every wake-up while ready; returns when to be called next.
    fn poll(&self, _ctx: &Ctx<'_>, _now: Instant) -> Option<Instant> {
        None
    }
    /// The answer (or the failure) of a transaction started with [`Ctx::start`].
    fn on_async_reply(&self, _ctx: &Ctx<'_>, _tag: u64, _reply: Result<Reply, IcError>) {}
    /// A transaction started with [`Ctx::start`] was not answered in time.
    fn on_async_timeout(&self, _tag: u64, _id: u64) {}
    /// A well-formed answer for a transaction that is no longer outstanding. Returns whether
    /// the service made use of it.
    fn on_late_reply(&self, _reply: &Reply) -> bool {
        false
    }
    /// The channel closed.
    fn on_close(&self) {}
}

fn send_before(
    ch: &Channel,
    id: u64,
    payload: &[u8],
    deadline: Option<Instant>,
) -> Result<(), SendError> {
    let pkt = OutgoingPacket::in_band(id, payload, false);
    loop {
        match ch.try_send(&pkt) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full) => {}
            Err(TrySendError::Channel(ChannelError::Closed)) => return Err(SendError::Closed),
            Err(TrySendError::Channel(e)) => return Err(SendError::Other(e.to_string())),
        }
        let now = Instant::now();
        let Some(deadline) = deadline.filter(|&d| d > now) else {
            return Err(SendError::Full);
        };
        // `try_send` set pending_send_sz: the guest signals once it made room.
        if let Err(ChannelError::Closed) = ch.wait_timeout((deadline - now).min(SEND_POLL)) {
            return Err(SendError::Closed);
        }
    }
}

impl Core {
    pub(crate) fn new(spec: &'static ServiceSpec) -> Arc<Self> {
        Arc::new(Self {
            spec,
            state: Mutex::new(State {
                generation: 0,
                channel: None,
                phase: Phase::Closed,
                negotiated: None,
                broken: None,
                slot: None,
                next_id: 1,
                counters: Counters::default(),
                warnings_left: WARNINGS_PER_OPEN,
            }),
            cond: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; be robust anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> MutexGuard<'a, State> {
        let now = Instant::now();
        if now >= deadline {
            return st;
        }
        self.cond
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// A snapshot for the control socket.
    pub(crate) fn status(&self) -> ServiceStatus {
        let st = self.lock();
        ServiceStatus {
            service: self.spec.name,
            phase: st.phase,
            negotiated: st.negotiated,
            broken_reason: st.broken.clone(),
            counters: st.counters,
        }
    }

    /// Whether the guest has the channel open (in any phase).
    pub(crate) fn is_open(&self) -> bool {
        self.lock().phase != Phase::Closed
    }

    fn warn(&self, st: &mut State, what: fmt::Arguments<'_>) {
        if st.warnings_left > 0 {
            st.warnings_left -= 1;
            tracing::warn!(service = self.spec.name, "guest: {what}");
            if st.warnings_left == 0 {
                tracing::warn!(
                    service = self.spec.name,
                    "further guest protocol errors on this channel are logged at debug level"
                );
            }
        } else {
            tracing::debug!(service = self.spec.name, "guest: {what}");
        }
    }

    fn open(&self, channel: Channel) -> u64 {
        let mut st = self.lock();
        st.generation += 1;
        st.channel = Some(channel);
        st.phase = Phase::Negotiating;
        st.negotiated = None;
        st.broken = None;
        st.slot = None;
        st.counters.opens += 1;
        st.warnings_left = WARNINGS_PER_OPEN;
        let generation = st.generation;
        drop(st);
        self.cond.notify_all();
        generation
    }

    fn close(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Closed && st.channel.is_none() {
            return;
        }
        st.generation += 1;
        st.channel = None;
        st.phase = Phase::Closed;
        st.negotiated = None;
        st.slot = None;
        drop(st);
        self.cond.notify_all();
    }

    fn mark_broken(&self, st: &mut State, reason: String) {
        self.warn(
            st,
            format_args!("{reason}; service disabled until the channel reopens"),
        );
        st.phase = Phase::Broken;
        st.broken = Some(reason.clone());
        match &mut st.slot {
            Some(Slot {
                kind: SlotKind::Caller(r @ None),
                ..
            }) => {
                *r = Some(Err(IcError::Broken {
                    service: self.spec.name,
                    reason,
                }))
            }
            _ => st.slot = None,
        }
        self.cond.notify_all();
    }

    fn validate(
        &self,
        id: u64,
        neg: Option<Negotiated>,
        payload: &[u8],
    ) -> Result<Reply, ProtocolError> {
        let m = protocol::parse_message(payload)?;
        m.check_response(self.spec.msg_type)?;
        // A reply can only exist once versions are agreed (requests need them).
        let negotiated = neg.ok_or(ProtocolError::NotNegotiated)?;
        m.check_versions(negotiated)?;
        Ok(Reply {
            id,
            status: m.status,
            negotiated,
            body: m.body.to_vec(),
        })
    }

    /// Send NEGOTIATE on the channel thread; `Ok(false)` if the ring was full.
    fn send_negotiate(&self, ch: &Channel, generation: u64) -> Result<bool, ()> {
        let id = {
            let mut st = self.lock();
            if st.generation != generation {
                return Err(());
            }
            let id = st.next_id;
            st.next_id += 1;
            st.slot = Some(Slot {
                id,
                kind: SlotKind::Negotiate,
                deadline: None,
            });
            id
        };
        let payload = protocol::build_negotiate(FRAMEWORK_VERSIONS, self.spec.versions, id);
        let sent = send_before(ch, id, &payload, None);
        let mut st = self.lock();
        if st.generation != generation {
            return Err(());
        }
        match sent {
            Ok(()) => {
                st.counters.requests += 1;
                Ok(true)
            }
            Err(SendError::Full) => {
                st.slot = None;
                st.counters.ring_full += 1;
                Ok(false)
            }
            Err(SendError::Closed) => Err(()),
            Err(SendError::Other(e)) => {
                self.mark_broken(&mut st, format!("cannot send: {e}"));
                Err(())
            }
        }
    }

    /// Handle one packet from the guest (channel thread).
    fn on_packet(&self, ctx: &Ctx<'_>, svc: &dyn Service, p: IncomingPacket) {
        let mut st = self.lock();
        if st.generation != ctx.generation {
            return;
        }
        if st.phase == Phase::Broken {
            st.counters.malformed += 1;
            return;
        }
        if !matches!(p.kind, IncomingKind::InBand) {
            st.counters.malformed += 1;
            self.warn(
                &mut st,
                format_args!("unexpected packet kind {:?} dropped", p.kind),
            );
            return;
        }
        let matches_slot = st.slot.as_ref().is_some_and(|s| s.id == p.transaction_id);
        if !matches_slot {
            let neg = st.negotiated;
            match self.validate(p.transaction_id, neg, &p.payload) {
                Ok(reply) => {
                    st.counters.late += 1;
                    drop(st);
                    svc.on_late_reply(&reply);
                }
                Err(e) => {
                    st.counters.malformed += 1;
                    self.warn(
                        &mut st,
                        format_args!(
                            "packet for unknown transaction {:#x} dropped: {e}",
                            p.transaction_id
                        ),
                    );
                }
            }
            return;
        }
        let Some(slot) = st.slot.take() else { return };
        match slot.kind {
            SlotKind::Negotiate => {
                let result = protocol::parse_message(&p.payload).and_then(|m| {
                    m.check_response(MSGTYPE_NEGOTIATE)?;
                    if m.status != HV_S_OK {
                        return Err(ProtocolError::NegotiationRefused);
                    }
                    protocol::parse_negotiate_response(
                        m.body,
                        FRAMEWORK_VERSIONS,
                        self.spec.versions,
                    )
                });
                match result {
                    Ok(neg) => {
                        st.counters.replies += 1;
                        st.phase = Phase::Ready;
                        st.negotiated = Some(neg);
                        drop(st);
                        self.cond.notify_all();
                        tracing::info!(
                            service = self.spec.name,
                            "guest negotiated framework {} service {}",
                            neg.framework,
                            neg.message
                        );
                        svc.on_ready(ctx);
                    }
                    Err(e) => {
                        st.counters.malformed += 1;
                        let offered: Vec<String> =
                            self.spec.versions.iter().map(|v| v.to_string()).collect();
                        self.mark_broken(
                            &mut st,
                            format!(
                                "version negotiation failed ({e}; offered framework 3.0/1.0, service {})",
                                offered.join("/")
                            ),
                        );
                    }
                }
            }
            SlotKind::Async(tag) => {
                let neg = st.negotiated;
                let result = self.validate(slot.id, neg, &p.payload);
                match &result {
                    Ok(_) => st.counters.replies += 1,
                    Err(e) => {
                        st.counters.malformed += 1;
                        self.warn(&mut st, format_args!("malformed answer: {e}"));
                    }
                }
                drop(st);
                self.cond.notify_all();
                let result = result.map_err(|error| IcError::BadResponse {
                    service: self.spec.name,
                    error,
                });
                svc.on_async_reply(ctx, tag, result);
            }
            SlotKind::Caller(_) => {
                let neg = st.negotiated;
                let result = self.validate(slot.id, neg, &p.payload);
                match &result {
                    Ok(_) => st.counters.replies += 1,
                    Err(e) => {
                        st.counters.malformed += 1;
                        self.warn(&mut st, format_args!("malformed answer: {e}"));
                    }
                }
                let result = result.map_err(|error| IcError::BadResponse {
                    service: self.spec.name,
                    error,
                });
                st.slot = Some(Slot {
                    kind: SlotKind::Caller(Some(result)),
                    ..slot
                });
                drop(st);
                self.cond.notify_all();
            }
        }
    }

    /// Free an `Async` slot whose deadline passed (channel thread).
    fn expire_async(&self, generation: u64, now: Instant) -> Option<(u64, u64)> {
        let mut st = self.lock();
        if st.generation != generation {
            return None;
        }
        let expired = match &st.slot {
            Some(Slot {
                id,
                kind: SlotKind::Async(tag),
                deadline: Some(d),
            }) if *d <= now => Some((*tag, *id)),
            _ => None,
        };
        if expired.is_some() {
            st.slot = None;
            st.counters.timeouts += 1;
            drop(st);
            self.cond.notify_all();
        }
        expired
    }

    fn async_deadline(&self, generation: u64) -> Option<Instant> {
        let st = self.lock();
        match &st.slot {
            Some(Slot {
                kind: SlotKind::Async(_),
                deadline,
                ..
            }) if st.generation == generation => *deadline,
            _ => None,
        }
    }

    fn phase_of(&self, generation: u64) -> Option<Phase> {
        let st = self.lock();
        (st.generation == generation).then_some(st.phase)
    }

    fn ring_broken(&self, generation: u64, reason: String) {
        let mut st = self.lock();
        if st.generation == generation && st.phase != Phase::Broken {
            self.mark_broken(&mut st, reason);
        }
    }

    fn not_connected(&self) -> IcError {
        IcError::NotConnected {
            service: self.spec.name,
        }
    }

    /// Run one transaction from a caller's thread: wait (until `timeout`) for the channel to
    /// be ready and the slot free, send what `build` makes for the agreed versions and the
    /// transaction id, and wait for the answer.
    pub(crate) fn transact(
        &self,
        timeout: Duration,
        build: impl FnOnce(Negotiated, u64) -> Vec<u8>,
    ) -> Result<Reply, IcError> {
        let service = self.spec.name;
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        let (generation, neg, channel) = loop {
            match st.phase {
                Phase::Closed => return Err(self.not_connected()),
                Phase::Broken => {
                    return Err(IcError::Broken {
                        service,
                        reason: st.broken.clone().unwrap_or_default(),
                    })
                }
                Phase::Ready if st.slot.is_none() => match (st.negotiated, st.channel.clone()) {
                    (Some(neg), Some(ch)) => break (st.generation, neg, ch),
                    _ => return Err(self.not_connected()),
                },
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(if st.phase == Phase::Negotiating {
                    IcError::NotReady {
                        service,
                        hint: self.spec.hint,
                    }
                } else {
                    IcError::Timeout {
                        service,
                        timeout,
                        hint: self.spec.hint,
                    }
                });
            }
            st = self.wait_until(st, deadline);
        };
        let id = st.next_id;
        st.next_id += 1;
        st.slot = Some(Slot {
            id,
            kind: SlotKind::Caller(None),
            deadline: Some(deadline),
        });
        drop(st);

        let payload = build(neg, id);
        let sent = send_before(&channel, id, &payload, Some(deadline));
        drop(channel);
        let mut st = self.lock();
        if let Err(e) = sent {
            if st.generation == generation && st.slot.as_ref().is_some_and(|s| s.id == id) {
                st.slot = None;
            }
            let err = match e {
                SendError::Full => {
                    st.counters.ring_full += 1;
                    IcError::RingFull { service }
                }
                SendError::Closed => IcError::Closed { service },
                SendError::Other(e) => IcError::Channel { service, error: e },
            };
            drop(st);
            self.cond.notify_all();
            return Err(err);
        }
        st.counters.requests += 1;
        loop {
            if st.generation != generation {
                return Err(IcError::Closed { service });
            }
            match &mut st.slot {
                Some(Slot {
                    id: sid,
                    kind: SlotKind::Caller(reply),
                    ..
                }) if *sid == id => {
                    if let Some(r) = reply.take() {
                        st.slot = None;
                        drop(st);
                        self.cond.notify_all();
                        return r;
                    }
                }
                _ => return Err(IcError::Closed { service }),
            }
            if Instant::now() >= deadline {
                st.slot = None;
                st.counters.timeouts += 1;
                drop(st);
                self.cond.notify_all();
                return Err(IcError::Timeout {
                    service,
                    timeout,
                    hint: self.spec.hint,
                });
            }
            st = self.wait_until(st, deadline);
        }
    }
}

/// What services use on the channel thread.
pub(crate) struct Ctx<'a> {
    core: &'a Core,
    channel: &'a Channel,
    generation: u64,
}

impl Ctx<'_> {
    /// Start a transaction whose answer goes to [`Service::on_async_reply`] (or
    /// [`Service::on_async_timeout`] after `timeout`), if the slot is free. Never waits.
    pub(crate) fn start(
        &self,
        tag: u64,
        timeout: Duration,
        build: impl FnOnce(Negotiated, u64) -> Vec<u8>,
    ) -> Start {
        let (id, neg) = {
            let mut st = self.core.lock();
            if st.generation != self.generation || st.phase != Phase::Ready {
                return Start::NotReady;
            }
            if st.slot.is_some() {
                return Start::Busy;
            }
            let Some(neg) = st.negotiated else {
                return Start::NotReady;
            };
            let id = st.next_id;
            st.next_id += 1;
            st.slot = Some(Slot {
                id,
                kind: SlotKind::Async(tag),
                deadline: Some(Instant::now() + timeout),
            });
            (id, neg)
        };
        let payload = build(neg, id);
        let sent = send_before(self.channel, id, &payload, None);
        let mut st = self.core.lock();
        let ours = st.generation == self.generation;
        let release = |st: &mut State| {
            if ours && st.slot.as_ref().is_some_and(|s| s.id == id) {
                st.slot = None;
            }
        };
        let r = match sent {
            Ok(()) => {
                if ours {
                    st.counters.requests += 1;
                }
                Start::Sent(id)
            }
            Err(SendError::Full) => {
                release(&mut st);
                if ours {
                    st.counters.ring_full += 1;
                }
                Start::RingFull
            }
            Err(_) => {
                release(&mut st);
                Start::NotReady
            }
        };
        drop(st);
        self.core.cond.notify_all();
        r
    }
}

fn run(core: &Core, svc: &dyn Service, ch: Channel, generation: u64) {
    let ctx = Ctx {
        core,
        channel: &ch,
        generation,
    };
    let mut negotiate_sent = false;
    loop {
        let Some(phase) = core.phase_of(generation) else {
            return;
        };
        if !negotiate_sent && phase == Phase::Negotiating {
            match core.send_negotiate(&ch, generation) {
                Ok(sent) => negotiate_sent = sent,
                Err(()) => return,
            }
        }
        loop {
            match ch.try_recv() {
                Ok(Some(p)) => core.on_packet(&ctx, svc, p),
                Ok(None) => break,
                Err(ChannelError::Closed) => return,
                Err(e) => {
                    core.ring_broken(generation, format!("channel failed: {e}"));
                    // Nothing more can be read; wait for the guest to close the channel.
                    while !matches!(ch.wait(), Err(ChannelError::Closed)) {}
                    return;
                }
            }
        }
        let now = Instant::now();
        if let Some((tag, id)) = core.expire_async(generation, now) {
            svc.on_async_timeout(tag, id);
        }
        let mut next = now + IDLE_WAIT;
        if core.phase_of(generation) == Some(Phase::Ready) {
            if let Some(t) = svc.poll(&ctx, now) {
                next = next.min(t);
            }
        }
        if let Some(d) = core.async_deadline(generation) {
            next = next.min(d);
        }
        if !negotiate_sent {
            next = next.min(now + NEGOTIATE_RETRY);
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if let Err(ChannelError::Closed) = ch.wait_timeout(wait) {
            return;
        }
    }
}

/// The `vmbus_server::Vsp` of one integration service. Give it to
/// `VmbusServer::add_device`; talk to the service through its handle.
pub struct IcVsp {
    core: Arc<Core>,
    service: Arc<dyn Service>,
    instance_id: Guid,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for IcVsp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcVsp")
            .field("service", &self.core.spec.name)
            .field("instance_id", &self.instance_id)
            .finish()
    }
}

impl IcVsp {
    pub(crate) fn new(core: Arc<Core>, service: Arc<dyn Service>, instance_id: Guid) -> Self {
        Self {
            core,
            service,
            instance_id,
            thread: None,
        }
    }

    /// The service's name ("heartbeat", "shutdown", "timesync", "kvp").
    pub fn service_name(&self) -> &'static str {
        self.core.spec.name
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(service = self.core.spec.name, "IC channel thread panicked");
            }
        }
    }
}

impl Vsp for IcVsp {
    fn class_id(&self) -> Guid {
        self.core.spec.class_id
    }

    fn instance_id(&self) -> Guid {
        self.instance_id
    }

    fn open(&mut self, channel: Channel) -> Result<(), ()> {
        // A previous open's thread has exited already (close joined it); be defensive.
        self.core.close();
        self.join();
        let generation = self.core.open(channel.clone());
        self.service.on_open();
        let core = self.core.clone();
        let service = self.service.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ic-{}", self.core.spec.name))
            .spawn(move || run(&core, &*service, channel, generation));
        match spawned {
            Ok(t) => {
                self.thread = Some(t);
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    service = self.core.spec.name,
                    "cannot start channel thread: {e}"
                );
                self.core.close();
                self.service.on_close();
                Err(())
            }
        }
    }

    fn close(&mut self) {
        // The channel already fails with `Closed` and its waits are woken: the thread exits.
        self.core.close();
        self.join();
        self.service.on_close();
    }
}
