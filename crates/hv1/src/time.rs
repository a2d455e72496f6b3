//! Reference time (TLFS "Timers": partition reference counter and reference TSC page).
//!
//! The guest computes time from its TSC as `((tsc * scale) >> 64) + offset` (the TSC page
//! formula, 100 ns units). TIME_REF_COUNT is computed here with that exact formula and the
//! same `scale` and `offset`, so the MSR and the page always agree to the tick.
//!
//! Guest time may run slower than wall time (`time_scale` < 1, see ARCHITECTURE.md): the guest
//! is told the TSC ticks at `guest_tsc_hz = tsc_hz / time_scale`, so one wall second of TSC
//! ticks is `time_scale` guest seconds.

use crate::defs::REFERENCE_HZ;
use crate::{Config, ConfigError};

/// Largest VP count accepted (bounds the per-VP state allocated by `Hv1::new`).
pub const MAX_VPS: u32 = 4096;

/// Frequencies and the TSC page scale derived from a `Config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Timebase {
    /// The TSC frequency the guest is told (TSC_FREQUENCY).
    pub guest_tsc_hz: u64,
    /// The LAPIC timer frequency the guest is told (APIC_FREQUENCY).
    pub apic_hz: u64,
    /// TSC page scale: `(10^7 << 64) / guest_tsc_hz`.
    pub scale: u64,
}

impl Timebase {
    pub(crate) fn new(config: &Config) -> Result<Self, ConfigError> {
        if config.vp_count == 0 || config.vp_count > MAX_VPS {
            return Err(ConfigError::VpCount(config.vp_count));
        }
        let ts = config.time_scale;
        if !ts.is_finite() || ts <= 0.0 {
            return Err(ConfigError::TimeScale(ts));
        }
        // Both frequencies must be integers the u64/u128 arithmetic below can hold, and the
        // guest TSC must tick faster than the 10 MHz reference clock, or `scale` (a 0.64
        // fixed-point fraction) would not fit in 64 bits.
        let limit = (1u64 << 62) as f64;
        let guest_tsc = config.tsc_hz as f64 / ts;
        if !(guest_tsc > REFERENCE_HZ as f64 && guest_tsc < limit) {
            return Err(ConfigError::GuestTscHz {
                tsc_hz: config.tsc_hz,
                time_scale: ts,
            });
        }
        let apic = 1e9 / ts;
        if !(apic >= 1.0 && apic < limit) {
            return Err(ConfigError::TimeScale(ts));
        }
        let guest_tsc_hz = guest_tsc.round() as u64;
        if guest_tsc_hz <= REFERENCE_HZ {
            return Err(ConfigError::GuestTscHz {
                tsc_hz: config.tsc_hz,
                time_scale: ts,
            });
        }
        Ok(Timebase {
            guest_tsc_hz,
            apic_hz: apic.round() as u64,
            scale: scale_for(guest_tsc_hz),
        })
    }

    /// `(tsc * scale) >> 64`: the TSC converted to 100 ns units, before the offset.
    pub(crate) fn ticks(&self, tsc: u64) -> u64 {
        ((tsc as u128 * self.scale as u128) >> 64) as u64
    }
}

/// The TSC page scale for a TSC of `hz` (> 10^7) ticks per second.
pub(crate) fn scale_for(hz: u64) -> u64 {
    (((REFERENCE_HZ as u128) << 64) / hz as u128) as u64
}

/// The next TSC page sequence number: never 0 (the guest's "invalid, use the MSR") and
/// never 0xFFFFFFFF (treated as invalid by older guests).
pub(crate) fn next_sequence(prev: u32) -> u32 {
    match prev.wrapping_add(1) {
        0 | u32::MAX => 1,
        s => s,
    }
}
