//! A sequence of guest messages (and host add/remove requests) fed to the server state
//! machine after a valid connection: it must never panic, and its GPADL storage must stay
//! within the configured limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbus_protocol::{msgtype, InitiateContact, MessageBuf, VERSION_WIN10_V5_3};
use vmbus_server::test_support::{FakeGuestRam, FakeSynic};
use vmbus_server::{Channel, Guid, ServerConfig, ServerCore, Vsp};
use zerocopy::little_endian::{U32, U64};

struct NullVsp(u32, Option<Channel>);

impl Vsp for NullVsp {
    fn class_id(&self) -> Guid {
        Guid::from_fields(1, 2, 3, [4; 8])
    }
    fn instance_id(&self) -> Guid {
        Guid::from_fields(self.0, 0, 0, [0; 8])
    }
    fn open(&mut self, channel: Channel) -> Result<(), ()> {
        // Exercise the channel once: reads whatever the "guest" left in the ring.
        let _ = channel.try_recv();
        self.1 = Some(channel);
        Ok(())
    }
    fn close(&mut self) {
        self.1 = None;
    }
}

fuzz_target!(|data: &[u8]| {
    let ram = FakeGuestRam::new(1 << 20);
    let synic = FakeSynic::new(2);
    let config = ServerConfig {
        vp_count: 2,
        max_gpadls: 16,
        max_gpadl_bytes: 64 << 10,
        inbound_queue: 8,
    };
    let mut core = ServerCore::new(config, synic.clone(), ram.clone());
    for i in 0..2 {
        core.add_device(Box::new(NullVsp(i, None))).unwrap();
    }
    let contact = MessageBuf::new(&InitiateContact {
        version_requested: U32::new(VERSION_WIN10_V5_3),
        target_vcpu: U32::new(0),
        interrupt_page_or_sint: U64::new(2),
        monitor_page1: U64::new(0),
        monitor_page2: U64::new(0),
    });
    core.handle_message(0, 4, contact.as_bytes());
    core.handle_message(
        0,
        4,
        MessageBuf::header_only(msgtype::REQUESTOFFERS).as_bytes(),
    );
    let mut rest = data;
    let mut next_instance = 2;
    while let [ctl, len, tail @ ..] = rest {
        let len = (*len as usize).min(tail.len()).min(240);
        let (msg, after) = tail.split_at(len);
        rest = after;
        match ctl % 16 {
            0 => {
                let _ = core.add_device(Box::new(NullVsp(next_instance, None)));
                next_instance += 1;
            }
            1 => {
                let _ = core.remove_device(vmbus_server::DeviceId(u64::from(ctl / 16)));
            }
            2 => {
                // Let the guest scribble on its own RAM (rings, GPADL pages).
                let gpa = u64::from(u32::from_le_bytes([
                    msg.first().copied().unwrap_or(0),
                    msg.get(1).copied().unwrap_or(0),
                    msg.get(2).copied().unwrap_or(0) & 0x0f,
                    0,
                ]));
                let _ = vmbus_server::GuestRam::write(&*ram, gpa, msg);
            }
            _ => {
                // Mostly the message connection; sometimes others.
                let conn = if ctl % 16 == 3 { 1 } else { 4 };
                let mut m = msg.to_vec();
                if m.len() >= 4 && ctl & 0x80 != 0 {
                    // Steer towards real message types.
                    let t = u32::from(m[0] % 25);
                    m[..4].copy_from_slice(&t.to_le_bytes());
                    m[4..].iter_mut().take(4).for_each(|b| *b = 0);
                }
                if core.check_post(conn, 1, &m) == 0 {
                    core.handle_message(0, conn, &m);
                }
            }
        }
        core.flush();
        while synic.take_message(0, 2).is_some() {}
        let st = core.status();
        assert!(st.gpadls <= 16);
    }
});
