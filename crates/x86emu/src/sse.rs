//! SSE and AVX data moves and bitwise logic.
//!
//! Legacy-SSE writes to an XMM register leave bits 255:128 (and above) untouched; VEX writes
//! zero every bit above the written width, up to bit 511 of ZMM0-15 when AVX-512 state is
//! enabled in XCR0.

use crate::{Cpu, Ctx, Kind, Res, Stop};
use iced_x86::{Code, Register};

const LOW64: u128 = u64::MAX as u128;
const HIGH64: u128 = !LOW64;
const LOW32: u128 = u32::MAX as u128;

/// XCR0 bit of the ZMM_Hi256 component (bits 511:256 of ZMM0-15).
const ZMM_HI256: u32 = 6;

pub(crate) fn classify(code: Code) -> Option<Kind> {
    use Code::*;
    Some(match code {
        Movaps_xmm_xmmm128 | Movaps_xmmm128_xmm | Movapd_xmm_xmmm128 | Movapd_xmmm128_xmm
        | Movdqa_xmm_xmmm128 | Movdqa_xmmm128_xmm | Movups_xmm_xmmm128 | Movups_xmmm128_xmm
        | Movupd_xmm_xmmm128 | Movupd_xmmm128_xmm | Movdqu_xmm_xmmm128 | Movdqu_xmmm128_xmm
        | Movntps_m128_xmm | Movntpd_m128_xmm | Movntdq_m128_xmm | Movntdqa_xmm_m128
        | Lddqu_xmm_m128 | Movd_xmm_rm32 | Movq_xmm_rm64 | Movd_rm32_xmm | Movq_rm64_xmm
        | Movq_xmm_xmmm64 | Movq_xmmm64_xmm | Movss_xmm_xmmm32 | Movss_xmmm32_xmm
        | Movsd_xmm_xmmm64 | Movsd_xmmm64_xmm | Movlps_xmm_m64 | Movlpd_xmm_m64
        | Movlps_m64_xmm | Movlpd_m64_xmm | Movhps_xmm_m64 | Movhpd_xmm_m64 | Movhps_m64_xmm
        | Movhpd_m64_xmm | Movhlps_xmm_xmm | Movlhps_xmm_xmm => Kind::SseMove,
        Pxor_xmm_xmmm128 | Xorps_xmm_xmmm128 | Xorpd_xmm_xmmm128 | Por_xmm_xmmm128
        | Orps_xmm_xmmm128 | Orpd_xmm_xmmm128 | Pand_xmm_xmmm128 | Andps_xmm_xmmm128
        | Andpd_xmm_xmmm128 | Pandn_xmm_xmmm128 | Andnps_xmm_xmmm128 | Andnpd_xmm_xmmm128 => {
            Kind::SseLogic
        }
        c if vex_move(c).is_some() => Kind::AvxMove,
        VEX_Vmovd_xmm_rm32
        | VEX_Vmovq_xmm_rm64
        | VEX_Vmovd_rm32_xmm
        | VEX_Vmovq_rm64_xmm
        | VEX_Vmovq_xmm_xmmm64
        | VEX_Vmovq_xmmm64_xmm
        | VEX_Vpxor_xmm_xmm_xmmm128
        | VEX_Vpxor_ymm_ymm_ymmm256
        | VEX_Vxorps_xmm_xmm_xmmm128
        | VEX_Vxorps_ymm_ymm_ymmm256
        | VEX_Vxorpd_xmm_xmm_xmmm128
        | VEX_Vxorpd_ymm_ymm_ymmm256
        | VEX_Vzeroupper
        | VEX_Vzeroall => Kind::AvxMove,
        _ => return None,
    })
}

