//! The channel API VSPs use.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmbus_ring::{
    OutgoingPacket, Packet, PacketKind, ReadError, RingReader, RingWriter, WriteError, PAGE_SIZE,
};

use crate::ram::{pfn_gpa, GuestRam, GuestRamRing};
use crate::state::{Registry, SubChannelRequest};
use crate::GuestSynic;

/// A channel operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The channel is closing or closed.
    #[error("channel closed")]
    Closed,
    /// The guest corrupted a ring: the channel is broken until the guest closes it.
    #[error("ring corrupted by the guest: {0}")]
    Corrupt(String),
    /// The packet can never fit the ring or is malformed.
    #[error("packet too large for the ring or malformed")]
    InvalidPacket,
    /// A guest range is outside its GPADL / page list, or not guest RAM.
    #[error("guest buffer access out of bounds: {0}")]
    BadGuestBuffer(String),
    /// A wait timed out.
    #[error("timed out")]
    Timeout,
    /// The server refused the request (e.g. sub-channels asked for on a sub-channel).
    #[error("refused: {0}")]
    Refused(&'static str),
}

/// A non-blocking send did not happen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// No room now; the guest will signal when there is (pending_send_sz is set).
    #[error("ring full")]
    Full,
    /// Another error.
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// A run of guest memory: `byte_count` bytes starting `byte_offset` bytes into the first of
/// `pfns`, the pages being virtually contiguous (a GPA-direct range, or one range of a GPADL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRange {
    /// Length in bytes.
    pub byte_count: u32,
    /// Offset into the first page (< 4096).
    pub byte_offset: u32,
    /// The pages spanned.
    pub pfns: Vec<u64>,
}

impl PageRange {
    /// Call `f(gpa, start_in_buffer, len)` for each page-contiguous piece of
    /// `[offset, offset + len)` of this range.
    fn for_each_segment(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), ChannelError>,
    ) -> Result<(), ChannelError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= u64::from(self.byte_count))
            .ok_or_else(|| {
                ChannelError::BadGuestBuffer(format!(
                    "{len} bytes at {offset} exceed a {}-byte range",
                    self.byte_count
                ))
            })?;
        let mut pos = u64::from(self.byte_offset) + offset;
        let stop = u64::from(self.byte_offset) + end;
        let mut done = 0usize;
        while pos < stop {
            let page = (pos / PAGE_SIZE as u64) as usize;
            let in_page = pos % PAGE_SIZE as u64;
            let n = ((PAGE_SIZE as u64 - in_page).min(stop - pos)) as usize;
            let pfn = *self.pfns.get(page).ok_or_else(|| {
                ChannelError::BadGuestBuffer("range shorter than its page list".into())
            })?;
            let gpa = pfn_gpa(pfn)
                .and_then(|g| g.checked_add(in_page))
                .ok_or_else(|| ChannelError::BadGuestBuffer(format!("pfn {pfn:#x}")))?;
            f(gpa, done, n)?;
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    fn read(&self, ram: &dyn GuestRam, offset: u64, buf: &mut [u8]) -> Result<(), ChannelError> {
        self.for_each_segment(offset, buf.len(), |gpa, at, n| {
            ram.read(gpa, &mut buf[at..at + n])
                .map_err(|e| ChannelError::BadGuestBuffer(e.to_string()))
        })
    }

    fn write(&self, ram: &dyn GuestRam, offset: u64, data: &[u8]) -> Result<(), ChannelError> {
        self.for_each_segment(offset, data.len(), |gpa, at, n| {
            ram.write(gpa, &data[at..at + n])
                .map_err(|e| ChannelError::BadGuestBuffer(e.to_string()))
        })
    }
}

/// What kind of packet the guest sent, with its ranges (copied out of the ring).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingKind {
    /// In-band data.
    InBand,
    /// A completion of one of our packets.
    Completion,
    /// Data in guest pages.
    GpaDirect(Vec<PageRange>),
    /// Data in a transfer page set: `(byte_count, byte_offset)` ranges.
    TransferPages {
        /// Transfer page set id.
        pageset_id: u16,
        /// Whether the sender owns the set.
        sender_owns_set: bool,
        /// The ranges.
        ranges: Vec<(u32, u32)>,
    },
    /// A packet type we do not interpret.
    Other(u16),
}

