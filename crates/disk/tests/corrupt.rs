//! Corrupt and truncated images are refused with one clear error, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{qemu_img, Rng, MIB};
use disk::vhdx::format::{self, Region, RegionTable};
use disk::{BlockBackend, CreateParams, OpenOptions, Vhdx, VhdxKind};

const BAT: u64 = 3 * MIB; // where our creator puts the BAT (after a 1 MiB log and metadata)
const META: u64 = 2 * MIB;

fn base_image(dir: &Path) -> PathBuf {
    let p = dir.join("base.vhdx");
    disk::vhdx::create::create(
        &p,
        &CreateParams {
            virtual_size: 8 * MIB,
            kind: VhdxKind::Dynamic,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let d = Vhdx::open(&p, OpenOptions::default()).unwrap();
    d.write_at(0, &vec![0x5Au8; 3 * MIB as usize]).unwrap();
    d.close().unwrap();
    p
}

fn copy(base: &Path, name: &str) -> PathBuf {
    let p = base.with_file_name(name);
    std::fs::copy(base, &p).unwrap();
    p
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn read(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn set_bat(p: &Path, index: u64, entry: u64) {
    patch(p, BAT + index * 8, &entry.to_le_bytes());
}

fn set_regions(p: &Path, regions: &[Region]) {
    let t = RegionTable::build(regions);
    for off in format::REGION_TABLE_OFFSETS {
        patch(p, off, &t);
    }
}

fn regions() -> Vec<Region> {
    vec![
        Region {
            guid: format::REGION_BAT,
            offset: BAT,
            length: MIB,
            required: true,
        },
        Region {
            guid: format::REGION_METADATA,
            offset: META,
            length: MIB,
            required: true,
        },
    ]
}

/// Opens read-only and read-write; both must fail with a message containing `want`, and
/// `check` must report it as an error.
fn assert_refused(p: &Path, want: &str) {
    for read_only in [true, false] {
        let e = Vhdx::open(
            p,
            OpenOptions {
                read_only,
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("{} opened (read_only={read_only})", p.display()))
        .to_string();
        assert!(e.contains(want), "expected {want:?}, got: {e}");
        assert!(
            e.contains(p.to_str().unwrap()),
            "error does not name the file: {e}"
        );
        assert!(!e.contains('\n'), "error is not one line: {e}");
    }
    let r = disk::ops::check(p).unwrap();
    assert!(
        !r.is_clean(),
        "check found nothing wrong in {}",
        p.display()
    );
}

#[test]
fn structural_corruptions_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());

    let p = copy(&base, "hdr.vhdx");
    for off in format::HEADER_OFFSETS {
        patch(&p, off + 100, &[0xFF]);
    }
    assert_refused(&p, "both headers are invalid");

    // One bad header copy is survivable (that is what the second copy is for), and reported.
    let p = copy(&base, "hdr1.vhdx");
    patch(&p, format::HEADER_OFFSETS[0] + 100, &[0xFF]);
    let d = Vhdx::open(
        &p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = vec![0u8; 512];
    d.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x5A));
    let r = disk::ops::check(&p).unwrap();
    assert!(
        r.is_clean() && r.warnings.iter().any(|w| w.contains("header 1")),
        "{r:?}"
    );

    let p = copy(&base, "regi.vhdx");
    for off in format::REGION_TABLE_OFFSETS {
        patch(&p, off + 40, &[0x12]);
    }
    assert_refused(&p, "both region tables are invalid");

    let p = copy(&base, "bat-eof.vhdx");
    set_bat(
        &p,
        5,
        format::bat_entry(format::PAYLOAD_BLOCK_FULLY_PRESENT, 1000 * MIB),
    );
    assert_refused(&p, "BAT entry 5 points past the end of the file");
    // QEMU agrees this image is broken (so our qemu-img checks elsewhere are meaningful).
    assert!(!qemu_img(&["check", "-f", "vhdx", p.to_str().unwrap()]).0);

    let p = copy(&base, "bat-dup.vhdx");
    let e0 = u64::from_le_bytes(read(&p, BAT, 8).try_into().unwrap());
    set_bat(&p, 4, e0);
    assert_refused(&p, "overlapping blocks");

    let p = copy(&base, "bat-meta.vhdx");
    set_bat(
        &p,
        4,
        format::bat_entry(format::PAYLOAD_BLOCK_FULLY_PRESENT, META),
    );
    assert_refused(&p, "overlaps the metadata region");

    let p = copy(&base, "bat-hdr.vhdx");
    set_bat(
        &p,
        4,
        format::bat_entry(format::PAYLOAD_BLOCK_FULLY_PRESENT, 0),
    );
    assert_refused(&p, "header section");

    let p = copy(&base, "bat-state.vhdx");
    set_bat(
        &p,
        6,
        format::bat_entry(format::PAYLOAD_BLOCK_PARTIALLY_PRESENT, 40 * MIB),
    );
    assert_refused(&p, "invalid state 7");

    let p = copy(&base, "bat-reserved.vhdx");
    set_bat(&p, 6, 1 << 10);
    assert_refused(&p, "reserved bits");

    let p = copy(&base, "overlap.vhdx");
    let mut r = regions();
    r[1].offset = BAT; // metadata region on top of the BAT
    set_regions(&p, &r);
    assert_refused(&p, "overlap");

    let p = copy(&base, "region-log.vhdx");
    let mut r = regions();
    r[0].offset = MIB; // BAT on top of the log
    set_regions(&p, &r);
    assert_refused(&p, "the log and the BAT region overlap");

    let p = copy(&base, "region-eof.vhdx");
    let mut r = regions();
    r[0].offset = 512 * MIB;
    set_regions(&p, &r);
    assert_refused(
        &p,
        "BAT region (offset 536870912, 1048576 bytes) lies past the end of the file",
    );

    let p = copy(&base, "unknown-region.vhdx");
    let mut r = regions();
    r.push(Region {
        guid: disk::Guid::new_random(),
        offset: 100 * MIB,
        length: MIB,
        required: true,
    });
    set_regions(&p, &r);
    assert_refused(&p, "unknown required region");

    let p = copy(&base, "no-bat.vhdx");
    set_regions(&p, &regions()[1..]);
    assert_refused(&p, "no BAT region");
}

#[test]
fn truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    for (len, want) in [
        (100 * 1024u64, "shorter than the 1 MiB header section"),
        (MIB + MIB / 2, "lies past the end of the file"),
        (4 * MIB + 4096, "points past the end of the file"),
    ] {
        let p = copy(&base, &format!("t{len}.vhdx"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len)
            .unwrap();
        assert_refused(&p, want);
    }
    let p = copy(&base, "empty.vhdx");
    std::fs::write(&p, b"").unwrap();
    assert_refused(&p, "shorter than");
}

/// Rewrites one metadata item's bytes in place (the metadata region has no checksum).
fn patch_item(p: &Path, id: disk::Guid, bytes: &[u8]) {
    let table = read(p, META, 64 * 1024);
    let n = u16::from_le_bytes([table[10], table[11]]) as usize;
    for i in 0..n {
        let e = &table[32 + i * 32..64 + i * 32];
        if e[..16] == id.0 {
            let off = u32::from_le_bytes(e[16..20].try_into().unwrap()) as u64;
            patch(p, META + off, bytes);
            return;
        }
    }
    panic!("item {id} not found");
}

#[test]
fn bad_metadata_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());

    let p = copy(&base, "bs.vhdx");
    patch_item(
        &p,
        format::META_FILE_PARAMETERS,
        &(3u32 << 20).to_le_bytes(),
    );
    assert_refused(&p, "block size 3145728 is not a power of two");

    let p = copy(&base, "lss.vhdx");
    patch_item(&p, format::META_LOGICAL_SECTOR_SIZE, &1024u32.to_le_bytes());
    assert_refused(&p, "logical sector size 1024");

    let p = copy(&base, "size.vhdx");
    patch_item(
        &p,
        format::META_VIRTUAL_DISK_SIZE,
        &(1u64 << 50).to_le_bytes(),
    );
    assert_refused(&p, "over 64 TiB");

    // Claims a parent but has no locator.
    let p = copy(&base, "parent.vhdx");
    let mut fp = (1u32 << 20).to_le_bytes().to_vec();
    fp.extend_from_slice(&2u32.to_le_bytes());
    patch_item(&p, format::META_FILE_PARAMETERS, &fp);
    assert_refused(&p, "parent locator metadata item is missing");

    let p = copy(&base, "sig.vhdx");
    patch(&p, META, b"metadatX");
    assert_refused(&p, "metadata table signature");

    // An unknown item marked required.
    let p = copy(&base, "unknown-item.vhdx");
    let table = read(&p, META, 64 * 1024);
    let n = u16::from_le_bytes([table[10], table[11]]) as usize;
    let mut e = table[32..64].to_vec();
    e[..16].copy_from_slice(&disk::Guid::new_random().0);
    e[16..24].fill(0); // empty item: offset 0, length 0
    patch(&p, META + 32 + n as u64 * 32, &e);
    patch(&p, META + 10, &((n + 1) as u16).to_le_bytes());
    assert_refused(&p, "unknown required metadata item");
}

