//! The vstor wire format: the packets the Linux `hv_storvsc` driver and the host exchange on
//! a synthetic SCSI controller's VMBus channel. Pure data: constants and `zerocopy` structs,
//! no I/O, no state.
//!
//! Facts from Linux's `drivers/scsi/storvsc_drv.c` (read for facts, not copied):
//!
//! - Every packet is a `vstor_packet`: `{u32 operation, u32 flags, u32 status, union[0x34]}`,
//!   64 bytes, packed, little-endian. Linux 6.1 always sends all 64 bytes and drops any
//!   completion (a packet with a non-zero transaction id) shorter than that.
//! - The union holds a `vmscsi_request` (EXECUTE_SRB), the channel properties
//!   (QUERY_PROPERTIES), a protocol version (QUERY_PROTOCOL_VERSION), a sub-channel count
//!   (CREATE_SUB_CHANNELS) or Fibre Channel names (FCHBA_DATA).
//! - `vmscsi_request` is 0x24 bytes up to Windows 7 and 0x34 from Windows 8 (protocol 5.1)
//!   on: the "win8 extension" (queue tag/action, SRB flags, timeout) was appended. Older
//!   kernels computed the difference as `vmscsi_size_delta`; Linux 6.1 tries only 6.2
//!   (Win10), 6.0 (Win8.1) and 5.1 (Win8), all with the long form, so that is all we accept.
//! - Versions are `major << 8 | minor`.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Storage controller device class (`ba6163d9-04a1-4d29-b605-72e2ffb1dc7f`).
pub const SCSI_CLASS_ID: vmbus_server::Guid =
    vmbus_server::Guid::from_str_const("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");

/// `operation` values.
pub mod op {
    /// Host → guest: the answer to any request.
    pub const COMPLETE_IO: u32 = 1;
    /// Host → guest (unsolicited): a device went away; the guest rescans.
    pub const REMOVE_DEVICE: u32 = 2;
    /// Guest → host: a SCSI request block.
    pub const EXECUTE_SRB: u32 = 3;
    /// Guest → host: reset one LUN.
    pub const RESET_LUN: u32 = 4;
    /// Guest → host: reset the adapter.
    pub const RESET_ADAPTER: u32 = 5;
    /// Guest → host: reset the bus (Linux's host reset handler).
    pub const RESET_BUS: u32 = 6;
    /// Guest → host: first step of initialization.
    pub const BEGIN_INITIALIZATION: u32 = 7;
    /// Guest → host: last step of initialization.
    pub const END_INITIALIZATION: u32 = 8;
    /// Guest → host: propose a protocol version.
    pub const QUERY_PROTOCOL_VERSION: u32 = 9;
    /// Guest → host: ask for the channel properties.
    pub const QUERY_PROPERTIES: u32 = 10;
    /// Host → guest (unsolicited): LUNs changed; the guest rescans.
    pub const ENUMERATE_BUS: u32 = 11;
    /// Fibre Channel HBA data (FC controllers only; we are not one).
    pub const FCHBA_DATA: u32 = 12;
    /// Guest → host: open this many sub-channels.
    pub const CREATE_SUB_CHANNELS: u32 = 13;
}

/// `flags`: the sender wants a completion.
pub const REQUEST_COMPLETION_FLAG: u32 = 1;

/// Protocol versions we accept, newest first (Linux 6.1 tries exactly these, in this order).
pub const VERSION_WIN10: u16 = 0x0602;
/// Windows 8.1.
pub const VERSION_WIN8_1: u16 = 0x0600;
/// Windows 8 (the first with the long `vmscsi_request`).
pub const VERSION_WIN8: u16 = 0x0501;
/// All accepted versions.
pub const SUPPORTED_VERSIONS: [u16; 3] = [VERSION_WIN10, VERSION_WIN8_1, VERSION_WIN8];

/// `status` values (NTSTATUS; Linux only tests for zero).
pub mod status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Unknown or malformed request.
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    /// The proposed protocol version is not one we speak.
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    /// Not supported (Fibre Channel data; sub-channels on a controller configured without).
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
    /// Request out of sequence (an SRB before initialization).
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
}

