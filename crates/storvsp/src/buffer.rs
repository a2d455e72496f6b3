//! Guest data buffers: the GPA-direct page lists of EXECUTE_SRB packets, validated once on
//! the channel thread ([`GpaList`]) and used by the SCSI target through [`GuestBuffer`].
//!
//! **What it is.** A request's data buffer is the concatenation of the packet's GPA ranges
//! (Linux sends one range: `byte_offset` into the first page, then whole pages). [`GpaList`]
//! turns them into guest-physically contiguous segments, checks that every segment is guest
//! RAM and that they cover `data_transfer_length`, and keeps nothing else.
//!
//! **Data path.** With a [`GuestMemoryMap`] (the worker's mapping of guest RAM),
//! [`GuestBuffer::read_disk`] / [`GuestBuffer::write_disk`] hand the backend guest memory
//! itself: one slice for a contiguous buffer, or the list of segments for a scattered one
//! (a guest's page-cache pages), which a file-backed disk moves with one `preadv`/`pwritev`:
//! no copy at all beyond the backend's own (none for an unbuffered disk, whose device
//! reads and writes guest RAM directly). They do so when every segment starts on a
//! logical-sector boundary of the transfer and, for reads, no two segments overlap in
//! guest memory (a guest may list a page twice; two live `&mut` slices of one page are not
//! allowed, so such a read bounces). Otherwise the SCSI target's default bounces the data
//! through a bounded chunk. Without a map everything bounces through
//! `vmbus_server::GuestRam` copies.
//!
//! **Never.** Touches memory that is not guest RAM (every segment is checked with
//! `GuestRam::is_ram` before use, and the map is asked for each segment again), allocates
//! more than one entry per page the packet itself lists, or trusts the guest not to change
//! the buffer during the transfer (it may; it only corrupts its own data, as with DMA).

use std::ptr::NonNull;

use disk::BlockBackend;
use vmbus_server::GuestRam;

use crate::scsi::{bounce_read, bounce_write, BufferError, DataBuffer, Scratch, XferError};

/// Page size of GPA ranges.
const PAGE: u64 = 4096;

/// Direct access to guest RAM for the data path.
///
/// `vmbus_server::GuestRam` only copies; the data path wants to give the disk backend the
/// guest's own pages so that a read is one `pread` into guest memory. The worker implements
/// this over the same mapping its `GuestRam` uses and passes it in the controller config.
///
/// # Safety
///
/// An implementation promises that a pointer it returns from [`host_ptr`](Self::host_ptr)
/// addresses `len` bytes of the guest RAM at `gpa` — the same memory the VMBus server's
/// `GuestRam` reads and writes — mapped readable and writable for as long as the
/// implementing object lives, and that it returns `None` for any range that is not entirely
/// such memory.
pub unsafe trait GuestMemoryMap: Send + Sync {
    /// Host address of guest RAM `[gpa, gpa + len)`, if it is all RAM, contiguous in the
    /// host mapping.
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>>;
}

/// One guest-physically contiguous piece of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes (> 0).
    pub len: u32,
}

/// A validated request buffer: segments covering exactly `len` bytes of guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpaList {
    segments: Vec<Segment>,
    len: usize,
}

/// One GPA range of a packet, as `vmbus_ring` parsed it (pages already counted).
pub struct RangeRef<I> {
    /// Bytes in the range.
    pub byte_count: u32,
    /// Offset into the first page (< 4096, checked by `vmbus_ring`).
    pub byte_offset: u32,
    /// The pages.
    pub pfns: I,
}

impl GpaList {
    /// The empty buffer (in-band requests).
    pub fn empty() -> Self {
        Self::default()
    }

