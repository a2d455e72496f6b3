//! `test=hello`: a greeting and the command line.

use crate::boot;
use crate::serial::Writer;

pub fn run() {
    let mut w = Writer::lock();
    w.str("verdigris-test-guest: hello\n");
    w.str("cmdline: ");
    if boot::info().has_cmdline {
        w.printable(boot::cmdline());
    } else {
        w.str("(none)");
    }
    w.str("\n");
}
