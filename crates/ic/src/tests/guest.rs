//! A fake Linux guest for the IC tests: `vmbus_client` connected in-process to a real
//! `VmbusServer` (fake RAM and SynIC from `vmbus_server::test_support`), answering the IC
//! services the way Linux's `hv_utils` and `hv_kvp_daemon` do (facts from `hv_util.c`,
//! `hv_kvp.c`, `channel_mgmt.c`, `hv_kvp_daemon.c`; our own code), with switches to make it
//! silent, refusing or hostile.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus_client::{ClientChannel, ClientConfig, HvGuest, Offer, VmbusClient};
use vmbus_server::test_support::{FakeGuestRam, FakeSynic, InProcessGuest};
use vmbus_server::{DeviceId, GuestRamRing, OutgoingPacket, ServerConfig, VmbusServer};
use zerocopy::FromBytes;

use crate::protocol::kvp::{
    ExchangeValue, KvpHeader, KEY_FIELD_SIZE, OP_DELETE, OP_ENUMERATE, OP_GET, OP_SET, REG_SZ,
    VALUE_FIELD_SIZE,
};
use crate::protocol::{
    IcMsgHeader, TimesyncData, TimesyncRefData, Version, HV_E_FAIL, HV_S_CONT, HV_S_OK,
    ICFLAG_RESPONSE, ICFLAG_TRANSACTION, IC_HEADER_SIZE, MSGTYPE_HEARTBEAT, MSGTYPE_KVP_EXCHANGE,
    MSGTYPE_NEGOTIATE, MSGTYPE_SHUTDOWN, MSGTYPE_TIMESYNC,
};
use crate::{heartbeat, kvp, shutdown, timesync, Guid, IcVsp};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What the guest sends back instead of its normal answer: `(transaction id, payload,
/// as a completion packet)` for each packet.
pub type Hostile = Box<dyn FnMut(u64, &[u8]) -> Vec<(u64, Vec<u8>, bool)> + Send>;

/// Linux's version lists (newest first).
pub fn linux_versions(class: Guid) -> (Vec<Version>, Vec<Version>) {
    let fw = vec![Version::new(3, 0), Version::new(1, 0)];
    let srv = match class {
        c if c == heartbeat::HEARTBEAT_CLASS => vec![Version::new(3, 0), Version::new(1, 0)],
        c if c == shutdown::SHUTDOWN_CLASS => vec![
            Version::new(3, 2),
            Version::new(3, 1),
            Version::new(3, 0),
            Version::new(1, 0),
        ],
        c if c == timesync::TIMESYNC_CLASS => {
            vec![Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)]
        }
        _ => vec![Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)],
    };
    (fw, srv)
}

/// How the fake guest behaves (changeable while it runs).
pub struct Behavior {
    /// Versions the guest supports per class (default: Linux's).
    pub versions: HashMap<Guid, (Vec<Version>, Vec<Version>)>,
    /// Answer heartbeats.
    pub heartbeat_answers: bool,
    /// Accept shutdown requests (Linux: flags 0-3; 4-5 only with `hibernation`).
    pub shutdown_accepts: bool,
    /// Whether the guest could hibernate.
    pub hibernation: bool,
    /// `hv_kvp_daemon` running: without it the KVP channel is not read at all (as Linux).
    pub kvp_daemon: bool,
    /// The daemon answers HV_E_FAIL to everything (broken daemon).
    pub kvp_daemon_fails: bool,
    /// Classes whose channel the guest does not read at all.
    pub deaf: Vec<Guid>,
    /// Hostile answers per class.
    pub hostile: HashMap<Guid, Hostile>,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            versions: HashMap::new(),
            heartbeat_answers: true,
            shutdown_accepts: true,
            hibernation: false,
            kvp_daemon: true,
            kvp_daemon_fails: false,
            deaf: Vec::new(),
            hostile: HashMap::new(),
        }
    }
}

