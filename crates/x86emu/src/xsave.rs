//! fxsave/fxrstor and the xsave family (Intel SDM vol. 1 ch. 13).
//!
//! XSAVE area: legacy region 0..512 (the FXSAVE image), header 512..576 (XSTATE_BV at 512,
//! XCOMP_BV at 520), extended region from 576 — each component at its CPUID offset in the
//! standard form, packed in component order (64-byte aligned where CPUID says so) in the
//! compacted form.
//!
//! The emulator does not track which components are in their initial configuration (XINUSE):
//! it treats every component as in use, which the SDM allows. So xsave sets XSTATE_BV[i] for
//! every requested component, xsaveopt behaves like xsave, and xsavec/xsaves write every
//! requested component.

use crate::bits::*;
use crate::{gp0, nm, ud, Cpu, Ctx, FpuState, Kind, Mode, Res, Stop, XstateComponent};
use iced_x86::{Code, Register};

const FX_MXCSR: u64 = 24;
const FX_ST: usize = 32;
const FX_XMM: u64 = 160;
const HEADER: u64 = 512;
const EXTENDED: u64 = 576;
const COMPACTED: u64 = 1 << 63;
/// Components held in the legacy region (x87, SSE).
const LEGACY: u64 = 0b11;
/// Components this module names in messages.
const NAMES: [&str; 19] = [
    "x87",
    "SSE",
    "AVX",
    "MPX BNDREGS",
    "MPX BNDCSR",
    "AVX-512 opmask",
    "AVX-512 ZMM_Hi256",
    "AVX-512 Hi16_ZMM",
    "PT",
    "PKRU",
    "PASID",
    "CET_U",
    "CET_S",
    "HDC",
    "UINTR",
    "LBR",
    "HWP",
    "AMX TILECFG",
    "AMX TILEDATA",
];

pub(crate) fn exec<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, kind: Kind) -> Res<()> {
    use Code::*;
    let fmt64 = matches!(
        ctx.instr.code(),
        Fxsave64_m512byte
            | Fxrstor64_m512byte
            | Xsave64_mem
            | Xsaveopt64_mem
            | Xsavec64_mem
            | Xsaves64_mem
            | Xrstor64_mem
            | Xrstors64_mem
    );
    match kind {
        Kind::Fxsave => fxsave(ctx, fmt64),
        Kind::Fxrstor => fxrstor(ctx, fmt64),
        Kind::Xsave | Kind::Xsaveopt => xsave(ctx, fmt64, false, false),
        Kind::Xsavec => xsave(ctx, fmt64, true, false),
        Kind::Xsaves => xsave(ctx, fmt64, true, true),
        Kind::Xrstor => xrstor(ctx, fmt64, false),
        Kind::Xrstors => xrstor(ctx, fmt64, true),
        other => Err(Stop::Unsupported(format!(
            "{other} is not an xsave-family instruction"
        ))),
    }
}

fn component_name(c: u32) -> &'static str {
    NAMES.get(c as usize).copied().unwrap_or("unknown")
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | (u64::from(le_u32(b, at + 4)) << 32)
}

/// The x87 part of the legacy region, bytes 0..160 (24..32, MXCSR, left zero).
fn encode_x87(f: &FpuState, fmt64: bool) -> [u8; 160] {
    let mut b = [0u8; 160];
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    b[4] = f.ftw;
    b[6..8].copy_from_slice(&f.fop.to_le_bytes());
    if fmt64 {
        b[8..16].copy_from_slice(&f.fip.to_le_bytes());
        b[16..24].copy_from_slice(&f.fdp.to_le_bytes());
    } else {
        b[8..12].copy_from_slice(&(f.fip as u32).to_le_bytes());
        b[12..14].copy_from_slice(&f.fcs.to_le_bytes());
        b[16..20].copy_from_slice(&(f.fdp as u32).to_le_bytes());
        b[20..22].copy_from_slice(&f.fds.to_le_bytes());
    }
    for (i, st) in f.st.iter().enumerate() {
        let at = FX_ST + 16 * i;
        b[at..at + 10].copy_from_slice(st);
    }
    b
}

fn decode_x87(b: &[u8; 160], fmt64: bool) -> FpuState {
    let mut f = FpuState {
        fcw: le_u16(b, 0),
        fsw: le_u16(b, 2),
        ftw: b[4],
        fop: le_u16(b, 6),
        ..FpuState::default()
    };
    if fmt64 {
        f.fip = le_u64(b, 8);
        f.fdp = le_u64(b, 16);
    } else {
        f.fip = u64::from(le_u32(b, 8));
        f.fcs = le_u16(b, 12);
        f.fdp = u64::from(le_u32(b, 16));
        f.fds = le_u16(b, 20);
    }
    for (i, st) in f.st.iter_mut().enumerate() {
        let at = FX_ST + 16 * i;
        st.copy_from_slice(&b[at..at + 10]);
    }
    f
}

