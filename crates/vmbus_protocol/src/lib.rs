//! VMBus channel-management messages: the wire format, a parser and builders.
//!
//! **What it is.** VMBus control traffic is a set of small messages (at most 240 bytes, the
//! HvPostMessage payload limit) exchanged over the SynIC: the guest posts them with
//! HvPostMessage on the message connection (id 4 for VMBus 5.0+, 1 before), the host delivers
//! them into the guest's SIMP slot of SINT 2. Each starts with an 8-byte header
//! `{msgtype u32, padding u32}`. This crate defines every message Linux 6.1's `hv_vmbus` sends
//! or expects (types 1–17, 21, 22, 24) as `zerocopy` structs (little-endian fields, no
//! padding), a [`parse`] function that validates a received message into a
//! [`ChannelMessage`], [`MessageBuf`] builders for sending, the GPA-range format used by
//! GPADLs ([`GpaRangeList`]), and [`Guid`] in the Windows mixed-endian layout.
//!
//! **What it talks to.** Nothing: it is pure data, `#![no_std]`, no allocation. The root-side
//! `vmbus_server` and the guest-side `vmbus_client` both use it.
//!
//! **What it must never do.** Panic or read out of bounds on hostile bytes: [`parse`] checks the
//! length against each type's size, and every variable-length part (GPADL PFN lists, range
//! tables) is bounded by the message itself. Semantics (does this relid exist, is this PFN RAM)
//! are the server's job.
//!
//! Why hand-written: the layouts are fixed by Hyper-V (facts taken from Linux's
//! `include/linux/hyperv.h`); no published `no_std` crate provides them.

#![no_std]

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

mod guid;
pub use guid::Guid;

/// Largest message payload (HvPostMessage / SynIC message payload limit).
pub const MAX_MESSAGE_SIZE: usize = 240;
/// The HvPostMessage / SynIC message type VMBus uses for its channel messages.
pub const HV_MESSAGE_TYPE_VMBUS: u32 = 1;
/// SINT the guest receives VMBus messages and channel interrupts on.
pub const VMBUS_MESSAGE_SINT: u8 = 2;
/// Message connection id for VMBus versions before 5.0.
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Message connection id for INITIATE_CONTACT with VMBus 5.0 and later.
pub const MESSAGE_CONNECTION_ID_4: u32 = 4;
/// Bytes of user-defined data in an offer or an open request.
pub const MAX_USER_DEFINED_BYTES: usize = 120;
/// Highest child relid (the SIEF slot has 2048 bits; relid 0 is never used).
pub const MAX_RELID: u32 = 2047;

/// Make a VMBus version number.
pub const fn make_version(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}
/// Windows 8 / Server 2012.
pub const VERSION_WIN8: u32 = make_version(2, 4);
/// Windows 8.1 / Server 2012 R2.
pub const VERSION_WIN8_1: u32 = make_version(3, 0);
/// Windows 10.
pub const VERSION_WIN10: u32 = make_version(4, 0);
/// Windows 10 v4.1 (adds MODIFYCHANNEL).
pub const VERSION_WIN10_V4_1: u32 = make_version(4, 1);
/// 5.0: message connection id 4, msg_sint in INITIATE_CONTACT.
pub const VERSION_WIN10_V5: u32 = make_version(5, 0);
/// 5.1.
pub const VERSION_WIN10_V5_1: u32 = make_version(5, 1);
/// 5.2.
pub const VERSION_WIN10_V5_2: u32 = make_version(5, 2);
/// 5.3: MODIFYCHANNEL is acknowledged with MODIFYCHANNEL_RESPONSE.
pub const VERSION_WIN10_V5_3: u32 = make_version(5, 3);
/// The versions Linux 6.1 offers, newest first.
pub const LINUX_VERSIONS: [u32; 8] = [
    VERSION_WIN10_V5_3,
    VERSION_WIN10_V5_2,
    VERSION_WIN10_V5_1,
    VERSION_WIN10_V5,
    VERSION_WIN10_V4_1,
    VERSION_WIN10,
    VERSION_WIN8_1,
    VERSION_WIN8,
];

