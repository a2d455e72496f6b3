//! Unbuffered disks (`DiskOptions::unbuffered`): aligned data I/O really bypasses the host's
//! page cache (checked with `mincore`), unaligned I/O and metadata still work and stay
//! coherent with it. (The fall-back to the cache on a file system without direct I/O is not
//! tested: every file system this kernel mounts here, tmpfs included, accepts `O_DIRECT`.)

mod common;

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use common::{assert_qemu_check, Rng, MIB};
use disk::{BlockBackend, CreateParams, DiskFormat, DiskOptions, VhdxKind};

/// A scratch directory on the file system of the build tree (`/tmp` may be a tmpfs, which
/// has no direct I/O).
fn workdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A page-aligned buffer of `len` bytes.
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Self { v, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

/// Writes back and drops the file's cached pages.
fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise only takes integers; the fd is live for the call.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

/// How many of the pages of `path` in `[offset, offset + len)` are in the page cache.
fn cached_pages(path: &Path, offset: u64, len: usize) -> usize {
    let f = File::open(path).unwrap();
    // SAFETY: a fresh shared read-only mapping of the file; unmapped below, never written.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has one byte per page of the mapping, which is live.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0);
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    vec.iter().filter(|b| **b & 1 != 0).count()
}

/// Opens `path` as raw, or VHDX if named so (giving the format: detecting a raw disk's
/// format reads its first page through the cache).
fn open(path: &Path, unbuffered: bool) -> Box<dyn BlockBackend> {
    let vhdx = path.extension().is_some_and(|e| e == "vhdx");
    disk::open_disk_with(
        path,
        Some(if vhdx {
            DiskFormat::Vhdx
        } else {
            DiskFormat::Raw
        }),
        DiskOptions {
            read_only: false,
            unbuffered,
        },
    )
    .unwrap()
}

fn raw_file(dir: &Path, size: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let p = dir.join("disk.raw");
    let mut data = vec![0u8; size];
    Rng::new(seed).fill(&mut data);
    std::fs::write(&p, &data).unwrap();
    drop_cache(&p);
    (p, data)
}

#[test]
fn aligned_reads_and_writes_of_a_raw_disk_bypass_the_page_cache() {
    let dir = workdir();
    let (p, mut data) = raw_file(dir.path(), 8 * MIB as usize, 1);
    assert_eq!(
        cached_pages(&p, 0, 8 * MIB as usize),
        0,
        "fadvise did not drop the cache"
    );

    let d = open(&p, true);
    assert!(
        d.unbuffered(),
        "{} cannot do direct I/O; the tests need a file system that can",
        dir.path().display()
    );
    let mut b = Aligned::new(4 * MIB as usize);
    d.read_at(0, b.buf()).unwrap();
    assert_eq!(b.buf(), &data[..4 * MIB as usize]);
    assert_eq!(cached_pages(&p, 0, 4 * MIB as usize), 0);

    // A write of new data at 5 MiB does not land in the cache either, and is in the file.
    Rng::new(2).fill(b.buf());
    d.write_at(5 * MIB, &b.buf()[..MIB as usize]).unwrap();
    data[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&b.buf()[..MIB as usize]);
    assert_eq!(cached_pages(&p, 5 * MIB, MIB as usize), 0);
    d.flush().unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), data);

    // The same read through a buffered open fills the cache: the check can tell them apart.
    drop_cache(&p);
    let buffered = open(&p, false);
    assert!(!buffered.unbuffered());
    buffered.read_at(0, b.buf()).unwrap();
    assert!(cached_pages(&p, 0, 4 * MIB as usize) > 0);
}

#[test]
fn unaligned_io_of_an_unbuffered_disk_is_coherent_with_aligned_io() {
    let dir = workdir();
    let (p, mut data) = raw_file(dir.path(), 2 * MIB as usize, 3);
    let d = open(&p, true);
    assert!(d.unbuffered());

    // 512 bytes into the middle of a page, from a buffer that is not page-aligned: the
    // cached path writes it; an aligned (direct) read of the page must see it.
    let mut small = vec![0u8; 513];
    Rng::new(4).fill(&mut small);
    d.write_at(4096 + 512, &small[1..]).unwrap();
    data[4096 + 512..4096 + 1024].copy_from_slice(&small[1..]);
    let mut page = Aligned::new(8192);
    d.read_at(4096, page.buf()).unwrap();
    assert_eq!(page.buf(), &data[4096..4096 + 8192]);

    // And the other way: a direct write, then an unaligned (cached) read of part of it,
    // after the cached path has read the same page before.
    let mut back = vec![0u8; 513];
    d.read_at(MIB + 512, &mut back[1..]).unwrap();
    assert_eq!(&back[1..], &data[MIB as usize + 512..MIB as usize + 1024]);
    Rng::new(5).fill(page.buf());
    d.write_at(MIB, page.buf()).unwrap();
    data[MIB as usize..MIB as usize + 8192].copy_from_slice(page.buf());
    d.read_at(MIB + 512, &mut back[1..]).unwrap();
    assert_eq!(&back[1..], &data[MIB as usize + 512..MIB as usize + 1024]);

    d.flush().unwrap();
    drop(d);
    assert_eq!(std::fs::read(&p).unwrap(), data);
}

#[test]
fn an_unbuffered_dynamic_vhdx_keeps_its_data_and_metadata_consistent() {
    let dir = workdir();
    let p = dir.path().join("d.vhdx");
    disk::vhdx::create::create(
        &p,
        &CreateParams {
            virtual_size: 64 * MIB,
            kind: VhdxKind::Dynamic,
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; 64 * MIB as usize];
    let mut rng = Rng::new(6);
    {
        let d = open(&p, true);
        assert!(d.unbuffered());
        let mut b = Aligned::new(64 << 10);
        for i in 0..40u64 {
            // Aligned 64 KiB writes (direct; they allocate blocks, whose BAT entries go
            // through the log) and unaligned 512-byte ones (cached), interleaved.
            let off = rng.below(64 * MIB / 4096 - 16) * 4096;
            rng.fill(b.buf());
            if i % 3 == 0 {
                let o = off + 512;
                d.write_at(o, &b.buf()[..512]).unwrap();
                model[o as usize..o as usize + 512].copy_from_slice(&b.buf()[..512]);
            } else {
                d.write_at(off, b.buf()).unwrap();
                model[off as usize..off as usize + (64 << 10)].copy_from_slice(b.buf());
            }
        }
        d.flush().unwrap();
        // Every block read back through the direct path.
        let mut blk = Aligned::new(MIB as usize);
        for i in 0..64u64 {
            d.read_at(i * MIB, blk.buf()).unwrap();
            assert_eq!(
                blk.buf(),
                &model[(i * MIB) as usize..((i + 1) * MIB) as usize]
            );
        }
    }
    assert_qemu_check(&p);
    // A buffered, read-only open sees the same disk.
    let d = disk::open_disk_as(&p, DiskFormat::Vhdx, true).unwrap();
    let mut all = vec![0u8; 64 * MIB as usize];
    d.read_at(0, &mut all).unwrap();
    assert!(
        all == model,
        "the reopened VHDX differs from what was written"
    );
}
