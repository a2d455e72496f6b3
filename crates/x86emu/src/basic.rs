//! The small instructions: int3, clac/stac, popcnt, fwait, ldmxcsr/stmxcsr, movnti,
//! cmpxchg8b/cmpxchg16b.

use crate::bits::*;
use crate::{gp0, mem_fault, nm, ud, Cpu, Ctx, Exception, Kind, MemFault, Mode, Res, Stop};

/// Page-fault error code: the access was a write.
const PF_WRITE: u32 = 1 << 1;
use iced_x86::{Code, Register};

pub(crate) fn exec<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, kind: Kind) -> Res<()> {
    match kind {
        Kind::Int3 => int3(ctx),
        Kind::Clac => set_ac(ctx, false),
        Kind::Stac => set_ac(ctx, true),
        Kind::Popcnt => popcnt(ctx),
        Kind::Fwait => fwait(ctx),
        Kind::Ldmxcsr => ldmxcsr(ctx),
        Kind::Stmxcsr => stmxcsr(ctx),
        Kind::Movnti => {
            let src = ctx.reg(1);
            let value = ctx.read_gpr(src);
            ctx.store_mem(0, src.size(), 1, value as u128)
        }
        Kind::Cmpxchg8b => cmpxchg(ctx, 8),
        Kind::Cmpxchg16b => cmpxchg(ctx, 16),
        Kind::Xgetbv => xgetbv(ctx),
        Kind::Verr => verify_segment(ctx, false),
        Kind::Verw => verify_segment(ctx, true),
        other => Err(Stop::Unsupported(format!(
            "{other} is not a basic instruction"
        ))),
    }
}

/// XGETBV: EDX:EAX = XCR[ECX]. Only XCR0 exists here (XINUSE is not modelled); #UD without
/// CR4.OSXSAVE, #GP(0) for any other XCR.
fn xgetbv<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    if ctx.cpu.cr4() & CR4_OSXSAVE == 0 {
        return Err(ud());
    }
    if ctx.cpu.gpr(Register::RCX) as u32 != 0 {
        return Err(gp0());
    }
    let v = ctx.cpu.xcr0();
    ctx.cpu.set_gpr(Register::RAX, v & 0xffff_ffff);
    ctx.cpu.set_gpr(Register::RDX, v >> 32);
    Ok(())
}

/// VERR/VERW: ZF = 1 if the segment the 16-bit operand selects is readable (writable) at the
/// current privilege level, else 0. Only ZF changes. (On the CPU VERW also clears
/// microarchitectural buffers — Linux's MDS mitigation runs it for that alone; that side
/// effect is the host's, not the guest-visible architecture's.) #UD in real and virtual-8086
/// mode.
fn verify_segment<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, write: bool) -> Res<()> {
    if matches!(ctx.mode, Mode::Real | Mode::Virtual8086) {
        return Err(ud());
    }
    let selector = if ctx.is_mem(0) {
        ctx.load_mem(0, 2, 1)? as u16
    } else {
        ctx.read_gpr(ctx.reg(0)) as u16
    };
    let ok = selector & !3 != 0
        && match ctx.cpu.segment_descriptor(selector) {
            None => false,
            Some(d) => {
                let present = d & (1 << 47) != 0;
                let system = d & (1 << 44) == 0;
                let ty = (d >> 40) & 0xf;
                let dpl = ((d >> 45) & 3) as u8;
                let code = ty & 0x8 != 0;
                let conforming = code && ty & 0x4 != 0;
                let priv_ok = conforming || dpl >= ctx.cpu.cpl().max((selector & 3) as u8);
                let access_ok = if write {
                    !code && ty & 0x2 != 0
                } else {
                    !code || ty & 0x2 != 0
                };
                present && !system && priv_ok && access_ok
            }
        };
    let f = ctx.cpu.rflags() & !RFLAGS_ZF;
    ctx.cpu.set_rflags(if ok { f | RFLAGS_ZF } else { f });
    Ok(())
}

/// #BP as a software exception; the caller advances RIP first.
fn int3<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    if ctx.mode == Mode::Virtual8086 && ctx.cpu.rflags() & RFLAGS_IOPL != RFLAGS_IOPL {
        return Err(gp0());
    }
    Err(Exception::new(Exception::BP).into())
}

/// clac/stac: #UD in virtual-8086 mode and at CPL > 0 in protected mode.
fn set_ac<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, set: bool) -> Res<()> {
    match ctx.mode {
        Mode::Virtual8086 => return Err(ud()),
        Mode::Real => {}
        _ if ctx.cpu.cpl() > 0 => return Err(ud()),
        _ => {}
    }
    let rflags = ctx.cpu.rflags();
    let new = if set {
        rflags | RFLAGS_AC
    } else {
        rflags & !RFLAGS_AC
    };
    ctx.cpu.set_rflags(new);
    Ok(())
}