/// Message type numbers (`msgtype` in the header).
pub mod msgtype {
    /// OFFERCHANNEL (host → guest).
    pub const OFFERCHANNEL: u32 = 1;
    /// RESCIND_CHANNELOFFER (host → guest).
    pub const RESCIND_CHANNELOFFER: u32 = 2;
    /// REQUESTOFFERS (guest → host).
    pub const REQUESTOFFERS: u32 = 3;
    /// ALLOFFERS_DELIVERED (host → guest).
    pub const ALLOFFERS_DELIVERED: u32 = 4;
    /// OPENCHANNEL (guest → host).
    pub const OPENCHANNEL: u32 = 5;
    /// OPENCHANNEL_RESULT (host → guest).
    pub const OPENCHANNEL_RESULT: u32 = 6;
    /// CLOSECHANNEL (guest → host).
    pub const CLOSECHANNEL: u32 = 7;
    /// GPADL_HEADER (guest → host).
    pub const GPADL_HEADER: u32 = 8;
    /// GPADL_BODY (guest → host).
    pub const GPADL_BODY: u32 = 9;
    /// GPADL_CREATED (host → guest).
    pub const GPADL_CREATED: u32 = 10;
    /// GPADL_TEARDOWN (guest → host).
    pub const GPADL_TEARDOWN: u32 = 11;
    /// GPADL_TORNDOWN (host → guest).
    pub const GPADL_TORNDOWN: u32 = 12;
    /// RELID_RELEASED (guest → host).
    pub const RELID_RELEASED: u32 = 13;
    /// INITIATE_CONTACT (guest → host).
    pub const INITIATE_CONTACT: u32 = 14;
    /// VERSION_RESPONSE (host → guest).
    pub const VERSION_RESPONSE: u32 = 15;
    /// UNLOAD (guest → host).
    pub const UNLOAD: u32 = 16;
    /// UNLOAD_RESPONSE (host → guest).
    pub const UNLOAD_RESPONSE: u32 = 17;
    /// TL_CONNECT_REQUEST (guest → host, hv_sock).
    pub const TL_CONNECT_REQUEST: u32 = 21;
    /// MODIFYCHANNEL (guest → host, 4.1+).
    pub const MODIFYCHANNEL: u32 = 22;
    /// TL_CONNECT_RESULT (host → guest, hv_sock).
    pub const TL_CONNECT_RESULT: u32 = 23;
    /// MODIFYCHANNEL_RESPONSE (host → guest, 5.3+).
    pub const MODIFYCHANNEL_RESPONSE: u32 = 24;
}

macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident : $t:ty,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t,)* }
    };
}

wire_struct! {
    /// The header every message starts with.
    pub struct MessageHeader {
        /// `msgtype::*`.
        pub msgtype: U32,
        /// Zero.
        pub padding: U32,
    }
}

wire_struct! {
    /// OFFERCHANNEL body (188 bytes; 196 with the header).
    pub struct OfferChannel {
        /// Device class (what driver binds).
        pub interface_type: Guid,
        /// Device instance (stable per VM configuration).
        pub interface_instance: Guid,
        /// Reserved.
        pub reserved1: U64,
        /// Reserved.
        pub reserved2: U64,
        /// `VMBUS_CHANNEL_*` flags.
        pub channel_flags: U16,
        /// MMIO space the device wants (MiB).
        pub mmio_megabytes: U16,
        /// Device-specific data.
        pub user_defined: [u8; MAX_USER_DEFINED_BYTES],
        /// 0 for a primary channel, 1.. for sub-channels.
        pub sub_channel_index: U16,
        /// Reserved.
        pub reserved3: U16,
        /// Relative channel id, 1..=2047: the SIEF bit the host sets to interrupt the guest.
        pub child_relid: U32,
        /// Monitor id (unused when `monitor_allocated` is 0).
        pub monitor_id: u8,
        /// Bit 0: guest→host signals go through the monitor page. We always send 0.
        pub monitor_allocated: u8,
        /// Bit 0: the channel has its own interrupt (guest signals with HvSignalEvent on
        /// `connection_id` and never touches the shared interrupt page). We always send 1.
        pub is_dedicated_interrupt: U16,
        /// What the guest passes to HvSignalEvent to signal this channel.
        pub connection_id: U32,
    }
}

wire_struct! {
    /// RESCIND_CHANNELOFFER body.
    pub struct RescindChannelOffer {
        /// The rescinded channel.
        pub child_relid: U32,
    }
}

wire_struct! {
    /// OPENCHANNEL body (140 bytes; 148 with the header).
    pub struct OpenChannel {
        /// The channel.
        pub child_relid: U32,
        /// Echoed in the result.
        pub open_id: U32,
        /// GPADL holding both rings.
        pub ring_buffer_gpadl: U32,
        /// VP to interrupt for host → guest signals.
        pub target_vp: U32,
        /// Page offset of the host → guest ring in the GPADL (the guest → host ring is at 0).
        pub downstream_ring_buffer_page_offset: U32,
        /// Passed to the device.
        pub user_data: [u8; MAX_USER_DEFINED_BYTES],
    }
}