/// `srb_status` values (low 6 bits) and flags (high 2 bits).
pub mod srb_status {
    /// The command completed with GOOD status.
    pub const SUCCESS: u8 = 0x01;
    /// The command was aborted.
    pub const ABORTED: u8 = 0x02;
    /// The command failed; see `scsi_status` and the sense data.
    pub const ERROR: u8 = 0x04;
    /// The request itself was malformed.
    pub const INVALID_REQUEST: u8 = 0x06;
    /// No such LUN: Linux removes the device (after an ENUMERATE_BUS rescan).
    pub const INVALID_LUN: u8 = 0x20;
    /// Flag: `sense_data` holds valid sense data.
    pub const AUTOSENSE_VALID: u8 = 0x80;
}

/// SCSI status: CHECK CONDITION.
pub const SCSI_STATUS_CHECK_CONDITION: u8 = 0x02;

/// `data_in` values.
pub mod data_in {
    /// Data flows guest → host.
    pub const WRITE: u8 = 0;
    /// Data flows host → guest.
    pub const READ: u8 = 1;
    /// No data.
    pub const UNKNOWN: u8 = 2;
}

/// Channel property flag: sub-channels are available (CREATE_SUB_CHANNELS).
pub const STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL: u32 = 1;

/// Longest CDB a request can carry.
pub const MAX_CDB_LEN: usize = 16;
/// Size of the CDB / sense union.
pub const SENSE_BUFFER_SIZE: usize = 0x14;
/// Size of the operation/flags/status header.
pub const HEADER_SIZE: usize = 12;
/// Size of the union after the header.
pub const BODY_SIZE: usize = 0x34;
/// Size of a whole `vstor_packet` (what Linux sends, and what it requires of completions).
pub const PACKET_SIZE: usize = HEADER_SIZE + BODY_SIZE;
/// Size of the pre-Windows 8 `vmscsi_request` (without the win8 extension).
pub const SRB_SIZE_PRE_WIN8: usize = 0x24;

/// The whole packet, with the union as bytes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct VstorPacket {
    /// One of [`op`].
    pub operation: U32,
    /// [`REQUEST_COMPLETION_FLAG`] or 0.
    pub flags: U32,
    /// One of [`status`] (host → guest).
    pub status: U32,
    /// The union.
    pub body: [u8; BODY_SIZE],
}

impl VstorPacket {
    /// A packet with this operation and status, union zeroed.
    pub fn new(operation: u32, status: u32) -> Self {
        Self {
            operation: U32::new(operation),
            flags: U32::new(0),
            status: U32::new(status),
            body: [0; BODY_SIZE],
        }
    }

    /// Read a packet from a payload that may be shorter than [`PACKET_SIZE`] (missing bytes
    /// read as zero) or longer (extra bytes ignored). `None` if it lacks even the header.
    pub fn read_padded(payload: &[u8]) -> Option<Self> {
        if payload.len() < HEADER_SIZE {
            return None;
        }
        let mut b = [0u8; PACKET_SIZE];
        let n = payload.len().min(PACKET_SIZE);
        b[..n].copy_from_slice(&payload[..n]);
        Self::read_from_bytes(&b).ok()
    }
}

/// `vmscsi_request` (long form, Windows 8 and later).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct VmScsiRequest {
    /// Size of this structure as the guest sees it.
    pub length: U16,
    /// Result: [`srb_status`].
    pub srb_status: u8,
    /// Result: SCSI status byte.
    pub scsi_status: u8,
    /// The guest's SCSI host number (ignored).
    pub port_number: u8,
    /// SCSI channel (Linux's `sdev->channel`).
    pub path_id: u8,
    /// SCSI target id.
    pub target_id: u8,
    /// LUN.
    pub lun: u8,
    /// Bytes of `cdb` in use.
    pub cdb_length: u8,
    /// Request: room for sense data; result: bytes of sense data returned.
    pub sense_info_length: u8,
    /// One of [`data_in`].
    pub data_in: u8,
    /// Reserved.
    pub reserved: u8,
    /// Request: bytes in the data buffer; result: bytes transferred.
    pub data_transfer_length: U32,
    /// Request: the CDB; result: sense data.
    pub cdb_or_sense: [u8; SENSE_BUFFER_SIZE],
    /// Win8 extension: reserved.
    pub reserve: U16,
    /// Win8 extension: queue tag.
    pub queue_tag: u8,
    /// Win8 extension: queue action.
    pub queue_action: u8,
    /// Win8 extension: SRB flags.
    pub srb_flags: U32,
    /// Win8 extension: timeout in seconds.
    pub time_out_value: U32,
    /// Win8 extension: queue sort key.
    pub queue_sort_key: U32,
}

