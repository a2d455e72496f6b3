//! The controller driven in-process: a fake Linux storvsc (`test_support::FakeStorvsc`, on
//! `vmbus_client`) talks to a real `VmbusServer` and `StorageController`, over real disk
//! backends (a raw file and a dynamic VHDX in a temporary directory).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use disk::{BlockBackend, CreateParams, VhdxKind};
use vmbus_server::OutgoingGpaRange;
use zerocopy::IntoBytes;

use crate::protocol::{
    body_as, data_in, op, set_body, srb_status, status, VmScsiRequest, SCSI_STATUS_CHECK_CONDITION,
    VERSION_WIN10,
};
use crate::test_support::{rw10, rw16, FakeStorvsc, TestVm};
use crate::{instance_id, ControllerConfig, ControllerHandle, LunOptions, StorageController};

const MIB: u64 = 1 << 20;

fn raw_file(dir: &Path, name: &str, size: u64) -> Arc<dyn BlockBackend> {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    Arc::from(disk::open_disk(&p, false).unwrap())
}

fn dynamic_vhdx(dir: &Path, name: &str, size: u64) -> Arc<dyn BlockBackend> {
    let p = dir.join(name);
    disk::ops::new_vhd(
        &p,
        &CreateParams {
            virtual_size: size,
            kind: VhdxKind::Dynamic,
            block_size: 1 << 20,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    Arc::from(disk::open_disk(&p, false).unwrap())
}

/// A VM with one controller (index `index` of seed "test-vm"), and the guest attached.
fn setup(direct: bool) -> (TestVm, ControllerHandle, FakeStorvsc) {
    let vm = TestVm::new(64 * MIB);
    let mut cfg = ControllerConfig::new(instance_id(b"test-vm", 0));
    if direct {
        cfg.guest_memory = Some(vm.ram.clone());
    }
    let (ctl, handle) = StorageController::new(cfg);
    vm.server.add_device(Box::new(ctl)).unwrap();
    let guest = FakeStorvsc::open(&vm, handle.instance_id(), 32).unwrap();
    (vm, handle, guest)
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn assert_check(c: &crate::test_support::Completion, srb: u8, sense: (u8, u8, u8)) {
    assert_eq!(
        c.srb_status(),
        srb | srb_status::AUTOSENSE_VALID,
        "srb status"
    );
    assert_eq!(c.scsi_status(), SCSI_STATUS_CHECK_CONDITION);
    assert_eq!(c.sense(), Some(sense));
    assert_eq!(c.transferred(), 0);
}

/// INQUIRY, READ CAPACITY, REPORT LUNS, then data written through one kind of buffer and
/// read back through another, checked against the backend.
fn roundtrip(backend: Arc<dyn BlockBackend>, direct: bool) {
    let (_vm, handle, mut g) = setup(direct);
    handle
        .add_lun(0, backend.clone(), LunOptions::default())
        .unwrap();
    let (version, props) = g.init().unwrap();
    assert_eq!(version, VERSION_WIN10);
    assert_eq!(props.max_transfer_bytes.get(), 1 << 20);
    assert_eq!(
        (props.flags.get(), props.max_channel_cnt.get()),
        (
            crate::protocol::STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL,
            crate::DEFAULT_MAX_SUB_CHANNELS
        )
    );
    assert!(handle.guest_ready());

    let (c, inq) = g.command_in(0, &[0x12, 0, 0, 0, 96, 0], 96).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert_eq!(c.transferred(), 36);
    assert_eq!(&inq[8..32], b"Msft    Virtual Disk    ");
    let (_, luns) = g
        .command_in(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256)
        .unwrap();
    assert_eq!(
        &luns[..16],
        &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let (c, cap) = g.command_in(0, &rc16, 32).unwrap();
    assert_eq!(c.transferred(), 32);
    let blocks = u64::from_be_bytes(cap[..8].try_into().unwrap()) + 1;
    let bs = u32::from_be_bytes(cap[8..12].try_into().unwrap());
    assert_eq!(blocks * u64::from(bs), backend.size());
    assert_eq!(bs, 512);

    // 256 KiB written from a contiguous buffer at LBA 1000 + 1 (odd, crosses blocks of the
    // VHDX), read back through a scattered buffer starting 512 bytes into its first page.
    let data = pattern(7, 256 << 10);
    let lba = 1001u64;
    let wbuf = g.alloc_buf(data.len() as u32, 0, false);
    g.fill(&wbuf, 0, &data);
    g.submit(1, 0, &rw16(true, lba, 512), data_in::WRITE, Some(&wbuf))
        .unwrap();
    let c = g.wait_for(1).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert_eq!(c.transferred() as usize, data.len());
    let rbuf = g.alloc_buf(data.len() as u32, 512, true);
    g.submit(2, 0, &rw16(false, lba, 512), data_in::READ, Some(&rbuf))
        .unwrap();
    let c = g.wait_for(2).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert!(g.read(&rbuf, 0, data.len()) == data, "read back differs");
    // The backend holds it, byte for byte.
    let mut on_disk = vec![0u8; data.len()];
    backend.read_at(lba * 512, &mut on_disk).unwrap();
    assert!(on_disk == data, "backend differs");
    // And the reverse: scattered write, contiguous read, via READ(10)/WRITE(10).
    let data2 = pattern(9, 64 << 10);
    let wbuf = g.alloc_buf(data2.len() as u32, 0, true);
    g.fill(&wbuf, 0, &data2);
    g.submit(3, 0, &rw10(true, 5, 128), data_in::WRITE, Some(&wbuf))
        .unwrap();
    assert_eq!(g.wait_for(3).unwrap().srb_status(), srb_status::SUCCESS);
    let (c, back) = g.command_in(0, &rw10(false, 5, 128), 64 << 10).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert!(back == data2);
    // SYNCHRONIZE CACHE in-band.
    let (c, _) = g
        .command_in(0, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0)
        .unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    let st = handle.stats();
    assert_eq!(st.bytes_written, (data.len() + data2.len()) as u64);
    assert_eq!(st.bytes_read, (data.len() + data2.len()) as u64);
    assert_eq!(st.errors, 0);
}

#[test]
fn raw_file_roundtrip_direct() {
    let dir = tempfile::tempdir().unwrap();
    roundtrip(raw_file(dir.path(), "disk.raw", 64 * MIB), true);
}

#[test]
fn raw_file_roundtrip_copying() {
    let dir = tempfile::tempdir().unwrap();
    roundtrip(raw_file(dir.path(), "disk.raw", 64 * MIB), false);
}

#[test]
fn dynamic_vhdx_roundtrip_direct() {
    let dir = tempfile::tempdir().unwrap();
    roundtrip(dynamic_vhdx(dir.path(), "disk.vhdx", 256 * MIB), true);
}

#[test]
fn dynamic_vhdx_roundtrip_copying() {
    let dir = tempfile::tempdir().unwrap();
    roundtrip(dynamic_vhdx(dir.path(), "disk.vhdx", 256 * MIB), false);
}

#[test]
fn read_only_lun_and_errors_over_the_channel() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, handle, mut g) = setup(true);
    let rw = raw_file(dir.path(), "a.raw", 8 * MIB);
    let ro = raw_file(dir.path(), "b.raw", 8 * MIB);
    handle.add_lun(0, rw, LunOptions::default()).unwrap();
    handle
        .add_lun(
            3,
            ro.clone(),
            LunOptions {
                read_only: true,
                unmap: true,
            },
        )
        .unwrap();
    g.init().unwrap();
    // Write to the read-only LUN: DATA PROTECT, WRITE PROTECTED; the file is unchanged.
    let c = g.command_out(3, &rw10(true, 0, 1), &[0xaa; 512]).unwrap();
    assert_check(&c, srb_status::ERROR, (0x07, 0x27, 0x00));
    let mut b = [0u8; 512];
    ro.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0; 512]);
    // ... but it reads, and MODE SENSE shows WP.
    let (c, _) = g.command_in(3, &rw10(false, 0, 1), 512).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    let (_, ms) = g.command_in(3, &[0x1a, 0, 0x3f, 0, 255, 0], 255).unwrap();
    assert_eq!(ms[2] & 0x80, 0x80);
    // Out of range: 8 MiB = 16384 blocks.
    let (c, _) = g.command_in(0, &rw16(false, 16384, 1), 512).unwrap();
    assert_check(&c, srb_status::ERROR, (0x05, 0x21, 0x00));
    let (c, _) = g.command_in(0, &rw16(false, 16383, 1), 512).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    // Unknown opcode; invalid field.
    let (c, _) = g
        .command_in(0, &[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0)
        .unwrap();
    assert_check(&c, srb_status::ERROR, (0x05, 0x20, 0x00));
    let (c, _) = g.command_in(0, &[0x12, 0, 0x80, 0, 36, 0], 36).unwrap();
    assert_check(&c, srb_status::ERROR, (0x05, 0x24, 0x00));
    // Nothing at LUN 5: TEST UNIT READY fails with INVALID_LUN (Linux drops the device),
    // INQUIRY answers "no device here".
    let (c, _) = g.command_in(5, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_check(&c, srb_status::INVALID_LUN, (0x05, 0x25, 0x00));
    let (c, inq) = g.command_in(5, &[0x12, 0, 0, 0, 36, 0], 36).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert_eq!(inq[0], 0x7f);
    // Other targets and paths hold nothing; REPORT LUNS there is empty.
    for (path, target) in [(0u8, 1u8), (3, 0)] {
        let mut p = FakeStorvsc::srb_packet(
            0,
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
            data_in::READ,
            256,
        );
        let mut srb: VmScsiRequest = body_as(&p);
        srb.path_id = path;
        srb.target_id = target;
        set_body(&mut p, &srb);
        let buf = g.alloc_buf(256, 0, false);
        g.submit_packet(77, &p, Some(&buf)).unwrap();
        let c = g.wait_for(77).unwrap();
        assert_eq!(c.srb_status(), srb_status::SUCCESS);
        assert_eq!(g.read(&buf, 0, 8), vec![0; 8]);
    }
    // The LUN listing on target 0.
    let (_, l) = g
        .command_in(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256)
        .unwrap();
    assert_eq!(u32::from_be_bytes(l[..4].try_into().unwrap()), 16);
    assert_eq!(l[17], 3);
    assert!(handle.stats().errors >= 5);
}

#[test]
fn hostile_packets_get_errors_and_the_channel_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, handle, mut g) = setup(true);
    let backend = raw_file(dir.path(), "h.raw", 4 * MIB);
    handle
        .add_lun(0, backend.clone(), LunOptions::default())
        .unwrap();

    // An SRB before initialization: refused with INVALID_DEVICE_STATE.
    let (c, _) = g.command_in(0, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.packet.status.get(), status::INVALID_DEVICE_STATE);
    assert_eq!(c.srb_status() & 0x3f, srb_status::INVALID_REQUEST);
    g.init().unwrap();

    // A packet shorter than the header: answered with INVALID_PARAMETER.
    g.send_raw(10, &[3, 0, 0, 0, 1, 0], None, true).unwrap();
    let c = g.wait_for(10).unwrap();
    assert_eq!(c.packet.operation.get(), op::COMPLETE_IO);
    assert_eq!(c.packet.status.get(), status::INVALID_PARAMETER);
    assert_eq!(c.len, 64);
    // Unknown operations and host-only operations.
    for (i, o) in [0u32, op::ENUMERATE_BUS, op::COMPLETE_IO, 0xdead_beef]
        .into_iter()
        .enumerate()
    {
        let c = g.control(o, &[0xff; 52], 20 + i as u64).unwrap();
        assert_eq!(c.packet.status.get(), status::INVALID_PARAMETER);
    }
    // More sub-channels than QUERY_PROPERTIES allowed.
    let c = g.control(op::CREATE_SUB_CHANNELS, &[9, 0], 30).unwrap();
    assert_eq!(c.packet.status.get(), status::INVALID_PARAMETER);

    // CDB length 0 and 17: INVALID_REQUEST.
    for (i, n) in [0u8, 17, 255].into_iter().enumerate() {
        let mut p = FakeStorvsc::srb_packet(0, &[0; 6], data_in::UNKNOWN, 0);
        let mut srb: VmScsiRequest = body_as(&p);
        srb.cdb_length = n;
        set_body(&mut p, &srb);
        g.submit_packet(40 + i as u64, &p, None).unwrap();
        let c = g.wait_for(40 + i as u64).unwrap();
        assert_eq!(c.srb_status() & 0x3f, srb_status::INVALID_REQUEST);
    }

    // data_transfer_length beyond the GPA range: refused before any I/O.
    let buf = g.alloc_buf(4096, 0, false);
    let mut p = FakeStorvsc::srb_packet(0, &rw10(true, 0, 16), data_in::WRITE, 8192);
    g.fill(&buf, 0, &[0x99; 4096]);
    g.submit_packet(50, &p, Some(&buf)).unwrap();
    let c = g.wait_for(50).unwrap();
    assert_check(&c, srb_status::INVALID_REQUEST, (0x0b, 0x0e, 0x00));
    // A buffer shorter than the transfer the CDB asks for.
    p = FakeStorvsc::srb_packet(0, &rw10(true, 0, 16), data_in::WRITE, 4096);
    g.submit_packet(51, &p, Some(&buf)).unwrap();
    assert_check(
        &g.wait_for(51).unwrap(),
        srb_status::ERROR,
        (0x0b, 0x0e, 0x00),
    );
    let mut b = [0u8; 4096];
    backend.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0; 4096], "nothing written");
    // A READ in-band (no buffer at all) whatever data_transfer_length claims.
    let p = FakeStorvsc::srb_packet(0, &rw10(false, 0, 1), data_in::READ, 1 << 30);
    g.submit_packet(52, &p, None).unwrap();
    assert_check(
        &g.wait_for(52).unwrap(),
        srb_status::ERROR,
        (0x0b, 0x0e, 0x00),
    );
    // GPA ranges outside guest RAM, and a PFN that overflows.
    for (i, pfn) in [vm.ram.size() / 4096, u64::MAX >> 8]
        .into_iter()
        .enumerate()
    {
        let pfns = [pfn];
        let ranges = [OutgoingGpaRange {
            byte_count: 512,
            byte_offset: 0,
            pfns: &pfns,
        }];
        let p = FakeStorvsc::srb_packet(0, &rw10(false, 0, 1), data_in::READ, 512);
        g.send_raw(60 + i as u64, p.as_bytes(), Some(&ranges), true)
            .unwrap();
        assert_check(
            &g.wait_for(60 + i as u64).unwrap(),
            srb_status::INVALID_REQUEST,
            (0x0b, 0x0e, 0x00),
        );
    }
    // Absurd transfer lengths.
    let (c, _) = g.command_in(0, &rw16(false, 0, u32::MAX), 4096).unwrap();
    assert_check(&c, srb_status::ERROR, (0x05, 0x21, 0x00));
    let (c, _) = g.command_in(0, &rw16(false, 0, 4096), 4096).unwrap();
    assert_check(&c, srb_status::ERROR, (0x05, 0x24, 0x00));

    // A burst of garbage: every packet that asks for a completion gets exactly one.
    let mut x = 0x1234_5678u64;
    let mut asked = Vec::new();
    for i in 0..300u64 {
        x ^= x << 7;
        x ^= x >> 9;
        let len = (x % 80) as usize;
        let mut payload: Vec<u8> = (0..len).map(|j| (x >> (j % 56)) as u8).collect();
        if payload.len() >= 4 && i % 2 == 0 {
            payload[..4].copy_from_slice(&op::EXECUTE_SRB.to_le_bytes());
        }
        let id = 1000 + i;
        let want = x % 3 != 0;
        g.send_raw(id, &payload, None, want).unwrap();
        if want {
            asked.push(id);
        }
    }
    for id in asked {
        let c = g.wait_for(id).unwrap();
        assert_eq!(c.packet.operation.get(), op::COMPLETE_IO);
        assert_eq!(c.len, 64);
    }
    // Still works afterwards.
    let data = pattern(3, 4096);
    let c = g.command_out(0, &rw10(true, 8, 8), &data).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    let (c, back) = g.command_in(0, &rw10(false, 8, 8), 4096).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert_eq!(back, data);
}

