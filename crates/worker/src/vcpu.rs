//! One VP's thread: runs the VP and dispatches its intercepts.

use crate::{quirks, StopReason, Stats};
use devices::IoBus;
use hypervisor::kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP};
use hypervisor::{Intercept, Vp};
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_SFMASK: u32 = 0xc000_0084;
const RFLAGS_RF: u64 = 1 << 16;

pub struct VpContext {
    pub bus: Arc<IoBus>,
    pub mem: Arc<GuestMemoryMmap>,
    pub syscall_fixup: bool,
}

/// Work that needs the VP after the intercept's borrow of it ends.
enum Deferred {
    None,
    SetLstar(u64),
    Quirk(Option<([u8; 15], usize)>),
    Debug(u64),
}

/// Runs until the VM stops; returns why (if this VP caused the stop) and its counters.
pub fn run_vp(mut vp: Vp, ctx: VpContext, stopped: &dyn Fn() -> bool) -> (Option<StopReason>, Stats) {
    let mut stats = Stats::default();
    let mut lstar: Option<u64> = None;
    let index = vp.index();
    loop {
        let mut deferred = Deferred::None;
        let r = match vp.run() {
            Ok(i) => i,
            Err(e) => return (Some(StopReason::HostFailure(format!("VP {index}: {e}"))), stats),
        };
        match r {
            Intercept::IoIn { port, data } => {
                stats.io_exits += 1;
                if !ctx.bus.read(port, data) {
                    stats.unclaimed_io += 1;
                }
            }
            Intercept::IoOut { port, data } => {
                stats.io_exits += 1;
                if !ctx.bus.write(port, data) {
                    stats.unclaimed_io += 1;
                }
            }
            Intercept::MmioRead { data, .. } => {
                stats.mmio_exits += 1;
                data.fill(0xff);
            }
            Intercept::MmioWrite { .. } => stats.mmio_exits += 1,
            Intercept::MsrRead { error, .. } => {
                stats.msr_exits += 1;
                *error = 1; // unknown MSR: #GP, as hardware
            }
            Intercept::MsrWrite { index: msr, value, error } => {
                stats.msr_exits += 1;
                if msr == MSR_LSTAR && ctx.syscall_fixup {
                    *error = 0;
                    deferred = Deferred::SetLstar(value);
                } else {
                    *error = 1;
                }
            }
            Intercept::Halt => std::thread::sleep(std::time::Duration::from_millis(1)),
            Intercept::Shutdown => {
                let rip = vp.regs().map(|r| r.rip).unwrap_or(0);
                return (Some(StopReason::TripleFault { vp: index, rip }), stats);
            }
            Intercept::EmulationFailure { insn } => deferred = Deferred::Quirk(insn),
            Intercept::Debug { pc, .. } => deferred = Deferred::Debug(pc),
            Intercept::Cancelled => {
                if stopped() {
                    return (None, stats);
                }
                vp.clear_cancel();
            }
            Intercept::SystemEvent { kind } => {
                return (
                    Some(match kind {
                        1 => StopReason::PowerOff,
                        2 => StopReason::Reboot,
                        k => StopReason::GuestFailure(format!("system event {k} on VP {index}")),
                    }),
                    stats,
                )
            }
            Intercept::FailEntry { reason } => {
                return (
                    Some(StopReason::GuestFailure(format!(
                        "VM entry failed on VP {index} (hardware reason {reason:#x})"
                    ))),
                    stats,
                )
            }
            Intercept::InternalError { suberror, data } => {
                return (
                    Some(StopReason::GuestFailure(format!(
                        "KVM internal error {suberror} on VP {index} ({data:x?}){}",
                        regs_line(&vp)
                    ))),
                    stats,
                )
            }
            Intercept::Other(what) => {
                return (
                    Some(StopReason::GuestFailure(format!(
                        "unexpected exit {what} on VP {index}{}",
                        regs_line(&vp)
                    ))),
                    stats,
                )
            }
        }
        let result = match deferred {
            Deferred::None => Ok(()),
            Deferred::SetLstar(v) => {
                lstar = Some(v);
                set_lstar(&vp, v)
            }
            Deferred::Quirk(insn) => match quirks::handle(&vp, &ctx.mem, insn, &mut stats.quirks) {
                Ok(()) => Ok(()),
                Err(m) => {
                    return (
                        Some(StopReason::GuestFailure(format!("VP {index}: {m}{}", regs_line(&vp)))),
                        stats,
                    )
                }
            },
            Deferred::Debug(pc) => {
                if lstar == Some(pc) {
                    stats.syscall_fixups += 1;
                }
                syscall_fixup(&vp, pc, lstar)
            }
        };
        if let Err(e) = result {
            return (Some(StopReason::HostFailure(format!("VP {index}: {e}"))), stats);
        }
    }
}

fn regs_line(vp: &Vp) -> String {
    match (vp.regs(), vp.sregs()) {
        (Ok(r), Ok(s)) => format!(
            " [rip={:#x} rsp={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}]",
            r.rip, r.rsp, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => String::new(),
    }
}

/// The guest wrote LSTAR: do the write and put an execute breakpoint on the entry point so that
/// every SYSCALL exits to us there.
fn set_lstar(vp: &Vp, v: u64) -> hypervisor::Result<()> {
    vp.set_msrs(&[(MSR_LSTAR, v)])?;
    let mut dbg = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = v;
    dbg.arch.debugreg[7] = 0x1 | (1 << 10); // L0, execute, 1 byte; bit 10 reads as 1
    vp.set_guest_debug(&dbg)
}

/// At the SYSCALL entry point: if the CPU left CS at CPL 3 (this host's bug), finish the
/// architectural SYSCALL ourselves — CS/SS from STAR[47:32], RFLAGS masked by SFMASK — and
/// continue at the guest's entry point. Either way, resume with RF set so the breakpoint does
/// not fire again on the same instruction.
fn syscall_fixup(vp: &Vp, pc: u64, lstar: Option<u64>) -> hypervisor::Result<()> {
    let mut regs = vp.regs()?;
    if lstar == Some(pc) {
        let mut sregs = vp.sregs()?;
        if sregs.cs.selector & 3 == 3 || sregs.cs.dpl == 3 {
            let v = vp.get_msrs(&[MSR_STAR, MSR_SFMASK])?;
            let (star, fmask) = (v[0], v[1]);
            let kcs = ((star >> 32) & 0xfffc) as u16;
            sregs.cs.selector = kcs;
            sregs.cs.dpl = 0;
            sregs.cs.type_ = 11;
            sregs.cs.l = 1;
            sregs.cs.db = 0;
            sregs.cs.s = 1;
            sregs.cs.present = 1;
            sregs.cs.g = 1;
            sregs.cs.base = 0;
            sregs.cs.limit = 0xffff_ffff;
            sregs.ss.selector = kcs + 8;
            sregs.ss.dpl = 0;
            sregs.ss.type_ = 3;
            sregs.ss.db = 1;
            sregs.ss.s = 1;
            sregs.ss.present = 1;
            sregs.ss.g = 1;
            sregs.ss.base = 0;
            sregs.ss.limit = 0xffff_ffff;
            vp.set_sregs(&sregs)?;
            regs.rflags &= !fmask;
        }
    }
    regs.rflags |= RFLAGS_RF | 2;
    vp.set_regs(&regs)
}
