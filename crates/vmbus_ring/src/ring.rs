//! The two ends of a ring: [`RingWriter`] and [`RingReader`].

use core::fmt;
use core::sync::atomic::{fence, Ordering};

use zerocopy::FromBytes;

use crate::header::{
    FEATURE_BITS, FEATURE_PENDING_SEND_SIZE, INTERRUPT_MASK, PENDING_SEND_SIZE, READ_INDEX,
    WRITE_INDEX,
};
use crate::packet::{encoded_len, parse_packet, OutgoingPacket, Packet, PacketDescriptor};
use crate::{RingMem, DESCRIPTOR_SIZE, MAX_DATA_LEN, MIN_DATA_LEN, TRAILER_SIZE};

/// The ring cannot be used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The data area size is not a multiple of 8 or outside [`MIN_DATA_LEN`]..=[`MAX_DATA_LEN`].
    BadSize(u32),
    /// The index we own holds a value that is not a valid offset (>= size or unaligned).
    BadIndex(u32),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadSize(n) => write!(f, "ring data area of {n} bytes is not usable"),
            RingError::BadIndex(i) => write!(f, "ring index {i:#x} is not a valid offset"),
        }
    }
}

/// What the peer broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptReason {
    /// The peer's index is >= the data size or not 8-aligned.
    PeerIndex(u32),
    /// Bytes are available but fewer than a descriptor and trailer.
    Truncated(u32),
    /// The descriptor's length or offset fields are inconsistent, or the packet is longer than
    /// the bytes available.
    Descriptor,
    /// The descriptor changed while we copied the packet.
    Changed,
    /// The type-specific header is malformed.
    Packet(crate::PacketError),
}

/// Why [`RingReader::try_read`] returned no packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Nothing to read.
    Empty,
    /// The next packet does not fit the caller's buffer (it stays in the ring).
    BufferTooSmall {
        /// Bytes needed.
        needed: u32,
    },
    /// The peer corrupted the ring; nothing was consumed. Reading it again gives the same
    /// answer until the peer repairs it: treat the channel as broken.
    Corrupt(CorruptReason),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Empty => f.write_str("ring empty"),
            ReadError::BufferTooSmall { needed } => {
                write!(f, "packet of {needed} bytes does not fit the buffer")
            }
            ReadError::Corrupt(r) => write!(f, "ring corrupted by the peer: {r:?}"),
        }
    }
}

/// Why [`RingWriter::try_write`] did not write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteError {
    /// Not enough room now; `needed` is the packet size including its trailer. Set
    /// `pending_send_sz` to it ([`RingWriter::set_pending_send_size`]) to be signalled when
    /// room appears.
    Full {
        /// Bytes needed (packet + trailer).
        needed: u32,
    },
    /// The packet can never fit this ring, or is malformed (range page counts).
    Invalid,
    /// The peer's read index is not a valid offset.
    Corrupt(CorruptReason),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Full { needed } => write!(f, "ring full ({needed} bytes needed)"),
            WriteError::Invalid => f.write_str("packet malformed or larger than the ring"),
            WriteError::Corrupt(r) => write!(f, "ring corrupted by the peer: {r:?}"),
        }
    }
}

/// Result of a successful write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct WriteOutcome {
    /// The reader must be interrupted: the ring went from empty to non-empty and the reader's
    /// `interrupt_mask` was clear.
    pub signal: bool,
}

/// Result of a successful read. Ignoring `signal` can leave the writer blocked forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOutcome {
    /// The writer must be interrupted: it set `pending_send_sz` and this read made the free
    /// space cross it.
    pub signal: bool,
}

fn check_size(len: u32) -> Result<u32, RingError> {
    if len % 8 != 0 || !(MIN_DATA_LEN..=MAX_DATA_LEN).contains(&len) {
        return Err(RingError::BadSize(len));
    }
    Ok(len)
}

fn valid_index(index: u32, len: u32) -> bool {
    index < len && index % 8 == 0
}

/// Bytes between `from` and `to` going forward around a ring of `len` bytes.
fn distance(from: u32, to: u32, len: u32) -> u32 {
    if to >= from {
        to - from
    } else {
        len - from + to
    }
}

