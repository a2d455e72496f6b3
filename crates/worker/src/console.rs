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
    /// A listening unix socket (see [`SocketHub`]).
    Socket(PathBuf),
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
            SerialTarget::Socket(p) => write!(f, "unix:{}", p.display()),
            SerialTarget::Stream { .. } => write!(f, "stream"),
            SerialTarget::None => write!(f, "none"),
        }
    }
}

pub use cliutil::RawMode;

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

/// A serial console on a unix socket for any number of clients: each sees COM1's output (the
/// last 64 KiB replayed first), and bytes from any of them are fed to COM1. A client that does
/// not take its output within [`CLIENT_STALL`] is dropped, so no client can stall the guest.
pub struct SocketHub {
    inner: Mutex<HubState>,
    path: PathBuf,
}

struct HubState {
    clients: Vec<(u64, std::os::unix::net::UnixStream)>,
    backlog: std::collections::VecDeque<u8>,
    uart: Option<Arc<Mutex<devices::serial::Uart>>>,
    next_id: u64,
}

const BACKLOG: usize = 64 << 10;

/// How long a write to one console client may block the guest's COM1 output.
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_millis(50);

impl SocketHub {
    /// Binds `path` (replacing a stale socket file, never another kind of file).
    pub fn bind(path: PathBuf, stop: Arc<AtomicBool>) -> std::io::Result<Arc<Self>> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if m.file_type().is_socket() {
                std::fs::remove_file(&path)?;
            } else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
        }
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        let hub = Arc::new(SocketHub {
            inner: Mutex::new(HubState {
                clients: Vec::new(),
                backlog: std::collections::VecDeque::new(),
                uart: None,
                next_id: 0,
            }),
            path,
        });
        let h = hub.clone();
        std::thread::Builder::new()
            .name("console-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(c) = conn {
                        h.attach(c, stop.clone());
                    }
                }
            })?;
        Ok(hub)
    }

    fn attach(self: &Arc<Self>, mut c: std::os::unix::net::UnixStream, stop: Arc<AtomicBool>) {
        if c.set_write_timeout(Some(CLIENT_STALL)).is_err() {
            return;
        }
        let (reader, id) = {
            let mut st = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (a, b) = st.backlog.as_slices();
            if c.write_all(a).and_then(|_| c.write_all(b)).is_err() {
                return;
            }
            let Ok(reader) = c.try_clone() else { return };
            st.next_id += 1;
            let id = st.next_id;
            st.clients.push((id, c));
            (reader, id)
        };
        let hub = self.clone();
        let _ = std::thread::Builder::new()
            .name("console-client".into())
            .spawn(move || {
                let mut reader = reader;
                let mut buf = [0u8; 256];
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let uart = hub
                        .inner
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .uart
                        .clone();
                    if let Some(u) = uart {
                        feed(&u, &buf[..n], &stop);
                    }
                }
                let mut st = hub.inner.lock().unwrap_or_else(|e| e.into_inner());
                st.clients.retain(|(i, _)| *i != id);
            });
    }

    /// How many clients are attached.
    pub fn clients(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clients
            .len()
    }

    /// Connects the hub's input to a (new) UART after each boot.
    pub fn set_uart(&self, uart: Arc<Mutex<devices::serial::Uart>>) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).uart = Some(uart);
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for SocketHub {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Output side of a [`SocketHub`].
pub struct HubWriter(pub Arc<SocketHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut st = self.0.inner.lock().unwrap_or_else(|e| e.into_inner());
        st.backlog.extend(buf);
        let excess = st.backlog.len().saturating_sub(BACKLOG);
        st.backlog.drain(..excess);
        // A client that errs or does not keep up is dropped (its reader thread ends when the
        // socket is shut down).
        st.clients.retain_mut(|(_, c)| {
            let ok = c.write_all(buf).is_ok();
            if !ok {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
            ok
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The console's host side, kept across reboots.
pub(crate) struct Console {
    pub out: Arc<Mutex<Box<dyn std::io::Write + Send>>>,
    pub hub: Option<Arc<SocketHub>>,
    pub input: Mutex<Option<Box<dyn std::io::Read + Send>>>,
    pub escape: bool,
    _raw: Option<RawMode>,
    pub input_stop: Arc<AtomicBool>,
}

pub(crate) struct SharedOut(pub Arc<Mutex<Box<dyn std::io::Write + Send>>>);

impl std::io::Write for SharedOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

impl Console {
    pub fn open(target: SerialTarget) -> Result<Self, crate::WorkerError> {
        let input_stop = Arc::new(AtomicBool::new(false));
        let mut hub = None;
        let (out, input, escape, raw): (
            Box<dyn std::io::Write + Send>,
            Option<Box<dyn std::io::Read + Send>>,
            bool,
            _,
        ) = match target {
            SerialTarget::Stdio => {
                let raw = RawMode::enable();
                let esc = raw.is_some();
                (
                    Box::new(StdoutSink),
                    Some(Box::new(std::io::stdin())),
                    esc,
                    raw,
                )
            }
            SerialTarget::File(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| {
                        crate::WorkerError::Config(format!(
                            "cannot open serial output {}: {e}",
                            p.display()
                        ))
                    })?;
                (Box::new(f), None, false, None)
            }
            SerialTarget::Socket(p) => {
                let h = SocketHub::bind(p.clone(), input_stop.clone()).map_err(|e| {
                    crate::WorkerError::Config(format!("cannot listen on {}: {e}", p.display()))
                })?;
                hub = Some(h.clone());
                (Box::new(HubWriter(h)), None, false, None)
            }
            SerialTarget::Stream { out, input } => (out, input, false, None),
            SerialTarget::None => (Box::new(std::io::sink()), None, false, None),
        };
        Ok(Console {
            out: Arc::new(Mutex::new(out)),
            hub,
            input: Mutex::new(input),
            escape,
            _raw: raw,
            input_stop,
        })
    }

    pub fn shutdown(&self) {
        self.input_stop.store(true, Ordering::Relaxed);
        let _ = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn read_for(c: &mut UnixStream, want: &[u8]) -> Vec<u8> {
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end && !got.windows(want.len()).any(|w| w == want) {
            if let Ok(n) = c.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        got
    }

    fn wait_clients(hub: &SocketHub, n: usize) {
        let end = Instant::now() + Duration::from_secs(10);
        while hub.clients() != n {
            assert!(Instant::now() < end, "{} clients, not {n}", hub.clients());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn every_client_sees_the_output_and_a_stuck_one_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let hub = SocketHub::bind(dir.path().join("con.sock"), stop.clone()).unwrap();
        let mut out = HubWriter(hub.clone());
        out.write_all(b"early boot\n").unwrap();

        let mut a = UnixStream::connect(hub.path()).unwrap();
        wait_clients(&hub, 1);
        let mut b = UnixStream::connect(hub.path()).unwrap();
        wait_clients(&hub, 2);
        out.write_all(b"later\n").unwrap();
        for c in [&mut a, &mut b] {
            let got = read_for(c, b"later\n");
            assert_eq!(got, b"early boot\nlater\n", "replay, then live output");
        }

        // `b` stops reading: the guest's output never waits on it for long, and it is dropped.
        let line = [b'x'; 1024];
        let mut sent = 0usize;
        while hub.clients() == 2 {
            out.write_all(&line).unwrap();
            sent += line.len();
            let _ = read_for_nonblocking(&mut a);
            assert!(sent < 64 << 20, "the stuck client was never dropped");
        }
        wait_clients(&hub, 1);
        out.write_all(b"still here\n").unwrap();
        assert!(read_for(&mut a, b"still here\n").ends_with(b"still here\n"));
        stop.store(true, Ordering::Relaxed);
    }

    fn read_for_nonblocking(c: &mut UnixStream) -> usize {
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut buf = [0u8; 65536];
        let mut n = 0;
        while let Ok(k) = c.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    }
}
