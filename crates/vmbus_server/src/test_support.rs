//! In-process fakes for testing the server and VSPs without a VM: guest RAM, a SynIC, and a
//! guest-side hypervisor ([`InProcessGuest`]) that lets `vmbus_client` talk straight to a
//! [`VmbusServer`].
//!
//! Enabled by the `test-support` feature (and in this crate's own tests).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmbus_client::HvGuest;
use vmbus_protocol::MAX_MESSAGE_SIZE;
use vmbus_ring::PAGE_SIZE;

use crate::{GuestRam, GuestRamError, GuestSynic, VmbusServer};

/// Guest RAM at GPA 0..size in a host buffer, with a bump page allocator for test guests.
pub struct FakeGuestRam {
    mem: Mutex<Vec<u8>>,
    size: u64,
    next_pfn: AtomicU64,
}

impl FakeGuestRam {
    /// `size` bytes of zeroed RAM (rounded up to pages). Page 0 is never handed out.
    pub fn new(size: u64) -> Arc<Self> {
        let size = size.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
        Arc::new(Self {
            mem: Mutex::new(vec![0; size as usize]),
            size,
            next_pfn: AtomicU64::new(1),
        })
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Allocate `n` zeroed, contiguous pages; returns the first PFN. Panics when RAM runs out
    /// (a test bug).
    pub fn alloc_pages(&self, n: u64) -> u64 {
        let pfn = self.next_pfn.fetch_add(n, Ordering::SeqCst);
        assert!(
            (pfn + n) * PAGE_SIZE as u64 <= self.size,
            "fake guest RAM exhausted"
        );
        pfn
    }

    fn range(&self, gpa: u64, len: u64) -> Result<std::ops::Range<usize>, GuestRamError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(gpa as usize..end as usize),
            _ => Err(GuestRamError { gpa, len }),
        }
    }
}

impl GuestRam for FakeGuestRam {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.range(gpa, len).is_ok()
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError> {
        let r = self.range(gpa, buf.len() as u64)?;
        buf.copy_from_slice(&self.mem.lock().unwrap()[r]);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError> {
        let r = self.range(gpa, data.len() as u64)?;
        self.mem.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }

    fn load_u32(&self, gpa: u64) -> Result<u32, GuestRamError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn store_u32(&self, gpa: u64, value: u32) -> Result<(), GuestRamError> {
        self.write(gpa, &value.to_le_bytes())
    }
}

#[derive(Clone)]
struct VpSynic {
    /// SIMP slots: (message type, payload).
    slots: [Option<(u32, Vec<u8>)>; 16],
    /// SIEF slots: 2048 flags per SINT.
    flags: [[u64; 32]; 16],
}

/// A SynIC with one message slot per SINT per VP, like the real one: posting into a busy slot
/// fails and the server must retry.
pub struct FakeSynic {
    vps: Mutex<Vec<VpSynic>>,
    cond: Condvar,
    rejected: AtomicU64,
    signals: AtomicU64,
}

impl FakeSynic {
    /// A SynIC for `vp_count` VPs.
    pub fn new(vp_count: u32) -> Arc<Self> {
        Arc::new(Self {
            vps: Mutex::new(vec![
                VpSynic {
                    slots: Default::default(),
                    flags: [[0; 32]; 16],
                };
                vp_count as usize
            ]),
            cond: Condvar::new(),
            rejected: AtomicU64::new(0),
            signals: AtomicU64::new(0),
        })
    }

    /// Take the message in `vp`'s slot for `sint`.
    pub fn take_message(&self, vp: u32, sint: u8) -> Option<(u32, Vec<u8>)> {
        let mut g = self.vps.lock().unwrap();
        g.get_mut(vp as usize)?.slots.get_mut(sint as usize)?.take()
    }

    /// Test and clear an event flag.
    pub fn take_event(&self, vp: u32, sint: u8, flag: u32) -> bool {
        let mut g = self.vps.lock().unwrap();
        let Some(word) = g
            .get_mut(vp as usize)
            .and_then(|v| v.flags.get_mut(sint as usize))
            .and_then(|f| f.get_mut(flag as usize / 64))
        else {
            return false;
        };
        let bit = 1u64 << (flag % 64);
        let was = *word & bit != 0;
        *word &= !bit;
        was
    }

    /// Wait up to `timeout` for a post or a signal.
    pub fn wait(&self, timeout: Duration) {
        let g = self.vps.lock().unwrap();
        let _ = self.cond.wait_timeout(g, timeout).unwrap();
    }

    /// Posts refused because the slot was busy.
    pub fn rejected_posts(&self) -> u64 {
        self.rejected.load(Ordering::SeqCst)
    }

    /// Event signals received.
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::SeqCst)
    }
}

impl GuestSynic for FakeSynic {
    fn post_message(&self, vp: u32, sint: u8, message_type: u32, payload: &[u8]) -> Result<(), ()> {
        let mut g = self.vps.lock().unwrap();
        let slot = g
            .get_mut(vp as usize)
            .and_then(|v| v.slots.get_mut(sint as usize))
            .ok_or(())?;
        if slot.is_some() {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return Err(());
        }
        *slot = Some((message_type, payload.to_vec()));
        drop(g);
        self.cond.notify_all();
        Ok(())
    }

    fn signal_event(&self, vp: u32, sint: u8, flag: u32) {
        self.signals.fetch_add(1, Ordering::SeqCst);
        let mut g = self.vps.lock().unwrap();
        if let Some(word) = g
            .get_mut(vp as usize)
            .and_then(|v| v.flags.get_mut(sint as usize))
            .and_then(|f| f.get_mut(flag as usize / 64))
        {
            *word |= 1 << (flag % 64);
        }
        drop(g);
        self.cond.notify_all();
    }
}

/// The guest side of the hypervisor for `vmbus_client`, running on VP `vp`: hypercalls go
/// straight to the server, messages and events come from the [`FakeSynic`].
pub struct InProcessGuest {
    /// The server.
    pub server: Arc<VmbusServer>,
    /// The SynIC the server posts into.
    pub synic: Arc<FakeSynic>,
    /// This guest's VP.
    pub vp: u32,
    start: Instant,
}

impl InProcessGuest {
    /// A guest on VP `vp`.
    pub fn new(server: Arc<VmbusServer>, synic: Arc<FakeSynic>, vp: u32) -> Self {
        Self {
            server,
            synic,
            vp,
            start: Instant::now(),
        }
    }
}

impl HvGuest for InProcessGuest {
    fn post_message(&mut self, connection_id: u32, message_type: u32, payload: &[u8]) -> u16 {
        self.server
            .post_message(self.vp, connection_id, message_type, payload)
    }

    fn signal_event(&mut self, connection_id: u32, flag: u16) -> u16 {
        self.server.signal_event(self.vp, connection_id, flag)
    }

    fn take_message(&mut self, sint: u8, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let (_, payload) = self.synic.take_message(self.vp, sint)?;
        let n = payload.len().min(MAX_MESSAGE_SIZE);
        buf[..n].copy_from_slice(&payload[..n]);
        self.server.message_slot_freed(self.vp);
        Some(n)
    }

    fn take_event(&mut self, sint: u8, flag: u32) -> bool {
        self.synic.take_event(self.vp, sint, flag)
    }

    fn wait(&mut self) {
        self.synic.wait(Duration::from_millis(5));
    }

    fn now_ms(&mut self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}
