//! The services driven in-process by a fake Linux guest (see [`guest`]).

mod guest;
mod hostile;
mod kvp;
mod services;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{
    create, HeartbeatConfig, IcConfig, IcHandles, IcVsp, KvpConfig, Phase, ServiceStatus,
    ShutdownConfig, TimesyncConfig,
};
use guest::{wait_for, TIMEOUT};

/// Short timings so that the suite stays fast.
fn quick_config(reference: Arc<AtomicU64>) -> IcConfig {
    let mut ts = TimesyncConfig::new(move || reference.fetch_add(7, Ordering::SeqCst));
    ts.interval = Duration::from_millis(40);
    ts.timeout = Duration::from_secs(2);
    IcConfig {
        heartbeat: Some(HeartbeatConfig {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(300),
        }),
        shutdown: Some(ShutdownConfig {
            timeout: Duration::from_secs(2),
        }),
        timesync: Some(ts),
        kvp: Some(KvpConfig {
            timeout: Duration::from_secs(2),
            max_items: 64,
        }),
    }
}

fn services() -> (Vec<IcVsp>, IcHandles) {
    create(b"test-vm", quick_config(Arc::new(AtomicU64::new(1000))))
}

fn wait_phase(what: &str, status: impl Fn() -> ServiceStatus, phase: Phase) {
    wait_for(what, TIMEOUT, || status().phase == phase);
}
