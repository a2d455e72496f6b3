//! Guest answers on the KVP channel: the first two bytes pick the operation and pool of the
//! request being answered, the rest is the answer's body. Nothing may panic; decoded
//! strings never exceed their fields.

#![no_main]

use ic::protocol::kvp::{
    self, KvpReply, KEY_FIELD_SIZE, OP_DELETE, OP_ENUMERATE, OP_GET, OP_SET, VALUE_FIELD_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [op, pool, body @ ..] = data else {
        return;
    };
    let op = [OP_GET, OP_SET, OP_DELETE, OP_ENUMERATE][usize::from(*op % 4)];
    let pool = *pool % 6;
    match kvp::parse_kvp_reply(body, op, pool) {
        Ok(KvpReply::Item { key, value }) => {
            assert_eq!(op, OP_ENUMERATE);
            assert!(key.encode_utf16().count() * 2 <= KEY_FIELD_SIZE);
            assert!(value.encode_utf16().count() * 2 <= VALUE_FIELD_SIZE);
            assert!(!key.contains('\0') && !value.contains('\0'));
        }
        Ok(KvpReply::Value(v)) => {
            assert_eq!(op, OP_GET);
            assert!(v.encode_utf16().count() * 2 <= VALUE_FIELD_SIZE);
        }
        Ok(KvpReply::Done) => assert!(op == OP_SET || op == OP_DELETE),
        Err(_) => {}
    }
    let _ = kvp::parse_enumerate_reply(body, pool);
    // Raw field decoding with any size.
    if let [a, b, c, d, field @ ..] = body {
        let size = u32::from_le_bytes([*a, *b, *c, *d]);
        if let Ok(s) = kvp::decode_utf16z(field, size, "field") {
            assert!(s.encode_utf16().count() * 2 <= field.len());
        }
    }
    // Text from the input as host arguments: valid ones build a full-size body.
    if let Ok(text) = std::str::from_utf8(body) {
        let mid = text
            .char_indices()
            .map(|(i, _)| i)
            .nth(text.chars().count() / 2)
            .unwrap_or(text.len());
        let (key, value) = text.split_at(mid);
        let req = kvp::KvpRequest::Set {
            pool: kvp::KvpPool::Guest,
            key,
            value,
        };
        if let Ok(b) = kvp::build_kvp_body(&req) {
            assert_eq!(b.len(), kvp::KVP_BODY_SIZE);
        }
    }
});
