//! A plain-struct [`Cpu`] for the tests, with paged memory that can fault.
#![allow(dead_code)]

use iced_x86::{Decoder, DecoderOptions, FastFormatter, Register};
use std::collections::{BTreeMap, BTreeSet};
use x86emu::{emulate, Cpu, FpuState, MemFault, Mode, Outcome, XstateComponent, AVX_LAYOUT};

pub const PAGE: u64 = 4096;

/// Intel's standard-format layout for the AVX-512 and PKRU components.
pub fn intel_layouts() -> BTreeMap<u32, XstateComponent> {
    let l = |offset, size| XstateComponent {
        offset,
        size,
        align64: false,
    };
    BTreeMap::from([
        (2, AVX_LAYOUT),
        (5, l(1088, 64)),
        (6, l(1152, 512)),
        (7, l(1664, 1024)),
        (9, l(2688, 8)),
    ])
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockCpu {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub mode: Mode,
    pub cpl: u8,
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [u64; 6],
    pub xcr0: u64,
    pub xss: u64,
    pub mxcsr: u32,
    pub xmm: [u128; 16],
    pub ymmh: [u128; 16],
    pub fpu: FpuState,
    pub layouts: BTreeMap<u32, XstateComponent>,
    pub other: BTreeMap<u32, Vec<u8>>,
    pub pages: BTreeMap<u64, Vec<u8>>,
    pub readonly: BTreeSet<u64>,
    /// Pages that behave like MMIO (the backend cannot do the access).
    pub mmio: BTreeSet<u64>,
    /// GDT entries by index (for verr/verw).
    pub gdt: BTreeMap<u16, u64>,
}

impl MockCpu {
    /// 64-bit ring 0 with paging, SSE, XSAVE (x87|SSE|AVX) enabled.
    pub fn new() -> Self {
        MockCpu {
            gpr: [0; 16],
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x2,
            mode: Mode::Long64,
            cpl: 0,
            cr0: 0x8005_0033,
            cr4: 0x0004_06a0,
            efer: 0xd01,
            seg: [0; 6],
            xcr0: 0x7,
            xss: 0,
            mxcsr: 0x1f80,
            xmm: [0; 16],
            ymmh: [0; 16],
            fpu: FpuState::default(),
            gdt: BTreeMap::new(),
            layouts: BTreeMap::from([(2, AVX_LAYOUT)]),
            other: BTreeMap::new(),
            pages: BTreeMap::new(),
            readonly: BTreeSet::new(),
            mmio: BTreeSet::new(),
        }
    }

    pub fn with_avx512(mut self) -> Self {
        self.layouts = intel_layouts();
        self.xcr0 = 0x2e7;
        self
    }

    /// Maps zeroed pages covering `addr..addr+len`.
    pub fn map(&mut self, addr: u64, len: u64) {
        let first = addr / PAGE;
        let last = (addr + len.max(1) - 1) / PAGE;
        for p in first..=last {
            self.pages
                .entry(p)
                .or_insert_with(|| vec![0; PAGE as usize]);
        }
    }

    pub fn set(&mut self, reg: Register, v: u64) {
        self.gpr[reg.number()] = v;
    }

    pub fn get(&self, reg: Register) -> u64 {
        self.gpr[reg.number()]
    }

    pub fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let a = addr + i;
                self.pages.get(&(a / PAGE)).expect("peek at unmapped page")[(a % PAGE) as usize]
            })
            .collect()
    }

    pub fn poke(&mut self, addr: u64, data: &[u8]) {
        self.map(addr, data.len() as u64);
        for (i, b) in data.iter().enumerate() {
            let a = addr + i as u64;
            self.pages.get_mut(&(a / PAGE)).unwrap()[(a % PAGE) as usize] = *b;
        }
    }

    pub fn peek_u128(&self, addr: u64) -> u128 {
        u128::from_le_bytes(self.peek(addr, 16).try_into().unwrap())
    }

    pub fn peek_u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.peek(addr, 8).try_into().unwrap())
    }

    pub fn peek_u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.peek(addr, 4).try_into().unwrap())
    }

    fn check(&self, gva: u64, len: usize, write: bool) -> Result<(), MemFault> {
        for i in 0..len as u64 {
            let a = gva.wrapping_add(i);
            let page = a / PAGE;
            let user = if self.cpl == 3 { 4 } else { 0 };
            let w = if write { 2 } else { 0 };
            if self.mmio.contains(&page) {
                return Err(MemFault::Unhandled(format!("MMIO access at {a:#x}")));
            }
            if !self.pages.contains_key(&page) {
                return Err(MemFault::PageFault {
                    address: a,
                    error_code: user | w,
                });
            }
            if write && self.readonly.contains(&page) {
                return Err(MemFault::PageFault {
                    address: a,
                    error_code: 1 | user | w,
                });
            }
        }
        Ok(())
    }

    /// Emulates `bytes` at the current RIP.
    pub fn run(&mut self, bytes: &[u8]) -> Outcome {
        emulate(self, bytes)
    }
}

