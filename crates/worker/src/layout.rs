//! The guest-physical memory map every Verdigris VM starts with.
//!
//! ```text
//! 0x0000_0500  GDT used for the 64-bit entry
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_9000  boot page tables: PML4, PDPT, 4 PDs (identity map of the low 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_b000  reserved: hypervisor pages (SYSCALL fix-up trampoline and its page tables)
//! 0x0009_fc00  reserved (EBDA) ... 0x000a_0000
//! 0x000e_0000  ACPI tables (RSDP first) ... 0x0010_0000, reserved
//! 0x0010_0000  RAM: kernel, initrd (at the top of low RAM) ...
//! LOW_RAM_END  MMIO hole (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) ... 4 GiB
//! 0x1_0000_0000 RAM above 4 GiB, if the VM has more than LOW_RAM_MAX
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const ZERO_PAGE: u64 = 0x7000;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD0: u64 = 0xb000; // four pages: 0xb000..0xf000
pub const CMDLINE: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
/// The boot protocol's setup_data list (one SETUP_RNG_SEED entry), right after the command line.
pub const SETUP_DATA: u64 = 0x3_0000;
/// Reserved guest pages the VMM owns (the SYSCALL trampoline and its page tables).
pub const HV_PAGES: u64 = 0x9_b000;
pub const EBDA_START: u64 = 0x9_fc00;
/// An unbacked GPA in the MMIO hole that the SYSCALL trampoline reads to exit to us.
pub const TRAMPOLINE_MMIO: u64 = 0xfe00_0000;
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIGH_MEMORY: u64 = 0x10_0000;
pub const LOW_RAM_MAX: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Smallest VM we accept: the kernel, an initrd and the low reserved areas must fit.
pub const MIN_MEMORY: u64 = 16 << 20;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The RAM ranges (gpa, size) of a VM with `memory` bytes.
pub fn ram_ranges(memory: u64) -> Vec<(u64, u64)> {
    let low = memory.min(LOW_RAM_MAX);
    let mut v = vec![(0, low)];
    if memory > low {
        v.push((FOUR_GIB, memory - low));
    }
    v
}

/// The e820 map the guest is given: (addr, size, type).
pub fn e820(memory: u64) -> Vec<(u64, u64, u32)> {
    let low = memory.min(LOW_RAM_MAX);
    let mut v = vec![
        (0, HV_PAGES, E820_RAM),
        (HV_PAGES, 0xa_0000 - HV_PAGES, E820_RESERVED),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
        (HIGH_MEMORY, low - HIGH_MEMORY, E820_RAM),
    ];
    if memory > low {
        v.push((FOUR_GIB, memory - low, E820_RAM));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, LOW_RAM_MAX), (FOUR_GIB, (4 << 30) - LOW_RAM_MAX)]
        );
        let map = e820(4 << 30);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // All RAM but the EBDA hole and the ACPI area is usable.
        assert_eq!(ram, (4 << 30) - (ACPI_END - HV_PAGES));
        for w in map.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "sorted and disjoint");
        }
    }
}
