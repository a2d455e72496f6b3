//! Raw images and passthrough disks: a regular file or a host block device, byte for byte.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
use crate::storage::{FileStorage, Storage};
use crate::BlockBackend;

/// A raw disk backed by a file or block device.
pub struct RawDisk {
    st: Arc<dyn Storage>,
    path: Option<PathBuf>,
    size: u64,
    /// Bytes actually present in the file; reads past it return zeros (a file whose size is not
    /// a sector multiple is exposed rounded up).
    data_len: u64,
    logical: u32,
    physical: u32,
    read_only: bool,
    id: [u8; 16],
}

/// A stable 16-byte identity from the file's device and inode numbers (raw files carry no ID of
/// their own). FNV-1a, twice with different seeds; identity, not security.
fn id_from(dev: u64, ino: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (half, seed) in [
        (0usize, 0xcbf2_9ce4_8422_2325u64),
        (8, 0x8422_2325_cbf2_9ce4),
    ] {
        let mut h = seed;
        for b in dev.to_le_bytes().iter().chain(ino.to_le_bytes().iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out[half..half + 8].copy_from_slice(&h.to_le_bytes());
    }
    out
}

impl RawDisk {
    /// Opens a raw image file or a host block device.
    pub fn open(path: &Path, read_only: bool) -> Result<RawDisk> {
        Self::open_with(
            path,
            crate::DiskOptions {
                read_only,
                ..Default::default()
            },
        )
    }

    /// Opens a raw image file or a host block device with options.
    pub fn open_with(path: &Path, opts: crate::DiskOptions) -> Result<RawDisk> {
        let read_only = opts.read_only;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .ctx(|| format!("opening {}", path.display()))?;
        let md = file
            .metadata()
            .ctx(|| format!("inspecting {}", path.display()))?;
        let mut st = FileStorage::new(file).ctx(|| format!("inspecting {}", path.display()))?;
        if opts.unbuffered {
            st = st
                .unbuffered()
                .ctx(|| format!("opening {} for direct I/O", path.display()))?;
        }
        let (logical, physical) = st
            .device_sector_sizes()
            .ctx(|| format!("querying sector sizes of {}", path.display()))?
            .unwrap_or((512, 4096));
        let mut d = Self::from_storage(
            Arc::new(st),
            read_only,
            logical,
            physical,
            id_from(md.dev(), md.ino()),
        )
        .map_err(|e| match e {
            Error::Io { context, source } => Error::Io {
                context: format!("{context} of {}", path.display()),
                source,
            },
            e => e,
        })?;
        d.path = Some(path.to_path_buf());
        Ok(d)
    }

    /// A raw disk over any storage.
    pub fn from_storage(
        st: Arc<dyn Storage>,
        read_only: bool,
        logical: u32,
        physical: u32,
        id: [u8; 16],
    ) -> Result<RawDisk> {
        if !logical.is_power_of_two() || logical < 512 || physical < logical {
            return Err(Error::InvalidArgument(format!(
                "sector sizes {logical}/{physical} are not valid"
            )));
        }
        let data_len = st.len().ctx(|| "getting the size".into())?;
        let size = data_len.div_ceil(logical as u64) * logical as u64;
        Ok(RawDisk {
            st,
            path: None,
            size,
            data_len,
            logical,
            physical,
            read_only,
            id,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let l = self.logical as u64;
        if offset % l != 0 || len % l != 0 {
            return Err(Error::InvalidArgument(format!(
                "I/O at offset {offset} length {len} is not aligned to the {l}-byte sector"
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::InvalidArgument(format!(
                "I/O at offset {offset} length {len} is past the end of the {}-byte disk",
                self.size
            )));
        }
        Ok(())
    }

    fn what(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "raw disk".into())
    }
}

impl BlockBackend for RawDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let inside = self.data_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.st
                .read_at(offset, &mut buf[..inside])
                .ctx(|| format!("reading {} at {offset}", self.what()))?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, buf.len() as u64)?;
        self.st
            .write_at(offset, buf)
            .ctx(|| format!("writing {} at {offset}", self.what()))
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let len = crate::vectored::total(bufs) as u64;
        self.check(offset, len)?;
        if offset + len > self.data_len {
            // The tail past the file's data reads as zeros: piece by piece.
            let mut off = offset;
            for b in bufs.iter_mut() {
                self.read_at(off, b)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        self.st
            .read_vectored_at(offset, bufs)
            .ctx(|| format!("reading {} at {offset}", self.what()))
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, crate::vectored::total(bufs) as u64)?;
        self.st
            .write_vectored_at(offset, bufs)
            .ctx(|| format!("writing {} at {offset}", self.what()))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.st.flush().ctx(|| format!("flushing {}", self.what()))
    }

    /// Punches a hole (files) or discards (block devices). A hint: on a device that cannot
    /// discard, nothing happens.
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)?;
        self.st
            .discard(offset, len)
            .ctx(|| format!("discarding in {}", self.what()))?;
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn disk_id(&self) -> [u8; 16] {
        self.id
    }

    fn unbuffered(&self) -> bool {
        self.st.unbuffered()
    }
}
