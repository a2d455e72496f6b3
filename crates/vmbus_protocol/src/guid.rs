//! GUIDs in the Windows mixed-endian layout.

use core::fmt;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A GUID as Windows lays it out in memory: `data1` (u32), `data2` and `data3` (u16) in
/// little-endian, `data4` as 8 bytes in order. `ba6163d9-04a1-4d29-b605-72e2ffb1dc7f` is stored
/// as `d9 63 61 ba a1 04 29 4d b6 05 72 e2 ff b1 dc 7f`.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Guid {
    /// First group.
    pub data1: U32,
    /// Second group.
    pub data2: U16,
    /// Third group.
    pub data3: U16,
    /// Last two groups.
    pub data4: [u8; 8],
}

const fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid::from_fields(0, 0, 0, [0; 8]);

    /// From its four groups, as written in text.
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        Self {
            data1: U32::new(data1),
            data2: U16::new(data2),
            data3: U16::new(data3),
            data4,
        }
    }

    /// Parse the text form `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (optionally in braces).
    pub const fn parse(s: &str) -> Option<Self> {
        let mut b = s.as_bytes();
        if b.len() == 38 {
            if b[0] != b'{' || b[37] != b'}' {
                return None;
            }
            // Strip the braces (const-friendly slicing).
            b = match b.split_first() {
                Some((_, rest)) => match rest.split_last() {
                    Some((_, mid)) => mid,
                    None => return None,
                },
                None => return None,
            };
        }
        if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
            return None;
        }
        let mut nibbles = [0u8; 32];
        let mut i = 0;
        let mut n = 0;
        while i < 36 {
            if i != 8 && i != 13 && i != 18 && i != 23 {
                nibbles[n] = match hex(b[i]) {
                    Some(v) => v,
                    None => return None,
                };
                n += 1;
            }
            i += 1;
        }
        let mut bytes = [0u8; 16];
        let mut k = 0;
        while k < 16 {
            bytes[k] = (nibbles[2 * k] << 4) | nibbles[2 * k + 1];
            k += 1;
        }
        Some(Self::from_fields(
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            u16::from_be_bytes([bytes[4], bytes[5]]),
            u16::from_be_bytes([bytes[6], bytes[7]]),
            [
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                bytes[15],
            ],
        ))
    }

    /// Like [`Guid::parse`], for constants: fails to compile (or panics) on bad text.
    pub const fn from_str_const(s: &str) -> Self {
        match Self::parse(s) {
            Some(g) => g,
            None => panic!("invalid GUID text"),
        }
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1.get(),
            self.data2.get(),
            self.data3.get(),
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            d[5],
            d[6],
            d[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_endian_layout() {
        const STORVSC: Guid = Guid::from_str_const("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");
        assert_eq!(
            STORVSC.as_bytes(),
            &[
                0xd9, 0x63, 0x61, 0xba, 0xa1, 0x04, 0x29, 0x4d, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1,
                0xdc, 0x7f
            ]
        );
        extern crate std;
        use std::string::ToString;
        assert_eq!(STORVSC.to_string(), "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");
        assert_eq!(
            Guid::parse("{BA6163D9-04A1-4D29-B605-72E2FFB1DC7F}"),
            Some(STORVSC)
        );
        assert_eq!(Guid::parse("ba6163d9-04a1-4d29-b605-72e2ffb1dc7"), None);
        assert_eq!(Guid::parse("ba6163d9x04a1-4d29-b605-72e2ffb1dc7f"), None);
        assert_eq!(Guid::parse("ga6163d9-04a1-4d29-b605-72e2ffb1dc7f"), None);
    }
}
