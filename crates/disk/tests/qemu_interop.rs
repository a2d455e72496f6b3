//! Interoperability with QEMU, both directions: images we write pass `qemu-img check` and
//! `qemu-img compare`; images QEMU makes are read and written correctly by us.

mod common;

use std::path::Path;

use common::{assert_qemu_check, assert_qemu_compare, qemu_img, Rng, MIB};
use disk::{BlockBackend, CreateParams, OpenOptions, Vhdx, VhdxKind};

/// Writes a raw model file: random data in some 1 MiB-aligned-ish places, zeros elsewhere.
fn model_with_holes(size: u64, seed: u64) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    for _ in 0..12 {
        let len = (1 + rng.below(3 * MIB / 512)) * 512;
        let off = rng.below((size - len) / 512) * 512;
        rng.fill(&mut m[off as usize..(off + len) as usize]);
    }
    m
}

fn write_random(d: &dyn BlockBackend, model: &mut [u8], seed: u64, count: usize) {
    let mut rng = Rng::new(seed);
    let size = d.size();
    for _ in 0..count {
        let len = (1 + rng.below(2 * MIB / 512)) * 512;
        let off = rng.below((size - len) / 512 + 1) * 512;
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        d.write_at(off, &buf).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

fn read_all(d: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(0, &mut v).unwrap();
    v
}

#[test]
fn images_we_create_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (VhdxKind::Dynamic, 1u32 << 20),
        (VhdxKind::Dynamic, 32 << 20),
        (VhdxKind::Fixed, 4 << 20),
    ];
    for (i, (kind, bs)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("ours{i}.vhdx"));
        let raw = dir.path().join(format!("ours{i}.raw"));
        let size = 48 * MIB + 512;
        disk::vhdx::create::create(
            &p,
            &CreateParams {
                virtual_size: size,
                kind,
                block_size: bs,
                ..Default::default()
            },
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        {
            let d = Vhdx::open(&p, OpenOptions::default()).unwrap();
            write_random(&d, &mut model, 40 + i as u64, 30);
            let cut = (2 * bs as u64).min(32 * MIB);
            d.unmap(0, cut).unwrap();
            if kind == VhdxKind::Dynamic {
                model[..cut as usize].fill(0);
            }
            d.close().unwrap();
        }
        std::fs::write(&raw, &model).unwrap();
        assert_qemu_check(&p);
        assert_qemu_compare(&p, &raw);
        let (ok, out) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
        assert!(
            ok && out.contains(&format!("\"virtual-size\": {size}")),
            "{out}"
        );
    }
}

#[test]
fn images_qemu_creates_are_read_and_written_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("dynamic", "1M"),
        ("dynamic", "8M"),
        ("dynamic", "32M"),
        ("fixed", "2M"),
    ];
    for (i, (sub, bs)) in cases.into_iter().enumerate() {
        let size = 40 * MIB;
        let raw = dir.path().join(format!("q{i}.raw"));
        let img = dir.path().join(format!("q{i}.vhdx"));
        let mut model = model_with_holes(size, 90 + i as u64);
        std::fs::write(&raw, &model).unwrap();
        let opts = format!("subformat={sub},block_size={bs}");
        let (ok, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            &opts,
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        {
            let d = Vhdx::open(
                &img,
                OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(d.is_fixed(), sub == "fixed");
            assert!(
                read_all(&d) == model,
                "{sub} {bs}: data read differs from what qemu wrote"
            );
        }
        {
            let d = Vhdx::open(&img, OpenOptions::default()).unwrap();
            write_random(&d, &mut model, 200 + i as u64, 25);
            d.unmap(8 * MIB, 16 * MIB).unwrap();
            if sub == "dynamic" {
                let b = d.block_size() as u64;
                let (s, e) = ((8 * MIB).div_ceil(b) * b, (24 * MIB) / b * b);
                if s < e {
                    model[s as usize..e as usize].fill(0);
                }
            }
            d.close().unwrap();
        }
        std::fs::write(&raw, &model).unwrap();
        assert_qemu_check(&img);
        assert_qemu_compare(&img, &raw);
    }
}

#[test]
fn empty_qemu_images_with_bigger_logs_and_qemu_writes_after_ours() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.vhdx");
    let (ok, out) = qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=4M,log_size=2M",
        img.to_str().unwrap(),
        "24M",
    ]);
    assert!(ok, "{out}");
    let mut model = vec![0u8; 24 * MIB as usize];
    {
        let d = Vhdx::open(&img, OpenOptions::default()).unwrap();
        write_random(&d, &mut model, 5, 20);
        d.close().unwrap();
    }
    // QEMU writes on top of what we wrote; we must see both.
    let (ok, out) = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "vhdx",
            "-c",
            "write -P 0x5a 20M 1M",
            img.to_str().unwrap(),
        ])
        .output()
        .map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(ok, "{out}");
    model[20 * MIB as usize..21 * MIB as usize].fill(0x5a);
    let d = Vhdx::open(
        &img,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(read_all(&d) == model);
    let raw = dir.path().join("e.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_qemu_compare(&img, &raw);
}

#[test]
fn convert_raw_to_vhdx_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 30 * MIB + 4096;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(77);
    for (s, e) in [
        (MIB, MIB + MIB / 2),
        (17 * MIB + 4096, 19 * MIB),
        (30 * MIB, size),
    ] {
        rng.fill(&mut model[s as usize..e as usize]);
    }
    std::fs::write(&raw, &model).unwrap();
    let calls = std::cell::Cell::new(0u32);
    let last = std::cell::Cell::new((0u64, 0u64));
    let progress = |d: u64, t: u64| {
        calls.set(calls.get() + 1);
        assert!(d <= t);
        last.set((d, t));
    };
    for kind in [VhdxKind::Dynamic, VhdxKind::Fixed] {
        let v = dir.path().join(format!("{kind:?}.vhdx"));
        let params = CreateParams {
            kind,
            block_size: 2 << 20,
            ..Default::default()
        };
        disk::ops::convert(
            &raw,
            &v,
            &disk::ops::ConvertTarget::Vhdx(params),
            Some(&progress),
        )
        .unwrap();
        assert_eq!(last.get(), (size, size));
        assert_qemu_check(&v);
        assert_qemu_compare(&v, &raw);
        let info = disk::ops::info(&v).unwrap();
        assert_eq!(info.virtual_size, size);
        if kind == VhdxKind::Dynamic {
            // Zero ranges were skipped: far fewer blocks than the disk has.
            assert!(info.allocated_bytes < size / 2, "{}", info.allocated_bytes);
        }
        let back = dir.path().join(format!("{kind:?}.raw"));
        disk::ops::convert(&v, &back, &disk::ops::ConvertTarget::Raw, Some(&progress)).unwrap();
        assert!(std::fs::read(&back).unwrap() == model);
    }
    assert!(calls.get() > 30);
    // The destination must not exist already.
    let v = dir.path().join("Dynamic.vhdx");
    assert!(disk::ops::convert(&raw, &v, &disk::ops::ConvertTarget::Raw, None).is_err());
    assert!(
        Path::new(&v).exists(),
        "an existing destination must be left alone"
    );
}