#[test]
fn concurrent_requests_complete_out_of_order_with_the_right_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, handle, mut g) = setup(true);
    let backend = dynamic_vhdx(dir.path(), "q.vhdx", 64 * MIB);
    handle.add_lun(0, backend, LunOptions::default()).unwrap();
    g.init().unwrap();
    // 32 writes in flight at once (each 16 KiB at its own LBA), then 32 reads.
    let n = 32u64;
    let mut bufs = Vec::new();
    for i in 0..n {
        let data = pattern(i as u32 + 100, 16 << 10);
        let b = g.alloc_buf(data.len() as u32, 0, i % 2 == 0);
        g.fill(&b, 0, &data);
        g.submit(
            i + 1,
            0,
            &rw16(true, i * 1000, 32),
            data_in::WRITE,
            Some(&b),
        )
        .unwrap();
        bufs.push(data);
    }
    let mut order = Vec::new();
    for _ in 0..n {
        let c = g.next_completion().unwrap();
        assert_eq!(
            c.srb_status(),
            srb_status::SUCCESS,
            "id {}",
            c.transaction_id
        );
        order.push(c.transaction_id);
    }
    order.sort_unstable();
    assert_eq!(
        order,
        (1..=n).collect::<Vec<_>>(),
        "one completion per request"
    );
    let rbufs: Vec<_> = (0..n)
        .map(|i| {
            let b = g.alloc_buf(16 << 10, 0, i % 3 == 0);
            g.submit(
                100 + i,
                0,
                &rw16(false, i * 1000, 32),
                data_in::READ,
                Some(&b),
            )
            .unwrap();
            b
        })
        .collect();
    for i in (0..n).rev() {
        let c = g.wait_for(100 + i).unwrap();
        assert_eq!(c.srb_status(), srb_status::SUCCESS);
        assert!(g.read(&rbufs[i as usize], 0, 16 << 10) == bufs[i as usize]);
    }
}

