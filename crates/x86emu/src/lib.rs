//! `x86emu`: emulation of the few x86 instructions that the host's KVM instruction emulator
//! cannot execute.
//!
//! On our nested KVM, guest ring-0 code runs in KVM's instruction emulator. When that emulator
//! meets an instruction it does not know, `KVM_RUN` returns `KVM_EXIT_INTERNAL_ERROR` with the
//! emulation suberror and the instruction bytes. The worker then calls [`emulate`] with those
//! bytes and an implementation of [`Cpu`] over the vCPU; the result says whether the
//! instruction was carried out (RIP advanced), raised an exception the worker must inject, or
//! is not supported (the worker stops the VM with the message).
//!
//! Covered: `int3`, `clac`/`stac`, `popcnt`, `fwait`, `ldmxcsr`/`stmxcsr` (also VEX), the
//! common SSE data moves (movd/movq/movdqa/movdqu/movaps/movups/movapd/movupd/movss/movsd/
//! movlps/movhps/movhlps/movlhps/movnt*/lddqu) and bitwise logic (pxor/xorps/por/pand/...),
//! their VEX forms plus `vzeroupper`/`vzeroall`, `movnti`, `cmpxchg8b`/`cmpxchg16b`,
//! `fxsave`/`fxrstor`, `xsave`/`xsaveopt`/`xsavec`/`xsaves` and `xrstor`/`xrstors`
//! (standard and compacted forms, any state component the [`Cpu`] can provide).
//!
//! Talks to: nothing but the [`Cpu`] trait (registers, guest memory by linear address). The
//! decoder is `iced-x86`; the semantics (faults, flags, XSAVE-area layout) are hand-written here
//! from the Intel SDM. General emulators (Unicorn through C bindings, the emulators inside other
//! VMMs) run code on their own CPU model; what is needed here is one instruction applied to a
//! live vCPU behind a trait, with the vCPU's control registers deciding the faults, and only
//! for the few instructions KVM lacks — smaller to write than to adapt.
//!
//! Must never: depend on KVM, touch guest memory except through [`Cpu`], or panic on any byte
//! sequence or guest-controlled value (instruction bytes, XSAVE headers, EDX:EAX masks are all
//! hostile). Anything it does not model exactly ends in [`Outcome::Unsupported`] with no
//! register changed.
//!
//! Not modelled: segment limits and access rights, alignment-check (#AC), RFLAGS.TF
//! single-step traps after an emulated instruction, CPUID feature bits (an instruction the
//! guest's CPUID hides is still emulated), VME redirection of `int3`.

mod basic;
mod cpu;
pub mod host;
mod outcome;
mod sse;
mod xsave;

pub use cpu::{bits, Cpu, FpuState, MemFault, Mode, XstateComponent, AVX_LAYOUT};
pub use outcome::{Exception, Kind, Outcome, QuirkCounters};

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FastFormatter, Instruction, OpKind, Register,
};

/// Longest x86 instruction.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// Why the emulation of one instruction stopped early.
pub(crate) enum Stop {
    Exception(Exception),
    Unsupported(String),
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Stop::Exception(e)
    }
}

pub(crate) type Res<T> = Result<T, Stop>;

pub(crate) fn ud() -> Stop {
    Stop::Exception(Exception::new(Exception::UD))
}

pub(crate) fn nm() -> Stop {
    Stop::Exception(Exception::new(Exception::NM))
}

pub(crate) fn gp0() -> Stop {
    Stop::Exception(Exception::with_code(Exception::GP, 0))
}