    /// The first `len` bytes of `ranges`, concatenated. Fails if the ranges are shorter than
    /// `len` or any byte of the first `len` is not guest RAM.
    pub fn new<I: Iterator<Item = u64>>(
        ranges: impl IntoIterator<Item = RangeRef<I>>,
        len: usize,
        ram: &dyn GuestRam,
    ) -> Result<Self, BufferError> {
        let mut segments: Vec<Segment> = Vec::new();
        let mut need = len;
        for r in ranges {
            if need == 0 {
                break;
            }
            let mut in_range = (r.byte_count as usize).min(need);
            let mut offset = u64::from(r.byte_offset);
            for pfn in r.pfns {
                if in_range == 0 {
                    break;
                }
                let n = ((PAGE - offset) as usize).min(in_range);
                let gpa = pfn
                    .checked_mul(PAGE)
                    .and_then(|g| g.checked_add(offset))
                    .ok_or(BufferError)?;
                match segments.last_mut() {
                    Some(s)
                        if s.gpa.checked_add(u64::from(s.len)) == Some(gpa)
                            && (s.len as usize + n) <= u32::MAX as usize =>
                    {
                        s.len += n as u32;
                    }
                    _ => segments.push(Segment { gpa, len: n as u32 }),
                }
                in_range -= n;
                need -= n;
                offset = 0;
            }
            if in_range != 0 {
                // Fewer pages than the byte count needs (vmbus_ring prevents this).
                return Err(BufferError);
            }
        }
        if need != 0 {
            return Err(BufferError);
        }
        if segments
            .iter()
            .any(|s| !ram.is_ram(s.gpa, u64::from(s.len)))
        {
            return Err(BufferError);
        }
        Ok(Self { segments, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Call `f(gpa, at, n)` for each piece of `[offset, offset + len)`.
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), BufferError>,
    ) -> Result<(), BufferError> {
        let end = offset.checked_add(len).ok_or(BufferError)?;
        if end > self.len {
            return Err(BufferError);
        }
        let mut base = 0usize;
        let mut at = 0usize;
        for s in &self.segments {
            let s_end = base + s.len as usize;
            let pos = offset + at;
            if pos < s_end && pos < end {
                let n = s_end.min(end) - pos;
                f(s.gpa + (pos - base) as u64, at, n)?;
                at += n;
            }
            if s_end >= end {
                break;
            }
            base = s_end;
        }
        Ok(())
    }
}

/// Whether any two of the (address, length) pieces share a byte.
fn overlapping(plan: &[(NonNull<u8>, usize)]) -> bool {
    let mut spans: Vec<(usize, usize)> = plan
        .iter()
        .map(|(p, n)| (p.as_ptr() as usize, *n))
        .collect();
    spans.sort_unstable();
    spans.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0)
}

/// A [`GpaList`] with the means to reach it: what the SCSI target reads and writes.
pub struct GuestBuffer<'a> {
    list: &'a GpaList,
    ram: &'a dyn GuestRam,
    map: Option<&'a dyn GuestMemoryMap>,
}

impl<'a> GuestBuffer<'a> {
    /// A view of `list` through `ram` (and `map` for direct transfers).
    pub fn new(
        list: &'a GpaList,
        ram: &'a dyn GuestRam,
        map: Option<&'a dyn GuestMemoryMap>,
    ) -> Self {
        Self { list, ram, map }
    }

    /// The host memory of `[0, len)`, one piece per segment, if it can move directly: a
    /// map that covers every segment (a segment spanning two host mappings is refused, and
    /// the transfer bounces instead) and segments starting on sector boundaries of the
    /// transfer.
    fn direct_plan(&self, len: usize, sector: usize) -> Option<Vec<(NonNull<u8>, usize)>> {
        let map = self.map?;
        if len % sector != 0 {
            return None;
        }
        let mut plan = Vec::new();
        let mut pos = 0usize;
        for s in &self.list.segments {
            if pos >= len {
                break;
            }
            if pos % sector != 0 {
                return None;
            }
            let n = (s.len as usize).min(len - pos);
            plan.push((map.host_ptr(s.gpa, n)?, n));
            pos += n;
        }
        (pos == len && !plan.is_empty()).then_some(plan)
    }
}

