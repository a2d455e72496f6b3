//! `test=smp`: start every AP listed in the MADT with INIT-SIPI-SIPI, one at a time. Each AP
//! runs a 16-bit trampoline copied to a free low page, switches to long mode with the kernel's
//! GDT and page tables, prints `cpu N online` (N = its APIC id from CPUID), bumps a counter and
//! sends the boot CPU a wake-up IPI. The boot CPU waits with `hlt` (LAPIC timer as a timeout)
//! and finally prints how many CPUs are online.

use crate::arch::{self, TICKS, TIMER_VECTOR, WAKE_VECTOR};
use crate::io::{cpuid, wait_for_interrupt};
use crate::serial::Writer;
use crate::{acpi, boot, halt_forever, lapic, paging, Global, Stack};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

const AP_STACK_SIZE: usize = 8192;
/// Timer periods to wait for one AP before giving up (about 3 s with KVM's APIC clock).
const AP_TIMEOUT_TICKS: u64 = 200;

#[link_section = ".stacks"]
static AP_STACKS: Global<[Stack<AP_STACK_SIZE>; acpi::MAX_CPUS]> =
    Global::new([const { Stack([0; AP_STACK_SIZE]) }; acpi::MAX_CPUS]);

/// APs that have reached `ap_main` and printed their line.
static ONLINE: AtomicU32 = AtomicU32::new(0);
static BSP_APIC_ID: AtomicU32 = AtomicU32::new(0);

// The AP start-up code. It is copied to a page below 1 MiB and entered in real mode at
// offset 0 (CS = page >> 4). EBX holds the page's linear address throughout. The data fields
// at the end are filled in by `start_ap` before each SIPI.
global_asm!(
    ".pushsection .rodata.verdigris_ap_trampoline, \"a\"",
    ".balign 16",
    ".global verdigris_ap_start",
    "verdigris_ap_start:",
    ".code16",
    "cli",
    "cld",
    "movw %cs, %ax",
    "movw %ax, %ds",
    "movzwl %ax, %ebx",
    "shll $4, %ebx",
    "lgdtl verdigris_ap_gdtr - verdigris_ap_start",
    "leal (verdigris_ap_pm - verdigris_ap_start)(%ebx), %eax",
    "movl %eax, verdigris_ap_pm_ptr - verdigris_ap_start",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl *verdigris_ap_pm_ptr - verdigris_ap_start",
    ".code32",
    "verdigris_ap_pm:",
    "movw ${ds}, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl %cr4, %eax",
    "orl $0x20, %eax", // PAE
    "movl %eax, %cr4",
    "movl (verdigris_ap_cr3 - verdigris_ap_start)(%ebx), %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx", // EFER
    "rdmsr",
    "orl $0x100, %eax", // LME
    "wrmsr",
    "movl %cr0, %eax",
    "orl $0x80000000, %eax", // PG
    "movl %eax, %cr0",
    "leal (verdigris_ap_lm - verdigris_ap_start)(%ebx), %eax",
    "movl %eax, (verdigris_ap_lm_ptr - verdigris_ap_start)(%ebx)",
    "ljmpl *(verdigris_ap_lm_ptr - verdigris_ap_start)(%ebx)",
    ".code64",
    "verdigris_ap_lm:",
    "movq (verdigris_ap_stack - verdigris_ap_start)(%rbx), %rsp",
    "movq (verdigris_ap_arg - verdigris_ap_start)(%rbx), %rdi",
    "movq (verdigris_ap_entry - verdigris_ap_start)(%rbx), %rax",
    "xorl %ebp, %ebp",
    "callq *%rax",
    "1:",
    "cli",
    "hlt",
    "jmp 1b",
    ".balign 8",
    ".global verdigris_ap_gdtr",
    "verdigris_ap_gdtr:",
    ".word 0",
    ".long 0",
    ".word 0",
    "verdigris_ap_pm_ptr:",
    ".long 0",
    ".word {cs32}",
    ".word 0",
    "verdigris_ap_lm_ptr:",
    ".long 0",
    ".word {cs64}",
    ".word 0",
    ".global verdigris_ap_cr3",
    "verdigris_ap_cr3:",
    ".quad 0",
    ".global verdigris_ap_stack",
    "verdigris_ap_stack:",
    ".quad 0",
    ".global verdigris_ap_entry",
    "verdigris_ap_entry:",
    ".quad 0",
    ".global verdigris_ap_arg",
    "verdigris_ap_arg:",
    ".quad 0",
    ".global verdigris_ap_end",
    "verdigris_ap_end:",
    ".popsection",
    ds = const arch::KERNEL_DS,
    cs32 = const arch::KERNEL_CS32,
    cs64 = const arch::KERNEL_CS,
    options(att_syntax),
);

extern "C" {
    static verdigris_ap_start: u8;
    static verdigris_ap_gdtr: u8;
    static verdigris_ap_cr3: u8;
    static verdigris_ap_stack: u8;
    static verdigris_ap_entry: u8;
    static verdigris_ap_arg: u8;
    static verdigris_ap_end: u8;
}

