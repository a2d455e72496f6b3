//! Crash safety: a workload runs on a storage that "loses power" after N mutating operations,
//! for every N. After each crash the image is reopened (replaying the log): it must open, every
//! acknowledged write must be intact, every other sector must hold one of the values it could
//! legitimately hold, and `qemu-img check` must be clean.
//!
//! Three crash models: a killed process (completed writes survive, the last one torn), a power
//! loss that drops everything since the last flush, and one that keeps every other unflushed
//! write (reordering).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{qemu_img, CrashMode, FaultStorage, MIB};
use disk::{BlockBackend, CreateParams, MemStorage, OpenOptions, ParentMode, Vhdx, VhdxKind};

const SECTOR: u64 = 512;
/// Candidate id meaning "the sector's initial content" (zeros, or the parent's data).
const INITIAL: u32 = 0;
/// Candidate id meaning "explicit zeros" (unmapped).
const ZEROS: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Write `count` sectors at sector `at`.
    Write {
        at: u64,
        count: u64,
    },
    Flush,
    /// Unmap whole blocks [first, first + count).
    Unmap {
        first: u64,
        count: u64,
    },
    Resize(u64),
    Close,
}

/// Sector content written by op `id`: a 16-byte tag (id, sector, and their complements)
/// repeated, cheap to build and compare even in a debug build.
fn pattern(id: u32, sector: u64) -> [u8; SECTOR as usize] {
    let mut tag = [0u8; 16];
    tag[..4].copy_from_slice(&id.to_le_bytes());
    tag[4..8].copy_from_slice(&(sector as u32).to_le_bytes());
    tag[8..12].copy_from_slice(&(!id).to_le_bytes());
    tag[12..].copy_from_slice(&(!(sector as u32)).to_le_bytes());
    let mut b = [0u8; SECTOR as usize];
    for c in b.chunks_exact_mut(16) {
        c.copy_from_slice(&tag);
    }
    b
}

/// What each sector may contain after a crash.
struct Model {
    candidates: Vec<Vec<u32>>,
    sizes: Vec<u64>,
    /// Ops completed but not yet made durable by a flush: (id, first sector, count) or a size.
    pending: Vec<(u32, u64, u64)>,
    pending_size: Option<u64>,
}

impl Model {
    fn new(size: u64) -> Model {
        Model {
            candidates: vec![vec![INITIAL]; (size / SECTOR) as usize],
            sizes: vec![size],
            pending: Vec::new(),
            pending_size: None,
        }
    }
    fn start(&mut self, id: u32, first: u64, count: u64) {
        for s in first..first + count {
            if !self.candidates[s as usize].contains(&id) {
                self.candidates[s as usize].push(id);
            }
        }
    }
    fn ack(&mut self, id: u32, first: u64, count: u64) {
        for s in first..first + count {
            self.candidates[s as usize] = vec![id];
        }
    }
    fn durable(&mut self) {
        for (id, first, count) in std::mem::take(&mut self.pending) {
            self.ack(id, first, count);
        }
        if let Some(s) = self.pending_size.take() {
            self.sizes = vec![s];
        }
    }
}

struct Setup {
    image: Vec<u8>,
    block: u64,
    size: u64,
    parent: Option<Arc<dyn BlockBackend>>,
    /// Initial content of the virtual disk (the parent's data, or zeros).
    initial: Vec<u8>,
    ops: Vec<Op>,
    qemu: bool,
}

