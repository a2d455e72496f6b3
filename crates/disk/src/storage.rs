//! Positional byte storage under a disk image: a host file (or block device), or memory.
//!
//! The VHDX code is written against [`Storage`] rather than `std::fs::File` so that the crash
//! tests can put a fault-injecting layer underneath it and the fuzz target can run on bytes in
//! memory. All methods take `&self` and are positional (`pread`/`pwrite`), so several threads
//! can do I/O at once without a seek lock.
//!
//! ## Unbuffered I/O
//! [`FileStorage::unbuffered`] adds a second descriptor of the same file opened with
//! `O_DIRECT`, as Hyper-V opens a VM's virtual disks without the host's cache: the guest
//! already caches, so a second copy in the host's page cache costs memory and a memcpy per
//! I/O. Reads and writes whose offset, length and memory address are all multiples of
//! [`DIRECT_ALIGN`] go through it, straight between the device and the caller's buffer
//! (guest RAM, for storvsp). Everything else (a VHDX's headers, log and BAT, unaligned
//! guest I/O) goes through the ordinary descriptor. Linux keeps the two coherent: a direct
//! read first writes back cached dirty pages of its range, a direct write drops them.

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
    /// Reads into `bufs` back to back from `offset`. The default reads them one by one.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(off, b)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs` back to back from `offset`. The default writes them one by one.
    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(off, b)?;
            off += b.len() as u64;
        }
        Ok(())
    }
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
    /// Whether aligned I/O bypasses the host's page cache (see the module docs).
    fn unbuffered(&self) -> bool {
        false
    }
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

/// Offset, length and address alignment for unbuffered I/O: the page size, which satisfies
/// every Linux filesystem and block device with sectors up to 4 KiB (the kernel's own
/// minimum is the device's logical sector, often 512).
pub const DIRECT_ALIGN: usize = 4096;

/// A host file or block device.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    /// The same file opened `O_DIRECT`, for aligned I/O (see the module docs).
    direct: Option<File>,
    block_device: bool,
}

/// Whether unbuffered I/O may carry this request.
fn direct_ok(offset: u64, addr: *const u8, len: usize) -> bool {
    let a = DIRECT_ALIGN as u64;
    len > 0 && offset % a == 0 && (addr as u64) % a == 0 && (len as u64) % a == 0
}

/// The iovecs of buffers given as (address, length), leaving out empty ones (a call with
/// only empty iovecs left would read as the end of the file).
fn iovecs(pieces: impl Iterator<Item = (*const u8, usize)>) -> Vec<libc::iovec> {
    pieces
        .filter(|(_, n)| *n > 0)
        .map(|(p, n)| libc::iovec {
            iov_base: p as *mut libc::c_void,
            iov_len: n,
        })
        .collect()
}