/// A packet received from the guest (an owned copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncomingPacket {
    /// Kind and ranges.
    pub kind: IncomingKind,
    /// Descriptor flags.
    pub flags: u16,
    /// Transaction id (echo it in the completion).
    pub transaction_id: u64,
    /// Payload, padded to 8 bytes by the guest.
    pub payload: Vec<u8>,
}

impl IncomingPacket {
    /// Copy a parsed packet.
    pub fn from_packet(p: &Packet<'_>) -> Self {
        let kind = match p.kind() {
            PacketKind::InBand => IncomingKind::InBand,
            PacketKind::Completion => IncomingKind::Completion,
            PacketKind::GpaDirect(ranges) => IncomingKind::GpaDirect(
                ranges
                    .iter()
                    .map(|r| PageRange {
                        byte_count: r.byte_count,
                        byte_offset: r.byte_offset,
                        pfns: r.pfns().collect(),
                    })
                    .collect(),
            ),
            PacketKind::TransferPages(t) => IncomingKind::TransferPages {
                pageset_id: t.pageset_id,
                sender_owns_set: t.sender_owns_set,
                ranges: t
                    .ranges
                    .iter()
                    .map(|r| (r.byte_count.get(), r.byte_offset.get()))
                    .collect(),
            },
            PacketKind::Other { packet_type, .. } => IncomingKind::Other(packet_type),
        };
        Self {
            kind,
            flags: p.flags(),
            transaction_id: p.transaction_id(),
            payload: p.payload().to_vec(),
        }
    }

    /// Whether the guest asked for a completion.
    pub fn completion_requested(&self) -> bool {
        self.flags & vmbus_ring::FLAG_COMPLETION_REQUESTED != 0
    }
}

/// A GPADL the guest created for this channel (e.g. netvsc's receive buffer), as one
/// virtually contiguous buffer: its ranges one after the other.
#[derive(Clone, Debug)]
pub struct GpadlBuffer {
    data: Arc<GpadlData>,
    ram: Arc<dyn GuestRam>,
}

impl std::fmt::Debug for dyn GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestRam")
    }
}

/// A complete GPADL.
#[derive(Debug)]
pub(crate) struct GpadlData {
    pub(crate) relid: u32,
    pub(crate) ranges: Vec<PageRange>,
}

impl GpadlData {
    pub(crate) fn len(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.byte_count)).sum()
    }
}

impl GpadlBuffer {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.data.len()
    }

    /// True if the buffer is empty (never, for a GPADL the server accepted).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn walk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&PageRange, u64, usize, usize) -> Result<(), ChannelError>,
    ) -> Result<(), ChannelError> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| ChannelError::BadGuestBuffer("beyond the GPADL".into()))?;
        let mut base = 0u64;
        let mut pos = offset;
        for r in &self.data.ranges {
            let r_end = base + u64::from(r.byte_count);
            if pos < r_end && pos < end {
                let n = (r_end.min(end) - pos) as usize;
                f(r, pos - base, (pos - offset) as usize, n)?;
                pos += n as u64;
            }
            base = r_end;
        }
        Ok(())
    }

    /// Copy `buf.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ChannelError> {
        let ram = &*self.ram;
        self.walk(offset, buf.len(), |r, off, at, n| {
            r.read(ram, off, &mut buf[at..at + n])
        })
    }

    /// Copy `data` into the buffer at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ChannelError> {
        let ram = &*self.ram;
        self.walk(offset, data.len(), |r, off, at, n| {
            r.write(ram, off, &data[at..at + n])
        })
    }
}

struct Outbound {
    writer: RingWriter<GuestRamRing>,
    /// We set pending_send_sz and have not cleared it yet.
    pending: bool,
}

struct Inbound {
    reader: RingReader<GuestRamRing>,
    scratch: Vec<u8>,
}

#[derive(Default)]
struct Events {
    /// Guest signals received so far.
    signals: u64,
    closing: bool,
}

/// State shared by the server and every handle of one open channel.
pub(crate) struct ChannelShared {
    relid: u32,
    sub_channel_index: u16,
    sint: u8,
    target_vp: AtomicU32,
    user_data: [u8; 120],
    synic: Arc<dyn GuestSynic>,
    ram: Arc<dyn GuestRam>,
    registry: Arc<Registry>,
    inbound: Mutex<Option<Inbound>>,
    outbound: Mutex<Option<Outbound>>,
    /// The guest sets pending_send_sz-style wakeups (else we poll a full ring).
    guest_signals_space: bool,
    closing: AtomicBool,
    events: Mutex<Events>,
    cond: Condvar,
    host_signals: AtomicU64,
}

