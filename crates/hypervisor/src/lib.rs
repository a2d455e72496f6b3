//! # hypervisor — the only code in Verdigris that talks to KVM
//!
//! This crate plays the part of the Hyper-V hypervisor's hypercall interface for the root: it
//! gives the rest of the stack *partitions* (one per VM), *guest-physical maps*, *virtual
//! processors* and *intercepts*, and hides `/dev/kvm` behind that vocabulary:
//!
//! | Hyper-V (TLFS)                         | here                                          |
//! |----------------------------------------|-----------------------------------------------|
//! | HvCreatePartition / HvDeletePartition  | [`Hypervisor::create_partition`] / `Drop`       |
//! | HvMapGpaPages / HvUnmapGpaPages        | [`Partition::map_gpa`] / [`Partition::unmap_gpa`] |
//! | dirty-page tracking (for migration)    | [`Partition::dirty_pages`]                    |
//! | HvCreateVp                             | [`Partition::create_vp`]                      |
//! | HvGet/SetVpRegisters                   | [`Vp`] getters and setters                    |
//! | HvDispatchVp → intercept message       | [`Vp::run`] → [`Intercept`]                   |
//! | HvAssertVirtualInterrupt               | [`Partition::signal_msi`], [`Partition::set_irq_line`] |
//!
//! It talks to: the Linux KVM API (through `kvm-ioctls`) and nothing else. The worker builds the
//! VM on top of it.
//!
//! It must never: know about devices, guest memory contents, or policy (which CPUID bits a guest
//! sees, how an intercept is handled). Those belong to the worker. Nothing outside this crate may
//! open `/dev/kvm`.

mod vp;

pub use kvm_bindings;
pub use vp::{CancelHandle, Intercept, Vp};

use kvm_bindings::{
    kvm_enable_cap, kvm_msi, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use kvm_ioctls::{Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use std::sync::Mutex;

/// Errors from the hypervisor layer. Each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM {op} failed: {err}")]
    Kvm {
        op: &'static str,
        #[source]
        err: kvm_ioctls::Error,
    },
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("invalid request: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |err| Error::Kvm { op, err }
}

/// What this host's KVM can do, read once when the hypervisor is opened.
#[derive(Debug, Clone)]
pub struct Capabilities {
    pub max_vps: usize,
    pub max_memslots: usize,
    pub user_space_msr: bool,
    pub msr_filter: bool,
    pub irqchip: bool,
    pub split_irqchip: bool,
    pub tsc_control: bool,
    pub dirty_log: bool,
    pub immediate_exit: bool,
    pub hyperv: bool,
}

/// An open handle on the host hypervisor (`/dev/kvm`).
pub struct Hypervisor {
    kvm: Kvm,
    caps: Capabilities,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and reads its capabilities.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::Open)?;
        let caps = Capabilities {
            max_vps: kvm.get_max_vcpus(),
            max_memslots: kvm.get_nr_memslots(),
            user_space_msr: kvm.check_extension(Cap::X86UserSpaceMsr),
            msr_filter: kvm.check_extension(Cap::X86MsrFilter),
            irqchip: kvm.check_extension(Cap::Irqchip),
            split_irqchip: kvm.check_extension(Cap::SplitIrqchip),
            tsc_control: kvm.check_extension(Cap::TscControl),
            dirty_log: kvm.check_extension(Cap::SyncMmu),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            hyperv: kvm.check_extension(Cap::HypervSynic),
        };
        Ok(Self { kvm, caps })
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The CPUID leaves KVM can present to a guest (the upper bound of any CPUID policy).
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))
    }

    /// Creates a partition: an empty VM with no memory and no VPs.
    pub fn create_partition(&self, config: &PartitionConfig) -> Result<Partition> {
        if !self.caps.immediate_exit {
            return Err(Error::MissingCapability("KVM_CAP_IMMEDIATE_EXIT"));
        }
        let vm = self.kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        // Intel VMX needs a TSS and an identity-map page below 4 GiB that the guest never uses;
        // they sit just below the BIOS ROM area at the top of the 32-bit space.
        vm.set_identity_map_address(0xfeff_c000)
            .map_err(kvm_err("SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(0xfeff_d000)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        if config.in_kernel_irqchip {
            vm.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        }
        if config.in_kernel_pit {
            let pit = kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))?;
        }
        if config.user_space_msr_exits {
            if !self.caps.user_space_msr {
                return Err(Error::MissingCapability("KVM_CAP_X86_USER_SPACE_MSR"));
            }
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                args: [
                    u64::from(
                        kvm_bindings::KVM_MSR_EXIT_REASON_FILTER
                            | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN,
                    ),
                    0,
                    0,
                    0,
                ],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(kvm_err("ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        }
        Ok(Partition {
            vm,
            max_vps: self.caps.max_vps,
            slots: Mutex::new(Vec::new()),
            max_slots: self.caps.max_memslots,
            vcpu_mmap_size: self
                .kvm
                .get_vcpu_mmap_size()
                .map_err(kvm_err("GET_VCPU_MMAP_SIZE"))?,
        })
    }
}

/// How to create a partition.
#[derive(Debug, Clone)]
pub struct PartitionConfig {
    /// In-kernel LAPIC, IOAPIC and PIC.
    pub in_kernel_irqchip: bool,
    /// In-kernel PIT (unscaled wall time; the worker uses its own scaled PIT instead).
    pub in_kernel_pit: bool,
    /// Unknown MSRs and MSRs named by the filter exit to user space instead of injecting #GP.
    pub user_space_msr_exits: bool,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            in_kernel_irqchip: true,
            in_kernel_pit: false,
            user_space_msr_exits: true,
        }
    }
}

