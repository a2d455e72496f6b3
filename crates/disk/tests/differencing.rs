//! Differencing chains: reads fall through to parents, sector bitmaps, identity checks, merge.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_qemu_check, assert_qemu_compare, Rng, MIB};
use disk::{BlockBackend, CreateParams, OpenOptions, Vhdx, VhdxKind};

fn rw(path: &Path) -> Vhdx {
    Vhdx::open(path, OpenOptions::default()).unwrap()
}

fn ro(path: &Path) -> Vhdx {
    Vhdx::open(
        path,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(d: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(0, &mut v).unwrap();
    v
}

fn write(d: &dyn BlockBackend, model: &mut [u8], off: u64, data: &[u8]) {
    d.write_at(off, data).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Scattered writes of a few sectors each, so blocks end up partially present.
fn scatter(d: &dyn BlockBackend, model: &mut [u8], seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let lss = d.logical_sector_size() as u64;
    let sectors = d.size() / lss;
    for _ in 0..count {
        let n = 1 + rng.below(8);
        let s = rng.below(sectors - n);
        let mut buf = vec![0u8; (n * lss) as usize];
        rng.fill(&mut buf);
        write(d, model, s * lss, &buf);
    }
}

struct Chain {
    _dir: tempfile::TempDir,
    base: PathBuf,
    mid: PathBuf,
    top: PathBuf,
    models: [Vec<u8>; 3],
}

/// base (dynamic) <- mid (differencing, in a subdirectory) <- top (differencing).
fn build_chain(lss: u32) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mid = dir.path().join("sub").join("mid.avhdx");
    let top = dir.path().join("top.avhdx");
    let size = 24 * MIB;
    disk::ops::new_vhd(
        &base,
        &CreateParams {
            virtual_size: size,
            kind: VhdxKind::Dynamic,
            block_size: 1 << 20,
            logical_sector_size: lss,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let mut m0 = vec![0u8; size as usize];
    {
        let d = rw(&base);
        let mut rng = Rng::new(1);
        let mut buf = vec![0u8; 6 * MIB as usize];
        rng.fill(&mut buf);
        write(&d, &mut m0, MIB, &buf);
        scatter(&d, &mut m0, 2, 20);
        d.close().unwrap();
    }
    disk::ops::new_differencing_vhd(&mid, &base, Some(1 << 20)).unwrap();
    let mut m1 = m0.clone();
    {
        let d = rw(&mid);
        assert!(d.has_parent());
        assert_eq!(d.size(), size);
        assert!(read_all(&d) == m0, "a fresh child must read as its parent");
        scatter(&d, &mut m1, 3, 60);
        // A whole block, and a range crossing a block boundary.
        let full = vec![0xF1u8; MIB as usize];
        write(&d, &mut m1, 10 * MIB, &full);
        let cross = vec![0xC2u8; 3 * lss as usize];
        write(&d, &mut m1, 12 * MIB - lss as u64, &cross);
        // Unmapping a block of a child must hide the parent's data there (reads zeros).
        d.unmap(2 * MIB, MIB).unwrap();
        m1[2 * MIB as usize..3 * MIB as usize].fill(0);
        assert!(read_all(&d) == m1);
        d.close().unwrap();
    }
    disk::ops::new_differencing_vhd(&top, &mid, None).unwrap();
    let mut m2 = m1.clone();
    {
        let d = rw(&top);
        scatter(&d, &mut m2, 4, 50);
        write(&d, &mut m2, 2 * MIB + 4096, &vec![0x2Bu8; 8192]);
        d.close().unwrap();
    }
    Chain {
        _dir: dir,
        base,
        mid,
        top,
        models: [m0, m1, m2],
    }
}

#[test]
fn chains_read_correctly_and_parents_stay_untouched() {
    for lss in [512u32, 4096] {
        let c = build_chain(lss);
        let base_bytes = std::fs::read(&c.base).unwrap();
        let mid_bytes = std::fs::read(&c.mid).unwrap();
        assert!(read_all(&ro(&c.top)) == c.models[2], "top, lss {lss}");
        assert!(read_all(&ro(&c.mid)) == c.models[1], "mid, lss {lss}");
        assert!(read_all(&ro(&c.base)) == c.models[0], "base, lss {lss}");
        // Writing to the top opens the others read-only: their files do not change.
        {
            let d = rw(&c.top);
            let mut m = c.models[2].clone();
            scatter(&d, &mut m, 9, 20);
            assert!(read_all(&d) == m);
        }
        assert!(std::fs::read(&c.base).unwrap() == base_bytes);
        assert!(std::fs::read(&c.mid).unwrap() == mid_bytes);
        // The base is still a plain VHDX QEMU accepts (QEMU only reads 512-byte sectors).
        if lss == 512 {
            assert_qemu_check(&c.base);
        }
        // info describes the chain.
        let info = disk::ops::info(&c.top).unwrap();
        assert_eq!(info.vhd_type, Some(disk::ops::VhdType::Differencing));
        let parent = info.parent.unwrap();
        assert_eq!(
            std::fs::canonicalize(parent.resolved_path.unwrap()).unwrap(),
            std::fs::canonicalize(&c.mid).unwrap()
        );
        assert!(parent
            .locator
            .iter()
            .any(|(k, v)| k == "relative_path" && v.ends_with("mid.avhdx")));
        let json = serde_json::to_string(&disk::ops::info(&c.mid).unwrap()).unwrap();
        assert!(json.contains("\"vhd_type\":\"differencing\""), "{json}");
        // A child shares its parent's virtual disk ID (it is the same disk, later in time).
        assert_eq!(ro(&c.top).disk_id(), ro(&c.base).disk_id());
        assert!(disk::ops::check(&c.top).unwrap().is_clean());
    }
}

#[test]
fn a_changed_or_missing_parent_is_refused_with_a_clear_error() {
    let c = build_chain(512);
    // Modify the base: its DataWriteGuid changes, so mid no longer matches.
    {
        let d = rw(&c.base);
        d.write_at(0, &[1u8; 512]).unwrap();
    }
    let e = Vhdx::open(
        &c.mid,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("does not match") && e.contains("base.vhdx"),
        "{e}"
    );
    // The whole chain above is refused too, and check reports it.
    assert!(Vhdx::open(
        &c.top,
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    )
    .is_err());
    let r = disk::ops::check(&c.top).unwrap();
    assert!(
        !r.is_clean() && r.errors[0].contains("does not match"),
        "{:?}",
        r.errors
    );
    let info = disk::ops::info(&c.mid).unwrap();
    assert!(info
        .parent
        .unwrap()
        .error
        .unwrap()
        .contains("does not match"));

    // Missing parent.
    let moved = c.mid.with_extension("moved");
    std::fs::rename(&c.mid, &moved).unwrap();
    let e = Vhdx::open(
        &c.top,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, disk::Error::MissingParent { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("not found") && msg.contains("mid.avhdx"),
        "{msg}"
    );
}

#[test]
fn merge_folds_children_into_parents() {
    let c = build_chain(512);
    let r = disk::ops::merge(&c.top, true, None).unwrap();
    assert!(r.child_removed && !c.top.exists());
    assert_eq!(
        std::fs::canonicalize(&r.parent).unwrap(),
        std::fs::canonicalize(&c.mid).unwrap()
    );
    assert!(r.bytes_merged > 0);
    assert!(read_all(&ro(&c.mid)) == c.models[2], "mid after merge");

    let done = std::cell::Cell::new((0, 0));
    let p = |d, t| done.set((d, t));
    let r = disk::ops::merge(&c.mid, false, Some(&p)).unwrap();
    assert_eq!(done.get(), (r.bytes_merged, r.bytes_merged));
    let base = ro(&c.base);
    assert!(read_all(&base) == c.models[2], "base after merge");
    // Kept child: still a valid child of the merged base, reading the same data.
    assert!(read_all(&ro(&c.mid)) == c.models[2]);
    drop(base);
    let raw = c.base.with_extension("raw");
    std::fs::write(&raw, &c.models[2]).unwrap();
    assert_qemu_check(&c.base);
    assert_qemu_compare(&c.base, &raw);

    // Merging something that is not a differencing disk is refused.
    assert!(disk::ops::merge(&c.base, false, None)
        .unwrap_err()
        .to_string()
        .contains("not a differencing"));
}

#[test]
fn flatten_a_chain_with_convert() {
    let c = build_chain(512);
    let out = c.base.with_file_name("flat.vhdx");
    let params = CreateParams {
        block_size: 1 << 20,
        ..Default::default()
    };
    disk::ops::convert(&c.top, &out, &disk::ops::ConvertTarget::Vhdx(params), None).unwrap();
    let raw = c.base.with_file_name("flat.raw");
    std::fs::write(&raw, &c.models[2]).unwrap();
    assert_qemu_check(&out);
    assert_qemu_compare(&out, &raw);
}

#[test]
fn parallel_writes_into_shared_partial_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.vhdx");
    let child = dir.path().join("c.vhdx");
    let size = 8 * MIB;
    disk::vhdx::create::create(
        &base,
        &CreateParams {
            virtual_size: size,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    Rng::new(21).fill(&mut model);
    {
        let d = rw(&base);
        d.write_at(0, &model).unwrap();
        d.close().unwrap();
    }
    disk::ops::new_differencing_vhd(&child, &base, Some(1 << 20)).unwrap();
    let d = std::sync::Arc::new(rw(&child));
    // Four threads write interleaved sectors (s % 4 == t) of the same few blocks, racing each
    // other to allocate the blocks, the bitmap block and to set bits in the same bitmap sectors.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(60 + t);
                let mut written = Vec::new();
                for _ in 0..150 {
                    let s = rng.below(3 * MIB / 512 / 4) * 4 + t;
                    d.write_at(s * 512, &[(t + 1) as u8; 512]).unwrap();
                    written.push(s);
                }
                written
            })
        })
        .collect();
    for (t, h) in threads.into_iter().enumerate() {
        for s in h.join().unwrap() {
            model[(s * 512) as usize..(s * 512 + 512) as usize].fill(t as u8 + 1);
        }
    }
    assert!(read_all(&*d) == model);
    drop(d);
    assert!(read_all(&ro(&child)) == model);
}
