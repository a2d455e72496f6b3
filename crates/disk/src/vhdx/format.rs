//! On-disk structures of MS-VHDX and their strict validation.
//!
//! Every structure is a `zerocopy` struct of little-endian fields, so parsing is a bounds-checked
//! copy out of a byte buffer and can never read out of range. Everything read from the file is
//! treated as hostile: each check that fails produces one `Error::Corrupt` naming the structure.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, IoContext, Result};
use crate::guid::Guid;
use crate::storage::Storage;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const SECTOR_4K: u64 = 4096;

pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const HEADER_SECTION_SIZE: u64 = MIB;
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Largest virtual disk the format allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Sectors described by one sector bitmap block (2^23).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;
pub const BITMAP_BLOCK_SIZE: u64 = MIB;

pub const SIG_HEAD: u32 = u32::from_le_bytes(*b"head");
pub const SIG_REGI: u32 = u32::from_le_bytes(*b"regi");
pub const SIG_LOGE: u32 = u32::from_le_bytes(*b"loge");
pub const SIG_ZERO: u32 = u32::from_le_bytes(*b"zero");
pub const SIG_DESC: u32 = u32::from_le_bytes(*b"desc");
pub const SIG_DATA: u32 = u32::from_le_bytes(*b"data");
pub const SIG_METADATA: &[u8; 8] = b"metadata";

