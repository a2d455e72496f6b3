//! # devices — the emulated legacy platform of a Verdigris VM
//!
//! What a non-enlightened guest (and an early-booting enlightened one) expects of a PC, as small
//! state machines behind a port-I/O bus: COM1 (16550), the i8042 keyboard controller (reset
//! line and enough of the controller protocol for Linux's probe), CMOS/RTC, the 8254 PIT, the
//! ACPI PM register block (PM timer, SCI enable, S5 power-off) and the 0xCF9 reset port.
//!
//! It talks to: the worker, through [`IoBus`] (called from VP threads), [`IrqLine`] (to raise
//! interrupts on the in-kernel interrupt controllers), [`GuestTime`] (the VM's scaled clock) and
//! [`PlatformEvents`] (power-off and reset requests).
//!
//! It must never: touch KVM or guest memory, block a VP thread on I/O, or panic on any guest
//! access — every port access from the guest is hostile input. Each device keeps its
//! guest-visible state in a plain `*State` struct (serde) that can be saved and restored;
//! resources (output streams, IRQ lines, clocks) stay outside it.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod pit;
pub mod serial;
mod time;

pub use time::GuestTime;

use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the start of its registered range.
pub trait PortDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// An interrupt line into the VM's interrupt controllers.
pub trait IrqLine: Send + Sync {
    fn set_level(&self, high: bool);
    /// An edge: raise and lower.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// What the platform asks of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    PowerOff,
    Reset,
}

/// Receives power-off and reset requests from devices.
pub trait PlatformEvents: Send + Sync {
    fn request(&self, event: PowerEvent);
}

struct Range {
    base: u16,
    len: u16,
    dev: Arc<Mutex<dyn PortDevice>>,
}

/// The port-I/O bus: maps port ranges to devices. Unclaimed ports read as all ones and ignore
/// writes, as on a PC.
#[derive(Default)]
pub struct IoBus {
    ranges: Vec<Range>,
}

/// Two devices claimed overlapping ports.
#[derive(Debug)]
pub struct Overlap {
    pub base: u16,
    pub len: u16,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ports {:#x}+{} overlap another device",
            self.base, self.len
        )
    }
}

impl IoBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` for ports `base..base+len`.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        dev: Arc<Mutex<dyn PortDevice>>,
    ) -> Result<(), Overlap> {
        let end = u32::from(base) + u32::from(len);
        if len == 0
            || end > 0x1_0000
            || self.ranges.iter().any(|r| {
                u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
            })
        {
            return Err(Overlap { base, len });
        }
        let pos = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(pos, Range { base, len, dev });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        let i = self.ranges.partition_point(|r| r.base <= port);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        let off = port - r.base;
        (off < r.len).then_some((r, off))
    }

    /// Handles an `in`; returns false if no device claims the port (data is then all ones).
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((r, off)) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Handles an `out`; returns false if no device claims the port.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((r, off)) => {
                r.dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PortDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn bus_routes_by_range_and_rejects_overlaps() {
        let mut bus = IoBus::new();
        let a: Arc<Mutex<dyn PortDevice>> = Arc::new(Mutex::new(Echo(0x10)));
        let b: Arc<Mutex<dyn PortDevice>> = Arc::new(Mutex::new(Echo(0x20)));
        bus.insert(0x3f8, 8, a).unwrap();
        bus.insert(0x60, 1, b.clone()).unwrap();
        assert!(bus.insert(0x3fc, 8, b.clone()).is_err());
        assert!(bus.insert(0xffff, 2, b).is_err());
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fa, &mut d));
        assert_eq!(d[0], 0x12);
        assert!(bus.write(0x60, &[0x33]));
        assert!(bus.read(0x60, &mut d));
        assert_eq!(d[0], 0x33);
        assert!(!bus.read(0x61, &mut d));
        assert_eq!(d[0], 0xff);
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.write(0x3f7, &[1]));
    }
}
