//! The storvsp data path against the host doing the same I/O itself.
//!
//! Run: `cargo bench -p storvsp --bench datapath` (each case runs `STORVSP_BENCH_SECS`
//! seconds, default 1).
//!
//! Setup: a 1 GiB raw file and a 1 GiB dynamic VHDX (Hyper-V's default 32 MiB blocks) in
//! one temporary directory; the first 256 MiB of each is written once, so
//! reads find data (and the VHDX's blocks allocated) and the page cache is hot. No fsync:
//! this measures the data path, not the storage device.
//!
//! - host: the raw file read/written by the host with `pread`/`pwrite`, one thread per
//!   queue slot (QD1: one thread; QD32: 32 threads).
//! - backend: the `disk` backend called directly the same way (shows what VHDX costs by
//!   itself).
//! - storvsp: the fake Linux storvsc (`test_support::FakeStorvsc`) in-process, one guest
//!   thread keeping QD requests in flight through the VMBus ring, the controller serving
//!   them with its worker pool, guest buffers contiguous in (mmap-backed) guest RAM and the
//!   direct mapping enabled (zero-copy). The "scattered" rows use buffers of scattered
//!   4 KiB pages (a guest's page cache), which the backend gets as one vectored call.
//!
//! - "unbuffered" rows: the same with the host's page cache bypassed on both sides: the host
//!   column reads and writes the raw file opened `O_DIRECT`, the backend and storvsp columns
//!   use disks opened with `DiskOptions::unbuffered` (as Hyper-V opens virtual disks), so
//!   the data moves between the device and guest RAM with no copy.
//!
//! Sequential: 64 KiB requests walking the 256 MiB region; random: 4 KiB requests at random
//! 4 KiB-aligned offsets in it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use disk::{BlockBackend, CreateParams, VhdxKind};
use storvsp::protocol::{data_in, srb_status};
use storvsp::test_support::{rw16, FakeStorvsc, GuestBuf, TestVm};
use storvsp::{instance_id, ControllerConfig, LunOptions, StorageController};

const GIB: u64 = 1 << 30;
const REGION: u64 = 256 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Seq64k,
    Rand4k,
}

impl Pattern {
    fn size(self) -> usize {
        match self {
            Pattern::Seq64k => 64 << 10,
            Pattern::Rand4k => 4 << 10,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Pattern::Seq64k => "seq 64K",
            Pattern::Rand4k => "rand 4K",
        }
    }
}

/// Offsets: sequential through a shared counter, or random per stream.
struct Offsets {
    pattern: Pattern,
    next: AtomicU64,
}