/// VEX full-width copies: (width in bytes, alignment required).
fn vex_move(code: Code) -> Option<(usize, u64)> {
    use Code::*;
    Some(match code {
        VEX_Vmovaps_xmm_xmmm128
        | VEX_Vmovaps_xmmm128_xmm
        | VEX_Vmovapd_xmm_xmmm128
        | VEX_Vmovapd_xmmm128_xmm
        | VEX_Vmovdqa_xmm_xmmm128
        | VEX_Vmovdqa_xmmm128_xmm
        | VEX_Vmovntps_m128_xmm
        | VEX_Vmovntpd_m128_xmm
        | VEX_Vmovntdq_m128_xmm
        | VEX_Vmovntdqa_xmm_m128 => (16, 16),
        VEX_Vmovaps_ymm_ymmm256
        | VEX_Vmovaps_ymmm256_ymm
        | VEX_Vmovapd_ymm_ymmm256
        | VEX_Vmovapd_ymmm256_ymm
        | VEX_Vmovdqa_ymm_ymmm256
        | VEX_Vmovdqa_ymmm256_ymm
        | VEX_Vmovntps_m256_ymm
        | VEX_Vmovntpd_m256_ymm
        | VEX_Vmovntdq_m256_ymm
        | VEX_Vmovntdqa_ymm_m256 => (32, 32),
        VEX_Vmovups_xmm_xmmm128
        | VEX_Vmovups_xmmm128_xmm
        | VEX_Vmovupd_xmm_xmmm128
        | VEX_Vmovupd_xmmm128_xmm
        | VEX_Vmovdqu_xmm_xmmm128
        | VEX_Vmovdqu_xmmm128_xmm
        | VEX_Vlddqu_xmm_m128 => (16, 1),
        VEX_Vmovups_ymm_ymmm256
        | VEX_Vmovups_ymmm256_ymm
        | VEX_Vmovupd_ymm_ymmm256
        | VEX_Vmovupd_ymmm256_ymm
        | VEX_Vmovdqu_ymm_ymmm256
        | VEX_Vmovdqu_ymmm256_ymm
        | VEX_Vlddqu_ymm_m256 => (32, 1),
        _ => return None,
    })
}

pub(crate) fn exec<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, kind: Kind) -> Res<()> {
    match kind {
        Kind::SseMove => {
            ctx.check_sse()?;
            sse_move(ctx)
        }
        Kind::SseLogic => {
            ctx.check_sse()?;
            let dst = xmm_index(ctx.reg(0))?;
            let src = load_xmm_or_mem(ctx, 1, 16, 16)?;
            let old = ctx.cpu.xmm(dst);
            ctx.cpu.set_xmm(dst, logic(ctx.instr.code(), old, src));
            Ok(())
        }
        Kind::AvxMove => {
            ctx.check_avx()?;
            avx(ctx)
        }
        other => Err(Stop::Unsupported(format!(
            "{other} is not an SSE instruction"
        ))),
    }
}

fn logic(code: Code, a: u128, b: u128) -> u128 {
    use Code::*;
    match code {
        Pxor_xmm_xmmm128
        | Xorps_xmm_xmmm128
        | Xorpd_xmm_xmmm128
        | VEX_Vpxor_xmm_xmm_xmmm128
        | VEX_Vpxor_ymm_ymm_ymmm256
        | VEX_Vxorps_xmm_xmm_xmmm128
        | VEX_Vxorps_ymm_ymm_ymmm256
        | VEX_Vxorpd_xmm_xmm_xmmm128
        | VEX_Vxorpd_ymm_ymm_ymmm256 => a ^ b,
        Por_xmm_xmmm128 | Orps_xmm_xmmm128 | Orpd_xmm_xmmm128 => a | b,
        Pand_xmm_xmmm128 | Andps_xmm_xmmm128 | Andpd_xmm_xmmm128 => a & b,
        _ => !a & b, // pandn, andnps, andnpd
    }
}

/// Index of an XMM/YMM register operand (0..16).
fn xmm_index(reg: Register) -> Res<usize> {
    if (reg.is_xmm() || reg.is_ymm()) && reg.number() < 16 {
        Ok(reg.number())
    } else {
        Err(Stop::Unsupported(format!(
            "operand {reg:?} is not XMM0-15/YMM0-15"
        )))
    }
}

/// Low `len` bytes of an XMM register operand, or `len` bytes of memory (alignment `align`).
fn load_xmm_or_mem<C: Cpu + ?Sized>(
    ctx: &mut Ctx<'_, C>,
    op: u32,
    len: usize,
    align: u64,
) -> Res<u128> {
    if ctx.is_mem(op) {
        return ctx.load_mem(op, len, align);
    }
    let v = ctx.cpu.xmm(xmm_index(ctx.reg(op))?);
    Ok(match len {
        4 => v & LOW32,
        8 => v & LOW64,
        _ => v,
    })
}

