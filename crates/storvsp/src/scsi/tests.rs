//! The SCSI target, command by command, against an in-memory disk that records flushes and
//! unmaps and can be told to fail.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use disk::{BlockBackend, MemStorage, RawDisk};

use super::*;

/// An in-memory raw disk with switches.
struct TestDisk {
    inner: RawDisk,
    logical: u32,
    physical: u32,
    /// Reported size, if it should differ from the storage (huge disks).
    size: Option<u64>,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    fail_flush: AtomicBool,
    flushes: AtomicU32,
    unmaps: Mutex<Vec<(u64, u64)>>,
}

impl TestDisk {
    fn new(bytes: usize, logical: u32, physical: u32) -> Arc<Self> {
        let st = Arc::new(MemStorage::new(vec![0; bytes], bytes as u64));
        Arc::new(Self {
            inner: RawDisk::from_storage(st, false, logical, physical, [0xab; 16]).unwrap(),
            logical,
            physical,
            size: None,
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            fail_flush: AtomicBool::new(false),
            flushes: AtomicU32::new(0),
            unmaps: Mutex::new(Vec::new()),
        })
    }

    fn huge(size: u64) -> Arc<Self> {
        let mut d = Arc::into_inner(Self::new(4096, 512, 512)).unwrap();
        d.size = Some(size);
        Arc::new(d)
    }

    fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.inner.read_at(off, &mut b).unwrap();
        b
    }
}

fn io_err() -> disk::Error {
    disk::Error::io("test", std::io::Error::other("injected"))
}

impl BlockBackend for TestDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> disk::Result<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(io_err());
        }
        if self.size.is_some() {
            buf.fill(0);
            return Ok(());
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> disk::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(io_err());
        }
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> disk::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if self.fail_flush.load(Ordering::SeqCst) {
            return Err(io_err());
        }
        Ok(())
    }
    fn unmap(&self, offset: u64, len: u64) -> disk::Result<()> {
        self.unmaps.lock().unwrap().push((offset, len));
        Ok(())
    }
    fn size(&self) -> u64 {
        self.size.unwrap_or_else(|| self.inner.size())
    }
    fn logical_sector_size(&self) -> u32 {
        self.logical
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical
    }
    fn read_only(&self) -> bool {
        false
    }
    fn disk_id(&self) -> [u8; 16] {
        [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0, 1, 2, 3, 4, 5, 6, 7,
        ]
    }
}

const MIB: usize = 1 << 20;

fn lun(d: &Arc<TestDisk>, read_only: bool, unmap: bool) -> ScsiDisk {
    ScsiDisk::new(d.clone(), read_only, unmap, 64 << 10).unwrap()
}

fn no_luns() -> Vec<u8> {
    vec![0, 3, 7]
}

/// Run `cdb` with a zeroed data-in buffer of `len` bytes; returns the outcome and the data.
fn run_in(d: Option<&ScsiDisk>, cdb: &[u8], len: usize) -> (Outcome, Vec<u8>) {
    let buf = VecBuffer::zeroed(len);
    let o = execute(cdb, d, &no_luns, &buf, &mut Scratch::default());
    let mut data = buf.take();
    data.truncate(o.transferred);
    (o, data)
}

/// Run `cdb` with `data` as data-out.
fn run_out(d: Option<&ScsiDisk>, cdb: &[u8], data: &[u8]) -> Outcome {
    let buf = VecBuffer::from_vec(data.to_vec());
    execute(cdb, d, &no_luns, &buf, &mut Scratch::default())
}

