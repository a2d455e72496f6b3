//! Direct Linux boot: loading a bzImage (decompressing its payload on the host when we can) or
//! an ELF kernel, the zero page, the initrd, the boot page tables and the 64-bit entry state.
//!
//! Host decompression: the in-guest decompressor is ring-0 code, which our hosts emulate at about
//! 1 µs per instruction (≈100 s for a distribution kernel). When the bzImage payload uses gzip,
//! xz, lzma, lz4 or zstd, the worker decompresses it, loads the resulting vmlinux ELF at its
//! physical addresses and enters `startup_64` directly; otherwise it loads the bzImage as is.

use crate::layout::*;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use std::io::{Cursor, Read};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0}")]
    Invalid(String),
    #[error("loading the kernel failed: {0}")]
    Load(String),
    #[error("guest memory: {0}")]
    Memory(String),
}

/// How the kernel was loaded.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    pub entry: u64,
    pub end: u64,
    /// The bzImage setup header, for the zero page (None for plain ELF kernels).
    pub setup_header: Option<setup_header>,
    pub description: String,
}

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"

/// Recognises the image type: `Some(true)` bzImage, `Some(false)` ELF, `None` neither.
pub fn kernel_kind(image: &[u8]) -> Option<bool> {
    if image.len() >= 0x250
        && u32::from_le_bytes(image[0x202..0x206].try_into().ok()?) == HDRS_MAGIC
        && u16::from_le_bytes(image[0x1fe..0x200].try_into().ok()?) == 0xaa55
    {
        Some(true)
    } else if image.len() >= 64 && &image[..4] == b"\x7fELF" {
        Some(false)
    } else {
        None
    }
}

fn read_setup_header(image: &[u8]) -> setup_header {
    let mut hdr = setup_header::default();
    let n = std::mem::size_of::<setup_header>().min(image.len() - 0x1f1);
    // SAFETY: setup_header is a packed plain-old-data struct with no invalid bit patterns; we
    // copy at most its size from a slice we bounds-checked.
    unsafe {
        std::ptr::copy_nonoverlapping(
            image[0x1f1..].as_ptr(),
            (&mut hdr as *mut setup_header).cast::<u8>(),
            n,
        );
    }
    hdr
}

/// Decompresses a bzImage payload; returns (vmlinux ELF bytes, format name).
pub fn decompress_payload(payload: &[u8]) -> Result<(Vec<u8>, &'static str), String> {
    let mut out = Vec::new();
    let fmt = if payload.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(payload)
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip: {e}"))?;
        "gzip"
    } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        lzma_rs::xz_decompress(&mut Cursor::new(payload), &mut out)
            .map_err(|e| format!("xz: {e:?}"))?;
        "xz"
    } else if payload.starts_with(&[0x5d, 0, 0]) {
        lzma_rs::lzma_decompress(&mut Cursor::new(payload), &mut out)
            .map_err(|e| format!("lzma: {e:?}"))?;
        "lzma"
    } else if payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        out = lz4_legacy(payload)?;
        "lz4"
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut d = ruzstd::decoding::StreamingDecoder::new(Cursor::new(payload))
            .map_err(|e| format!("zstd: {e}"))?;
        d.read_to_end(&mut out).map_err(|e| format!("zstd: {e}"))?;
        "zstd"
    } else {
        return Err("unknown payload compression".into());
    };
    Ok((out, fmt))
}

/// The LZ4 "legacy" frame the kernel build uses: magic, then (u32 size, block) pairs, each block
/// inflating to at most 8 MiB; the build appends the 4-byte uncompressed size at the end.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, String> {
    const MAGIC: u32 = 0x184c_2102;
    const CHUNK: usize = 8 << 20;
    let mut out = Vec::new();
    let mut p = 4;
    while data.len() - p >= 4 {
        let size = u32::from_le_bytes(data[p..p + 4].try_into().unwrap_or_default());
        p += 4;
        if size == MAGIC {
            continue;
        }
        let size = size as usize;
        if size > data.len() - p {
            break; // the appended uncompressed size
        }
        let block = lz4_flex::block::decompress(&data[p..p + size], CHUNK)
            .map_err(|e| format!("lz4: {e}"))?;
        out.extend_from_slice(&block);
        p += size;
    }
    if out.is_empty() {
        return Err("lz4: no data".into());
    }
    Ok(out)
}