impl Default for MockCpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpu for MockCpu {
    fn gpr(&self, reg: Register) -> u64 {
        assert!(reg.is_gpr64(), "gpr() called with {reg:?}");
        self.gpr[reg.number()]
    }
    fn set_gpr(&mut self, reg: Register, value: u64) {
        assert!(reg.is_gpr64(), "set_gpr() called with {reg:?}");
        self.gpr[reg.number()] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, value: u64) {
        self.rip = value;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, value: u64) {
        self.rflags = value;
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn segment_descriptor(&mut self, selector: u16) -> Option<u64> {
        self.gdt.get(&(selector >> 3)).copied()
    }
    fn cpl(&self) -> u8 {
        self.cpl
    }
    fn cr0(&self) -> u64 {
        self.cr0
    }
    fn cr4(&self) -> u64 {
        self.cr4
    }
    fn efer(&self) -> u64 {
        self.efer
    }
    fn segment_base(&self, seg: Register) -> u64 {
        let i = match seg {
            Register::ES => 0,
            Register::CS => 1,
            Register::SS => 2,
            Register::DS => 3,
            Register::FS => 4,
            Register::GS => 5,
            other => panic!("segment_base({other:?})"),
        };
        self.seg[i]
    }
    fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        self.check(gva, buf.len(), false)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gva.wrapping_add(i as u64);
            *b = self.pages[&(a / PAGE)][(a % PAGE) as usize];
        }
        Ok(())
    }
    fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
        self.check(gva, data.len(), true)?;
        for (i, b) in data.iter().enumerate() {
            let a = gva.wrapping_add(i as u64);
            self.pages.get_mut(&(a / PAGE)).unwrap()[(a % PAGE) as usize] = *b;
        }
        Ok(())
    }
    fn xcr0(&mut self) -> u64 {
        self.xcr0
    }
    fn xss(&mut self) -> u64 {
        self.xss
    }
    fn mxcsr(&mut self) -> u32 {
        self.mxcsr
    }
    fn set_mxcsr(&mut self, value: u32) {
        self.mxcsr = value;
    }
    fn xmm(&mut self, n: usize) -> u128 {
        self.xmm[n]
    }
    fn set_xmm(&mut self, n: usize, value: u128) {
        self.xmm[n] = value;
    }
    fn ymm_high(&mut self, n: usize) -> u128 {
        self.ymmh[n]
    }
    fn set_ymm_high(&mut self, n: usize, value: u128) {
        self.ymmh[n] = value;
    }
    fn fpu(&mut self) -> FpuState {
        self.fpu
    }
    fn set_fpu(&mut self, state: &FpuState) {
        self.fpu = *state;
    }
    fn xstate_layout(&self, component: u32) -> Option<XstateComponent> {
        self.layouts.get(&component).copied()
    }
    fn xstate_component(&mut self, component: u32) -> Vec<u8> {
        let size = self.layouts[&component].size as usize;
        self.other
            .get(&component)
            .cloned()
            .unwrap_or_else(|| vec![0; size])
    }
    fn set_xstate_component(&mut self, component: u32, data: &[u8]) {
        assert_eq!(data.len(), self.layouts[&component].size as usize);
        self.other.insert(component, data.to_vec());
    }
}

/// Parses hex bytes and checks that they decode (at `bitness`) to `expect`, so a typo in a
/// test encoding cannot silently test something else.
pub fn insn(bitness: u32, hex: &str, expect: &str) -> Vec<u8> {
    let bytes: Vec<u8> = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let mut d = Decoder::new(bitness, &bytes, DecoderOptions::NONE);
    let i = d.decode();
    let mut text = String::new();
    FastFormatter::new().format(&i, &mut text);
    assert_eq!(text, expect, "encoding {hex}");
    assert_eq!(i.len(), bytes.len(), "length of {hex}");
    bytes
}

pub fn i64(hex: &str, expect: &str) -> Vec<u8> {
    insn(64, hex, expect)
}

/// Small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}
