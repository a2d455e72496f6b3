//! `test=serial`: every byte value once, raw, then a trailer (a byte-exact check of COM1).

use crate::serial::Writer;

pub fn run() {
    let mut w = Writer::lock();
    for b in 0..=255u8 {
        w.byte(b);
    }
    w.str("\nserial: done\n");
}
