//! Scatter/gather I/O (`read_vectored_at`/`write_vectored_at`) on raw disks, dynamic VHDX
//! (allocated and unallocated blocks) and differencing VHDX (partially present blocks),
//! buffered and unbuffered, against a model and against plain `read_at`.

mod common;

use std::path::Path;

use common::{assert_qemu_check, Rng, MIB};
use disk::{BlockBackend, CreateParams, DiskFormat, DiskOptions, VhdxKind};

const SIZE: u64 = 16 * MIB;

fn open(path: &Path, unbuffered: bool) -> Box<dyn BlockBackend> {
    let vhdx = path.extension().is_some_and(|e| e == "vhdx");
    let format = if vhdx {
        DiskFormat::Vhdx
    } else {
        DiskFormat::Raw
    };
    let opts = DiskOptions {
        read_only: false,
        unbuffered,
    };
    disk::open_disk_with(path, Some(format), opts).unwrap()
}

/// A request of `len` bytes cut into pieces of whole sectors, some page-aligned in memory
/// (they can go direct) and some not, as a guest's scattered pages are.
fn pieces(rng: &mut Rng, len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let n = ((rng.below(16) as usize + 1) * 512).min(len - at);
        let n = if rng.below(2) == 0 {
            n.div_ceil(4096) * 4096
        } else {
            n
        }
        .min(len - at);
        out.push((at, n));
        at += n;
    }
    out
}

/// Random vectored writes and reads over `d`, checked against a model; returns the model.
fn exercise(d: &dyn BlockBackend, mut model: Vec<u8>, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    // Memory for the pieces: page-aligned base, pieces placed with gaps between them.
    let mut mem = vec![0u8; 8 * MIB as usize];
    let base = mem.as_ptr().align_offset(4096);
    for round in 0..60 {
        let len = ((rng.below(96) + 1) * 4096) as usize;
        // Often across a 1 MiB block boundary.
        let off = if round % 3 == 0 {
            (rng.below(SIZE / MIB - 1) + 1) * MIB - 4096 * rng.below(4)
        } else {
            rng.below((SIZE - len as u64) / 512) * 512
        };
        let off = off.min(SIZE - len as u64);
        let layout = pieces(&mut rng, len);
        // Where each piece sits in `mem`: a page apart, so some start page-aligned.
        let mut slots = Vec::new();
        let mut at = base;
        for &(_, n) in &layout {
            let skew = if rng.below(2) == 0 { 0 } else { 512 };
            slots.push(at + skew);
            at += (skew + n).div_ceil(4096) * 4096 + 4096;
        }
        if rng.below(2) == 0 {
            rng.fill(&mut mem);
            let bufs: Vec<&[u8]> = layout
                .iter()
                .zip(&slots)
                .map(|(&(_, n), &s)| &mem[s..s + n])
                .collect();
            d.write_vectored_at(off, &bufs).unwrap();
            for (&(p, n), &s) in layout.iter().zip(&slots) {
                model[off as usize + p..off as usize + p + n].copy_from_slice(&mem[s..s + n]);
            }
        } else {
            mem.fill(0xee);
            {
                // Disjoint pieces of `mem`, cut front to back.
                let mut rest: &mut [u8] = &mut mem[..];
                let mut cut = 0;
                let mut bufs: Vec<&mut [u8]> = Vec::new();
                for (&(_, n), &s) in layout.iter().zip(&slots) {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(s - cut);
                    let (piece, tail) = tail.split_at_mut(n);
                    bufs.push(piece);
                    rest = tail;
                    cut = s + n;
                }
                d.read_vectored_at(off, &mut bufs).unwrap();
            }
            for (&(p, n), &s) in layout.iter().zip(&slots) {
                assert!(
                    mem[s..s + n] == model[off as usize + p..off as usize + p + n],
                    "round {round}: piece at {p} (+{n}) of the read at {off} differs"
                );
            }
        }
    }
    // Plain reads agree.
    let mut all = vec![0u8; SIZE as usize];
    d.read_at(0, &mut all).unwrap();
    assert!(all == model, "the disk differs from the model");
    model
}

