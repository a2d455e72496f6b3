//! Host probing: what this machine's KVM does to guests, measured rather than assumed.
//!
//! One tiny probe partition (2 MiB, one VP) answers three questions at worker start:
//! 1. How fast is guest ring-0 code? (a counted loop at CPL 0, timed) — decides the default
//!    guest time scale.
//! 2. Does `SYSCALL` from ring 3 reach ring 0? (a CPL-3 `syscall`; the landing instruction
//!    exits to us and we read CS) — decides whether the SYSCALL fix-up is installed.
//! 3. Which CPUID features leak through our policy? (CPUID executed by the probe with our
//!    policy installed) — decides the kernel parameters that hide them from Linux.

use crate::cpuid;
use hypervisor::kvm_bindings::{kvm_regs, kvm_segment};
use hypervisor::{Hypervisor, Intercept, MapFlags, PartitionConfig};
use std::time::Instant;

/// What the probe found.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// Wall nanoseconds per guest ring-0 instruction (roughly).
    pub ring0_ns_per_insn: f64,
    /// SYSCALL from CPL 3 leaves CS at CPL 3.
    pub syscall_broken: bool,
    /// Features our CPUID policy clears but the guest still sees.
    pub leaked_features: Vec<&'static str>,
    /// The guest TSC frequency KVM runs at, kHz.
    pub tsc_khz: u32,
}

impl HostFacts {
    /// Hosts where guest ring 0 is emulated (≥ 50 ns per instruction; real VT-x is ~1 ns).
    pub fn slow_ring0(&self) -> bool {
        self.ring0_ns_per_insn >= 50.0
    }

    /// The default guest time scale for this host.
    pub fn default_time_scale(&self) -> f64 {
        if self.slow_ring0() {
            0.1
        } else {
            1.0
        }
    }
}

const CODE: u64 = 0x1000;
const LSTAR_TARGET: u64 = 0x1800;
const LOOP_CODE: u64 = 0x2000;
const LOOPS: u32 = 2000;

