//! One function per disk CLI verb, modelled on Hyper-V's cmdlets: `new-vhd` ([`new_vhd`],
//! [`new_differencing_vhd`]), `vhd-info` ([`info`]), `check-vhd` ([`check`]), `convert-vhd`
//! ([`convert`]), `merge-vhd` ([`merge`]) and `resize-vhd` ([`resize`]).
//!
//! Long operations take a [`Progress`] callback, called with (bytes done, bytes total) as they
//! go, so the CLI can draw a progress bar.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::guid::Guid;
use crate::storage::{FileStorage, Storage};
use crate::vhdx::create::{self, CreateParams, VhdxKind};
use crate::vhdx::format::{self, MIB};
use crate::vhdx::{log, OpenOptions, ParentMode, Vhdx};
use crate::{detect_format, open_disk, BlockBackend, DiskFormat, RawDisk};

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = Option<&'a dyn Fn(u64, u64)>;

fn report(p: Progress<'_>, done: u64, total: u64) {
    if let Some(f) = p {
        f(done, total);
    }
}

/// Copy granularity of the streaming operations.
const CHUNK: u64 = MIB;

/// `new-vhd -Fixed/-Dynamic`: creates a VHDX. Fixed disks are preallocated.
pub fn new_vhd(path: &Path, params: &CreateParams, progress: Progress<'_>) -> Result<()> {
    report(progress, 0, params.virtual_size);
    create::create(path, params)?;
    report(progress, params.virtual_size, params.virtual_size);
    Ok(())
}

/// `new-vhd -Differencing -ParentPath`: creates a differencing VHDX over `parent`.
/// `block_size` defaults to 2 MiB.
pub fn new_differencing_vhd(path: &Path, parent: &Path, block_size: Option<u32>) -> Result<()> {
    create::create_differencing(path, parent, block_size)
}

/// Kind of a VHDX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VhdType {
    Fixed,
    Dynamic,
    Differencing,
}

/// What `vhd-info` shows.
#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// VHDX only.
    pub vhd_type: Option<VhdType>,
    pub virtual_size: u64,
    /// Size of the image file (or block device).
    pub file_size: u64,
    /// Bytes of payload blocks allocated in the file (VHDX); bytes the host allocated (raw).
    pub allocated_bytes: u64,
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// VHDX virtual disk ID (page 83 identity), or the raw file's derived identity.
    pub disk_id: Guid,
    pub file_write_guid: Option<Guid>,
    pub data_write_guid: Option<Guid>,
    /// Whether the log holds updates that were never applied (image not closed cleanly).
    pub log_needs_replay: bool,
    pub parent: Option<ParentInfo>,
}

/// The parent of a differencing disk.
#[derive(Clone, Debug, Serialize)]
pub struct ParentInfo {
    /// Parent locator entries as stored (relative_path, parent_linkage, ...).
    pub locator: Vec<(String, String)>,
    /// The parent file found from the locator, if it was found and matched.
    pub resolved_path: Option<PathBuf>,
    /// Why the parent could not be used, if it could not.
    pub error: Option<String>,
}

fn file_size(path: &Path) -> Result<u64> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    FileStorage::new(f)
        .and_then(|s| s.len())
        .ctx(|| format!("getting the size of {}", path.display()))
}

fn log_needs_replay(path: &Path) -> Result<bool> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let st = FileStorage::new(f).ctx(|| format!("inspecting {}", path.display()))?;
    let len = st.len().ctx(|| "getting the file size".into())?;
    let (h, _) = format::read_headers(&st, len).map_err(|e| e.with_path(path))?;
    match log::find_active_sequence(&st, h.log_offset, h.log_length as u64, h.log_guid)? {
        Some(seq) => Ok(!log::sequence_is_applied(&st, &seq)?),
        None => Ok(false),
    }
}

