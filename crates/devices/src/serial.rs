//! COM1: a 16550A UART. The register model is `vm-superio`'s; this wraps it for the bus, wires
//! its interrupt to an [`IrqLine`] and its output to any byte sink.

use crate::{IrqLine, PortDevice};
use std::io::Write;
use std::sync::Arc;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's IRQ as an edge.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

pub type Sink = Box<dyn Write + Send>;

pub struct Uart {
    inner: Serial<IrqTrigger, NoEvents, Sink>,
}

impl Uart {
    pub fn new(irq: Arc<dyn IrqLine>, out: Sink) -> Self {
        Self {
            inner: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Feeds host input to the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        // vm-superio exposes the capacity and the state; the FIFO holds `in_buffer`.
        self.inner.fifo_capacity()
    }

    pub fn state(&self) -> SerialState {
        self.inner.state()
    }
}

impl PortDevice for Uart {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset > 7 || data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = self.inner.read(offset as u8);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset > 7 || data.len() != 1 {
            return;
        }
        // A full or failing output sink loses the byte; the guest never sees an error (as a UART
        // with a disconnected cable).
        let _ = self.inner.write(offset as u8, data[0]);
        if offset == 0 {
            let _ = self.inner.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    struct CountIrq(AtomicUsize);
    impl IrqLine for CountIrq {
        fn set_level(&self, high: bool) {
            if high {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_thre_interrupt() {
        let irq = Arc::new(CountIrq(AtomicUsize::new(0)));
        let out = Shared::default();
        let mut u = Uart::new(irq.clone(), Box::new(out.clone()));
        u.write(1, &[0x02]); // IER: THR empty interrupt (raised at once: THR is empty)
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        let mut iir = [0];
        for b in b"hi\x00\xff" {
            // As on a 16550, the pending THRE interrupt is acknowledged by reading IIR; each
            // byte then empties THR again and raises a new one.
            u.read(2, &mut iir);
            let before = irq.0.load(Ordering::SeqCst);
            u.write(0, &[*b]);
            assert_eq!(irq.0.load(Ordering::SeqCst), before + 1);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\x00\xff");
        let mut lsr = [0];
        u.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR and TEMT empty");
    }

    #[test]
    fn receives_input_and_scratch_round_trips() {
        let irq = Arc::new(CountIrq(AtomicUsize::new(0)));
        let mut u = Uart::new(irq, Box::new(std::io::sink()));
        assert_eq!(u.enqueue_input(b"ab"), 2);
        let mut d = [0];
        u.read(5, &mut d);
        assert_eq!(d[0] & 1, 1, "data ready");
        u.read(0, &mut d);
        assert_eq!(d[0], b'a');
        u.read(0, &mut d);
        assert_eq!(d[0], b'b');
        u.read(5, &mut d);
        assert_eq!(d[0] & 1, 0);
        u.write(7, &[0x5a]);
        u.read(7, &mut d);
        assert_eq!(d[0], 0x5a);
        // Wide and out-of-range accesses are ignored, not fatal.
        let mut w = [0u8; 2];
        u.read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        u.write(9, &[1]);
    }
}
