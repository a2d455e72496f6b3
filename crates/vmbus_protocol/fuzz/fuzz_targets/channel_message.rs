//! Parse arbitrary bytes as a VMBus channel message; whatever parses must re-encode to the
//! same bytes (fixed-size bodies) and GPADL range data must validate without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmbus_protocol::{parse, ChannelMessage, GpaRangeList, MessageBuf};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = parse(data) else {
        return;
    };
    assert!(data.len() <= 240);
    let rebuilt = match msg {
        ChannelMessage::OpenChannel(m) => Some(MessageBuf::new(&m)),
        ChannelMessage::InitiateContact(m) => Some(MessageBuf::new(&m)),
        ChannelMessage::OfferChannel(m) => Some(MessageBuf::new(&m)),
        ChannelMessage::GpadlHeader(h, rest) => {
            // The range data of a single-message GPADL.
            let _ = GpaRangeList::parse(h.range_count.get(), rest).map(|l| l.total_pfns());
            None
        }
        ChannelMessage::GpadlBody(b, pfns) => {
            let v: Vec<u64> = pfns.iter().map(|p| p.get()).collect();
            let (m, n) = MessageBuf::gpadl_body(b.gpadl.get(), b.message_number.get(), &v);
            assert_eq!(n, v.len());
            Some(m)
        }
        _ => None,
    };
    if let Some(m) = rebuilt {
        // Header padding is not preserved by the builders; compare from the msgtype on.
        let n = m.len();
        assert_eq!(&m.as_bytes()[..4], &data[..4]);
        assert_eq!(&m.as_bytes()[8..n], &data[8..n]);
    }
});