pub const REGION_BAT: Guid = Guid::from_fields(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub const REGION_METADATA: Guid = Guid::from_fields(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);

pub const META_FILE_PARAMETERS: Guid = Guid::from_fields(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub const META_VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub const META_VIRTUAL_DISK_ID: Guid = Guid::from_fields(
    0xBECA12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub const META_LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub const META_PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xCDA348C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub const META_PARENT_LOCATOR: Guid = Guid::from_fields(
    0xA8D35F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
pub const PARENT_LOCATOR_VHDX: Guid = Guid::from_fields(
    0xB04AEFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

pub const META_FLAG_IS_USER: u32 = 1;
pub const META_FLAG_IS_VIRTUAL_DISK: u32 = 2;
pub const META_FLAG_IS_REQUIRED: u32 = 4;

// Payload BAT entry states (MS-VHDX 2.5.1.1).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
pub const PAYLOAD_BLOCK_ZERO: u64 = 2;
pub const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;
// Sector bitmap BAT entry states (2.5.1.2).
pub const SB_BLOCK_NOT_PRESENT: u64 = 0;
pub const SB_BLOCK_PRESENT: u64 = 6;

const BAT_STATE_MASK: u64 = 0x7;
const BAT_RESERVED_MASK: u64 = 0xF_FFF8; // bits 3..=19
const BAT_OFFSET_SHIFT: u32 = 20;

pub fn bat_state(e: u64) -> u64 {
    e & BAT_STATE_MASK
}

/// File offset (bytes) of a BAT entry.
pub fn bat_offset(e: u64) -> u64 {
    (e >> BAT_OFFSET_SHIFT) << 20
}

pub fn bat_entry(state: u64, offset: u64) -> u64 {
    debug_assert_eq!(offset % MIB, 0);
    ((offset >> 20) << BAT_OFFSET_SHIFT) | state
}

/// VHDX header (MS-VHDX 2.2.2); the remaining 4016 bytes of the 4 KiB sector are reserved.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RawHeader {
    pub signature: U32,
    pub checksum: U32,
    pub sequence_number: U64,
    pub file_write_guid: [u8; 16],
    pub data_write_guid: [u8; 16],
    pub log_guid: [u8; 16],
    pub log_version: U16,
    pub version: U16,
    pub log_length: U32,
    pub log_offset: U64,
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RegionTableHeader {
    pub signature: U32,
    pub checksum: U32,
    pub entry_count: U32,
    pub reserved: U32,
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct RegionTableEntry {
    pub guid: [u8; 16],
    pub file_offset: U64,
    pub length: U32,
    pub required: U32,
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct MetadataTableHeader {
    pub signature: [u8; 8],
    pub reserved: U16,
    pub entry_count: U16,
    pub reserved2: [u8; 20],
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct MetadataTableEntry {
    pub item_id: [u8; 16],
    pub offset: U32,
    pub length: U32,
    pub flags: U32,
    pub reserved2: U32,
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct FileParameters {
    pub block_size: U32,
    pub flags: U32,
}
pub const FILE_PARAM_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub const FILE_PARAM_HAS_PARENT: u32 = 2;

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ParentLocatorHeader {
    pub locator_type: [u8; 16],
    pub reserved: U16,
    pub key_value_count: U16,
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ParentLocatorEntry {
    pub key_offset: U32,
    pub value_offset: U32,
    pub key_length: U16,
    pub value_length: U16,
}

/// Log entry header (2.3.1.1).
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct LogEntryHeader {
    pub signature: U32,
    pub checksum: U32,
    pub entry_length: U32,
    pub tail: U32,
    pub sequence_number: U64,
    pub descriptor_count: U32,
    pub reserved: U32,
    pub log_guid: [u8; 16],
    pub flushed_file_offset: U64,
    pub last_file_offset: U64,
}

/// Zero or data descriptor (2.3.1.2, 2.3.1.3): same size and shape; `word` is Reserved for a
/// zero descriptor and TrailingBytes for a data descriptor, `value` ZeroLength or LeadingBytes.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct LogDescriptor {
    pub signature: U32,
    pub word: U32,
    pub value: U64,
    pub file_offset: U64,
    pub sequence_number: U64,
}

pub fn crc32c_with_zeroed_field(buf: &[u8], field_offset: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..field_offset]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[field_offset + 4..])
}

/// Reads a `zerocopy` struct from the start of `buf` (caller guarantees the length).
pub fn read_struct<T: FromBytes>(buf: &[u8]) -> T {
    match T::read_from_prefix(buf) {
        Ok((v, _)) => v,
        Err(_) => unreachable!("buffer shorter than the structure"),
    }
}

/// One valid header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Serializes into a full 4 KiB sector with the checksum filled in.
    pub fn to_sector(&self) -> Vec<u8> {
        let raw = RawHeader {
            signature: SIG_HEAD.into(),
            checksum: 0.into(),
            sequence_number: self.sequence_number.into(),
            file_write_guid: self.file_write_guid.0,
            data_write_guid: self.data_write_guid.0,
            log_guid: self.log_guid.0,
            log_version: self.log_version.into(),
            version: self.version.into(),
            log_length: self.log_length.into(),
            log_offset: self.log_offset.into(),
        };
        let mut buf = vec![0u8; SECTOR_4K as usize];
        buf[..size_of::<RawHeader>()].copy_from_slice(raw.as_bytes());
        let crc = crc32c_with_zeroed_field(&buf, 4);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    fn parse(buf: &[u8]) -> Option<Header> {
        let raw: RawHeader = read_struct(buf);
        if raw.signature.get() != SIG_HEAD {
            return None;
        }
        if crc32c_with_zeroed_field(&buf[..SECTOR_4K as usize], 4) != raw.checksum.get() {
            return None;
        }
        Some(Header {
            sequence_number: raw.sequence_number.get(),
            file_write_guid: Guid(raw.file_write_guid),
            data_write_guid: Guid(raw.data_write_guid),
            log_guid: Guid(raw.log_guid),
            log_version: raw.log_version.get(),
            version: raw.version.get(),
            log_length: raw.log_length.get(),
            log_offset: raw.log_offset.get(),
        })
    }
}

/// Reads the file identifier and both headers; returns the current header and its slot.
pub fn read_headers(st: &dyn Storage, file_len: u64) -> Result<(Header, usize)> {
    if file_len < HEADER_SECTION_SIZE {
        return Err(Error::corrupt(format!(
            "file is {file_len} bytes, shorter than the 1 MiB header section (truncated?)"
        )));
    }
    let mut sig = [0u8; 8];
    st.read_at(0, &mut sig)
        .ctx(|| "reading the VHDX file identifier".into())?;
    if &sig != FILE_ID_SIGNATURE {
        return Err(Error::corrupt(
            "file identifier signature is not \"vhdxfile\"",
        ));
    }
    let mut headers = [None, None];
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        let mut buf = vec![0u8; SECTOR_4K as usize];
        st.read_at(*off, &mut buf)
            .ctx(|| format!("reading VHDX header {}", i + 1))?;
        headers[i] = Header::parse(&buf);
    }
    let (h, slot) = match (headers[0], headers[1]) {
        (None, None) => {
            return Err(Error::corrupt(
                "both headers are invalid (bad \"head\" signature or CRC-32C checksum)",
            ))
        }
        (Some(a), None) => (a, 0),
        (None, Some(b)) => (b, 1),
        (Some(a), Some(b)) => {
            if a.sequence_number == b.sequence_number && a != b {
                return Err(Error::corrupt(
                    "both headers are valid with the same sequence number but differ",
                ));
            }
            if b.sequence_number > a.sequence_number {
                (b, 1)
            } else {
                (a, 0)
            }
        }
    };
    if h.version != 1 {
        return Err(Error::unsupported(format!(
            "header version {} (only 1 is defined)",
            h.version
        )));
    }
    if !h.log_guid.is_zero() && h.log_version != 0 {
        return Err(Error::unsupported(format!(
            "log version {} (only 0 is defined)",
            h.log_version
        )));
    }
    let ll = h.log_length as u64;
    if ll % MIB != 0 || h.log_offset % MIB != 0 {
        return Err(Error::corrupt(
            "log offset or length is not a multiple of 1 MiB",
        ));
    }
    if ll > 0 {
        if h.log_offset < HEADER_SECTION_SIZE {
            return Err(Error::corrupt("log overlaps the header section"));
        }
        if h.log_offset.checked_add(ll).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "log at offset {} length {} lies past the end of the file ({} bytes)",
                h.log_offset, ll, file_len
            )));
        }
    } else if !h.log_guid.is_zero() {
        return Err(Error::corrupt(
            "log GUID is set but the log has zero length",
        ));
    }
    Ok((h, slot))
}

/// A region table entry, parsed.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub guid: Guid,
    pub offset: u64,
    pub length: u64,
    pub required: bool,
}

/// The valid region table copy (raw bytes kept so updates can rewrite it).
#[derive(Clone, Debug)]
pub struct RegionTable {
    pub raw: Vec<u8>,
    pub regions: Vec<Region>,
}

impl RegionTable {
    fn parse(buf: &[u8]) -> Result<RegionTable, String> {
        let h: RegionTableHeader = read_struct(buf);
        if h.signature.get() != SIG_REGI {
            return Err("bad \"regi\" signature".into());
        }
        if crc32c_with_zeroed_field(buf, 4) != h.checksum.get() {
            return Err("CRC-32C checksum mismatch".into());
        }
        let n = h.entry_count.get();
        if n > 2047 {
            return Err(format!("{n} entries (at most 2047 allowed)"));
        }
        let mut regions = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let e: RegionTableEntry = read_struct(&buf[16 + i * 32..]);
            let r = Region {
                guid: Guid(e.guid),
                offset: e.file_offset.get(),
                length: e.length.get() as u64,
                required: e.required.get() & 1 == 1,
            };
            if regions.iter().any(|o: &Region| o.guid == r.guid) {
                return Err(format!("region {} is listed twice", r.guid));
            }
            regions.push(r);
        }
        Ok(RegionTable {
            raw: buf.to_vec(),
            regions,
        })
    }

    /// Serializes `regions` into a 64 KiB table with checksum.
    pub fn build(regions: &[Region]) -> Vec<u8> {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        let h = RegionTableHeader {
            signature: SIG_REGI.into(),
            checksum: 0.into(),
            entry_count: (regions.len() as u32).into(),
            reserved: 0.into(),
        };
        buf[..16].copy_from_slice(h.as_bytes());
        for (i, r) in regions.iter().enumerate() {
            let e = RegionTableEntry {
                guid: r.guid.0,
                file_offset: r.offset.into(),
                length: (r.length as u32).into(),
                required: (r.required as u32).into(),
            };
            buf[16 + i * 32..16 + (i + 1) * 32].copy_from_slice(e.as_bytes());
        }
        let crc = crc32c_with_zeroed_field(&buf, 4);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn find(&self, g: Guid) -> Option<Region> {
        self.regions.iter().copied().find(|r| r.guid == g)
    }
}

pub fn read_region_table(st: &dyn Storage) -> Result<RegionTable> {
    let mut errs = Vec::new();
    for (i, off) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        st.read_at(*off, &mut buf)
            .ctx(|| format!("reading region table {}", i + 1))?;
        match RegionTable::parse(&buf) {
            Ok(t) => return Ok(t),
            Err(e) => errs.push(e),
        }
    }
    Err(Error::corrupt(format!(
        "both region tables are invalid (copy 1: {}; copy 2: {})",
        errs[0], errs[1]
    )))
}

