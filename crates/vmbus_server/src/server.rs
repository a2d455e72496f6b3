//! [`VmbusServer`]: a [`ServerCore`] on its own control thread, fed by the hypercall paths.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmbus_protocol::MAX_MESSAGE_SIZE;

use crate::state::Registry;
use crate::{
    DeviceId, GuestRam, GuestSynic, ServerConfig, ServerCore, ServerError, ServerStatus, Vsp,
    HV_STATUS_INSUFFICIENT_BUFFERS, HV_STATUS_SUCCESS,
};

/// Stop taking guest messages while this many replies wait for a free SIMP slot (the guest is
/// then told INSUFFICIENT_BUFFERS and retries): bounds the outbound queue.
const OUTBOUND_PAUSE: usize = 64;
/// Retry delay for a busy SIMP slot when the worker does not report the slot freed.
const RETRY_DELAY: Duration = Duration::from_millis(5);

struct GuestMessage {
    vp: u32,
    connection_id: u32,
    len: usize,
    data: [u8; MAX_MESSAGE_SIZE],
}

type Reply<T> = SyncSender<T>;

enum Command {
    Add(Box<dyn Vsp>, Reply<Result<DeviceId, ServerError>>),
    Remove(DeviceId, Reply<Result<(), ServerError>>),
    Status(Reply<ServerStatus>),
    Reset(Reply<()>),
}

#[derive(Default)]
struct Queue {
    inbound: VecDeque<GuestMessage>,
    commands: VecDeque<Command>,
    slot_freed: bool,
    /// A VSP queued a sub-channel request in the registry.
    sub_channel_requests: bool,
    shutdown: bool,
}

