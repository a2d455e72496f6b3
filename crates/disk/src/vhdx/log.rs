//! The VHDX metadata log (MS-VHDX 2.3): building entries, finding the active sequence, replay.
//!
//! Writer side (see `Vhdx::commit`): this implementation writes each log entry at one of two
//! fixed slots, the start and the middle of the log, alternating, and every entry's tail points
//! at itself. An entry is only written after the previous one has been applied in place and
//! flushed, so the newest valid entry is always the only one that may still need replaying, and
//! a torn write of the newest entry leaves the previous (already applied, harmless to replay)
//! entry intact in the other slot. Readers that follow the spec's generic search find exactly
//! that entry.
//!
//! Reader side: the full search of 2.3.3, so logs written by Hyper-V or QEMU (longer sequences,
//! wrapping) replay as well.

use std::collections::HashMap;

use zerocopy::IntoBytes;

use super::format::*;
use crate::error::{Error, IoContext, Result};
use crate::guid::Guid;
use crate::storage::Storage;

/// One sector write or zeroing to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOp {
    Data { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

/// A validated log entry.
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub pos: u64,
    pub len: u64,
    pub seq: u64,
    pub tail: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub ops: Vec<LogOp>,
}

fn descriptor_sectors(count: u64) -> u64 {
    (64 + 32 * count).div_ceil(SECTOR_4K)
}

/// Most data descriptors an entry of at most `max_bytes` can carry.
pub fn max_data_sectors(max_bytes: u64) -> usize {
    let sectors = max_bytes / SECTOR_4K;
    let mut n = sectors.saturating_sub(1);
    while n > 0 && descriptor_sectors(n) + n > sectors {
        n -= 1;
    }
    n as usize
}

/// Parameters of one entry to build.
pub struct EntryParams {
    pub guid: Guid,
    pub seq: u64,
    pub tail: u32,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
}

/// Builds a log entry carrying 4 KiB sector writes `(file offset, 4096 bytes)`.
pub fn build_entry(p: &EntryParams, writes: &[(u64, &[u8])]) -> Vec<u8> {
    let n = writes.len() as u64;
    let ds = descriptor_sectors(n);
    let total = ((ds + n) * SECTOR_4K) as usize;
    let mut buf = vec![0u8; total];
    let h = LogEntryHeader {
        signature: SIG_LOGE.into(),
        checksum: 0.into(),
        entry_length: (total as u32).into(),
        tail: p.tail.into(),
        sequence_number: p.seq.into(),
        descriptor_count: (n as u32).into(),
        reserved: 0.into(),
        log_guid: p.guid.0,
        flushed_file_offset: p.flushed_file_offset.into(),
        last_file_offset: p.last_file_offset.into(),
    };
    buf[..64].copy_from_slice(h.as_bytes());
    for (i, (off, data)) in writes.iter().enumerate() {
        debug_assert_eq!(data.len(), SECTOR_4K as usize);
        let d = LogDescriptor {
            signature: SIG_DESC.into(),
            word: u32::from_le_bytes(data[4092..4096].try_into().unwrap_or([0; 4])).into(),
            value: u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8])).into(),
            file_offset: (*off).into(),
            sequence_number: p.seq.into(),
        };
        let at = 64 + 32 * i;
        buf[at..at + 32].copy_from_slice(d.as_bytes());
        let s = ((ds as usize) + i) * SECTOR_4K as usize;
        buf[s..s + 4].copy_from_slice(&SIG_DATA.to_le_bytes());
        buf[s + 4..s + 8].copy_from_slice(&((p.seq >> 32) as u32).to_le_bytes());
        buf[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        buf[s + 4092..s + 4096].copy_from_slice(&(p.seq as u32).to_le_bytes());
    }
    let crc = crc32c_with_zeroed_field(&buf, 4);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

struct LogReader<'a> {
    st: &'a dyn Storage,
    offset: u64,
    len: u64,
    guid: Guid,
    cache: HashMap<u64, Option<LogEntry>>,
    /// Bytes the scan may still read. A sane log is read about twice over; a hostile one
    /// (entry headers everywhere, each claiming the whole log) would otherwise cost
    /// quadratic time.
    budget: u64,
}