#[test]
fn hot_add_and_remove_send_enumerate_bus() {
    let dir = tempfile::tempdir().unwrap();
    let (_vm, handle, mut g) = setup(true);
    handle
        .add_lun(0, raw_file(dir.path(), "0.raw", MIB), LunOptions::default())
        .unwrap();
    g.init().unwrap();
    assert!(g.unsolicited.is_empty());
    // Hot add: ENUMERATE_BUS with transaction id 0, then the LUN is there.
    handle
        .add_lun(
            1,
            raw_file(dir.path(), "1.raw", 2 * MIB),
            LunOptions::default(),
        )
        .unwrap();
    g.wait_any().unwrap();
    assert_eq!(g.unsolicited.len(), 1);
    assert_eq!(g.unsolicited[0].operation.get(), op::ENUMERATE_BUS);
    let (_, l) = g
        .command_in(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256)
        .unwrap();
    assert_eq!(u32::from_be_bytes(l[..4].try_into().unwrap()), 16);
    assert_eq!(l[17], 1);
    let (c, _) = g.command_in(1, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    // Bad requests from the host side.
    assert!(handle
        .add_lun(1, raw_file(dir.path(), "x.raw", MIB), LunOptions::default())
        .is_err());
    assert!(handle
        .add_lun(
            64,
            raw_file(dir.path(), "y.raw", MIB),
            LunOptions::default()
        )
        .is_err());
    assert!(handle.remove_lun(9).is_err());
    // Hot remove: ENUMERATE_BUS again; the guest's TEST UNIT READY now fails with
    // INVALID_LUN.
    handle.remove_lun(1).unwrap();
    g.wait_any().unwrap();
    assert_eq!(g.unsolicited.len(), 2);
    let (c, _) = g.command_in(1, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_check(&c, srb_status::INVALID_LUN, (0x05, 0x25, 0x00));
    assert_eq!(handle.luns().len(), 1);
    assert_eq!(handle.stats().rescans, 2);
}

#[test]
fn several_controllers_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let vm = TestVm::new(64 * MIB);
    let mut handles = Vec::new();
    for i in 0..3 {
        let mut cfg = ControllerConfig::new(instance_id(b"multi", i));
        cfg.guest_memory = Some(vm.ram.clone());
        cfg.workers = 2;
        let (ctl, h) = StorageController::new(cfg);
        h.add_lun(
            i as u8,
            raw_file(dir.path(), &format!("c{i}.raw"), MIB * (i as u64 + 1)),
            LunOptions::default(),
        )
        .unwrap();
        vm.server.add_device(Box::new(ctl)).unwrap();
        handles.push(h);
    }
    let ids: std::collections::HashSet<_> = handles.iter().map(|h| h.instance_id()).collect();
    assert_eq!(ids.len(), 3);
    let mut g0 = FakeStorvsc::open(&vm, handles[0].instance_id(), 16).unwrap();
    let mut g2 = g0.open_another(handles[2].instance_id(), 16).unwrap();
    g0.init().unwrap();
    g2.init().unwrap();
    // Each controller lists its own LUN.
    let (_, l) = g0
        .command_in(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256)
        .unwrap();
    assert_eq!((l[3], l[9]), (8, 0));
    let (_, l) = g2
        .command_in(0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256)
        .unwrap();
    assert_eq!((l[3], l[9]), (8, 2));
    // Close controller 2's channel and reopen it: a fresh session.
    g2.close(Some(&mut g0)).unwrap();
    let _ = vm.server.status();
    assert!(!handles[2].guest_ready());
    let mut g2 = g0.open_another(handles[2].instance_id(), 16).unwrap();
    let (c, _) = g2.command_in(2, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.packet.status.get(), status::INVALID_DEVICE_STATE);
    g2.init().unwrap();
    let (c, _) = g2.command_in(2, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert_eq!(handles[2].stats().opens, 2);
    // Controller 0 kept working throughout.
    let (c, _) = g0.command_in(0, &rw10(false, 0, 8), 4096).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
}

#[test]
fn full_completion_ring_is_backpressure_not_loss() {
    // A guest that stops reading its completions: the host fills the ring and waits; once
    // the guest reads again, every request is answered.
    let dir = tempfile::tempdir().unwrap();
    let (_vm, handle, mut g) = setup(true);
    handle
        .add_lun(
            0,
            raw_file(dir.path(), "bp.raw", MIB),
            LunOptions::default(),
        )
        .unwrap();
    g.init().unwrap();
    // 31 data pages per ring: a 64-byte completion takes 88 bytes, so ~1400 fill it.
    let total = 2000u64;
    for i in 0..total {
        let p = FakeStorvsc::srb_packet(0, &[0, 0, 0, 0, 0, 0], data_in::UNKNOWN, 0);
        // send_raw drains completions only when our own ring is full.
        g.send_raw(i + 1, p.as_bytes(), None, true).unwrap();
    }
    let mut seen = 0;
    while seen < total {
        let c = g.next_completion().unwrap();
        assert_eq!(c.srb_status(), srb_status::SUCCESS);
        seen += 1;
    }
    assert_eq!(handle.stats().requests, total);
    assert!(g.pending.is_empty());
}

/// The `BlockBackend` methods a test wrapper passes straight to its `inner` backend.
macro_rules! forward_backend {
    () => {
        fn flush(&self) -> disk::Result<()> {
            self.inner.flush()
        }
        fn unmap(&self, offset: u64, len: u64) -> disk::Result<()> {
            self.inner.unmap(offset, len)
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn logical_sector_size(&self) -> u32 {
            self.inner.logical_sector_size()
        }
        fn physical_sector_size(&self) -> u32 {
            self.inner.physical_sector_size()
        }
        fn read_only(&self) -> bool {
            self.inner.read_only()
        }
        fn disk_id(&self) -> [u8; 16] {
            self.inner.disk_id()
        }
    };
}

/// Records where the buffers handed to the backend live: (write, all in guest RAM, bytes,
/// pieces) per call.
struct Spy {
    inner: Arc<dyn BlockBackend>,
    ram: Arc<crate::test_support::MappedGuestRam>,
    calls: std::sync::Mutex<Vec<(bool, bool, usize, usize)>>,
}

impl Spy {
    fn record<'a>(&self, write: bool, bufs: impl Iterator<Item = &'a [u8]>) {
        let (mut in_ram, mut len, mut n) = (true, 0, 0);
        for b in bufs {
            in_ram &= self.ram.contains(b.as_ptr());
            len += b.len();
            n += 1;
        }
        self.calls.lock().unwrap().push((write, in_ram, len, n));
    }
    fn take(&self) -> Vec<(bool, bool, usize, usize)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl BlockBackend for Spy {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> disk::Result<()> {
        self.record(false, std::iter::once(&*buf));
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> disk::Result<()> {
        self.record(true, std::iter::once(buf));
        self.inner.write_at(offset, buf)
    }
    fn read_vectored_at(&self, offset: u64, bufs: &mut [&mut [u8]]) -> disk::Result<()> {
        self.record(false, bufs.iter().map(|b| &**b));
        self.inner.read_vectored_at(offset, bufs)
    }
    fn write_vectored_at(&self, offset: u64, bufs: &[&[u8]]) -> disk::Result<()> {
        self.record(true, bufs.iter().copied());
        self.inner.write_vectored_at(offset, bufs)
    }
    forward_backend!();
}

#[test]
fn guest_buffers_go_straight_to_the_backend_contiguous_or_scattered() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, handle, mut g) = setup(true);
    let spy = Arc::new(Spy {
        inner: raw_file(dir.path(), "spy.raw", 8 * MIB),
        ram: vm.ram.clone(),
        calls: Default::default(),
    });
    handle
        .add_lun(0, spy.clone(), LunOptions::default())
        .unwrap();
    g.init().unwrap();
    let data = pattern(5, 128 << 10);
    // Contiguous: one backend call per direction, on guest memory itself.
    let c = g.command_out(0, &rw10(true, 0, 256), &data).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    let (_, back) = g.command_in(0, &rw10(false, 0, 256), 128 << 10).unwrap();
    assert!(back == data);
    assert_eq!(
        spy.take(),
        vec![(true, true, 128 << 10, 1), (false, true, 128 << 10, 1)]
    );
    // Scattered 4 KiB pages (a page cache's): one vectored call over the 32 guest pages.
    let b = g.alloc_buf(128 << 10, 0, true);
    g.submit(9, 0, &rw10(false, 0, 256), data_in::READ, Some(&b))
        .unwrap();
    assert_eq!(g.wait_for(9).unwrap().srb_status(), srb_status::SUCCESS);
    assert!(g.read(&b, 0, 128 << 10) == data);
    assert_eq!(spy.take(), vec![(false, true, 128 << 10, 32)]);
    // And written from scattered pages the same way.
    let w = pattern(6, 128 << 10);
    g.fill(&b, 0, &w);
    g.submit(12, 0, &rw10(true, 256, 256), data_in::WRITE, Some(&b))
        .unwrap();
    assert_eq!(g.wait_for(12).unwrap().srb_status(), srb_status::SUCCESS);
    assert_eq!(spy.take(), vec![(true, true, 128 << 10, 32)]);
    let (_, back) = g.command_in(0, &rw10(false, 256, 256), 128 << 10).unwrap();
    assert!(back == w);
    spy.take();
    // A contiguous buffer starting mid-sector in guest memory (offset 100) is still one
    // direct call: only the transfer offsets must be sector multiples, not addresses.
    let b = g.alloc_buf(4096, 100, false);
    g.submit(10, 0, &rw10(false, 0, 8), data_in::READ, Some(&b))
        .unwrap();
    assert_eq!(g.wait_for(10).unwrap().srb_status(), srb_status::SUCCESS);
    assert!(g.read(&b, 0, 4096) == data[..4096]);
    assert_eq!(spy.take(), vec![(false, true, 4096, 1)]);
    // Two runs of 8 pages: direct (one call, two pieces) when the break falls on a sector,
    // bounced (host memory) when the 100-byte offset puts it mid-sector.
    for (offset, len, direct) in [(0u32, 64usize << 10, true), (100, 60 << 10, false)] {
        let a = vm.ram.alloc_pages(8);
        vm.ram.alloc_pages(1);
        let c = vm.ram.alloc_pages(8);
        let b = crate::test_support::GuestBuf {
            pfns: (a..a + 8).chain(c..c + 8).collect(),
            offset,
            len: len as u32,
        };
        let blocks = (len / 512) as u16;
        g.submit(11, 0, &rw10(false, 0, blocks), data_in::READ, Some(&b))
            .unwrap();
        assert_eq!(g.wait_for(11).unwrap().srb_status(), srb_status::SUCCESS);
        assert!(g.read(&b, 0, len) == data[..len]);
        let want = if direct {
            (false, true, len, 2)
        } else {
            (false, false, len, 1)
        };
        assert_eq!(spy.take(), vec![want]);
    }
    // A read listing one page twice would need two live `&mut` of one page: it bounces
    // (and the page ends up holding the second half's data, as a device would leave it).
    let p = vm.ram.alloc_pages(1);
    let b = crate::test_support::GuestBuf {
        pfns: vec![p, p],
        offset: 0,
        len: 8192,
    };
    g.submit(13, 0, &rw10(false, 0, 16), data_in::READ, Some(&b))
        .unwrap();
    assert_eq!(g.wait_for(13).unwrap().srb_status(), srb_status::SUCCESS);
    assert_eq!(spy.take(), vec![(false, false, 8192, 1)]);
    assert!(g.read(&b, 0, 4096) == data[4096..8192]);
    // Written from a page listed twice is fine: the backend only reads.
    g.submit(14, 0, &rw10(true, 512, 16), data_in::WRITE, Some(&b))
        .unwrap();
    assert_eq!(g.wait_for(14).unwrap().srb_status(), srb_status::SUCCESS);
    assert_eq!(spy.take(), vec![(true, true, 8192, 2)]);
}

// ---- sub-channels (multi-queue) ----

/// A VM with one controller allowing `max_sub_channels`, a 64 MiB raw LUN 0, and the guest
/// attached to the primary channel.
fn setup_multi(
    dir: &Path,
    max_sub_channels: u16,
) -> (
    TestVm,
    ControllerHandle,
    vmbus_server::DeviceId,
    FakeStorvsc,
) {
    let vm = TestVm::new(128 * MIB);
    let mut cfg = ControllerConfig::new(instance_id(b"mq-vm", 0));
    cfg.guest_memory = Some(vm.ram.clone());
    cfg.workers = 2;
    cfg.max_sub_channels = max_sub_channels;
    let (ctl, handle) = StorageController::new(cfg);
    handle
        .add_lun(0, raw_file(dir, "mq.raw", 64 * MIB), LunOptions::default())
        .unwrap();
    let id = vm.server.add_device(Box::new(ctl)).unwrap();
    let guest = FakeStorvsc::open(&vm, handle.instance_id(), 16).unwrap();
    (vm, handle, id, guest)
}

/// Writes 8 x 32 KiB (4 in flight at a time) at `base` LBA, reads them back and checks
/// them; returns the data written.
fn write_read_verify(g: &mut FakeStorvsc, base: u64, seed: u32) -> Vec<Vec<u8>> {
    let mut written = Vec::new();
    for batch in 0..2u64 {
        let mut ids = Vec::new();
        for k in 0..4u64 {
            let i = batch * 4 + k;
            let data = pattern(seed * 100 + i as u32, 32 << 10);
            let b = g.alloc_buf(data.len() as u32, 0, i % 2 == 1);
            g.fill(&b, 0, &data);
            let id = 1000 + i;
            g.submit(
                id,
                0,
                &rw16(true, base + i * 64, 64),
                data_in::WRITE,
                Some(&b),
            )
            .unwrap();
            ids.push(id);
            written.push(data);
        }
        for id in ids {
            assert_eq!(g.wait_for(id).unwrap().srb_status(), srb_status::SUCCESS);
        }
    }
    let bufs: Vec<_> = (0..8u64)
        .map(|i| {
            let b = g.alloc_buf(32 << 10, 0, i % 3 == 0);
            g.submit(
                2000 + i,
                0,
                &rw16(false, base + i * 64, 64),
                data_in::READ,
                Some(&b),
            )
            .unwrap();
            b
        })
        .collect();
    for (i, b) in bufs.iter().enumerate() {
        let c = g.wait_for(2000 + i as u64).unwrap();
        assert_eq!(c.srb_status(), srb_status::SUCCESS);
        assert!(g.read(b, 0, 32 << 10) == written[i], "read back differs");
    }
    written
}

#[test]
fn sub_channels_serve_io_concurrently_with_the_right_data() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, handle, _, mut g) = setup_multi(dir.path(), 3);
    let (_, props) = g.init().unwrap();
    assert_eq!(
        props.flags.get(),
        crate::protocol::STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL
    );
    assert_eq!(props.max_channel_cnt.get(), 3);
    // Linux's handle_multichannel_storage: CREATE_SUB_CHANNELS, then the offers.
    let c = g.create_sub_channels(3, u64::MAX - 1).unwrap();
    assert_eq!(
        (c.packet.operation.get(), c.packet.status.get()),
        (op::COMPLETE_IO, 0)
    );
    let offers = g.sub_channel_offers(3, Duration::from_secs(10)).unwrap();
    assert_eq!(
        offers
            .iter()
            .map(|o| o.sub_channel_index)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for o in &offers {
        assert_eq!(o.class_id, crate::SCSI_CLASS_ID);
        assert_eq!(o.instance_id, handle.instance_id());
        assert_ne!(o.relid, g.offer.relid);
        assert_eq!(
            o.connection_id,
            vmbus_server::channel_connection_id(o.relid)
        );
    }
    let mut subs: Vec<FakeStorvsc> = offers
        .iter()
        .map(|o| g.open_sub_channel(*o, 16).unwrap())
        .collect();
    // Opening a sub-channel's relid a second time is refused.
    assert!(g.open_sub_channel(offers[0], 4).is_err());
    assert_eq!(handle.stats().sub_channel_opens, 3);
    // No initialization on sub-channels (Linux sends none): SRBs work at once.
    let (c, _) = subs[0].command_in(0, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    // Sub-channels cannot create sub-channels.
    let c = subs[0].create_sub_channels(1, 77).unwrap();
    assert_eq!(c.packet.status.get(), status::INVALID_DEVICE_STATE);

    // I/O on the primary and every sub-channel at once, each guest queue on its own thread;
    // every completion must come back on the channel its request went out on (a misrouted
    // one would leave its waiter to time out).
    let workers: Vec<_> = subs
        .drain(..)
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                let data = write_read_verify(&mut s, 10_000 * (i as u64 + 1), i as u32 + 1);
                (s, data)
            })
        })
        .collect();
    let primary_data = write_read_verify(&mut g, 0, 99);
    let mut results: Vec<(FakeStorvsc, Vec<Vec<u8>>)> =
        workers.into_iter().map(|t| t.join().unwrap()).collect();
    // The same LUN is behind every channel: the primary reads what sub-channel 2 wrote, and
    // sub-channel 1 what the primary wrote.
    let (c, back) = g.command_in(0, &rw16(false, 20_000, 64), 32 << 10).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert!(back == results[1].1[0]);
    let (c, back) = results[0]
        .0
        .command_in(0, &rw16(false, 64, 64), 32 << 10)
        .unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    assert!(back == primary_data[1]);
    let st = handle.stats();
    assert_eq!(st.bytes_written, 4 * 8 * (32 << 10));
    assert_eq!(st.errors, 0);

    // Closing the primary closes and rescinds the sub-channels.
    g.close(None).unwrap();
    let st = vm.server.status().unwrap();
    for o in &offers {
        let c = st.channels.iter().find(|c| c.relid == o.relid).unwrap();
        assert_eq!(c.state, vmbus_server::ChannelState::Rescinded);
    }
    assert!(!handle.guest_ready());
    // The guest sees every sub-channel rescinded (the primary stays offered).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !g.sub_channel_offers(0, Duration::ZERO).unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "rescinds not seen");
        std::thread::sleep(Duration::from_millis(2));
    }
    let client = g.client.as_ref().unwrap();
    assert!(!client.offer(g.offer.relid).unwrap().rescinded);
    assert!(offers
        .iter()
        .all(|o| client.offer(o.relid).unwrap().rescinded));
    drop(results.drain(..));
}