/// Flags of a guest-physical mapping.
#[derive(Debug, Clone, Copy, Default)]
pub struct MapFlags {
    pub read_only: bool,
    pub track_dirty: bool,
}

#[derive(Debug, Clone, Copy)]
struct SlotInfo {
    gpa: u64,
    size: u64,
    used: bool,
}

/// A partition (a VM). Dropping it destroys the VM and all its VPs' kernel state.
pub struct Partition {
    vm: VmFd,
    max_vps: usize,
    max_slots: usize,
    slots: Mutex<Vec<SlotInfo>>,
    vcpu_mmap_size: usize,
}

/// A handle on one guest-physical mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapHandle(u32);

impl MapHandle {
    /// The handle of a partition's first mapping.
    pub fn first() -> Self {
        MapHandle(0)
    }
}

/// MSRs that must exit to user space even though KVM may know them: ranges of consecutive
/// indices, each intercepted on read and/or write.
#[derive(Debug, Clone, Default)]
pub struct MsrIntercepts {
    pub ranges: Vec<MsrRange>,
}

/// `count` MSRs from `base`.
#[derive(Debug, Clone, Copy)]
pub struct MsrRange {
    pub base: u32,
    pub count: u32,
    pub read: bool,
    pub write: bool,
}

impl Partition {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `gpa`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must be a valid, page-aligned host mapping that stays mapped
    /// for as long as this partition exists (or until [`Partition::unmap_gpa`]), and nothing
    /// may rely on its contents being stable: the guest writes to it at will.
    pub unsafe fn map_gpa(
        &self,
        gpa: u64,
        host_addr: *mut u8,
        size: u64,
        flags: MapFlags,
    ) -> Result<MapHandle> {
        if !gpa.is_multiple_of(4096)
            || !size.is_multiple_of(4096)
            || !(host_addr as usize).is_multiple_of(4096)
            || size == 0
        {
            return Err(Error::Invalid(format!(
                "GPA mapping {gpa:#x}+{size:#x} is not page aligned"
            )));
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots.iter().filter(|s| s.used) {
            if gpa < s.gpa + s.size && s.gpa < gpa + size {
                return Err(Error::Invalid(format!(
                    "GPA mapping {gpa:#x}+{size:#x} overlaps {:#x}+{:#x}",
                    s.gpa, s.size
                )));
            }
        }
        let slot = match slots.iter().position(|s| !s.used) {
            Some(i) => i,
            None => {
                if slots.len() >= self.max_slots {
                    return Err(Error::Invalid("no free memory slots".into()));
                }
                slots.push(SlotInfo {
                    gpa: 0,
                    size: 0,
                    used: false,
                });
                slots.len() - 1
            }
        };
        let mut kflags = 0;
        if flags.read_only {
            kflags |= KVM_MEM_READONLY;
        }
        if flags.track_dirty {
            kflags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: kflags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees that the host range is a live mapping that outlives the
        // slot; the slot index is ours and not in use.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        slots[slot] = SlotInfo {
            gpa,
            size,
            used: true,
        };
        Ok(MapHandle(slot as u32))
    }

    /// Removes a mapping made by [`Partition::map_gpa`].
    pub fn unmap_gpa(&self, handle: MapHandle) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let info = slots
            .get(handle.0 as usize)
            .copied()
            .filter(|s| s.used)
            .ok_or_else(|| Error::Invalid("unknown GPA mapping".into()))?;
        let region = kvm_userspace_memory_region {
            slot: handle.0,
            flags: 0,
            guest_phys_addr: info.gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("SET_USER_MEMORY_REGION(delete)"))?;
        slots[handle.0 as usize].used = false;
        Ok(())
    }

