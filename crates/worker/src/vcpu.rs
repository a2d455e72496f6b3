//! One VP's thread: runs the VP and dispatches its intercepts.

use crate::{quirks, Stats, StopReason};
use devices::IoBus;
use hypervisor::{Intercept, Vp};
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;

use crate::trampoline::MSR_LSTAR;
const RFLAGS_RF: u64 = 1 << 16;

pub struct VpContext {
    pub bus: Arc<IoBus>,
    pub mem: Arc<GuestMemoryMmap>,
    /// Installed when this host's SYSCALL is broken (see [`crate::trampoline`]).
    pub syscall_fixup: Option<Arc<crate::trampoline::Trampoline>>,
    /// The synthetic interface, in an enlightened partition.
    pub enlightened: Option<Arc<crate::enlightened::Enlightened>>,
}

/// Work that needs the VP after the intercept's borrow of it ends.
enum Deferred {
    None,
    SetLstar(u64),
    Quirk(Option<([u8; 15], usize)>),
    Debug,
    Trampoline,
    Hypercall,
}

/// Runs until the VM stops; returns why (if this VP caused the stop) and its counters.
/// What a VP thread asks of the VM around it.
pub trait VmState {
    /// The VM is stopping: return.
    fn stopped(&self) -> bool;
    /// A counter bumped when every VP should report its registers (diagnostics).
    fn sample(&self) -> u64;
    /// Blocks while the VM is paused (returns at once otherwise).
    fn wait_while_paused(&self);
    /// Where this VP publishes its counters for live readers.
    fn publish(&self, vp: u32, stats: &Stats);
}

pub fn run_vp(mut vp: Vp, ctx: VpContext, vm: &dyn VmState) -> (Option<StopReason>, Stats) {
    let mut stats = Stats::default();
    let mut exits: u32 = 0;
    let mut seen_sample = 0;
    let index = vp.index();
    loop {
        exits = exits.wrapping_add(1);
        if exits.is_multiple_of(1024) {
            vm.publish(index, &stats);
        }
        let mut deferred = Deferred::None;
        let r = match vp.run() {
            Ok(i) => i,
            Err(e) => {
                return (
                    Some(StopReason::HostFailure(format!("VP {index}: {e}"))),
                    stats,
                )
            }
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
                if port == hv1::Hv1::HYPERCALL_PORT
                    && data.len() == 1
                    && ctx
                        .enlightened
                        .as_ref()
                        .is_some_and(|e| e.hv.hypercalls_enabled())
                {
                    deferred = Deferred::Hypercall;
                } else if !ctx.bus.write(port, data) {
                    stats.unclaimed_io += 1;
                }
            }
            Intercept::MmioRead { gpa, data } => {
                stats.mmio_exits += 1;
                if gpa == crate::layout::TRAMPOLINE_MMIO && ctx.syscall_fixup.is_some() {
                    data.fill(0);
                    deferred = Deferred::Trampoline;
                } else {
                    data.fill(0xff);
                }
            }
            Intercept::MmioWrite { .. } => stats.mmio_exits += 1,
            Intercept::MsrRead {
                index: msr,
                value,
                error,
            } => {
                stats.msr_exits += 1;
                match ctx
                    .enlightened
                    .as_ref()
                    .and_then(|e| e.hv.rdmsr(index, msr))
                {
                    Some(v) => {
                        *value = v;
                        *error = 0;
                    }
                    None => *error = 1, // unknown MSR: #GP, as hardware
                }
            }
            Intercept::MsrWrite {
                index: msr,
                value,
                error,
            } => {
                stats.msr_exits += 1;
                if msr == MSR_LSTAR && ctx.syscall_fixup.is_some() {
                    *error = 0;
                    deferred = Deferred::SetLstar(value);
                } else if let Some(e) = &ctx.enlightened {
                    *error = u8::from(e.hv.wrmsr(index, msr, value, &e.ram, &e.irq).is_err());
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
            Intercept::Debug { .. } => deferred = Deferred::Debug,
            Intercept::Cancelled => {
                if vm.stopped() {
                    vm.publish(index, &stats);
                    return (None, stats);
                }
                vp.clear_cancel();
                vm.wait_while_paused();
                vm.publish(index, &stats);
                let now = vm.sample();
                if now != seen_sample {
                    seen_sample = now;
                    eprintln!(
                        "verdigris: sample VP {index}:{} {}",
                        regs_line(&vp),
                        stats.report()
                    );
                }
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
            Deferred::SetLstar(v) => match &ctx.syscall_fixup {
                Some(t) => t.guest_wrote_lstar(&vp, &ctx.mem, v),
                None => Ok(()),
            },
            Deferred::Quirk(insn) => match quirks::handle(&vp, &ctx.mem, insn, &mut stats.quirks) {
                Ok(()) => Ok(()),
                Err(m) => {
                    return (
                        Some(StopReason::GuestFailure(format!(
                            "VP {index}: {m}{}",
                            regs_line(&vp)
                        ))),
                        stats,
                    )
                }
            },
            Deferred::Debug => resume_after_debug(&vp),
            Deferred::Hypercall => match &ctx.enlightened {
                Some(e) => {
                    stats.hypercalls += 1;
                    hypercall(&mut vp, e)
                }
                None => Ok(()),
            },
            Deferred::Trampoline => match &ctx.syscall_fixup {
                Some(t) => {
                    stats.syscall_fixups += 1;
                    t.finish_syscall(&mut vp)
                }
                None => Ok(()),
            },
        };
        if let Err(e) = result {
            return (
                Some(StopReason::HostFailure(format!("VP {index}: {e}"))),
                stats,
            );
        }
    }
}

fn regs_line(vp: &Vp) -> String {
    match (vp.regs(), vp.sregs()) {
        (Ok(r), Ok(s)) => format!(
            " [rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}{}]",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer, lapic_line(vp)
        ),
        _ => String::new(),
    }
}

/// The VP's run state and the LAPIC registers that matter when interrupts go missing.
fn lapic_line(vp: &Vp) -> String {
    let (Ok(mp), Ok(l)) = (vp.mp_state(), vp.lapic()) else {
        return String::new();
    };
    let reg = |off: usize| {
        let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    format!(
        " mp_state={} apic_id={:#x} svr={:#x} icr={:#x}:{:#x} esr={:#x} lvtt={:#x} tpr={:#x}",
        mp.mp_state,
        reg(0x20) >> 24,
        reg(0xf0),
        reg(0x310),
        reg(0x300),
        reg(0x280),
        reg(0x320),
        reg(0x80)
    )
}

/// The hypercall page's `out` exited: finish it, run the hypercall, return the status in RAX.
fn hypercall(vp: &mut Vp, e: &crate::enlightened::Enlightened) -> hypervisor::Result<()> {
    vp.complete_pending()?;
    let mut regs = vp.regs()?;
    let mut h = hv1::HypercallRegs {
        rax: regs.rax,
        rcx: regs.rcx,
        rdx: regs.rdx,
        r8: regs.r8,
    };
    if e.hv.hypercall(vp.index(), &mut h, &e.ram, &*e.handler) {
        regs.rax = h.rax;
        vp.set_regs(&regs)?;
    }
    Ok(())
}

/// A debug exit we did not ask for: resume past it.
fn resume_after_debug(vp: &Vp) -> hypervisor::Result<()> {
    let mut regs = vp.regs()?;
    regs.rflags |= RFLAGS_RF | 2;
    vp.set_regs(&regs)
}
