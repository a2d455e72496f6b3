//! The 8254 programmable interval timer (ports 0x40–0x43) and system control port B (0x61,
//! channel 2's gate and output).
//!
//! Emulated in user space rather than with KVM's in-kernel PIT so that it runs on the VM's
//! scaled [`GuestTime`]: on our slow hosts a stock kernel's tick would otherwise livelock it.
//! Channel 0 raises IRQ 0 from a ticker thread ([`Ticker`]); the counters are computed from
//! guest time when read, so there is no per-tick work besides the interrupt.

use crate::{GuestTime, IrqLine, PortDevice};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};

pub const BASE: u16 = 0x40;
pub const PORT_B: u16 = 0x61;
pub const IRQ: u32 = 0;
pub const FREQ_HZ: u64 = 1_193_182;

/// One counter's guest-visible state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    pub mode: u8,
    /// 1 = LSB only, 2 = MSB only, 3 = LSB then MSB.
    pub access: u8,
    pub bcd: bool,
    /// Programmed count (0 means 65536).
    pub reload: u16,
    /// Guest ns at which the current count started.
    pub start_ns: u64,
    /// The counter has a count loaded.
    pub armed: bool,
    pub latched: Option<u16>,
    pub status_latch: Option<u8>,
    pub read_msb_next: bool,
    pub write_msb_next: bool,
    pub write_lsb: u8,
    pub gate: bool,
    /// Guest ns of the next channel-0 interrupt (periodic modes), or of the one-shot.
    pub next_irq_ns: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub channels: [ChannelState; 3],
    pub speaker: bool,
}

pub struct Pit {
    pub state: PitState,
    time: Arc<GuestTime>,
}

fn ticks_to_ns(t: u64) -> u64 {
    ((u128::from(t) * 1_000_000_000) / u128::from(FREQ_HZ)) as u64
}

fn ns_to_ticks(ns: u64) -> u64 {
    ((u128::from(ns) * u128::from(FREQ_HZ)) / 1_000_000_000) as u64
}

impl ChannelState {
    fn period(&self) -> u64 {
        if self.reload == 0 {
            0x1_0000
        } else {
            u64::from(self.reload)
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode & 3, 2 | 3) // modes 2, 3 (and their 6/7 aliases)
    }

    fn ticks(&self, now: u64) -> u64 {
        ns_to_ticks(now.saturating_sub(self.start_ns))
    }

    fn count(&self, now: u64) -> u16 {
        if !self.armed {
            return self.reload;
        }
        let t = self.ticks(now);
        let p = self.period();
        if self.periodic() {
            (p - t % p) as u16
        } else {
            (p.wrapping_sub(t) & 0xffff) as u16
        }
    }

    fn output(&self, now: u64) -> bool {
        if !self.armed {
            return self.mode == 0 || !self.gate; // mode 0 output starts low once written
        }
        let t = self.ticks(now);
        let p = self.period();
        match self.mode & 7 {
            0 | 1 => t >= p,
            2 | 6 => t % p != p - 1,
            3 | 7 => t % p < p.div_ceil(2),
            4 | 5 => t != p,
            _ => true,
        }
    }
}

impl Pit {
    pub fn new(time: Arc<GuestTime>) -> Self {
        let mut state = PitState::default();
        state.channels[0].gate = true;
        state.channels[1].gate = true;
        Self { state, time }
    }

    fn load(&mut self, ch: usize, value: u16) {
        let now = self.time.now_ns();
        let c = &mut self.state.channels[ch];
        c.reload = value;
        c.start_ns = now;
        c.armed = true;
        if ch == 0 {
            c.next_irq_ns = Some(now + ticks_to_ns(c.period()));
        }
    }