wire_struct! {
    /// OPENCHANNEL_RESULT body.
    pub struct OpenResult {
        /// The channel.
        pub child_relid: U32,
        /// From the request.
        pub open_id: U32,
        /// 0 = success.
        pub status: U32,
    }
}

wire_struct! {
    /// CLOSECHANNEL body.
    pub struct CloseChannel {
        /// The channel.
        pub child_relid: U32,
    }
}

wire_struct! {
    /// GPADL_HEADER fixed part (followed by range data: `{u32 byte_count, u32 byte_offset,
    /// u64 pfn[]}` × `range_count`, continued in GPADL_BODY messages).
    pub struct GpadlHeader {
        /// The channel the GPADL belongs to.
        pub child_relid: U32,
        /// Guest-chosen handle.
        pub gpadl: U32,
        /// Total bytes of range data (all messages together).
        pub range_buflen: U16,
        /// Number of ranges.
        pub range_count: U16,
    }
}

wire_struct! {
    /// GPADL_BODY fixed part (followed by PFNs).
    pub struct GpadlBody {
        /// Sequence number (Linux leaves it 0).
        pub message_number: U32,
        /// Handle from the header.
        pub gpadl: U32,
    }
}

wire_struct! {
    /// GPADL_CREATED body.
    pub struct GpadlCreated {
        /// The channel.
        pub child_relid: U32,
        /// The handle.
        pub gpadl: U32,
        /// 0 = success.
        pub creation_status: U32,
    }
}

wire_struct! {
    /// GPADL_TEARDOWN body.
    pub struct GpadlTeardown {
        /// The channel.
        pub child_relid: U32,
        /// The handle.
        pub gpadl: U32,
    }
}

wire_struct! {
    /// GPADL_TORNDOWN body.
    pub struct GpadlTorndown {
        /// The handle.
        pub gpadl: U32,
    }
}

wire_struct! {
    /// RELID_RELEASED body.
    pub struct RelidReleased {
        /// The channel.
        pub child_relid: U32,
    }
}

wire_struct! {
    /// INITIATE_CONTACT body (32 bytes; 40 with the header).
    pub struct InitiateContact {
        /// Requested version (`make_version`).
        pub version_requested: U32,
        /// VP that receives control messages.
        pub target_vcpu: U32,
        /// Before 5.0: GPA of the interrupt page. 5.0+: byte 0 = msg_sint, byte 1 = msg_vtl.
        pub interrupt_page_or_sint: U64,
        /// GPA of the parent → child monitor page.
        pub monitor_page1: U64,
        /// GPA of the child → parent monitor page.
        pub monitor_page2: U64,
    }
}

impl InitiateContact {
    /// The SINT the guest wants messages on (meaningful for 5.0+).
    pub fn msg_sint(&self) -> u8 {
        self.interrupt_page_or_sint.get() as u8
    }
    /// The VTL (meaningful for 5.0+).
    pub fn msg_vtl(&self) -> u8 {
        (self.interrupt_page_or_sint.get() >> 8) as u8
    }
}

wire_struct! {
    /// VERSION_RESPONSE body (8 bytes; 16 with the header — Linux drops shorter ones).
    pub struct VersionResponse {
        /// Non-zero: the requested version is accepted.
        pub version_supported: u8,
        /// Connection state (0).
        pub connection_state: u8,
        /// Zero.
        pub padding: U16,
        /// 5.0+: the connection id the guest must post later messages to.
        pub msg_conn_id: U32,
    }
}

wire_struct! {
    /// MODIFYCHANNEL body.
    pub struct ModifyChannel {
        /// The channel.
        pub child_relid: U32,
        /// New VP for host → guest interrupts.
        pub target_vp: U32,
    }
}

wire_struct! {
    /// MODIFYCHANNEL_RESPONSE body (5.3+).
    pub struct ModifyChannelResponse {
        /// The channel.
        pub child_relid: U32,
        /// 0 = success.
        pub status: U32,
    }
}

wire_struct! {
    /// TL_CONNECT_REQUEST body (hv_sock; we parse it but offer no hv_sock service yet).
    pub struct TlConnectRequest {
        /// Guest endpoint.
        pub guest_endpoint_id: Guid,
        /// Host service.
        pub host_service_id: Guid,
    }
}