/// Runs the workload on `st`; returns the model of what may be on disk.
fn run(setup: &Setup, st: Arc<FaultStorage>, mode: CrashMode) -> Model {
    let mut m = Model::new(setup.size);
    let opts = OpenOptions {
        parent: match &setup.parent {
            Some(p) => ParentMode::Provided(p.clone()),
            None => ParentMode::Resolve,
        },
        ..Default::default()
    };
    let Ok(d) = Vhdx::open_storage(st, None, opts) else {
        return m;
    };
    let immediate = mode == CrashMode::KeepWrites;
    for (i, op) in setup.ops.iter().enumerate() {
        let id = i as u32 + 1;
        match *op {
            Op::Write { at, count } => {
                m.start(id, at, count);
                let mut buf = Vec::with_capacity((count * SECTOR) as usize);
                for s in at..at + count {
                    buf.extend_from_slice(&pattern(id, s));
                }
                if d.write_at(at * SECTOR, &buf).is_err() {
                    return m;
                }
                if immediate {
                    m.ack(id, at, count);
                } else {
                    m.pending.push((id, at, count));
                }
            }
            Op::Unmap { first, count } => {
                let per = setup.block / SECTOR;
                m.start(ZEROS, first * per, count * per);
                if d.unmap(first * setup.block, count * setup.block).is_err() {
                    return m;
                }
                if immediate {
                    m.ack(ZEROS, first * per, count * per);
                } else {
                    m.pending.push((ZEROS, first * per, count * per));
                }
            }
            Op::Resize(n) => {
                m.sizes.push(n);
                m.candidates.resize((n / SECTOR) as usize, vec![INITIAL]);
                if d.resize(n).is_err() {
                    return m;
                }
                if immediate {
                    m.sizes = vec![n];
                } else {
                    m.pending_size = Some(n);
                }
            }
            Op::Flush => {
                if d.flush().is_err() {
                    return m;
                }
                m.durable();
            }
            Op::Close => {
                if d.close().is_err() {
                    return m;
                }
                m.durable();
            }
        }
    }
    m
}

fn verify(setup: &Setup, d: &dyn BlockBackend, m: &Model, what: &str) {
    let size = d.size();
    assert!(
        m.sizes.contains(&size),
        "{what}: size {size} not in {:?}",
        m.sizes
    );
    let mut all = vec![0u8; size as usize];
    d.read_at(0, &mut all)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    for (s, sec) in all.chunks(SECTOR as usize).enumerate() {
        let ok = m.candidates[s].iter().any(|&id| match id {
            INITIAL => {
                let i = s * SECTOR as usize;
                match setup.initial.get(i..i + SECTOR as usize) {
                    Some(init) => sec == init,
                    None => sec == [0u8; SECTOR as usize],
                }
            }
            ZEROS => sec == [0u8; SECTOR as usize],
            id => sec == pattern(id, s as u64),
        });
        assert!(ok, "{what}: sector {s} holds none of {:?}", m.candidates[s]);
    }
}

fn scratch_dir() -> tempfile::TempDir {
    // Hundreds of images go through qemu-img: keep them in memory when possible.
    match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm").unwrap(),
        false => tempfile::tempdir().unwrap(),
    }
}

fn crash_everywhere(setup: &Setup, name: &str) -> usize {
    let dir = scratch_dir();
    let file: PathBuf = dir.path().join("crashed.vhdx");
    // Dry run: how many mutating operations does the workload make?
    let probe = Arc::new(FaultStorage::new(
        setup.image.clone(),
        u64::MAX,
        CrashMode::KeepWrites,
    ));
    let full = run(setup, probe.clone(), CrashMode::KeepWrites);
    let total = probe.ops();
    eprintln!("{name}: {total} operations");
    assert!(total > 20, "workload too small ({total} operations)");
    // Without a crash, everything is acknowledged.
    assert!(full.candidates.iter().all(|c| c.len() == 1));

    let mut runs = 0;
    for mode in [
        CrashMode::KeepWrites,
        CrashMode::DropUnflushed,
        CrashMode::DropSomeUnflushed,
    ] {
        for budget in 0..=total {
            let what = format!("{name}, {mode:?}, crash after {budget} of {total} operations");
            let st = Arc::new(FaultStorage::new(setup.image.clone(), budget, mode));
            let m = run(setup, st.clone(), mode);
            let mem = Arc::new(MemStorage::new(st.surviving_image(), 1 << 30));
            // A read-only open either refuses (log not yet applied) or shows valid data.
            let ro = OpenOptions {
                read_only: true,
                parent: match &setup.parent {
                    Some(p) => ParentMode::Provided(p.clone()),
                    None => ParentMode::Resolve,
                },
                ..Default::default()
            };
            match Vhdx::open_storage(mem.clone(), None, ro.clone()) {
                Ok(d) => verify(setup, &d, &m, &format!("{what} (read-only, before replay)")),
                Err(disk::Error::LogReplayNeeded { .. }) => {}
                Err(e) => panic!("{what}: read-only open failed: {e}"),
            }
            // Read-write open replays the log.
            let rw = OpenOptions {
                read_only: false,
                ..ro.clone()
            };
            let d = Vhdx::open_storage(mem.clone(), None, rw)
                .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            verify(setup, &d, &m, &what);
            let size = d.size();
            d.close().unwrap();
            drop(d);
            // Clean afterwards: opens read-only with the same contents, and QEMU agrees.
            let d = Vhdx::open_storage(mem.clone(), None, ro)
                .unwrap_or_else(|e| panic!("{what}: not clean after replay: {e}"));
            assert_eq!(d.size(), size);
            if setup.qemu {
                std::fs::write(&file, mem.contents()).unwrap();
                let (ok, out) = qemu_img(&["check", "-f", "vhdx", file.to_str().unwrap()]);
                assert!(ok, "{what}: qemu-img check: {out}");
            }
            runs += 1;
        }
    }
    runs
}

