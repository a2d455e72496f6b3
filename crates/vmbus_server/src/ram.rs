//! Guest RAM access and rings over guest pages.

use std::sync::Arc;

use vmbus_ring::{RingMem, PAGE_SIZE};

/// A guest RAM access failed: the range is not (entirely) guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest physical range {gpa:#x}+{len:#x} is not guest RAM")]
pub struct GuestRamError {
    /// Start of the range.
    pub gpa: u64,
    /// Length of the range.
    pub len: u64,
}

/// The worker's guest RAM, as the server and VSPs may use it.
///
/// Every method must refuse (with an error, never by touching other memory) any range that is
/// not entirely guest RAM. The guest may change the bytes concurrently.
pub trait GuestRam: Send + Sync {
    /// Whether `[gpa, gpa + len)` is entirely guest RAM (and does not overflow).
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
    /// Copy guest bytes at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestRamError>;
    /// Copy `data` into guest RAM at `gpa`.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError>;
    /// Atomic load (acquire) of the u32 at 4-aligned `gpa`.
    fn load_u32(&self, gpa: u64) -> Result<u32, GuestRamError>;
    /// Atomic store (release) of the u32 at 4-aligned `gpa`.
    fn store_u32(&self, gpa: u64, value: u32) -> Result<(), GuestRamError>;
}

/// One ring (header page + data pages) in guest RAM, described by page frame numbers: the
/// [`RingMem`] the server uses over a GPADL, and the test guest's client over its own pages.
///
/// Every PFN is checked against [`GuestRam::is_ram`] at construction. Should a later access
/// still fail, reads yield zeros and writes are dropped: the ring code then sees a corrupt
/// ring, never foreign memory.
pub struct GuestRamRing {
    ram: Arc<dyn GuestRam>,
    header_gpa: u64,
    data_pfns: Box<[u64]>,
    data_len: u32,
}

impl std::fmt::Debug for GuestRamRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRamRing")
            .field("header_gpa", &self.header_gpa)
            .field("data_pages", &self.data_pfns.len())
            .finish()
    }
}

/// GPA of page `pfn`, if it does not overflow.
pub(crate) fn pfn_gpa(pfn: u64) -> Option<u64> {
    pfn.checked_mul(PAGE_SIZE as u64)
}

impl GuestRamRing {
    /// A ring whose header is page `header_pfn` and whose data area is `data_pfns` in order.
    /// `None` if a page is not RAM or the data area is empty or larger than
    /// [`vmbus_ring::MAX_DATA_LEN`].
    pub fn new(ram: Arc<dyn GuestRam>, header_pfn: u64, data_pfns: &[u64]) -> Option<Self> {
        let data_len = u32::try_from(data_pfns.len().checked_mul(PAGE_SIZE)?).ok()?;
        if data_len == 0 || data_len > vmbus_ring::MAX_DATA_LEN {
            return None;
        }
        for &pfn in std::iter::once(&header_pfn).chain(data_pfns) {
            if !ram.is_ram(pfn_gpa(pfn)?, PAGE_SIZE as u64) {
                return None;
            }
        }
        Some(Self {
            header_gpa: pfn_gpa(header_pfn)?,
            ram,
            data_pfns: data_pfns.into(),
            data_len,
        })
    }

    /// Walk `[offset, offset + len)` of the data area page by page.
    fn chunks(&self, offset: u32, len: usize, mut f: impl FnMut(u64, usize, usize)) {
        let mut done = 0usize;
        while done < len {
            let pos = offset as usize + done;
            let page = pos / PAGE_SIZE;
            let in_page = pos % PAGE_SIZE;
            let n = (PAGE_SIZE - in_page).min(len - done);
            let Some(&pfn) = self.data_pfns.get(page) else {
                return;
            };
            f(pfn * PAGE_SIZE as u64 + in_page as u64, done, n);
            done += n;
        }
    }
}

impl RingMem for GuestRamRing {
    fn data_len(&self) -> u32 {
        self.data_len
    }

    fn load_header(&self, header_offset: usize) -> u32 {
        if header_offset + 4 > PAGE_SIZE {
            return 0;
        }
        self.ram
            .load_u32(self.header_gpa + header_offset as u64)
            .unwrap_or(0)
    }

    fn store_header(&self, header_offset: usize, value: u32) {
        if header_offset + 4 <= PAGE_SIZE {
            let _ = self
                .ram
                .store_u32(self.header_gpa + header_offset as u64, value);
        }
    }

    fn read_data(&self, offset: u32, buf: &mut [u8]) {
        let len = buf.len();
        self.chunks(offset, len, |gpa, at, n| {
            if self.ram.read(gpa, &mut buf[at..at + n]).is_err() {
                buf[at..at + n].fill(0);
            }
        });
    }

    fn write_data(&self, offset: u32, data: &[u8]) {
        self.chunks(offset, data.len(), |gpa, at, n| {
            let _ = self.ram.write(gpa, &data[at..at + n]);
        });
    }
}
