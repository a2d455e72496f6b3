//! `test=devices`: exercise each emulated device and print one verdict line per device.

use crate::acpi;
use crate::io::{inb, inl, outb};
use crate::serial::{Writer, LSR, SCRATCH};

const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
const PIT_CH0: u16 = 0x40;
const PIT_CMD: u16 = 0x43;
/// The boot contract's ACPI PM blocks.
const PM1A_EVT: u32 = 0x600;
const PM1A_CNT: u32 = 0x604;
const PM_TMR: u16 = 0x608;
const I8042_DATA: u16 = 0x60;
const I8042_STATUS: u16 = 0x64;

pub fn run() {
    let results = [
        check_acpi(),
        check_cmos(),
        check_pit(),
        check_pm_timer(),
        check_i8042(),
        check_serial(),
    ];
    let all = results.iter().all(|&ok| ok);
    Writer::lock().str("devices: ").verdict(all).str("\n");
}

fn check_acpi() -> bool {
    let mut w = Writer::lock();
    w.str("acpi: ");
    let Some(a) = acpi::discover() else {
        w.str("FAIL (no valid RSDP/XSDT)\n");
        return false;
    };
    let (cpus, ioapic) = a
        .madt
        .as_ref()
        .map_or((0, 0), |m| (m.cpu_count, m.ioapic.unwrap_or(0)));
    let (evt, cnt, tmr, dsdt) = a.fadt.as_ref().map_or((0, 0, 0, false), |f| {
        (f.pm1a_evt, f.pm1a_cnt, f.pm_tmr, f.dsdt_ok)
    });
    let ok = a.rsdp_from_boot_params
        && cpus > 0
        && ioapic == 0xfec0_0000
        && evt == PM1A_EVT
        && cnt == PM1A_CNT
        && tmr == u32::from(PM_TMR)
        && dsdt;
    w.verdict(ok)
        .str(" (rsdp ")
        .str(if a.rsdp_from_boot_params {
            "from boot_params"
        } else {
            "found by scan"
        })
        .str(", madt cpus=")
        .dec(cpus as u64)
        .str(" ioapic=")
        .hex(u64::from(ioapic))
        .str(", fadt pm1a_evt=")
        .hex(u64::from(evt))
        .str(" pm1a_cnt=")
        .hex(u64::from(cnt))
        .str(" pm_tmr=")
        .hex(u64::from(tmr))
        .str(", dsdt ")
        .str(if dsdt { "ok" } else { "missing" })
        .str(")\n");
    ok
}

pub fn cmos_read(reg: u8) -> u8 {
    // SAFETY: 0x70/0x71 are the CMOS/RTC index and data ports; reading a register (with NMIs
    // left enabled, bit 7 clear) has no memory effects.
    unsafe {
        outb(CMOS_INDEX, reg & 0x7f);
        inb(CMOS_DATA)
    }
}

pub fn cmos_write(reg: u8, value: u8) {
    // SAFETY: as for cmos_read; only NVRAM registers are written by callers.
    unsafe {
        outb(CMOS_INDEX, reg & 0x7f);
        outb(CMOS_DATA, value);
    }
}

#[derive(PartialEq, Clone, Copy)]
struct RtcTime {
    sec: u8,
    min: u8,
    hour: u8,
    weekday: u8,
    day: u8,
    month: u8,
    year: u8,
    century: u8,
}

fn read_rtc() -> RtcTime {
    RtcTime {
        sec: cmos_read(0x00),
        min: cmos_read(0x02),
        hour: cmos_read(0x04),
        weekday: cmos_read(0x06),
        day: cmos_read(0x07),
        month: cmos_read(0x08),
        year: cmos_read(0x09),
        century: cmos_read(0x32),
    }
}

/// Decode one RTC field; `None` if it is not valid BCD in BCD mode.
fn decode(v: u8, bcd: bool) -> Option<u8> {
    if !bcd {
        return Some(v);
    }
    (v >> 4 <= 9 && v & 0xf <= 9).then_some((v >> 4) * 10 + (v & 0xf))
}

