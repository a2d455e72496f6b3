//! Benchmark (a) of the foundation issue: the cost of a port-I/O exit round trip through the
//! worker, against a bare KVM loop running the same guest in the same process.
//!
//! The guest is the test guest's `ioloop`: `n` writes to port 0x3ff (COM1's scratch register)
//! in a 3-instruction loop. Each side runs n = N1 and n = N2; the per-exit cost is
//! (T(N2) - T(N1)) / (N2 - N1), so boot, probe and teardown cancel out. The bare loop does
//! nothing with the exit but resume; the worker dispatches it to the UART through its bus.
//!
//! Run: `cargo bench -p worker --bench io_exit` (builds the test guest first if needed).

use hypervisor::{Hypervisor, Intercept, MapFlags, PartitionConfig};
use std::time::Instant;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use worker::{boot, layout};

const MEM: u64 = 64 << 20;

fn bare(hv: &Hypervisor, image: &[u8], n: u64) -> f64 {
    let part = hv.create_partition(&PartitionConfig::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    for r in mem.iter() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        // SAFETY: `mem` outlives `part` (dropped at the end of this function, `part` first).
        unsafe { part.map_gpa(r.start_addr().0, host, r.len(), MapFlags::default()) }.unwrap();
    }
    let k = boot::load_kernel(&mem, image, false).unwrap();
    let (tables, rsdp) = worker::acpi::build(1, &[]).unwrap();
    for (gpa, b) in &tables {
        vm_memory::Bytes::write_slice(&mem, b, GuestAddress(*gpa)).unwrap();
    }
    boot::write_boot_params(&mem, MEM, &k, &format!("test=ioloop n={n}"), None, rsdp).unwrap();
    boot::write_page_tables(&mem).unwrap();
    let mut vp = part.create_vp(0).unwrap();
    vp.set_cpuid(&worker::cpuid::policy(&hv.supported_cpuid().unwrap(), 0))
        .unwrap();
    let mut s = vp.sregs().unwrap();
    let mut r = vp.regs().unwrap();
    boot::entry_registers(&mut s, &mut r, k.entry);
    vp.set_sregs(&s).unwrap();
    vp.set_regs(&r).unwrap();
    let t0 = Instant::now();
    loop {
        match vp.run().unwrap() {
            Intercept::IoOut { port: 0x604, .. } => break,
            Intercept::IoOut { .. } => {}
            Intercept::IoIn { data, .. } => data.fill(0xff),
            Intercept::MmioRead { data, .. } => data.fill(0xff),
            Intercept::MmioWrite { .. } => {}
            other => panic!("bare loop: unexpected {other:?}"),
        }
    }
    let t = t0.elapsed().as_secs_f64();
    drop(vp);
    drop(part);
    t
}

fn through_worker(n: u64) -> f64 {
    let t0 = Instant::now();
    let s = worker::run(worker::VmConfig {
        kernel: test_guest_build::test_guest().to_path_buf(),
        initrd: None,
        cmdline: format!("test=ioloop n={n}"),
        memory: MEM,
        cpus: 1,
        serial: worker::SerialTarget::None,
        on_reboot: worker::RebootAction::Exit,
        time_scale: None,
        host_decompress: true,
        host_kernel_params: true,
        enlightenments: false,
        vmbus_echo: false,
        control: None,
        ic: Default::default(),
        id: [0; 16],
        disks: vec![],
    })
    .unwrap();
    assert_eq!(s.reason, worker::StopReason::PowerOff);
    t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let image = std::fs::read(test_guest_build::test_guest()).expect("the test guest's ELF");
    let hv = Hypervisor::open().unwrap();
    let (n1, n2) = (10_000u64, 50_000u64);
    let reps = 5;
    let (mut b1, mut b2, mut w1, mut w2) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        // Interleaved so that drift in host speed affects both sides alike.
        b1.push(bare(&hv, &image, n1));
        w1.push(through_worker(n1));
        b2.push(bare(&hv, &image, n2));
        w2.push(through_worker(n2));
    }
    let per = |t1: f64, t2: f64| (t2 - t1) / (n2 - n1) as f64 * 1e9;
    let bare_ns = per(median(b1), median(b2));
    let worker_ns = per(median(w1), median(w2));
    println!("port-I/O exit loop iteration (out + dec + jnz), median of {reps}:");
    println!("  bare KVM loop : {bare_ns:8.0} ns");
    println!("  worker        : {worker_ns:8.0} ns");
    println!(
        "  worker overhead over KVM: {:+.1}%",
        (worker_ns - bare_ns) / bare_ns * 100.0
    );
    let _ = layout::MIN_MEMORY;
}
