//! The VM's integration services (heartbeat, shutdown, time sync, KVP from the `ic` crate) as
//! the worker wires them: which ones a VM gets, and what the control socket asks of them.
//! Each is present only when the VM is enlightened and the service is enabled.

use serde_json::{json, Value};

/// Which integration services a VM offers (all on by default, as on Hyper-V).
#[derive(Debug, Clone, Copy)]
pub struct IcSettings {
    pub heartbeat: bool,
    pub shutdown: bool,
    pub timesync: bool,
    pub kvp: bool,
}

impl Default for IcSettings {
    fn default() -> Self {
        Self {
            heartbeat: true,
            shutdown: true,
            timesync: true,
            kvp: true,
        }
    }
}

/// Handles on this boot's integration services.
#[derive(Default, Clone)]
pub struct Services {
    pub ic: ic::IcHandles,
}

fn pool(req: &Value) -> Result<ic::KvpPool, String> {
    let n = req
        .get("pool")
        .and_then(Value::as_u64)
        .ok_or("KVP requests need a \"pool\" (0-4)")?;
    u8::try_from(n)
        .ok()
        .and_then(ic::KvpPool::from_number)
        .ok_or_else(|| format!("KVP pool {n} does not exist (0-4)"))
}

fn string<'a>(req: &'a Value, name: &str) -> Result<&'a str, String> {
    req.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("KVP request needs a string \"{name}\""))
}

impl Services {
    pub fn heartbeat_json(&self) -> Value {
        let Some(h) = &self.ic.heartbeat else {
            return json!({"status": "not offered"});
        };
        let r = h.report();
        json!({
            "status": match r.status {
                ic::heartbeat::HeartbeatStatus::Unknown => "unknown",
                ic::heartbeat::HeartbeatStatus::Healthy => "healthy",
                ic::heartbeat::HeartbeatStatus::NoContact => "no contact",
            },
            "seconds_since_last": r.since_last_answer.map(|d| d.as_secs_f64()),
            "sent": r.sent,
            "answered": r.answered,
            "missed": r.missed,
        })
    }

    pub fn request_shutdown(&self, reboot: bool) -> Result<(), String> {
        match &self.ic.shutdown {
            Some(s) => s.request_shutdown(reboot).map_err(|e| e.to_string()),
            None => Err("the VM has no shutdown integration service".into()),
        }
    }

    /// Pushes host time to the guest now with the SYNC flag (the guest steps its clock).
    pub fn timesync_now(&self) -> Result<Value, String> {
        let t = self
            .ic
            .timesync
            .as_ref()
            .ok_or("the VM has no time synchronization integration service")?;
        let s = t.sync_now().map_err(|e| e.to_string())?;
        Ok(json!({"host_time_filetime": s.host_time, "reference_time": s.reference_time}))
    }

    pub fn kvp(&self, op: &str, req: &Value) -> Result<Value, String> {
        let k = self
            .ic
            .kvp
            .as_ref()
            .ok_or("the VM has no KVP integration service")?;
        let p = pool(req)?;
        let e = |e: ic::IcError| e.to_string();
        match op {
            "kvp-get" => Ok(json!({"value": k.get(p, string(req, "key")?).map_err(e)?})),
            "kvp-set" => {
                k.set(p, string(req, "key")?, string(req, "value")?)
                    .map_err(e)?;
                Ok(json!({}))
            }
            "kvp-delete" => Ok(json!({"deleted": k.delete(p, string(req, "key")?).map_err(e)?})),
            "kvp-list" => {
                let items: serde_json::Map<String, Value> = k
                    .enumerate(p)
                    .map_err(e)?
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                Ok(json!({"items": items}))
            }
            other => Err(format!("unknown op '{other}'")),
        }
    }
}