fn check_cmos() -> bool {
    let a = cmos_read(0x0a);
    let b = cmos_read(0x0b);
    let d = cmos_read(0x0d);
    let bcd = b & 0x04 == 0;
    let h24 = b & 0x02 != 0;

    // Wait for a moment outside an update cycle, then read until two reads agree.
    let uip_clear = (0..2000).any(|_| cmos_read(0x0a) & 0x80 == 0);
    let mut t = read_rtc();
    let mut stable = false;
    for _ in 0..5 {
        let again = read_rtc();
        if again == t {
            stable = true;
            break;
        }
        t = again;
    }

    let pm = !h24 && t.hour & 0x80 != 0;
    let sec = decode(t.sec, bcd).filter(|&v| v <= 59);
    let min = decode(t.min, bcd).filter(|&v| v <= 59);
    let hour = match decode(t.hour & if h24 { 0xff } else { 0x7f }, bcd) {
        Some(h) if h24 && h <= 23 => Some(h),
        Some(h) if !h24 && (1..=12).contains(&h) => Some(h % 12 + if pm { 12 } else { 0 }),
        _ => None,
    };
    let weekday = decode(t.weekday, bcd).filter(|v| (1..=7).contains(v));
    let day = decode(t.day, bcd).filter(|v| (1..=31).contains(v));
    let month = decode(t.month, bcd).filter(|v| (1..=12).contains(v));
    let year = decode(t.year, bcd).filter(|&v| v <= 99);
    let century = decode(t.century, bcd).filter(|v| (19..=21).contains(v));

    let fields_ok = [sec, min, hour, weekday, day, month, year, century]
        .iter()
        .all(Option::is_some);
    let ok = uip_clear && stable && fields_ok && d & 0x80 != 0;

    let mut w = Writer::lock();
    w.str("cmos: ").verdict(ok).str(" (");
    if fields_ok {
        let full_year = u64::from(century.unwrap_or(0)) * 100 + u64::from(year.unwrap_or(0));
        w.dec_width(full_year, 4)
            .str("-")
            .dec_width(u64::from(month.unwrap_or(0)), 2)
            .str("-")
            .dec_width(u64::from(day.unwrap_or(0)), 2)
            .str(" ")
            .dec_width(u64::from(hour.unwrap_or(0)), 2)
            .str(":")
            .dec_width(u64::from(min.unwrap_or(0)), 2)
            .str(":")
            .dec_width(u64::from(sec.unwrap_or(0)), 2)
            .str(" weekday=")
            .dec(u64::from(weekday.unwrap_or(0)));
    } else {
        w.str("invalid time: raw")
            .str(" sec=")
            .hex(u64::from(t.sec))
            .str(" min=")
            .hex(u64::from(t.min))
            .str(" hour=")
            .hex(u64::from(t.hour))
            .str(" weekday=")
            .hex(u64::from(t.weekday))
            .str(" day=")
            .hex(u64::from(t.day))
            .str(" month=")
            .hex(u64::from(t.month))
            .str(" year=")
            .hex(u64::from(t.year))
            .str(" century=")
            .hex(u64::from(t.century));
    }
    w.str(", A=")
        .hex(u64::from(a))
        .str(" B=")
        .hex(u64::from(b))
        .str(" D=")
        .hex(u64::from(d))
        .str(if bcd { " bcd" } else { " binary" })
        .str(if h24 { " 24h" } else { " 12h" });
    if !uip_clear {
        w.str(", update-in-progress never cleared");
    }
    if !stable {
        w.str(", time kept changing");
    }
    w.str(")\n");
    ok
}

fn pit_latch_read() -> u16 {
    // SAFETY: 0x40/0x43 are PIT channel 0 and the PIT command port; latching and reading the
    // count has no memory effects.
    unsafe {
        outb(PIT_CMD, 0x00); // latch channel 0
        let lo = inb(PIT_CH0);
        let hi = inb(PIT_CH0);
        u16::from_le_bytes([lo, hi])
    }
}

