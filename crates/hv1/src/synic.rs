//! Synthetic interrupt controller: host → guest messages and event flags (TLFS
//! "Inter-Partition Communication": SynIC messages, SIM and SIEF pages, event flags).
//!
//! Message slot protocol (TLFS, and what Linux's `vmbus_signal_eom` relies on): a slot is free
//! when its message type is 0. To deliver, hv1 atomically ORs the MessagePending bit into the
//! slot's first u64 and looks at the message type it had:
//! - type 0: the slot was free; hv1 writes the header tail and payload, then the type last
//!   (so the guest never sees a non-zero type with a stale payload), and raises the SINT.
//! - type ≠ 0: the slot is busy; the message stays queued and MessagePending is now set. The
//!   guest clears the type, then tests MessagePending and writes EOM, which retries.
//!
//! Because the OR and the type check are one atomic operation, the race "guest frees the slot
//! between hv1's check and hv1's flag write" cannot strand a message: either hv1 saw the free
//! slot, or the guest's later read of the flag sees it set.

use crate::defs::{
    msr as m, EVENT_FLAGS_PER_SINT, MAX_QUEUED_PER_SINT, MESSAGE_HEADER_SIZE, MESSAGE_PAYLOAD_MAX,
    MESSAGE_PENDING_BIT, MESSAGE_SIZE, SINT_COUNT,
};
use crate::{lock, GuestMemory, Hv1, InterruptSink, MemError, SynicError};
use std::collections::VecDeque;

/// How [`Hv1::post_message`] disposed of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// Written into the guest's slot (and the SINT raised unless masked).
    Delivered,
    /// Waiting for the slot; MessagePending is set, the guest's EOM will deliver it.
    Queued,
}

/// A host message waiting for its slot.
#[derive(Clone)]
pub(crate) struct QueuedMessage {
    pub message_type: u32,
    len: u8,
    payload: [u8; MESSAGE_PAYLOAD_MAX],
}

impl QueuedMessage {
    /// `payload.len()` must be <= 240 (callers check).
    pub(crate) fn new(message_type: u32, payload: &[u8]) -> Self {
        let n = payload.len().min(MESSAGE_PAYLOAD_MAX);
        let mut buf = [0; MESSAGE_PAYLOAD_MAX];
        buf[..n].copy_from_slice(&payload[..n]);
        QueuedMessage {
            message_type,
            len: n as u8,
            payload: buf,
        }
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload[..self.len as usize]
    }
}

/// One VP's SynIC registers and message queues.
pub(crate) struct VpState {
    pub vp_assist: u64,
    pub scontrol: u64,
    pub siefp: u64,
    pub simp: u64,
    pub sint: [u64; SINT_COUNT],
    pub queues: [VecDeque<QueuedMessage>; SINT_COUNT],
}

impl Default for VpState {
    fn default() -> Self {
        VpState {
            vp_assist: 0,
            scontrol: 0,
            siefp: 0,
            simp: 0,
            sint: [m::SINT_RESET; SINT_COUNT],
            queues: Default::default(),
        }
    }
}

/// SINT vectors to raise once the VP lock is released.
#[derive(Default)]
pub(crate) struct Raise {
    vectors: [u8; SINT_COUNT],
    n: usize,
}

impl Raise {
    fn push(&mut self, vector: u8) {
        if self.n < SINT_COUNT {
            self.vectors[self.n] = vector;
            self.n += 1;
        }
    }

    pub(crate) fn fire(&self, irq: &dyn InterruptSink, vp: u32) {
        for &v in &self.vectors[..self.n] {
            irq.interrupt(vp, v);
        }
    }
}

impl VpState {
    fn synic_enabled(&self) -> bool {
        self.scontrol & m::ENABLE != 0
    }

    /// The SINT's vector, or `None` if it is masked.
    fn vector(&self, sint: usize) -> Option<u8> {
        let v = self.sint[sint];
        (v & m::SINT_MASKED == 0).then_some((v & m::SINT_VECTOR_MASK) as u8)
    }

    /// Tries to move the head of `sint`'s queue into its SIM slot. `Ok(true)` if it was
    /// delivered (its vector is then in `raise` unless masked). Does nothing while the SynIC
    /// or the SIM page is disabled.
    pub(crate) fn try_deliver(
        &mut self,
        sint: usize,
        mem: &dyn GuestMemory,
        raise: &mut Raise,
    ) -> Result<bool, MemError> {
        if !self.synic_enabled() || self.simp & m::ENABLE == 0 {
            return Ok(false);
        }
        let Some(msg) = self.queues[sint].front() else {
            return Ok(false);
        };
        let slot = (self.simp & m::PAGE_MASK)
            .checked_add((sint * MESSAGE_SIZE) as u64)
            .ok_or(MemError {
                gpa: self.simp & m::PAGE_MASK,
                len: MESSAGE_SIZE as u64,
            })?;
        let old = mem.fetch_or_u64(slot, MESSAGE_PENDING_BIT)?;
        if old as u32 != 0 {
            return Ok(false); // busy: MessagePending is set, EOM will retry
        }
        // Header: type u32 (written last), payload_size u8, flags u8, reserved u16, port u64.
        let len = msg.len as usize;
        let more = self.queues[sint].len() > 1;
        let mut buf = [0u8; MESSAGE_SIZE];
        buf[4] = msg.len;
        buf[5] = more as u8; // MessagePending: more messages wait behind this one
        buf[MESSAGE_HEADER_SIZE..MESSAGE_HEADER_SIZE + len].copy_from_slice(msg.payload());
        mem.write(slot + 4, &buf[4..MESSAGE_HEADER_SIZE + len])?;
        mem.write(slot, &msg.message_type.to_le_bytes())?;
        self.queues[sint].pop_front();
        if let Some(v) = self.vector(sint) {
            raise.push(v);
        }
        Ok(true)
    }
}

