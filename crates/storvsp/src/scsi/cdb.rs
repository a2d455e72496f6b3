//! The CDB parser: a command descriptor block (up to 16 guest-supplied bytes) to a
//! [`Command`], or the sense data that rejects it. Pure and total: any byte string gives
//! one or the other (fuzzed by `fuzz/fuzz_targets/srb.rs`).
//!
//! Layouts from SPC-4 / SBC-3 (and Linux's `include/scsi/scsi_proto.h` for opcode values).

use super::sense::Sense;

/// Operation codes.
pub mod opcode {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// READ(6).
    pub const READ_6: u8 = 0x08;
    /// WRITE(6).
    pub const WRITE_6: u8 = 0x0A;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// MODE SENSE(6).
    pub const MODE_SENSE_6: u8 = 0x1A;
    /// START STOP UNIT.
    pub const START_STOP_UNIT: u8 = 0x1B;
    /// PREVENT ALLOW MEDIUM REMOVAL.
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1E;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY_10: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// WRITE(10).
    pub const WRITE_10: u8 = 0x2A;
    /// VERIFY(10).
    pub const VERIFY_10: u8 = 0x2F;
    /// SYNCHRONIZE CACHE(10).
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    /// WRITE SAME(10).
    pub const WRITE_SAME_10: u8 = 0x41;
    /// UNMAP.
    pub const UNMAP: u8 = 0x42;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5A;
    /// READ(16).
    pub const READ_16: u8 = 0x88;
    /// WRITE(16).
    pub const WRITE_16: u8 = 0x8A;
    /// VERIFY(16).
    pub const VERIFY_16: u8 = 0x8F;
    /// SYNCHRONIZE CACHE(16).
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    /// WRITE SAME(16).
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16) (READ CAPACITY(16) is service action 0x10).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    /// REPORT LUNS.
    pub const REPORT_LUNS: u8 = 0xA0;
}

/// SERVICE ACTION IN(16) service action: READ CAPACITY(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;

/// Mode page control (MODE SENSE byte 2 bits 7:6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageControl {
    /// Current values.
    Current,
    /// Changeable values (a mask).
    Changeable,
    /// Default values.
    Default,
    /// Saved values (not supported: no saved parameters).
    Saved,
}