fn err(o: Outcome) -> Sense {
    assert_eq!(o.transferred, 0, "an error transfers nothing");
    o.sense.expect("CHECK CONDITION expected")
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn standard_inquiry_present_and_absent() {
    let d = TestDisk::new(MIB, 512, 4096);
    let l = lun(&d, false, true);
    let (o, data) = run_in(Some(&l), &[0x12, 0, 0, 0, 96, 0], 255);
    assert_eq!(o.sense, None);
    assert_eq!(data.len(), 36);
    assert_eq!(data[0], 0x00); // disk, connected
    assert_eq!(data[2], 0x06);
    assert_eq!(data[4] as usize + 5, 36);
    assert_eq!(&data[8..16], b"Msft    ");
    assert_eq!(&data[16..32], b"Virtual Disk    ");
    assert_ne!(data[7] & 0x02, 0, "CMDQUE");
    // Truncated to the allocation length, and to the buffer.
    assert_eq!(run_in(Some(&l), &[0x12, 0, 0, 0, 5, 0], 255).1.len(), 5);
    assert_eq!(run_in(Some(&l), &[0x12, 0, 0, 0, 96, 0], 10).1.len(), 10);
    // No LUN: GOOD, peripheral qualifier 3 (Linux skips it).
    let (o, data) = run_in(None, &[0x12, 0, 0, 0, 36, 0], 36);
    assert_eq!(o.sense, None);
    assert_eq!(data[0], 0x7f);
}

fn vpd(l: Option<&ScsiDisk>, page: u8) -> (Outcome, Vec<u8>) {
    run_in(l, &[0x12, 1, page, 1, 0, 0], 256)
}

#[test]
fn vpd_pages() {
    let d = TestDisk::new(MIB, 512, 4096);
    let l = lun(&d, false, true);
    let (o, p) = vpd(Some(&l), 0x00);
    assert_eq!(o.sense, None);
    assert_eq!(&p[..4], &[0, 0, 0, 6]);
    assert_eq!(&p[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    // Serial: the disk id in hex.
    let (_, p) = vpd(Some(&l), 0x80);
    assert_eq!(p[1], 0x80);
    assert_eq!(&p[4..], b"0123456789ABCDEF0001020304050607");
    // Device identification: NAA 3 (binary) then T10 vendor id (ASCII).
    let (_, p) = vpd(Some(&l), 0x83);
    assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len() - 4);
    assert_eq!(&p[4..8], &[0x01, 0x03, 0, 8]);
    assert_eq!(p[8] >> 4, 3);
    assert_eq!(&p[8..16], &l.naa());
    assert_eq!(&p[16..20], &[0x02, 0x01, 0, 40]);
    assert_eq!(&p[20..28], b"Msft    ");
    assert_eq!(&p[28..60], b"0123456789ABCDEF0001020304050607");
    // A different disk id gives a different NAA.
    let other = ScsiDisk::new(
        Arc::new(
            RawDisk::from_storage(
                Arc::new(MemStorage::new(vec![0; 4096], 4096)),
                false,
                512,
                512,
                [1; 16],
            )
            .unwrap(),
        ),
        false,
        true,
        4096,
    )
    .unwrap();
    assert_ne!(other.naa(), l.naa());
    // Block limits: 64 KiB / 512 = 128 blocks; unmap limits; granularity 8 (4 KiB).
    let (_, p) = vpd(Some(&l), 0xb0);
    assert_eq!(p.len(), 64);
    assert_eq!(p[4] & 1, 1, "WSNZ");
    assert_eq!(u16::from_be_bytes([p[6], p[7]]), 8);
    assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 128);
    assert_eq!(
        u32::from_be_bytes(p[20..24].try_into().unwrap()),
        (MAX_UNMAP_BYTES / 512) as u32
    );
    assert_eq!(
        u32::from_be_bytes(p[24..28].try_into().unwrap()),
        MAX_UNMAP_DESCRIPTORS
    );
    assert_eq!(u32::from_be_bytes(p[28..32].try_into().unwrap()), 8);
    assert_eq!(
        u64::from_be_bytes(p[36..44].try_into().unwrap()),
        MAX_WRITE_SAME_BYTES / 512
    );
    // Block device characteristics: non-rotating.
    let (_, p) = vpd(Some(&l), 0xb1);
    assert_eq!(u16::from_be_bytes([p[4], p[5]]), 1);
    // Logical block provisioning: LBPU, no LBPRZ, thin.
    let (_, p) = vpd(Some(&l), 0xb2);
    assert_eq!(p[5], 0x80);
    assert_eq!(p[6] & 7, 2);
    // Without unmap: no LBPU, no unmap limits.
    let l2 = lun(&d, false, false);
    assert_eq!(vpd(Some(&l2), 0xb2).1[5], 0);
    assert_eq!(&vpd(Some(&l2), 0xb0).1[20..28], &[0; 8]);
    // Unknown page; absent LUN; allocation length.
    assert_eq!(err(vpd(Some(&l), 0x99).0), Sense::INVALID_FIELD_IN_CDB);
    assert_eq!(err(vpd(None, 0x80).0), Sense::LUN_NOT_SUPPORTED);
    assert_eq!(run_in(Some(&l), &[0x12, 1, 0x80, 0, 8, 0], 256).1.len(), 8);
}

#[test]
fn report_luns() {
    let c = [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
    let (o, p) = run_in(None, &c, 256);
    assert_eq!(o.sense, None);
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 24);
    assert_eq!(&p[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&p[16..24], &[0, 3, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&p[24..32], &[0, 7, 0, 0, 0, 0, 0, 0]);
    // Well-known LUNs only: none.
    let mut w = c;
    w[2] = 1;
    let (_, p) = run_in(None, &w, 256);
    assert_eq!(p, vec![0; 8]);
    w[2] = 0x40;
    assert_eq!(err(run_in(None, &w, 256).0), Sense::INVALID_FIELD_IN_CDB);
    // Allocation length 16: the header and the first entry.
    let mut s = c;
    s[9] = 16;
    s[8] = 0;
    assert_eq!(run_in(None, &s, 256).1.len(), 16);
}

#[test]
fn unit_ready_start_stop_and_missing_lun() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    assert_eq!(run_in(Some(&l), &[0, 0, 0, 0, 0, 0], 0).0, Outcome::good(0));
    assert_eq!(
        run_in(Some(&l), &[0x1b, 0, 0, 0, 1, 0], 0).0,
        Outcome::good(0)
    );
    assert_eq!(
        run_in(Some(&l), &[0x1e, 0, 0, 0, 0, 0], 0).0,
        Outcome::good(0)
    );
    for cdb in [
        &[0u8, 0, 0, 0, 0, 0][..],
        &rw10(0x28, 0, 1),
        &rw10(0x2a, 0, 1),
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_eq!(
            err(run_in(None, cdb, 512).0),
            Sense::LUN_NOT_SUPPORTED,
            "{cdb:x?}"
        );
    }
}

#[test]
fn read_capacity_10_and_16() {
    let d = TestDisk::new(8 * MIB, 4096, 4096);
    let l = lun(&d, false, true);
    let (o, p) = run_in(Some(&l), &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(o, Outcome::good(8));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), 2047);
    assert_eq!(u32::from_be_bytes(p[4..].try_into().unwrap()), 4096);
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let (o, p) = run_in(Some(&l), &c, 32);
    assert_eq!(o, Outcome::good(32));
    assert_eq!(u64::from_be_bytes(p[..8].try_into().unwrap()), 2047);
    assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 4096);
    assert_eq!(p[13] & 0xf, 0);
    assert_eq!(p[14] & 0xc0, 0x80, "LBPME, no LBPRZ");
    // 512e: 512-byte logical, 4 KiB physical → exponent 3; no unmap → no LBPME.
    let d = TestDisk::new(MIB, 512, 4096);
    let (_, p) = run_in(Some(&lun(&d, false, false)), &c, 32);
    assert_eq!(p[13] & 0xf, 3);
    assert_eq!(p[14] & 0x80, 0);
    // A disk beyond 2^32 blocks: READ CAPACITY(10) says "use (16)".
    let h = TestDisk::huge(3 << 40);
    let hl = lun(&h, false, true);
    let (_, p) = run_in(Some(&hl), &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(&p[..4], &[0xff; 4]);
    let (_, p) = run_in(Some(&hl), &c, 32);
    assert_eq!(
        u64::from_be_bytes(p[..8].try_into().unwrap()),
        (3 << 40) / 512 - 1
    );
    // Allocation length 12: truncated.
    c[13] = 12;
    assert_eq!(run_in(Some(&hl), &c, 32).1.len(), 12);
}

#[test]
fn write_then_read_every_cdb_size() {
    let d = TestDisk::new(MIB, 512, 4096);
    let l = ScsiDisk::new(d.clone(), false, true, 1 << 20).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    // WRITE(10) 8 blocks at LBA 16.
    assert_eq!(
        run_out(Some(&l), &rw10(0x2a, 16, 8), &data),
        Outcome::good(4096)
    );
    assert_eq!(d.bytes(16 * 512, 4096), data);
    // READ(16) back.
    let (o, p) = run_in(Some(&l), &rw16(0x88, 16, 8), 4096);
    assert_eq!(o, Outcome::good(4096));
    assert_eq!(p, data);
    // READ(6) with a larger buffer: only the blocks asked for.
    let (o, p) = run_in(Some(&l), &[0x08, 0, 0, 17, 2, 0], 8192);
    assert_eq!(o.transferred, 1024);
    assert_eq!(p, data[512..1536]);
    // WRITE(6) with length 0 = 256 blocks; WRITE(16) with FUA flushes.
    let big = vec![0x5au8; 256 * 512];
    assert_eq!(
        run_out(Some(&l), &[0x0a, 0, 1, 0, 0, 0], &big),
        Outcome::good(big.len())
    );
    assert_eq!(d.bytes(256 * 512, big.len()), big);
    let before = d.flushes.load(Ordering::SeqCst);
    let mut c = rw16(0x8a, 0, 1);
    c[1] = 0x08;
    assert_eq!(run_out(Some(&l), &c, &data[..512]), Outcome::good(512));
    assert_eq!(d.flushes.load(Ordering::SeqCst), before + 1);
    // Zero blocks: nothing moves, GOOD.
    assert_eq!(run_in(Some(&l), &rw10(0x28, 5, 0), 0).0, Outcome::good(0));
}

#[test]
fn ranges_limits_and_buffers() {
    let d = TestDisk::new(MIB, 512, 512); // 2048 blocks
    let l = lun(&d, false, true);
    // Out of range: past the end, ending past the end, overflowing.
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x28, 2048, 1), 512).0),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x28, 2047, 2), 1024).0),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        err(run_in(Some(&l), &rw16(0x88, u64::MAX, 1), 512).0),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x28, 2049, 0), 0).0),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x2a, 2047, 2), &[0; 1024])),
        Sense::LBA_OUT_OF_RANGE
    );
    // Last block is fine.
    assert_eq!(
        run_in(Some(&l), &rw10(0x28, 2047, 1), 512).0,
        Outcome::good(512)
    );
    // Transfer above the 64 KiB limit (129 blocks).
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x28, 0, 129), 129 * 512).0),
        Sense::INVALID_FIELD_IN_CDB
    );
    // Buffer shorter than the transfer.
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x28, 0, 2), 1000).0),
        Sense::BAD_DATA_BUFFER
    );
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x2a, 0, 2), &[1; 600])),
        Sense::BAD_DATA_BUFFER
    );
    assert_eq!(d.bytes(0, 1024), vec![0; 1024], "nothing written");
    // VERIFY checks the range only.
    assert_eq!(run_in(Some(&l), &rw10(0x2f, 0, 100), 0).0, Outcome::good(0));
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x2f, 2000, 100), 0).0),
        Sense::LBA_OUT_OF_RANGE
    );
    // Truncated CDB, unknown opcode, protection information asked for.
    assert_eq!(
        err(run_in(Some(&l), &[0x28, 0, 0, 0], 512).0),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        err(run_in(Some(&l), &[0xc5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 512).0),
        Sense::INVALID_OPCODE
    );
    assert_eq!(
        err(run_in(Some(&l), &[0x3b, 0, 0, 0, 0, 0, 0, 0, 0, 0], 512).0),
        Sense::INVALID_OPCODE
    );
    let mut c = rw10(0x28, 0, 1);
    c[1] = 0x20;
    assert_eq!(
        err(run_in(Some(&l), &c, 512).0),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn read_only_lun_refuses_every_write() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, true, true);
    assert!(l.read_only() && !l.unmap());
    let data = vec![0xeeu8; 512];
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x2a, 0, 1), &data)),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        err(run_out(Some(&l), &[0x0a, 0, 0, 0, 1, 0], &data)),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        err(run_out(Some(&l), &rw16(0x8a, 0, 1), &data)),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        err(run_out(Some(&l), &rw16(0x93, 0, 1), &data)),
        Sense::WRITE_PROTECTED
    );
    let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(
        err(run_out(Some(&l), &unmap, &[0; 24])),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(d.bytes(0, 512), vec![0; 512]);
    assert!(d.unmaps.lock().unwrap().is_empty());
    // Reads work; MODE SENSE shows write protection.
    assert_eq!(
        run_in(Some(&l), &rw10(0x28, 0, 1), 512).0,
        Outcome::good(512)
    );
    let (_, p) = run_in(Some(&l), &[0x1a, 0, 0x08, 0, 255, 0], 255);
    assert_eq!(p[2] & 0x80, 0x80);
    let (_, p) = run_in(
        Some(&lun(&d, false, true)),
        &[0x1a, 0, 0x08, 0, 255, 0],
        255,
    );
    assert_eq!(p[2] & 0x80, 0);
    // A backend opened read-only makes the LUN read-only too.
    let st = Arc::new(MemStorage::new(vec![0; 4096], 4096));
    let ro = Arc::new(RawDisk::from_storage(st, true, 512, 512, [2; 16]).unwrap());
    assert!(ScsiDisk::new(ro, false, true, 4096).unwrap().read_only());
}

