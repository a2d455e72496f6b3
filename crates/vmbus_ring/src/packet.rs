//! The VMBus packet format: parsing (from a private copy of the bytes) and encoding.

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{DESCRIPTOR_SIZE, MAX_PACKET_LEN, PAGE_SIZE};

/// In-band data: the payload is the message.
pub const PACKET_TYPE_DATA_INBAND: u16 = 6;
/// Data described by ranges of a transfer page set (netvsc's receive buffer).
pub const PACKET_TYPE_DATA_USING_TRANSFER_PAGES: u16 = 7;
/// Data described by guest page frame numbers (storvsc's I/O buffers).
pub const PACKET_TYPE_DATA_USING_GPA_DIRECT: u16 = 9;
/// Completion of an earlier packet (echoes its transaction id).
pub const PACKET_TYPE_COMPLETION: u16 = 11;
/// Descriptor flag: the sender wants a completion packet for this one.
pub const FLAG_COMPLETION_REQUESTED: u16 = 1;

/// The 16 bytes at the start of every packet (`struct vmpacket_descriptor`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct PacketDescriptor {
    /// Packet type (`PACKET_TYPE_*`).
    pub packet_type: U16,
    /// Offset of the payload from the start of the packet, in 8-byte units.
    pub data_offset8: U16,
    /// Length of the packet (descriptor + headers + padded payload), in 8-byte units.
    pub length8: U16,
    /// `FLAG_*`.
    pub flags: U16,
    /// Transaction id, echoed in completions.
    pub transaction_id: U64,
}

/// One range of a transfer-page packet: bytes `[byte_offset, byte_offset + byte_count)` of the
/// transfer page set.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct TransferPageRange {
    /// Length in bytes.
    pub byte_count: U32,
    /// Offset in bytes into the transfer page set.
    pub byte_offset: U32,
}

/// Header after the descriptor of a transfer-page packet.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct TransferPageHeader {
    pageset_id: U16,
    sender_owns_set: u8,
    reserved: u8,
    range_count: U32,
}

/// Header after the descriptor of a GPA-direct packet.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct GpaDirectHeader {
    reserved: U32,
    range_count: U32,
}

/// Header of one GPA range (followed by its page frame numbers).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct GpaRangeHeader {
    byte_count: U32,
    byte_offset: U32,
}

/// Why bytes are not a well-formed packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketError {
    /// Fewer bytes than a descriptor.
    TooShort,
    /// `length8` does not match the number of bytes, or is below the descriptor size.
    BadLength,
    /// `data_offset8` is below the descriptor (plus type header) or beyond the packet.
    BadOffset,
    /// A range table does not fit in the space before the payload, or a range's offset is
    /// not inside its first page.
    BadRanges,
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PacketError::TooShort => "packet shorter than its descriptor",
            PacketError::BadLength => "packet length field inconsistent",
            PacketError::BadOffset => "packet data offset field inconsistent",
            PacketError::BadRanges => "packet range table malformed",
        })
    }
}

/// Number of pages spanned by `byte_count` bytes starting `byte_offset` bytes into a page.
fn pages_spanned(byte_offset: u32, byte_count: u32) -> u64 {
    (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(PAGE_SIZE as u64)
}

/// A parsed, validated packet over a byte slice (normally a private copy made by
/// [`crate::RingReader::try_read`]).
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    descriptor: PacketDescriptor,
    kind: PacketKind<'a>,
    payload: &'a [u8],
}

/// What kind of packet, with its type-specific header.
#[derive(Clone, Copy, Debug)]
pub enum PacketKind<'a> {
    /// Type 6.
    InBand,
    /// Type 11.
    Completion,
    /// Type 9, with its (validated) ranges.
    GpaDirect(GpaRanges<'a>),
    /// Type 7, with its (validated) ranges.
    TransferPages(TransferPages<'a>),
    /// Any other type; `header` is whatever lies between the descriptor and the payload.
    Other {
        /// The packet type.
        packet_type: u16,
        /// Bytes between the descriptor and the payload.
        header: &'a [u8],
    },
}

/// The ranges of a GPA-direct packet (already validated: iteration cannot fail).
#[derive(Clone, Copy, Debug)]
pub struct GpaRanges<'a> {
    count: u32,
    bytes: &'a [u8],
}

/// One GPA range: `byte_count` bytes starting `byte_offset` bytes into the first page of
/// `pfns` (the pages are virtually contiguous).
#[derive(Clone, Copy, Debug)]
pub struct GpaRange<'a> {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset into the first page (< 4096).
    pub byte_offset: u32,
    pfns: &'a [U64],
}