fn new_image(size: u64, block: u32) -> Vec<u8> {
    let st = MemStorage::new(Vec::new(), 1 << 30);
    disk::vhdx::create::create_in(
        &st,
        &CreateParams {
            virtual_size: size,
            kind: VhdxKind::Dynamic,
            block_size: block,
            ..Default::default()
        },
    )
    .unwrap();
    st.contents()
}

#[test]
fn dynamic_disk_survives_a_crash_at_every_write() {
    let size = 8 * MIB;
    let spb = MIB / SECTOR; // sectors per 1 MiB block
    let ops = vec![
        Op::Write { at: 0, count: 16 }, // allocates block 0 (and starts the session)
        Op::Write { at: 40, count: 8 }, // same block: no metadata
        Op::Flush,
        Op::Write {
            at: spb - 8,
            count: 16,
        }, // crosses into block 1: allocates it
        Op::Write {
            at: 2 * spb + 100,
            count: spb + 300,
        }, // blocks 2 and 3
        Op::Flush,
        Op::Unmap { first: 2, count: 1 },
        Op::Flush,
        Op::Write {
            at: 2 * spb + 8,
            count: 8,
        }, // block 2 again
        Op::Write { at: 1, count: 1 }, // overwrite acknowledged data
        Op::Resize(12 * MIB),
        Op::Write {
            at: 11 * spb + 5,
            count: 30,
        }, // the new area
        Op::Flush,
        Op::Write {
            at: 5 * spb,
            count: 2,
        },
        Op::Close,
    ];
    let setup = Setup {
        image: new_image(size, 1 << 20),
        block: MIB,
        size,
        parent: None,
        initial: Vec::new(),
        ops,
        qemu: true,
    };
    let runs = crash_everywhere(&setup, "dynamic");
    assert!(runs > 100, "{runs}");
}

#[test]
fn differencing_disk_survives_a_crash_at_every_write() {
    // A parent with data everywhere, then a child whose writes set sector bitmap bits.
    let size = 6 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    disk::vhdx::create::create(
        &base,
        &CreateParams {
            virtual_size: size,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut initial = vec![0u8; size as usize];
    common::Rng::new(5).fill(&mut initial);
    {
        let d = Vhdx::open(&base, OpenOptions::default()).unwrap();
        d.write_at(0, &initial).unwrap();
        d.close().unwrap();
    }
    disk::vhdx::create::create_differencing(&child, &base, Some(1 << 20)).unwrap();
    let parent: Arc<dyn BlockBackend> = Arc::new(
        Vhdx::open(
            &base,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let spb = MIB / SECTOR;
    let ops = vec![
        Op::Write { at: 3, count: 1 }, // partial block: bitmap block allocated
        Op::Write { at: 9, count: 2 }, // more bits in the same block
        Op::Flush,
        Op::Write {
            at: spb,
            count: spb,
        }, // a whole block: fully present
        Op::Write {
            at: 3 * spb - 1,
            count: 2,
        }, // two partial blocks
        Op::Flush,
        Op::Unmap { first: 4, count: 1 }, // zero state hides the parent
        Op::Write {
            at: 4 * spb + 7,
            count: 1,
        },
        Op::Write { at: 3, count: 1 }, // overwrite (bit already set: no metadata)
        Op::Flush,
        Op::Write {
            at: 5 * spb + 2,
            count: 3,
        },
        Op::Close,
    ];
    let setup = Setup {
        image: std::fs::read(&child).unwrap(),
        block: MIB,
        size,
        parent: Some(parent),
        initial,
        ops,
        qemu: false, // QEMU does not open differencing VHDX
    };
    let runs = crash_everywhere(&setup, "differencing");
    assert!(runs > 60, "{runs}");
}
