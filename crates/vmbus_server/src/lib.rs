//! The root-side VMBus server.
//!
//! **What it is.** The host half of VMBus for one VM: it negotiates the protocol version with
//! the guest (2.4 Win8 through 5.3), offers one channel per configured device (VSP), builds
//! GPADLs from the guest's page lists, opens and closes channels over the guest's ring buffers,
//! rescinds channels the host removes, answers UNLOAD, and moves interrupts both ways. Devices
//! see a small API: a [`Vsp`] gets a [`Channel`] when the guest opens it and serves it on a
//! thread of its own (receive packets, send packets and completions, read and write the guest
//! buffers that GPA-direct packets describe, wait for the guest's signals).
//!
//! **Sub-channels** (multi-queue devices such as storvsc): a VSP asks for them on its open
//! primary channel with [`Channel::offer_sub_channels`] (from its own thread; the request is
//! queued and never waits for the control thread). The server then offers each as a channel
//! of its own: the primary's class and instance GUIDs, `sub_channel_index` 1..N (per
//! opening of the primary, at most [`MAX_SUB_CHANNELS`]), its own relid and connection id
//! (0x10000 + relid; dedicated interrupt, no monitor id, like every channel we offer) —
//! which is how Linux's `vmbus_onoffer` recognizes a sub-channel of the primary. The guest
//! builds its GPADLs and opens, closes and modifies each one exactly as a primary, with the
//! same validation; an opened sub-channel reaches the VSP as a [`Channel`]
//! ([`Vsp::open_sub_channel`], closed through [`Vsp::close_sub_channel`]). Sub-channels
//! live only while their primary is open: when it closes (guest CLOSECHANNEL, device
//! removal) the open ones are closed first and all are rescinded (their relids stay taken
//! until the guest's RELID_RELEASED); on UNLOAD or reset they are forgotten. A request
//! from an opening that has since closed is dropped.
//!
//! **What it talks to.**
//! - The `hv1` layer hands it the guest's hypercalls: [`VmbusServer::post_message`]
//!   (HvPostMessage: returns the hypercall status; connection id 4 for VMBus 5.0+, 1 before)
//!   and [`VmbusServer::signal_event`] (HvSignalEvent on a channel's connection id).
//! - The worker implements [`GuestSynic`] (deliver a message into a VP's SIMP slot, set a SIEF
//!   bit and raise the SINT) and [`GuestRam`] (bounded access to guest RAM), and calls
//!   [`VmbusServer::message_slot_freed`] when the guest frees a message slot (EOM).
//! - VSPs implement [`Vsp`].
//! - Wire formats come from `vmbus_protocol` (messages) and `vmbus_ring` (rings, packets).
//!
//! **Threads.** One control thread per server runs the state machine ([`ServerCore`]): guest
//! messages are queued by the VP threads (bounded: the hypercall fails with
//! INSUFFICIENT_BUFFERS when the queue is full, and Linux retries), host requests
//! (add/remove device) arrive as commands. Replies go out in order; a busy SIMP slot is retried
//! when the worker reports the slot freed, or after a short delay. Guest signals are routed to
//! the channel without touching the control thread. VSP callbacks run on the control thread
//! with no lock held; the VSP's own thread uses its [`Channel`].
//!
//! **What it must never do.** Trust the guest. Every message is validated (sizes, relids,
//! GPADL handles and page counts, ring layout, VP numbers); every PFN must be guest RAM
//! according to [`GuestRam`] before it is used; ring indices and packets are validated by
//! `vmbus_ring`. A malformed guest can break its own channels — it can never panic the
//! server, make it loop, make it allocate without bound (queues and GPADL storage are capped
//! by [`ServerConfig`]), or reach memory outside its RAM. Nor may it block the host: the
//! server never waits for the guest. Conversely the guest waits without timeout for
//! VERSION_RESPONSE, GPADL_CREATED, OPENCHANNEL_RESULT and UNLOAD_RESPONSE, so the server
//! answers each of those requests, with a failure status when it refuses.
//!
//! Why hand-written: no published crate implements the VMBus host side for our hypervisor
//! layer; OpenVMM's is tied to its own runtime. Facts come from Linux's `drivers/hv`.

mod channel;
mod ram;
mod server;
mod state;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
#[cfg(test)]
mod tests;