impl Offsets {
    fn new(pattern: Pattern) -> Self {
        Self {
            pattern,
            next: AtomicU64::new(0),
        }
    }
    fn get(&self, rng: &mut u64) -> u64 {
        let size = self.pattern.size() as u64;
        match self.pattern {
            Pattern::Seq64k => (self.next.fetch_add(1, Ordering::Relaxed) * size) % REGION,
            Pattern::Rand4k => {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                (*rng % (REGION / size)) * size
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Result {
    ops: u64,
    secs: f64,
    size: usize,
    /// Process CPU time (user + system, all threads) per completed operation, in µs: how
    /// much work each I/O costs, whatever else the machine is doing.
    cpu_us_per_op: f64,
}

/// CPU time used by this process so far, in seconds.
fn cpu_time() -> f64 {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

impl Result {
    fn mbps(&self) -> f64 {
        self.ops as f64 * self.size as f64 / self.secs / 1e6
    }
    fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// One I/O at an offset with a buffer.
type IoFn = dyn Fn(u64, &mut [u8]) + Send + Sync;

/// `qd` threads doing `io(offset, buf)` for `dur`.
fn threads(qd: usize, pattern: Pattern, dur: Duration, io: Arc<IoFn>) -> Result {
    let offsets = Arc::new(Offsets::new(pattern));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_time();
    let start = Instant::now();
    let hs: Vec<_> = (0..qd)
        .map(|t| {
            let (offsets, stop, ops, io) = (offsets.clone(), stop.clone(), ops.clone(), io.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((t as u64 + 1) * 0x1234_5677);
                // Page-aligned, as direct I/O needs.
                let mut mem = vec![0x5au8; pattern.size() + 4096];
                let at = mem.as_ptr().align_offset(4096);
                let buf = &mut mem[at..at + pattern.size()];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    io(offsets.get(&mut rng), buf);
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let ops = ops.load(Ordering::Relaxed);
    Result {
        ops,
        secs: start.elapsed().as_secs_f64(),
        size: pattern.size(),
        cpu_us_per_op: (cpu_time() - cpu0) * 1e6 / ops.max(1) as f64,
    }
}

fn host(file: &Arc<File>, write: bool, qd: usize, pattern: Pattern, dur: Duration) -> Result {
    let f = file.clone();
    threads(
        qd,
        pattern,
        dur,
        Arc::new(move |off, buf| {
            if write {
                f.write_all_at(buf, off).unwrap();
            } else {
                f.read_exact_at(buf, off).unwrap();
            }
        }),
    )
}

fn backend(
    d: &Arc<dyn BlockBackend>,
    write: bool,
    qd: usize,
    pattern: Pattern,
    dur: Duration,
) -> Result {
    let d = d.clone();
    threads(
        qd,
        pattern,
        dur,
        Arc::new(move |off, buf| {
            if write {
                d.write_at(off, buf).unwrap();
            } else {
                d.read_at(off, buf).unwrap();
            }
        }),
    )
}

/// The guest keeps `qd` requests in flight for `dur`.
fn storvsp(
    g: &mut FakeStorvsc,
    write: bool,
    qd: usize,
    pattern: Pattern,
    scattered: bool,
    dur: Duration,
) -> Result {
    let size = pattern.size();
    let bufs: Vec<GuestBuf> = (0..qd)
        .map(|_| {
            let b = g.alloc_buf(size as u32, 0, scattered);
            g.fill(&b, 0, &vec![0xa5; size]);
            b
        })
        .collect();
    let offsets = Offsets::new(pattern);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut free: Vec<usize> = (0..qd).collect();
    let mut inflight = std::collections::HashMap::new();
    let mut id = 1u64;
    let mut ops = 0u64;
    let mut completed = 0u64;
    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + dur;
    let blocks = (size / 512) as u32;
    let dir = if write { data_in::WRITE } else { data_in::READ };
    loop {
        let now = Instant::now();
        if now < deadline {
            while let Some(b) = free.pop() {
                let lba = offsets.get(&mut rng) / 512;
                g.submit(id, 0, &rw16(write, lba, blocks), dir, Some(&bufs[b]))
                    .unwrap();
                inflight.insert(id, b);
                id += 1;
            }
        } else if inflight.is_empty() {
            break;
        }
        let c = g.next_completion().unwrap();
        assert_eq!(c.srb_status(), srb_status::SUCCESS);
        free.push(inflight.remove(&c.transaction_id).unwrap());
        completed += 1;
        if Instant::now() <= deadline {
            ops += 1;
        }
    }
    Result {
        ops,
        secs: dur.as_secs_f64(),
        size,
        cpu_us_per_op: (cpu_time() - cpu0) * 1e6 / completed.max(1) as f64,
    }
}

fn prefill(write: impl Fn(u64, &[u8])) {
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 3) as u8).collect();
    let mut off = 0;
    while off < REGION {
        write(off, &chunk);
        off += chunk.len() as u64;
    }
}

/// One controller per backend, all opened over one VMBus connection.
fn attach(vm: &TestVm, disks: &[Arc<dyn BlockBackend>]) -> Vec<FakeStorvsc> {
    let mut ids = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let mut cfg = ControllerConfig::new(instance_id(b"bench", i as u32));
        cfg.guest_memory = Some(vm.ram.clone());
        if let Some(w) = std::env::var("STORVSP_BENCH_WORKERS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            cfg.workers = w;
        }
        let (ctl, h) = StorageController::new(cfg);
        h.add_lun(0, d.clone(), LunOptions::default()).unwrap();
        vm.server.add_device(Box::new(ctl)).unwrap();
        ids.push(h.instance_id());
    }
    let mut first = FakeStorvsc::open(vm, ids[0], 64).unwrap();
    let mut guests: Vec<FakeStorvsc> = ids[1..]
        .iter()
        .map(|id| first.open_another(*id, 64).unwrap())
        .collect();
    guests.insert(0, first);
    for g in &mut guests {
        g.init().unwrap();
    }
    guests
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us briefly as a smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs: f64 = std::env::var("STORVSP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 0.02 } else { 0.5 });
    let rounds: usize = std::env::var("STORVSP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 1 } else { 3 })
        .max(1);
    let dur = Duration::from_secs_f64(secs);
    // Only this case (e.g. "raw seq 64K read qd32"), or the cases whose name contains it.
    let only = std::env::var("STORVSP_BENCH_ONLY").unwrap_or_default();
    // Which columns to measure (for profiling one alone): "host,backend,storvsp".
    let parts =
        std::env::var("STORVSP_BENCH_PARTS").unwrap_or_else(|_| "host,backend,storvsp".into());
    let dir = tempfile::tempdir().unwrap();
    // Buffered and unbuffered cases use their own files (two VHDX instances must never
    // have one file open for writing).
    let paths: Vec<_> = ["bench.raw", "bench.vhdx", "bench-u.raw", "bench-u.vhdx"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for (i, p) in paths.iter().enumerate() {
        if i % 2 == 0 {
            let f = File::create(p).unwrap();
            f.set_len(GIB).unwrap();
            prefill(|off, b| f.write_all_at(b, off).unwrap());
        } else {
            let params = CreateParams {
                virtual_size: GIB,
                kind: VhdxKind::Dynamic,
                ..Default::default()
            };
            disk::ops::new_vhd(p, &params, None).unwrap();
        }
    }
    let open_raw = |path: &std::path::Path, direct: bool| {
        use std::os::unix::fs::OpenOptionsExt;
        Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(path)
                .unwrap(),
        )
    };
    let host_files = [open_raw(&paths[0], false), open_raw(&paths[2], true)];
    let open = |p: &std::path::Path, unbuffered: bool| -> Arc<dyn BlockBackend> {
        let opts = disk::DiskOptions {
            read_only: false,
            unbuffered,
        };
        Arc::from(disk::open_disk_with(p, None, opts).unwrap())
    };
    // raw, VHDX, then the same two unbuffered.
    let disks: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| open(p, i >= 2))
        .collect();
    assert!(
        disks[2].unbuffered() && disks[3].unbuffered(),
        "{} cannot do direct I/O",
        dir.path().display()
    );
    for d in [&disks[1], &disks[3]] {
        prefill(|off, b| d.write_at(off, b).unwrap());
        d.flush().unwrap();
    }

    let vm = TestVm::new(256 << 20);
    // The fake guest's VP waits for completions as a KVM vCPU does: halt polling up to the
    // host's `halt_poll_ns` (KVM's default 200 µs if it cannot be read).
    let halt_poll_us: u64 = std::env::var("STORVSP_BENCH_HALT_POLL_US")
        .ok()
        .and_then(|s| s.parse().ok())
        .or_else(|| {
            std::fs::read_to_string("/sys/module/kvm/parameters/halt_poll_ns")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|ns| ns / 1000)
        })
        .unwrap_or(200);
    vm.synic
        .set_halt_polling(Duration::from_micros(halt_poll_us));
    let mut guests = attach(&vm, &disks);

    println!(
        "storvsp data path: {rounds} round(s) of {secs} s per column and case (medians), no fsync; page cache hot except in unbuffered rows"
    );
    println!(
        "files in {}; the guest's VP halt-polls up to {halt_poll_us} µs",
        dir.path().display()
    );
    println!(
        "{:<45} {:>19} {:>19} {:>19} {:>7} {:>18}",
        "case",
        "host MB/s (IOPS)",
        "backend MB/s (IOPS)",
        "storvsp MB/s (IOPS)",
        "ratio",
        "CPU µs/op host/sv"
    );
    // (name, disk index, write, pattern, queue depth, scattered guest buffers)
    let mut cases: Vec<(String, usize, bool, Pattern, usize, bool)> = Vec::new();
    for disk in 0..disks.len() {
        for pattern in [Pattern::Seq64k, Pattern::Rand4k] {
            for write in [false, true] {
                for qd in [1usize, 32] {
                    let name = format!(
                        "{}{} {} {} qd{qd}",
                        if disk % 2 == 1 { "vhdx dynamic" } else { "raw" },
                        if disk >= 2 { " unbuffered" } else { "" },
                        pattern.name(),
                        if write { "write" } else { "read" }
                    );
                    cases.push((name, disk, write, pattern, qd, false));
                }
            }
        }
    }
    for (disk, what) in [(0, "raw"), (2, "raw unbuffered")] {
        for write in [false, true] {
            for qd in [1usize, 32] {
                let rw = if write { "write" } else { "read" };
                let name = format!("{what} seq 64K {rw} qd{qd} scattered");
                cases.push((name, disk, write, Pattern::Seq64k, qd, true));
            }
        }
    }
    // A whole case name selects that case alone, anything else every case containing it.
    let exact = cases.iter().any(|c| c.0 == only);
    for (name, disk, write, pattern, qd, scattered) in cases {
        if (exact && name != only) || !name.contains(&only) {
            continue;
        }
        let dev = &disks[disk];
        let g = &mut guests[disk];
        let raw_file = &host_files[disk / 2];
        let (mut h, mut b, mut s, mut ratio) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            // Each round measures the three columns back to back, so that their ratio is
            // taken under the same machine load.
            let hr = parts
                .contains("host")
                .then(|| host(raw_file, write, qd, pattern, dur));
            let br = parts
                .contains("backend")
                .then(|| backend(dev, write, qd, pattern, dur));
            let sr = parts
                .contains("storvsp")
                .then(|| storvsp(g, write, qd, pattern, scattered, dur));
            if let (Some(hr), Some(sr)) = (hr, sr) {
                ratio.push(sr.mbps() / hr.mbps());
            }
            h.extend(hr);
            b.extend(br);
            s.extend(sr);
        }
        let cpu = |v: &[Result]| {
            if v.is_empty() {
                f64::NAN
            } else {
                median(v.iter().map(|r| r.cpu_us_per_op).collect())
            }
        };
        let col = |v: &[Result]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                let mbps = median(v.iter().map(|r| r.mbps()).collect());
                let iops = median(v.iter().map(|r| r.iops()).collect());
                format!("{mbps:8.0} ({iops:7.0})")
            }
        };
        println!(
            "{:<45} {:>19} {:>19} {:>19} {:>7} {:>8.1}/{:<8.1}",
            name,
            col(&h),
            col(&b),
            col(&s),
            if ratio.is_empty() {
                "-".into()
            } else {
                format!("{:.2}x", median(ratio))
            },
            cpu(&h),
            cpu(&s),
        );
    }
    println!(
        "host: pread/pwrite on the raw file (O_DIRECT in unbuffered rows); backend: the disk backend called directly; ratio: median over rounds of storvsp/host"
    );
    println!(
        "CPU µs/op: process CPU time (all threads: for storvsp the fake guest, the channel thread and the workers) per I/O"
    );
}