/// popcnt: ZF = (source == 0); OF, SF, AF, CF, PF cleared.
fn popcnt<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    let dst = ctx.reg(0);
    let size = dst.size();
    let src = if ctx.is_mem(1) {
        ctx.load_mem(1, size, 1)? as u64
    } else {
        ctx.read_gpr(ctx.reg(1))
    };
    ctx.write_gpr(dst, u64::from(src.count_ones()));
    let mut rflags =
        ctx.cpu.rflags() & !(RFLAGS_OF | RFLAGS_SF | RFLAGS_ZF | RFLAGS_AF | RFLAGS_CF | RFLAGS_PF);
    if src == 0 {
        rflags |= RFLAGS_ZF;
    }
    ctx.cpu.set_rflags(rflags);
    Ok(())
}

/// fwait: #NM if CR0.MP and CR0.TS; #MF if an unmasked x87 exception is pending (FSW.ES).
fn fwait<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    let cr0 = ctx.cpu.cr0();
    if cr0 & CR0_MP != 0 && cr0 & CR0_TS != 0 {
        return Err(nm());
    }
    const FSW_ES: u16 = 1 << 7;
    if ctx.cpu.fpu().fsw & FSW_ES != 0 {
        if cr0 & CR0_NE != 0 {
            return Err(Exception::new(Exception::MF).into());
        }
        return Err(Stop::Unsupported(
            "pending x87 exception with CR0.NE=0 (FERR#/IRQ13 is not modelled)".into(),
        ));
    }
    Ok(())
}

fn check_mxcsr_access<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    if matches!(
        ctx.instr.code(),
        Code::VEX_Vldmxcsr_m32 | Code::VEX_Vstmxcsr_m32
    ) {
        ctx.check_avx()
    } else {
        ctx.check_sse()
    }
}

/// ldmxcsr: #GP(0) if the new value sets a reserved bit.
fn ldmxcsr<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    check_mxcsr_access(ctx)?;
    let value = ctx.load_mem(0, 4, 1)? as u32;
    if value & !MXCSR_MASK != 0 {
        return Err(gp0());
    }
    ctx.cpu.set_mxcsr(value);
    Ok(())
}

fn stmxcsr<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    check_mxcsr_access(ctx)?;
    let value = ctx.cpu.mxcsr();
    ctx.store_mem(0, 4, 1, u128::from(value))
}

/// cmpxchg8b (EDX:EAX vs m64, ECX:EBX stored) and cmpxchg16b (RDX:RAX vs m128, RCX:RBX
/// stored, 16-byte alignment or #GP(0)). Only ZF changes among the flags.
fn cmpxchg<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, size: usize) -> Res<()> {
    let half = size * 4; // bits per half
    let mask = if size == 8 {
        u128::from(u32::MAX)
    } else {
        u128::from(u64::MAX)
    };
    let align = if size == 16 { 16 } else { 1 };
    let addr = ctx.mem_addr(0, size as u64, align)?;
    let gpr = |ctx: &Ctx<'_, C>, r| u128::from(ctx.cpu.gpr(r)) & mask;
    let expected = (gpr(ctx, Register::RDX) << half) | gpr(ctx, Register::RAX);
    let new = (gpr(ctx, Register::RCX) << half) | gpr(ctx, Register::RBX);
    let found = ctx
        .cpu
        .cmpxchg_mem(addr, size, expected, new)
        .map_err(|fault| match fault {
            // A locked read-modify-write is a write access for paging, even if the backend
            // failed on its read.
            MemFault::PageFault {
                address,
                error_code,
            } => mem_fault(MemFault::PageFault {
                address,
                error_code: error_code | PF_WRITE,
            }),
            other => mem_fault(other),
        })?;
    let found = if size == 8 {
        found & u128::from(u64::MAX)
    } else {
        found
    };
    let rflags = ctx.cpu.rflags();
    if found == expected {
        ctx.cpu.set_rflags(rflags | RFLAGS_ZF);
    } else {
        ctx.cpu.set_rflags(rflags & !RFLAGS_ZF);
        let (lo, hi) = ((found & mask) as u64, ((found >> half) & mask) as u64);
        // 32-bit register writes zero-extend, like the hardware's EDX:EAX load.
        ctx.cpu.set_gpr(Register::RAX, lo);
        ctx.cpu.set_gpr(Register::RDX, hi);
    }
    Ok(())
}
