//! In-process fakes for testing and benchmarking the controller without a VM (feature
//! `test-support`): guest RAM in an anonymous mapping that also offers direct access
//! ([`MappedGuestRam`]), a SynIC whose waits never miss a wake-up ([`QuickSynic`]), the
//! guest's hypervisor interface for `vmbus_client` ([`QuickGuest`]), and a fake Linux
//! `hv_storvsc` ([`FakeStorvsc`]) that initializes the channel the way Linux 6.1 does and
//! sends SRBs with GPA-direct buffers.
//!
//! Why not `vmbus_server::test_support`: its RAM is a `Mutex<Vec<u8>>` (one lock for all
//! guest memory, no stable host addresses, so no zero-copy path to test or measure) and its
//! guest waits a fixed 5 ms when a signal races the wait, which would dominate every
//! latency the benchmark measures.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmbus_client::{ClientChannel, ClientConfig, ClientError, HvGuest, Offer, VmbusClient};
use vmbus_server::{
    GuestRam, GuestRamError, GuestRamRing, GuestSynic, Guid, OutgoingGpaRange, OutgoingKind,
    OutgoingPacket, PacketKind, ServerConfig, VmbusServer,
};
use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use crate::buffer::GuestMemoryMap;
use crate::protocol::{
    body_as, data_in, op, set_body, ChannelProperties, ProtocolVersion, VmScsiRequest, VstorPacket,
    REQUEST_COMPLETION_FLAG, SUPPORTED_VERSIONS,
};

const PAGE: u64 = 4096;

/// Guest RAM at GPA 0..size in an anonymous host mapping, with a bump page allocator.
pub struct MappedGuestRam {
    base: NonNull<u8>,
    size: u64,
    next_pfn: AtomicU64,
}

// SAFETY: the mapping is plain memory owned by this object until drop; all access goes
// through bounds-checked copies, atomics, or pointers handed out under the
// `GuestMemoryMap` contract.
unsafe impl Send for MappedGuestRam {}
// SAFETY: as above; no interior state besides the atomic allocator.
unsafe impl Sync for MappedGuestRam {}

impl MappedGuestRam {
    /// `size` bytes of zeroed RAM (rounded up to pages). Page 0 is never handed out.
    pub fn new(size: u64) -> Arc<Self> {
        let size = size.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing;
        // no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of fake guest RAM failed");
        Arc::new(Self {
            base: NonNull::new(p.cast()).expect("mmap returned null"),
            size,
            next_pfn: AtomicU64::new(1),
        })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether host address `p` lies inside this RAM (to check zero-copy paths).
    pub fn contains(&self, p: *const u8) -> bool {
        let base = self.base.as_ptr() as usize;
        (base..base + self.size as usize).contains(&(p as usize))
    }

    /// Allocate `n` zeroed, contiguous pages; returns the first PFN. Panics when RAM runs
    /// out (a test bug).
    pub fn alloc_pages(&self, n: u64) -> u64 {
        let pfn = self.next_pfn.fetch_add(n, Ordering::SeqCst);
        assert!((pfn + n) * PAGE <= self.size, "fake guest RAM exhausted");
        pfn
    }

    /// Allocate `n` pages none of which follows the previous one (a page-cache-like
    /// scattered buffer).
    pub fn alloc_scattered(&self, n: u64) -> Vec<u64> {
        let first = self.alloc_pages(2 * n);
        (0..n).map(|i| first + 2 * (n - 1 - i)).collect()
    }

    fn check(&self, gpa: u64, len: u64) -> Result<usize, GuestRamError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(gpa as usize),
            _ => Err(GuestRamError { gpa, len }),
        }
    }

    fn atomic(&self, gpa: u64) -> Result<&AtomicU32, GuestRamError> {
        let off = self.check(gpa, 4)?;
        if gpa % 4 != 0 {
            return Err(GuestRamError { gpa, len: 4 });
        }
        // SAFETY: in bounds and 4-aligned (the mapping is page aligned); the memory lives as
        // long as `self`, and ring indices are only accessed atomically.
        Ok(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(off).cast()) })
    }
}

