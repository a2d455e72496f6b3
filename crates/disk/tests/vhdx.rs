//! VHDX read/write/unmap/resize behaviour against an in-memory model of the disk.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{assert_qemu_check, Rng, MIB};
use disk::{BlockBackend, CreateParams, OpenOptions, Vhdx, VhdxKind};

fn create(path: &Path, size: u64, kind: VhdxKind, bs: u32, lss: u32) {
    disk::vhdx::create::create(
        path,
        &CreateParams {
            virtual_size: size,
            kind,
            block_size: bs,
            logical_sector_size: lss,
            physical_sector_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
}

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

/// Random aligned writes mirrored into `model`.
fn random_writes(
    d: &dyn BlockBackend,
    model: &mut [u8],
    rng: &mut Rng,
    count: usize,
    max_len: u64,
) {
    let lss = d.logical_sector_size() as u64;
    let size = d.size();
    for _ in 0..count {
        let len = (1 + rng.below(max_len / lss)) * lss;
        let len = len.min(size);
        let off = rng.below((size - len) / lss + 1) * lss;
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        d.write_at(off, &buf).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

fn assert_matches(d: &dyn BlockBackend, model: &[u8]) {
    assert_eq!(d.size(), model.len() as u64);
    let mut buf = vec![0u8; 3 * MIB as usize];
    let mut off = 0u64;
    while off < d.size() {
        let n = (buf.len() as u64).min(d.size() - off) as usize;
        d.read_at(off, &mut buf[..n]).unwrap();
        if buf[..n] != model[off as usize..off as usize + n] {
            let i = (0..n).find(|&i| buf[i] != model[off as usize + i]).unwrap();
            panic!("mismatch at disk offset {}", off + i as u64);
        }
        off += n as u64;
    }
}

#[test]
fn round_trip_across_kinds_block_and_sector_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (VhdxKind::Dynamic, 1u32 << 20, 512u32),
        (VhdxKind::Dynamic, 8 << 20, 4096),
        (VhdxKind::Dynamic, 256 << 20, 512),
        (VhdxKind::Fixed, 2 << 20, 512),
        (VhdxKind::Fixed, 1 << 20, 4096),
    ];
    for (i, (kind, bs, lss)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("d{i}.vhdx"));
        let size = 20 * MIB + 3 * lss as u64;
        create(&p, size, kind, bs, lss);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng::new(i as u64 + 1);
        {
            let d = rw(&p);
            assert_eq!(d.logical_sector_size(), lss);
            assert_eq!(d.physical_sector_size(), 4096);
            assert_eq!(d.is_fixed(), kind == VhdxKind::Fixed);
            random_writes(&d, &mut model, &mut rng, 40, 3 * MIB);
            // The tail of the disk, which ends inside a block.
            let tail = vec![0xEEu8; 2 * lss as usize];
            d.write_at(size - tail.len() as u64, &tail).unwrap();
            model[(size as usize - tail.len())..].copy_from_slice(&tail);
            assert_matches(&d, &model);
            d.flush().unwrap();
        }
        assert_matches(&ro(&p), &model);
        {
            let d = rw(&p);
            random_writes(&d, &mut model, &mut rng, 20, MIB);
            d.close().unwrap();
        }
        assert_matches(&ro(&p), &model);
    }
}

#[test]
fn misaligned_out_of_range_and_read_only_io_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.vhdx");
    create(&p, 4 * MIB, VhdxKind::Dynamic, 1 << 20, 512);
    let d = rw(&p);
    let mut b = vec![0u8; 512];
    assert!(d
        .read_at(100, &mut b)
        .unwrap_err()
        .to_string()
        .contains("aligned"));
    assert!(d
        .write_at(0, &b[..100])
        .unwrap_err()
        .to_string()
        .contains("aligned"));
    assert!(d
        .read_at(4 * MIB, &mut b)
        .unwrap_err()
        .to_string()
        .contains("past the end"));
    assert!(d.write_at(u64::MAX - 511, &b).is_err());
    drop(d);
    let r = ro(&p);
    assert!(matches!(r.write_at(0, &b), Err(disk::Error::ReadOnly)));
    assert!(matches!(r.unmap(0, MIB), Err(disk::Error::ReadOnly)));
}

