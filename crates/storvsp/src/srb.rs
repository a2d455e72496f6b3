//! Where storvsp parses what the guest sends: a vstor packet's payload to a [`Request`]
//! ([`parse`]), the initialization handshake ([`Session`]), and the completions that go
//! back ([`complete`], [`reject`]). Pure: no channel, no threads, no disk. Fuzzed
//! (`fuzz/fuzz_targets/srb.rs`).
//!
//! **Never.** Trusts a field: the packet may be short (missing bytes read as zero), the CDB
//! length may exceed the CDB (the request is refused with SRB_STATUS_INVALID_REQUEST), the
//! sense length the guest offers bounds what we return, and every request gets exactly one
//! answer, built here, that Linux accepts (64 bytes, operation COMPLETE_IO).

use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use crate::protocol::{
    body_as, op, set_body, srb_status, status, ChannelProperties, ProtocolVersion, VmScsiRequest,
    VstorPacket, HEADER_SIZE, MAX_CDB_LEN, PACKET_SIZE, SCSI_STATUS_CHECK_CONDITION,
    SENSE_BUFFER_SIZE, SRB_SIZE_PRE_WIN8, STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL,
    SUPPORTED_VERSIONS,
};
use crate::scsi::{Outcome, Sense};

/// What a guest packet asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// EXECUTE_SRB.
    Srb(SrbRequest),
    /// Any other operation (initialization, resets, and the ones we refuse).
    Control(VstorPacket),
}

/// A SCSI request block, validated enough to execute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrbRequest {
    /// The request as received: echoed back in the completion.
    pub srb: VmScsiRequest,
    /// The CDB bytes in use (`cdb_length` of them); `None` when `cdb_length` is 0 or larger
    /// than the 16 bytes a request can carry.
    pub cdb: Option<([u8; MAX_CDB_LEN], usize)>,
}

impl SrbRequest {
    /// The CDB.
    pub fn cdb(&self) -> Option<&[u8]> {
        self.cdb.as_ref().map(|(c, n)| &c[..*n])
    }
    /// `data_transfer_length`: the bytes of the data buffer.
    pub fn data_len(&self) -> usize {
        self.srb.data_transfer_length.get() as usize
    }
    /// Addressed (path, target, lun).
    pub fn address(&self) -> (u8, u8, u8) {
        (self.srb.path_id, self.srb.target_id, self.srb.lun)
    }
}

/// A packet that cannot be answered at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than the operation/flags/status header.
    #[error("vstor packet of {0} bytes is shorter than its header")]
    TooShort(usize),
}

/// Parse a guest packet's payload. EXECUTE_SRB needs at least the pre-Win8 request (0x24
/// bytes after the header); a shorter one is answered as a control packet would be (with
/// INVALID_PARAMETER), so the caller can still complete it.
pub fn parse(payload: &[u8]) -> Result<Request, ParseError> {
    let p = VstorPacket::read_padded(payload).ok_or(ParseError::TooShort(payload.len()))?;
    if p.operation.get() != op::EXECUTE_SRB || payload.len() < HEADER_SIZE + SRB_SIZE_PRE_WIN8 {
        return Ok(Request::Control(p));
    }
    let srb: VmScsiRequest = body_as(&p);
    let n = usize::from(srb.cdb_length);
    let cdb = (1..=MAX_CDB_LEN).contains(&n).then(|| {
        let mut c = [0u8; MAX_CDB_LEN];
        c.copy_from_slice(&srb.cdb_or_sense[..MAX_CDB_LEN]);
        (c, n)
    });
    Ok(Request::Srb(SrbRequest { srb, cdb }))
}

/// Channel properties we report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Properties {
    /// Per-request transfer limit.
    pub max_transfer_bytes: u32,
    /// Sub-channels the guest may ask for (QUERY_PROPERTIES' `max_channel_cnt`, with the
    /// multi-channel flag when not 0).
    pub max_sub_channels: u16,
}