impl Drop for MappedGuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`; nothing uses it after drop
        // (the object owns it and every user holds an `Arc`).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.size as usize);
        }
    }
}

impl GuestRam for MappedGuestRam {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.check(gpa, len).is_ok()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError> {
        let off = self.check(gpa, buf.len() as u64)?;
        // SAFETY: `off..off + len` is inside the mapping (checked); `buf` is host memory
        // distinct from it.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError> {
        let off = self.check(gpa, data.len() as u64)?;
        // SAFETY: as in `read`, in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(off), data.len())
        };
        Ok(())
    }

    fn load_u32(&self, gpa: u64) -> Result<u32, GuestRamError> {
        Ok(self.atomic(gpa)?.load(Ordering::Acquire))
    }

    fn store_u32(&self, gpa: u64, value: u32) -> Result<(), GuestRamError> {
        self.atomic(gpa)?.store(value, Ordering::Release);
        Ok(())
    }
}

// SAFETY: pointers are inside the mapping (bounds-checked), which lives as long as `self`,
// and it is the same memory `GuestRam` reads and writes.
unsafe impl GuestMemoryMap for MappedGuestRam {
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
        let off = self.check(gpa, len as u64).ok()?;
        // SAFETY: `off` is within the mapping.
        NonNull::new(unsafe { self.base.as_ptr().add(off) })
    }
}

/// A posted message: (VP, SINT) → (message type, payload).
type Slot = ((u32, u8), (u32, Vec<u8>));

#[derive(Default)]
struct SynicState {
    slots: Vec<Slot>,
    /// Set event flags (few: one per open channel at most).
    flags: Vec<(u32, u8, u32)>,
    /// Threads waiting (wake-ups are system calls: skip them when nobody waits).
    waiters: usize,
}

/// A SynIC with one message slot per SINT per VP; event flags are set and waited for under
/// one lock, so a wait never misses a signal.
///
/// Waiting for an event flag can model KVM's halt polling ([`set_halt_polling`]): a
/// vCPU that halts waiting for an interrupt is not put to sleep at once; KVM polls for
/// the interrupt first, for an adaptive window up to `halt_poll_ns` (200 µs by default on
/// x86; the worker's VMs have their HLT handled in KVM, so they get it). The window
/// adapts as KVM's does (see [`PollWindow`](crate::poll::PollWindow)), and the poll
/// yields the CPU on each turn, as KVM stops polling when another task is runnable on that
/// CPU (`single_task_running`). Off unless set, so tests do not spin.
///
/// [`set_halt_polling`]: QuickSynic::set_halt_polling
#[derive(Default)]
pub struct QuickSynic {
    state: Mutex<SynicState>,
    cond: Condvar,
    signals: AtomicU64,
    halt_poll: Mutex<Option<crate::poll::PollWindow>>,
}

impl QuickSynic {
    /// A new SynIC.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SynicState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the message in `vp`'s slot for `sint`.
    pub fn take_message(&self, vp: u32, sint: u8) -> Option<(u32, Vec<u8>)> {
        let mut s = self.lock();
        let i = s.slots.iter().position(|(k, _)| *k == (vp, sint))?;
        Some(s.slots.swap_remove(i).1)
    }

    /// Test and clear an event flag.
    pub fn take_event(&self, vp: u32, sint: u8, flag: u32) -> bool {
        let mut s = self.lock();
        match s.flags.iter().position(|&f| f == (vp, sint, flag)) {
            Some(i) => {
                s.flags.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Poll event waits for up to `max` first, as KVM's halt polling does (`ZERO`: never).
    pub fn set_halt_polling(&self, max: Duration) {
        *self.halt_poll.lock().unwrap_or_else(|e| e.into_inner()) =
            (!max.is_zero()).then(|| crate::poll::PollWindow::new(max));
    }

    /// Wait up to `timeout` until event flag `flag` of `vp`/`sint` is set (it stays set).
    pub fn wait_event(&self, vp: u32, sint: u8, flag: u32, timeout: Duration) {
        let key = (vp, sint, flag);
        let window = self
            .halt_poll
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|w| w.window());
        if let Some(window) = window.filter(|w| !w.is_zero()) {
            let until = Instant::now() + window;
            let seen = self.signals.load(Ordering::Acquire);
            if self.lock().flags.contains(&key) {
                return;
            }
            while Instant::now() < until {
                // The lock is taken only when some signal came.
                if self.signals.load(Ordering::Acquire) != seen && self.lock().flags.contains(&key)
                {
                    return;
                }
                std::thread::yield_now();
            }
        }
        let mut s = self.lock();
        let mut deadline = None;
        let slept = Instant::now();
        let mut blocked = false;
        while !s.flags.contains(&key) {
            let d = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            let now = Instant::now();
            if now >= d {
                return;
            }
            s.waiters += 1;
            blocked = true;
            s = self
                .cond
                .wait_timeout(s, d - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            s.waiters -= 1;
        }
        drop(s);
        if blocked {
            if let Some(w) = self
                .halt_poll
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                w.slept(slept.elapsed());
            }
        }
    }

    /// Wait up to `timeout` until `vp` has a message or an event flag pending.
    pub fn wait(&self, vp: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        loop {
            if s.slots.iter().any(|(k, _)| k.0 == vp) || s.flags.iter().any(|k| k.0 == vp) {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            s.waiters += 1;
            s = self
                .cond
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            s.waiters -= 1;
        }
    }

    /// Event signals received.
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }
}

impl GuestSynic for QuickSynic {
    fn post_message(&self, vp: u32, sint: u8, message_type: u32, payload: &[u8]) -> Result<(), ()> {
        let mut s = self.lock();
        if s.slots.iter().any(|(k, _)| *k == (vp, sint)) {
            return Err(());
        }
        s.slots.push(((vp, sint), (message_type, payload.to_vec())));
        let wake = s.waiters > 0;
        drop(s);
        if wake {
            self.cond.notify_all();
        }
        Ok(())
    }

    fn signal_event(&self, vp: u32, sint: u8, flag: u32) {
        let mut s = self.lock();
        if !s.flags.contains(&(vp, sint, flag)) {
            s.flags.push((vp, sint, flag));
        }
        let wake = s.waiters > 0;
        drop(s);
        // After the flag is set: a halt-polling waiter that sees the count change finds it.
        self.signals.fetch_add(1, Ordering::Release);
        if wake {
            self.cond.notify_all();
        }
    }
}

/// The guest's hypervisor interface on VP `vp`, talking straight to a [`VmbusServer`].
#[derive(Clone)]
pub struct QuickGuest {
    /// The server.
    pub server: Arc<VmbusServer>,
    /// The SynIC the server posts into.
    pub synic: Arc<QuickSynic>,
    /// This guest's VP.
    pub vp: u32,
    start: Instant,
}

impl HvGuest for QuickGuest {
    fn post_message(&mut self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16 {
        self.server
            .post_message(self.vp, connection_id, message_type, payload)
    }
    fn signal_event(&mut self, connection_id: u32, flag: u16) -> u16 {
        self.server.signal_event(self.vp, connection_id, flag)
    }
    fn take_message(
        &mut self,
        sint: u8,
        buf: &mut [u8; vmbus_client::vmbus_protocol::MAX_MESSAGE_SIZE],
    ) -> Option<usize> {
        let (_, payload) = self.synic.take_message(self.vp, sint)?;
        let n = payload.len().min(buf.len());
        buf[..n].copy_from_slice(&payload[..n]);
        self.server.message_slot_freed(self.vp);
        Some(n)
    }
    fn take_event(&mut self, sint: u8, flag: u32) -> bool {
        self.synic.take_event(self.vp, sint, flag)
    }
    fn wait(&mut self) {
        self.synic.wait(self.vp, Duration::from_millis(10));
    }
    fn now_ms(&mut self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// A VM for tests: RAM, SynIC and VMBus server.
pub struct TestVm {
    /// Guest RAM.
    pub ram: Arc<MappedGuestRam>,
    /// SynIC.
    pub synic: Arc<QuickSynic>,
    /// VMBus server.
    pub server: Arc<VmbusServer>,
}

impl TestVm {
    /// A VM with `ram_bytes` of RAM and one VP, whose VP does not halt-poll (see
    /// [`QuickSynic::set_halt_polling`]).
    pub fn new(ram_bytes: u64) -> Self {
        let ram = MappedGuestRam::new(ram_bytes);
        let synic = QuickSynic::new();
        let server = Arc::new(
            VmbusServer::new(ServerConfig::default(), synic.clone(), ram.clone())
                .expect("start the VMBus server"),
        );
        Self { ram, synic, server }
    }

    /// The guest's hypervisor interface on VP 0.
    pub fn guest(&self) -> QuickGuest {
        QuickGuest {
            server: self.server.clone(),
            synic: self.synic.clone(),
            vp: 0,
            start: Instant::now(),
        }
    }
}

/// A data buffer in guest RAM: `len` bytes starting `offset` into the first of `pfns`.
#[derive(Clone, Debug)]
pub struct GuestBuf {
    /// Pages.
    pub pfns: Vec<u64>,
    /// Offset into the first page.
    pub offset: u32,
    /// Length.
    pub len: u32,
}

/// A cheap hasher for transaction ids (the default SipHash shows up in benchmark
/// profiles of the fake guest).
#[derive(Clone, Copy, Default)]
pub struct IdHash;

/// [`IdHash`]'s hasher.
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

impl std::hash::BuildHasher for IdHash {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// The completion of a request.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Transaction id.
    pub transaction_id: u64,
    /// The packet (zero-padded if short).
    pub packet: VstorPacket,
    /// Payload length as received.
    pub len: usize,
}

impl Completion {
    /// The SRB part.
    pub fn srb(&self) -> VmScsiRequest {
        body_as(&self.packet)
    }
    /// `srb_status`.
    pub fn srb_status(&self) -> u8 {
        self.srb().srb_status
    }
    /// SCSI status.
    pub fn scsi_status(&self) -> u8 {
        self.srb().scsi_status
    }
    /// `(key, asc, ascq)` of the returned sense data, if any.
    pub fn sense(&self) -> Option<(u8, u8, u8)> {
        let s = self.srb();
        (s.sense_info_length >= 14).then(|| {
            (
                s.cdb_or_sense[2] & 0xf,
                s.cdb_or_sense[12],
                s.cdb_or_sense[13],
            )
        })
    }
    /// Bytes transferred.
    pub fn transferred(&self) -> u32 {
        self.srb().data_transfer_length.get()
    }
}

/// A fake Linux `hv_storvsc` on one controller's channel.
pub struct FakeStorvsc {
    /// The VMBus client (`None` on channels opened through another `FakeStorvsc`'s).
    pub client: Option<VmbusClient<QuickGuest>>,
    /// The hypervisor interface the channel uses.
    pub hv: QuickGuest,
    /// Guest RAM.
    pub ram: Arc<MappedGuestRam>,
    /// The offer.
    pub offer: Offer,
    ch: ClientChannel<GuestRamRing>,
    rx: Vec<u8>,
    /// Completions received and not yet claimed, by transaction id.
    pub pending: HashMap<u64, Completion, IdHash>,
    /// Unsolicited packets (transaction id 0): ENUMERATE_BUS, REMOVE_DEVICE.
    pub unsolicited: Vec<VstorPacket>,
    /// Timeout for every wait.
    pub timeout: Duration,
}

/// A fake storvsc operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    /// VMBus.
    #[error("vmbus: {0}")]
    Client(String),
    /// Nothing arrived in time.
    #[error("timed out waiting for the host")]
    Timeout,
    /// The host answered something unexpected.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

impl From<ClientError> for FakeError {
    fn from(e: ClientError) -> Self {
        FakeError::Client(e.to_string())
    }
}

impl FakeStorvsc {
    /// Connect to VMBus and open the channel of the controller with `instance` (rings of
    /// `ring_pages` pages each way, including the header page).
    pub fn open(vm: &TestVm, instance: Guid, ring_pages: u64) -> Result<Self, FakeError> {
        let mut client = VmbusClient::new(
            vm.guest(),
            ClientConfig {
                timeout_ms: 10_000,
                ..Default::default()
            },
        );
        client.connect()?;
        client.request_offers()?;
        let offer = *client
            .offers()
            .find(|o| o.instance_id == instance && o.sub_channel_index == 0)
            .ok_or_else(|| FakeError::Protocol(format!("no offer with instance {instance:?}")))?;
        Self::open_offer(client, vm.ram.clone(), offer, ring_pages)
    }

    /// Open `offer` on an already connected client.
    pub fn open_offer(
        mut client: VmbusClient<QuickGuest>,
        ram: Arc<MappedGuestRam>,
        offer: Offer,
        ring_pages: u64,
    ) -> Result<Self, FakeError> {
        let mut s = Self::open_with(&mut client, ram, offer, ring_pages)?;
        s.client = Some(client);
        Ok(s)
    }

    /// Open the channel of another controller (`instance`) through this one's VMBus
    /// connection.
    pub fn open_another(&mut self, instance: Guid, ring_pages: u64) -> Result<Self, FakeError> {
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| FakeError::Protocol("no VMBus client on this channel".into()))?;
        let offer = *client
            .offers()
            .find(|o| o.instance_id == instance && o.sub_channel_index == 0)
            .ok_or_else(|| FakeError::Protocol(format!("no offer with instance {instance:?}")))?;
        Self::open_with(client, self.ram.clone(), offer, ring_pages)
    }

    /// Ask for `count` sub-channels (CREATE_SUB_CHANNELS, as Linux's
    /// `handle_multichannel_storage` does) and return the answer.
    pub fn create_sub_channels(
        &mut self,
        count: u16,
        transaction_id: u64,
    ) -> Result<Completion, FakeError> {
        self.control(
            op::CREATE_SUB_CHANNELS,
            &count.to_le_bytes(),
            transaction_id,
        )
    }

    /// The live (not rescinded) sub-channel offers of this channel's device, by index,
    /// waiting up to `within` for `want` of them (fewer are returned when no more come).
    pub fn sub_channel_offers(
        &mut self,
        want: usize,
        within: Duration,
    ) -> Result<Vec<Offer>, FakeError> {
        let primary = self.offer;
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| FakeError::Protocol("no VMBus client on this channel".into()))?;
        let deadline = Instant::now() + within;
        loop {
            client.poll();
            let mut subs: Vec<Offer> = client
                .offers()
                .filter(|o| {
                    o.sub_channel_index != 0
                        && !o.rescinded
                        && o.class_id == primary.class_id
                        && o.instance_id == primary.instance_id
                })
                .copied()
                .collect();
            if subs.len() >= want || Instant::now() > deadline {
                subs.sort_by_key(|o| o.sub_channel_index);
                return Ok(subs);
            }
            client.hv().wait();
        }
    }

    /// Open a sub-channel `offer` (as Linux's `handle_sc_creation`: its own rings, no
    /// initialization) through this channel's VMBus connection.
    pub fn open_sub_channel(&mut self, offer: Offer, ring_pages: u64) -> Result<Self, FakeError> {
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| FakeError::Protocol("no VMBus client on this channel".into()))?;
        Self::open_with(client, self.ram.clone(), offer, ring_pages)
    }

    fn open_with(
        client: &mut VmbusClient<QuickGuest>,
        ram: Arc<MappedGuestRam>,
        offer: Offer,
        ring_pages: u64,
    ) -> Result<Self, FakeError> {
        let total = 2 * ring_pages;
        let first = ram.alloc_pages(total);
        let pfns: Vec<u64> = (first..first + total).collect();
        let s = ring_pages as usize;
        let dyn_ram: Arc<dyn GuestRam> = ram.clone();
        let out = GuestRamRing::new(dyn_ram.clone(), pfns[0], &pfns[1..s])
            .ok_or_else(|| FakeError::Protocol("ring setup".into()))?;
        let inb = GuestRamRing::new(dyn_ram, pfns[s], &pfns[s + 1..])
            .ok_or_else(|| FakeError::Protocol("ring setup".into()))?;
        let ch = ClientChannel::new(&offer, out, inb)?;
        let gpadl = client.create_gpadl(offer.relid, &pfns, (total * PAGE) as u32, 0)?;
        client.open_channel(offer.relid, gpadl, ring_pages as u32, 0, &[0; 24])?;
        Ok(Self {
            client: None,
            hv: client.hv().clone(),
            ram,
            offer,
            ch,
            rx: vec![0; 1 << 16],
            pending: HashMap::default(),
            unsolicited: Vec::new(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Send a raw packet: `payload` in-band, or with GPA-direct `ranges`.
    pub fn send_raw(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
        ranges: Option<&[OutgoingGpaRange<'_>]>,
        completion: bool,
    ) -> Result<(), FakeError> {
        let packet = OutgoingPacket {
            kind: match ranges {
                Some(r) => OutgoingKind::GpaDirect(r),
                None => OutgoingKind::InBand,
            },
            flags: if completion {
                vmbus_client::vmbus_ring::FLAG_COMPLETION_REQUESTED
            } else {
                0
            },
            transaction_id,
            payload,
        };
        // Keep draining completions while the ring is full (the host may be waiting for
        // room in ours).
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.ch.try_send(&mut self.hv, &packet) {
                Ok(()) => return Ok(()),
                Err(vmbus_client::vmbus_ring::WriteError::Full { .. }) => {
                    if Instant::now() > deadline {
                        return Err(FakeError::Timeout);
                    }
                    if !self.poll()? {
                        self.idle();
                    }
                }
                Err(e) => return Err(FakeError::Client(e.to_string())),
            }
        }
    }

    /// Receive everything available; `true` if anything arrived.
    pub fn poll(&mut self) -> Result<bool, FakeError> {
        let mut any = false;
        loop {
            let (id, kind_ok, len, pkt) = match self.ch.try_recv(&mut self.hv, &mut self.rx) {
                Ok(p) => (
                    p.transaction_id(),
                    matches!(p.kind(), PacketKind::Completion | PacketKind::InBand),
                    p.payload().len(),
                    VstorPacket::read_padded(p.payload()),
                ),
                Err(vmbus_client::vmbus_ring::ReadError::Empty) => return Ok(any),
                Err(e) => return Err(FakeError::Client(e.to_string())),
            };
            any = true;
            let pkt = pkt.ok_or_else(|| FakeError::Protocol(format!("{len}-byte packet")))?;
            if !kind_ok {
                return Err(FakeError::Protocol("unexpected packet type".into()));
            }
            if id == 0 {
                self.unsolicited.push(pkt);
            } else {
                self.pending.insert(
                    id,
                    Completion {
                        transaction_id: id,
                        packet: pkt,
                        len,
                    },
                );
            }
        }
    }

    /// Wait for anything from the host (or the timeout).
    pub fn wait_any(&mut self) -> Result<(), FakeError> {
        let deadline = Instant::now() + self.timeout;
        while !self.poll()? {
            if Instant::now() > deadline {
                return Err(FakeError::Timeout);
            }
            self.idle();
        }
        Ok(())
    }

    /// Wait briefly for a signal on this channel (then clear it).
    fn idle(&mut self) {
        let relid = self.offer.relid;
        self.hv
            .synic
            .wait_event(self.hv.vp, 2, relid, Duration::from_millis(10));
        self.hv.take_event(2, relid);
    }

    /// Wait for the completion of `transaction_id`.
    pub fn wait_for(&mut self, transaction_id: u64) -> Result<Completion, FakeError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(c) = self.pending.remove(&transaction_id) {
                return Ok(c);
            }
            if Instant::now() > deadline {
                return Err(FakeError::Timeout);
            }
            if !self.poll()? {
                self.idle();
            }
        }
    }

    /// Take any one completion (waiting for it).
    pub fn next_completion(&mut self) -> Result<Completion, FakeError> {
        loop {
            if let Some(&id) = self.pending.keys().next() {
                return Ok(self.pending.remove(&id).expect("present"));
            }
            self.wait_any()?;
        }
    }

    /// Send a control operation and wait for its answer (as `storvsc_execute_vstor_op`).
    pub fn control(
        &mut self,
        operation: u32,
        body: &[u8],
        transaction_id: u64,
    ) -> Result<Completion, FakeError> {
        let mut p = VstorPacket::new(operation, 0);
        p.flags = U32::new(REQUEST_COMPLETION_FLAG);
        let n = body.len().min(p.body.len());
        p.body[..n].copy_from_slice(&body[..n]);
        self.send_raw(transaction_id, p.as_bytes(), None, true)?;
        self.wait_for(transaction_id)
    }

    /// Linux 6.1's `storvsc_channel_init`: BEGIN_INITIALIZATION, QUERY_PROTOCOL_VERSION
    /// (6.2, 6.0, 5.1 until one is accepted), QUERY_PROPERTIES, END_INITIALIZATION. Returns
    /// the version and the properties.
    pub fn init(&mut self) -> Result<(u16, ChannelProperties), FakeError> {
        const INIT_ID: u64 = u64::MAX - 1; // like Linux's VMBUS_RQST_INIT
        let check = |c: &Completion, what: &str| {
            if c.packet.operation.get() != op::COMPLETE_IO || c.packet.status.get() != 0 {
                Err(FakeError::Protocol(format!(
                    "{what}: op {} status {:#x}",
                    c.packet.operation.get(),
                    c.packet.status.get()
                )))
            } else if c.len < crate::protocol::PACKET_SIZE {
                Err(FakeError::Protocol(format!(
                    "{what}: {}-byte answer",
                    c.len
                )))
            } else {
                Ok(())
            }
        };
        let c = self.control(op::BEGIN_INITIALIZATION, &[], INIT_ID)?;
        check(&c, "BEGIN_INITIALIZATION")?;
        let mut version = None;
        for v in SUPPORTED_VERSIONS {
            let body = ProtocolVersion {
                major_minor: U16::new(v),
                revision: U16::new(0),
            };
            let c = self.control(op::QUERY_PROTOCOL_VERSION, body.as_bytes(), INIT_ID)?;
            if c.packet.operation.get() != op::COMPLETE_IO {
                return Err(FakeError::Protocol("version answer".into()));
            }
            if c.packet.status.get() == 0 {
                version = Some(v);
                break;
            }
        }
        let version = version.ok_or_else(|| FakeError::Protocol("no version".into()))?;
        let c = self.control(op::QUERY_PROPERTIES, &[], INIT_ID)?;
        check(&c, "QUERY_PROPERTIES")?;
        let props: ChannelProperties = body_as(&c.packet);
        let c = self.control(op::END_INITIALIZATION, &[], INIT_ID)?;
        check(&c, "END_INITIALIZATION")?;
        Ok((version, props))
    }

    /// Allocate a buffer of `len` bytes starting `offset` into its first page, contiguous
    /// or scattered.
    pub fn alloc_buf(&self, len: u32, offset: u32, scattered: bool) -> GuestBuf {
        let pages = (u64::from(offset) + u64::from(len)).div_ceil(PAGE).max(1);
        let pfns = if scattered {
            self.ram.alloc_scattered(pages)
        } else {
            let f = self.ram.alloc_pages(pages);
            (f..f + pages).collect()
        };
        GuestBuf { pfns, offset, len }
    }

    /// Copy `data` into `buf` at `at`.
    pub fn fill(&self, buf: &GuestBuf, at: usize, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let pos = buf.offset as u64 + (at + done) as u64;
            let page = (pos / PAGE) as usize;
            let n = ((PAGE - pos % PAGE) as usize).min(data.len() - done);
            self.ram
                .write(buf.pfns[page] * PAGE + pos % PAGE, &data[done..done + n])
                .expect("buffer in RAM");
            done += n;
        }
    }

    /// Read `len` bytes of `buf` at `at`.
    pub fn read(&self, buf: &GuestBuf, at: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let pos = buf.offset as u64 + (at + done) as u64;
            let page = (pos / PAGE) as usize;
            let n = ((PAGE - pos % PAGE) as usize).min(len - done);
            self.ram
                .read(buf.pfns[page] * PAGE + pos % PAGE, &mut out[done..done + n])
                .expect("buffer in RAM");
            done += n;
        }
        out
    }

    /// The EXECUTE_SRB packet for `cdb` at `lun` (path 0, target 0), as Linux builds it.
    pub fn srb_packet(lun: u8, cdb: &[u8], direction: u8, data_len: u32) -> VstorPacket {
        let mut srb = VmScsiRequest {
            length: U16::new(crate::protocol::BODY_SIZE as u16),
            lun,
            cdb_length: cdb.len().min(16) as u8,
            sense_info_length: crate::protocol::SENSE_BUFFER_SIZE as u8,
            data_in: direction,
            data_transfer_length: U32::new(data_len),
            time_out_value: U32::new(60),
            ..Default::default()
        };
        let n = cdb.len().min(16);
        srb.cdb_or_sense[..n].copy_from_slice(&cdb[..n]);
        let mut p = VstorPacket::new(op::EXECUTE_SRB, 0);
        p.flags = U32::new(REQUEST_COMPLETION_FLAG);
        set_body(&mut p, &srb);
        p
    }

    /// Send `packet` with `buf` as its GPA-direct buffer (in-band when `None`).
    pub fn submit_packet(
        &mut self,
        transaction_id: u64,
        packet: &VstorPacket,
        buf: Option<&GuestBuf>,
    ) -> Result<(), FakeError> {
        match buf {
            Some(b) => {
                let ranges = [OutgoingGpaRange {
                    byte_count: b.len,
                    byte_offset: b.offset,
                    pfns: &b.pfns,
                }];
                self.send_raw(transaction_id, packet.as_bytes(), Some(&ranges), true)
            }
            None => self.send_raw(transaction_id, packet.as_bytes(), None, true),
        }
    }

    /// Send an SRB (asynchronously).
    pub fn submit(
        &mut self,
        transaction_id: u64,
        lun: u8,
        cdb: &[u8],
        direction: u8,
        buf: Option<&GuestBuf>,
    ) -> Result<(), FakeError> {
        let p = Self::srb_packet(lun, cdb, direction, buf.map_or(0, |b| b.len));
        self.submit_packet(transaction_id, &p, buf)
    }

    /// Run a data-in (or no-data when `len` is 0) command; returns the completion and the
    /// bytes it transferred.
    pub fn command_in(
        &mut self,
        lun: u8,
        cdb: &[u8],
        len: u32,
    ) -> Result<(Completion, Vec<u8>), FakeError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        if len == 0 {
            self.submit(id, lun, cdb, data_in::UNKNOWN, None)?;
            return Ok((self.wait_for(id)?, Vec::new()));
        }
        let buf = self.alloc_buf(len, 0, false);
        self.submit(id, lun, cdb, data_in::READ, Some(&buf))?;
        let c = self.wait_for(id)?;
        let n = (c.transferred() as usize).min(len as usize);
        Ok((c.clone(), self.read(&buf, 0, n)))
    }

    /// Run a data-out command with `data`.
    pub fn command_out(
        &mut self,
        lun: u8,
        cdb: &[u8],
        data: &[u8],
    ) -> Result<Completion, FakeError> {
        static NEXT: AtomicU64 = AtomicU64::new(1 << 40);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let buf = self.alloc_buf(data.len() as u32, 0, false);
        self.fill(&buf, 0, data);
        self.submit(id, lun, cdb, data_in::WRITE, Some(&buf))?;
        self.wait_for(id)
    }

    /// Close the channel (through `via`'s client when this one has none).
    pub fn close(&mut self, via: Option<&mut FakeStorvsc>) -> Result<(), FakeError> {
        let relid = self.offer.relid;
        let client = match via {
            Some(v) => v.client.as_mut(),
            None => self.client.as_mut(),
        }
        .ok_or_else(|| FakeError::Protocol("no VMBus client".into()))?;
        client.close_channel(relid)?;
        Ok(())
    }
}

/// A READ(16)/WRITE(16) CDB.
pub fn rw16(write: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = if write { 0x8a } else { 0x88 };
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// A READ(10)/WRITE(10) CDB.
pub fn rw10(write: bool, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = if write { 0x2a } else { 0x28 };
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}