#[test]
fn hostile_logs_are_refused_and_dirty_logs_need_a_writer() {
    use disk::vhdx::log::{build_entry, EntryParams};
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let guid = disk::Guid::new_random();
    let set_log_guid = |p: &Path| {
        let (mut h, slot) = {
            let st = disk::FileStorage::new(std::fs::File::open(p).unwrap()).unwrap();
            format::read_headers(&st, std::fs::metadata(p).unwrap().len()).unwrap()
        };
        h.log_guid = guid;
        h.sequence_number += 1;
        patch(p, format::HEADER_OFFSETS[1 - slot], &h.to_sector());
    };
    let params = |seq| EntryParams {
        guid,
        seq,
        tail: 0,
        flushed_file_offset: 4 * MIB,
        last_file_offset: 8 * MIB,
    };

    // A log entry aimed at the headers.
    let p = copy(&base, "log-hdr.vhdx");
    let e = build_entry(&params(1), &[(64 * 1024, &[0u8; 4096])]);
    patch(&p, MIB, &e);
    set_log_guid(&p);
    let err = Vhdx::open(&p, OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("would overwrite the file identifier, a header or the log"),
        "{err}"
    );

    // A log that claims the file was larger than it is: truncated.
    let p = copy(&base, "log-trunc.vhdx");
    let mut pp = params(1);
    pp.flushed_file_offset = 900 * MIB;
    patch(&p, MIB, &build_entry(&pp, &[(BAT, &[0u8; 4096])]));
    set_log_guid(&p);
    let err = Vhdx::open(&p, OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");

    // A legitimate unapplied entry (it writes a BAT sector that marks block 7 present):
    // read-only opens refuse, a read-write open replays it.
    let p = copy(&base, "log-dirty.vhdx");
    let mut sector = read(&p, BAT, 4096);
    sector[7 * 8..8 * 8].copy_from_slice(
        &format::bat_entry(format::PAYLOAD_BLOCK_FULLY_PRESENT, 7 * MIB).to_le_bytes(),
    );
    patch(&p, MIB, &build_entry(&params(1), &[(BAT, &sector)]));
    set_log_guid(&p);
    let err = Vhdx::open(
        &p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, disk::Error::LogReplayNeeded { .. }), "{err}");
    assert!(disk::ops::info(&p).is_err());
    assert!(disk::ops::check(&p)
        .unwrap()
        .warnings
        .iter()
        .any(|w| w.contains("not applied")));
    {
        let d = Vhdx::open(&p, OpenOptions::default()).unwrap();
        assert_eq!(d.block_states()[7].1, format::PAYLOAD_BLOCK_FULLY_PRESENT);
        // LastFileOffset (8 MiB) was honoured.
        assert!(std::fs::metadata(&p).unwrap().len() >= 8 * MIB);
    }
    // Replayed and closed: clean for everyone now.
    assert!(Vhdx::open(
        &p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    )
    .is_ok());
    common::assert_qemu_check(&p);
}

