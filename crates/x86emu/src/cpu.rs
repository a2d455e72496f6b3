//! The abstract CPU the emulator works on.
//!
//! The worker implements [`Cpu`] over a KVM vCPU (registers, special registers, FPU/XSAVE
//! state, guest page tables and memory); the tests implement it over a plain struct.

use iced_x86::Register;

/// Architectural bits the emulator checks.
pub mod bits {
    /// CR0.MP: with TS, makes `fwait` raise #NM.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0.EM: legacy SSE raises #UD, x87/fxsave raise #NM.
    pub const CR0_EM: u64 = 1 << 2;
    /// CR0.TS: FPU/SSE/AVX state use raises #NM.
    pub const CR0_TS: u64 = 1 << 3;
    /// CR0.NE: native x87 error reporting (#MF instead of FERR#).
    pub const CR0_NE: u64 = 1 << 5;
    /// CR4.OSFXSR: the OS supports fxsave/fxrstor and SSE.
    pub const CR4_OSFXSR: u64 = 1 << 9;
    /// CR4.LA57: 57-bit linear addresses (five-level paging).
    pub const CR4_LA57: u64 = 1 << 12;
    /// CR4.OSXSAVE: the OS enabled XSAVE and XCR0.
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    /// EFER.FFXSR: fast fxsave/fxrstor (AMD), skips XMM in 64-bit ring 0.
    pub const EFER_FFXSR: u64 = 1 << 14;
    /// RFLAGS.CF.
    pub const RFLAGS_CF: u64 = 1 << 0;
    /// RFLAGS.PF.
    pub const RFLAGS_PF: u64 = 1 << 2;
    /// RFLAGS.AF.
    pub const RFLAGS_AF: u64 = 1 << 4;
    /// RFLAGS.ZF.
    pub const RFLAGS_ZF: u64 = 1 << 6;
    /// RFLAGS.SF.
    pub const RFLAGS_SF: u64 = 1 << 7;
    /// RFLAGS.TF.
    pub const RFLAGS_TF: u64 = 1 << 8;
    /// RFLAGS.OF.
    pub const RFLAGS_OF: u64 = 1 << 11;
    /// RFLAGS.IOPL (two bits).
    pub const RFLAGS_IOPL: u64 = 3 << 12;
    /// RFLAGS.RF: cleared when an instruction completes.
    pub const RFLAGS_RF: u64 = 1 << 16;
    /// RFLAGS.AC: the bit `clac`/`stac` change.
    pub const RFLAGS_AC: u64 = 1 << 18;
    /// MXCSR bits that may be set (DAZ supported; every CPU with SSE2 and XSAVE has it).
    pub const MXCSR_MASK: u32 = 0xffff;
    /// MXCSR after reset / in the initial SSE configuration.
    pub const MXCSR_INIT: u32 = 0x1f80;
    /// FCW in the initial x87 configuration.
    pub const FCW_INIT: u16 = 0x037f;
}

/// Execution mode of the vCPU; decides the decoder bitness and how linear addresses are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// CR0.PE = 0.
    Real,
    /// Protected mode with RFLAGS.VM = 1.
    Virtual8086,
    /// Protected mode (or compatibility mode), CS.D = 0.
    Protected16,
    /// Protected mode (or compatibility mode), CS.D = 1.
    Protected32,
    /// IA-32e mode with CS.L = 1.
    Long64,
}

impl Mode {
    /// Derives the mode from the registers KVM reports (`sregs.cr0`, `regs.rflags`,
    /// `sregs.efer`, `sregs.cs.l`, `sregs.cs.db`).
    pub fn from_state(cr0: u64, rflags: u64, efer: u64, cs_l: bool, cs_db: bool) -> Mode {
        const EFER_LMA: u64 = 1 << 10;
        const RFLAGS_VM: u64 = 1 << 17;
        if cr0 & 1 == 0 {
            Mode::Real
        } else if efer & EFER_LMA != 0 && cs_l {
            Mode::Long64
        } else if rflags & RFLAGS_VM != 0 {
            Mode::Virtual8086
        } else if cs_db {
            Mode::Protected32
        } else {
            Mode::Protected16
        }
    }

    /// Code size for the decoder: 16, 32 or 64.
    pub fn bitness(self) -> u32 {
        match self {
            Mode::Real | Mode::Virtual8086 | Mode::Protected16 => 16,
            Mode::Protected32 => 32,
            Mode::Long64 => 64,
        }
    }

    /// Number of XMM/YMM registers visible in this mode.
    pub fn vector_regs(self) -> usize {
        if self == Mode::Long64 {
            16
        } else {
            8
        }
    }
}

/// Why a guest memory access failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemFault {
    /// Inject #PF with this error code; CR2 = `address`.
    PageFault { address: u64, error_code: u32 },
    /// Inject #GP with this error code.
    GeneralProtection(u32),
    /// The access cannot be done by the backend (e.g. it hits MMIO): the emulation stops with
    /// [`crate::Outcome::Unsupported`] carrying this text.
    Unhandled(String),
}

/// x87 state as the FXSAVE image holds it (the worker converts it from/to `kvm_fpu` or the
/// legacy region of `kvm_xsave`). `Default` is the initial configuration (FNINIT state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpuState {
    pub fcw: u16,
    pub fsw: u16,
    /// Abridged tag word: bit i set = physical register i is valid (`kvm_fpu.ftwx`).
    pub ftw: u8,
    /// Last x87 opcode (11 bits).
    pub fop: u16,
    pub fip: u64,
    pub fcs: u16,
    pub fdp: u64,
    pub fds: u16,
    /// ST0..ST7 (80-bit values, little endian).
    pub st: [[u8; 10]; 8],
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            fcw: bits::FCW_INIT,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fcs: 0,
            fdp: 0,
            fds: 0,
            st: [[0; 10]; 8],
        }
    }
}

