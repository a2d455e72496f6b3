//! Ring throughput: one writer thread and one reader thread in this process over a plain
//! shared buffer (no guest, no signalling: both sides spin). Prints packets/s and MB/s of
//! payload for 64-byte and 4 KiB in-band packets.
//!
//! Run: `cargo bench -p vmbus_ring --bench ring` (optionally `-- <seconds per case>`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmbus_ring::{
    OutgoingPacket, RawRingMem, ReadError, RingReader, RingWriter, WriteError, RING_HEADER_SIZE,
};

/// Heap memory for one ring, kept alive while both threads use it.
struct Shared {
    _buf: Vec<u64>,
    mem: RawRingMem,
}

fn shared_ring(data_len: u32) -> Arc<Shared> {
    let mut buf = vec![0u64; (RING_HEADER_SIZE + data_len as usize) / 8];
    let p = buf.as_mut_ptr().cast::<u8>();
    // SAFETY: `buf` holds the header page and the data area and lives in `Shared` alongside
    // the RawRingMem (the Vec's heap block does not move when the Vec is moved).
    let mem = unsafe { RawRingMem::new(p, p.add(RING_HEADER_SIZE), data_len).unwrap() };
    Arc::new(Shared { _buf: buf, mem })
}

fn run(payload_len: usize, ring_len: u32, duration: Duration) -> (u64, Duration) {
    let shared = shared_ring(ring_len);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let mut r = RingReader::new(&shared.mem).unwrap();
            let mut buf = vec![0u8; payload_len + 64];
            let mut n = 0u64;
            let mut sum = 0u64;
            loop {
                match r.try_read(&mut buf) {
                    Ok((p, _)) => {
                        if p.transaction_id() == u64::MAX {
                            break;
                        }
                        assert_eq!(p.transaction_id(), n, "packets out of order");
                        sum = sum.wrapping_add(u64::from(p.payload()[0]));
                        n += 1;
                    }
                    Err(ReadError::Empty) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            }
            std::hint::black_box(sum);
            n
        })
    };
    let payload = vec![0x5au8; payload_len];
    let mut w = RingWriter::new(&shared.mem).unwrap();
    let start = Instant::now();
    let mut sent = 0u64;
    let write = |id: u64, w: &mut RingWriter<&RawRingMem>| loop {
        match w.try_write(&OutgoingPacket::in_band(id, &payload, false)) {
            Ok(_) => break,
            Err(WriteError::Full { .. }) => std::hint::spin_loop(),
            Err(e) => panic!("{e}"),
        }
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for _ in 0..1024 {
            write(sent, &mut w);
            sent += 1;
        }
        if start.elapsed() >= duration {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    write(u64::MAX, &mut w);
    let received = reader.join().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(received, sent);
    (sent, elapsed)
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    let duration = Duration::from_secs_f64(secs);
    let ring_len = 256 * 1024;
    println!(
        "vmbus_ring: writer and reader threads, {} KiB ring, spinning",
        ring_len / 1024
    );
    for payload_len in [64usize, 4096] {
        let (n, t) = run(payload_len, ring_len, duration);
        let pps = n as f64 / t.as_secs_f64();
        let mbps = pps * payload_len as f64 / 1e6;
        println!(
            "payload {payload_len:>5} B: {n:>10} packets in {:.2} s = {:>10.0} packets/s, {:>8.1} MB/s",
            t.as_secs_f64(),
            pps,
            mbps
        );
    }
}
