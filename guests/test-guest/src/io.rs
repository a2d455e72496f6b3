//! Thin wrappers over privileged instructions: port I/O, MSRs, control registers, CPUID.

use core::arch::asm;

/// # Safety
/// The port must belong to a device the caller means to drive; port writes can reset or power
/// off the machine.
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// # Safety
/// As for [`outb`].
#[inline(always)]
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

/// # Safety
/// As for [`outb`]; reads can have side effects on devices.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// # Safety
/// As for [`inb`].
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// # Safety
/// The MSR must exist; reading some MSRs has side effects.
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// # Safety
/// The MSR must exist and the value must keep the machine in a state the kernel expects.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags)
        )
    };
}

pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// # Safety
/// The value must keep paging and protection consistent with what the kernel relies on.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack, preserves_flags)) };
}

pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// # Safety
/// As for [`write_cr0`].
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("mov cr4, {}", in(reg) v, options(nostack, preserves_flags)) };
}

/// CPUID (`core::arch` handles the RBX save/restore it needs).
pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// Enable interrupts and halt until one arrives, atomically (the `sti` shadow covers `hlt`),
/// then disable them again.
pub fn wait_for_interrupt() {
    // SAFETY: interrupts are handled by our IDT; this only pauses the CPU.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
}