/// Random damage must never panic: every open either fails cleanly or yields a disk that can be
/// read (and written) without panicking.
#[test]
fn random_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let image = std::fs::read(&base).unwrap();
    let mut rng = Rng::new(1234);
    // Regions worth hitting: headers, region tables, log, metadata table and items, BAT.
    let targets = [
        (64 * 1024u64, 4096u64),
        (128 * 1024, 4096),
        (192 * 1024, 512),
        (MIB, 8192),
        (META, 512),
        (META + 64 * 1024, 256),
        (BAT, 256),
    ];
    let mut opened = 0;
    for i in 0..300 {
        let mut img = image.clone();
        for _ in 0..1 + rng.below(4) {
            let (s, l) = targets[rng.below(targets.len() as u64) as usize];
            let at = (s + rng.below(l)) as usize;
            img[at] = rng.next() as u8;
        }
        // Sometimes repair the header checksum so the damage gets past the CRC.
        if i % 3 == 0 {
            for off in format::HEADER_OFFSETS {
                let o = off as usize;
                let crc = format::crc32c_with_zeroed_field(&img[o..o + 4096], 4);
                img[o + 4..o + 8].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let read_only = i % 2 == 0;
        let st = std::sync::Arc::new(disk::MemStorage::new(img, 64 * MIB));
        let opts = OpenOptions {
            read_only,
            parent: disk::ParentMode::Zeros,
            ..Default::default()
        };
        if let Ok(d) = Vhdx::open_storage(st, None, opts) {
            opened += 1;
            let mut b = vec![0u8; MIB as usize];
            let mut off = 0;
            while off + b.len() as u64 <= d.size() {
                let _ = d.read_at(off, &mut b);
                off += b.len() as u64;
            }
            if !read_only && d.size() >= 8192 {
                let _ = d.write_at(d.size() - 8192, &[7u8; 8192]);
                let _ = d.unmap(0, d.size());
            }
        }
    }
    assert!(
        opened > 0,
        "no damaged image opened at all: the damage is too coarse to test reads"
    );
}
