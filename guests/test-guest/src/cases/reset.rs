//! `test=reset`, `test=reset-cf9`: reset the machine; `test=triplefault`: triple-fault it.
//!
//! A reboot keeps the command line, so a VMM that restarts the VM would run the reset test
//! again forever. To stop after one round, the test leaves a mark in CMOS NVRAM (register
//! 0x5C, which the VMM's CMOS keeps across a reset if it models battery-backed RAM): on the
//! boot after the reset it finds the mark, clears it, reports and powers off.

use super::devices::{cmos_read, cmos_write};
use crate::io::outb;
use crate::serial::Writer;
use crate::{arch, halt_forever, power_off};

const MARK_REGISTER: u8 = 0x5c;
const MARK: u8 = 0xa5;

fn reset_with(method: &str, reset: impl FnOnce()) -> ! {
    if cmos_read(MARK_REGISTER) == MARK {
        cmos_write(MARK_REGISTER, 0);
        Writer::lock()
            .str("reset: rebooted after ")
            .str(method)
            .str(" reset\n");
        power_off()
    }
    cmos_write(MARK_REGISTER, MARK);
    Writer::lock()
        .str("reset: resetting via ")
        .str(method)
        .str("\n");
    reset();
    // Still here: the reset did nothing.
    cmos_write(MARK_REGISTER, 0);
    Writer::lock().str("reset: FAIL (machine still running)\n");
    halt_forever()
}

pub fn run_i8042() -> ! {
    reset_with("i8042", || {
        // SAFETY: i8042 command 0xFE pulses the CPU reset line: that is the point.
        unsafe { outb(0x64, 0xfe) };
    })
}

pub fn run_cf9() -> ! {
    reset_with("0xcf9", || {
        // SAFETY: reset control register, hard reset (RST_CPU | SYS_RST): that is the point.
        unsafe { outb(0xcf9, 0x06) };
    })
}

pub fn run_triple_fault() -> ! {
    Writer::lock().str("triplefault: loading an empty IDT and executing ud2\n");
    arch::load_empty_idt();
    // `ud2` rather than `int3`: the host's ring-0 emulator cannot run int3 (the VMM emulates
    // it), and this test should depend on the VMM's triple-fault handling alone.
    // SAFETY: with a zero-limit IDT, #UD → #GP → #DF → triple fault: that is the point.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    Writer::lock().str("triplefault: FAIL (machine still running)\n");
    halt_forever()
}