#[test]
fn io_errors_become_medium_errors() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    d.fail_reads.store(true, Ordering::SeqCst);
    assert_eq!(
        err(run_in(Some(&l), &rw10(0x28, 0, 1), 512).0),
        Sense::READ_ERROR
    );
    d.fail_writes.store(true, Ordering::SeqCst);
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x2a, 0, 1), &[0; 512])),
        Sense::WRITE_ERROR
    );
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x41, 0, 1), &[0; 512])),
        Sense::WRITE_ERROR
    );
    d.fail_flush.store(true, Ordering::SeqCst);
    assert_eq!(
        err(run_in(Some(&l), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0).0),
        Sense::WRITE_ERROR
    );
    // Sense bytes as the guest sees them.
    assert_eq!(Sense::READ_ERROR.fixed()[2], 0x03);
    assert_eq!(
        (
            Sense::READ_ERROR.fixed()[12],
            Sense::WRITE_ERROR.fixed()[12]
        ),
        (0x11, 0x0c)
    );
}

#[test]
fn synchronize_cache_flushes() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    assert_eq!(
        run_in(Some(&l), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0).0,
        Outcome::good(0)
    );
    let mut c = [0u8; 16];
    c[0] = 0x91;
    assert_eq!(run_in(Some(&l), &c, 0).0, Outcome::good(0));
    assert_eq!(d.flushes.load(Ordering::SeqCst), 2);
    c[9] = 0x10; // LBA 16 ..
    c[13] = 0xff; // + 255 blocks: fine
    assert_eq!(run_in(Some(&l), &c, 0).0, Outcome::good(0));
    c[2] = 1; // LBA 2^56 + 16: out of range
    assert_eq!(err(run_in(Some(&l), &c, 0).0), Sense::LBA_OUT_OF_RANGE);
    assert_eq!(d.flushes.load(Ordering::SeqCst), 3);
}

