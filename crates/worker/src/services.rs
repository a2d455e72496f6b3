//! The VM's integration services as the control socket sees them (heartbeat, shutdown, KVP).
//! Each is present only when the VM is enlightened and the service is enabled.

use serde_json::{json, Value};

/// Handles on this boot's integration services.
#[derive(Default, Clone)]
pub struct Services {}

impl Services {
    pub fn heartbeat_json(&self) -> Value {
        json!({"status": "unavailable"})
    }

    pub fn request_shutdown(&self, _reboot: bool) -> Result<(), String> {
        Err("the VM has no shutdown integration service".into())
    }

    pub fn kvp(&self, _op: &str, _req: &Value) -> Result<Value, String> {
        Err("the VM has no KVP integration service".into())
    }
}