/// Emulates the first instruction in `bytes` (the bytes at RIP, as KVM reports them; more than
/// one instruction may be present) on `cpu`.
pub fn emulate<C: Cpu + ?Sized>(cpu: &mut C, bytes: &[u8]) -> Outcome {
    let bytes = &bytes[..bytes.len().min(MAX_INSTRUCTION_LEN)];
    let mode = cpu.mode();
    let rip = cpu.rip();
    let mut decoder = Decoder::with_ip(mode.bitness(), bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return invalid(bytes, mode, rip, decoder.last_error());
    }
    let Some(kind) = classify(instr.code()) else {
        return Outcome::Unsupported(format!("no emulation for {}", describe(&instr, bytes)));
    };
    if instr.has_lock_prefix() && !matches!(kind, Kind::Cmpxchg8b | Kind::Cmpxchg16b) {
        return Outcome::Exception {
            kind,
            exception: Exception::new(Exception::UD),
        };
    }
    let next_ip = match mode.bitness() {
        64 => instr.next_ip(),
        32 => instr.next_ip() & 0xffff_ffff,
        _ => instr.next_ip() & 0xffff,
    };
    let mut ctx = Ctx {
        cpu,
        instr: &instr,
        mode,
    };
    let result = match kind {
        Kind::SseMove | Kind::SseLogic | Kind::AvxMove => sse::exec(&mut ctx, kind),
        Kind::Fxsave
        | Kind::Fxrstor
        | Kind::Xsave
        | Kind::Xsaveopt
        | Kind::Xsavec
        | Kind::Xsaves
        | Kind::Xrstor
        | Kind::Xrstors => xsave::exec(&mut ctx, kind),
        _ => basic::exec(&mut ctx, kind),
    };
    match result {
        Ok(()) => {
            finish(cpu, next_ip);
            Outcome::Done(kind)
        }
        Err(Stop::Exception(exception)) => {
            if exception.is_software() {
                finish(cpu, next_ip);
            }
            Outcome::Exception { kind, exception }
        }
        Err(Stop::Unsupported(why)) => {
            Outcome::Unsupported(format!("{}: {why}", describe(&instr, bytes)))
        }
    }
}

/// Completes an instruction: RIP past it, RFLAGS.RF cleared.
fn finish<C: Cpu + ?Sized>(cpu: &mut C, next_ip: u64) {
    cpu.set_rip(next_ip);
    let rflags = cpu.rflags();
    if rflags & bits::RFLAGS_RF != 0 {
        cpu.set_rflags(rflags & !bits::RFLAGS_RF);
    }
}

