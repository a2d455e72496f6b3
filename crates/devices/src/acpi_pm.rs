//! The ACPI fixed-hardware register block (PM1 event/control, PM timer, GPE0) and the 0xCF9
//! reset control port.
//!
//! Layout (the FADT the worker builds points here):
//! `0x600` PM1a_STS (2), `0x602` PM1a_EN (2), `0x604` PM1a_CNT (2), `0x608` PM_TMR (4, 32-bit),
//! `0x610` GPE0_STS (2), `0x612` GPE0_EN (2). SCI is IRQ 9 (level). Writing SLP_TYP = 5 with
//! SLP_EN to PM1a_CNT is S5: power off. Hand-written: the register semantics are a page of the
//! ACPI spec and no maintained crate models them for x86 port I/O.

use crate::{GuestTime, IrqLine, PlatformEvents, PortDevice, PowerEvent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const BASE: u16 = 0x600;
pub const LEN: u16 = 0x14;
pub const PM1_EVT: u16 = BASE;
pub const PM1_CNT: u16 = BASE + 4;
pub const PM_TMR: u16 = BASE + 8;
pub const GPE0: u16 = BASE + 0x10;
pub const GPE0_LEN: u8 = 4;
pub const SCI_IRQ: u32 = 9;
/// The `_S5` sleep type value the DSDT announces.
pub const S5_TYPE: u16 = 5;
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;
pub const PM_TIMER_HZ: u64 = 3_579_545;

const STS_TMR: u16 = 1 << 0;
const STS_PWRBTN: u16 = 1 << 8;
const STS_WAK: u16 = 1 << 15;
const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_EN: u16 = 1 << 13;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmState {
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
    pub gpe0_sts: u16,
    pub gpe0_en: u16,
}

impl Default for PmState {
    fn default() -> Self {
        Self {
            pm1_sts: 0,
            pm1_en: 0,
            // No SMI command port: the platform is always in ACPI mode.
            pm1_cnt: CNT_SCI_EN,
            gpe0_sts: 0,
            gpe0_en: 0,
        }
    }
}

pub struct AcpiPm {
    pub state: PmState,
    time: Arc<GuestTime>,
    sci: Arc<dyn IrqLine>,
    events: Arc<dyn PlatformEvents>,
}

impl AcpiPm {
    pub fn new(
        time: Arc<GuestTime>,
        sci: Arc<dyn IrqLine>,
        events: Arc<dyn PlatformEvents>,
    ) -> Self {
        Self {
            state: PmState::default(),
            time,
            sci,
            events,
        }
    }

    fn timer(&self) -> u32 {
        ((u128::from(self.time.now_ns()) * u128::from(PM_TIMER_HZ)) / 1_000_000_000) as u32
    }

    fn update_sci(&self) {
        let s = &self.state;
        let active = (s.pm1_sts & s.pm1_en) != 0 || (s.gpe0_sts & s.gpe0_en) != 0;
        self.sci.set_level(active);
    }

    /// The virtual power button: asks an ACPI-aware guest to shut down.
    pub fn press_power_button(&mut self) {
        self.state.pm1_sts |= STS_PWRBTN;
        self.update_sci();
    }

    /// Raises general-purpose event `bit` (for hot-plug notifications).
    pub fn raise_gpe(&mut self, bit: u8) {
        if bit < 16 {
            self.state.gpe0_sts |= 1 << bit;
            self.update_sci();
        }
    }

    fn reg_byte(&self, off: u16) -> u8 {
        let s = &self.state;
        let w = |v: u16, hi: bool| if hi { (v >> 8) as u8 } else { v as u8 };
        match off {
            0 | 1 => w(s.pm1_sts, off == 1),
            2 | 3 => w(s.pm1_en, off == 3),
            4 | 5 => w(s.pm1_cnt & !CNT_SLP_EN, off == 5),
            8..=11 => self.timer().to_le_bytes()[usize::from(off - 8)],
            0x10 | 0x11 => w(s.gpe0_sts, off == 0x11),
            0x12 | 0x13 => w(s.gpe0_en, off == 0x13),
            _ => 0,
        }
    }

    fn write_word(&mut self, off: u16, v: u16, mask: u16) {
        let s = &mut self.state;
        match off {
            0 => s.pm1_sts &= !(v & mask & (STS_TMR | STS_PWRBTN | STS_WAK)),
            2 => s.pm1_en = (s.pm1_en & !mask) | (v & mask),
            4 => {
                let cnt = (s.pm1_cnt & !mask) | (v & mask);
                s.pm1_cnt = (cnt & !CNT_SLP_EN) | CNT_SCI_EN;
                if cnt & CNT_SLP_EN != 0 && mask & CNT_SLP_EN != 0 {
                    let typ = (cnt >> 10) & 7;
                    if typ == S5_TYPE {
                        self.events.request(PowerEvent::PowerOff);
                    }
                }
            }
            0x10 => s.gpe0_sts &= !(v & mask),
            0x12 => s.gpe0_en = (s.gpe0_en & !mask) | (v & mask),
            _ => {}
        }
        self.update_sci();
    }
}

impl PortDevice for AcpiPm {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.reg_byte(offset.wrapping_add(i as u16));
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // Gather the bytes per 16-bit register so that a word write is applied at once.
        let mut i = 0;
        while i < data.len() {
            let off = offset.wrapping_add(i as u16);
            let reg = off & !1;
            let (mut v, mut mask) = (0u16, 0u16);
            while i < data.len() && (offset.wrapping_add(i as u16) & !1) == reg {
                let shift = (offset.wrapping_add(i as u16) & 1) * 8;
                v |= u16::from(data[i]) << shift;
                mask |= 0xff << shift;
                i += 1;
            }
            self.write_word(reg, v, mask);
        }
    }
}

