//! # disk: Verdigris virtual hard disks
//!
//! The block layer under the storage VSP (`storvsp`) and the emulated IDE controller: one trait,
//! [`BlockBackend`], with three implementations:
//!
//! - [`RawDisk`]: a raw image file, or a host block device used as a passthrough disk;
//! - [`Vhdx`]: a VHDX image per Microsoft's MS-VHDX specification: fixed, dynamic and
//!   differencing disks, both headers, the region table, the metadata region, the BAT with
//!   sector bitmaps, parent chains, and the metadata log (journalled updates, replayed after a
//!   crash);
//! - any `Arc<dyn BlockBackend>` as the parent of a differencing disk.
//!
//! [`ops`] holds one library function per disk CLI verb (`new-vhd`, `vhd-info`, `check-vhd`,
//! `convert-vhd`, `merge-vhd`, `resize-vhd`), each with an optional progress callback.
//!
//! **Talks to**: host files and block devices only, through positional I/O (`pread`/`pwrite`),
//! so many threads can read and write one disk at once; there is no global lock on the data
//! path. **Never**: trusts an image (every field read from a file is checked; a corrupt or
//! truncated image is refused with one error naming the problem, never repaired silently and
//! never a panic), opens a parent for writing, writes to a disk opened read-only, or guesses a
//! format from content alone when that would let a guest's raw disk pass itself off as a VHDX
//! (see [`open_disk`]).
//!
//! Hand-written rather than taken from a crate: no maintained Rust crate implements VHDX
//! writing with the log, differencing disks and crash-safe replay; the few that exist only read.
//!
//! ## Choices worth knowing
//! - A read-only open of a VHDX whose log still holds unapplied updates is refused
//!   ([`Error::LogReplayNeeded`]); if the log's updates are already in place (the usual case
//!   after a crash of this implementation) the open succeeds. Read-write opens replay.
//! - `unmap` is a hint: whole blocks of dynamic and differencing disks are released and then
//!   read as zeros; partial blocks and fixed disks are left unchanged.
//! - Resize grows any non-differencing disk; it shrinks only when everything cut off reads as
//!   zeros, so it never drops data.
//! - Differencing disks take their parent's size and cannot be resized.
//! - [`DiskOptions::unbuffered`] opens the image a second time with `O_DIRECT` for aligned
//!   data I/O, as Hyper-V opens virtual disks; metadata and unaligned I/O stay buffered,
//!   and Linux keeps the two coherent ([`storage`] has the details).
//! - Scatter/gather: [`BlockBackend::read_vectored_at`]/[`write_vectored_at`] move one
//!   request spread over many buffers (a guest's pages) with one `preadv`/`pwritev` per
//!   contiguous stretch of the file: the whole request on a raw disk, each allocated block's
//!   part of it on a VHDX.
//!
//! [`write_vectored_at`]: BlockBackend::write_vectored_at

pub mod error;
pub mod guid;
pub mod ops;
pub mod raw;
pub mod storage;
pub mod vectored;
pub mod vhdx;

use std::path::Path;
use std::sync::Arc;

pub use error::{Error, Result};
pub use guid::Guid;
pub use raw::RawDisk;
pub use storage::{FileStorage, MemStorage, Storage};
pub use vhdx::create::{CreateParams, VhdxKind};
pub use vhdx::{OpenOptions, ParentMode, Vhdx};

/// A virtual disk as the device models see it. Offsets and lengths are bytes and must be
/// multiples of [`logical_sector_size`](Self::logical_sector_size). All methods take `&self`
/// and may be called from several threads at once; I/O to different blocks proceeds in
/// parallel.
pub trait BlockBackend: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `buf` at `offset`. Durable once a later [`flush`](Self::flush) returns.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Reads into `bufs` back to back from `offset`: one request scattered over several
    /// buffers (a guest's pages). Each buffer's length must be a multiple of the logical
    /// sector. The default reads them one by one; the file-backed disks move each
    /// contiguous stretch of the image with one `preadv`.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(off, b)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs` back to back from `offset` (see [`read_vectored_at`](Self::read_vectored_at)).
    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(off, b)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Tells the disk the range is unused (TRIM / UNMAP). A hint; see the crate docs for what
    /// reads return afterwards.
    fn unmap(&self, offset: u64, len: u64) -> Result<()>;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Logical sector size (512 or 4096 for VHDX).
    fn logical_sector_size(&self) -> u32;
    /// Physical sector size.
    fn physical_sector_size(&self) -> u32;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// A stable 16-byte identity for SCSI page 83 / serial numbers: the VHDX virtual disk ID,
    /// or for raw files one derived from the file's device and inode numbers.
    fn disk_id(&self) -> [u8; 16];
    /// Whether aligned data I/O bypasses the host's page cache ([`DiskOptions::unbuffered`]
    /// asked for it and the host file system allows it).
    fn unbuffered(&self) -> bool {
        false
    }
}