/// Copy out of the data area starting at `offset`, wrapping at the end.
fn read_wrapped<M: RingMem>(mem: &M, len: u32, offset: u32, buf: &mut [u8]) {
    let first = ((len - offset) as usize).min(buf.len());
    let (a, b) = buf.split_at_mut(first);
    mem.read_data(offset, a);
    if !b.is_empty() {
        mem.read_data(0, b);
    }
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct RingWriter<M> {
    mem: M,
    len: u32,
    write_index: u32,
}

impl<M: RingMem> RingWriter<M> {
    /// Take the writing end of the ring in `mem`, continuing at its current `write_index`,
    /// and announce (feature bit 0) that we use `pending_send_sz`.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let len = check_size(mem.data_len())?;
        let write_index = mem.load_header(WRITE_INDEX);
        if !valid_index(write_index, len) {
            return Err(RingError::BadIndex(write_index));
        }
        let features = mem.load_header(FEATURE_BITS);
        if features & FEATURE_PENDING_SEND_SIZE == 0 {
            mem.store_header(FEATURE_BITS, features | FEATURE_PENDING_SEND_SIZE);
        }
        Ok(Self {
            mem,
            len,
            write_index,
        })
    }

    /// The memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Size of the data area.
    pub fn data_len(&self) -> u32 {
        self.len
    }

    fn peer_read_index(&self) -> Result<u32, CorruptReason> {
        let r = self.mem.load_header(READ_INDEX);
        if valid_index(r, self.len) {
            Ok(r)
        } else {
            Err(CorruptReason::PeerIndex(r))
        }
    }

    /// Bytes free now (a packet of `n` bytes including trailer fits if `n < free`).
    pub fn free_bytes(&self) -> Result<u32, WriteError> {
        let r = self.peer_read_index().map_err(WriteError::Corrupt)?;
        Ok(self.len - distance(r, self.write_index, self.len))
    }

    /// Whether nothing we wrote is left unread.
    pub fn is_empty(&self) -> Result<bool, WriteError> {
        let r = self.peer_read_index().map_err(WriteError::Corrupt)?;
        Ok(r == self.write_index)
    }

    /// Bytes (packet + trailer) that `packet` takes in the ring, if it can ever fit.
    pub fn packet_size(&self, packet: &OutgoingPacket<'_>) -> Option<u32> {
        let n = encoded_len(packet)? + TRAILER_SIZE;
        (n < self.len).then_some(n)
    }

    /// Write `packet` if it fits now.
    pub fn try_write(&mut self, packet: &OutgoingPacket<'_>) -> Result<WriteOutcome, WriteError> {
        let len = encoded_len(packet).ok_or(WriteError::Invalid)?;
        let total = len + TRAILER_SIZE;
        if total >= self.len {
            return Err(WriteError::Invalid);
        }
        let r = self.peer_read_index().map_err(WriteError::Corrupt)?;
        let free = self.len - distance(r, self.write_index, self.len);
        // Never fill the ring completely: full would look empty.
        if free <= total {
            return Err(WriteError::Full { needed: total });
        }
        let start = self.write_index;
        let mut at = start;
        let (mem, ring_len) = (&self.mem, self.len);
        let mut put = |bytes: &[u8]| {
            let first = ((ring_len - at) as usize).min(bytes.len());
            mem.write_data(at, &bytes[..first]);
            if first < bytes.len() {
                mem.write_data(0, &bytes[first..]);
            }
            at = ((u64::from(at) + bytes.len() as u64) % u64::from(ring_len)) as u32;
        };
        packet.encode(len, &mut put);
        put(&(u64::from(start) << 32).to_le_bytes());
        let new_index = at;
        // Data before index: the release store orders the copies above before it.
        fence(Ordering::Release);
        self.mem.store_header(WRITE_INDEX, new_index);
        self.write_index = new_index;
        // The signalling decision must see the reader's state after our index is visible.
        fence(Ordering::SeqCst);
        let signal = if self.mem.load_header(INTERRUPT_MASK) != 0 {
            false
        } else {
            // The reader had consumed everything before our packet: it was empty.
            self.mem.load_header(READ_INDEX) == start
        };
        Ok(WriteOutcome { signal })
    }

    /// Ask the reader to signal us once more than `size` bytes are free (0 cancels).
    ///
    /// After setting it, check [`RingWriter::free_bytes`] again before sleeping: the reader
    /// may have made room in between.
    pub fn set_pending_send_size(&mut self, size: u32) {
        self.mem.store_header(PENDING_SEND_SIZE, size);
        fence(Ordering::SeqCst);
    }

    /// Whether the reader currently asks not to be interrupted.
    pub fn reader_interrupt_masked(&self) -> bool {
        self.mem.load_header(INTERRUPT_MASK) != 0
    }
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct RingReader<M> {
    mem: M,
    len: u32,
    read_index: u32,
}

/// A validated descriptor of the next packet, from [`RingReader::peek`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeekedPacket {
    /// The descriptor as read (lengths validated against the bytes available).
    pub descriptor: PacketDescriptor,
    /// Packet length without trailer: the buffer size [`RingReader::try_read`] needs.
    pub len: u32,
}