fn load_elf(mem: &GuestMemoryMmap, elf: &[u8]) -> Result<(u64, u64), BootError> {
    let r = Elf::load(
        mem,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(HIGH_MEMORY)),
    )
    .map_err(|e| BootError::Load(format!("ELF: {e}")))?;
    let entry = r.kernel_load.0;
    Ok((entry, r.kernel_end))
}

/// Loads `image` into guest memory.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    image: &[u8],
    host_decompress: bool,
) -> Result<LoadedKernel, BootError> {
    match kernel_kind(image) {
        Some(false) => {
            let (entry, end) = load_elf(mem, image)?;
            Ok(LoadedKernel {
                entry,
                end,
                setup_header: None,
                description: "ELF kernel".into(),
            })
        }
        Some(true) => {
            let hdr = read_setup_header(image);
            let version = hdr.version;
            let xloadflags = hdr.xloadflags;
            if version < 0x020c || xloadflags & 1 == 0 {
                return Err(BootError::Invalid(format!(
                    "bzImage boot protocol {}.{:02} lacks a 64-bit entry point (need 2.12+)",
                    version >> 8,
                    version & 0xff
                )));
            }
            let setup_sects = match hdr.setup_sects {
                0 => 4,
                n => usize::from(n),
            };
            let pm_start = (setup_sects + 1) * 512;
            if host_decompress {
                let off = pm_start + hdr.payload_offset as usize;
                let len = hdr.payload_length as usize;
                if let Some(payload) = image.get(off..off.saturating_add(len)) {
                    match decompress_payload(payload) {
                        Ok((vmlinux, fmt)) if kernel_kind(&vmlinux) == Some(false) => {
                            let (entry, end) = load_elf(mem, &vmlinux)?;
                            return Ok(LoadedKernel {
                                entry,
                                end,
                                setup_header: Some(hdr),
                                description: format!(
                                    "bzImage, {fmt} payload decompressed on the host ({} MiB)",
                                    vmlinux.len() >> 20
                                ),
                            });
                        }
                        Ok(_) => {
                            tracing::warn!("bzImage payload is not an ELF; guest decompresses")
                        }
                        Err(e) => {
                            tracing::warn!("host decompression failed ({e}); guest decompresses")
                        }
                    }
                }
            }
            let r = BzImage::load(
                mem,
                None,
                &mut Cursor::new(image),
                Some(GuestAddress(HIGH_MEMORY)),
            )
            .map_err(|e| BootError::Load(format!("bzImage: {e}")))?;
            Ok(LoadedKernel {
                entry: r.kernel_load.0 + 0x200,
                end: r.kernel_end,
                setup_header: Some(r.setup_header.unwrap_or(hdr)),
                description: "bzImage, decompressed by the guest".into(),
            })
        }
        None => Err(BootError::Invalid(
            "the kernel is neither a bzImage nor an ELF executable".into(),
        )),
    }
}

/// Places the initrd at the top of low RAM; returns (gpa, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    memory: u64,
    initrd: &[u8],
    kernel_end: u64,
    addr_max: u32,
) -> Result<(u64, u64), BootError> {
    let low_end = memory.min(LOW_RAM_MAX);
    let limit = if addr_max == 0 {
        0x37ff_ffff
    } else {
        u64::from(addr_max)
    };
    let top = low_end.min(limit + 1);
    let size = initrd.len() as u64;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end);
    let addr = addr.ok_or_else(|| {
        BootError::Invalid(format!(
            "the initrd ({} MiB) does not fit in guest memory above the kernel; give the VM more memory",
            size >> 20
        ))
    })?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok((addr, size))
}

