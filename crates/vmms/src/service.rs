//! The service's core: the lifecycle operations, the state machine, and worker supervision.
//!
//! Concurrency: every VM has a slot with an operation lock (a fair, FIFO `tokio` mutex): the
//! operations on one VM run one after another, operations on different VMs never wait for each
//! other (the inventory's own lock is held only for single short SQL transactions). A turn-off
//! may interrupt a clean shutdown that is waiting for the guest.
//!
//! Supervision: a task per worker waits for it to end (`waitpid` through `tokio::process` for
//! the workers this service started, a pidfd for re-adopted ones) and records the VM Off with
//! the reason. That is the only place a VM becomes Off because its worker ended, so a crash of
//! one worker touches only its own VM.

use crate::db::{Db, DbError, Transition, WorkerRecord};
use crate::model::*;
use crate::worker::{self, ControlError, Exit, WorkerPaths};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// How long a started worker may take to bring its VM up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Default wait for a clean shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: u64 = 120;
/// Longest clean-shutdown wait a request may ask for.
const MAX_SHUTDOWN_TIMEOUT: u64 = 3600;
/// How often a clean shutdown that went through the ACPI power button is asked again.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(5);
/// Control requests that should answer at once.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// An operation's failure, as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum OpError {
    /// 400: the request is invalid.
    BadRequest(String),
    /// 404: no such VM (or disk slot).
    NotFound(String),
    /// 409: not possible in the VM's (or the inventory's) current state.
    Conflict(String),
    /// 502: the worker failed or did not answer.
    Worker(String),
    /// 504: the guest did not do what was asked in time.
    Timeout(String),
    /// 500: the service itself failed (inventory, files).
    Internal(String),
}

impl OpError {
    pub fn message(&self) -> &str {
        match self {
            OpError::BadRequest(m)
            | OpError::NotFound(m)
            | OpError::Conflict(m)
            | OpError::Worker(m)
            | OpError::Timeout(m)
            | OpError::Internal(m) => m,
        }
    }
}

impl From<DbError> for OpError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::DuplicateName(_) | DbError::Refused(_) => OpError::Conflict(e.to_string()),
            DbError::Sql(_) => OpError::Internal(e.to_string()),
        }
    }
}

/// A successful operation: the VM afterwards and one line saying what happened.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub vm: Vm,
    pub message: String,
}

/// What the service asked of a worker, to word the reason when it ends.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Nothing,
    TurnOff,
    Shutdown,
    Reset,
    /// Turned off after a clean shutdown did not finish (the message says so).
    Fallback(String),
}

/// A worker this service watches.
pub(crate) struct Worker {
    pub rec: WorkerRecord,
    pub paths: WorkerPaths,
    expect: Mutex<Expect>,
    /// `Some(reason)` once the worker has ended and the VM is recorded Off.
    exited: watch::Sender<Option<String>>,
}

impl Worker {
    fn new(rec: WorkerRecord, paths: WorkerPaths) -> Arc<Self> {
        Arc::new(Worker {
            rec,
            paths,
            expect: Mutex::new(Expect::Nothing),
            exited: watch::channel(None).0,
        })
    }