/// A metadata table entry, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaEntry {
    pub id: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

impl MetaEntry {
    pub fn is_user(&self) -> bool {
        self.flags & META_FLAG_IS_USER != 0
    }
}

/// The parsed VHDX parent locator: its type and key/value pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: String) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.entries.push((key.to_string(), value)),
        }
    }

    /// Parses a parent locator item (2.6.2.6).
    pub fn parse(item: &[u8]) -> Result<ParentLocator> {
        if item.len() < size_of::<ParentLocatorHeader>() {
            return Err(Error::corrupt("parent locator is shorter than its header"));
        }
        let h: ParentLocatorHeader = read_struct(item);
        if Guid(h.locator_type) != PARENT_LOCATOR_VHDX {
            return Err(Error::unsupported(format!(
                "parent locator type {} (only VHDX parents are supported)",
                Guid(h.locator_type)
            )));
        }
        let n = h.key_value_count.get() as usize;
        let table_end = 20 + n * 12;
        if table_end > item.len() {
            return Err(Error::corrupt(
                "parent locator entry table runs past the item",
            ));
        }
        let mut entries: Vec<(String, String)> = Vec::with_capacity(n);
        let get_str = |off: u32, len: u16, what: &str| -> Result<String> {
            let (off, len) = (off as usize, len as usize);
            if off == 0 || len == 0 || len % 2 != 0 || off + len > item.len() {
                return Err(Error::corrupt(format!(
                    "parent locator {what} at offset {off} length {len} is out of bounds or empty"
                )));
            }
            let units: Vec<u16> = item[off..off + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units)
                .map_err(|_| Error::corrupt(format!("parent locator {what} is not valid UTF-16")))
        };
        for i in 0..n {
            let e: ParentLocatorEntry = read_struct(&item[20 + i * 12..]);
            let k = get_str(e.key_offset.get(), e.key_length.get(), "key")?;
            let v = get_str(e.value_offset.get(), e.value_length.get(), "value")?;
            if entries.iter().any(|(ek, _)| *ek == k) {
                return Err(Error::corrupt(format!(
                    "parent locator key {k:?} appears twice"
                )));
            }
            entries.push((k, v));
        }
        Ok(ParentLocator { entries })
    }

    pub fn build(&self) -> Vec<u8> {
        let n = self.entries.len();
        let mut buf = vec![0u8; 20 + n * 12];
        let h = ParentLocatorHeader {
            locator_type: PARENT_LOCATOR_VHDX.0,
            reserved: 0.into(),
            key_value_count: (n as u16).into(),
        };
        buf[..20].copy_from_slice(h.as_bytes());
        let mut strings = Vec::new();
        let base = buf.len();
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let kb: Vec<u8> = k.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
            let ko = base + strings.len();
            strings.extend_from_slice(&kb);
            let vb: Vec<u8> = v.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
            let vo = base + strings.len();
            strings.extend_from_slice(&vb);
            let e = ParentLocatorEntry {
                key_offset: (ko as u32).into(),
                value_offset: (vo as u32).into(),
                key_length: (kb.len() as u16).into(),
                value_length: (vb.len() as u16).into(),
            };
            buf[20 + i * 12..20 + (i + 1) * 12].copy_from_slice(e.as_bytes());
        }
        buf.extend_from_slice(&strings);
        buf
    }
}

