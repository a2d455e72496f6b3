//! Emulation failures: KVM's instruction emulator could not execute an instruction (this host
//! emulates guest ring 0), so `x86emu` does it against this VP's state.

use hypervisor::kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use hypervisor::Vp;
use iced_x86::Register;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use x86emu::{Cpu, FpuState, MemFault, Mode, Outcome, QuirkCounters};

/// Handles one emulation failure; Err stops the VM with the message.
pub fn handle(
    vp: &Vp,
    mem: &GuestMemoryMmap,
    insn: Option<([u8; 15], usize)>,
    counters: &mut QuirkCounters,
) -> Result<(), String> {
    let mut cpu = KvmCpu::load(vp, mem).map_err(|e| e.to_string())?;
    let bytes = match insn {
        Some((b, n)) if n > 0 => b[..n].to_vec(),
        _ => {
            // KVM did not pass the bytes: fetch them at CS:RIP.
            let at = cpu.segment_base(Register::CS).wrapping_add(cpu.regs.rip);
            let mut b = [0u8; 15];
            let mut n = 0;
            while n < 15 && cpu.read_mem(at + n as u64, &mut b[n..n + 1]).is_ok() {
                n += 1;
            }
            b[..n].to_vec()
        }
    };
    let outcome = x86emu::emulate(&mut cpu, &bytes);
    counters.record(&outcome);
    match outcome {
        Outcome::Done(_) => cpu.commit().map_err(|e| e.to_string()),
        Outcome::Exception { exception, .. } => {
            cpu.commit().map_err(|e| e.to_string())?;
            if let Some(cr2) = exception.cr2 {
                let mut s = vp.sregs().map_err(|e| e.to_string())?;
                s.cr2 = cr2;
                vp.set_sregs(&s).map_err(|e| e.to_string())?;
            }
            vp.inject_exception(exception.vector, exception.error_code)
                .map_err(|e| e.to_string())
        }
        Outcome::Unsupported(m) => Err(format!(
            "instruction KVM cannot emulate and we do not handle: {m} (bytes {bytes:02x?})"
        )),
    }
}

struct KvmCpu<'a> {
    vp: &'a Vp,
    mem: &'a GuestMemoryMmap,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: Option<kvm_xsave>,
    xsave_dirty: bool,
    xcr0: Option<u64>,
}

impl<'a> KvmCpu<'a> {
    fn load(vp: &'a Vp, mem: &'a GuestMemoryMmap) -> hypervisor::Result<Self> {
        Ok(Self {
            vp,
            mem,
            regs: vp.regs()?,
            sregs: vp.sregs()?,
            xsave: None,
            xsave_dirty: false,
            xcr0: None,
        })
    }

    fn commit(&mut self) -> hypervisor::Result<()> {
        self.vp.set_regs(&self.regs)?;
        if self.xsave_dirty {
            if let Some(x) = &self.xsave {
                self.vp.set_xsave(x)?;
            }
        }
        Ok(())
    }

    fn xs(&mut self) -> &mut [u8] {
        if self.xsave.is_none() {
            self.xsave = Some(self.vp.xsave().unwrap_or_default());
        }
        let x = self.xsave.as_mut().expect("loaded above");
        // SAFETY: `region` is a plain [u32; 1024] array; viewing it as 4096 bytes is sound.
        unsafe { std::slice::from_raw_parts_mut(x.region.as_mut_ptr().cast::<u8>(), 4096) }
    }

    fn xs_get(&mut self, off: usize, len: usize) -> u128 {
        let mut b = [0u8; 16];
        b[..len].copy_from_slice(&self.xs()[off..off + len]);
        u128::from_le_bytes(b)
    }

    fn xs_set(&mut self, off: usize, len: usize, v: u128, component: u32) {
        let bytes = v.to_le_bytes();
        let x = self.xs();
        x[off..off + len].copy_from_slice(&bytes[..len]);
        let bv = u64::from_le_bytes(x[512..520].try_into().unwrap_or_default()) | (1 << component);
        x[512..520].copy_from_slice(&bv.to_le_bytes());
        self.xsave_dirty = true;
    }

    fn gpr_slot(&mut self, r: Register) -> Option<&mut u64> {
        let r = r.full_register();
        Some(match r {
            Register::RAX => &mut self.regs.rax,
            Register::RBX => &mut self.regs.rbx,
            Register::RCX => &mut self.regs.rcx,
            Register::RDX => &mut self.regs.rdx,
            Register::RSI => &mut self.regs.rsi,
            Register::RDI => &mut self.regs.rdi,
            Register::RSP => &mut self.regs.rsp,
            Register::RBP => &mut self.regs.rbp,
            Register::R8 => &mut self.regs.r8,
            Register::R9 => &mut self.regs.r9,
            Register::R10 => &mut self.regs.r10,
            Register::R11 => &mut self.regs.r11,
            Register::R12 => &mut self.regs.r12,
            Register::R13 => &mut self.regs.r13,
            Register::R14 => &mut self.regs.r14,
            Register::R15 => &mut self.regs.r15,
            _ => return None,
        })
    }