/// QUERY_PROPERTIES answer.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct ChannelProperties {
    /// Reserved (older kernels read protocol version, path and target here; zero is right).
    pub reserved: U32,
    /// Sub-channels the host can open (meaningful with the multi-channel flag).
    pub max_channel_cnt: U16,
    /// Reserved.
    pub reserved1: U16,
    /// [`STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL`] or 0.
    pub flags: U32,
    /// Largest transfer per request (Linux rounds it down to pages).
    pub max_transfer_bytes: U32,
    /// Reserved.
    pub reserved2: U64,
}

/// QUERY_PROTOCOL_VERSION payload.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct ProtocolVersion {
    /// `major << 8 | minor`.
    pub major_minor: U16,
    /// Windows build revision (0 from Linux).
    pub revision: U16,
}

const _: () = assert!(std::mem::size_of::<VstorPacket>() == PACKET_SIZE);
const _: () = assert!(std::mem::size_of::<VmScsiRequest>() == BODY_SIZE);
const _: () = assert!(std::mem::size_of::<ChannelProperties>() == 24);

/// Read a `T` from the start of a packet's union.
pub fn body_as<T: FromBytes>(p: &VstorPacket) -> T {
    // Every union member is at most BODY_SIZE bytes (checked by the const asserts for the
    // largest); `read_from_prefix` cannot fail for them.
    T::read_from_prefix(&p.body)
        .map(|(t, _)| t)
        .unwrap_or_else(|_| T::new_zeroed())
}

/// Write `t` at the start of a packet's union.
pub fn set_body<T: IntoBytes + Immutable>(p: &mut VstorPacket, t: &T) {
    let b = t.as_bytes();
    let n = b.len().min(BODY_SIZE);
    p.body[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_linux() {
        // Offsets Linux's packed structs give (operation 0, flags 4, status 8, union 12).
        let mut p = VstorPacket::new(op::EXECUTE_SRB, 0);
        let srb = VmScsiRequest {
            length: U16::new(0x34),
            lun: 7,
            cdb_length: 10,
            data_transfer_length: U32::new(0x1234),
            srb_flags: U32::new(0x40),
            ..Default::default()
        };
        set_body(&mut p, &srb);
        let b = p.as_bytes();
        assert_eq!(b.len(), 64);
        assert_eq!(b[0], 3);
        assert_eq!(&b[12..14], &[0x34, 0]);
        assert_eq!(b[12 + 7], 7);
        assert_eq!(b[12 + 8], 10);
        assert_eq!(&b[12 + 12..12 + 16], &0x1234u32.to_le_bytes());
        assert_eq!(&b[12 + 40..12 + 44], &0x40u32.to_le_bytes());
        let back: VmScsiRequest = body_as(&p);
        assert_eq!(back.lun, 7);
        let props = ChannelProperties {
            max_channel_cnt: U16::new(3),
            flags: U32::new(1),
            max_transfer_bytes: U32::new(0x10_0000),
            ..Default::default()
        };
        let mut p = VstorPacket::new(op::COMPLETE_IO, 0);
        set_body(&mut p, &props);
        let b = p.as_bytes();
        assert_eq!(&b[16..18], &[3, 0]);
        assert_eq!(&b[20..24], &[1, 0, 0, 0]);
        assert_eq!(&b[24..28], &0x10_0000u32.to_le_bytes());
    }

    #[test]
    fn short_and_long_payloads() {
        assert!(VstorPacket::read_padded(&[0; 11]).is_none());
        let p = VstorPacket::read_padded(&[9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 6]).unwrap();
        assert_eq!(p.operation.get(), op::QUERY_PROTOCOL_VERSION);
        let v: ProtocolVersion = body_as(&p);
        assert_eq!(v.major_minor.get(), 0x0602);
        let long = [0xffu8; 200];
        let p = VstorPacket::read_padded(&long).unwrap();
        assert_eq!(p.body, [0xff; BODY_SIZE]);
    }
}