/// What the guest saw.
#[derive(Default)]
pub struct GuestLog {
    /// Versions chosen per class (last negotiation).
    pub negotiated: HashMap<Guid, Option<(Version, Version)>>,
    /// Heartbeat requests seen.
    pub heartbeats: u64,
    /// Shutdown requests: flags.
    pub shutdowns: Vec<u32>,
    /// Time-sync messages: (service version, flags, parenttime, vmreferencetime).
    pub timesync: Vec<(Version, u8, u64, Option<u64>)>,
    /// The KVP daemon's pools (UTF-8, as the daemon stores them).
    pub pools: [Vec<(String, String)>; 5],
    /// The guest's auto pool (what the daemon generates).
    pub auto_pool: Vec<(String, String)>,
    /// Requests read per class.
    pub requests: HashMap<Guid, u64>,
}

enum Cmd {
    Open(Guid, Sender<Result<(), String>>),
    Close(Guid, Sender<Result<(), String>>),
    Stop,
}

/// The VM side: a server with IC devices and a fake guest on its own thread.
pub struct Harness {
    pub server: Arc<VmbusServer>,
    pub behavior: Arc<Mutex<Behavior>>,
    pub log: Arc<Mutex<GuestLog>>,
    pub devices: HashMap<Guid, DeviceId>,
    cmd: Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Harness {
    /// Start a server with `vsps`, a guest connected with all offers received, and open the
    /// channels of `open`.
    pub fn start(vsps: Vec<IcVsp>, behavior: Behavior, open: &[Guid]) -> Self {
        let ram = FakeGuestRam::new(32 << 20);
        let synic = FakeSynic::new(1);
        let server = Arc::new(
            VmbusServer::new(ServerConfig::default(), synic.clone(), ram.clone()).unwrap(),
        );
        let mut devices = HashMap::new();
        for v in vsps {
            let class = vmbus_server::Vsp::class_id(&v);
            devices.insert(class, server.add_device(Box::new(v)).unwrap());
        }
        let behavior = Arc::new(Mutex::new(behavior));
        let log = Arc::new(Mutex::new(GuestLog {
            auto_pool: vec![
                ("FullyQualifiedDomainName".into(), "guest.example".into()),
                ("IntegrationServicesVersion".into(), "3.1".into()),
                ("OSName".into(), "Debian GNU/Linux".into()),
                ("OSVersion".into(), "6.1.0".into()),
            ],
            ..GuestLog::default()
        }));
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel();
        let thread = {
            let guest = InProcessGuest::new(server.clone(), synic, 0);
            let (behavior, log) = (behavior.clone(), log.clone());
            std::thread::Builder::new()
                .name("fake-guest".into())
                .spawn(move || {
                    let client = VmbusClient::new(
                        guest,
                        ClientConfig {
                            timeout_ms: TIMEOUT.as_millis() as u64,
                            ..ClientConfig::default()
                        },
                    );
                    let mut g = Guest {
                        client,
                        ram,
                        channels: HashMap::new(),
                        behavior,
                        log,
                    };
                    let r = g
                        .client
                        .connect()
                        .and_then(|_| g.client.request_offers())
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    let ok = r.is_ok();
                    let _ = ready_tx.send(r);
                    if ok {
                        g.run(rx);
                    }
                })
                .unwrap()
        };
        ready_rx.recv().unwrap().expect("guest connects");
        let h = Self {
            server,
            behavior,
            log,
            devices,
            cmd: tx,
            thread: Some(thread),
        };
        for &c in open {
            h.open(c).expect("channel opens");
        }
        h
    }

    fn call(&self, make: impl FnOnce(Sender<Result<(), String>>) -> Cmd) -> Result<(), String> {
        let (tx, rx) = channel();
        self.cmd.send(make(tx)).map_err(|e| e.to_string())?;
        rx.recv_timeout(TIMEOUT * 2).map_err(|e| e.to_string())?
    }

    /// The guest opens the channel of `class` (as `vmbus_open` does).
    pub fn open(&self, class: Guid) -> Result<(), String> {
        self.call(|tx| Cmd::Open(class, tx))
    }

    /// The guest closes the channel of `class` and tears its ring GPADL down (driver unload).
    pub fn close(&self, class: Guid) -> Result<(), String> {
        self.call(|tx| Cmd::Close(class, tx))
    }

    pub fn behavior(&self) -> MutexGuard<'_, Behavior> {
        lock(&self.behavior)
    }