    fn set_expect(&self, e: Expect) {
        *self.expect.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Waits until the worker has ended (true) or `limit` passed (false).
    async fn wait_exit(&self, limit: Duration) -> bool {
        let mut rx = self.exited.subscribe();
        let done = tokio::time::timeout(limit, async {
            let _ = rx.wait_for(Option::is_some).await;
        })
        .await;
        done.is_ok()
    }

    fn exit_reason(&self) -> Option<String> {
        self.exited.borrow().clone()
    }
}

#[derive(Default)]
struct Slot {
    op: tokio::sync::Mutex<()>,
    worker: Mutex<Option<Arc<Worker>>>,
    /// Bumped by every turn-off request, which ends a clean-shutdown wait.
    preempt: watch::Sender<u64>,
}

impl Slot {
    fn worker(&self) -> Option<Arc<Worker>> {
        self.worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The management service's state.
pub struct Service {
    pub(crate) db: Db,
    state_dir: PathBuf,
    worker_exe: PathBuf,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    events: broadcast::Sender<Event>,
}

impl Service {
    /// Opens the inventory in `state_dir` (checked by the caller) and re-adopts the workers
    /// of VMs recorded as running.
    pub(crate) async fn open(
        state_dir: &Path,
        db: Db,
        worker_exe: PathBuf,
    ) -> Result<Arc<Service>, String> {
        let svc = Arc::new(Service {
            db,
            state_dir: state_dir.to_path_buf(),
            worker_exe,
            slots: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
        });
        svc.adopt().await.map_err(|e| e.message().to_string())?;
        Ok(svc)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn publish(&self, ev: Event) {
        tracing::info!(vm = %ev.vm_name, kind = %ev.kind, "{}", ev.message);
        let _ = self.events.send(ev);
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn paths(&self, id: &str) -> WorkerPaths {
        WorkerPaths::new(&self.state_dir, id)
    }

    fn transition(
        &self,
        id: &str,
        from: &[VmState],
        to: VmState,
        critical: bool,
        reason: &str,
        worker: Option<Option<WorkerRecord>>,
    ) -> Result<Option<Vm>, OpError> {
        let t = Transition {
            to,
            critical,
            reason: reason.to_string(),
            worker,
        };
        match self.db.transition(id, from, &t)? {
            Some((ev, vm)) => {
                self.publish(ev);
                Ok(Some(vm))
            }
            None => Ok(None),
        }
    }

    fn note(&self, id: &str, kind: &str, message: &str) {
        match self.db.note(id, kind, message) {
            Ok(Some(ev)) => self.publish(ev),
            Ok(None) => {}
            Err(e) => tracing::warn!("recording an event: {e}"),
        }
    }

    fn decorate(&self, mut vm: Vm, rec: Option<&WorkerRecord>) -> Vm {
        vm.uptime_secs = match rec {
            Some(r) if vm.state.has_worker() => {
                Some(((now_ms() - r.started_ms).max(0) / 1000) as u64)
            }
            _ => None,
        };
        vm
    }

    /// A VM by name or id.
    pub fn get(&self, key: &str) -> Result<Vm, OpError> {
        let vm = self
            .db
            .get(key)?
            .ok_or_else(|| OpError::NotFound(format!("no VM named or with id '{key}'")))?;
        self.by_id(&vm.id)
    }

    fn by_id(&self, id: &str) -> Result<Vm, OpError> {
        match self.db.get_with_worker(id)? {
            Some((vm, rec)) => Ok(self.decorate(vm, rec.as_ref())),
            None => Err(OpError::NotFound(format!("VM {id} no longer exists"))),
        }
    }

    pub fn list(&self) -> Result<Vec<Vm>, OpError> {
        Ok(self
            .db
            .list()?
            .into_iter()
            .map(|(vm, rec)| self.decorate(vm, rec.as_ref()))
            .collect())
    }

    pub fn events(
        &self,
        vm: Option<&str>,
        since: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Event>, OpError> {
        let id = match vm {
            Some(k) => Some(self.get(k)?.id),
            None => None,
        };
        let limit = limit.clamp(1, 10_000);
        Ok(match since {
            Some(s) => self.db.events(id.as_deref(), s, limit)?,
            None => self.db.last_events(id.as_deref(), limit)?,
        })
    }

    /// Checks a disk for attaching to `vm_id`: it exists, and no *other* VM that has a worker
    /// uses it. Returns the canonical path.
    fn check_disk(&self, vm_id: &str, path: &str) -> Result<String, OpError> {
        let p = existing_disk(path).map_err(OpError::BadRequest)?;
        for (id, name, state) in self.db.disk_users(&p)? {
            if id != vm_id && state.has_worker() {
                return Err(OpError::Conflict(format!(
                    "disk {p} is attached to VM '{name}', which is {state}"
                )));
            }
        }
        Ok(p)
    }

    fn place_disk(existing: &[Disk], req: &AttachDisk, path: String) -> Result<Disk, OpError> {
        let controller = req.controller.unwrap_or(0);
        if controller >= SCSI_CONTROLLERS {
            return Err(OpError::BadRequest(format!(
                "SCSI controller {controller} is out of range (0 to {})",
                SCSI_CONTROLLERS - 1
            )));
        }
        if let Some(d) = existing.iter().find(|d| d.path == path) {
            return Err(OpError::Conflict(format!(
                "disk {path} is already attached to this VM at SCSI {}:{}",
                d.controller, d.lun
            )));
        }
        let used = |l: u32| {
            existing
                .iter()
                .any(|d| d.controller == controller && d.lun == l)
        };
        let lun = match req.lun {
            Some(l) if l >= SCSI_LUNS => {
                return Err(OpError::BadRequest(format!(
                    "LUN {l} is out of range (0 to {})",
                    SCSI_LUNS - 1
                )))
            }
            Some(l) if used(l) => {
                return Err(OpError::Conflict(format!(
                    "SCSI {controller}:{l} already has a disk"
                )))
            }
            Some(l) => l,
            None => (0..SCSI_LUNS).find(|l| !used(*l)).ok_or_else(|| {
                OpError::Conflict(format!("SCSI controller {controller} is full"))
            })?,
        };
        Ok(Disk {
            controller,
            lun,
            path,
            read_only: req.read_only,
        })
    }

    /// `new-vm`.
    pub fn create(&self, req: CreateVm) -> Result<Vm, OpError> {
        let bad = OpError::BadRequest;
        validate_name(&req.name).map_err(bad)?;
        validate_processors(req.processors).map_err(bad)?;
        validate_memory(req.memory.0).map_err(bad)?;
        validate_notes(&req.notes).map_err(bad)?;
        validate_adapters(&req.network_adapters).map_err(bad)?;
        let Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } = &req.boot;
        validate_cmdline(cmdline).map_err(bad)?;
        let kernel = existing_file("kernel", kernel).map_err(bad)?;
        let initrd = match initrd.as_deref() {
            None | Some("") => None,
            Some(i) => Some(existing_file("initrd", i).map_err(bad)?),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let mut disks: Vec<Disk> = Vec::new();
        for d in &req.disks {
            let p = self.check_disk(&id, &d.path)?;
            let placed = Self::place_disk(&disks, d, p)?;
            disks.push(placed);
        }
        let now = now_ms();
        let vm = Vm {
            id,
            name: req.name,
            boot: Boot::Linux {
                kernel,
                initrd,
                cmdline: cmdline.clone(),
            },
            processors: req.processors,
            memory_bytes: req.memory.0,
            disks,
            network_adapters: req.network_adapters,
            integration_services: req.integration_services,
            enlightenments: req.enlightenments,
            notes: req.notes,
            state: VmState::Off,
            critical: false,
            reason: "created".into(),
            state_changed_ms: now,
            created_ms: now,
            uptime_secs: None,
            worker_pid: None,
        };
        let ev = self.db.insert_vm(&vm)?;
        self.publish(ev);
        self.by_id(&vm.id)
    }

    /// `set-vm`.
    pub async fn set(&self, key: &str, req: SetVm) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        let mut vm = self.by_id(&id)?;
        if !req.only_live_fields() && vm.state != VmState::Off {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: processors, memory, boot, integration services, enlightenments and adapters change only while it is Off",
                vm.name, vm.state
            )));
        }
        let bad = OpError::BadRequest;
        let mut changed = Vec::new();
        if let Some(n) = req.name {
            validate_name(&n).map_err(bad)?;
            if n != vm.name {
                changed.push(format!("name '{}' → '{n}'", vm.name));
                vm.name = n;
            }
        }
        if let Some(p) = req.processors {
            validate_processors(p).map_err(bad)?;
            changed.push(format!("processors {} → {p}", vm.processors));
            vm.processors = p;
        }
        if let Some(m) = req.memory {
            validate_memory(m.0).map_err(bad)?;
            changed.push(format!(
                "memory {} → {}",
                format_size(vm.memory_bytes),
                format_size(m.0)
            ));
            vm.memory_bytes = m.0;
        }
        let Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } = &mut vm.boot;
        if let Some(k) = req.kernel {
            *kernel = existing_file("kernel", &k).map_err(bad)?;
            changed.push(format!("kernel {kernel}"));
        }
        if let Some(i) = req.initrd {
            *initrd = if i.is_empty() {
                None
            } else {
                Some(existing_file("initrd", &i).map_err(bad)?)
            };
            changed.push(format!("initrd {}", initrd.as_deref().unwrap_or("(none)")));
        }
        if let Some(c) = req.cmdline {
            validate_cmdline(&c).map_err(bad)?;
            changed.push("command line".into());
            *cmdline = c;
        }
        if let Some(b) = req.integration_services {
            changed.push(format!("integration services {}", on_off(b)));
            vm.integration_services = b;
        }
        if let Some(b) = req.enlightenments {
            changed.push(format!("enlightenments {}", on_off(b)));
            vm.enlightenments = b;
        }
        if let Some(n) = req.notes {
            validate_notes(&n).map_err(bad)?;
            changed.push("notes".into());
            vm.notes = n;
        }
        if let Some(a) = req.network_adapters {
            validate_adapters(&a).map_err(bad)?;
            changed.push(format!("{} network adapter(s)", a.len()));
            vm.network_adapters = a;
        }
        if changed.is_empty() {
            return Ok(Outcome {
                message: format!("VM '{}': nothing to change", vm.name),
                vm,
            });
        }
        let msg = format!("configured: {}", changed.join(", "));
        let ev = self.db.update_config(&vm, &msg)?;
        self.publish(ev);
        Ok(Outcome {
            vm: self.by_id(&id)?,
            message: format!("VM '{}' {msg}", vm.name),
        })
    }

