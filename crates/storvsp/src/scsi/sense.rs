//! Sense data: the sense keys and additional sense codes the target reports (SPC-4 §4.5), and
//! the fixed (0x70) and descriptor (0x72) formats.

/// Sense keys.
pub mod key {
    /// No error.
    pub const NO_SENSE: u8 = 0x0;
    /// The medium could not be read or written.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// Bad CDB, bad parameter, or no such LUN.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// Write to a write-protected LUN.
    pub const DATA_PROTECT: u8 = 0x7;
    /// The command was aborted (here: its data buffer was unusable).
    pub const ABORTED_COMMAND: u8 = 0xB;
}

/// One error as SCSI reports it: sense key, additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key ([`key`]).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self { key, asc, ascq }
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (0x20/00).
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (0x24/00).
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (0x21/00).
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (0x25/00).
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (0x1A/00).
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (0x26/00).
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (0x39/00).
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// DATA PROTECT, WRITE PROTECTED (0x27/00).
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR (0x11/00).
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// MEDIUM ERROR, WRITE ERROR (0x0C/00).
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00);
    /// ABORTED COMMAND, INVALID INFORMATION UNIT (0x0E/00): the request's data buffer is
    /// shorter than the command needs or lies outside guest RAM (a transport-level fault,
    /// not a CDB one).
    pub const BAD_DATA_BUFFER: Sense = Sense::new(key::ABORTED_COMMAND, 0x0E, 0x00);
    /// NO SENSE (what REQUEST SENSE reports: errors are reported with autosense).
    pub const NONE: Sense = Sense::new(key::NO_SENSE, 0, 0);

    /// Fixed-format sense data (response code 0x70, current error), 18 bytes.
    pub fn fixed(&self) -> [u8; FIXED_LEN] {
        let mut b = [0u8; FIXED_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        b[7] = (FIXED_LEN - 8) as u8; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data (response code 0x72) without descriptors, 8 bytes.
    pub fn descriptor(&self) -> [u8; 8] {
        [0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0]
    }
}

/// Length of fixed-format sense data.
pub const FIXED_LEN: usize = 18;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x21, 0x00));
        let d = Sense::WRITE_PROTECTED.descriptor();
        assert_eq!(d[..4], [0x72, 0x07, 0x27, 0x00]);
    }
}
