//! `test=ioloop n=<count>`: `count` port writes to COM1's scratch register (0x3ff) in a tight
//! loop, for the port-I/O exit benchmark. Prints `ioloop: <count>` and powers off.

use crate::boot;
use crate::serial::Writer;

pub fn run() {
    let n = boot::number(b"n").unwrap_or(10_000);
    // SAFETY: port writes to the UART scratch register only; no memory is touched.
    unsafe {
        core::arch::asm!(
            "2:",
            "out dx, al",
            "dec rcx",
            "jnz 2b",
            inout("rcx") n.max(1) => _,
            in("dx") 0x3ffu16,
            in("al") 0x5au8,
            options(nomem, nostack)
        );
    }
    Writer::lock().str("ioloop: ").dec(n).str("\n");
}
