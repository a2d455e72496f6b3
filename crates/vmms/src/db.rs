//! The inventory: an SQLite database (`<state>/inventory.db`) holding VM definitions, their
//! lifecycle state and worker, their disks and adapters, and the event log.
//!
//! Schema changes are migrations: `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`
//! (`PRAGMA user_version`), each in one transaction. A database from a newer Verdigris, a file
//! that is not ours, or one that fails SQLite's integrity check is refused, never rewritten.
//!
//! Every change of a VM and the event recording it are written in one transaction, so the log
//! and the inventory always agree.

use crate::model::{Boot, Disk, Event, NetworkAdapter, Vm, VmState};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, Transaction};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// `PRAGMA application_id` of our databases: "VDGS".
const APPLICATION_ID: i64 = 0x5644_4753;

/// Keep at most this many events (the oldest are dropped).
const MAX_EVENTS: i64 = 100_000;

const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE COLLATE NOCASE,
        boot_kind TEXT NOT NULL,
        kernel TEXT NOT NULL,
        initrd TEXT,
        cmdline TEXT NOT NULL,
        processors INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        integration_services INTEGER NOT NULL,
        enlightenments INTEGER NOT NULL,
        notes TEXT NOT NULL,
        state TEXT NOT NULL,
        critical INTEGER NOT NULL DEFAULT 0,
        reason TEXT NOT NULL DEFAULT '',
        state_changed_ms INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        worker_pid INTEGER,
        worker_start_ticks INTEGER,
        worker_started_ms INTEGER
    );
    CREATE TABLE disks (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        controller INTEGER NOT NULL,
        lun INTEGER NOT NULL,
        path TEXT NOT NULL,
        read_only INTEGER NOT NULL,
        PRIMARY KEY (vm_id, controller, lun)
    );
    CREATE INDEX disks_by_path ON disks(path);
    CREATE TABLE network_adapters (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        switch TEXT,
        mac TEXT,
        PRIMARY KEY (vm_id, idx)
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ms INTEGER NOT NULL,
        vm_id TEXT NOT NULL,
        vm_name TEXT NOT NULL,
        kind TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT,
        critical INTEGER NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_by_vm ON events(vm_id, seq);",
];

/// Database errors, already worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("a VM named '{0}' already exists")]
    DuplicateName(String),
    #[error("{0}")]
    Refused(String),
    #[error("inventory database: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// What worker a VM has, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub pid: i32,
    pub start_ticks: u64,
    pub started_ms: i64,
}

/// A state change to record.
#[derive(Debug, Clone)]
pub struct Transition {
    pub to: VmState,
    pub critical: bool,
    pub reason: String,
    /// `Some(Some(w))` records a worker, `Some(None)` clears it, `None` leaves it.
    pub worker: Option<Option<WorkerRecord>>,
}

