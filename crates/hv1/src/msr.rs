//! Synthetic MSRs (TLFS "Hypercall Interface", "Timers", "Synthetic Interrupt Controller",
//! "Virtual Processors").

use crate::defs::{msr as m, PAGE_SIZE, SINT_COUNT};
use crate::synic::Raise;
use crate::{lock, time, GuestMemory, Hv1, InterruptSink, MsrError};
use std::sync::atomic::Ordering;

/// The hypercall page: `out $port, %al` (E6 ib), `ret` (C3), then `int3` to the end of the page
/// so a stray jump into it traps instead of running garbage.
pub(crate) const HYPERCALL_PAGE: [u8; PAGE_SIZE as usize] = {
    let mut page = [0xcc; PAGE_SIZE as usize];
    page[0] = 0xe6;
    page[1] = Hv1::HYPERCALL_PORT as u8;
    page[2] = 0xc3;
    page
};

/// Whether `value` may be stored in a SINTx register: a vector below 16 is refused unless
/// the source is masked (the reset value is "masked, vector 0", and guests write it back).
pub(crate) fn sint_value_ok(value: u64) -> bool {
    value & m::SINT_MASKED != 0 || value & m::SINT_VECTOR_MASK >= m::FIRST_VALID_VECTOR
}

impl Hv1 {
    /// Reads synthetic MSR `msr` on VP `vp`. `None` means "not a synthetic MSR hv1 implements"
    /// (or `vp` out of range): the caller injects #GP unless another handler owns it.
    pub fn rdmsr(&self, vp: u32, msr: u32) -> Option<u64> {
        let state = self.vp(vp)?;
        Some(match msr {
            m::GUEST_OS_ID => lock(&self.partition).guest_os_id,
            m::HYPERCALL => lock(&self.partition).hypercall,
            m::VP_INDEX => vp as u64,
            m::TIME_REF_COUNT => self.reference_time(),
            m::REFERENCE_TSC => lock(&self.partition).reference_tsc,
            m::TSC_FREQUENCY => self.timebase.guest_tsc_hz,
            m::APIC_FREQUENCY => self.timebase.apic_hz,
            m::VP_ASSIST_PAGE => lock(state).vp_assist,
            m::SCONTROL => lock(state).scontrol,
            m::SVERSION => m::SYNIC_VERSION,
            m::SIEFP => lock(state).siefp,
            m::SIMP => lock(state).simp,
            m::EOM => 0, // write-only; reads return 0
            m::SINT0..=m::SINT15 => lock(state).sint[(msr - m::SINT0) as usize],
            _ => return None,
        })
    }

    /// Writes synthetic MSR `msr` on VP `vp`. `Err` means: inject #GP(0), the register is
    /// unchanged. `mem` is needed by the registers that make the hypervisor write guest pages
    /// (HYPERCALL, REFERENCE_TSC) or deliver queued messages (EOM, SIMP, SCONTROL, SINTx);
    /// `irq` raises the SINT vectors of messages delivered by this write.
    pub fn wrmsr(
        &self,
        vp: u32,
        msr: u32,
        value: u64,
        mem: &dyn GuestMemory,
        irq: &dyn InterruptSink,
    ) -> Result<(), MsrError> {
        let Some(state) = self.vp(vp) else {
            return Err(MsrError::Unhandled(msr));
        };
        let mem_err = |source| MsrError::Memory { msr, source };
        match msr {
            m::GUEST_OS_ID => {
                let mut p = lock(&self.partition);
                p.guest_os_id = value;
                // Hypercalls need a registered guest OS: clearing the id disables them.
                if value == 0 {
                    p.hypercall &= !m::ENABLE;
                }
            }
            m::HYPERCALL => {
                let mut p = lock(&self.partition);
                if p.hypercall & m::HYPERCALL_LOCKED != 0 {
                    return Ok(()); // immutable until reset: the write is ignored
                }
                let mut v = value;
                if p.guest_os_id == 0 {
                    v &= !m::ENABLE; // cannot enable before the guest OS id is set
                }
                if v & m::ENABLE != 0 {
                    mem.write(v & m::PAGE_MASK, &HYPERCALL_PAGE)
                        .map_err(mem_err)?;
                }
                p.hypercall = v;
            }
            m::REFERENCE_TSC => {
                let mut p = lock(&self.partition);
                let mut sequence = p.tsc_sequence;
                if value & m::ENABLE != 0 {
                    sequence = time::next_sequence(sequence);
                    let offset = self.offset.load(Ordering::Acquire);
                    self.write_tsc_page(mem, value & m::PAGE_MASK, sequence, offset)
                        .map_err(mem_err)?;
                }
                p.tsc_sequence = sequence;
                p.reference_tsc = value;
            }
            m::VP_INDEX
            | m::TIME_REF_COUNT
            | m::TSC_FREQUENCY
            | m::APIC_FREQUENCY
            | m::SVERSION => return Err(MsrError::ReadOnly(msr)),
            m::VP_ASSIST_PAGE => lock(state).vp_assist = value,
            m::SCONTROL | m::SIEFP | m::SIMP | m::EOM | m::SINT0..=m::SINT15 => {
                if (m::SINT0..=m::SINT15).contains(&msr) && !sint_value_ok(value) {
                    return Err(MsrError::InvalidValue { msr, value });
                }
                let mut raise = Raise::default();
                {
                    let mut s = lock(state);
                    let retry = match msr {
                        m::SCONTROL => {
                            s.scontrol = value;
                            value & m::ENABLE != 0
                        }
                        m::SIEFP => {
                            s.siefp = value;
                            false
                        }
                        m::SIMP => {
                            s.simp = value;
                            value & m::ENABLE != 0
                        }
                        m::EOM => true,
                        _ => {
                            let sint = (msr - m::SINT0) as usize;
                            s.sint[sint] = value;
                            value & m::SINT_MASKED == 0
                        }
                    };
                    if retry {
                        // Errors here mean the guest pointed its SIMP outside RAM: the messages
                        // stay queued; the MSR write itself is still valid.
                        for sint in 0..SINT_COUNT {
                            let _ = s.try_deliver(sint, mem, &mut raise);
                        }
                    }
                }
                raise.fire(irq, vp);
            }
            _ => return Err(MsrError::Unhandled(msr)),
        }
        Ok(())
    }

    /// Whether the guest has enabled the hypercall page (HYPERCALL bit 0).
    pub fn hypercalls_enabled(&self) -> bool {
        lock(&self.partition).hypercall & m::ENABLE != 0
    }
}
