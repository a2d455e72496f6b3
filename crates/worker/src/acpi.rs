//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT and DSDT, built with `acpi_tables` and placed in
//! the reserved area at 0xE0000 (where a guest without EFI looks for the RSDP).
//!
//! The FADT describes the fixed hardware of `devices::acpi_pm` (PM1 block, PM timer, GPE0, the
//! 0xCF9 reset register, SCI on IRQ 9); the DSDT announces `\_S5` (SLP_TYP 5) so that an ACPI
//! power-off reaches us, and the legacy devices' resources.

use crate::layout::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR};
use acpi_tables::{aml, fadt, madt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT, Aml};
use devices::acpi_pm;
use zerocopy::{Immutable, IntoBytes};

const OEM_ID: [u8; 6] = *b"VRDGRS";
const OEM_TABLE: [u8; 8] = *b"VERDIGRI";

/// A table and the GPA it goes to.
pub type Blob = (u64, Vec<u8>);

/// Extra AML a later layer (e.g. VMBus) adds under `\_SB`.
pub type ExtraAml = Vec<u8>;

/// MADT "Interrupt Source Override" (type 2), absent from `acpi_tables`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// A legacy ISA device: `_HID`, `_UID` and `_CRS` with its I/O ports and edge IRQ.
fn legacy_device(name: &str, hid: &str, ports: &[(u16, u8)], irq: u32) -> Vec<u8> {
    let ios: Vec<aml::IO> = ports
        .iter()
        .map(|&(base, len)| aml::IO::new(base, base, 1, len))
        .collect();
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    res.push(&int);
    let crs = aml::ResourceTemplate::new(res);
    let hid = aml::EISAName::new(hid);
    let n_hid = aml::Name::new("_HID".into(), &hid);
    let n_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let n_crs = aml::Name::new("_CRS".into(), &crs);
    bytes(&aml::Device::new(name.into(), vec![&n_hid, &n_uid, &n_crs]))
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Builds every table for a VM with `vps` processors; returns (gpa, bytes) blobs to copy into
/// guest memory and the RSDP address.
pub fn build(vps: u32, extra_sb: &[ExtraAml]) -> Result<(Vec<Blob>, u64), String> {
    // DSDT
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![
            &(acpi_pm::S5_TYPE as u8),
            &(acpi_pm::S5_TYPE as u8),
            &aml::ZERO,
            &aml::ZERO,
        ]),
    );
    let mut sb_body = Vec::new();
    sb_body.extend(legacy_device("COM1", "PNP0501", &[(0x3f8, 8)], 4));
    sb_body.extend(legacy_device("RTC_", "PNP0B00", &[(0x70, 2)], 8));
    sb_body.extend(legacy_device("KBD_", "PNP0303", &[(0x60, 1), (0x64, 1)], 1));
    for e in extra_sb {
        sb_body.extend_from_slice(e);
    }
    let raw = RawAml(sb_body);
    let sb = aml::Scope::new("_SB_".into(), vec![&raw]);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&bytes(&s5));
    dsdt.append_slice(&bytes(&sb));
    dsdt.update_checksum();
    let dsdt = dsdt.as_slice().to_vec();

    // MADT
    if vps == 0 || vps > 255 {
        return Err(format!("{vps} processors cannot be described (1..=255)"));
    }
    let mut m = madt::MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        madt::LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vps {
        m.add_structure(madt::ProcessorLocalApic::new(
            i as u8,
            i as u8,
            madt::EnabledStatus::Enabled,
        ));
    }
    m.add_structure(madt::IoApic::new(0, IOAPIC_ADDR, 0));
    // SCI: ISA IRQ 9 is level-triggered, active high on this platform.
    m.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: acpi_pm::SCI_IRQ as u8,
        gsi: acpi_pm::SCI_IRQ,
        flags: 0b1101,
    });
    let madt = bytes(&m);

    let facs = bytes(&acpi_tables::facs::FACS::new());

    // Layout.
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64, 16);
    let xsdt_len = 36 + 8 * 3;
    let fadt_addr = align(xsdt_addr + xsdt_len, 16);
    let facs_addr = align(fadt_addr + fadt::FADT::len() as u64, 64);
    let dsdt_addr = align(facs_addr + facs.len() as u64, 16);
    let madt_addr = align(dsdt_addr + dsdt.len() as u64, 16);
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err("ACPI tables do not fit below 1 MiB".into());
    }

    let gas_io = |port: u16, bits: u8| {
        acpi_tables::gas::GAS::new(
            acpi_tables::gas::AddressSpace::SystemIo,
            bits,
            0,
            acpi_tables::gas::AccessSize::Undefined,
            u64::from(port),
        )
    };
    let mut f = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_64(facs_addr)
        .flag(fadt::Flags::Wbinvd)
        .flag(fadt::Flags::ProcC1)
        .flag(fadt::Flags::SlpButton)
        .flag(fadt::Flags::TmrValExt)
        .flag(fadt::Flags::ResetRegSup);
    f.sci_int = (acpi_pm::SCI_IRQ as u16).into();
    f.pm1a_evt_blk = u32::from(acpi_pm::PM1_EVT).into();
    f.pm1a_cnt_blk = u32::from(acpi_pm::PM1_CNT).into();
    f.pm_tmr_blk = u32::from(acpi_pm::PM_TMR).into();
    f.gpe0_blk = u32::from(acpi_pm::GPE0).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.gpe0_blk_len = acpi_pm::GPE0_LEN;
    f.x_pm1a_evt_blk = gas_io(acpi_pm::PM1_EVT, 32);
    f.x_pm1a_cnt_blk = gas_io(acpi_pm::PM1_CNT, 16);
    f.x_pm_tmr_blk = gas_io(acpi_pm::PM_TMR, 32);
    f.x_gpe0_blk = gas_io(acpi_pm::GPE0, 32);
    f.reset_reg = gas_io(acpi_pm::RESET_PORT, 8);
    f.reset_value = acpi_pm::RESET_VALUE;
    f.century = 0x32;
    // Legacy devices and an 8042 are present; no VGA, no MSI quirks.
    f.iapc_boot_arch = (0x0001u16 | 0x0002).into();
    f.preferred_pm_profile = fadt::PmProfile::EnterpriseServer as u8;
    let fadt = bytes(&f.finalize());

    let mut x = XSDT::new(OEM_ID, OEM_TABLE, 1);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    x.add_entry(dsdt_addr);
    let xsdt = bytes(&x);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    Ok((
        vec![
            (rsdp_addr, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (facs_addr, facs),
            (dsdt_addr, dsdt),
            (madt_addr, madt),
        ],
        rsdp_addr,
    ))
}

