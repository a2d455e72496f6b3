//! The VSP: one synthetic SCSI controller on one VMBus channel.
//!
//! **What it is.** [`StorageController`] is a `vmbus_server::Vsp` (class
//! `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f`). When the guest opens its channel it starts one
//! channel thread and a small pool of worker threads:
//!
//! - the channel thread reads the ring, parses each packet ([`crate::srb`]), answers the
//!   initialization handshake itself, validates each SRB's data buffer ([`GpaList`]) and
//!   queues it to the workers (a bounded queue: when it is full the thread stops reading the
//!   ring, and the guest sees its ring fill — backpressure, not memory growth);
//! - each worker takes a request, runs it through the SCSI target ([`crate::scsi`]) against
//!   the addressed LUN's backend, and sends the completion itself. Requests complete out of
//!   order; the transaction id ties each completion to its request.
//!
//! A cloneable [`ControllerHandle`] adds and removes LUNs while the guest runs; each change
//! sends the unsolicited ENUMERATE_BUS (transaction id 0) that makes Linux rescan: new LUNs
//! appear, removed ones fail TEST UNIT READY with SRB_STATUS_INVALID_LUN and are dropped.
//! (Linux handles the host's REMOVE_DEVICE exactly like ENUMERATE_BUS, so removals use
//! ENUMERATE_BUS too; a guest that sends either is refused.) If the guest's ring is full the
//! notification is retried by the channel thread; if the guest has not finished
//! initializing, none is needed (it scans when it does).
//!
//! Addressing: LUNs live at path 0, target 0, LUN 0..[`MAX_LUNS`] (Hyper-V's layout; Linux
//! scans channels 0..7 and targets 0..1 and finds nothing elsewhere: INQUIRY answers
//! "no device here", REPORT LUNS an empty list).
//!
//! Multi-queue: QUERY_PROPERTIES reports `STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL` and
//! `max_channel_cnt` = [`ControllerConfig::max_sub_channels`] (0 turns both off). After
//! END_INITIALIZATION Linux sends CREATE_SUB_CHANNELS with min(its CPUs - 1, that count); the
//! primary's channel thread validates it ([`crate::srb::Session`]: after initialization,
//! 1..=max, once per opening; anything else gets an error status) and asks the VMBus server
//! to offer that many sub-channels (`Channel::offer_sub_channels`, which never waits), then
//! completes the request. The server offers them (same class and instance GUIDs,
//! `sub_channel_index` 1..N, their own relids); Linux opens each with its own rings and
//! sends SRBs on it without any initialization. Each opened sub-channel
//! (`Vsp::open_sub_channel`) gets its own channel thread and worker pool, exactly like the
//! primary, over the same LUNs; its session starts with the primary's protocol version, and
//! every completion goes back on the channel its request came in on. Unsolicited
//! ENUMERATE_BUS goes on the primary only. When the primary closes, the server closes (and
//! rescinds) the sub-channels first (`Vsp::close_sub_channel`), so no sub-channel thread
//! outlives its primary's opening.
//!
//! **Never.** Blocks the VMBus control thread (`open` spawns, `close` joins threads that are
//! already stopping; backend I/O in flight finishes first), lets a guest grow its memory
//! (bounded queue, per-request state bounded by the packet), or answers a request twice or
//! not at all while the channel is open.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use disk::BlockBackend;
use vmbus_server::{
    Channel, ChannelError, Guid, OutgoingPacket, Packet, PacketKind, TrySendError, Vsp,
};

use crate::buffer::{GpaList, GuestBuffer, GuestMemoryMap, RangeRef};
use crate::poll::PollWindow;
use crate::protocol::{srb_status, REQUEST_COMPLETION_FLAG, SCSI_CLASS_ID};
use crate::scsi::{self, LunError, Scratch, ScsiDisk, Sense};
use crate::srb::{self, Properties, Request, Session, SrbRequest};

/// LUNs per controller (Hyper-V's limit: 64 disks per SCSI controller).
pub const MAX_LUNS: u8 = 64;