/// Port 0xCF9: writing a value with bit 2 set resets the machine.
pub struct ResetPort {
    pub last: u8,
    events: Arc<dyn PlatformEvents>,
}

impl ResetPort {
    pub fn new(events: Arc<dyn PlatformEvents>) -> Self {
        Self { last: 0, events }
    }
}

impl PortDevice for ResetPort {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.last;
        }
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.last = v & 0x0e;
            if v & 0x04 != 0 {
                self.events.request(PowerEvent::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rec {
        ev: Mutex<Vec<PowerEvent>>,
        level: Mutex<bool>,
    }
    impl PlatformEvents for Rec {
        fn request(&self, e: PowerEvent) {
            self.ev.lock().unwrap().push(e);
        }
    }
    impl IrqLine for Rec {
        fn set_level(&self, high: bool) {
            *self.level.lock().unwrap() = high;
        }
    }

    fn pm() -> (AcpiPm, Arc<Rec>) {
        let r = Arc::new(Rec::default());
        (
            AcpiPm::new(
                Arc::new(GuestTime::with_epoch(1.0, 0)),
                r.clone(),
                r.clone(),
            ),
            r,
        )
    }

    #[test]
    fn s5_write_powers_off_other_sleep_types_do_not() {
        let (mut p, r) = pm();
        p.write(4, &((1u16 << 10) | CNT_SLP_EN).to_le_bytes());
        assert!(r.ev.lock().unwrap().is_empty());
        p.write(4, &((S5_TYPE << 10) | CNT_SLP_EN).to_le_bytes());
        assert_eq!(*r.ev.lock().unwrap(), vec![PowerEvent::PowerOff]);
        let mut b = [0u8; 2];
        p.read(4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & CNT_SCI_EN, CNT_SCI_EN);
    }

    #[test]
    fn pm_timer_advances() {
        let (mut p, _) = pm();
        let mut a = [0u8; 4];
        p.read(8, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(1));
        let mut b = [0u8; 4];
        p.read(8, &mut b);
        let d = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a));
        assert!(d >= 3579, "advanced {d} ticks in >= 1 ms");
    }

    #[test]
    fn power_button_raises_sci_until_cleared() {
        let (mut p, r) = pm();
        p.press_power_button();
        assert!(!*r.level.lock().unwrap(), "not enabled yet");
        p.write(2, &STS_PWRBTN.to_le_bytes());
        assert!(*r.level.lock().unwrap());
        p.write(0, &STS_PWRBTN.to_le_bytes());
        assert!(!*r.level.lock().unwrap());
    }

    #[test]
    fn reset_port() {
        let r = Arc::new(Rec::default());
        let mut p = ResetPort::new(r.clone());
        p.write(0, &[0x02]);
        assert!(r.ev.lock().unwrap().is_empty());
        p.write(0, &[RESET_VALUE]);
        assert_eq!(*r.ev.lock().unwrap(), vec![PowerEvent::Reset]);
    }
}
