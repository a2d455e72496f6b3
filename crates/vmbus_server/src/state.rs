//! The server's state machine ([`ServerCore`]) and the lock-light registry the hypercall paths
//! use.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

use tracing::{debug, info};
use vmbus_protocol::{
    msgtype, parse, ChannelMessage, CloseChannel, GpaRangeList, GpadlBody, GpadlCreated,
    GpadlHeader, GpadlTeardown, GpadlTorndown, Guid, InitiateContact, MessageBuf, ModifyChannel,
    ModifyChannelResponse, OfferChannel, OpenChannel, OpenResult, RelidReleased,
    RescindChannelOffer, VersionResponse, HV_MESSAGE_TYPE_VMBUS, MAX_MESSAGE_SIZE, MAX_RELID,
    MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_4, VERSION_WIN10_V5, VERSION_WIN10_V5_3,
    VMBUS_MESSAGE_SINT,
};
use vmbus_ring::{RingReader, RingWriter, PAGE_SIZE};
use zerocopy::little_endian::{U16, U32, U64};

use crate::channel::{Channel, ChannelError, ChannelSetup, ChannelShared, GpadlData, PageRange};
use crate::ram::{pfn_gpa, GuestRam, GuestRamRing};
use crate::{
    channel_connection_id, GuestSynic, Vsp, HV_STATUS_INVALID_CONNECTION_ID,
    HV_STATUS_INVALID_PARAMETER, HV_STATUS_SUCCESS,
};

/// The VMBus versions we accept, newest first (Win8 2.4 through 5.3).
pub const SUPPORTED_VERSIONS: [u32; 8] = vmbus_protocol::LINUX_VERSIONS;

/// Most sub-channels offered per opening of a primary channel.
pub const MAX_SUB_CHANNELS: u16 = 64;

/// Sub-channel requests queued by VSP threads and not yet handled by the control thread.
const MAX_QUEUED_SUB_CHANNEL_REQUESTS: usize = 256;

/// Status we put in OPENCHANNEL_RESULT / GPADL_CREATED / MODIFYCHANNEL_RESPONSE on failure
/// (NTSTATUS STATUS_UNSUCCESSFUL; Linux only tests for non-zero).
const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;

/// Limits that bound what a guest can make the server allocate.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Number of VPs: INITIATE_CONTACT's target_vcpu and OPENCHANNEL's target_vp must be
    /// below it.
    pub vp_count: u32,
    /// Most GPADLs (complete or being built) at once.
    pub max_gpadls: usize,
    /// Most bytes of GPADL range data (8 per page, plus 8 per range) at once, over all GPADLs.
    /// A single GPADL is at most 65535 bytes (the u16 `range_buflen`), ~8190 pages.
    pub max_gpadl_bytes: usize,
    /// Guest messages queued and not yet processed before HvPostMessage fails with
    /// INSUFFICIENT_BUFFERS.
    pub inbound_queue: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            vp_count: 1,
            max_gpadls: 1024,
            max_gpadl_bytes: 8 << 20,
            inbound_queue: 64,
        }
    }
}

/// A device added with [`ServerCore::add_device`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u64);

/// A host request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// All 2047 relids are in use.
    #[error("no free channel id (2047 channels in use)")]
    TooManyDevices,
    /// A device with the same class and instance GUIDs exists.
    #[error("a device with class {class} and instance {instance} already exists")]
    DuplicateInstance {
        /// Class.
        class: Guid,
        /// Instance.
        instance: Guid,
    },
    /// No such device (or it was already removed).
    #[error("no such device {0:?}")]
    NoSuchDevice(DeviceId),
    /// The server is shutting down.
    #[error("the VMBus server is shut down")]
    ShutDown,
}

/// State of one channel, as [`ServerStatus`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// Not offered yet (guest not connected or not asked for offers).
    Pending,
    /// Offered, closed.
    Offered,
    /// Open.
    Open,
    /// Rescinded; waiting for the guest's RELID_RELEASED.
    Rescinded,
}

/// One channel in [`ServerStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelStatus {
    /// Relid.
    pub relid: u32,
    /// Device.
    pub device: DeviceId,
    /// State.
    pub state: ChannelState,
    /// Host → guest interrupts sent while open (this opening).
    pub host_signals: u64,
    /// 0 for a device's primary channel; 1.. for its sub-channels.
    pub sub_channel_index: u16,
}

/// A snapshot of the server, for tests and diagnostics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerStatus {
    /// Negotiated version, if connected.
    pub version: Option<u32>,
    /// Channels by relid.
    pub channels: Vec<ChannelStatus>,
    /// GPADLs (complete or being built).
    pub gpadls: usize,
    /// Messages waiting for a free SIMP slot.
    pub queued_messages: usize,
}

