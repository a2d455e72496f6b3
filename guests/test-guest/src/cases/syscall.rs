//! `test=syscall`: enter ring 3 and make 100 counted `syscall`s plus a final one that makes the
//! kernel report. The handler checks it runs with the kernel's CS and SS. On the host this
//! project targets, SYSCALL from ring 3 leaves CS at the user selector; the VMM must fix that
//! up, and this test checks its fix-up. Without it, the handler's first instruction (a store
//! to a supervisor page) faults from ring 3, which the fault hook reports.

use crate::arch::{self, TrapFrame, KERNEL_CS, KERNEL_DS, USER_CS, USER_CS32, USER_DS};
use crate::io::{rdmsr, wrmsr};
use crate::serial::Writer;
use crate::{power_off, Global, Stack};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

const IA32_EFER: u32 = 0xc000_0080;
const IA32_STAR: u32 = 0xc000_0081;
const IA32_LSTAR: u32 = 0xc000_0082;
const IA32_FMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1 << 0;
/// TF, DF, IF, IOPL, AC, NT cleared on entry, as Linux does.
const FMASK: u64 = 0x47700;

pub const CALLS: u64 = 100;
const SYS_COUNT: u64 = 1;
const SYS_REPORT: u64 = 2;

const KSTACK_SIZE: usize = 8192;
#[link_section = ".stacks"]
static SYSCALL_STACK: Global<Stack<KSTACK_SIZE>> = Global::new(Stack([0; KSTACK_SIZE]));
static USER_RSP: Global<u64> = Global::new(0);

#[link_section = ".user_stack"]
static USER_STACK: Global<Stack<4096>> = Global::new(Stack([0; 4096]));

static GOOD: AtomicU64 = AtomicU64::new(0);
static BAD: AtomicU64 = AtomicU64::new(0);
static LAST_BAD_CS: AtomicU64 = AtomicU64::new(0);
static LAST_BAD_SS: AtomicU64 = AtomicU64::new(0);

// The ring-3 program, alone in its user-accessible page: 100 x syscall(1), then syscall(2).
global_asm!(
    ".pushsection .user_text, \"ax\"",
    ".global verdigris_user_entry",
    "verdigris_user_entry:",
    "mov r12d, {calls}",
    "2:",
    "mov eax, {count}",
    "syscall",
    "dec r12d",
    "jnz 2b",
    "mov eax, {report}",
    "syscall",
    "3:",
    "jmp 3b",
    ".popsection",
    calls = const CALLS,
    count = const SYS_COUNT,
    report = const SYS_REPORT,
);

// The LSTAR target. Single CPU, interrupts masked by FMASK: a static slot for the user RSP is
// enough. RCX/R11 carry the user RIP/RFLAGS for SYSRET; the C-ABI scratch registers the user
// code may rely on are saved around the call into Rust.
global_asm!(
    ".global verdigris_syscall_entry",
    "verdigris_syscall_entry:",
    "mov [rip + {user_rsp}], rsp",
    "lea rsp, [rip + {kstack} + {kstack_size}]",
    "push r11",
    "push rcx",
    "push rdi",
    "push rsi",
    "push rdx",
    "push r8",
    "push r9",
    "push r10",
    "sub rsp, 8",
    "mov rdi, rax",
    "xor esi, esi",
    "mov si, cs",
    "xor edx, edx",
    "mov dx, ss",
    "call {dispatch}",
    "add rsp, 8",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdx",
    "pop rsi",
    "pop rdi",
    "pop rcx",
    "pop r11",
    "mov rsp, [rip + {user_rsp}]",
    "sysretq",
    user_rsp = sym USER_RSP,
    kstack = sym SYSCALL_STACK,
    kstack_size = const KSTACK_SIZE,
    dispatch = sym dispatch,
);

extern "C" {
    fn verdigris_user_entry();
    fn verdigris_syscall_entry();
}

extern "C" fn dispatch(nr: u64, cs: u64, ss: u64) -> u64 {
    match nr {
        SYS_COUNT => {
            if cs == u64::from(KERNEL_CS) && ss == u64::from(KERNEL_DS) {
                GOOD.fetch_add(1, Ordering::Relaxed)
            } else {
                LAST_BAD_CS.store(cs, Ordering::Relaxed);
                LAST_BAD_SS.store(ss, Ordering::Relaxed);
                BAD.fetch_add(1, Ordering::Relaxed)
            }
        }
        SYS_REPORT => {
            let good = GOOD.load(Ordering::Relaxed);
            let bad = BAD.load(Ordering::Relaxed);
            let mut w = Writer::lock();
            if good == CALLS && bad == 0 && cs == u64::from(KERNEL_CS) {
                w.str("syscall: ").dec(good).str(" ok\n");
            } else {
                w.str("syscall: FAIL (")
                    .dec(good)
                    .str(" good, ")
                    .dec(bad)
                    .str(" bad, last bad cs=")
                    .hex(LAST_BAD_CS.load(Ordering::Relaxed))
                    .str(" ss=")
                    .hex(LAST_BAD_SS.load(Ordering::Relaxed))
                    .str(", report cs=")
                    .hex(cs)
                    .str(")\n");
            }
            drop(w);
            power_off()
        }
        _ => {
            Writer::lock()
                .str("syscall: FAIL (unknown call ")
                .hex(nr)
                .str(")\n");
            power_off()
        }
    }
}

/// Called for any fault taken in ring 3 during this test.
fn user_fault(frame: &TrapFrame) {
    let entry = verdigris_syscall_entry as *const () as u64;
    let mut w = Writer::unlocked();
    if frame.rip == entry {
        w.str("syscall: FAIL (handler entered in ring 3: cs=")
            .hex(frame.cs)
            .str(" ss=")
            .hex(frame.ss)
            .str(", after ")
            .dec(GOOD.load(Ordering::Relaxed))
            .str(" good calls)\n");
    } else {
        w.str("syscall: FAIL (fault in ring 3: vector=")
            .hex(frame.vector)
            .str(" error=")
            .hex(frame.error)
            .str(" rip=")
            .hex(frame.rip)
            .str(" cs=")
            .hex(frame.cs)
            .str(")\n");
    }
    power_off()
}

pub fn run() {
    // SAFETY: set before ring 3 is entered; single CPU.
    unsafe { *arch::USER_FAULT_HOOK.get() = Some(user_fault) };
    // SAFETY: standard SYSCALL setup; the selectors match our GDT (kernel CS 0x10 / SS 0x18,
    // SYSRET base 0x20 → user CS 0x33 / SS 0x2b) and LSTAR points at our entry stub.
    unsafe {
        wrmsr(IA32_EFER, rdmsr(IA32_EFER) | EFER_SCE);
        wrmsr(
            IA32_STAR,
            (u64::from(USER_CS32) << 48) | (u64::from(KERNEL_CS) << 32),
        );
        wrmsr(IA32_LSTAR, verdigris_syscall_entry as *const () as u64);
        wrmsr(IA32_FMASK, FMASK);
    }
    let user_stack_top = USER_STACK.get() as u64 + 4096;
    // SAFETY: iretq to the user page (mapped user-accessible by paging::init) with a
    // user-accessible stack; the user code only makes system calls and never returns here.
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(USER_DS),
            rsp = in(reg) user_stack_top,
            rflags = in(reg) 0x202u64,
            cs = in(reg) u64::from(USER_CS),
            rip = in(reg) verdigris_user_entry as *const () as u64,
            options(noreturn)
        );
    }
}
