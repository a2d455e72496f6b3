//! VHDX (MS-VHDX v1) images: open, read, write, flush, unmap, resize, with the metadata log.
//!
//! Locking: the BAT (and the geometry, which changes only on resize) sits behind one `RwLock`
//! that is held only to copy an entry out, never across I/O. Data reads and writes to allocated
//! blocks therefore run in parallel with positional I/O. Everything that changes metadata
//! (allocating a block, setting sector-bitmap bits, unmap, resize, header updates) is serialized
//! by the `meta` mutex and goes through `Vhdx::commit`, which journals it:
//!
//! 1. payload data (and any file extension) is written and flushed first;
//! 2. the log entry describing the new metadata sectors is written and flushed;
//! 3. the sectors are written in place and flushed;
//! 4. only then does the in-memory BAT change, so no reader sees a block before it is durable.
//!
//! A crash at any point leaves either the old metadata (the entry is torn or absent: the data
//! written in step 1 is unreferenced) or the new one (the entry is replayed on the next
//! read-write open). Headers are never journalled (the spec forbids it): they are updated by the
//! two-copy sequence-number scheme, each copy flushed before the next.

pub mod create;
pub mod format;
pub mod log;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use format::*;

use crate::error::{Error, IoContext, Result};
use crate::guid::Guid;
use crate::storage::{FileStorage, Storage};
use crate::BlockBackend;

/// How to find the parent of a differencing disk.
#[derive(Clone, Default)]
pub enum ParentMode {
    /// Follow the parent locator (relative path first, then absolute), open the parent read-only
    /// and check its identity. Needs the image's path.
    #[default]
    Resolve,
    /// Use this backend as the parent (its identity is not checked: the caller vouches for it).
    Provided(Arc<dyn BlockBackend>),
    /// Pretend the parent is all zeros. For inspecting or fuzzing a lone differencing file;
    /// never use it to serve a VM.
    Zeros,
}

/// Options for opening a VHDX.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Open without write access; the file is never modified.
    pub read_only: bool,
    /// How to find a differencing disk's parent.
    pub parent: ParentMode,
    /// Use this value (instead of a random one) as the new DataWriteGuid when the first
    /// user-visible change is made. Merging uses it to keep a child's `parent_linkage2` valid
    /// while the parent changes (MS-VHDX 2.6.2.6.3, note 12).
    pub data_write_guid: Option<Guid>,
    /// Payload I/O bypasses the host's page cache where it can (see
    /// [`crate::DiskOptions::unbuffered`]); parents are opened the same way.
    pub unbuffered: bool,
}

/// Depth limit for parent chains; deeper (or cyclic) chains are refused.
const MAX_CHAIN_DEPTH: u32 = 64;

struct Session {
    log_guid: Guid,
    next_seq: u64,
    next_slot: u64,
}

/// Metadata state, guarded by the `meta` mutex.
struct Meta {
    header: Header,
    header_slot: usize,
    regions: RegionTable,
    bat_region: Region,
    meta_region: Region,
    metadata: Metadata,
    /// Where the next block is allocated (1 MiB aligned, past every structure).
    file_end: u64,
    session: Option<Session>,
    data_guid_updated: bool,
    forced_data_guid: Option<Guid>,
}

struct BatState {
    geo: Geometry,
    bat: Vec<u64>,
}

/// A pending set of 4 KiB metadata sector writes, kept in the order they were added so that a
/// transaction split over several log entries commits its most important sector last.
#[derive(Default)]
struct Tx {
    order: Vec<u64>,
    sectors: HashMap<u64, Vec<u8>>,
}

impl Tx {
    fn set_sector(&mut self, off: u64, data: Vec<u8>) {
        debug_assert!(off % SECTOR_4K == 0 && data.len() == SECTOR_4K as usize);
        if self.sectors.insert(off, data).is_none() {
            self.order.push(off);
        } else {
            // Keep the latest position in the order.
            self.order.retain(|&o| o != off);
            self.order.push(off);
        }
    }