pub use channel::{
    Channel, ChannelError, GpadlBuffer, IncomingKind, IncomingPacket, PageRange, TrySendError,
};
pub use ram::{GuestRam, GuestRamError, GuestRamRing};
pub use server::VmbusServer;
pub use state::{
    ChannelState, ChannelStatus, DeviceId, ServerConfig, ServerCore, ServerError, ServerStatus,
    MAX_SUB_CHANNELS,
};
pub use vmbus_protocol::Guid;
pub use vmbus_ring::{OutgoingGpaRange, OutgoingKind, OutgoingPacket, Packet, PacketKind};

/// Hypercall status: success.
pub const HV_STATUS_SUCCESS: u16 = 0;
/// Hypercall status: a parameter is invalid (payload too long, wrong message type).
pub const HV_STATUS_INVALID_PARAMETER: u16 = 0x5;
/// Hypercall status: no such connection id (the guest tries its next VMBus version).
pub const HV_STATUS_INVALID_CONNECTION_ID: u16 = 0x12;
/// Hypercall status: the message queue is full (the guest retries).
pub const HV_STATUS_INSUFFICIENT_BUFFERS: u16 = 0x13;

/// Connection id of channel `relid` (what the guest passes to HvSignalEvent): 0x10000 + relid,
/// clear of the message connection ids 1 and 4 and inside the 24-bit id space.
pub const fn channel_connection_id(relid: u32) -> u32 {
    0x1_0000 + relid
}

/// The worker's SynIC: how the server reaches the guest.
pub trait GuestSynic: Send + Sync {
    /// Deliver a message into VP `vp`'s SIMP slot for `sint` and raise the SINT. `Err(())`
    /// means the slot is busy (or the SINT is not ready): the server retries the same message
    /// later, after [`VmbusServer::message_slot_freed`] or a short delay.
    #[allow(clippy::result_unit_err)]
    fn post_message(&self, vp: u32, sint: u8, message_type: u32, payload: &[u8]) -> Result<(), ()>;

    /// Set bit `flag` in VP `vp`'s SIEF slot for `sint`; if it was clear, raise the SINT.
    /// Respecting the guest's ring `interrupt_mask` is the server's job, not this one's.
    fn signal_event(&self, vp: u32, sint: u8, flag: u32);
}

/// A device behind a VMBus channel (a VSP).
///
/// Called from the server's control thread; `open` and `close` must not wait for the guest
/// (they may wait for the VSP's own threads).
pub trait Vsp: Send {
    /// Device class (e.g. storvsc's `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f`).
    fn class_id(&self) -> Guid;
    /// Device instance: stable for a given VM configuration (guests key on it).
    fn instance_id(&self) -> Guid;
    /// The offer's 120 bytes of device-specific data.
    fn user_defined(&self) -> [u8; 120] {
        [0; 120]
    }
    /// The offer's channel flags (`VMBUS_CHANNEL_*`); 0 by default.
    fn channel_flags(&self) -> u16 {
        0
    }
    /// MMIO space the device wants, in MiB; 0 by default.
    fn mmio_megabytes(&self) -> u16 {
        0
    }
    /// The guest opened the channel. Start serving it, normally on a thread that owns
    /// `channel`. Returning `Err` refuses the open (the guest sees a failed
    /// OPENCHANNEL_RESULT). [`Channel::user_data`] holds the guest's open data.
    #[allow(clippy::result_unit_err)]
    fn open(&mut self, channel: Channel) -> Result<(), ()>;
    /// The channel is closing (guest CLOSECHANNEL, rescind, UNLOAD, reset). Its methods
    /// already return [`ChannelError::Closed`] and its waits have been woken; stop using it
    /// and return once no thread of yours touches it any more. Every sub-channel of this
    /// opening was closed ([`Vsp::close_sub_channel`]) before.
    fn close(&mut self);
    /// The guest opened sub-channel `index` (1..) of the open primary channel, one the VSP
    /// asked for with [`Channel::offer_sub_channels`]. Same contract as [`Vsp::open`]; the
    /// default refuses (a VSP that never asks for sub-channels never gets here).
    #[allow(clippy::result_unit_err)]
    fn open_sub_channel(&mut self, index: u16, channel: Channel) -> Result<(), ()> {
        let _ = (index, channel);
        Err(())
    }
    /// Sub-channel `index` is closing (guest CLOSECHANNEL on it, or its primary closing,
    /// rescinded, reset). Same contract as [`Vsp::close`].
    fn close_sub_channel(&mut self, index: u16) {
        let _ = index;
    }
}
