//! The disk verbs, named after Hyper-V's cmdlets: `new-vhd`, `vhd-info`, `check-vhd`,
//! `convert-vhd`, `merge-vhd`, `resize-vhd`. Thin: the work is `disk::ops`; this file parses
//! arguments, draws progress bars (`indicatif`, only on a terminal) and prints results.

use clap::{Subcommand, ValueEnum};
use disk::ops;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    Dynamic,
    Fixed,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Vhdx,
    Raw,
}

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Create a VHDX: dynamic (default), fixed, or differencing (--parent).
    NewVhd {
        path: PathBuf,
        /// Virtual size, e.g. 10G (not for differencing disks).
        #[arg(long)]
        size: Option<String>,
        #[arg(long, value_enum, default_value = "dynamic")]
        kind: Kind,
        /// Make a differencing disk over this parent.
        #[arg(long, conflicts_with_all = ["size", "kind"])]
        parent: Option<PathBuf>,
        /// Block size, 1M to 256M (power of two).
        #[arg(long)]
        block_size: Option<String>,
        /// Logical sector size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        logical_sector: u32,
        /// Physical sector size: 512 or 4096.
        #[arg(long, default_value_t = 4096)]
        physical_sector: u32,
    },
    /// Describe a disk image (VHDX or raw).
    VhdInfo {
        path: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check an image and its parent chain; exit 1 if it is not consistent.
    CheckVhd { path: PathBuf },
    /// Copy a disk into a new raw or VHDX file (a differencing chain is flattened).
    ConvertVhd {
        source: PathBuf,
        destination: PathBuf,
        #[arg(long, value_enum, default_value = "vhdx")]
        format: Format,
        #[arg(long, value_enum, default_value = "dynamic")]
        kind: Kind,
    },
    /// Merge a differencing disk into its parent.
    MergeVhd {
        child: PathBuf,
        /// Keep the (now empty) child file instead of deleting it.
        #[arg(long)]
        keep_child: bool,
    },
    /// Change a disk's virtual size (shrinking only if the cut-off part is unused).
    ResizeVhd {
        path: PathBuf,
        #[arg(long)]
        size: String,
    },
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("verdigris: error: {msg}");
    ExitCode::from(code)
}

/// A progress bar on stderr when it is a terminal.
fn bar(what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

fn size_arg(name: &str, s: &str) -> Result<u64, ExitCode> {
    worker::parse_size(s).map_err(|e| fail(2, format!("--{name}: {e}")))
}

pub fn run(cmd: DiskCommand) -> ExitCode {
    match run_inner(cmd) {
        Ok(c) => c,
        Err(c) => c,
    }
}

fn run_inner(cmd: DiskCommand) -> Result<ExitCode, ExitCode> {
    match cmd {
        DiskCommand::NewVhd {
            path,
            size,
            kind,
            parent,
            block_size,
            logical_sector,
            physical_sector,
        } => {
            let block = match &block_size {
                Some(b) => Some(
                    u32::try_from(size_arg("block-size", b)?)
                        .map_err(|_| fail(2, "--block-size is too large"))?,
                ),
                None => None,
            };
            if let Some(parent) = parent {
                ops::new_differencing_vhd(&path, &parent, block).map_err(|e| fail(1, e))?;
                println!(
                    "created differencing disk {} over {}",
                    path.display(),
                    parent.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let Some(size) = size else {
                return Err(fail(
                    2,
                    "new-vhd needs --size (or --parent for a differencing disk)",
                ));
            };
            let mut p = disk::CreateParams {
                virtual_size: size_arg("size", &size)?,
                kind: match kind {
                    Kind::Dynamic => disk::VhdxKind::Dynamic,
                    Kind::Fixed => disk::VhdxKind::Fixed,
                },
                logical_sector_size: logical_sector,
                physical_sector_size: physical_sector,
                ..Default::default()
            };
            if let Some(b) = block {
                p.block_size = b;
            }
            let pb = bar("creating");
            let progress = |d: u64, t: u64| {
                pb.set_length(t);
                pb.set_position(d);
            };
            ops::new_vhd(&path, &p, Some(&progress)).map_err(|e| fail(1, e))?;
            pb.finish_and_clear();
            println!("created {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::VhdInfo { path, json } => {
            let i = ops::info(&path).map_err(|e| fail(1, e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
            } else {
                println!("path:               {}", i.path.display());
                println!(
                    "format:             {:?}{}",
                    i.format,
                    i.vhd_type
                        .as_ref()
                        .map(|t| format!(" ({t:?})"))
                        .unwrap_or_default()
                );
                println!("virtual size:       {} bytes", i.virtual_size);
                println!("file size:          {} bytes", i.file_size);
                println!("allocated:          {} bytes", i.allocated_bytes);
                if let Some(b) = i.block_size {
                    println!("block size:         {b} bytes");
                }
                println!(
                    "sectors:            {} logical, {} physical",
                    i.logical_sector_size, i.physical_sector_size
                );
                println!("disk id:            {}", i.disk_id);
                if i.log_needs_replay {
                    println!("log:                needs replay (not closed cleanly)");
                }
                if let Some(p) = &i.parent {
                    match (&p.resolved_path, &p.error) {
                        (Some(r), _) => println!("parent:             {}", r.display()),
                        (None, Some(e)) => println!("parent:             unusable: {e}"),
                        (None, None) => println!("parent:             not found"),
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::CheckVhd { path } => {
            let r = ops::check(&path).map_err(|e| fail(1, e))?;
            for w in &r.warnings {
                println!("warning: {w}");
            }
            if r.is_clean() {
                println!("{}: no errors", path.display());
                Ok(ExitCode::SUCCESS)
            } else {
                for e in &r.errors {
                    println!("error: {e}");
                }
                Ok(ExitCode::from(1))
            }
        }
        DiskCommand::ConvertVhd {
            source,
            destination,
            format,
            kind,
        } => {
            let target = match format {
                Format::Raw => ops::ConvertTarget::Raw,
                Format::Vhdx => ops::ConvertTarget::Vhdx(disk::CreateParams {
                    kind: match kind {
                        Kind::Dynamic => disk::VhdxKind::Dynamic,
                        Kind::Fixed => disk::VhdxKind::Fixed,
                    },
                    ..Default::default()
                }),
            };
            let pb = bar("converting");
            let progress = |d: u64, t: u64| {
                pb.set_length(t);
                pb.set_position(d);
            };
            ops::convert(&source, &destination, &target, Some(&progress))
                .map_err(|e| fail(1, e))?;
            pb.finish_and_clear();
            println!(
                "converted {} to {}",
                source.display(),
                destination.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::MergeVhd { child, keep_child } => {
            let pb = bar("merging");
            let progress = |d: u64, t: u64| {
                pb.set_length(t);
                pb.set_position(d);
            };
            let r = ops::merge(&child, !keep_child, Some(&progress)).map_err(|e| fail(1, e))?;
            pb.finish_and_clear();
            println!(
                "merged {} bytes into {}{}",
                r.bytes_merged,
                r.parent.display(),
                if r.child_removed {
                    "; child removed"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::ResizeVhd { path, size } => {
            let s = size_arg("size", &size)?;
            ops::resize(&path, s).map_err(|e| fail(1, e))?;
            println!("resized {} to {s} bytes", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