    fn control(&mut self, v: u8) {
        let sel = usize::from(v >> 6);
        let now = self.time.now_ns();
        if sel == 3 {
            // Read-back command.
            for ch in 0..3 {
                if v & (2 << ch) == 0 {
                    continue;
                }
                let c = &mut self.state.channels[ch];
                if v & 0x20 == 0 && c.latched.is_none() {
                    c.latched = Some(c.count(now));
                }
                if v & 0x10 == 0 {
                    let out = u8::from(c.output(now)) << 7;
                    c.status_latch =
                        Some(out | (c.access << 4) | ((c.mode & 7) << 1) | u8::from(c.bcd));
                }
            }
            return;
        }
        let c = &mut self.state.channels[sel];
        let access = (v >> 4) & 3;
        if access == 0 {
            if c.latched.is_none() {
                c.latched = Some(c.count(now));
            }
            return;
        }
        c.access = access;
        c.mode = (v >> 1) & 7;
        if c.mode > 5 {
            c.mode -= 4;
        }
        c.bcd = v & 1 != 0;
        c.armed = false;
        c.read_msb_next = false;
        c.write_msb_next = false;
        c.latched = None;
        if sel == 0 {
            c.next_irq_ns = None;
        }
    }

    fn read_counter(&mut self, ch: usize) -> u8 {
        let now = self.time.now_ns();
        let c = &mut self.state.channels[ch];
        if let Some(s) = c.status_latch.take() {
            return s;
        }
        let value = c.latched.unwrap_or_else(|| c.count(now));

        match c.access {
            1 => {
                c.latched = None;
                value as u8
            }
            2 => {
                c.latched = None;
                (value >> 8) as u8
            }
            _ => {
                if c.read_msb_next {
                    c.read_msb_next = false;
                    c.latched = None;
                    (value >> 8) as u8
                } else {
                    c.read_msb_next = true;
                    c.latched = Some(value);
                    value as u8
                }
            }
        }
    }

    fn write_counter(&mut self, ch: usize, v: u8) {
        let c = &mut self.state.channels[ch];
        match c.access {
            1 => self.load(ch, u16::from(v)),
            2 => self.load(ch, u16::from(v) << 8),
            3 => {
                if c.write_msb_next {
                    c.write_msb_next = false;
                    let lsb = c.write_lsb;
                    self.load(ch, u16::from(v) << 8 | u16::from(lsb));
                } else {
                    c.write_lsb = v;
                    c.write_msb_next = true;
                }
            }
            _ => {}
        }
    }

    /// Port 0x61: bit 0 gate 2, bit 1 speaker, bit 4 refresh toggle, bit 5 OUT2.
    pub fn read_port_b(&mut self) -> u8 {
        let now = self.time.now_ns();
        let c2 = &self.state.channels[2];
        let refresh = u8::from((now / 15_000) % 2 == 1) << 4;
        u8::from(c2.gate)
            | u8::from(self.state.speaker) << 1
            | refresh
            | u8::from(c2.output(now)) << 5
    }

    pub fn write_port_b(&mut self, v: u8) {
        let gate = v & 1 != 0;
        let c2 = &mut self.state.channels[2];
        if gate && !c2.gate && c2.armed {
            // A rising gate restarts modes 1 and 5 (and reloads others).
            c2.start_ns = self.time.now_ns();
        }
        c2.gate = gate;
        self.state.speaker = v & 2 != 0;
    }

    /// Advances channel 0's interrupt schedule. Returns how many interrupts are due at `now`
    /// (0 or 1: overdue periods are coalesced so a host stall never floods the guest).
    pub fn take_due_irq(&mut self, now: u64) -> bool {
        let c = &mut self.state.channels[0];
        let Some(next) = c.next_irq_ns else {
            return false;
        };
        if now < next {
            return false;
        }
        if c.periodic() {
            let p = ticks_to_ns(c.period()).max(1);
            let mut n = next + p;
            if n <= now {
                n = now + p - (now - next) % p;
            }
            c.next_irq_ns = Some(n);
        } else {
            c.next_irq_ns = None;
        }
        true
    }

    pub fn next_irq_ns(&self) -> Option<u64> {
        self.state.channels[0].next_irq_ns
    }
}

impl PortDevice for Pit {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() == 1 && offset < 3 {
            data[0] = self.read_counter(usize::from(offset));
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            0..=2 => self.write_counter(usize::from(offset), data[0]),
            3 => self.control(data[0]),
            _ => {}
        }
    }
}

/// Port 0x61 on the bus, sharing the PIT.
pub struct PortB(pub Arc<PitShared>);

impl PortDevice for PortB {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.lock().read_port_b();
        }
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.0.lock().write_port_b(v);
        }
        self.0.changed.notify_all();
    }
}