#[test]
fn create_sub_channels_hostile_requests_get_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, handle, id, mut g) = setup_multi(dir.path(), 2);
    // Before the initialization sequence: refused.
    let c = g.create_sub_channels(1, 5).unwrap();
    assert_eq!(c.packet.status.get(), status::INVALID_DEVICE_STATE);
    g.init().unwrap();
    // Count 0 or above the maximum: refused; the channel keeps working.
    for n in [0u16, 3, u16::MAX] {
        let c = g.create_sub_channels(n, 6).unwrap();
        assert_eq!(
            c.packet.status.get(),
            status::INVALID_PARAMETER,
            "count {n}"
        );
    }
    assert!(g
        .sub_channel_offers(1, Duration::from_millis(100))
        .unwrap()
        .is_empty());
    let c = g.create_sub_channels(2, 7).unwrap();
    assert_eq!(c.packet.status.get(), 0);
    // Twice: refused, and no more offers come.
    let c = g.create_sub_channels(1, 8).unwrap();
    assert_eq!(c.packet.status.get(), status::INVALID_DEVICE_STATE);
    assert_eq!(
        g.sub_channel_offers(2, Duration::from_secs(10))
            .unwrap()
            .len(),
        2
    );
    let offers = g.sub_channel_offers(3, Duration::from_millis(200)).unwrap();
    assert_eq!(offers.len(), 2);
    let mut s1 = g.open_sub_channel(offers[0], 8).unwrap();
    assert!(g.open_sub_channel(offers[0], 8).is_err());
    let (c, _) = s1.command_in(0, &rw10(false, 0, 8), 4096).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);
    let (c, _) = g.command_in(0, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.srb_status(), srb_status::SUCCESS);

    // A controller configured without sub-channels says so, and refuses them.
    let mut cfg = ControllerConfig::new(instance_id(b"mq-vm", 1));
    cfg.max_sub_channels = 0;
    let (ctl, h2) = StorageController::new(cfg);
    vm.server.add_device(Box::new(ctl)).unwrap();
    let _ = vm.server.status();
    g.client.as_mut().unwrap().poll();
    let mut g2 = g.open_another(h2.instance_id(), 8).unwrap();
    let (_, props) = g2.init().unwrap();
    assert_eq!((props.flags.get(), props.max_channel_cnt.get()), (0, 0));
    let c = g2.create_sub_channels(1, 9).unwrap();
    assert_eq!(c.packet.status.get(), status::NOT_SUPPORTED);

    // Hot removal of the first controller: sub-channels rescinded with the primary.
    vm.server.remove_device(id).unwrap();
    let st = vm.server.status().unwrap();
    let rescinded = st
        .channels
        .iter()
        .filter(|c| c.state == vmbus_server::ChannelState::Rescinded)
        .count();
    assert_eq!(rescinded, 3);
    assert!(!handle.guest_ready());
    // The other controller is untouched.
    let (c, _) = g2.command_in(0, &[0, 0, 0, 0, 0, 0], 0).unwrap();
    assert_eq!(c.packet.status.get(), 0);
}

