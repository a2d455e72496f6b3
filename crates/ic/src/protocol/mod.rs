//! The integration-component (IC) wire format: framing, version negotiation, and the
//! heartbeat, shutdown and time-synchronization messages. [`kvp`] has the KVP messages.
//!
//! **What it is.** Pure functions and `zerocopy` structs, no I/O: builders for the requests
//! the host sends and parsers for the answers the guest sends back. Every IC packet is an
//! in-band VMBus packet whose payload is
//!
//! ```text
//! vmbuspipe_hdr { u32 flags, u32 msgsize }                         8 bytes
//! icmsg_hdr { ic_version icverframe, u16 icmsgtype, ic_version icvermsg,
//!             u16 icmsgsize, u32 status, u8 ictransaction_id, u8 icflags, u8 reserved[2] }
//!                                                                  20 bytes
//! body (icmsgsize bytes)
//! ```
//!
//! The host is always the requester (`icflags` TRANSACTION | REQUEST); the guest answers in
//! the same packet format, normally by rewriting the request in place (Linux's `hv_utils`
//! sets `icflags` to TRANSACTION | RESPONSE, fills `status` and the body, and sends back as
//! many bytes as it received, echoing the VMBus transaction id). The first exchange on every
//! channel open is NEGOTIATE (type 0): the host lists the framework versions and the service
//! versions it supports, newest first; the guest answers with one of each (both counts 1),
//! or with both counts 0 when it supports none of them.
//!
//! **What it talks to.** Nothing: `crate::framework` feeds it packet payloads received on a
//! `vmbus_server::Channel` and sends what the builders return. The fuzz targets in
//! `crates/ic/fuzz` drive the parsers directly.
//!
//! **What it must never do.** Trust the guest. Every length is checked against the bytes
//! actually present before anything is read (`icmsgsize` may not exceed the packet; version
//! counts may not exceed the body), nothing is allocated from a guest-supplied size, and
//! every failure is a [`ProtocolError`], never a panic.
//!
//! Facts come from Linux's `include/linux/hyperv.h`, `include/uapi/linux/hyperv.h` and
//! `drivers/hv/{hv_util,channel_mgmt}.c`.

pub mod kvp;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// IC message type: version negotiation.
pub const MSGTYPE_NEGOTIATE: u16 = 0;
/// IC message type: heartbeat.
pub const MSGTYPE_HEARTBEAT: u16 = 1;
/// IC message type: key-value pair exchange.
pub const MSGTYPE_KVP_EXCHANGE: u16 = 2;
/// IC message type: shutdown.
pub const MSGTYPE_SHUTDOWN: u16 = 3;
/// IC message type: time synchronization.
pub const MSGTYPE_TIMESYNC: u16 = 4;

/// `icflags`: part of a transaction.
pub const ICFLAG_TRANSACTION: u8 = 1;
/// `icflags`: a request (host → guest).
pub const ICFLAG_REQUEST: u8 = 2;
/// `icflags`: a response (guest → host).
pub const ICFLAG_RESPONSE: u8 = 4;

/// `vmbuspipe_hdr.flags` of our requests: a data message. Linux ignores the pipe header.
pub const PIPE_FLAG_DATA: u32 = 1;

/// Status: success.
pub const HV_S_OK: u32 = 0x0000_0000;
/// Status: generic failure (Linux: bad request, daemon absent or timed out).
pub const HV_E_FAIL: u32 = 0x8000_4005;
/// Status: no more items / not found (KVP).
pub const HV_S_CONT: u32 = 0x8007_0103;
/// Status: not supported.
pub const HV_ERROR_NOT_SUPPORTED: u32 = 0x8007_0032;
/// Status: invalid argument.
pub const HV_INVALIDARG: u32 = 0x8007_0057;

/// Size of `vmbuspipe_hdr` + `icmsg_hdr`: where the body starts.
pub const IC_HEADER_SIZE: usize = 28;
/// Most versions of each kind a negotiate message may carry (Linux's
/// `IC_VERSION_NEGOTIATION_MAX_VER_COUNT`).
pub const MAX_NEGOTIATE_VERSIONS: usize = 100;

