//! Our own page tables: the first 4 GiB identity-mapped, 2 MiB pages except the kernel's own
//! 2 MiB (0x200000..0x400000), which uses 4 KiB pages so that the syscall test's code and stack
//! pages can be user-accessible while the rest of the kernel stays supervisor-only (the quirks
//! test turns SMAP on). 0xC0000000..4 GiB (the MMIO hole: IOAPIC, LAPIC) is uncached.
//!
//! The leaf tables are computed at compile time and loaded with the image, so building them
//! costs no guest instructions; only the five links between tables are written at run time.

use crate::Global;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;

const KERNEL_REGION: u64 = 0x20_0000;
const MMIO_HOLE: u64 = 0xc000_0000;

#[repr(C, align(4096))]
pub struct Table([u64; 512]);

static PML4: Global<Table> = Global::new(Table([0; 512]));
static PDPT: Global<Table> = Global::new(Table([0; 512]));
static PDS: Global<[Table; 4]> = Global::new(identity_pds());
static KERNEL_PT: Global<Table> = Global::new(kernel_pt());

const fn identity_pds() -> [Table; 4] {
    let mut pds = [const { Table([0; 512]) }; 4];
    let mut i = 0;
    while i < 2048 {
        let addr = (i as u64) << 21;
        let mut entry = addr | PRESENT | WRITABLE | HUGE;
        if addr >= MMIO_HOLE {
            entry |= WRITE_THROUGH | CACHE_DISABLE;
        }
        pds[i / 512].0[i % 512] = entry;
        i += 1;
    }
    pds
}

const fn kernel_pt() -> Table {
    let mut pt = Table([0; 512]);
    let mut i = 0;
    while i < 512 {
        pt.0[i] = (KERNEL_REGION + ((i as u64) << 12)) | PRESENT | WRITABLE;
        i += 1;
    }
    pt
}

extern "C" {
    static __user_text_start: u8;
    static __user_stack_start: u8;
}

/// Physical address of the top-level table, for CR3 (also used by the AP start-up code, which
/// needs it below 4 GiB: the kernel is linked at 2 MiB).
pub fn pml4_address() -> u64 {
    PML4.get() as u64
}

/// Link the tables, mark the user pages, and switch CR3 to them.
pub fn init() {
    // SAFETY: runs once on the boot CPU before anything else uses these tables; the identity
    // map it installs covers everything the kernel touches (the kernel, low memory, MMIO),
    // exactly like the VMM's boot tables, so switching CR3 is transparent.
    unsafe {
        let pml4 = &mut *PML4.get();
        let pdpt = &mut *PDPT.get();
        let pds = &mut *PDS.get();
        let kpt = &mut *KERNEL_PT.get();
        pml4.0[0] = PDPT.get() as u64 | PRESENT | WRITABLE | USER;
        for (i, pd) in pds.iter().enumerate() {
            pdpt.0[i] = pd as *const Table as u64 | PRESENT | WRITABLE | USER;
        }
        pds[0].0[1] = KERNEL_PT.get() as u64 | PRESENT | WRITABLE | USER;
        let user_pages = [
            core::ptr::addr_of!(__user_text_start) as u64,
            core::ptr::addr_of!(__user_stack_start) as u64,
        ];
        for page in user_pages {
            kpt.0[((page - KERNEL_REGION) >> 12) as usize] |= USER;
        }
        core::arch::asm!("mov cr3, {}", in(reg) pml4_address(), options(nostack, preserves_flags));
    }
}