pub(crate) struct ChannelSetup {
    pub relid: u32,
    /// 0 for a primary channel.
    pub sub_channel_index: u16,
    pub sint: u8,
    pub target_vp: u32,
    pub user_data: [u8; 120],
    pub synic: Arc<dyn GuestSynic>,
    pub ram: Arc<dyn GuestRam>,
    pub registry: Arc<Registry>,
    /// Guest → host ring.
    pub reader: RingReader<GuestRamRing>,
    /// Host → guest ring.
    pub writer: RingWriter<GuestRamRing>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking VSP thread must not take the server down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChannelShared {
    pub(crate) fn new(s: ChannelSetup) -> Arc<Self> {
        let guest_signals_space = s.reader.writer_uses_pending_send_size();
        Arc::new(Self {
            relid: s.relid,
            sub_channel_index: s.sub_channel_index,
            sint: s.sint,
            target_vp: AtomicU32::new(s.target_vp),
            user_data: s.user_data,
            synic: s.synic,
            ram: s.ram,
            registry: s.registry,
            inbound: Mutex::new(Some(Inbound {
                reader: s.reader,
                scratch: Vec::new(),
            })),
            outbound: Mutex::new(Some(Outbound {
                writer: s.writer,
                pending: false,
            })),
            guest_signals_space,
            closing: AtomicBool::new(false),
            events: Mutex::new(Events::default()),
            cond: Condvar::new(),
            host_signals: AtomicU64::new(0),
        })
    }

    /// The guest signalled this channel (HvSignalEvent).
    pub(crate) fn on_guest_signal(&self) {
        lock(&self.events).signals += 1;
        self.cond.notify_all();
    }

    /// First step of closing: every method now fails and every wait wakes up.
    pub(crate) fn begin_close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        lock(&self.events).closing = true;
        self.cond.notify_all();
    }

    /// Last step of closing (after the VSP's `close`): drop the rings, so that no handle a VSP
    /// may still hold can touch guest memory again.
    pub(crate) fn finish_close(&self) {
        *lock(&self.inbound) = None;
        *lock(&self.outbound) = None;
    }

    pub(crate) fn set_target_vp(&self, vp: u32) {
        self.target_vp.store(vp, Ordering::SeqCst);
    }

    pub(crate) fn host_signal_count(&self) -> u64 {
        self.host_signals.load(Ordering::Relaxed)
    }

    fn signal_guest(&self) {
        self.host_signals.fetch_add(1, Ordering::Relaxed);
        self.synic
            .signal_event(self.target_vp.load(Ordering::SeqCst), self.sint, self.relid);
    }

    fn signals(&self) -> u64 {
        lock(&self.events).signals
    }

