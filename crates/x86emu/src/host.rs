//! Helpers that run on the host CPU, for the worker's [`Cpu`](crate::Cpu) implementation.
//!
//! The guest sees the host's CPUID leaf 0xD, so the host's XSAVE layout is the guest's; and a
//! locked compare-exchange the guest asked for must be done atomically on the guest RAM that
//! the VMM maps (other vCPUs run concurrently), which only the host instruction can do.

use crate::XstateComponent;

/// Layout of XSAVE state component `component` (2..63) per the host's CPUID.(EAX=0DH, ECX=i),
/// or `None` if the host does not support it.
#[cfg(target_arch = "x86_64")]
pub fn xstate_layout(component: u32) -> Option<XstateComponent> {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    if !(2..63).contains(&component) || __cpuid(0).eax < 0xd {
        return None;
    }
    let supported = {
        let r = __cpuid_count(0xd, 0);
        let s = __cpuid_count(0xd, 1);
        (u64::from(r.edx) << 32 | u64::from(r.eax)) | (u64::from(s.edx) << 32 | u64::from(s.ecx))
    };
    if supported & (1 << component) == 0 {
        return None;
    }
    let r = __cpuid_count(0xd, component);
    (r.eax != 0).then_some(XstateComponent {
        offset: r.ebx,
        size: r.eax,
        align64: r.ecx & 2 != 0,
    })
}

/// `lock cmpxchg16b` on host memory: if `*ptr == expected` store `new`. Returns the value
/// found (equal to `expected` on success).
///
/// # Safety
/// `ptr` must be valid for reads and writes of 16 bytes and 16-byte aligned (guest RAM mapped
/// by the VMM qualifies once the guest address passed the emulator's alignment check, since
/// mappings are page-granular).
#[cfg(target_arch = "x86_64")]
pub unsafe fn cmpxchg16b(ptr: *mut u128, expected: u128, new: u128) -> u128 {
    let mut lo = expected as u64;
    let mut hi = (expected >> 64) as u64;
    // SAFETY: the caller guarantees `ptr` is valid and aligned. RBX cannot be an asm operand
    // (LLVM reserves it), so the new low half is swapped into RBX around the instruction and
    // RBX is restored before the block ends.
    unsafe {
        // RBX holds the new low half but is reserved by LLVM, so it is swapped in and out by
        // hand. The pointer and the value must be in fixed registers: a `reg` operand may be
        // allocated RBX itself, and the swap would then destroy it.
        core::arch::asm!(
            "xchg rsi, rbx",
            "lock cmpxchg16b xmmword ptr [rdi]",
            "mov rbx, rsi",
            in("rdi") ptr,
            inout("rsi") new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") lo,
            inout("rdx") hi,
            options(nostack),
        );
    }
    (u128::from(hi) << 64) | u128::from(lo)
}

/// `lock cmpxchg8b` on host memory: if `*ptr == expected` store `new`. Returns the value
/// found. `ptr` need not be aligned (a split lock, slow, and refused by hosts that enforce
/// split-lock detection).
///
/// # Safety
/// `ptr` must be valid for reads and writes of 8 bytes.
#[cfg(target_arch = "x86_64")]
pub unsafe fn cmpxchg8b(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    let mut lo = expected as u32;
    let mut hi = (expected >> 32) as u32;
    // SAFETY: the caller guarantees `ptr` is valid; RBX is swapped and restored as in
    // `cmpxchg16b`.
    unsafe {
        // See `cmpxchg16b` for why the registers are fixed.
        core::arch::asm!(
            "xchg rsi, rbx",
            "lock cmpxchg8b qword ptr [rdi]",
            "mov rbx, rsi",
            in("rdi") ptr,
            inout("rsi") u64::from(new as u32) => _,
            in("ecx") (new >> 32) as u32,
            inout("eax") lo,
            inout("edx") hi,
            options(nostack),
        );
    }
    (u64::from(hi) << 32) | u64::from(lo)
}