/// A VSP asked for sub-channels of its open primary channel ([`Channel::offer_sub_channels`]).
pub(crate) struct SubChannelRequest {
    /// The primary's relid.
    pub relid: u32,
    /// The opening that asked (a request from an earlier opening is dropped).
    pub channel: Weak<ChannelShared>,
    /// How many more.
    pub count: u16,
}

type Notifier = Box<dyn Fn() + Send + Sync>;

/// What the hypercall paths (VP threads) and VSP threads need without the control thread:
/// the message connection id, the channels by connection id, the complete GPADLs, and the
/// queue of sub-channel requests.
pub(crate) struct Registry {
    /// 0 while disconnected, else the message connection id negotiated.
    msg_conn: AtomicU32,
    channels: RwLock<HashMap<u32, Arc<ChannelShared>>>,
    gpadls: RwLock<HashMap<u32, Arc<GpadlData>>>,
    sub_channel_requests: Mutex<Vec<SubChannelRequest>>,
    /// Wakes whoever drives the [`ServerCore`] (the control thread) after a request.
    notifier: OnceLock<Notifier>,
}

impl Registry {
    fn new() -> Self {
        Self {
            msg_conn: AtomicU32::new(0),
            channels: RwLock::new(HashMap::new()),
            gpadls: RwLock::new(HashMap::new()),
            sub_channel_requests: Mutex::new(Vec::new()),
            notifier: OnceLock::new(),
        }
    }

    /// Set the function that wakes the control thread when a VSP queues a request.
    pub(crate) fn set_notifier(&self, f: Notifier) {
        let _ = self.notifier.set(f);
    }

    pub(crate) fn request_sub_channels(&self, r: SubChannelRequest) -> Result<(), ChannelError> {
        {
            let mut q = self
                .sub_channel_requests
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if q.len() >= MAX_QUEUED_SUB_CHANNEL_REQUESTS {
                return Err(ChannelError::Refused(
                    "too many sub-channel requests queued",
                ));
            }
            q.push(r);
        }
        if let Some(n) = self.notifier.get() {
            n();
        }
        Ok(())
    }