    /// Wait until the signal count differs from `seen` or the channel closes.
    fn wait_signal(&self, seen: u64, timeout: Option<Duration>) -> Result<u64, ChannelError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut ev = lock(&self.events);
        loop {
            if ev.closing {
                return Err(ChannelError::Closed);
            }
            if ev.signals != seen {
                return Ok(ev.signals);
            }
            match deadline {
                None => ev = self.cond.wait(ev).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(ChannelError::Timeout);
                    }
                    ev = self
                        .cond
                        .wait_timeout(ev, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

/// One open channel, as its VSP sees it. Cheap to clone; each clone tracks which guest
/// signals it has waited for.
///
/// Typical loop on the VSP's thread:
/// ```ignore
/// loop {
///     while let Some(p) = channel.try_recv()? { /* handle, channel.send(..)? */ }
///     channel.wait()?; // returns Err(Closed) when the channel closes
/// }
/// ```
pub struct Channel {
    shared: Arc<ChannelShared>,
    seen: AtomicU64,
}

impl Clone for Channel {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            seen: AtomicU64::new(self.seen.load(Ordering::SeqCst)),
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("relid", &self.shared.relid)
            .field("sub_channel_index", &self.shared.sub_channel_index)
            .finish()
    }
}

impl Channel {
    pub(crate) fn new(shared: Arc<ChannelShared>) -> Self {
        let seen = shared.signals();
        Self {
            shared,
            seen: AtomicU64::new(seen),
        }
    }

    /// The channel's relid.
    pub fn relid(&self) -> u32 {
        self.shared.relid
    }

    /// 0 for a primary channel, 1.. for a sub-channel.
    pub fn sub_channel_index(&self) -> u16 {
        self.shared.sub_channel_index
    }

    /// Ask the server to offer `count` more sub-channels of this (primary, open) channel:
    /// offers with the primary's class and instance GUIDs, `sub_channel_index` continuing
    /// from the last one offered (1 for the first), each with its own relid and connection
    /// id. Sub-channels opened by the guest reach the VSP through
    /// [`crate::Vsp::open_sub_channel`].
    ///
    /// Never waits for the control thread (so it may be called from the VSP's channel
    /// thread): the request is queued and the offers go out shortly after. The server offers
    /// at most [`crate::MAX_SUB_CHANNELS`] per opening of the primary (fewer when relids
    /// run out); all of them are closed and rescinded when the primary closes.
    ///
    /// Errors: `Closed`; `Refused` for a count of 0, on a sub-channel, or when too many
    /// requests are queued.
    pub fn offer_sub_channels(&self, count: u16) -> Result<(), ChannelError> {
        self.check_open()?;
        if self.shared.sub_channel_index != 0 {
            return Err(ChannelError::Refused(
                "sub-channels are offered for primary channels only",
            ));
        }
        if count == 0 {
            return Err(ChannelError::Refused("no sub-channels asked for"));
        }
        self.shared
            .registry
            .request_sub_channels(SubChannelRequest {
                relid: self.shared.relid,
                channel: Arc::downgrade(&self.shared),
                count,
            })
    }

    /// The 120 bytes of user data from the guest's OPENCHANNEL.
    pub fn user_data(&self) -> &[u8; 120] {
        &self.shared.user_data
    }

    /// The VP host → guest interrupts go to.
    pub fn target_vp(&self) -> u32 {
        self.shared.target_vp.load(Ordering::SeqCst)
    }

    /// Whether the channel is closing.
    pub fn is_closed(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// The guest's RAM, for VSPs that manage guest buffers themselves.
    pub fn guest_ram(&self) -> &Arc<dyn GuestRam> {
        &self.shared.ram
    }

    fn check_open(&self) -> Result<(), ChannelError> {
        if self.is_closed() {
            Err(ChannelError::Closed)
        } else {
            Ok(())
        }
    }

    /// Whether a packet waits in the guest → host ring, without reading it (also `true` when
    /// the ring is unreadable, so that the caller's next receive reports why).
    pub fn has_incoming(&self) -> bool {
        match lock(&self.shared.inbound).as_ref() {
            Some(inb) => !matches!(inb.reader.peek(), Err(ReadError::Empty)),
            None => false,
        }
    }

    /// Ask the guest not to signal new packets (`true`) while this side polls the ring itself,
    /// or to signal them again (`false`). After clearing it, look at the ring once more before
    /// waiting: a packet written while the mask was set came without a signal.
    pub fn set_incoming_interrupt_mask(&self, masked: bool) {
        if let Some(inb) = lock(&self.shared.inbound).as_mut() {
            inb.reader.set_interrupt_mask(masked);
        }
    }

    /// Receive the next packet and hand it to `f` without copying it again (the packet is
    /// parsed from a private copy of the ring bytes). `Ok(None)` when the ring is empty.
    pub fn try_recv_with<R>(
        &self,
        f: impl FnOnce(&Packet<'_>) -> R,
    ) -> Result<Option<R>, ChannelError> {
        self.check_open()?;
        let mut guard = lock(&self.shared.inbound);
        let inb = guard.as_mut().ok_or(ChannelError::Closed)?;
        let need = match inb.reader.peek() {
            Ok(p) => p.len as usize,
            Err(ReadError::Empty) => return Ok(None),
            Err(e) => return Err(ChannelError::Corrupt(e.to_string())),
        };
        if inb.scratch.len() < need {
            // Bounded by the ring's data size (peek validated the length against it).
            inb.scratch.resize(need, 0);
        }
        let Inbound { reader, scratch } = inb;
        match reader.try_read(scratch) {
            Ok((packet, outcome)) => {
                let r = f(&packet);
                if outcome.signal {
                    self.shared.signal_guest();
                }
                Ok(Some(r))
            }
            Err(ReadError::Empty) => Ok(None),
            Err(e) => Err(ChannelError::Corrupt(e.to_string())),
        }
    }

    /// Receive the next packet as an owned copy; `Ok(None)` when the ring is empty.
    pub fn try_recv(&self) -> Result<Option<IncomingPacket>, ChannelError> {
        self.try_recv_with(IncomingPacket::from_packet)
    }

    /// Receive the next packet, waiting for the guest if the ring is empty.
    pub fn recv(&self) -> Result<IncomingPacket, ChannelError> {
        loop {
            if let Some(p) = self.try_recv()? {
                return Ok(p);
            }
            self.wait()?;
        }
    }

    /// Wait for a guest signal this handle has not seen yet (new packets, or room in the
    /// host → guest ring). Returns `Err(Closed)` when the channel closes. Check the rings
    /// before waiting: signals are only sent on transitions.
    pub fn wait(&self) -> Result<(), ChannelError> {
        let seen = self.seen.load(Ordering::SeqCst);
        let now = self.shared.wait_signal(seen, None)?;
        self.seen.store(now, Ordering::SeqCst);
        Ok(())
    }

    /// Like [`Channel::wait`] with a timeout; `Ok(false)` on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<bool, ChannelError> {
        let seen = self.seen.load(Ordering::SeqCst);
        match self.shared.wait_signal(seen, Some(timeout)) {
            Ok(now) => {
                self.seen.store(now, Ordering::SeqCst);
                Ok(true)
            }
            Err(ChannelError::Timeout) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Send a packet if it fits now. On `Full`, `pending_send_sz` is set so that the guest
    /// signals when room appears (see [`Channel::wait`]).
    pub fn try_send(&self, packet: &OutgoingPacket<'_>) -> Result<(), TrySendError> {
        self.check_open()?;
        let mut guard = lock(&self.shared.outbound);
        let out = guard.as_mut().ok_or(ChannelError::Closed)?;
        let mut result = out.writer.try_write(packet);
        if let Err(WriteError::Full { needed }) = result {
            out.writer.set_pending_send_size(needed);
            out.pending = true;
            // The guest may have made room before it could see the size: look again.
            result = out.writer.try_write(packet);
        }
        match result {
            Ok(outcome) => {
                if out.pending {
                    out.writer.set_pending_send_size(0);
                    out.pending = false;
                }
                if outcome.signal {
                    self.shared.signal_guest();
                }
                Ok(())
            }
            Err(WriteError::Full { .. }) => Err(TrySendError::Full),
            Err(WriteError::Invalid) => Err(ChannelError::InvalidPacket.into()),
            Err(e @ WriteError::Corrupt(_)) => Err(ChannelError::Corrupt(e.to_string()).into()),
        }
    }

    /// Send a packet, waiting for room if the ring is full. Fails only if the channel closes,
    /// the packet can never fit, or the guest corrupts the ring.
    pub fn send(&self, packet: &OutgoingPacket<'_>) -> Result<(), ChannelError> {
        loop {
            let seen = self.shared.signals();
            match self.try_send(packet) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Channel(e)) => return Err(e),
                Err(TrySendError::Full) => {}
            }
            // A guest without pending_send_sz support never signals room: poll it.
            let poll = if self.shared.guest_signals_space {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(1)
            };
            match self.shared.wait_signal(seen, Some(poll)) {
                Ok(_) | Err(ChannelError::Timeout) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Send an in-band packet (waiting for room).
    pub fn send_inband(
        &self,
        transaction_id: u64,
        payload: &[u8],
        completion_requested: bool,
    ) -> Result<(), ChannelError> {
        self.send(&OutgoingPacket::in_band(
            transaction_id,
            payload,
            completion_requested,
        ))
    }

    /// Send a completion for the guest's packet `transaction_id` (waiting for room).
    pub fn send_completion(&self, transaction_id: u64, payload: &[u8]) -> Result<(), ChannelError> {
        self.send(&OutgoingPacket::completion(transaction_id, payload))
    }

    /// Copy bytes `[offset, offset + buf.len())` of a guest range (from a GPA-direct packet)
    /// into `buf`.
    pub fn read_guest(
        &self,
        range: &PageRange,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChannelError> {
        self.check_open()?;
        range.read(&*self.shared.ram, offset, buf)
    }

    /// Copy `data` into a guest range at `offset`.
    pub fn write_guest(
        &self,
        range: &PageRange,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ChannelError> {
        self.check_open()?;
        range.write(&*self.shared.ram, offset, data)
    }

    /// A GPADL the guest created on this channel and that is complete, by handle.
    pub fn gpadl(&self, gpadl: u32) -> Option<GpadlBuffer> {
        if self.is_closed() {
            return None;
        }
        let data = self.shared.registry.gpadl(gpadl)?;
        (data.relid == self.shared.relid).then(|| GpadlBuffer {
            data,
            ram: self.shared.ram.clone(),
        })
    }
}