/// `vhd-info`: describes an image without modifying it. A differencing disk whose parent is
/// missing or does not match is still described, with the problem in `parent.error`.
pub fn info(path: &Path) -> Result<DiskInfo> {
    let format = detect_format(path)?;
    let file_size = file_size(path)?;
    if format == DiskFormat::Raw {
        let d = RawDisk::open(path, true)?;
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).ctx(|| format!("inspecting {}", path.display()))?;
        return Ok(DiskInfo {
            path: path.to_path_buf(),
            format,
            vhd_type: None,
            virtual_size: d.size(),
            file_size,
            allocated_bytes: if md.file_type().is_file() {
                md.blocks() * 512
            } else {
                d.size()
            },
            block_size: None,
            logical_sector_size: d.logical_sector_size(),
            physical_sector_size: d.physical_sector_size(),
            disk_id: Guid(d.disk_id()),
            file_write_guid: None,
            data_write_guid: None,
            log_needs_replay: false,
            parent: None,
        });
    }
    if log_needs_replay(path)? {
        return Err(Error::LogReplayNeeded {
            path: Some(path.to_path_buf()),
        });
    }
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let (v, parent_error) = match Vhdx::open(path, ro.clone()) {
        Ok(v) => (v, None),
        // A problem with the parent chain: still describe this file, with the problem.
        Err(e) => match Vhdx::open(
            path,
            OpenOptions {
                parent: ParentMode::Zeros,
                ..ro
            },
        ) {
            Ok(v) if v.has_parent() => (v, Some(e.to_string())),
            _ => return Err(e),
        },
    };
    let h = v.header_info();
    let vhd_type = if v.has_parent() {
        VhdType::Differencing
    } else if v.is_fixed() {
        VhdType::Fixed
    } else {
        VhdType::Dynamic
    };
    let parent = v.parent_locator().map(|locator| ParentInfo {
        locator,
        resolved_path: v.parent_path().map(Path::to_path_buf),
        error: parent_error,
    });
    Ok(DiskInfo {
        path: path.to_path_buf(),
        format,
        vhd_type: Some(vhd_type),
        virtual_size: v.size(),
        file_size,
        allocated_bytes: v.allocated_bytes(),
        block_size: Some(v.block_size()),
        logical_sector_size: v.logical_sector_size(),
        physical_sector_size: v.physical_sector_size(),
        disk_id: Guid(v.disk_id()),
        file_write_guid: Some(h.file_write_guid),
        data_write_guid: Some(h.data_write_guid),
        log_needs_replay: false,
        parent,
    })
}

/// What `check-vhd` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub path: PathBuf,
    pub format: Option<DiskFormat>,
    /// Problems that make the image unusable; empty means the image is consistent.
    pub errors: Vec<String>,
    /// Things worth knowing that do not stop the image from working.
    pub warnings: Vec<String>,
    pub virtual_size: u64,
    pub allocated_bytes: u64,
}

impl CheckReport {
    /// Whether no error was found.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// `check-vhd`: checks an image (and its parent chain) read-only and reports every problem
/// found. Returns `Err` only when the check itself could not run (e.g. the file is missing).
pub fn check(path: &Path) -> Result<CheckReport> {
    let mut r = CheckReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let format = match detect_format(path) {
        Ok(f) => f,
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => {
            r.errors.push(e.to_string());
            return Ok(r);
        }
    };
    r.format = Some(format);
    if format == DiskFormat::Raw {
        let d = RawDisk::open(path, true)?;
        r.virtual_size = d.size();
        return Ok(r);
    }
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let st = FileStorage::new(f).ctx(|| format!("inspecting {}", path.display()))?;
    let len = st.len().ctx(|| "getting the file size".into())?;
    // Per-copy checks that opening alone does not report (it uses whichever copy is valid).
    let mut hdr_ok = [false; 2];
    for (i, off) in format::HEADER_OFFSETS.iter().enumerate() {
        let mut b = vec![0u8; 4096];
        if len >= off + 4096 && st.read_at(*off, &mut b).is_ok() {
            let raw: format::RawHeader = format::read_struct(&b);
            hdr_ok[i] = raw.signature.get() == format::SIG_HEAD
                && format::crc32c_with_zeroed_field(&b, 4) == raw.checksum.get();
        }
    }
    for (i, ok) in hdr_ok.iter().enumerate() {
        if !ok && hdr_ok[1 - i] {
            r.warnings.push(format!(
                "header {} is invalid; the other copy is used",
                i + 1
            ));
        }
    }
    let mut rts = Vec::new();
    for off in format::REGION_TABLE_OFFSETS {
        let mut b = vec![0u8; format::REGION_TABLE_SIZE];
        if len >= off + b.len() as u64 && st.read_at(off, &mut b).is_ok() {
            rts.push(b);
        }
    }
    if rts.len() == 2 && rts[0] != rts[1] {
        r.warnings.push("the two region table copies differ".into());
    }
    match log_needs_replay(path) {
        Ok(true) => {
            r.warnings.push(
                "the log holds updates that were not applied (the image was not closed cleanly); they are replayed on the next read-write open".into(),
            );
            return Ok(r);
        }
        Ok(false) => {}
        Err(e @ Error::Io { .. }) => return Err(e),
        Err(e) => {
            r.errors.push(e.to_string());
            return Ok(r);
        }
    }
    let v = match Vhdx::open(
        path,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    ) {
        Ok(v) => v,
        Err(e) => {
            r.errors.push(e.to_string());
            return Ok(r);
        }
    };
    r.virtual_size = v.size();
    r.allocated_bytes = v.allocated_bytes();
    // Every block must be readable (bitmaps of partially present blocks included).
    let mut buf = vec![0u8; v.logical_sector_size() as usize];
    for (b, state, _) in v.block_states() {
        if state == format::PAYLOAD_BLOCK_PARTIALLY_PRESENT {
            let off = b * v.block_size() as u64;
            if let Err(e) = v.read_at(off, &mut buf) {
                r.errors.push(format!("block {b}: {e}"));
            }
        }
    }
    Ok(r)
}

/// Target of `convert-vhd`.
#[derive(Clone, Debug)]
pub enum ConvertTarget {
    /// A raw image (written sparse: zero ranges are skipped).
    Raw,
    /// A VHDX; `virtual_size` is taken from the source (rounded up to the sector size).
    Vhdx(CreateParams),
}

/// `convert-vhd`: copies any readable disk (raw, VHDX, a differencing chain, flattened) into a
/// new raw or VHDX file at `dst` (which must not exist). Zero ranges are skipped for dynamic
/// VHDX and raw targets. The destination is removed if the conversion fails.
pub fn convert(
    src: &Path,
    dst: &Path,
    target: &ConvertTarget,
    progress: Progress<'_>,
) -> Result<()> {
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(Error::InvalidArgument(format!(
            "{} already exists",
            dst.display()
        )));
    }
    let source = open_disk(src, true)?;
    let size = source.size();
    let r = convert_into(&*source, dst, target, progress);
    if r.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    r.inspect(|_| report(progress, size, size))
}

