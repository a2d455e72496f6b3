//! CPU tables and traps: GDT (Linux's selector layout), TSS, IDT with assembly entry stubs, SSE
//! enablement and the legacy PIC mask.

use crate::io::{outb, read_cr0, read_cr4, write_cr0, write_cr4};
use crate::serial::Writer;
use crate::{halt_forever, Global, Stack};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// Selectors, as in Linux so that the VMM sees what a Linux guest uses.
pub const KERNEL_CS32: u16 = 0x08;
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
/// Base of the SYSRET selectors: user CS32 0x23, user DS 0x2b, user CS 0x33.
pub const USER_CS32: u16 = 0x20;
pub const USER_DS: u16 = 0x28 | 3;
pub const USER_CS: u16 = 0x30 | 3;
const TSS_SEL: u16 = 0x40;

/// Interrupt vectors used by the tests.
pub const TIMER_VECTOR: u8 = 0x20;
pub const WAKE_VECTOR: u8 = 0x21;
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// The legacy PICs are remapped here (and masked) so a stray PIC interrupt is recognisable.
const PIC_BASE: u8 = 0x30;
/// Vectors 0..STUB_COUNT get an entry stub.
const STUB_COUNT: usize = 64;

#[repr(C, align(16))]
pub struct Gdt([u64; 10]);

/// GDT: null, kernel CS32, kernel CS64, kernel DS, user CS32, user DS, user CS64, unused, TSS
/// (two slots). Accessed bits are preset so the CPU never writes the table.
pub static GDT: Global<Gdt> = Global::new(Gdt([
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_fb00_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
    0,
    0,
    0,
]));

#[repr(C, packed)]
pub struct Tss {
    _reserved0: u32,
    pub rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

static TSS: Global<Tss> = Global::new(Tss {
    _reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: core::mem::size_of::<Tss>() as u16,
});

/// Ring-0 stack used when an interrupt or exception arrives in ring 3 (TSS.RSP0).
const RSP0_STACK_SIZE: usize = 8192;
#[link_section = ".stacks"]
static RSP0_STACK: Global<Stack<RSP0_STACK_SIZE>> = Global::new(Stack([0; RSP0_STACK_SIZE]));

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

const EMPTY_GATE: IdtEntry = IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
};

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

static IDT: Global<Idt> = Global::new(Idt([EMPTY_GATE; 256]));

/// The register state saved by the entry stubs, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Entry stubs for vectors 0..64: push a dummy error code where the CPU pushes none, push the
// vector number, save the general registers and call `trap`. Plus a bare `iretq` for the
// LAPIC's spurious vector, which needs no EOI.
global_asm!(
    ".pushsection .text.verdigris_traps, \"ax\"",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63",
    "verdigris_trap_\\n:",
    ".if (\\n == 8) || ((\\n >= 10) && (\\n <= 14)) || (\\n == 17) || (\\n == 21) || (\\n == 29) || (\\n == 30)",
    ".else",
    "push 0",
    ".endif",
    "push \\n",
    "jmp verdigris_trap_common",
    ".endr",
    "verdigris_trap_common:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov rdi, rsp",
    "cld",
    "call {trap}",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "add rsp, 16",
    "iretq",
    ".global verdigris_spurious",
    "verdigris_spurious:",
    "iretq",
    ".popsection",
    ".pushsection .rodata.verdigris_trap_table, \"a\"",
    ".balign 8",
    ".global verdigris_trap_table",
    "verdigris_trap_table:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63",
    ".quad verdigris_trap_\\n",
    ".endr",
    ".popsection",
    trap = sym trap,
);

extern "C" {
    static verdigris_trap_table: [u64; STUB_COUNT];
    fn verdigris_spurious();
}

/// Number of #BP (int3) traps taken, and the RIP of the last one.
pub static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);
pub static LAST_BREAKPOINT_RIP: AtomicU64 = AtomicU64::new(0);
/// LAPIC timer interrupts taken.
pub static TICKS: AtomicU64 = AtomicU64::new(0);

/// A hook the syscall test installs to recognise a fault from its user code.
pub static USER_FAULT_HOOK: Global<Option<fn(&TrapFrame)>> = Global::new(None);

extern "C" fn trap(frame: &mut TrapFrame) {
    match frame.vector {
        3 => {
            BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
            LAST_BREAKPOINT_RIP.store(frame.rip, Ordering::Relaxed);
        }
        v if v == u64::from(TIMER_VECTOR) => {
            TICKS.fetch_add(1, Ordering::Relaxed);
            crate::lapic::eoi();
        }
        v if v == u64::from(WAKE_VECTOR) => crate::lapic::eoi(),
        _ => {
            if frame.cs & 3 == 3 {
                // SAFETY: the hook is set before ring 3 is entered and never changed after.
                if let Some(hook) = unsafe { *USER_FAULT_HOOK.get() } {
                    hook(frame);
                }
            }
            fatal_trap(frame)
        }
    }
}