impl<T: BlockBackend + ?Sized> BlockBackend for Arc<T> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        (**self).write_at(offset, buf)
    }
    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        (**self).read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        (**self).write_vectored_at(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        (**self).unmap(offset, len)
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn logical_sector_size(&self) -> u32 {
        (**self).logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        (**self).physical_sector_size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn disk_id(&self) -> [u8; 16] {
        (**self).disk_id()
    }
    fn unbuffered(&self) -> bool {
        (**self).unbuffered()
    }
}

/// Image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw bytes: an image file or a host block device.
    Raw,
    /// MS-VHDX.
    Vhdx,
}

fn has_vhdx_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("vhdx") || e.eq_ignore_ascii_case("avhdx"))
}

/// Decides the format of `path`:
/// - a host block device is always raw (passthrough);
/// - a file named `*.vhdx` or `*.avhdx` is VHDX (and must carry the signature);
/// - any other file is raw, unless its first bytes are the VHDX signature "vhdxfile": then the
///   open is refused, because a guest can write that signature into its own raw disk and must
///   not be able to make the host parse guest data as VHDX metadata (which could, e.g., name
///   host files as parents). Name such a file `.vhdx` or call [`open_disk_as`].
pub fn detect_format(path: &Path) -> Result<DiskFormat> {
    let md = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
    use std::os::unix::fs::FileTypeExt;
    if md.file_type().is_block_device() {
        return Ok(DiskFormat::Raw);
    }
    if !md.is_file() {
        return Err(Error::InvalidArgument(format!(
            "{} is neither a regular file nor a block device",
            path.display()
        )));
    }
    if has_vhdx_extension(path) {
        return Ok(DiskFormat::Vhdx);
    }
    if path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("vhd"))
    {
        return Err(Error::Unsupported {
            path: Some(path.to_path_buf()),
            what: "VHD (version 1) images are not supported; convert them to VHDX or raw first"
                .into(),
        });
    }
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let st = FileStorage::new(file)
        .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
    if vhdx::has_vhdx_signature(&st)? {
        return Err(Error::InvalidArgument(format!(
            "{} carries a VHDX signature but is not named .vhdx; refusing to guess (it could be a raw disk whose guest wrote that signature): rename it or give the format explicitly",
            path.display()
        )));
    }
    Ok(DiskFormat::Raw)
}

/// How a VM's disk is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Open without write access.
    pub read_only: bool,
    /// Bypass the host's page cache for aligned data I/O (`O_DIRECT`), as Hyper-V opens
    /// virtual disks: the data moves between the device and the caller's buffer with no copy
    /// in between. Metadata (a VHDX's headers, log, BAT) stays buffered. Where the host file
    /// system cannot do direct I/O the disk stays buffered; [`BlockBackend::unbuffered`]
    /// says which it got. See [`storage`].
    pub unbuffered: bool,
}

/// Opens a disk image or host block device, detecting the format with [`detect_format`].
/// Differencing VHDX chains are resolved through their parent locators.
pub fn open_disk(path: &Path, read_only: bool) -> Result<Box<dyn BlockBackend>> {
    open_disk_with(
        path,
        None,
        DiskOptions {
            read_only,
            ..Default::default()
        },
    )
}

/// Opens a disk in a known format.
pub fn open_disk_as(
    path: &Path,
    format: DiskFormat,
    read_only: bool,
) -> Result<Box<dyn BlockBackend>> {
    open_disk_with(
        path,
        Some(format),
        DiskOptions {
            read_only,
            ..Default::default()
        },
    )
}

/// Opens a disk with options, in `format` or the one [`detect_format`] finds.
pub fn open_disk_with(
    path: &Path,
    format: Option<DiskFormat>,
    opts: DiskOptions,
) -> Result<Box<dyn BlockBackend>> {
    let format = match format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    Ok(match format {
        DiskFormat::Raw => Box::new(RawDisk::open_with(path, opts)?),
        DiskFormat::Vhdx => Box::new(Vhdx::open(
            path,
            OpenOptions {
                read_only: opts.read_only,
                unbuffered: opts.unbuffered,
                ..Default::default()
            },
        )?),
    })
}
