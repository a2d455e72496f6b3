//! CMOS RAM and the MC146818 real-time clock (ports 0x70/0x71).
//!
//! The calendar runs on the VM's [`GuestTime`], so it advances at the guest time scale; a guest
//! that sets the clock stores an offset. Hand-written: no maintained crate models the x86 CMOS.

use crate::{GuestTime, PortDevice};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const BASE: u16 = 0x70;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;
const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;
const B_SET: u8 = 0x80;

/// Guest-visible CMOS state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    pub ram: Vec<u8>,
    /// Seconds added to guest time by guest writes to the clock.
    pub offset_secs: i64,
}

pub struct Cmos {
    pub state: CmosState,
    time: Arc<GuestTime>,
}

/// Calendar fields of a UNIX time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday.
    pub weekday: u32,
}

/// Converts UNIX seconds to a proleptic Gregorian date (days-from-civil inverse).
pub fn datetime(unix: i64) -> DateTime {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (secs / 3600) as u32,
        minute: (secs / 60 % 60) as u32,
        second: (secs % 60) as u32,
        weekday: ((days + 4).rem_euclid(7) + 1) as u32,
    }
}

/// Converts a date to UNIX seconds.
pub fn unix_of(y: i64, m: u32, d: u32, hh: u32, mm: u32, ss: u32) -> i64 {
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss)
}