    /// Patches `bytes` at file offset `off`, reading sectors not yet in the transaction.
    fn patch(&mut self, st: &dyn Storage, off: u64, bytes: &[u8]) -> Result<()> {
        let mut pos = off;
        let end = off + bytes.len() as u64;
        while pos < end {
            let sec = pos / SECTOR_4K * SECTOR_4K;
            let mut data = match self.sectors.get(&sec) {
                Some(d) => d.clone(),
                None => {
                    let mut d = vec![0u8; SECTOR_4K as usize];
                    st.read_at(sec, &mut d)
                        .ctx(|| format!("reading metadata sector at {sec}"))?;
                    d
                }
            };
            let n = (sec + SECTOR_4K).min(end) - pos;
            let src = (pos - off) as usize;
            data[(pos - sec) as usize..(pos - sec + n) as usize]
                .copy_from_slice(&bytes[src..src + n as usize]);
            self.set_sector(sec, data);
            pos += n;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// An open VHDX image.
pub struct Vhdx {
    st: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    logical_sector_size: u32,
    physical_sector_size: u32,
    block_size: u32,
    has_parent: bool,
    leave_blocks_allocated: bool,
    state: RwLock<BatState>,
    bitmaps: RwLock<HashMap<u64, Vec<u8>>>,
    meta: Mutex<Meta>,
    /// Set once the headers carry the session's GUIDs, so data writes can skip the meta lock.
    data_ready: AtomicBool,
    failed: AtomicBool,
    parent: Option<Arc<dyn BlockBackend>>,
    parent_path: Option<PathBuf>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Whether the first bytes of a file carry the VHDX file identifier.
pub fn has_vhdx_signature(st: &dyn Storage) -> Result<bool> {
    if st.len().ctx(|| "getting the file size".into())? < 8 {
        return Ok(false);
    }
    let mut sig = [0u8; 8];
    st.read_at(0, &mut sig)
        .ctx(|| "reading the file signature".into())?;
    Ok(&sig == FILE_ID_SIGNATURE)
}

/// Header fields the info verb reports.
#[derive(Clone, Debug)]
pub struct HeaderInfo {
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_offset: u64,
    pub log_length: u32,
}

impl Vhdx {
    /// Opens a VHDX file.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Vhdx> {
        Self::open_at_depth(path, opts, 0)
    }

    fn open_at_depth(path: &Path, opts: OpenOptions, depth: u32) -> Result<Vhdx> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .ctx(|| format!("opening {}", path.display()))?;
        let mut st = FileStorage::new(file).ctx(|| format!("inspecting {}", path.display()))?;
        if opts.unbuffered {
            st = st
                .unbuffered()
                .ctx(|| format!("opening {} for direct I/O", path.display()))?;
        }
        Self::open_storage_at_depth(Arc::new(st), Some(path), opts, depth)
            .map_err(|e| e.with_path(path))
    }

    /// Opens a VHDX held in any [`Storage`]. `path` is used to resolve a parent and in errors.
    pub fn open_storage(
        st: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: OpenOptions,
    ) -> Result<Vhdx> {
        let r = Self::open_storage_at_depth(st, path, opts, 0);
        match path {
            Some(p) => r.map_err(|e| e.with_path(p)),
            None => r,
        }
    }

    fn open_storage_at_depth(
        st: Arc<dyn Storage>,
        path: Option<&Path>,
        opts: OpenOptions,
        depth: u32,
    ) -> Result<Vhdx> {
        let mut file_len = st.len().ctx(|| "getting the file size".into())?;
        let (mut header, mut slot) = read_headers(&*st, file_len)?;
        if !header.log_guid.is_zero() {
            if opts.read_only {
                let seq = log::find_active_sequence(
                    &*st,
                    header.log_offset,
                    header.log_length as u64,
                    header.log_guid,
                )?;
                if let Some(seq) = seq {
                    if !log::sequence_is_applied(&*st, &seq)? {
                        return Err(Error::LogReplayNeeded { path: None });
                    }
                }
            } else {
                // The header must change (new FileWriteGuid) before anything else is modified,
                // the log is replayed, then the header is updated to say the log is empty.
                let mut h = header;
                h.file_write_guid = Guid::new_random();
                write_header_pair(&*st, &mut header, &mut slot, h)?;
                log::replay(&*st, &header)?;
                let mut h = header;
                h.log_guid = Guid::ZERO;
                write_header_pair(&*st, &mut header, &mut slot, h)?;
                file_len = st.len().ctx(|| "getting the file size".into())?;
            }
        }
        let regions = read_region_table(&*st)?;
        let areas = validate_layout(&header, &regions, file_len)?;
        let bat_region = regions.find(REGION_BAT).expect("validated");
        let meta_region = regions.find(REGION_METADATA).expect("validated");
        let metadata = read_metadata(&*st, meta_region)?;
        let geo = Geometry::new(
            metadata.block_size,
            metadata.logical_sector_size,
            metadata.virtual_size,
            metadata.has_parent,
        );
        let bat = read_bat(&*st, bat_region, &geo)?;
        validate_bat(&bat, &geo, file_len, &areas)?;
        if !opts.read_only && header.log_length == 0 {
            return Err(Error::unsupported(
                "image has no log region, so it cannot be written",
            ));
        }

        let mut file_end = file_len.div_ceil(MIB) * MIB;
        for (s, l, _) in &areas {
            file_end = file_end.max((s + l).div_ceil(MIB) * MIB);
        }
        for (i, &e) in bat.iter().enumerate() {
            let st_ = bat_state(e);
            let is_bitmap = (i as u64 + 1) % (geo.chunk_ratio + 1) == 0;
            let len = if is_bitmap {
                BITMAP_BLOCK_SIZE
            } else {
                geo.block_size
            };
            if (is_bitmap && st_ == SB_BLOCK_PRESENT)
                || (!is_bitmap
                    && (st_ == PAYLOAD_BLOCK_FULLY_PRESENT
                        || st_ == PAYLOAD_BLOCK_PARTIALLY_PRESENT))
            {
                file_end = file_end.max(bat_offset(e) + len);
            }
        }

        let (parent, parent_path) = if metadata.has_parent {
            let pl = metadata.parent_locator.as_ref().expect("validated");
            match &opts.parent {
                ParentMode::Zeros => (None, None),
                ParentMode::Provided(p) => (Some(p.clone()), None),
                ParentMode::Resolve => {
                    let child = path
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| "<memory>".into());
                    if depth >= MAX_CHAIN_DEPTH {
                        return Err(Error::corrupt(format!(
                            "differencing chain is deeper than {MAX_CHAIN_DEPTH} (cyclic?)"
                        )));
                    }
                    let (pp, parent) = open_parent(&child, pl, depth, opts.unbuffered)?;
                    (Some(Arc::new(parent) as Arc<dyn BlockBackend>), Some(pp))
                }
            }
        } else {
            (None, None)
        };
        if let Some(p) = &parent {
            if p.logical_sector_size() != metadata.logical_sector_size {
                return Err(Error::corrupt(format!(
                    "parent has {}-byte logical sectors but the child has {}",
                    p.logical_sector_size(),
                    metadata.logical_sector_size
                )));
            }
        }

        Ok(Vhdx {
            st,
            path: path.map(Path::to_path_buf),
            read_only: opts.read_only,
            logical_sector_size: metadata.logical_sector_size,
            physical_sector_size: metadata.physical_sector_size,
            block_size: metadata.block_size,
            has_parent: metadata.has_parent,
            leave_blocks_allocated: metadata.leave_blocks_allocated,
            state: RwLock::new(BatState { geo, bat }),
            bitmaps: RwLock::new(HashMap::new()),
            meta: Mutex::new(Meta {
                header,
                header_slot: slot,
                regions,
                bat_region,
                meta_region,
                metadata,
                file_end,
                session: None,
                data_guid_updated: false,
                forced_data_guid: opts.data_write_guid,
            }),
            data_ready: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            parent,
            parent_path,
        })
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether this is a differencing disk.
    pub fn has_parent(&self) -> bool {
        self.has_parent
    }

    /// Whether this is a fixed disk (all blocks stay allocated).
    pub fn is_fixed(&self) -> bool {
        self.leave_blocks_allocated
    }

    /// The path of the opened parent, if resolved from the locator.
    pub fn parent_path(&self) -> Option<&Path> {
        self.parent_path.as_deref()
    }

    /// The parent backend, if any.
    pub fn parent(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.parent.as_ref()
    }

    /// Current header fields.
    pub fn header_info(&self) -> HeaderInfo {
        let m = lock(&self.meta);
        HeaderInfo {
            file_write_guid: m.header.file_write_guid,
            data_write_guid: m.header.data_write_guid,
            log_guid: m.header.log_guid,
            log_offset: m.header.log_offset,
            log_length: m.header.log_length,
        }
    }

    /// The parent locator entries (key, value), for a differencing disk.
    pub fn parent_locator(&self) -> Option<Vec<(String, String)>> {
        lock(&self.meta)
            .metadata
            .parent_locator
            .as_ref()
            .map(|p| p.entries.clone())
    }

    /// Bytes of payload blocks allocated in the file (fully or partially present).
    pub fn allocated_bytes(&self) -> u64 {
        let s = rlock(&self.state);
        let geo = s.geo;
        (0..geo.payload_blocks())
            .filter(|&b| {
                let st = bat_state(s.bat[geo.payload_index(b)]);
                st == PAYLOAD_BLOCK_FULLY_PRESENT || st == PAYLOAD_BLOCK_PARTIALLY_PRESENT
            })
            .count() as u64
            * geo.block_size
    }

    /// Every payload block as (block number, BAT state, file offset), for `check`.
    pub fn block_states(&self) -> Vec<(u64, u64, u64)> {
        let s = rlock(&self.state);
        let geo = s.geo;
        (0..geo.payload_blocks())
            .map(|b| {
                let e = s.bat[geo.payload_index(b)];
                (b, bat_state(e), bat_offset(e))
            })
            .collect()
    }

    /// Ranges of the virtual disk that this file defines (rather than leaving to a parent), in
    /// ascending order, as (offset, length, reads-as-zero). Data ranges come from present
    /// blocks and set sector-bitmap bits; zero ranges from zero/unmapped blocks (and, in a
    /// non-differencing disk, from blocks that are not allocated).
    pub fn present_ranges(&self) -> Result<Vec<(u64, u64, bool)>> {
        let (geo, states) = {
            let s = rlock(&self.state);
            let geo = s.geo;
            let v: Vec<u64> = (0..geo.payload_blocks())
                .map(|b| s.bat[geo.payload_index(b)])
                .collect();
            (geo, v)
        };
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |off: u64, len: u64, zero: bool| {
            if let Some(l) = out.last_mut() {
                if l.0 + l.1 == off && l.2 == zero {
                    l.1 += len;
                    return;
                }
            }
            out.push((off, len, zero));
        };
        for (b, e) in states.iter().enumerate() {
            let b = b as u64;
            let start = b * geo.block_size;
            let len = geo.block_size.min(geo.virtual_size - start);
            match bat_state(*e) {
                PAYLOAD_BLOCK_FULLY_PRESENT => push(start, len, false),
                PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                    let sectors = len / geo.logical_sector_size;
                    let first = start / geo.logical_sector_size;
                    for (s, n, present) in self.bitmap_runs(first, sectors)? {
                        if present {
                            push(
                                s * geo.logical_sector_size,
                                n * geo.logical_sector_size,
                                false,
                            );
                        }
                    }
                }
                PAYLOAD_BLOCK_NOT_PRESENT if geo.has_parent => {}
                _ => push(start, len, true),
            }
        }
        Ok(out)
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Error::Failed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Runs a metadata step; any error marks the image failed (memory may be out of step).
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let r = f();
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Starts a writing session on the first modification: writes an empty log entry with a
    /// fresh log GUID, then both headers with new FileWriteGuid (and DataWriteGuid when
    /// `user_visible`) and that log GUID. The log entry goes first so that the header never
    /// names a log without a valid entry; at this point the header's log GUID is zero (a
    /// read-write open replays and clears it), so no unreplayed entry can be overwritten.
    fn begin_session(&self, m: &mut Meta, user_visible: bool) -> Result<()> {
        self.check_failed()?;
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if m.session.is_some() && (!user_visible || m.data_guid_updated) {
            return Ok(());
        }
        self.guarded(|| {
            let mut h = m.header;
            if m.session.is_none() {
                let log_guid = Guid::new_random();
                let len = st_len(&*self.st)?;
                let entry = log::build_entry(
                    &log::EntryParams {
                        guid: log_guid,
                        seq: 1,
                        tail: 0,
                        flushed_file_offset: len / MIB * MIB,
                        last_file_offset: m.file_end,
                    },
                    &[],
                );
                self.st
                    .write_at(m.header.log_offset, &entry)
                    .ctx(|| "writing the first log entry".into())?;
                self.st.flush().ctx(|| "flushing the log".into())?;
                h.file_write_guid = Guid::new_random();
                h.log_guid = log_guid;
                m.session = Some(Session {
                    log_guid,
                    next_seq: 2,
                    next_slot: 1,
                });
            }
            if user_visible && !m.data_guid_updated {
                h.data_write_guid = m.forced_data_guid.unwrap_or_else(Guid::new_random);
                m.data_guid_updated = true;
            }
            let (mut cur, mut slot) = (m.header, m.header_slot);
            write_header_pair(&*self.st, &mut cur, &mut slot, h)?;
            m.header = cur;
            m.header_slot = slot;
            Ok(())
        })?;
        if user_visible {
            self.data_ready.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Journals and applies a transaction (data it refers to must already be flushed).
    fn commit(&self, m: &mut Meta, tx: Tx) -> Result<()> {
        if tx.is_empty() {
            return Ok(());
        }
        self.guarded(|| {
            let log_len = m.header.log_length as u64;
            let slot_len = log_len / 2;
            let cap = log::max_data_sectors(slot_len).max(1);
            let flushed = st_len(&*self.st)? / MIB * MIB;
            let session = m
                .session
                .as_mut()
                .ok_or_else(|| Error::corrupt("no session"))?;
            for batch in tx.order.chunks(cap) {
                let writes: Vec<(u64, &[u8])> = batch
                    .iter()
                    .map(|o| (*o, tx.sectors[o].as_slice()))
                    .collect();
                let pos = session.next_slot * slot_len;
                let entry = log::build_entry(
                    &log::EntryParams {
                        guid: session.log_guid,
                        seq: session.next_seq,
                        tail: pos as u32,
                        flushed_file_offset: flushed,
                        last_file_offset: m.file_end,
                    },
                    &writes,
                );
                self.st
                    .write_at(m.header.log_offset + pos, &entry)
                    .ctx(|| "writing a log entry".into())?;
                self.st.flush().ctx(|| "flushing the log".into())?;
                for (off, data) in &writes {
                    self.st
                        .write_at(*off, data)
                        .ctx(|| format!("writing metadata at offset {off}"))?;
                }
                self.st.flush().ctx(|| "flushing metadata".into())?;
                session.next_seq += 1;
                session.next_slot ^= 1;
            }
            Ok(())
        })
    }

    /// Adds the BAT sector holding entry `index` (from `bat`) to `tx`.
    fn tx_bat_sector(m: &Meta, tx: &mut Tx, bat: &[u64], index: usize) {
        let per = (SECTOR_4K / 8) as usize;
        let first = index / per * per;
        let mut data = vec![0u8; SECTOR_4K as usize];
        for (i, e) in bat.iter().skip(first).take(per).enumerate() {
            data[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        tx.set_sector(m.bat_region.offset + (first as u64) * 8, data);
    }

    /// Extends the file by `len` bytes of zeros at the allocation pointer; returns the offset.
    fn allocate(&self, m: &mut Meta, len: u64) -> Result<u64> {
        let off = m.file_end;
        self.guarded(|| {
            self.st
                .set_len(off + len)
                .ctx(|| "extending the image file".into())?;
            Ok(())
        })?;
        m.file_end = off + len;
        Ok(off)
    }

    /// The cached sector bitmap of `chunk`, loaded if needed. Caller must not hold `bitmaps`.
    fn ensure_bitmap(&self, chunk: u64) -> Result<()> {
        if rlock(&self.bitmaps).contains_key(&chunk) {
            return Ok(());
        }
        let e = {
            let s = rlock(&self.state);
            s.bat.get(s.geo.bitmap_index(chunk)).copied().unwrap_or(0)
        };
        let mut data = vec![0u8; BITMAP_BLOCK_SIZE as usize];
        if bat_state(e) == SB_BLOCK_PRESENT {
            self.st
                .read_at(bat_offset(e), &mut data)
                .ctx(|| format!("reading the sector bitmap of chunk {chunk}"))?;
        }
        wlock(&self.bitmaps).entry(chunk).or_insert(data);
        Ok(())
    }

    /// Splits `count` sectors starting at virtual sector `first` into runs of (first sector,
    /// count, present-in-this-file) according to the sector bitmaps.
    fn bitmap_runs(&self, first: u64, count: u64) -> Result<Vec<(u64, u64, bool)>> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut s = first;
        let end = first + count;
        while s < end {
            let chunk = s / SECTORS_PER_BITMAP;
            self.ensure_bitmap(chunk)?;
            let maps = rlock(&self.bitmaps);
            let bm = &maps[&chunk];
            let chunk_end = ((chunk + 1) * SECTORS_PER_BITMAP).min(end);
            while s < chunk_end {
                let bit = s % SECTORS_PER_BITMAP;
                let present = bm[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
                match runs.last_mut() {
                    Some(r) if r.2 == present && r.0 + r.1 == s => r.1 += 1,
                    _ => runs.push((s, 1, present)),
                }
                s += 1;
            }
        }
        Ok(runs)
    }

    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.parent {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(p) => {
                let psize = p.size();
                let inside = (psize.saturating_sub(offset)).min(buf.len() as u64) as usize;
                if inside > 0 {
                    p.read_at(offset, &mut buf[..inside])?;
                }
                buf[inside..].fill(0);
                Ok(())
            }
        }
    }

    /// The geometry and the BAT entry of the block holding virtual offset `voff`.
    fn block_of(&self, voff: u64) -> (Geometry, u64) {
        let s = rlock(&self.state);
        let geo = s.geo;
        (geo, s.bat[geo.payload_index(voff / geo.block_size)])
    }

    /// Checks a write of `len` bytes at `offset` and starts the session (new DataWriteGuid,
    /// log) on the first one.
    fn prepare_write(&self, offset: u64, len: u64) -> Result<Geometry> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_failed()?;
        let geo = rlock(&self.state).geo;
        self.check_io(offset, len, &geo)?;
        if !self.data_ready.load(Ordering::Acquire) {
            let mut m = lock(&self.meta);
            self.begin_session(&mut m, true)?;
        }
        Ok(geo)
    }

    fn read_block(&self, geo: &Geometry, e: u64, voff: u64, buf: &mut [u8]) -> Result<()> {
        let in_block = voff % geo.block_size;
        match bat_state(e) {
            PAYLOAD_BLOCK_FULLY_PRESENT => self
                .st
                .read_at(bat_offset(e) + in_block, buf)
                .ctx(|| format!("reading payload at virtual offset {voff}")),
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                let lss = geo.logical_sector_size;
                let runs = self.bitmap_runs(voff / lss, buf.len() as u64 / lss)?;
                for (s, n, present) in runs {
                    let o = s * lss;
                    let b = &mut buf[(o - voff) as usize..(o - voff + n * lss) as usize];
                    if present {
                        self.st
                            .read_at(bat_offset(e) + o % geo.block_size, b)
                            .ctx(|| format!("reading payload at virtual offset {o}"))?;
                    } else {
                        self.read_parent(o, b)?;
                    }
                }
                Ok(())
            }
            PAYLOAD_BLOCK_NOT_PRESENT if geo.has_parent => self.read_parent(voff, buf),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn check_io(&self, offset: u64, len: u64, geo: &Geometry) -> Result<()> {
        let lss = self.logical_sector_size as u64;
        if offset % lss != 0 || len % lss != 0 {
            return Err(Error::InvalidArgument(format!(
                "I/O at offset {offset} length {len} is not aligned to the {lss}-byte sector"
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > geo.virtual_size) {
            return Err(Error::InvalidArgument(format!(
                "I/O at offset {offset} length {len} is past the end of the {}-byte disk",
                geo.virtual_size
            )));
        }
        Ok(())
    }

    fn write_block(&self, voff: u64, data: &[u8]) -> Result<()> {
        // Fast path: the block (and, in a partially present block, every sector) is already
        // here: write in place without the meta lock.
        let (geo, e) = self.block_of(voff);
        let in_block = voff % geo.block_size;
        let direct = match bat_state(e) {
            PAYLOAD_BLOCK_FULLY_PRESENT => true,
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => {
                let lss = geo.logical_sector_size;
                let runs = self.bitmap_runs(voff / lss, data.len() as u64 / lss)?;
                runs.len() == 1 && runs[0].2
            }
            _ => false,
        };
        if direct {
            return self
                .st
                .write_at(bat_offset(e) + in_block, data)
                .ctx(|| format!("writing payload at virtual offset {voff}"));
        }
        self.write_block_slow(voff, data)
    }

    fn write_block_slow(&self, voff: u64, data: &[u8]) -> Result<()> {
        let mut m = lock(&self.meta);
        self.check_failed()?;
        let (geo, e) = self.block_of(voff);
        let block = voff / geo.block_size;
        let in_block = voff % geo.block_size;
        let lss = geo.logical_sector_size;
        let state = bat_state(e);
        if state == PAYLOAD_BLOCK_FULLY_PRESENT {
            drop(m);
            return self
                .st
                .write_at(bat_offset(e) + in_block, data)
                .ctx(|| format!("writing payload at virtual offset {voff}"));
        }
        let pidx = geo.payload_index(block);
        let chunk = block / geo.chunk_ratio;
        let sidx = geo.bitmap_index(chunk);
        let mut new_bat: Vec<(usize, u64)> = Vec::new();
        let mut bitmap_update: Option<(u64, u64)> = None; // (first sector, count) to set
        let mut tx = Tx::default();

        let block_off = if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            bat_offset(e)
        } else {
            self.allocate(&mut m, geo.block_size)?
        };
        self.guarded(|| {
            self.st
                .write_at(block_off + in_block, data)
                .ctx(|| format!("writing payload at virtual offset {voff}"))
        })?;
        let whole = in_block == 0 && data.len() as u64 == geo.block_size;
        let fully = match state {
            PAYLOAD_BLOCK_PARTIALLY_PRESENT => false,
            PAYLOAD_BLOCK_NOT_PRESENT if geo.has_parent => whole,
            // Zero, unmapped, undefined, or any unallocated block of a non-differencing disk:
            // the rest of the new block is zeros, which is what those states read as.
            _ => true,
        };
        if fully {
            new_bat.push((pidx, bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, block_off)));
        } else {
            if state != PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                new_bat.push((pidx, bat_entry(PAYLOAD_BLOCK_PARTIALLY_PRESENT, block_off)));
            }
            let sb = rlock(&self.state).bat[sidx];
            if bat_state(sb) != SB_BLOCK_PRESENT {
                let off = self.allocate(&mut m, BITMAP_BLOCK_SIZE)?;
                new_bat.push((sidx, bat_entry(SB_BLOCK_PRESENT, off)));
                // A new bitmap block is all zeros, on disk and in the cache.
                wlock(&self.bitmaps).insert(chunk, vec![0u8; BITMAP_BLOCK_SIZE as usize]);
            }
            bitmap_update = Some((voff / lss, data.len() as u64 / lss));
        }
        self.guarded(|| self.st.flush().ctx(|| "flushing payload data".into()))?;

        // Sector bitmap sectors to journal.
        let mut new_bitmap_bytes: Vec<(usize, u8)> = Vec::new();
        let mut promote = false;
        if let Some((first, count)) = bitmap_update {
            self.ensure_bitmap(chunk)?;
            let sb_off = new_bat
                .iter()
                .find(|(i, _)| *i == sidx)
                .map(|(_, e)| bat_offset(*e))
                .unwrap_or_else(|| bat_offset(rlock(&self.state).bat[sidx]));
            let maps = rlock(&self.bitmaps);
            let mut bm_sectors: HashMap<u64, Vec<u8>> = HashMap::new();
            let bm = &maps[&chunk];
            for s in first..first + count {
                let bit = s % SECTORS_PER_BITMAP;
                let byte = (bit / 8) as usize;
                let sec = byte as u64 / SECTOR_4K;
                let buf = bm_sectors.entry(sec).or_insert_with(|| {
                    bm[(sec * SECTOR_4K) as usize..((sec + 1) * SECTOR_4K) as usize].to_vec()
                });
                buf[byte % SECTOR_4K as usize] |= 1 << (bit % 8);
            }
            let mut secs: Vec<_> = bm_sectors.into_iter().collect();
            secs.sort_by_key(|s| s.0);
            for (sec, bytes) in secs {
                for (i, b) in bytes.iter().enumerate() {
                    new_bitmap_bytes.push(((sec * SECTOR_4K) as usize + i, *b));
                }
                tx.set_sector(sb_off + sec * SECTOR_4K, bytes);
            }
            // If every sector of the block is now present, the block becomes fully present.
            let spb = geo.sectors_per_block();
            let bfirst = (block * spb) % SECTORS_PER_BITMAP;
            let pending: HashMap<usize, u8> = new_bitmap_bytes.iter().copied().collect();
            promote = (bfirst..bfirst + spb).all(|bit| {
                let byte = (bit / 8) as usize;
                let v = pending.get(&byte).copied().unwrap_or(bm[byte]);
                v & (1 << (bit % 8)) != 0
            });
        }
        if promote {
            new_bat.retain(|(i, _)| *i != pidx);
            new_bat.push((pidx, bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, block_off)));
        }

        // BAT sectors, built from a copy with the new entries.
        let bat_copy: Vec<u64> = {
            let s = rlock(&self.state);
            let mut b = s.bat.clone();
            for (i, e) in &new_bat {
                b[*i] = *e;
            }
            b
        };
        for (i, _) in &new_bat {
            Self::tx_bat_sector(&m, &mut tx, &bat_copy, *i);
        }
        self.begin_session(&mut m, true)?;
        self.commit(&mut m, tx)?;
        {
            let mut maps = wlock(&self.bitmaps);
            if let Some(bm) = maps.get_mut(&chunk) {
                for (i, b) in &new_bitmap_bytes {
                    bm[*i] = *b;
                }
            }
        }
        let mut s = wlock(&self.state);
        for (i, e) in new_bat {
            s.bat[i] = e;
        }
        Ok(())
    }

    /// Journals new bytes of a metadata item (adding or moving it if its size changes).
    fn tx_metadata_item(
        &self,
        m: &mut Meta,
        tx: &mut Tx,
        id: Guid,
        flags: u32,
        data: &[u8],
    ) -> Result<()> {
        let region = m.meta_region;
        let mut entries = m.metadata.entries.clone();
        let existing = entries.iter().position(|e| e.id == id && !e.is_user());
        let offset = match existing {
            Some(i) if entries[i].length as usize == data.len() => entries[i].offset,
            _ => {
                let end = entries
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| Some(*j) != existing)
                    .map(|(_, e)| e.offset as u64 + e.length as u64)
                    .max()
                    .unwrap_or(0)
                    .max(METADATA_TABLE_SIZE as u64);
                let off = end.div_ceil(8) * 8;
                if off + data.len() as u64 > region.length {
                    return Err(Error::unsupported("metadata region is full"));
                }
                off as u32
            }
        };
        let entry = MetaEntry {
            id,
            offset,
            length: data.len() as u32,
            flags,
        };
        match existing {
            Some(i) => entries[i] = entry,
            None => entries.push(entry),
        }
        tx.patch(&*self.st, region.offset + offset as u64, data)?;
        if existing.map(|i| m.metadata.entries[i]) != Some(entry) {
            let table = build_metadata_table(&entries);
            tx.patch(&*self.st, region.offset, &table[..32 + entries.len() * 32])?;
        }
        m.metadata.entries = entries;
        Ok(())
    }

    /// Changes the virtual size. Growing is always allowed (fixed disks get their new blocks
    /// allocated). Shrinking is allowed only when everything past the new end reads as zeros,
    /// so no data is ever dropped. Differencing disks cannot be resized.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.has_parent {
            return Err(Error::InvalidArgument(
                "a differencing disk cannot be resized; resize its base disk before creating children".into(),
            ));
        }
        let lss = self.logical_sector_size as u64;
        if new_size == 0 || new_size % lss != 0 || new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "new size {new_size} must be a non-zero multiple of {lss} and at most 64 TiB"
            )));
        }
        let mut m = lock(&self.meta);
        self.check_failed()?;
        let (old_geo, old_bat) = {
            let s = rlock(&self.state);
            (s.geo, s.bat.clone())
        };
        if new_size == old_geo.virtual_size {
            return Ok(());
        }
        let bs = old_geo.block_size;
        let mut geo = old_geo;
        geo.virtual_size = new_size;
        let new_total = geo.total_bat_entries() as usize;
        let mut bat = old_bat.clone();
        let mut tx = Tx::default();

        if new_size < old_geo.virtual_size {
            // Refuse if anything past the new end is not zero.
            let mut buf = vec![0u8; MIB as usize];
            let mut pos = new_size;
            while pos < old_geo.virtual_size {
                let n = (old_geo.virtual_size - pos).min(MIB).min(bs - pos % bs);
                let b = &mut buf[..n as usize];
                let e = old_bat[old_geo.payload_index(pos / bs)];
                self.read_block(&old_geo, e, pos, b)?;
                if b.iter().any(|&x| x != 0) {
                    return Err(Error::InvalidArgument(format!(
                        "cannot shrink to {new_size} bytes: the disk holds data at offset {pos}; only a zero tail can be cut"
                    )));
                }
                pos += n;
            }
            self.begin_session(&mut m, true)?;
            for b in geo.payload_blocks()..old_geo.payload_blocks() {
                bat[old_geo.payload_index(b)] = 0;
            }
            if new_total < bat.len() {
                bat[new_total..].fill(0);
            }
            let per = (SECTOR_4K / 8) as usize;
            for i in (new_total / per * per..old_bat.len()).step_by(per) {
                Self::tx_bat_sector(&m, &mut tx, &bat, i);
            }
            bat.truncate(new_total);
        } else {
            self.begin_session(&mut m, true)?;
            bat.resize(new_total, 0);
            // The old last block's tail past the old end must read as zeros.
            if old_geo.virtual_size % bs != 0 {
                let lb = old_geo.virtual_size / bs;
                let e = old_bat[old_geo.payload_index(lb)];
                if bat_state(e) == PAYLOAD_BLOCK_FULLY_PRESENT {
                    let from = old_geo.virtual_size % bs;
                    let zeros = vec![0u8; (bs - from) as usize];
                    self.guarded(|| {
                        self.st
                            .write_at(bat_offset(e) + from, &zeros)
                            .ctx(|| "zeroing the old last block's tail".into())
                    })?;
                }
            }
            if self.leave_blocks_allocated {
                let first = old_geo.payload_blocks();
                let count = geo.payload_blocks() - first;
                if count > 0 {
                    let off = self.allocate(&mut m, count * bs)?;
                    for i in 0..count {
                        bat[geo.payload_index(first + i)] =
                            bat_entry(PAYLOAD_BLOCK_FULLY_PRESENT, off + i * bs);
                    }
                }
            }
            if (new_total as u64) * 8 > m.bat_region.length {
                // Move the BAT to the end of the file: write it whole (unreferenced space, so
                // no journal needed), then journal the region table change.
                let len = ((new_total as u64) * 8).div_ceil(MIB) * MIB;
                let off = self.allocate(&mut m, len)?;
                let mut raw = vec![0u8; len as usize];
                for (i, e) in bat.iter().enumerate() {
                    raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
                }
                self.guarded(|| {
                    self.st
                        .write_at(off, &raw)
                        .ctx(|| "writing the relocated BAT".into())
                })?;
                let mut regions = m.regions.regions.clone();
                for r in regions.iter_mut() {
                    if r.guid == REGION_BAT {
                        r.offset = off;
                        r.length = len;
                    }
                }
                let table = RegionTable::build(&regions);
                for rt in REGION_TABLE_OFFSETS {
                    tx.patch(&*self.st, rt, &table)?;
                }
                m.regions = RegionTable {
                    raw: table,
                    regions,
                };
                m.bat_region = Region {
                    guid: REGION_BAT,
                    offset: off,
                    length: len,
                    required: true,
                };
            } else {
                let per = (SECTOR_4K / 8) as usize;
                let first = old_bat.len() / per * per;
                let mut i = first;
                while i < new_total {
                    Self::tx_bat_sector(&m, &mut tx, &bat, i);
                    i += per;
                }
                // New blocks of a fixed disk may sit in BAT sectors before old_bat.len().
                if self.leave_blocks_allocated {
                    for b in old_geo.payload_blocks()..geo.payload_blocks() {
                        Self::tx_bat_sector(&m, &mut tx, &bat, geo.payload_index(b));
                    }
                }
            }
        }
        self.guarded(|| self.st.flush().ctx(|| "flushing before the resize".into()))?;
        let flags = META_FLAG_IS_VIRTUAL_DISK | META_FLAG_IS_REQUIRED;
        self.tx_metadata_item(
            &mut m,
            &mut tx,
            META_VIRTUAL_DISK_SIZE,
            flags,
            &new_size.to_le_bytes(),
        )?;
        self.commit(&mut m, tx)?;
        m.metadata.virtual_size = new_size;
        let mut s = wlock(&self.state);
        s.geo = geo;
        s.bat = bat;
        Ok(())
    }

    /// Rewrites the parent locator (differencing disks only), journalled.
    pub fn set_parent_locator(&self, entries: Vec<(String, String)>) -> Result<()> {
        if !self.has_parent {
            return Err(Error::InvalidArgument("not a differencing disk".into()));
        }
        let pl = ParentLocator { entries };
        let mut m = lock(&self.meta);
        self.begin_session(&mut m, false)?;
        let mut tx = Tx::default();
        self.tx_metadata_item(
            &mut m,
            &mut tx,
            META_PARENT_LOCATOR,
            META_FLAG_IS_REQUIRED,
            &pl.build(),
        )?;
        self.commit(&mut m, tx)?;
        m.metadata.parent_locator = Some(pl);
        Ok(())
    }

    /// Sets the virtual disk ID (page 83 identity), journalled. Used by merge, which must carry
    /// the child's virtual-disk metadata into the parent.
    pub fn set_disk_id(&self, id: Guid) -> Result<()> {
        let mut m = lock(&self.meta);
        self.begin_session(&mut m, true)?;
        let mut tx = Tx::default();
        let flags = META_FLAG_IS_VIRTUAL_DISK | META_FLAG_IS_REQUIRED;
        self.tx_metadata_item(&mut m, &mut tx, META_VIRTUAL_DISK_ID, flags, &id.0)?;
        self.commit(&mut m, tx)?;
        m.metadata.disk_id = id;
        Ok(())
    }

    /// Flushes and marks the log empty (header LogGuid = 0), so other tools can open the file
    /// read-only. Called by `Drop` too; calling it explicitly reports errors.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = lock(&self.meta);
        if m.session.is_none() || self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.st.flush().ctx(|| "flushing the image".into())?;
        let mut h = m.header;
        h.log_guid = Guid::ZERO;
        let (mut cur, mut slot) = (m.header, m.header_slot);
        write_header_pair(&*self.st, &mut cur, &mut slot, h)?;
        m.header = cur;
        m.header_slot = slot;
        m.session = None;
        m.data_guid_updated = false;
        self.data_ready.store(false, Ordering::Release);
        Ok(())
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!("closing VHDX: {e}");
        }
    }
}

