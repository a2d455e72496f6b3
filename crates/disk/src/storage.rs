//! Positional byte storage under a disk image: a host file (or block device), or memory.
//!
//! The VHDX code is written against [`Storage`] rather than `std::fs::File` so that the crash
//! tests can put a fault-injecting layer underneath it and the fuzz target can run on bytes in
//! memory. All methods take `&self` and are positional (`pread`/`pwrite`), so several threads
//! can do I/O at once without a seek lock.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::RwLock;

/// Byte-addressed storage with positional I/O.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`. Reading past the end is an error
    /// (`UnexpectedEof`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Grows or shrinks the storage; new bytes read as zero.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Tells the host the range is no longer needed; afterwards it reads as zeros if this returns
    /// `Ok(true)`. Best effort: `Ok(false)` means nothing was done.
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Reserves host space for a range (fixed disks). Best effort; the default does nothing.
    fn allocate(&self, _offset: u64, _len: u64) {}
    /// Writes zeros over a range (used by log replay's zero descriptors). The default writes a
    /// zero buffer in pieces.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zero = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64);
            self.write_at(offset + done, &zero[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// Linux block-device ioctl numbers (`<linux/fs.h>`), written out because the `libc` crate does
/// not export all of them.
mod ioctl {
    /// `_IOR(0x12, 114, size_t)`: device size in bytes.
    pub const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    /// `_IO(0x12, 104)`: logical sector size.
    pub const BLKSSZGET: libc::c_ulong = 0x1268;
    /// `_IO(0x12, 123)`: physical sector size.
    pub const BLKPBSZGET: libc::c_ulong = 0x127b;
    /// `_IO(0x12, 119)`: discard a byte range.
    pub const BLKDISCARD: libc::c_ulong = 0x1277;
}

/// A host file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    block_device: bool,
}

impl FileStorage {
    /// Wraps an open file; detects whether it is a block device.
    pub fn new(file: File) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(FileStorage { file, block_device })
    }

    /// Whether this is a host block device (passthrough disk) rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Logical and physical sector size reported by a block device, or `None` for a file.
    pub fn device_sector_sizes(&self) -> io::Result<Option<(u32, u32)>> {
        if !self.block_device {
            return Ok(None);
        }
        let fd = self.file.as_raw_fd();
        let mut logical: libc::c_int = 0;
        let mut physical: libc::c_uint = 0;
        // SAFETY: BLKSSZGET writes one c_int through the pointer, which points at a live local;
        // the fd is owned by `self.file` and open for the duration of the call.
        if unsafe { libc::ioctl(fd, ioctl::BLKSSZGET as _, &mut logical as *mut libc::c_int) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: BLKPBSZGET writes one c_uint through the pointer, which points at a live local.
        if unsafe {
            libc::ioctl(
                fd,
                ioctl::BLKPBSZGET as _,
                &mut physical as *mut libc::c_uint,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((logical as u32, physical)))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live
            // local; the fd is owned by `self.file`.
            let r = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    ioctl::BLKGETSIZE64 as _,
                    &mut size as *mut u64,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(size)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cannot resize a block device",
            ));
        }
        self.file.set_len(len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let fd = self.file.as_raw_fd();
        if self.block_device {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer, which points at
            // a live local array.
            let r = unsafe { libc::ioctl(fd, ioctl::BLKDISCARD as _, range.as_ptr()) };
            // A device that cannot discard is not an error: discard is a hint.
            return Ok(r == 0);
        }
        // SAFETY: fallocate only takes integers; the fd is owned by `self.file`.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        Ok(r == 0)
    }

    fn allocate(&self, offset: u64, len: u64) {
        if self.block_device || len == 0 {
            return;
        }
        // SAFETY: fallocate only takes integers; the fd is owned by `self.file`. Failure (e.g.
        // a filesystem without fallocate) just leaves the file sparse.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            );
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        // Within the file, punching a hole is the cheap way to get zeros; past its end, or where
        // the filesystem cannot punch, fall back to writing zeros.
        let file_len = self.len()?;
        if !self.block_device && offset + len <= file_len && self.discard(offset, len)? {
            return Ok(());
        }
        let zero = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zero.len() as u64);
            self.write_at(offset + done, &zero[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// Storage in memory, for tests and fuzzing. It refuses to grow past `max_len`, so a hostile
/// image cannot make it allocate without bound.
#[derive(Debug)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
    max_len: u64,
}

impl MemStorage {
    /// Storage holding `data`, growable up to `max_len` bytes.
    pub fn new(data: Vec<u8>, max_len: u64) -> Self {
        MemStorage {
            data: RwLock::new(data),
            max_len,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Grows `v` with zeros by copying from a zeroed allocation (`Vec::resize` is a per-byte loop
/// in unoptimized builds, which the tests and fuzzer use).
fn grow(v: &mut Vec<u8>, len: usize) {
    if v.len() < len {
        let n = len - v.len();
        v.extend_from_slice(&vec![0u8; n]);
    }
}

impl Storage for MemStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= d.len() as u64);
        match end {
            Some(end) => {
                buf.copy_from_slice(&d[offset as usize..end as usize]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of storage",
            )),
        }
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.max_len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::StorageFull, "memory storage limit"))?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        grow(&mut d, end as usize);
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.max_len {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "memory storage limit",
            ));
        }
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<bool> {
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let l = d.len() as u64;
        let start = offset.min(l) as usize;
        let end = offset.saturating_add(len).min(l) as usize;
        d[start..end].fill(0);
        Ok(true)
    }
}
