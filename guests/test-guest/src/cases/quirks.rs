//! `test=quirks`: execute, in ring 0, each instruction the host's instruction emulator cannot
//! run and the VMM must handle itself, and check each one's architectural result. Every line
//! starts with the instruction name and a colon before the instruction runs, so a VM that dies
//! on one shows which.

use crate::arch::{BREAKPOINTS, LAST_BREAKPOINT_RIP};
use crate::io::{cpuid, read_cr4, write_cr4};
use crate::serial::Writer;
use crate::Global;
use core::arch::asm;
use core::sync::atomic::Ordering;

const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_SMAP: u64 = 1 << 21;
const RFLAGS_AC: u64 = 1 << 18;

enum Outcome {
    Ok,
    Fail,
    Skipped(&'static str),
}

/// One check: runs the instruction, returns the verdict, and may write details of a failure
/// to the capturing writer it is given.
type Check = fn(&mut Writer) -> Outcome;

pub fn run() {
    let checks: [(&str, Check); 11] = [
        ("int3", int3),
        ("stac/clac", stac_clac),
        ("popcnt", popcnt),
        ("fwait", fwait),
        ("ldmxcsr/stmxcsr", mxcsr),
        ("movd/movq", movd_movq),
        ("movdqu", movdqu),
        ("cmpxchg16b", cmpxchg16b),
        ("xsave/xrstor", xsave_xrstor),
        ("fxsave/fxrstor", fxsave_fxrstor),
        // Last: not in the original list of instructions the host cannot emulate, so a VMM
        // without it stops the VM after every other line has been printed.
        ("xgetbv", xgetbv),
    ];
    let mut all_ok = true;
    for (name, check) in checks {
        let mut w = Writer::lock();
        w.str(name).str(": ");
        let mut details = Writer::capture();
        match check(&mut details) {
            Outcome::Ok => {
                w.str("ok");
            }
            Outcome::Fail => {
                all_ok = false;
                w.str("FAIL");
                if !details.captured().is_empty() {
                    w.str(" (").bytes(details.captured()).str(")");
                }
            }
            Outcome::Skipped(why) => {
                w.str("skipped (").str(why).str(")");
            }
        }
        w.str("\n");
    }
    Writer::lock().str("quirks: ").verdict(all_ok).str("\n");
}

fn verdict(ok: bool) -> Outcome {
    if ok {
        Outcome::Ok
    } else {
        Outcome::Fail
    }
}

/// #BP must be delivered as a trap: the handler sees RIP just past the `int3`.
fn int3(w: &mut Writer) -> Outcome {
    let before = BREAKPOINTS.load(Ordering::Relaxed);
    let after_insn: u64;
    // SAFETY: our IDT handles vector 3 by counting and returning.
    unsafe { asm!("int3", "2:", "lea {}, [rip + 2b]", out(reg) after_insn) };
    let taken = BREAKPOINTS.load(Ordering::Relaxed) - before;
    let rip = LAST_BREAKPOINT_RIP.load(Ordering::Relaxed);
    let ok = taken == 1 && rip == after_insn;
    if !ok {
        w.str("traps=")
            .dec(taken)
            .str(" rip=")
            .hex(rip)
            .str(" expected=")
            .hex(after_insn);
    }
    verdict(ok)
}

fn stac_clac(w: &mut Writer) -> Outcome {
    if cpuid(7, 0).ebx & (1 << 20) == 0 {
        return Outcome::Skipped("no SMAP");
    }
    // SAFETY: SMAP only restricts supervisor access to user pages, which the kernel does not
    // touch outside the syscall test.
    unsafe { write_cr4(read_cr4() | CR4_SMAP) };
    let (set, clear): (u64, u64);
    // SAFETY: stac/clac only toggle RFLAGS.AC.
    unsafe {
        asm!("stac", "pushfq", "pop {}", "clac", "pushfq", "pop {}", out(reg) set, out(reg) clear)
    };
    let ok = set & RFLAGS_AC != 0 && clear & RFLAGS_AC == 0;
    if !ok {
        w.str("rflags after stac=")
            .hex(set)
            .str(" after clac=")
            .hex(clear);
    }
    verdict(ok)
}

fn popcnt(w: &mut Writer) -> Outcome {
    if cpuid(1, 0).ecx & (1 << 23) == 0 {
        return Outcome::Skipped("no POPCNT");
    }
    let (r64, r32, r0): (u64, u32, u64);
    let zf: u8;
    // SAFETY: popcnt only computes into registers and flags.
    unsafe {
        asm!(
            "popcnt {r64}, {a}",
            "popcnt {r32:e}, {b:e}",
            "popcnt {r0}, {z}",
            "setz {zf}",
            a = in(reg) 0xf0f0_1234_5678_9abc_u64,
            b = in(reg) 0x8000_0001_u64,
            z = in(reg) 0_u64,
            r64 = out(reg) r64,
            r32 = out(reg) r32,
            r0 = out(reg) r0,
            zf = out(reg_byte) zf,
        )
    };
    // 0xf0f0_1234_5678_9abc has 8 + 5 + 8 + 9 = 30 bits set.
    let ok = r64 == 30 && r32 == 2 && r0 == 0 && zf == 1;
    if !ok {
        w.str("results ")
            .dec(r64)
            .str(" ")
            .dec(u64::from(r32))
            .str(" ")
            .dec(r0)
            .str(" zf=")
            .dec(u64::from(zf));
    }
    verdict(ok)
}

fn fwait(_w: &mut Writer) -> Outcome {
    // CR0.TS is clear and no x87 exception is pending: fwait must just continue.
    // SAFETY: fwait has no effect besides checking for pending x87 exceptions.
    unsafe { asm!("fwait", options(nomem, nostack)) };
    Outcome::Ok
}

fn mxcsr(w: &mut Writer) -> Outcome {
    // All exceptions masked, round toward zero.
    let value: u32 = 0x7f80;
    let default: u32 = 0x1f80;
    let mut read_back: u32 = 0;
    // SAFETY: loads a valid MXCSR value (no reserved bits), reads it back, restores the default.
    unsafe {
        asm!(
            "ldmxcsr [{v}]",
            "stmxcsr [{r}]",
            "ldmxcsr [{d}]",
            v = in(reg) &value,
            r = in(reg) &mut read_back,
            d = in(reg) &default,
            options(nostack)
        )
    };
    let ok = read_back == value;
    if !ok {
        w.str("read back ").hex(u64::from(read_back));
    }
    verdict(ok)
}

fn movd_movq(w: &mut Writer) -> Outcome {
    let (full, low, wide): (u64, u32, u64);
    // SAFETY: moves between general and XMM registers only.
    unsafe {
        asm!(
            "movq xmm1, {ones}",
            "movd xmm1, {v:e}",
            "movq {full}, xmm1",
            "movd {low:e}, xmm1",
            "movq xmm2, {big}",
            "movq {wide}, xmm2",
            ones = in(reg) u64::MAX,
            v = in(reg) 0x1234_5678_u64,
            big = in(reg) 0x0123_4567_89ab_cdef_u64,
            full = out(reg) full,
            low = out(reg) low,
            wide = out(reg) wide,
            out("xmm1") _,
            out("xmm2") _,
            options(nomem, nostack)
        )
    };
    // movd to an XMM register zero-extends to the whole register.
    let ok = full == 0x1234_5678 && low == 0x1234_5678 && wide == 0x0123_4567_89ab_cdef;
    if !ok {
        w.str("got ")
            .hex(full)
            .str(" ")
            .hex(u64::from(low))
            .str(" ")
            .hex(wide);
    }
    verdict(ok)
}

fn movdqu(w: &mut Writer) -> Outcome {
    let mut src = [0u8; 32];
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let mut dst = [0u8; 32];
    // SAFETY: unaligned 16-byte load from src[1..17] and store to dst[3..19], both in bounds.
    unsafe {
        asm!(
            "movdqu xmm3, [{s}]",
            "movdqu [{d}], xmm3",
            s = in(reg) src.as_ptr().add(1),
            d = in(reg) dst.as_mut_ptr().add(3),
            out("xmm3") _,
            options(nostack)
        )
    };
    let ok = dst[3..19] == src[1..17] && dst[..3].iter().chain(&dst[19..]).all(|&b| b == 0);
    if !ok {
        w.str("destination does not match");
    }
    verdict(ok)
}

#[repr(C, align(16))]
struct Pair([u64; 2]);

/// `lock cmpxchg16b` on `m`: returns (ZF, RAX, RDX) afterwards.
fn cmpxchg16b_once(
    m: &mut Pair,
    expect_lo: u64,
    expect_hi: u64,
    new_lo: u64,
    new_hi: u64,
) -> (bool, u64, u64) {
    let (lo, hi): (u64, u64);
    let zf: u8;
    // SAFETY: m is 16-byte aligned; RBX is reserved by the compiler, so the new low half is
    // swapped into it around the instruction.
    unsafe {
        asm!(
            "xchg {nlo}, rbx",
            "lock cmpxchg16b [{p}]",
            "sete {zf}",
            "xchg {nlo}, rbx",
            p = in(reg) m.0.as_mut_ptr(),
            nlo = inout(reg) new_lo => _,
            in("rcx") new_hi,
            inout("rax") expect_lo => lo,
            inout("rdx") expect_hi => hi,
            zf = out(reg_byte) zf,
            options(nostack)
        )
    };
    (zf == 1, lo, hi)
}

fn cmpxchg16b(w: &mut Writer) -> Outcome {
    if cpuid(1, 0).ecx & (1 << 13) == 0 {
        return Outcome::Skipped("no CX16");
    }
    let mut m = Pair([0x1111, 0x2222]);
    // Success: memory matches RDX:RAX, so RCX:RBX is stored and ZF set.
    let (ok1, lo1, hi1) = cmpxchg16b_once(&mut m, 0x1111, 0x2222, 0x3333, 0x4444);
    let mem1 = [m.0[0], m.0[1]];
    // Failure: memory differs, so it is loaded into RDX:RAX, left unchanged, and ZF cleared.
    let (ok2, lo2, hi2) = cmpxchg16b_once(&mut m, 0xbeef, 0xdead, 0x5555, 0x6666);
    let mem2 = [m.0[0], m.0[1]];
    let success_ok = ok1 && lo1 == 0x1111 && hi1 == 0x2222 && mem1 == [0x3333, 0x4444];
    let failure_ok = !ok2 && lo2 == 0x3333 && hi2 == 0x4444 && mem2 == [0x3333, 0x4444];
    if !success_ok {
        w.str("success case: zf=")
            .dec(u64::from(ok1))
            .str(" rdx:rax=")
            .hex(hi1)
            .str(":")
            .hex(lo1)
            .str(" mem=")
            .hex(mem1[1])
            .str(":")
            .hex(mem1[0])
            .str(" ");
    }
    if !failure_ok {
        w.str("failure case: zf=")
            .dec(u64::from(ok2))
            .str(" rdx:rax=")
            .hex(hi2)
            .str(":")
            .hex(lo2)
            .str(" mem=")
            .hex(mem2[1])
            .str(":")
            .hex(mem2[0]);
    }
    verdict(success_ok && failure_ok)
}

#[repr(C, align(64))]
struct XsaveArea([u8; 4096]);

static XSAVE_AREA: Global<XsaveArea> = Global::new(XsaveArea([0; 4096]));

const PATTERN: u64 = 0x5eed_f00d_cafe_d00d;

fn read_u64(area: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(area[off..off + 8].try_into().unwrap_or([0; 8]))
}

fn has_xsave() -> bool {
    cpuid(1, 0).ecx & (1 << 26) != 0
}

/// CR4.OSXSAVE on, XCR0 = x87 | SSE (always a valid value).
fn enable_xsave() {
    // SAFETY: OSXSAVE only enables the XSAVE family and XGETBV/XSETBV; XCR0 = 3 is valid on
    // every XSAVE-capable CPU.
    unsafe {
        write_cr4(read_cr4() | CR4_OSXSAVE);
        asm!("xsetbv", in("ecx") 0, in("eax") 3, in("edx") 0, options(nomem, nostack));
    }
}

fn xgetbv(w: &mut Writer) -> Outcome {
    if !has_xsave() {
        return Outcome::Skipped("no XSAVE");
    }
    enable_xsave();
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV with ECX = 0 reads XCR0; OSXSAVE is set.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    let xcr0 = (u64::from(hi) << 32) | u64::from(lo);
    if xcr0 != 3 {
        w.str("xcr0=").hex(xcr0);
    }
    verdict(xcr0 == 3)
}

fn xsave_xrstor(w: &mut Writer) -> Outcome {
    if !has_xsave() {
        return Outcome::Skipped("no XSAVE");
    }
    enable_xsave();
    let size = cpuid(0xd, 0).ebx as usize;
    if !(576..=4096).contains(&size) {
        w.str("area size=").dec(size as u64);
        return Outcome::Fail;
    }
    // SAFETY: single CPU; nothing else uses the area.
    let area = unsafe { &mut (*XSAVE_AREA.get()).0 };
    area.fill(0);
    let restored: u64;
    // SAFETY: the area is 64-byte aligned, large enough for XCR0 = 3, and zeroed (a valid
    // header) before xsave writes it; xrstor reads back what xsave wrote.
    unsafe {
        asm!(
            "movq xmm4, {pat}",
            "xsave [{a}]",
            "movq xmm4, {zero}",
            "xrstor [{a}]",
            "movq {out}, xmm4",
            a = in(reg) area.as_mut_ptr(),
            pat = in(reg) PATTERN,
            zero = in(reg) 0_u64,
            out = lateout(reg) restored,
            in("eax") 3,
            in("edx") 0,
            out("xmm4") _,
            options(nostack)
        )
    };
    let saved = read_u64(area, 160 + 4 * 16);
    let xstate_bv = read_u64(area, 512);
    let ok = restored == PATTERN && saved == PATTERN && xstate_bv & 2 != 0;
    if !ok {
        w.str("restored=")
            .hex(restored)
            .str(" saved=")
            .hex(saved)
            .str(" xstate_bv=")
            .hex(xstate_bv);
    }
    verdict(ok)
}

fn fxsave_fxrstor(w: &mut Writer) -> Outcome {
    // SAFETY: single CPU; nothing else uses the area.
    let area = unsafe { &mut (*XSAVE_AREA.get()).0 };
    area[..512].fill(0);
    let restored: u64;
    // SAFETY: the area is 16-byte aligned and 512 bytes long at least.
    unsafe {
        asm!(
            "movq xmm5, {pat}",
            "fxsave [{a}]",
            "movq xmm5, {zero}",
            "fxrstor [{a}]",
            "movq {out}, xmm5",
            a = in(reg) area.as_mut_ptr(),
            pat = in(reg) PATTERN,
            zero = in(reg) 0_u64,
            out = lateout(reg) restored,
            out("xmm5") _,
            options(nostack)
        )
    };
    let saved = read_u64(area, 160 + 5 * 16);
    let mxcsr = u32::from_le_bytes([area[24], area[25], area[26], area[27]]);
    let ok = restored == PATTERN && saved == PATTERN && mxcsr == 0x1f80;
    if !ok {
        w.str("restored=")
            .hex(restored)
            .str(" saved=")
            .hex(saved)
            .str(" mxcsr=")
            .hex(u64::from(mxcsr));
    }
    verdict(ok)
}