/// A general register (zero-extended) or `len` bytes of memory.
fn load_gpr_or_mem<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, op: u32, len: usize) -> Res<u128> {
    if ctx.is_mem(op) {
        ctx.load_mem(op, len, 1)
    } else {
        Ok(u128::from(ctx.read_gpr(ctx.reg(op))))
    }
}

/// Stores the low `len` bytes of `value` to a general register (32-bit writes zero-extend) or
/// to memory.
fn store_gpr_or_mem<C: Cpu + ?Sized>(
    ctx: &mut Ctx<'_, C>,
    op: u32,
    len: usize,
    value: u128,
) -> Res<()> {
    if ctx.is_mem(op) {
        ctx.store_mem(op, len, 1, value)
    } else {
        ctx.write_gpr(ctx.reg(op), value as u64);
        Ok(())
    }
}

fn sse_move<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    use Code::*;
    let code = ctx.instr.code();
    match code {
        // Full 128-bit copies, operand 1 to operand 0.
        Movaps_xmm_xmmm128 | Movaps_xmmm128_xmm | Movapd_xmm_xmmm128 | Movapd_xmmm128_xmm
        | Movdqa_xmm_xmmm128 | Movdqa_xmmm128_xmm | Movntps_m128_xmm | Movntpd_m128_xmm
        | Movntdq_m128_xmm | Movntdqa_xmm_m128 | Movups_xmm_xmmm128 | Movups_xmmm128_xmm
        | Movupd_xmm_xmmm128 | Movupd_xmmm128_xmm | Movdqu_xmm_xmmm128 | Movdqu_xmmm128_xmm
        | Lddqu_xmm_m128 => {
            let align = match code {
                Movups_xmm_xmmm128 | Movups_xmmm128_xmm | Movupd_xmm_xmmm128
                | Movupd_xmmm128_xmm | Movdqu_xmm_xmmm128 | Movdqu_xmmm128_xmm | Lddqu_xmm_m128 => {
                    1
                }
                _ => 16,
            };
            let value = load_xmm_or_mem(ctx, 1, 16, align)?;
            if ctx.is_mem(0) {
                ctx.store_mem(0, 16, align, value)
            } else {
                ctx.cpu.set_xmm(xmm_index(ctx.reg(0))?, value);
                Ok(())
            }
        }
        // movd/movq xmm, r/m: zero-extended into the XMM register.
        Movd_xmm_rm32 | Movq_xmm_rm64 => {
            let len = if code == Movd_xmm_rm32 { 4 } else { 8 };
            let dst = xmm_index(ctx.reg(0))?;
            let value = load_gpr_or_mem(ctx, 1, len)?;
            ctx.cpu.set_xmm(dst, value);
            Ok(())
        }
        // movq xmm, xmm/m64 (F3 0F 7E): zero-extended.
        Movq_xmm_xmmm64 => {
            let dst = xmm_index(ctx.reg(0))?;
            let value = load_xmm_or_mem(ctx, 1, 8, 1)?;
            ctx.cpu.set_xmm(dst, value);
            Ok(())
        }
        // movd/movq r/m, xmm.
        Movd_rm32_xmm | Movq_rm64_xmm => {
            let len = if code == Movd_rm32_xmm { 4 } else { 8 };
            let value = ctx.cpu.xmm(xmm_index(ctx.reg(1))?);
            store_gpr_or_mem(ctx, 0, len, value)
        }
        // movq xmm/m64, xmm (66 0F D6): a register destination is zero-extended.
        Movq_xmmm64_xmm => {
            let value = ctx.cpu.xmm(xmm_index(ctx.reg(1))?) & LOW64;
            if ctx.is_mem(0) {
                ctx.store_mem(0, 8, 1, value)
            } else {
                ctx.cpu.set_xmm(xmm_index(ctx.reg(0))?, value);
                Ok(())
            }
        }
        // movss/movsd: loads from memory zero-extend, register-to-register merges the low part.
        Movss_xmm_xmmm32 | Movsd_xmm_xmmm64 | Movss_xmmm32_xmm | Movsd_xmmm64_xmm => {
            let (len, mask) = if matches!(code, Movss_xmm_xmmm32 | Movss_xmmm32_xmm) {
                (4, LOW32)
            } else {
                (8, LOW64)
            };
            if ctx.is_mem(1) {
                let value = ctx.load_mem(1, len, 1)?;
                ctx.cpu.set_xmm(xmm_index(ctx.reg(0))?, value);
                return Ok(());
            }
            let src = ctx.cpu.xmm(xmm_index(ctx.reg(1))?);
            if ctx.is_mem(0) {
                return ctx.store_mem(0, len, 1, src);
            }
            let dst = xmm_index(ctx.reg(0))?;
            let old = ctx.cpu.xmm(dst);
            ctx.cpu.set_xmm(dst, (old & !mask) | (src & mask));
            Ok(())
        }
        // movlps/movlpd/movhps/movhpd loads: merge one half.
        Movlps_xmm_m64 | Movlpd_xmm_m64 | Movhps_xmm_m64 | Movhpd_xmm_m64 => {
            let dst = xmm_index(ctx.reg(0))?;
            let value = ctx.load_mem(1, 8, 1)?;
            let old = ctx.cpu.xmm(dst);
            let new = if matches!(code, Movlps_xmm_m64 | Movlpd_xmm_m64) {
                (old & HIGH64) | value
            } else {
                (old & LOW64) | (value << 64)
            };
            ctx.cpu.set_xmm(dst, new);
            Ok(())
        }
        Movlps_m64_xmm | Movlpd_m64_xmm | Movhps_m64_xmm | Movhpd_m64_xmm => {
            let src = ctx.cpu.xmm(xmm_index(ctx.reg(1))?);
            let value = if matches!(code, Movlps_m64_xmm | Movlpd_m64_xmm) {
                src & LOW64
            } else {
                src >> 64
            };
            ctx.store_mem(0, 8, 1, value)
        }
        Movhlps_xmm_xmm | Movlhps_xmm_xmm => {
            let dst = xmm_index(ctx.reg(0))?;
            let src = ctx.cpu.xmm(xmm_index(ctx.reg(1))?);
            let old = ctx.cpu.xmm(dst);
            let new = if code == Movhlps_xmm_xmm {
                (old & HIGH64) | (src >> 64)
            } else {
                (old & LOW64) | (src << 64)
            };
            ctx.cpu.set_xmm(dst, new);
            Ok(())
        }
        other => Err(Stop::Unsupported(format!("{other:?} is not an SSE move"))),
    }
}

