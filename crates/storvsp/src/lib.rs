//! # storvsp: the synthetic SCSI controller (Hyper-V storage VSP)
//!
//! **What it is.** The host side of Hyper-V's synthetic storage, as the stock Linux
//! `hv_storvsc` driver expects it: each [`StorageController`] is one SCSI controller, a
//! VMBus device (class `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f`) with up to [`MAX_LUNS`]
//! disks at target 0. A VM may have several controllers, each with its own stable instance
//! GUID ([`instance_id`]). Disks are `disk::BlockBackend`s (raw files, host block devices,
//! VHDX); they can be read-only, and can be added and removed while the guest runs
//! ([`ControllerHandle`]).
//!
//! Where things are:
//!
//! | question | file |
//! |---|---|
//! | the vstor packet layout, operations, status codes | `src/protocol.rs` |
//! | where a guest packet / SRB is parsed; the init handshake; completions | `src/srb.rs` |
//! | what each SCSI command does, sense data, VPD and mode pages | `src/scsi/mod.rs` |
//! | the CDB parser | `src/scsi/cdb.rs` |
//! | GPA-direct buffers, zero-copy transfers | `src/buffer.rs` |
//! | channel thread, worker pool, sub-channels, hot add/remove, ENUMERATE_BUS | `src/controller.rs` |
//! | how long a channel thread polls its ring before sleeping | `src/poll.rs` |
//! | fake guest (storvsc on `vmbus_client`) for tests and the benchmark | `src/test_support.rs` |
//!
//! **What it talks to.**
//! - `vmbus_server`: the worker adds each controller to the VM's `VmbusServer`
//!   (`add_device(Box::new(controller))`); when the guest opens the channel the controller
//!   gets a `vmbus_server::Channel` and serves it with one channel thread and a pool of
//!   worker threads (requests run concurrently and complete out of order). For multi-queue
//!   I/O the guest asks for sub-channels (CREATE_SUB_CHANNELS, up to
//!   [`ControllerConfig::max_sub_channels`]); the controller has the server offer them and
//!   serves each opened one the same way, concurrently, over the same LUNs (see
//!   `src/controller.rs`).
//! - `disk`: each LUN's backend, through `read_at`/`write_at` (and their vectored forms),
//!   `flush` and `unmap`, from the worker threads (the trait is thread-safe). A channel
//!   whose LUNs are unbuffered (`BlockBackend::unbuffered`) gets more workers
//!   ([`ControllerConfig::unbuffered_workers`]): they wait on the device, not the CPU.
//! - Guest RAM: through the channel's `GuestRam` copies, or — if the worker passes a
//!   [`GuestMemoryMap`] in [`ControllerConfig::guest_memory`] — directly: a read is then one
//!   `pread` (contiguous buffer) or `preadv` (scattered pages) from the backend into the
//!   guest's own pages.
//!
//! **What it must never do.**
//! - Trust the guest. Packets are parsed by the pure [`srb`] module, CDBs by [`scsi::cdb`];
//!   both are fuzzed (`fuzz/`). Lengths beyond the buffer, data buffers shorter than the
//!   transfer or outside guest RAM, absurd CDBs, SRBs before initialization: each gets a
//!   SCSI error with sense data, never a panic, never an allocation that grows with a
//!   guest-supplied number (per-request state is bounded by the packet itself; bounce
//!   buffers by [`scsi::CHUNK`]; the request queue by [`ControllerConfig::queue_limit`]).
//! - Write to a read-only LUN, or read or write outside a LUN.
//! - Block the VMBus control thread, or leave a request unanswered while the channel is open.
//!
//! **Gaps**: no persistent reservations,
//! no protection information, WRITE SAME's UNMAP bit is ignored (the blocks are written);
//! Fibre Channel operations are refused. Zero-copy needs the worker to pass a
//! [`GuestMemoryMap`] (`vmbus_server::GuestRam` only copies), and a buffer of scattered
//! pages still bounces because `disk::BlockBackend` has no vectored (`preadv`) I/O.
//!
//! **Performance** (`benches/datapath.rs`, in-process fake guest, page cache hot): per
//! request the pipeline adds the ring round trip and up to three thread wake-ups (guest →
//! channel thread → worker → guest); at queue depth 1 the channel thread runs the request
//! itself, saving one, and while its workers are idle it polls the ring for a while with the
//! guest's signals masked before sleeping (adaptive, `src/poll.rs`), saving another when the
//! guest submits again quickly. On the idle 2-core development machine 64 KiB sequential
//! transfers reach about 0.5x of the host's own `pread` and 0.65–0.8x of its `pwrite` (see
//! `docs/PERFORMANCE.md`; the fake guest shares the two cores); 4 KiB random I/O is dominated
//! by the per-request cost.
//!
//! Why hand-written: there is no published Rust storage VSP for our VMBus server (OpenVMM's
//! is tied to its own runtime and memory model). Facts come from Linux's
//! `drivers/scsi/storvsc_drv.c` and `include/scsi/scsi_proto.h`, and from SPC-4 / SBC-3.
//!
//! ## Attaching disks (what the worker does)
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(server: &vmbus_server::VmbusServer, vm_seed: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! use storvsp::{instance_id, ControllerConfig, LunOptions, StorageController};
//! // One controller per `controller=N`; its instance id from the VM's seed and N.
//! let cfg = ControllerConfig::new(instance_id(vm_seed, 0));
//! // For zero-copy transfers also set `cfg.guest_memory = Some(map)`, with `map` an
//! // `Arc<dyn storvsp::GuestMemoryMap>` over the same guest RAM the VmbusServer uses.
//! let (controller, handle) = StorageController::new(cfg);
//! // `--disk PATH[,ro]`: open the backend (read-only for `ro`), LUNs numbered from 0.
//! let disk: Arc<dyn disk::BlockBackend> =
//!     Arc::from(disk::open_disk(std::path::Path::new("/var/lib/vm/os.vhdx"), false)?);
//! handle.add_lun(0, disk, LunOptions::default())?;
//! server.add_device(Box::new(controller))?;
//! // later, while the guest runs:
//! // handle.add_lun(1, other, LunOptions { read_only: true, ..Default::default() })?;
//! // handle.remove_lun(1)?;
//! # Ok(()) }
//! ```

pub mod buffer;
pub mod controller;
pub mod poll;
pub mod protocol;
pub mod scsi;
pub mod srb;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
#[cfg(test)]
mod tests;

pub use buffer::GuestMemoryMap;
pub use controller::{
    instance_id, ControllerConfig, ControllerHandle, ControllerStats, LunInfo, LunOptions,
    StorError, StorageController, DEFAULT_MAX_SUB_CHANNELS, MAX_LUNS,
};
pub use protocol::SCSI_CLASS_ID;
