//! The service's data model: VM definitions, lifecycle states, disks, events, and the request
//! bodies of the API, with the validation every request goes through before it touches the
//! inventory.

use serde::{Deserialize, Serialize};

/// Smallest guest RAM accepted (the test guest needs 4 MiB; Linux far more).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest RAM accepted.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Guest RAM is a whole number of these (Hyper-V asks for multiples of 2 MB too).
pub const MEMORY_ALIGN: u64 = 2 << 20;
/// Most virtual processors per VM (the worker's own limit; the host may allow fewer).
pub const MAX_PROCESSORS: u32 = 255;
/// SCSI controllers per VM and LUNs per controller (Hyper-V: 4 × 64).
pub const SCSI_CONTROLLERS: u32 = 4;
pub const SCSI_LUNS: u32 = 64;
/// Longest VM name and note.
pub const MAX_NAME: usize = 100;
pub const MAX_NOTES: usize = 4096;
pub const MAX_CMDLINE: usize = 4096;
pub const MAX_PATH: usize = 4096;
pub const MAX_ADAPTERS: usize = 8;

/// Hyper-V's VM states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum VmState {
    Off,
    Starting,
    Running,
    Paused,
    Saving,
    Saved,
    Stopping,
}

impl VmState {
    pub const ALL: [VmState; 7] = [
        VmState::Off,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Saving,
        VmState::Saved,
        VmState::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Off => "Off",
            VmState::Starting => "Starting",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Saving => "Saving",
            VmState::Saved => "Saved",
            VmState::Stopping => "Stopping",
        }
    }

    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// A worker process exists (or should) in this state.
    pub fn has_worker(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Saving
        )
    }

    /// The lifecycle state machine: may a VM go from `self` to `to`?
    pub fn can_become(self, to: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, to),
            (Off, Starting)
                | (Saved, Starting)
                | (Saved, Off)
                | (Starting, Running)
                | (Starting, Paused)
                | (Starting, Off)
                | (Running, Paused)
                | (Running, Stopping)
                | (Running, Saving)
                | (Running, Off)
                | (Paused, Running)
                | (Paused, Stopping)
                | (Paused, Saving)
                | (Paused, Off)
                | (Saving, Saved)
                | (Saving, Running)
                | (Saving, Off)
                | (Stopping, Off)
                | (Stopping, Running)
                | (Stopping, Paused)
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the VM boots. Direct Linux boot (kernel, initrd, command line) today; firmware later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Boot {
    Linux {
        kernel: String,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default = "default_cmdline")]
        cmdline: String,
    },
}

fn default_cmdline() -> String {
    "console=ttyS0".into()
}

/// A virtual hard disk on a SCSI controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disk {
    pub controller: u32,
    pub lun: u32,
    pub path: String,
    pub read_only: bool,
}

/// A network adapter (a placeholder until networking lands: stored, not yet given to the VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkAdapter {
    pub name: String,
    #[serde(default)]
    pub switch: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub boot: Boot,
    pub processors: u32,
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
    pub network_adapters: Vec<NetworkAdapter>,
    pub integration_services: bool,
    pub enlightenments: bool,
    pub notes: String,
    pub state: VmState,
    /// Set when the VM last stopped (or failed to start) for a failure; cleared by a start.
    pub critical: bool,
    /// Why the VM is in its state (the last transition's reason).
    pub reason: String,
    pub state_changed_ms: i64,
    pub created_ms: i64,
    /// Seconds since the worker started, when there is one.
    pub uptime_secs: Option<u64>,
    pub worker_pid: Option<i32>,
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    pub time_ms: i64,
    pub vm_id: String,
    pub vm_name: String,
    /// `created`, `configured`, `state`, `disk-attached`, `disk-detached`, `removed`.
    pub kind: String,
    pub from: Option<VmState>,
    pub to: Option<VmState>,
    pub critical: bool,
    pub message: String,
}

/// Body of `POST /v1/vms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub boot: Boot,
    #[serde(default = "one")]
    pub processors: u32,
    /// Bytes, or a string such as "512M".
    #[serde(default = "default_memory")]
    pub memory: Size,
    #[serde(default)]
    pub disks: Vec<AttachDisk>,
    #[serde(default)]
    pub network_adapters: Vec<NetworkAdapter>,
    #[serde(default = "yes")]
    pub integration_services: bool,
    #[serde(default = "yes")]
    pub enlightenments: bool,
    #[serde(default)]
    pub notes: String,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_memory() -> Size {
    Size(512 << 20)
}