fn seg(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Runs the probe.
pub fn probe(hv: &Hypervisor) -> Result<HostFacts, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: hypervisor::Error| format!("host probe: {what}: {err}")
    };
    let part = hv
        .create_partition(&PartitionConfig {
            in_kernel_irqchip: false,
            in_kernel_pit: false,
            user_space_msr_exits: false,
        })
        .map_err(e("create partition"))?;
    let size = 2 << 20;
    // SAFETY: an anonymous private mapping of `size` bytes; checked for failure below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("host probe: cannot allocate memory".into());
    }
    struct Unmap(*mut libc::c_void, usize);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping created above, after the partition is gone.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
    let guard = Unmap(mem, size);
    // SAFETY: `mem` is a fresh mapping of `size` bytes, exclusively ours.
    let m = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), size) };
    let put =
        |m: &mut [u8], at: u64, b: &[u8]| m[at as usize..at as usize + b.len()].copy_from_slice(b);
    // GDT: null, -, kernel code 0x10, kernel data 0x18, -, user data 0x28, user code 0x30.
    let gdt: [u64; 7] = [
        0,
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        put(m, 0x500 + 8 * i as u64, &d.to_le_bytes());
    }
    // Page tables with the user bit: PML4 0x9000 → PDPT 0xa000 → PD 0xb000.. (4 GiB, 2 MiB).
    put(m, 0x9000, &(0xa000u64 | 7).to_le_bytes());
    for i in 0..4u64 {
        put(
            m,
            0xa000 + 8 * i,
            &((0xb000 + i * 0x1000) | 7).to_le_bytes(),
        );
        for j in 0..512u64 {
            put(
                m,
                0xb000 + i * 0x1000 + j * 8,
                &((i << 30 | j << 21) | 0x87).to_le_bytes(),
            );
        }
    }
    let load_al = [0x8a, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40]; // mov al, [0x40000000]
                                                              // Ring-3 code: cpuid(1) → r8/r9, cpuid(7) → r12/r13, syscall.
    let mut code = vec![
        0xb8, 1, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2, 0x49, 0x89, 0xc8, 0x49, 0x89, 0xd1,
    ];
    code.extend_from_slice(&[
        0xb8, 7, 0, 0, 0, 0x31, 0xc9, 0x0f, 0xa2, 0x49, 0x89, 0xdc, 0x49, 0x89, 0xcd,
    ]);
    code.extend_from_slice(&[0x0f, 0x05]);
    put(m, CODE, &code);
    put(m, LSTAR_TARGET, &load_al);
    // Ring-0 loop: mov ecx, LOOPS; 1: dec ecx; jnz 1b; mov al, [MMIO].
    let mut lp = vec![0xb9];
    lp.extend_from_slice(&LOOPS.to_le_bytes());
    lp.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]);
    lp.extend_from_slice(&load_al);
    put(m, LOOP_CODE, &lp);

    // SAFETY: `mem` stays mapped until `guard` drops, after `part` (declared earlier, dropped
    // later in reverse order... so drop the partition explicitly first, below).
    unsafe { part.map_gpa(0, mem.cast(), size as u64, MapFlags::default()) }
        .map_err(e("map memory"))?;
    let mut vp = part.create_vp(0).map_err(e("create VP"))?;
    let supported = hv.supported_cpuid().map_err(e("supported CPUID"))?;
    vp.set_cpuid(&cpuid::policy(&supported, 0))
        .map_err(e("set CPUID"))?;
    let tsc_khz = vp.tsc_khz().unwrap_or(0);

    let mut sregs = vp.sregs().map_err(e("get sregs"))?;
    sregs.gdt.base = 0x500;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.tr = kvm_segment {
        limit: 0x67,
        selector: 0x20,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.cr0 = 0x8000_0031;
    sregs.cr3 = 0x9000;
    sregs.cr4 = 0x20;
    sregs.efer = 0x501; // LME | LMA | SCE

    // 1. Ring-0 speed.
    let k = seg(0x10, true, 0);
    let kd = seg(0x18, false, 0);
    let mut s0 = sregs;
    s0.cs = k;
    (s0.ds, s0.es, s0.fs, s0.gs, s0.ss) = (kd, kd, kd, kd, kd);
    vp.set_sregs(&s0).map_err(e("set sregs"))?;
    vp.set_regs(&kvm_regs {
        rip: LOOP_CODE,
        rflags: 2,
        rsp: 0x8000,
        ..Default::default()
    })
    .map_err(e("set regs"))?;
    let t0 = Instant::now();
    let ns = match vp.run().map_err(e("run"))? {
        Intercept::MmioRead { data, .. } => {
            data.fill(0);
            t0.elapsed().as_nanos() as f64
        }
        other => return Err(format!("host probe: ring-0 loop ended with {other:?}")),
    };
    let ring0_ns_per_insn = ns / f64::from(2 * LOOPS + 2);
    vp.complete_pending().map_err(e("complete"))?;

    // 2 + 3. CPUID and SYSCALL from ring 3.
    vp.set_msrs(&[
        (0xc000_0081, 0x0010u64 << 32 | 0x0020u64 << 48), // STAR
        (0xc000_0082, LSTAR_TARGET),                      // LSTAR
        (0xc000_0084, 0x4700),                            // SFMASK
    ])
    .map_err(e("set MSRs"))?;
    let u = seg(0x33, true, 3);
    let ud = seg(0x2b, false, 3);
    let mut s3 = sregs;
    s3.cs = u;
    (s3.ds, s3.es, s3.fs, s3.gs, s3.ss) = (ud, ud, ud, ud, ud);
    vp.set_sregs(&s3).map_err(e("set sregs"))?;
    vp.set_regs(&kvm_regs {
        rip: CODE,
        rflags: 2,
        rsp: 0x8000,
        ..Default::default()
    })
    .map_err(e("set regs"))?;
    let (syscall_broken, leaked) = match vp.run().map_err(e("run"))? {
        Intercept::MmioRead { data, .. } => {
            data.fill(0);
            let cs = vp.sregs().map_err(e("get sregs"))?.cs;
            let r = vp.regs().map_err(e("get regs"))?;
            let leaf1 = [0, 0, r.r8 as u32, r.r9 as u32];
            let leaf7 = [0, r.r12 as u32, r.r13 as u32, 0];
            let leaked = cpuid::HIDDEN
                .iter()
                .filter(|f| cpuid::has(if f.leaf == 1 { leaf1 } else { leaf7 }, f))
                .map(|f| f.name)
                .collect();
            (cs.selector & 3 == 3 || cs.dpl == 3, leaked)
        }
        other => return Err(format!("host probe: ring-3 syscall ended with {other:?}")),
    };
    drop(vp);
    drop(part);
    drop(guard);
    Ok(HostFacts {
        ring0_ns_per_insn,
        syscall_broken,
        leaked_features: leaked,
        tsc_khz,
    })
}

