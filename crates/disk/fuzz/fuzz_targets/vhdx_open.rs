//! Feeds arbitrary bytes to the VHDX parser as an image file held in memory: headers, region
//! table, metadata (including the parent locator), BAT and log replay. Images that open are
//! read, and (on the read-write path) written, unmapped and closed, none of which may panic.
//!
//! Inputs smaller than the 1 MiB header section are padded with zeros at the front of a
//! template image, so the fuzzer reaches past the first checks without megabyte inputs: the
//! first byte picks where the input is spliced in, whether checksums are recomputed afterwards,
//! and whether the open is read-only.
#![no_main]

use std::sync::{Arc, OnceLock};

use disk::vhdx::create::{create_in, CreateParams};
use disk::{BlockBackend, MemStorage, OpenOptions, ParentMode, Vhdx};
use libfuzzer_sys::fuzz_target;

/// A small valid dynamic image, made once, that inputs are spliced into.
fn template() -> &'static Vec<u8> {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let st = MemStorage::new(Vec::new(), 64 << 20);
        let p = CreateParams {
            virtual_size: 4 << 20,
            block_size: 1 << 20,
            ..Default::default()
        };
        create_in(&st, &p).expect("template image");
        st.contents()
    })
}

/// Recomputes the CRC-32C of both headers and both region tables.
fn reseal(img: &mut [u8]) {
    use disk::vhdx::format::{crc32c_with_zeroed_field, HEADER_OFFSETS, REGION_TABLE_OFFSETS};
    for (offs, len) in [
        (HEADER_OFFSETS, 4096usize),
        (REGION_TABLE_OFFSETS, 64 << 10),
    ] {
        for off in offs {
            let o = off as usize;
            if img.len() >= o + len {
                let crc = crc32c_with_zeroed_field(&img[o..o + len], 4);
                img[o + 4..o + 8].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // Where to splice: file identifier/headers, region tables, log, metadata, BAT.
    let at = [
        0u64,
        64 << 10,
        192 << 10,
        1 << 20,
        2 << 20,
        (2 << 20) + (64 << 10),
        3 << 20,
    ][(sel & 7) as usize % 7] as usize;
    let mut img = template().clone();
    if sel & 0x80 != 0 {
        // Whole-file mode: the input is the file.
        img = rest.to_vec();
    } else {
        let end = (at + rest.len()).min(img.len());
        img[at..end].copy_from_slice(&rest[..end - at]);
    }
    // Often re-seal the checksummed structures, so mutations get past the CRC-32C checks and
    // reach the parsers behind them.
    if sel & 0x20 != 0 {
        reseal(&mut img);
    }
    let read_only = sel & 0x40 != 0;
    let st = Arc::new(MemStorage::new(img, 64 << 20));
    let opts = OpenOptions {
        read_only,
        parent: ParentMode::Zeros,
        ..Default::default()
    };
    let Ok(d) = Vhdx::open_storage(st, None, opts) else {
        return;
    };
    let lss = d.logical_sector_size() as u64;
    let size = d.size();
    let mut buf = vec![0u8; 64 << 10];
    for off in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
        let off = off / lss * lss;
        let n = (buf.len() as u64).min(size - off) as usize;
        let _ = d.read_at(off, &mut buf[..n]);
    }
    if !read_only && size >= lss {
        let _ = d.write_at(size - lss, &vec![0xA5; lss as usize]);
        let _ = d.unmap(0, size / lss * lss);
        let _ = d.close();
    }
    let _ = d.present_ranges();
});
