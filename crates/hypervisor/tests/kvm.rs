//! The hypervisor layer against the real KVM: partitions, GPA maps, VPs, intercepts, cancel,
//! dirty tracking. Guests here are a few bytes of real-mode code.

use hypervisor::{Hypervisor, Intercept, MapFlags, MsrIntercepts, Partition, PartitionConfig};
use std::sync::Arc;

struct Ram {
    ptr: *mut u8,
    len: usize,
}

impl Ram {
    fn new(len: usize) -> Self {
        // SAFETY: anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Ram { ptr: p.cast(), len }
    }
    fn put(&self, at: usize, b: &[u8]) {
        assert!(at + b.len() <= self.len);
        // SAFETY: in bounds of our mapping.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(at), b.len()) };
    }
    fn get(&self, at: usize) -> u8 {
        assert!(at < self.len);
        // SAFETY: in bounds of our mapping.
        unsafe { *self.ptr.add(at) }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn setup(code: &[u8], irqchip: bool) -> (Partition, hypervisor::Vp, Ram) {
    let hv = Hypervisor::open().unwrap();
    let part = hv
        .create_partition(&PartitionConfig {
            in_kernel_irqchip: irqchip,
            in_kernel_pit: false,
            user_space_msr_exits: true,
        })
        .unwrap();
    let ram = Ram::new(0x10000);
    ram.put(0x1000, code);
    // SAFETY: every test drops the VP and the partition explicitly before the returned `Ram`.
    unsafe {
        part.map_gpa(
            0,
            ram.ptr,
            0x10000,
            MapFlags {
                read_only: false,
                track_dirty: true,
            },
        )
    }
    .unwrap();
    let vp = part.create_vp(0).unwrap();
    let mut s = vp.sregs().unwrap();
    s.cs.base = 0;
    s.cs.selector = 0;
    vp.set_sregs(&s).unwrap();
    let mut r = vp.regs().unwrap();
    r.rip = 0x1000;
    r.rflags = 2;
    vp.set_regs(&r).unwrap();
    (part, vp, ram)
}

#[test]
fn port_io_and_mmio_intercepts_carry_data() {
    // mov al,0x42; out 0x10,al; in al,0x20; mov [0x2000],al; mov al,[0xf000]... (0xf000 is RAM)
    // then mov bx,0x8000? real mode can only reach 1 MiB: use an unmapped GPA below it: 0x20000.
    let code = [
        0xb0, 0x42, // mov al, 0x42
        0xe6, 0x10, // out 0x10, al
        0xe4, 0x20, // in al, 0x20
        0xa2, 0x00, 0x20, // mov [0x2000], al
        0xb8, 0x00, 0x20, // mov ax, 0x2000
        0x8e, 0xd8, // mov ds, ax  (ds base 0x20000: unmapped)
        0xa0, 0x10, 0x00, // mov al, [0x10] → MMIO read at 0x20010
        0xa2, 0x20, 0x00, // mov [0x20], al → MMIO write at 0x20020
        0xf4, // hlt
    ];
    let (part, mut vp, ram) = setup(&code, false);
    match vp.run().unwrap() {
        Intercept::IoOut { port, data } => assert_eq!((port, data.to_vec()), (0x10, vec![0x42])),
        o => panic!("{o:?}"),
    }
    match vp.run().unwrap() {
        Intercept::IoIn { port, data } => {
            assert_eq!(port, 0x20);
            data[0] = 0x99;
        }
        o => panic!("{o:?}"),
    }
    match vp.run().unwrap() {
        Intercept::MmioRead { gpa, data } => {
            assert_eq!(gpa, 0x20010);
            data[0] = 0x77;
        }
        o => panic!("{o:?}"),
    }
    match vp.run().unwrap() {
        Intercept::MmioWrite { gpa, data } => {
            assert_eq!((gpa, data.to_vec()), (0x20020, vec![0x77]))
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(vp.run().unwrap(), Intercept::Halt));
    assert_eq!(ram.get(0x2000), 0x99, "the IN data reached the guest");
    // Dirty tracking saw the page the guest wrote (page 2) and the code page was not written.
    let bits = part.dirty_pages(hypervisor::MapHandle::first()).unwrap();
    assert_ne!(bits[0] & (1 << 2), 0);
    assert_eq!(bits[0] & (1 << 1), 0);
    drop(vp);
    drop(part);
}

#[test]
fn msr_intercepts_reach_user_space_and_can_refuse() {
    // mov ecx, 0xc0000082 (LSTAR); wrmsr; mov ecx, 0x40000000 (unknown); rdmsr; hlt
    let code = [
        0x66, 0xb9, 0x82, 0x00, 0x00, 0xc0, // mov ecx, 0xc0000082
        0x66, 0xb8, 0x34, 0x12, 0x00, 0x00, // mov eax, 0x1234
        0x66, 0x31, 0xd2, // xor edx, edx
        0x0f, 0x30, // wrmsr
        0x66, 0xb9, 0x00, 0x00, 0x00, 0x40, // mov ecx, 0x40000000
        0x0f, 0x32, // rdmsr
        0xf4,
    ];
    let (part, mut vp, _ram) = setup(&code, false);
    part.set_msr_intercepts(&MsrIntercepts {
        ranges: vec![hypervisor::MsrRange {
            base: 0xc000_0082,
            count: 1,
            read: false,
            write: true,
        }],
    })
    .unwrap();
    match vp.run().unwrap() {
        Intercept::MsrWrite {
            index,
            value,
            error,
        } => {
            assert_eq!((index, value), (0xc000_0082, 0x1234));
            *error = 0;
        }
        o => panic!("{o:?}"),
    }
    match vp.run().unwrap() {
        Intercept::MsrRead {
            index,
            value,
            error,
        } => {
            assert_eq!(index, 0x4000_0000);
            *value = 0xabcd;
            *error = 0;
        }
        o => panic!("{o:?}"),
    }
    assert!(matches!(vp.run().unwrap(), Intercept::Halt));
    assert_eq!(vp.regs().unwrap().rax & 0xffff, 0xabcd);
    drop(vp);
    drop(part);
}

#[test]
fn cancel_interrupts_a_halted_vp() {
    // cli; hlt; jmp $-1 — with the in-kernel irqchip HLT blocks inside KVM.
    let (part, mut vp, _ram) = setup(&[0xfa, 0xf4, 0xeb, 0xfd], true);
    let cancel = vp.cancel_handle();
    let t = std::thread::spawn(move || {
        let r = matches!(vp.run().unwrap(), Intercept::Cancelled);
        (r, vp)
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    cancel.cancel();
    let (cancelled, vp) = t.join().unwrap();
    assert!(cancelled);
    assert!(cancel.is_cancelled());
    drop(vp);
    drop(part);
}

#[test]
fn mappings_must_be_aligned_and_disjoint() {
    let hv = Hypervisor::open().unwrap();
    let part = Arc::new(hv.create_partition(&PartitionConfig::default()).unwrap());
    let ram = Ram::new(0x4000);
    // SAFETY (all three): `ram` outlives `part` (dropped explicitly below).
    let h = unsafe { part.map_gpa(0x10000, ram.ptr, 0x2000, MapFlags::default()) }.unwrap();
    assert!(unsafe { part.map_gpa(0x11000, ram.ptr, 0x1000, MapFlags::default()) }.is_err());
    assert!(unsafe { part.map_gpa(0x20001, ram.ptr, 0x1000, MapFlags::default()) }.is_err());
    part.unmap_gpa(h).unwrap();
    assert!(part.unmap_gpa(h).is_err(), "double unmap refused");
    assert!(part.create_vp(100_000).is_err());
    drop(part);
}
