//! Creating VHDX files: fixed, dynamic and differencing.
//!
//! Layout (everything 1 MiB aligned, as the spec requires): header section (file identifier,
//! two headers, two region tables) in the first MiB, then the log, the metadata region (1 MiB),
//! the BAT, and for fixed disks the payload blocks.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use super::format::*;
use super::{OpenOptions, Vhdx};
use crate::error::{Error, IoContext, Result};
use crate::guid::Guid;
use crate::storage::{FileStorage, Storage};
use crate::BlockBackend;

/// Fixed or dynamic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VhdxKind {
    /// All blocks allocated up front (file about as large as the disk).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
}

/// Parameters of a new fixed or dynamic VHDX.
#[derive(Clone, Debug)]
pub struct CreateParams {
    /// Virtual size in bytes; rounded up to a multiple of the logical sector size.
    pub virtual_size: u64,
    pub kind: VhdxKind,
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// Log size in bytes (multiple of 1 MiB, at least 1 MiB).
    pub log_size: u32,
    /// Virtual disk ID (page 83 identity); random if `None`.
    pub disk_id: Option<Guid>,
}

/// Hyper-V's defaults: 32 MiB blocks, 512-byte logical and 4 KiB physical sectors, 1 MiB log.
impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            virtual_size: 0,
            kind: VhdxKind::Dynamic,
            block_size: 32 << 20,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            log_size: 1 << 20,
            disk_id: None,
        }
    }
}

const CREATOR: &str = "Verdigris disk";
const LOG_OFFSET: u64 = MIB;

struct Layout {
    log_size: u64,
    meta_offset: u64,
    bat_offset: u64,
    bat_length: u64,
    payload_offset: u64,
}

fn layout(geo: &Geometry, log_size: u64) -> Layout {
    let meta_offset = LOG_OFFSET + log_size;
    let bat_offset = meta_offset + MIB;
    let bat_length = (geo.total_bat_entries() * 8).div_ceil(MIB).max(1) * MIB;
    Layout {
        log_size,
        meta_offset,
        bat_offset,
        bat_length,
        payload_offset: bat_offset + bat_length,
    }
}