/// A message body type with its `msgtype`.
pub trait MessageBody: IntoBytes + Immutable {
    /// `msgtype::*`.
    const MSGTYPE: u32;
}

macro_rules! body {
    ($t:ty, $m:ident) => {
        impl MessageBody for $t {
            const MSGTYPE: u32 = msgtype::$m;
        }
    };
}
body!(OfferChannel, OFFERCHANNEL);
body!(RescindChannelOffer, RESCIND_CHANNELOFFER);
body!(OpenChannel, OPENCHANNEL);
body!(OpenResult, OPENCHANNEL_RESULT);
body!(CloseChannel, CLOSECHANNEL);
body!(GpadlCreated, GPADL_CREATED);
body!(GpadlTeardown, GPADL_TEARDOWN);
body!(GpadlTorndown, GPADL_TORNDOWN);
body!(RelidReleased, RELID_RELEASED);
body!(InitiateContact, INITIATE_CONTACT);
body!(VersionResponse, VERSION_RESPONSE);
body!(ModifyChannel, MODIFYCHANNEL);
body!(ModifyChannelResponse, MODIFYCHANNEL_RESPONSE);
body!(TlConnectRequest, TL_CONNECT_REQUEST);

/// A message being built: up to [`MAX_MESSAGE_SIZE`] bytes.
#[derive(Clone, Copy)]
pub struct MessageBuf {
    len: usize,
    data: [u8; MAX_MESSAGE_SIZE],
}

impl fmt::Debug for MessageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageBuf")
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

impl MessageBuf {
    /// A message with just a header (REQUESTOFFERS, ALLOFFERS_DELIVERED, UNLOAD,
    /// UNLOAD_RESPONSE).
    pub fn header_only(msgtype: u32) -> Self {
        let mut m = Self {
            len: 0,
            data: [0; MAX_MESSAGE_SIZE],
        };
        m.push(
            MessageHeader {
                msgtype: U32::new(msgtype),
                padding: U32::new(0),
            }
            .as_bytes(),
        );
        m
    }

    /// Header + `body`.
    pub fn new<T: MessageBody>(body: &T) -> Self {
        let mut m = Self::header_only(T::MSGTYPE);
        m.push(body.as_bytes());
        m
    }

    /// Append bytes; returns false (and appends nothing) if they would exceed 240 bytes.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.len + bytes.len() > MAX_MESSAGE_SIZE {
            return false;
        }
        self.data[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        true
    }

    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true for a built message (the header is always there).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// GPADL_HEADER with as much of `range_data` as fits (a multiple of 8 bytes); returns the
    /// message and the number of range-data bytes it carries.
    pub fn gpadl_header(header: &GpadlHeader, range_data: &[u8]) -> (Self, usize) {
        let mut m = Self::header_only(msgtype::GPADL_HEADER);
        m.push(header.as_bytes());
        let room = (MAX_MESSAGE_SIZE - m.len) / 8 * 8;
        let n = range_data.len().min(room);
        m.push(&range_data[..n]);
        (m, n)
    }

    /// GPADL_BODY with as many of `pfns` as fit; returns the message and the PFNs carried.
    pub fn gpadl_body(gpadl: u32, message_number: u32, pfns: &[u64]) -> (Self, usize) {
        let mut m = Self::header_only(msgtype::GPADL_BODY);
        m.push(
            GpadlBody {
                message_number: U32::new(message_number),
                gpadl: U32::new(gpadl),
            }
            .as_bytes(),
        );
        let n = pfns.len().min(GPADL_BODY_MAX_PFNS);
        for p in &pfns[..n] {
            m.push(&p.to_le_bytes());
        }
        (m, n)
    }
}

/// Range-data bytes that fit in a GPADL_HEADER message (20 bytes of fixed parts, data in
/// 8-byte units: one range header and 26 PFNs).
pub const GPADL_HEADER_MAX_DATA: usize = (MAX_MESSAGE_SIZE - 8 - 12) / 8 * 8;
/// PFNs that fit in a GPADL_BODY message.
pub const GPADL_BODY_MAX_PFNS: usize = (MAX_MESSAGE_SIZE - 8 - 8) / 8;