/// Body of `PATCH /v1/vms/{vm}`: only the fields given change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetVm {
    pub name: Option<String>,
    pub processors: Option<u32>,
    pub memory: Option<Size>,
    pub kernel: Option<String>,
    /// `""` removes the initrd.
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub integration_services: Option<bool>,
    pub enlightenments: Option<bool>,
    pub notes: Option<String>,
    pub network_adapters: Option<Vec<NetworkAdapter>>,
}

impl SetVm {
    /// Fields that may change while the VM has a worker (the rest need it Off).
    pub fn only_live_fields(&self) -> bool {
        self.processors.is_none()
            && self.memory.is_none()
            && self.kernel.is_none()
            && self.initrd.is_none()
            && self.cmdline.is_none()
            && self.integration_services.is_none()
            && self.enlightenments.is_none()
            && self.network_adapters.is_none()
    }
}

/// Body of `POST /v1/vms/{vm}/disks`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachDisk {
    pub path: String,
    /// Default: 0.
    #[serde(default)]
    pub controller: Option<u32>,
    /// Default: the first free LUN on the controller.
    #[serde(default)]
    pub lun: Option<u32>,
    #[serde(default)]
    pub read_only: bool,
}

/// Body of `POST /v1/vms/{vm}/stop`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopVm {
    /// Pull the plug at once instead of asking the guest.
    #[serde(default)]
    pub turn_off: bool,
    /// Turn the VM off when the guest has not shut down within the timeout.
    #[serde(default)]
    pub force: bool,
    /// How long to wait for a clean shutdown (default 120 s).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Body of `POST /v1/vms/{vm}/restart`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartVm {
    /// Ask the guest to reboot itself (shutdown integration service) instead of a reset.
    #[serde(default)]
    pub reboot: bool,
}

/// Body of `PUT /v1/vms/{vm}/kvp`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvpSet {
    pub pool: u8,
    pub key: String,
    pub value: String,
}

/// A size in bytes: a JSON number, or a string with a unit (`512M`, `2G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Sizes as users type them (`512M`, `2G`) and as the CLI shows them: the same syntax as the
/// worker's `--memory`.
pub use cliutil::{format_size, parse_size};

pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the VM name is empty".into());
    }
    if name.chars().count() > MAX_NAME {
        return Err(format!("the VM name is longer than {MAX_NAME} characters"));
    }
    if name.trim() != name {
        return Err("the VM name starts or ends with white space".into());
    }
    if name
        .chars()
        .any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err("the VM name contains a control character, '/' or '\\'".into());
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err("a VM name cannot look like a VM id (GUID)".into());
    }
    Ok(())
}

pub fn validate_processors(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_PROCESSORS {
        return Err(format!(
            "processor count {n} is out of range (1 to {MAX_PROCESSORS})"
        ));
    }
    Ok(())
}

pub fn validate_memory(n: u64) -> Result<(), String> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&n) {
        return Err(format!(
            "memory {} is out of range ({} to {})",
            format_size(n),
            format_size(MIN_MEMORY),
            format_size(MAX_MEMORY)
        ));
    }
    if !n.is_multiple_of(MEMORY_ALIGN) {
        return Err(format!(
            "memory {n} bytes is not a multiple of {}",
            format_size(MEMORY_ALIGN)
        ));
    }
    Ok(())
}

pub fn validate_notes(s: &str) -> Result<(), String> {
    if s.len() > MAX_NOTES {
        return Err(format!("notes are longer than {MAX_NOTES} bytes"));
    }
    Ok(())
}

pub fn validate_cmdline(s: &str) -> Result<(), String> {
    if s.len() > MAX_CMDLINE {
        return Err(format!(
            "the command line is longer than {MAX_CMDLINE} bytes"
        ));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err("the command line contains a control character".into());
    }
    Ok(())
}

/// An absolute path to an existing regular file (kernel, initrd), canonicalized.
pub fn existing_file(what: &str, p: &str) -> Result<String, String> {
    if p.is_empty() || p.len() > MAX_PATH || p.contains('\0') {
        return Err(format!("invalid {what} path"));
    }
    if !p.starts_with('/') {
        return Err(format!("the {what} path '{p}' is not absolute"));
    }
    let c = std::fs::canonicalize(p).map_err(|e| format!("{what} '{p}': {e}"))?;
    let m = std::fs::metadata(&c).map_err(|e| format!("{what} '{p}': {e}"))?;
    if !m.is_file() {
        return Err(format!("{what} '{p}' is not a regular file"));
    }
    c.into_os_string()
        .into_string()
        .map_err(|_| format!("the {what} path '{p}' is not UTF-8"))
}