/// A backend that counts how many reads are inside it at once, holding each until
/// `target` are (or a deadline passes), and reports itself `unbuffered` as asked.
struct Gate {
    inner: Arc<dyn BlockBackend>,
    unbuffered: bool,
    target: usize,
    hold: Duration,
    state: std::sync::Mutex<(usize, usize)>,
    cv: std::sync::Condvar,
}

impl Gate {
    fn max_inside(&self) -> usize {
        self.state.lock().unwrap().1
    }
}

impl BlockBackend for Gate {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> disk::Result<()> {
        let deadline = std::time::Instant::now() + self.hold;
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        s.1 = s.1.max(s.0);
        self.cv.notify_all();
        while s.0 < self.target && s.1 < self.target {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
        s.0 -= 1;
        drop(s);
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> disk::Result<()> {
        self.inner.write_at(offset, buf)
    }
    forward_backend!();
    fn unbuffered(&self) -> bool {
        self.unbuffered
    }
}

/// How many of `qd` reads the backend holds at once, for a LUN (un)buffered, each read
/// held up to `hold` waiting for the others.
fn reads_inside_at_once(unbuffered: bool, qd: u64, hold: Duration) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate {
        inner: raw_file(dir.path(), "g.raw", 16 * MIB),
        unbuffered,
        target: qd as usize,
        hold,
        state: std::sync::Mutex::new((0, 0)),
        cv: std::sync::Condvar::new(),
    });
    let vm = TestVm::new(64 * MIB);
    let mut cfg = ControllerConfig::new(instance_id(b"gate", 0));
    cfg.guest_memory = Some(vm.ram.clone());
    let (ctl, handle) = StorageController::new(cfg);
    // The LUN is there before the guest opens the channel: the pool is sized then.
    handle
        .add_lun(0, gate.clone(), LunOptions::default())
        .unwrap();
    vm.server.add_device(Box::new(ctl)).unwrap();
    let mut g = FakeStorvsc::open(&vm, handle.instance_id(), 64).unwrap();
    g.init().unwrap();
    for i in 0..qd {
        let b = g.alloc_buf(4096, 0, false);
        g.submit(i + 1, 0, &rw16(false, i * 8, 8), data_in::READ, Some(&b))
            .unwrap();
    }
    for _ in 0..qd {
        assert_eq!(
            g.next_completion().unwrap().srb_status(),
            srb_status::SUCCESS
        );
    }
    gate.max_inside()
}

