//! The worker's control channel: a unix socket speaking JSON, one request per line and one
//! response line per request. The management service drives workers through it; a user can
//! too (`verdigris vm-control`).
//!
//! Requests: `{"op": "status"}`, `{"op": "shutdown", "reboot": false}` (clean, through the
//! guest: the shutdown integration service, or the ACPI power button when the guest has none),
//! `{"op": "power-button"}`, `{"op": "turn-off"}`, `{"op": "pause"}`, `{"op": "resume"}`,
//! `{"op": "heartbeat"}`, `{"op": "timesync"}` (host time to the guest now, SYNC),
//! `{"op": "kvp-get", "pool": 0, "key": "k"}`,
//! `{"op": "kvp-set", "pool": 0, "key": "k", "value": "v"}`,
//! `{"op": "kvp-delete", "pool": 0, "key": "k"}`, `{"op": "kvp-list", "pool": 3}`.
//! Responses: `{"ok": true, ...}` or `{"ok": false, "error": "one line"}`.
//!
//! Must never: block a VP thread, trust a request (size-limited lines, unknown ops refused),
//! or outlive the worker (the socket file is removed when the worker ends).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 << 10;

/// What one boot of the VM exposes to the control socket.
pub(crate) struct BootHandles {
    pub control: Arc<crate::Control>,
    pub pm: Arc<Mutex<devices::acpi_pm::AcpiPm>>,
    pub services: crate::services::Services,
}

/// Shared across the VM's boots: the socket answers for whichever boot is current.
pub struct ControlHub {
    started: Instant,
    boots: AtomicU32,
    vps: u32,
    memory: u64,
    current: Mutex<Option<Arc<BootHandles>>>,
    finished: Mutex<crate::Stats>,
}

impl ControlHub {
    pub(crate) fn new(vps: u32, memory: u64) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            boots: AtomicU32::new(0),
            vps,
            memory,
            current: Mutex::new(None),
            finished: Mutex::new(crate::Stats::default()),
        })
    }

    pub(crate) fn boot_started(&self, h: Arc<BootHandles>) {
        self.boots.fetch_add(1, Ordering::Relaxed);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    }

    pub(crate) fn boot_ended(&self, stats: &crate::Stats) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut f = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        *f = stats.clone();
    }

    fn current(&self) -> Option<Arc<BootHandles>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Answers one request.
    pub fn handle(&self, req: &Value) -> Value {
        match self.dispatch(req) {
            Ok(mut v) => {
                v["ok"] = json!(true);
                v
            }
            Err(e) => json!({"ok": false, "error": e}),
        }
    }

    fn dispatch(&self, req: &Value) -> Result<Value, String> {
        let op = req
            .get("op")
            .and_then(Value::as_str)
            .ok_or("request has no \"op\"")?;
        let boot = self.current();
        let need = || {
            boot.clone()
                .ok_or_else(|| "the VM is not running".to_string())
        };
        match op {
            "status" => {
                let (state, stats) = match &boot {
                    Some(b) if b.control.stopped() => ("stopping", b.control.live_stats()),
                    Some(b) if b.control.is_paused() => ("paused", b.control.live_stats()),
                    Some(b) => ("running", b.control.live_stats()),
                    None => (
                        "off",
                        self.finished
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone(),
                    ),
                };
                let mut v = json!({
                    "state": state,
                    "uptime_secs": self.started.elapsed().as_secs(),
                    "boots": self.boots.load(Ordering::Relaxed),
                    "vps": self.vps,
                    "memory_bytes": self.memory,
                    "counters": stats.to_json(),
                });
                if let Some(b) = &boot {
                    v["heartbeat"] = b.services.heartbeat_json();
                }
                Ok(v)
            }
            "pause" => {
                need()?.control.pause();
                Ok(json!({}))
            }
            "resume" => {
                need()?.control.resume();
                Ok(json!({}))
            }
            "turn-off" => {
                need()?.control.stop(crate::StopReason::TurnedOff);
                Ok(json!({}))
            }
            "power-button" => {
                need()?
                    .pm
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .press_power_button();
                Ok(json!({}))
            }
            "shutdown" => {
                let b = need()?;
                let reboot = req.get("reboot").and_then(Value::as_bool).unwrap_or(false);
                match b.services.request_shutdown(reboot) {
                    Ok(()) => Ok(json!({"via": "shutdown integration service"})),
                    Err(why) if !reboot => {
                        b.pm.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .press_power_button();
                        Ok(json!({"via": "ACPI power button", "note": why}))
                    }
                    Err(why) => Err(why),
                }
            }
            "heartbeat" => Ok(json!({"heartbeat": need()?.services.heartbeat_json()})),
            "timesync" => need()?.services.timesync_now(),
            "kvp-get" | "kvp-set" | "kvp-delete" | "kvp-list" => {
                need()?.services.kvp(op, req).map_err(|e| e.to_string())
            }
            other => Err(format!("unknown op '{other}'")),
        }
    }
}

/// The listening socket (removed when dropped).
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl ControlSocket {
    pub fn bind(path: PathBuf, hub: Arc<ControlHub>) -> std::io::Result<Self> {
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
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(c) = conn {
                        let hub = hub.clone();
                        let _ = std::thread::Builder::new()
                            .name("control-client".into())
                            .spawn(move || serve(c, &hub));
                    }
                }
            })?;
        Ok(Self { path, stop })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so its thread ends.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(c: UnixStream, hub: &ControlHub) {
    let Ok(mut out) = c.try_clone() else { return };
    let mut reader = BufReader::new(c);
    loop {
        let mut line = String::new();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
            let _ = writeln!(out, "{}", json!({"ok": false, "error": "request too long"}));
            return;
        }
        let resp = match serde_json::from_str::<Value>(line.trim()) {
            Ok(req) => hub.handle(&req),
            Err(e) => json!({"ok": false, "error": format!("malformed JSON: {e}")}),
        };
        if writeln!(out, "{resp}").is_err() {
            return;
        }
    }
}
