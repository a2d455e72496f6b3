//! Test doubles for hv1's traits (feature `testing`): guest RAM in a `Vec`, an interrupt sink
//! that records, a clock the test sets. Used by the unit tests, the fuzz target, and other
//! crates' tests. Not for production: `FakeRam` serializes every access with one mutex.

use crate::{Clock, GuestMemory, InterruptSink, MemError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Guest RAM at GPA 0..size; everything else (and any range wrapping past 2^64) is refused.
pub struct FakeRam {
    bytes: Mutex<Vec<u8>>,
}

impl FakeRam {
    pub fn new(size: usize) -> Self {
        FakeRam {
            bytes: Mutex::new(vec![0; size]),
        }
    }

    pub fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(len_ram: usize, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemError> {
        let err = MemError {
            gpa,
            len: len as u64,
        };
        let end = gpa.checked_add(len as u64).ok_or(err)?;
        if end > len_ram as u64 {
            return Err(err);
        }
        Ok(gpa as usize..end as usize)
    }

    /// Reads `N` bytes; panics if out of range (a test helper).
    pub fn bytes<const N: usize>(&self, gpa: u64) -> [u8; N] {
        let mut b = [0; N];
        self.read(gpa, &mut b).expect("FakeRam::bytes out of range");
        b
    }

    /// Reads a little-endian u32; panics if out of range (a test helper).
    pub fn u32_at(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.bytes(gpa))
    }

    /// Reads a little-endian u64; panics if out of range (a test helper).
    pub fn u64_at(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.bytes(gpa))
    }
}

impl GuestMemory for FakeRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let ram = self.lock();
        let r = Self::range(ram.len(), gpa, buf.len())?;
        buf.copy_from_slice(&ram[r]);
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemError> {
        let mut ram = self.lock();
        let r = Self::range(ram.len(), gpa, buf.len())?;
        ram[r].copy_from_slice(buf);
        Ok(())
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError { gpa, len: 8 });
        }
        let mut ram = self.lock();
        let r = Self::range(ram.len(), gpa, 8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(&ram[r.clone()]);
        let old = u64::from_le_bytes(word);
        ram[r].copy_from_slice(&(old | bits).to_le_bytes());
        Ok(old)
    }
}

/// Records every interrupt raised, in order.
#[derive(Default)]
pub struct RecordingSink {
    raised: Mutex<Vec<(u32, u8)>>,
}

impl RecordingSink {
    /// The (vp, vector) pairs raised since the last call.
    pub fn take(&self) -> Vec<(u32, u8)> {
        std::mem::take(&mut *self.raised.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl InterruptSink for RecordingSink {
    fn interrupt(&self, vp: u32, vector: u8) {
        self.raised
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((vp, vector));
    }
}

/// A guest TSC the test sets.
#[derive(Default)]
pub struct FakeClock {
    tsc: AtomicU64,
}

impl FakeClock {
    pub fn new(tsc: u64) -> Self {
        FakeClock {
            tsc: AtomicU64::new(tsc),
        }
    }

    pub fn set(&self, tsc: u64) {
        self.tsc.store(tsc, Ordering::SeqCst);
    }

    pub fn advance(&self, ticks: u64) {
        self.tsc.fetch_add(ticks, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn guest_tsc(&self) -> u64 {
        self.tsc.load(Ordering::SeqCst)
    }
}