    pub fn log(&self) -> MutexGuard<'_, GuestLog> {
        lock(&self.log)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.server.shutdown();
    }
}

struct OpenChannel {
    relid: u32,
    gpadl: u32,
    ch: ClientChannel<GuestRamRing>,
}

struct Guest {
    client: VmbusClient<InProcessGuest>,
    ram: Arc<FakeGuestRam>,
    channels: HashMap<Guid, OpenChannel>,
    behavior: Arc<Mutex<Behavior>>,
    log: Arc<Mutex<GuestLog>>,
}

impl Guest {
    fn run(&mut self, rx: Receiver<Cmd>) {
        loop {
            while let Ok(cmd) = rx.try_recv() {
                match cmd {
                    Cmd::Open(class, tx) => {
                        let _ = tx.send(self.open(class));
                    }
                    Cmd::Close(class, tx) => {
                        let _ = tx.send(self.close(class));
                    }
                    Cmd::Stop => return,
                }
            }
            self.client.poll();
            self.drop_rescinded();
            let classes: Vec<Guid> = self.channels.keys().copied().collect();
            for class in classes {
                self.serve(class);
            }
            self.client.hv().wait();
        }
    }

    fn open(&mut self, class: Guid) -> Result<(), String> {
        if self.channels.contains_key(&class) {
            return Err("already open".into());
        }
        let offer: Offer = self
            .client
            .find_offer(class)
            .filter(|o| !o.rescinded)
            .ok_or("no offer")?;
        // Linux's util rings: one header page and three data pages each way.
        let first = self.ram.alloc_pages(8);
        let pfns: Vec<u64> = (first..first + 8).collect();
        let out = GuestRamRing::new(self.ram.clone(), pfns[0], &pfns[1..4]).ok_or("ring")?;
        let inb = GuestRamRing::new(self.ram.clone(), pfns[4], &pfns[5..8]).ok_or("ring")?;
        let ch = ClientChannel::new(&offer, out, inb).map_err(|e| e.to_string())?;
        let gpadl = self
            .client
            .create_gpadl(offer.relid, &pfns, 8 * 4096, 0)
            .map_err(|e| e.to_string())?;
        self.client
            .open_channel(offer.relid, gpadl, 4, 0, &[])
            .map_err(|e| e.to_string())?;
        self.channels.insert(
            class,
            OpenChannel {
                relid: offer.relid,
                gpadl,
                ch,
            },
        );
        Ok(())
    }

    fn close(&mut self, class: Guid) -> Result<(), String> {
        let c = self.channels.remove(&class).ok_or("not open")?;
        self.client
            .close_channel(c.relid)
            .map_err(|e| e.to_string())?;
        self.client
            .teardown_gpadl(c.relid, c.gpadl)
            .map_err(|e| e.to_string())
    }

    fn drop_rescinded(&mut self) {
        let gone: Vec<Guid> = self
            .channels
            .iter()
            .filter(|(_, c)| self.client.offer(c.relid).is_none_or(|o| o.rescinded))
            .map(|(k, _)| *k)
            .collect();
        for class in gone {
            if let Some(c) = self.channels.remove(&class) {
                let _ = self.client.release_relid(c.relid);
            }
        }
    }

