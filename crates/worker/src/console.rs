//! The serial console's host side: where COM1's output goes and where its input comes from.
//!
//! `stdio` on a terminal puts the terminal in raw mode (restored on exit) and watches for the
//! escape key, Ctrl-] (0x1d), which ends the VM; on a pipe, input is forwarded until EOF.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The escape byte that quits an interactive console: Ctrl-].
pub const ESCAPE: u8 = 0x1d;

/// Where COM1 goes.
pub enum SerialTarget {
    /// The worker's stdin/stdout.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output to any writer; input from an optional reader (tests, the control channel).
    Stream {
        out: Box<dyn Write + Send>,
        input: Option<Box<dyn Read + Send>>,
    },
    /// Nothing.
    None,
}

impl std::fmt::Debug for SerialTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialTarget::Stdio => write!(f, "stdio"),
            SerialTarget::File(p) => write!(f, "file:{}", p.display()),
            SerialTarget::Stream { .. } => write!(f, "stream"),
            SerialTarget::None => write!(f, "none"),
        }
    }
}

/// Restores the terminal when dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal.
    pub fn enable() -> Option<Self> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a zeroed, then filled, termios.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Keep output post-processing so host log lines stay readable.
            t.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enable` on the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// Output sink writing straight to stdout (unbuffered: every byte the guest writes shows).
pub struct StdoutSink;

impl Write for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = std::io::stdout().lock();
        o.write_all(buf)?;
        o.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Forwards input bytes into the UART, respecting its FIFO; stops at EOF, on `stop`, or on the
/// escape byte (then calls `on_escape`).
pub fn pump_input(
    mut input: Box<dyn Read + Send>,
    uart: Arc<Mutex<devices::serial::Uart>>,
    stop: Arc<AtomicBool>,
    watch_escape: bool,
    on_escape: impl Fn() + Send + 'static,
) {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut data = &buf[..n];
                if watch_escape {
                    if let Some(i) = data.iter().position(|b| *b == ESCAPE) {
                        data = &data[..i];
                        feed(&uart, data, &stop);
                        on_escape();
                        return;
                    }
                }
                feed(&uart, data, &stop);
            }
        })
        .ok();
}

fn feed(uart: &Mutex<devices::serial::Uart>, mut data: &[u8], stop: &AtomicBool) {
    while !data.is_empty() && !stop.load(Ordering::Relaxed) {
        let n = uart
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(data);
        data = &data[n..];
        if !data.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
