//! Virtual processors: registers, intercepts and cancellation.

use crate::{kvm_err, Error, Result};
use kvm_bindings::{
    kvm_fpu, kvm_guest_debug, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};

/// Why [`Vp::run`] returned: the intercept message of the TLFS, in KVM's terms.
#[derive(Debug)]
pub enum Intercept<'a> {
    /// `in` from `port`; fill `data` before running again.
    IoIn { port: u16, data: &'a mut [u8] },
    /// `out` to `port`.
    IoOut { port: u16, data: &'a [u8] },
    /// MMIO read of `gpa`; fill `data` before running again.
    MmioRead { gpa: u64, data: &'a mut [u8] },
    /// MMIO write to `gpa`.
    MmioWrite { gpa: u64, data: &'a [u8] },
    /// RDMSR of an intercepted or unknown MSR; set `value` or `error` (error → #GP).
    MsrRead {
        index: u32,
        value: &'a mut u64,
        error: &'a mut u8,
    },
    /// WRMSR of an intercepted or unknown MSR; set `error` to refuse (→ #GP).
    MsrWrite {
        index: u32,
        value: u64,
        error: &'a mut u8,
    },
    /// HLT with no in-kernel irqchip.
    Halt,
    /// Triple fault (or another reason KVM shut the VP down).
    Shutdown,
    /// KVM's instruction emulator failed; the instruction bytes at RIP, if KVM gave them.
    EmulationFailure { insn: Option<([u8; 15], usize)> },
    /// Another internal error KVM could not handle.
    InternalError { suberror: u32, data: Vec<u64> },
    /// A debug exception caught by guest debugging (breakpoints set by the VMM).
    Debug {
        exception: u32,
        pc: u64,
        dr6: u64,
        dr7: u64,
    },
    /// A system event (reset, shutdown, crash) raised inside KVM.
    SystemEvent { kind: u32 },
    /// The VP was cancelled (see [`CancelHandle`]) or a signal arrived.
    Cancelled,
    /// VM entry failed.
    FailEntry { reason: u64 },
    /// Any other exit; carries KVM's name for it.
    Other(String),
}

/// One virtual processor. Owned by exactly one thread, which calls [`Vp::run`].
pub struct Vp {
    fd: VcpuFd,
    index: u32,
    cancel: Arc<CancelState>,
}

struct CancelState {
    requested: AtomicBool,
    /// pthread id of the thread running this VP (0 = none yet).
    thread: AtomicU64,
}

/// Lets another thread make a VP's [`Vp::run`] return [`Intercept::Cancelled`] promptly, even
/// while the VP is halted inside KVM.
#[derive(Clone)]
pub struct CancelHandle(Arc<CancelState>);

thread_local! {
    /// The `immediate_exit` byte of the kvm_run page of the VP this thread runs.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {
    // Only async-signal-safe work here: a volatile byte store.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by `Vp::run` on this same thread and points into the
        // kvm_run mapping of a VP that outlives the registration (cleared on Drop).
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing a handler that only performs a volatile store; sigaction with a
        // zeroed struct and an empty mask is the documented way to do so.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl CancelHandle {
    /// Asks the VP to return from `run` with [`Intercept::Cancelled`] (now, or at its next run).
    pub fn cancel(&self) {
        self.0.requested.store(true, Ordering::SeqCst);
        let t = self.0.thread.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: `t` is the pthread id of the live thread that runs the VP (it is cleared
            // before that thread stops running it); the signal has a handler installed.
            unsafe {
                libc::pthread_kill(t as libc::pthread_t, kick_signal());
            }
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.requested.load(Ordering::SeqCst)
    }
}

impl Vp {
    pub(crate) fn new(fd: VcpuFd, index: u32, _mmap_size: usize) -> Self {
        install_kick_handler();
        Self {
            fd,
            index,
            cancel: Arc::new(CancelState {
                requested: AtomicBool::new(false),
                thread: AtomicU64::new(0),
            }),
        }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.cancel.clone())
    }

    /// Clears a previous cancellation so the VP can run again.
    pub fn clear_cancel(&self) {
        self.cancel.requested.store(false, Ordering::SeqCst);
    }

    /// Runs the VP until the next intercept.
    pub fn run(&mut self) -> Result<Intercept<'_>> {
        // Register this thread for kicks (cheap; idempotent).
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.cancel.thread.store(me, Ordering::SeqCst);
        let ie: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| c.set(ie));
        if self.cancel.requested.load(Ordering::SeqCst) {
            return Ok(Intercept::Cancelled);
        }
        // kvm-ioctls does not expose the internal-error payload: keep a pointer to read it.
        let run_page: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: `ie` points into this VP's live kvm_run page; no reference to it is
                // held (the failed run returned no exit data).
                unsafe { std::ptr::write_volatile(ie, 0) };
                return Ok(Intercept::Cancelled);
            }
            Err(e) => return Err(Error::Kvm { op: "RUN", err: e }),
        };
        Ok(match exit {
            VcpuExit::IoIn(port, data) => Intercept::IoIn { port, data },
            VcpuExit::IoOut(port, data) => Intercept::IoOut { port, data },
            VcpuExit::MmioRead(gpa, data) => Intercept::MmioRead { gpa, data },
            VcpuExit::MmioWrite(gpa, data) => Intercept::MmioWrite { gpa, data },
            VcpuExit::X86Rdmsr(m) => Intercept::MsrRead {
                index: m.index,
                value: m.data,
                error: m.error,
            },
            VcpuExit::X86Wrmsr(m) => Intercept::MsrWrite {
                index: m.index,
                value: m.data,
                error: m.error,
            },
            VcpuExit::Hlt => Intercept::Halt,
            VcpuExit::Shutdown => Intercept::Shutdown,
            VcpuExit::Debug(d) => Intercept::Debug {
                exception: d.exception,
                pc: d.pc,
                dr6: d.dr6,
                dr7: d.dr7,
            },
            VcpuExit::SystemEvent(kind, _) => Intercept::SystemEvent { kind },
            VcpuExit::Intr => Intercept::Cancelled,
            VcpuExit::FailEntry(reason, _) => Intercept::FailEntry { reason },
            VcpuExit::InternalError => {
                // SAFETY: the InternalError exit holds no reference into the kvm_run page, so
                // reading it through the pointer taken above aliases nothing; the page is live.
                internal_error(unsafe { &*run_page })
            }
            other => Intercept::Other(format!("{other:?}")),
        })
    }
}