fn convert_into(
    source: &dyn BlockBackend,
    dst: &Path,
    target: &ConvertTarget,
    progress: Progress<'_>,
) -> Result<()> {
    let size = source.size();
    let (dest, skip_zero): (Box<dyn BlockBackend>, bool) = match target {
        ConvertTarget::Raw => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dst)
                .ctx(|| format!("creating {}", dst.display()))?;
            let st = FileStorage::new(f).ctx(|| format!("inspecting {}", dst.display()))?;
            st.set_len(size)
                .ctx(|| format!("sizing {}", dst.display()))?;
            let lss = source.logical_sector_size();
            let d = RawDisk::from_storage(
                Arc::new(st),
                false,
                lss,
                source.physical_sector_size(),
                [0; 16],
            )?;
            (Box::new(d), true)
        }
        ConvertTarget::Vhdx(p) => {
            let mut p = p.clone();
            p.virtual_size = size;
            create::create(dst, &p)?;
            let v = Vhdx::open(dst, OpenOptions::default())?;
            (Box::new(v), p.kind == VhdxKind::Dynamic)
        }
    };
    // Copy in the coarser of the two sector sizes so both sides see aligned I/O.
    let align = source.logical_sector_size().max(dest.logical_sector_size()) as u64;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    report(progress, 0, size);
    while pos < size {
        let n = CHUNK.min(size - pos);
        let b = &mut buf[..n as usize];
        source.read_at(pos, b)?;
        let all_zero = b.iter().all(|&x| x == 0);
        if !(skip_zero && all_zero) {
            // The destination may be larger (rounded up); the source is aligned to its sector.
            let wn = n.div_ceil(align) * align;
            if wn != n {
                let mut tmp = b.to_vec();
                tmp.resize(wn as usize, 0);
                dest.write_at(pos, &tmp)?;
            } else {
                dest.write_at(pos, b)?;
            }
        }
        pos += n;
        report(progress, pos, size);
    }
    dest.flush()?;
    Ok(())
}

/// What `merge-vhd` did.
#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    /// The parent the child was merged into.
    pub parent: PathBuf,
    /// Bytes of child data written into the parent.
    pub bytes_merged: u64,
    /// Whether the child file was deleted.
    pub child_removed: bool,
}

