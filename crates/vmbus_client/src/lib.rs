//! The guest side of VMBus, for Verdigris' own test guest and for in-process tests.
//!
//! **What it is.** A small VMBus client: negotiate a version (newest first, like Linux 6.1:
//! 5.3 down to 2.4, INITIATE_CONTACT on connection id 4 for 5.0+ and 1 before), request the
//! offers, create GPADLs (GPADL_HEADER + GPADL_BODY messages), open and close channels,
//! release rescinded relids, unload, and exchange packets over a channel's two rings
//! ([`ClientChannel`], built on `vmbus_ring`).
//!
//! **What it talks to.** The hypervisor, through the [`HvGuest`] trait: HvPostMessage,
//! HvSignalEvent, the SIMP message slot and SIEF event flags of the VMBus SINT, waiting and a
//! clock. In the test guest that is the hypercall page and the SynIC pages; in tests it calls
//! straight into `vmbus_server`. Ring memory is the caller's ([`vmbus_ring::RingMem`]).
//!
//! **What it must never do.** Allocate (it is `#![no_std]` without `alloc`: fixed tables, a
//! 240-byte message buffer), wait forever (every wait has the configured timeout, unlike
//! Linux's), or trust the host: messages are parsed with `vmbus_protocol`, packets with
//! `vmbus_ring`; unexpected or malformed messages are counted and dropped.

#![no_std]

use core::fmt;

use vmbus_protocol::{
    msgtype, parse, ChannelMessage, CloseChannel, GpadlHeader, GpadlTeardown, Guid,
    InitiateContact, MessageBuf, ModifyChannel, OpenChannel, RelidReleased, HV_MESSAGE_TYPE_VMBUS,
    LINUX_VERSIONS, MAX_MESSAGE_SIZE, MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_4,
    VERSION_WIN10_V5, VERSION_WIN10_V5_3, VMBUS_MESSAGE_SINT,
};
use vmbus_ring::{
    header, OutgoingPacket, Packet, ReadError, RingError, RingMem, RingReader, RingWriter,
    WriteError, PAGE_SIZE,
};
use zerocopy::little_endian::{U16, U32, U64};

pub use vmbus_protocol;
pub use vmbus_ring;

/// Hypercall status: the queue is full, try again.
pub const HV_STATUS_INSUFFICIENT_BUFFERS: u16 = 0x13;
/// Hypercall status: no such connection id.
pub const HV_STATUS_INVALID_CONNECTION_ID: u16 = 0x12;
/// Offers the client can hold.
pub const MAX_OFFERS: usize = 32;

/// The hypervisor as the guest sees it.
pub trait HvGuest {
    /// HvPostMessage; returns the hypercall status.
    fn post_message(&mut self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16;
    /// HvSignalEvent (flag 0 of `connection_id`); returns the hypercall status.
    fn signal_event(&mut self, connection_id: u32, flag: u16) -> u16;
    /// Take the message in this VP's SIMP slot for `sint`, if any: copy its payload into
    /// `buf`, free the slot (and EOM), return the payload length.
    fn take_message(&mut self, sint: u8, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize>;
    /// Test and clear bit `flag` of this VP's SIEF slot for `sint`.
    fn take_event(&mut self, sint: u8, flag: u32) -> bool;
    /// Wait briefly for a message or an event (halt until an interrupt, or sleep).
    fn wait(&mut self);
    /// Milliseconds from any fixed origin (for timeouts).
    fn now_ms(&mut self) -> u64;
}

/// Client settings.
#[derive(Clone, Copy, Debug)]
pub struct ClientConfig {
    /// Highest version to try (versions are tried newest first, as Linux does).
    pub max_version: u32,
    /// VP that receives control messages.
    pub target_vcpu: u32,
    /// Give up waiting for a reply after this long.
    pub timeout_ms: u64,
    /// GPA of the interrupt page (versions before 5.0 only; unused with dedicated
    /// interrupts).
    pub interrupt_page: u64,
    /// GPAs of the two monitor pages (unused: we never ask for monitored notification).
    pub monitor_pages: [u64; 2],
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            max_version: VERSION_WIN10_V5_3,
            target_vcpu: 0,
            timeout_ms: 10_000,
            interrupt_page: 0,
            monitor_pages: [0; 2],
        }
    }
}