    /// `remove-vm`: the definition, logs and sockets go; disk files never do.
    pub async fn remove(&self, key: &str) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        let vm = self.by_id(&id)?;
        if !matches!(vm.state, VmState::Off | VmState::Saved) {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: turn it off before removing it",
                vm.name, vm.state
            )));
        }
        let ev = self.db.delete(&id)?;
        self.publish(ev);
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let dir = self.paths(&id).dir;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", dir.display());
            }
        }
        Ok(Outcome {
            message: format!("VM '{}' removed (its disks were kept)", vm.name),
            vm,
        })
    }

    /// `start-vm`.
    pub async fn start(self: &Arc<Self>, key: &str) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        self.start_locked(&slot, &id).await
    }

    async fn start_locked(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        id: &str,
    ) -> Result<Outcome, OpError> {
        let vm = self.by_id(id)?;
        if !matches!(vm.state, VmState::Off | VmState::Saved) {
            return Err(OpError::Conflict(format!(
                "VM '{}' is already {}",
                vm.name, vm.state
            )));
        }
        // The files may have gone since the VM was defined.
        let Boot::Linux { kernel, initrd, .. } = &vm.boot;
        existing_file("kernel", kernel).map_err(OpError::Conflict)?;
        if let Some(i) = initrd {
            existing_file("initrd", i).map_err(OpError::Conflict)?;
        }
        for d in &vm.disks {
            self.check_disk(id, &d.path).map_err(|e| match e {
                OpError::BadRequest(m) => OpError::Conflict(m),
                e => e,
            })?;
        }
        let paths = self.paths(id);
        let args = worker::worker_args(&vm, &paths);
        if self
            .transition(
                id,
                &[VmState::Off, VmState::Saved],
                VmState::Starting,
                false,
                "start requested",
                None,
            )?
            .is_none()
        {
            return Err(OpError::Conflict(format!("VM '{}' changed state", vm.name)));
        }
        let (child, rec) = match worker::spawn(&self.worker_exe, &args, &paths) {
            Ok(x) => x,
            Err(e) => {
                let why = format!("cannot start the worker {}: {e}", self.worker_exe.display());
                self.transition(
                    id,
                    &[VmState::Starting],
                    VmState::Off,
                    true,
                    &why,
                    Some(None),
                )?;
                return Err(OpError::Internal(why));
            }
        };
        self.db.set_worker(id, Some(&rec))?;
        let w = Worker::new(rec.clone(), paths.clone());
        *slot.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
        {
            let svc = self.clone();
            let id = id.to_string();
            let w = w.clone();
            tokio::spawn(async move {
                let mut child = child;
                let exit = match child.wait().await {
                    Ok(s) => Exit::from_status(s),
                    Err(_) => {
                        worker::wait_foreign(w.rec.pid, w.rec.start_ticks).await;
                        Exit::Unknown
                    }
                };
                svc.worker_ended(&id, &w, exit);
            });
        }
        // Up when its control socket reports a boot.
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let mut exited = w.exited.subscribe();
        loop {
            if exited.borrow().is_some() {
                break;
            }
            if let Ok(v) =
                worker::control(&paths.control, &json!({"op": "status"}), CONTROL_TIMEOUT).await
            {
                let state = v.get("state").and_then(Value::as_str).unwrap_or("");
                let boots = v.get("boots").and_then(Value::as_u64).unwrap_or(0);
                if state == "running" || state == "paused" || boots > 0 {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                w.set_expect(Expect::Fallback(format!(
                    "the worker did not bring the VM up within {} s: turned off",
                    START_TIMEOUT.as_secs()
                )));
                worker::kill(&w.rec);
                w.wait_exit(Duration::from_secs(10)).await;
                return Err(OpError::Timeout(format!(
                    "VM '{}' did not start within {} s (see {})",
                    vm.name,
                    START_TIMEOUT.as_secs(),
                    paths.log.display()
                )));
            }
            tokio::select! {
                _ = exited.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        if let Some(reason) = w.exit_reason() {
            let now = self.by_id(id)?;
            if now.critical {
                return Err(OpError::Worker(format!(
                    "VM '{}' failed to start: {reason}",
                    vm.name
                )));
            }
            return Ok(Outcome {
                vm: now,
                message: format!("VM '{}' started and has already stopped: {reason}", vm.name),
            });
        }
        self.transition(
            id,
            &[VmState::Starting],
            VmState::Running,
            false,
            "started",
            None,
        )?;
        let mut message = format!("VM '{}' started (worker pid {})", vm.name, rec.pid);
        if !vm.integration_services {
            // The setting is kept for when the worker can honour it.
            message.push_str("; note: the worker cannot turn integration services off yet");
        }
        Ok(Outcome {
            vm: self.by_id(id)?,
            message,
        })
    }

    /// Records that a worker has ended: the VM is Off, with the reason. Called by the
    /// supervision task only.
    fn worker_ended(&self, id: &str, w: &Arc<Worker>, exit: Exit) {
        let (mut reason, mut critical) = worker::exit_reason(exit, &w.paths.log);
        let expect = w.expect.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let killed_by_us = matches!(
            exit,
            Exit::Code(0) | Exit::Signal(libc::SIGKILL) | Exit::Unknown
        );
        match expect {
            Expect::TurnOff if killed_by_us => {
                reason = "turned off".into();
                critical = false;
            }
            Expect::Reset if killed_by_us => {
                reason = "turned off to restart".into();
                critical = false;
            }
            Expect::Fallback(m) if killed_by_us => {
                reason = m;
                critical = false;
            }
            Expect::Shutdown if !critical => reason = format!("shut down: {reason}"),
            _ => {}
        }
        let from = [
            VmState::Starting,
            VmState::Running,
            VmState::Paused,
            VmState::Stopping,
            VmState::Saving,
        ];
        if let Err(e) = self.transition(id, &from, VmState::Off, critical, &reason, Some(None)) {
            tracing::error!("recording the end of VM {id}'s worker: {}", e.message());
        }
        if let Some(slot) = self.slots.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            let mut g = slot.worker.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, w)) {
                *g = None;
            }
        }
        w.exited.send_replace(Some(reason));
    }

    fn running_worker(&self, slot: &Slot, vm: &Vm) -> Result<Arc<Worker>, OpError> {
        if !vm.state.has_worker() {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: it is not running",
                vm.name, vm.state
            )));
        }
        slot.worker().ok_or_else(|| {
            OpError::Conflict(format!("VM '{}' has no worker at the moment", vm.name))
        })
    }

    /// Pulls the plug (the op lock is held).
    async fn turn_off_locked(
        &self,
        vm: &Vm,
        w: &Arc<Worker>,
        expect: Expect,
        why: &str,
    ) -> Result<(), OpError> {
        w.set_expect(expect);
        if vm.state != VmState::Stopping {
            self.transition(
                &vm.id,
                &[
                    VmState::Starting,
                    VmState::Running,
                    VmState::Paused,
                    VmState::Saving,
                ],
                VmState::Stopping,
                false,
                why,
                None,
            )?;
        }
        if worker::control(
            &w.paths.control,
            &json!({"op": "turn-off"}),
            CONTROL_TIMEOUT,
        )
        .await
        .is_err()
        {
            worker::kill(&w.rec);
        }
        if !w.wait_exit(Duration::from_secs(10)).await {
            worker::kill(&w.rec);
            if !w.wait_exit(Duration::from_secs(10)).await {
                return Err(OpError::Worker(format!(
                    "the worker of VM '{}' (pid {}) does not end",
                    vm.name, w.rec.pid
                )));
            }
        }
        Ok(())
    }

    /// `stop-vm`: a clean shutdown (with `force`, turned off when the guest has not shut down
    /// in time), or with `turn_off` the plug pulled at once.
    pub async fn stop(&self, key: &str, req: StopVm) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let mut preempted = slot.preempt.subscribe();
        if req.turn_off {
            slot.preempt.send_modify(|g| *g += 1);
        }
        let _op = slot.op.lock().await;
        let vm = self.by_id(&id)?;
        if vm.state == VmState::Saved && req.turn_off {
            self.transition(
                &id,
                &[VmState::Saved],
                VmState::Off,
                false,
                "saved state discarded",
                None,
            )?;
            return Ok(Outcome {
                vm: self.by_id(&id)?,
                message: format!("VM '{}': saved state discarded", vm.name),
            });
        }
        let w = self.running_worker(&slot, &vm)?;
        if req.turn_off {
            self.turn_off_locked(&vm, &w, Expect::TurnOff, "turn off requested")
                .await?;
            return Ok(Outcome {
                vm: self.by_id(&id)?,
                message: format!("VM '{}' turned off", vm.name),
            });
        }
        if vm.state != VmState::Running {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: a clean shutdown needs it Running (resume it, or turn it off)",
                vm.name, vm.state
            )));
        }
        let timeout = req.timeout_secs.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
        if timeout > MAX_SHUTDOWN_TIMEOUT {
            return Err(OpError::BadRequest(format!(
                "timeout {timeout} s is more than {MAX_SHUTDOWN_TIMEOUT} s"
            )));
        }
        self.transition(
            &id,
            &[VmState::Running],
            VmState::Stopping,
            false,
            "shutdown requested",
            None,
        )?;
        w.set_expect(Expect::Shutdown);
        let ask = || async {
            match worker::control(
                &w.paths.control,
                &json!({"op": "shutdown", "reboot": false}),
                CONTROL_TIMEOUT,
            )
            .await
            {
                Ok(v) => v
                    .get("via")
                    .and_then(Value::as_str)
                    .unwrap_or("the guest")
                    .to_string(),
                Err(e) => format!("request failed: {e}"),
            }
        };
        let mut via = ask().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut exited = w.exited.subscribe();
        loop {
            // A guest still booting has no shutdown integration service yet: the worker pressed
            // the power button, which a minimal guest may ignore. Ask again now and then, so
            // the request goes through the integration service once the guest offers it.
            let through_ic = via == "shutdown integration service";
            tokio::select! {
                _ = async { let _ = exited.wait_for(Option::is_some).await; } => {
                    let reason = w.exit_reason().unwrap_or_default();
                    return Ok(Outcome {
                        vm: self.by_id(&id)?,
                        message: format!("VM '{}' shut down (asked through {via}): {reason}", vm.name),
                    });
                }
                _ = preempted.changed() => {
                    w.set_expect(Expect::Nothing);
                    return Err(OpError::Conflict(format!(
                        "the clean shutdown of VM '{}' was interrupted by a turn-off request",
                        vm.name
                    )));
                }
                _ = tokio::time::sleep(SHUTDOWN_RETRY), if !through_ic => {
                    via = ask().await;
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if req.force {
            let msg = format!(
                "the guest did not shut down within {timeout} s (asked through {via}): turned off"
            );
            self.turn_off_locked(&self.by_id(&id)?, &w, Expect::Fallback(msg.clone()), &msg)
                .await?;
            Ok(Outcome {
                vm: self.by_id(&id)?,
                message: format!("VM '{}': {msg}", vm.name),
            })
        } else {
            w.set_expect(Expect::Nothing);
            let msg =
                format!("the guest did not shut down within {timeout} s (asked through {via})");
            self.transition(
                &id,
                &[VmState::Stopping],
                VmState::Running,
                false,
                &msg,
                None,
            )?;
            Err(OpError::Timeout(format!(
                "VM '{}': {msg}; it is still running (--force turns it off after the timeout)",
                vm.name
            )))
        }
    }

    /// `restart-vm`: a reset (turn off, start a new worker), or with `reboot` the guest asked
    /// to reboot itself.
    pub async fn restart(self: &Arc<Self>, key: &str, req: RestartVm) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        let vm = self.by_id(&id)?;
        let w = self.running_worker(&slot, &vm)?;
        if req.reboot {
            if vm.state != VmState::Running {
                return Err(OpError::Conflict(format!(
                    "VM '{}' is {}: a guest reboot needs it Running",
                    vm.name, vm.state
                )));
            }
            return match worker::control(
                &w.paths.control,
                &json!({"op": "shutdown", "reboot": true}),
                CONTROL_TIMEOUT,
            )
            .await
            {
                Ok(_) => {
                    self.note(&id, "reboot-requested", "guest reboot requested");
                    Ok(Outcome {
                        vm: self.by_id(&id)?,
                        message: format!("VM '{}': the guest was asked to reboot", vm.name),
                    })
                }
                Err(ControlError::Failed(e)) => Err(OpError::Conflict(format!(
                    "VM '{}' cannot reboot itself: {e} (without --reboot the VM is reset)",
                    vm.name
                ))),
                Err(e) => Err(OpError::Worker(e.to_string())),
            };
        }
        self.turn_off_locked(&vm, &w, Expect::Reset, "restart requested")
            .await?;
        let out = self.start_locked(&slot, &id).await?;
        Ok(Outcome {
            message: format!("VM '{}' restarted", vm.name),
            vm: out.vm,
        })
    }

    /// `suspend-vm` (`pause = true`) and `resume-vm`.
    pub async fn pause(&self, key: &str, pause: bool) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        let vm = self.by_id(&id)?;
        let (need, to, op, word) = if pause {
            (VmState::Running, VmState::Paused, "pause", "paused")
        } else {
            (VmState::Paused, VmState::Running, "resume", "resumed")
        };
        if vm.state != need {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: only a {need} VM can be {word}",
                vm.name, vm.state
            )));
        }
        let w = self.running_worker(&slot, &vm)?;
        worker::control(&w.paths.control, &json!({ "op": op }), CONTROL_TIMEOUT)
            .await
            .map_err(|e| OpError::Worker(format!("VM '{}': {e}", vm.name)))?;
        self.transition(&id, &[need], to, false, word, None)?;
        Ok(Outcome {
            vm: self.by_id(&id)?,
            message: format!("VM '{}' {word}", vm.name),
        })
    }

    /// `add-disk` (while the VM is Off: there is no hot-add yet).
    pub async fn attach_disk(&self, key: &str, req: AttachDisk) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        let vm = self.by_id(&id)?;
        if vm.state.has_worker() {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: disks can be added only while it is Off",
                vm.name, vm.state
            )));
        }
        let p = self.check_disk(&id, &req.path)?;
        let others: Vec<String> = self
            .db
            .disk_users(&p)?
            .into_iter()
            .filter(|(i, _, _)| *i != id)
            .map(|(_, n, _)| n)
            .collect();
        let d = Self::place_disk(&vm.disks, &req, p)?;
        let ev = self.db.attach_disk(&id, &d)?;
        self.publish(ev);
        let mut message = format!(
            "disk {} attached to VM '{}' at SCSI {}:{}",
            d.path, vm.name, d.controller, d.lun
        );
        if !others.is_empty() {
            message.push_str(&format!(
                " (also attached to: {}; only one of them can run at a time)",
                others.join(", ")
            ));
        }
        Ok(Outcome {
            vm: self.by_id(&id)?,
            message,
        })
    }

    /// `remove-disk` (while the VM is Off). The file is kept.
    pub async fn detach_disk(
        &self,
        key: &str,
        controller: u32,
        lun: u32,
    ) -> Result<Outcome, OpError> {
        let id = self.get(key)?.id;
        let slot = self.slot(&id);
        let _op = slot.op.lock().await;
        let vm = self.by_id(&id)?;
        if vm.state.has_worker() {
            return Err(OpError::Conflict(format!(
                "VM '{}' is {}: disks can be removed only while it is Off",
                vm.name, vm.state
            )));
        }
        match self.db.detach_disk(&id, controller, lun)? {
            Some(ev) => {
                self.publish(ev);
                Ok(Outcome {
                    vm: self.by_id(&id)?,
                    message: format!(
                        "disk at SCSI {controller}:{lun} removed from VM '{}' (the file was kept)",
                        vm.name
                    ),
                })
            }
            None => Err(OpError::NotFound(format!(
                "VM '{}' has no disk at SCSI {controller}:{lun}",
                vm.name
            ))),
        }
    }

    /// A request to the VM's worker (status, heartbeat, KVP), not serialized with the
    /// lifecycle operations: it changes nothing the service records.
    pub async fn worker_request(&self, key: &str, req: Value) -> Result<(Vm, Value), OpError> {
        let vm = self.get(key)?;
        let slot = self.slot(&vm.id);
        let w = self.running_worker(&slot, &vm)?;
        match worker::control(&w.paths.control, &req, CONTROL_TIMEOUT).await {
            Ok(v) => Ok((vm, v)),
            Err(ControlError::Failed(e)) if e.contains("not running") => {
                Err(OpError::Conflict(format!("VM '{}': {e}", vm.name)))
            }
            Err(ControlError::Failed(e)) => {
                Err(OpError::BadRequest(format!("VM '{}': {e}", vm.name)))
            }
            Err(e) => Err(OpError::Worker(format!("VM '{}': {e}", vm.name))),
        }
    }

    /// The console socket of a VM that has a worker.
    pub fn console_path(&self, key: &str) -> Result<(Vm, PathBuf), OpError> {
        let vm = self.get(key)?;
        let slot = self.slot(&vm.id);
        let w = self.running_worker(&slot, &vm)?;
        Ok((vm, w.paths.console.clone()))
    }

    /// At start-up: every VM recorded with a worker either gets it back (same process, still
    /// alive) or is recorded Off with the reason. Never kills anything.
    async fn adopt(self: &Arc<Self>) -> Result<(), OpError> {
        for (vm, rec) in self.db.list()? {
            if !vm.state.has_worker() {
                continue;
            }
            let paths = self.paths(&vm.id);
            let all = [
                VmState::Starting,
                VmState::Running,
                VmState::Paused,
                VmState::Stopping,
                VmState::Saving,
            ];
            let rec = match rec {
                Some(r) if worker::is_same_worker(&r, &paths.control) => r,
                other => {
                    let (detail, critical) = worker::exit_reason(Exit::Unknown, &paths.log);
                    let reason = match other {
                        Some(r) => format!(
                            "the worker (pid {}) ended while the service was not running: {detail}",
                            r.pid
                        ),
                        None => format!("no worker was recorded for the VM: {detail}"),
                    };
                    self.transition(&vm.id, &all, VmState::Off, critical, &reason, Some(None))?;
                    continue;
                }
            };
            let w = Worker::new(rec.clone(), paths.clone());
            *self
                .slot(&vm.id)
                .worker
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
            let status =
                worker::control(&paths.control, &json!({"op": "status"}), CONTROL_TIMEOUT).await;
            let now = match &status {
                Ok(v) if v.get("state").and_then(Value::as_str) == Some("paused") => {
                    VmState::Paused
                }
                Ok(_) => VmState::Running,
                Err(_) => vm.state,
            };
            if now != vm.state {
                self.transition(
                    &vm.id,
                    &[vm.state],
                    now,
                    false,
                    "state read from the re-adopted worker",
                    None,
                )?;
            }
            let msg = match &status {
                Ok(_) => format!("worker pid {} re-adopted after a service restart", rec.pid),
                Err(e) => format!(
                    "worker pid {} re-adopted after a service restart, but it does not answer: {e}",
                    rec.pid
                ),
            };
            self.note(&vm.id, "adopted", &msg);
            let svc = self.clone();
            let id = vm.id.clone();
            tokio::spawn(async move {
                worker::wait_foreign(w.rec.pid, w.rec.start_ticks).await;
                svc.worker_ended(&id, &w, Exit::Unknown);
            });
        }
        Ok(())
    }

    /// For `serve --stop-vms-on-exit`: clean shutdown of every running VM, turned off after
    /// `timeout`.
    pub async fn stop_all(self: &Arc<Self>, timeout: u64) {
        let vms = match self.list() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("listing VMs to stop them: {}", e.message());
                return;
            }
        };
        let mut tasks = Vec::new();
        for vm in vms.into_iter().filter(|v| v.state.has_worker()) {
            let svc = self.clone();
            tasks.push(tokio::spawn(async move {
                let turn_off = vm.state != VmState::Running;
                let r = svc
                    .stop(
                        &vm.id,
                        StopVm {
                            turn_off,
                            force: true,
                            timeout_secs: Some(timeout),
                        },
                    )
                    .await;
                if let Err(e) = r {
                    tracing::warn!("stopping VM '{}': {}", vm.name, e.message());
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}
