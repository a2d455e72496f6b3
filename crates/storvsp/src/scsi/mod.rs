//! The SCSI target: what a LUN answers to a CDB.
//!
//! **What it is.** A direct-access block device (SBC-3 disk, SPC-4 device server) over a
//! `disk::BlockBackend`: [`execute`] takes a CDB, the addressed LUN (or `None` when nothing
//! is attached there), the initiator's data buffer ([`DataBuffer`]) and returns an
//! [`Outcome`]: GOOD with the number of bytes transferred, or CHECK CONDITION with sense
//! data. Pure apart from the backend I/O and the buffer copies: no VMBus, no threads, no
//! state between commands (errors are reported with autosense, so REQUEST SENSE has nothing
//! pending to return). Unit-tested command by command in `tests.rs`; the parser
//! ([`cdb`]) and [`execute`] are fuzzed (`fuzz/fuzz_targets/srb.rs`).
//!
//! Commands: INQUIRY (standard data and VPD pages 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2),
//! REPORT LUNS, TEST UNIT READY, REQUEST SENSE, READ CAPACITY(10/16), READ/WRITE(6/10/16),
//! VERIFY(10/16) (range check only), WRITE SAME(10/16), SYNCHRONIZE CACHE(10/16),
//! MODE SENSE(6/10) (caching and control pages), UNMAP, START STOP UNIT and PREVENT ALLOW
//! MEDIUM REMOVAL (accepted, nothing to do). Anything else: INVALID COMMAND OPERATION CODE.
//!
//! **Talks to.** The LUN's backend (`read_at`/`write_at`/`flush`/`unmap`) and the buffer.
//! The VSP supplies a buffer over guest memory that moves disk data straight between the
//! backend and guest RAM when it can ([`DataBuffer::read_disk`] / [`DataBuffer::write_disk`]);
//! the default implementations bounce through [`Scratch`] in chunks of at most
//! [`CHUNK`] bytes.
//!
//! **Never.** Trusts the CDB or the buffer: every length is checked against the buffer, the
//! capacity and the advertised limits before any I/O; an error is always sense data, never a
//! panic; no allocation grows with a guest-supplied length beyond [`CHUNK`] (response data
//! is at most a few hundred bytes, UNMAP parameter lists at most
//! `8 + 16 * MAX_UNMAP_DESCRIPTORS` bytes). Writes to a read-only LUN never reach the
//! backend.

pub mod cdb;
pub mod sense;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use disk::BlockBackend;

use cdb::{Command, PageControl};
pub use sense::Sense;

/// Largest bounce chunk (and WRITE SAME pattern buffer).
pub const CHUNK: usize = 256 << 10;
/// Most UNMAP block descriptors per command (VPD 0xB0).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most bytes one UNMAP descriptor may cover (VPD 0xB0 gives it in blocks).
pub const MAX_UNMAP_BYTES: u64 = 1 << 32;
/// Most bytes one WRITE SAME may cover (VPD 0xB0 gives it in blocks).
pub const MAX_WRITE_SAME_BYTES: u64 = 64 << 20;

/// T10 vendor identification in INQUIRY data (Hyper-V's, which guests' udev rules key on).
pub const VENDOR: &[u8; 8] = b"Msft    ";
/// Product identification.
pub const PRODUCT: &[u8; 16] = b"Virtual Disk    ";
/// Product revision level.
pub const REVISION: &[u8; 4] = b"1.0 ";

/// The initiator's data buffer could not be read or written (outside guest RAM, or shorter
/// than its descriptor said).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the request's data buffer is not accessible")]
pub struct BufferError;

/// A transfer between the disk and the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum XferError {
    /// The buffer side.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The disk side.
    #[error(transparent)]
    Disk(#[from] disk::Error),
}

/// Reusable memory for one executing thread: the bounce buffer.
#[derive(Default)]
pub struct Scratch {
    bounce: Vec<u8>,
}