fn st_len(st: &dyn Storage) -> Result<u64> {
    st.len().ctx(|| "getting the file size".into())
}

/// Writes `new` (sequence numbers assigned here) to the non-current header slot, flushes, and
/// then does the same for the other slot, so both copies end up current (2.2.2.1).
fn write_header_pair(
    st: &dyn Storage,
    cur: &mut Header,
    slot: &mut usize,
    new: Header,
) -> Result<()> {
    for _ in 0..2 {
        let mut h = new;
        h.sequence_number = cur.sequence_number + 1;
        let other = 1 - *slot;
        st.write_at(HEADER_OFFSETS[other], &h.to_sector())
            .ctx(|| format!("writing VHDX header {}", other + 1))?;
        st.flush().ctx(|| "flushing the VHDX header".into())?;
        *cur = h;
        *slot = other;
    }
    Ok(())
}

/// Converts a locator path (backslash separated) to a host path relative to `base`.
fn locator_path(base: &Path, value: &str, absolute: bool) -> Option<PathBuf> {
    let mut v = value;
    if absolute {
        v = v.strip_prefix("\\\\?\\").unwrap_or(v);
    }
    let p = v.replace('\\', "/");
    if absolute {
        // Only absolute host paths can be followed; "d:/..." and volume GUID paths cannot.
        return p.starts_with('/').then(|| PathBuf::from(p));
    }
    if p.starts_with('/') {
        return None;
    }
    Some(base.join(p))
}

