//! Access to the memory of one ring: its header page and its data area.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::{MAX_DATA_LEN, RING_HEADER_SIZE};

/// The memory of one ring: a 4 KiB header page and a data area of [`RingMem::data_len`] bytes.
///
/// The ring code calls these with arguments it has already bounds-checked:
/// `header_offset` is one of the [`crate::header`] constants (4-aligned, inside the page) and
/// `offset + len <= data_len()` for data accesses (wrap-around is split by the caller).
/// Implementations over guest memory must still never access anything outside the ring's own
/// pages, whatever the arguments.
///
/// Header accesses are the synchronisation points: `load_header` must be an atomic load with
/// at least acquire ordering and `store_header` an atomic store with at least release ordering.
/// Data accesses may be plain (volatile) copies; the peer may change the bytes concurrently,
/// which only ever produces garbage values, never undefined behaviour in a correct
/// implementation.
pub trait RingMem {
    /// Size of the data area in bytes.
    fn data_len(&self) -> u32;
    /// Atomically load the u32 at `header_offset` in the header page (acquire).
    fn load_header(&self, header_offset: usize) -> u32;
    /// Atomically store the u32 at `header_offset` in the header page (release).
    fn store_header(&self, header_offset: usize, value: u32);
    /// Copy `buf.len()` bytes from the data area at `offset` into `buf`.
    fn read_data(&self, offset: u32, buf: &mut [u8]);
    /// Copy `data` into the data area at `offset`.
    fn write_data(&self, offset: u32, data: &[u8]);
}

impl<T: RingMem + ?Sized> RingMem for &T {
    fn data_len(&self) -> u32 {
        (**self).data_len()
    }
    fn load_header(&self, header_offset: usize) -> u32 {
        (**self).load_header(header_offset)
    }
    fn store_header(&self, header_offset: usize, value: u32) {
        (**self).store_header(header_offset, value)
    }
    fn read_data(&self, offset: u32, buf: &mut [u8]) {
        (**self).read_data(offset, buf)
    }
    fn write_data(&self, offset: u32, data: &[u8]) {
        (**self).write_data(offset, data)
    }
}

/// A ring in contiguous memory given by raw pointers: the header page and the data area.
///
/// For memory this process can address directly: a buffer shared by two threads (tests,
/// benchmarks), a guest's identity-mapped pages (the test guest), or a host mapping of guest
/// RAM when the ring's pages happen to be contiguous. Data copies are volatile so that the
/// compiler never assumes the shared bytes are stable.
#[derive(Debug)]
pub struct RawRingMem {
    header: NonNull<u8>,
    data: NonNull<u8>,
    data_len: u32,
}

// SAFETY: the memory is shared memory by design; all accesses are atomic (header) or volatile
// (data), and the constructor's contract makes the pointers valid for the value's lifetime.
unsafe impl Send for RawRingMem {}
// SAFETY: as above; no method takes `&mut self`, concurrent use is what the type is for.
unsafe impl Sync for RawRingMem {}

impl RawRingMem {
    /// Wrap a header page and a data area.
    ///
    /// Returns `None` if a pointer is null, `header` is not 4-aligned, `data` is not 8-aligned,
    /// or `data_len` is 0, not a multiple of 8 or above [`MAX_DATA_LEN`].
    ///
    /// # Safety
    ///
    /// `header` must be valid for reads and writes of [`RING_HEADER_SIZE`] bytes and `data`
    /// for `data_len` bytes, for as long as the returned value (or anything derived from it)
    /// is used, and the two regions must not overlap. Other users of the header's u32 fields
    /// (the peer) must access them atomically; the data area may be written by the peer at
    /// any time.
    pub unsafe fn new(header: *mut u8, data: *mut u8, data_len: u32) -> Option<Self> {
        let header = NonNull::new(header)?;
        let data = NonNull::new(data)?;
        if header.as_ptr() as usize % 4 != 0
            || data.as_ptr() as usize % 8 != 0
            || data_len == 0
            || data_len % 8 != 0
            || data_len > MAX_DATA_LEN
        {
            return None;
        }
        Some(Self {
            header,
            data,
            data_len,
        })
    }

    fn header_field(&self, header_offset: usize) -> &AtomicU32 {
        assert!(header_offset % 4 == 0 && header_offset + 4 <= RING_HEADER_SIZE);
        // SAFETY: in bounds of the header page (checked above), 4-aligned (the page is
        // 4-aligned and so is the offset), valid for the lifetime of `self` (constructor
        // contract) and only ever accessed atomically by both sides.
        unsafe { AtomicU32::from_ptr(self.header.as_ptr().add(header_offset).cast::<u32>()) }
    }

    fn check_data(&self, offset: u32, len: usize) {
        assert!(
            (offset as usize)
                .checked_add(len)
                .is_some_and(|end| end <= self.data_len as usize),
            "ring data access out of bounds"
        );
    }
}

impl RingMem for RawRingMem {
    fn data_len(&self) -> u32 {
        self.data_len
    }

    fn load_header(&self, header_offset: usize) -> u32 {
        self.header_field(header_offset).load(Ordering::Acquire)
    }

    fn store_header(&self, header_offset: usize, value: u32) {
        self.header_field(header_offset)
            .store(value, Ordering::Release)
    }

    fn read_data(&self, offset: u32, buf: &mut [u8]) {
        self.check_data(offset, buf.len());
        // SAFETY: `offset + buf.len() <= data_len` (checked), so the source range lies in the
        // data area, valid per the constructor contract; `buf` is a distinct Rust buffer.
        unsafe { volatile_copy_from(self.data.as_ptr().add(offset as usize), buf) }
    }

    fn write_data(&self, offset: u32, data: &[u8]) {
        self.check_data(offset, data.len());
        // SAFETY: as in `read_data`, with the destination in the data area.
        unsafe { volatile_copy_to(data, self.data.as_ptr().add(offset as usize)) }
    }
}

/// Volatile copy of `dst.len()` bytes from `src` (u64 chunks where aligned).
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes and not overlap `dst`.
unsafe fn volatile_copy_from(src: *const u8, dst: &mut [u8]) {
    let mut i = 0;
    let len = dst.len();
    // Byte-wise until the source is 8-aligned (ring offsets usually are already).
    while i < len && (src as usize + i) % 8 != 0 {
        // SAFETY: i < len, within the caller's range.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while i + 8 <= len {
        // SAFETY: src + i is 8-aligned and the 8 bytes are in the caller's range.
        let v = unsafe { src.add(i).cast::<u64>().read_volatile() };
        dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
        i += 8;
    }
    while i < len {
        // SAFETY: i < len.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Volatile copy of `src` to `dst` (u64 chunks where aligned).
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and not overlap `src`.
unsafe fn volatile_copy_to(src: &[u8], dst: *mut u8) {
    let mut i = 0;
    let len = src.len();
    while i < len && (dst as usize + i) % 8 != 0 {
        // SAFETY: i < len, within the caller's range.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while i + 8 <= len {
        let mut b = [0u8; 8];
        b.copy_from_slice(&src[i..i + 8]);
        // SAFETY: dst + i is 8-aligned and the 8 bytes are in the caller's range.
        unsafe {
            dst.add(i)
                .cast::<u64>()
                .write_volatile(u64::from_ne_bytes(b))
        };
        i += 8;
    }
    while i < len {
        // SAFETY: i < len.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
}