/// Time-sync flag: probe (no time adjustment).
pub const TIMESYNC_FLAG_PROBE: u8 = 0;
/// Time-sync flag: step the clock to this time (first message after open, restore).
pub const TIMESYNC_FLAG_SYNC: u8 = 1;
/// Time-sync flag: a sample the guest may use to discipline its clock.
pub const TIMESYNC_FLAG_SAMPLE: u8 = 2;

/// Shutdown flag: power off.
pub const SHUTDOWN_FLAG_POWER_OFF: u32 = 0;
/// Shutdown flag bit: force (Linux always forces anyway).
pub const SHUTDOWN_FLAG_FORCE: u32 = 1;
/// Shutdown flag: reboot.
pub const SHUTDOWN_FLAG_REBOOT: u32 = 2;
/// Shutdown flag: hibernate (Linux accepts it only when hibernation is possible).
pub const SHUTDOWN_FLAG_HIBERNATE: u32 = 4;
/// Size of the shutdown message's display text field.
pub const SHUTDOWN_MESSAGE_SIZE: usize = 2048;

/// 100 ns intervals between 1601-01-01 (FILETIME's origin) and 1970-01-01.
pub const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// A protocol version `major.minor` (`ic_version`; as a u32: `major << 16 | minor`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
}

impl Version {
    /// `major.minor`.
    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }

    fn wire(self) -> WireVersion {
        WireVersion {
            major: U16::new(self.major),
            minor: U16::new(self.minor),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Framework versions we offer, newest first (Linux knows 3.0 and 1.0).
pub const FRAMEWORK_VERSIONS: &[Version] = &[Version::new(3, 0), Version::new(1, 0)];
/// Heartbeat service versions we offer (message layout identical in both).
pub const HEARTBEAT_VERSIONS: &[Version] = &[Version::new(3, 0), Version::new(1, 0)];
/// Shutdown service versions we offer (message layout identical in all).
pub const SHUTDOWN_VERSIONS: &[Version] = &[
    Version::new(3, 2),
    Version::new(3, 1),
    Version::new(3, 0),
    Version::new(1, 0),
];
/// Time-sync service versions we offer: 4.0 carries the guest reference time
/// ([`TimesyncRefData`]), 3.0 and 1.0 the older [`TimesyncData`].
pub const TIMESYNC_VERSIONS: &[Version] =
    &[Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)];
/// KVP service versions we offer: those Linux's `hv_kvp.c` knows (4.0 Win8, 3.0 Win7,
/// 1.0 WS2008), all with the same message layout.
pub const KVP_VERSIONS: &[Version] = &[Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)];

/// The versions both sides agreed on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Negotiated {
    /// IC framework version.
    pub framework: Version,
    /// Service (message) version.
    pub message: Version,
}

/// `ic_version` on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct WireVersion {
    /// Major.
    pub major: U16,
    /// Minor.
    pub minor: U16,
}

impl WireVersion {
    fn get(self) -> Version {
        Version::new(self.major.get(), self.minor.get())
    }
}

/// `vmbuspipe_hdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct PipeHeader {
    /// Pipe message flags ([`PIPE_FLAG_DATA`]).
    pub flags: U32,
    /// Bytes after this header.
    pub msgsize: U32,
}

/// `icmsg_hdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct IcMsgHeader {
    /// Framework version.
    pub icverframe: WireVersion,
    /// `MSGTYPE_*`.
    pub icmsgtype: U16,
    /// Service version.
    pub icvermsg: WireVersion,
    /// Body size in bytes.
    pub icmsgsize: U16,
    /// `HV_*` status (set by the responder).
    pub status: U32,
    /// Transaction id (low byte of ours; echoed).
    pub ictransaction_id: u8,
    /// `ICFLAG_*`.
    pub icflags: u8,
    /// Reserved.
    pub reserved: [u8; 2],
}

/// `icmsg_negotiate` without its version array.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct NegotiateHeader {
    /// Framework versions that follow.
    pub icframe_vercnt: U16,
    /// Service versions that follow the framework versions.
    pub icmsg_vercnt: U16,
    /// Reserved.
    pub reserved: U32,
}