/// The known metadata, validated.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub entries: Vec<MetaEntry>,
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub disk_id: Guid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub parent_locator: Option<ParentLocator>,
}

impl Metadata {
    pub fn entry(&self, id: Guid) -> Option<MetaEntry> {
        self.entries
            .iter()
            .copied()
            .find(|e| e.id == id && !e.is_user())
    }
}

/// Builds the 64 KiB metadata table for `entries`.
pub fn build_metadata_table(entries: &[MetaEntry]) -> Vec<u8> {
    let mut buf = vec![0u8; METADATA_TABLE_SIZE];
    let h = MetadataTableHeader {
        signature: *SIG_METADATA,
        reserved: 0.into(),
        entry_count: (entries.len() as u16).into(),
        reserved2: [0; 20],
    };
    buf[..32].copy_from_slice(h.as_bytes());
    for (i, e) in entries.iter().enumerate() {
        let r = MetadataTableEntry {
            item_id: e.id.0,
            offset: e.offset.into(),
            length: e.length.into(),
            flags: e.flags.into(),
            reserved2: 0.into(),
        };
        buf[32 + i * 32..32 + (i + 1) * 32].copy_from_slice(r.as_bytes());
    }
    buf
}

const KNOWN_ITEMS: [(Guid, &str, usize); 6] = [
    (META_FILE_PARAMETERS, "file parameters", 8),
    (META_VIRTUAL_DISK_SIZE, "virtual disk size", 8),
    (META_VIRTUAL_DISK_ID, "virtual disk ID", 16),
    (META_LOGICAL_SECTOR_SIZE, "logical sector size", 4),
    (META_PHYSICAL_SECTOR_SIZE, "physical sector size", 4),
    (META_PARENT_LOCATOR, "parent locator", 0),
];

