//! The Verdigris test guest: a tiny `no_std` x86-64 kernel that the integration tests boot to
//! check the VMM.
//!
//! It is loaded like a Linux `vmlinux` by the 64-bit boot protocol (PT_LOAD segments at their
//! physical addresses, entry in long mode with RSI pointing at `boot_params`), reads
//! `test=<name>` from the command line, runs that one test and reports on COM1, normally
//! ending with an ACPI S5 power-off. The expected output of every test is in README.md.
//!
//! What it talks to: COM1, CMOS/RTC, PIT, ACPI PM registers, i8042, PIC, the local APIC (xAPIC
//! MMIO) and the ACPI tables, all as the VMM's boot contract describes them.
//!
//! What it must never do: depend on timing (guest ring 0 runs ~1 µs per instruction under the
//! host's emulator, and guest time may be scaled), spin long in busy loops (it waits with `hlt`
//! instead), or touch memory outside its own image except the low pages it borrows for the AP
//! start-up code, the boot data it copies first thing, and device MMIO.
//!
//! It is hand-written rather than built on a bootloader/kernel crate because it needs exact
//! control over every instruction it executes (each one is emulated, and the `quirks` test
//! must execute specific instructions in ring 0) and must stay tiny.

#![no_std]
#![no_main]

mod acpi;
mod arch;
mod boot;
mod cases;
mod io;
mod lapic;
mod mem;
mod paging;
mod serial;

use core::cell::UnsafeCell;
use core::panic::PanicInfo;

/// A global that code shares without locking. Every user documents why its accesses do not
/// race (single CPU at that point, or ordered by an atomic).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: accesses go through raw pointers from `get`, and each use site explains why it is
// free of data races (the kernel is single-threaded except for the SMP test's atomics).
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Global(UnsafeCell::new(value))
    }

    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

/// Size of the boot CPU's stack.
const BOOT_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

#[link_section = ".stacks"]
static BOOT_STACK: Global<Stack<BOOT_STACK_SIZE>> = Global::new(Stack([0; BOOT_STACK_SIZE]));

// Entry point. The loader jumps here in 64-bit mode with interrupts off, RSI = boot_params and
// no usable stack. Zero .bss (it may hold leftovers after a reboot), take our own stack and
// enter Rust.
core::arch::global_asm!(
    ".pushsection .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "cld",
    "mov r12, rsi",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "shr rcx, 3",
    "xor eax, eax",
    "rep stosq",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "xor ebp, ebp",
    "mov rdi, r12",
    "call {kmain}",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    ".popsection",
    stack = sym BOOT_STACK,
    stack_size = const BOOT_STACK_SIZE,
    kmain = sym kmain,
);

/// First Rust code on the boot CPU.
extern "C" fn kmain(boot_params: u64) -> ! {
    arch::init_bsp();
    serial::init();
    arch::mask_pic();
    boot::capture(boot_params);

    let name = boot::test_name();
    match name {
        b"hello" => cases::hello::run(),
        b"hyperv" => cases::hyperv::run(),
        b"vmbus" => cases::vmbus::run(),
        b"ioloop" => cases::ioloop::run(),
        b"serial" => cases::serial::run(),
        b"timer" => cases::timer::run(),
        b"smp" => cases::smp::run(),
        b"devices" => cases::devices::run(),
        b"syscall" => cases::syscall::run(),
        b"quirks" => cases::quirks::run(),
        b"reset" => cases::reset::run_i8042(),
        b"reset-cf9" => cases::reset::run_cf9(),
        b"triplefault" => cases::reset::run_triple_fault(),
        b"panic" => panic!("requested by test=panic"),
        other => {
            serial::Writer::lock()
                .str("verdigris-test-guest: unknown test '")
                .printable(other)
                .str("'\n");
        }
    }
    power_off()
}

/// ACPI S5 through PM1a_CNT: SLP_TYP = 5, SLP_EN. The VMM then exits with status 0.
pub fn power_off() -> ! {
    // SAFETY: PM1a_CNT_BLK (0x604) is the VMM's ACPI power-management control register by the
    // boot contract; writing it has no effect on memory.
    unsafe { io::outw(0x604, (5 << 10) | (1 << 13)) };
    halt_forever()
}

/// Stop this CPU for good: interrupts off, `hlt` in a loop (NMIs may still wake it).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // SAFETY: masking interrupts on this CPU has no memory effects.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    // The serial lock may be held by the code that panicked: write without it.
    let mut w = serial::Writer::unlocked();
    w.str("PANIC: ");
    match info.message().as_str() {
        Some(s) => {
            w.str(s);
        }
        None => {
            let _ = core::fmt::write(&mut w, format_args!("{}", info.message()));
        }
    }
    if let Some(loc) = info.location() {
        w.str(" at ")
            .str(loc.file())
            .str(":")
            .dec(u64::from(loc.line()));
    }
    w.str("\n");
    halt_forever()
}