    fn take_sub_channel_requests(&self) -> Vec<SubChannelRequest> {
        std::mem::take(
            &mut *self
                .sub_channel_requests
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    pub(crate) fn gpadl(&self, id: u32) -> Option<Arc<GpadlData>> {
        self.gpadls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn set_gpadl(&self, id: u32, data: Option<Arc<GpadlData>>) {
        let mut g = self.gpadls.write().unwrap_or_else(|e| e.into_inner());
        match data {
            Some(d) => g.insert(id, d),
            None => g.remove(&id),
        };
    }

    fn set_channel(&self, connection_id: u32, shared: Option<Arc<ChannelShared>>) {
        let mut g = self.channels.write().unwrap_or_else(|e| e.into_inner());
        match shared {
            Some(s) => g.insert(connection_id, s),
            None => g.remove(&connection_id),
        };
    }

    /// The status HvPostMessage returns for this message (before it is queued).
    pub(crate) fn check_post(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16 {
        if payload.len() > MAX_MESSAGE_SIZE || message_type != HV_MESSAGE_TYPE_VMBUS {
            return HV_STATUS_INVALID_PARAMETER;
        }
        if connection_id != MESSAGE_CONNECTION_ID && connection_id != MESSAGE_CONNECTION_ID_4 {
            return HV_STATUS_INVALID_CONNECTION_ID;
        }
        let t = payload
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        // INITIATE_CONTACT is accepted on both ids in every state (a new kernel may start over
        // without UNLOAD); the version/id pairing is checked when it is processed.
        if t == Some(msgtype::INITIATE_CONTACT) {
            return HV_STATUS_SUCCESS;
        }
        let c = self.msg_conn.load(Ordering::SeqCst);
        if c != 0 && c != connection_id {
            return HV_STATUS_INVALID_CONNECTION_ID;
        }
        HV_STATUS_SUCCESS
    }

    /// HvSignalEvent from the guest.
    pub(crate) fn signal_event(&self, connection_id: u32, flag: u16) -> u16 {
        let ch = self
            .channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&connection_id)
            .cloned();
        match ch {
            None => HV_STATUS_INVALID_CONNECTION_ID,
            Some(_) if flag != 0 => HV_STATUS_INVALID_PARAMETER,
            Some(ch) => {
                ch.on_guest_signal();
                HV_STATUS_SUCCESS
            }
        }
    }
}

struct Connection {
    version: u32,
    target_vcpu: u32,
    sint: u8,
}

enum SlotState {
    Pending,
    Offered,
    Open {
        shared: Arc<ChannelShared>,
        gpadl: u32,
    },
    Rescinded,
}

/// What a relid is: a device's primary channel (which owns the VSP) or one of its
/// sub-channels.
enum Role {
    Primary {
        vsp: Box<dyn Vsp>,
        /// Sub-channels offered during the current opening (the next index is this + 1).
        subs_offered: u16,
    },
    Sub {
        /// The primary's relid. Sub-channels exist (not rescinded) only while it is open.
        primary: u32,
        index: u16,
    },
}

struct Slot {
    device: DeviceId,
    role: Role,
    class: Guid,
    instance: Guid,
    state: SlotState,
}

impl Slot {
    fn sub_of(&self, primary: u32) -> bool {
        matches!(self.role, Role::Sub { primary: p, .. } if p == primary)
    }

    fn sub_channel_index(&self) -> u16 {
        match self.role {
            Role::Primary { .. } => 0,
            Role::Sub { index, .. } => index,
        }
    }
}

enum GpadlState {
    Building {
        range_count: u16,
        buflen: usize,
        data: Vec<u8>,
    },
    Ready(Arc<GpadlData>),
}

struct Gpadl {
    relid: u32,
    /// Bytes charged against `max_gpadl_bytes`.
    budget: usize,
    state: GpadlState,
    /// Holds the rings of an open channel.
    in_use: bool,
    /// The guest asked to tear it down while in use: answer when the channel closes.
    teardown_pending: bool,
}

struct Outgoing {
    vp: u32,
    sint: u8,
    msg: MessageBuf,
}

/// The VMBus server state machine, driven synchronously: feed it guest messages
/// ([`ServerCore::handle_message`]) and host requests, then [`ServerCore::flush`] its replies.
/// [`crate::VmbusServer`] runs one on its control thread; tests and fuzzers may drive one
/// directly.
pub struct ServerCore {
    config: ServerConfig,
    synic: Arc<dyn GuestSynic>,
    ram: Arc<dyn GuestRam>,
    registry: Arc<Registry>,
    conn: Option<Connection>,
    offers_requested: bool,
    slots: BTreeMap<u32, Slot>,
    next_device: u64,
    gpadls: HashMap<u32, Gpadl>,
    gpadl_bytes: usize,
    outbound: VecDeque<Outgoing>,
}

impl ServerCore {
    /// A server with no devices, not connected.
    pub fn new(config: ServerConfig, synic: Arc<dyn GuestSynic>, ram: Arc<dyn GuestRam>) -> Self {
        Self {
            config,
            synic,
            ram,
            registry: Arc::new(Registry::new()),
            conn: None,
            offers_requested: false,
            slots: BTreeMap::new(),
            next_device: 1,
            gpadls: HashMap::new(),
            gpadl_bytes: 0,
            outbound: VecDeque::new(),
        }
    }

    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The status HvPostMessage must return for this message; only messages with status 0
    /// may be passed to [`ServerCore::handle_message`].
    pub fn check_post(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16 {
        self.registry
            .check_post(connection_id, message_type, payload)
    }

    /// HvSignalEvent from the guest; returns the hypercall status.
    pub fn signal_event(&self, connection_id: u32, flag: u16) -> u16 {
        self.registry.signal_event(connection_id, flag)
    }

    /// Messages waiting for delivery.
    pub fn queued_messages(&self) -> usize {
        self.outbound.len()
    }

    /// Try to deliver queued messages in order; returns true when none is left.
    pub fn flush(&mut self) -> bool {
        while let Some(m) = self.outbound.front() {
            if self
                .synic
                .post_message(m.vp, m.sint, HV_MESSAGE_TYPE_VMBUS, m.msg.as_bytes())
                .is_err()
            {
                return false;
            }
            self.outbound.pop_front();
        }
        true
    }

    fn send_to(&mut self, vp: u32, sint: u8, msg: MessageBuf) {
        self.outbound.push_back(Outgoing { vp, sint, msg });
    }

    /// Queue a message for the connection's target VP (dropped if not connected).
    fn send(&mut self, msg: MessageBuf) {
        if let Some(c) = &self.conn {
            let (vp, sint) = (c.target_vcpu, c.sint);
            self.send_to(vp, sint, msg);
        }
    }

    /// A snapshot of the state.
    pub fn status(&self) -> ServerStatus {
        ServerStatus {
            version: self.conn.as_ref().map(|c| c.version),
            channels: self
                .slots
                .iter()
                .map(|(&relid, s)| ChannelStatus {
                    relid,
                    device: s.device,
                    state: match &s.state {
                        SlotState::Pending => ChannelState::Pending,
                        SlotState::Offered => ChannelState::Offered,
                        SlotState::Open { .. } => ChannelState::Open,
                        SlotState::Rescinded => ChannelState::Rescinded,
                    },
                    host_signals: match &s.state {
                        SlotState::Open { shared, .. } => shared.host_signal_count(),
                        _ => 0,
                    },
                    sub_channel_index: s.sub_channel_index(),
                })
                .collect(),
            gpadls: self.gpadls.len(),
            queued_messages: self.outbound.len(),
        }
    }

    // ---- host requests ----

    /// Add a device; it is offered at once if the guest already asked for offers.
    pub fn add_device(&mut self, vsp: Box<dyn Vsp>) -> Result<DeviceId, ServerError> {
        let (class, instance) = (vsp.class_id(), vsp.instance_id());
        if self
            .slots
            .values()
            .any(|s| s.class == class && s.instance == instance)
        {
            return Err(ServerError::DuplicateInstance { class, instance });
        }
        let relid = (1..=MAX_RELID)
            .find(|r| !self.slots.contains_key(r))
            .ok_or(ServerError::TooManyDevices)?;
        let device = DeviceId(self.next_device);
        self.next_device += 1;
        self.slots.insert(
            relid,
            Slot {
                device,
                role: Role::Primary {
                    vsp,
                    subs_offered: 0,
                },
                class,
                instance,
                state: SlotState::Pending,
            },
        );
        if self.conn.is_some() && self.offers_requested {
            self.offer(relid);
        }
        Ok(device)
    }

    /// Remove a device: close its channel, rescind the offer and keep the relid until the
    /// guest releases it. The VSP is dropped when the relid is released (or at once if the
    /// guest never saw the offer).
    pub fn remove_device(&mut self, device: DeviceId) -> Result<(), ServerError> {
        let relid = self
            .slots
            .iter()
            .find(|(_, s)| {
                s.device == device
                    && matches!(s.role, Role::Primary { .. })
                    && !matches!(s.state, SlotState::Rescinded)
            })
            .map(|(&r, _)| r)
            .ok_or(ServerError::NoSuchDevice(device))?;
        // Sub-channels go first (closed, then rescinded), as Linux closes them first.
        self.revoke_sub_channels(relid, true);
        let slot = self.slots.get_mut(&relid).expect("found above");
        match std::mem::replace(&mut slot.state, SlotState::Rescinded) {
            SlotState::Pending => {
                self.slots.remove(&relid);
                return Ok(());
            }
            SlotState::Offered | SlotState::Rescinded => {}
            SlotState::Open { shared, gpadl } => self.close_channel(relid, shared, gpadl),
        }
        info!(relid, "rescinding channel");
        self.send(MessageBuf::new(&RescindChannelOffer {
            child_relid: U32::new(relid),
        }));
        Ok(())
    }

    /// Drop the connection: close every channel, forget GPADLs and queued messages; devices
    /// wait to be offered again; rescinded ones are gone.
    pub fn reset(&mut self) {
        self.outbound.clear();
        // Sub-channels first (closed, then forgotten: the guest asks again after it
        // reconnects), so that no sub-channel outlives its primary's opening.
        let primaries: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s.role, Role::Primary { .. }))
            .map(|(&r, _)| r)
            .collect();
        for &relid in &primaries {
            self.revoke_sub_channels(relid, false);
        }
        self.slots
            .retain(|_, s| matches!(s.role, Role::Primary { .. }));
        for relid in primaries {
            let slot = self.slots.get_mut(&relid).expect("listed above");
            match std::mem::replace(&mut slot.state, SlotState::Pending) {
                SlotState::Open { shared, gpadl } => self.close_channel(relid, shared, gpadl),
                SlotState::Rescinded => {
                    self.slots.remove(&relid);
                }
                SlotState::Pending | SlotState::Offered => {}
            }
        }
        for id in self.gpadls.keys().copied().collect::<Vec<_>>() {
            self.remove_gpadl(id);
        }
        self.conn = None;
        self.registry.msg_conn.store(0, Ordering::SeqCst);
        self.offers_requested = false;
    }

    // ---- guest messages ----

    /// Handle one guest message that [`ServerCore::check_post`] accepted. Malformed or
    /// out-of-place messages are dropped (logged at debug level); requests the guest waits
    /// for are always answered.
    pub fn handle_message(&mut self, vp: u32, connection_id: u32, payload: &[u8]) {
        let msg = match parse(payload) {
            Ok(m) => m,
            Err(e) => {
                debug!(vp, %e, "dropping malformed VMBus message");
                return;
            }
        };
        match msg {
            ChannelMessage::InitiateContact(ic) => {
                return self.on_initiate_contact(connection_id, &ic)
            }
            ChannelMessage::Unload => return self.on_unload(),
            _ if self.conn.is_none() => {
                debug!(
                    vp,
                    msgtype = msg.msgtype(),
                    "dropping message before INITIATE_CONTACT"
                );
                return;
            }
            _ => {}
        }
        match msg {
            ChannelMessage::RequestOffers => self.on_request_offers(),
            ChannelMessage::OpenChannel(o) => self.on_open(&o),
            ChannelMessage::CloseChannel(c) => self.on_close(&c),
            ChannelMessage::GpadlHeader(h, data) => self.on_gpadl_header(&h, data),
            ChannelMessage::GpadlBody(b, pfns) => self.on_gpadl_body(&b, pfns),
            ChannelMessage::GpadlTeardown(t) => self.on_gpadl_teardown(&t),
            ChannelMessage::RelidReleased(r) => self.on_relid_released(&r),
            ChannelMessage::ModifyChannel(m) => self.on_modify_channel(&m),
            other => debug!(
                vp,
                msgtype = other.msgtype(),
                "ignoring unsupported message"
            ),
        }
    }

    fn on_initiate_contact(&mut self, connection_id: u32, ic: &InitiateContact) {
        if self.conn.is_some() {
            info!("guest initiates contact again without UNLOAD: resetting VMBus");
            self.reset();
        }
        let version = ic.version_requested.get();
        let v5 = version >= VERSION_WIN10_V5;
        let target = ic.target_vcpu.get();
        let sint = if v5 {
            ic.msg_sint()
        } else {
            VMBUS_MESSAGE_SINT
        };
        let expected_conn = if v5 {
            MESSAGE_CONNECTION_ID_4
        } else {
            MESSAGE_CONNECTION_ID
        };
        let ok = SUPPORTED_VERSIONS.contains(&version)
            && connection_id == expected_conn
            && target < self.config.vp_count
            && sint < 16
            && (!v5 || ic.msg_vtl() == 0);
        let vp = if target < self.config.vp_count {
            target
        } else {
            0
        };
        let reply_sint = if sint < 16 { sint } else { VMBUS_MESSAGE_SINT };
        if ok {
            info!(
                major = version >> 16,
                minor = version & 0xffff,
                target_vcpu = target,
                "VMBus connected"
            );
            self.conn = Some(Connection {
                version,
                target_vcpu: target,
                sint,
            });
            self.registry
                .msg_conn
                .store(connection_id, Ordering::SeqCst);
        } else {
            debug!(
                version,
                connection_id, target, sint, "refusing VMBus version"
            );
        }
        self.send_to(
            vp,
            reply_sint,
            MessageBuf::new(&VersionResponse {
                version_supported: u8::from(ok),
                connection_state: 0,
                padding: U16::new(0),
                msg_conn_id: U32::new(if ok && v5 { MESSAGE_CONNECTION_ID_4 } else { 0 }),
            }),
        );
    }

    fn on_unload(&mut self) {
        let (vp, sint) = self
            .conn
            .as_ref()
            .map(|c| (c.target_vcpu, c.sint))
            .unwrap_or((0, VMBUS_MESSAGE_SINT));
        info!("guest unloads VMBus");
        self.reset();
        self.send_to(vp, sint, MessageBuf::header_only(msgtype::UNLOAD_RESPONSE));
    }

    /// The VSP behind `relid` (the primary's for a sub-channel) and the channel's
    /// sub-channel index.
    fn vsp_of(&mut self, relid: u32) -> Option<(&mut Box<dyn Vsp>, u16)> {
        let (primary, index) = match self.slots.get(&relid)?.role {
            Role::Primary { .. } => (relid, 0),
            Role::Sub { primary, index } => (primary, index),
        };
        match &mut self.slots.get_mut(&primary)?.role {
            Role::Primary { vsp, .. } => Some((vsp, index)),
            Role::Sub { .. } => None,
        }
    }

    fn offer(&mut self, relid: u32) {
        let Some((vsp, index)) = self.vsp_of(relid) else {
            return;
        };
        let (flags, mmio, user_defined) = (
            vsp.channel_flags(),
            vsp.mmio_megabytes(),
            vsp.user_defined(),
        );
        let Some(slot) = self.slots.get_mut(&relid) else {
            return;
        };
        slot.state = SlotState::Offered;
        let offer = OfferChannel {
            interface_type: slot.class,
            interface_instance: slot.instance,
            reserved1: U64::new(0),
            reserved2: U64::new(0),
            channel_flags: U16::new(flags),
            mmio_megabytes: U16::new(mmio),
            user_defined,
            sub_channel_index: U16::new(index),
            reserved3: U16::new(0),
            child_relid: U32::new(relid),
            monitor_id: 0,
            monitor_allocated: 0,
            is_dedicated_interrupt: U16::new(1),
            connection_id: U32::new(channel_connection_id(relid)),
        };
        self.send(MessageBuf::new(&offer));
    }

    fn on_request_offers(&mut self) {
        self.offers_requested = true;
        let pending: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| matches!(s.state, SlotState::Pending))
            .map(|(&r, _)| r)
            .collect();
        for relid in pending {
            self.offer(relid);
        }
        self.send(MessageBuf::header_only(msgtype::ALLOFFERS_DELIVERED));
    }

    fn on_open(&mut self, o: &OpenChannel) {
        let relid = o.child_relid.get();
        let status = match self.try_open(o) {
            Ok(()) => 0,
            Err(why) => {
                debug!(relid, why, "refusing OPENCHANNEL");
                STATUS_UNSUCCESSFUL
            }
        };
        self.send(MessageBuf::new(&OpenResult {
            child_relid: o.child_relid,
            open_id: o.open_id,
            status: U32::new(status),
        }));
    }

    fn try_open(&mut self, o: &OpenChannel) -> Result<(), &'static str> {
        let relid = o.child_relid.get();
        let target_vp = o.target_vp.get();
        let gpadl_id = o.ring_buffer_gpadl.get();
        let sint = self.conn.as_ref().map(|c| c.sint).ok_or("not connected")?;
        let slot = self.slots.get(&relid).ok_or("no such channel")?;
        match slot.state {
            SlotState::Offered => {}
            SlotState::Open { .. } => return Err("channel already open"),
            _ => return Err("channel not offered"),
        }
        if target_vp >= self.config.vp_count {
            return Err("target VP out of range");
        }
        let g = self.gpadls.get(&gpadl_id).ok_or("no such GPADL")?;
        let data = match &g.state {
            GpadlState::Ready(d) if g.relid == relid && !g.in_use && !g.teardown_pending => {
                d.clone()
            }
            _ => return Err("GPADL not usable for this channel"),
        };
        let [range] = data.ranges.as_slice() else {
            return Err("ring GPADL must have exactly one range");
        };
        if range.byte_offset != 0 || range.byte_count as usize % PAGE_SIZE != 0 {
            return Err("ring GPADL must be whole pages");
        }
        let pages = &range.pfns;
        let down = o.downstream_ring_buffer_page_offset.get() as usize;
        if down < 2 || down.checked_add(2).is_none_or(|end| end > pages.len()) {
            return Err("bad downstream ring offset");
        }
        let out_ring = GuestRamRing::new(self.ram.clone(), pages[0], &pages[1..down])
            .ok_or("guest->host ring unusable")?;
        let in_ring = GuestRamRing::new(self.ram.clone(), pages[down], &pages[down + 1..])
            .ok_or("host->guest ring unusable")?;
        let reader = RingReader::new(out_ring).map_err(|_| "guest->host ring header invalid")?;
        let writer = RingWriter::new(in_ring).map_err(|_| "host->guest ring header invalid")?;
        let sub_channel_index = slot.sub_channel_index();
        let shared = ChannelShared::new(ChannelSetup {
            relid,
            sub_channel_index,
            sint,
            target_vp,
            user_data: o.user_data,
            synic: self.synic.clone(),
            ram: self.ram.clone(),
            registry: self.registry.clone(),
            reader,
            writer,
        });
        let conn_id = channel_connection_id(relid);
        self.registry.set_channel(conn_id, Some(shared.clone()));
        let (vsp, index) = self
            .vsp_of(relid)
            .ok_or("sub-channel without its primary")?;
        let channel = Channel::new(shared.clone());
        let opened = if index == 0 {
            vsp.open(channel)
        } else {
            vsp.open_sub_channel(index, channel)
        };
        if opened.is_err() {
            shared.begin_close();
            shared.finish_close();
            self.registry.set_channel(conn_id, None);
            return Err("device refused to open");
        }
        let slot = self.slots.get_mut(&relid).expect("checked above");
        slot.state = SlotState::Open {
            shared,
            gpadl: gpadl_id,
        };
        if let Some(g) = self.gpadls.get_mut(&gpadl_id) {
            g.in_use = true;
        }
        Ok(())
    }

