//! `test=timer`: ten periodic LAPIC timer interrupts, taken with `sti; hlt`.

use crate::arch::{TICKS, TIMER_VECTOR};
use crate::io::wait_for_interrupt;
use crate::lapic;
use crate::serial::Writer;
use core::sync::atomic::Ordering;

/// Timer period in APIC timer ticks (after divide-by-16). The frequency is not assumed; with
/// KVM's 1 GHz APIC bus this is 16 ms.
pub const PERIOD: u32 = 1_000_000;
const WANTED: u64 = 10;

pub fn run() {
    if let Err(e) = lapic::enable() {
        Writer::lock().str("timer: FAIL (").str(e).str(")\n");
        return;
    }
    let start = TICKS.load(Ordering::Relaxed);
    lapic::start_periodic_timer(TIMER_VECTOR, PERIOD);
    while TICKS.load(Ordering::Relaxed) - start < WANTED {
        wait_for_interrupt();
    }
    lapic::stop_timer();
    let n = TICKS.load(Ordering::Relaxed) - start;
    Writer::lock().str("timer: ").dec(n).str(" interrupts\n");
}