/// The per-channel protocol state: the initialization handshake, and on the primary
/// channel the one CREATE_SUB_CHANNELS it may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    version: Option<u16>,
    ready: bool,
    /// A primary channel (sub-channels cannot create sub-channels).
    primary: bool,
    /// CREATE_SUB_CHANNELS was accepted on this opening (kept across re-initialization:
    /// once per opening).
    sub_channels_created: bool,
    /// Accepted and not yet taken by [`Session::take_sub_channel_request`].
    pending_sub_channels: Option<u16>,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A primary channel that has just been opened.
    pub fn new() -> Self {
        Self {
            version: None,
            ready: false,
            primary: true,
            sub_channels_created: false,
            pending_sub_channels: None,
        }
    }

    /// A sub-channel that has just been opened. Linux sends no initialization on
    /// sub-channels: they carry SRBs at once, under the version the primary negotiated
    /// (`None`: SRBs are refused until the guest initializes this channel itself).
    pub fn sub_channel(version: Option<u16>) -> Self {
        Self {
            version,
            ready: version.is_some(),
            primary: false,
            ..Self::new()
        }
    }

    /// The sub-channel count of a CREATE_SUB_CHANNELS just accepted (once): the caller
    /// asks the VMBus server for them, and answers with an error instead if it cannot.
    pub fn take_sub_channel_request(&mut self) -> Option<u16> {
        self.pending_sub_channels.take()
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// Whether END_INITIALIZATION completed (unsolicited ENUMERATE_BUS may be sent).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Whether SRBs are accepted (a version was negotiated).
    pub fn accepts_srbs(&self) -> bool {
        self.version.is_some()
    }

    /// Answer a control packet.
    pub fn control(&mut self, req: &VstorPacket, props: &Properties) -> VstorPacket {
        let mut reply = *req;
        reply.operation = U32::new(op::COMPLETE_IO);
        reply.flags = U32::new(0);
        let st = match req.operation.get() {
            op::BEGIN_INITIALIZATION => {
                // (Re)start: a guest that reinitializes renegotiates.
                *self = Session {
                    primary: self.primary,
                    sub_channels_created: self.sub_channels_created,
                    ..Session::new()
                };
                status::SUCCESS
            }
            op::QUERY_PROTOCOL_VERSION => {
                let v: ProtocolVersion = body_as(req);
                if SUPPORTED_VERSIONS.contains(&v.major_minor.get()) {
                    self.version = Some(v.major_minor.get());
                    status::SUCCESS
                } else {
                    status::REVISION_MISMATCH
                }
            }
            op::QUERY_PROPERTIES if self.version.is_some() => {
                reply.body = [0; crate::protocol::BODY_SIZE];
                set_body(
                    &mut reply,
                    &ChannelProperties {
                        // Linux asks for min(its CPUs - 1, max_channel_cnt) sub-channels.
                        max_channel_cnt: U16::new(props.max_sub_channels),
                        flags: U32::new(if props.max_sub_channels > 0 {
                            STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL
                        } else {
                            0
                        }),
                        max_transfer_bytes: U32::new(props.max_transfer_bytes),
                        ..Default::default()
                    },
                );
                status::SUCCESS
            }
            op::END_INITIALIZATION if self.version.is_some() => {
                self.ready = true;
                status::SUCCESS
            }
            op::QUERY_PROPERTIES | op::END_INITIALIZATION => status::INVALID_DEVICE_STATE,
            op::CREATE_SUB_CHANNELS => {
                // `sub_channel_count`: the union's first u16.
                let count = u16::from_le_bytes([req.body[0], req.body[1]]);
                if props.max_sub_channels == 0 {
                    status::NOT_SUPPORTED
                } else if !self.primary || !self.ready || self.sub_channels_created {
                    // Only on the primary, after END_INITIALIZATION, once per opening.
                    status::INVALID_DEVICE_STATE
                } else if count == 0 || count > props.max_sub_channels {
                    status::INVALID_PARAMETER
                } else {
                    self.sub_channels_created = true;
                    self.pending_sub_channels = Some(count);
                    status::SUCCESS
                }
            }
            // Every request is answered on its own; a reset has nothing to discard.
            op::RESET_LUN | op::RESET_ADAPTER | op::RESET_BUS => status::SUCCESS,
            // Not a Fibre Channel controller.
            op::FCHBA_DATA => status::NOT_SUPPORTED,
            _ => status::INVALID_PARAMETER,
        };
        reply.status = U32::new(st);
        reply
    }
}