fn xmm_bytes<C: Cpu + ?Sized>(cpu: &mut C, n: usize, high: bool) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let v = if high { cpu.ymm_high(i) } else { cpu.xmm(i) };
            v.to_le_bytes()
        })
        .collect()
}

fn xmm_values(bytes: &[u8]) -> Vec<u128> {
    bytes
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect()
}

fn mxcsr_bytes<C: Cpu + ?Sized>(cpu: &mut C) -> Vec<u8> {
    let mut v = cpu.mxcsr().to_le_bytes().to_vec();
    v.extend_from_slice(&MXCSR_MASK.to_le_bytes());
    v
}

/// Fast FXSAVE/FXRSTOR (EFER.FFXSR) skips the XMM registers in 64-bit ring 0.
fn fast_fx<C: Cpu + ?Sized>(ctx: &Ctx<'_, C>) -> bool {
    ctx.cpu.efer() & EFER_FFXSR != 0 && ctx.cpu.cpl() == 0 && ctx.mode == Mode::Long64
}

fn check_fx<C: Cpu + ?Sized>(ctx: &Ctx<'_, C>) -> Res<()> {
    if ctx.cpu.cr0() & (CR0_EM | CR0_TS) != 0 {
        return Err(nm());
    }
    Ok(())
}

fn fxsave<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, fmt64: bool) -> Res<()> {
    check_fx(ctx)?;
    let base = ctx.mem_addr(0, 512, 16)?;
    let x87 = encode_x87(&ctx.cpu.fpu(), fmt64);
    let mut writes = vec![
        (0, x87[..24].to_vec()),
        (FX_ST as u64, x87[FX_ST..].to_vec()),
    ];
    if ctx.cpu.cr4() & CR4_OSFXSR != 0 {
        writes.push((FX_MXCSR, mxcsr_bytes(ctx.cpu)));
        if !fast_fx(ctx) {
            let n = ctx.mode.vector_regs();
            writes.push((FX_XMM, xmm_bytes(ctx.cpu, n, false)));
        }
    }
    write_all(ctx, base, writes)
}

fn fxrstor<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, fmt64: bool) -> Res<()> {
    check_fx(ctx)?;
    let base = ctx.mem_addr(0, 512, 16)?;
    let mut image = [0u8; 512];
    ctx.read_mem(base, &mut image)?;
    let mut x87 = [0u8; 160];
    x87.copy_from_slice(&image[..160]);
    let fpu = decode_x87(&x87, fmt64);
    let mut new = NewState {
        fpu: Some(fpu),
        ..NewState::default()
    };
    if ctx.cpu.cr4() & CR4_OSFXSR != 0 {
        let mxcsr = le_u32(&image, FX_MXCSR as usize);
        if mxcsr & !MXCSR_MASK != 0 {
            return Err(gp0());
        }
        new.mxcsr = Some(mxcsr);
        if !fast_fx(ctx) {
            let n = ctx.mode.vector_regs();
            let start = FX_XMM as usize;
            new.xmm = Some(xmm_values(&image[start..start + 16 * n]));
        }
    }
    new.apply(ctx.cpu);
    Ok(())
}

/// Register state an xrstor/fxrstor will load, gathered before anything changes.
#[derive(Default)]
struct NewState {
    fpu: Option<FpuState>,
    mxcsr: Option<u32>,
    xmm: Option<Vec<u128>>,
    ymm_high: Option<Vec<u128>>,
    other: Vec<(u32, Vec<u8>)>,
}

impl NewState {
    fn apply<C: Cpu + ?Sized>(self, cpu: &mut C) {
        if let Some(f) = &self.fpu {
            cpu.set_fpu(f);
        }
        if let Some(m) = self.mxcsr {
            cpu.set_mxcsr(m);
        }
        for (i, v) in self.xmm.into_iter().flatten().enumerate() {
            cpu.set_xmm(i, v);
        }
        for (i, v) in self.ymm_high.into_iter().flatten().enumerate() {
            cpu.set_ymm_high(i, v);
        }
        for (c, data) in &self.other {
            cpu.set_xstate_component(*c, data);
        }
    }
}