#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens the inventory at `path`. With `create`, a missing file is created; an existing
    /// one is always checked and migrated, never replaced.
    pub fn open(path: &Path, create: bool) -> Result<Db, String> {
        let exists = path.exists();
        if !exists && !create {
            return Err(format!(
                "the inventory {} does not exist (a new state directory needs `serve --init`)",
                path.display()
            ));
        }
        if exists {
            let len = std::fs::metadata(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
            if len == 0 {
                return Err(format!(
                    "the inventory {} is an empty file: it is damaged (restore it from a backup or move it away)",
                    path.display()
                ));
            }
        }
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let bad = |e: rusqlite::Error| {
            format!(
                "the inventory {} cannot be used: {e} (it is damaged or not a Verdigris database; nothing was changed)",
                path.display()
            )
        };
        let conn = Connection::open_with_flags(path, flags).map_err(bad)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(bad)?;
        let app: i64 = conn
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .map_err(bad)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(bad)?;
        if exists {
            if app != APPLICATION_ID {
                return Err(format!(
                    "{} is not a Verdigris inventory (application id {app:#x}); nothing was changed",
                    path.display()
                ));
            }
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(bad)?;
            if check != "ok" {
                return Err(format!(
                    "the inventory {} is damaged ({check}); restore it from a backup",
                    path.display()
                ));
            }
        }
        if version < 0 || version as usize > MIGRATIONS.len() {
            return Err(format!(
                "the inventory {} has schema version {version}, newer than this Verdigris knows ({}): upgrade Verdigris",
                path.display(),
                MIGRATIONS.len()
            ));
        }
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(bad)?;
        let mut conn = conn;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction().map_err(bad)?;
            tx.execute_batch(sql).map_err(bad)?;
            tx.execute_batch(&format!(
                "PRAGMA user_version = {}; PRAGMA application_id = {APPLICATION_ID};",
                i + 1
            ))
            .map_err(bad)?;
            tx.commit().map_err(bad)?;
            tracing::info!("inventory schema migrated to version {}", i + 1);
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn schema_version(&self) -> Result<i64, DbError> {
        Ok(self
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Adds a VM (state Off) and its `created` event.
    pub fn insert_vm(&self, vm: &Vm) -> Result<Event, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } = &vm.boot;
        let r = tx.execute(
            "INSERT INTO vms (id, name, boot_kind, kernel, initrd, cmdline, processors, memory_bytes,
                integration_services, enlightenments, notes, state, critical, reason,
                state_changed_ms, created_ms)
             VALUES (?1, ?2, 'linux', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 0, ?12, ?13, ?13)",
            params![
                vm.id,
                vm.name,
                kernel,
                initrd,
                cmdline,
                vm.processors,
                vm.memory_bytes as i64,
                vm.integration_services,
                vm.enlightenments,
                vm.notes,
                vm.state.as_str(),
                vm.reason,
                vm.created_ms
            ],
        );
        if let Err(e) = r {
            return Err(unique_name(e, &vm.name));
        }
        for d in &vm.disks {
            insert_disk(&tx, &vm.id, d)?;
        }
        write_adapters(&tx, &vm.id, &vm.network_adapters)?;
        let ev = event(
            &tx,
            &vm.id,
            &vm.name,
            "created",
            None,
            Some(vm.state),
            false,
            "created",
        )?;
        tx.commit()?;
        Ok(ev)
    }

    /// A VM by id or (case-insensitive) name.
    pub fn get(&self, key: &str) -> Result<Option<Vm>, DbError> {
        Ok(self
            .one("id = ?1 OR name = ?1 COLLATE NOCASE", key)?
            .map(|(vm, _)| vm))
    }

    /// A VM and its recorded worker.
    pub fn get_with_worker(&self, id: &str) -> Result<Option<(Vm, Option<WorkerRecord>)>, DbError> {
        self.one("id = ?1", id)
    }

    /// The VM row matching `condition` (on parameter ?1 = `key`), with its disks and worker.
    fn one(
        &self,
        condition: &str,
        key: &str,
    ) -> Result<Option<(Vm, Option<WorkerRecord>)>, DbError> {
        let c = self.lock();
        let row = c
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE {condition}"),
                [key],
                vm_from_row,
            )
            .optional()?;
        match row {
            Some((mut vm, w)) => {
                fill(&c, &mut vm)?;
                Ok(Some((vm, w)))
            }
            None => Ok(None),
        }
    }

    /// Every VM, by name, with its recorded worker.
    pub fn list(&self) -> Result<Vec<(Vm, Option<WorkerRecord>)>, DbError> {
        let c = self.lock();
        let mut st = c.prepare_cached(&format!(
            "SELECT {VM_COLUMNS} FROM vms ORDER BY name COLLATE NOCASE"
        ))?;
        let mut vms: Vec<(Vm, Option<WorkerRecord>)> =
            st.query_map([], vm_from_row)?.collect::<Result<_, _>>()?;
        // Two queries for all the disks and adapters rather than two per VM.
        let mut disks = c.prepare_cached(
            "SELECT vm_id, controller, lun, path, read_only FROM disks ORDER BY vm_id, controller, lun",
        )?;
        let mut by_vm: std::collections::HashMap<String, Vec<Disk>> = Default::default();
        for r in disks.query_map([], |r| Ok((r.get::<_, String>(0)?, disk_from(r, 1)?)))? {
            let (id, d) = r?;
            by_vm.entry(id).or_default().push(d);
        }
        let mut nics = c.prepare_cached(
            "SELECT vm_id, name, switch, mac FROM network_adapters ORDER BY vm_id, idx",
        )?;
        let mut nic_by_vm: std::collections::HashMap<String, Vec<NetworkAdapter>> =
            Default::default();
        for r in nics.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                NetworkAdapter {
                    name: r.get(1)?,
                    switch: r.get(2)?,
                    mac: r.get(3)?,
                },
            ))
        })? {
            let (id, n) = r?;
            nic_by_vm.entry(id).or_default().push(n);
        }
        for (vm, _) in &mut vms {
            vm.disks = by_vm.remove(&vm.id).unwrap_or_default();
            vm.network_adapters = nic_by_vm.remove(&vm.id).unwrap_or_default();
        }
        Ok(vms)
    }

    /// Replaces a VM's configuration (not its state) and records `message`.
    pub fn update_config(&self, vm: &Vm, message: &str) -> Result<Event, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let Boot::Linux {
            kernel,
            initrd,
            cmdline,
        } = &vm.boot;
        let n = tx
            .execute(
                "UPDATE vms SET name = ?2, kernel = ?3, initrd = ?4, cmdline = ?5, processors = ?6,
                    memory_bytes = ?7, integration_services = ?8, enlightenments = ?9, notes = ?10
                 WHERE id = ?1",
                params![
                    vm.id,
                    vm.name,
                    kernel,
                    initrd,
                    cmdline,
                    vm.processors,
                    vm.memory_bytes as i64,
                    vm.integration_services,
                    vm.enlightenments,
                    vm.notes
                ],
            )
            .map_err(|e| unique_name(e, &vm.name))?;
        if n != 1 {
            return Err(DbError::Refused(format!("VM '{}' was removed", vm.name)));
        }
        tx.execute("DELETE FROM network_adapters WHERE vm_id = ?1", [&vm.id])?;
        write_adapters(&tx, &vm.id, &vm.network_adapters)?;
        let ev = event(
            &tx,
            &vm.id,
            &vm.name,
            "configured",
            None,
            None,
            false,
            message,
        )?;
        tx.commit()?;
        Ok(ev)
    }

    /// Records a state change if the VM is in `from` (one of them); returns the event, or
    /// `Ok(None)` when the VM is gone or in another state (nothing written).
    pub fn transition(
        &self,
        id: &str,
        from: &[VmState],
        t: &Transition,
    ) -> Result<Option<(Event, Vm)>, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let cur: Option<(String, String)> = tx
            .query_row("SELECT state, name FROM vms WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((cur, name)) = cur else {
            return Ok(None);
        };
        let cur = VmState::parse(&cur).unwrap_or(VmState::Off);
        if !from.contains(&cur) || !(cur == t.to || cur.can_become(t.to)) {
            return Ok(None);
        }
        let now = crate::model::now_ms();
        tx.execute(
            "UPDATE vms SET state = ?2, critical = ?3, reason = ?4, state_changed_ms = ?5 WHERE id = ?1",
            params![id, t.to.as_str(), t.critical, t.reason, now],
        )?;
        match &t.worker {
            Some(Some(w)) => {
                tx.execute(
                    "UPDATE vms SET worker_pid = ?2, worker_start_ticks = ?3, worker_started_ms = ?4 WHERE id = ?1",
                    params![id, w.pid, w.start_ticks as i64, w.started_ms],
                )?;
            }
            Some(None) => {
                tx.execute(
                    "UPDATE vms SET worker_pid = NULL, worker_start_ticks = NULL, worker_started_ms = NULL WHERE id = ?1",
                    [id],
                )?;
            }
            None => {}
        }
        let ev = event(
            &tx,
            id,
            &name,
            "state",
            Some(cur),
            Some(t.to),
            t.critical,
            &t.reason,
        )?;
        let (mut vm, _) = tx.query_row(
            &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"),
            [id],
            vm_from_row,
        )?;
        fill(&tx, &mut vm)?;
        tx.commit()?;
        Ok(Some((ev, vm)))
    }

    /// Records (or clears) a VM's worker without a state change.
    pub fn set_worker(&self, id: &str, w: Option<&WorkerRecord>) -> Result<(), DbError> {
        let c = self.lock();
        match w {
            Some(w) => c.execute(
                "UPDATE vms SET worker_pid = ?2, worker_start_ticks = ?3, worker_started_ms = ?4 WHERE id = ?1",
                params![id, w.pid, w.start_ticks as i64, w.started_ms],
            )?,
            None => c.execute(
                "UPDATE vms SET worker_pid = NULL, worker_start_ticks = NULL, worker_started_ms = NULL WHERE id = ?1",
                [id],
            )?,
        };
        Ok(())
    }

    /// Records an event that is not a state change (`adopted`, `reboot-requested`, ...).
    pub fn note(&self, id: &str, kind: &str, message: &str) -> Result<Option<Event>, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let name: Option<String> = tx
            .query_row("SELECT name FROM vms WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        let Some(name) = name else { return Ok(None) };
        let ev = event(&tx, id, &name, kind, None, None, false, message)?;
        tx.commit()?;
        Ok(Some(ev))
    }

    /// Removes a VM that is Off or Saved (checked inside the transaction).
    pub fn delete(&self, id: &str) -> Result<Event, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let (state, name): (String, String) =
            tx.query_row("SELECT state, name FROM vms WHERE id = ?1", [id], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        if !matches!(VmState::parse(&state), Some(VmState::Off | VmState::Saved)) {
            return Err(DbError::Refused(format!(
                "VM '{name}' is {state}: turn it off before removing it"
            )));
        }
        tx.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        let ev = event(&tx, id, &name, "removed", None, None, false, "removed")?;
        tx.commit()?;
        Ok(ev)
    }

    /// Attaches a disk (the caller has validated it).
    pub fn attach_disk(&self, id: &str, d: &Disk) -> Result<Event, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let name: String =
            tx.query_row("SELECT name FROM vms WHERE id = ?1", [id], |r| r.get(0))?;
        insert_disk(&tx, id, d)?;
        let ev = event(
            &tx,
            id,
            &name,
            "disk-attached",
            None,
            None,
            false,
            &format!(
                "disk {} attached at SCSI {}:{}{}",
                d.path,
                d.controller,
                d.lun,
                if d.read_only { " (read-only)" } else { "" }
            ),
        )?;
        tx.commit()?;
        Ok(ev)
    }

    pub fn detach_disk(
        &self,
        id: &str,
        controller: u32,
        lun: u32,
    ) -> Result<Option<Event>, DbError> {
        let mut c = self.lock();
        let tx = c.transaction()?;
        let name: String =
            tx.query_row("SELECT name FROM vms WHERE id = ?1", [id], |r| r.get(0))?;
        let path: Option<String> = tx
            .query_row(
                "SELECT path FROM disks WHERE vm_id = ?1 AND controller = ?2 AND lun = ?3",
                params![id, controller, lun],
                |r| r.get(0),
            )
            .optional()?;
        let Some(path) = path else { return Ok(None) };
        tx.execute(
            "DELETE FROM disks WHERE vm_id = ?1 AND controller = ?2 AND lun = ?3",
            params![id, controller, lun],
        )?;
        let ev = event(
            &tx,
            id,
            &name,
            "disk-detached",
            None,
            None,
            false,
            &format!("disk {path} detached from SCSI {controller}:{lun}"),
        )?;
        tx.commit()?;
        Ok(Some(ev))
    }

    /// The VMs (id, name, state) that have `path` attached.
    pub fn disk_users(&self, path: &str) -> Result<Vec<(String, String, VmState)>, DbError> {
        let c = self.lock();
        let mut st = c.prepare_cached(
            "SELECT vms.id, vms.name, vms.state FROM disks JOIN vms ON vms.id = disks.vm_id WHERE disks.path = ?1",
        )?;
        let v = st
            .query_map([path], |r| {
                let s: String = r.get(2)?;
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    VmState::parse(&s).unwrap_or(VmState::Off),
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(v)
    }

    /// Events after `since` (oldest first), optionally for one VM id.
    pub fn events(
        &self,
        vm_id: Option<&str>,
        since: i64,
        limit: u32,
    ) -> Result<Vec<Event>, DbError> {
        let c = self.lock();
        let mut st = c.prepare_cached(
            "SELECT seq, time_ms, vm_id, vm_name, kind, from_state, to_state, critical, message
             FROM events WHERE seq > ?1 AND (?2 IS NULL OR vm_id = ?2) ORDER BY seq LIMIT ?3",
        )?;
        let v = st
            .query_map(params![since, vm_id, limit], event_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(v)
    }

    /// The newest `limit` events (returned oldest first), optionally for one VM id.
    pub fn last_events(&self, vm_id: Option<&str>, limit: u32) -> Result<Vec<Event>, DbError> {
        let c = self.lock();
        let mut st = c.prepare_cached(
            "SELECT seq, time_ms, vm_id, vm_name, kind, from_state, to_state, critical, message
             FROM events WHERE (?1 IS NULL OR vm_id = ?1) ORDER BY seq DESC LIMIT ?2",
        )?;
        let mut v: Vec<Event> = st
            .query_map(params![vm_id, limit], event_from_row)?
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Checks that the database still answers (for the service's health).
    pub fn ping(&self) -> Result<(), DbError> {
        self.lock().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}

const VM_COLUMNS: &str = "id, name, kernel, initrd, cmdline, processors, memory_bytes, \
    integration_services, enlightenments, notes, state, critical, reason, state_changed_ms, \
    created_ms, worker_pid, worker_start_ticks, worker_started_ms";

fn vm_from_row(r: &Row) -> rusqlite::Result<(Vm, Option<WorkerRecord>)> {
    let state: String = r.get(10)?;
    let pid: Option<i32> = r.get(15)?;
    let ticks: Option<i64> = r.get(16)?;
    let started: Option<i64> = r.get(17)?;
    let worker = match (pid, ticks, started) {
        (Some(pid), Some(t), Some(s)) => Some(WorkerRecord {
            pid,
            start_ticks: t as u64,
            started_ms: s,
        }),
        _ => None,
    };
    let memory: i64 = r.get(6)?;
    Ok((
        Vm {
            id: r.get(0)?,
            name: r.get(1)?,
            boot: Boot::Linux {
                kernel: r.get(2)?,
                initrd: r.get(3)?,
                cmdline: r.get(4)?,
            },
            processors: r.get(5)?,
            memory_bytes: memory as u64,
            disks: Vec::new(),
            network_adapters: Vec::new(),
            integration_services: r.get(7)?,
            enlightenments: r.get(8)?,
            notes: r.get(9)?,
            state: VmState::parse(&state).unwrap_or(VmState::Off),
            critical: r.get(11)?,
            reason: r.get(12)?,
            state_changed_ms: r.get(13)?,
            created_ms: r.get(14)?,
            uptime_secs: None,
            worker_pid: worker.as_ref().map(|w| w.pid),
        },
        worker,
    ))
}

fn disk_from(r: &Row, i: usize) -> rusqlite::Result<Disk> {
    Ok(Disk {
        controller: r.get(i)?,
        lun: r.get(i + 1)?,
        path: r.get(i + 2)?,
        read_only: r.get(i + 3)?,
    })
}

fn fill(c: &Connection, vm: &mut Vm) -> Result<(), DbError> {
    let mut st = c.prepare_cached(
        "SELECT controller, lun, path, read_only FROM disks WHERE vm_id = ?1 ORDER BY controller, lun",
    )?;
    vm.disks = st
        .query_map([&vm.id], |r| disk_from(r, 0))?
        .collect::<Result<_, _>>()?;
    let mut st = c.prepare_cached(
        "SELECT name, switch, mac FROM network_adapters WHERE vm_id = ?1 ORDER BY idx",
    )?;
    vm.network_adapters = st
        .query_map([&vm.id], |r| {
            Ok(NetworkAdapter {
                name: r.get(0)?,
                switch: r.get(1)?,
                mac: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(())
}

fn insert_disk(tx: &Transaction, id: &str, d: &Disk) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO disks (vm_id, controller, lun, path, read_only) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, d.controller, d.lun, d.path, d.read_only],
    )
    .map_err(|e| match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            DbError::Refused(format!(
                "SCSI {}:{} already has a disk",
                d.controller, d.lun
            ))
        }
        e => DbError::Sql(e),
    })?;
    Ok(())
}

fn write_adapters(tx: &Transaction, id: &str, a: &[NetworkAdapter]) -> Result<(), DbError> {
    for (i, n) in a.iter().enumerate() {
        tx.execute(
            "INSERT INTO network_adapters (vm_id, idx, name, switch, mac) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, i as i64, n.name, n.switch, n.mac],
        )?;
    }
    Ok(())
}

fn unique_name(e: rusqlite::Error, name: &str) -> DbError {
    match &e {
        rusqlite::Error::SqliteFailure(f, Some(m))
            if f.code == rusqlite::ErrorCode::ConstraintViolation && m.contains("vms.name") =>
        {
            DbError::DuplicateName(name.to_string())
        }
        _ => DbError::Sql(e),
    }
}

#[allow(clippy::too_many_arguments)]
fn event(
    tx: &Transaction,
    id: &str,
    name: &str,
    kind: &str,
    from: Option<VmState>,
    to: Option<VmState>,
    critical: bool,
    message: &str,
) -> Result<Event, DbError> {
    let now = crate::model::now_ms();
    tx.execute(
        "INSERT INTO events (time_ms, vm_id, vm_name, kind, from_state, to_state, critical, message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            now,
            id,
            name,
            kind,
            from.map(VmState::as_str),
            to.map(VmState::as_str),
            critical,
            message
        ],
    )?;
    let seq = tx.last_insert_rowid();
    if seq % 1000 == 0 {
        tx.execute("DELETE FROM events WHERE seq <= ?1", [seq - MAX_EVENTS])?;
    }
    Ok(Event {
        seq,
        time_ms: now,
        vm_id: id.into(),
        vm_name: name.into(),
        kind: kind.into(),
        from,
        to,
        critical,
        message: message.into(),
    })
}

fn event_from_row(r: &Row) -> rusqlite::Result<Event> {
    let from: Option<String> = r.get(5)?;
    let to: Option<String> = r.get(6)?;
    Ok(Event {
        seq: r.get(0)?,
        time_ms: r.get(1)?,
        vm_id: r.get(2)?,
        vm_name: r.get(3)?,
        kind: r.get(4)?,
        from: from.as_deref().and_then(VmState::parse),
        to: to.as_deref().and_then(VmState::parse),
        critical: r.get(7)?,
        message: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> Vm {
        crate::model::test_vm(name)
    }

    #[test]
    fn inventory_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inventory.db");
        assert!(
            Db::open(&p, false).is_err(),
            "missing file must not be created"
        );
        let db = Db::open(&p, true).unwrap();
        assert_eq!(db.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let a = vm("alpha");
        db.insert_vm(&a).unwrap();
        assert!(matches!(
            db.insert_vm(&vm("ALPHA")),
            Err(DbError::DuplicateName(_))
        ));
        let got = db.get("Alpha").unwrap().unwrap();
        assert_eq!(got.id, a.id);
        assert_eq!(got.disks, a.disks);
        assert_eq!(db.get(&a.id).unwrap().unwrap().name, "alpha");
        // Off → Running is not a transition of the state machine.
        let t = Transition {
            to: VmState::Running,
            critical: false,
            reason: "x".into(),
            worker: None,
        };
        assert!(db.transition(&a.id, &[VmState::Off], &t).unwrap().is_none());
        let t = Transition {
            to: VmState::Starting,
            ..t
        };
        assert!(db.transition(&a.id, &[VmState::Off], &t).unwrap().is_some());
        assert!(matches!(db.delete(&a.id), Err(DbError::Refused(_))));
        assert_eq!(db.disk_users("/d").unwrap().len(), 1);
        let evs = db.events(Some(&a.id), 0, 100).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[1].to, Some(VmState::Starting));
        drop(db);
        // Reopens and keeps the data.
        let db = Db::open(&p, false).unwrap();
        assert_eq!(db.list().unwrap().len(), 1);
    }

    #[test]
    fn refuses_foreign_and_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inventory.db");
        std::fs::write(&p, b"").unwrap();
        assert!(Db::open(&p, true).unwrap_err().contains("empty"));
        std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
        let e = Db::open(&p, true).unwrap_err();
        assert!(
            e.contains("cannot be used") || e.contains("not a Verdigris"),
            "{e}"
        );
        assert_eq!(
            std::fs::read(&p).unwrap(),
            vec![0x42u8; 8192],
            "file left as it was"
        );
        // Another program's SQLite database.
        std::fs::remove_file(&p).unwrap();
        let c = Connection::open(&p).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(c);
        assert!(Db::open(&p, true).unwrap_err().contains("not a Verdigris"));
        // A newer schema.
        std::fs::remove_file(&p).unwrap();
        drop(Db::open(&p, true).unwrap());
        let c = Connection::open(&p).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        assert!(Db::open(&p, false).unwrap_err().contains("newer"));
    }
}