/// Where an XSAVE state component lives: CPUID.(EAX=0DH, ECX=component).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XstateComponent {
    /// Offset in the standard (non-compacted) format (CPUID EBX).
    pub offset: u32,
    /// Size in bytes (CPUID EAX).
    pub size: u32,
    /// Aligned to 64 bytes in the compacted format (CPUID ECX bit 1).
    pub align64: bool,
}

/// The AVX component (YMM_Hi128 of YMM0-15); its layout is the same on every CPU.
pub const AVX_LAYOUT: XstateComponent = XstateComponent {
    offset: 576,
    size: 256,
    align64: false,
};

/// The vCPU as seen by the emulator.
///
/// Cheap state (general registers, control registers, segment bases) uses `&self` getters.
/// Extended state (x87, SSE, AVX, XCR0, other XSAVE components) uses `&mut self` getters so an
/// implementation can fetch it from KVM lazily on first use and cache it. Setters may be
/// buffered: [`crate::emulate`] has made all its changes when it returns, and the worker writes
/// the dirty state back before resuming the vCPU.
///
/// When `emulate` returns an exception (other than the #BP of `int3`), no register has been
/// changed; memory may have been partly written by the store-type instructions (`xsave`,
/// `fxsave`), as on hardware.
pub trait Cpu {
    /// A 64-bit general register, `RAX`..=`R15` (the emulator handles sub-registers).
    fn gpr(&self, reg: Register) -> u64;
    /// Sets a 64-bit general register, `RAX`..=`R15`.
    fn set_gpr(&mut self, reg: Register, value: u64);
    fn rip(&self) -> u64;
    fn set_rip(&mut self, value: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, value: u64);
    fn mode(&self) -> Mode;
    /// Current privilege level (CS.RPL / SS.DPL).
    fn cpl(&self) -> u8;
    fn cr0(&self) -> u64;
    fn cr4(&self) -> u64;
    fn efer(&self) -> u64;
    /// Base of segment `seg` (`ES`, `CS`, `SS`, `DS`, `FS`, `GS`). In 64-bit mode the emulator
    /// only asks for FS and GS. Segment limits and rights are not checked.
    fn segment_base(&self, seg: Register) -> u64;
    /// The 8-byte descriptor `selector` names in the GDT or LDT, or None when the selector is
    /// beyond the table's limit (or the table cannot be read). Used by `verr`/`verw`; the
    /// default (no descriptor tables) makes them report "not accessible".
    fn segment_descriptor(&mut self, _selector: u16) -> Option<u64> {
        None
    }

    /// Reads guest memory at a linear address (translating through the guest page tables with
    /// the current CPL and SMAP/RFLAGS.AC rules).
    fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault>;
    /// Writes guest memory at a linear address.
    fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault>;
    /// Locked compare-exchange of `size` (8 or 16) bytes at `gva`, little endian: if memory
    /// holds `expected`, store `new`; otherwise store back the value found (so a read-only page
    /// faults either way, as on hardware). Returns the value found.
    ///
    /// The default reads then writes, which is not atomic against other vCPUs; the worker
    /// should override it with a host atomic (see [`crate::host`]) when the guest has several
    /// vCPUs.
    fn cmpxchg_mem(
        &mut self,
        gva: u64,
        size: usize,
        expected: u128,
        new: u128,
    ) -> Result<u128, MemFault> {
        let size = size.min(16);
        let mut buf = [0u8; 16];
        self.read_mem(gva, &mut buf[..size])?;
        let found = u128::from_le_bytes(buf);
        let store = if found == expected { new } else { found };
        self.write_mem(gva, &store.to_le_bytes()[..size])?;
        Ok(found)
    }

    fn xcr0(&mut self) -> u64;
    /// IA32_XSS (supervisor state components for xsaves/xrstors).
    fn xss(&mut self) -> u64 {
        0
    }
    fn mxcsr(&mut self) -> u32;
    fn set_mxcsr(&mut self, value: u32);
    /// XMM register `n` (0..16); bits 127:0 of YMMn/ZMMn.
    fn xmm(&mut self, n: usize) -> u128;
    fn set_xmm(&mut self, n: usize, value: u128);
    /// Bits 255:128 of YMM register `n` (0..16).
    fn ymm_high(&mut self, n: usize) -> u128;
    fn set_ymm_high(&mut self, n: usize, value: u128);
    fn fpu(&mut self) -> FpuState;
    fn set_fpu(&mut self, state: &FpuState);

    /// Layout of XSAVE state component `component` (>= 2) as the guest's CPUID leaf 0xD
    /// reports it, or `None` if the implementation cannot provide that component (xsave and
    /// xrstor touching it then end in `Unsupported`). The default knows only AVX;
    /// [`crate::host::xstate_layout`] reads the host's CPUID.
    fn xstate_layout(&self, component: u32) -> Option<XstateComponent> {
        (component == 2).then_some(AVX_LAYOUT)
    }
    /// Raw contents (`layout.size` bytes, standard-format layout, as in `kvm_xsave`) of a
    /// component >= 3 for which [`Cpu::xstate_layout`] returned `Some`. Return the initial
    /// configuration (zeros) for a component not in use.
    fn xstate_component(&mut self, _component: u32) -> Vec<u8> {
        Vec::new()
    }
    /// Replaces the contents of a component >= 3 (`layout.size` bytes).
    fn set_xstate_component(&mut self, _component: u32, _data: &[u8]) {}
}
