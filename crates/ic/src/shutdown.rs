//! The shutdown service: ask the guest to power off, reboot or hibernate.
//!
//! **What it is.** On request the host sends IC message type 3, `shutdown_msg_data {u32
//! reason_code, u32 timeout_seconds, u32 flags, u8 display_message[2048]}`, with `flags` 0
//! (power off), 2 (reboot) or 4 (hibernate), plus 1 to force. Linux (`hv_util.c`,
//! `shutdown_onchannelcallback`) answers status `HV_S_OK` and then starts
//! `orderly_poweroff` / `orderly_reboot` for flags 0-3, accepts 4-5 only when it can
//! hibernate, and answers `HV_E_FAIL` otherwise. The answer tells whether the guest
//! *accepted*; whether it then really goes down is for the worker to watch (VM state).
//!
//! **What it talks to.** Its channel through the IC engine, and the worker's control
//! socket through [`ShutdownHandle`].
//!
//! **What it must never do.** Report success without a well-formed `HV_S_OK` answer; wait
//! longer than [`ShutdownConfig::timeout`].

use std::sync::Arc;
use std::time::Duration;

use crate::framework::{Core, IcVsp, Service, ServiceSpec, ServiceStatus};
use crate::protocol::{
    self, HV_S_OK, MSGTYPE_SHUTDOWN, SHUTDOWN_FLAG_FORCE, SHUTDOWN_FLAG_HIBERNATE,
    SHUTDOWN_FLAG_POWER_OFF, SHUTDOWN_FLAG_REBOOT, SHUTDOWN_VERSIONS,
};
use crate::{Guid, IcError};

/// The shutdown device class.
pub const SHUTDOWN_CLASS: Guid = Guid::from_str_const("0e0b6031-5213-4934-818b-38d90ced39db");

static SPEC: ServiceSpec = ServiceSpec {
    name: "shutdown",
    class_id: SHUTDOWN_CLASS,
    msg_type: MSGTYPE_SHUTDOWN,
    versions: SHUTDOWN_VERSIONS,
    hint: "",
};

/// Shutdown settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// How long a request waits for the guest's answer.
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
        }
    }
}

/// What the guest is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownAction {
    /// Power off.
    PowerOff,
    /// Reboot.
    Reboot,
    /// Hibernate (Linux accepts it only when it can hibernate).
    Hibernate,
}

/// A shutdown request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// What to do.
    pub action: ShutdownAction,
    /// Ask for a forced action (Linux always acts the same way).
    pub force: bool,
    /// Reason code (informational).
    pub reason_code: u32,
    /// Timeout in seconds (informational).
    pub timeout_seconds: u32,
    /// Text for the guest's users (at most 2047 bytes are sent; Linux ignores it).
    pub message: String,
}

impl ShutdownRequest {
    /// Power off, or reboot.
    pub fn new(reboot: bool) -> Self {
        Self {
            action: if reboot {
                ShutdownAction::Reboot
            } else {
                ShutdownAction::PowerOff
            },
            force: false,
            reason_code: 0,
            timeout_seconds: 0,
            message: String::new(),
        }
    }

    /// The `flags` field.
    pub fn flags(&self) -> u32 {
        let base = match self.action {
            ShutdownAction::PowerOff => SHUTDOWN_FLAG_POWER_OFF,
            ShutdownAction::Reboot => SHUTDOWN_FLAG_REBOOT,
            ShutdownAction::Hibernate => SHUTDOWN_FLAG_HIBERNATE,
        };
        if self.force {
            base | SHUTDOWN_FLAG_FORCE
        } else {
            base
        }
    }
}

struct Shutdown;

impl Service for Shutdown {}

/// The shutdown service's handle: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    core: Arc<Core>,
    config: ShutdownConfig,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Ask the guest to power off (`reboot == false`) or reboot; `Ok` when it accepted.
    pub fn request_shutdown(&self, reboot: bool) -> Result<(), IcError> {
        self.request(&ShutdownRequest::new(reboot))
    }

    /// Send `req`; `Ok` when the guest accepted (status `HV_S_OK`), [`IcError::Refused`]
    /// with its status otherwise.
    pub fn request(&self, req: &ShutdownRequest) -> Result<(), IcError> {
        let flags = req.flags();
        let reply = self.core.transact(self.config.timeout, |neg, id| {
            protocol::build_shutdown(
                neg,
                id,
                flags,
                req.reason_code,
                req.timeout_seconds,
                &req.message,
            )
        })?;
        if reply.status != HV_S_OK {
            return Err(IcError::Refused {
                service: SPEC.name,
                status: reply.status,
            });
        }
        tracing::info!("guest accepted shutdown request (flags {flags})");
        Ok(())
    }

    /// The channel's status.
    pub fn status(&self) -> ServiceStatus {
        self.core.status()
    }
}

/// A shutdown VSP and its handle; the instance id derives from `seed`.
pub fn new(seed: &[u8], config: ShutdownConfig) -> (IcVsp, ShutdownHandle) {
    let core = Core::new(&SPEC);
    let vsp = IcVsp::new(
        core.clone(),
        Arc::new(Shutdown),
        crate::instance_id(seed, SHUTDOWN_CLASS),
    );
    (vsp, ShutdownHandle { core, config })
}