/// A client operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// No reply within the configured timeout.
    Timeout,
    /// A hypercall failed with this status.
    Hypercall(u16),
    /// The host accepted none of our versions.
    NoVersion,
    /// Not connected (connect first).
    NotConnected,
    /// The host answered with a failure status.
    Refused(u32),
    /// A GPA range whose page count does not match its length, or too many pages for one
    /// GPADL (8190).
    BadRange,
    /// A ring could not be set up or the host corrupted it.
    Ring(RingError),
    /// Reading or writing a ring failed.
    Read(ReadError),
    /// Writing a ring failed.
    Write(WriteError),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Timeout => f.write_str("timed out waiting for the host"),
            ClientError::Hypercall(s) => write!(f, "hypercall failed with status {s:#x}"),
            ClientError::NoVersion => f.write_str("the host accepted no VMBus version"),
            ClientError::NotConnected => f.write_str("not connected"),
            ClientError::Refused(s) => write!(f, "the host refused with status {s:#x}"),
            ClientError::BadRange => f.write_str("invalid GPA range"),
            ClientError::Ring(e) => write!(f, "{e}"),
            ClientError::Read(e) => write!(f, "{e}"),
            ClientError::Write(e) => write!(f, "{e}"),
        }
    }
}

/// A channel offer received from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// Relid (the SIEF bit the host sets for us).
    pub relid: u32,
    /// What we pass to HvSignalEvent.
    pub connection_id: u32,
    /// Device class.
    pub class_id: Guid,
    /// Device instance.
    pub instance_id: Guid,
    /// 0 for primary channels.
    pub sub_channel_index: u16,
    /// Whether the host wants monitored notification (we do not support it).
    pub monitor_allocated: bool,
    /// Whether the channel has a dedicated interrupt.
    pub dedicated_interrupt: bool,
    /// Device-specific data.
    pub user_defined: [u8; 120],
    /// The host rescinded it; release the relid when done.
    pub rescinded: bool,
}

/// The VMBus client.
pub struct VmbusClient<H> {
    hv: H,
    config: ClientConfig,
    version: Option<u32>,
    msg_conn_id: u32,
    offers: [Option<Offer>; MAX_OFFERS],
    all_offers_delivered: bool,
    next_gpadl: u32,
    dropped: u32,
}

impl<H: HvGuest> VmbusClient<H> {
    /// A client, not connected yet.
    pub fn new(hv: H, config: ClientConfig) -> Self {
        Self {
            hv,
            config,
            version: None,
            msg_conn_id: MESSAGE_CONNECTION_ID,
            offers: [None; MAX_OFFERS],
            all_offers_delivered: false,
            next_gpadl: 0xE1E10,
            dropped: 0,
        }
    }

    /// The hypervisor interface.
    pub fn hv(&mut self) -> &mut H {
        &mut self.hv
    }

    /// The negotiated version.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// The connection id messages are posted to.
    pub fn message_connection_id(&self) -> u32 {
        self.msg_conn_id
    }

    /// Messages received that were malformed or unexpected.
    pub fn dropped_messages(&self) -> u32 {
        self.dropped
    }

    /// The offers received (including rescinded ones not yet released).
    pub fn offers(&self) -> impl Iterator<Item = &Offer> {
        self.offers.iter().flatten()
    }

    /// The offer with this relid.
    pub fn offer(&self, relid: u32) -> Option<&Offer> {
        self.offers().find(|o| o.relid == relid)
    }

    /// The first offer of this class.
    pub fn find_offer(&self, class_id: Guid) -> Option<Offer> {
        self.offers().find(|o| o.class_id == class_id).copied()
    }

    /// Post a message, retrying while the host's queue is full.
    fn post(&mut self, connection_id: u32, msg: &MessageBuf) -> Result<(), ClientError> {
        let start = self.hv.now_ms();
        loop {
            match self
                .hv
                .post_message(connection_id, HV_MESSAGE_TYPE_VMBUS, msg.as_bytes())
            {
                0 => return Ok(()),
                HV_STATUS_INSUFFICIENT_BUFFERS => {
                    if self.hv.now_ms().saturating_sub(start) > self.config.timeout_ms {
                        return Err(ClientError::Timeout);
                    }
                    // Let the host drain its queue (and deliver what we must consume).
                    self.poll();
                    self.hv.wait();
                }
                s => return Err(ClientError::Hypercall(s)),
            }
        }
    }