/// [`ControllerConfig::max_sub_channels`] by default: a small fixed number (the guest
/// takes min(its CPUs - 1, this)); the worker passes min(VPs - 1, 8) instead.
pub const DEFAULT_MAX_SUB_CHANNELS: u16 = 8;

/// [`ControllerConfig::poll_max`] by default: QEMU's iothreads poll up to 32 µs; thread
/// wake-ups cost more under nested virtualization.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(50);

/// How a controller is set up.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Instance GUID of the offer (see [`instance_id`]).
    pub instance_id: Guid,
    /// Worker threads per open channel (at least 1) when its LUNs use the host's cache:
    /// their I/O is mostly a memcpy, so more threads than CPUs only contend.
    pub workers: usize,
    /// Worker threads per open channel (at least `workers`) when, as the channel opens, some
    /// LUN is unbuffered ([`disk::BlockBackend::unbuffered`]): a worker then waits for the
    /// device, and the device is only kept as busy as the guest asks (its queue depth) if
    /// as many requests can wait at once.
    pub unbuffered_workers: usize,
    /// Requests parsed but not yet taken by a worker, at most (at least 1).
    pub queue_limit: usize,
    /// Per-request transfer limit reported to the guest (QUERY_PROPERTIES, VPD 0xB0);
    /// rounded down to pages, at least one page.
    pub max_transfer_bytes: u32,
    /// Direct access to guest RAM for zero-copy transfers; `None`: copy through the
    /// channel's `GuestRam`.
    pub guest_memory: Option<Arc<dyn GuestMemoryMap>>,
    /// Sub-channels the guest may open (QUERY_PROPERTIES' `max_channel_cnt`); 0 reports
    /// no multi-channel support. At most [`vmbus_server::MAX_SUB_CHANNELS`]. Each opened
    /// sub-channel costs one channel thread and `workers` worker threads. The worker sets
    /// min(VPs - 1, 8); Linux itself opens at most its CPUs - 1.
    pub max_sub_channels: u16,
    /// How long a channel thread may poll its ring before sleeping, at most (adaptive: see
    /// [`crate::poll`]); `Duration::ZERO` turns polling off.
    pub poll_max: Duration,
}

impl ControllerConfig {
    /// Defaults for a controller with this instance id: 4 workers (32 for unbuffered
    /// LUNs, the queue depth Linux's storvsc keeps per channel), 256 queued requests,
    /// 1 MiB per request, no direct mapping, up to [`DEFAULT_MAX_SUB_CHANNELS`]
    /// sub-channels, polling for up to [`DEFAULT_POLL_MAX`].
    pub fn new(instance_id: Guid) -> Self {
        Self {
            instance_id,
            workers: 4,
            unbuffered_workers: 32,
            queue_limit: 256,
            max_transfer_bytes: 1 << 20,
            guest_memory: None,
            max_sub_channels: DEFAULT_MAX_SUB_CHANNELS,
            poll_max: DEFAULT_POLL_MAX,
        }
    }
}

impl std::fmt::Debug for ControllerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerConfig")
            .field("instance_id", &self.instance_id)
            .field("workers", &self.workers)
            .field("unbuffered_workers", &self.unbuffered_workers)
            .field("queue_limit", &self.queue_limit)
            .field("max_transfer_bytes", &self.max_transfer_bytes)
            .field("direct", &self.guest_memory.is_some())
            .field("max_sub_channels", &self.max_sub_channels)
            .field("poll_max", &self.poll_max)
            .finish()
    }
}

/// The instance GUID of controller `index` of a VM whose seed is `seed` (e.g. its UUID
/// bytes): stable for a given seed and index, different across VMs and controllers. An
/// RFC 9562 version-8 (custom) UUID.
pub fn instance_id(seed: &[u8], index: u32) -> Guid {
    fn fnv(mut h: u64, parts: &[&[u8]]) -> u64 {
        for p in parts {
            for &b in *p {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
    let tag: &[u8] = b"verdigris-storvsp-controller";
    let idx = index.to_le_bytes();
    let hi = fnv(0xcbf2_9ce4_8422_2325, &[tag, &idx, seed]);
    let lo = fnv(0x6c62_272e_07bb_0142, &[seed, tag, &idx]);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi.to_be_bytes());
    b[8..].copy_from_slice(&lo.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC variant
    Guid::from_fields(
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]),
        [b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]],
    )
}