fn write_all<C: Cpu + ?Sized>(
    ctx: &mut Ctx<'_, C>,
    base: u64,
    mut writes: Vec<(u64, Vec<u8>)>,
) -> Res<()> {
    writes.sort_by_key(|w| w.0);
    for (offset, data) in writes {
        ctx.write_mem(base.wrapping_add(offset), &data)?;
    }
    Ok(())
}

/// #UD without CR4.OSXSAVE, #NM with CR0.TS; xsaves/xrstors need CPL 0.
fn check_xsave<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, supervisor: bool) -> Res<()> {
    if ctx.cpu.cr4() & CR4_OSXSAVE == 0 {
        return Err(ud());
    }
    if ctx.cpu.cr0() & CR0_TS != 0 {
        return Err(nm());
    }
    if supervisor && ctx.cpu.cpl() != 0 {
        return Err(gp0());
    }
    Ok(())
}

/// Requested-feature bitmap: EDX:EAX & (XCR0 | IA32_XSS for the supervisor forms).
fn rfbm<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, supervisor: bool) -> (u64, u64) {
    let mask = (ctx.cpu.gpr(Register::RDX) << 32) | (ctx.cpu.gpr(Register::RAX) & 0xffff_ffff);
    let mut enabled = ctx.cpu.xcr0();
    if supervisor {
        enabled |= ctx.cpu.xss();
    }
    (mask & enabled, enabled)
}

/// Extended component placed in the area.
#[derive(Clone, Copy)]
struct Placed {
    component: u32,
    layout: XstateComponent,
    offset: u64,
}

/// Layout of extended component `c` from the CPU backend.
fn layout<C: Cpu + ?Sized>(ctx: &Ctx<'_, C>, c: u32, kind: &str) -> Res<XstateComponent> {
    let missing = || {
        Stop::Unsupported(format!(
            "{kind} of XSAVE component {c} ({}), which the CPU backend does not provide",
            component_name(c)
        ))
    };
    let layout = ctx.cpu.xstate_layout(c).ok_or_else(missing)?;
    if layout.size == 0 || layout.size > 1 << 20 || (c == 2 && layout.size != 256) {
        return Err(missing());
    }
    Ok(layout)
}

/// The extended components in `mask`, placed in the standard or compacted form.
fn place<C: Cpu + ?Sized>(
    ctx: &Ctx<'_, C>,
    mask: u64,
    compacted: bool,
    kind: &str,
) -> Res<Vec<Placed>> {
    let mut placed = Vec::new();
    let mut next = EXTENDED;
    for c in 2..63u32 {
        if mask & (1 << c) == 0 {
            continue;
        }
        let layout = layout(ctx, c, kind)?;
        let offset = if compacted {
            if layout.align64 {
                next = next.next_multiple_of(64);
            }
            let at = next;
            next += u64::from(layout.size);
            at
        } else {
            if u64::from(layout.offset) < EXTENDED {
                return Err(Stop::Unsupported(format!(
                    "{kind} of XSAVE component {c} ({}) in the standard form, but it has no \
                     standard-form offset",
                    component_name(c)
                )));
            }
            u64::from(layout.offset)
        };
        placed.push(Placed {
            component: c,
            layout,
            offset,
        });
    }
    Ok(placed)
}

/// End of the area touched for these components.
fn extent(placed: &[Placed]) -> u64 {
    placed
        .iter()
        .map(|p| p.offset + u64::from(p.layout.size))
        .max()
        .unwrap_or(EXTENDED)
        .max(EXTENDED)
}

/// xsave/xsaveopt (standard form) and xsavec/xsaves (compacted form).
fn xsave<C: Cpu + ?Sized>(
    ctx: &mut Ctx<'_, C>,
    fmt64: bool,
    compacted: bool,
    supervisor: bool,
) -> Res<()> {
    check_xsave(ctx, supervisor)?;
    let (rfbm, _) = rfbm(ctx, supervisor);
    let placed = place(ctx, rfbm, compacted, "save")?;
    let base = ctx.mem_addr(0, extent(&placed), 64)?;
    let n = ctx.mode.vector_regs();

    let mut writes = Vec::new();
    if compacted {
        let mut header = rfbm.to_le_bytes().to_vec();
        header.extend_from_slice(&(rfbm | COMPACTED).to_le_bytes());
        writes.push((HEADER, header));
    } else {
        let mut old = [0u8; 8];
        ctx.read_mem(base.wrapping_add(HEADER), &mut old)?;
        let xstate_bv = u64::from_le_bytes(old) | rfbm;
        writes.push((HEADER, xstate_bv.to_le_bytes().to_vec()));
    }
    if rfbm & 1 != 0 {
        let x87 = encode_x87(&ctx.cpu.fpu(), fmt64);
        writes.push((0, x87[..24].to_vec()));
        writes.push((FX_ST as u64, x87[FX_ST..].to_vec()));
    }
    if rfbm & 0b110 != 0 {
        writes.push((FX_MXCSR, mxcsr_bytes(ctx.cpu)));
    }
    if rfbm & 0b10 != 0 {
        writes.push((FX_XMM, xmm_bytes(ctx.cpu, n, false)));
    }
    for p in &placed {
        let data = if p.component == 2 {
            xmm_bytes(ctx.cpu, n, true)
        } else {
            let data = ctx.cpu.xstate_component(p.component);
            if data.len() != p.layout.size as usize {
                return Err(Stop::Unsupported(format!(
                    "CPU backend returned {} bytes for XSAVE component {} ({}), expected {}",
                    data.len(),
                    p.component,
                    component_name(p.component),
                    p.layout.size
                )));
            }
            data
        };
        writes.push((p.offset, data));
    }
    write_all(ctx, base, writes)
}

