//! Arbitrary ring memory and indices: the reader must never panic, and must stop after a
//! bounded number of packets (each consumes at least 24 bytes of what was available).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbus_ring::{header, RawRingMem, ReadError, RingMem, RingReader, RING_HEADER_SIZE};

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let word = |i: usize| u32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().unwrap());
    // Data area: 64 bytes .. 64 KiB, a multiple of 8.
    let data_len = 64 + (word(0) % 8192) * 8;
    let mut buf = vec![0u64; (RING_HEADER_SIZE + data_len as usize) / 8];
    let p = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: `buf` holds the header page and the data area and outlives `mem`.
    let mem = unsafe { RawRingMem::new(p, p.add(RING_HEADER_SIZE), data_len).unwrap() };
    let body = &data[16..];
    let n = body.len().min(data_len as usize);
    mem.write_data(0, &body[..n]);
    mem.store_header(header::WRITE_INDEX, word(1));
    mem.store_header(header::READ_INDEX, word(2) % data_len & !7);
    mem.store_header(header::PENDING_SEND_SIZE, word(3));
    let Ok(mut reader) = RingReader::new(&mem) else {
        return;
    };
    let mut out = vec![0u8; data_len as usize];
    let mut packets = 0u32;
    loop {
        match reader.try_read(&mut out) {
            Ok((p, _)) => {
                packets += 1;
                assert!(p.payload().len() < data_len as usize);
                if let vmbus_ring::PacketKind::GpaDirect(r) = p.kind() {
                    for range in r.iter() {
                        let _ = range.pfns().count();
                    }
                }
            }
            Err(ReadError::Empty | ReadError::Corrupt(_)) => break,
            Err(ReadError::BufferTooSmall { .. }) => unreachable!("buffer is the ring size"),
        }
        assert!(packets <= data_len / 24, "reader did not terminate");
    }
    drop(buf);
});