/// `heartbeat_msg_data`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HeartbeatData {
    /// Sequence number; the guest answers with it incremented by one.
    pub seq_num: U64,
    /// Reserved.
    pub reserved: [U32; 8],
}

/// `shutdown_msg_data`.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ShutdownData {
    /// Reason code (informational).
    pub reason_code: U32,
    /// Timeout in seconds (informational).
    pub timeout_seconds: U32,
    /// `SHUTDOWN_FLAG_*`.
    pub flags: U32,
    /// NUL-terminated text shown to the guest's users (Linux ignores it).
    pub display_message: [u8; SHUTDOWN_MESSAGE_SIZE],
}

/// `ictimesync_data` (service versions 1.0 and 3.0).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct TimesyncData {
    /// Host time, FILETIME.
    pub parenttime: U64,
    /// Unused by Linux (0).
    pub childtime: U64,
    /// Unused by Linux (0).
    pub roundtriptime: U64,
    /// `TIMESYNC_FLAG_*`.
    pub flags: u8,
}

/// `ictimesync_ref_data` (service version 4.0).
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct TimesyncRefData {
    /// Host time, FILETIME.
    pub parenttime: U64,
    /// The guest's reference counter (100 ns) when `parenttime` was read.
    pub vmreferencetime: U64,
    /// `TIMESYNC_FLAG_*`.
    pub flags: u8,
    /// Leap-second flags (0).
    pub leapflags: u8,
    /// Stratum (0: unspecified).
    pub stratum: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// A guest answer (or a request, for the tests' fake guest) that could not be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Fewer bytes than the structure needs.
    #[error("{what}: {got} bytes, need at least {need}")]
    TooShort {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// `icmsgsize` claims more bytes than the packet holds.
    #[error("icmsgsize {declared} exceeds the {available} bytes after the header")]
    BodyOverrun {
        /// `icmsgsize`.
        declared: usize,
        /// Bytes present after the header.
        available: usize,
    },
    /// The RESPONSE flag is missing.
    #[error("not a response (icflags {flags:#x})")]
    NotAResponse {
        /// `icflags`.
        flags: u8,
    },
    /// The answer is for another message type.
    #[error("message type {got}, expected {expected}")]
    WrongType {
        /// What we sent.
        expected: u16,
        /// What came back.
        got: u16,
    },
    /// The answer carries other versions than the negotiated ones.
    #[error("versions {got_framework}/{got_message}, negotiated {framework}/{message}")]
    WrongVersion {
        /// Negotiated framework version.
        framework: Version,
        /// Negotiated service version.
        message: Version,
        /// Framework version in the answer.
        got_framework: Version,
        /// Service version in the answer.
        got_message: Version,
    },
    /// The guest supports none of the versions offered.
    #[error("the guest supports none of the versions offered")]
    NegotiationRefused,
    /// The negotiate answer does not pick exactly one version of each kind.
    #[error("negotiate answer with {framework} framework and {service} service versions")]
    NegotiationCounts {
        /// Framework versions in the answer.
        framework: u16,
        /// Service versions in the answer.
        service: u16,
    },
    /// The guest chose a version we did not offer.
    #[error("the guest chose {kind} version {version}, which was not offered")]
    UnknownVersion {
        /// "framework" or "service".
        kind: &'static str,
        /// Its choice.
        version: Version,
    },
    /// Heartbeat answer with the wrong sequence number.
    #[error("heartbeat sequence {got}, expected {expected}")]
    HeartbeatSequence {
        /// Ours plus one.
        expected: u64,
        /// The guest's.
        got: u64,
    },
    /// A size field is larger than its field, or odd for UTF-16 text.
    #[error("{field}: size {size} invalid for a {max}-byte UTF-16 field")]
    BadFieldSize {
        /// Which field.
        field: &'static str,
        /// The size claimed.
        size: u32,
        /// The field's size.
        max: usize,
    },
    /// UTF-16 text with an unpaired surrogate.
    #[error("{field}: invalid UTF-16")]
    InvalidUtf16 {
        /// Which field.
        field: &'static str,
    },
    /// KVP answer for another operation or pool than the request's.
    #[error("KVP answer for operation {got_op} pool {got_pool}, expected {op} pool {pool}")]
    KvpMismatch {
        /// Our operation.
        op: u8,
        /// Our pool.
        pool: u8,
        /// The answer's operation.
        got_op: u8,
        /// The answer's pool.
        got_pool: u8,
    },
    /// KVP value of a type other than a string.
    #[error("KVP value type {0} (only REG_SZ strings are expected)")]
    KvpValueType(u32),
    /// An answer before any version was agreed.
    #[error("answer before version negotiation completed")]
    NotNegotiated,
}

fn read_prefix<T: FromBytes + KnownLayout + Immutable + Unaligned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, ProtocolError> {
    T::read_from_prefix(bytes)
        .map(|(t, _)| t)
        .map_err(|_| ProtocolError::TooShort {
            what,
            need: size_of::<T>(),
            got: bytes.len(),
        })
}

/// What goes into the header of a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestHeader {
    /// `MSGTYPE_*`.
    pub msg_type: u16,
    /// Framework version to put in the header.
    pub framework: Version,
    /// Service version to put in the header.
    pub message: Version,
    /// The VMBus transaction id (its low byte goes into `ictransaction_id`).
    pub transaction_id: u64,
}