#[test]
fn unmap_releases_whole_blocks_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.vhdx");
    let size = 8 * MIB;
    create(&p, size, VhdxKind::Dynamic, 1 << 20, 512);
    let d = rw(&p);
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(7);
    rng.fill(&mut model);
    d.write_at(0, &model).unwrap();
    assert_eq!(d.allocated_bytes(), 8 * MIB);
    // From the middle of block 1 to the middle of block 4: blocks 2 and 3 are released.
    d.unmap(MIB + MIB / 2, 3 * MIB).unwrap();
    model[2 * MIB as usize..4 * MIB as usize].fill(0);
    assert_matches(&d, &model);
    assert_eq!(d.allocated_bytes(), 6 * MIB);
    // A released block can be written again.
    let buf = vec![0x42u8; 4096];
    d.write_at(2 * MIB + 8192, &buf).unwrap();
    model[(2 * MIB + 8192) as usize..(2 * MIB + 8192 + 4096) as usize].copy_from_slice(&buf);
    assert_matches(&d, &model);
    d.close().unwrap();
    drop(d);
    assert_matches(&ro(&p), &model);
    assert_qemu_check(&p);

    // Fixed disks keep their blocks: unmap changes nothing.
    let f = dir.path().join("f.vhdx");
    create(&f, 4 * MIB, VhdxKind::Fixed, 1 << 20, 512);
    let d = rw(&f);
    let data = vec![0x11u8; 4 * MIB as usize];
    d.write_at(0, &data).unwrap();
    d.unmap(0, 4 * MIB).unwrap();
    assert_matches(&d, &data);
}

#[test]
fn resize_grows_relocates_the_bat_and_shrinks_only_zero_tails() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.vhdx");
    create(&p, 10 * MIB, VhdxKind::Dynamic, 1 << 20, 512);
    let mut model = vec![0u8; 10 * MIB as usize];
    let mut rng = Rng::new(3);
    {
        let d = rw(&p);
        random_writes(&d, &mut model, &mut rng, 10, MIB);
        d.resize(30 * MIB).unwrap();
        model.resize(30 * MIB as usize, 0);
        assert_matches(&d, &model);
        let buf = vec![0x77u8; MIB as usize];
        d.write_at(29 * MIB, &buf).unwrap();
        model[29 * MIB as usize..].copy_from_slice(&buf);
        // Data past 20 MiB: shrinking to 20 MiB must be refused and change nothing.
        let e = d.resize(20 * MIB).unwrap_err().to_string();
        assert!(e.contains("holds data"), "{e}");
        assert_matches(&d, &model);
        d.unmap(20 * MIB, 10 * MIB).unwrap();
        model[20 * MIB as usize..].fill(0);
        d.resize(20 * MIB).unwrap();
        model.truncate(20 * MIB as usize);
        assert_matches(&d, &model);
        d.close().unwrap();
    }
    assert_matches(&ro(&p), &model);
    assert_qemu_check(&p);

    // Growing past what the 1 MiB BAT region can describe moves the BAT to the end of the file.
    {
        let d = rw(&p);
        d.resize(200 << 30).unwrap();
        let buf = vec![0x99u8; 4096];
        d.write_at((200 << 30) - 4096, &buf).unwrap();
        d.close().unwrap();
    }
    {
        let d = ro(&p);
        assert_eq!(d.size(), 200 << 30);
        let mut b = vec![0u8; 4096];
        d.read_at((200 << 30) - 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0x99));
        let mut head = vec![0u8; model.len()];
        d.read_at(0, &mut head).unwrap();
        assert!(head == model, "data before the old end changed");
    }
    assert_qemu_check(&p);
    let (ok, out) = common::qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert!(
        ok && out.contains(&format!("\"virtual-size\": {}", 200u64 << 30)),
        "{out}"
    );

    // Fixed disks get their new blocks allocated.
    let f = dir.path().join("f.vhdx");
    create(&f, 4 * MIB, VhdxKind::Fixed, 1 << 20, 512);
    {
        let d = rw(&f);
        d.resize(9 * MIB).unwrap();
        assert_eq!(d.allocated_bytes(), 9 * MIB);
        d.close().unwrap();
    }
    assert_eq!(ro(&f).size(), 9 * MIB);
    assert_qemu_check(&f);
}