    fn post_connected(&mut self, msg: &MessageBuf) -> Result<(), ClientError> {
        if self.version.is_none() {
            return Err(ClientError::NotConnected);
        }
        let id = self.msg_conn_id;
        self.post(id, msg)
    }

    /// Handle a message nobody is waiting for.
    fn dispatch(&mut self, msg: &ChannelMessage<'_>) {
        match msg {
            ChannelMessage::OfferChannel(o) => {
                let offer = Offer {
                    relid: o.child_relid.get(),
                    connection_id: o.connection_id.get(),
                    class_id: o.interface_type,
                    instance_id: o.interface_instance,
                    sub_channel_index: o.sub_channel_index.get(),
                    monitor_allocated: o.monitor_allocated & 1 != 0,
                    dedicated_interrupt: o.is_dedicated_interrupt.get() & 1 != 0,
                    user_defined: o.user_defined,
                    rescinded: false,
                };
                let slot = self
                    .offers
                    .iter()
                    .position(|s| s.is_some_and(|s| s.relid == offer.relid))
                    .or_else(|| self.offers.iter().position(|s| s.is_none()));
                match slot {
                    Some(i) => self.offers[i] = Some(offer),
                    None => {
                        // No room: give the relid back, as Linux does when it cannot
                        // allocate a channel.
                        self.dropped += 1;
                        let m = MessageBuf::new(&RelidReleased {
                            child_relid: U32::new(offer.relid),
                        });
                        let _ = self.post_connected(&m);
                    }
                }
            }
            ChannelMessage::RescindChannelOffer(r) => {
                let relid = r.child_relid.get();
                for o in self.offers.iter_mut().flatten() {
                    if o.relid == relid {
                        o.rescinded = true;
                    }
                }
            }
            ChannelMessage::AllOffersDelivered => self.all_offers_delivered = true,
            _ => self.dropped += 1,
        }
    }

    /// Process every message waiting in the slot (offers, rescinds) without waiting.
    pub fn poll(&mut self) {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        while let Some(n) = self.hv.take_message(VMBUS_MESSAGE_SINT, &mut buf) {
            match parse(&buf[..n.min(MAX_MESSAGE_SIZE)]) {
                Ok(m) => self.dispatch(&m),
                Err(_) => self.dropped += 1,
            }
        }
    }