struct Inner {
    registry: Arc<Registry>,
    inbound_capacity: usize,
    queue: Mutex<Queue>,
    cond: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The VMBus server of one VM: a [`ServerCore`] run by a control thread.
///
/// `post_message`, `signal_event` and `message_slot_freed` are called from VP threads and
/// never wait for the control thread. The host-side requests (`add_device`,
/// `remove_device`, `status`, `reset`) wait for it; they must not be called from a VSP's
/// `open`/`close` or from a VSP thread that `close` waits for.
pub struct VmbusServer {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl VmbusServer {
    /// Start a server (and its control thread) with no devices.
    pub fn new(
        config: ServerConfig,
        synic: Arc<dyn GuestSynic>,
        ram: Arc<dyn GuestRam>,
    ) -> std::io::Result<Self> {
        let inbound_capacity = config.inbound_queue.max(1);
        let core = ServerCore::new(config, synic, ram);
        let inner = Arc::new(Inner {
            registry: core.registry(),
            inbound_capacity,
            queue: Mutex::new(Queue::default()),
            cond: Condvar::new(),
        });
        let weak = Arc::downgrade(&inner);
        inner.registry.set_notifier(Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.lock().sub_channel_requests = true;
                inner.cond.notify_all();
            }
        }));
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("vmbus-control".into())
                .spawn(move || control_thread(&inner, core))?
        };
        Ok(Self {
            inner,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// HvPostMessage from VP `vp`: validate and queue the message; returns the hypercall
    /// status (0, INVALID_PARAMETER, INVALID_CONNECTION_ID, or INSUFFICIENT_BUFFERS when the
    /// queue is full).
    pub fn post_message(
        &self,
        vp: u32,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> u16 {
        let status = self
            .inner
            .registry
            .check_post(connection_id, message_type, payload);
        if status != HV_STATUS_SUCCESS {
            return status;
        }
        let mut q = self.inner.lock();
        if q.shutdown || q.inbound.len() >= self.inner.inbound_capacity {
            return HV_STATUS_INSUFFICIENT_BUFFERS;
        }
        let mut data = [0u8; MAX_MESSAGE_SIZE];
        data[..payload.len()].copy_from_slice(payload);
        q.inbound.push_back(GuestMessage {
            vp,
            connection_id,
            len: payload.len(),
            data,
        });
        drop(q);
        self.inner.cond.notify_all();
        HV_STATUS_SUCCESS
    }

    /// HvSignalEvent from VP `vp` (fast hypercall: `connection_id` and `flag` from RDX);
    /// wakes the channel with that connection id. Returns the hypercall status.
    pub fn signal_event(&self, _vp: u32, connection_id: u32, flag: u16) -> u16 {
        self.inner.registry.signal_event(connection_id, flag)
    }

    /// The guest freed a SIMP message slot (EOM): retry queued messages now.
    pub fn message_slot_freed(&self, _vp: u32) {
        self.inner.lock().slot_freed = true;
        self.inner.cond.notify_all();
    }

    fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (tx, rx) = sync_channel(1);
        {
            let mut q = self.inner.lock();
            if q.shutdown {
                return None;
            }
            q.commands.push_back(make(tx));
        }
        self.inner.cond.notify_all();
        rx.recv().ok()
    }

    /// Add a device; it is offered at once if the guest has asked for offers.
    pub fn add_device(&self, vsp: Box<dyn Vsp>) -> Result<DeviceId, ServerError> {
        self.request(|tx| Command::Add(vsp, tx))
            .unwrap_or(Err(ServerError::ShutDown))
    }

    /// Remove a device (hot unplug): close its channel and rescind it. The relid stays taken
    /// until the guest sends RELID_RELEASED.
    pub fn remove_device(&self, device: DeviceId) -> Result<(), ServerError> {
        self.request(|tx| Command::Remove(device, tx))
            .unwrap_or(Err(ServerError::ShutDown))
    }

    /// A snapshot of the state.
    pub fn status(&self) -> Result<ServerStatus, ServerError> {
        self.request(Command::Status).ok_or(ServerError::ShutDown)
    }

    /// Drop the guest's connection (VM reset): close every channel; devices are offered again
    /// after the guest reconnects.
    pub fn reset(&self) -> Result<(), ServerError> {
        self.request(Command::Reset).ok_or(ServerError::ShutDown)
    }

    /// Close every channel (VSPs' `close` is called), stop the control thread and drop the
    /// VSPs. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        self.inner.lock().shutdown = true;
        self.inner.cond.notify_all();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for VmbusServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn control_thread(inner: &Inner, mut core: ServerCore) {
    loop {
        let (commands, messages) = {
            let mut q = inner.lock();
            loop {
                if q.shutdown {
                    // Pending requests get "shut down" (their senders are dropped).
                    q.commands.clear();
                    drop(q);
                    core.reset();
                    return;
                }
                let take_inbound = core.queued_messages() < OUTBOUND_PAUSE;
                if !q.commands.is_empty()
                    || (take_inbound && !q.inbound.is_empty())
                    || q.slot_freed
                    || q.sub_channel_requests
                {
                    break;
                }
                if core.queued_messages() > 0 {
                    q = inner
                        .cond
                        .wait_timeout(q, RETRY_DELAY)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    break;
                }
                q = inner.cond.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            q.slot_freed = false;
            q.sub_channel_requests = false;
            let commands: Vec<Command> = q.commands.drain(..).collect();
            let messages: Vec<GuestMessage> = if core.queued_messages() < OUTBOUND_PAUSE {
                q.inbound.drain(..).collect()
            } else {
                Vec::new()
            };
            (commands, messages)
        };
        // Guest messages first: a host request made after a guest message was posted sees
        // its effect (tests rely on `status()` as a barrier).
        for m in messages {
            core.handle_message(m.vp, m.connection_id, &m.data[..m.len]);
            core.flush();
        }
        // Sub-channel requests VSP threads queued (after the guest messages: a request
        // from an opening the guest has closed meanwhile is dropped).
        core.handle_sub_channel_requests();
        core.flush();
        for c in commands {
            match c {
                Command::Add(vsp, tx) => {
                    let _ = tx.send(core.add_device(vsp));
                }
                Command::Remove(id, tx) => {
                    let _ = tx.send(core.remove_device(id));
                }
                Command::Status(tx) => {
                    let _ = tx.send(core.status());
                }
                Command::Reset(tx) => {
                    core.reset();
                    let _ = tx.send(());
                }
            }
            core.flush();
        }
        core.flush();
    }
}
