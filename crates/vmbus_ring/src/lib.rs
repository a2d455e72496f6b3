//! VMBus ring buffers and the VMBus packet format, with the Hyper-V memory layout.
//!
//! **What it is.** A VMBus channel is a pair of one-way rings in memory shared by the guest and
//! the host. Each ring is a 4 KiB header page (`write_index`, `read_index`, `interrupt_mask`,
//! `pending_send_sz`, `feature_bits` at offset 64) followed by a data area; the indices are byte
//! offsets into the data area, the ring is empty when they are equal and a writer never fills it
//! completely. The data area carries packets: a 16-byte [`PacketDescriptor`], a type-specific
//! header (GPA-direct ranges, transfer-page ranges), the payload padded to 8 bytes and a u64
//! trailer (the writer's index at the start of the packet, shifted left by 32).
//!
//! This crate implements both directions — [`RingWriter`] and [`RingReader`] — and computes the
//! signalling rules for the caller: after a write, whether the reader must be interrupted (the
//! ring went from empty to non-empty and the reader's `interrupt_mask` is 0); after a read,
//! whether the writer must be interrupted (it set `pending_send_sz` and the free space just
//! crossed it). Sending the interrupt is the caller's business.
//!
//! **What it talks to.** Memory only, through the [`RingMem`] trait: the root-side
//! `vmbus_server` implements it over mapped guest RAM (a GPADL's page list), the guest-side
//! `vmbus_client` over its own pages, tests and benchmarks over a plain buffer ([`RawRingMem`]).
//! It is `#![no_std]` and never allocates, so the same code runs in a bare-metal test guest.
//!
//! **What it must never do.** Trust the shared memory. The peer can change any byte at any time:
//! every index is validated (below the data size, 8-aligned) on every read, every descriptor is
//! checked against the bytes actually available, packets are parsed from a private copy (no
//! double fetch), and range counts are bounded by the packet's own size. A hostile peer can
//! make reads fail ([`ReadError::Corrupt`]) — it can never make this code panic, loop,
//! or touch memory outside the ring. Our own indices are kept privately and only published.
//!
//! Why hand-written: the layout is fixed by Hyper-V and by the Linux guest drivers we must
//! interoperate with; no published crate implements it for both sides without `std`.

#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

mod mem;
mod packet;
mod ring;

pub use mem::{RawRingMem, RingMem};
pub use packet::{
    encoded_len, parse_packet, GpaRange, GpaRangeIter, GpaRanges, OutgoingGpaRange, OutgoingKind,
    OutgoingPacket, Packet, PacketDescriptor, PacketError, PacketKind, TransferPageRange,
    TransferPages, FLAG_COMPLETION_REQUESTED, PACKET_TYPE_COMPLETION, PACKET_TYPE_DATA_INBAND,
    PACKET_TYPE_DATA_USING_GPA_DIRECT, PACKET_TYPE_DATA_USING_TRANSFER_PAGES,
};
pub use ring::{
    CorruptReason, PeekedPacket, ReadError, ReadOutcome, RingError, RingReader, RingWriter,
    WriteError, WriteOutcome,
};

/// Size of the ring header page; the data area starts right after it.
pub const RING_HEADER_SIZE: usize = 4096;
/// Hyper-V page size (GPADL and GPA-direct page frame numbers are in these units).
pub const PAGE_SIZE: usize = 4096;
/// Size of the packet descriptor that starts every packet.
pub const DESCRIPTOR_SIZE: u32 = 16;
/// Size of the trailer that follows every packet (the writer's start index << 32).
pub const TRAILER_SIZE: u32 = 8;
/// Largest data area we accept (indices are u32; 1 GiB is far beyond any real ring).
pub const MAX_DATA_LEN: u32 = 1 << 30;
/// Smallest data area we accept: room for a descriptor and a trailer, plus the free byte.
pub const MIN_DATA_LEN: u32 = 64;
/// Largest packet (descriptor + headers + payload, without trailer): `len8` is a u16.
pub const MAX_PACKET_LEN: u32 = (u16::MAX as u32) * 8;

/// Byte offsets of the fields of the ring header page.
pub mod header {
    /// Where the writer will write next (byte offset into the data area). Writer-owned.
    pub const WRITE_INDEX: usize = 0;
    /// Where the reader will read next. Reader-owned.
    pub const READ_INDEX: usize = 4;
    /// Non-zero: the reader asks not to be interrupted on writes. Reader-owned.
    pub const INTERRUPT_MASK: usize = 8;
    /// Non-zero: the writer is blocked until this many bytes are free. Writer-owned.
    pub const PENDING_SEND_SIZE: usize = 12;
    /// Feature bits; bit 0: the writer of this ring uses `pending_send_sz` and honours the
    /// peer's.
    pub const FEATURE_BITS: usize = 64;
    /// Feature bit 0 of [`FEATURE_BITS`].
    pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;
}
