//! Arbitrary vstor packets through the parser, the session and the SCSI target, against an
//! in-memory disk, with data buffers both in host memory and described by arbitrary GPA
//! ranges over a small guest RAM (direct and bounced transfers).
//!
//! Input: byte 0 picks the LUN setup (read-only, unmap, 512 or 4096-byte blocks, present or
//! not); then records `[len: u8][payload: len bytes]`. A record whose payload starts with
//! 0xFE describes GPA ranges for the next SRB instead: `[count: u8] {[offset lo, hi] [bytes:
//! u16] [pfn: u8]...}`.
//!
//! Checked: no panic; every answer is a 64-byte COMPLETE_IO; an error transfers nothing;
//! nothing transferred beyond the buffer; a read-only LUN's disk never changes.

#![no_main]

use std::sync::Arc;

use disk::{BlockBackend, MemStorage, RawDisk};
use libfuzzer_sys::fuzz_target;
use storvsp::buffer::{GpaList, GuestBuffer, RangeRef};
use storvsp::protocol::{body_as, op, VmScsiRequest, PACKET_SIZE};
use storvsp::scsi::{self, DataBuffer, Scratch, ScsiDisk, VecBuffer};
use storvsp::srb::{self, Properties, Request, Session};
use storvsp::test_support::MappedGuestRam;

const DISK: usize = 256 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let read_only = mode & 1 != 0;
    let unmap = mode & 2 != 0;
    let bs = if mode & 4 != 0 { 4096 } else { 512 };
    let present = mode & 8 == 0;
    let direct = mode & 16 != 0;
    let st = Arc::new(MemStorage::new(vec![0x11; DISK], DISK as u64));
    let backend: Arc<dyn BlockBackend> =
        Arc::new(RawDisk::from_storage(st.clone(), false, bs, 4096.max(bs), [7; 16]).unwrap());
    let lun = ScsiDisk::new(backend, read_only, unmap, 64 << 10).unwrap();
    let ram = MappedGuestRam::new(64 * 4096);
    let luns = || vec![0u8, 5];
    let props = Properties {
        max_transfer_bytes: 64 << 10,
        max_sub_channels: 4,
    };
    let mut session = Session::new();
    let mut scratch = Scratch::default();
    let mut ranges: Option<Vec<(u32, u32, Vec<u64>)>> = None;
    while let Some((&len, r)) = rest.split_first() {
        let n = (len as usize).min(r.len());
        let (payload, r) = r.split_at(n);
        rest = r;
        if payload.first() == Some(&0xfe) {
            ranges = Some(parse_ranges(&payload[1..]));
            continue;
        }
        let reply = match srb::parse(payload) {
            Err(_) => continue,
            Ok(Request::Control(p)) => {
                let r = session.control(&p, &props);
                if let Some(n) = session.take_sub_channel_request() {
                    assert!((1..=props.max_sub_channels).contains(&n));
                }
                r
            }
            Ok(Request::Srb(req)) => {
                let Some(cdb) = req.cdb() else {
                    continue;
                };
                let outcome = match ranges.take() {
                    Some(rs) => {
                        let list = GpaList::new(
                            rs.iter().map(|(count, offset, pfns)| RangeRef {
                                byte_count: *count,
                                byte_offset: *offset,
                                pfns: pfns.iter().copied(),
                            }),
                            req.data_len(),
                            &*ram,
                        );
                        let Ok(list) = list else {
                            continue;
                        };
                        let map: Option<&dyn storvsp::GuestMemoryMap> =
                            if direct { Some(&*ram) } else { None };
                        let buf = GuestBuffer::new(&list, &*ram, map);
                        let o =
                            scsi::execute(cdb, present.then_some(&lun), &luns, &buf, &mut scratch);
                        assert!(o.transferred <= buf.len());
                        o
                    }
                    None => {
                        // Host-memory buffer, bounded here (the VSP's are bounded by the
                        // packet's page list).
                        let buf = VecBuffer::from_vec(
                            payload
                                .iter()
                                .copied()
                                .cycle()
                                .take(req.data_len().min(1 << 17))
                                .collect(),
                        );
                        let o =
                            scsi::execute(cdb, present.then_some(&lun), &luns, &buf, &mut scratch);
                        assert!(o.transferred <= buf.len());
                        o
                    }
                };
                if outcome.sense.is_some() {
                    assert_eq!(outcome.transferred, 0);
                }
                let c = srb::complete(&req, &outcome);
                let s: VmScsiRequest = body_as(&c);
                assert!(usize::from(s.sense_info_length) <= 20);
                c
            }
        };
        assert_eq!(srb::bytes(&reply).len(), PACKET_SIZE);
        assert_eq!(reply.operation.get(), op::COMPLETE_IO);
    }
    if read_only {
        assert!(
            st.contents().iter().all(|&b| b == 0x11),
            "read-only disk written"
        );
    }
});

/// `[count] {[offset: u16 le] [bytes: u16 le] [npfns: u8] [pfn: u8]...}` (offset masked to
/// the page, page count as given: the GPA list must cope with too few pages).
fn parse_ranges(mut b: &[u8]) -> Vec<(u32, u32, Vec<u64>)> {
    let mut out = Vec::new();
    let Some((&count, r)) = b.split_first() else {
        return out;
    };
    b = r;
    for _ in 0..count.min(8) {
        if b.len() < 5 {
            break;
        }
        let offset = u32::from(u16::from_le_bytes([b[0], b[1]])) & 0xfff;
        let bytes = u32::from(u16::from_le_bytes([b[2], b[3]])) * 4;
        let n = (b[4] as usize).min(b.len() - 5);
        let pfns = b[5..5 + n].iter().map(|&p| u64::from(p)).collect();
        b = &b[5 + n..];
        out.push((bytes, offset, pfns));
    }
    out
}