/// Bytes iced refuses. A recognised instruction with a LOCK prefix it does not allow raises
/// #UD as on hardware; everything else is reported.
fn invalid(bytes: &[u8], mode: Mode, rip: u64, error: DecoderError) -> Outcome {
    let hex = hex(bytes);
    if error == DecoderError::NoMoreBytes {
        return Outcome::Unsupported(format!("truncated instruction at {rip:#x} (bytes {hex})"));
    }
    let mut relaxed =
        Decoder::with_ip(mode.bitness(), bytes, rip, DecoderOptions::NO_INVALID_CHECK);
    let instr = relaxed.decode();
    if !instr.is_invalid() && instr.has_lock_prefix() {
        if let Some(kind) = classify(instr.code()) {
            return Outcome::Exception {
                kind,
                exception: Exception::new(Exception::UD),
            };
        }
    }
    Outcome::Unsupported(format!(
        "invalid instruction encoding at {rip:#x} (bytes {hex})"
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `` `vpaddd ymm0,ymm1,[rax]` at 0x1000 (bytes c5 f5 fe 00) ``
fn describe(instr: &Instruction, bytes: &[u8]) -> String {
    let mut text = String::new();
    FastFormatter::new().format(instr, &mut text);
    let len = instr.len().min(bytes.len());
    format!(
        "`{text}` at {:#x} (bytes {})",
        instr.ip(),
        hex(&bytes[..len])
    )
}

/// Maps an iced code to the instruction class that emulates it.
pub(crate) fn classify(code: Code) -> Option<Kind> {
    use Code::*;
    Some(match code {
        Int3 => Kind::Int3,
        Clac => Kind::Clac,
        Stac => Kind::Stac,
        Popcnt_r16_rm16 | Popcnt_r32_rm32 | Popcnt_r64_rm64 => Kind::Popcnt,
        Wait => Kind::Fwait,
        Ldmxcsr_m32 | VEX_Vldmxcsr_m32 => Kind::Ldmxcsr,
        Stmxcsr_m32 | VEX_Vstmxcsr_m32 => Kind::Stmxcsr,
        Movnti_m32_r32 | Movnti_m64_r64 => Kind::Movnti,
        Cmpxchg8b_m64 => Kind::Cmpxchg8b,
        Cmpxchg16b_m128 => Kind::Cmpxchg16b,
        Fxsave_m512byte | Fxsave64_m512byte => Kind::Fxsave,
        Fxrstor_m512byte | Fxrstor64_m512byte => Kind::Fxrstor,
        Xsave_mem | Xsave64_mem => Kind::Xsave,
        Xsaveopt_mem | Xsaveopt64_mem => Kind::Xsaveopt,
        Xsavec_mem | Xsavec64_mem => Kind::Xsavec,
        Xsaves_mem | Xsaves64_mem => Kind::Xsaves,
        Xrstor_mem | Xrstor64_mem => Kind::Xrstor,
        Xrstors_mem | Xrstors64_mem => Kind::Xrstors,
        Xgetbv => Kind::Xgetbv,
        Verr_rm16 | Verr_r32m16 | Verr_r64m16 => Kind::Verr,
        Verw_rm16 | Verw_r32m16 | Verw_r64m16 => Kind::Verw,
        other => return sse::classify(other),
    })
}

/// One instruction being emulated.
pub(crate) struct Ctx<'a, C: Cpu + ?Sized> {
    pub cpu: &'a mut C,
    pub instr: &'a Instruction,
    pub mode: Mode,
}

impl<C: Cpu + ?Sized> Ctx<'_, C> {
    pub fn is_mem(&self, op: u32) -> bool {
        self.instr.op_kind(op) == OpKind::Memory
    }

    /// The register operand `op` (Register::None if it is not a register).
    pub fn reg(&self, op: u32) -> Register {
        if self.instr.op_kind(op) == OpKind::Register {
            self.instr.op_register(op)
        } else {
            Register::None
        }
    }

    pub fn read_gpr(&self, reg: Register) -> u64 {
        read_gpr(&*self.cpu, reg)
    }

    /// Writes a general register with x86 rules: 32-bit writes zero-extend, 8/16-bit merge.
    pub fn write_gpr(&mut self, reg: Register, value: u64) {
        let full = reg.full_register();
        let old = self.cpu.gpr(full);
        let new = match reg.size() {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (old & !0xffff) | (value & 0xffff),
            _ if is_high_byte(reg) => (old & !0xff00) | ((value & 0xff) << 8),
            _ => (old & !0xff) | (value & 0xff),
        };
        self.cpu.set_gpr(full, new);
    }

    /// Linear address of memory operand `op` (segment base included), checked for alignment
    /// (`align` bytes, #GP(0)) and, in 64-bit mode, canonical form over `len` bytes.
    pub fn mem_addr(&mut self, op: u32, len: u64, align: u64) -> Res<u64> {
        if self.instr.op_kind(op) != OpKind::Memory {
            return Err(Stop::Unsupported(format!(
                "operand {op} is not a memory operand"
            )));
        }
        let long = self.mode == Mode::Long64;
        let cpu = &*self.cpu;
        let linear = self.instr.virtual_address(op, 0, |reg, _, _| {
            Some(match reg {
                Register::ES | Register::CS | Register::SS | Register::DS if long => 0,
                Register::ES
                | Register::CS
                | Register::SS
                | Register::DS
                | Register::FS
                | Register::GS => cpu.segment_base(reg),
                r if r.is_gpr() => read_gpr(cpu, r),
                _ => return None,
            })
        });
        let Some(mut linear) = linear else {
            return Err(Stop::Unsupported(
                "cannot compute the memory operand's address".into(),
            ));
        };
        if !long {
            linear &= 0xffff_ffff;
        }
        if align > 1 && linear % align != 0 {
            return Err(gp0());
        }
        if long {
            let la57 = self.cpu.cr4() & bits::CR4_LA57 != 0;
            let last = linear.checked_add(len.saturating_sub(1));
            let ok = match last {
                Some(last) => canonical(linear, la57) && canonical(last, la57),
                None => false,
            };
            if !ok {
                let vector = if self.instr.memory_segment() == Register::SS {
                    Exception::SS
                } else {
                    Exception::GP
                };
                return Err(Exception::with_code(vector, 0).into());
            }
        }
        Ok(linear)
    }

    pub fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Res<()> {
        self.cpu.read_mem(gva, buf).map_err(mem_fault)
    }

    pub fn write_mem(&mut self, gva: u64, data: &[u8]) -> Res<()> {
        self.cpu.write_mem(gva, data).map_err(mem_fault)
    }

    /// Reads `len` (<= 16) bytes of memory operand `op`, little endian, alignment `align`.
    pub fn load_mem(&mut self, op: u32, len: usize, align: u64) -> Res<u128> {
        let len = len.min(16);
        let addr = self.mem_addr(op, len as u64, align)?;
        let mut buf = [0u8; 16];
        self.read_mem(addr, &mut buf[..len])?;
        Ok(u128::from_le_bytes(buf))
    }

    /// Writes the low `len` (<= 16) bytes of `value` to memory operand `op`.
    pub fn store_mem(&mut self, op: u32, len: usize, align: u64, value: u128) -> Res<()> {
        let len = len.min(16);
        let addr = self.mem_addr(op, len as u64, align)?;
        self.write_mem(addr, &value.to_le_bytes()[..len])
    }

    /// Legacy SSE: #UD if CR0.EM or !CR4.OSFXSR, #NM if CR0.TS.
    pub fn check_sse(&mut self) -> Res<()> {
        if self.cpu.cr0() & bits::CR0_EM != 0 || self.cpu.cr4() & bits::CR4_OSFXSR == 0 {
            return Err(ud());
        }
        if self.cpu.cr0() & bits::CR0_TS != 0 {
            return Err(nm());
        }
        Ok(())
    }

    /// VEX: #UD in real/virtual-8086 mode, without CR4.OSXSAVE or XCR0.SSE+AVX; #NM if CR0.TS.
    pub fn check_avx(&mut self) -> Res<()> {
        if matches!(self.mode, Mode::Real | Mode::Virtual8086)
            || self.cpu.cr4() & bits::CR4_OSXSAVE == 0
            || self.cpu.xcr0() & 6 != 6
        {
            return Err(ud());
        }
        if self.cpu.cr0() & bits::CR0_TS != 0 {
            return Err(nm());
        }
        Ok(())
    }
}

pub(crate) fn mem_fault(fault: MemFault) -> Stop {
    match fault {
        MemFault::PageFault {
            address,
            error_code,
        } => Stop::Exception(Exception {
            vector: Exception::PF,
            error_code: Some(error_code),
            cr2: Some(address),
        }),
        MemFault::GeneralProtection(code) => {
            Stop::Exception(Exception::with_code(Exception::GP, code))
        }
        MemFault::Unhandled(why) => Stop::Unsupported(why),
    }
}

fn canonical(addr: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

/// Value of any general register (sub-registers included) through the 64-bit accessor.
fn read_gpr<C: Cpu + ?Sized>(cpu: &C, reg: Register) -> u64 {
    let value = cpu.gpr(reg.full_register());
    match reg.size() {
        8 => value,
        4 => value & 0xffff_ffff,
        2 => value & 0xffff,
        _ if is_high_byte(reg) => (value >> 8) & 0xff,
        _ => value & 0xff,
    }
}
