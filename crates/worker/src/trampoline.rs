//! The SYSCALL fix-up for hosts where SYSCALL from ring 3 leaves CS at CPL 3.
//!
//! On such a host the guest's system-call entry point would run in ring 3 and fault. Without
//! any change to the guest we intercept its writes of LSTAR (an MSR filter), keep the value,
//! and point the real LSTAR at a one-page *trampoline* that we map, user-accessible, at
//! `0xffff_8080_0000_0000`: PML4 slot 257, inside the "guard hole reserved for hypervisors"
//! (slots 256-271) of the x86-64 Linux memory map, which the kernel never uses and which every
//! process inherits from the kernel's top-level table. (Slot 256 itself faults on our hosts:
//! the outer hypervisor uses it.) The trampoline's only instruction loads from an unbacked GPA;
//! that MMIO exit lets the worker finish the architectural SYSCALL: CS/SS from STAR[47:32],
//! RFLAGS masked by SFMASK, RIP = the guest's LSTAR. RCX and R11 were already set by the CPU.
//!
//! Pages (reserved in the e820 map, owned by the VMM): PDPT, PD, PT and the code page at
//! `layout::HV_PAGES`. Needs: no PTI in the guest (its user page tables would lack the slot).
//! The breakpoint variant (an execute breakpoint on LSTAR via KVM_SET_GUEST_DEBUG) was tried
//! first: it does not fire for SYSCALL from ring 3 on these hosts.

use crate::layout::{HV_PAGES, TRAMPOLINE_MMIO};
use hypervisor::Vp;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_SFMASK: u32 = 0xc000_0084;
pub const TRAMPOLINE_GVA: u64 = 0xffff_8080_0000_0000;
const PML4_SLOT: u64 = 257;
const PDPT: u64 = HV_PAGES;
const PD: u64 = HV_PAGES + 0x1000;
const PT: u64 = HV_PAGES + 0x2000;
const CODE: u64 = HV_PAGES + 0x3000;
const NX: u64 = 1 << 63;

/// Per-VM state of the fix-up.
pub struct Trampoline {
    guest_lstar: AtomicU64,
    install: Mutex<()>,
}

impl Trampoline {
    /// Writes the trampoline's page tables and code into the reserved pages.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, String> {
        let w = |v: u64, at: u64| {
            mem.write_obj(v, GuestAddress(at))
                .map_err(|e| format!("SYSCALL trampoline: {e}"))
        };
        w(PD | 0x7, PDPT)?;
        w(PT | 0x7, PD)?;
        w(CODE | 0x5, PT)?; // present, user, read-only, executable
        w(TRAMPOLINE_MMIO | 0x7 | NX, PT + 8)?; // the page the load hits: unbacked
                                                // mov al, [rip + 0xffa] → TRAMPOLINE_GVA + 0x1000; then ud2 (never reached).
        mem.write_slice(
            &[0x8a, 0x05, 0xfa, 0x0f, 0x00, 0x00, 0x0f, 0x0b],
            GuestAddress(CODE),
        )
        .map_err(|e| format!("SYSCALL trampoline: {e}"))?;
        Ok(Self {
            guest_lstar: AtomicU64::new(0),
            install: Mutex::new(()),
        })
    }

    /// The guest wrote LSTAR: remember it, map the trampoline into the current top-level page
    /// table, and point the real LSTAR at the trampoline.
    pub fn guest_wrote_lstar(
        &self,
        vp: &Vp,
        mem: &GuestMemoryMmap,
        value: u64,
    ) -> hypervisor::Result<()> {
        self.guest_lstar.store(value, Ordering::SeqCst);
        let sregs = vp.sregs()?;
        let nxe = sregs.efer & (1 << 11) != 0;
        let pml4 = sregs.cr3 & 0x000f_ffff_ffff_f000;
        let slot = GuestAddress(pml4 + PML4_SLOT * 8);
        let _g = self.install.lock().unwrap_or_else(|e| e.into_inner());
        let current: u64 = mem.read_obj(slot).unwrap_or(u64::MAX);
        let mine = PDPT | 0x7;
        let target = if current == mine {
            TRAMPOLINE_GVA
        } else if current & 1 == 0 && sregs.cr0 & (1 << 31) != 0 && sregs.cr4 & (1 << 5) != 0 {
            if mem.write_obj(mine, slot).is_ok() {
                TRAMPOLINE_GVA
            } else {
                value
            }
        } else {
            // Paging is off or the slot is in use: no fix-up possible for this table.
            tracing::warn!("SYSCALL fix-up: PML4 slot 257 at {pml4:#x} is in use ({current:#x}); not installed");
            value
        };
        if !nxe {
            // Without EFER.NXE bit 63 is reserved: clear it from the MMIO page's entry.
            let _ = mem.write_obj(TRAMPOLINE_MMIO | 0x7, GuestAddress(PT + 8));
        }
        if std::env::var_os("VERDIGRIS_DEBUG_TRAMPOLINE").is_some() {
            let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap_or(0);
            eprintln!(
                "trampoline: cr3={:#x} efer={:#x} pml4[256]={:#x} pdpt[0]={:#x} pd[0]={:#x} pt[0]={:#x} pt[1]={:#x} translate={:x?}",
                sregs.cr3, sregs.efer, rd(pml4 + 2048), rd(PDPT), rd(PD), rd(PT), rd(PT + 8), vp.translate(TRAMPOLINE_GVA)
            );
        }
        vp.set_msrs(&[(MSR_LSTAR, target)])
    }

    /// At the trampoline's MMIO exit: finish the SYSCALL the CPU left half done.
    pub fn finish_syscall(&self, vp: &mut Vp) -> hypervisor::Result<()> {
        // Registers as they were at the trampoline (RAX intact: the load has not completed).
        let mut regs = vp.regs()?;
        vp.complete_pending()?;
        let mut sregs = vp.sregs()?;
        let v = vp.get_msrs(&[MSR_STAR, MSR_SFMASK])?;
        let (star, fmask) = (v[0], v[1]);
        let kcs = ((star >> 32) & 0xfffc) as u16;
        sregs.cs.selector = kcs;
        sregs.cs.dpl = 0;
        sregs.cs.type_ = 11;
        sregs.cs.l = 1;
        sregs.cs.db = 0;
        sregs.cs.s = 1;
        sregs.cs.present = 1;
        sregs.cs.g = 1;
        sregs.cs.base = 0;
        sregs.cs.limit = 0xffff_ffff;
        sregs.ss.selector = kcs + 8;
        sregs.ss.dpl = 0;
        sregs.ss.type_ = 3;
        sregs.ss.db = 1;
        sregs.ss.s = 1;
        sregs.ss.present = 1;
        sregs.ss.g = 1;
        sregs.ss.base = 0;
        sregs.ss.limit = 0xffff_ffff;
        sregs.ss.unusable = 0;
        vp.set_sregs(&sregs)?;
        regs.rip = self.guest_lstar.load(Ordering::SeqCst);
        regs.rflags = (regs.rflags & !fmask) | 2;
        vp.set_regs(&regs)
    }
}