    fn serve(&mut self, class: Guid) {
        let mut buf = vec![0u8; 16384];
        loop {
            let Some(c) = self.channels.get_mut(&class) else {
                return;
            };
            // Look at the switches and read under the lock, so that a test that turns
            // reading off is sure no later request is read.
            let (id, mut payload) = {
                let b = lock(&self.behavior);
                // Linux reads nothing on KVP (not even NEGOTIATE) until the daemon registers.
                if (class == kvp::KVP_CLASS && !b.kvp_daemon) || b.deaf.contains(&class) {
                    return;
                }
                match c.ch.try_recv(self.client.hv(), &mut buf) {
                    Ok(p) => (p.transaction_id(), p.payload().to_vec()),
                    Err(_) => return,
                }
            };
            *lock(&self.log).requests.entry(class).or_default() += 1;
            let hostile = lock(&self.behavior).hostile.remove(&class);
            let out = match hostile {
                Some(mut f) => {
                    let out = f(id, &payload);
                    lock(&self.behavior).hostile.entry(class).or_insert(f);
                    out
                }
                None => match self.answer(class, &mut payload) {
                    true => vec![(id, payload, false)],
                    false => vec![],
                },
            };
            for (id, bytes, completion) in out {
                let pkt = if completion {
                    OutgoingPacket::completion(id, &bytes)
                } else {
                    OutgoingPacket::in_band(id, &bytes, false)
                };
                let c = self.channels.get_mut(&class).expect("still open");
                let _ =
                    c.ch.send(self.client.hv(), &pkt, TIMEOUT.as_millis() as u64);
            }
        }
    }

    /// Answer like Linux, in place; `false` to stay silent.
    fn answer(&mut self, class: Guid, buf: &mut [u8]) -> bool {
        if buf.len() < IC_HEADER_SIZE {
            return false;
        }
        let hdr = IcMsgHeader::read_from_bytes(&buf[8..IC_HEADER_SIZE]).unwrap();
        let msg_type = hdr.icmsgtype.get();
        let mut status = None;
        match msg_type {
            MSGTYPE_NEGOTIATE => {
                let (fw, srv) = lock(&self.behavior)
                    .versions
                    .get(&class)
                    .cloned()
                    .unwrap_or_else(|| linux_versions(class));
                let chosen = negotiate_in_place(buf, &fw, &srv);
                lock(&self.log).negotiated.insert(class, chosen);
            }
            MSGTYPE_HEARTBEAT if class == heartbeat::HEARTBEAT_CLASS => {
                lock(&self.log).heartbeats += 1;
                if !lock(&self.behavior).heartbeat_answers {
                    return false;
                }
                let Some(seq) = buf.get_mut(IC_HEADER_SIZE..IC_HEADER_SIZE + 8) else {
                    return false;
                };
                let n = u64::from_le_bytes(seq.try_into().unwrap()).wrapping_add(1);
                seq.copy_from_slice(&n.to_le_bytes());
            }
            MSGTYPE_SHUTDOWN if class == shutdown::SHUTDOWN_CLASS => {
                let Some(f) = buf.get(IC_HEADER_SIZE + 8..IC_HEADER_SIZE + 12) else {
                    return false;
                };
                let flags = u32::from_le_bytes(f.try_into().unwrap());
                lock(&self.log).shutdowns.push(flags);
                let b = lock(&self.behavior);
                status = Some(match flags {
                    0..=3 if b.shutdown_accepts => HV_S_OK,
                    4 | 5 if b.shutdown_accepts && b.hibernation => HV_S_OK,
                    _ => HV_E_FAIL,
                });
            }
            MSGTYPE_TIMESYNC if class == timesync::TIMESYNC_CLASS => {
                let neg = lock(&self.log).negotiated.get(&class).copied().flatten();
                let Some((_, ver)) = neg else { return false };
                let body = &buf[IC_HEADER_SIZE..];
                let rec = if ver.major >= 4 {
                    let Ok((d, _)) = TimesyncRefData::read_from_prefix(body) else {
                        return false;
                    };
                    (
                        ver,
                        d.flags,
                        d.parenttime.get(),
                        Some(d.vmreferencetime.get()),
                    )
                } else {
                    let Ok((d, _)) = TimesyncData::read_from_prefix(body) else {
                        return false;
                    };
                    (ver, d.flags, d.parenttime.get(), None)
                };
                lock(&self.log).timesync.push(rec);
            }
            MSGTYPE_KVP_EXCHANGE if class == kvp::KVP_CLASS => {
                status = Some(self.kvp(buf));
            }
            _ => status = Some(HV_E_FAIL),
        }
        if let Some(s) = status {
            buf[8 + 12..8 + 16].copy_from_slice(&s.to_le_bytes());
        }
        buf[8 + 17] = ICFLAG_TRANSACTION | ICFLAG_RESPONSE;
        true
    }

