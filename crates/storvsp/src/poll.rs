//! Adaptive polling: how long a channel thread keeps looking at its ring before it sleeps.
//!
//! Waking a sleeping thread costs a system call and a context switch on both sides (several
//! microseconds under nested virtualization), and a guest signal costs the guest a hypercall
//! exit. A guest that keeps a disk busy submits its next request within microseconds of a
//! completion, so the channel thread looks at the ring for a short while first, with the ring's
//! interrupt mask set so the guest does not signal meanwhile. QEMU's iothreads do the same
//! (`poll-max-ns`); the window adapts the same way: it grows while the thread, once asleep, is
//! woken again soon (polling a little longer would have caught that request), and shrinks to
//! nothing when sleeps are long (an idle or slow guest), so an idle channel costs no CPU.
//!
//! Pure bookkeeping, no clock of its own: the caller measures and reports.

use std::time::Duration;

/// The first window when polling starts to pay.
const START: Duration = Duration::from_micros(4);

/// The current polling window of one channel thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollWindow {
    now: Duration,
    max: Duration,
}

impl PollWindow {
    /// A window that adapts between nothing and `max` (`Duration::ZERO`: never poll).
    pub fn new(max: Duration) -> Self {
        Self {
            now: Duration::ZERO,
            max,
        }
    }

    /// How long to poll before the next sleep.
    pub fn window(&self) -> Duration {
        self.now
    }

    /// Polling found nothing and the thread then slept for `slept` before work came: a short
    /// sleep (within the maximum) says a longer window would have caught it; a long one says
    /// polling is wasted here.
    pub fn slept(&mut self, slept: Duration) {
        if self.max.is_zero() {
            return;
        }
        if slept <= self.max {
            if self.now < self.max {
                self.now = (self.now * 2).max(START).min(self.max);
            }
        } else {
            self.now /= 2;
            if self.now < START {
                self.now = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    #[test]
    fn starts_closed_and_grows_to_the_maximum_on_short_sleeps() {
        let mut w = PollWindow::new(MAX);
        assert_eq!(w.window(), Duration::ZERO);
        w.slept(Duration::from_micros(10));
        assert_eq!(w.window(), START);
        let mut last = w.window();
        for _ in 0..10 {
            w.slept(Duration::from_micros(10));
            assert!(w.window() >= last && w.window() <= MAX);
            last = w.window();
        }
        assert_eq!(w.window(), MAX);
    }

    #[test]
    fn long_sleeps_close_it_again() {
        let mut w = PollWindow::new(MAX);
        for _ in 0..10 {
            w.slept(Duration::from_micros(1));
        }
        assert_eq!(w.window(), MAX);
        let mut steps = 0;
        while w.window() > Duration::ZERO {
            w.slept(Duration::from_millis(5));
            steps += 1;
            assert!(steps < 10, "the window never closes");
        }
    }

    #[test]
    fn a_zero_maximum_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        for _ in 0..5 {
            w.slept(Duration::from_nanos(1));
            assert_eq!(w.window(), Duration::ZERO);
        }
    }
}
