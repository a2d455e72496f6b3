//! One module per `test=` name. Each prints its report on COM1; `kmain` powers off after the
//! ones that return.

pub mod devices;
pub mod hello;
pub mod hyperv;
pub mod vmbus;
pub mod ioloop;
pub mod quirks;
pub mod reset;
pub mod serial;
pub mod smp;
pub mod syscall;
pub mod timer;