/// setup_data type of a random seed for the guest kernel's RNG (arch/x86/include/uapi/asm/bootparam.h).
const SETUP_RNG_SEED: u32 = 9;

/// 32 bytes from the host's RNG, fresh for every boot; None if the host has no /dev/urandom.
fn host_random_seed() -> Option<[u8; 32]> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .ok()?;
    Some(seed)
}

/// Writes the zero page, the command line, the e820 map and a random seed (setup_data).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    memory: u64,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Invalid(
            "the kernel command line is too long".into(),
        ));
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Invalid(
            "the kernel command line contains a NUL byte".into(),
        ));
    }
    let mut bp = boot_params::default();
    if let Some(h) = kernel.setup_header {
        bp.hdr = h;
    }
    bp.hdr.boot_flag = 0xaa55;
    bp.hdr.header = HDRS_MAGIC;
    bp.hdr.type_of_loader = 0xff;
    bp.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH | CAN_USE_HEAP
    bp.hdr.heap_end_ptr = 0xfe00;
    bp.hdr.cmd_line_ptr = CMDLINE as u32;
    bp.hdr.cmdline_size = cmdline.len() as u32 + 1;
    if bp.hdr.kernel_alignment == 0 {
        bp.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initrd {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
    }
    bp.acpi_rsdp_addr = rsdp;
    // A random seed for the guest's RNG (setup_data type SETUP_RNG_SEED, as a firmware or
    // QEMU provides): without RDRAND (hidden here) the kernel's CRNG would otherwise gather
    // entropy from interrupt timing, which costs minutes of emulated ring 0 on slow hosts.
    if let Some(seed) = host_random_seed() {
        let mut sd = Vec::with_capacity(16 + seed.len());
        sd.extend_from_slice(&0u64.to_le_bytes()); // next: none
        sd.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
        sd.extend_from_slice(&(seed.len() as u32).to_le_bytes());
        sd.extend_from_slice(&seed);
        mem.write_slice(&sd, GuestAddress(SETUP_DATA))
            .map_err(|e| BootError::Memory(e.to_string()))?;
        bp.hdr.setup_data = SETUP_DATA;
    }
    let map = e820(memory);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    bp.e820_entries = map.len() as u8;
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(CMDLINE))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    mem.write_obj(bp, GuestAddress(ZERO_PAGE))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(())
}

pub const GDT: [u64; 5] = [
    0,                     // null
    0,                     // unused
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // 0x18: data, DPL 0
    0x0080_8b00_0000_0067, // 0x20: 64-bit TSS (busy), base 0
];

/// Writes the GDT and the identity-mapping page tables (4 GiB, 2 MiB pages).
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|e| BootError::Memory(e.to_string()))
    };
    for (i, d) in GDT.iter().enumerate() {
        w(*d, GDT_ADDR + 8 * i as u64)?;
    }
    w(PDPT | 0x03, PML4)?;
    for i in 0..4u64 {
        w((PD0 + i * 0x1000) | 0x03, PDPT + i * 8)?;
        for j in 0..512u64 {
            let addr = (i << 30) | (j << 21);
            w(addr | 0x83, PD0 + i * 0x1000 + j * 8)?;
        }
    }
    Ok(())
}

/// Flat ring-0 segments: 64-bit code at `code_selector` and data at `code_selector + 8` (the
/// layout SYSCALL assumes for STAR[47:32]).
pub fn flat_kernel_segments(
    code_selector: u16,
) -> (
    hypervisor::kvm_bindings::kvm_segment,
    hypervisor::kvm_bindings::kvm_segment,
) {
    let code = hypervisor::kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: code_selector,
        type_: 11,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = hypervisor::kvm_bindings::kvm_segment {
        selector: code_selector + 8,
        type_: 3,
        l: 0,
        db: 1,
        ..code
    };
    (code, data)
}