impl DataBuffer for GuestBuffer<'_> {
    fn len(&self) -> usize {
        self.list.len
    }

    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), BufferError> {
        self.list.walk(offset, data.len(), |gpa, at, n| {
            self.ram
                .write(gpa, &data[at..at + n])
                .map_err(|_| BufferError)
        })
    }

    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), BufferError> {
        self.list.walk(offset, out.len(), |gpa, at, n| {
            self.ram
                .read(gpa, &mut out[at..at + n])
                .map_err(|_| BufferError)
        })
    }

    fn read_disk(
        &self,
        disk: &dyn BlockBackend,
        disk_offset: u64,
        len: usize,
        scratch: &mut Scratch,
    ) -> Result<(), XferError> {
        let Some(plan) = self.direct_plan(len, disk.logical_sector_size() as usize) else {
            return bounce_read(self, disk, disk_offset, len, scratch);
        };
        if plan.len() > 1 && overlapping(&plan) {
            return bounce_read(self, disk, disk_offset, len, scratch);
        }
        // SAFETY: `GuestMemoryMap` guarantees each `ptr` addresses `n` bytes of mapped guest
        // RAM that stays mapped while the map lives (it outlives this call), and the pieces
        // are disjoint (checked above), so these are the only Rust references to that
        // memory: the rest of the host reaches guest RAM only through copies and atomics.
        // The guest may write the buffer concurrently (as with DMA); the backend only hands
        // the slices to the kernel or copies into them, so that can corrupt only the
        // guest's own data.
        let mut slices: Vec<&mut [u8]> = plan
            .iter()
            .map(|(ptr, n)| unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), *n) })
            .collect();
        match &mut slices[..] {
            [one] => disk.read_at(disk_offset, one)?,
            all => disk.read_vectored_at(disk_offset, all)?,
        }
        Ok(())
    }

    fn write_disk(
        &self,
        disk: &dyn BlockBackend,
        disk_offset: u64,
        len: usize,
        scratch: &mut Scratch,
    ) -> Result<(), XferError> {
        let Some(plan) = self.direct_plan(len, disk.logical_sector_size() as usize) else {
            return bounce_write(self, disk, disk_offset, len, scratch);
        };
        // SAFETY: as in `read_disk`; here the backend only reads the slices, so pieces that
        // overlap are harmless.
        let slices: Vec<&[u8]> = plan
            .iter()
            .map(|(ptr, n)| unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *n) })
            .collect();
        match &slices[..] {
            [one] => disk.write_at(disk_offset, one)?,
            all => disk.write_vectored_at(disk_offset, all)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::MappedGuestRam;
    use std::sync::Arc;

    fn range(
        byte_count: u32,
        byte_offset: u32,
        pfns: &[u64],
    ) -> RangeRef<std::iter::Copied<std::slice::Iter<'_, u64>>> {
        RangeRef {
            byte_count,
            byte_offset,
            pfns: pfns.iter().copied(),
        }
    }

    #[test]
    fn merges_contiguous_pages_and_checks_ram() {
        let ram = MappedGuestRam::new(64 * 4096);
        let l = GpaList::new([range(3 * 4096, 512, &[5, 6, 7, 8])], 3 * 4096, &*ram).unwrap();
        assert_eq!(
            l.segments(),
            &[Segment {
                gpa: 5 * 4096 + 512,
                len: 3 * 4096
            }]
        );
        let l = GpaList::new([range(8192, 0, &[9, 3])], 6000, &*ram).unwrap();
        assert_eq!(l.segments().len(), 2);
        assert_eq!(l.len(), 6000);
        // Beyond RAM, overflowing PFNs, too short.
        assert!(GpaList::new([range(4096, 0, &[64])], 4096, &*ram).is_err());
        assert!(GpaList::new([range(4096, 0, &[u64::MAX / 2])], 4096, &*ram).is_err());
        assert!(GpaList::new([range(4096, 0, &[1])], 4097, &*ram).is_err());
        // Only the bytes used must be RAM.
        assert!(GpaList::new([range(8192, 0, &[63, 64])], 4096, &*ram).is_ok());
    }

    #[test]
    fn copies_cross_segments() {
        let ram = MappedGuestRam::new(64 * 4096);
        // 96 bytes at the end of page 10, 104 at the start of page 20, then 50 of range 2.
        let l = GpaList::new(
            [range(200, 4000, &[10, 20]), range(4096, 0, &[30])],
            250,
            &*ram,
        )
        .unwrap();
        assert_eq!(l.segments().len(), 3);
        let b = GuestBuffer::new(&l, &*ram, None);
        let data: Vec<u8> = (0..250u8).collect();
        b.write_at(0, &data).unwrap();
        let mut x = vec![0u8; 104];
        ram.read(10 * 4096 + 4000, &mut x[..96]).unwrap();
        assert_eq!(&x[..96], &data[..96]);
        ram.read(20 * 4096, &mut x).unwrap();
        assert_eq!(&x[..], &data[96..200]);
        ram.read(30 * 4096, &mut x[..50]).unwrap();
        assert_eq!(&x[..50], &data[200..]);
        let mut back = vec![0u8; 244];
        b.read_at(6, &mut back).unwrap();
        assert_eq!(back, data[6..]);
        assert!(b.read_at(100, &mut back).is_err());
    }

    /// A map split in two host mappings at 16 pages: a segment across the split is refused.
    struct SplitMap(Arc<MappedGuestRam>);
    // SAFETY: forwards to `MappedGuestRam`, refusing more, never less.
    unsafe impl GuestMemoryMap for SplitMap {
        fn host_ptr(&self, gpa: u64, len: usize) -> Option<NonNull<u8>> {
            let split = 16 * PAGE;
            if gpa < split && gpa + len as u64 > split {
                return None;
            }
            self.0.host_ptr(gpa, len)
        }
    }

    #[test]
    fn a_refused_segment_bounces_instead_of_failing() {
        use disk::{MemStorage, RawDisk};
        let ram = MappedGuestRam::new(64 * 4096);
        let st = Arc::new(MemStorage::new(
            (0..65536u32).map(|i| i as u8).collect(),
            65536,
        ));
        let d = RawDisk::from_storage(st, false, 512, 512, [0; 16]).unwrap();
        let map = SplitMap(ram.clone());
        let mut scratch = Scratch::default();
        for first in [4u64, 14] {
            // 4 contiguous pages: inside one mapping (direct) or across the split (bounce).
            let pfns: Vec<u64> = (first..first + 4).collect();
            let l = GpaList::new([range(16384, 0, &pfns)], 16384, &*ram).unwrap();
            let b = GuestBuffer::new(&l, &*ram, Some(&map));
            b.read_disk(&d, 4096, 16384, &mut scratch).unwrap();
            let mut got = vec![0u8; 16384];
            b.read_at(0, &mut got).unwrap();
            let want: Vec<u8> = (4096..4096 + 16384u32).map(|i| i as u8).collect();
            assert!(got == want, "first page {first}");
        }
    }
}