#[test]
fn an_unbuffered_lun_has_as_many_requests_waiting_on_the_device_as_the_guest_queues() {
    // Waiting on the device costs no CPU, so the pool serves a guest's whole queue depth.
    assert_eq!(reads_inside_at_once(true, 32, Duration::from_secs(20)), 32);
    // A cached LUN's I/O is a memcpy: its pool stays near the CPU count (each of its
    // reads waits out the hold, so keep both small).
    assert_eq!(
        reads_inside_at_once(false, 8, Duration::from_millis(500)),
        ControllerConfig::new(instance_id(b"gate", 0)).workers
    );
}

#[test]
fn a_halt_polling_guest_gets_every_completion() {
    // The bench's guest VP polls for its interrupts (as KVM's halt polling does); the
    // waits that end by polling must still see every completion and consume its signal.
    let dir = tempfile::tempdir().unwrap();
    let (vm, handle, mut g) = setup(true);
    vm.synic.set_halt_polling(Duration::from_micros(200));
    handle
        .add_lun(
            0,
            raw_file(dir.path(), "hp.raw", 8 * MIB),
            LunOptions::default(),
        )
        .unwrap();
    g.init().unwrap();
    let b = g.alloc_buf(4096, 0, false);
    for i in 0..300u64 {
        let data = pattern(i as u32, 4096);
        g.fill(&b, 0, &data);
        g.submit(
            2 * i + 1,
            0,
            &rw16(true, i * 8, 8),
            data_in::WRITE,
            Some(&b),
        )
        .unwrap();
        assert_eq!(
            g.wait_for(2 * i + 1).unwrap().srb_status(),
            srb_status::SUCCESS
        );
        g.fill(&b, 0, &[0u8; 4096]);
        g.submit(
            2 * i + 2,
            0,
            &rw16(false, i * 8, 8),
            data_in::READ,
            Some(&b),
        )
        .unwrap();
        assert_eq!(g.next_completion().unwrap().transaction_id, 2 * i + 2);
        assert!(g.read(&b, 0, 4096) == data, "request {i}");
    }
    assert!(g.pending.is_empty());
}