impl<M: RingMem> RingReader<M> {
    /// Take the reading end of the ring in `mem`, continuing at its current `read_index`.
    pub fn new(mem: M) -> Result<Self, RingError> {
        let len = check_size(mem.data_len())?;
        let read_index = mem.load_header(READ_INDEX);
        if !valid_index(read_index, len) {
            return Err(RingError::BadIndex(read_index));
        }
        Ok(Self {
            mem,
            len,
            read_index,
        })
    }

    /// The memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Size of the data area.
    pub fn data_len(&self) -> u32 {
        self.len
    }

    fn peer_write_index(&self) -> Result<u32, CorruptReason> {
        let w = self.mem.load_header(WRITE_INDEX);
        if valid_index(w, self.len) {
            Ok(w)
        } else {
            Err(CorruptReason::PeerIndex(w))
        }
    }

    /// Bytes written and not yet read.
    pub fn available(&self) -> Result<u32, ReadError> {
        let w = self.peer_write_index().map_err(ReadError::Corrupt)?;
        Ok(distance(self.read_index, w, self.len))
    }

    /// Whether the writer announced (feature bit 0) that it sets `pending_send_sz` when
    /// blocked and signals us when room appears in the ring we write.
    pub fn writer_uses_pending_send_size(&self) -> bool {
        self.mem.load_header(FEATURE_BITS) & FEATURE_PENDING_SEND_SIZE != 0
    }

    /// Ask the writer not to interrupt us (`true`) while we drain the ring, or to interrupt
    /// us again (`false`). After clearing it, check for data again before sleeping.
    pub fn set_interrupt_mask(&mut self, masked: bool) {
        self.mem.store_header(INTERRUPT_MASK, u32::from(masked));
        fence(Ordering::SeqCst);
    }

    /// Validate the next packet's descriptor without consuming it.
    pub fn peek(&self) -> Result<PeekedPacket, ReadError> {
        let avail = self.available()?;
        if avail == 0 {
            return Err(ReadError::Empty);
        }
        if avail < DESCRIPTOR_SIZE + TRAILER_SIZE {
            return Err(ReadError::Corrupt(CorruptReason::Truncated(avail)));
        }
        let mut raw = [0u8; DESCRIPTOR_SIZE as usize];
        read_wrapped(&self.mem, self.len, self.read_index, &mut raw);
        let descriptor = PacketDescriptor::read_from_bytes(&raw[..])
            .map_err(|_| ReadError::Corrupt(CorruptReason::Descriptor))?;
        let len = u32::from(descriptor.length8.get()) * 8;
        let offset = u32::from(descriptor.data_offset8.get()) * 8;
        if len < DESCRIPTOR_SIZE
            || offset < DESCRIPTOR_SIZE
            || offset > len
            || len + TRAILER_SIZE > avail
        {
            return Err(ReadError::Corrupt(CorruptReason::Descriptor));
        }
        Ok(PeekedPacket { descriptor, len })
    }

