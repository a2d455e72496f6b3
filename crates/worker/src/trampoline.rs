//! The SYSCALL fix-up for hosts where SYSCALL from ring 3 leaves CS at CPL 3.
//!
//! On such a host the guest's system-call entry point would run in ring 3 and fault. Without
//! any change to the guest we intercept its writes of LSTAR (an MSR filter), keep the value,
//! and point the real LSTAR at a one-page *trampoline* mapped user-accessible at
//! `0xffff_ff80_0000_0000`: PML4 slot 511, PDPT entry 0, in the "unused hole" of the x86-64
//! Linux memory map (between the ESPFIX stacks and the EFI region). Slot 511 is the one
//! top-level entry whose PDPT page every process shares by pointer (processes copy the kernel
//! half of the top-level table from `pgd_index(PAGE_OFFSET)`, slot 273 or higher, so the
//! "hypervisor" guard hole in slots 256-272 is *not* inherited). At the guest's first LSTAR
//! write (early boot, before any process exists) we hang our page directory into that shared
//! PDPT and set the user bit on the top-level entry (lower levels keep every kernel page
//! supervisor-only, so nothing of the kernel becomes user-accessible). A guest whose slot 511
//! is empty (our test guest) gets a PDPT of ours there.
//!
//! The trampoline's only instruction loads from an unbacked GPA; that MMIO exit lets the
//! worker finish the architectural SYSCALL: CS/SS from STAR[47:32], RFLAGS masked by SFMASK,
//! RIP = the guest's LSTAR. RCX and R11 were already set by the CPU.
//!
//! Pages (reserved in the e820 map, owned by the VMM): PDPT, PD, PT and the code page at
//! `layout::HV_PAGES`. Needs: no PTI in the guest (its user page tables would not have it).
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
pub const TRAMPOLINE_GVA: u64 = 0xffff_ff80_0000_0000;
const PML4_SLOT: u64 = 511;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
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
                            // The page the load hits: unbacked, so the load exits to us.
        w(TRAMPOLINE_MMIO | 0x7 | NX, PT + 8)?;
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
        let pml4 = sregs.cr3 & ADDR_MASK;
        let paging = sregs.cr0 & (1 << 31) != 0 && sregs.cr4 & (1 << 5) != 0;
        let _g = self.install.lock().unwrap_or_else(|e| e.into_inner());
        let target = if paging && self.install_in(mem, pml4) {
            TRAMPOLINE_GVA
        } else {
            tracing::warn!(
                "SYSCALL fix-up: no room in the page tables at {pml4:#x}; not installed"
            );
            value
        };
        if !nxe {
            // Without EFER.NXE bit 63 is reserved: clear it from the MMIO page's entry.
            let _ = mem.write_obj(TRAMPOLINE_MMIO | 0x7, GuestAddress(PT + 8));
        }
        if std::env::var_os("VERDIGRIS_DEBUG_TRAMPOLINE").is_some() {
            let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap_or(0);
            eprintln!(
                "trampoline: cr3={:#x} efer={:#x} pml4[511]={:#x} pdpt[0]={:#x} pd[0]={:#x} pt[0]={:#x} pt[1]={:#x} translate={:x?}",
                sregs.cr3, sregs.efer, rd(pml4 + PML4_SLOT * 8), rd(PDPT), rd(PD), rd(PT), rd(PT + 8), vp.translate(TRAMPOLINE_GVA)
            );
        }
        vp.set_msrs(&[(MSR_LSTAR, target)])
    }

    /// Maps the trampoline through slot 511 of the top-level table at `pml4`; false if that
    /// part of the address space is in use by the guest.
    fn install_in(&self, mem: &GuestMemoryMmap, pml4: u64) -> bool {
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
        let wr = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).is_ok();
        let slot = pml4 + PML4_SLOT * 8;
        let Some(top) = rd(slot) else { return false };
        let pdpt = if top & 1 == 0 {
            // Nothing there (a minimal guest): the whole slot is ours.
            if !wr(slot, PDPT | 0x7) {
                return false;
            }
            PDPT
        } else {
            if top & (1 << 7) != 0 {
                return false; // a 512 GiB page? not on x86-64; refuse rather than guess
            }
            if top & 0x4 == 0 && !wr(slot, top | 0x4) {
                return false;
            }
            top & ADDR_MASK
        };
        match rd(pdpt) {
            Some(0) => wr(pdpt, PD | 0x7),
            Some(e) => e == PD | 0x7,
            None => false,
        }
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
        (sregs.cs, sregs.ss) = crate::boot::flat_kernel_segments(kcs);
        vp.set_sregs(&sregs)?;
        regs.rip = self.guest_lstar.load(Ordering::SeqCst);
        regs.rflags = (regs.rflags & !fmask) | 2;
        vp.set_regs(&regs)
    }
}