    /// Wait for the message `want` picks out, dispatching the others.
    fn wait_for<R>(
        &mut self,
        mut want: impl FnMut(&ChannelMessage<'_>) -> Option<R>,
    ) -> Result<R, ClientError> {
        let start = self.hv.now_ms();
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        loop {
            while let Some(n) = self.hv.take_message(VMBUS_MESSAGE_SINT, &mut buf) {
                match parse(&buf[..n.min(MAX_MESSAGE_SIZE)]) {
                    Ok(m) => match want(&m) {
                        Some(r) => return Ok(r),
                        None => self.dispatch(&m),
                    },
                    Err(_) => self.dropped += 1,
                }
            }
            if self.hv.now_ms().saturating_sub(start) > self.config.timeout_ms {
                return Err(ClientError::Timeout);
            }
            self.hv.wait();
        }
    }

    /// Negotiate the newest version the host accepts; returns it.
    pub fn connect(&mut self) -> Result<u32, ClientError> {
        self.version = None;
        let max = self.config.max_version;
        for &version in LINUX_VERSIONS.iter().filter(|&&v| v <= max) {
            let v5 = version >= VERSION_WIN10_V5;
            let conn = if v5 {
                MESSAGE_CONNECTION_ID_4
            } else {
                MESSAGE_CONNECTION_ID
            };
            let msg = MessageBuf::new(&InitiateContact {
                version_requested: U32::new(version),
                target_vcpu: U32::new(self.config.target_vcpu),
                interrupt_page_or_sint: U64::new(if v5 {
                    u64::from(VMBUS_MESSAGE_SINT)
                } else {
                    self.config.interrupt_page
                }),
                monitor_page1: U64::new(self.config.monitor_pages[0]),
                monitor_page2: U64::new(self.config.monitor_pages[1]),
            });
            match self.post(conn, &msg) {
                Ok(()) => {}
                Err(ClientError::Hypercall(HV_STATUS_INVALID_CONNECTION_ID)) => continue,
                Err(e) => return Err(e),
            }
            let resp = self.wait_for(|m| match m {
                ChannelMessage::VersionResponse(r) => Some(*r),
                _ => None,
            })?;
            if resp.version_supported != 0 {
                self.version = Some(version);
                self.msg_conn_id = if v5 {
                    resp.msg_conn_id.get()
                } else {
                    MESSAGE_CONNECTION_ID
                };
                return Ok(version);
            }
        }
        Err(ClientError::NoVersion)
    }

    /// Ask for the offers and wait until all are delivered; returns how many we hold.
    pub fn request_offers(&mut self) -> Result<usize, ClientError> {
        self.all_offers_delivered = false;
        self.post_connected(&MessageBuf::header_only(msgtype::REQUESTOFFERS))?;
        self.wait_for(|m| matches!(m, ChannelMessage::AllOffersDelivered).then_some(()))?;
        self.all_offers_delivered = true;
        Ok(self.offers().count())
    }

    /// Describe `byte_count` bytes starting `byte_offset` into the first of `pfns` to the host
    /// as a GPADL of channel `relid`; returns its handle.
    pub fn create_gpadl(
        &mut self,
        relid: u32,
        pfns: &[u64],
        byte_count: u32,
        byte_offset: u32,
    ) -> Result<u32, ClientError> {
        let pages = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(PAGE_SIZE as u64);
        let buflen = 8 + 8 * pfns.len();
        if byte_offset as usize >= PAGE_SIZE
            || byte_count == 0
            || pages != pfns.len() as u64
            || buflen > usize::from(u16::MAX)
        {
            return Err(ClientError::BadRange);
        }
        let gpadl = self.next_gpadl;
        self.next_gpadl = self.next_gpadl.wrapping_add(1);
        let mut msg = MessageBuf::header_only(msgtype::GPADL_HEADER);
        msg.push(zerocopy::IntoBytes::as_bytes(&GpadlHeader {
            child_relid: U32::new(relid),
            gpadl: U32::new(gpadl),
            range_buflen: U16::new(buflen as u16),
            range_count: U16::new(1),
        }));
        msg.push(&byte_count.to_le_bytes());
        msg.push(&byte_offset.to_le_bytes());
        let first = pfns
            .len()
            .min(vmbus_protocol::GPADL_HEADER_MAX_DATA / 8 - 1);
        for p in &pfns[..first] {
            msg.push(&p.to_le_bytes());
        }
        self.post_connected(&msg)?;
        let mut rest = &pfns[first..];
        while !rest.is_empty() {
            let (body, n) = MessageBuf::gpadl_body(gpadl, 0, rest);
            self.post_connected(&body)?;
            rest = &rest[n..];
        }
        let status = self.wait_for(|m| match m {
            ChannelMessage::GpadlCreated(c)
                if c.gpadl.get() == gpadl && c.child_relid.get() == relid =>
            {
                Some(c.creation_status.get())
            }
            _ => None,
        })?;
        if status != 0 {
            return Err(ClientError::Refused(status));
        }
        Ok(gpadl)
    }

    /// Tear a GPADL down and wait for the host's answer (which comes only once no open
    /// channel uses it).
    pub fn teardown_gpadl(&mut self, relid: u32, gpadl: u32) -> Result<(), ClientError> {
        self.post_connected(&MessageBuf::new(&GpadlTeardown {
            child_relid: U32::new(relid),
            gpadl: U32::new(gpadl),
        }))?;
        self.wait_for(|m| match m {
            ChannelMessage::GpadlTorndown(t) if t.gpadl.get() == gpadl => Some(()),
            _ => None,
        })
    }

    /// Open channel `relid` over the rings in `gpadl` (guest → host ring first, host → guest
    /// ring `downstream_page_offset` pages in), with interrupts to `target_vp`.
    pub fn open_channel(
        &mut self,
        relid: u32,
        gpadl: u32,
        downstream_page_offset: u32,
        target_vp: u32,
        user_data: &[u8],
    ) -> Result<(), ClientError> {
        let mut ud = [0u8; 120];
        let n = user_data.len().min(120);
        ud[..n].copy_from_slice(&user_data[..n]);
        self.post_connected(&MessageBuf::new(&OpenChannel {
            child_relid: U32::new(relid),
            open_id: U32::new(relid),
            ring_buffer_gpadl: U32::new(gpadl),
            target_vp: U32::new(target_vp),
            downstream_ring_buffer_page_offset: U32::new(downstream_page_offset),
            user_data: ud,
        }))?;
        let status = self.wait_for(|m| match m {
            ChannelMessage::OpenResult(r)
                if r.child_relid.get() == relid && r.open_id.get() == relid =>
            {
                Some(r.status.get())
            }
            _ => None,
        })?;
        if status != 0 {
            return Err(ClientError::Refused(status));
        }
        Ok(())
    }

    /// Close channel `relid` (no reply).
    pub fn close_channel(&mut self, relid: u32) -> Result<(), ClientError> {
        self.post_connected(&MessageBuf::new(&CloseChannel {
            child_relid: U32::new(relid),
        }))
    }

    /// Give a rescinded relid back and forget the offer.
    pub fn release_relid(&mut self, relid: u32) -> Result<(), ClientError> {
        self.post_connected(&MessageBuf::new(&RelidReleased {
            child_relid: U32::new(relid),
        }))?;
        for s in self.offers.iter_mut() {
            if s.is_some_and(|o| o.relid == relid) {
                *s = None;
            }
        }
        Ok(())
    }

    /// Move channel `relid`'s interrupts to `target_vp`. With 5.3+ the host answers and the
    /// status is returned; before, `Ok(None)`.
    pub fn modify_channel(
        &mut self,
        relid: u32,
        target_vp: u32,
    ) -> Result<Option<u32>, ClientError> {
        self.post_connected(&MessageBuf::new(&ModifyChannel {
            child_relid: U32::new(relid),
            target_vp: U32::new(target_vp),
        }))?;
        if self.version.is_some_and(|v| v >= VERSION_WIN10_V5_3) {
            let s = self.wait_for(|m| match m {
                ChannelMessage::ModifyChannelResponse(r) if r.child_relid.get() == relid => {
                    Some(r.status.get())
                }
                _ => None,
            })?;
            return Ok(Some(s));
        }
        Ok(None)
    }

    /// Unload: the host closes everything and answers; we forget our offers.
    pub fn unload(&mut self) -> Result<(), ClientError> {
        self.post_connected(&MessageBuf::header_only(msgtype::UNLOAD))?;
        self.wait_for(|m| matches!(m, ChannelMessage::UnloadResponse).then_some(()))?;
        self.version = None;
        self.msg_conn_id = MESSAGE_CONNECTION_ID;
        self.offers = [None; MAX_OFFERS];
        self.all_offers_delivered = false;
        Ok(())
    }
}

/// One open channel, guest side: our guest → host ring (we write) and the host → guest ring
/// (we read).
pub struct ClientChannel<M> {
    relid: u32,
    connection_id: u32,
    out: RingWriter<M>,
    inp: RingReader<M>,
}

impl<M: RingMem> ClientChannel<M> {
    /// Take the two rings of a channel. Their memory must be zeroed before the GPADL is
    /// created (indices 0); we announce pending_send_sz support on both, as Linux does.
    pub fn new(offer: &Offer, outbound: M, inbound: M) -> Result<Self, ClientError> {
        let f = inbound.load_header(header::FEATURE_BITS);
        inbound.store_header(header::FEATURE_BITS, f | header::FEATURE_PENDING_SEND_SIZE);
        Ok(Self {
            relid: offer.relid,
            connection_id: offer.connection_id,
            out: RingWriter::new(outbound).map_err(ClientError::Ring)?,
            inp: RingReader::new(inbound).map_err(ClientError::Ring)?,
        })
    }

