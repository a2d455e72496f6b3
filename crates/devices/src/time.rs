//! The VM's guest clock: wall time scaled by the VM's time scale.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Guest time. `scale` is guest seconds per wall second (1.0 = real time; 0.1 = the guest sees
/// one second pass for every ten wall seconds). Every clock the guest can read (TSC frequency it
/// is told, PIT, RTC, PM timer, LAPIC timer frequency, the Hyper-V reference time) derives from
/// this one value so that they agree.
#[derive(Debug, Clone)]
pub struct GuestTime {
    start: Instant,
    scale: f64,
    /// UNIX time (ns) the guest's calendar started at.
    epoch_unix_ns: u128,
}

impl GuestTime {
    pub fn new(scale: f64) -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self::with_epoch(scale, epoch)
    }

    pub fn with_epoch(scale: f64, epoch_unix_ns: u128) -> Self {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        Self {
            start: Instant::now(),
            scale,
            epoch_unix_ns,
        }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Guest nanoseconds since the VM started.
    pub fn now_ns(&self) -> u64 {
        self.wall_to_guest_ns(self.start.elapsed().as_nanos() as u64)
    }

    pub fn wall_to_guest_ns(&self, wall_ns: u64) -> u64 {
        (wall_ns as f64 * self.scale) as u64
    }

    pub fn guest_to_wall_ns(&self, guest_ns: u64) -> u64 {
        (guest_ns as f64 / self.scale) as u64
    }

    /// The wall-clock instant at which guest time reaches `guest_ns`.
    pub fn instant_of(&self, guest_ns: u64) -> Instant {
        self.start + std::time::Duration::from_nanos(self.guest_to_wall_ns(guest_ns))
    }

    /// Guest calendar time, UNIX nanoseconds.
    pub fn unix_ns(&self) -> u128 {
        self.epoch_unix_ns + u128::from(self.now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_converts_both_ways() {
        let t = GuestTime::with_epoch(0.1, 0);
        assert_eq!(t.wall_to_guest_ns(1_000_000_000), 100_000_000);
        assert_eq!(t.guest_to_wall_ns(100_000_000), 1_000_000_000);
        let bad = GuestTime::with_epoch(f64::NAN, 0);
        assert_eq!(bad.scale(), 1.0);
    }
}
