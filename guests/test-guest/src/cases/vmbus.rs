//! `test=vmbus`: the guest side of VMBus against the VMM's server (`--vmbus-echo`): SynIC set
//! up through hv1's MSRs, then `vmbus_client` negotiates a version, requests offers, finds the
//! echo device, creates a GPADL for a ring pair, opens the channel, sends packets and checks
//! the echoes, closes, tears down and unloads. Polls (SINT 2 stays masked; hv1 still fills the
//! message slot), so no interrupt handler is involved.
//!
//! Output: `vmbus: version <major>.<minor>`, `vmbus: <n> offers`, `vmbus: echo <n> ok`,
//! `vmbus: ok` — or a `vmbus: FAIL <what>` line.

use super::hyperv::{hypercall, Page, HYPERCALL_PAGE};
use crate::io::{rdmsr, wrmsr};
use crate::serial::Writer;
use crate::Global;
use core::sync::atomic::{AtomicU64, Ordering};
use vmbus_client::{ClientChannel, ClientConfig, HvGuest, VmbusClient};
use vmbus_protocol::{Guid, MAX_MESSAGE_SIZE};
use vmbus_ring::{OutgoingPacket, RawRingMem};

const GUEST_OS_ID: u32 = 0x4000_0000;
const HYPERCALL: u32 = 0x4000_0001;
const TIME_REF_COUNT: u32 = 0x4000_0020;
const SCONTROL: u32 = 0x4000_0080;
const SIEFP: u32 = 0x4000_0082;
const SIMP: u32 = 0x4000_0083;
const EOM: u32 = 0x4000_0084;
const SINT2: u32 = 0x4000_0092;

const ECHO_CLASS: Guid = Guid::from_str_const("8a1c5e2e-7c19-4a7e-9a4b-5645c0ffee01");
/// Pages per ring: one header page and four data pages, outbound then inbound.
const RING_PAGES: usize = 5;

static SIMP_PAGE: Global<Page> = Global::new(Page([0; 4096]));
static SIEF_PAGE: Global<Page> = Global::new(Page([0; 4096]));
static INPUT_PAGE: Global<Page> = Global::new(Page([0; 4096]));
static RINGS: Global<[Page; 2 * RING_PAGES]> = Global::new([const { Page([0; 4096]) }; 2 * RING_PAGES]);

struct Hv;

