//! The one error type of the crate. Every variant renders as one line that names the problem
//! (and, where known, the file), so the CLI can print it as is.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening, reading, writing or converting a disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error from the host, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (e.g. "reading VHDX header 1 of /x/disk.vhdx").
        context: String,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// The image is structurally invalid; the text names the structure and the problem.
    #[error("corrupt VHDX image{}: {what}", path_suffix(.path))]
    Corrupt {
        /// The image file, when known.
        path: Option<PathBuf>,
        /// What is wrong, e.g. "BAT entry 17 points past the end of the file".
        what: String,
    },
    /// The image uses a feature this implementation does not support (e.g. an unknown
    /// required region).
    #[error("unsupported VHDX image{}: {what}", path_suffix(.path))]
    Unsupported {
        /// The image file, when known.
        path: Option<PathBuf>,
        /// The feature.
        what: String,
    },
    /// The log of the image holds updates that were never applied (the image was not closed
    /// cleanly) and the image was opened read-only, so they cannot be replayed.
    #[error(
        "VHDX image{} was not closed cleanly and its log must be replayed; open it read-write once (e.g. `verdigris check-vhd` does not, `resize-vhd`/a VM start does)",
        path_suffix(.path)
    )]
    LogReplayNeeded {
        /// The image file, when known.
        path: Option<PathBuf>,
    },
    /// A differencing disk's parent could not be found at any path its locator names.
    #[error("parent of differencing disk {} not found (tried: {})", .child.display(), join_paths(.tried))]
    MissingParent {
        /// The child image.
        child: PathBuf,
        /// The paths that were tried, in order.
        tried: Vec<PathBuf>,
    },
    /// A differencing disk's parent was found but is not the disk it was created from.
    #[error("parent {} of differencing disk {} does not match: child expects parent data GUID {expected}, parent has {found}", .parent.display(), .child.display())]
    ParentMismatch {
        /// The child image.
        child: PathBuf,
        /// The parent image that was opened.
        parent: PathBuf,
        /// The parent linkage GUID(s) recorded in the child.
        expected: String,
        /// The parent's DataWriteGuid.
        found: String,
    },
    /// A caller error: unaligned I/O, out-of-range offset, bad creation parameter, ...
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A write, unmap or resize on a disk opened read-only.
    #[error("disk is read-only")]
    ReadOnly,
    /// An earlier I/O error left the in-memory state of a VHDX possibly out of step with the
    /// file; the image on disk is consistent (the log guarantees it) but must be reopened.
    #[error("VHDX image{} had an I/O error during a metadata update; reopen it", path_suffix(.path))]
    Failed {
        /// The image file, when known.
        path: Option<PathBuf>,
    },
}

fn path_suffix(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => format!(" {}", p.display()),
        None => String::new(),
    }
}

fn join_paths(p: &[PathBuf]) -> String {
    if p.is_empty() {
        return "no usable path in the parent locator".into();
    }
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A structural corruption without a known path (the path is filled in by the opener).
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: None,
            what: what.into(),
        }
    }

    pub(crate) fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: None,
            what: what.into(),
        }
    }

    /// Attaches the image path to errors that carry one and do not have it yet.
    pub(crate) fn with_path(mut self, path: &std::path::Path) -> Self {
        match &mut self {
            Error::Corrupt { path: p, .. }
            | Error::Unsupported { path: p, .. }
            | Error::LogReplayNeeded { path: p }
            | Error::Failed { path: p }
                if p.is_none() =>
            {
                *p = Some(path.to_path_buf());
            }
            _ => {}
        }
        self
    }
}

/// Adds context to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
