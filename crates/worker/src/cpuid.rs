//! The guest CPUID policy: owned by us, explicit, and documented here.
//!
//! Start from what KVM supports (`KVM_GET_SUPPORTED_CPUID`), then:
//! - leaf 1: the VP's APIC id in EBX[31:24], the hypervisor bit (ECX[31]) set;
//! - leaves 0xB / 0x1F: the VP's x2APIC id in EDX;
//! - features whose instructions our hosts' KVM cannot execute in guest ring 0, or whose state
//!   it cannot switch, are cleared ([`HIDDEN`]): XSAVE and everything built on it (AVX, AVX-512,
//!   PKU), SSSE3 / SSE4.1 / SSE4.2 / AES-NI / PCLMULQDQ / SHA / GFNI / VAES (kernel crypto and
//!   checksum code runs them in ring 0), RDRAND/RDSEED (not emulated), MONITOR/MWAIT;
//! - every hypervisor leaf at 0x40000000 and above is dropped: no KVM signature (the guest must
//!   not use kvmclock, which does not follow the VM's time scale; later the Hyper-V leaves of
//!   `hv1` go there).
//!
//! On some hosts `KVM_SET_CPUID2` cannot hide host features (the guest sees them anyway); the
//! worker's host probe finds out which and hides them from Linux with kernel parameters instead
//! (see `host.rs`).

use hypervisor::kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A feature bit: (leaf, subleaf, register, bit, Linux name for `clearcpuid=`).
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u32,
    pub name: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn f(leaf: u32, subleaf: u32, reg: Reg, bit: u32, name: &'static str) -> Feature {
    Feature {
        leaf,
        subleaf,
        reg,
        bit,
        name,
    }
}

/// Features the policy clears.
pub const HIDDEN: &[Feature] = &[
    f(1, 0, Reg::Ecx, 26, "xsave"),
    f(1, 0, Reg::Ecx, 27, "osxsave"),
    f(1, 0, Reg::Ecx, 28, "avx"),
    f(1, 0, Reg::Ecx, 12, "fma"),
    f(1, 0, Reg::Ecx, 29, "f16c"),
    f(1, 0, Reg::Ecx, 9, "ssse3"),
    f(1, 0, Reg::Ecx, 19, "sse4_1"),
    f(1, 0, Reg::Ecx, 20, "sse4_2"),
    f(1, 0, Reg::Ecx, 25, "aes"),
    f(1, 0, Reg::Ecx, 1, "pclmulqdq"),
    f(1, 0, Reg::Ecx, 30, "rdrand"),
    f(1, 0, Reg::Ecx, 3, "monitor"),
    f(1, 0, Reg::Ecx, 22, "movbe"),
    f(7, 0, Reg::Ebx, 5, "avx2"),
    f(7, 0, Reg::Ebx, 16, "avx512f"),
    f(7, 0, Reg::Ebx, 18, "rdseed"),
    f(7, 0, Reg::Ebx, 29, "sha_ni"),
    f(7, 0, Reg::Ecx, 3, "pku"),
    f(7, 0, Reg::Ecx, 8, "gfni"),
    f(7, 0, Reg::Ecx, 9, "vaes"),
    f(7, 0, Reg::Ecx, 10, "vpclmulqdq"),
];

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Reads a feature bit from raw CPUID output (eax, ebx, ecx, edx).
pub fn has(regs: [u32; 4], feat: &Feature) -> bool {
    let v = match feat.reg {
        Reg::Ebx => regs[1],
        Reg::Ecx => regs[2],
        Reg::Edx => regs[3],
    };
    v & (1 << feat.bit) != 0
}

/// The CPUID table for VP `apic_id`, plus `extra` leaves (the Hyper-V leaves of an
/// enlightened partition).
pub fn policy_with(supported: &CpuId, apic_id: u32, extra: &[(u32, [u32; 4])]) -> CpuId {
    let base = policy(supported, apic_id);
    let mut entries = base.as_slice().to_vec();
    for &(function, r) in extra {
        entries.push(kvm_cpuid_entry2 {
            function,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).unwrap_or(base)
}

/// The CPUID table for VP `apic_id`.
pub fn policy(supported: &CpuId, apic_id: u32) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| e.function < 0x4000_0000 || e.function >= 0x8000_0000)
        .copied()
        .collect();
    for e in entries.iter_mut() {
        for feat in HIDDEN {
            if e.function == feat.leaf && e.index == feat.subleaf {
                *reg_mut(e, feat.reg) &= !(1 << feat.bit);
            }
        }
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (apic_id << 24);
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = apic_id,
            0xd => {
                // No XSAVE: no state components.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_clears_hidden_features_and_hypervisor_leaves() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                ebx: 0x0000_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: u32::MAX,
                ecx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                ebx: 0x4b4d_564b,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ];
        let sup = CpuId::from_entries(&entries).unwrap();
        let p = policy(&sup, 3);
        let s = p.as_slice();
        assert_eq!(s.len(), 3, "hypervisor leaf dropped");
        let l1 = s.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        for feat in HIDDEN {
            let e = s.iter().find(|e| e.function == feat.leaf).unwrap();
            assert!(
                !has([e.eax, e.ebx, e.ecx, e.edx], feat),
                "{} hidden",
                feat.name
            );
        }
        assert_eq!(s.iter().find(|e| e.function == 0xb).unwrap().edx, 3);
    }
}