/// xrstor (standard or compacted form, by XCOMP_BV[63]) and xrstors (compacted only).
fn xrstor<C: Cpu + ?Sized>(ctx: &mut Ctx<'_, C>, fmt64: bool, supervisor: bool) -> Res<()> {
    check_xsave(ctx, supervisor)?;
    let (rfbm, enabled) = rfbm(ctx, supervisor);
    let base = ctx.mem_addr(0, EXTENDED, 64)?;
    let mut header = [0u8; 64];
    ctx.read_mem(base.wrapping_add(HEADER), &mut header)?;
    let xstate_bv = le_u64(&header, 0);
    let xcomp_bv = le_u64(&header, 8);
    let compacted = xcomp_bv & COMPACTED != 0;
    let kind = if supervisor { "xrstors" } else { "xrstor" };

    // Header checks (#GP(0)), all before any state changes.
    let placed = if compacted {
        let components = xcomp_bv & !COMPACTED;
        if components & !enabled != 0
            || xstate_bv & !components != 0
            || header[16..].iter().any(|&b| b != 0)
        {
            return Err(gp0());
        }
        // Offsets depend on every component present in the area, requested or not.
        place(ctx, components, true, kind)?
    } else {
        if supervisor || xstate_bv & !enabled != 0 || header[8..24].iter().any(|&b| b != 0) {
            return Err(gp0());
        }
        place(ctx, rfbm & !LEGACY, false, kind)?
    };
    ctx.mem_addr(0, extent(&placed), 64)?;

    let n = ctx.mode.vector_regs();
    let load = rfbm & xstate_bv;
    let mut new = NewState::default();
    if rfbm & 1 != 0 {
        new.fpu = Some(if load & 1 != 0 {
            let mut x87 = [0u8; 160];
            ctx.read_mem(base, &mut x87)?;
            decode_x87(&x87, fmt64)
        } else {
            FpuState::default()
        });
    }
    let mxcsr_from_memory = if compacted {
        load & 0b10 != 0
    } else {
        rfbm & 0b110 != 0
    };
    if mxcsr_from_memory {
        let mut b = [0u8; 4];
        ctx.read_mem(base.wrapping_add(FX_MXCSR), &mut b)?;
        let mxcsr = u32::from_le_bytes(b);
        if mxcsr & !MXCSR_MASK != 0 {
            return Err(gp0());
        }
        new.mxcsr = Some(mxcsr);
    } else if compacted && rfbm & 0b10 != 0 {
        new.mxcsr = Some(MXCSR_INIT);
    }
    if rfbm & 0b10 != 0 {
        new.xmm = Some(if load & 0b10 != 0 {
            let mut b = vec![0u8; 16 * n];
            ctx.read_mem(base.wrapping_add(FX_XMM), &mut b)?;
            xmm_values(&b)
        } else {
            vec![0; n]
        });
    }
    for c in 2..63u32 {
        if rfbm & (1 << c) == 0 {
            continue;
        }
        let size = if c == 2 {
            16 * n
        } else {
            layout(ctx, c, kind)?.size as usize
        };
        let mut data = vec![0u8; size];
        if load & (1 << c) != 0 {
            // Loaded components are in XSTATE_BV, so they were placed above.
            let Some(p) = placed.iter().find(|p| p.component == c) else {
                return Err(Stop::Unsupported(format!(
                    "{kind}: component {c} not placed"
                )));
            };
            ctx.read_mem(base.wrapping_add(p.offset), &mut data)?;
        }
        if c == 2 {
            new.ymm_high = Some(xmm_values(&data));
        } else {
            new.other.push((c, data));
        }
    }
    new.apply(ctx.cpu);
    Ok(())
}