    /// The kernel driver plus the daemon, like Linux: strings converted to UTF-8 (truncated
    /// to 511 / 2047 bytes), stored per pool; ENUMERATE answers in UTF-16 (at most 254 /
    /// 1022 units); the auto pool generated.
    fn kvp(&mut self, buf: &mut [u8]) -> u32 {
        if lock(&self.behavior).kvp_daemon_fails {
            return HV_E_FAIL;
        }
        let body = &mut buf[IC_HEADER_SIZE..];
        let Ok((h, _)) = KvpHeader::read_from_prefix(body) else {
            return HV_E_FAIL;
        };
        let pool = usize::from(h.pool);
        if pool >= 5 {
            return HV_E_FAIL;
        }
        let mut log = lock(&self.log);
        match h.operation {
            OP_SET => {
                let Ok((v, _)) = ExchangeValue::read_from_prefix(&body[4..]) else {
                    return HV_E_FAIL;
                };
                let key = utf16_to_utf8(&v.key, v.key_size.get(), KEY_FIELD_SIZE - 1);
                let value = utf16_to_utf8(&v.value, v.value_size.get(), VALUE_FIELD_SIZE - 1);
                let p = &mut log.pools[pool];
                match p.iter_mut().find(|(k, _)| *k == key) {
                    Some(e) => e.1 = value,
                    None => p.push((key, value)),
                }
                HV_S_OK
            }
            OP_DELETE => {
                let size = u32::from_le_bytes(body[4..8].try_into().unwrap());
                let key = utf16_to_utf8(&body[8..8 + KEY_FIELD_SIZE], size, KEY_FIELD_SIZE - 1);
                let p = &mut log.pools[pool];
                match p.iter().position(|(k, _)| *k == key) {
                    Some(i) => {
                        p.remove(i);
                        HV_S_OK
                    }
                    None => HV_S_CONT,
                }
            }
            OP_GET => {
                // Linux finds the key but returns an empty value (see protocol::kvp).
                let Ok((v, _)) = ExchangeValue::read_from_prefix(&body[4..]) else {
                    return HV_E_FAIL;
                };
                let key = utf16_to_utf8(&v.key, v.key_size.get(), KEY_FIELD_SIZE - 1);
                if log.pools[pool].iter().any(|(k, _)| *k == key) {
                    HV_S_OK
                } else {
                    HV_S_CONT
                }
            }
            OP_ENUMERATE => {
                let index = u32::from_le_bytes(body[4..8].try_into().unwrap()) as usize;
                let list = if pool == 2 {
                    &log.auto_pool
                } else {
                    &log.pools[pool]
                };
                let Some((k, v)) = list.get(index).cloned() else {
                    return HV_S_CONT;
                };
                drop(log);
                let d = &mut body[8..];
                d[0..4].copy_from_slice(&REG_SZ.to_le_bytes());
                let ks = utf8_to_utf16(&k, &mut d[12..12 + KEY_FIELD_SIZE], KEY_FIELD_SIZE / 2 - 2);
                d[4..8].copy_from_slice(&ks.to_le_bytes());
                let vs = utf8_to_utf16(
                    &v,
                    &mut d[12 + KEY_FIELD_SIZE..12 + KEY_FIELD_SIZE + VALUE_FIELD_SIZE],
                    VALUE_FIELD_SIZE / 2 - 2,
                );
                d[8..12].copy_from_slice(&vs.to_le_bytes());
                HV_S_OK
            }
            _ => HV_E_FAIL,
        }
    }
}