/// A request: pipe header, IC header (TRANSACTION | REQUEST, status 0) and `body`. Our bodies
/// are all far below the 64 KiB `icmsgsize` limit.
pub fn build_request(h: &RequestHeader, body: &[u8]) -> Vec<u8> {
    debug_assert!(body.len() <= usize::from(u16::MAX));
    let body = &body[..body.len().min(usize::from(u16::MAX))];
    let ic = IcMsgHeader {
        icverframe: h.framework.wire(),
        icmsgtype: U16::new(h.msg_type),
        icvermsg: h.message.wire(),
        icmsgsize: U16::new(body.len() as u16),
        status: U32::new(HV_S_OK),
        ictransaction_id: h.transaction_id as u8,
        icflags: ICFLAG_TRANSACTION | ICFLAG_REQUEST,
        reserved: [0; 2],
    };
    let pipe = PipeHeader {
        flags: U32::new(PIPE_FLAG_DATA),
        msgsize: U32::new((size_of::<IcMsgHeader>() + body.len()) as u32),
    };
    let mut out = Vec::with_capacity(IC_HEADER_SIZE + body.len());
    out.extend_from_slice(pipe.as_bytes());
    out.extend_from_slice(ic.as_bytes());
    out.extend_from_slice(body);
    out
}

/// The NEGOTIATE request: `framework` then `service` versions, newest first. The header
/// carries version 1.0 for both (the negotiate layout is the same in every version; Linux
/// and FreeBSD ignore these fields).
pub fn build_negotiate(framework: &[Version], service: &[Version], transaction_id: u64) -> Vec<u8> {
    let framework = &framework[..framework.len().min(MAX_NEGOTIATE_VERSIONS)];
    let service = &service[..service.len().min(MAX_NEGOTIATE_VERSIONS)];
    let mut body = Vec::with_capacity(8 + 4 * (framework.len() + service.len()));
    body.extend_from_slice(
        NegotiateHeader {
            icframe_vercnt: U16::new(framework.len() as u16),
            icmsg_vercnt: U16::new(service.len() as u16),
            reserved: U32::new(0),
        }
        .as_bytes(),
    );
    for v in framework.iter().chain(service) {
        body.extend_from_slice(v.wire().as_bytes());
    }
    build_request(
        &RequestHeader {
            msg_type: MSGTYPE_NEGOTIATE,
            framework: Version::new(1, 0),
            message: Version::new(1, 0),
            transaction_id,
        },
        &body,
    )
}

fn service_header(msg_type: u16, neg: Negotiated, transaction_id: u64) -> RequestHeader {
    RequestHeader {
        msg_type,
        framework: neg.framework,
        message: neg.message,
        transaction_id,
    }
}

/// A heartbeat request carrying `seq`.
pub fn build_heartbeat(neg: Negotiated, transaction_id: u64, seq: u64) -> Vec<u8> {
    let data = HeartbeatData {
        seq_num: U64::new(seq),
        reserved: [U32::new(0); 8],
    };
    build_request(
        &service_header(MSGTYPE_HEARTBEAT, neg, transaction_id),
        data.as_bytes(),
    )
}