impl<'a> GpaRange<'a> {
    /// Number of page frame numbers.
    pub fn pfn_count(&self) -> usize {
        self.pfns.len()
    }
    /// The `i`th page frame number.
    pub fn pfn(&self, i: usize) -> Option<u64> {
        self.pfns.get(i).map(|p| p.get())
    }
    /// The page frame numbers.
    pub fn pfns(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.pfns.iter().map(|p| p.get())
    }
}

impl<'a> GpaRanges<'a> {
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.count as usize
    }
    /// True if there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The ranges, in order.
    pub fn iter(&self) -> GpaRangeIter<'a> {
        GpaRangeIter {
            remaining: self.count,
            bytes: self.bytes,
        }
    }

    /// Validate `count` ranges at the start of `bytes`; returns the ranges and the bytes used.
    fn parse(count: u32, bytes: &'a [u8]) -> Result<(Self, usize), PacketError> {
        // Each range takes at least 8 bytes: bounds the loop by the packet's own size.
        if u64::from(count) * 8 > bytes.len() as u64 {
            return Err(PacketError::BadRanges);
        }
        let mut rest = bytes;
        for _ in 0..count {
            let (_, r) = split_range(rest).ok_or(PacketError::BadRanges)?;
            rest = r;
        }
        let used = bytes.len() - rest.len();
        Ok((
            Self {
                count,
                bytes: &bytes[..used],
            },
            used,
        ))
    }
}

impl<'a> IntoIterator for &GpaRanges<'a> {
    type Item = GpaRange<'a>;
    type IntoIter = GpaRangeIter<'a>;
    fn into_iter(self) -> GpaRangeIter<'a> {
        self.iter()
    }
}

/// Split one GPA range off the front of `bytes`.
fn split_range(bytes: &[u8]) -> Option<(GpaRange<'_>, &[u8])> {
    let (hdr, rest) = GpaRangeHeader::read_from_prefix(bytes).ok()?;
    let byte_count = hdr.byte_count.get();
    let byte_offset = hdr.byte_offset.get();
    if byte_offset as usize >= PAGE_SIZE {
        return None;
    }
    let n = pages_spanned(byte_offset, byte_count);
    if n > (rest.len() / 8) as u64 {
        return None;
    }
    let (pfns, rest) = <[U64]>::ref_from_prefix_with_elems(rest, n as usize).ok()?;
    Some((
        GpaRange {
            byte_count,
            byte_offset,
            pfns,
        },
        rest,
    ))
}

/// Iterator over validated GPA ranges.
#[derive(Clone, Debug)]
pub struct GpaRangeIter<'a> {
    remaining: u32,
    bytes: &'a [u8],
}

impl<'a> Iterator for GpaRangeIter<'a> {
    type Item = GpaRange<'a>;
    fn next(&mut self) -> Option<GpaRange<'a>> {
        if self.remaining == 0 {
            return None;
        }
        // Validated at parse time; a failure here would only end the iteration early.
        let (r, rest) = split_range(self.bytes)?;
        self.bytes = rest;
        self.remaining -= 1;
        Some(r)
    }
}

/// The header of a transfer-page packet.
#[derive(Clone, Copy, Debug)]
pub struct TransferPages<'a> {
    /// Which transfer page set (netvsc uses 0xCAFE for its receive buffer).
    pub pageset_id: u16,
    /// Whether the sender owns the set.
    pub sender_owns_set: bool,
    /// The ranges.
    pub ranges: &'a [TransferPageRange],
}