#[test]
fn parallel_writers_and_readers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhdx");
    let size = 32 * MIB;
    create(&p, size, VhdxKind::Dynamic, 1 << 20, 512);
    let d = Arc::new(rw(&p));
    // Eight threads; thread t writes sectors s with s % 8 == t, so every thread races the others
    // to allocate the same blocks, but no two threads write the same sector.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut buf = vec![0u8; 512];
                for i in 0..400u64 {
                    let s = (rng.below(size / 512 / 8)) * 8 + t;
                    buf.fill((s % 251) as u8 + 1);
                    d.write_at(s * 512, &buf).unwrap();
                    if i % 50 == 0 {
                        let mut r = vec![0u8; 64 * 1024];
                        d.read_at(rng.below(size / 65536) * 65536, &mut r).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    d.flush().unwrap();
    // Every sector is either untouched (zero) or holds its own fill value.
    let check = |d: &dyn BlockBackend| {
        let mut all = vec![0u8; size as usize];
        d.read_at(0, &mut all).unwrap();
        let mut written = 0;
        for (s, sec) in all.chunks(512).enumerate() {
            let want = (s as u64 % 251) as u8 + 1;
            assert!(
                sec.iter().all(|&b| b == 0) || sec.iter().all(|&b| b == want),
                "sector {s}"
            );
            written += (sec[0] != 0) as usize;
        }
        written
    };
    let w = check(&*d);
    assert!(w > 2000, "only {w} sectors written");
    drop(d);
    assert_eq!(check(&ro(&p)), w);
    assert_qemu_check(&p);
}

#[test]
fn format_detection_refuses_disguised_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("x.vhdx");
    create(&v, 4 * MIB, VhdxKind::Dynamic, 1 << 20, 512);
    assert_eq!(disk::detect_format(&v).unwrap(), disk::DiskFormat::Vhdx);
    let d = disk::open_disk(&v, true).unwrap();
    assert_eq!(d.size(), 4 * MIB);

    // A raw disk whose guest wrote "vhdxfile" at LBA 0 must not be parsed as VHDX.
    let img = dir.path().join("guest.img");
    std::fs::copy(&v, &img).unwrap();
    let e = disk::open_disk(&img, true).err().unwrap().to_string();
    assert!(e.contains("not named .vhdx"), "{e}");
    let raw = disk::open_disk_as(&img, disk::DiskFormat::Raw, true).unwrap();
    assert_eq!(raw.size(), std::fs::metadata(&img).unwrap().len());

    // Plain raw file: raw, with a sector-rounded size and zero-filled tail.
    let r = dir.path().join("plain.raw");
    std::fs::write(&r, vec![0xABu8; 1000]).unwrap();
    let d = disk::open_disk(&r, false).unwrap();
    assert_eq!(d.size(), 1024);
    let mut b = vec![0u8; 1024];
    d.read_at(0, &mut b).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0xAB) && b[1000..].iter().all(|&x| x == 0));
    assert_eq!(d.disk_id(), disk::open_disk(&r, true).unwrap().disk_id());

    // A .vhdx name without the signature is an error, not a raw disk.
    let fake = dir.path().join("fake.vhdx");
    std::fs::write(&fake, vec![0u8; 2 << 20]).unwrap();
    let e = disk::open_disk(&fake, true).err().unwrap().to_string();
    assert!(e.contains("vhdxfile"), "{e}");
}

#[test]
fn raw_files_and_block_devices() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("disk.img");
    std::fs::File::create(&r).unwrap().set_len(8 * MIB).unwrap();
    let d = disk::open_disk(&r, false).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    let mut rng = Rng::new(11);
    random_writes(&*d, &mut model, &mut rng, 20, MIB);
    d.unmap(2 * MIB, MIB).unwrap();
    model[2 * MIB as usize..3 * MIB as usize].fill(0);
    d.flush().unwrap();
    assert_matches(&*d, &model);
    drop(d);

    // A host block device through a loop device, when this machine lets us make one.
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", r.to_str().unwrap()])
        .output();
    let Some(out) = out.ok().filter(|o| o.status.success()) else {
        eprintln!("losetup unavailable: block-device path not exercised");
        return;
    };
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            disk::detect_format(Path::new(&dev)).unwrap(),
            disk::DiskFormat::Raw
        );
        let d = disk::open_disk(Path::new(&dev), false).unwrap();
        assert_eq!(d.size(), 8 * MIB);
        assert_eq!(d.logical_sector_size(), 512);
        assert_matches(&*d, &model);
        let buf = vec![0x5Au8; 4096];
        d.write_at(4096, &buf).unwrap();
        d.flush().unwrap();
    });
    let _ = std::process::Command::new("losetup")
        .args(["-d", &dev])
        .status();
    result.unwrap();
    let f = std::fs::read(&r).unwrap();
    assert!(f[4096..8192].iter().all(|&x| x == 0x5A));
}
