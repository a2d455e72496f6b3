//! GUIDs as VHDX stores them: 16 bytes in Microsoft's mixed-endian layout (Data1, Data2 and
//! Data3 little-endian, Data4 as bytes). The `uuid` crate does the text forms and randomness;
//! this type only pins down the byte order.

use std::fmt;
use std::str::FromStr;

/// A GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds a GUID from its canonical text fields (as written "AAAAAAAA-BBBB-CCCC-DDDD-...").
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A new random (version 4) GUID.
    pub fn new_random() -> Guid {
        Guid(uuid::Uuid::new_v4().to_bytes_le())
    }

    /// Whether this is the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Lowercase text with braces, as the parent locator stores it: `{xxxxxxxx-...}`.
    pub fn braced(&self) -> String {
        format!("{{{self}}}")
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_bytes_le(self.0).hyphenated())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl FromStr for Guid {
    type Err = uuid::Error;

    /// Parses `xxxxxxxx-xxxx-...`, with or without braces, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(s);
        Ok(Guid(uuid::Uuid::parse_str(s)?.to_bytes_le()))
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_endian_layout_and_text_round_trip() {
        // The BAT region GUID from MS-VHDX 2.2.3.2.
        let g = Guid::from_fields(
            0x2DC27766,
            0xF623,
            0x4200,
            [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
        );
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(g.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
        assert_eq!(g.braced(), "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(
            "{2DC27766-F623-4200-9D64-115E9BFD4A08}"
                .parse::<Guid>()
                .unwrap(),
            g
        );
        assert!("not-a-guid".parse::<Guid>().is_err());
        let r = Guid::new_random();
        assert!(!r.is_zero());
        assert_ne!(r, Guid::new_random());
    }
}