/// Reads and validates the metadata region (table and known items).
pub fn read_metadata(st: &dyn Storage, region: Region) -> Result<Metadata> {
    if region.length < METADATA_TABLE_SIZE as u64 {
        return Err(Error::corrupt(
            "metadata region is smaller than its 64 KiB table",
        ));
    }
    let mut table = vec![0u8; METADATA_TABLE_SIZE];
    st.read_at(region.offset, &mut table)
        .ctx(|| "reading the metadata table".into())?;
    let h: MetadataTableHeader = read_struct(&table);
    if &h.signature != SIG_METADATA {
        return Err(Error::corrupt(
            "metadata table signature is not \"metadata\"",
        ));
    }
    let n = h.entry_count.get() as usize;
    if n > 2047 {
        return Err(Error::corrupt(format!(
            "metadata table has {n} entries (at most 2047)"
        )));
    }
    let mut entries: Vec<MetaEntry> = Vec::with_capacity(n);
    for i in 0..n {
        let r: MetadataTableEntry = read_struct(&table[32 + i * 32..]);
        let e = MetaEntry {
            id: Guid(r.item_id),
            offset: r.offset.get(),
            length: r.length.get(),
            flags: r.flags.get(),
        };
        if e.length == 0 {
            if e.offset != 0 {
                return Err(Error::corrupt(format!(
                    "metadata item {} has zero length but a non-zero offset",
                    e.id
                )));
            }
        } else {
            if (e.offset as u64) < METADATA_TABLE_SIZE as u64 {
                return Err(Error::corrupt(format!(
                    "metadata item {} overlaps the metadata table (offset {})",
                    e.id, e.offset
                )));
            }
            if e.length as u64 > MIB {
                return Err(Error::corrupt(format!(
                    "metadata item {} is {} bytes (at most 1 MiB)",
                    e.id, e.length
                )));
            }
            if e.offset as u64 + e.length as u64 > region.length {
                return Err(Error::corrupt(format!(
                    "metadata item {} runs past the end of the metadata region",
                    e.id
                )));
            }
            for o in entries.iter().filter(|o| o.length > 0) {
                let (a0, a1) = (e.offset as u64, e.offset as u64 + e.length as u64);
                let (b0, b1) = (o.offset as u64, o.offset as u64 + o.length as u64);
                if a0 < b1 && b0 < a1 {
                    return Err(Error::corrupt(format!(
                        "metadata items {} and {} overlap",
                        e.id, o.id
                    )));
                }
            }
        }
        if entries
            .iter()
            .any(|o| o.id == e.id && o.is_user() == e.is_user())
        {
            return Err(Error::corrupt(format!(
                "metadata item {} appears twice",
                e.id
            )));
        }
        if !e.is_user()
            && e.flags & META_FLAG_IS_REQUIRED != 0
            && !KNOWN_ITEMS.iter().any(|k| k.0 == e.id)
        {
            return Err(Error::unsupported(format!(
                "unknown required metadata item {}",
                e.id
            )));
        }
        entries.push(e);
    }
    if entries.iter().filter(|e| e.is_user()).count() > 1024 {
        return Err(Error::corrupt("more than 1024 user metadata items"));
    }

    let read_item = |id: Guid, name: &str, size: usize| -> Result<Option<Vec<u8>>> {
        let Some(e) = entries.iter().find(|e| e.id == id && !e.is_user()) else {
            return Ok(None);
        };
        if size != 0 && (e.length as usize) < size {
            return Err(Error::corrupt(format!(
                "{name} metadata item is {} bytes, expected {size}",
                e.length
            )));
        }
        let mut b = vec![0u8; e.length as usize];
        st.read_at(region.offset + e.offset as u64, &mut b)
            .ctx(|| format!("reading the {name} metadata item"))?;
        Ok(Some(b))
    };
    let need = |id: Guid, name: &str, size: usize| -> Result<Vec<u8>> {
        read_item(id, name, size)?
            .ok_or_else(|| Error::corrupt(format!("required {name} metadata item is missing")))
    };

    let fp: FileParameters = read_struct(&need(META_FILE_PARAMETERS, "file parameters", 8)?);
    let block_size = fp.block_size.get();
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(Error::corrupt(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    let flags = fp.flags.get();
    let has_parent = flags & FILE_PARAM_HAS_PARENT != 0;
    let leave_blocks_allocated = flags & FILE_PARAM_LEAVE_BLOCKS_ALLOCATED != 0 && !has_parent;

    let b = need(META_LOGICAL_SECTOR_SIZE, "logical sector size", 4)?;
    let lss = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if lss != 512 && lss != 4096 {
        return Err(Error::corrupt(format!(
            "logical sector size {lss} (must be 512 or 4096)"
        )));
    }
    let b = need(META_PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?;
    let pss = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if pss != 512 && pss != 4096 {
        return Err(Error::corrupt(format!(
            "physical sector size {pss} (must be 512 or 4096)"
        )));
    }
    let b = need(META_VIRTUAL_DISK_SIZE, "virtual disk size", 8)?;
    let virtual_size = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % lss as u64 != 0 {
        return Err(Error::corrupt(format!(
            "virtual disk size {virtual_size} is over 64 TiB or not a multiple of the {lss}-byte sector"
        )));
    }
    let b = need(META_VIRTUAL_DISK_ID, "virtual disk ID", 16)?;
    let disk_id = Guid(b[..16].try_into().unwrap_or([0; 16]));

    let parent_locator = if has_parent {
        let b = need(META_PARENT_LOCATOR, "parent locator", 0)?;
        let pl = ParentLocator::parse(&b)?;
        if pl.get("parent_linkage").is_none() {
            return Err(Error::corrupt("parent locator has no parent_linkage entry"));
        }
        if ["relative_path", "volume_path", "absolute_win32_path"]
            .iter()
            .all(|k| pl.get(k).is_none())
        {
            return Err(Error::corrupt("parent locator names no path to the parent"));
        }
        Some(pl)
    } else {
        None
    };

    Ok(Metadata {
        entries,
        block_size,
        leave_blocks_allocated,
        has_parent,
        virtual_size,
        disk_id,
        logical_sector_size: lss,
        physical_sector_size: pss,
        parent_locator,
    })
}

/// Block-address arithmetic for one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector_size: u64,
    pub chunk_ratio: u64,
    pub virtual_size: u64,
    pub has_parent: bool,
}

impl Geometry {
    pub fn new(block_size: u32, lss: u32, virtual_size: u64, has_parent: bool) -> Geometry {
        Geometry {
            block_size: block_size as u64,
            logical_sector_size: lss as u64,
            chunk_ratio: (SECTORS_PER_BITMAP * lss as u64) / block_size as u64,
            virtual_size,
            has_parent,
        }
    }

    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size)
    }

    pub fn bitmap_blocks(&self) -> u64 {
        self.payload_blocks().div_ceil(self.chunk_ratio)
    }

    /// Number of BAT entries the format requires for this size (2.5).
    pub fn total_bat_entries(&self) -> u64 {
        let p = self.payload_blocks();
        if self.has_parent {
            self.bitmap_blocks() * (self.chunk_ratio + 1)
        } else if p == 0 {
            0
        } else {
            p + (p - 1) / self.chunk_ratio
        }
    }

    pub fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    pub fn bitmap_index(&self, chunk: u64) -> usize {
        (chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector_size
    }
}

/// Reads the BAT entries that `geo` requires from the BAT region.
pub fn read_bat(st: &dyn Storage, region: Region, geo: &Geometry) -> Result<Vec<u64>> {
    let n = geo.total_bat_entries();
    if n.checked_mul(8).is_none_or(|b| b > region.length) {
        return Err(Error::corrupt(format!(
            "BAT region ({} bytes) is too small for the {n} entries the disk size needs",
            region.length
        )));
    }
    let mut raw = vec![0u8; (n * 8) as usize];
    st.read_at(region.offset, &mut raw)
        .ctx(|| "reading the BAT".into())?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Validates BAT entries against the file: states legal for the disk type, blocks inside the
/// file, no block overlapping another block or any other structure. `fixed_areas` are the
/// header section, log and regions as (start, length, name).
pub fn validate_bat(
    bat: &[u64],
    geo: &Geometry,
    file_len: u64,
    fixed_areas: &[(u64, u64, String)],
) -> Result<()> {
    let mut extents: Vec<(u64, u64, usize)> = Vec::new();
    let ratio = geo.chunk_ratio as usize;
    let payload_blocks = geo.payload_blocks();
    for (i, &e) in bat.iter().enumerate() {
        let is_bitmap = (i + 1) % (ratio + 1) == 0;
        let state = bat_state(e);
        if e & BAT_RESERVED_MASK != 0 {
            return Err(Error::corrupt(format!(
                "BAT entry {i} has reserved bits set ({e:#x})"
            )));
        }
        let len = if is_bitmap {
            match state {
                SB_BLOCK_NOT_PRESENT => continue,
                SB_BLOCK_PRESENT if geo.has_parent => BITMAP_BLOCK_SIZE,
                _ => {
                    return Err(Error::corrupt(format!(
                        "BAT entry {i} (sector bitmap) has invalid state {state}"
                    )))
                }
            }
        } else {
            let block = (i - i / (ratio + 1)) as u64;
            match state {
                PAYLOAD_BLOCK_NOT_PRESENT
                | PAYLOAD_BLOCK_UNDEFINED
                | PAYLOAD_BLOCK_ZERO
                | PAYLOAD_BLOCK_UNMAPPED => continue,
                PAYLOAD_BLOCK_FULLY_PRESENT => {}
                PAYLOAD_BLOCK_PARTIALLY_PRESENT if geo.has_parent => {
                    let sb = bat.get(geo.bitmap_index(block / geo.chunk_ratio)).copied();
                    if sb.map(bat_state) != Some(SB_BLOCK_PRESENT) {
                        return Err(Error::corrupt(format!(
                            "BAT entry {i} is partially present but its sector bitmap block is not"
                        )));
                    }
                }
                _ => {
                    return Err(Error::corrupt(format!(
                        "BAT entry {i} (payload block {block}) has invalid state {state}"
                    )))
                }
            }
            if block >= payload_blocks {
                return Err(Error::corrupt(format!(
                    "BAT entry {i} is for a block past the disk end"
                )));
            }
            geo.block_size
        };
        let off = bat_offset(e);
        if off < HEADER_SECTION_SIZE {
            return Err(Error::corrupt(format!(
                "BAT entry {i} points into the header section (offset {off})"
            )));
        }
        if off.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(format!(
                "BAT entry {i} points past the end of the file (block at {off}, {len} bytes; file is {file_len} bytes)"
            )));
        }
        extents.push((off, len, i));
    }
    extents.sort_unstable();
    for w in extents.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(Error::corrupt(format!(
                "BAT entries {} and {} point to overlapping blocks (offsets {} and {})",
                w[0].2, w[1].2, w[0].0, w[1].0
            )));
        }
    }
    // Blocks against the fixed structures: both lists are small or sorted.
    for (fs, fl, name) in fixed_areas {
        let idx = extents.partition_point(|x| x.0 + x.1 <= *fs);
        if let Some(x) = extents.get(idx) {
            if x.0 < fs + fl {
                return Err(Error::corrupt(format!(
                    "BAT entry {} (block at offset {}) overlaps the {name}",
                    x.2, x.0
                )));
            }
        }
    }
    Ok(())
}