/// Pre-encoded AML bytes.
pub struct RawAml(pub Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let (blobs, rsdp) = build(4, &[]).unwrap();
        assert_eq!(rsdp, ACPI_START);
        assert_eq!(&blobs[0].1[..8], b"RSD PTR ");
        assert!(checksum_ok(&blobs[0].1[..20]), "RSDP v1 checksum");
        for (_, t) in &blobs[1..] {
            if &t[..4] == b"FACS" {
                continue;
            }
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len(), "{} length", String::from_utf8_lossy(&t[..4]));
            assert!(
                checksum_ok(t),
                "{} checksum",
                String::from_utf8_lossy(&t[..4])
            );
        }
        let madt = &blobs.iter().find(|b| &b.1[..4] == b"APIC").unwrap().1;
        // 4 local APICs (8 bytes each), one IOAPIC (12), one override (10) after 44 bytes.
        assert_eq!(madt.len(), 44 + 4 * 8 + 12 + 10);
        let dsdt = &blobs.iter().find(|b| &b.1[..4] == b"DSDT").unwrap().1;
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let mut last_end = 0;
        for (a, t) in &blobs {
            assert!(*a >= last_end, "tables do not overlap");
            last_end = a + t.len() as u64;
        }
        assert!(build(0, &[]).is_err());
        assert!(build(256, &[]).is_err());
    }
}