fn dynamic(path: &Path) {
    let params = CreateParams {
        virtual_size: SIZE,
        kind: VhdxKind::Dynamic,
        block_size: MIB as u32,
        ..Default::default()
    };
    disk::vhdx::create::create(path, &params).unwrap();
}

#[test]
fn vectored_io_on_raw_disks() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for unbuffered in [false, true] {
        let p = dir.path().join(format!("r{unbuffered}.raw"));
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        let d = open(&p, unbuffered);
        assert_eq!(d.unbuffered(), unbuffered);
        let model = exercise(&*d, vec![0; SIZE as usize], 1 + unbuffered as u64);
        d.flush().unwrap();
        drop(d);
        assert!(std::fs::read(&p).unwrap() == model);
    }
}

#[test]
fn vectored_io_on_dynamic_vhdx_allocates_and_reads_back() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for unbuffered in [false, true] {
        let p = dir.path().join(format!("d{unbuffered}.vhdx"));
        dynamic(&p);
        let d = open(&p, unbuffered);
        let model = exercise(&*d, vec![0; SIZE as usize], 3 + unbuffered as u64);
        d.flush().unwrap();
        drop(d);
        assert_qemu_check(&p);
        let mut all = vec![0u8; SIZE as usize];
        open(&p, false).read_at(0, &mut all).unwrap();
        assert!(all == model, "reopened: differs");
    }
}

#[test]
fn vectored_io_on_a_differencing_vhdx_mixes_child_and_parent_sectors() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let parent = dir.path().join("base.vhdx");
    dynamic(&parent);
    let mut base = vec![0u8; SIZE as usize];
    Rng::new(9).fill(&mut base[..8 * MIB as usize]);
    {
        let d = open(&parent, false);
        d.write_at(0, &base[..8 * MIB as usize]).unwrap();
        d.flush().unwrap();
    }
    for unbuffered in [false, true] {
        let child = dir.path().join(format!("c{unbuffered}.vhdx"));
        disk::vhdx::create::create_differencing(&child, &parent, Some(MIB as u32)).unwrap();
        let d = open(&child, unbuffered);
        let model = exercise(&*d, base.clone(), 5 + unbuffered as u64);
        d.flush().unwrap();
        drop(d);
        // (qemu-img cannot open differencing VHDX: the reopen is the check.)
        let mut all = vec![0u8; SIZE as usize];
        open(&child, false).read_at(0, &mut all).unwrap();
        assert!(all == model, "reopened: differs");
    }
}

#[test]
fn a_vectored_read_past_the_data_of_a_short_raw_file_reads_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.raw");
    // 3000 bytes: the disk is 3072 (six sectors); the last 72 bytes read as zeros.
    let data: Vec<u8> = (0..3000).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&p, &data).unwrap();
    let d = open(&p, false);
    assert_eq!(d.size(), 3072);
    let (mut a, mut b) = (vec![0xffu8; 1024], vec![0xffu8; 2048]);
    d.read_vectored_at(0, &mut [&mut a[..], &mut b[..]])
        .unwrap();
    assert_eq!(a, data[..1024]);
    assert_eq!(b[..1976], data[1024..]);
    assert!(b[1976..].iter().all(|x| *x == 0));
}

#[test]
fn empty_buffers_in_a_vectored_request_are_skipped() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let p = dir.path().join("e.raw");
    let data: Vec<u8> = (0..16384u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    for unbuffered in [false, true] {
        let d = open(&p, unbuffered);
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        let mut none: [u8; 0] = [];
        d.read_vectored_at(4096, &mut [&mut a[..], &mut none[..], &mut b[..], &mut []])
            .unwrap();
        assert_eq!(a, data[4096..8192]);
        assert_eq!(b, data[8192..12288]);
        d.write_vectored_at(0, &[&[], &b[..], &[]]).unwrap();
        let mut back = vec![0u8; 4096];
        d.read_at(0, &mut back).unwrap();
        assert_eq!(back, b);
    }
}