impl<'a> Packet<'a> {
    /// The descriptor as read.
    pub fn descriptor(&self) -> PacketDescriptor {
        self.descriptor
    }
    /// The packet type.
    pub fn packet_type(&self) -> u16 {
        self.descriptor.packet_type.get()
    }
    /// The transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.descriptor.transaction_id.get()
    }
    /// The descriptor flags.
    pub fn flags(&self) -> u16 {
        self.descriptor.flags.get()
    }
    /// Whether the sender asked for a completion.
    pub fn completion_requested(&self) -> bool {
        self.flags() & FLAG_COMPLETION_REQUESTED != 0
    }
    /// The kind, with its type-specific header.
    pub fn kind(&self) -> PacketKind<'a> {
        self.kind
    }
    /// The payload (padded to 8 bytes by the sender; protocols carry their own lengths).
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// Parse and validate a packet occupying exactly `bytes` (no trailer).
///
/// Never panics: every length, offset and count is checked against `bytes.len()`.
pub fn parse_packet(bytes: &[u8]) -> Result<Packet<'_>, PacketError> {
    let (descriptor, _) =
        PacketDescriptor::read_from_prefix(bytes).map_err(|_| PacketError::TooShort)?;
    let len = u32::from(descriptor.length8.get()) * 8;
    let offset = u32::from(descriptor.data_offset8.get()) * 8;
    if len < DESCRIPTOR_SIZE || len as usize != bytes.len() {
        return Err(PacketError::BadLength);
    }
    if offset < DESCRIPTOR_SIZE || offset > len {
        return Err(PacketError::BadOffset);
    }
    let header = &bytes[DESCRIPTOR_SIZE as usize..offset as usize];
    let payload = &bytes[offset as usize..];
    let kind = match descriptor.packet_type.get() {
        PACKET_TYPE_DATA_INBAND => PacketKind::InBand,
        PACKET_TYPE_COMPLETION => PacketKind::Completion,
        PACKET_TYPE_DATA_USING_GPA_DIRECT => {
            let (h, rest) =
                GpaDirectHeader::read_from_prefix(header).map_err(|_| PacketError::BadOffset)?;
            let (ranges, _) = GpaRanges::parse(h.range_count.get(), rest)?;
            PacketKind::GpaDirect(ranges)
        }
        PACKET_TYPE_DATA_USING_TRANSFER_PAGES => {
            let (h, rest) =
                TransferPageHeader::read_from_prefix(header).map_err(|_| PacketError::BadOffset)?;
            let count = h.range_count.get();
            if u64::from(count) * 8 > rest.len() as u64 {
                return Err(PacketError::BadRanges);
            }
            let (ranges, _) =
                <[TransferPageRange]>::ref_from_prefix_with_elems(rest, count as usize)
                    .map_err(|_| PacketError::BadRanges)?;
            PacketKind::TransferPages(TransferPages {
                pageset_id: h.pageset_id.get(),
                sender_owns_set: h.sender_owns_set != 0,
                ranges,
            })
        }
        other => PacketKind::Other {
            packet_type: other,
            header,
        },
    };
    Ok(Packet {
        descriptor,
        kind,
        payload,
    })
}

/// A GPA range to send: `byte_count` bytes starting `byte_offset` bytes into the first of
/// `pfns`.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingGpaRange<'a> {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset into the first page (< 4096).
    pub byte_offset: u32,
    /// Exactly the pages spanned.
    pub pfns: &'a [u64],
}

/// The kind of a packet to send.
#[derive(Clone, Copy, Debug)]
pub enum OutgoingKind<'a> {
    /// Type 6.
    InBand,
    /// Type 11.
    Completion,
    /// Type 9 with ranges.
    GpaDirect(&'a [OutgoingGpaRange<'a>]),
    /// Type 7 with ranges of a transfer page set.
    TransferPages {
        /// Transfer page set id.
        pageset_id: u16,
        /// Whether the sender owns the set.
        sender_owns_set: bool,
        /// The ranges.
        ranges: &'a [TransferPageRange],
    },
}