/// A shutdown request. `message` is truncated to 2047 bytes (at a character boundary) and
/// NUL-terminated.
pub fn build_shutdown(
    neg: Negotiated,
    transaction_id: u64,
    flags: u32,
    reason_code: u32,
    timeout_seconds: u32,
    message: &str,
) -> Vec<u8> {
    let mut data = ShutdownData {
        reason_code: U32::new(reason_code),
        timeout_seconds: U32::new(timeout_seconds),
        flags: U32::new(flags),
        display_message: [0; SHUTDOWN_MESSAGE_SIZE],
    };
    let mut end = message.len().min(SHUTDOWN_MESSAGE_SIZE - 1);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    data.display_message[..end].copy_from_slice(&message.as_bytes()[..end]);
    build_request(
        &service_header(MSGTYPE_SHUTDOWN, neg, transaction_id),
        data.as_bytes(),
    )
}

/// One time-sync message's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeSample {
    /// `TIMESYNC_FLAG_*`.
    pub flags: u8,
    /// Host wall time, FILETIME (100 ns since 1601-01-01 UTC).
    pub host_time: u64,
    /// The guest's reference counter (100 ns) read together with `host_time` (sent with
    /// service version 4.0 only).
    pub reference_time: u64,
}

/// A time-sync request: [`TimesyncRefData`] for service version 4.0 and later,
/// [`TimesyncData`] before (Linux picks the layout by the negotiated version).
pub fn build_timesync(neg: Negotiated, transaction_id: u64, sample: &TimeSample) -> Vec<u8> {
    let h = service_header(MSGTYPE_TIMESYNC, neg, transaction_id);
    if neg.message.major >= 4 {
        let d = TimesyncRefData {
            parenttime: U64::new(sample.host_time),
            vmreferencetime: U64::new(sample.reference_time),
            flags: sample.flags,
            leapflags: 0,
            stratum: 0,
            reserved: [0; 3],
        };
        build_request(&h, d.as_bytes())
    } else {
        let d = TimesyncData {
            parenttime: U64::new(sample.host_time),
            childtime: U64::new(0),
            roundtriptime: U64::new(0),
            flags: sample.flags,
        };
        build_request(&h, d.as_bytes())
    }
}

/// A parsed IC packet (header fields and a body bounded by `icmsgsize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcMessage<'a> {
    /// `vmbuspipe_hdr.flags`.
    pub pipe_flags: u32,
    /// `vmbuspipe_hdr.msgsize` (not trusted for anything).
    pub pipe_msgsize: u32,
    /// `icverframe`.
    pub framework: Version,
    /// `icmsgtype`.
    pub msg_type: u16,
    /// `icvermsg`.
    pub message: Version,
    /// `status`.
    pub status: u32,
    /// `ictransaction_id`.
    pub transaction_id: u8,
    /// `icflags`.
    pub flags: u8,
    /// The `icmsgsize` bytes after the header.
    pub body: &'a [u8],
}

/// Parse an IC packet payload: headers present, `icmsgsize` within the packet. Bytes past
/// the body (the ring's 8-byte padding, or a guest answering with a longer buffer) are
/// ignored.
pub fn parse_message(bytes: &[u8]) -> Result<IcMessage<'_>, ProtocolError> {
    let pipe: PipeHeader = read_prefix(bytes, "IC packet")?;
    let ic: IcMsgHeader =
        read_prefix(bytes.get(8..).unwrap_or(&[]), "IC packet").map_err(|_| {
            ProtocolError::TooShort {
                what: "IC packet",
                need: IC_HEADER_SIZE,
                got: bytes.len(),
            }
        })?;
    let rest = bytes.get(IC_HEADER_SIZE..).unwrap_or(&[]);
    let declared = usize::from(ic.icmsgsize.get());
    let body = rest.get(..declared).ok_or(ProtocolError::BodyOverrun {
        declared,
        available: rest.len(),
    })?;
    Ok(IcMessage {
        pipe_flags: pipe.flags.get(),
        pipe_msgsize: pipe.msgsize.get(),
        framework: ic.icverframe.get(),
        msg_type: ic.icmsgtype.get(),
        message: ic.icvermsg.get(),
        status: ic.status.get(),
        transaction_id: ic.ictransaction_id,
        flags: ic.icflags,
        body,
    })
}