/// A parsed message. Variable parts borrow the input.
#[derive(Clone, Copy, Debug)]
pub enum ChannelMessage<'a> {
    /// 1.
    OfferChannel(OfferChannel),
    /// 2.
    RescindChannelOffer(RescindChannelOffer),
    /// 3.
    RequestOffers,
    /// 4.
    AllOffersDelivered,
    /// 5.
    OpenChannel(OpenChannel),
    /// 6.
    OpenResult(OpenResult),
    /// 7.
    CloseChannel(CloseChannel),
    /// 8: fixed part and the range data carried in this message (a multiple of 8 bytes, at
    /// most `range_buflen`).
    GpadlHeader(GpadlHeader, &'a [u8]),
    /// 9: fixed part and the PFNs carried.
    GpadlBody(GpadlBody, &'a [U64]),
    /// 10.
    GpadlCreated(GpadlCreated),
    /// 11.
    GpadlTeardown(GpadlTeardown),
    /// 12.
    GpadlTorndown(GpadlTorndown),
    /// 13.
    RelidReleased(RelidReleased),
    /// 14.
    InitiateContact(InitiateContact),
    /// 15.
    VersionResponse(VersionResponse),
    /// 16.
    Unload,
    /// 17.
    UnloadResponse,
    /// 21.
    TlConnectRequest(TlConnectRequest),
    /// 22.
    ModifyChannel(ModifyChannel),
    /// 24.
    ModifyChannelResponse(ModifyChannelResponse),
    /// A known type we do not implement (18, 19, 20, 23): only the type is reported.
    Unsupported(u32),
}

impl ChannelMessage<'_> {
    /// The message type number.
    pub fn msgtype(&self) -> u32 {
        use msgtype::*;
        match self {
            ChannelMessage::OfferChannel(_) => OFFERCHANNEL,
            ChannelMessage::RescindChannelOffer(_) => RESCIND_CHANNELOFFER,
            ChannelMessage::RequestOffers => REQUESTOFFERS,
            ChannelMessage::AllOffersDelivered => ALLOFFERS_DELIVERED,
            ChannelMessage::OpenChannel(_) => OPENCHANNEL,
            ChannelMessage::OpenResult(_) => OPENCHANNEL_RESULT,
            ChannelMessage::CloseChannel(_) => CLOSECHANNEL,
            ChannelMessage::GpadlHeader(..) => GPADL_HEADER,
            ChannelMessage::GpadlBody(..) => GPADL_BODY,
            ChannelMessage::GpadlCreated(_) => GPADL_CREATED,
            ChannelMessage::GpadlTeardown(_) => GPADL_TEARDOWN,
            ChannelMessage::GpadlTorndown(_) => GPADL_TORNDOWN,
            ChannelMessage::RelidReleased(_) => RELID_RELEASED,
            ChannelMessage::InitiateContact(_) => INITIATE_CONTACT,
            ChannelMessage::VersionResponse(_) => VERSION_RESPONSE,
            ChannelMessage::Unload => UNLOAD,
            ChannelMessage::UnloadResponse => UNLOAD_RESPONSE,
            ChannelMessage::TlConnectRequest(_) => TL_CONNECT_REQUEST,
            ChannelMessage::ModifyChannel(_) => MODIFYCHANNEL,
            ChannelMessage::ModifyChannelResponse(_) => MODIFYCHANNEL_RESPONSE,
            ChannelMessage::Unsupported(t) => *t,
        }
    }
}

/// Why a message was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// More than 240 bytes.
    TooLong(usize),
    /// Shorter than the header or than the type's fixed size.
    TooShort {
        /// The type (0 if even the header is missing).
        msgtype: u32,
        /// Bytes received.
        len: usize,
        /// Bytes required.
        min: usize,
    },
    /// Not a VMBus message type.
    UnknownType(u32),
    /// Inconsistent fields.
    Malformed(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooLong(n) => write!(f, "message of {n} bytes exceeds 240"),
            ParseError::TooShort { msgtype, len, min } => {
                write!(f, "message type {msgtype} has {len} bytes, needs {min}")
            }
            ParseError::UnknownType(t) => write!(f, "unknown message type {t}"),
            ParseError::Malformed(why) => write!(f, "malformed message: {why}"),
        }
    }
}

fn body<T: FromBytes + KnownLayout + Immutable + Copy>(
    msgtype: u32,
    bytes: &[u8],
) -> Result<(T, &[u8]), ParseError> {
    let min = 8 + core::mem::size_of::<T>();
    let rest = &bytes[8..];
    T::read_from_prefix(rest).map_err(|_| ParseError::TooShort {
        msgtype,
        len: bytes.len(),
        min,
    })
}