/// The BSP's register state at the 64-bit entry point.
pub fn entry_registers(
    sregs: &mut hypervisor::kvm_bindings::kvm_sregs,
    regs: &mut hypervisor::kvm_bindings::kvm_regs,
    entry: u64,
) {
    use hypervisor::kvm_bindings::kvm_segment;
    let (code, data) = flat_kernel_segments(0x10);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x20,
        type_: 11,
        present: 1,
        s: 0,
        l: 0,
        db: 0,
        g: 0,
        dpl: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x8000_0011 | 0x20; // PG | ET | PE | NE
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.efer = 0x500; // LME | LMA
    *regs = Default::default();
    regs.rflags = 0x2;
    regs.rip = entry;
    regs.rsi = ZERO_PAGE;
    regs.rsp = 0x8ff0;
    regs.rbp = 0x8ff0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_image_kinds() {
        assert_eq!(kernel_kind(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"), Some(false));
        assert_eq!(kernel_kind(b"hello"), None);
        let mut bz = vec![0u8; 0x300];
        bz[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_kind(&bz), Some(true));
    }

    #[test]
    fn old_boot_protocol_is_refused() {
        let mut bz = vec![0u8; 0x1000];
        bz[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let e = load_kernel(&mem, &bz, true).unwrap_err();
        assert!(e.to_string().contains("2.06"), "{e}");
    }

    #[test]
    fn decompressors_round_trip() {
        use std::io::Write;
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let (out, fmt) = decompress_payload(&gz.finish().unwrap()).unwrap();
        assert_eq!((out == data, fmt), (true, "gzip"));
        // lz4 legacy framing: magic, one block, trailing size.
        let block = lz4_flex::block::compress(&data);
        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz.extend_from_slice(&block);
        lz.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let (out, fmt) = decompress_payload(&lz).unwrap();
        assert_eq!((out == data, fmt), (true, "lz4"));
        assert!(decompress_payload(b"garbage").is_err());
        assert!(decompress_payload(&[0x02, 0x21, 0x4c, 0x18, 5, 0, 0, 0, 1, 2, 3, 4, 5]).is_err());
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT);
        let pde: u64 = mem
            .read_obj(GuestAddress(PD0 + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(pde & !0x1fffff, 0xffe0_0000);
        assert_eq!(pde & 0x83, 0x83);
    }

    #[test]
    fn boot_params_carry_a_fresh_rng_seed() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let kernel = LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
            description: String::new(),
        };
        let seed = |mem: &GuestMemoryMmap| {
            write_boot_params(mem, 32 << 20, &kernel, "console=ttyS0", None, 0xe0000).unwrap();
            let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
            let at = bp.hdr.setup_data;
            assert_eq!(at, SETUP_DATA);
            let next: u64 = mem.read_obj(GuestAddress(at)).unwrap();
            let kind: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 12)).unwrap();
            assert_eq!((next, kind, len), (0, SETUP_RNG_SEED, 32));
            let mut s = [0u8; 32];
            mem.read_slice(&mut s, GuestAddress(at + 16)).unwrap();
            s
        };
        let (a, b) = (seed(&mem), seed(&mem));
        assert_ne!(a, b, "every boot gets its own seed");
        assert_ne!(a, [0u8; 32]);
        // The seed is inside RAM the e820 map gives the kernel (it reserves setup_data itself).
        assert!(e820(32 << 20)
            .iter()
            .any(|(addr, size, kind)| *kind == E820_RAM
                && *addr <= SETUP_DATA
                && SETUP_DATA + 48 <= addr + size));
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let (a, s) = load_initrd(&mem, 32 << 20, &[7u8; 5000], 2 << 20, 0).unwrap();
        assert_eq!(s, 5000);
        assert!(a + s <= 32 << 20 && a % 4096 == 0 && a > 30 << 20);
        assert!(load_initrd(&mem, 32 << 20, &vec![0u8; 31 << 20], 2 << 20, 0).is_err());
    }
}