/// A 256-bit vector as (bits 127:0, bits 255:128).
type Ymm = (u128, u128);

/// Reads `len` (16 or 32) bytes from an XMM/YMM register or memory.
fn load_vec<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, op: u32, len: usize, align: u64) -> Res<Ymm> {
    if ctx.is_mem(op) {
        let addr = ctx.mem_addr(op, len as u64, align)?;
        let mut buf = [0u8; 32];
        ctx.read_mem(addr, &mut buf[..len])?;
        let lo = u128::from_le_bytes(buf[..16].try_into().unwrap_or_default());
        let hi = u128::from_le_bytes(buf[16..].try_into().unwrap_or_default());
        return Ok((lo, hi));
    }
    let n = xmm_index(ctx.reg(op))?;
    let lo = ctx.cpu.xmm(n);
    let hi = if len == 32 { ctx.cpu.ymm_high(n) } else { 0 };
    Ok((lo, hi))
}

/// The bytes of a ZMM_Hi256 component, when XCR0 enables it (VEX writes must zero them).
fn zmm_hi256<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<Option<Vec<u8>>> {
    if ctx.cpu.xcr0() & (1 << ZMM_HI256) == 0 {
        return Ok(None);
    }
    let missing = || {
        Stop::Unsupported(
            "AVX-512 state is enabled but the CPU backend does not provide ZMM_Hi256".into(),
        )
    };
    let layout = ctx.cpu.xstate_layout(ZMM_HI256).ok_or_else(missing)?;
    let data = ctx.cpu.xstate_component(ZMM_HI256);
    if data.len() != layout.size as usize || data.len() < 16 * 32 {
        return Err(missing());
    }
    Ok(Some(data))
}

