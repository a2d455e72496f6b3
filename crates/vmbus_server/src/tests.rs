//! The server driven by `vmbus_client` in-process: the client on the test thread, the
//! server's control thread and the VSP threads beside it, guest RAM and SynIC faked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus_client::{ClientChannel, ClientConfig, ClientError, HvGuest, Offer, VmbusClient};
use vmbus_protocol::{
    make_version, msgtype, parse, ChannelMessage, GpadlHeader, Guid, InitiateContact, MessageBuf,
    OpenChannel, HV_MESSAGE_TYPE_VMBUS, VERSION_WIN10, VERSION_WIN10_V5_3, VERSION_WIN8,
};
use vmbus_ring::{OutgoingGpaRange, OutgoingKind, OutgoingPacket, PacketKind};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use crate::test_support::{FakeGuestRam, FakeSynic, InProcessGuest};
use crate::*;

const TIMEOUT_MS: u64 = 5_000;

#[derive(Default)]
struct VspLog {
    opens: u32,
    closes: u32,
    user_data: Vec<u8>,
    errors: Vec<String>,
    /// Packets of kinds the VSP does not answer.
    ignored: u32,
    /// Sub-channels opened / closed, by index.
    sub_opens: Vec<u16>,
    sub_closes: Vec<u16>,
}

/// Echoes in-band packets, completes requests, checksums GPA-direct buffers (and stamps
/// "VSP!" at their start), and optionally floods the guest with `flood` packets on open.
struct EchoVsp {
    class: Guid,
    instance: Guid,
    log: Arc<Mutex<VspLog>>,
    flood: u32,
    refuse: bool,
    /// In `open`, set the first flag and block until the second is set (to stall the
    /// control thread).
    gate: Option<(Arc<AtomicBool>, Arc<AtomicBool>)>,
    /// The serving thread reads nothing until this is set.
    hold_reads: Option<Arc<AtomicBool>>,
    thread: Option<JoinHandle<()>>,
    sub_threads: Vec<(u16, JoinHandle<()>)>,
}

impl EchoVsp {
    fn new(instance: u8) -> (Box<Self>, Arc<Mutex<VspLog>>) {
        let log = Arc::new(Mutex::new(VspLog::default()));
        (
            Box::new(Self {
                class: Guid::from_str_const("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"),
                instance: Guid::from_fields(0x1234_0000 + u32::from(instance), 1, 2, [3; 8]),
                log: log.clone(),
                flood: 0,
                refuse: false,
                gate: None,
                hold_reads: None,
                thread: None,
                sub_threads: Vec::new(),
            }),
            log,
        )
    }
}

fn serve(ch: Channel, log: Arc<Mutex<VspLog>>, flood: u32, hold: Option<Arc<AtomicBool>>) {
    let fail = |e: ChannelError| {
        if e != ChannelError::Closed {
            log.lock().unwrap().errors.push(e.to_string());
        }
    };
    if let Some(hold) = hold {
        while !hold.load(Ordering::SeqCst) {
            if ch.wait_timeout(Duration::from_millis(1)) == Err(ChannelError::Closed) {
                return;
            }
        }
    }
    for i in 0..flood {
        let payload = [i as u8; 200];
        if let Err(e) = ch.send_inband(u64::from(i), &payload, false) {
            return fail(e);
        }
    }
    loop {
        loop {
            let p = match ch.try_recv() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return fail(e),
            };
            let r = match &p.kind {
                // "SUBCH" + count: ask the server for sub-channels; the completion says
                // whether the request was taken.
                IncomingKind::InBand if p.payload.starts_with(b"SUBCH") => {
                    let n = u16::from(p.payload.get(5).copied().unwrap_or(0));
                    let answer: &[u8] = match ch.offer_sub_channels(n) {
                        Ok(()) => b"ok",
                        Err(_) => b"refused",
                    };
                    ch.send_completion(p.transaction_id, answer)
                }
                IncomingKind::InBand => ch
                    .send_inband(p.transaction_id, &p.payload, false)
                    .and_then(|()| {
                        if p.completion_requested() {
                            ch.send_completion(p.transaction_id, b"done")
                        } else {
                            Ok(())
                        }
                    }),
                IncomingKind::GpaDirect(ranges) => {
                    let mut sum = 0u64;
                    let mut res = Ok(());
                    for r in ranges {
                        let mut buf = vec![0u8; r.byte_count as usize];
                        res = ch.read_guest(r, 0, &mut buf);
                        if res.is_err() {
                            break;
                        }
                        sum += buf.iter().map(|&b| u64::from(b)).sum::<u64>();
                        res = ch.write_guest(r, 0, b"VSP!");
                        if res.is_err() {
                            break;
                        }
                    }
                    match res {
                        Ok(()) => ch.send_completion(p.transaction_id, &sum.to_le_bytes()),
                        Err(e) => {
                            log.lock().unwrap().errors.push(e.to_string());
                            ch.send_completion(p.transaction_id, b"BADRANGE")
                        }
                    }
                }
                _ => {
                    log.lock().unwrap().ignored += 1;
                    Ok(())
                }
            };
            if let Err(e) = r {
                return fail(e);
            }
        }
        if let Err(e) = ch.wait() {
            return fail(e);
        }
    }
}