impl Scratch {
    /// A page-aligned slice of `n <= CHUNK` bytes (grown on first use, then reused; its
    /// contents are whatever the last user left). Page-aligned so that a bounced transfer
    /// of an unbuffered disk still goes straight to the device (see `disk::storage`).
    pub fn get(&mut self, n: usize) -> &mut [u8] {
        const PAGE: usize = 4096;
        let n = n.min(CHUNK);
        if self.bounce.len() < n + PAGE {
            self.bounce.resize(n + PAGE, 0);
        }
        let at = self.bounce.as_ptr().align_offset(PAGE);
        &mut self.bounce[at..at + n]
    }
}

/// The data buffer of one command, as the initiator described it. Data-in commands write
/// into it, data-out commands read from it; offsets are bytes from its start.
pub trait DataBuffer {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// True if the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy `data` into the buffer at `offset` (device → initiator).
    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), BufferError>;

    /// Copy bytes at `offset` out of the buffer into `out` (initiator → device).
    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), BufferError>;

    /// Read `len` bytes of `disk` at `disk_offset` into the buffer's first `len` bytes.
    /// `disk_offset` and `len` are multiples of the logical sector size and `len <= len()`.
    /// The default bounces through `scratch` in [`CHUNK`]-sized pieces.
    fn read_disk(
        &self,
        disk: &dyn BlockBackend,
        disk_offset: u64,
        len: usize,
        scratch: &mut Scratch,
    ) -> Result<(), XferError> {
        bounce_read(self, disk, disk_offset, len, scratch)
    }

    /// Write the buffer's first `len` bytes to `disk` at `disk_offset` (same rules as
    /// [`read_disk`](Self::read_disk)).
    fn write_disk(
        &self,
        disk: &dyn BlockBackend,
        disk_offset: u64,
        len: usize,
        scratch: &mut Scratch,
    ) -> Result<(), XferError> {
        bounce_write(self, disk, disk_offset, len, scratch)
    }
}

/// [`DataBuffer::read_disk`] through `scratch`: disk → bounce chunk → buffer.
pub fn bounce_read<B: DataBuffer + ?Sized>(
    buf: &B,
    disk: &dyn BlockBackend,
    disk_offset: u64,
    len: usize,
    scratch: &mut Scratch,
) -> Result<(), XferError> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let b = scratch.get(n);
        disk.read_at(disk_offset + done as u64, b)?;
        buf.write_at(done, b)?;
        done += n;
    }
    Ok(())
}

/// [`DataBuffer::write_disk`] through `scratch`: buffer → bounce chunk → disk.
pub fn bounce_write<B: DataBuffer + ?Sized>(
    buf: &B,
    disk: &dyn BlockBackend,
    disk_offset: u64,
    len: usize,
    scratch: &mut Scratch,
) -> Result<(), XferError> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let b = scratch.get(n);
        buf.read_at(done, b)?;
        disk.write_at(disk_offset + done as u64, b)?;
        done += n;
    }
    Ok(())
}

/// A buffer in host memory (tests, fuzzing, in-band data).
#[derive(Debug, Default)]
pub struct VecBuffer(pub std::cell::RefCell<Vec<u8>>);

impl VecBuffer {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self(std::cell::RefCell::new(vec![0; len]))
    }
    /// A buffer holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        Self(std::cell::RefCell::new(data))
    }
    /// The contents.
    pub fn take(self) -> Vec<u8> {
        self.0.into_inner()
    }
}

impl DataBuffer for VecBuffer {
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
    fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), BufferError> {
        let mut v = self.0.borrow_mut();
        let end = offset.checked_add(data.len()).ok_or(BufferError)?;
        v.get_mut(offset..end)
            .ok_or(BufferError)?
            .copy_from_slice(data);
        Ok(())
    }
    fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), BufferError> {
        let v = self.0.borrow();
        let end = offset.checked_add(out.len()).ok_or(BufferError)?;
        out.copy_from_slice(v.get(offset..end).ok_or(BufferError)?);
        Ok(())
    }
}