/// Where a trampoline field lands in the copy at `page`.
fn field(page: u64, symbol: *const u8) -> *mut u64 {
    let start = core::ptr::addr_of!(verdigris_ap_start) as u64;
    (page + (symbol as u64 - start)) as usize as *mut u64
}

/// A low page for the trampoline: RAM by the e820 map, below 1 MiB (a SIPI vector is a page
/// number < 0x100), preferring 0x8000. Without an e820 map, 0x8000.
fn trampoline_page() -> Option<u64> {
    if boot::info().e820_len == 0 {
        return Some(0x8000);
    }
    core::iter::once(0x8000)
        .chain((0x1000..0x9f000).step_by(0x1000))
        .find(|&p| boot::page_is_ram(p))
}

extern "C" fn ap_main(_slot: u64) -> ! {
    arch::init_ap();
    let _ = lapic::enable();
    let apic_id = cpuid(1, 0).ebx >> 24;
    Writer::lock()
        .str("cpu ")
        .dec(u64::from(apic_id))
        .str(" online\n");
    ONLINE.fetch_add(1, Ordering::Release);
    lapic::send_fixed(BSP_APIC_ID.load(Ordering::Relaxed), WAKE_VECTOR);
    halt_forever()
}

/// Wait with `hlt` until `ONLINE` reaches `target` or the timeout passes.
fn wait_online(target: u32) -> bool {
    let start = TICKS.load(Ordering::Relaxed);
    loop {
        if ONLINE.load(Ordering::Acquire) >= target {
            return true;
        }
        if TICKS.load(Ordering::Relaxed) - start >= AP_TIMEOUT_TICKS {
            return false;
        }
        wait_for_interrupt();
    }
}

pub fn run() {
    let madt = match acpi::discover() {
        Some(acpi::Acpi { madt: Some(m), .. }) => m,
        _ => {
            Writer::lock().str("smp: FAIL (no valid ACPI MADT)\n");
            return;
        }
    };
    if let Err(e) = lapic::enable() {
        Writer::lock().str("smp: FAIL (").str(e).str(")\n");
        return;
    }
    let bsp = lapic::id();
    BSP_APIC_ID.store(bsp, Ordering::Relaxed);

    let aps = madt.apic_ids[..madt.cpu_count]
        .iter()
        .filter(|&&id| id != bsp)
        .count();
    if aps > 0 {
        let Some(page) = trampoline_page() else {
            Writer::lock().str("smp: FAIL (no free low page for the AP trampoline)\n");
            return;
        };
        // SAFETY: the page is RAM not used by anything else (boot data was copied out in
        // `boot::capture`, ACPI tables are not e820 RAM), and the trampoline fits in it.
        unsafe {
            let start = core::ptr::addr_of!(verdigris_ap_start);
            let len = core::ptr::addr_of!(verdigris_ap_end) as usize - start as usize;
            core::ptr::copy_nonoverlapping(start, page as usize as *mut u8, len);
            let gdt_limit = (core::mem::size_of::<arch::Gdt>() - 1) as u64;
            field(page, core::ptr::addr_of!(verdigris_ap_gdtr))
                .write_unaligned(gdt_limit | ((arch::GDT.get() as u64) << 16));
            field(page, core::ptr::addr_of!(verdigris_ap_cr3)).write(paging::pml4_address());
            field(page, core::ptr::addr_of!(verdigris_ap_entry)).write(ap_main as *const () as u64);
        }
        lapic::start_periodic_timer(TIMER_VECTOR, super::timer::PERIOD);

        let mut started = 0u32;
        for (slot, &id) in madt.apic_ids[..madt.cpu_count].iter().enumerate() {
            if id == bsp {
                continue;
            }
            let stack_top = AP_STACKS.get() as u64 + ((slot + 1) * AP_STACK_SIZE) as u64;
            // SAFETY: the previous AP has finished with the trampoline fields (it is online or
            // was given up on), so nothing reads them while they change.
            unsafe {
                field(page, core::ptr::addr_of!(verdigris_ap_stack)).write(stack_top);
                field(page, core::ptr::addr_of!(verdigris_ap_arg)).write(slot as u64);
            }
            lapic::send_init(id);
            lapic::send_startup(id, (page >> 12) as u8);
            lapic::send_startup(id, (page >> 12) as u8);
            if wait_online(started + 1) {
                started += 1;
            } else {
                Writer::lock()
                    .str("smp: FAIL (cpu ")
                    .dec(u64::from(id))
                    .str(" did not start)\n");
                break;
            }
        }
        lapic::stop_timer();
    }
    let online = 1 + ONLINE.load(Ordering::Acquire);
    let mut w = Writer::lock();
    w.str("smp: ").dec(u64::from(online)).str(" cpus online\n");
    if madt.dropped > 0 {
        w.str("smp: note: ")
            .dec(madt.dropped as u64)
            .str(" more cpus beyond the limit of 32 ignored\n");
    }
}