    /// Close an open channel whose slot state was already replaced.
    fn close_channel(&mut self, relid: u32, shared: Arc<ChannelShared>, gpadl: u32) {
        shared.begin_close();
        match self.vsp_of(relid) {
            Some((vsp, 0)) => vsp.close(),
            Some((vsp, index)) => vsp.close_sub_channel(index),
            None => {}
        }
        shared.finish_close();
        self.registry
            .set_channel(channel_connection_id(relid), None);
        if let Some(g) = self.gpadls.get_mut(&gpadl) {
            g.in_use = false;
            if g.teardown_pending {
                self.remove_gpadl(gpadl);
                self.send(MessageBuf::new(&GpadlTorndown {
                    gpadl: U32::new(gpadl),
                }));
            }
        }
    }

    fn on_close(&mut self, c: &CloseChannel) {
        let relid = c.child_relid.get();
        let Some(slot) = self.slots.get_mut(&relid) else {
            debug!(relid, "CLOSECHANNEL for unknown channel");
            return;
        };
        if !matches!(slot.state, SlotState::Open { .. }) {
            debug!(relid, "CLOSECHANNEL for a channel that is not open");
            return;
        }
        // Closing a primary closes and rescinds its sub-channels first.
        self.revoke_sub_channels(relid, true);
        let Some(slot) = self.slots.get_mut(&relid) else {
            return;
        };
        if let SlotState::Open { shared, gpadl } =
            std::mem::replace(&mut slot.state, SlotState::Offered)
        {
            self.close_channel(relid, shared, gpadl);
        }
    }

