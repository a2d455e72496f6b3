//! `test=hyperv`: the Hyper-V synthetic interface as an enlightened guest sees it (the VMM's
//! `hv1`): CPUID signature and hints, GUEST_OS_ID, the hypercall page and two hypercalls,
//! TIME_REF_COUNT and the reference TSC page. Prints one line per check and a verdict:
//! `hyperv: ok`, `hyperv: FAIL`, or `hyperv: absent` when the CPUID signature is missing
//! (a VM run with `--no-enlightenments`).

use crate::io::{cpuid, rdmsr, wrmsr};
use crate::serial::Writer;
use crate::Global;

const GUEST_OS_ID: u32 = 0x4000_0000;
const HYPERCALL: u32 = 0x4000_0001;
const VP_INDEX: u32 = 0x4000_0002;
const TIME_REF_COUNT: u32 = 0x4000_0020;
const REFERENCE_TSC: u32 = 0x4000_0021;

#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

pub static HYPERCALL_PAGE: Global<Page> = Global::new(Page([0; 4096]));
static TSC_PAGE: Global<Page> = Global::new(Page([0; 4096]));

fn check(w: &mut Writer, name: &str, ok: bool, fails: &mut u32) {
    w.str(name).str(if ok { ": ok\n" } else { ": FAIL\n" });
    if !ok {
        *fails += 1;
    }
}

/// Calls the hypercall page: RCX = control, RDX = input (or fast argument), R8 = output.
pub fn hypercall(control: u64, input: u64) -> u64 {
    let status: u64;
    let page = HYPERCALL_PAGE.get() as u64;
    // SAFETY: the page was filled by the VMM when we enabled the HYPERCALL MSR; it clobbers
    // only RAX by the hv1 contract (and the call clobbers what the C ABI allows).
    unsafe {
        core::arch::asm!(
            "call {page}",
            page = in(reg) page,
            inout("rcx") control => _,
            inout("rdx") input => _,
            in("r8") 0u64,
            out("rax") status,
            out("r9") _, out("r10") _, out("r11") _,
        );
    }
    status & 0xffff
}

pub fn run() {
    let mut w = Writer::lock();
    let sig = cpuid(0x4000_0000, 0);
    if sig.ebx != u32::from_le_bytes(*b"Micr") || sig.ecx != u32::from_le_bytes(*b"osof") {
        w.str("hyperv: absent\n");
        return;
    }
    let mut fails = 0;
    let iface = cpuid(0x4000_0001, 0);
    check(&mut w, "interface Hv#1", iface.eax == u32::from_le_bytes(*b"Hv#1"), &mut fails);
    let feats = cpuid(0x4000_0003, 0);
    let needed = (1 << 1) | (1 << 5) | (1 << 6) | (1 << 9); // TIME_REF_COUNT, HYPERCALL, VP_INDEX, REF_TSC
    check(&mut w, "privileges", feats.eax & needed == needed && feats.ebx & 1 == 0, &mut fails);
    let hints = cpuid(0x4000_0004, 0);
    check(&mut w, "deprecated-AutoEOI hint", hints.eax & (1 << 9) != 0, &mut fails);
    // SAFETY: synthetic MSRs of the VMM's hv1; writes only configure this VM's interface.
    unsafe {
        check(&mut w, "vp index", rdmsr(VP_INDEX) == 0, &mut fails);
        wrmsr(GUEST_OS_ID, 0x8100_0000_0000_0000 | 0x0601);
        wrmsr(HYPERCALL, HYPERCALL_PAGE.get() as u64 | 1);
        let page = &*HYPERCALL_PAGE.get();
        check(&mut w, "hypercall page written", page.0[0] != 0, &mut fails);
        check(&mut w, "hypercall msr enabled", rdmsr(HYPERCALL) & 1 == 1, &mut fails);
    }
    // An unknown call code: HV_STATUS_INVALID_HYPERCALL_CODE (2).
    check(&mut w, "unknown hypercall refused", hypercall(0x7fff, 0) == 2, &mut fails);
    // HvSignalEvent (fast) to a connection nobody offers: HV_STATUS_INVALID_CONNECTION_ID.
    check(&mut w, "signal event without vmbus", hypercall(0x5d | (1 << 16), 99) == 0x12, &mut fails);
    // SAFETY: as above.
    let (t1, t2, page_ok) = unsafe {
        let t1 = rdmsr(TIME_REF_COUNT);
        for _ in 0..2000 {
            core::hint::spin_loop();
        }
        let t2 = rdmsr(TIME_REF_COUNT);
        wrmsr(REFERENCE_TSC, TSC_PAGE.get() as u64 | 1);
        let p = &*(TSC_PAGE.get() as *const [u64; 512]);
        let (seq, scale, offset) = (p[0] as u32, p[1], p[2] as i64);
        let tsc = core::arch::x86_64::_rdtsc();
        let page_time = ((u128::from(tsc) * u128::from(scale)) >> 64) as i64 + offset;
        let msr_time = rdmsr(TIME_REF_COUNT) as i64;
        // Within 10 ms of guest time of each other (the two reads are not simultaneous).
        (t1, t2, seq != 0 && (page_time - msr_time).abs() < 100_000)
    };
    check(&mut w, "reference counter advances", t2 > t1, &mut fails);
    check(&mut w, "tsc page agrees with the counter", page_ok, &mut fails);
    w.str(if fails == 0 { "hyperv: ok\n" } else { "hyperv: FAIL\n" });
}