    /// The relid.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    fn signal<H: HvGuest>(&self, hv: &mut H) {
        hv.signal_event(self.connection_id, 0);
    }

    /// Send if there is room now (signals the host when needed).
    pub fn try_send<H: HvGuest>(
        &mut self,
        hv: &mut H,
        packet: &OutgoingPacket<'_>,
    ) -> Result<(), WriteError> {
        let outcome = self.out.try_write(packet)?;
        if outcome.signal {
            self.signal(hv);
        }
        Ok(())
    }

    /// Send, waiting (with pending_send_sz) for room up to `timeout_ms`.
    pub fn send<H: HvGuest>(
        &mut self,
        hv: &mut H,
        packet: &OutgoingPacket<'_>,
        timeout_ms: u64,
    ) -> Result<(), ClientError> {
        let start = hv.now_ms();
        let mut pending = false;
        loop {
            match self.try_send(hv, packet) {
                Ok(()) => {
                    if pending {
                        self.out.set_pending_send_size(0);
                    }
                    return Ok(());
                }
                Err(WriteError::Full { needed }) => {
                    if !pending {
                        // Ask the host to signal once there is room, then look again before
                        // sleeping: it may have made room already.
                        self.out.set_pending_send_size(needed);
                        pending = true;
                        continue;
                    }
                }
                Err(e) => return Err(ClientError::Write(e)),
            }
            if hv.now_ms().saturating_sub(start) > timeout_ms {
                self.out.set_pending_send_size(0);
                return Err(ClientError::Timeout);
            }
            if !hv.take_event(VMBUS_MESSAGE_SINT, self.relid) {
                hv.wait();
            }
        }
    }