/// The PIT as shared between the bus, port B and the ticker thread.
pub struct PitShared {
    pit: Mutex<Pit>,
    changed: Condvar,
}

impl PitShared {
    pub fn new(pit: Pit) -> Arc<Self> {
        Arc::new(Self {
            pit: Mutex::new(pit),
            changed: Condvar::new(),
        })
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Pit> {
        self.pit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The PIT on the bus (ports 0x40–0x43): wakes the ticker when reprogrammed.
pub struct PitPorts(pub Arc<PitShared>);

impl PortDevice for PitPorts {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.lock().read(offset, data);
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        self.0.lock().write(offset, data);
        self.0.changed.notify_all();
    }
}

/// Raises IRQ 0 when channel 0 fires. Runs on its own thread until `stop` is set.
pub struct Ticker;

impl Ticker {
    pub fn run(
        shared: Arc<PitShared>,
        time: Arc<GuestTime>,
        irq: Arc<dyn IrqLine>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::Ordering;
        let mut pit = shared.lock();
        while !stop.load(Ordering::Relaxed) {
            let now = time.now_ns();
            if pit.take_due_irq(now) {
                drop(pit);
                irq.pulse();
                pit = shared.lock();
                continue;
            }
            let wait = match pit.next_irq_ns() {
                Some(t) => time
                    .instant_of(t)
                    .saturating_duration_since(std::time::Instant::now())
                    .min(std::time::Duration::from_millis(100)),
                None => std::time::Duration::from_millis(100),
            };
            pit = shared
                .changed
                .wait_timeout(pit, wait.max(std::time::Duration::from_micros(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    pub fn wake(shared: &PitShared) {
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pit() -> Pit {
        Pit::new(Arc::new(GuestTime::with_epoch(1.0, 0)))
    }

    #[test]
    fn counter_counts_down_and_latches() {
        let mut p = pit();
        p.write(3, &[0x34]); // ch0, lsb/msb, mode 2
        p.write(0, &[0x00]);
        p.write(0, &[0x00]); // 65536
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.write(3, &[0x00]); // latch ch0
        let mut b = [0];
        p.read(0, &mut b);
        let lo = b[0];
        p.read(0, &mut b);
        let v = u16::from(b[0]) << 8 | u16::from(lo);
        // >= 2 ms elapsed = >= 2386 ticks; far less than a full period.
        assert!(u32::from(v) < 65536 - 2000 && v > 1000, "count {v}");
        assert_eq!(p.state.channels[0].latched, None);
    }

    #[test]
    fn periodic_irq_schedule_coalesces() {
        let mut p = pit();
        p.write(3, &[0x34]);
        p.write(0, &[0x9c]);
        p.write(0, &[0x2e]); // 11932 ticks = 10 ms
        let first = p.next_irq_ns().unwrap();
        assert!(!p.take_due_irq(first - 1));
        assert!(p.take_due_irq(first));
        assert!(!p.take_due_irq(first + 1));
        // A 1 s stall produces one interrupt, and the schedule moves past now.
        assert!(p.take_due_irq(first + 1_000_000_000));
        assert!(p.next_irq_ns().unwrap() > first + 1_000_000_000);
        // Reprogramming stops the schedule until a count is loaded.
        p.write(3, &[0x30]);
        assert_eq!(p.next_irq_ns(), None);
    }

    #[test]
    fn readback_status_and_channel2_gate() {
        let mut p = pit();
        p.write(3, &[0xb0]); // ch2 lsb/msb mode 0
        p.write(2, &[0xff]);
        p.write(2, &[0xff]);
        p.write_port_b(1);
        assert_eq!(
            p.read_port_b() & 0x20,
            0,
            "mode 0 output low while counting"
        );
        p.write(3, &[0b1110_1000]); // read-back status of ch2
        let mut b = [0];
        p.read(2, &mut b);
        assert_eq!(b[0] & 0x3f, 0x30, "access 3, mode 0, binary");
        // Garbage widths are ignored.
        let mut w = [0u8; 4];
        p.read(0, &mut w);
        assert_eq!(w, [0xff; 4]);
    }
}