/// Finds, opens (read-only) and checks the identity of a differencing disk's parent.
fn open_parent(
    child: &Path,
    pl: &ParentLocator,
    depth: u32,
    unbuffered: bool,
) -> Result<(PathBuf, Vhdx)> {
    let base = child.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(p) = pl
        .get("relative_path")
        .and_then(|v| locator_path(&base, v, false))
    {
        candidates.push(p);
    }
    if let Some(p) = pl
        .get("absolute_win32_path")
        .and_then(|v| locator_path(&base, v, true))
    {
        candidates.push(p);
    }
    let linkages: Vec<Guid> = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| pl.get(k))
        .map(|v| {
            v.parse::<Guid>()
                .map_err(|_| Error::corrupt(format!("parent locator linkage {v:?} is not a GUID")))
        })
        .collect::<Result<_>>()?;
    for c in candidates {
        // Only regular files (or block devices) can be parents: never follow a locator into a
        // FIFO or character device, whose open could block or never end.
        let usable = std::fs::metadata(&c).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.is_file() || m.file_type().is_block_device()
        });
        if !usable {
            tried.push(c);
            continue;
        }
        let opts = OpenOptions {
            read_only: true,
            unbuffered,
            ..Default::default()
        };
        let parent = Vhdx::open_at_depth(&c, opts, depth + 1)?;
        let found = parent.header_info().data_write_guid;
        if !linkages.contains(&found) {
            return Err(Error::ParentMismatch {
                child: child.to_path_buf(),
                parent: c,
                expected: linkages
                    .iter()
                    .map(|g| g.braced())
                    .collect::<Vec<_>>()
                    .join(" or "),
                found: found.braced(),
            });
        }
        return Ok((c, parent));
    }
    Err(Error::MissingParent {
        child: child.to_path_buf(),
        tried,
    })
}

