//! The local APIC in xAPIC mode (MMIO), for timer interrupts and IPIs.

use crate::io::rdmsr;
use core::sync::atomic::{AtomicU64, Ordering};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;

const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_DIVIDE: usize = 0x3e0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const ICR_PENDING: u32 = 1 << 12;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;

/// The MMIO base from IA32_APIC_BASE, or why the xAPIC cannot be used.
pub fn base() -> Result<u64, &'static str> {
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU with an APIC.
    let msr = unsafe { rdmsr(IA32_APIC_BASE) };
    if msr & APIC_BASE_ENABLE == 0 {
        return Err("local APIC globally disabled");
    }
    if msr & APIC_BASE_X2APIC != 0 {
        return Err("local APIC in x2APIC mode");
    }
    Ok(msr & 0xf_ffff_f000)
}

/// The MMIO base found by `enable` (every CPU's APIC sits at the same address).
static BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);

fn reg(offset: usize) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) as usize + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: LAPIC registers are 32-bit MMIO in the identity-mapped, uncached hole.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as for read.
    unsafe { reg(offset).write_volatile(value) }
}

/// Software-enable the APIC with our spurious vector.
pub fn enable() -> Result<(), &'static str> {
    BASE.store(base()?, Ordering::Relaxed);
    write(REG_SVR, 0x100 | u32::from(crate::arch::SPURIOUS_VECTOR));
    Ok(())
}

pub fn id() -> u32 {
    read(REG_ID) >> 24
}

pub fn eoi() {
    write(REG_EOI, 0);
}

/// Periodic timer interrupts on `vector`, divide by 16, `count` ticks per period.
pub fn start_periodic_timer(vector: u8, count: u32) {
    write(REG_TIMER_DIVIDE, 0x3);
    write(REG_LVT_TIMER, u32::from(vector) | LVT_PERIODIC);
    write(REG_TIMER_INITIAL, count);
}

pub fn stop_timer() {
    write(REG_LVT_TIMER, LVT_MASKED);
    write(REG_TIMER_INITIAL, 0);
}

fn send_ipi(dest: u32, low: u32) {
    write(REG_ICR_HIGH, dest << 24);
    write(REG_ICR_LOW, low);
    // Delivery status: bounded wait (KVM's APIC clears it at once).
    for _ in 0..100 {
        if read(REG_ICR_LOW) & ICR_PENDING == 0 {
            break;
        }
    }
}

/// A fixed interrupt to one CPU.
pub fn send_fixed(dest: u32, vector: u8) {
    send_ipi(dest, ICR_ASSERT | u32::from(vector));
}

pub fn send_init(dest: u32) {
    send_ipi(dest, ICR_ASSERT | ICR_INIT);
}

pub fn send_startup(dest: u32, page: u8) {
    send_ipi(dest, ICR_ASSERT | ICR_STARTUP | u32::from(page));
}