    /// Returns the pages of a dirty-tracked mapping written since the last call (one bit per
    /// 4 KiB page, in u64 words), and resets the tracking.
    pub fn dirty_pages(&self, handle: MapHandle) -> Result<Vec<u64>> {
        let size = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .get(handle.0 as usize)
                .filter(|s| s.used)
                .map(|s| s.size)
                .ok_or_else(|| Error::Invalid("unknown GPA mapping".into()))?
        };
        self.vm
            .get_dirty_log(handle.0, size as usize)
            .map_err(kvm_err("GET_DIRTY_LOG"))
    }

    /// Creates virtual processor `index` (its APIC id is `index`).
    pub fn create_vp(&self, index: u32) -> Result<Vp> {
        if index as usize >= self.max_vps {
            return Err(Error::Invalid(format!(
                "VP index {index} is beyond this host's limit of {}",
                self.max_vps
            )));
        }
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("CREATE_VCPU"))?;
        Ok(Vp::new(fd, index, self.vcpu_mmap_size))
    }

    /// Sets an interrupt line (GSI) of the in-kernel PIC/IOAPIC.
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> Result<()> {
        self.vm
            .set_irq_line(gsi, level)
            .map_err(kvm_err("IRQ_LINE"))
    }

    /// Pulses an edge-triggered interrupt line.
    pub fn pulse_irq_line(&self, gsi: u32) -> Result<()> {
        self.set_irq_line(gsi, true)?;
        self.set_irq_line(gsi, false)
    }

    /// Delivers an MSI (address/data as the LAPIC decodes them). Returns false if the guest
    /// blocked it (e.g. masked).
    pub fn signal_msi(&self, address: u64, data: u32) -> Result<bool> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|n| n > 0)
            .map_err(kvm_err("SIGNAL_MSI"))
    }

    /// Sends a fixed, edge-triggered interrupt `vector` to the LAPIC with `apic_id`.
    pub fn interrupt_vp(&self, apic_id: u32, vector: u8) -> Result<bool> {
        self.signal_msi(
            0xfee0_0000 | (u64::from(apic_id & 0xff) << 12),
            u32::from(vector),
        )
    }

    /// Makes the listed MSR ranges exit to user space (everything else keeps KVM's handling).
    pub fn set_msr_intercepts(&self, msrs: &MsrIntercepts) -> Result<()> {
        if msrs.ranges.len() > kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize {
            return Err(Error::Invalid("too many intercepted MSR ranges".into()));
        }
        // A bitmap of zeros means "deny", which (with user-space MSR exits enabled for filter
        // denials at partition creation) exits to user space instead of injecting #GP.
        let bitmaps: Vec<Vec<u8>> = msrs
            .ranges
            .iter()
            .map(|r| vec![0u8; r.count.div_ceil(8) as usize])
            .collect();
        let mut ranges = Vec::new();
        for (r, bitmap) in msrs.ranges.iter().zip(&bitmaps) {
            let mut flags = MsrFilterRangeFlags::empty();
            if r.read {
                flags |= MsrFilterRangeFlags::READ;
            }
            if r.write {
                flags |= MsrFilterRangeFlags::WRITE;
            }
            if flags.is_empty() || r.count == 0 {
                continue;
            }
            ranges.push(MsrFilterRange {
                flags,
                base: r.base,
                msr_count: r.count,
                bitmap,
            });
        }
        self.vm
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(kvm_err("X86_SET_MSR_FILTER"))
    }

    /// The in-kernel interrupt controller state (for save/restore).
    pub fn get_irqchip(&self, chip: u32) -> Result<kvm_bindings::kvm_irqchip> {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id: chip,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut c)
            .map_err(kvm_err("GET_IRQCHIP"))?;
        Ok(c)
    }
}