/// `merge-vhd`: merges a differencing disk into its parent, so the parent then reads exactly as
/// the child did. With `remove_child` the child file is deleted afterwards (Hyper-V's
/// behaviour); otherwise it stays a valid, now empty-in-effect child of the merged parent.
///
/// Crash safety: before the parent is touched, the child's parent locator gains a
/// `parent_linkage2` holding the DataWriteGuid the parent will get; so at every point the child
/// still opens over its parent and reads the same data, and an interrupted merge can simply be
/// run again.
pub fn merge(child_path: &Path, remove_child: bool, progress: Progress<'_>) -> Result<MergeReport> {
    let new_guid = Guid::new_random();
    let (parent_path, mut locator) = {
        let child = Vhdx::open(child_path, OpenOptions::default())?;
        if !child.has_parent() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a differencing disk",
                child_path.display()
            )));
        }
        let pp = child.parent_path().map(Path::to_path_buf).ok_or_else(|| {
            Error::InvalidArgument("the parent of the child could not be located".into())
        })?;
        (pp, child.parent_locator().unwrap_or_default())
    };
    {
        let child = Vhdx::open(
            child_path,
            OpenOptions {
                parent: ParentMode::Zeros,
                ..Default::default()
            },
        )?;
        locator.retain(|(k, _)| k != "parent_linkage2");
        locator.push(("parent_linkage2".into(), new_guid.braced()));
        child.set_parent_locator(locator)?;
        child.close()?;
    }
    let child = Vhdx::open(
        child_path,
        OpenOptions {
            read_only: true,
            parent: ParentMode::Zeros,
            ..Default::default()
        },
    )?;
    let parent = Vhdx::open(
        &parent_path,
        OpenOptions {
            data_write_guid: Some(new_guid),
            ..Default::default()
        },
    )?;
    if parent.size() != child.size() {
        parent.resize(child.size())?;
    }
    let ranges = child.present_ranges()?;
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let mut done = 0u64;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pbuf = vec![0u8; CHUNK as usize];
    report(progress, 0, total);
    for (off, len, zero) in ranges {
        let mut pos = off;
        while pos < off + len {
            let n = CHUNK.min(off + len - pos) as usize;
            if zero {
                parent.read_at(pos, &mut pbuf[..n])?;
                if pbuf[..n].iter().any(|&b| b != 0) {
                    buf[..n].fill(0);
                    parent.write_at(pos, &buf[..n])?;
                }
            } else {
                child.read_at(pos, &mut buf[..n])?;
                parent.write_at(pos, &buf[..n])?;
            }
            pos += n as u64;
            done += n as u64;
            report(progress, done, total);
        }
    }
    let child_id = Guid(child.disk_id());
    if Guid(parent.disk_id()) != child_id {
        parent.set_disk_id(child_id)?;
    }
    parent.flush()?;
    parent.close()?;
    drop(child);
    if remove_child {
        std::fs::remove_file(child_path).ctx(|| format!("removing {}", child_path.display()))?;
    }
    Ok(MergeReport {
        parent: parent_path,
        bytes_merged: total,
        child_removed: remove_child,
    })
}

/// `resize-vhd`: changes the virtual size of a VHDX or raw image. Growing always works;
/// shrinking works only when the part cut off reads as zeros. Differencing disks cannot be
/// resized.
pub fn resize(path: &Path, new_size: u64) -> Result<()> {
    match detect_format(path)? {
        DiskFormat::Vhdx => {
            let v = Vhdx::open(path, OpenOptions::default())?;
            v.resize(new_size)?;
            v.close()
        }
        DiskFormat::Raw => {
            let d = RawDisk::open(path, false)?;
            let lss = d.logical_sector_size() as u64;
            if new_size == 0 || new_size % lss != 0 {
                return Err(Error::InvalidArgument(format!(
                    "new size {new_size} must be a non-zero multiple of {lss}"
                )));
            }
            if new_size < d.size() {
                let mut buf = vec![0u8; CHUNK as usize];
                let mut pos = new_size;
                while pos < d.size() {
                    let n = CHUNK.min(d.size() - pos) as usize;
                    d.read_at(pos, &mut buf[..n])?;
                    if buf[..n].iter().any(|&b| b != 0) {
                        return Err(Error::InvalidArgument(format!(
                            "cannot shrink to {new_size} bytes: the disk holds data at offset {pos}; only a zero tail can be cut"
                        )));
                    }
                    pos += n as u64;
                }
            }
            drop(d);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .ctx(|| format!("opening {}", path.display()))?;
            let st = FileStorage::new(f).ctx(|| format!("inspecting {}", path.display()))?;
            st.set_len(new_size)
                .ctx(|| format!("resizing {}", path.display()))?;
            st.flush().ctx(|| format!("flushing {}", path.display()))
        }
    }
}