impl BlockBackend for Vhdx {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let geo = rlock(&self.state).geo;
        self.check_io(offset, buf.len() as u64, &geo)?;
        let mut done = 0usize;
        while done < buf.len() {
            let voff = offset + done as u64;
            let (geo, e) = self.block_of(voff);
            let n = ((geo.block_size - voff % geo.block_size) as usize).min(buf.len() - done);
            self.read_block(&geo, e, voff, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let geo = self.prepare_write(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let voff = offset + done as u64;
            let n = ((geo.block_size - voff % geo.block_size) as usize).min(buf.len() - done);
            self.write_block(voff, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let len = crate::vectored::total(bufs) as u64;
        self.check_io(offset, len, &rlock(&self.state).geo)?;
        let mut cur = crate::vectored::Cursor::new(bufs.iter_mut().map(|b| &mut **b));
        let mut done = 0u64;
        while done < len {
            let voff = offset + done;
            let (geo, e) = self.block_of(voff);
            let n = (geo.block_size - voff % geo.block_size).min(len - done);
            let mut piece = cur.take(n as usize);
            if bat_state(e) == PAYLOAD_BLOCK_FULLY_PRESENT {
                // The piece is one stretch of the file: one system call.
                self.st
                    .read_vectored_at(bat_offset(e) + voff % geo.block_size, &mut piece)
                    .ctx(|| format!("reading payload at virtual offset {voff}"))?;
            } else {
                let mut o = voff;
                for b in piece {
                    self.read_block(&geo, e, o, b)?;
                    o += b.len() as u64;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let len = crate::vectored::total(bufs) as u64;
        self.prepare_write(offset, len)?;
        let mut cur = crate::vectored::Cursor::new(bufs.iter().copied());
        let mut done = 0u64;
        while done < len {
            let voff = offset + done;
            let (geo, e) = self.block_of(voff);
            let n = (geo.block_size - voff % geo.block_size).min(len - done);
            let piece = cur.take(n as usize);
            if bat_state(e) == PAYLOAD_BLOCK_FULLY_PRESENT {
                // The block is here: write in place, as `write_block`'s fast path does.
                self.st
                    .write_vectored_at(bat_offset(e) + voff % geo.block_size, &piece)
                    .ctx(|| format!("writing payload at virtual offset {voff}"))?;
            } else {
                let mut o = voff;
                for b in piece {
                    self.write_block(o, b)?;
                    o += b.len() as u64;
                }
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_failed()?;
        self.st.flush().ctx(|| "flushing the image".into())
    }

    /// Releases whole blocks in the range (they read back as zeros afterwards); partial blocks
    /// are left as they are, since unmap is only a hint. Fixed disks keep every block.
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let geo = rlock(&self.state).geo;
        self.check_io(offset, len, &geo)?;
        if self.leave_blocks_allocated || len == 0 {
            return Ok(());
        }
        let bs = geo.block_size;
        let first = offset.div_ceil(bs);
        let end = offset + len;
        let last = if end == geo.virtual_size {
            geo.payload_blocks()
        } else {
            end / bs
        };
        if first >= last {
            return Ok(());
        }
        let mut m = lock(&self.meta);
        self.check_failed()?;
        let mut bat = rlock(&self.state).bat.clone();
        let mut changed = Vec::new();
        let mut freed = Vec::new();
        for b in first..last {
            let i = geo.payload_index(b);
            let e = bat[i];
            let st = bat_state(e);
            let new = if geo.has_parent {
                (st != PAYLOAD_BLOCK_ZERO).then_some(bat_entry(PAYLOAD_BLOCK_ZERO, 0))
            } else {
                (st != PAYLOAD_BLOCK_NOT_PRESENT).then_some(0)
            };
            if let Some(n) = new {
                if st == PAYLOAD_BLOCK_FULLY_PRESENT || st == PAYLOAD_BLOCK_PARTIALLY_PRESENT {
                    freed.push(bat_offset(e));
                }
                bat[i] = n;
                changed.push(i);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.begin_session(&mut m, true)?;
        let mut tx = Tx::default();
        let per = (SECTOR_4K / 8) as usize;
        let mut last_sector = usize::MAX;
        for &i in &changed {
            if i / per != last_sector {
                Self::tx_bat_sector(&m, &mut tx, &bat, i);
                last_sector = i / per;
            }
        }
        self.commit(&mut m, tx)?;
        {
            let mut s = wlock(&self.state);
            for &i in &changed {
                s.bat[i] = bat[i];
            }
        }
        drop(m);
        // The blocks are unreferenced now and their space is never reused: give it back to the
        // host filesystem (best effort).
        for off in freed {
            let _ = self.st.discard(off, bs);
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        rlock(&self.state).geo.virtual_size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn disk_id(&self) -> [u8; 16] {
        lock(&self.meta).metadata.disk_id.0
    }

    fn unbuffered(&self) -> bool {
        self.st.unbuffered()
    }
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("path", &self.path)
            .field("size", &self.size())
            .field("block_size", &self.block_size)
            .field("read_only", &self.read_only)
            .finish()
    }
}