/// How a LUN is presented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LunOptions {
    /// Refuse writes (DATA PROTECT), whatever the backend allows.
    pub read_only: bool,
    /// Advertise and perform UNMAP (thin provisioning). Ignored when read-only.
    pub unmap: bool,
}

impl Default for LunOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            unmap: true,
        }
    }
}

/// A LUN request failed.
#[derive(Debug, thiserror::Error)]
pub enum StorError {
    /// LUN number out of range.
    #[error("LUN {0} is out of range (a controller has LUNs 0 to {max})", max = MAX_LUNS - 1)]
    LunOutOfRange(u8),
    /// The LUN is taken.
    #[error("LUN {0} is already in use on this controller")]
    LunInUse(u8),
    /// No such LUN.
    #[error("no disk at LUN {0} on this controller")]
    NoSuchLun(u8),
    /// The disk cannot be presented.
    #[error(transparent)]
    Lun(#[from] LunError),
}

/// One LUN as [`ControllerHandle::luns`] lists it.
#[derive(Clone, Debug)]
pub struct LunInfo {
    /// LUN number.
    pub lun: u8,
    /// Capacity in bytes.
    pub size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Writes refused.
    pub read_only: bool,
    /// UNMAP advertised.
    pub unmap: bool,
}

/// Counters (since the controller was created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControllerStats {
    /// SRBs completed (GOOD or not).
    pub requests: u64,
    /// SRBs completed with CHECK CONDITION or refused.
    pub errors: u64,
    /// Bytes read by the guest.
    pub bytes_read: u64,
    /// Bytes written by the guest.
    pub bytes_written: u64,
    /// ENUMERATE_BUS notifications sent.
    pub rescans: u64,
    /// Times the channel was opened.
    pub opens: u64,
    /// Times a sub-channel was opened.
    pub sub_channel_opens: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    rescans: AtomicU64,
    opens: AtomicU64,
    sub_channel_opens: AtomicU64,
}

/// The open channel as the host side sees it (for unsolicited notifications).
struct Link {
    channel: Channel,
    /// END_INITIALIZATION done on this opening.
    ready: AtomicBool,
}

struct Shared {
    config: ControllerConfig,
    /// The protocol version the primary negotiated (0: none yet); sub-channels start
    /// their sessions with it.
    version: AtomicU32,
    luns: RwLock<BTreeMap<u8, Arc<ScsiDisk>>>,
    link: Mutex<Option<Arc<Link>>>,
    rescan_pending: AtomicBool,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn lun(&self, lun: u8) -> Option<Arc<ScsiDisk>> {
        self.luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lun)
            .cloned()
    }

    /// Worker threads for a channel opening now (see [`ControllerConfig::unbuffered_workers`];
    /// a LUN added later is served by the pool its channel already has).
    fn pool_size(&self) -> usize {
        let unbuffered = self
            .luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|d| d.backend().unbuffered());
        if unbuffered {
            self.config.unbuffered_workers
        } else {
            self.config.workers
        }
    }

    fn lun_numbers(&self) -> Vec<u8> {
        self.luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Send a pending ENUMERATE_BUS if the guest can take it now. Called from the host's
    /// handle and from the channel thread; whoever claims the pending flag sends.
    fn flush_rescan(&self) {
        if self
            .rescan_pending
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let link = lock(&self.link).clone();
        let Some(link) = link.filter(|l| l.ready.load(Ordering::SeqCst)) else {
            // Not open or not initialized: the guest scans when it initializes.
            return;
        };
        let p = srb::enumerate_bus();
        match link
            .channel
            .try_send(&OutgoingPacket::in_band(0, srb::bytes(&p), false))
        {
            Ok(()) => {
                self.counters.rescans.fetch_add(1, Ordering::Relaxed);
            }
            // The channel thread retries when the guest makes room.
            Err(TrySendError::Full) => self.rescan_pending.store(true, Ordering::SeqCst),
            Err(TrySendError::Channel(_)) => {}
        }
    }
}