/// A parsed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense {
        /// Descriptor-format sense wanted.
        desc: bool,
        /// Allocation length.
        alloc: u32,
    },
    /// INQUIRY.
    Inquiry {
        /// `Some(page)` for a vital product data page, `None` for standard data.
        vpd_page: Option<u8>,
        /// Allocation length.
        alloc: u32,
    },
    /// MODE SENSE(6) or (10).
    ModeSense {
        /// The 10-byte form (wider header, long LBA descriptors allowed).
        ten: bool,
        /// Disable block descriptors.
        dbd: bool,
        /// Long LBA block descriptor accepted (10-byte form only).
        llbaa: bool,
        /// Page control.
        pc: PageControl,
        /// Page code (0x3F = all).
        page: u8,
        /// Subpage code.
        subpage: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// START STOP UNIT (accepted, nothing to do).
    StartStopUnit,
    /// PREVENT ALLOW MEDIUM REMOVAL (accepted: nothing is removable).
    PreventAllowMediumRemoval,
    /// READ CAPACITY(10).
    ReadCapacity10,
    /// READ CAPACITY(16).
    ReadCapacity16 {
        /// Allocation length.
        alloc: u32,
    },
    /// READ(6/10/16).
    Read {
        /// First logical block.
        lba: u64,
        /// Blocks.
        blocks: u32,
    },
    /// WRITE(6/10/16).
    Write {
        /// First logical block.
        lba: u64,
        /// Blocks.
        blocks: u32,
        /// Force unit access: durable before completion.
        fua: bool,
    },
    /// VERIFY(10/16) without byte check: the medium is "verified" by a range check.
    Verify {
        /// First logical block.
        lba: u64,
        /// Blocks.
        blocks: u32,
    },
    /// SYNCHRONIZE CACHE(10/16).
    SynchronizeCache {
        /// First logical block.
        lba: u64,
        /// Blocks (0 = to the end).
        blocks: u32,
    },
    /// WRITE SAME(10/16): one block of data-out (or zeros) written over a range. The UNMAP
    /// bit is accepted and ignored (LBPWS = 0: the blocks are written, not deallocated).
    WriteSame {
        /// First logical block.
        lba: u64,
        /// Blocks (0 is refused: WSNZ = 1).
        blocks: u32,
        /// No data-out buffer: write zeros (16-byte form only).
        ndob: bool,
    },
    /// UNMAP.
    Unmap {
        /// Parameter list length.
        param_len: u32,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// SELECT REPORT.
        select: u8,
        /// Allocation length.
        alloc: u32,
    },
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Length of a CDB by its opcode's group code (SPC-4 §4.2.5.1); `None` for the reserved and
/// vendor-specific groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Parse a CDB. Unknown opcodes give INVALID COMMAND OPERATION CODE; a CDB shorter than its
/// opcode needs, or a field we do not support (protection information, byte-check verify,
/// obsolete INQUIRY CmdDt, unknown service actions) gives INVALID FIELD IN CDB.
pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
    let Some(&op) = cdb.first() else {
        return Err(Sense::INVALID_OPCODE);
    };
    let known = matches!(
        op,
        opcode::TEST_UNIT_READY
            | opcode::REQUEST_SENSE
            | opcode::READ_6
            | opcode::WRITE_6
            | opcode::INQUIRY
            | opcode::MODE_SENSE_6
            | opcode::START_STOP_UNIT
            | opcode::PREVENT_ALLOW_MEDIUM_REMOVAL
            | opcode::READ_CAPACITY_10
            | opcode::READ_10
            | opcode::WRITE_10
            | opcode::VERIFY_10
            | opcode::SYNCHRONIZE_CACHE_10
            | opcode::WRITE_SAME_10
            | opcode::UNMAP
            | opcode::MODE_SENSE_10
            | opcode::READ_16
            | opcode::WRITE_16
            | opcode::VERIFY_16
            | opcode::SYNCHRONIZE_CACHE_16
            | opcode::WRITE_SAME_16
            | opcode::SERVICE_ACTION_IN_16
            | opcode::REPORT_LUNS
    );
    if !known {
        return Err(Sense::INVALID_OPCODE);
    }
    // Every known opcode is in a group with a defined length.
    let need = cdb_len(op).ok_or(Sense::INVALID_OPCODE)?;
    if cdb.len() < need {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let c = &cdb[..need];
    let cmd = match op {
        opcode::TEST_UNIT_READY => Command::TestUnitReady,
        opcode::REQUEST_SENSE => Command::RequestSense {
            desc: c[1] & 1 != 0,
            alloc: u32::from(c[4]),
        },
        opcode::INQUIRY => {
            let evpd = c[1] & 1 != 0;
            if c[1] & 0x02 != 0 || (!evpd && c[2] != 0) {
                // CmdDt (obsolete), or a page code without EVPD.
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::Inquiry {
                vpd_page: evpd.then_some(c[2]),
                alloc: be16(&c[3..5]),
            }
        }
        opcode::MODE_SENSE_6 | opcode::MODE_SENSE_10 => {
            let ten = op == opcode::MODE_SENSE_10;
            let pc = match c[2] >> 6 {
                0 => PageControl::Current,
                1 => PageControl::Changeable,
                2 => PageControl::Default,
                _ => PageControl::Saved,
            };
            Command::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc,
                page: c[2] & 0x3f,
                subpage: c[3],
                alloc: if ten { be16(&c[7..9]) } else { u32::from(c[4]) },
            }
        }
        opcode::START_STOP_UNIT => Command::StartStopUnit,
        opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => Command::PreventAllowMediumRemoval,
        opcode::READ_CAPACITY_10 => Command::ReadCapacity10,
        opcode::SERVICE_ACTION_IN_16 => match c[1] & 0x1f {
            SA_READ_CAPACITY_16 => Command::ReadCapacity16 {
                alloc: be32(&c[10..14]),
            },
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        },
        opcode::READ_6 | opcode::WRITE_6 => {
            let lba = u64::from(u32::from_be_bytes([0, c[1] & 0x1f, c[2], c[3]]));
            // A transfer length of 0 means 256 blocks in the 6-byte forms.
            let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
            if op == opcode::READ_6 {
                Command::Read { lba, blocks }
            } else {
                Command::Write {
                    lba,
                    blocks,
                    fua: false,
                }
            }
        }
        opcode::READ_10 | opcode::WRITE_10 | opcode::READ_16 | opcode::WRITE_16 => {
            // RDPROTECT / WRPROTECT: we format no protection information.
            if c[1] & 0xe0 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let fua = c[1] & 0x08 != 0;
            let (lba, blocks) = if need == 10 {
                (u64::from(be32(&c[2..6])), be16(&c[7..9]))
            } else {
                (be64(&c[2..10]), be32(&c[10..14]))
            };
            if op == opcode::READ_10 || op == opcode::READ_16 {
                Command::Read { lba, blocks }
            } else {
                Command::Write { lba, blocks, fua }
            }
        }
        opcode::VERIFY_10 | opcode::VERIFY_16 => {
            // VRPROTECT, or BYTCHK (compare with data-out): not supported.
            if c[1] & 0xe0 != 0 || c[1] & 0x06 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let (lba, blocks) = if need == 10 {
                (u64::from(be32(&c[2..6])), be16(&c[7..9]))
            } else {
                (be64(&c[2..10]), be32(&c[10..14]))
            };
            Command::Verify { lba, blocks }
        }
        opcode::SYNCHRONIZE_CACHE_10 => Command::SynchronizeCache {
            lba: u64::from(be32(&c[2..6])),
            blocks: be16(&c[7..9]),
        },
        opcode::SYNCHRONIZE_CACHE_16 => Command::SynchronizeCache {
            lba: be64(&c[2..10]),
            blocks: be32(&c[10..14]),
        },
        opcode::WRITE_SAME_10 | opcode::WRITE_SAME_16 => {
            // WRPROTECT, or ANCHOR (anchored state not supported).
            if c[1] & 0xe0 != 0 || c[1] & 0x10 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            if need == 10 {
                Command::WriteSame {
                    lba: u64::from(be32(&c[2..6])),
                    blocks: be16(&c[7..9]),
                    ndob: false,
                }
            } else {
                Command::WriteSame {
                    lba: be64(&c[2..10]),
                    blocks: be32(&c[10..14]),
                    ndob: c[1] & 0x01 != 0,
                }
            }
        }
        opcode::UNMAP => {
            // ANCHOR: anchored (deallocated) state is not supported (ANC_SUP = 0).
            if c[1] & 0x01 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::Unmap {
                param_len: be16(&c[7..9]),
            }
        }
        opcode::REPORT_LUNS => Command::ReportLuns {
            select: c[2],
            alloc: be32(&c[6..10]),
        },
        _ => return Err(Sense::INVALID_OPCODE),
    };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_of_every_size() {
        assert_eq!(
            parse(&[0x08, 0x1f, 0xff, 0xfe, 0, 0]),
            Ok(Command::Read {
                lba: 0x1f_fffe,
                blocks: 256
            })
        );
        assert_eq!(
            parse(&[0x0a, 0xe1, 0, 2, 5, 0]),
            Ok(Command::Write {
                lba: 0x01_0002,
                blocks: 5,
                fua: false
            })
        );
        assert_eq!(
            parse(&[0x28, 0, 0x12, 0x34, 0x56, 0x78, 0, 0x01, 0x02, 0]),
            Ok(Command::Read {
                lba: 0x1234_5678,
                blocks: 0x102
            })
        );
        assert_eq!(
            parse(&[0x2a, 0x08, 0, 0, 0, 1, 0, 0, 8, 0]),
            Ok(Command::Write {
                lba: 1,
                blocks: 8,
                fua: true
            })
        );
        let mut c16 = [0u8; 16];
        c16[0] = 0x88;
        c16[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        c16[10..14].copy_from_slice(&0x0a0b_0c0du32.to_be_bytes());
        assert_eq!(
            parse(&c16),
            Ok(Command::Read {
                lba: 0x0102_0304_0506_0708,
                blocks: 0x0a0b_0c0d
            })
        );
        c16[1] = 0x20; // RDPROTECT
        assert_eq!(parse(&c16), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn short_unknown_and_empty_cdbs() {
        assert_eq!(parse(&[]), Err(Sense::INVALID_OPCODE));
        assert_eq!(parse(&[0x28, 0, 0]), Err(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(parse(&[0xff; 16]), Err(Sense::INVALID_OPCODE));
        assert_eq!(
            parse(&[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(parse(&[0x3b; 10]), Err(Sense::INVALID_OPCODE)); // WRITE BUFFER
        assert_eq!(parse(&[0xe0; 16]), Err(Sense::INVALID_OPCODE)); // vendor group
    }

    #[test]
    fn inquiry_fields() {
        assert_eq!(
            parse(&[0x12, 0, 0, 0, 36, 0]),
            Ok(Command::Inquiry {
                vpd_page: None,
                alloc: 36
            })
        );
        assert_eq!(
            parse(&[0x12, 1, 0x83, 1, 0, 0]),
            Ok(Command::Inquiry {
                vpd_page: Some(0x83),
                alloc: 256
            })
        );
        assert_eq!(
            parse(&[0x12, 0, 0x83, 0, 36, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            parse(&[0x12, 2, 0, 0, 36, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
    }

    #[test]
    fn service_actions_and_misc() {
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        assert_eq!(parse(&c), Ok(Command::ReadCapacity16 { alloc: 32 }));
        c[1] = 0x12; // GET LBA STATUS
        assert_eq!(parse(&c), Err(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(
            parse(&[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            parse(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
            Ok(Command::Unmap { param_len: 24 })
        );
        assert_eq!(
            parse(&[0x5a, 0x18, 0x48, 0, 0, 0, 0, 0x10, 0, 0]),
            Ok(Command::ModeSense {
                ten: true,
                dbd: true,
                llbaa: true,
                pc: PageControl::Changeable,
                page: 8,
                subpage: 0,
                alloc: 0x1000
            })
        );
        assert_eq!(
            parse(&[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
    }
}