    /// Walks one page: GVA → GPA with permission check.
    fn translate(&self, gva: u64, write: bool) -> Result<u64, MemFault> {
        let user = u32::from(self.cpl() == 3) << 2;
        let w = u32::from(write) << 1;
        match self.vp.translate(gva) {
            Ok(Some((gpa, writeable))) => {
                if write && !writeable {
                    Err(MemFault::PageFault {
                        address: gva,
                        error_code: 1 | w | user,
                    })
                } else {
                    Ok(gpa)
                }
            }
            Ok(None) => Err(MemFault::PageFault {
                address: gva,
                error_code: w | user,
            }),
            Err(e) => Err(MemFault::Unhandled(format!("translating {gva:#x}: {e}"))),
        }
    }

    fn access(
        &mut self,
        gva: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), String>,
    ) -> Result<(), MemFault> {
        let mut done = 0;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let chunk = ((4096 - (va & 0xfff)) as usize).min(len - done);
            let gpa = self.translate(va, write)?;
            f(gpa, done, chunk).map_err(MemFault::Unhandled)?;
            done += chunk;
        }
        Ok(())
    }
}

impl Cpu for KvmCpu<'_> {
    fn gpr(&self, reg: Register) -> u64 {
        let mut me = KvmCpuRef(self.regs);
        me.get(reg)
    }
    fn set_gpr(&mut self, reg: Register, value: u64) {
        if let Some(s) = self.gpr_slot(reg) {
            *s = value;
        }
    }
    fn rip(&self) -> u64 {
        self.regs.rip
    }
    fn set_rip(&mut self, value: u64) {
        self.regs.rip = value;
    }
    fn rflags(&self) -> u64 {
        self.regs.rflags
    }
    fn set_rflags(&mut self, value: u64) {
        self.regs.rflags = value | 2;
    }
    fn mode(&self) -> Mode {
        Mode::from_state(
            self.sregs.cr0,
            self.regs.rflags,
            self.sregs.efer,
            self.sregs.cs.l != 0,
            self.sregs.cs.db != 0,
        )
    }
    fn cpl(&self) -> u8 {
        self.sregs.cs.dpl & 3
    }
    fn cr0(&self) -> u64 {
        self.sregs.cr0
    }
    fn cr4(&self) -> u64 {
        self.sregs.cr4
    }
    fn efer(&self) -> u64 {
        self.sregs.efer
    }
    fn segment_base(&self, seg: Register) -> u64 {
        let s = &self.sregs;
        let long = self.mode() == Mode::Long64;
        match seg {
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            _ if long => 0,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            Register::ES => s.es.base,
            _ => s.ds.base,
        }
    }
    fn segment_descriptor(&mut self, selector: u16) -> Option<u64> {
        let (base, limit) = if selector & 4 != 0 {
            if self.sregs.ldt.unusable != 0 || self.sregs.ldt.present == 0 {
                return None;
            }
            (self.sregs.ldt.base, self.sregs.ldt.limit)
        } else {
            (self.sregs.gdt.base, u32::from(self.sregs.gdt.limit))
        };
        let off = u64::from(selector & !7);
        if off + 7 > u64::from(limit) {
            return None;
        }
        let mut b = [0u8; 8];
        self.read_mem(base.wrapping_add(off), &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn read_mem(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), MemFault> {
        let mem = self.mem;
        let len = buf.len();
        let mut tmp = vec![0u8; len];
        self.access(gva, len, false, |gpa, off, n| {
            mem.read_slice(&mut tmp[off..off + n], GuestAddress(gpa))
                .map_err(|_| format!("emulated read of {gpa:#x} is outside guest RAM"))
        })?;
        buf.copy_from_slice(&tmp);
        Ok(())
    }
    fn write_mem(&mut self, gva: u64, data: &[u8]) -> Result<(), MemFault> {
        let mem = self.mem;
        // Translate every page first so a fault leaves memory untouched.
        self.access(gva, data.len(), true, |_, _, _| Ok(()))?;
        self.access(gva, data.len(), true, |gpa, off, n| {
            mem.write_slice(&data[off..off + n], GuestAddress(gpa))
                .map_err(|_| format!("emulated write of {gpa:#x} is outside guest RAM"))
        })
    }
    /// Atomic for real when the operand is naturally aligned (it then lies in one page): other
    /// VPs run concurrently, so a read-then-write would lose updates.
    fn cmpxchg_mem(
        &mut self,
        gva: u64,
        size: usize,
        expected: u128,
        new: u128,
    ) -> Result<u128, MemFault> {
        if !(size == 8 || size == 16) || !gva.is_multiple_of(size as u64) {
            let mut buf = [0u8; 16];
            self.read_mem(gva, &mut buf[..size.min(16)])?;
            let found = u128::from_le_bytes(buf);
            let store = if found == expected { new } else { found };
            self.write_mem(gva, &store.to_le_bytes()[..size.min(16)])?;
            return Ok(found);
        }
        let gpa = self.translate(gva, true)?;
        let host = self.mem.get_host_address(GuestAddress(gpa)).map_err(|_| {
            MemFault::Unhandled(format!("locked access to {gpa:#x} outside guest RAM"))
        })?;
        // SAFETY: `host` points into guest RAM mapped for the VM's lifetime; the operand is
        // naturally aligned so all `size` bytes are in the same page and the same region; the
        // guest may access it concurrently, which is exactly what the locked instruction is for.
        let found = unsafe {
            if size == 16 {
                x86emu::host::cmpxchg16b(host.cast::<u128>(), expected, new)
            } else {
                u128::from(x86emu::host::cmpxchg8b(
                    host.cast::<u64>(),
                    expected as u64,
                    new as u64,
                ))
            }
        };
        Ok(found)
    }
    fn xcr0(&mut self) -> u64 {
        if self.xcr0.is_none() {
            let x = self.vp.xcrs().ok().and_then(|x| {
                x.xcrs[..x.nr_xcrs as usize]
                    .iter()
                    .find(|e| e.xcr == 0)
                    .map(|e| e.value)
            });
            self.xcr0 = Some(x.unwrap_or(1));
        }
        self.xcr0.unwrap_or(1)
    }
    fn mxcsr(&mut self) -> u32 {
        self.xs_get(24, 4) as u32
    }
    fn set_mxcsr(&mut self, value: u32) {
        self.xs_set(24, 4, u128::from(value), 1);
    }
    fn xmm(&mut self, n: usize) -> u128 {
        self.xs_get(160 + 16 * (n & 15), 16)
    }
    fn set_xmm(&mut self, n: usize, value: u128) {
        self.xs_set(160 + 16 * (n & 15), 16, value, 1);
    }
    fn ymm_high(&mut self, n: usize) -> u128 {
        self.xs_get(576 + 16 * (n & 15), 16)
    }
    fn set_ymm_high(&mut self, n: usize, value: u128) {
        self.xs_set(576 + 16 * (n & 15), 16, value, 2);
    }
    fn fpu(&mut self) -> FpuState {
        let mut st = [[0u8; 10]; 8];
        for (i, r) in st.iter_mut().enumerate() {
            r.copy_from_slice(&self.xs()[32 + 16 * i..32 + 16 * i + 10]);
        }
        FpuState {
            fcw: self.xs_get(0, 2) as u16,
            fsw: self.xs_get(2, 2) as u16,
            ftw: self.xs_get(4, 1) as u8,
            fop: self.xs_get(6, 2) as u16,
            fip: self.xs_get(8, 8) as u64,
            fcs: 0,
            fdp: self.xs_get(16, 8) as u64,
            fds: 0,
            st,
        }
    }
    fn set_fpu(&mut self, s: &FpuState) {
        self.xs_set(0, 2, u128::from(s.fcw), 0);
        self.xs_set(2, 2, u128::from(s.fsw), 0);
        self.xs_set(4, 1, u128::from(s.ftw), 0);
        self.xs_set(6, 2, u128::from(s.fop), 0);
        self.xs_set(8, 8, u128::from(s.fip), 0);
        self.xs_set(16, 8, u128::from(s.fdp), 0);
        for (i, r) in s.st.iter().enumerate() {
            let mut b = [0u8; 16];
            b[..10].copy_from_slice(r);
            self.xs_set(32 + 16 * i, 16, u128::from_le_bytes(b), 0);
        }
    }
}

/// Read-only GPR access over a copy of the registers.
struct KvmCpuRef(kvm_regs);

impl KvmCpuRef {
    fn get(&mut self, reg: Register) -> u64 {
        let r = &self.0;

        match reg.full_register() {
            Register::RAX => r.rax,
            Register::RBX => r.rbx,
            Register::RCX => r.rcx,
            Register::RDX => r.rdx,
            Register::RSI => r.rsi,
            Register::RDI => r.rdi,
            Register::RSP => r.rsp,
            Register::RBP => r.rbp,
            Register::R8 => r.r8,
            Register::R9 => r.r9,
            Register::R10 => r.r10,
            Register::R11 => r.r11,
            Register::R12 => r.r12,
            Register::R13 => r.r13,
            Register::R14 => r.r14,
            Register::R15 => r.r15,
            _ => 0,
        }
    }
}