/// VEX write of YMM register(s): `regs` get the given values, bits above 255 are zeroed.
fn vex_write<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, regs: &[(usize, Ymm)]) -> Res<()> {
    // Fetch everything that can fail before changing any register.
    let zmm = zmm_hi256(ctx)?;
    for &(n, (lo, hi)) in regs {
        ctx.cpu.set_xmm(n, lo);
        ctx.cpu.set_ymm_high(n, hi);
    }
    if let Some(mut data) = zmm {
        for &(n, _) in regs {
            if let Some(bytes) = data.get_mut(n * 32..n * 32 + 32) {
                bytes.fill(0);
            }
        }
        ctx.cpu.set_xstate_component(ZMM_HI256, &data);
    }
    Ok(())
}

fn avx<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>) -> Res<()> {
    use Code::*;
    let code = ctx.instr.code();
    if let Some((len, align)) = vex_move(code) {
        let value = load_vec(ctx, 1, len, align)?;
        if ctx.is_mem(0) {
            let addr = ctx.mem_addr(0, len as u64, align)?;
            let mut buf = [0u8; 32];
            buf[..16].copy_from_slice(&value.0.to_le_bytes());
            buf[16..].copy_from_slice(&value.1.to_le_bytes());
            return ctx.write_mem(addr, &buf[..len]);
        }
        let dst = xmm_index(ctx.reg(0))?;
        return vex_write(ctx, &[(dst, value)]);
    }
    match code {
        VEX_Vmovd_xmm_rm32 | VEX_Vmovq_xmm_rm64 => {
            let len = if code == VEX_Vmovd_xmm_rm32 { 4 } else { 8 };
            let dst = xmm_index(ctx.reg(0))?;
            let value = load_gpr_or_mem(ctx, 1, len)?;
            vex_write(ctx, &[(dst, (value, 0))])
        }
        VEX_Vmovd_rm32_xmm | VEX_Vmovq_rm64_xmm => {
            let len = if code == VEX_Vmovd_rm32_xmm { 4 } else { 8 };
            let value = ctx.cpu.xmm(xmm_index(ctx.reg(1))?);
            store_gpr_or_mem(ctx, 0, len, value)
        }
        VEX_Vmovq_xmm_xmmm64 => {
            let dst = xmm_index(ctx.reg(0))?;
            let value = load_xmm_or_mem(ctx, 1, 8, 1)?;
            vex_write(ctx, &[(dst, (value, 0))])
        }
        VEX_Vmovq_xmmm64_xmm => {
            let value = ctx.cpu.xmm(xmm_index(ctx.reg(1))?) & LOW64;
            if ctx.is_mem(0) {
                ctx.store_mem(0, 8, 1, value)
            } else {
                let dst = xmm_index(ctx.reg(0))?;
                vex_write(ctx, &[(dst, (value, 0))])
            }
        }
        VEX_Vpxor_xmm_xmm_xmmm128
        | VEX_Vxorps_xmm_xmm_xmmm128
        | VEX_Vxorpd_xmm_xmm_xmmm128
        | VEX_Vpxor_ymm_ymm_ymmm256
        | VEX_Vxorps_ymm_ymm_ymmm256
        | VEX_Vxorpd_ymm_ymm_ymmm256 => {
            let len = if ctx.reg(0).is_ymm() { 32 } else { 16 };
            let dst = xmm_index(ctx.reg(0))?;
            let a = load_vec(ctx, 1, len, 1)?;
            let b = load_vec(ctx, 2, len, 1)?;
            let value = (logic(code, a.0, b.0), logic(code, a.1, b.1));
            vex_write(ctx, &[(dst, value)])
        }
        VEX_Vzeroupper | VEX_Vzeroall => {
            let regs: Vec<(usize, Ymm)> = (0..ctx.mode.vector_regs())
                .map(|n| {
                    let lo = if code == VEX_Vzeroall {
                        0
                    } else {
                        ctx.cpu.xmm(n)
                    };
                    (n, (lo, 0))
                })
                .collect();
            vex_write(ctx, &regs)
        }
        other => Err(Stop::Unsupported(format!("{other:?} is not a VEX move"))),
    }
}