impl LogReader<'_> {
    /// Reads `count` 4 KiB sectors of the circular log starting at `pos`.
    fn read_sectors(&mut self, pos: u64, count: u64) -> Result<Vec<u8>> {
        let bytes = count * SECTOR_4K;
        if bytes > self.budget {
            return Err(Error::corrupt(
                "the log is too damaged to scan (entry headers claim overlapping lengths)",
            ));
        }
        self.budget -= bytes;
        let mut buf = vec![0u8; (count * SECTOR_4K) as usize];
        let mut done = 0u64;
        let mut p = pos;
        while done < count {
            let run = ((self.len - p) / SECTOR_4K).min(count - done);
            let s = (done * SECTOR_4K) as usize;
            let e = ((done + run) * SECTOR_4K) as usize;
            self.st
                .read_at(self.offset + p, &mut buf[s..e])
                .ctx(|| format!("reading the VHDX log at log offset {p}"))?;
            done += run;
            p = (p + run * SECTOR_4K) % self.len;
        }
        Ok(buf)
    }

    fn entry_at(&mut self, pos: u64) -> Result<Option<LogEntry>> {
        if let Some(e) = self.cache.get(&pos) {
            return Ok(e.clone());
        }
        let e = self.parse_entry(pos)?;
        self.cache.insert(pos, e.clone());
        Ok(e)
    }

    /// Parses and fully validates the entry at `pos`; `None` if it is not a valid entry.
    fn parse_entry(&mut self, pos: u64) -> Result<Option<LogEntry>> {
        let first = self.read_sectors(pos, 1)?;
        let h: LogEntryHeader = read_struct(&first);
        if h.signature.get() != SIG_LOGE || Guid(h.log_guid) != self.guid {
            return Ok(None);
        }
        let len = h.entry_length.get() as u64;
        let tail = h.tail.get() as u64;
        let seq = h.sequence_number.get();
        let count = h.descriptor_count.get() as u64;
        if len == 0
            || len % SECTOR_4K != 0
            || len > self.len
            || tail % SECTOR_4K != 0
            || tail >= self.len
            || seq == 0
        {
            return Ok(None);
        }
        let ds = descriptor_sectors(count);
        if ds * SECTOR_4K > len {
            return Ok(None);
        }
        let buf = self.read_sectors(pos, len / SECTOR_4K)?;
        if crc32c_with_zeroed_field(&buf, 4) != h.checksum.get() {
            return Ok(None);
        }
        let mut ops = Vec::with_capacity(count as usize);
        let mut data_sector = ds;
        for i in 0..count as usize {
            let d: LogDescriptor = read_struct(&buf[64 + 32 * i..]);
            if d.sequence_number.get() != seq || d.file_offset.get() % SECTOR_4K != 0 {
                return Ok(None);
            }
            match d.signature.get() {
                SIG_ZERO => {
                    let zl = d.value.get();
                    if zl % SECTOR_4K != 0 || d.word.get() != 0 {
                        return Ok(None);
                    }
                    ops.push(LogOp::Zero {
                        offset: d.file_offset.get(),
                        len: zl,
                    });
                }
                SIG_DESC => {
                    if (data_sector + 1) * SECTOR_4K > len {
                        return Ok(None);
                    }
                    let s = &buf[(data_sector * SECTOR_4K) as usize..][..SECTOR_4K as usize];
                    data_sector += 1;
                    let sig = u32::from_le_bytes(s[0..4].try_into().unwrap_or([0; 4]));
                    let hi = u32::from_le_bytes(s[4..8].try_into().unwrap_or([0; 4]));
                    let lo = u32::from_le_bytes(s[4092..4096].try_into().unwrap_or([0; 4]));
                    if sig != SIG_DATA || hi != (seq >> 32) as u32 || lo != seq as u32 {
                        return Ok(None);
                    }
                    let mut data = vec![0u8; SECTOR_4K as usize];
                    data[..8].copy_from_slice(&d.value.get().to_le_bytes());
                    data[8..4092].copy_from_slice(&s[8..4092]);
                    data[4092..].copy_from_slice(&d.word.get().to_le_bytes());
                    ops.push(LogOp::Data {
                        offset: d.file_offset.get(),
                        data,
                    });
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(LogEntry {
            pos,
            len,
            seq,
            tail,
            flushed_file_offset: h.flushed_file_offset.get(),
            last_file_offset: h.last_file_offset.get(),
            ops,
        }))
    }
}

/// Finds the active sequence (2.3.3): the newest valid, complete sequence, tail first.
/// `None` if the log holds no valid sequence.
pub fn find_active_sequence(
    st: &dyn Storage,
    log_offset: u64,
    log_len: u64,
    guid: Guid,
) -> Result<Option<Vec<LogEntry>>> {
    if log_len == 0 || guid.is_zero() {
        return Ok(None);
    }
    let mut r = LogReader {
        st,
        offset: log_offset,
        len: log_len,
        guid,
        cache: HashMap::new(),
        budget: 8 * log_len + 8 * MIB,
    };
    let mut candidate: Option<Vec<LogEntry>> = None;
    let mut cur_tail = 0u64;
    let mut old_tail;
    loop {
        let mut seq: Vec<LogEntry> = Vec::new();
        let mut head = cur_tail;
        let mut total = 0u64;
        while total < log_len {
            match r.entry_at(head)? {
                Some(e)
                    if seq
                        .last()
                        .is_none_or(|l| Some(e.seq) == l.seq.checked_add(1)) =>
                {
                    if total + e.len > log_len {
                        break;
                    }
                    head = (head + e.len) % log_len;
                    total += e.len;
                    seq.push(e);
                }
                _ => break,
            }
        }
        let start = seq
            .last()
            .and_then(|h| seq.iter().position(|e| e.pos == h.tail));
        if let (Some(start), Some(h)) = (start, seq.last()) {
            if candidate
                .as_ref()
                .and_then(|c| c.last())
                .is_none_or(|c| h.seq > c.seq)
            {
                candidate = Some(seq[start..].to_vec());
            }
        }
        old_tail = cur_tail;
        if start.is_none() {
            cur_tail = (cur_tail + SECTOR_4K) % log_len;
        } else {
            cur_tail = head;
        }
        if cur_tail <= old_tail {
            break;
        }
    }
    Ok(candidate)
}

/// Checks that every replay target avoids the file identifier, the headers and the log.
fn check_targets(seq: &[LogEntry], log_offset: u64, log_len: u64) -> Result<()> {
    for e in seq {
        for op in &e.ops {
            let (off, len) = match op {
                LogOp::Data { offset, .. } => (*offset, SECTOR_4K),
                LogOp::Zero { offset, len } => (*offset, *len),
            };
            let end = off.checked_add(len).ok_or_else(|| {
                Error::corrupt(format!("log entry {} has a descriptor past 2^64", e.seq))
            })?;
            if off < REGION_TABLE_OFFSETS[0] || (off < log_offset + log_len && log_offset < end) {
                return Err(Error::corrupt(format!(
                    "log entry {} would overwrite the file identifier, a header or the log itself (offset {off})",
                    e.seq
                )));
            }
        }
    }
    Ok(())
}

/// Whether the active sequence is already fully reflected in the file (so that a read-only open
/// can proceed without replaying).
pub fn sequence_is_applied(st: &dyn Storage, seq: &[LogEntry]) -> Result<bool> {
    let file_len = st.len().ctx(|| "getting the file size".into())?;
    let Some(head) = seq.last() else {
        return Ok(true);
    };
    if file_len < head.last_file_offset {
        return Ok(false);
    }
    // Later entries win over earlier ones for the same sector; compare the final state.
    let mut last: HashMap<u64, Option<&[u8]>> = HashMap::new();
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    for e in seq {
        for op in &e.ops {
            match op {
                LogOp::Data { offset, data } => {
                    last.insert(*offset, Some(data));
                }
                LogOp::Zero { offset, len } => {
                    zeros.push((*offset, *len));
                    let mut s = *offset;
                    while s < offset + len {
                        last.insert(s, None);
                        s += SECTOR_4K;
                    }
                }
            }
        }
    }
    let mut buf = vec![0u8; SECTOR_4K as usize];
    for (off, want) in last {
        if off + SECTOR_4K > file_len {
            return Ok(false);
        }
        st.read_at(off, &mut buf)
            .ctx(|| "reading the file to compare with the log".into())?;
        match want {
            Some(d) if d != buf.as_slice() => return Ok(false),
            None if buf.iter().any(|&b| b != 0) => return Ok(false),
            _ => {}
        }
    }
    Ok(true)
}

/// Replays the log if the header names one. Returns whether anything was replayed.
pub fn replay(st: &dyn Storage, header: &Header) -> Result<bool> {
    let log_len = header.log_length as u64;
    let Some(seq) = find_active_sequence(st, header.log_offset, log_len, header.log_guid)? else {
        // The header names a log but it holds no valid entry: nothing was committed through it
        // (a writer crashed between setting the log GUID and writing its first entry).
        tracing::warn!("VHDX log GUID is set but the log holds no valid entry; nothing to replay");
        return Ok(false);
    };
    let head = seq.last().expect("active sequence is never empty");
    let file_len = st.len().ctx(|| "getting the file size".into())?;
    if file_len < head.flushed_file_offset {
        return Err(Error::corrupt(format!(
            "file is {file_len} bytes but its log says it was at least {} bytes (truncated)",
            head.flushed_file_offset
        )));
    }
    check_targets(&seq, header.log_offset, log_len)?;
    for e in &seq {
        for op in &e.ops {
            match op {
                LogOp::Data { offset, data } => st
                    .write_at(*offset, data)
                    .ctx(|| format!("replaying the VHDX log to offset {offset}"))?,
                LogOp::Zero { offset, len } => {
                    // Only the part inside the file needs zeroing; extending reads as zeros.
                    let cur = st.len().ctx(|| "getting the file size".into())?;
                    let inside = (*len).min(cur.saturating_sub(*offset));
                    if inside > 0 {
                        st.write_zeroes(*offset, inside)
                            .ctx(|| format!("replaying a zero descriptor at {offset}"))?;
                    }
                    if offset + len > cur {
                        st.set_len(offset + len)
                            .ctx(|| "extending the file during replay".into())?;
                    }
                }
            }
        }
    }
    let cur = st.len().ctx(|| "getting the file size".into())?;
    if cur < head.last_file_offset {
        st.set_len(head.last_file_offset)
            .ctx(|| "extending the file after replay".into())?;
    }
    st.flush().ctx(|| "flushing the replayed log".into())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn params(guid: Guid, seq: u64, tail: u32) -> EntryParams {
        EntryParams {
            guid,
            seq,
            tail,
            flushed_file_offset: 4 * MIB,
            last_file_offset: 4 * MIB,
        }
    }

    fn setup() -> (MemStorage, Guid) {
        (
            MemStorage::new(vec![0u8; 4 * MIB as usize], 64 * MIB),
            Guid::new_random(),
        )
    }

    #[test]
    fn entry_round_trips_and_replays() {
        let (st, g) = setup();
        let mut sector = vec![0u8; 4096];
        for (i, b) in sector.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let e = build_entry(
            &params(g, 5, 0),
            &[(3 * MIB, &sector), (3 * MIB + 8192, &sector)],
        );
        st.write_at(MIB, &e).unwrap();
        let seq = find_active_sequence(&st, MIB, MIB, g).unwrap().unwrap();
        assert_eq!(seq.len(), 1);
        assert_eq!(seq[0].seq, 5);
        assert_eq!(seq[0].ops.len(), 2);
        assert!(!sequence_is_applied(&st, &seq).unwrap());
        let h = Header {
            sequence_number: 1,
            file_write_guid: Guid::ZERO,
            data_write_guid: Guid::ZERO,
            log_guid: g,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        assert!(replay(&st, &h).unwrap());
        let mut back = vec![0u8; 4096];
        st.read_at(3 * MIB + 8192, &mut back).unwrap();
        assert_eq!(back, sector);
        assert!(sequence_is_applied(&st, &seq).unwrap());
    }

    #[test]
    fn corrupted_or_foreign_entries_are_ignored() {
        let (st, g) = setup();
        let sector = vec![0xAB; 4096];
        let mut e = build_entry(&params(g, 9, 0), &[(3 * MIB, &sector)]);
        e[5000] ^= 1; // corrupt the data sector: checksum fails
        st.write_at(MIB, &e).unwrap();
        assert!(find_active_sequence(&st, MIB, MIB, g).unwrap().is_none());
        let e = build_entry(&params(Guid::new_random(), 9, 0), &[(3 * MIB, &sector)]);
        st.write_at(MIB, &e).unwrap();
        assert!(find_active_sequence(&st, MIB, MIB, g).unwrap().is_none());
    }

    #[test]
    fn newest_sequence_wins_and_chains_are_followed() {
        let (st, g) = setup();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        // Two-entry sequence at 0 (seq 10, 11) with the head's tail at 0.
        let e1 = build_entry(&params(g, 10, 0), &[(3 * MIB, &a)]);
        st.write_at(MIB, &e1).unwrap();
        let e2 = build_entry(&params(g, 11, 0), &[(3 * MIB, &b)]);
        st.write_at(MIB + e1.len() as u64, &e2).unwrap();
        // An older standalone entry further on.
        let e0 = build_entry(&params(g, 3, 512 * 1024), &[(3 * MIB, &a)]);
        st.write_at(MIB + 512 * 1024, &e0).unwrap();
        let seq = find_active_sequence(&st, MIB, MIB, g).unwrap().unwrap();
        assert_eq!(seq.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![10, 11]);
    }

    #[test]
    fn replay_refuses_protected_targets_and_truncation() {
        let (st, g) = setup();
        let s = vec![0u8; 4096];
        let h = Header {
            sequence_number: 1,
            file_write_guid: Guid::ZERO,
            data_write_guid: Guid::ZERO,
            log_guid: g,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        st.write_at(MIB, &build_entry(&params(g, 1, 0), &[(64 * KIB, &s)]))
            .unwrap();
        let err = replay(&st, &h).unwrap_err().to_string();
        assert!(err.contains("overwrite"), "{err}");
        let mut p = params(g, 2, 0);
        p.flushed_file_offset = 100 * MIB;
        st.write_at(MIB, &build_entry(&p, &[(3 * MIB, &s)]))
            .unwrap();
        let err = replay(&st, &h).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn max_data_sectors_fits() {
        for bytes in [4096u64, 8192, 512 * 1024, MIB] {
            let n = max_data_sectors(bytes) as u64;
            assert!((descriptor_sectors(n) + n) * SECTOR_4K <= bytes);
            assert!((descriptor_sectors(n + 1) + n + 1) * SECTOR_4K > bytes);
        }
    }
}
