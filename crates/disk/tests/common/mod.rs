//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use disk::Storage;

pub const MIB: u64 = 1 << 20;

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Runs `qemu-img` with `args`; returns (success, stdout+stderr).
pub fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for the interop tests (Debian: qemu-utils)");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Asserts `qemu-img check` passes on a VHDX.
pub fn assert_qemu_check(path: &Path) {
    let (ok, out) = qemu_img(&["check", "-f", "vhdx", path.to_str().unwrap()]);
    assert!(ok, "qemu-img check failed on {}: {out}", path.display());
}

/// Asserts `qemu-img compare` finds a VHDX identical to a raw file.
pub fn assert_qemu_compare(vhdx: &Path, raw: &Path) {
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        vhdx.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        ok,
        "qemu-img compare {} vs {}: {out}",
        vhdx.display(),
        raw.display()
    );
}

/// A storage that simulates a power loss: after `budget` mutating calls (write, set_len,
/// flush) every further call fails, and the state that "survives" is computed according to
/// `mode` from what had been flushed.
pub struct FaultStorage {
    inner: Mutex<FaultState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Like a killed process: every completed write survives; the write that hit the budget is
    /// torn (only its first 4 KiB lands).
    KeepWrites,
    /// Like a power loss with a volatile cache: writes since the last flush are all lost.
    DropUnflushed,
    /// Power loss with reordering: of the writes since the last flush, every other one
    /// survives.
    DropSomeUnflushed,
}

struct FaultState {
    /// What reads see (all completed writes).
    current: Vec<u8>,
    /// Writes since the last flush, in order: (offset, new bytes, bytes they replaced).
    pending: Vec<(u64, Vec<u8>, Vec<u8>)>,
    ops: u64,
    budget: u64,
    crashed: bool,
    mode: CrashMode,
}

fn crashed() -> io::Error {
    io::Error::other("simulated power loss")
}

/// Grows `v` with zeros (memcpy from a calloc'd buffer: `resize` is a byte loop in debug
/// builds, far too slow for megabytes).
fn grow(v: &mut Vec<u8>, len: usize) {
    if v.len() < len {
        let n = len - v.len();
        v.extend_from_slice(&vec![0u8; n]);
    }
}

fn apply(v: &mut Vec<u8>, off: u64, data: &[u8]) {
    let end = off as usize + data.len();
    grow(v, end);
    v[off as usize..end].copy_from_slice(data);
}

impl FaultStorage {
    pub fn new(image: Vec<u8>, budget: u64, mode: CrashMode) -> FaultStorage {
        FaultStorage {
            inner: Mutex::new(FaultState {
                current: image,
                pending: Vec::new(),
                ops: 0,
                budget,
                crashed: false,
                mode,
            }),
        }
    }

    /// Mutating operations performed so far.
    pub fn ops(&self) -> u64 {
        self.inner.lock().unwrap().ops
    }

    pub fn has_crashed(&self) -> bool {
        self.inner.lock().unwrap().crashed
    }

    /// The image as it would be found after the crash (or now, if none happened).
    pub fn surviving_image(&self) -> Vec<u8> {
        let s = self.inner.lock().unwrap();
        let mut v = s.current.clone();
        if s.mode == CrashMode::KeepWrites {
            return v;
        }
        for (off, _, old) in s.pending.iter().rev() {
            apply(&mut v, *off, old);
        }
        if s.mode == CrashMode::DropSomeUnflushed {
            for (i, (off, new, _)) in s.pending.iter().enumerate() {
                if i % 2 == 1 {
                    apply(&mut v, *off, new);
                }
            }
        }
        v
    }

    /// Counts an operation; `Ok(false)` for the one that hits the budget, `Err` after it.
    fn tick(s: &mut FaultState) -> io::Result<bool> {
        if s.crashed {
            return Err(crashed());
        }
        s.ops += 1;
        if s.ops > s.budget {
            s.crashed = true;
            return Ok(false);
        }
        Ok(true)
    }
}

impl Storage for FaultStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.inner.lock().unwrap();
        if s.crashed {
            return Err(crashed());
        }
        let end = offset as usize + buf.len();
        if end > s.current.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past end"));
        }
        buf.copy_from_slice(&s.current[offset as usize..end]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.inner.lock().unwrap();
        if !Self::tick(&mut s)? {
            if s.mode == CrashMode::KeepWrites {
                let n = buf.len().min(4096);
                apply(&mut s.current, offset, &buf[..n]);
            }
            return Err(crashed());
        }
        // Growth by writing past the end counts as durable, like set_len below.
        let end = offset as usize + buf.len();
        grow(&mut s.current, end);
        let old = s.current[offset as usize..end].to_vec();
        apply(&mut s.current, offset, buf);
        s.pending.push((offset, buf.to_vec(), old));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = self.inner.lock().unwrap();
        if !Self::tick(&mut s)? {
            return Err(crashed());
        }
        s.pending.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.inner.lock().unwrap();
        if s.crashed {
            return Err(crashed());
        }
        Ok(s.current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.inner.lock().unwrap();
        if !Self::tick(&mut s)? {
            return Err(crashed());
        }
        // File size changes are treated as durable at once (a journalling filesystem commits
        // them in order); the log's FlushedFileOffset covers the other case. Only growth is
        // modelled: the VHDX code never shrinks a file.
        assert!(
            len >= s.current.len() as u64,
            "FaultStorage models growth only"
        );
        grow(&mut s.current, len as usize);
        Ok(())
    }
}