/// A LUN could not be created from a backend.
#[derive(Debug, thiserror::Error)]
pub enum LunError {
    /// The backend's geometry cannot be presented.
    #[error("cannot present this disk as a SCSI LUN: {0}")]
    Geometry(String),
}

/// One LUN: a backend and how it is presented. Immutable once built (hot changes are
/// remove + add).
pub struct ScsiDisk {
    backend: Arc<dyn BlockBackend>,
    read_only: bool,
    unmap: bool,
    block_size: u32,
    block_shift: u32,
    blocks: u64,
    phys_exp: u8,
    disk_id: [u8; 16],
    max_transfer_blocks: u32,
}

impl std::fmt::Debug for ScsiDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDisk")
            .field("blocks", &self.blocks)
            .field("block_size", &self.block_size)
            .field("read_only", &self.read_only)
            .field("unmap", &self.unmap)
            .finish()
    }
}

impl ScsiDisk {
    /// Present `backend`. `read_only` adds write protection to what the backend reports;
    /// `unmap` advertises thin provisioning (UNMAP, LBPU) — pass false for backends where
    /// discarding is pointless or harmful. `max_transfer_bytes` is the per-command limit
    /// (VPD 0xB0); it is rounded down to whole blocks (at least one).
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        read_only: bool,
        unmap: bool,
        max_transfer_bytes: u32,
    ) -> Result<Self, LunError> {
        let bs = backend.logical_sector_size();
        let pbs = backend.physical_sector_size();
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(LunError::Geometry(format!(
                "logical sector size {bs} is not a power of two from 512 to 65536"
            )));
        }
        let phys_exp = if pbs >= bs && pbs.is_power_of_two() {
            (pbs / bs).trailing_zeros().min(15) as u8
        } else {
            0
        };
        let size = backend.size();
        let blocks = size / u64::from(bs);
        if blocks == 0 {
            return Err(LunError::Geometry(format!(
                "the disk holds no whole {bs}-byte block ({size} bytes)"
            )));
        }
        let read_only = read_only || backend.read_only();
        Ok(Self {
            disk_id: backend.disk_id(),
            backend,
            read_only,
            unmap: unmap && !read_only,
            block_size: bs,
            block_shift: bs.trailing_zeros(),
            blocks,
            phys_exp,
            max_transfer_blocks: (max_transfer_bytes / bs).max(1),
        })
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }
    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Whether UNMAP is advertised.
    pub fn unmap(&self) -> bool {
        self.unmap
    }
    /// Logical block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Capacity in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// The unit serial number (VPD 0x80): the disk id in hex, 32 characters.
    pub fn serial(&self) -> [u8; 32] {
        let mut s = [0u8; 32];
        for (i, b) in self.disk_id.iter().enumerate() {
            s[2 * i] = HEX[usize::from(b >> 4)];
            s[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        s
    }
    /// The NAA designator (VPD 0x83): NAA 3 ("locally assigned", needs no OUI), 60 bits
    /// folded from the disk id.
    pub fn naa(&self) -> [u8; 8] {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.disk_id {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        ((3u64 << 60) | (h >> 4)).to_be_bytes()
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// What a command came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `None`: GOOD. `Some`: CHECK CONDITION with this sense data.
    pub sense: Option<Sense>,
    /// Bytes moved to or from the data buffer.
    pub transferred: usize,
}

impl Outcome {
    /// GOOD, `n` bytes transferred.
    pub fn good(n: usize) -> Self {
        Self {
            sense: None,
            transferred: n,
        }
    }
    /// CHECK CONDITION, nothing transferred.
    pub fn check(sense: Sense) -> Self {
        Self {
            sense: Some(sense),
            transferred: 0,
        }
    }
}

/// The LUN numbers present on the target, ascending (for REPORT LUNS).
pub type LunList<'a> = &'a dyn Fn() -> Vec<u8>;

/// Execute `cdb` against `lun` (`None`: no LUN is attached at the addressed number).
pub fn execute(
    cdb: &[u8],
    lun: Option<&ScsiDisk>,
    luns: LunList<'_>,
    buf: &dyn DataBuffer,
    scratch: &mut Scratch,
) -> Outcome {
    let cmd = match cdb::parse(cdb) {
        Ok(c) => c,
        Err(s) => return Outcome::check(s),
    };
    match run(cmd, lun, luns, buf, scratch) {
        Ok(n) => Outcome::good(n),
        Err(s) => Outcome::check(s),
    }
}

/// Copy response `data` to the buffer, truncated to the allocation length and the buffer.
fn respond(buf: &dyn DataBuffer, data: &[u8], alloc: u32) -> Result<usize, Sense> {
    let n = data.len().min(alloc as usize).min(buf.len());
    buf.write_at(0, &data[..n])
        .map_err(|_| Sense::BAD_DATA_BUFFER)?;
    Ok(n)
}

fn run(
    cmd: Command,
    lun: Option<&ScsiDisk>,
    luns: LunList<'_>,
    buf: &dyn DataBuffer,
    scratch: &mut Scratch,
) -> Result<usize, Sense> {
    // Commands that work without a LUN.
    match cmd {
        Command::ReportLuns { select, alloc } => return report_luns(select, alloc, luns, buf),
        Command::Inquiry {
            vpd_page: None,
            alloc,
        } => return respond(buf, &standard_inquiry(lun.is_some()), alloc),
        Command::RequestSense { desc, alloc } => {
            // An absent LUN reports LOGICAL UNIT NOT SUPPORTED as parameter data (SPC-4
            // §6.39); a present one has nothing pending (autosense).
            let s = if lun.is_some() {
                Sense::NONE
            } else {
                Sense::LUN_NOT_SUPPORTED
            };
            return if desc {
                respond(buf, &s.descriptor(), alloc)
            } else {
                respond(buf, &s.fixed(), alloc)
            };
        }
        _ => {}
    }
    let d = lun.ok_or(Sense::LUN_NOT_SUPPORTED)?;
    match cmd {
        Command::TestUnitReady | Command::StartStopUnit | Command::PreventAllowMediumRemoval => {
            Ok(0)
        }
        Command::Inquiry {
            vpd_page: Some(page),
            alloc,
        } => respond(buf, &vpd(d, page)?, alloc),
        Command::ReadCapacity10 => {
            let last = (d.blocks - 1).min(u64::from(u32::MAX)) as u32;
            let mut r = [0u8; 8];
            r[..4].copy_from_slice(&last.to_be_bytes());
            r[4..].copy_from_slice(&d.block_size.to_be_bytes());
            respond(buf, &r, 8)
        }
        Command::ReadCapacity16 { alloc } => {
            let mut r = [0u8; 32];
            r[..8].copy_from_slice(&(d.blocks - 1).to_be_bytes());
            r[8..12].copy_from_slice(&d.block_size.to_be_bytes());
            r[13] = d.phys_exp & 0x0f;
            if d.unmap {
                r[14] = 0x80; // LBPME; LBPRZ stays 0
            }
            respond(buf, &r, alloc)
        }
        Command::ModeSense {
            ten,
            dbd,
            llbaa,
            pc,
            page,
            subpage,
            alloc,
        } => respond(
            buf,
            &mode_sense(d, ten, dbd, llbaa, pc, page, subpage)?,
            alloc,
        ),
        Command::Read { lba, blocks } => {
            let len = transfer_len(d, lba, blocks, buf)?;
            if len > 0 {
                buf.read_disk(&*d.backend, lba << d.block_shift, len, scratch)
                    .map_err(|e| xfer_sense(e, Sense::READ_ERROR))?;
            }
            Ok(len)
        }
        Command::Write { lba, blocks, fua } => {
            if d.read_only {
                return Err(Sense::WRITE_PROTECTED);
            }
            let len = transfer_len(d, lba, blocks, buf)?;
            if len > 0 {
                buf.write_disk(&*d.backend, lba << d.block_shift, len, scratch)
                    .map_err(|e| xfer_sense(e, Sense::WRITE_ERROR))?;
                if fua {
                    d.backend.flush().map_err(|_| Sense::WRITE_ERROR)?;
                }
            }
            Ok(len)
        }
        Command::Verify { lba, blocks } => {
            d.check_range(lba, u64::from(blocks))?;
            Ok(0)
        }
        Command::SynchronizeCache { lba, blocks } => {
            d.check_range(lba, u64::from(blocks))?;
            d.backend.flush().map_err(|_| Sense::WRITE_ERROR)?;
            Ok(0)
        }
        Command::WriteSame { lba, blocks, ndob } => write_same(d, lba, blocks, ndob, buf, scratch),
        Command::Unmap { param_len } => unmap(d, param_len, buf),
        Command::ReportLuns { .. } | Command::Inquiry { .. } | Command::RequestSense { .. } => {
            // Handled above.
            Ok(0)
        }
    }
}

fn xfer_sense(e: XferError, disk_error: Sense) -> Sense {
    match e {
        XferError::Buffer(_) => Sense::BAD_DATA_BUFFER,
        XferError::Disk(disk::Error::ReadOnly) => Sense::WRITE_PROTECTED,
        XferError::Disk(e) => {
            tracing::warn!("storvsp: disk I/O failed: {e}");
            disk_error
        }
    }
}

/// Bytes a READ/WRITE moves, after the range, limit and buffer checks.
fn transfer_len(d: &ScsiDisk, lba: u64, blocks: u32, buf: &dyn DataBuffer) -> Result<usize, Sense> {
    d.check_range(lba, u64::from(blocks))?;
    if blocks > d.max_transfer_blocks {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    // Cannot overflow: blocks <= max_transfer_blocks <= u32::MAX / block_size.
    let len = (blocks as usize) << d.block_shift;
    if len > buf.len() {
        return Err(Sense::BAD_DATA_BUFFER);
    }
    Ok(len)
}

fn standard_inquiry(present: bool) -> [u8; 36] {
    let mut r = [0u8; 36];
    // Peripheral qualifier 3 / type 0x1f: "no device can be attached at this LUN", which
    // makes Linux skip it (storvsc forces INQUIRY to succeed, so it cannot fail instead).
    r[0] = if present { 0x00 } else { 0x7f };
    r[2] = 0x06; // SPC-4
    r[3] = 0x12; // HISUP, response data format 2
    r[4] = (r.len() - 5) as u8;
    r[7] = 0x02; // CMDQUE
    r[8..16].copy_from_slice(VENDOR);
    r[16..32].copy_from_slice(PRODUCT);
    r[32..36].copy_from_slice(REVISION);
    r
}

/// VPD pages we return, ascending.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn vpd(d: &ScsiDisk, page: u8) -> Result<Vec<u8>, Sense> {
    let mut r = vec![0u8, page, 0, 0];
    match page {
        0x00 => r.extend_from_slice(&VPD_PAGES),
        0x80 => r.extend_from_slice(&d.serial()),
        0x83 => {
            // NAA (binary, LU association).
            r.extend_from_slice(&[0x01, 0x03, 0, 8]);
            r.extend_from_slice(&d.naa());
            // T10 vendor ID (ASCII): vendor + serial.
            r.extend_from_slice(&[0x02, 0x01, 0, (VENDOR.len() + 32) as u8]);
            r.extend_from_slice(VENDOR);
            r.extend_from_slice(&d.serial());
        }
        0xb0 => {
            let mut p = [0u8; 0x3c];
            p[0] = 0x01; // WSNZ: WRITE SAME of 0 blocks is refused
            let gran = 1u16 << d.phys_exp;
            p[2..4].copy_from_slice(&gran.to_be_bytes());
            p[4..8].copy_from_slice(&d.max_transfer_blocks.to_be_bytes());
            p[8..12].copy_from_slice(&d.max_transfer_blocks.to_be_bytes());
            if d.unmap {
                let max_lbas = (MAX_UNMAP_BYTES >> d.block_shift).min(u64::from(u32::MAX)) as u32;
                p[16..20].copy_from_slice(&max_lbas.to_be_bytes());
                p[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                p[24..28].copy_from_slice(&u32::from(gran).to_be_bytes());
            }
            let ws = MAX_WRITE_SAME_BYTES >> d.block_shift;
            p[32..40].copy_from_slice(&ws.to_be_bytes());
            r.extend_from_slice(&p);
        }
        0xb1 => {
            let mut p = [0u8; 0x3c];
            p[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            r.extend_from_slice(&p);
        }
        0xb2 => {
            // Threshold exponent 0; LBPU when UNMAP works; LBPWS/LBPWS10 0; LBPRZ 0;
            // provisioning type 2 (thin) when unmapping, else 0.
            r.extend_from_slice(&[
                0,
                if d.unmap { 0x80 } else { 0 },
                if d.unmap { 2 } else { 0 },
                0,
            ]);
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    }
    let len = (r.len() - 4) as u16;
    r[2..4].copy_from_slice(&len.to_be_bytes());
    Ok(r)
}

fn report_luns(
    select: u8,
    alloc: u32,
    luns: LunList<'_>,
    buf: &dyn DataBuffer,
) -> Result<usize, Sense> {
    let list = match select {
        // All LUNs / all but well-known / ... (we have no well-known LUNs and no
        // administrative LUNs, so every accepted selection is the plain list or empty).
        0x00 | 0x02 | 0x11 => luns(),
        0x01 | 0x10 | 0x12 => Vec::new(),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let mut r = vec![0u8; 8 + 8 * list.len()];
    r[..4].copy_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    for (i, &l) in list.iter().enumerate() {
        // Peripheral device addressing, single level: 00b, bus 0, LUN.
        r[8 + 8 * i + 1] = l;
    }
    respond(buf, &r, alloc)
}

const CACHING_PAGE: u8 = 0x08;
const CONTROL_PAGE: u8 = 0x0a;
const ALL_PAGES: u8 = 0x3f;

fn mode_page(page: u8, pc: PageControl) -> Vec<u8> {
    let changeable = pc == PageControl::Changeable;
    match page {
        CACHING_PAGE => {
            let mut p = vec![0u8; 20];
            p[0] = CACHING_PAGE;
            p[1] = 0x12;
            if !changeable {
                p[2] = 0x04; // WCE: writes are cached until SYNCHRONIZE CACHE
            }
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = CONTROL_PAGE;
            p[1] = 0x0a;
            if !changeable {
                p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
            }
            p
        }
    }
}

fn mode_sense(
    d: &ScsiDisk,
    ten: bool,
    dbd: bool,
    llbaa: bool,
    pc: PageControl,
    page: u8,
    subpage: u8,
) -> Result<Vec<u8>, Sense> {
    if pc == PageControl::Saved {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    let pages: &[u8] = match (page, subpage) {
        (CACHING_PAGE, 0) => &[CACHING_PAGE],
        (CONTROL_PAGE, 0) => &[CONTROL_PAGE],
        (ALL_PAGES, 0 | 0xff) => &[CACHING_PAGE, CONTROL_PAGE],
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let long = ten && llbaa;
    let bd: Vec<u8> = if dbd {
        Vec::new()
    } else if long {
        let mut b = vec![0u8; 16];
        b[..8].copy_from_slice(&d.blocks.to_be_bytes());
        b[12..].copy_from_slice(&d.block_size.to_be_bytes());
        b
    } else {
        let mut b = vec![0u8; 8];
        let n = d.blocks.min(u64::from(u32::MAX)) as u32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        b[5..].copy_from_slice(&d.block_size.to_be_bytes()[1..]);
        b
    };
    let dev_specific = if d.read_only { 0x80 } else { 0 }; // WP
    let mut r = if ten {
        let mut h = vec![0u8; 8];
        h[3] = dev_specific;
        h[4] = u8::from(long && !dbd);
        h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, dev_specific, bd.len() as u8]
    };
    r.extend_from_slice(&bd);
    for &p in pages {
        r.extend_from_slice(&mode_page(p, pc));
    }
    // Mode data length excludes itself.
    if ten {
        let n = (r.len() - 2) as u16;
        r[..2].copy_from_slice(&n.to_be_bytes());
    } else {
        r[0] = (r.len() - 1) as u8;
    }
    Ok(r)
}

fn write_same(
    d: &ScsiDisk,
    lba: u64,
    blocks: u32,
    ndob: bool,
    buf: &dyn DataBuffer,
    scratch: &mut Scratch,
) -> Result<usize, Sense> {
    if d.read_only {
        return Err(Sense::WRITE_PROTECTED);
    }
    d.check_range(lba, u64::from(blocks))?;
    let total = u64::from(blocks) << d.block_shift;
    if blocks == 0 || total > MAX_WRITE_SAME_BYTES {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let bs = d.block_size as usize;
    if !ndob && buf.len() < bs {
        return Err(Sense::BAD_DATA_BUFFER);
    }
    // A pattern chunk: whole blocks, at most CHUNK (blocks are at most 64 KiB, so at least
    // one fits).
    let chunk_blocks = (CHUNK / bs).max(1);
    let chunk_len = (chunk_blocks * bs).min(total as usize);
    let pattern = scratch.get(chunk_len);
    if ndob {
        pattern.fill(0);
    } else {
        buf.read_at(0, &mut pattern[..bs])
            .map_err(|_| Sense::BAD_DATA_BUFFER)?;
        for i in 1..chunk_len / bs {
            pattern.copy_within(..bs, i * bs);
        }
    }
    let mut off = lba << d.block_shift;
    let end = off + total;
    while off < end {
        let n = ((end - off) as usize).min(chunk_len);
        d.backend
            .write_at(off, &pattern[..n])
            .map_err(|e| xfer_sense(XferError::Disk(e), Sense::WRITE_ERROR))?;
        off += n as u64;
    }
    Ok(if ndob { 0 } else { bs })
}

fn unmap(d: &ScsiDisk, param_len: u32, buf: &dyn DataBuffer) -> Result<usize, Sense> {
    if !d.unmap {
        // LBPU = 0: the command is not supported on this LUN.
        return Err(if d.read_only {
            Sense::WRITE_PROTECTED
        } else {
            Sense::INVALID_OPCODE
        });
    }
    let param_len = param_len as usize;
    if param_len == 0 {
        return Ok(0);
    }
    if param_len < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    if param_len > buf.len() {
        return Err(Sense::BAD_DATA_BUFFER);
    }
    let mut header = [0u8; 8];
    buf.read_at(0, &mut header)
        .map_err(|_| Sense::BAD_DATA_BUFFER)?;
    let bd_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let count = bd_len.min(param_len - 8) / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    // Bounded: at most 16 * MAX_UNMAP_DESCRIPTORS bytes.
    let mut descs = vec![0u8; count * 16];
    buf.read_at(8, &mut descs)
        .map_err(|_| Sense::BAD_DATA_BUFFER)?;
    let max_lbas = MAX_UNMAP_BYTES >> d.block_shift;
    let mut ranges = Vec::with_capacity(count);
    for dsc in descs.chunks_exact(16) {
        let lba = u64::from_be_bytes(dsc[..8].try_into().expect("8 bytes"));
        let n = u64::from(u32::from_be_bytes(dsc[8..12].try_into().expect("4 bytes")));
        d.check_range(lba, n)?;
        if n > max_lbas {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        if n > 0 {
            ranges.push((lba, n));
        }
    }
    for (lba, n) in ranges {
        d.backend
            .unmap(lba << d.block_shift, n << d.block_shift)
            .map_err(|e| xfer_sense(XferError::Disk(e), Sense::WRITE_ERROR))?;
    }
    Ok(param_len)
}