impl Hv1 {
    /// Host → guest message: puts a message of `message_type` (non-zero) with `payload`
    /// (<= 240 bytes) in VP `vp`'s SIM slot `sint` and raises the SINT's vector unless it is
    /// masked. If the slot is busy (or older messages wait), the message is queued, the slot's
    /// MessagePending flag is set, and the guest's EOM write delivers it later.
    ///
    /// Fails if the guest has not enabled the SynIC and its SIM page on that VP, if
    /// [`MAX_QUEUED_PER_SINT`] messages already wait, or if the SIM page is not guest RAM (the
    /// message is then neither delivered nor queued).
    pub fn post_message(
        &self,
        vp: u32,
        sint: u8,
        message_type: u32,
        payload: &[u8],
        mem: &dyn GuestMemory,
        irq: &dyn InterruptSink,
    ) -> Result<Posted, SynicError> {
        if sint as usize >= SINT_COUNT {
            return Err(SynicError::InvalidSint(sint));
        }
        if payload.len() > MESSAGE_PAYLOAD_MAX {
            return Err(SynicError::PayloadTooLarge(payload.len()));
        }
        if message_type == 0 {
            return Err(SynicError::InvalidMessageType);
        }
        let state = self.vp(vp).ok_or(SynicError::InvalidVp(vp))?;
        let s_idx = sint as usize;
        let mut raise = Raise::default();
        let result = {
            let mut s = lock(state);
            if !s.synic_enabled() {
                return Err(SynicError::SynicDisabled);
            }
            if s.simp & m::ENABLE == 0 {
                return Err(SynicError::MessagePageDisabled);
            }
            if s.queues[s_idx].len() >= MAX_QUEUED_PER_SINT {
                return Err(SynicError::QueueFull(sint));
            }
            s.queues[s_idx].push_back(QueuedMessage::new(message_type, payload));
            let ours_is_head = s.queues[s_idx].len() == 1;
            match s.try_deliver(s_idx, mem, &mut raise) {
                Ok(true) if ours_is_head => Ok(Posted::Delivered),
                Ok(_) => Ok(Posted::Queued),
                Err(e) => {
                    s.queues[s_idx].pop_back(); // ours: nothing was delivered
                    Err(SynicError::Memory(e))
                }
            }
        };
        raise.fire(irq, vp);
        result
    }

    /// Host → guest event: atomically sets bit `flag` (< 2048) of VP `vp`'s SIEF slot `sint`;
    /// if the bit was clear, raises the SINT's vector (unless masked). Returns whether the bit
    /// was newly set. Fails if the guest has not enabled the SynIC and its SIEF page there.
    pub fn signal_event(
        &self,
        vp: u32,
        sint: u8,
        flag: u32,
        mem: &dyn GuestMemory,
        irq: &dyn InterruptSink,
    ) -> Result<bool, SynicError> {
        if sint as usize >= SINT_COUNT {
            return Err(SynicError::InvalidSint(sint));
        }
        if flag >= EVENT_FLAGS_PER_SINT {
            return Err(SynicError::InvalidFlag(flag));
        }
        let state = self.vp(vp).ok_or(SynicError::InvalidVp(vp))?;
        let (newly_set, vector) = {
            let s = lock(state);
            if !s.synic_enabled() {
                return Err(SynicError::SynicDisabled);
            }
            if s.siefp & m::ENABLE == 0 {
                return Err(SynicError::EventPageDisabled);
            }
            let base = s.siefp & m::PAGE_MASK;
            let offset = sint as u64 * (EVENT_FLAGS_PER_SINT / 8) as u64 + (flag / 64) as u64 * 8;
            let word = base.checked_add(offset).ok_or(MemError {
                gpa: base,
                len: offset + 8,
            })?;
            let bit = 1u64 << (flag % 64);
            let old = mem.fetch_or_u64(word, bit)?;
            (old & bit == 0, s.vector(sint as usize))
        };
        if let (true, Some(v)) = (newly_set, vector) {
            irq.interrupt(vp, v);
        }
        Ok(newly_set)
    }
}
