//! The legacy platform of one boot: the port bus and the devices on it (COM1, i8042, CMOS,
//! PIT, ACPI PM, reset port), wired to the in-kernel interrupt controllers.

use crate::layout;
use crate::WorkerError;
use devices::{GuestTime, IoBus, IrqLine, PlatformEvents, PortDevice};
use hypervisor::Partition;
use std::sync::{Arc, Mutex};

/// An interrupt line (GSI) of the in-kernel PIC/IOAPIC.
struct KvmIrq {
    part: Arc<Partition>,
    gsi: u32,
}

impl IrqLine for KvmIrq {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.part.set_irq_line(self.gsi, high) {
            tracing::warn!("IRQ {} line: {e}", self.gsi);
        }
    }
}

pub(crate) fn irq_line(part: &Arc<Partition>, gsi: u32) -> Arc<dyn IrqLine> {
    Arc::new(KvmIrq {
        part: part.clone(),
        gsi,
    })
}

/// One of the i8042's two ports on the bus (offset 0 = data 0x60, 4 = command/status 0x64).
struct I8042Port(Arc<Mutex<devices::i8042::I8042>>, u16);

impl PortDevice for I8042Port {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        PortDevice::read(
            &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()),
            self.1,
            data,
        );
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        PortDevice::write(
            &mut *self.0.lock().unwrap_or_else(|e| e.into_inner()),
            self.1,
            data,
        );
    }
}

/// A device's place on the bus: (first port, number of ports, device).
type Slot = (u16, u16, Arc<Mutex<dyn PortDevice>>);

/// The devices of one boot, and the bus the VP threads dispatch port I/O to.
pub(crate) struct Platform {
    pub bus: Arc<IoBus>,
    pub uart: Arc<Mutex<devices::serial::Uart>>,
    pub pit: Arc<devices::pit::PitShared>,
    pub pm: Arc<Mutex<devices::acpi_pm::AcpiPm>>,
    cmos: Arc<Mutex<devices::cmos::Cmos>>,
}

impl Platform {
    pub fn build(
        part: &Arc<Partition>,
        time: &Arc<GuestTime>,
        events: Arc<dyn PlatformEvents>,
        console: devices::serial::Sink,
        memory: u64,
        cmos_state: Option<devices::cmos::CmosState>,
    ) -> Result<Self, WorkerError> {
        let irq = |gsi| irq_line(part, gsi);
        let uart = Arc::new(Mutex::new(devices::serial::Uart::new(
            irq(devices::serial::COM1_IRQ),
            console,
        )));
        let pit = devices::pit::PitShared::new(devices::pit::Pit::new(time.clone()));
        let pm = Arc::new(Mutex::new(devices::acpi_pm::AcpiPm::new(
            time.clone(),
            irq(devices::acpi_pm::SCI_IRQ),
            events.clone(),
        )));
        // 0x60 and 0x64 are one device: the same controller at both ports.
        let kbc = Arc::new(Mutex::new(devices::i8042::I8042::new(
            irq(devices::i8042::KBD_IRQ),
            events.clone(),
        )));
        let low = memory.min(layout::LOW_RAM_MAX);
        let cmos = {
            let mut c = devices::cmos::Cmos::new(time.clone(), low, memory - low);
            // CMOS RAM survives a reset, as on hardware.
            if let Some(st) = cmos_state {
                c.state = st;
            }
            Arc::new(Mutex::new(c))
        };
        let mut bus = IoBus::new();
        let devices: [Slot; 8] = [
            (devices::serial::COM1_BASE, 8, uart.clone()),
            (
                devices::i8042::DATA_PORT,
                1,
                Arc::new(Mutex::new(I8042Port(kbc.clone(), 0))),
            ),
            (
                devices::i8042::CMD_PORT,
                1,
                Arc::new(Mutex::new(I8042Port(kbc, 4))),
            ),
            (devices::cmos::BASE, 2, cmos.clone()),
            (
                devices::pit::BASE,
                4,
                Arc::new(Mutex::new(devices::pit::PitPorts(pit.clone()))),
            ),
            (
                devices::pit::PORT_B,
                1,
                Arc::new(Mutex::new(devices::pit::PortB(pit.clone()))),
            ),
            (devices::acpi_pm::BASE, devices::acpi_pm::LEN, pm.clone()),
            (
                devices::acpi_pm::RESET_PORT,
                1,
                Arc::new(Mutex::new(devices::acpi_pm::ResetPort::new(events))),
            ),
        ];
        for (base, len, dev) in devices {
            bus.insert(base, len, dev)
                .map_err(|e| WorkerError::Host(e.to_string()))?;
        }
        Ok(Self {
            bus: Arc::new(bus),
            uart,
            pit,
            pm,
            cmos,
        })
    }

    /// CMOS RAM to carry into the next boot.
    pub fn cmos_state(&self) -> devices::cmos::CmosState {
        self.cmos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state
            .clone()
    }
}