/// A packet to send.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingPacket<'a> {
    /// Kind and type-specific header.
    pub kind: OutgoingKind<'a>,
    /// `FLAG_*`.
    pub flags: u16,
    /// Transaction id.
    pub transaction_id: u64,
    /// Payload (padded with zeros to 8 bytes when written).
    pub payload: &'a [u8],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band packet, optionally asking for a completion.
    pub fn in_band(transaction_id: u64, payload: &'a [u8], completion_requested: bool) -> Self {
        Self {
            kind: OutgoingKind::InBand,
            flags: if completion_requested {
                FLAG_COMPLETION_REQUESTED
            } else {
                0
            },
            transaction_id,
            payload,
        }
    }

    /// A completion for the packet with `transaction_id`.
    pub fn completion(transaction_id: u64, payload: &'a [u8]) -> Self {
        Self {
            kind: OutgoingKind::Completion,
            flags: 0,
            transaction_id,
            payload,
        }
    }

    fn packet_type(&self) -> u16 {
        match self.kind {
            OutgoingKind::InBand => PACKET_TYPE_DATA_INBAND,
            OutgoingKind::Completion => PACKET_TYPE_COMPLETION,
            OutgoingKind::GpaDirect(_) => PACKET_TYPE_DATA_USING_GPA_DIRECT,
            OutgoingKind::TransferPages { .. } => PACKET_TYPE_DATA_USING_TRANSFER_PAGES,
        }
    }

    /// Length of descriptor + type header; `None` if a range is inconsistent.
    fn header_len(&self) -> Option<u64> {
        Some(match self.kind {
            OutgoingKind::InBand | OutgoingKind::Completion => u64::from(DESCRIPTOR_SIZE),
            OutgoingKind::GpaDirect(ranges) => {
                let mut n = u64::from(DESCRIPTOR_SIZE) + 8;
                for r in ranges {
                    if r.byte_offset as usize >= PAGE_SIZE
                        || pages_spanned(r.byte_offset, r.byte_count) != r.pfns.len() as u64
                    {
                        return None;
                    }
                    n += 8 + 8 * r.pfns.len() as u64;
                }
                n
            }
            OutgoingKind::TransferPages { ranges, .. } => {
                u64::from(DESCRIPTOR_SIZE) + 8 + 8 * ranges.len() as u64
            }
        })
    }

    /// Emit the packet (without trailer) as a sequence of byte slices.
    pub(crate) fn encode(&self, len: u32, mut emit: impl FnMut(&[u8])) {
        let header_len = self.header_len().unwrap_or(0) as u32;
        let desc = PacketDescriptor {
            packet_type: U16::new(self.packet_type()),
            data_offset8: U16::new((header_len / 8) as u16),
            length8: U16::new((len / 8) as u16),
            flags: U16::new(self.flags),
            transaction_id: U64::new(self.transaction_id),
        };
        emit(desc.as_bytes());
        match self.kind {
            OutgoingKind::InBand | OutgoingKind::Completion => {}
            OutgoingKind::GpaDirect(ranges) => {
                let h = GpaDirectHeader {
                    reserved: U32::new(0),
                    range_count: U32::new(ranges.len() as u32),
                };
                emit(h.as_bytes());
                for r in ranges {
                    let rh = GpaRangeHeader {
                        byte_count: U32::new(r.byte_count),
                        byte_offset: U32::new(r.byte_offset),
                    };
                    emit(rh.as_bytes());
                    for pfn in r.pfns {
                        emit(&pfn.to_le_bytes());
                    }
                }
            }
            OutgoingKind::TransferPages {
                pageset_id,
                sender_owns_set,
                ranges,
            } => {
                let h = TransferPageHeader {
                    pageset_id: U16::new(pageset_id),
                    sender_owns_set: u8::from(sender_owns_set),
                    reserved: 0,
                    range_count: U32::new(ranges.len() as u32),
                };
                emit(h.as_bytes());
                emit(ranges.as_bytes());
            }
        }
        emit(self.payload);
        let used = header_len as usize + self.payload.len();
        let pad = len as usize - used;
        emit(&[0u8; 8][..pad]);
    }
}