/// The host's handle on a controller: LUNs and counters. Cheap to clone, thread-safe.
#[derive(Clone)]
pub struct ControllerHandle {
    shared: Arc<Shared>,
}

impl ControllerHandle {
    /// Attach `backend` at `lun`. If the guest is running it is told to rescan.
    pub fn add_lun(
        &self,
        lun: u8,
        backend: Arc<dyn BlockBackend>,
        options: LunOptions,
    ) -> Result<(), StorError> {
        if lun >= MAX_LUNS {
            return Err(StorError::LunOutOfRange(lun));
        }
        let disk = ScsiDisk::new(
            backend,
            options.read_only,
            options.unmap,
            self.shared.config.max_transfer_bytes,
        )?;
        {
            let mut luns = self.shared.luns.write().unwrap_or_else(|e| e.into_inner());
            if luns.contains_key(&lun) {
                return Err(StorError::LunInUse(lun));
            }
            luns.insert(lun, Arc::new(disk));
        }
        self.notify_rescan();
        Ok(())
    }

    /// Detach the disk at `lun` and return its backend (requests in flight finish on it).
    /// If the guest is running it is told to rescan.
    pub fn remove_lun(&self, lun: u8) -> Result<Arc<dyn BlockBackend>, StorError> {
        let disk = self
            .shared
            .luns
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lun)
            .ok_or(StorError::NoSuchLun(lun))?;
        self.notify_rescan();
        Ok(disk.backend().clone())
    }

    /// The attached LUNs, ascending.
    pub fn luns(&self) -> Vec<LunInfo> {
        self.shared
            .luns
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(&lun, d)| LunInfo {
                lun,
                size: d.blocks() * u64::from(d.block_size()),
                block_size: d.block_size(),
                read_only: d.read_only(),
                unmap: d.unmap(),
            })
            .collect()
    }

    /// The controller's instance GUID.
    pub fn instance_id(&self) -> Guid {
        self.shared.config.instance_id
    }

    /// Counters.
    pub fn stats(&self) -> ControllerStats {
        let c = &self.shared.counters;
        ControllerStats {
            requests: c.requests.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            rescans: c.rescans.load(Ordering::Relaxed),
            opens: c.opens.load(Ordering::Relaxed),
            sub_channel_opens: c.sub_channel_opens.load(Ordering::Relaxed),
        }
    }

    /// Whether the guest has the channel open and initialized.
    pub fn guest_ready(&self) -> bool {
        lock(&self.shared.link)
            .as_ref()
            .is_some_and(|l| l.ready.load(Ordering::SeqCst))
    }

    /// Tell the guest to rescan the bus (done automatically on LUN changes).
    pub fn notify_rescan(&self) {
        self.shared.rescan_pending.store(true, Ordering::SeqCst);
        self.shared.flush_rescan();
    }
}

/// A request for the workers.
struct Job {
    transaction_id: u64,
    reply: bool,
    req: SrbRequest,
    buf: GpaList,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Workers waiting for a job.
    waiting: usize,
    /// The channel thread waits for room.
    pusher_waiting: bool,
}

/// The bounded queue between the channel thread and the workers.
struct WorkQueue {
    state: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    limit: usize,
    workers: usize,
}

impl WorkQueue {
    fn new(limit: usize, workers: usize) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            limit: limit.max(1),
            workers,
        }
    }

    /// Nothing queued and every worker waiting: the pipeline is idle.
    fn idle(&self) -> bool {
        let s = lock(&self.state);
        s.jobs.is_empty() && s.waiting == self.workers
    }

    /// Queue a job, waiting while the queue is full; `false` once closed.
    fn push(&self, job: Job) -> bool {
        let mut s = lock(&self.state);
        while s.jobs.len() >= self.limit && !s.closed {
            s.pusher_waiting = true;
            s = self.not_full.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.closed {
            return false;
        }
        s.jobs.push_back(job);
        // A wake-up is a system call: only when a worker sleeps.
        let wake = s.waiting > 0;
        drop(s);
        if wake {
            self.not_empty.notify_one();
        }
        true
    }

    /// The next job; `None` once closed and drained.
    fn pop(&self) -> Option<Job> {
        let mut s = lock(&self.state);
        loop {
            if let Some(j) = s.jobs.pop_front() {
                let wake = std::mem::take(&mut s.pusher_waiting);
                drop(s);
                if wake {
                    self.not_full.notify_one();
                }
                return Some(j);
            }
            if s.closed {
                return None;
            }
            s.waiting += 1;
            s = self.not_empty.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiting -= 1;
        }
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }
}