/// The completion of an executed SRB.
pub fn complete(req: &SrbRequest, outcome: &Outcome) -> VstorPacket {
    let mut srb = req.srb;
    srb.cdb_or_sense = [0; SENSE_BUFFER_SIZE];
    match outcome.sense {
        None => {
            srb.srb_status = srb_status::SUCCESS;
            srb.scsi_status = 0;
            srb.sense_info_length = 0;
            srb.data_transfer_length = U32::new(outcome.transferred as u32);
        }
        Some(s) => {
            let room = usize::from(req.srb.sense_info_length).min(SENSE_BUFFER_SIZE);
            let fixed = s.fixed();
            let n = room.min(fixed.len());
            srb.cdb_or_sense[..n].copy_from_slice(&fixed[..n]);
            srb.sense_info_length = n as u8;
            // No LUN: Linux then drops the device (hot removal after ENUMERATE_BUS).
            let base = if s == Sense::LUN_NOT_SUPPORTED {
                srb_status::INVALID_LUN
            } else {
                srb_status::ERROR
            };
            srb.srb_status = base
                | if n > 0 {
                    srb_status::AUTOSENSE_VALID
                } else {
                    0
                };
            srb.scsi_status = SCSI_STATUS_CHECK_CONDITION;
            srb.data_transfer_length = U32::new(0);
        }
    }
    packet_with(srb)
}

/// The completion of an SRB refused before execution: `srb_status` (e.g.
/// [`srb_status::INVALID_REQUEST`]) with CHECK CONDITION and `sense`.
pub fn reject(req: &SrbRequest, srb_status_code: u8, sense: Sense) -> VstorPacket {
    let mut p = complete(req, &Outcome::check(sense));
    let mut srb: VmScsiRequest = body_as(&p);
    let autosense = srb.srb_status & srb_status::AUTOSENSE_VALID;
    srb.srb_status = srb_status_code | autosense;
    set_body(&mut p, &srb);
    p
}

/// A COMPLETE_IO packet (status 0) around `srb`.
fn packet_with(srb: VmScsiRequest) -> VstorPacket {
    let mut p = VstorPacket::new(op::COMPLETE_IO, status::SUCCESS);
    set_body(&mut p, &srb);
    p
}

/// The answer to an EXECUTE_SRB that arrived before the protocol version was negotiated.
pub fn not_ready(req: &SrbRequest) -> VstorPacket {
    let mut p = reject(
        req,
        srb_status::INVALID_REQUEST,
        Sense::INVALID_FIELD_IN_CDB,
    );
    p.status = U32::new(status::INVALID_DEVICE_STATE);
    p
}

/// The unsolicited "rescan the bus" notification (sent with transaction id 0).
pub fn enumerate_bus() -> VstorPacket {
    VstorPacket::new(op::ENUMERATE_BUS, status::SUCCESS)
}