/// Kernel parameters a Linux guest needs on this host, each group (space-separated) with the
/// reason (logged at start). A parameter the user sets on the command line wins.
pub fn linux_requirements(facts: &HostFacts, time_scale: f64) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let leaked = &facts.leaked_features;
    if leaked.contains(&"xsave") {
        v.push((
            "noxsave".to_string(),
            "KVM here cannot hide XSAVE and cannot emulate XSAVE-family state switches".to_string(),
        ));
    }
    let rest: Vec<&str> = leaked
        .iter()
        .copied()
        .filter(|n| {
            !matches!(
                *n,
                "xsave" | "osxsave" | "avx" | "avx2" | "avx512f" | "fma" | "f16c"
            )
        })
        .collect();
    if !rest.is_empty() {
        v.push((
            format!("clearcpuid={}", rest.join(",")),
            "KVM here cannot hide these features and cannot emulate their instructions in ring 0"
                .to_string(),
        ));
    }
    if facts.tsc_khz > 0 {
        let khz = (f64::from(facts.tsc_khz) / time_scale).round() as u64;
        v.push((
            format!("tsc_early_khz={khz}"),
            format!(
                "guest time runs at {time_scale}x wall time; the TSC the guest sees ticks at {} kHz of wall time",
                facts.tsc_khz
            ),
        ));
    }
    if facts.slow_ring0() {
        // Guest kernel code never runs on the CPU here: KVM's emulator executes it, and the
        // host clears CPU buffers and predictors on its own VM entries. The kernel's
        // mitigations for speculation in its own code therefore protect nothing, yet each
        // costs emulated instructions on every system call (BHB-clearing loop, return thunks)
        // or an emulation exit (VERW on every return to user space). Protections between guest
        // user processes (IBPB, SSBD), which run natively, stay on.
        v.push((
            "mds=off tsx_async_abort=off mmio_stale_data=off reg_file_data_sampling=off \
             spectre_bhi=off indirect_target_selection=off"
                .to_string(),
            "guest ring 0 is emulated here, so the kernel's mitigations for speculation in \
             its own code protect nothing and cost an exit or a loop on every system call"
                .to_string(),
        ));
        v.push((
            "cryptomgr.notests".to_string(),
            "guest ring 0 is emulated here; crypto self-tests would take minutes".to_string(),
        ));
    }
    v
}

/// Appends the host's kernel parameters to a user's command line, skipping every parameter the
/// user set (the user's value wins). Returns the line and one note per group added.
pub fn add_kernel_params(cmdline: &str, reqs: &[(String, String)]) -> (String, Vec<String>) {
    let key = |w: &str| w.split('=').next().unwrap_or(w).to_string();
    let user: Vec<String> = cmdline.split_whitespace().map(key).collect();
    let mut line = cmdline.trim().to_string();
    let mut notes = Vec::new();
    for (params, why) in reqs {
        let add: Vec<&str> = params
            .split_whitespace()
            .filter(|p| !user.contains(&key(p)))
            .collect();
        if add.is_empty() {
            continue;
        }
        let add = add.join(" ");
        let plural = if add.contains(' ') { "s" } else { "" };
        notes.push(format!("adding kernel parameter{plural} {add}: {why}"));
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&add);
    }
    (line, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow_host() -> HostFacts {
        HostFacts {
            ring0_ns_per_insn: 2000.0,
            syscall_broken: true,
            leaked_features: vec!["xsave", "ssse3", "popcnt"],
            tsc_khz: 2_500_000,
        }
    }

    #[test]
    fn slow_hosts_get_the_parameters_and_the_user_keeps_their_own_values() {
        let reqs = linux_requirements(&slow_host(), 0.1);
        let (line, notes) = add_kernel_params("console=ttyS0 mds=full noxsave", &reqs);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..3], ["console=ttyS0", "mds=full", "noxsave"]);
        // The user's mds=full and noxsave are not overridden or repeated.
        assert_eq!(words.iter().filter(|w| w.starts_with("mds=")).count(), 1);
        assert_eq!(words.iter().filter(|w| **w == "noxsave").count(), 1);
        for want in [
            "clearcpuid=ssse3,popcnt",
            "tsc_early_khz=25000000",
            "mmio_stale_data=off",
            "indirect_target_selection=off",
            "cryptomgr.notests",
        ] {
            assert!(words.contains(&want), "{want} missing from {line}");
        }
        assert!(notes
            .iter()
            .all(|n| n.starts_with("adding kernel parameter")));
        assert!(!notes.iter().any(|n| n.contains("noxsave")), "{notes:?}");
    }

    #[test]
    fn fast_hosts_keep_the_kernels_mitigations() {
        let fast = HostFacts {
            ring0_ns_per_insn: 1.0,
            syscall_broken: false,
            leaked_features: Vec::new(),
            tsc_khz: 0,
        };
        let (line, notes) = add_kernel_params("console=ttyS0", &linux_requirements(&fast, 1.0));
        assert_eq!(line, "console=ttyS0");
        assert!(notes.is_empty());
    }
}