/// Linux's `vmbus_prep_negotiate_resp`, in place: the first of `fw` / `srv` (ours, newest
/// first) that the host offered; counts 1/1, or 0/0 when nothing matches.
fn negotiate_in_place(
    buf: &mut [u8],
    fw: &[Version],
    srv: &[Version],
) -> Option<(Version, Version)> {
    let b = IC_HEADER_SIZE;
    let nf = usize::from(u16::from_le_bytes([buf[b], buf[b + 1]]));
    let ns = usize::from(u16::from_le_bytes([buf[b + 2], buf[b + 3]]));
    if buf.len() < b + 8 + 4 * (nf + ns).max(2) {
        return None;
    }
    let at = |buf: &[u8], i: usize| {
        let o = b + 8 + 4 * i;
        Version::new(
            u16::from_le_bytes([buf[o], buf[o + 1]]),
            u16::from_le_bytes([buf[o + 2], buf[o + 3]]),
        )
    };
    let offered_fw: Vec<Version> = (0..nf).map(|i| at(buf, i)).collect();
    let offered_srv: Vec<Version> = (nf..nf + ns).map(|i| at(buf, i)).collect();
    let f = fw.iter().find(|v| offered_fw.contains(v)).copied();
    let s = srv.iter().find(|v| offered_srv.contains(v)).copied();
    // icmsgsize = 0x10.
    buf[8 + 10..8 + 12].copy_from_slice(&16u16.to_le_bytes());
    let (count, chosen) = match (f, s) {
        (Some(f), Some(s)) => (1u16, Some((f, s))),
        _ => (0, None),
    };
    buf[b..b + 2].copy_from_slice(&count.to_le_bytes());
    buf[b + 2..b + 4].copy_from_slice(&count.to_le_bytes());
    let (f, s) = chosen.unwrap_or((Version::new(0, 0), Version::new(0, 0)));
    for (i, v) in [f, s].into_iter().enumerate() {
        let o = b + 8 + 4 * i;
        buf[o..o + 2].copy_from_slice(&v.major.to_le_bytes());
        buf[o + 2..o + 4].copy_from_slice(&v.minor.to_le_bytes());
    }
    chosen
}

/// Linux's `utf16s_to_utf8s` as the KVP driver uses it: up to `size` bytes of UTF-16 (stops
/// at NUL), into at most `max` UTF-8 bytes (whole characters only).
fn utf16_to_utf8(field: &[u8], size: u32, max: usize) -> String {
    let n = (size as usize).min(field.len()) / 2;
    let units = (0..n)
        .map(|i| u16::from_le_bytes([field[2 * i], field[2 * i + 1]]))
        .take_while(|&u| u != 0);
    let mut s = String::new();
    for c in char::decode_utf16(units).map(|r| r.unwrap_or('\u{fffd}')) {
        if s.len() + c.len_utf8() > max {
            break;
        }
        s.push(c);
    }
    s
}

/// Linux's `utf8s_to_utf16s` into at most `max_units` units; returns the size field
/// (`2 * (units + 1)`).
fn utf8_to_utf16(s: &str, field: &mut [u8], max_units: usize) -> u32 {
    let mut n = 0;
    for c in s.chars() {
        let mut tmp = [0u16; 2];
        let enc = c.encode_utf16(&mut tmp);
        if n + enc.len() > max_units {
            break;
        }
        for u in enc.iter() {
            field[2 * n..2 * n + 2].copy_from_slice(&u.to_le_bytes());
            n += 1;
        }
    }
    field[2 * n..2 * n + 2].copy_from_slice(&[0, 0]);
    (2 * (n + 1)) as u32
}

/// Poll `f` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