    /// Tear down the sub-channels of primary `primary` (no-op for a sub-channel): close the
    /// open ones (the VSP's `close_sub_channel`), then rescind them (`rescind`: they keep
    /// their relids until the guest releases them) or forget them (the connection is
    /// going away). The next opening of the primary starts again from index 1.
    fn revoke_sub_channels(&mut self, primary: u32, rescind: bool) {
        let subs: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, s)| s.sub_of(primary) && !matches!(s.state, SlotState::Rescinded))
            .map(|(&r, _)| r)
            .collect();
        for relid in subs {
            let Some(slot) = self.slots.get_mut(&relid) else {
                continue;
            };
            if let SlotState::Open { shared, gpadl } =
                std::mem::replace(&mut slot.state, SlotState::Rescinded)
            {
                self.close_channel(relid, shared, gpadl);
            }
            if rescind {
                info!(relid, primary, "rescinding sub-channel");
                self.send(MessageBuf::new(&RescindChannelOffer {
                    child_relid: U32::new(relid),
                }));
            } else {
                self.slots.remove(&relid);
            }
        }
        if let Some(Slot {
            role: Role::Primary { subs_offered, .. },
            ..
        }) = self.slots.get_mut(&primary)
        {
            *subs_offered = 0;
        }
    }

    /// Offer the sub-channels VSPs asked for ([`Channel::offer_sub_channels`]) since the
    /// last call. [`crate::VmbusServer`]'s control thread calls it whenever a VSP queues a
    /// request; whoever drives a `ServerCore` directly calls it (then [`ServerCore::flush`]).
    pub fn handle_sub_channel_requests(&mut self) {
        for r in self.registry.take_sub_channel_requests() {
            self.offer_sub_channels(&r);
        }
    }

    fn offer_sub_channels(&mut self, r: &SubChannelRequest) {
        let primary = r.relid;
        let Some(slot) = self.slots.get(&primary) else {
            return;
        };
        // Only the current opening of an open primary may ask.
        let current = match &slot.state {
            SlotState::Open { shared, .. } => std::ptr::eq(r.channel.as_ptr(), Arc::as_ptr(shared)),
            _ => false,
        };
        let Role::Primary { subs_offered, .. } = slot.role else {
            return;
        };
        if !current || self.conn.is_none() {
            debug!(
                relid = primary,
                "dropping a sub-channel request of a closed channel"
            );
            return;
        }
        let (device, class, instance) = (slot.device, slot.class, slot.instance);
        let want = r.count.min(MAX_SUB_CHANNELS - subs_offered);
        if want < r.count {
            debug!(
                relid = primary,
                asked = r.count,
                want,
                "sub-channel limit reached"
            );
        }
        let mut offered = subs_offered;
        for _ in 0..want {
            let Some(relid) = (1..=MAX_RELID).find(|r| !self.slots.contains_key(r)) else {
                info!(relid = primary, "no free relid for another sub-channel");
                break;
            };
            offered += 1;
            self.slots.insert(
                relid,
                Slot {
                    device,
                    role: Role::Sub {
                        primary,
                        index: offered,
                    },
                    class,
                    instance,
                    state: SlotState::Pending,
                },
            );
            info!(relid, primary, index = offered, "offering sub-channel");
            self.offer(relid);
        }
        if let Some(Slot {
            role: Role::Primary { subs_offered, .. },
            ..
        }) = self.slots.get_mut(&primary)
        {
            *subs_offered = offered;
        }
    }

    fn gpadl_failed(&mut self, relid: u32, gpadl: u32, why: &str) {
        debug!(relid, gpadl, why, "GPADL refused");
        self.send(MessageBuf::new(&GpadlCreated {
            child_relid: U32::new(relid),
            gpadl: U32::new(gpadl),
            creation_status: U32::new(STATUS_UNSUCCESSFUL),
        }));
    }

    fn on_gpadl_header(&mut self, h: &GpadlHeader, data: &[u8]) {
        let (relid, id) = (h.child_relid.get(), h.gpadl.get());
        let usable = self
            .slots
            .get(&relid)
            .is_some_and(|s| matches!(s.state, SlotState::Offered | SlotState::Open { .. }));
        if !usable {
            return self.gpadl_failed(relid, id, "no such channel");
        }
        if self.gpadls.contains_key(&id) {
            // Leave the existing one alone.
            return self.gpadl_failed(relid, id, "handle already in use");
        }
        let buflen = usize::from(h.range_buflen.get());
        if self.gpadls.len() >= self.config.max_gpadls
            || self.gpadl_bytes + buflen > self.config.max_gpadl_bytes
        {
            return self.gpadl_failed(relid, id, "GPADL limits reached");
        }
        let mut buf = Vec::with_capacity(buflen);
        buf.extend_from_slice(data);
        self.gpadl_bytes += buflen;
        self.gpadls.insert(
            id,
            Gpadl {
                relid,
                budget: buflen,
                state: GpadlState::Building {
                    range_count: h.range_count.get(),
                    buflen,
                    data: buf,
                },
                in_use: false,
                teardown_pending: false,
            },
        );
        if data.len() == buflen {
            self.finish_gpadl(id);
        }
    }

    fn on_gpadl_body(&mut self, b: &GpadlBody, pfns: &[U64]) {
        let id = b.gpadl.get();
        let Some(g) = self.gpadls.get_mut(&id) else {
            debug!(gpadl = id, "GPADL_BODY for unknown GPADL");
            return;
        };
        let relid = g.relid;
        let GpadlState::Building { buflen, data, .. } = &mut g.state else {
            debug!(gpadl = id, "GPADL_BODY for a complete GPADL");
            return;
        };
        let add = pfns.len() * 8;
        if data.len() + add > *buflen {
            self.remove_gpadl(id);
            return self.gpadl_failed(relid, id, "more PFNs than range_buflen");
        }
        for p in pfns {
            data.extend_from_slice(&p.get().to_le_bytes());
        }
        if data.len() == *buflen {
            self.finish_gpadl(id);
        }
    }

    /// All range data arrived: validate it and every PFN, then answer.
    fn finish_gpadl(&mut self, id: u32) {
        let Some(g) = self.gpadls.get(&id) else {
            return;
        };
        let relid = g.relid;
        let GpadlState::Building {
            range_count, data, ..
        } = &g.state
        else {
            return;
        };
        let ranges = match GpaRangeList::parse(*range_count, data) {
            Ok(list) => {
                let mut ranges = Vec::with_capacity(list.len());
                let mut bad = None;
                for r in list.iter() {
                    let pfns: Vec<u64> = r.pfns().collect();
                    if let Some(&p) = pfns.iter().find(|&&p| {
                        !pfn_gpa(p).is_some_and(|gpa| self.ram.is_ram(gpa, PAGE_SIZE as u64))
                    }) {
                        bad = Some(p);
                        break;
                    }
                    ranges.push(PageRange {
                        byte_count: r.byte_count,
                        byte_offset: r.byte_offset,
                        pfns,
                    });
                }
                match bad {
                    None => Ok(ranges),
                    Some(p) => Err(format!("PFN {p:#x} is not guest RAM")),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match ranges {
            Ok(ranges) => {
                let d = Arc::new(GpadlData { relid, ranges });
                self.registry.set_gpadl(id, Some(d.clone()));
                if let Some(g) = self.gpadls.get_mut(&id) {
                    g.state = GpadlState::Ready(d);
                }
                self.send(MessageBuf::new(&GpadlCreated {
                    child_relid: U32::new(relid),
                    gpadl: U32::new(id),
                    creation_status: U32::new(0),
                }));
            }
            Err(why) => {
                self.remove_gpadl(id);
                self.gpadl_failed(relid, id, &why);
            }
        }
    }

    fn remove_gpadl(&mut self, id: u32) {
        if let Some(g) = self.gpadls.remove(&id) {
            self.gpadl_bytes -= g.budget;
            self.registry.set_gpadl(id, None);
        }
    }

    fn on_gpadl_teardown(&mut self, t: &GpadlTeardown) {
        let (relid, id) = (t.child_relid.get(), t.gpadl.get());
        let Some(g) = self.gpadls.get_mut(&id) else {
            debug!(gpadl = id, "GPADL_TEARDOWN for unknown GPADL");
            return;
        };
        if g.relid != relid {
            debug!(gpadl = id, relid, "GPADL_TEARDOWN with the wrong relid");
            return;
        }
        if g.in_use {
            // Answer once the channel using it closes.
            g.teardown_pending = true;
            return;
        }
        self.remove_gpadl(id);
        self.send(MessageBuf::new(&GpadlTorndown {
            gpadl: U32::new(id),
        }));
    }

    fn on_relid_released(&mut self, r: &RelidReleased) {
        let relid = r.child_relid.get();
        if !self
            .slots
            .get(&relid)
            .is_some_and(|s| matches!(s.state, SlotState::Rescinded))
        {
            debug!(relid, "RELID_RELEASED for a channel that was not rescinded");
            return;
        }
        self.slots.remove(&relid);
        let ids: Vec<u32> = self
            .gpadls
            .iter()
            .filter(|(_, g)| g.relid == relid)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.remove_gpadl(id);
        }
        info!(relid, "guest released the channel");
    }

    fn on_modify_channel(&mut self, m: &ModifyChannel) {
        let relid = m.child_relid.get();
        let vp = m.target_vp.get();
        let status = match self.slots.get(&relid).map(|s| &s.state) {
            Some(SlotState::Open { shared, .. }) if vp < self.config.vp_count => {
                shared.set_target_vp(vp);
                0
            }
            _ => STATUS_UNSUCCESSFUL,
        };
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.version >= VERSION_WIN10_V5_3)
        {
            self.send(MessageBuf::new(&ModifyChannelResponse {
                child_relid: m.child_relid,
                status: U32::new(status),
            }));
        }
    }
}

impl Drop for ServerCore {
    fn drop(&mut self) {
        // Stop every VSP thread before the VSPs are dropped.
        self.reset();
    }
}