/// An absolute path to an existing disk image (a regular file or a block device), canonicalized.
pub fn existing_disk(p: &str) -> Result<String, String> {
    use std::os::unix::fs::FileTypeExt;
    if p.is_empty() || p.len() > MAX_PATH || p.contains('\0') || p.contains(',') {
        return Err(format!(
            "invalid disk path '{p}' (empty, too long, or containing ',')"
        ));
    }
    if !p.starts_with('/') {
        return Err(format!("the disk path '{p}' is not absolute"));
    }
    let c = std::fs::canonicalize(p).map_err(|e| format!("disk '{p}': {e}"))?;
    let m = std::fs::metadata(&c).map_err(|e| format!("disk '{p}': {e}"))?;
    if !(m.is_file() || m.file_type().is_block_device()) {
        return Err(format!(
            "disk '{p}' is neither a regular file nor a block device"
        ));
    }
    let s = c
        .into_os_string()
        .into_string()
        .map_err(|_| format!("the disk path '{p}' is not UTF-8"))?;
    if s.contains(',') {
        return Err(format!("disk path '{s}' contains ','"));
    }
    Ok(s)
}

pub fn validate_adapters(a: &[NetworkAdapter]) -> Result<(), String> {
    if a.len() > MAX_ADAPTERS {
        return Err(format!("more than {MAX_ADAPTERS} network adapters"));
    }
    for n in a {
        if n.name.is_empty() || n.name.len() > MAX_NAME || n.name.chars().any(char::is_control) {
            return Err(
                "a network adapter's name is empty, too long or has control characters".into(),
            );
        }
        if let Some(m) = &n.mac {
            let ok = m.len() == 17
                && m.split([':', '-'])
                    .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
                && m.split([':', '-']).count() == 6;
            if !ok {
                return Err(format!("invalid MAC address '{m}'"));
            }
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `2026-11-21 10:04:05.123Z` from Unix milliseconds. (Hand-written: a civil-date conversion is
/// a dozen lines; a date crate would be the largest dependency of the CLI for it.)
pub fn format_time_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let mut y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    if m <= 2 {
        y += 1;
    }
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// A VM definition for unit tests: one disk at SCSI 0:0, everything else at its default.
#[cfg(test)]
pub(crate) fn test_vm(name: &str) -> Vm {
    Vm {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.into(),
        boot: Boot::Linux {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "x".into(),
        },
        processors: 1,
        memory_bytes: 64 << 20,
        disks: vec![Disk {
            controller: 0,
            lun: 0,
            path: "/d".into(),
            read_only: false,
        }],
        network_adapters: vec![],
        integration_services: true,
        enlightenments: true,
        notes: String::new(),
        state: VmState::Off,
        critical: false,
        reason: String::new(),
        state_changed_ms: 0,
        created_ms: 0,
        uptime_secs: None,
        worker_pid: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(validate_memory(64 << 20).is_ok());
        assert!(validate_memory(1 << 20).is_err());
        assert!(validate_memory((64 << 20) + 4096).is_err());
        assert!(validate_memory(2 << 40).is_err());
        assert!(validate_processors(0).is_err());
        assert!(validate_processors(1).is_ok());
        assert!(validate_processors(256).is_err());
        assert!(validate_name("web-01").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(" a").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("4f9a3c52-2f0e-4a57-9b7e-0d6c1f0a2b3c").is_err());
        assert!(validate_name(&"x".repeat(101)).is_err());
        assert!(validate_adapters(&[NetworkAdapter {
            name: "eth".into(),
            switch: None,
            mac: Some("00:15:5d:01:02:03".into())
        }])
        .is_ok());
        assert!(validate_adapters(&[NetworkAdapter {
            name: "eth".into(),
            switch: None,
            mac: Some("00:15:5d:01:02".into())
        }])
        .is_err());
    }

    #[test]
    fn state_machine() {
        use VmState::*;
        assert!(Off.can_become(Starting));
        assert!(!Off.can_become(Running));
        assert!(!Running.can_become(Starting));
        assert!(Running.can_become(Off));
        assert!(Paused.can_become(Running));
        assert!(!Off.can_become(Paused));
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
            assert!(!s.can_become(s));
        }
    }

    #[test]
    fn times() {
        assert_eq!(format_time_ms(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(
            format_time_ms(1_795_000_000_123),
            "2026-11-18 11:06:40.123Z"
        );
    }
}