/// Everything the threads of one opened channel (primary or sub-channel) share.
struct ChannelCtx {
    shared: Arc<Shared>,
    channel: Channel,
    /// The primary's link (`None` on a sub-channel).
    link: Option<Arc<Link>>,
    queue: WorkQueue,
}

impl ChannelCtx {
    fn send(&self, transaction_id: u64, packet: &crate::protocol::VstorPacket) {
        match self
            .channel
            .send_completion(transaction_id, srb::bytes(packet))
        {
            Ok(()) | Err(ChannelError::Closed) => {}
            Err(e) => tracing::warn!("storvsp: sending a completion failed: {e}"),
        }
    }

    fn count_reply(&self, p: &crate::protocol::VstorPacket) {
        let c = &self.shared.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        let s: crate::protocol::VmScsiRequest = crate::protocol::body_as(p);
        if s.srb_status != srb_status::SUCCESS {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Run one SRB on a worker.
    fn execute(&self, job: &Job, scratch: &mut Scratch) -> crate::protocol::VstorPacket {
        let Some(cdb) = job.req.cdb() else {
            return srb::reject(
                &job.req,
                srb_status::INVALID_REQUEST,
                Sense::INVALID_FIELD_IN_CDB,
            );
        };
        let (path, target, lun) = job.req.address();
        let on_target = path == 0 && target == 0;
        let disk = if on_target {
            self.shared.lun(lun)
        } else {
            None
        };
        let list = || {
            if on_target {
                self.shared.lun_numbers()
            } else {
                Vec::new()
            }
        };
        let ram = self.channel.guest_ram();
        let map = self.shared.config.guest_memory.as_deref();
        let buf = GuestBuffer::new(&job.buf, &**ram, map);
        let outcome = scsi::execute(cdb, disk.as_deref(), &list, &buf, scratch);
        if outcome.sense.is_none() && outcome.transferred > 0 {
            let c = &self.shared.counters;
            match scsi::cdb::parse(cdb) {
                Ok(scsi::cdb::Command::Read { .. }) => {
                    c.bytes_read
                        .fetch_add(outcome.transferred as u64, Ordering::Relaxed);
                }
                Ok(scsi::cdb::Command::Write { .. }) => {
                    c.bytes_written
                        .fetch_add(outcome.transferred as u64, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        srb::complete(&job.req, &outcome)
    }
}

/// One packet, as the channel thread classified it inside `try_recv_with`.
enum Incoming {
    /// A completion (we request none) or nothing we can answer.
    Ignore,
    /// Too short to be a vstor packet.
    Malformed { transaction_id: u64, reply: bool },
    Control {
        transaction_id: u64,
        reply: bool,
        packet: crate::protocol::VstorPacket,
    },
    Srb {
        transaction_id: u64,
        reply: bool,
        req: SrbRequest,
        buf: Result<GpaList, scsi::BufferError>,
    },
}

fn classify(p: &Packet<'_>, ram: &dyn vmbus_server::GuestRam) -> Incoming {
    if matches!(p.kind(), PacketKind::Completion) {
        return Incoming::Ignore;
    }
    let transaction_id = p.transaction_id();
    let payload = p.payload();
    let vstor_flags = payload
        .get(4..8)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    let reply = p.completion_requested() || vstor_flags & REQUEST_COMPLETION_FLAG != 0;
    match srb::parse(payload) {
        Err(_) => Incoming::Malformed {
            transaction_id,
            reply,
        },
        Ok(Request::Control(packet)) => Incoming::Control {
            transaction_id,
            reply,
            packet,
        },
        Ok(Request::Srb(req)) => {
            let buf = match p.kind() {
                PacketKind::GpaDirect(ranges) => GpaList::new(
                    ranges.iter().map(|r| RangeRef {
                        byte_count: r.byte_count,
                        byte_offset: r.byte_offset,
                        pfns: r.pfns(),
                    }),
                    req.data_len(),
                    ram,
                ),
                // No buffer: a data-less command (whatever data_transfer_length says;
                // commands that need data then find an empty buffer).
                _ => Ok(GpaList::empty()),
            };
            Incoming::Srb {
                transaction_id,
                reply,
                req,
                buf,
            }
        }
    }
}

/// Whether a request may run on the channel thread itself when the pipeline is idle: quick
/// commands and transfers of at most 256 KiB (not flushes, unmaps or WRITE SAME, which may
/// take long while the ring goes unread).
fn runs_inline(job: &Job) -> bool {
    use scsi::cdb::opcode as o;
    let Some(cdb) = job.req.cdb() else {
        return true;
    };
    !matches!(
        cdb[0],
        o::SYNCHRONIZE_CACHE_10
            | o::SYNCHRONIZE_CACHE_16
            | o::UNMAP
            | o::WRITE_SAME_10
            | o::WRITE_SAME_16
    ) && job.buf.len() <= 256 << 10
}

/// The channel thread: reads the ring, answers control packets, validates SRBs and hands
/// them to the workers. When the ring holds a single request and every worker is idle
/// (queue depth 1), it runs that request itself: a thread hand-off less per request.
fn channel_thread(ctx: Arc<ChannelCtx>) {
    let primary = ctx.link.is_some();
    let mut session = if primary {
        Session::new()
    } else {
        let v = ctx.shared.version.load(Ordering::SeqCst);
        Session::sub_channel(u16::try_from(v).ok().filter(|&v| v != 0))
    };
    let props = Properties {
        max_transfer_bytes: ctx.shared.config.max_transfer_bytes,
        max_sub_channels: ctx.shared.config.max_sub_channels,
    };
    let mut scratch = Scratch::default();
    let mut poll = PollWindow::new(ctx.shared.config.poll_max);
    // The last SRB read: dispatched when another packet follows, else maybe run inline.
    let mut held: Option<Job> = None;
    let ram = ctx.channel.guest_ram().clone();
    loop {
        loop {
            let item = match ctx.channel.try_recv_with(|p| classify(p, &*ram)) {
                Ok(Some(i)) => i,
                Ok(None) => break,
                Err(ChannelError::Closed) => return,
                Err(e) => {
                    // The guest broke its ring; nothing more can be read until it reopens.
                    tracing::warn!("storvsp: channel unusable: {e}");
                    return;
                }
            };
            if let Some(j) = held.take() {
                if !ctx.queue.push(j) {
                    return;
                }
            }
            match item {
                Incoming::Ignore => {}
                Incoming::Malformed {
                    transaction_id,
                    reply,
                } => {
                    if reply {
                        ctx.send(
                            transaction_id,
                            &crate::protocol::VstorPacket::new(
                                crate::protocol::op::COMPLETE_IO,
                                crate::protocol::status::INVALID_PARAMETER,
                            ),
                        );
                    }
                }
                Incoming::Control {
                    transaction_id,
                    reply,
                    packet,
                } => {
                    let mut answer = session.control(&packet, &props);
                    if let Some(n) = session.take_sub_channel_request() {
                        if let Err(e) = ctx.channel.offer_sub_channels(n) {
                            tracing::warn!("storvsp: cannot offer {n} sub-channels: {e}");
                            answer.status = zerocopy::little_endian::U32::new(
                                crate::protocol::status::INVALID_DEVICE_STATE,
                            );
                        }
                    }
                    let Some(link) = &ctx.link else {
                        // A sub-channel: no notifications, nothing to share.
                        if reply {
                            ctx.send(transaction_id, &answer);
                        }
                        continue;
                    };
                    link.ready.store(session.ready(), Ordering::SeqCst);
                    ctx.shared
                        .version
                        .store(session.version().map_or(0, u32::from), Ordering::SeqCst);
                    if session.ready()
                        && answer.status.get() == 0
                        && packet.operation.get() == crate::protocol::op::END_INITIALIZATION
                    {
                        // The guest scans on initialization: nothing to announce.
                        ctx.shared.rescan_pending.store(false, Ordering::SeqCst);
                    }
                    if reply {
                        ctx.send(transaction_id, &answer);
                    }
                }
                Incoming::Srb {
                    transaction_id,
                    reply,
                    req,
                    buf,
                } => {
                    let refusal = if !session.accepts_srbs() {
                        Some(srb::not_ready(&req))
                    } else {
                        match buf {
                            Err(_) => Some(srb::reject(
                                &req,
                                srb_status::INVALID_REQUEST,
                                Sense::BAD_DATA_BUFFER,
                            )),
                            Ok(buf) => {
                                held = Some(Job {
                                    transaction_id,
                                    reply,
                                    req,
                                    buf,
                                });
                                None
                            }
                        }
                    };
                    if let Some(r) = refusal {
                        ctx.count_reply(&r);
                        if reply {
                            ctx.send(transaction_id, &r);
                        }
                    }
                }
            }
        }
        if let Some(j) = held.take() {
            if runs_inline(&j) && ctx.queue.idle() {
                run_job(&ctx, &j, &mut scratch);
                // Look at the ring again before waiting.
                continue;
            }
            if !ctx.queue.push(j) {
                return;
            }
        }
        ctx.shared.flush_rescan();
        // Poll only while the workers are idle: with requests in flight their completions
        // make the guest submit anyway, and a spinning thread would take their CPU.
        let window = if ctx.queue.idle() {
            poll.window()
        } else {
            Duration::ZERO
        };
        if poll_ring(&ctx.channel, window) {
            continue;
        }
        let slept = Instant::now();
        let r = if ctx.shared.rescan_pending.load(Ordering::SeqCst) {
            ctx.channel
                .wait_timeout(Duration::from_millis(20))
                .map(|_| ())
        } else {
            ctx.channel.wait()
        };
        if r.is_err() {
            return;
        }
        poll.slept(slept.elapsed());
    }
}

/// Looks at the ring for up to `window` with the guest's signals masked; whether a packet
/// came. Afterwards the guest signals again, and the ring is looked at once more (a packet
/// written while masked came without a signal).
fn poll_ring(channel: &Channel, window: Duration) -> bool {
    if !window.is_zero() {
        channel.set_incoming_interrupt_mask(true);
        let until = Instant::now() + window;
        let mut found = false;
        while Instant::now() < until {
            if channel.has_incoming() || channel.is_closed() {
                found = true;
                break;
            }
            std::hint::spin_loop();
        }
        channel.set_incoming_interrupt_mask(false);
        if found {
            return true;
        }
    }
    channel.has_incoming()
}

fn run_job(ctx: &ChannelCtx, job: &Job, scratch: &mut Scratch) {
    let reply = ctx.execute(job, scratch);
    ctx.count_reply(&reply);
    if job.reply {
        ctx.send(job.transaction_id, &reply);
    }
}

fn worker_thread(ctx: Arc<ChannelCtx>) {
    let mut scratch = Scratch::default();
    while let Some(job) = ctx.queue.pop() {
        if ctx.channel.is_closed() {
            continue;
        }
        run_job(&ctx, &job, &mut scratch);
    }
}

struct Running {
    ctx: Arc<ChannelCtx>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// Start the channel thread and the worker pool of one opened channel. On failure the
    /// threads that did start stop once the channel closes (the server closes it when the
    /// open is refused).
    fn start(shared: &Arc<Shared>, channel: Channel, link: Option<Arc<Link>>) -> Option<Self> {
        let workers = shared.pool_size();
        let ctx = Arc::new(ChannelCtx {
            shared: shared.clone(),
            channel,
            link,
            queue: WorkQueue::new(shared.config.queue_limit, workers),
        });
        let relid = ctx.channel.relid();
        let mut threads = Vec::new();
        let mut spawn = |name: String, f: fn(Arc<ChannelCtx>)| {
            let c = ctx.clone();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || f(c))
                .map(|t| threads.push(t))
        };
        let mut ok = spawn(format!("storvsp{relid}-ch"), channel_thread).is_ok();
        for i in 0..workers {
            ok = ok && spawn(format!("storvsp{relid}-w{i}"), worker_thread).is_ok();
        }
        if !ok {
            tracing::warn!("storvsp: cannot start the channel threads");
            ctx.queue.close();
            return None;
        }
        Some(Self { ctx, threads })
    }

    /// Stop the workers and wait for every thread (the channel is already closing).
    fn stop(self) {
        self.ctx.queue.close();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A synthetic SCSI controller (the VSP). Add it to the VM's `VmbusServer`; keep the
/// [`ControllerHandle`] to change LUNs.
pub struct StorageController {
    shared: Arc<Shared>,
    running: Option<Running>,
    /// Open sub-channels, by index.
    subs: BTreeMap<u16, Running>,
}

impl StorageController {
    /// A controller with no LUNs.
    pub fn new(config: ControllerConfig) -> (Self, ControllerHandle) {
        let mut config = config;
        config.workers = config.workers.max(1);
        config.unbuffered_workers = config.unbuffered_workers.max(config.workers);
        config.queue_limit = config.queue_limit.max(1);
        config.max_transfer_bytes = (config.max_transfer_bytes & !4095).max(4096);
        config.max_sub_channels = config.max_sub_channels.min(vmbus_server::MAX_SUB_CHANNELS);
        let shared = Arc::new(Shared {
            config,
            version: AtomicU32::new(0),
            luns: RwLock::new(BTreeMap::new()),
            link: Mutex::new(None),
            rescan_pending: AtomicBool::new(false),
            counters: Counters::default(),
        });
        (
            Self {
                shared: shared.clone(),
                running: None,
                subs: BTreeMap::new(),
            },
            ControllerHandle { shared },
        )
    }

    /// The host handle (another clone).
    pub fn handle(&self) -> ControllerHandle {
        ControllerHandle {
            shared: self.shared.clone(),
        }
    }

    fn stop(&mut self) {
        // The server closes sub-channels before their primary; this is for drop.
        for (_, r) in std::mem::take(&mut self.subs) {
            r.stop();
        }
        *lock(&self.shared.link) = None;
        self.shared.version.store(0, Ordering::SeqCst);
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

impl Vsp for StorageController {
    fn class_id(&self) -> Guid {
        SCSI_CLASS_ID
    }

    fn instance_id(&self) -> Guid {
        self.shared.config.instance_id
    }

    fn open(&mut self, channel: Channel) -> Result<(), ()> {
        self.stop();
        let link = Arc::new(Link {
            channel: channel.clone(),
            ready: AtomicBool::new(false),
        });
        let running = Running::start(&self.shared, channel, Some(link.clone())).ok_or(())?;
        self.running = Some(running);
        *lock(&self.shared.link) = Some(link);
        self.shared.counters.opens.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn close(&mut self) {
        self.stop();
    }

    fn open_sub_channel(&mut self, index: u16, channel: Channel) -> Result<(), ()> {
        if self.running.is_none() {
            // The server offers sub-channels of an open primary only.
            return Err(());
        }
        if let Some(old) = self.subs.remove(&index) {
            old.stop();
        }
        let running = Running::start(&self.shared, channel, None).ok_or(())?;
        self.subs.insert(index, running);
        self.shared
            .counters
            .sub_channel_opens
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn close_sub_channel(&mut self, index: u16) {
        if let Some(r) = self.subs.remove(&index) {
            r.stop();
        }
    }
}

impl Drop for StorageController {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_stable_and_distinct() {
        let a = instance_id(b"vm-1", 0);
        assert_eq!(a, instance_id(b"vm-1", 0));
        assert_ne!(a, instance_id(b"vm-1", 1));
        assert_ne!(a, instance_id(b"vm-2", 0));
        assert_eq!(a.data3.get() >> 12, 8);
    }
}