    /// Receive the next packet into `buf` if there is one (signals the host when it was
    /// waiting for room).
    pub fn try_recv<'b, H: HvGuest>(
        &mut self,
        hv: &mut H,
        buf: &'b mut [u8],
    ) -> Result<Packet<'b>, ReadError> {
        let (p, outcome) = self.inp.try_read(buf)?;
        if outcome.signal {
            self.signal(hv);
        }
        Ok(p)
    }

    /// Receive, waiting up to `timeout_ms` for the host.
    pub fn recv<'b, H: HvGuest>(
        &mut self,
        hv: &mut H,
        buf: &'b mut [u8],
        timeout_ms: u64,
    ) -> Result<Packet<'b>, ClientError> {
        let start = hv.now_ms();
        loop {
            match self.inp.peek() {
                Ok(_) => break,
                Err(ReadError::Empty) => {}
                Err(e) => return Err(ClientError::Read(e)),
            }
            if hv.now_ms().saturating_sub(start) > timeout_ms {
                return Err(ClientError::Timeout);
            }
            if !hv.take_event(VMBUS_MESSAGE_SINT, self.relid) {
                hv.wait();
            }
        }
        self.try_recv(hv, buf).map_err(ClientError::Read)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::VecDeque;
    use std::vec::Vec;

    use vmbus_protocol::{GpadlCreated, VersionResponse, VERSION_WIN10_V4_1};

    use super::*;

    /// A scripted host: records posts, answers through `respond`.
    struct Scripted<F> {
        posts: Vec<(u32, Vec<u8>)>,
        inbox: VecDeque<MessageBuf>,
        respond: F,
        now: u64,
    }

    impl<F: FnMut(u32, &[u8], &mut VecDeque<MessageBuf>) -> u16> HvGuest for Scripted<F> {
        fn post_message(&mut self, conn: u32, message_type: u32, payload: &[u8]) -> u16 {
            assert_eq!(message_type, HV_MESSAGE_TYPE_VMBUS);
            assert!(payload.len() <= MAX_MESSAGE_SIZE);
            self.posts.push((conn, payload.to_vec()));
            (self.respond)(conn, payload, &mut self.inbox)
        }
        fn signal_event(&mut self, _: u32, _: u16) -> u16 {
            0
        }
        fn take_message(&mut self, sint: u8, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
            assert_eq!(sint, VMBUS_MESSAGE_SINT);
            let m = self.inbox.pop_front()?;
            buf[..m.len()].copy_from_slice(m.as_bytes());
            Some(m.len())
        }
        fn take_event(&mut self, _: u8, _: u32) -> bool {
            false
        }
        fn wait(&mut self) {
            self.now += 10;
        }
        fn now_ms(&mut self) -> u64 {
            self.now
        }
    }

    fn scripted<F>(respond: F) -> VmbusClient<Scripted<F>>
    where
        F: FnMut(u32, &[u8], &mut VecDeque<MessageBuf>) -> u16,
    {
        VmbusClient::new(
            Scripted {
                posts: Vec::new(),
                inbox: VecDeque::new(),
                respond,
                now: 0,
            },
            ClientConfig {
                timeout_ms: 1000,
                ..ClientConfig::default()
            },
        )
    }

    fn version_response(ok: bool, conn: u32) -> MessageBuf {
        MessageBuf::new(&VersionResponse {
            version_supported: u8::from(ok),
            connection_state: 0,
            padding: U16::new(0),
            msg_conn_id: U32::new(conn),
        })
    }

    #[test]
    fn connect_walks_down_the_versions() {
        // A host without connection id 4, which refuses 4.1 and accepts 4.0.
        let mut c = scripted(|conn, payload, inbox| {
            if conn == 4 {
                return HV_STATUS_INVALID_CONNECTION_ID;
            }
            let Ok(ChannelMessage::InitiateContact(ic)) = parse(payload) else {
                panic!("expected INITIATE_CONTACT")
            };
            let v = ic.version_requested.get();
            inbox.push_back(version_response(v == vmbus_protocol::VERSION_WIN10, 0));
            0
        });
        assert_eq!(c.connect(), Ok(vmbus_protocol::VERSION_WIN10));
        assert_eq!(c.message_connection_id(), 1);
        let tried: Vec<(u32, u32)> = c
            .hv()
            .posts
            .iter()
            .map(|(conn, p)| match parse(p) {
                Ok(ChannelMessage::InitiateContact(ic)) => (*conn, ic.version_requested.get()),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            tried,
            [
                (4, VERSION_WIN10_V5_3),
                (4, vmbus_protocol::VERSION_WIN10_V5_2),
                (4, vmbus_protocol::VERSION_WIN10_V5_1),
                (4, VERSION_WIN10_V5),
                (1, VERSION_WIN10_V4_1),
                (1, vmbus_protocol::VERSION_WIN10),
            ]
        );
    }

    #[test]
    fn silent_host_times_out() {
        let mut c = scripted(|_, _, _| 0);
        assert_eq!(c.connect(), Err(ClientError::Timeout));
        // Not connected: requests are refused locally.
        assert_eq!(c.request_offers(), Err(ClientError::NotConnected));
    }

    #[test]
    fn gpadl_is_split_into_header_and_bodies() {
        let mut pfns_seen: Vec<u64> = Vec::new();
        let mut c = scripted(move |_, payload, inbox| {
            match parse(payload).unwrap() {
                ChannelMessage::InitiateContact(_) => inbox.push_back(version_response(true, 4)),
                ChannelMessage::GpadlHeader(h, data) => {
                    assert_eq!(h.range_buflen.get(), 8 + 8 * 60);
                    for c in data[8..].chunks(8) {
                        pfns_seen.push(u64::from_le_bytes(c.try_into().unwrap()));
                    }
                }
                ChannelMessage::GpadlBody(b, pfns) => {
                    pfns_seen.extend(pfns.iter().map(|p| p.get()));
                    if pfns_seen.len() == 60 {
                        assert!(pfns_seen.iter().copied().eq(100..160));
                        inbox.push_back(MessageBuf::new(&GpadlCreated {
                            child_relid: U32::new(3),
                            gpadl: b.gpadl,
                            creation_status: U32::new(0),
                        }));
                    }
                }
                other => panic!("{other:?}"),
            }
            0
        });
        c.connect().unwrap();
        let pfns: Vec<u64> = (100..160).collect();
        let id = c.create_gpadl(3, &pfns, 60 * 4096, 0).unwrap();
        assert_eq!(id, 0xE1E10);
        // Header with 26 PFNs, then bodies of 28 and 6.
        let sizes: Vec<usize> = c.hv().posts[1..].iter().map(|(_, p)| p.len()).collect();
        assert_eq!(sizes, [20 + 8 + 26 * 8, 16 + 28 * 8, 16 + 6 * 8]);
        // A range whose page count does not match is refused before anything is sent.
        assert_eq!(
            c.create_gpadl(3, &pfns[..2], 3 * 4096, 0),
            Err(ClientError::BadRange)
        );
    }
}