/// Bytes of a packet as sent.
pub fn bytes(p: &VstorPacket) -> &[u8] {
    debug_assert_eq!(p.as_bytes().len(), PACKET_SIZE);
    p.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{REQUEST_COMPLETION_FLAG, VERSION_WIN10, VERSION_WIN8};

    fn ctl(operation: u32, body: &[u8]) -> VstorPacket {
        let mut p = VstorPacket::new(operation, 0);
        p.flags = U32::new(REQUEST_COMPLETION_FLAG);
        p.body[..body.len()].copy_from_slice(body);
        p
    }

    const PROPS: Properties = Properties {
        max_transfer_bytes: 1 << 20,
        max_sub_channels: 4,
    };

    #[test]
    fn linux_initialization_sequence() {
        let mut s = Session::new();
        let r = s.control(&ctl(op::BEGIN_INITIALIZATION, &[]), &PROPS);
        assert_eq!((r.operation.get(), r.status.get()), (op::COMPLETE_IO, 0));
        // Properties before a version: refused.
        let r = s.control(&ctl(op::QUERY_PROPERTIES, &[]), &PROPS);
        assert_ne!(r.status.get(), 0);
        // Linux 6.1 tries 6.2 first; a newer kernel may try 10.0 first and walk down.
        let r = s.control(&ctl(op::QUERY_PROTOCOL_VERSION, &[0, 0x0a]), &PROPS);
        assert_eq!(r.status.get(), status::REVISION_MISMATCH);
        assert!(!s.accepts_srbs());
        let r = s.control(
            &ctl(op::QUERY_PROTOCOL_VERSION, &VERSION_WIN10.to_le_bytes()),
            &PROPS,
        );
        assert_eq!((r.operation.get(), r.status.get()), (op::COMPLETE_IO, 0));
        assert_eq!(s.version(), Some(VERSION_WIN10));
        let r = s.control(&ctl(op::QUERY_PROPERTIES, &[]), &PROPS);
        assert_eq!(r.status.get(), 0);
        let props: ChannelProperties = body_as(&r);
        assert_eq!(props.max_transfer_bytes.get(), 1 << 20);
        assert_eq!(props.flags.get(), STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL);
        assert_eq!(props.max_channel_cnt.get(), 4);
        assert!(!s.ready());
        // CREATE_SUB_CHANNELS before END_INITIALIZATION: refused.
        let r = s.control(&ctl(op::CREATE_SUB_CHANNELS, &[1, 0]), &PROPS);
        assert_eq!(r.status.get(), status::INVALID_DEVICE_STATE);
        assert_eq!(s.take_sub_channel_request(), None);
        let r = s.control(&ctl(op::END_INITIALIZATION, &[]), &PROPS);
        assert_eq!(r.status.get(), 0);
        assert!(s.ready());
        // FC data is refused, unknown operations too.
        for o in [op::FCHBA_DATA, 99, op::COMPLETE_IO] {
            assert_ne!(s.control(&ctl(o, &[1]), &PROPS).status.get(), 0, "op {o}");
        }
        assert_eq!(s.control(&ctl(op::RESET_BUS, &[]), &PROPS).status.get(), 0);
        // Win8 (5.1) is accepted too; re-beginning resets.
        s.control(&ctl(op::BEGIN_INITIALIZATION, &[]), &PROPS);
        assert!(!s.ready() && !s.accepts_srbs());
        let r = s.control(
            &ctl(op::QUERY_PROTOCOL_VERSION, &VERSION_WIN8.to_le_bytes()),
            &PROPS,
        );
        assert_eq!(r.status.get(), 0);
    }

    fn srb_packet(cdb: &[u8], cdb_length: u8, sense_len: u8) -> Vec<u8> {
        let mut srb = VmScsiRequest {
            length: U16::new(0x34),
            lun: 3,
            cdb_length,
            sense_info_length: sense_len,
            data_transfer_length: U32::new(512),
            ..Default::default()
        };
        srb.cdb_or_sense[..cdb.len()].copy_from_slice(cdb);
        let mut p = VstorPacket::new(op::EXECUTE_SRB, 0);
        set_body(&mut p, &srb);
        p.as_bytes().to_vec()
    }

    #[test]
    fn create_sub_channels_once_with_a_valid_count() {
        let init = |s: &mut Session| {
            for (o, body) in [
                (op::BEGIN_INITIALIZATION, vec![]),
                (
                    op::QUERY_PROTOCOL_VERSION,
                    VERSION_WIN10.to_le_bytes().to_vec(),
                ),
                (op::QUERY_PROPERTIES, vec![]),
                (op::END_INITIALIZATION, vec![]),
            ] {
                assert_eq!(s.control(&ctl(o, &body), &PROPS).status.get(), 0);
            }
        };
        let create = |s: &mut Session, n: u16| {
            s.control(&ctl(op::CREATE_SUB_CHANNELS, &n.to_le_bytes()), &PROPS)
                .status
                .get()
        };
        let mut s = Session::new();
        init(&mut s);
        // Count 0 or above the maximum: refused, and a good request still works after.
        assert_eq!(create(&mut s, 0), status::INVALID_PARAMETER);
        assert_eq!(create(&mut s, 5), status::INVALID_PARAMETER);
        assert_eq!(create(&mut s, u16::MAX), status::INVALID_PARAMETER);
        assert_eq!(s.take_sub_channel_request(), None);
        assert_eq!(create(&mut s, 3), 0);
        assert_eq!(s.take_sub_channel_request(), Some(3));
        assert_eq!(s.take_sub_channel_request(), None);
        // Twice: refused, even after re-initializing.
        assert_eq!(create(&mut s, 1), status::INVALID_DEVICE_STATE);
        init(&mut s);
        assert_eq!(create(&mut s, 1), status::INVALID_DEVICE_STATE);
        assert_eq!(s.take_sub_channel_request(), None);
        // A sub-channel accepts SRBs at once, and no CREATE_SUB_CHANNELS.
        let mut sub = Session::sub_channel(Some(VERSION_WIN10));
        assert!(sub.accepts_srbs());
        assert_eq!(create(&mut sub, 1), status::INVALID_DEVICE_STATE);
        assert!(!Session::sub_channel(None).accepts_srbs());
        // A controller without sub-channels says so.
        let mut s = Session::new();
        init(&mut s);
        let none = Properties {
            max_sub_channels: 0,
            ..PROPS
        };
        let r = s.control(&ctl(op::QUERY_PROPERTIES, &[]), &none);
        let p: ChannelProperties = body_as(&r);
        assert_eq!((p.flags.get(), p.max_channel_cnt.get()), (0, 0));
        let r = s.control(&ctl(op::CREATE_SUB_CHANNELS, &[1, 0]), &none);
        assert_eq!(r.status.get(), status::NOT_SUPPORTED);
    }

    #[test]
    fn srb_parse_and_complete() {
        let Request::Srb(r) =
            parse(&srb_packet(&[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], 10, 20)).unwrap()
        else {
            panic!("not an SRB")
        };
        assert_eq!(r.cdb().unwrap(), &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]);
        assert_eq!(r.address(), (0, 0, 3));
        assert_eq!(r.data_len(), 512);
        let ok = complete(&r, &Outcome::good(512));
        let s: VmScsiRequest = body_as(&ok);
        assert_eq!(ok.operation.get(), op::COMPLETE_IO);
        assert_eq!((s.srb_status, s.scsi_status), (srb_status::SUCCESS, 0));
        assert_eq!(s.data_transfer_length.get(), 512);
        assert_eq!(s.lun, 3);
        let bad = complete(&r, &Outcome::check(Sense::LBA_OUT_OF_RANGE));
        let s: VmScsiRequest = body_as(&bad);
        assert_eq!(
            s.srb_status,
            srb_status::ERROR | srb_status::AUTOSENSE_VALID
        );
        assert_eq!(s.scsi_status, SCSI_STATUS_CHECK_CONDITION);
        assert_eq!(s.sense_info_length, 18);
        assert_eq!((s.cdb_or_sense[2], s.cdb_or_sense[12]), (0x05, 0x21));
        assert_eq!(s.data_transfer_length.get(), 0);
        let gone = complete(&r, &Outcome::check(Sense::LUN_NOT_SUPPORTED));
        let s: VmScsiRequest = body_as(&gone);
        assert_eq!(
            s.srb_status,
            srb_status::INVALID_LUN | srb_status::AUTOSENSE_VALID
        );
        assert_eq!(bytes(&gone).len(), 64);
    }

    #[test]
    fn hostile_srbs() {
        // CDB length 0 or beyond 16: no CDB, the caller rejects.
        for n in [0u8, 17, 255] {
            let Request::Srb(r) = parse(&srb_packet(&[0x00], n, 20)).unwrap() else {
                panic!()
            };
            assert!(r.cdb().is_none());
        }
        // No room for sense: error without autosense.
        let Request::Srb(r) = parse(&srb_packet(&[0x00], 6, 0)).unwrap() else {
            panic!()
        };
        let s: VmScsiRequest = body_as(&complete(&r, &Outcome::check(Sense::INVALID_OPCODE)));
        assert_eq!(s.srb_status, srb_status::ERROR);
        assert_eq!(s.sense_info_length, 0);
        // Sense room of 8 bytes: truncated sense, still valid.
        let Request::Srb(r) = parse(&srb_packet(&[0x00], 6, 8)).unwrap() else {
            panic!()
        };
        let s: VmScsiRequest = body_as(&complete(&r, &Outcome::check(Sense::INVALID_OPCODE)));
        assert_eq!(s.sense_info_length, 8);
        // A truncated SRB packet becomes a control packet the session refuses.
        let mut short = srb_packet(&[0], 6, 20);
        short.truncate(HEADER_SIZE + 10);
        let Request::Control(p) = parse(&short).unwrap() else {
            panic!()
        };
        let r = Session::new().control(&p, &PROPS);
        assert_eq!(r.status.get(), status::INVALID_PARAMETER);
        assert_eq!(parse(&[1, 2, 3]), Err(ParseError::TooShort(3)));
        // Rejections keep the requested status.
        let Request::Srb(r) = parse(&srb_packet(&[0x00], 6, 20)).unwrap() else {
            panic!()
        };
        let s: VmScsiRequest = body_as(&reject(
            &r,
            srb_status::INVALID_REQUEST,
            Sense::BAD_DATA_BUFFER,
        ));
        assert_eq!(
            s.srb_status,
            srb_status::INVALID_REQUEST | srb_status::AUTOSENSE_VALID
        );
        assert_eq!(not_ready(&r).status.get(), status::INVALID_DEVICE_STATE);
    }
}
