//! COM1 output (16550 at 0x3F8), polled: wait for LSR.THRE, write THR. A spinlock keeps the
//! lines of different CPUs from interleaving.

use crate::io::{inb, outb};
use core::sync::atomic::{AtomicBool, Ordering};

pub const COM1: u16 = 0x3F8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
pub const LSR: u16 = COM1 + 5;
pub const SCRATCH: u16 = COM1 + 7;
const LSR_THRE: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

/// 8N1, DLAB off, no interrupts, DTR|RTS. The baud divisor is left alone: it means nothing
/// to a virtual UART, and a divisor write through THR would reach the output of a model that
/// ignores DLAB.
pub fn init() {
    // SAFETY: 0x3F8..0x3FF is COM1 by the boot contract; these writes only configure the UART.
    unsafe {
        outb(LCR, 0x03);
        outb(IER, 0x00);
        outb(MCR, 0x03);
    }
}

#[inline(never)]
fn put(byte: u8) {
    // Bounded wait: a UART that never reports THRE would otherwise hang the guest silently.
    for _ in 0..1000 {
        // SAFETY: reading COM1's LSR has no side effects on memory.
        if unsafe { inb(LSR) } & LSR_THRE != 0 {
            break;
        }
    }
    // SAFETY: writing COM1's THR transmits a byte.
    unsafe { outb(THR, byte) };
}

/// Capacity of a capturing writer.
const CAPTURE_LEN: usize = 160;

/// A handle for writing to COM1; `lock()` holds the line lock until dropped. A capturing
/// writer (`capture()`) formats into a small buffer instead, for text that must be printed
/// later in a line.
pub struct Writer {
    locked: bool,
    capture: Option<([u8; CAPTURE_LEN], usize)>,
}

impl Writer {
    pub fn lock() -> Writer {
        while LOCK.swap(true, Ordering::Acquire) {
            core::hint::spin_loop();
        }
        Writer {
            locked: true,
            capture: None,
        }
    }

    /// Without the lock: for fault and panic paths, where the lock may be held already.
    pub fn unlocked() -> Writer {
        Writer {
            locked: false,
            capture: None,
        }
    }

    /// Into a buffer (silently truncated when full), read back with `captured`.
    pub fn capture() -> Writer {
        Writer {
            locked: false,
            capture: Some(([0; CAPTURE_LEN], 0)),
        }
    }

    pub fn captured(&self) -> &[u8] {
        match &self.capture {
            Some((buf, len)) => &buf[..*len],
            None => &[],
        }
    }

    fn emit(&mut self, b: u8) {
        match &mut self.capture {
            Some((buf, len)) => {
                if *len < CAPTURE_LEN {
                    buf[*len] = b;
                    *len += 1;
                }
            }
            None => put(b),
        }
    }

    pub fn byte(&mut self, b: u8) -> &mut Self {
        self.emit(b);
        self
    }

    #[inline(never)]
    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            self.emit(b);
        }
        self
    }

    #[inline(never)]
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Bytes with everything outside 0x20..=0x7E shown as '?'.
    #[inline(never)]
    pub fn printable(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            self.emit(if (0x20..=0x7e).contains(&b) { b } else { b'?' });
        }
        self
    }

    /// Lower-case hexadecimal with a `0x` prefix and no leading zeros.
    #[inline(never)]
    pub fn hex(&mut self, v: u64) -> &mut Self {
        self.str("0x");
        let digits = if v == 0 {
            1
        } else {
            (64 - v.leading_zeros()).div_ceil(4)
        };
        for i in (0..digits).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            self.emit(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
        self
    }

    pub fn dec(&mut self, v: u64) -> &mut Self {
        self.dec_width(v, 1)
    }

    /// Decimal, zero-padded to at least `width` digits.
    #[inline(never)]
    pub fn dec_width(&mut self, mut v: u64, width: usize) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut n = 0;
        while v != 0 || n < width.min(20) {
            buf[19 - n] = b'0' + (v % 10) as u8;
            v /= 10;
            n += 1;
            if n == 20 {
                break;
            }
        }
        self.bytes(&buf[20 - n..])
    }

    /// "ok" or "FAIL".
    #[inline(never)]
    pub fn verdict(&mut self, ok: bool) -> &mut Self {
        self.str(if ok { "ok" } else { "FAIL" })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}

impl core::fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.str(s);
        Ok(())
    }
}
