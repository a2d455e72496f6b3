//! The i8042 keyboard controller: the machine's reset line (command 0xFE) and enough of the
//! controller and keyboard protocol for Linux's `i8042`/`atkbd` probe to finish quickly.
//!
//! Hand-written rather than `vm-superio`'s `I8042Device` because that one answers only the
//! reset command; Linux's driver also runs the controller self-test, reads and writes the
//! command byte and resets the keyboard, and each unanswered command costs the guest a timeout.
//! There is no auxiliary (mouse) port.

use crate::{IrqLine, PlatformEvents, PortDevice, PowerEvent};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;

pub const DATA_PORT: u16 = 0x60;
pub const CMD_PORT: u16 = 0x64;
pub const KBD_IRQ: u32 = 1;

const ST_OUTPUT_FULL: u8 = 0x01;
const ST_SYSTEM: u8 = 0x04;
const ST_CMD: u8 = 0x08;
const ST_UNLOCKED: u8 = 0x10;
const CTB_KBD_INT: u8 = 0x01;

/// Guest-visible state of the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub command_byte: u8,
    pub output: VecDeque<u8>,
    /// A controller command waiting for its data byte on port 0x60.
    pub pending_cmd: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    pub pending_kbd: Option<u8>,
    pub last_was_cmd: bool,
    pub kbd_enabled: bool,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            command_byte: 0x45, // kbd interrupt, system flag, translation
            output: VecDeque::new(),
            pending_cmd: None,
            pending_kbd: None,
            last_was_cmd: false,
            kbd_enabled: true,
        }
    }
}

pub struct I8042 {
    pub state: I8042State,
    irq: Arc<dyn IrqLine>,
    events: Arc<dyn PlatformEvents>,
}

impl I8042 {
    pub fn new(irq: Arc<dyn IrqLine>, events: Arc<dyn PlatformEvents>) -> Self {
        Self {
            state: I8042State::default(),
            irq,
            events,
        }
    }

    fn push_ctl(&mut self, b: u8) {
        if self.state.output.len() < 16 {
            self.state.output.push_back(b);
        }
    }

    fn push_kbd(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push_ctl(b);
        }
        if self.state.command_byte & CTB_KBD_INT != 0 {
            self.irq.pulse();
        }
    }

    fn controller_command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push_ctl(self.state.command_byte),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.state.pending_cmd = Some(cmd),
            0xa7 | 0xa8 => {}            // disable/enable aux: there is none
            0xa9 => self.push_ctl(0x01), // aux interface test: clock line stuck low = no aux
            0xaa => self.push_ctl(0x55), // self-test passed
            0xab => self.push_ctl(0x00), // keyboard interface test passed
            0xad => self.state.kbd_enabled = false,
            0xae => self.state.kbd_enabled = true,
            0xc0 => self.push_ctl(0x00),        // input port
            0xd0 => self.push_ctl(0x01 | 0x02), // output port: reset deasserted, A20 on
            0xfe => self.events.request(PowerEvent::Reset),
            c if c & 0xf0 == 0xf0
                // Pulse output lines: bit 0 clear pulses the reset line.
                && c & 0x01 == 0 =>
            {
                self.events.request(PowerEvent::Reset);
            }
            _ => {}
        }
    }

    fn controller_data(&mut self, cmd: u8, v: u8) {
        match cmd {
            0x60 => self.state.command_byte = v,
            0xd1 if v & 0x01 == 0 => {
                self.events.request(PowerEvent::Reset);
            }
            0xd2 => self.push_kbd(&[v]),
            // Aux loopback and aux writes: no aux port, nothing answers.
            _ => {}
        }
    }

    fn keyboard_byte(&mut self, v: u8) {
        if let Some(cmd) = self.state.pending_kbd.take() {
            // Parameter of ED (LEDs), F0 (scan code set), F3 (typematic).
            if cmd == 0xf0 && v == 0 {
                self.push_kbd(&[0xfa, 0x02]);
            } else {
                self.push_kbd(&[0xfa]);
            }
            return;
        }
        match v {
            0xff => self.push_kbd(&[0xfa, 0xaa]),
            0xf2 => self.push_kbd(&[0xfa, 0xab, 0x83]),
            0xee => self.push_kbd(&[0xee]),
            0xed | 0xf0 | 0xf3 => {
                self.state.pending_kbd = Some(v);
                self.push_kbd(&[0xfa]);
            }
            0xf4 => {
                self.state.kbd_enabled = true;
                self.push_kbd(&[0xfa]);
            }
            0xf5 => {
                self.state.kbd_enabled = false;
                self.push_kbd(&[0xfa]);
            }
            _ => self.push_kbd(&[0xfa]),
        }
    }

    fn status(&self) -> u8 {
        let mut s = ST_SYSTEM | ST_UNLOCKED;
        if !self.state.output.is_empty() {
            s |= ST_OUTPUT_FULL;
        }
        if self.state.last_was_cmd {
            s |= ST_CMD;
        }
        s
    }
}