    /// Read the next packet into `buf` and consume it.
    ///
    /// The packet is copied to `buf` first and parsed from there, so the peer cannot change
    /// it under the caller. On any error nothing is consumed.
    pub fn try_read<'b>(
        &mut self,
        buf: &'b mut [u8],
    ) -> Result<(Packet<'b>, ReadOutcome), ReadError> {
        let peeked = self.peek()?;
        let len = peeked.len;
        if buf.len() < len as usize {
            return Err(ReadError::BufferTooSmall { needed: len });
        }
        let buf = &mut buf[..len as usize];
        read_wrapped(&self.mem, self.len, self.read_index, buf);
        let buf: &'b [u8] = buf;
        if buf[..DESCRIPTOR_SIZE as usize] != *zerocopy::IntoBytes::as_bytes(&peeked.descriptor) {
            return Err(ReadError::Corrupt(CorruptReason::Changed));
        }
        // Validate (from our private copy) before consuming.
        let packet = parse_packet(buf).map_err(|e| ReadError::Corrupt(CorruptReason::Packet(e)))?;
        let outcome = self.advance(len + TRAILER_SIZE);
        Ok((packet, outcome))
    }

    /// Consume the next packet without copying it (e.g. one too large to handle).
    pub fn skip(&mut self) -> Result<ReadOutcome, ReadError> {
        let peeked = self.peek()?;
        Ok(self.advance(peeked.len + TRAILER_SIZE))
    }

    /// Publish a read of `n` bytes and compute whether the writer must be signalled.
    fn advance(&mut self, n: u32) -> ReadOutcome {
        let old = self.read_index;
        let new = ((u64::from(old) + u64::from(n)) % u64::from(self.len)) as u32;
        // Our copies of the data must complete before the writer may reuse the space.
        fence(Ordering::Release);
        self.mem.store_header(READ_INDEX, new);
        self.read_index = new;
        fence(Ordering::SeqCst);
        let pending = self.mem.load_header(PENDING_SEND_SIZE);
        if pending == 0 {
            return ReadOutcome { signal: false };
        }
        let Ok(w) = self.peer_write_index() else {
            return ReadOutcome { signal: false };
        };
        let free_after = self.len - distance(new, w, self.len);
        let free_before = free_after.saturating_sub(n);
        ReadOutcome {
            signal: free_before <= pending && free_after > pending,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::packet::{OutgoingGpaRange, OutgoingKind, PacketKind};
    use crate::{RawRingMem, RING_HEADER_SIZE};

    /// A ring in a heap buffer.
    struct TestRing {
        buf: Vec<u64>,
        data_len: u32,
    }

    impl TestRing {
        fn new(data_len: u32) -> Self {
            Self {
                buf: vec![0u64; (RING_HEADER_SIZE + data_len as usize) / 8],
                data_len,
            }
        }
        fn mem(&mut self) -> RawRingMem {
            let p = self.buf.as_mut_ptr().cast::<u8>();
            // SAFETY: the buffer holds the header page then `data_len` bytes and outlives
            // every use within a test.
            unsafe { RawRingMem::new(p, p.add(RING_HEADER_SIZE), self.data_len).unwrap() }
        }
    }

    fn write<M: RingMem>(w: &mut RingWriter<M>, id: u64, payload: &[u8]) -> WriteOutcome {
        w.try_write(&OutgoingPacket::in_band(id, payload, false))
            .unwrap()
    }

    #[test]
    fn bad_sizes_and_indices_are_refused() {
        let mut r = TestRing::new(4096);
        let m = r.mem();
        m.store_header(WRITE_INDEX, 12);
        assert_eq!(RingWriter::new(&m).unwrap_err(), RingError::BadIndex(12));
        m.store_header(READ_INDEX, 4096);
        assert_eq!(RingReader::new(&m).unwrap_err(), RingError::BadIndex(4096));
        let mut r = TestRing::new(32);
        assert_eq!(
            RingWriter::new(r.mem()).unwrap_err(),
            RingError::BadSize(32)
        );
    }

    #[test]
    fn round_trip_and_wrap_around() {
        let mut ring = TestRing::new(256);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        let mut buf = [0u8; 256];
        // Varying sizes so that packets straddle the end of the data area many times.
        let mut wrapped = 0;
        for i in 0..500u64 {
            let n = (i as usize * 7) % 90;
            let payload: Vec<u8> = (0..n).map(|k| (k as u64 + i) as u8).collect();
            let before = w.write_index;
            let _ = write(&mut w, i, &payload);
            if w.write_index < before {
                wrapped += 1;
            }
            let (p, _) = r.try_read(&mut buf).unwrap();
            assert_eq!(p.transaction_id(), i);
            assert_eq!(&p.payload()[..n], &payload[..]);
            assert!(p.payload()[n..].iter().all(|&b| b == 0));
            assert_eq!(r.try_read(&mut buf).unwrap_err(), ReadError::Empty);
        }
        assert!(wrapped > 10, "the test must exercise wrap-around");
    }

    #[test]
    fn trailer_holds_start_index() {
        let mut ring = TestRing::new(256);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let _ = write(&mut w, 1, &[1; 8]);
        let _ = write(&mut w, 2, &[2; 8]);
        // Second packet starts at 32 (24 + 8 trailer); its trailer is at 32 + 24.
        let mut t = [0u8; 8];
        m.read_data(56, &mut t);
        assert_eq!(u64::from_le_bytes(t), 32u64 << 32);
    }

    #[test]
    fn writer_never_fills_the_ring() {
        let mut ring = TestRing::new(256);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        // Each packet: 16 + 8 payload + 8 trailer = 32 bytes; 256/32 = 8 would fill it exactly.
        for i in 0..7 {
            let _ = write(&mut w, i, &[0; 8]);
        }
        assert_eq!(w.free_bytes().unwrap(), 32);
        assert_eq!(
            w.try_write(&OutgoingPacket::in_band(9, &[0; 8], false)),
            Err(WriteError::Full { needed: 32 })
        );
        // A smaller packet (24 bytes) still fits, leaving 8 free.
        let _ = write(&mut w, 8, &[]);
        assert_eq!(w.free_bytes().unwrap(), 8);
        let mut buf = [0u8; 64];
        for i in [0, 1, 2, 3, 4, 5, 6, 8] {
            assert_eq!(r.try_read(&mut buf).unwrap().0.transaction_id(), i);
        }
        assert_eq!(r.try_read(&mut buf).unwrap_err(), ReadError::Empty);
        // A packet that can never fit is refused as invalid, not full.
        assert_eq!(
            w.try_write(&OutgoingPacket::in_band(0, &[0; 240], false)),
            Err(WriteError::Invalid)
        );
    }

    #[test]
    fn signal_on_empty_to_non_empty_unless_masked() {
        let mut ring = TestRing::new(1024);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        let mut buf = [0u8; 64];
        assert!(write(&mut w, 1, b"a").signal);
        assert!(!write(&mut w, 2, b"b").signal, "ring was not empty");
        r.try_read(&mut buf).unwrap();
        assert!(!write(&mut w, 3, b"c").signal, "still not empty");
        r.try_read(&mut buf).unwrap();
        r.try_read(&mut buf).unwrap();
        r.set_interrupt_mask(true);
        assert!(!write(&mut w, 4, b"d").signal, "reader masked interrupts");
        r.try_read(&mut buf).unwrap();
        r.set_interrupt_mask(false);
        assert!(write(&mut w, 5, b"e").signal);
    }

    #[test]
    fn pending_send_size_signals_once_on_crossing() {
        let mut ring = TestRing::new(256);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        let mut buf = [0u8; 256];
        for i in 0..7 {
            let _ = write(&mut w, i, &[0; 8]);
        }
        // Wants 64 bytes (+ trailer): free is 32 now.
        let big = [7u8; 48];
        let Err(WriteError::Full { needed }) =
            w.try_write(&OutgoingPacket::in_band(99, &big, false))
        else {
            panic!("expected full")
        };
        assert_eq!(needed, 72);
        w.set_pending_send_size(needed);
        // Free goes 32 -> 64 (not > 72) -> 96 (crossing) -> 128 (already past).
        assert!(!r.try_read(&mut buf).unwrap().1.signal);
        assert!(r.try_read(&mut buf).unwrap().1.signal);
        assert!(!r.try_read(&mut buf).unwrap().1.signal);
        w.set_pending_send_size(0);
        assert!(!r.try_read(&mut buf).unwrap().1.signal);
        let _ = w
            .try_write(&OutgoingPacket::in_band(99, &big, false))
            .unwrap();
    }

    #[test]
    fn corrupt_peer_indices_and_descriptors() {
        let mut ring = TestRing::new(256);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        let mut buf = [0u8; 256];
        m.store_header(WRITE_INDEX, 13);
        assert_eq!(
            r.try_read(&mut buf).unwrap_err(),
            ReadError::Corrupt(CorruptReason::PeerIndex(13))
        );
        m.store_header(WRITE_INDEX, 256);
        assert!(matches!(r.try_read(&mut buf), Err(ReadError::Corrupt(_))));
        // Peer read index garbage: the writer refuses to write.
        m.store_header(READ_INDEX, 7);
        assert!(matches!(
            w.try_write(&OutgoingPacket::in_band(0, &[], false)),
            Err(WriteError::Corrupt(_))
        ));
        m.store_header(READ_INDEX, 0);
        // Only 8 bytes available: truncated.
        m.store_header(WRITE_INDEX, 8);
        assert_eq!(
            r.try_read(&mut buf).unwrap_err(),
            ReadError::Corrupt(CorruptReason::Truncated(8))
        );
        // A descriptor claiming more than is available.
        m.write_data(0, &[6, 0, 2, 0, 30, 0, 0, 0]);
        m.store_header(WRITE_INDEX, 64);
        assert_eq!(
            r.try_read(&mut buf).unwrap_err(),
            ReadError::Corrupt(CorruptReason::Descriptor)
        );
        // Nothing was consumed by any of the failures.
        assert_eq!(m.load_header(READ_INDEX), 0);
        // A valid packet is readable once the peer writes one.
        m.write_data(0, &[6, 0, 2, 0, 2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        m.store_header(WRITE_INDEX, 24);
        assert_eq!(r.try_read(&mut buf).unwrap().0.transaction_id(), 5);
    }

    #[test]
    fn buffer_too_small_leaves_packet_and_skip_consumes() {
        let mut ring = TestRing::new(1024);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        let _ = write(&mut w, 1, &[1; 100]);
        let _ = write(&mut w, 2, &[2; 4]);
        let mut small = [0u8; 32];
        assert_eq!(
            r.try_read(&mut small).unwrap_err(),
            ReadError::BufferTooSmall { needed: 120 }
        );
        let _ = r.skip().unwrap();
        assert_eq!(r.try_read(&mut small).unwrap().0.transaction_id(), 2);
    }

    #[test]
    fn gpa_direct_through_the_ring() {
        let mut ring = TestRing::new(512);
        let m = ring.mem();
        let mut w = RingWriter::new(&m).unwrap();
        let mut r = RingReader::new(&m).unwrap();
        let pfns = [0x1000u64, 0x2000];
        let ranges = [OutgoingGpaRange {
            byte_count: 4096,
            byte_offset: 16,
            pfns: &pfns,
        }];
        // Push the indices near the end so this packet wraps.
        for i in 0..7 {
            let _ = write(&mut w, i, &[0; 48]);
            let mut b = [0u8; 128];
            r.try_read(&mut b).unwrap();
        }
        let _ = w
            .try_write(&OutgoingPacket {
                kind: OutgoingKind::GpaDirect(&ranges),
                flags: 1,
                transaction_id: 77,
                payload: b"scsi",
            })
            .unwrap();
        assert!(w.write_index < 504, "the packet must straddle the end");
        let mut b = [0u8; 128];
        let (p, _) = r.try_read(&mut b).unwrap();
        let PacketKind::GpaDirect(rs) = p.kind() else {
            panic!()
        };
        let g = rs.iter().next().unwrap();
        assert_eq!((g.byte_count, g.byte_offset), (4096, 16));
        assert!(g.pfns().eq(pfns.iter().copied()));
        assert_eq!(&p.payload()[..4], b"scsi");
    }

    /// A tiny deterministic generator (no external crates in a no_std crate's tests).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    #[test]
    fn garbage_rings_never_panic_or_loop() {
        let mut rng = Lcg(42);
        for _ in 0..2000 {
            let len = 64 + 8 * (rng.next() % 64) as u32;
            let mut ring = TestRing::new(len);
            let m = ring.mem();
            let mut junk = vec![0u8; len as usize];
            for b in junk.iter_mut() {
                // Mostly small numbers so that some descriptors look plausible.
                *b = if rng.next() % 3 == 0 {
                    rng.next() as u8
                } else {
                    (rng.next() % 4) as u8
                };
            }
            m.write_data(0, &junk);
            m.store_header(WRITE_INDEX, (rng.next() as u32 % len) & !7);
            m.store_header(READ_INDEX, (rng.next() as u32 % len) & !7);
            m.store_header(PENDING_SEND_SIZE, rng.next() as u32);
            let mut r = RingReader::new(&m).unwrap();
            let mut buf = vec![0u8; len as usize];
            let mut reads = 0;
            loop {
                match r.try_read(&mut buf) {
                    Ok(_) => reads += 1,
                    Err(ReadError::Empty | ReadError::Corrupt(_)) => break,
                    Err(ReadError::BufferTooSmall { .. }) => unreachable!(),
                }
                // Each packet consumes >= 24 bytes of the bytes available at the start.
                assert!(reads <= len / 24);
            }
        }
    }
}