fn fatal_trap(frame: &TrapFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    Writer::unlocked()
        .str("EXCEPTION: vector=")
        .hex(frame.vector)
        .str(" error=")
        .hex(frame.error)
        .str(" rip=")
        .hex(frame.rip)
        .str(" cs=")
        .hex(frame.cs)
        .str(" rflags=")
        .hex(frame.rflags)
        .str(" rsp=")
        .hex(frame.rsp)
        .str(" cr2=")
        .hex(cr2)
        .str("\n");
    halt_forever()
}

fn set_gate(vector: usize, handler: u64) {
    let entry = IdtEntry {
        offset_low: handler as u16,
        selector: KERNEL_CS,
        ist: 0,
        type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_high: (handler >> 32) as u32,
        reserved: 0,
    };
    // SAFETY: the IDT is only written on the boot CPU during init, before other CPUs run.
    unsafe { (*IDT.get()).0[vector] = entry };
}

/// Load our GDT and reload every segment register.
fn load_gdt() {
    let ptr = DescriptorPointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: GDT.get() as u64,
    };
    // SAFETY: GDT is a valid descriptor table whose selectors 0x10/0x18 are the flat 64-bit
    // kernel code and data segments we reload here.
    unsafe {
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, {ds}",
            "mov ds, {tmp:x}",
            "mov es, {tmp:x}",
            "mov ss, {tmp:x}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            ptr = in(reg) &ptr,
            cs = const KERNEL_CS as u64,
            ds = const KERNEL_DS as u64,
            tmp = out(reg) _,
        );
    }
}

pub fn load_idt() {
    let ptr = DescriptorPointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.get() as u64,
    };
    // SAFETY: IDT holds valid gates for every vector we can receive.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(nostack, preserves_flags)) };
}

/// Load a zero-limit IDT: the next exception or interrupt triple-faults the machine.
pub fn load_empty_idt() {
    let ptr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: intentional; only the triple-fault test does this.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(nostack, preserves_flags)) };
}

/// CR0.MP on, CR0.EM and CR0.TS off, CR4.OSFXSR and CR4.OSXMMEXCPT on: SSE and x87 usable.
pub fn enable_sse() {
    let cr0 = (read_cr0() | (1 << 1)) & !((1 << 2) | (1 << 3));
    let cr4 = read_cr4() | (1 << 9) | (1 << 10);
    // SAFETY: these bits only enable FPU/SSE instructions.
    unsafe {
        write_cr0(cr0);
        write_cr4(cr4);
    }
}

/// Boot CPU setup: GDT, TSS, our page tables, SSE, IDT.
pub fn init_bsp() {
    // TSS descriptor.
    let base = TSS.get() as u64;
    let limit = (core::mem::size_of::<Tss>() - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    // SAFETY: single CPU at boot; nothing else uses the GDT or TSS yet.
    unsafe {
        (*GDT.get()).0[8] = low;
        (*GDT.get()).0[9] = base >> 32;
        (*TSS.get()).rsp0 = RSP0_STACK.get() as u64 + RSP0_STACK_SIZE as u64;
    }
    load_gdt();
    // SAFETY: selector 0x40 is the available TSS descriptor just written.
    unsafe { asm!("ltr {:x}", in(reg) TSS_SEL, options(nostack, preserves_flags)) };
    crate::paging::init();
    enable_sse();
    // SAFETY: reading the stub table emitted by global_asm above.
    let table = unsafe { &*core::ptr::addr_of!(verdigris_trap_table) };
    for (vector, &stub) in table.iter().enumerate() {
        set_gate(vector, stub);
    }
    set_gate(
        usize::from(SPURIOUS_VECTOR),
        verdigris_spurious as *const () as u64,
    );
    load_idt();
}

/// Per-AP setup: the shared IDT and SSE. APs never enter ring 3, so they need no TSS.
pub fn init_ap() {
    load_idt();
    enable_sse();
}

/// Remap both 8259 PICs to vectors 0x30..0x3f and mask every line: the tests use the LAPIC.
pub fn mask_pic() {
    // SAFETY: 0x20/0x21/0xA0/0xA1 are the legacy PICs; this is the standard init sequence.
    unsafe {
        outb(0x20, 0x11);
        outb(0xa0, 0x11);
        outb(0x21, PIC_BASE);
        outb(0xa1, PIC_BASE + 8);
        outb(0x21, 0x04);
        outb(0xa1, 0x02);
        outb(0x21, 0x01);
        outb(0xa1, 0x01);
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}