impl IcMessage<'_> {
    /// Check that this is a response to a message of type `msg_type`.
    pub fn check_response(&self, msg_type: u16) -> Result<(), ProtocolError> {
        if self.flags & ICFLAG_RESPONSE == 0 {
            return Err(ProtocolError::NotAResponse { flags: self.flags });
        }
        if self.msg_type != msg_type {
            return Err(ProtocolError::WrongType {
                expected: msg_type,
                got: self.msg_type,
            });
        }
        Ok(())
    }

    /// Check that the header carries the negotiated versions (Linux echoes ours).
    pub fn check_versions(&self, neg: Negotiated) -> Result<(), ProtocolError> {
        if self.framework != neg.framework || self.message != neg.message {
            return Err(ProtocolError::WrongVersion {
                framework: neg.framework,
                message: neg.message,
                got_framework: self.framework,
                got_message: self.message,
            });
        }
        Ok(())
    }
}

/// Parse the body of a NEGOTIATE answer: exactly one framework and one service version,
/// each among those offered. Both counts 0 is the guest's refusal.
pub fn parse_negotiate_response(
    body: &[u8],
    framework: &[Version],
    service: &[Version],
) -> Result<Negotiated, ProtocolError> {
    let h: NegotiateHeader = read_prefix(body, "negotiate answer")?;
    let (nf, ns) = (h.icframe_vercnt.get(), h.icmsg_vercnt.get());
    if nf == 0 && ns == 0 {
        return Err(ProtocolError::NegotiationRefused);
    }
    if nf != 1 || ns != 1 {
        return Err(ProtocolError::NegotiationCounts {
            framework: nf,
            service: ns,
        });
    }
    let versions = body.get(8..).unwrap_or(&[]);
    let f: WireVersion = read_prefix(versions, "negotiate answer versions")?;
    let s: WireVersion = read_prefix(versions.get(4..).unwrap_or(&[]), "negotiate answer")
        .map_err(|_| ProtocolError::TooShort {
            what: "negotiate answer versions",
            need: 8,
            got: versions.len(),
        })?;
    let (f, s) = (f.get(), s.get());
    if !framework.contains(&f) {
        return Err(ProtocolError::UnknownVersion {
            kind: "framework",
            version: f,
        });
    }
    if !service.contains(&s) {
        return Err(ProtocolError::UnknownVersion {
            kind: "service",
            version: s,
        });
    }
    Ok(Negotiated {
        framework: f,
        message: s,
    })
}

/// The sequence number in a heartbeat answer's body (only `seq_num` is required: Linux
/// checks no more of a request either).
pub fn parse_heartbeat_body(body: &[u8]) -> Result<u64, ProtocolError> {
    let seq: U64 = read_prefix(body, "heartbeat answer")?;
    Ok(seq.get())
}

/// `t` as FILETIME; times before 1601 give 0, times past year 60056 saturate.
pub fn system_time_to_filetime(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => {
            let ticks = d.as_nanos() / 100;
            u64::try_from(ticks)
                .ok()
                .and_then(|t| t.checked_add(FILETIME_UNIX_EPOCH))
                .unwrap_or(u64::MAX)
        }
        Err(e) => {
            let before = e.duration().as_nanos() / 100;
            u64::try_from(before)
                .ok()
                .and_then(|b| FILETIME_UNIX_EPOCH.checked_sub(b))
                .unwrap_or(0)
        }
    }
}

