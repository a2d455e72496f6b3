//! Hypercalls (TLFS "Hypercall Interface", "HvCallPostMessage", "HvCallSignalEvent").

use crate::defs::{call, MESSAGE_PAYLOAD_MAX, PAGE_SIZE};
use crate::{GuestMemory, Hv1};

/// An `HV_STATUS` code (the low 16 bits of the hypercall result in RAX).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HvStatus(pub u16);

impl HvStatus {
    pub const SUCCESS: HvStatus = HvStatus(0);
    pub const INVALID_HYPERCALL_CODE: HvStatus = HvStatus(2);
    pub const INVALID_HYPERCALL_INPUT: HvStatus = HvStatus(3);
    pub const INVALID_ALIGNMENT: HvStatus = HvStatus(4);
    pub const INVALID_PARAMETER: HvStatus = HvStatus(5);
    pub const ACCESS_DENIED: HvStatus = HvStatus(6);
    pub const OPERATION_DENIED: HvStatus = HvStatus(8);
    pub const INSUFFICIENT_MEMORY: HvStatus = HvStatus(11);
    pub const INVALID_VP_INDEX: HvStatus = HvStatus(14);
    pub const INVALID_PORT_ID: HvStatus = HvStatus(17);
    /// Linux retries HvPostMessage on this one (e.g. a VMBus version the host refuses).
    pub const INVALID_CONNECTION_ID: HvStatus = HvStatus(18);
    /// Linux retries HvPostMessage on this one (host message queue full).
    pub const INSUFFICIENT_BUFFERS: HvStatus = HvStatus(19);
}

/// The registers of the x64 hypercall ABI. In: RCX = control value (call code bits 0..15,
/// fast bit 16, rep count 32..43, rep start 48..59, the rest reserved), RDX = input GPA or
/// first fast parameter, R8 = output GPA or second fast parameter. Out: RAX = result
/// (status bits 0..15, reps completed 32..43). Nothing else is read or written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub r8: u64,
}

/// The receiver of the guest's messages and events: the VMBus server implements it. Called
/// with no hv1 lock held, so it may call [`Hv1::post_message`] / [`Hv1::signal_event`].
pub trait HypercallHandler {
    /// HvPostMessage from VP `vp` on `connection_id`; `payload` is at most 240 bytes and
    /// `message_type` is non-zero with bit 31 clear. Return SUCCESS, INVALID_CONNECTION_ID,
    /// INSUFFICIENT_BUFFERS, ...
    fn post_message(
        &self,
        vp: u32,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> HvStatus;
    /// HvSignalEvent from VP `vp` on `connection_id` with relative `flag_number`.
    fn signal_event(&self, vp: u32, connection_id: u32, flag_number: u16) -> HvStatus;
}

// The stub encodes the port as an imm8.
const _: () = assert!(Hv1::HYPERCALL_PORT < 0x100);

/// HvPostMessage's input block: connection id, reserved, message type, payload size, payload.
const POST_MESSAGE_INPUT_SIZE: u64 = 16 + MESSAGE_PAYLOAD_MAX as u64;

impl Hv1 {
    /// The I/O port the hypercall page's `out` writes. It must be below 0x100 so the stub can
    /// use the immediate-port form (`out imm8, al`), which leaves RDX — the input GPA — alone.
    /// 0xE2 is in the PC/AT range 0xE0..0xEF that no device we emulate decodes, and it is none
    /// of the ports guests write on purpose: 0x80 and 0xED (Linux's I/O delay), 0xE9 (Bochs/QEMU
    /// debug console), 0xF0/0xF1 (FPU error), 0x60/0x64, 0x70/0x71, 0x40..0x43, 0x61.
    pub const HYPERCALL_PORT: u16 = 0xe2;

    /// Executes the hypercall the guest made on VP `vp` by writing [`Self::HYPERCALL_PORT`]
    /// (the worker calls this on that port's IoOut exit, then writes `regs.rax` back).
    ///
    /// Returns `false`, leaving `regs` untouched, when the guest has not enabled the hypercall
    /// page (or `vp` is out of range): the write was then not a hypercall, and the worker
    /// treats it as an ordinary (unclaimed) port write. Guest `out` at CPL > 0 faults in hardware before any exit, so
    /// only the guest kernel reaches this, as with `vmcall`.
    pub fn hypercall(
        &self,
        vp: u32,
        regs: &mut HypercallRegs,
        mem: &dyn GuestMemory,
        handler: &dyn HypercallHandler,
    ) -> bool {
        if !self.hypercalls_enabled() || self.vp(vp).is_none() {
            return false;
        }
        let status = dispatch(vp, regs, mem, handler);
        regs.rax = status.0 as u64; // reps completed: 0 (no rep hypercalls)
        true
    }
}

fn dispatch(
    vp: u32,
    regs: &HypercallRegs,
    mem: &dyn GuestMemory,
    handler: &dyn HypercallHandler,
) -> HvStatus {
    let control = regs.rcx;
    let code = control as u16;
    let fast = control & call::FAST != 0;
    if code != call::POST_MESSAGE && code != call::SIGNAL_EVENT {
        return HvStatus::INVALID_HYPERCALL_CODE;
    }
    // Both calls are simple (rep count and start must be 0), have no variable header and are
    // not nested: every bit above the fast bit must be clear.
    if control >> 17 != 0 {
        return HvStatus::INVALID_HYPERCALL_INPUT;
    }
    match code {
        call::POST_MESSAGE => {
            if fast {
                // 256 bytes of input cannot travel in two registers (XMM input not offered).
                return HvStatus::INVALID_HYPERCALL_INPUT;
            }
            let mut input = [0u8; POST_MESSAGE_INPUT_SIZE as usize];
            if let Err(status) = read_input(mem, regs.rdx, &mut input) {
                return status;
            }
            let u32_at =
                |o: usize| u32::from_le_bytes([input[o], input[o + 1], input[o + 2], input[o + 3]]);
            let (connection_id, reserved, message_type, size) =
                (u32_at(0), u32_at(4), u32_at(8), u32_at(12));
            if reserved != 0
                || message_type == 0
                || message_type & 0x8000_0000 != 0
                || size as usize > MESSAGE_PAYLOAD_MAX
            {
                return HvStatus::INVALID_PARAMETER;
            }
            handler.post_message(
                vp,
                connection_id,
                message_type,
                &input[16..16 + size as usize],
            )
        }
        _ => {
            let param = if fast {
                regs.rdx
            } else {
                let mut input = [0u8; 8];
                if let Err(status) = read_input(mem, regs.rdx, &mut input) {
                    return status;
                }
                u64::from_le_bytes(input)
            };
            // {connection id u32, flag number u16, RsvdZ u16}
            if param >> 48 != 0 {
                return HvStatus::INVALID_PARAMETER;
            }
            handler.signal_event(vp, param as u32, (param >> 32) as u16)
        }
    }
}

/// Reads a memory-based input block: it must be 8-byte aligned, must not span a page, and must
/// be guest RAM; each violation is HV_STATUS_INVALID_ALIGNMENT (TLFS common status codes).
fn read_input(mem: &dyn GuestMemory, gpa: u64, buf: &mut [u8]) -> Result<(), HvStatus> {
    if !gpa.is_multiple_of(8) || (gpa % PAGE_SIZE) + buf.len() as u64 > PAGE_SIZE {
        return Err(HvStatus::INVALID_ALIGNMENT);
    }
    mem.read(gpa, buf).map_err(|_| HvStatus::INVALID_ALIGNMENT)
}
