//! The CLI-verb library functions: new, info, check, resize on raw and VHDX.

mod common;

use common::{assert_qemu_check, MIB};
use disk::ops::{self, VhdType};
use disk::{CreateParams, DiskFormat, VhdxKind};

#[test]
fn new_info_check_resize() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("f.vhdx");
    let seen = std::cell::Cell::new(None);
    let progress = |d: u64, t: u64| seen.set(Some((d, t)));
    let p = CreateParams {
        virtual_size: 10 * MIB,
        kind: VhdxKind::Fixed,
        block_size: 2 << 20,
        logical_sector_size: 4096,
        physical_sector_size: 4096,
        ..Default::default()
    };
    ops::new_vhd(&fixed, &p, Some(&progress)).unwrap();
    assert_eq!(seen.get(), Some((10 * MIB, 10 * MIB)));
    // Creating over an existing file is refused and leaves it alone.
    assert!(ops::new_vhd(&fixed, &p, None).is_err());
    let i = ops::info(&fixed).unwrap();
    assert_eq!(i.format, DiskFormat::Vhdx);
    assert_eq!(i.vhd_type, Some(VhdType::Fixed));
    assert_eq!(
        (i.virtual_size, i.block_size, i.logical_sector_size),
        (10 * MIB, Some(2 << 20), 4096)
    );
    assert_eq!(i.allocated_bytes, 10 * MIB);
    assert!(i.file_size >= 10 * MIB + 4 * MIB);
    assert!(i.parent.is_none() && !i.log_needs_replay);
    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["vhd_type"], "fixed");
    assert_eq!(json["disk_id"].as_str().unwrap().len(), 36);
    assert!(ops::check(&fixed).unwrap().is_clean());

    let dynamic = dir.path().join("d.vhdx");
    ops::new_vhd(
        &dynamic,
        &CreateParams {
            virtual_size: 6 * MIB,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    {
        let d = disk::open_disk(&dynamic, false).unwrap();
        d.write_at(5 * MIB, &vec![1u8; 4096]).unwrap();
    }
    let e = ops::resize(&dynamic, 4 * MIB).unwrap_err().to_string();
    assert!(e.contains("holds data"), "{e}");
    ops::resize(&dynamic, 64 * MIB).unwrap();
    let i = ops::info(&dynamic).unwrap();
    assert_eq!(
        (i.virtual_size, i.vhd_type),
        (64 * MIB, Some(VhdType::Dynamic))
    );
    assert_eq!(i.allocated_bytes, 32 * MIB); // one 32 MiB block (Hyper-V's default size)
    assert_qemu_check(&dynamic);

    // Raw: grow, refuse to cut data, cut a zero tail.
    let raw = dir.path().join("r.img");
    std::fs::write(&raw, vec![0u8; 2 * MIB as usize]).unwrap();
    ops::resize(&raw, 4 * MIB).unwrap();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 * MIB);
    {
        let d = disk::open_disk(&raw, false).unwrap();
        d.write_at(3 * MIB, &[9u8; 512]).unwrap();
    }
    assert!(ops::resize(&raw, 2 * MIB).is_err());
    ops::resize(&raw, 3 * MIB + 512).unwrap();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 3 * MIB + 512);
    let i = ops::info(&raw).unwrap();
    assert_eq!(
        (i.format, i.virtual_size, i.vhd_type),
        (DiskFormat::Raw, 3 * MIB + 512, None)
    );
    let r = ops::check(&raw).unwrap();
    assert!(r.is_clean() && r.format == Some(DiskFormat::Raw));

    // Missing files are errors, not reports.
    assert!(ops::check(&dir.path().join("nope.vhdx")).is_err());
    assert!(ops::info(&dir.path().join("nope.vhdx")).is_err());
}