/// FILETIME as a `SystemTime`.
pub fn filetime_to_system_time(ft: u64) -> SystemTime {
    let nanos = |ticks: u64| Duration::from_nanos(ticks.saturating_mul(100));
    if ft >= FILETIME_UNIX_EPOCH {
        UNIX_EPOCH + nanos(ft - FILETIME_UNIX_EPOCH)
    } else {
        UNIX_EPOCH - nanos(FILETIME_UNIX_EPOCH - ft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: Negotiated = Negotiated {
        framework: Version::new(3, 0),
        message: Version::new(3, 0),
    };

    #[test]
    fn layout_sizes_match_linux() {
        assert_eq!(
            size_of::<PipeHeader>() + size_of::<IcMsgHeader>(),
            IC_HEADER_SIZE
        );
        assert_eq!(size_of::<NegotiateHeader>(), 8);
        assert_eq!(size_of::<HeartbeatData>(), 40);
        assert_eq!(size_of::<ShutdownData>(), 12 + 2048);
        assert_eq!(size_of::<TimesyncData>(), 25);
        assert_eq!(size_of::<TimesyncRefData>(), 22);
    }

    #[test]
    fn request_header_fields() {
        let p = build_heartbeat(NEG, 0x1_23, 77);
        assert_eq!(p.len(), IC_HEADER_SIZE + 40);
        let m = parse_message(&p).unwrap();
        assert_eq!(m.pipe_flags, PIPE_FLAG_DATA);
        assert_eq!(m.pipe_msgsize as usize, p.len() - 8);
        assert_eq!(m.msg_type, MSGTYPE_HEARTBEAT);
        assert_eq!(m.flags, ICFLAG_TRANSACTION | ICFLAG_REQUEST);
        assert_eq!(m.transaction_id, 0x23);
        assert_eq!(m.body.len(), 40);
        assert_eq!(parse_heartbeat_body(m.body).unwrap(), 77);
        // A request is not a response.
        assert_eq!(
            m.check_response(MSGTYPE_HEARTBEAT),
            Err(ProtocolError::NotAResponse { flags: 3 })
        );
    }

    #[test]
    fn negotiate_request_layout() {
        let p = build_negotiate(FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS, 9);
        // Linux requires ICMSG_NEGOTIATE_PKT_SIZE(fw, srv) <= the packet.
        assert_eq!(p.len(), IC_HEADER_SIZE + 8 + 4 * (2 + 4));
        let m = parse_message(&p).unwrap();
        assert_eq!(m.msg_type, MSGTYPE_NEGOTIATE);
        assert_eq!(&m.body[..4], &[2, 0, 4, 0]);
        assert_eq!(&m.body[8..12], &[3, 0, 0, 0]);
        assert_eq!(&m.body[16..20], &[3, 0, 2, 0]);
    }

    fn negotiate_answer(nf: u16, ns: u16, versions: &[(u16, u16)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&nf.to_le_bytes());
        b.extend_from_slice(&ns.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        for &(ma, mi) in versions {
            b.extend_from_slice(&ma.to_le_bytes());
            b.extend_from_slice(&mi.to_le_bytes());
        }
        b
    }

    #[test]
    fn negotiate_answers() {
        let ok = negotiate_answer(1, 1, &[(3, 0), (3, 1)]);
        assert_eq!(
            parse_negotiate_response(&ok, FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
            Ok(Negotiated {
                framework: Version::new(3, 0),
                message: Version::new(3, 1)
            })
        );
        let refused = negotiate_answer(0, 0, &[(3, 0), (3, 1)]);
        assert_eq!(
            parse_negotiate_response(&refused, FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
            Err(ProtocolError::NegotiationRefused)
        );
        let unknown = negotiate_answer(1, 1, &[(3, 0), (9, 9)]);
        assert!(matches!(
            parse_negotiate_response(&unknown, FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
            Err(ProtocolError::UnknownVersion {
                kind: "service",
                ..
            })
        ));
        let bad_fw = negotiate_answer(1, 1, &[(2, 0), (3, 0)]);
        assert!(matches!(
            parse_negotiate_response(&bad_fw, FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
            Err(ProtocolError::UnknownVersion {
                kind: "framework",
                ..
            })
        ));
        let two = negotiate_answer(2, 1, &[(3, 0), (1, 0), (3, 0)]);
        assert!(matches!(
            parse_negotiate_response(&two, FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
            Err(ProtocolError::NegotiationCounts { .. })
        ));
        let short = negotiate_answer(1, 1, &[(3, 0)]);
        assert!(matches!(
            parse_negotiate_response(&short, FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS),
            Err(ProtocolError::TooShort { .. })
        ));
        assert!(parse_negotiate_response(&[1, 0], FRAMEWORK_VERSIONS, SHUTDOWN_VERSIONS).is_err());
    }

    #[test]
    fn hostile_frames_are_errors() {
        assert!(matches!(
            parse_message(&[0; 27]),
            Err(ProtocolError::TooShort { need: 28, .. })
        ));
        let mut p = build_heartbeat(NEG, 1, 1);
        p[8 + 10..8 + 12].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            parse_message(&p),
            Err(ProtocolError::BodyOverrun {
                declared: 65535,
                available: 40
            })
        );
        // Extra bytes after the body are ignored.
        let mut p = build_heartbeat(NEG, 1, 1);
        p.extend_from_slice(&[0xff; 4]);
        assert_eq!(parse_message(&p).unwrap().body.len(), 40);
        assert!(parse_heartbeat_body(&[1, 2, 3]).is_err());
    }

    #[test]
    fn response_checks() {
        let mut p = build_heartbeat(NEG, 1, 1);
        p[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
        let m = parse_message(&p).unwrap();
        assert_eq!(m.check_response(MSGTYPE_HEARTBEAT), Ok(()));
        assert_eq!(
            m.check_response(MSGTYPE_SHUTDOWN),
            Err(ProtocolError::WrongType {
                expected: 3,
                got: 1
            })
        );
        assert_eq!(m.check_versions(NEG), Ok(()));
        let other = Negotiated {
            framework: Version::new(1, 0),
            ..NEG
        };
        assert!(m.check_versions(other).is_err());
    }

    #[test]
    fn timesync_layout_follows_version() {
        let s = TimeSample {
            flags: TIMESYNC_FLAG_SYNC,
            host_time: 0x0102_0304_0506_0708,
            reference_time: 0x1111,
        };
        let v4 = Negotiated {
            framework: Version::new(3, 0),
            message: Version::new(4, 0),
        };
        let p = build_timesync(v4, 5, &s);
        let m = parse_message(&p).unwrap();
        assert_eq!(m.body.len(), 22);
        let d = TimesyncRefData::read_from_bytes(m.body).unwrap();
        assert_eq!(d.parenttime.get(), s.host_time);
        assert_eq!(d.vmreferencetime.get(), 0x1111);
        assert_eq!(d.flags, TIMESYNC_FLAG_SYNC);
        let v3 = Negotiated {
            framework: Version::new(3, 0),
            message: Version::new(3, 0),
        };
        let m2 = build_timesync(v3, 5, &s);
        let d = TimesyncData::read_from_bytes(parse_message(&m2).unwrap().body).unwrap();
        assert_eq!(d.parenttime.get(), s.host_time);
        assert_eq!(d.flags, TIMESYNC_FLAG_SYNC);
    }

    #[test]
    fn shutdown_message_truncated_at_char_boundary() {
        let long = "é".repeat(2000); // 4000 bytes
        let p = build_shutdown(NEG, 1, SHUTDOWN_FLAG_REBOOT, 5, 30, &long);
        let d = ShutdownData::read_from_bytes(parse_message(&p).unwrap().body).unwrap();
        assert_eq!(d.flags.get(), SHUTDOWN_FLAG_REBOOT);
        let text = &d.display_message;
        let end = text.iter().position(|&b| b == 0).unwrap();
        assert_eq!(end, 2046);
        assert!(std::str::from_utf8(&text[..end]).is_ok());
    }

    #[test]
    fn filetime_conversions() {
        assert_eq!(system_time_to_filetime(UNIX_EPOCH), FILETIME_UNIX_EPOCH);
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_nanos(1234);
        let ft = system_time_to_filetime(t);
        assert_eq!(ft, FILETIME_UNIX_EPOCH + 17_000_000_000_000_000 + 12);
        assert_eq!(
            filetime_to_system_time(ft),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_nanos(1200)
        );
        // 1601 and before.
        assert_eq!(
            system_time_to_filetime(UNIX_EPOCH - Duration::from_secs(400 * 366 * 86400)),
            0
        );
        assert_eq!(
            filetime_to_system_time(0),
            UNIX_EPOCH - Duration::from_nanos(FILETIME_UNIX_EPOCH * 100)
        );
    }
}