fn internal_error(run: &kvm_bindings::kvm_run) -> Intercept<'static> {
    {
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the `internal`/`emulation_failure`
        // union members are the valid ones; both start with suberror/ndata.
        let (suberror, ndata) = unsafe {
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata)
        };
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            // SAFETY: as above, for the emulation-failure layout.
            let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
            let has_bytes = ndata >= 3
                && (ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) != 0;
            // SAFETY: the union has one member.
            let b = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            let insn = has_bytes.then(|| (b.insn_bytes, usize::from(b.insn_size).min(15)));
            return Intercept::EmulationFailure { insn };
        }
        // SAFETY: as above.
        let data = unsafe { run.__bindgen_anon_1.internal.data };
        Intercept::InternalError {
            suberror,
            data: data[..(ndata as usize).min(16)].to_vec(),
        }
    }
}

impl Vp {
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(kvm_err("GET_REGS"))
    }
    pub fn set_regs(&self, r: &kvm_regs) -> Result<()> {
        self.fd.set_regs(r).map_err(kvm_err("SET_REGS"))
    }
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(kvm_err("GET_SREGS"))
    }
    pub fn set_sregs(&self, r: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(r).map_err(kvm_err("SET_SREGS"))
    }
    pub fn fpu(&self) -> Result<kvm_fpu> {
        self.fd.get_fpu().map_err(kvm_err("GET_FPU"))
    }
    pub fn set_fpu(&self, f: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(f).map_err(kvm_err("SET_FPU"))
    }
    pub fn xsave(&self) -> Result<kvm_xsave> {
        self.fd.get_xsave().map_err(kvm_err("GET_XSAVE"))
    }
    pub fn set_xsave(&self, x: &kvm_xsave) -> Result<()> {
        // SAFETY: a kvm_xsave obtained from GET_XSAVE (or a copy of one) is the size KVM expects.
        unsafe { self.fd.set_xsave(x) }.map_err(kvm_err("SET_XSAVE"))
    }
    pub fn xcrs(&self) -> Result<kvm_xcrs> {
        self.fd.get_xcrs().map_err(kvm_err("GET_XCRS"))
    }
    pub fn set_xcrs(&self, x: &kvm_xcrs) -> Result<()> {
        self.fd.set_xcrs(x).map_err(kvm_err("SET_XCRS"))
    }
    pub fn lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(kvm_err("GET_LAPIC"))
    }
    pub fn set_lapic(&self, l: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(l).map_err(kvm_err("SET_LAPIC"))
    }
    pub fn events(&self) -> Result<kvm_vcpu_events> {
        self.fd
            .get_vcpu_events()
            .map_err(kvm_err("GET_VCPU_EVENTS"))
    }
    pub fn set_events(&self, e: &kvm_vcpu_events) -> Result<()> {
        self.fd
            .set_vcpu_events(e)
            .map_err(kvm_err("SET_VCPU_EVENTS"))
    }
    pub fn mp_state(&self) -> Result<kvm_mp_state> {
        self.fd.get_mp_state().map_err(kvm_err("GET_MP_STATE"))
    }
    pub fn set_mp_state(&self, s: kvm_mp_state) -> Result<()> {
        self.fd.set_mp_state(s).map_err(kvm_err("SET_MP_STATE"))
    }
    pub fn set_cpuid(&self, c: &CpuId) -> Result<()> {
        self.fd.set_cpuid2(c).map_err(kvm_err("SET_CPUID2"))
    }
    pub fn set_guest_debug(&self, d: &kvm_guest_debug) -> Result<()> {
        self.fd
            .set_guest_debug(d)
            .map_err(kvm_err("SET_GUEST_DEBUG"))
    }
    /// Translates a guest-virtual address with the VP's current paging state.
    pub fn translate(&self, gva: u64) -> Result<Option<(u64, bool)>> {
        let t = self.fd.translate_gva(gva).map_err(kvm_err("TRANSLATE"))?;
        Ok((t.valid != 0).then_some((t.physical_address, t.writeable != 0)))
    }

    /// Reads the MSRs listed by index; returns their values in the same order.
    pub fn get_msrs(&self, indices: &[u32]) -> Result<Vec<u64>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::Invalid("too many MSRs".into()))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(kvm_err("GET_MSRS"))?;
        if n != indices.len() {
            return Err(Error::Invalid(format!(
                "GET_MSRS read {n} of {} MSRs",
                indices.len()
            )));
        }
        Ok(msrs.as_slice().iter().map(|e| e.data).collect())
    }

    /// Writes MSRs given as (index, value).
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> = values
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::Invalid("too many MSRs".into()))?;
        let n = self.fd.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
        if n != values.len() {
            return Err(Error::Invalid(format!(
                "SET_MSRS wrote {n} of {} MSRs (first refused: {:#x})",
                values.len(),
                values[n].0
            )));
        }
        Ok(())
    }

    /// Queues an exception for injection at the next entry.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        let mut ev = self.events()?;
        // Without KVM_CAP_EXCEPTION_PAYLOAD, KVM takes exceptions as "injected".
        ev.exception.injected = 1;
        ev.exception.pending = 0;
        ev.exception.nr = vector;
        ev.exception.has_error_code = u8::from(error_code.is_some());
        ev.exception.error_code = error_code.unwrap_or(0);
        ev.flags = 0;
        self.set_events(&ev)
    }
}

impl Drop for Vp {
    fn drop(&mut self) {
        self.cancel.thread.store(0, Ordering::SeqCst);
        let ie: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|c| {
            if c.get() == ie {
                c.set(std::ptr::null_mut());
            }
        });
    }
}

impl Vp {
    /// The TSC frequency KVM gives this VP, kHz.
    pub fn tsc_khz(&self) -> Result<u32> {
        self.fd.get_tsc_khz().map_err(kvm_err("GET_TSC_KHZ"))
    }
}

impl Vp {
    /// Finishes an intercepted instruction (e.g. stores the data of an MMIO or port read)
    /// without running guest code. Call it before changing registers after an intercept, and
    /// before saving state: KVM applies the completion on the next entry.
    pub fn complete_pending(&mut self) -> Result<()> {
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(Error::Kvm {
                op: "RUN(complete)",
                err: e,
            }),
            Ok(_) => Ok(()),
        }
    }
}