fn check_pit() -> bool {
    // Channel 0, lobyte/hibyte, mode 2 (rate generator), binary, reload 0xFFFF. IRQ 0 stays
    // masked at the PIC (and the IOAPIC is left at its reset state, all pins masked).
    // SAFETY: programming PIT channel 0 has no memory effects.
    unsafe {
        outb(PIT_CMD, 0x34);
        outb(PIT_CH0, 0xff);
        outb(PIT_CH0, 0xff);
    }
    let first = pit_latch_read();
    let second = pit_latch_read();
    // A rate generator counts down and reloads at 1: any change is progress.
    let ok = second != first;
    Writer::lock()
        .str("pit: ")
        .verdict(ok)
        .str(" (counter ")
        .hex(u64::from(first))
        .str(" then ")
        .hex(u64::from(second))
        .str(if second < first {
            ", decreasing"
        } else if second > first {
            ", reloaded"
        } else {
            ", stuck"
        })
        .str(")\n");
    ok
}

fn check_pm_timer() -> bool {
    // SAFETY: 0x608 is the ACPI PM timer by the boot contract; reading it has no side effects.
    let (first, second) = unsafe { (inl(PM_TMR) & 0xff_ffff, inl(PM_TMR) & 0xff_ffff) };
    let delta = second.wrapping_sub(first) & 0xff_ffff;
    let ok = delta != 0 && delta < 0x80_0000;
    Writer::lock()
        .str("pmtimer: ")
        .verdict(ok)
        .str(" (")
        .hex(u64::from(first))
        .str(" then ")
        .hex(u64::from(second))
        .str(", delta ")
        .dec(u64::from(delta))
        .str(")\n");
    ok
}

fn i8042_status() -> u8 {
    // SAFETY: 0x64 is the i8042 status port; reading it has no side effects.
    unsafe { inb(I8042_STATUS) }
}

fn check_i8042() -> bool {
    let status = i8042_status();
    // Drain stale output, wait for an empty input buffer, send "self test".
    for _ in 0..16 {
        if i8042_status() & 0x01 == 0 {
            break;
        }
        // SAFETY: reading the i8042 data port only consumes a byte.
        unsafe { inb(I8042_DATA) };
    }
    let ready = (0..1000).any(|_| i8042_status() & 0x02 == 0);
    // SAFETY: 0xAA is the controller self-test command; it does not reset the machine.
    unsafe { outb(I8042_STATUS, 0xaa) };
    let answered = (0..1000).any(|_| i8042_status() & 0x01 != 0);
    // SAFETY: reading the i8042 data port only consumes a byte.
    let reply = if answered {
        unsafe { inb(I8042_DATA) }
    } else {
        0
    };
    let ok = ready && answered && reply == 0x55;
    let mut w = Writer::lock();
    w.str("i8042: ")
        .verdict(ok)
        .str(" (status ")
        .hex(u64::from(status));
    if answered {
        w.str(", self-test ").hex(u64::from(reply));
    } else {
        w.str(", no self-test reply");
    }
    if !ready {
        w.str(", input buffer stayed full");
    }
    w.str(")\n");
    ok
}

fn check_serial() -> bool {
    // SAFETY: COM1 scratch register and LSR; no memory effects.
    let (s1, s2, lsr) = unsafe {
        outb(SCRATCH, 0x5a);
        let s1 = inb(SCRATCH);
        outb(SCRATCH, 0xa5);
        let s2 = inb(SCRATCH);
        (s1, s2, inb(LSR))
    };
    let ok = s1 == 0x5a && s2 == 0xa5 && lsr & 0x20 != 0;
    Writer::lock()
        .str("serial: ")
        .verdict(ok)
        .str(" (scratch ")
        .hex(u64::from(s1))
        .str("/")
        .hex(u64::from(s2))
        .str(", lsr ")
        .hex(u64::from(lsr))
        .str(")\n");
    ok
}