#[test]
fn mode_sense_pages_and_descriptors() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    // (6): caching page with a short block descriptor.
    let (o, p) = run_in(Some(&l), &[0x1a, 0, 0x08, 0, 255, 0], 255);
    assert_eq!(o.sense, None);
    assert_eq!(p.len(), 4 + 8 + 20);
    assert_eq!(p[0] as usize, p.len() - 1);
    assert_eq!(p[3], 8);
    assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), 2048);
    assert_eq!(&p[9..12], &[0, 2, 0]);
    assert_eq!((p[12], p[13]), (0x08, 0x12));
    assert_eq!(p[14] & 0x04, 0x04, "WCE");
    // DBD: no descriptor; control page.
    let (_, p) = run_in(Some(&l), &[0x1a, 0x08, 0x0a, 0, 255, 0], 255);
    assert_eq!(p[3], 0);
    assert_eq!((p[4], p[5]), (0x0a, 0x0a));
    // All pages, (10) with LLBAA: long descriptor, both pages.
    let (_, p) = run_in(Some(&l), &[0x5a, 0x10, 0x3f, 0, 0, 0, 0, 1, 0, 0], 512);
    assert_eq!(usize::from(u16::from_be_bytes([p[0], p[1]])), p.len() - 2);
    assert_eq!(p[4] & 1, 1, "LONGLBA");
    assert_eq!(u16::from_be_bytes([p[6], p[7]]), 16);
    assert_eq!(u64::from_be_bytes(p[8..16].try_into().unwrap()), 2048);
    assert_eq!(u32::from_be_bytes(p[20..24].try_into().unwrap()), 512);
    assert_eq!(p[24], 0x08);
    assert_eq!(p[44], 0x0a);
    assert_eq!(p.len(), 8 + 16 + 20 + 12);
    // Changeable values: nothing is.
    let (_, p) = run_in(Some(&l), &[0x1a, 0x08, 0x48, 0, 255, 0], 255);
    assert_eq!(p[4..6], [0x08, 0x12]);
    assert!(p[6..].iter().all(|&b| b == 0));
    // Saved values; unknown page; bad subpage; allocation length.
    assert_eq!(
        err(run_in(Some(&l), &[0x1a, 0, 0xc8, 0, 255, 0], 255).0),
        Sense::SAVING_NOT_SUPPORTED
    );
    assert_eq!(
        err(run_in(Some(&l), &[0x1a, 0, 0x1c, 0, 255, 0], 255).0),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        err(run_in(Some(&l), &[0x1a, 0, 0x08, 1, 255, 0], 255).0),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        run_in(Some(&l), &[0x1a, 0, 0x3f, 0xff, 4, 0], 255).1.len(),
        4
    );
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p[..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    for &(lba, n) in descs {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn unmap_cdb(len: u16) -> [u8; 10] {
    let mut c = [0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

#[test]
fn unmap_parameter_lists() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    let p = unmap_list(&[(8, 16), (100, 0), (2040, 8)]);
    assert_eq!(
        run_out(Some(&l), &unmap_cdb(p.len() as u16), &p),
        Outcome::good(p.len())
    );
    assert_eq!(
        *d.unmaps.lock().unwrap(),
        vec![(4096, 8192), (2040 * 512, 4096)]
    );
    // Empty list; header only.
    assert_eq!(run_out(Some(&l), &unmap_cdb(0), &[]), Outcome::good(0));
    assert_eq!(
        run_out(Some(&l), &unmap_cdb(8), &unmap_list(&[])),
        Outcome::good(8)
    );
    // Errors, each before any unmap happens.
    d.unmaps.lock().unwrap().clear();
    assert_eq!(
        err(run_out(Some(&l), &unmap_cdb(4), &[0; 4])),
        Sense::PARAMETER_LIST_LENGTH
    );
    let p = unmap_list(&[(0, 8), (2041, 8)]);
    assert_eq!(
        err(run_out(Some(&l), &unmap_cdb(p.len() as u16), &p)),
        Sense::LBA_OUT_OF_RANGE
    );
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 1)).collect();
    let p = unmap_list(&many);
    assert_eq!(
        err(run_out(Some(&l), &unmap_cdb(p.len() as u16), &p)),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    let p = unmap_list(&[(0, 8)]);
    assert_eq!(
        err(run_out(Some(&l), &unmap_cdb(p.len() as u16 + 16), &p)),
        Sense::BAD_DATA_BUFFER
    );
    assert!(d.unmaps.lock().unwrap().is_empty());
    // A descriptor length beyond the list is cut to the list.
    let mut p = unmap_list(&[(0, 8)]);
    p[2..4].copy_from_slice(&4000u16.to_be_bytes());
    assert_eq!(
        run_out(Some(&l), &unmap_cdb(p.len() as u16), &p),
        Outcome::good(p.len())
    );
    assert_eq!(d.unmaps.lock().unwrap().len(), 1);
    // A LUN without unmap does not know the command.
    let l2 = lun(&d, false, false);
    let p = unmap_list(&[(0, 8)]);
    assert_eq!(
        err(run_out(Some(&l2), &unmap_cdb(p.len() as u16), &p)),
        Sense::INVALID_OPCODE
    );
}

#[test]
fn write_same_replicates_one_block() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    let block: Vec<u8> = (0..512u32).map(|i| i as u8 ^ 0x3c).collect();
    assert_eq!(
        run_out(Some(&l), &rw10(0x41, 10, 600), &block),
        Outcome::good(512)
    );
    let written = d.bytes(10 * 512, 600 * 512);
    assert!(written.chunks(512).all(|c| c == block));
    assert_eq!(d.bytes(610 * 512, 512), vec![0; 512]);
    // NDOB (16-byte form): zeros, no data-out.
    let mut c = rw16(0x93, 10, 4);
    c[1] = 0x01;
    assert_eq!(run_out(Some(&l), &c, &[]), Outcome::good(0));
    assert_eq!(d.bytes(10 * 512, 2048), vec![0; 2048]);
    assert_eq!(d.bytes(14 * 512, 512), block);
    // Zero blocks (WSNZ), too many, out of range, no data.
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x41, 0, 0), &block)),
        Sense::INVALID_FIELD_IN_CDB
    );
    let big = TestDisk::new(128 * MIB, 512, 512);
    let bl = lun(&big, false, true);
    let n = (MAX_WRITE_SAME_BYTES / 512) as u32 + 1;
    assert_eq!(
        err(run_out(Some(&bl), &rw16(0x93, 0, n), &block)),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x41, 2047, 2), &block)),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        err(run_out(Some(&l), &rw10(0x41, 0, 2), &block[..100])),
        Sense::BAD_DATA_BUFFER
    );
}