/// Checks the header section, log and regions for overlap with each other and for lying inside
/// the file; returns them as (start, length, name) for the BAT check.
pub fn validate_layout(
    header: &Header,
    regions: &RegionTable,
    file_len: u64,
) -> Result<Vec<(u64, u64, String)>> {
    let mut areas = vec![(0u64, HEADER_SECTION_SIZE, "header section".to_string())];
    if header.log_length > 0 {
        areas.push((header.log_offset, header.log_length as u64, "log".into()));
    }
    for r in &regions.regions {
        let name = if r.guid == REGION_BAT {
            "BAT region".to_string()
        } else if r.guid == REGION_METADATA {
            "metadata region".to_string()
        } else if r.required {
            return Err(Error::unsupported(format!(
                "unknown required region {}",
                r.guid
            )));
        } else {
            format!("region {}", r.guid)
        };
        if r.offset % MIB != 0 || r.length % MIB != 0 || r.offset < MIB || r.length == 0 {
            return Err(Error::corrupt(format!(
                "{name} at offset {} length {} is not 1 MiB aligned, empty, or inside the header section",
                r.offset, r.length
            )));
        }
        if r.offset.checked_add(r.length).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "{name} (offset {}, {} bytes) lies past the end of the file ({file_len} bytes; truncated?)",
                r.offset, r.length
            )));
        }
        areas.push((r.offset, r.length, name));
    }
    if regions.find(REGION_BAT).is_none() {
        return Err(Error::corrupt("region table has no BAT region"));
    }
    if regions.find(REGION_METADATA).is_none() {
        return Err(Error::corrupt("region table has no metadata region"));
    }
    for i in 0..areas.len() {
        for j in i + 1..areas.len() {
            let (a, b) = (&areas[i], &areas[j]);
            if a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                return Err(Error::corrupt(format!(
                    "the {} and the {} overlap",
                    a.2, b.2
                )));
            }
        }
    }
    areas.sort();
    Ok(areas)
}