/// Parse one message (the SynIC payload). Trailing bytes beyond a fixed-size body are
/// ignored (senders may pad); variable parts are validated against the message length.
pub fn parse(bytes: &[u8]) -> Result<ChannelMessage<'_>, ParseError> {
    use msgtype::*;
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(ParseError::TooLong(bytes.len()));
    }
    let (hdr, _) = MessageHeader::read_from_prefix(bytes).map_err(|_| ParseError::TooShort {
        msgtype: 0,
        len: bytes.len(),
        min: 8,
    })?;
    let t = hdr.msgtype.get();
    Ok(match t {
        OFFERCHANNEL => ChannelMessage::OfferChannel(body(t, bytes)?.0),
        RESCIND_CHANNELOFFER => ChannelMessage::RescindChannelOffer(body(t, bytes)?.0),
        REQUESTOFFERS => ChannelMessage::RequestOffers,
        ALLOFFERS_DELIVERED => ChannelMessage::AllOffersDelivered,
        OPENCHANNEL => ChannelMessage::OpenChannel(body(t, bytes)?.0),
        OPENCHANNEL_RESULT => ChannelMessage::OpenResult(body(t, bytes)?.0),
        CLOSECHANNEL => ChannelMessage::CloseChannel(body(t, bytes)?.0),
        GPADL_HEADER => {
            let (h, rest): (GpadlHeader, _) = body(t, bytes)?;
            if h.range_count.get() == 0 {
                return Err(ParseError::Malformed("GPADL without ranges"));
            }
            if rest.len() % 8 != 0 {
                return Err(ParseError::Malformed(
                    "GPADL range data not a multiple of 8",
                ));
            }
            if rest.len() > usize::from(h.range_buflen.get()) {
                return Err(ParseError::Malformed(
                    "GPADL range data beyond range_buflen",
                ));
            }
            ChannelMessage::GpadlHeader(h, rest)
        }
        GPADL_BODY => {
            let (h, rest): (GpadlBody, _) = body(t, bytes)?;
            if rest.len() % 8 != 0 {
                return Err(ParseError::Malformed("GPADL body not a multiple of 8"));
            }
            let pfns = <[U64]>::ref_from_bytes(rest)
                .map_err(|_| ParseError::Malformed("GPADL body not a multiple of 8"))?;
            ChannelMessage::GpadlBody(h, pfns)
        }
        GPADL_CREATED => ChannelMessage::GpadlCreated(body(t, bytes)?.0),
        GPADL_TEARDOWN => ChannelMessage::GpadlTeardown(body(t, bytes)?.0),
        GPADL_TORNDOWN => ChannelMessage::GpadlTorndown(body(t, bytes)?.0),
        RELID_RELEASED => ChannelMessage::RelidReleased(body(t, bytes)?.0),
        INITIATE_CONTACT => ChannelMessage::InitiateContact(body(t, bytes)?.0),
        VERSION_RESPONSE => ChannelMessage::VersionResponse(body(t, bytes)?.0),
        UNLOAD => ChannelMessage::Unload,
        UNLOAD_RESPONSE => ChannelMessage::UnloadResponse,
        TL_CONNECT_REQUEST => ChannelMessage::TlConnectRequest(body(t, bytes)?.0),
        MODIFYCHANNEL => ChannelMessage::ModifyChannel(body(t, bytes)?.0),
        MODIFYCHANNEL_RESPONSE => ChannelMessage::ModifyChannelResponse(body(t, bytes)?.0),
        18..=20 | TL_CONNECT_RESULT => ChannelMessage::Unsupported(t),
        other => return Err(ParseError::UnknownType(other)),
    })
}

/// Page size of GPADL page frame numbers.
pub const PAGE_SIZE: u64 = 4096;

/// Why GPA range data is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// The data ends inside a range header or PFN list.
    Truncated,
    /// Bytes left over after the last range.
    TrailingData,
    /// A range's offset is not inside its first page.
    BadOffset,
    /// A range of zero bytes.
    Empty,
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RangeError::Truncated => "range data ends inside a range",
            RangeError::TrailingData => "bytes left after the last range",
            RangeError::BadOffset => "range offset outside its first page",
            RangeError::Empty => "empty range",
        })
    }
}

/// A complete, validated GPA range list (`{u32 byte_count, u32 byte_offset, u64 pfn[n]}` ×
/// count, `n` = pages spanned), as carried by GPADL_HEADER + GPADL_BODY messages.
#[derive(Clone, Copy, Debug)]
pub struct GpaRangeList<'a> {
    count: u16,
    data: &'a [u8],
}