impl Vsp for EchoVsp {
    fn class_id(&self) -> Guid {
        self.class
    }
    fn instance_id(&self) -> Guid {
        self.instance
    }
    fn user_defined(&self) -> [u8; 120] {
        [0x42; 120]
    }
    fn open(&mut self, channel: Channel) -> Result<(), ()> {
        if let Some((entered, release)) = &self.gate {
            entered.store(true, Ordering::SeqCst);
            while !release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if self.refuse {
            return Err(());
        }
        {
            let mut l = self.log.lock().unwrap();
            l.opens += 1;
            l.user_data = channel.user_data().to_vec();
        }
        let log = self.log.clone();
        let flood = self.flood;
        let hold = self.hold_reads.clone();
        self.thread = Some(std::thread::spawn(move || serve(channel, log, flood, hold)));
        Ok(())
    }
    fn close(&mut self) {
        assert!(
            self.sub_threads.is_empty(),
            "sub-channels are closed before their primary"
        );
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.log.lock().unwrap().closes += 1;
    }
    fn open_sub_channel(&mut self, index: u16, channel: Channel) -> Result<(), ()> {
        assert_eq!(channel.sub_channel_index(), index);
        assert!(
            self.thread.is_some(),
            "sub-channels open only while the primary is"
        );
        self.log.lock().unwrap().sub_opens.push(index);
        let log = self.log.clone();
        self.sub_threads.push((
            index,
            std::thread::spawn(move || serve(channel, log, 0, None)),
        ));
        Ok(())
    }
    fn close_sub_channel(&mut self, index: u16) {
        let i = self
            .sub_threads
            .iter()
            .position(|(x, _)| *x == index)
            .expect("closing a sub-channel that is open");
        self.sub_threads.remove(i).1.join().unwrap();
        self.log.lock().unwrap().sub_closes.push(index);
    }
}

struct Harness {
    ram: Arc<FakeGuestRam>,
    synic: Arc<FakeSynic>,
    server: Arc<VmbusServer>,
    client: VmbusClient<InProcessGuest>,
    /// First page of the rings most recently opened (the guest -> host ring header).
    last_ring_pfn: u64,
}

fn harness_with(vp_count: u32, config: ClientConfig, server_config: ServerConfig) -> Harness {
    let ram = FakeGuestRam::new(16 << 20);
    let synic = FakeSynic::new(vp_count);
    let server = Arc::new(
        VmbusServer::new(
            ServerConfig {
                vp_count,
                ..server_config
            },
            synic.clone(),
            ram.clone(),
        )
        .unwrap(),
    );
    let guest = InProcessGuest::new(server.clone(), synic.clone(), 0);
    Harness {
        ram,
        synic,
        server,
        client: VmbusClient::new(guest, config),
        last_ring_pfn: 0,
    }
}

fn harness(vp_count: u32) -> Harness {
    harness_with(
        vp_count,
        ClientConfig {
            timeout_ms: TIMEOUT_MS,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
    )
}

type Ring = ClientChannel<GuestRamRing>;

impl Harness {
    /// Rings (zeroed pages), GPADL, open: returns the channel and the GPADL handle.
    fn open(
        &mut self,
        offer: &Offer,
        send_pages: u64,
        recv_pages: u64,
    ) -> Result<(Ring, u32), ClientError> {
        let total = send_pages + recv_pages;
        let first = self.ram.alloc_pages(total);
        self.last_ring_pfn = first;
        let pfns: Vec<u64> = (first..first + total).collect();
        let s = send_pages as usize;
        let out = GuestRamRing::new(self.ram.clone(), pfns[0], &pfns[1..s]).unwrap();
        let inb = GuestRamRing::new(self.ram.clone(), pfns[s], &pfns[s + 1..]).unwrap();
        let ch = ClientChannel::new(offer, out, inb)?;
        let gpadl = self
            .client
            .create_gpadl(offer.relid, &pfns, (total * 4096) as u32, 0)?;
        self.client
            .open_channel(offer.relid, gpadl, send_pages as u32, 0, b"hello vsp")?;
        Ok((ch, gpadl))
    }

    fn status(&self) -> ServerStatus {
        self.server.status().unwrap()
    }

    fn post_raw(&mut self, conn: u32, bytes: &[u8]) -> u16 {
        self.client
            .hv()
            .post_message(conn, HV_MESSAGE_TYPE_VMBUS, bytes)
    }

    /// Wait for the next message in the slot (raw), up to the timeout.
    fn next_message(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let mut buf = [0u8; 240];
            if let Some(n) = self.client.hv().take_message(2, &mut buf) {
                return Some(buf[..n].to_vec());
            }
            self.client.hv().wait();
        }
        None
    }

    /// Let the control thread process everything posted so far.
    fn sync(&self) {
        let _ = self.status();
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_millis(TIMEOUT_MS);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

type Devices = Vec<(DeviceId, Arc<Mutex<VspLog>>)>;

fn connect_with_devices(n: u8) -> (Harness, Devices) {
    let mut h = harness(2);
    let mut devs = Vec::new();
    for i in 0..n {
        let (vsp, log) = EchoVsp::new(i);
        devs.push((h.server.add_device(vsp).unwrap(), log));
    }
    assert_eq!(h.client.connect().unwrap(), VERSION_WIN10_V5_3);
    assert_eq!(h.client.request_offers().unwrap(), n as usize);
    (h, devs)
}

#[test]
fn full_life_cycle_with_echo_vsp() {
    let (mut h, devs) = connect_with_devices(2);
    assert_eq!(h.client.message_connection_id(), 4);
    // Offers: stable GUIDs, relids from 1, dedicated interrupts, no monitor pages.
    let offers: Vec<Offer> = h.client.offers().copied().collect();
    assert_eq!(offers.len(), 2);
    for (i, o) in offers.iter().enumerate() {
        assert_eq!(o.relid, i as u32 + 1);
        assert_eq!(o.connection_id, channel_connection_id(o.relid));
        assert_eq!(o.instance_id, EchoVsp::new(i as u8).0.instance);
        assert!(o.dedicated_interrupt && !o.monitor_allocated);
        assert_eq!(o.user_defined, [0x42; 120]);
    }
    // 40 + 24 pages: 64 PFNs need a GPADL_HEADER and two GPADL_BODY messages.
    let (mut ch, gpadl) = h.open(&offers[0], 40, 24).unwrap();
    let log = &devs[0].1;
    assert_eq!(log.lock().unwrap().opens, 1);
    assert_eq!(&log.lock().unwrap().user_data[..9], b"hello vsp");
    let st = h.status();
    assert_eq!(st.version, Some(VERSION_WIN10_V5_3));
    assert_eq!(st.channels[0].state, ChannelState::Open);
    assert_eq!(st.channels[1].state, ChannelState::Offered);

    // Echo: in-band request with completion requested -> echo, then completion.
    let hv = h.client.hv();
    let mut buf = vec![0u8; 4096];
    for i in 0..100u64 {
        let msg = format!("ping {i}");
        ch.send(
            hv,
            &OutgoingPacket::in_band(i, msg.as_bytes(), true),
            TIMEOUT_MS,
        )
        .unwrap();
        let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
        assert!(matches!(p.kind(), PacketKind::InBand));
        assert_eq!(p.transaction_id(), i);
        assert_eq!(&p.payload()[..msg.len()], msg.as_bytes());
        let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
        assert!(matches!(p.kind(), PacketKind::Completion));
        assert_eq!(p.transaction_id(), i);
        assert_eq!(&p.payload()[..4], b"done");
    }

    // GPA-direct: a 3-page buffer at an offset; the VSP reads it, answers its checksum and
    // writes into it.
    let data_pfn = h.ram.alloc_pages(3);
    let pattern: Vec<u8> = (0..9000u32).map(|i| (i * 7) as u8).collect();
    h.ram.write(data_pfn * 4096 + 100, &pattern).unwrap();
    let pfns = [data_pfn, data_pfn + 1, data_pfn + 2];
    let ranges = [OutgoingGpaRange {
        byte_count: 9000,
        byte_offset: 100,
        pfns: &pfns,
    }];
    let hv = h.client.hv();
    ch.send(
        hv,
        &OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            flags: vmbus_ring::FLAG_COMPLETION_REQUESTED,
            transaction_id: 0xabc,
            payload: b"read",
        },
        TIMEOUT_MS,
    )
    .unwrap();
    let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
    assert_eq!(p.transaction_id(), 0xabc);
    let expect: u64 = pattern.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(p.payload()[..8], expect.to_le_bytes());
    let mut stamp = [0u8; 4];
    h.ram.read(data_pfn * 4096 + 100, &mut stamp).unwrap();
    assert_eq!(&stamp, b"VSP!");

    // Host -> guest interrupts were sent for the packets.
    assert!(h.status().channels[0].host_signals > 0);
    assert!(h.synic.signals() > 0);

    // Close: the VSP's thread stops; the ring GPADL can then be torn down.
    h.client.close_channel(offers[0].relid).unwrap();
    h.sync();
    assert_eq!(log.lock().unwrap().closes, 1);
    assert!(
        log.lock().unwrap().errors.is_empty(),
        "{:?}",
        log.lock().unwrap().errors
    );
    h.client.teardown_gpadl(offers[0].relid, gpadl).unwrap();
    assert_eq!(h.status().gpadls, 0);

    // Re-open works with fresh rings.
    let (_ch2, _) = h.open(&offers[0], 4, 4).unwrap();
    assert_eq!(log.lock().unwrap().opens, 2);

    // UNLOAD closes everything and answers.
    h.client.unload().unwrap();
    let st = h.status();
    assert_eq!(st.version, None);
    assert_eq!(st.gpadls, 0);
    assert!(st.channels.iter().all(|c| c.state == ChannelState::Pending));
    assert_eq!(log.lock().unwrap().closes, 2);

    // And the guest can come back.
    assert_eq!(h.client.connect().unwrap(), VERSION_WIN10_V5_3);
    assert_eq!(h.client.request_offers().unwrap(), 2);
}

#[test]
fn busy_message_slot_is_retried_in_order() {
    let mut h = harness(1);
    for i in 0..3 {
        let (vsp, _) = EchoVsp::new(i);
        h.server.add_device(vsp).unwrap();
    }
    h.client.connect().unwrap();
    // Ask for offers but leave the slot full for a while: the server must retry, in order.
    let req = MessageBuf::header_only(msgtype::REQUESTOFFERS);
    assert_eq!(h.post_raw(4, req.as_bytes()), 0);
    std::thread::sleep(Duration::from_millis(20));
    // status() is processed after the request: by then the first offer fills the slot.
    assert_eq!(h.status().queued_messages, 3);
    assert!(h.synic.rejected_posts() > 0);
    let mut relids = Vec::new();
    loop {
        let m = h.next_message(Duration::from_secs(5)).expect("message");
        match parse(&m).unwrap() {
            ChannelMessage::OfferChannel(o) => relids.push(o.child_relid.get()),
            ChannelMessage::AllOffersDelivered => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(relids, [1, 2, 3]);
}

#[test]
fn older_versions_use_connection_id_1() {
    let mut h = harness_with(
        1,
        ClientConfig {
            max_version: VERSION_WIN10,
            timeout_ms: TIMEOUT_MS,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
    );
    let (vsp, _) = EchoVsp::new(0);
    h.server.add_device(vsp).unwrap();
    assert_eq!(h.client.connect().unwrap(), VERSION_WIN10);
    assert_eq!(h.client.message_connection_id(), 1);
    // Once connected with 4.0, id 4 is not the message connection.
    let req = MessageBuf::header_only(msgtype::REQUESTOFFERS);
    assert_eq!(
        h.post_raw(4, req.as_bytes()),
        HV_STATUS_INVALID_CONNECTION_ID
    );
    assert_eq!(h.client.request_offers().unwrap(), 1);

    // Win8 (2.4) is the oldest we accept; 1.1 (Win7) is refused.
    let mut h = harness_with(
        1,
        ClientConfig {
            max_version: VERSION_WIN8,
            timeout_ms: TIMEOUT_MS,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
    );
    assert_eq!(h.client.connect().unwrap(), VERSION_WIN8);
    let refuse = |h: &mut Harness, version: u32, conn: u32| {
        let m = MessageBuf::new(&InitiateContact {
            version_requested: U32::new(version),
            target_vcpu: U32::new(0),
            interrupt_page_or_sint: U64::new(2),
            monitor_page1: U64::new(0),
            monitor_page2: U64::new(0),
        });
        assert_eq!(h.post_raw(conn, m.as_bytes()), 0);
        let r = h
            .next_message(Duration::from_secs(5))
            .expect("a version response");
        match parse(&r).unwrap() {
            ChannelMessage::VersionResponse(v) => v.version_supported,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(refuse(&mut h, make_version(1, 1), 1), 0);
    assert_eq!(refuse(&mut h, make_version(6, 0), 4), 0);
    // 5.x on the old connection id, and 4.0 on the new one, are refused.
    assert_eq!(refuse(&mut h, VERSION_WIN10_V5_3, 1), 0);
    assert_eq!(refuse(&mut h, VERSION_WIN10, 4), 0);
    assert_eq!(refuse(&mut h, VERSION_WIN10_V5_3, 4), 1);
}

#[test]
fn hypercall_status_codes() {
    let (mut h, _) = connect_with_devices(1);
    let req = MessageBuf::header_only(msgtype::REQUESTOFFERS);
    assert_eq!(
        h.post_raw(2, req.as_bytes()),
        HV_STATUS_INVALID_CONNECTION_ID
    );
    assert_eq!(
        h.post_raw(1, req.as_bytes()),
        HV_STATUS_INVALID_CONNECTION_ID
    );
    assert_eq!(
        h.post_raw(0x10001, req.as_bytes()),
        HV_STATUS_INVALID_CONNECTION_ID
    );
    assert_eq!(h.post_raw(4, &[0u8; 241]), HV_STATUS_INVALID_PARAMETER);
    assert_eq!(
        h.client.hv().post_message(4, 2, req.as_bytes()),
        HV_STATUS_INVALID_PARAMETER
    );
    // Signals: only open channels' connection ids exist.
    assert_eq!(
        h.client.hv().signal_event(channel_connection_id(1), 0),
        HV_STATUS_INVALID_CONNECTION_ID
    );
    let offer = *h.client.offer(1).unwrap();
    let (_ch, _) = h.open(&offer, 2, 2).unwrap();
    assert_eq!(h.client.hv().signal_event(channel_connection_id(1), 0), 0);
    assert_eq!(
        h.client.hv().signal_event(channel_connection_id(1), 3),
        HV_STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        h.client.hv().signal_event(4, 0),
        HV_STATUS_INVALID_CONNECTION_ID
    );
}

#[test]
fn rescind_then_release() {
    let (mut h, devs) = connect_with_devices(2);
    let offer = *h.client.offer(1).unwrap();
    let (_ch, _gpadl) = h.open(&offer, 2, 2).unwrap();
    h.server.remove_device(devs[0].0).unwrap();
    // The VSP was closed before the rescind went out.
    assert_eq!(devs[0].1.lock().unwrap().closes, 1);
    wait_until("the rescind", || {
        h.client.poll();
        h.client.offer(1).unwrap().rescinded
    });
    assert_eq!(h.status().channels[0].state, ChannelState::Rescinded);
    // Removing it again is an error; the relid stays taken until released.
    assert!(h.server.remove_device(devs[0].0).is_err());
    // Linux closes the channel (ignored now) and releases the relid.
    h.client.close_channel(1).unwrap();
    h.client.release_relid(1).unwrap();
    h.sync();
    let st = h.status();
    assert_eq!(st.channels.len(), 1);
    assert_eq!(st.channels[0].relid, 2);
    assert_eq!(st.gpadls, 0, "the rescinded channel's GPADLs are gone");
    // Hot add: offered at once, reusing relid 1.
    let (vsp, _) = EchoVsp::new(9);
    h.server.add_device(vsp).unwrap();
    wait_until("the new offer", || {
        h.client.poll();
        h.client.offer(1).is_some()
    });
    assert_eq!(
        h.client.offer(1).unwrap().instance_id,
        EchoVsp::new(9).0.instance
    );
    // A device never offered is removed at once.
    let mut h2 = harness(1);
    let (vsp, _) = EchoVsp::new(0);
    let id = h2.server.add_device(vsp).unwrap();
    h2.server.remove_device(id).unwrap();
    assert!(h2.status().channels.is_empty());
    let _ = h2.client.connect();
}

#[test]
fn full_host_ring_waits_for_the_guest() {
    let mut h = harness(1);
    let (mut vsp, log) = EchoVsp::new(0);
    vsp.flood = 300;
    h.server.add_device(vsp).unwrap();
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    let offer = *h.client.offer(1).unwrap();
    // Host -> guest ring: 2 data pages (8 KiB); 300 packets of 224 bytes do not fit.
    let (mut ch, _) = h.open(&offer, 2, 3).unwrap();
    let hv = h.client.hv();
    let mut buf = vec![0u8; 1024];
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..300u64 {
        let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
        assert_eq!(p.transaction_id(), i);
        assert_eq!(p.payload()[0], i as u8);
        if i % 50 == 0 {
            // Read slowly now and then so the host really blocks.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(log.lock().unwrap().errors.is_empty());
}

#[test]
fn full_guest_ring_is_signalled_when_the_host_reads() {
    let mut h = harness(1);
    let (mut vsp, log) = EchoVsp::new(0);
    let hold = Arc::new(AtomicBool::new(false));
    vsp.hold_reads = Some(hold.clone());
    h.server.add_device(vsp).unwrap();
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    let offer = *h.client.offer(1).unwrap();
    // Guest -> host ring: one data page; 100 packets of 240 bytes do not fit.
    let (mut ch, _) = h.open(&offer, 2, 2).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        hold.store(true, Ordering::SeqCst);
    });
    let ranges = [vmbus_ring::TransferPageRange {
        byte_count: U32::new(1),
        byte_offset: U32::new(0),
    }];
    let hv = h.client.hv();
    for i in 0..100u64 {
        ch.send(
            hv,
            &OutgoingPacket {
                kind: OutgoingKind::TransferPages {
                    pageset_id: 1,
                    sender_owns_set: false,
                    ranges: &ranges,
                },
                flags: 0,
                transaction_id: i,
                payload: &[0x77; 200],
            },
            TIMEOUT_MS,
        )
        .unwrap();
    }
    release.join().unwrap();
    wait_until("the VSP to read everything", || {
        log.lock().unwrap().ignored == 100
    });
    assert!(log.lock().unwrap().errors.is_empty());
    // The VSP sent nothing: its only interrupts are "room again" after reads.
    assert!(h.status().channels[0].host_signals > 0);
}

/// A VSP that only keeps its channel, for tests that drive the channel API themselves.
struct ParkVsp {
    slot: Arc<Mutex<Option<Channel>>>,
}

impl Vsp for ParkVsp {
    fn class_id(&self) -> Guid {
        Guid::from_str_const("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f")
    }
    fn instance_id(&self) -> Guid {
        Guid::from_fields(0x5eed, 1, 2, [3; 8])
    }
    fn open(&mut self, channel: Channel) -> Result<(), ()> {
        *self.slot.lock().unwrap() = Some(channel);
        Ok(())
    }
    fn close(&mut self) {
        self.slot.lock().unwrap().take();
    }
}

#[test]
fn a_polling_host_masks_the_guests_signals_and_sees_packets_without_them() {
    let mut h = harness(1);
    let slot = Arc::new(Mutex::new(None));
    h.server
        .add_device(Box::new(ParkVsp { slot: slot.clone() }))
        .unwrap();
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    let offer = *h.client.offer(1).unwrap();
    let (mut ch, _) = h.open(&offer, 2, 2).unwrap();
    let host = slot
        .lock()
        .unwrap()
        .take()
        .expect("the VSP got its channel");
    let hv = h.client.hv();
    let mut send = |id: u64| {
        ch.send(
            hv,
            &OutgoingPacket {
                kind: OutgoingKind::InBand,
                flags: 0,
                transaction_id: id,
                payload: &[0x5a; 16],
            },
            TIMEOUT_MS,
        )
        .unwrap();
    };
    // Drain whatever signals the open produced.
    while host.wait_timeout(Duration::from_millis(20)).unwrap() {}
    assert!(!host.has_incoming());

    // Masked: the guest writes without signalling; the host finds the packet by looking.
    host.set_incoming_interrupt_mask(true);
    send(1);
    assert!(
        host.has_incoming(),
        "the packet is visible without a signal"
    );
    assert!(
        !host.wait_timeout(Duration::from_millis(50)).unwrap(),
        "the guest signalled although the host masked its interrupts"
    );
    assert_eq!(host.try_recv().unwrap().unwrap().transaction_id, 1);
    assert!(!host.has_incoming());

    // Unmasked again: the next packet into the empty ring is signalled.
    host.set_incoming_interrupt_mask(false);
    send(2);
    assert!(
        host.wait_timeout(Duration::from_secs(5)).unwrap(),
        "no signal"
    );
    assert_eq!(host.try_recv().unwrap().unwrap().transaction_id, 2);
}

#[test]
fn hostile_messages_are_refused_without_harm() {
    let (mut h, devs) = connect_with_devices(1);
    let offer = *h.client.offer(1).unwrap();
    let gpadl_hdr = |relid: u32, gpadl: u32, buflen: u16, count: u16| GpadlHeader {
        child_relid: U32::new(relid),
        gpadl: U32::new(gpadl),
        range_buflen: U16::new(buflen),
        range_count: U16::new(count),
    };
    let created = |h: &mut Harness| -> (u32, u32) {
        let r = h
            .next_message(Duration::from_secs(5))
            .expect("GPADL_CREATED");
        match parse(&r).unwrap() {
            ChannelMessage::GpadlCreated(c) => (c.gpadl.get(), c.creation_status.get()),
            other => panic!("{other:?}"),
        }
    };
    let range = |count: u32, offset: u32, pfns: &[u64]| {
        let mut v = Vec::new();
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        for p in pfns {
            v.extend_from_slice(&p.to_le_bytes());
        }
        v
    };
    let p = h.ram.alloc_pages(4);

    // GPADL for a relid that does not exist.
    let (m, _) = MessageBuf::gpadl_header(&gpadl_hdr(77, 1, 16, 1), &range(4096, 0, &[p]));
    assert_eq!(h.post_raw(4, m.as_bytes()), 0);
    assert_eq!(created(&mut h), (1, 0xC000_0001));
    // A PFN outside guest RAM.
    let (m, _) = MessageBuf::gpadl_header(&gpadl_hdr(1, 2, 16, 1), &range(4096, 0, &[1 << 40]));
    h.post_raw(4, m.as_bytes());
    assert_eq!(created(&mut h), (2, 0xC000_0001));
    // Page count that lies: 2 pages of data but 3 PFNs in range_buflen.
    let (m, _) =
        MessageBuf::gpadl_header(&gpadl_hdr(1, 3, 32, 1), &range(8192, 0, &[p, p + 1, p + 2]));
    h.post_raw(4, m.as_bytes());
    assert_eq!(created(&mut h), (3, 0xC000_0001));
    // Bodies carrying more PFNs than range_buflen announced.
    let (m, _) = MessageBuf::gpadl_header(&gpadl_hdr(1, 4, 40, 1), &range(4 * 4096, 0, &[p]));
    h.post_raw(4, m.as_bytes());
    let (b, _) = MessageBuf::gpadl_body(4, 0, &[p + 1, p + 2, p + 3, p]);
    h.post_raw(4, b.as_bytes());
    assert_eq!(created(&mut h), (4, 0xC000_0001));
    // A body for a GPADL that does not exist: dropped.
    let (b, _) = MessageBuf::gpadl_body(99, 0, &[p]);
    h.post_raw(4, b.as_bytes());
    // A good GPADL, then a duplicate handle (refused; the first one is untouched).
    let (m, _) = MessageBuf::gpadl_header(
        &gpadl_hdr(1, 5, 40, 1),
        &range(4 * 4096, 0, &[p, p + 1, p + 2, p + 3]),
    );
    h.post_raw(4, m.as_bytes());
    assert_eq!(created(&mut h), (5, 0));
    h.post_raw(4, m.as_bytes());
    assert_eq!(created(&mut h), (5, 0xC000_0001));
    assert_eq!(h.status().gpadls, 1);

    // OPENCHANNEL: unknown relid, unknown GPADL, bad downstream offsets, bad VP.
    let open = |relid: u32, gpadl: u32, down: u32, vp: u32| OpenChannel {
        child_relid: U32::new(relid),
        open_id: U32::new(7),
        ring_buffer_gpadl: U32::new(gpadl),
        target_vp: U32::new(vp),
        downstream_ring_buffer_page_offset: U32::new(down),
        user_data: [0; 120],
    };
    let result = |h: &mut Harness| -> u32 {
        let r = h
            .next_message(Duration::from_secs(5))
            .expect("OPENCHANNEL_RESULT");
        match parse(&r).unwrap() {
            ChannelMessage::OpenResult(o) => o.status.get(),
            other => panic!("{other:?}"),
        }
    };
    for (relid, gpadl, down, vp) in [
        (9, 5, 2, 0),
        (1, 6, 2, 0),
        (1, 5, 0, 0),
        (1, 5, 3, 0),
        (1, 5, 2, 7),
    ] {
        h.post_raw(4, MessageBuf::new(&open(relid, gpadl, down, vp)).as_bytes());
        assert_ne!(result(&mut h), 0, "open {relid} {gpadl} {down} {vp}");
    }
    assert_eq!(devs[0].1.lock().unwrap().opens, 0);
    // A good open on that GPADL works; opening twice is refused.
    h.post_raw(4, MessageBuf::new(&open(1, 5, 2, 1)).as_bytes());
    assert_eq!(result(&mut h), 0);
    h.post_raw(4, MessageBuf::new(&open(1, 5, 2, 1)).as_bytes());
    assert_ne!(result(&mut h), 0);
    // Teardown of the ring GPADL while open: answered only after the close.
    let td = MessageBuf::new(&vmbus_protocol::GpadlTeardown {
        child_relid: U32::new(1),
        gpadl: U32::new(5),
    });
    h.post_raw(4, td.as_bytes());
    assert_eq!(h.next_message(Duration::from_millis(100)), None);
    h.client.close_channel(1).unwrap();
    let r = h.next_message(Duration::from_secs(5)).unwrap();
    assert!(matches!(parse(&r).unwrap(), ChannelMessage::GpadlTorndown(t) if t.gpadl.get() == 5));

    // Truncated messages, unknown types, messages for nothing: dropped, no reply.
    for junk in [
        &MessageBuf::new(&open(1, 5, 2, 0)).as_bytes()[..20],
        &[14u8, 0, 0, 0][..],
        MessageBuf::header_only(99).as_bytes(),
        MessageBuf::new(&vmbus_protocol::CloseChannel {
            child_relid: U32::new(1234),
        })
        .as_bytes(),
        MessageBuf::new(&vmbus_protocol::RelidReleased {
            child_relid: U32::new(1),
        })
        .as_bytes(),
        MessageBuf::header_only(msgtype::OFFERCHANNEL).as_bytes(),
    ] {
        assert_eq!(h.post_raw(4, junk), 0);
    }
    assert_eq!(h.next_message(Duration::from_millis(100)), None);
    // Still healthy: the channel is offered and can be opened normally.
    assert_eq!(h.status().channels[0].state, ChannelState::Offered);
    let (_ch, _) = h.open(&offer, 2, 2).unwrap();
    assert_eq!(devs[0].1.lock().unwrap().opens, 2);
}

#[test]
fn messages_out_of_order_before_contact_are_ignored() {
    let mut h = harness(1);
    let (vsp, log) = EchoVsp::new(0);
    h.server.add_device(vsp).unwrap();
    for m in [
        MessageBuf::header_only(msgtype::REQUESTOFFERS),
        MessageBuf::new(&vmbus_protocol::CloseChannel {
            child_relid: U32::new(1),
        }),
        MessageBuf::gpadl_body(1, 0, &[1, 2]).0,
    ] {
        assert_eq!(h.post_raw(4, m.as_bytes()), 0);
    }
    assert_eq!(h.next_message(Duration::from_millis(100)), None);
    // UNLOAD is always answered, even unconnected (the guest waits for it).
    h.post_raw(1, MessageBuf::header_only(msgtype::UNLOAD).as_bytes());
    let r = h.next_message(Duration::from_secs(5)).unwrap();
    assert!(matches!(parse(&r).unwrap(), ChannelMessage::UnloadResponse));
    assert_eq!(h.status().channels[0].state, ChannelState::Pending);
    // INITIATE_CONTACT with a VP that does not exist is refused.
    let mut bad = harness_with(
        1,
        ClientConfig {
            target_vcpu: 5,
            timeout_ms: TIMEOUT_MS,
            ..ClientConfig::default()
        },
        ServerConfig::default(),
    );
    assert_eq!(bad.client.connect(), Err(ClientError::NoVersion));
    // A second INITIATE_CONTACT while connected resets (closes the open channel).
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    let offer = *h.client.offer(1).unwrap();
    let (_ch, _) = h.open(&offer, 2, 2).unwrap();
    h.client.connect().unwrap();
    assert_eq!(log.lock().unwrap().closes, 1);
    assert_eq!(h.status().channels[0].state, ChannelState::Pending);
    assert_eq!(h.client.request_offers().unwrap(), 1);
}

#[test]
fn modify_channel_and_vsp_refusal() {
    let mut h = harness(2);
    let (vsp, _) = EchoVsp::new(0);
    let (mut refusing, rlog) = EchoVsp::new(1);
    refusing.refuse = true;
    h.server.add_device(vsp).unwrap();
    h.server.add_device(refusing).unwrap();
    // Duplicate instance GUIDs are refused by the host API.
    let (dup, _) = EchoVsp::new(0);
    assert!(matches!(
        h.server.add_device(dup),
        Err(ServerError::DuplicateInstance { .. })
    ));
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    let o1 = *h.client.offer(1).unwrap();
    let o2 = *h.client.offer(2).unwrap();
    let (_ch, _) = h.open(&o1, 2, 2).unwrap();
    assert_eq!(h.client.modify_channel(1, 1).unwrap(), Some(0));
    assert_ne!(h.client.modify_channel(1, 9).unwrap(), Some(0));
    assert_ne!(h.client.modify_channel(2, 1).unwrap(), Some(0));
    assert!(matches!(h.open(&o2, 2, 2), Err(ClientError::Refused(_))));
    assert_eq!(rlog.lock().unwrap().opens, 0);
    assert_eq!(h.status().channels[1].state, ChannelState::Offered);
}

#[test]
fn corrupt_rings_and_bad_buffers_break_only_the_channel() {
    let (mut h, devs) = connect_with_devices(1);
    let offer = *h.client.offer(1).unwrap();
    let (mut ch, _) = h.open(&offer, 2, 2).unwrap();
    // A GPA-direct packet naming pages outside RAM: the VSP's access fails cleanly.
    let far = [1u64 << 36];
    let ranges = [OutgoingGpaRange {
        byte_count: 16,
        byte_offset: 0,
        pfns: &far,
    }];
    let hv = h.client.hv();
    ch.send(
        hv,
        &OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            flags: 1,
            transaction_id: 5,
            payload: &[],
        },
        TIMEOUT_MS,
    )
    .unwrap();
    let mut buf = vec![0u8; 256];
    let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
    assert_eq!(&p.payload()[..8], b"BADRANGE");
    assert_eq!(devs[0].1.lock().unwrap().errors.len(), 1);
    // Now the guest scribbles over its guest->host ring header: a write index that is not a
    // valid offset. The VSP sees a corrupt ring and stops; the server is unaffected.
    h.ram.store_u32(h.last_ring_pfn * 4096, 13).unwrap();
    h.client.hv().signal_event(offer.connection_id, 0);
    wait_until("the VSP to notice", || {
        devs[0].1.lock().unwrap().errors.len() == 2
    });
    assert!(devs[0]
        .1
        .lock()
        .unwrap()
        .errors
        .last()
        .unwrap()
        .contains("corrupt"));
    h.client.close_channel(1).unwrap();
    h.sync();
    assert_eq!(devs[0].1.lock().unwrap().closes, 1);
    assert_eq!(h.status().channels[0].state, ChannelState::Offered);
}

#[test]
fn full_inbound_queue_returns_insufficient_buffers() {
    let mut h = harness_with(
        1,
        ClientConfig {
            timeout_ms: TIMEOUT_MS,
            ..ClientConfig::default()
        },
        ServerConfig {
            inbound_queue: 4,
            ..ServerConfig::default()
        },
    );
    let (mut vsp, _) = EchoVsp::new(0);
    let entered = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(AtomicBool::new(false));
    vsp.gate = Some((entered.clone(), gate.clone()));
    h.server.add_device(vsp).unwrap();
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    let offer = *h.client.offer(1).unwrap();
    // Open in the background: the VSP's open blocks the control thread on the gate.
    let first = h.ram.alloc_pages(4);
    let pfns: Vec<u64> = (first..first + 4).collect();
    let gpadl = h
        .client
        .create_gpadl(offer.relid, &pfns, 4 * 4096, 0)
        .unwrap();
    let open = MessageBuf::new(&OpenChannel {
        child_relid: U32::new(1),
        open_id: U32::new(1),
        ring_buffer_gpadl: U32::new(gpadl),
        target_vp: U32::new(0),
        downstream_ring_buffer_page_offset: U32::new(2),
        user_data: [0; 120],
    });
    assert_eq!(h.post_raw(4, open.as_bytes()), 0);
    wait_until("the control thread to block in open", || {
        entered.load(Ordering::SeqCst)
    });
    let req = MessageBuf::header_only(msgtype::REQUESTOFFERS);
    let statuses: Vec<u16> = (0..10).map(|_| h.post_raw(4, req.as_bytes())).collect();
    assert!(statuses[..4].iter().all(|&s| s == 0), "{statuses:?}");
    assert!(statuses[4..]
        .iter()
        .all(|&s| s == HV_STATUS_INSUFFICIENT_BUFFERS));
    gate.store(true, Ordering::SeqCst);
    let r = h.next_message(Duration::from_secs(5)).unwrap();
    assert!(matches!(parse(&r).unwrap(), ChannelMessage::OpenResult(o) if o.status.get() == 0));
    h.sync();
    assert_eq!(h.post_raw(4, req.as_bytes()), 0);
}

#[test]
fn gpadl_limits_bound_memory() {
    let mut h = harness_with(
        1,
        ClientConfig {
            timeout_ms: TIMEOUT_MS,
            ..ClientConfig::default()
        },
        ServerConfig {
            max_gpadls: 8,
            max_gpadl_bytes: 1 << 20,
            ..ServerConfig::default()
        },
    );
    let (vsp, _) = EchoVsp::new(0);
    h.server.add_device(vsp).unwrap();
    h.client.connect().unwrap();
    h.client.request_offers().unwrap();
    // Headers announcing 64 KiB of range data each, never completed.
    let mut refused = 0;
    for id in 0..40u32 {
        let hdr = GpadlHeader {
            child_relid: U32::new(1),
            gpadl: U32::new(100 + id),
            range_buflen: U16::new(0xfff8),
            range_count: U16::new(1),
        };
        let mut m = MessageBuf::header_only(msgtype::GPADL_HEADER);
        m.push(hdr.as_bytes());
        m.push(&[0u8; 16]);
        assert_eq!(h.post_raw(4, m.as_bytes()), 0);
        if let Some(r) = h.next_message(Duration::from_millis(20)) {
            assert!(
                matches!(parse(&r).unwrap(), ChannelMessage::GpadlCreated(c) if c.creation_status.get() != 0)
            );
            refused += 1;
        }
    }
    let st = h.status();
    assert!(st.gpadls <= 8, "{}", st.gpadls);
    assert_eq!(refused, 40 - st.gpadls);
    // UNLOAD frees them all.
    h.client.unload().unwrap();
    assert_eq!(h.status().gpadls, 0);
}

#[test]
fn random_garbage_never_hurts_the_server() {
    let (mut h, devs) = connect_with_devices(1);
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..3000 {
        let len = (next() % 241) as usize;
        let mut m: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 4 {
            // Mostly valid message types, skipping those that legitimately reset the state.
            let mut t = (next() % 26) as u32;
            if t == msgtype::INITIATE_CONTACT || t == msgtype::UNLOAD {
                t = msgtype::OPENCHANNEL;
            }
            m[..4].copy_from_slice(&t.to_le_bytes());
        }
        let s = h.post_raw(4, &m);
        assert!(s == 0 || s == HV_STATUS_INSUFFICIENT_BUFFERS);
        // Drain whatever the server answered.
        let mut buf = [0u8; 240];
        while h.client.hv().take_message(2, &mut buf).is_some() {}
    }
    h.sync();
    let mut buf = [0u8; 240];
    while h.client.hv().take_message(2, &mut buf).is_some() {}
    // Still serving a well-behaved guest.
    let offer = *h.client.offer(1).unwrap();
    let st = h.status();
    assert!(st.gpadls <= ServerConfig::default().max_gpadls);
    if st.channels[0].state == ChannelState::Offered {
        let (mut ch, _) = h.open(&offer, 2, 2).unwrap();
        let hv = h.client.hv();
        ch.send(
            hv,
            &OutgoingPacket::in_band(1, b"still ok", false),
            TIMEOUT_MS,
        )
        .unwrap();
        let mut b = vec![0u8; 256];
        assert_eq!(ch.recv(hv, &mut b, TIMEOUT_MS).unwrap().transaction_id(), 1);
    }
    assert!(devs[0].1.lock().unwrap().opens <= 1);
}

// ---- sub-channels ----

/// Ask the VSP behind `ch` for `n` sub-channels; returns its answer ("ok" / "refused").
fn ask_sub_channels(h: &mut Harness, ch: &mut Ring, n: u8) -> Vec<u8> {
    let hv = h.client.hv();
    ch.send(
        hv,
        &OutgoingPacket::in_band(77, &[b'S', b'U', b'B', b'C', b'H', n, 0, 0], true),
        TIMEOUT_MS,
    )
    .unwrap();
    let mut buf = vec![0u8; 256];
    let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
    assert!(matches!(p.kind(), PacketKind::Completion));
    assert_eq!(p.transaction_id(), 77);
    let n = p
        .payload()
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(p.payload().len());
    p.payload()[..n].to_vec()
}

/// Wait until the client holds `n` live sub-channel offers of `primary`; returns them by
/// index.
fn sub_offers(h: &mut Harness, primary: &Offer, n: usize) -> Vec<Offer> {
    let mut subs = Vec::new();
    wait_until("the sub-channel offers", || {
        h.client.poll();
        subs = h
            .client
            .offers()
            .filter(|o| {
                o.sub_channel_index != 0
                    && !o.rescinded
                    && o.class_id == primary.class_id
                    && o.instance_id == primary.instance_id
            })
            .copied()
            .collect();
        subs.len() >= n
    });
    subs.sort_by_key(|o| o.sub_channel_index);
    subs
}

/// Send a GPA-direct packet with a fresh 2-page buffer of `seed`-derived bytes on `ch` and
/// check the VSP's checksum and stamp.
fn checksum_roundtrip(h: &mut Harness, ch: &mut Ring, id: u64, seed: u8) {
    let pfn = h.ram.alloc_pages(2);
    let data: Vec<u8> = (0..6000u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    h.ram.write(pfn * 4096 + 8, &data).unwrap();
    let pfns = [pfn, pfn + 1];
    let ranges = [OutgoingGpaRange {
        byte_count: 6000,
        byte_offset: 8,
        pfns: &pfns,
    }];
    let hv = h.client.hv();
    ch.send(
        hv,
        &OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            flags: vmbus_ring::FLAG_COMPLETION_REQUESTED,
            transaction_id: id,
            payload: b"sum",
        },
        TIMEOUT_MS,
    )
    .unwrap();
    let mut buf = vec![0u8; 256];
    let p = ch.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
    assert_eq!(p.transaction_id(), id);
    let expect: u64 = data.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(p.payload()[..8], expect.to_le_bytes());
    let mut stamp = [0u8; 4];
    h.ram.read(pfn * 4096 + 8, &mut stamp).unwrap();
    assert_eq!(&stamp, b"VSP!");
}

#[test]
fn sub_channels_are_offered_opened_served_and_closed_with_the_primary() {
    let (mut h, devs) = connect_with_devices(2);
    let log = devs[0].1.clone();
    let primary = *h.client.offer(1).unwrap();
    // Not open: no sub-channels can be asked for (the VSP has no channel); open it.
    let (mut ch, _) = h.open(&primary, 4, 4).unwrap();
    assert_eq!(ask_sub_channels(&mut h, &mut ch, 3), b"ok");
    let subs = sub_offers(&mut h, &primary, 3);
    assert_eq!(subs.len(), 3);
    let mut relids = vec![primary.relid, 2];
    for (i, o) in subs.iter().enumerate() {
        assert_eq!(o.sub_channel_index, i as u16 + 1);
        assert_eq!(o.class_id, primary.class_id);
        assert_eq!(o.instance_id, primary.instance_id);
        assert_eq!(o.connection_id, channel_connection_id(o.relid));
        assert!(o.dedicated_interrupt && !o.monitor_allocated);
        assert!(!relids.contains(&o.relid), "relids are distinct");
        relids.push(o.relid);
    }
    let st = h.status();
    for o in &subs {
        let c = st.channels.iter().find(|c| c.relid == o.relid).unwrap();
        assert_eq!(c.state, ChannelState::Offered);
        assert_eq!(c.device, devs[0].0);
        assert_eq!(c.sub_channel_index, o.sub_channel_index);
    }
    // Open them all: each has its own GPADL and rings, and its own VSP thread.
    let mut rings = Vec::new();
    for o in &subs {
        let (r, _) = h.open(o, 2, 3).unwrap();
        rings.push(r);
    }
    assert_eq!(log.lock().unwrap().sub_opens, [1, 2, 3]);
    // A sub-channel open twice is refused; its first opening keeps working.
    assert!(matches!(
        h.open(&subs[0], 2, 2),
        Err(ClientError::Refused(_))
    ));
    assert_eq!(log.lock().unwrap().sub_opens, [1, 2, 3]);
    // A sub-channel cannot ask for sub-channels.
    assert_eq!(ask_sub_channels(&mut h, &mut rings[0], 1), b"refused");
    // Nor can a primary ask for none.
    assert_eq!(ask_sub_channels(&mut h, &mut ch, 0), b"refused");

    // I/O on every channel at once: queue a packet on each before reading any answer.
    let hv = h.client.hv();
    for (i, r) in std::iter::once(&mut ch).chain(rings.iter_mut()).enumerate() {
        for k in 0..20u64 {
            let msg = format!("ch{i} msg{k}");
            r.send(
                hv,
                &OutgoingPacket::in_band(k, msg.as_bytes(), false),
                TIMEOUT_MS,
            )
            .unwrap();
        }
    }
    let mut buf = vec![0u8; 512];
    for (i, r) in std::iter::once(&mut ch).chain(rings.iter_mut()).enumerate() {
        for k in 0..20u64 {
            let p = r.recv(hv, &mut buf, TIMEOUT_MS).unwrap();
            let msg = format!("ch{i} msg{k}");
            assert_eq!(p.transaction_id(), k);
            assert_eq!(
                &p.payload()[..msg.len()],
                msg.as_bytes(),
                "answered on its channel"
            );
        }
    }
    // Guest buffers through the sub-channels.
    for (i, r) in rings.iter_mut().enumerate() {
        checksum_roundtrip(&mut h, r, 500 + i as u64, i as u8 + 3);
    }
    checksum_roundtrip(&mut h, &mut ch, 600, 11);

    // Closing one sub-channel leaves the others (and the primary) alone; it can reopen.
    h.client.close_channel(subs[1].relid).unwrap();
    h.sync();
    assert_eq!(log.lock().unwrap().sub_closes, [2]);
    let st = h.status();
    let state =
        |st: &ServerStatus, relid| st.channels.iter().find(|c| c.relid == relid).unwrap().state;
    assert_eq!(state(&st, subs[1].relid), ChannelState::Offered);
    assert_eq!(state(&st, subs[0].relid), ChannelState::Open);
    checksum_roundtrip(&mut h, &mut rings[0], 700, 5);
    let (r, _) = h.open(&subs[1], 2, 2).unwrap();
    rings[1] = r;
    checksum_roundtrip(&mut h, &mut rings[1], 701, 6);

    // Closing the primary closes every sub-channel first, then rescinds them.
    h.client.close_channel(primary.relid).unwrap();
    h.sync();
    {
        let l = log.lock().unwrap();
        let mut closed = l.sub_closes.clone();
        closed.sort_unstable();
        assert_eq!(closed, [1, 2, 2, 3]);
        assert_eq!(l.closes, 1);
        assert!(l.errors.is_empty(), "{:?}", l.errors);
    }
    wait_until("the sub-channel rescinds", || {
        h.client.poll();
        subs.iter()
            .all(|o| h.client.offer(o.relid).unwrap().rescinded)
    });
    assert!(!h.client.offer(primary.relid).unwrap().rescinded);
    let st = h.status();
    for o in &subs {
        assert_eq!(state(&st, o.relid), ChannelState::Rescinded);
    }
    assert_eq!(state(&st, primary.relid), ChannelState::Offered);
    // Opening a rescinded sub-channel is refused; the guest releases the relids.
    assert!(matches!(
        h.open(&subs[0], 2, 2),
        Err(ClientError::Refused(_))
    ));
    for o in &subs {
        h.client.release_relid(o.relid).unwrap();
    }
    h.sync();
    assert_eq!(h.status().channels.len(), 2);
    // A new opening asks again and gets indices from 1 again, on reused relids.
    let (mut ch, _) = h.open(&primary, 4, 4).unwrap();
    assert_eq!(ask_sub_channels(&mut h, &mut ch, 2), b"ok");
    let again = sub_offers(&mut h, &primary, 2);
    assert_eq!(
        again
            .iter()
            .map(|o| o.sub_channel_index)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    assert!(again
        .iter()
        .all(|o| subs.iter().any(|s| s.relid == o.relid)));
    // The other device never saw any of this.
    assert_eq!(devs[1].1.lock().unwrap().opens, 0);
}

#[test]
fn removing_the_device_or_unloading_tears_sub_channels_down() {
    let (mut h, devs) = connect_with_devices(1);
    let log = devs[0].1.clone();
    let primary = *h.client.offer(1).unwrap();
    let (mut ch, _) = h.open(&primary, 4, 4).unwrap();
    assert_eq!(ask_sub_channels(&mut h, &mut ch, 2), b"ok");
    let subs = sub_offers(&mut h, &primary, 2);
    let (_r1, _) = h.open(&subs[0], 2, 2).unwrap();
    // Sub-channel 2 stays offered, never opened.
    // UNLOAD: everything closes, and the sub-channels are forgotten (not offered again).
    h.client.unload().unwrap();
    {
        let l = log.lock().unwrap();
        assert_eq!((l.sub_closes.as_slice(), l.closes), (&[1u16][..], 1));
    }
    let st = h.status();
    assert_eq!(st.channels.len(), 1);
    assert_eq!(st.gpadls, 0);
    h.client.connect().unwrap();
    assert_eq!(h.client.request_offers().unwrap(), 1);

    // Hot removal with open sub-channels: sub-channels closed and rescinded, then the
    // primary; every relid stays taken until released.
    let (mut ch, _) = h.open(&primary, 4, 4).unwrap();
    assert_eq!(ask_sub_channels(&mut h, &mut ch, 2), b"ok");
    let subs = sub_offers(&mut h, &primary, 2);
    let (_r1, _) = h.open(&subs[0], 2, 2).unwrap();
    let (_r2, _) = h.open(&subs[1], 2, 2).unwrap();
    h.server.remove_device(devs[0].0).unwrap();
    {
        let l = log.lock().unwrap();
        assert_eq!(l.sub_closes.len(), 3);
        assert_eq!(l.closes, 2);
    }
    wait_until("the rescinds", || {
        h.client.poll();
        h.client.offers().all(|o| o.rescinded)
    });
    let st = h.status();
    assert_eq!(st.channels.len(), 3);
    assert!(st
        .channels
        .iter()
        .all(|c| c.state == ChannelState::Rescinded));
    // Messages for the rescinded sub-channels are refused or ignored.
    assert!(matches!(
        h.open(&subs[1], 2, 2),
        Err(ClientError::Refused(_))
    ));
    h.client.close_channel(subs[0].relid).unwrap();
    for o in [primary, subs[0], subs[1]] {
        h.client.release_relid(o.relid).unwrap();
    }
    h.sync();
    let st = h.status();
    assert!(st.channels.is_empty());
    assert_eq!(st.gpadls, 0);
}

#[test]
fn sub_channel_requests_from_a_closed_opening_are_dropped() {
    // Driven directly: the request is queued by a channel handle, the primary closes before
    // the core handles it, and nothing is offered.
    let ram = FakeGuestRam::new(4 << 20);
    let synic = FakeSynic::new(1);
    let mut core = ServerCore::new(ServerConfig::default(), synic.clone(), ram.clone());
    let grabbed: Arc<Mutex<Option<Channel>>> = Arc::default();
    struct Grab(Arc<Mutex<Option<Channel>>>);
    impl Vsp for Grab {
        fn class_id(&self) -> Guid {
            Guid::from_fields(1, 2, 3, [4; 8])
        }
        fn instance_id(&self) -> Guid {
            Guid::from_fields(5, 6, 7, [8; 8])
        }
        fn open(&mut self, channel: Channel) -> Result<(), ()> {
            *self.0.lock().unwrap() = Some(channel);
            Ok(())
        }
        fn close(&mut self) {}
    }
    core.add_device(Box::new(Grab(grabbed.clone()))).unwrap();
    let msg = |core: &mut ServerCore, m: MessageBuf| {
        core.handle_message(0, 4, m.as_bytes());
        core.flush();
        while synic.take_message(0, 2).is_some() {
            core.flush();
        }
    };
    msg(
        &mut core,
        MessageBuf::new(&InitiateContact {
            version_requested: U32::new(VERSION_WIN10_V5_3),
            target_vcpu: U32::new(0),
            interrupt_page_or_sint: U64::new(2),
            monitor_page1: U64::new(0),
            monitor_page2: U64::new(0),
        }),
    );
    msg(&mut core, MessageBuf::header_only(msgtype::REQUESTOFFERS));
    let p = ram.alloc_pages(4);
    let mut range = Vec::new();
    range.extend_from_slice(&(4u32 * 4096).to_le_bytes());
    range.extend_from_slice(&0u32.to_le_bytes());
    for i in 0..4 {
        range.extend_from_slice(&(p + i).to_le_bytes());
    }
    let (m, _) = MessageBuf::gpadl_header(
        &GpadlHeader {
            child_relid: U32::new(1),
            gpadl: U32::new(9),
            range_buflen: U16::new(range.len() as u16),
            range_count: U16::new(1),
        },
        &range,
    );
    msg(&mut core, m);
    let open = MessageBuf::new(&OpenChannel {
        child_relid: U32::new(1),
        open_id: U32::new(1),
        ring_buffer_gpadl: U32::new(9),
        target_vp: U32::new(0),
        downstream_ring_buffer_page_offset: U32::new(2),
        user_data: [0; 120],
    });
    msg(&mut core, open);
    let ch = grabbed.lock().unwrap().take().expect("opened");
    assert_eq!(ch.sub_channel_index(), 0);
    ch.offer_sub_channels(2).unwrap();
    msg(
        &mut core,
        MessageBuf::new(&vmbus_protocol::CloseChannel {
            child_relid: U32::new(1),
        }),
    );
    assert_eq!(ch.offer_sub_channels(1), Err(ChannelError::Closed));
    // Reopen; the stale request is handled now and dropped.
    msg(&mut core, open);
    let ch2 = grabbed.lock().unwrap().take().expect("reopened");
    core.handle_sub_channel_requests();
    assert_eq!(core.status().channels.len(), 1);
    // The current opening's request is served, capped at MAX_SUB_CHANNELS.
    ch2.offer_sub_channels(u16::MAX).unwrap();
    core.handle_sub_channel_requests();
    let st = core.status();
    assert_eq!(st.channels.len(), 1 + usize::from(MAX_SUB_CHANNELS));
    assert_eq!(
        st.channels.iter().map(|c| c.sub_channel_index).max(),
        Some(MAX_SUB_CHANNELS)
    );
    ch2.offer_sub_channels(1).unwrap();
    core.handle_sub_channel_requests();
    assert_eq!(
        core.status().channels.len(),
        1 + usize::from(MAX_SUB_CHANNELS)
    );
    // Reset forgets them.
    core.reset();
    assert_eq!(core.status().channels.len(), 1);
}