impl PortDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if data.is_empty() {
            return;
        }
        data[0] = match offset {
            0 => self.state.output.pop_front().unwrap_or(0),
            4 => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                self.state.last_was_cmd = false;
                match self.state.pending_cmd.take() {
                    Some(cmd) => self.controller_data(cmd, v),
                    None => self.keyboard_byte(v),
                }
            }
            4 => {
                self.state.last_was_cmd = true;
                self.controller_command(v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Rec(pub Mutex<Vec<PowerEvent>>, pub Mutex<usize>);
    impl PlatformEvents for Rec {
        fn request(&self, e: PowerEvent) {
            self.0.lock().unwrap().push(e);
        }
    }
    impl IrqLine for Rec {
        fn set_level(&self, high: bool) {
            if high {
                *self.1.lock().unwrap() += 1;
            }
        }
    }

    fn dev() -> (I8042, Arc<Rec>) {
        let r = Arc::new(Rec::default());
        (I8042::new(r.clone(), r.clone()), r)
    }

    fn rd(d: &mut I8042, off: u16) -> u8 {
        let mut b = [0];
        d.read(off - DATA_PORT, &mut b);
        b[0]
    }

    #[test]
    fn self_test_and_command_byte() {
        let (mut d, _) = dev();
        assert_eq!(rd(&mut d, CMD_PORT) & ST_OUTPUT_FULL, 0);
        d.write(4, &[0xaa]);
        assert_eq!(rd(&mut d, CMD_PORT) & ST_OUTPUT_FULL, 1);
        assert_eq!(rd(&mut d, DATA_PORT), 0x55);
        d.write(4, &[0x60]);
        d.write(0, &[0x47]);
        d.write(4, &[0x20]);
        assert_eq!(rd(&mut d, DATA_PORT), 0x47);
    }

    #[test]
    fn reset_line_requests_reset() {
        let (mut d, r) = dev();
        d.write(4, &[0xfe]);
        assert_eq!(*r.0.lock().unwrap(), vec![PowerEvent::Reset]);
    }

    #[test]
    fn keyboard_reset_answers_with_irq() {
        let (mut d, r) = dev();
        d.write(0, &[0xff]);
        assert_eq!(rd(&mut d, DATA_PORT), 0xfa);
        assert_eq!(rd(&mut d, DATA_PORT), 0xaa);
        assert!(*r.1.lock().unwrap() >= 1);
        d.write(0, &[0xed]);
        d.write(0, &[0x07]);
        assert_eq!(rd(&mut d, DATA_PORT), 0xfa);
        assert_eq!(rd(&mut d, DATA_PORT), 0xfa);
        assert_eq!(rd(&mut d, DATA_PORT), 0x00, "empty buffer reads 0");
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut d, _) = dev();
        for _ in 0..100 {
            d.write(0, &[0xf2]);
        }
        assert!(d.state.output.len() <= 16);
    }
}