/// One range of a [`GpaRangeList`].
#[derive(Clone, Copy, Debug)]
pub struct GpaRangeRef<'a> {
    /// Bytes in the range.
    pub byte_count: u32,
    /// Offset into the first page.
    pub byte_offset: u32,
    pfns: &'a [U64],
}

impl<'a> GpaRangeRef<'a> {
    /// The PFNs.
    pub fn pfns(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.pfns.iter().map(|p| p.get())
    }
    /// Number of PFNs.
    pub fn pfn_count(&self) -> usize {
        self.pfns.len()
    }
}

fn split_gpa_range(data: &[u8]) -> Result<(GpaRangeRef<'_>, &[u8]), RangeError> {
    let (count, rest) = U32::read_from_prefix(data).map_err(|_| RangeError::Truncated)?;
    let (offset, rest) = U32::read_from_prefix(rest).map_err(|_| RangeError::Truncated)?;
    let (byte_count, byte_offset) = (count.get(), offset.get());
    if u64::from(byte_offset) >= PAGE_SIZE {
        return Err(RangeError::BadOffset);
    }
    if byte_count == 0 {
        return Err(RangeError::Empty);
    }
    let n = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(PAGE_SIZE);
    if n > (rest.len() / 8) as u64 {
        return Err(RangeError::Truncated);
    }
    let (pfns, rest) =
        <[U64]>::ref_from_prefix_with_elems(rest, n as usize).map_err(|_| RangeError::Truncated)?;
    Ok((
        GpaRangeRef {
            byte_count,
            byte_offset,
            pfns,
        },
        rest,
    ))
}