impl HvGuest for Hv {
    fn post_message(&mut self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16 {
        let n = payload.len().min(240);
        // SAFETY: the input page is ours, single-threaded use; the hypercall reads it.
        let page = unsafe { &mut (*INPUT_PAGE.get()).0 };
        page[0..4].copy_from_slice(&connection_id.to_le_bytes());
        page[4..8].fill(0);
        page[8..12].copy_from_slice(&message_type.to_le_bytes());
        page[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        page[16..16 + n].copy_from_slice(&payload[..n]);
        core::sync::atomic::compiler_fence(Ordering::SeqCst);
        hypercall(0x5c, INPUT_PAGE.get() as u64) as u16
    }

    fn signal_event(&mut self, connection_id: u32, flag: u16) -> u16 {
        hypercall(0x5d | (1 << 16), u64::from(connection_id) | (u64::from(flag) << 32)) as u16
    }

    fn take_message(&mut self, sint: u8, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let slot = SIMP_PAGE.get() as usize + usize::from(sint & 15) * 256;
        // SAFETY: the SIMP page is ours and the VMM writes it; volatile accesses only.
        unsafe {
            let ty = core::ptr::read_volatile(slot as *const u32);
            if ty == 0 {
                return None;
            }
            let size = usize::from(core::ptr::read_volatile((slot + 4) as *const u8)).min(240);
            let flags = core::ptr::read_volatile((slot + 5) as *const u8);
            for (i, b) in buf.iter_mut().take(size).enumerate() {
                *b = core::ptr::read_volatile((slot + 16 + i) as *const u8);
            }
            core::ptr::write_volatile(slot as *mut u32, 0);
            core::sync::atomic::fence(Ordering::SeqCst);
            if flags & 1 != 0 {
                wrmsr(EOM, 0);
            }
            Some(size)
        }
    }

    fn take_event(&mut self, sint: u8, flag: u32) -> bool {
        let word = SIEF_PAGE.get() as usize + usize::from(sint & 15) * 256 + (flag as usize / 64) * 8;
        let bit = 1u64 << (flag % 64);
        // SAFETY: an 8-aligned word of our SIEF page; the VMM sets bits with atomic ORs.
        let w = unsafe { AtomicU64::from_ptr(word as *mut u64) };
        w.fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    fn wait(&mut self) {
        for _ in 0..20 {
            core::hint::spin_loop();
        }
    }

    fn now_ms(&mut self) -> u64 {
        // SAFETY: a synthetic, read-only MSR.
        unsafe { rdmsr(TIME_REF_COUNT) / 10_000 }
    }
}

fn fail(w: &mut Writer, what: &str) {
    w.str("vmbus: FAIL ").str(what).str("\n");
}

pub fn run() {
    let mut w = Writer::lock();
    // SAFETY: synthetic MSRs; the pages are ours and page aligned.
    unsafe {
        wrmsr(GUEST_OS_ID, 0x8100_0000_0000_0601);
        wrmsr(HYPERCALL, HYPERCALL_PAGE.get() as u64 | 1);
        wrmsr(SIMP, SIMP_PAGE.get() as u64 | 1);
        wrmsr(SIEFP, SIEF_PAGE.get() as u64 | 1);
        wrmsr(SINT2, 0xf3 | (1 << 16)); // masked: we poll
        wrmsr(SCONTROL, 1);
    }
    let mut c = VmbusClient::new(Hv, ClientConfig { timeout_ms: 20_000, ..ClientConfig::default() });
    let version = match c.connect() {
        Ok(v) => v,
        Err(_) => return fail(&mut w, "connect"),
    };
    w.str("vmbus: version ").dec(u64::from(version >> 16)).str(".").dec(u64::from(version & 0xffff)).str("\n");
    match c.request_offers() {
        Ok(n) => {
            w.str("vmbus: ").dec(n as u64).str(" offers\n");
        }
        Err(_) => return fail(&mut w, "offers"),
    }
    let Some(offer) = c.find_offer(ECHO_CLASS) else {
        return fail(&mut w, "no echo device offered");
    };
    let base = RINGS.get() as u64;
    let mut pfns = [0u64; 2 * RING_PAGES];
    for (i, p) in pfns.iter_mut().enumerate() {
        *p = (base >> 12) + i as u64;
    }
    let gpadl = match c.create_gpadl(offer.relid, &pfns, (2 * RING_PAGES * 4096) as u32, 0) {
        Ok(g) => g,
        Err(_) => return fail(&mut w, "gpadl"),
    };
    if c.open_channel(offer.relid, gpadl, RING_PAGES as u32, 0, &[]).is_err() {
        return fail(&mut w, "open");
    }
    let data_len = ((RING_PAGES - 1) * 4096) as u32;
    // SAFETY: the ring pages are ours, zeroed, shared only with the VMM through the GPADL.
    let (out, inp) = unsafe {
        (
            RawRingMem::new(base as *mut u8, (base + 4096) as *mut u8, data_len),
            RawRingMem::new(
                (base + (RING_PAGES as u64) * 4096) as *mut u8,
                (base + (RING_PAGES as u64 + 1) * 4096) as *mut u8,
                data_len,
            ),
        )
    };
    let (Some(out), Some(inp)) = (out, inp) else {
        return fail(&mut w, "ring memory");
    };
    let Ok(mut ch) = ClientChannel::new(&offer, out, inp) else {
        return fail(&mut w, "channel");
    };
    let rounds = 10u64;
    for i in 0..rounds {
        let mut msg = *b"ping-0000000000.";
        msg[14] = b'0' + (i % 10) as u8;
        if ch.send(c.hv(), &OutgoingPacket::in_band(i, &msg, false), 10_000).is_err() {
            return fail(&mut w, "send");
        }
        let mut buf = [0u8; 256];
        match ch.recv(c.hv(), &mut buf, 20_000) {
            Ok(p) if p.payload() == msg && p.transaction_id() == i => {}
            Ok(_) => return fail(&mut w, "echo mismatch"),
            Err(_) => return fail(&mut w, "recv"),
        }
    }
    w.str("vmbus: echo ").dec(rounds).str(" ok\n");
    if c.close_channel(offer.relid).is_err() || c.teardown_gpadl(offer.relid, gpadl).is_err() {
        return fail(&mut w, "close");
    }
    if c.unload().is_err() {
        return fail(&mut w, "unload");
    }
    w.str("vmbus: ok\n");
}
