//! The run state of one boot: stop reason, pause, the VPs' cancel handles and live counters,
//! shared by the VP threads, the devices (power events) and the control socket.

use crate::{vcpu, Stats, StopReason};
use devices::{PlatformEvents, PowerEvent};
use hypervisor::CancelHandle;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};

/// One boot of the VM, as seen by its threads and by the control socket.
pub(crate) struct Control {
    /// Bumped to ask every VP to report its registers (diagnostics: VERDIGRIS_SAMPLE_SECS).
    pub sample: std::sync::atomic::AtomicU64,
    pub reason: Mutex<Option<StopReason>>,
    pub cond: Condvar,
    pub cancels: Mutex<Vec<CancelHandle>>,
    paused: Mutex<bool>,
    resumed: Condvar,
    /// Each VP's counters, published by its thread.
    live: Mutex<Vec<Stats>>,
}

impl vcpu::VmState for Control {
    fn stopped(&self) -> bool {
        Control::stopped(self)
    }
    fn sample(&self) -> u64 {
        self.sample.load(Ordering::Relaxed)
    }
    fn wait_while_paused(&self) {
        let mut p = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        while *p && !self.stopped() {
            p = self.resumed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
    fn publish(&self, vp: u32, stats: &Stats) {
        let mut l = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = l.get_mut(vp as usize) {
            *slot = stats.clone();
        }
    }
}

impl Control {
    pub fn new(vps: u32) -> Self {
        Control {
            sample: std::sync::atomic::AtomicU64::new(0),
            reason: Mutex::new(None),
            cond: Condvar::new(),
            cancels: Mutex::new(Vec::new()),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            live: Mutex::new(vec![Stats::default(); vps as usize]),
        }
    }

    /// Stops every VP in KVM until [`Control::resume`] (guest time keeps running).
    pub(crate) fn pause(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = true;
        for c in self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.cancel();
        }
    }

    pub(crate) fn resume(&self) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.resumed.notify_all();
    }

    pub(crate) fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sum of every VP's counters right now.
    pub(crate) fn live_stats(&self) -> Stats {
        let mut t = Stats::default();
        for s in self.live.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.merge(s);
        }
        t
    }

    pub(crate) fn stop(&self, r: StopReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        drop(g);
        for c in self
            .cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.cancel();
        }
        self.cond.notify_all();
        self.resumed.notify_all();
    }

    pub fn stopped(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

pub(crate) struct Events(pub Arc<Control>);

impl PlatformEvents for Events {
    fn request(&self, e: PowerEvent) {
        self.0.stop(match e {
            PowerEvent::PowerOff => StopReason::PowerOff,
            PowerEvent::Reset => StopReason::Reboot,
        });
    }
}