impl<'a> GpaRangeList<'a> {
    /// Validate `count` ranges occupying exactly `data`.
    pub fn parse(count: u16, data: &'a [u8]) -> Result<Self, RangeError> {
        let mut rest = data;
        for _ in 0..count {
            rest = split_gpa_range(rest)?.1;
        }
        if !rest.is_empty() {
            return Err(RangeError::TrailingData);
        }
        Ok(Self { count, data })
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// True if there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Total number of PFNs over all ranges.
    pub fn total_pfns(&self) -> usize {
        self.iter().map(|r| r.pfn_count()).sum()
    }

    /// The ranges.
    pub fn iter(&self) -> impl Iterator<Item = GpaRangeRef<'a>> + 'a {
        let mut rest = self.data;
        let mut left = self.count;
        core::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let (r, next) = split_gpa_range(rest).ok()?;
            rest = next;
            left -= 1;
            Some(r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_wire() {
        use core::mem::size_of;
        assert_eq!(8 + size_of::<OfferChannel>(), 196);
        assert_eq!(8 + size_of::<OpenChannel>(), 148);
        assert_eq!(8 + size_of::<InitiateContact>(), 40);
        assert_eq!(8 + size_of::<VersionResponse>(), 16);
        assert_eq!(8 + size_of::<GpadlHeader>(), 20);
        assert_eq!(8 + size_of::<GpadlBody>(), 16);
        assert_eq!(8 + size_of::<OpenResult>(), 20);
        assert_eq!(8 + size_of::<GpadlCreated>(), 20);
        assert_eq!(8 + size_of::<TlConnectRequest>(), 40);
        assert_eq!(GPADL_HEADER_MAX_DATA, 216);
        assert_eq!(GPADL_BODY_MAX_PFNS, 28);
    }

    #[test]
    fn round_trip_open_channel() {
        let open = OpenChannel {
            child_relid: U32::new(3),
            open_id: U32::new(3),
            ring_buffer_gpadl: U32::new(0xe1e10),
            target_vp: U32::new(1),
            downstream_ring_buffer_page_offset: U32::new(16),
            user_data: [7; 120],
        };
        let m = MessageBuf::new(&open);
        assert_eq!(m.len(), 148);
        match parse(m.as_bytes()).unwrap() {
            ChannelMessage::OpenChannel(o) => assert_eq!(o, open),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_and_unknown_messages_are_rejected() {
        let mut m = MessageBuf::header_only(msgtype::OFFERCHANNEL);
        m.push(&[0; 100]);
        assert_eq!(
            parse(m.as_bytes()).unwrap_err(),
            ParseError::TooShort {
                msgtype: 1,
                len: 108,
                min: 196
            }
        );
        assert!(matches!(
            parse(&[1, 0, 0]).unwrap_err(),
            ParseError::TooShort { msgtype: 0, .. }
        ));
        let m = MessageBuf::header_only(99);
        assert_eq!(
            parse(m.as_bytes()).unwrap_err(),
            ParseError::UnknownType(99)
        );
        assert_eq!(parse(&[0u8; 241]).unwrap_err(), ParseError::TooLong(241));
        let m = MessageBuf::header_only(19);
        assert!(matches!(
            parse(m.as_bytes()),
            Ok(ChannelMessage::Unsupported(19))
        ));
    }

    #[test]
    fn gpadl_header_and_bodies_carry_a_range_list() {
        // One range of 40 pages: 26 PFNs fit the header, 14 go in a body.
        let pfns: [u64; 40] = core::array::from_fn(|i| 0x100 + i as u64);
        let mut data = [0u8; 8 + 40 * 8];
        data[0..4].copy_from_slice(&(40u32 * 4096).to_le_bytes());
        for (i, p) in pfns.iter().enumerate() {
            data[8 + i * 8..16 + i * 8].copy_from_slice(&p.to_le_bytes());
        }
        let hdr = GpadlHeader {
            child_relid: U32::new(1),
            gpadl: U32::new(9),
            range_buflen: U16::new(data.len() as u16),
            range_count: U16::new(1),
        };
        let (m, n) = MessageBuf::gpadl_header(&hdr, &data);
        assert_eq!(n, 216);
        assert!(m.len() <= MAX_MESSAGE_SIZE);
        let mut assembled = [0u8; 8 + 40 * 8];
        let ChannelMessage::GpadlHeader(h, part) = parse(m.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(h, hdr);
        assembled[..part.len()].copy_from_slice(part);
        let rest_pfns = &pfns[(n - 8) / 8..];
        let (b, k) = MessageBuf::gpadl_body(9, 0, rest_pfns);
        assert_eq!(k, 14);
        let ChannelMessage::GpadlBody(bh, bp) = parse(b.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(bh.gpadl.get(), 9);
        for (i, p) in bp.iter().enumerate() {
            assembled[n + i * 8..n + 8 + i * 8].copy_from_slice(&p.get().to_le_bytes());
        }
        let list = GpaRangeList::parse(1, &assembled).unwrap();
        assert_eq!(list.total_pfns(), 40);
        let r = list.iter().next().unwrap();
        assert!(r.pfns().eq(pfns.iter().copied()));
    }

    #[test]
    fn gpadl_header_lies_are_caught() {
        let hdr = GpadlHeader {
            child_relid: U32::new(1),
            gpadl: U32::new(9),
            range_buflen: U16::new(16),
            range_count: U16::new(1),
        };
        // More data than range_buflen.
        let (m, _) = MessageBuf::gpadl_header(&hdr, &[0u8; 24]);
        assert!(matches!(parse(m.as_bytes()), Err(ParseError::Malformed(_))));
        // Zero ranges.
        let hdr0 = GpadlHeader {
            range_count: U16::new(0),
            ..hdr
        };
        let (m, _) = MessageBuf::gpadl_header(&hdr0, &[]);
        assert!(matches!(parse(m.as_bytes()), Err(ParseError::Malformed(_))));
        // A range claiming more pages than the data holds.
        let mut d = [0u8; 16];
        d[0..4].copy_from_slice(&(8192u32).to_le_bytes());
        assert_eq!(
            GpaRangeList::parse(1, &d).unwrap_err(),
            RangeError::Truncated
        );
        d[0..4].copy_from_slice(&(100u32).to_le_bytes());
        d[4..8].copy_from_slice(&(4096u32).to_le_bytes());
        assert_eq!(
            GpaRangeList::parse(1, &d).unwrap_err(),
            RangeError::BadOffset
        );
        d[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            GpaRangeList::parse(2, &d).unwrap_err(),
            RangeError::Truncated
        );
        let mut d2 = [0u8; 24];
        d2[0..4].copy_from_slice(&(100u32).to_le_bytes());
        assert_eq!(
            GpaRangeList::parse(1, &d2).unwrap_err(),
            RangeError::TrailingData
        );
    }

    #[test]
    fn initiate_contact_sint_and_vtl() {
        let ic = InitiateContact {
            version_requested: U32::new(VERSION_WIN10_V5_3),
            target_vcpu: U32::new(0),
            interrupt_page_or_sint: U64::new(0x0102),
            monitor_page1: U64::new(0),
            monitor_page2: U64::new(0),
        };
        assert_eq!(ic.msg_sint(), 2);
        assert_eq!(ic.msg_vtl(), 1);
    }
}
