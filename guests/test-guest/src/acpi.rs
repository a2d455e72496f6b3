//! Just enough ACPI table parsing for the tests: RSDP → XSDT (or RSDT) → MADT (local APIC ids)
//! and FADT (PM register blocks, DSDT). The tables come from the VMM; every length, address and
//! checksum is checked before use, and a bad table is reported, never trusted.

use crate::boot::{self, phys_range_ok};

pub const MAX_CPUS: usize = 32;
/// Tables bigger than this are rejected as corrupt.
const MAX_TABLE_LEN: u32 = 64 * 1024;

pub struct Acpi {
    /// Whether the RSDP came from boot_params (true) or from scanning 0xE0000..0xFFFFF.
    pub rsdp_from_boot_params: bool,
    pub madt: Option<Madt>,
    pub fadt: Option<Fadt>,
}

pub struct Madt {
    /// APIC ids of the enabled processors, in MADT order.
    pub apic_ids: [u32; MAX_CPUS],
    pub cpu_count: usize,
    /// Enabled processors beyond MAX_CPUS (ignored).
    pub dropped: usize,
    pub ioapic: Option<u32>,
}

pub struct Fadt {
    pub pm1a_evt: u32,
    pub pm1a_cnt: u32,
    pub pm_tmr: u32,
    /// DSDT address, if its signature and checksum are valid.
    pub dsdt_ok: bool,
}

/// A view of physical memory, valid because it lies in the identity-mapped first 4 GiB.
fn phys(addr: u64, len: u64) -> Option<&'static [u8]> {
    if !phys_range_ok(addr, len) {
        return None;
    }
    // SAFETY: the range is inside the identity map (checked above) and is only read; ACPI
    // tables are not modified while the kernel runs.
    Some(unsafe { core::slice::from_raw_parts(addr as usize as *const u8, len as usize) })
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// A whole system description table with a valid header and checksum.
fn table(addr: u64, signature: &[u8; 4]) -> Option<&'static [u8]> {
    let header = phys(addr, 36)?;
    if &header[..4] != signature {
        return None;
    }
    let len = u32_at(header, 4)?;
    if !(36..=MAX_TABLE_LEN).contains(&len) {
        return None;
    }
    let t = phys(addr, u64::from(len))?;
    checksum_ok(t).then_some(t)
}

fn rsdp_valid(addr: u64) -> bool {
    match phys(addr, 20) {
        Some(r) => &r[..8] == b"RSD PTR " && checksum_ok(r),
        None => false,
    }
}

fn find_rsdp() -> Option<(u64, bool)> {
    let hint = boot::info().rsdp;
    if hint != 0 && rsdp_valid(hint) {
        return Some((hint, true));
    }
    // Scan the BIOS area on 16-byte boundaries.
    let area = phys(0xe0000, 0x20000)?;
    (0..area.len())
        .step_by(16)
        .find(|&off| &area[off..off + 8] == b"RSD PTR " && rsdp_valid(0xe0000 + off as u64))
        .map(|off| (0xe0000 + off as u64, false))
}

/// The physical addresses listed by the XSDT (revision >= 2) or RSDT.
fn for_each_table(rsdp: u64, mut f: impl FnMut(u64)) -> Option<()> {
    let r = phys(rsdp, 36)?;
    let revision = r[15];
    if revision >= 2 {
        let len = u32_at(r, 20)?;
        if len < 36 || !checksum_ok(phys(rsdp, u64::from(len))?) {
            return None;
        }
        let xsdt = table(u64_at(r, 24)?, b"XSDT")?;
        for entry in xsdt[36..].chunks_exact(8) {
            f(u64_at(entry, 0)?);
        }
    } else {
        let rsdt = table(u64::from(u32_at(r, 16)?), b"RSDT")?;
        for entry in rsdt[36..].chunks_exact(4) {
            f(u64::from(u32_at(entry, 0)?));
        }
    }
    Some(())
}

fn parse_madt(t: &[u8]) -> Madt {
    let mut madt = Madt {
        apic_ids: [0; MAX_CPUS],
        cpu_count: 0,
        dropped: 0,
        ioapic: None,
    };
    let mut off = 44;
    while off + 2 <= t.len() {
        let kind = t[off];
        let len = usize::from(t[off + 1]);
        if len < 2 || off + len > t.len() {
            break;
        }
        let entry = &t[off..off + len];
        let cpu = match (kind, len) {
            // Processor Local APIC: uid, APIC id, flags (bit 0 enabled).
            (0, 8) => u32_at(entry, 4)
                .filter(|flags| flags & 1 != 0)
                .map(|_| u32::from(entry[3])),
            // Processor Local x2APIC: reserved, x2APIC id, flags, uid.
            (9, 16) => u32_at(entry, 8)
                .filter(|flags| flags & 1 != 0)
                .and_then(|_| u32_at(entry, 4)),
            // I/O APIC: id, reserved, address, GSI base.
            (1, 12) => {
                madt.ioapic = madt.ioapic.or(u32_at(entry, 4));
                None
            }
            _ => None,
        };
        if let Some(id) = cpu {
            if madt.cpu_count < MAX_CPUS {
                madt.apic_ids[madt.cpu_count] = id;
                madt.cpu_count += 1;
            } else {
                madt.dropped += 1;
            }
        }
        off += len;
    }
    madt
}

fn parse_fadt(t: &[u8]) -> Fadt {
    let field = |off| u32_at(t, off).unwrap_or(0);
    // X_DSDT (offset 140, ACPI 2.0+) wins over DSDT (offset 40) when present and non-zero.
    let dsdt = u64_at(t, 140)
        .filter(|&a| a != 0)
        .unwrap_or(u64::from(field(40)));
    Fadt {
        pm1a_evt: field(56),
        pm1a_cnt: field(64),
        pm_tmr: field(76),
        dsdt_ok: table(dsdt, b"DSDT").is_some(),
    }
}

/// Find and parse the tables. `None` if there is no valid RSDP.
pub fn discover() -> Option<Acpi> {
    let (rsdp, from_boot_params) = find_rsdp()?;
    let mut acpi = Acpi {
        rsdp_from_boot_params: from_boot_params,
        madt: None,
        fadt: None,
    };
    for_each_table(rsdp, |addr| {
        if acpi.madt.is_none() {
            if let Some(t) = table(addr, b"APIC") {
                acpi.madt = Some(parse_madt(t));
            }
        }
        if acpi.fadt.is_none() {
            if let Some(t) = table(addr, b"FACP") {
                acpi.fadt = Some(parse_fadt(t));
            }
        }
    })?;
    Some(acpi)
}