/// `preadv`/`pwritev` until every byte of `iov` moved (the kernel may stop short; `IOV_MAX`
/// caps one call). `write`: which of the two.
fn vectored_all(
    file: &File,
    offset: u64,
    mut iov: Vec<libc::iovec>,
    write: bool,
) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let fd = file.as_raw_fd();
    let mut i = 0;
    let mut off = offset;
    while i < iov.len() {
        let cnt = (iov.len() - i).min(IOV_MAX) as libc::c_int;
        let Ok(pos) = libc::off_t::try_from(off) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: `iov[i..]` holds at least `cnt` iovecs, each describing memory the caller
        // lent us for the call (from `&mut [u8]` for reads, `&[u8]` for writes, which the
        // kernel only reads); the fd is owned by `file`.
        let n = unsafe {
            if write {
                libc::pwritev(fd, iov[i..].as_ptr(), cnt, pos)
            } else {
                libc::preadv(fd, iov[i..].as_ptr(), cnt, pos)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(if write {
                io::Error::new(io::ErrorKind::WriteZero, "the file took no more data")
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the file",
                )
            });
        }
        let mut n = n as usize;
        off += n as u64;
        while n > 0 {
            let v = &mut iov[i];
            if n >= v.iov_len {
                n -= v.iov_len;
                i += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

impl FileStorage {
    /// The descriptor for I/O at `offset` over (address, length) `pieces`: the direct one
    /// when every non-empty piece is aligned (and, since lengths then are page multiples,
    /// so is each piece's offset in the file).
    fn pick(
        &self,
        offset: u64,
        mut pieces: impl Iterator<Item = (*const u8, usize)>,
    ) -> Option<&File> {
        let d = self.direct.as_ref()?;
        pieces
            .all(|(p, n)| n == 0 || direct_ok(offset, p, n))
            .then_some(d)
    }

    /// `preadv`/`pwritev` over the buffers at (address, length) `pieces`, which the caller
    /// lends for the call (as `&mut [u8]` to read into, `&[u8]` to write from): through the
    /// direct descriptor when every piece is aligned, else (or if it refuses) the cached one.
    fn vectored(
        &self,
        offset: u64,
        pieces: Vec<(*const u8, usize)>,
        write: bool,
    ) -> io::Result<()> {
        if let Some(d) = self.pick(offset, pieces.iter().copied()) {
            match vectored_all(d, offset, iovecs(pieces.iter().copied()), write) {
                // As in `read_at`: the cached path does what the direct one refused.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => return r,
            }
        }
        vectored_all(&self.file, offset, iovecs(pieces.into_iter()), write)
    }

    /// Wraps an open file; detects whether it is a block device.
    pub fn new(file: File) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(FileStorage {
            file,
            direct: None,
            block_device,
        })
    }

    /// Also opens the file `O_DIRECT` (same inode, same access mode), so that aligned I/O
    /// bypasses the host's page cache. A filesystem that cannot do direct I/O (tmpfs, some
    /// FUSE ones) refuses that open with `EINVAL`; the storage then stays buffered, which
    /// [`Storage::unbuffered`] reports. Other errors are returned.
    pub fn unbuffered(mut self) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let fd = self.file.as_raw_fd();
        // SAFETY: F_GETFL only reads the descriptor's flags; the fd is owned by `self.file`.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        // Re-opening through /proc names this very inode, even if the path was renamed.
        match std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{fd}"))
        {
            Ok(f) => self.direct = Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    "direct I/O is not available on this file system; using the host cache"
                );
            }
            Err(e) => return Err(e),
        }
        Ok(self)
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
        if let Some(d) = &self.direct {
            if direct_ok(offset, buf.as_ptr(), buf.len()) {
                match d.read_exact_at(buf, offset) {
                    // A stricter alignment than ours, or a short read at the end of the
                    // file leaving an unaligned remainder: the cached path does it.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    r => return r,
                }
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if let Some(d) = &self.direct {
            if direct_ok(offset, buf.as_ptr(), buf.len()) {
                match d.write_all_at(buf, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    r => return r,
                }
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> io::Result<()> {
        self.vectored(
            offset,
            bufs.iter().map(|b| (b.as_ptr(), b.len())).collect(),
            false,
        )
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> io::Result<()> {
        self.vectored(
            offset,
            bufs.iter().map(|b| (b.as_ptr(), b.len())).collect(),
            true,
        )
    }

    fn unbuffered(&self) -> bool {
        self.direct.is_some()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_page_aligned_offsets_lengths_and_addresses_go_direct() {
        let page = 0x1000 as *const u8;
        assert!(direct_ok(0, page, 4096));
        assert!(direct_ok(1 << 30, page, 64 << 10));
        assert!(!direct_ok(512, page, 4096), "offset");
        assert!(!direct_ok(0, page, 512), "length");
        assert!(!direct_ok(0, 0x1200 as *const u8, 4096), "address");
        assert!(!direct_ok(0, page, 0), "empty");
    }
}
