//! Small pieces shared by every Verdigris command line: the worker (`verdigris run`, the disk
//! verbs) and the management service's CLI (`verdigris connect`, `new-vm --memory`).
//!
//! - [`parse_size`] / [`format_size`]: the one syntax for sizes a user types (`512M`, `2G`,
//!   `65536K`, plain bytes) and the way sizes are shown back.
//! - [`RawMode`]: the terminal in raw mode while a serial console is attached, restored on drop.
//!
//! Talks to: the controlling terminal (fd 0) only. Must never: depend on the rest of the
//! workspace (the service must not link the worker's KVM stack for these few lines), or leave the
//! terminal in raw mode once its guard is dropped.
//!
//! Hand-written rather than taken from a crate: a size parser with exactly our units and error
//! lines is twenty lines, and `termios`/`crossterm` would bring more than the three libc calls we
//! need.

/// Parses `512M`, `2G`, `65536K`, `1T`, `1048576` (bytes; a trailing `B` is allowed). Units are
/// binary (K = 1024) and case-insensitive. The error is one line naming the bad value.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => {
                    return Err(format!(
                        "invalid size '{s}': unknown unit '{c}' (use K, M, G, T)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}' (expected e.g. 512M or 2G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
}

/// Formats a byte count the way the CLIs show memory: whole GiB, else MiB, else bytes.
pub fn format_size(n: u64) -> String {
    if n >= 1 << 30 && n & ((1 << 30) - 1) == 0 {
        format!("{} GiB", n >> 30)
    } else if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} B")
    }
}

/// The terminal on fd 0 in raw mode; the saved attributes are restored when dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal (None otherwise, or if that fails). Output
    /// post-processing stays on, so host log lines written meanwhile stay readable.
    pub fn enable() -> Option<Self> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a zeroed, then filled, termios.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(Self { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enable` on the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size(" 64k ").unwrap(), 64 << 10);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
    }

    #[test]
    fn bad_sizes_are_one_line_errors() {
        for bad in ["12X", "M", "", "99999999999999T", "é", "1.5G", "-1M", "5é"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        assert!(parse_size("99999999999999T")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit 'X'"));
    }

    #[test]
    fn sizes_format() {
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(2 << 30), "2 GiB");
        assert_eq!(format_size(3 << 29), "1536 MiB");
        assert_eq!(format_size(4096), "4096 B");
    }
}