impl Cmos {
    /// `mem_below_4g` / `mem_above_4g` fill the legacy memory-size bytes.
    pub fn new(time: Arc<GuestTime>, mem_below_4g: u64, mem_above_4g: u64) -> Self {
        let mut ram = vec![0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[REG_B] = B_24H;
        ram[REG_D] = 0x80; // RAM and time valid
        let ext_kb = (mem_below_4g.saturating_sub(1 << 20) / 1024).min(0xffff) as u16;
        ram[0x17..0x19].copy_from_slice(&ext_kb.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext_kb.to_le_bytes());
        let above16 = (mem_below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        ram[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        let high = (mem_above_4g >> 16).min(0xff_ffff) as u32;
        ram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
        Self {
            state: CmosState {
                index: 0,
                ram,
                offset_secs: 0,
            },
            time,
        }
    }

    fn now_secs(&self) -> (i64, u32) {
        let ns = self.time.unix_ns();
        let secs = (ns / 1_000_000_000) as i64 + self.state.offset_secs;
        (secs, (ns % 1_000_000_000) as u32)
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.state.ram[REG_B] & B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.state.ram[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.state.ram[REG_B] & B_24H != 0 {
            self.encode(h)
        } else {
            let pm = h >= 12;
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            self.encode(h12) | if pm { 0x80 } else { 0 }
        }
    }

    fn read_reg(&mut self, idx: usize) -> u8 {
        let (secs, subsec_ns) = self.now_secs();
        let t = datetime(secs);
        match idx {
            0x00 => self.encode(t.second),
            0x02 => self.encode(t.minute),
            0x04 => self.encode_hour(t.hour),
            0x06 => self.encode(t.weekday),
            0x07 => self.encode(t.day),
            0x08 => self.encode(t.month),
            0x09 => self.encode(t.year.rem_euclid(100) as u32),
            CENTURY => self.encode(t.year.div_euclid(100) as u32),
            REG_A => {
                // Update in progress during the last 244 µs of each second.
                let uip = if subsec_ns >= 1_000_000_000 - 244_000 {
                    0x80
                } else {
                    0
                };
                (self.state.ram[REG_A] & 0x7f) | uip
            }
            REG_C => {
                let v = self.state.ram[REG_C];
                self.state.ram[REG_C] = 0;
                v
            }
            i => self.state.ram[i],
        }
    }

    fn write_reg(&mut self, idx: usize, v: u8) {
        match idx {
            0x00 | 0x02 | 0x04 | 0x07 | 0x08 | 0x09 | CENTURY => {
                let (secs, _) = self.now_secs();
                let t = datetime(secs);
                let mut f = [
                    t.year.div_euclid(100) as u32,
                    t.year.rem_euclid(100) as u32,
                    t.month,
                    t.day,
                    t.hour,
                    t.minute,
                    t.second,
                ];
                let val = if idx == 0x04 && self.state.ram[REG_B] & B_24H == 0 {
                    let h = self.decode(v & 0x7f) % 12;
                    h + if v & 0x80 != 0 { 12 } else { 0 }
                } else {
                    self.decode(v)
                };
                let slot = match idx {
                    CENTURY => 0,
                    0x09 => 1,
                    0x08 => 2,
                    0x07 => 3,
                    0x04 => 4,
                    0x02 => 5,
                    _ => 6,
                };
                f[slot] = val;
                // Reject impossible dates silently, as hardware would latch garbage; keep time.
                if (1..=12).contains(&f[2])
                    && (1..=31).contains(&f[3])
                    && f[4] < 24
                    && f[5] < 60
                    && f[6] < 60
                {
                    let want = unix_of(
                        i64::from(f[0]) * 100 + i64::from(f[1]),
                        f[2],
                        f[3],
                        f[4],
                        f[5],
                        f[6],
                    );
                    self.state.offset_secs += want - secs;
                }
            }
            REG_A => self.state.ram[REG_A] = v & 0x7f,
            REG_B => self.state.ram[REG_B] = v & !B_SET | (v & B_SET),
            REG_C | REG_D => {}
            i => self.state.ram[i] = v,
        }
    }
}

impl PortDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            0 => 0xff, // index register is write-only
            1 => {
                let idx = usize::from(self.state.index & 0x7f);
                self.read_reg(idx)
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        match offset {
            0 => self.state.index = data[0],
            1 => {
                let idx = usize::from(self.state.index & 0x7f);
                self.write_reg(idx, data[0]);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(c: &mut Cmos, i: u8) -> u8 {
        c.write(0, &[i]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn calendar_conversion_round_trips() {
        // 2026-11-21 07:31:30 UTC, a Saturday.
        let t = unix_of(2026, 11, 21, 7, 31, 30);
        let d = datetime(t);
        assert_eq!(
            (d.year, d.month, d.day, d.hour, d.minute, d.second),
            (2026, 11, 21, 7, 31, 30)
        );
        assert_eq!(d.weekday, 7);
        assert_eq!(datetime(0).year, 1970);
        assert_eq!(datetime(unix_of(2000, 2, 29, 0, 0, 0)).day, 29);
    }

    #[test]
    fn reads_bcd_time_of_guest_clock() {
        let epoch = unix_of(2024, 2, 29, 23, 59, 58) as u128 * 1_000_000_000;
        let mut c = Cmos::new(Arc::new(GuestTime::with_epoch(1.0, epoch)), 64 << 20, 0);
        assert_eq!(reg(&mut c, 0x09), 0x24);
        assert_eq!(reg(&mut c, 0x32), 0x20);
        assert_eq!(reg(&mut c, 0x08), 0x02);
        assert_eq!(reg(&mut c, 0x07), 0x29);
        assert_eq!(reg(&mut c, 0x04), 0x23);
        assert_eq!(reg(&mut c, 0x0d), 0x80);
        // Binary mode.
        c.write(0, &[0x0b]);
        c.write(1, &[B_24H | B_BINARY]);
        assert_eq!(reg(&mut c, 0x04), 23);
    }

    #[test]
    fn guest_can_set_the_clock() {
        let epoch = unix_of(2024, 1, 1, 0, 0, 0) as u128 * 1_000_000_000;
        let mut c = Cmos::new(Arc::new(GuestTime::with_epoch(1.0, epoch)), 64 << 20, 0);
        c.write(0, &[0x09]);
        c.write(1, &[0x30]); // year 2030
        assert_eq!(reg(&mut c, 0x09), 0x30);
        assert_eq!(reg(&mut c, 0x08), 0x01);
        // NVRAM bytes are plain storage; index with NMI bit masks it off.
        c.write(0, &[0x80 | 0x40]);
        c.write(1, &[0xab]);
        assert_eq!(reg(&mut c, 0x40), 0xab);
        // Status C clears on read.
        c.state.ram[REG_C] = 0x90;
        assert_eq!(reg(&mut c, 0x0c), 0x90);
        assert_eq!(reg(&mut c, 0x0c), 0x00);
    }
}