fn validate(p: &CreateParams) -> Result<u64> {
    let bad = |s: String| Err(Error::InvalidArgument(s));
    if p.logical_sector_size != 512 && p.logical_sector_size != 4096 {
        return bad(format!(
            "logical sector size {} must be 512 or 4096",
            p.logical_sector_size
        ));
    }
    if p.physical_sector_size != 512 && p.physical_sector_size != 4096 {
        return bad(format!(
            "physical sector size {} must be 512 or 4096",
            p.physical_sector_size
        ));
    }
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&p.block_size) || !p.block_size.is_power_of_two()
    {
        return bad(format!(
            "block size {} must be a power of two from 1 MiB to 256 MiB",
            p.block_size
        ));
    }
    if p.log_size == 0 || p.log_size as u64 % MIB != 0 {
        return bad(format!(
            "log size {} must be a non-zero multiple of 1 MiB",
            p.log_size
        ));
    }
    let lss = p.logical_sector_size as u64;
    let size = p.virtual_size.div_ceil(lss) * lss;
    if size == 0 || size > MAX_VIRTUAL_SIZE {
        return bad(format!(
            "virtual size {} must be between 1 byte and 64 TiB",
            p.virtual_size
        ));
    }
    Ok(size)
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Writes the header section, metadata and BAT of a new image into `st`.
#[allow(clippy::too_many_arguments)]
fn write_image(
    st: &dyn Storage,
    geo: &Geometry,
    lay: &Layout,
    kind: VhdxKind,
    lss: u32,
    pss: u32,
    disk_id: Guid,
    parent: Option<&ParentLocator>,
) -> Result<()> {
    let w = |off: u64, data: &[u8], what: &str| -> Result<()> {
        st.write_at(off, data).ctx(|| format!("writing the {what}"))
    };
    // File identifier.
    let mut id = vec![0u8; 64 * KIB as usize];
    id[..8].copy_from_slice(FILE_ID_SIGNATURE);
    let c = utf16(CREATOR);
    id[8..8 + c.len()].copy_from_slice(&c);
    w(0, &id, "file identifier")?;

    // Metadata region.
    let fixed = kind == VhdxKind::Fixed && parent.is_none();
    let mut flags = 0;
    if fixed {
        flags |= FILE_PARAM_LEAVE_BLOCKS_ALLOCATED;
    }
    if parent.is_some() {
        flags |= FILE_PARAM_HAS_PARENT;
    }
    let mut fp = Vec::new();
    fp.extend_from_slice(&(geo.block_size as u32).to_le_bytes());
    fp.extend_from_slice(&flags.to_le_bytes());
    let vd = META_FLAG_IS_VIRTUAL_DISK | META_FLAG_IS_REQUIRED;
    let mut items: Vec<(Guid, u32, Vec<u8>)> = vec![
        (META_FILE_PARAMETERS, META_FLAG_IS_REQUIRED, fp),
        (
            META_VIRTUAL_DISK_SIZE,
            vd,
            geo.virtual_size.to_le_bytes().to_vec(),
        ),
        (META_VIRTUAL_DISK_ID, vd, disk_id.0.to_vec()),
        (META_LOGICAL_SECTOR_SIZE, vd, lss.to_le_bytes().to_vec()),
        (META_PHYSICAL_SECTOR_SIZE, vd, pss.to_le_bytes().to_vec()),
    ];
    if let Some(pl) = parent {
        items.push((META_PARENT_LOCATOR, META_FLAG_IS_REQUIRED, pl.build()));
    }
    let mut region = vec![0u8; MIB as usize];
    let mut entries = Vec::new();
    let mut off = METADATA_TABLE_SIZE as u32;
    for (gid, fl, data) in &items {
        region[off as usize..off as usize + data.len()].copy_from_slice(data);
        entries.push(MetaEntry {
            id: *gid,
            offset: off,
            length: data.len() as u32,
            flags: *fl,
        });
        off += (data.len() as u32).div_ceil(8) * 8;
    }
    let table = build_metadata_table(&entries);
    region[..table.len()].copy_from_slice(&table);
    w(lay.meta_offset, &region, "metadata region")?;

    // BAT.
    let total = geo.total_bat_entries();
    let mut bat = vec![0u8; lay.bat_length as usize];
    if fixed {
        for b in 0..geo.payload_blocks() {
            let e = bat_entry(
                PAYLOAD_BLOCK_FULLY_PRESENT,
                lay.payload_offset + b * geo.block_size,
            );
            let i = geo.payload_index(b);
            bat[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
    }
    debug_assert!(total * 8 <= lay.bat_length);
    w(lay.bat_offset, &bat, "BAT")?;

    // Region tables.
    let regions = [
        Region {
            guid: REGION_BAT,
            offset: lay.bat_offset,
            length: lay.bat_length,
            required: true,
        },
        Region {
            guid: REGION_METADATA,
            offset: lay.meta_offset,
            length: MIB,
            required: true,
        },
    ];
    let rt = RegionTable::build(&regions);
    for off in REGION_TABLE_OFFSETS {
        w(off, &rt, "region table")?;
    }

    // Log (zeroed) and file size.
    let end = if fixed {
        lay.payload_offset + geo.payload_blocks() * geo.block_size
    } else {
        lay.payload_offset
    };
    st.set_len(end).ctx(|| "sizing the new image".into())?;
    st.write_zeroes(LOG_OFFSET, lay.log_size)
        .ctx(|| "clearing the log".into())?;

    // Headers last: the file is not a valid VHDX until they are there.
    let mut h = Header {
        sequence_number: 1,
        file_write_guid: Guid::new_random(),
        data_write_guid: Guid::new_random(),
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: lay.log_size as u32,
        log_offset: LOG_OFFSET,
    };
    st.flush().ctx(|| "flushing the new image".into())?;
    for off in HEADER_OFFSETS {
        w(off, &h.to_sector(), "header")?;
        h.sequence_number += 1;
    }
    st.flush().ctx(|| "flushing the new image".into())?;
    Ok(())
}

fn create_file(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("creating {}", path.display()))
}

/// Runs `f` on a newly created file, deleting the file if it fails.
fn with_new_file(path: &Path, f: impl FnOnce(&FileStorage) -> Result<()>) -> Result<()> {
    let file = create_file(path)?;
    let st = FileStorage::new(file).ctx(|| format!("inspecting {}", path.display()))?;
    let r = f(&st);
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Creates a fixed or dynamic VHDX at `path` (which must not exist).
pub fn create(path: &Path, p: &CreateParams) -> Result<()> {
    validate(p)?;
    with_new_file(path, |st| create_in(st, p))
}

/// Creates a fixed or dynamic VHDX in any storage (which should be empty).
pub fn create_in(st: &dyn Storage, p: &CreateParams) -> Result<()> {
    let size = validate(p)?;
    let geo = Geometry::new(p.block_size, p.logical_sector_size, size, false);
    let lay = layout(&geo, p.log_size as u64);
    let id = p.disk_id.unwrap_or_else(Guid::new_random);
    write_image(
        st,
        &geo,
        &lay,
        p.kind,
        p.logical_sector_size,
        p.physical_sector_size,
        id,
        None,
    )?;
    if p.kind == VhdxKind::Fixed {
        st.allocate(lay.payload_offset, geo.payload_blocks() * geo.block_size);
    }
    Ok(())
}

/// The path of `target` relative to directory `from`, with `\` separators as the parent
/// locator's `relative_path` wants. Both must be absolute and normalized.
fn relative_locator(from: &Path, target: &Path) -> String {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = target.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..f.len() {
        parts.push("..".into());
    }
    for c in &t[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    if parts.first().is_none_or(|p| p != "..") {
        parts.insert(0, ".".into());
    }
    parts.join("\\")
}

/// Creates a differencing VHDX at `path` whose parent is the VHDX at `parent`. The child takes
/// the parent's virtual-disk metadata (size, sector sizes, disk ID) as the spec requires for a
/// fork. `block_size` defaults to 2 MiB, Hyper-V's choice for differencing disks.
pub fn create_differencing(path: &Path, parent: &Path, block_size: Option<u32>) -> Result<()> {
    let par = Vhdx::open(
        parent,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let bs = block_size.unwrap_or(2 << 20);
    let p = CreateParams {
        virtual_size: par.size(),
        kind: VhdxKind::Dynamic,
        block_size: bs,
        logical_sector_size: par.logical_sector_size(),
        physical_sector_size: par.physical_sector_size(),
        disk_id: Some(Guid(par.disk_id())),
        ..Default::default()
    };
    let size = validate(&p)?;
    let parent_abs =
        std::fs::canonicalize(parent).ctx(|| format!("resolving {}", parent.display()))?;
    let linkage = par.header_info().data_write_guid;
    drop(par);
    with_new_file(path, |st| {
        let child_dir = std::fs::canonicalize(path)
            .ctx(|| format!("resolving {}", path.display()))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let pl = ParentLocator {
            entries: vec![
                ("parent_linkage".into(), linkage.braced()),
                (
                    "relative_path".into(),
                    relative_locator(&child_dir, &parent_abs),
                ),
            ],
        };
        let geo = Geometry::new(bs, p.logical_sector_size, size, true);
        let lay = layout(&geo, p.log_size as u64);
        write_image(
            st,
            &geo,
            &lay,
            VhdxKind::Dynamic,
            p.logical_sector_size,
            p.physical_sector_size,
            p.disk_id.unwrap_or_else(Guid::new_random),
            Some(&pl),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_locator_paths() {
        assert_eq!(
            relative_locator(Path::new("/a/b"), Path::new("/a/b/p.vhdx")),
            ".\\p.vhdx"
        );
        assert_eq!(
            relative_locator(Path::new("/a/b/c"), Path::new("/a/x/p.vhdx")),
            "..\\..\\x\\p.vhdx"
        );
        assert_eq!(
            relative_locator(Path::new("/a"), Path::new("/a/x/p.vhdx")),
            ".\\x\\p.vhdx"
        );
    }

    #[test]
    fn creation_parameters_are_validated() {
        let p = CreateParams {
            virtual_size: 1 << 20,
            block_size: 3 << 20,
            ..Default::default()
        };
        assert!(validate(&p).unwrap_err().to_string().contains("block size"));
        let p = CreateParams {
            virtual_size: 1 << 20,
            logical_sector_size: 1024,
            ..Default::default()
        };
        assert!(validate(&p)
            .unwrap_err()
            .to_string()
            .contains("logical sector"));
        let p = CreateParams {
            virtual_size: 0,
            ..Default::default()
        };
        assert!(validate(&p).is_err());
        let p = CreateParams {
            virtual_size: 1000,
            ..Default::default()
        };
        assert_eq!(validate(&p).unwrap(), 1024);
    }
}