/// Encoded length of `packet` (descriptor + headers + padded payload, without the trailer),
/// or `None` if it is malformed (a GPA range whose page count does not match its length and
/// offset) or longer than [`MAX_PACKET_LEN`].
pub fn encoded_len(packet: &OutgoingPacket<'_>) -> Option<u32> {
    let total = packet.header_len()? + packet.payload.len() as u64;
    let total = total.div_ceil(8) * 8;
    if total > u64::from(MAX_PACKET_LEN) {
        return None;
    }
    Some(total as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_to(p: &OutgoingPacket<'_>, buf: &mut [u8]) -> usize {
        let len = encoded_len(p).unwrap();
        let mut at = 0;
        p.encode(len, |b| {
            buf[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        });
        assert_eq!(at, len as usize);
        at
    }

    #[test]
    fn in_band_round_trip_pads_payload() {
        let mut buf = [0xffu8; 64];
        let p = OutgoingPacket::in_band(0x1234, b"hello", true);
        let n = encode_to(&p, &mut buf);
        assert_eq!(n, 24);
        let pkt = parse_packet(&buf[..n]).unwrap();
        assert!(matches!(pkt.kind(), PacketKind::InBand));
        assert_eq!(pkt.transaction_id(), 0x1234);
        assert!(pkt.completion_requested());
        assert_eq!(pkt.payload(), b"hello\0\0\0");
    }

    #[test]
    fn gpa_direct_round_trip() {
        let pfns_a = [10u64, 11, 12];
        let pfns_b = [99u64];
        let ranges = [
            OutgoingGpaRange {
                byte_count: 8192,
                byte_offset: 100,
                pfns: &pfns_a,
            },
            OutgoingGpaRange {
                byte_count: 512,
                byte_offset: 0,
                pfns: &pfns_b,
            },
        ];
        let p = OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            flags: FLAG_COMPLETION_REQUESTED,
            transaction_id: 7,
            payload: &[1, 2, 3],
        };
        let mut buf = [0u8; 256];
        let n = encode_to(&p, &mut buf);
        let pkt = parse_packet(&buf[..n]).unwrap();
        let PacketKind::GpaDirect(r) = pkt.kind() else {
            panic!("wrong kind")
        };
        assert_eq!(r.len(), 2);
        let v: [(u32, u32, usize); 2] = {
            let mut it = r.iter();
            let a = it.next().unwrap();
            let b = it.next().unwrap();
            assert!(it.next().is_none());
            assert!(a.pfns().eq(pfns_a.iter().copied()));
            assert_eq!(b.pfn(0), Some(99));
            [
                (a.byte_count, a.byte_offset, a.pfn_count()),
                (b.byte_count, b.byte_offset, b.pfn_count()),
            ]
        };
        assert_eq!(v, [(8192, 100, 3), (512, 0, 1)]);
        assert_eq!(&pkt.payload()[..3], &[1, 2, 3]);
    }

    #[test]
    fn mismatched_gpa_range_is_refused_for_encoding() {
        let pfns = [1u64];
        let ranges = [OutgoingGpaRange {
            byte_count: 4097,
            byte_offset: 0,
            pfns: &pfns,
        }];
        let p = OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            flags: 0,
            transaction_id: 0,
            payload: &[],
        };
        assert_eq!(encoded_len(&p), None);
    }

    #[test]
    fn transfer_pages_round_trip() {
        let ranges = [
            TransferPageRange {
                byte_count: U32::new(100),
                byte_offset: U32::new(0),
            },
            TransferPageRange {
                byte_count: U32::new(200),
                byte_offset: U32::new(4096),
            },
        ];
        let p = OutgoingPacket {
            kind: OutgoingKind::TransferPages {
                pageset_id: 0xcafe,
                sender_owns_set: false,
                ranges: &ranges,
            },
            flags: 0,
            transaction_id: 3,
            payload: &[9; 10],
        };
        let mut buf = [0u8; 128];
        let n = encode_to(&p, &mut buf);
        let pkt = parse_packet(&buf[..n]).unwrap();
        let PacketKind::TransferPages(t) = pkt.kind() else {
            panic!("wrong kind")
        };
        assert_eq!(t.pageset_id, 0xcafe);
        assert_eq!(t.ranges, &ranges);
        assert_eq!(pkt.payload().len(), 16);
    }

    #[test]
    fn hostile_descriptors_are_rejected() {
        let mk = |ty: u16, off8: u16, len8: u16| {
            let mut b = [0u8; 64];
            b[0..2].copy_from_slice(&ty.to_le_bytes());
            b[2..4].copy_from_slice(&off8.to_le_bytes());
            b[4..6].copy_from_slice(&len8.to_le_bytes());
            b
        };
        assert_eq!(parse_packet(&[0u8; 8]).unwrap_err(), PacketError::TooShort);
        let b = mk(6, 2, 9);
        assert_eq!(parse_packet(&b[..64]).unwrap_err(), PacketError::BadLength);
        let b = mk(6, 1, 8);
        assert_eq!(parse_packet(&b).unwrap_err(), PacketError::BadOffset);
        let b = mk(6, 9, 8);
        assert_eq!(parse_packet(&b).unwrap_err(), PacketError::BadOffset);
        // GPA direct with a huge range count.
        let mut b = mk(9, 8, 8);
        b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_packet(&b).unwrap_err(), PacketError::BadRanges);
        // GPA direct whose one range claims more pages than fit.
        let mut b = mk(9, 8, 8);
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
        assert_eq!(parse_packet(&b).unwrap_err(), PacketError::BadRanges);
        // Range offset outside the first page.
        let mut b = mk(9, 8, 8);
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..28].copy_from_slice(&1u32.to_le_bytes());
        b[28..32].copy_from_slice(&5000u32.to_le_bytes());
        assert_eq!(parse_packet(&b).unwrap_err(), PacketError::BadRanges);
        // Transfer pages with too many ranges.
        let mut b = mk(7, 4, 8);
        b[20..24].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(parse_packet(&b).unwrap_err(), PacketError::BadRanges);
        // Unknown types are reported, not rejected.
        let b = mk(42, 3, 8);
        let p = parse_packet(&b).unwrap();
        assert!(matches!(
            p.kind(),
            PacketKind::Other {
                packet_type: 42,
                header
            } if header.len() == 8
        ));
    }
}