#[test]
fn request_sense_formats() {
    let d = TestDisk::new(MIB, 512, 512);
    let l = lun(&d, false, true);
    let (o, p) = run_in(Some(&l), &[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(o.sense, None);
    assert_eq!(p.len(), 18);
    assert_eq!((p[0], p[2], p[12]), (0x70, 0, 0));
    let (_, p) = run_in(Some(&l), &[0x03, 1, 0, 0, 252, 0], 252);
    assert_eq!(p, vec![0x72, 0, 0, 0, 0, 0, 0, 0]);
    // For a missing LUN the data says so (the command itself succeeds).
    let (o, p) = run_in(None, &[0x03, 0, 0, 0, 252, 0], 252);
    assert_eq!(o.sense, None);
    assert_eq!((p[2], p[12], p[13]), (0x05, 0x25, 0x00));
}

#[test]
fn geometry_checks_at_attach() {
    let st = Arc::new(MemStorage::new(vec![0; 100], 100));
    let tiny = Arc::new(RawDisk::from_storage(st, false, 512, 512, [0; 16]).unwrap());
    // 100 bytes round up to one 512-byte sector in RawDisk: presentable.
    assert_eq!(ScsiDisk::new(tiny, false, true, 4096).unwrap().blocks(), 1);
    let st = Arc::new(MemStorage::new(Vec::new(), 0));
    let empty = Arc::new(RawDisk::from_storage(st, false, 512, 512, [0; 16]).unwrap());
    assert!(ScsiDisk::new(empty, false, true, 4096).is_err());
}

#[test]
fn the_bounce_buffer_is_page_aligned_at_every_size() {
    let mut s = Scratch::default();
    for n in [512, 4096, 100, CHUNK, 64 << 10, CHUNK + 1] {
        let b = s.get(n);
        assert_eq!(b.len(), n.min(CHUNK));
        assert_eq!(b.as_ptr() as usize % 4096, 0, "size {n}");
    }
}
