//! The Linux `boot_params` ("zero page") the VMM hands over in RSI: the command line, the e820
//! map and the RSDP address are copied into the kernel first thing, so the low pages they live
//! in can be reused (the SMP test puts its AP start-up code there).

use crate::Global;

/// Offsets in `struct boot_params` (Linux `arch/x86/include/uapi/asm/bootparam.h`).
const ACPI_RSDP_ADDR: usize = 0x070;
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
const ZERO_PAGE_SIZE: u64 = 4096;

pub const CMDLINE_MAX: usize = 2048;

#[derive(Clone, Copy)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;

pub struct BootInfo {
    pub cmdline: [u8; CMDLINE_MAX],
    pub cmdline_len: usize,
    /// Whether a command line pointer was present at all.
    pub has_cmdline: bool,
    pub e820: [E820Entry; E820_MAX],
    pub e820_len: usize,
    pub rsdp: u64,
    pub zero_page: u64,
}

static INFO: Global<BootInfo> = Global::new(BootInfo {
    cmdline: [0; CMDLINE_MAX],
    cmdline_len: 0,
    has_cmdline: false,
    e820: [E820Entry {
        addr: 0,
        size: 0,
        kind: 0,
    }; E820_MAX],
    e820_len: 0,
    rsdp: 0,
    zero_page: 0,
});

/// The boot information captured by [`capture`].
pub fn info() -> &'static BootInfo {
    // SAFETY: INFO is written only by `capture`, once, on the boot CPU before anything reads it.
    unsafe { &*INFO.get() }
}

/// Whether `[addr, addr + len)` lies in the identity-mapped first 4 GiB and is not page 0.
pub fn phys_range_ok(addr: u64, len: u64) -> bool {
    addr >= 0x1000 && len <= (1 << 32) && addr.checked_add(len).is_some_and(|end| end <= 1 << 32)
}

fn read_u8(base: u64, off: usize) -> u8 {
    // SAFETY: the caller checked that the zero page lies in mapped memory.
    unsafe { ((base as usize + off) as *const u8).read_volatile() }
}

fn read_u32(base: u64, off: usize) -> u32 {
    // SAFETY: as for read_u8; unaligned reads are fine on x86.
    unsafe { ((base as usize + off) as *const u32).read_unaligned() }
}

fn read_u64(base: u64, off: usize) -> u64 {
    // SAFETY: as for read_u8.
    unsafe { ((base as usize + off) as *const u64).read_unaligned() }
}

/// Copy what we need out of `boot_params`. A zero or unmapped pointer counts as "no boot data".
pub fn capture(zero_page: u64) {
    // SAFETY: called once on the boot CPU before any reader of INFO runs.
    let info = unsafe { &mut *INFO.get() };
    if !phys_range_ok(zero_page, ZERO_PAGE_SIZE) {
        return;
    }
    info.zero_page = zero_page;
    info.rsdp = read_u64(zero_page, ACPI_RSDP_ADDR);

    let count = usize::from(read_u8(zero_page, E820_ENTRIES)).min(E820_MAX);
    for i in 0..count {
        let off = E820_TABLE + i * 20;
        info.e820[i] = E820Entry {
            addr: read_u64(zero_page, off),
            size: read_u64(zero_page, off + 8),
            kind: read_u32(zero_page, off + 16),
        };
    }
    info.e820_len = count;

    let ptr = u64::from(read_u32(zero_page, CMD_LINE_PTR));
    if ptr != 0 && phys_range_ok(ptr, CMDLINE_MAX as u64) {
        info.has_cmdline = true;
        let mut len = 0;
        while len < CMDLINE_MAX {
            // SAFETY: ptr..ptr+CMDLINE_MAX is in the identity-mapped first 4 GiB (checked).
            let b = unsafe { ((ptr as usize + len) as *const u8).read_volatile() };
            if b == 0 {
                break;
            }
            info.cmdline[len] = b;
            len += 1;
        }
        info.cmdline_len = len;
    }
}

pub fn cmdline() -> &'static [u8] {
    let info = info();
    &info.cmdline[..info.cmdline_len]
}

/// The value of the first `test=` word of the command line; `hello` without one.
pub fn test_name() -> &'static [u8] {
    cmdline()
        .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .find_map(|word| word.strip_prefix(b"test="))
        .unwrap_or(b"hello")
}

/// Whether the page at `addr` is entirely inside RAM according to the e820 map.
pub fn page_is_ram(addr: u64) -> bool {
    let info = info();
    info.e820[..info.e820_len].iter().any(|e| {
        e.kind == E820_RAM
            && e.addr <= addr
            && e.addr
                .checked_add(e.size)
                .is_some_and(|end| addr + 4096 <= end)
    })
}

/// The decimal value of the first `<key>=` word of the command line.
pub fn number(key: &[u8]) -> Option<u64> {
    let word = cmdline()
        .split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .find(|w| w.len() > key.len() && w.starts_with(key) && w[key.len()] == b'=')?;
    let digits = &word[key.len() + 1..];
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    digits
        .iter()
        .try_fold(0u64, |n, &d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}
