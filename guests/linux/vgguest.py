#!/usr/bin/env python3
"""Build and check the boot assets of the Verdigris stock-Linux test guest.

What it is: the Python half of `fetch-assets.sh`. The shell script fetches
Debian packages and extracts them; this module turns the extracted trees into
the files a VMM boots:

* `vmlinux`   - the ELF kernel inside a bzImage, decompressed on the host
                (`vmlinux` subcommand);
* `initramfs` - an *uncompressed* newc cpio archive with busybox, /init, the
                Hyper-V guest modules (Debian's, without their appended
                signatures: see `strip_module_signature`), the hyperv-daemons
                and the e2fsprogs tools that make and check ext4
                (`build-initramfs` subcommand);
* a checker that reads such an archive back and verifies it (`check`
  subcommand, also reachable through `check-initramfs.py`).

What it talks to: files on the host only (extracted Debian packages, the
cache directory), plus three host programs: `depmod` (kmod) to index the
modules, the static `busybox` from busybox-static (run once with
`--list-full` to learn its applets), and a decompressor CLI for kernels whose
payload Python's standard library cannot decode (`lz4`, `zstd`, `lzop`).

What it must never do: touch the network, write outside the output paths and
temporary directories it is given, or depend on the host's clock, user names,
umask or directory order - rebuilding from the same inputs must give
byte-identical files.

Why hand-written: the newc writer exists as `cpio -H newc`, but cpio is not on
a fresh machine and cannot normalise modes/mtimes/inode numbers by itself
(that needs a sorted file list plus `--reproducible`, which is GNU-only and
still takes the umask-dependent modes from disk); the reader/checker has no
standard equivalent at all. The ELF and bzImage parsers are a few dozen lines
each and avoid depending on binutils' output format.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

# Modules the next milestones need in the guest (names as `modprobe` takes
# them). Each must be either a module file or built into the kernel; their
# `depends=` closure is added automatically.
DEFAULT_MODULES = [
    "hv_vmbus",
    "hv_utils",
    "hv_storvsc",
    "scsi_transport_fc",
    "hv_netvsc",
    "hv_balloon",
    "hv_sock",
    "hyperv_keyboard",
    "sd_mod",
    "scsi_mod",
    "ext4",
    "jbd2",
    "mbcache",
    "crc16",
    "crc32c_generic",
]

# Executables copied from the hyperv-daemons package (with their shared
# libraries) and the helper scripts hv_kvp_daemon runs.
HYPERV_DAEMONS = [
    "usr/sbin/hv_kvp_daemon",
    "usr/sbin/hv_vss_daemon",
    "usr/sbin/hv_fcopy_daemon",
]
HYPERV_HELPERS_DIR = "usr/libexec/hypervkvpd"

# e2fsprogs programs put into /sbin (busybox's mke2fs makes ext2 only; the
# storage tests need ext4). Debian 12 ships them in /sbin, later releases in
# /usr/sbin; in the archive they are always /sbin/<name>, with their shared
# libraries taken from the library packages e2fsprogs depends on.
E2FSPROGS_PROGRAMS = ["mke2fs", "e2fsck", "dumpe2fs"]
E2FSPROGS_PKG_DIRS = ["sbin", "usr/sbin"]
# /sbin/<link> -> <program> (relative symlinks, as in Debian's package):
# mke2fs and e2fsck take the file system type from the name they run as.
E2FSPROGS_LINKS = {
    "mkfs.ext2": "mke2fs",
    "mkfs.ext3": "mke2fs",
    "mkfs.ext4": "mke2fs",
    "fsck.ext2": "e2fsck",
    "fsck.ext3": "e2fsck",
    "fsck.ext4": "e2fsck",
}
# Without it mke2fs falls back to built-in defaults that lack the ext4
# features of Debian's configuration (extent, flex_bg, metadata_csum, 64bit).
E2FSPROGS_CONFIG = "etc/mke2fs.conf"

# Where glibc's dynamic loader looks without an ld.so.cache (Debian's
# built-in system directories, see `ld.so --list-diagnostics`).
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib"]

# Empty directories every guest gets, with their modes.
SKELETON_DIRS = {
    "dev": 0o755,
    "proc": 0o555,
    "sys": 0o555,
    "tmp": 0o1777,
    "run": 0o755,
    "root": 0o700,
    "mnt": 0o755,
    "var": 0o755,
    "var/lib": 0o755,
    "var/lib/hyperv": 0o755,
    "etc": 0o755,
}

# Device nodes needed before /init can mount devtmpfs: the kernel opens
# /dev/console for init's stdin/stdout/stderr.
DEVICE_NODES = {
    "dev/console": (stat.S_IFCHR | 0o600, 5, 1),
    "dev/null": (stat.S_IFCHR | 0o666, 1, 3),
}

# Every entry of the archive gets this mtime (and uid/gid 0), so rebuilds
# are byte-identical.
FIXED_MTIME = 0

NEWC_MAGIC = b"070701"
NEWC_HEADER_LEN = 110
NEWC_TRAILER = "TRAILER!!!"
# Bounds for hostile archives: refuse silly sizes instead of allocating.
MAX_NAME_LEN = 4096


class GuestError(Exception):
    """A problem with the inputs or the host, reported as one line."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


# --------------------------------------------------------------------------
# newc cpio
# --------------------------------------------------------------------------


@dataclass
class Entry:
    """One archive member. `name` has no leading '/'."""

    name: str
    mode: int
    data: bytes = b""
    rdevmajor: int = 0
    rdevminor: int = 0
    mtime: int = FIXED_MTIME
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    ino: int = 0

    @property
    def kind(self) -> str:
        fmt = stat.S_IFMT(self.mode)
        return {
            stat.S_IFREG: "file",
            stat.S_IFDIR: "dir",
            stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chardev",
            stat.S_IFBLK: "blockdev",
            stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket",
        }.get(fmt, "unknown")


def write_newc(entries: list[Entry]) -> bytes:
    """Serialise entries as a newc archive, sorted by name, with fixed
    metadata (mtime, uid/gid 0, inode numbers in order). Parents must be
    present; sorting puts every directory before its contents because a
    parent's name is a prefix of its children's names."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise GuestError(f"duplicate archive entries: {', '.join(dups[:5])}")
    out = io.BytesIO()
    ino = 0
    for e in sorted(entries, key=lambda x: x.name.encode()):
        if not e.name or e.name.startswith("/") or "\0" in e.name:
            raise GuestError(f"bad archive entry name {e.name!r}")
        ino += 1
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        _write_newc_member(out, e.name, e.mode, e.data, ino, nlink, FIXED_MTIME, e.rdevmajor, e.rdevminor)
    _write_newc_member(out, NEWC_TRAILER, 0, b"", 0, 1, 0, 0, 0)
    return out.getvalue()


def _write_newc_member(out, name, mode, data, ino, nlink, mtime, rmaj, rmin):
    bname = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rmaj, rmin, len(bname), 0]
    hdr = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    assert len(hdr) == NEWC_HEADER_LEN
    out.write(hdr)
    out.write(bname)
    out.write(b"\0" * (_align4(NEWC_HEADER_LEN + len(bname)) - NEWC_HEADER_LEN - len(bname)))
    out.write(data)
    out.write(b"\0" * (_align4(len(data)) - len(data)))


def read_newc(blob: bytes) -> list[Entry]:
    """Parse a newc archive (uncompressed). Raises GuestError on any
    malformation: bad magic, bad hex, truncation, names without NUL, missing
    trailer. Only the first archive is read; zero padding after it is allowed,
    anything else is an error (the kernel would try to parse it)."""
    if blob[:2] == b"\x1f\x8b" or blob[:4] == b"\x02\x21\x4c\x18" or blob[:6] == b"\xfd7zXZ\0":
        raise GuestError("archive is compressed; expected an uncompressed newc cpio")
    entries: list[Entry] = []
    pos = 0
    n = len(blob)
    while True:
        if pos + NEWC_HEADER_LEN > n:
            raise GuestError(f"truncated archive: header at offset {pos} runs past the end ({n} bytes)")
        hdr = blob[pos : pos + NEWC_HEADER_LEN]
        if hdr[:6] != NEWC_MAGIC:
            raise GuestError(f"bad newc magic {hdr[:6]!r} at offset {pos}")
        try:
            f = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise GuestError(f"bad hex field in newc header at offset {pos}") from None
        ino, mode, uid, gid, nlink, mtime, fsize, _dmaj, _dmin, rmaj, rmin, namesize, _check = f
        if namesize == 0 or namesize > MAX_NAME_LEN:
            raise GuestError(f"bad name size {namesize} at offset {pos}")
        name_end = pos + NEWC_HEADER_LEN + namesize
        if name_end > n:
            raise GuestError(f"truncated archive: name at offset {pos} runs past the end")
        bname = blob[pos + NEWC_HEADER_LEN : name_end]
        if bname[-1:] != b"\0" or b"\0" in bname[:-1]:
            raise GuestError(f"entry name at offset {pos} is not NUL-terminated")
        try:
            name = bname[:-1].decode()
        except UnicodeDecodeError:
            raise GuestError(f"entry name at offset {pos} is not UTF-8") from None
        data_start = pos + _align4(NEWC_HEADER_LEN + namesize)
        if data_start + fsize > n:
            raise GuestError(f"truncated archive: data of {name!r} runs past the end")
        data = blob[data_start : data_start + fsize]
        pos = data_start + _align4(fsize)
        if name == NEWC_TRAILER:
            break
        entries.append(Entry(name, mode, data, rmaj, rmin, mtime, uid, gid, nlink, ino))
    rest = blob[min(pos, n) :]
    if rest.strip(b"\0"):
        raise GuestError(f"unexpected data after the trailer at offset {pos}")
    return entries


# --------------------------------------------------------------------------
# ELF (just enough: sections, .modinfo, PT_INTERP, DT_NEEDED)
# --------------------------------------------------------------------------


class Elf:
    """Minimal little-endian ELF64 reader with bounds checks."""

    def __init__(self, data: bytes, what: str = "ELF file"):
        self.data = data
        self.what = what
        if len(data) < 64 or data[:4] != b"\x7fELF":
            raise GuestError(f"{what}: not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise GuestError(f"{what}: not a little-endian ELF64 file")
        (self.e_type, self.e_machine) = struct.unpack_from("<HH", data, 16)
        (self.e_entry, self.e_phoff, self.e_shoff) = struct.unpack_from("<QQQ", data, 24)
        (self.e_phentsize, self.e_phnum, self.e_shentsize, self.e_shnum, self.e_shstrndx) = struct.unpack_from(
            "<HHHHH", data, 54
        )
        self.segments = []
        if self.e_phnum:
            if self.e_phentsize < 56:
                raise GuestError(f"{what}: bad program header size")
            self._need(self.e_phoff, self.e_phnum * self.e_phentsize, "program headers")
            for i in range(self.e_phnum):
                p = struct.unpack_from("<IIQQQQQQ", data, self.e_phoff + i * self.e_phentsize)
                self.segments.append(p)  # type, flags, offset, vaddr, paddr, filesz, memsz, align
        self.sections = []
        if self.e_shnum:
            if self.e_shentsize < 64:
                raise GuestError(f"{what}: bad section header size")
            self._need(self.e_shoff, self.e_shnum * self.e_shentsize, "section headers")
            for i in range(self.e_shnum):
                s = struct.unpack_from("<IIQQQQIIQQ", data, self.e_shoff + i * self.e_shentsize)
                self.sections.append(s)  # name, type, flags, addr, offset, size, link, info, align, entsize
        self._names = None

    def _need(self, off: int, size: int, what: str):
        if off < 0 or size < 0 or off + size > len(self.data):
            raise GuestError(f"{self.what}: {what} out of bounds")

    def section_data(self, index: int) -> bytes:
        s = self.sections[index]
        if s[1] == 8:  # SHT_NOBITS
            return b""
        self._need(s[4], s[5], f"section {index}")
        return self.data[s[4] : s[4] + s[5]]

    def section_name(self, index: int) -> str:
        if self._names is None:
            if self.e_shstrndx >= len(self.sections):
                raise GuestError(f"{self.what}: bad section name table index")
            self._names = self.section_data(self.e_shstrndx)
        return _cstr(self._names, self.sections[index][0], self.what)

    def find_section(self, name: str):
        for i in range(len(self.sections)):
            if self.section_name(i) == name:
                return i
        return None

    def file_end(self) -> int:
        """Bytes the ELF image really uses (headers, segments, sections)."""
        end = max(64, self.e_phoff + self.e_phnum * self.e_phentsize, self.e_shoff + self.e_shnum * self.e_shentsize)
        for p in self.segments:
            end = max(end, p[2] + p[5])
        for s in self.sections:
            if s[1] != 8:
                end = max(end, s[4] + s[5])
        return end

    def modinfo(self) -> dict[str, list[str]]:
        idx = self.find_section(".modinfo")
        if idx is None:
            raise GuestError(f"{self.what}: no .modinfo section (not a kernel module?)")
        info: dict[str, list[str]] = {}
        for item in self.section_data(idx).split(b"\0"):
            if not item:
                continue
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info

    def _symbols(self):
        """Yield (name, info, shndx) for every .symtab entry but the null one."""
        for i, s in enumerate(self.sections):
            if s[1] != 2:  # SHT_SYMTAB
                continue
            if s[6] >= len(self.sections):
                raise GuestError(f"{self.what}: bad .symtab string table link")
            strtab = self.section_data(s[6])
            tab = self.section_data(i)
            for off in range(24, len(tab) - 23, 24):
                st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", tab, off)
                if st_name:
                    yield _cstr(strtab, st_name, self.what), st_info, st_shndx

    def undefined_symbols(self) -> list[str]:
        """Undefined, non-weak symbols: what a kernel module needs from the
        kernel or from other modules."""
        return [n for n, info, shndx in self._symbols() if shndx == 0 and info >> 4 == 1]

    def module_exports(self) -> set[str]:
        """Symbols a kernel module exports (EXPORT_SYMBOL leaves a defined
        `__ksymtab_<name>` symbol in the module's .symtab)."""
        p = "__ksymtab_"
        return {n[len(p) :] for n, _i, shndx in self._symbols() if shndx != 0 and n.startswith(p)}

    def kernel_exports(self) -> set[str]:
        """Symbols a (symbol-stripped) vmlinux exports, read from __ksymtab
        and __ksymtab_gpl. x86-64 uses 12-byte entries of PC-relative int32s
        {value, name, namespace}; the name points into __ksymtab_strings
        (whose strings may be tail-merged, so it cannot just be split)."""
        si = self.find_section("__ksymtab_strings")
        if si is None:
            raise GuestError(f"{self.what}: no __ksymtab_strings section")
        strings = self.section_data(si)
        str_addr = self.sections[si][3]
        out: set[str] = set()
        for name in ("__ksymtab", "__ksymtab_gpl"):
            idx = self.find_section(name)
            if idx is None:
                continue
            tab = self.section_data(idx)
            base = self.sections[idx][3]
            if len(tab) % 12:
                raise GuestError(f"{self.what}: {name} is not made of 12-byte entries")
            for off in range(0, len(tab), 12):
                name_off = struct.unpack_from("<i", tab, off + 4)[0]
                addr = base + off + 4 + name_off - str_addr
                if not 0 <= addr < len(strings):
                    raise GuestError(f"{self.what}: {name} entry {off // 12} points outside __ksymtab_strings")
                out.add(_cstr(strings, addr, self.what))
        return out

    def interp(self) -> str | None:
        for p in self.segments:
            if p[0] == 3:  # PT_INTERP
                self._need(p[2], p[5], "PT_INTERP")
                return _cstr(self.data[p[2] : p[2] + p[5]], 0, self.what)
        return None

    def needed(self) -> list[str]:
        out = []
        for i, s in enumerate(self.sections):
            if s[1] != 6:  # SHT_DYNAMIC
                continue
            if s[6] >= len(self.sections):
                raise GuestError(f"{self.what}: bad .dynamic string table link")
            strtab = self.section_data(s[6])
            dyn = self.section_data(i)
            for off in range(0, len(dyn) - 15, 16):
                tag, val = struct.unpack_from("<qQ", dyn, off)
                if tag == 0:
                    break
                if tag == 1:  # DT_NEEDED
                    out.append(_cstr(strtab, val, self.what))
        return out


def _cstr(buf: bytes, off: int, what: str) -> str:
    if off >= len(buf):
        raise GuestError(f"{what}: string offset out of bounds")
    end = buf.find(b"\0", off)
    if end < 0:
        raise GuestError(f"{what}: unterminated string")
    return buf[off:end].decode("utf-8", "replace")


# --------------------------------------------------------------------------
# bzImage
# --------------------------------------------------------------------------

# (name, magic, host tool needed or None when Python decodes it)
COMPRESSIONS = [
    ("gzip", b"\x1f\x8b", None),
    ("xz", b"\xfd7zXZ\x00", None),
    ("bzip2", b"BZh", None),
    ("lzma", b"\x5d\x00\x00", None),
    ("lzo", b"\x89LZO", "lzop"),
    ("lz4", b"\x02\x21\x4c\x18", "lz4"),
    ("zstd", b"\x28\xb5\x2f\xfd", "zstd"),
    ("none", b"\x7fELF", None),
]


def bzimage_info(blob: bytes) -> dict:
    """Parse the x86 boot protocol header and locate the compressed payload."""
    if len(blob) < 0x270:
        raise GuestError("bzImage: file too short for a boot protocol header")
    if blob[0x1FE:0x200] != b"\x55\xaa" or blob[0x202:0x206] != b"HdrS":
        raise GuestError("bzImage: no x86 boot protocol header (boot flag / 'HdrS' missing)")
    version = struct.unpack_from("<H", blob, 0x206)[0]
    if version < 0x208:
        raise GuestError(
            f"bzImage: boot protocol {version >> 8}.{version & 0xFF:02d} has no payload fields (need >= 2.08)"
        )
    setup_sects = blob[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    payload_offset, payload_length = struct.unpack_from("<II", blob, 0x248)
    start = pm_start + payload_offset
    if payload_length < 8 or start + payload_length > len(blob):
        raise GuestError("bzImage: payload_offset/payload_length point outside the file")
    payload = blob[start : start + payload_length]
    fmt, tool = "unknown", None
    for name, magic, t in COMPRESSIONS:
        if payload.startswith(magic):
            fmt, tool = name, t
            break
    return {
        "boot_protocol": f"{version >> 8}.{version & 0xFF:02d}",
        "setup_sects": setup_sects,
        "protected_mode_offset": pm_start,
        "payload_offset": payload_offset,
        "payload_file_offset": start,
        "payload_length": payload_length,
        "payload_magic": payload[:8].hex(),
        "compression": fmt,
        "tool": tool,
        # Every format the kernel build uses ends with the uncompressed size
        # (gzip's ISIZE, or the le32 that `size_append` adds for the others).
        "uncompressed_size": struct.unpack_from("<I", payload, len(payload) - 4)[0],
        "pref_address": struct.unpack_from("<Q", blob, 0x258)[0],
        "init_size": struct.unpack_from("<I", blob, 0x260)[0],
        "kernel_alignment": struct.unpack_from("<I", blob, 0x230)[0],
        "xloadflags": struct.unpack_from("<H", blob, 0x236)[0],
    }


def decompress_payload(blob: bytes, info: dict) -> bytes:
    start, length = info["payload_file_offset"], info["payload_length"]
    payload = blob[start : start + length]
    fmt = info["compression"]
    body = payload[:-4]  # without the appended size (gzip keeps it: it is its own trailer)
    if fmt == "gzip":
        import zlib

        d = zlib.decompressobj(wbits=31)
        out = d.decompress(payload)
    elif fmt in ("xz", "lzma"):
        import lzma

        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ if fmt == "xz" else lzma.FORMAT_ALONE)
        out = d.decompress(body)
    elif fmt == "bzip2":
        import bz2

        out = bz2.BZ2Decompressor().decompress(body)
    elif fmt in ("lz4", "zstd", "lzo"):
        tool = info["tool"]
        exe = shutil.which(tool)
        if exe is None:
            raise GuestError(f"bzImage payload is {fmt}; the '{tool}' program is needed to decompress it")
        args = {"lz4": [exe, "-dc"], "zstd": [exe, "-dcq"], "lzo": [exe, "-dc"]}[fmt]
        r = subprocess.run(args, input=body, capture_output=True)
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace").strip().splitlines()
            raise GuestError(f"{tool} failed to decompress the kernel payload: {err[-1] if err else r.returncode}")
        out = r.stdout
    elif fmt == "none":
        out = payload
    else:
        raise GuestError(f"bzImage payload has unknown compression (magic {info['payload_magic']})")
    if fmt != "none" and len(out) & 0xFFFFFFFF != info["uncompressed_size"]:
        raise GuestError(f"decompressed kernel is {len(out)} bytes but the payload says {info['uncompressed_size']}")
    return out


def vmlinux_from_bzimage(blob: bytes) -> tuple[bytes, dict]:
    """Return (ELF vmlinux, info). The decompressed payload is the kernel ELF
    followed by its relocation table (CONFIG_X86_NEED_RELOCS, used only by
    the in-kernel decompressor for KASLR); the table is cut off, so the ELF
    must be loaded at its linked physical addresses (p_paddr)."""
    info = bzimage_info(blob)
    raw = decompress_payload(blob, info)
    elf = Elf(raw, "decompressed kernel")
    if elf.e_machine != 62:
        raise GuestError(f"decompressed kernel is not x86-64 (e_machine {elf.e_machine})")
    end = elf.file_end()
    if end > len(raw):
        raise GuestError("decompressed kernel ELF is truncated")
    info.update(
        {
            "decompressed_size": len(raw),
            "elf_size": end,
            "relocs_size": len(raw) - end,
            "entry": elf.e_entry,
            "load_segments": [
                {"paddr": p[4], "vaddr": p[3], "filesz": p[5], "memsz": p[6]} for p in elf.segments if p[0] == 1
            ],
        }
    )
    return raw[:end], info


# --------------------------------------------------------------------------
# kernel modules
# --------------------------------------------------------------------------


def modname(s: str) -> str:
    """Canonical module name: basename without .ko*, '-' -> '_'."""
    base = os.path.basename(s)
    i = base.find(".ko")
    if i >= 0:
        base = base[:i]
    return base.replace("-", "_")


def read_module_file(path: str) -> bytes:
    """Module contents, decompressed if Debian ever ships .ko.xz/.ko.gz/.ko.zst."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".ko"):
        return data
    if path.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if path.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(data)
    if path.endswith(".ko.zst"):
        exe = shutil.which("zstd")
        if exe is None:
            raise GuestError(f"{path}: the 'zstd' program is needed to decompress it")
        return subprocess.run([exe, "-dcq", path], capture_output=True, check=True).stdout
    raise GuestError(f"{path}: unknown module file type")


MODULE_SIG_MAGIC = b"~Module signature appended~\n"


def strip_module_signature(data: bytes, what: str = "module") -> bytes:
    """The module without the signature `scripts/sign-file` appended (unchanged if unsigned).

    Why: the kernel hashes every signed module it loads (SHA-256 over the whole file) before it
    checks the signature; on hosts that emulate guest ring 0 that is tens of seconds per module.
    Debian's kernel does not enforce signatures (no `module.sig_enforce`, no lockdown without
    Secure Boot), so it loads an unsigned module, noting "module verification failed" and the
    'E' taint once. The module's code and data are Debian's, byte for byte.

    Layout at the end of a signed module: the signature (PKCS#7, `sig_len` bytes, with
    `signer_len` + `key_id_len` bytes of legacy fields before it), a 12-byte `struct
    module_signature` whose last field is `sig_len` (big-endian u32), then the magic string."""
    if not data.endswith(MODULE_SIG_MAGIC):
        return data
    end = len(data) - len(MODULE_SIG_MAGIC)
    if end < 12:
        raise GuestError(f"{what}: truncated module signature")
    info = data[end - 12 : end]
    signer_len, key_id_len = info[3], info[4]
    sig_len = int.from_bytes(info[8:12], "big")
    start = end - 12 - sig_len - signer_len - key_id_len
    if start < 64 or data[:4] != b"\x7fELF":
        raise GuestError(f"{what}: malformed module signature (length {sig_len})")
    return data[:start]


def module_index(moddir: str) -> dict[str, str]:
    """name -> path relative to moddir, for every module file under kernel/."""
    index: dict[str, str] = {}
    kdir = os.path.join(moddir, "kernel")
    if not os.path.isdir(kdir):
        raise GuestError(f"{kdir}: no kernel module tree")
    for root, dirs, files in os.walk(kdir):
        dirs.sort()
        for fn in sorted(files):
            if ".ko" in fn:
                rel = os.path.relpath(os.path.join(root, fn), moddir)
                index.setdefault(modname(fn), rel)
    return index


def builtin_modules(moddir: str) -> set[str]:
    path = os.path.join(moddir, "modules.builtin")
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {modname(line.strip()) for line in f if line.strip()}


@dataclass
class ModuleSet:
    files: dict[str, str] = field(default_factory=dict)  # name -> relative path
    builtin: list[str] = field(default_factory=list)
    info: dict[str, dict] = field(default_factory=dict)


def module_closure(moddir: str, wanted: list[str]) -> ModuleSet:
    """Resolve wanted module names to files plus their `depends=` closure and
    the softdeps that name a module file. Unknown names are errors."""
    index = module_index(moddir)
    builtin = builtin_modules(moddir)
    result = ModuleSet()
    todo = [(modname(m), None) for m in wanted]
    seen: set[str] = set()
    while todo:
        name, parent = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if name in index:
            rel = index[name]
            info = Elf(read_module_file(os.path.join(moddir, rel)), rel).modinfo()
            result.files[name] = rel
            result.info[name] = info
            for dep in ",".join(info.get("depends", [])).split(","):
                if dep:
                    todo.append((modname(dep), name))
            for sd in info.get("softdep", []):
                for word in sd.split():
                    if not word.endswith(":") and modname(word) in index:
                        todo.append((modname(word), None))
        elif name in builtin:
            result.builtin.append(name)
        else:
            who = f" (needed by {parent})" if parent else ""
            raise GuestError(f"module {name}{who} is neither a module file nor built into this kernel")
    result.builtin.sort()
    return result


# --------------------------------------------------------------------------
# initramfs
# --------------------------------------------------------------------------


def busybox_applets(busybox: str) -> list[str]:
    try:
        r = subprocess.run([busybox, "--list-full"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestError(f"cannot run {busybox} --list-full on this host: {e}") from None
    return sorted(set(line for line in r.stdout.decode().split() if line))


def resolve_in_roots(roots: list[str], rel: str, hops: int = 0) -> tuple[str, str]:
    """Find archive path `rel` in one of the extracted package trees,
    following symlinks inside those trees. Returns (real host path, final
    archive path)."""
    if hops > 16:
        raise GuestError(f"symlink loop resolving /{rel}")
    for root in roots:
        p = os.path.join(root, rel)
        if os.path.islink(p):
            target = os.readlink(p)
            nxt = (
                target.lstrip("/")
                if target.startswith("/")
                else os.path.normpath(os.path.join(os.path.dirname(rel), target))
            )
            return resolve_in_roots(roots, nxt, hops + 1)
        if os.path.isfile(p):
            return p, rel
    raise GuestError(f"/{rel} not found in {', '.join(roots)}")


def elf_closure(start: list[tuple[str, str]], lib_roots: list[str]) -> dict[str, str]:
    """Given [(archive path, host path)] of executables, return {archive
    path: host path} for them plus their interpreter and DT_NEEDED libraries
    (recursively), looked up in lib_roots. Symlinked names (like
    /lib64/ld-linux-x86-64.so.2) are returned with the host path of the
    symlink so the archive keeps the link."""
    out: dict[str, str] = {}
    todo = list(start)
    while todo:
        arch, host = todo.pop(0)
        if arch in out:
            continue
        out[arch] = host
        if os.path.islink(host):
            real, real_arch = resolve_in_roots(lib_roots, arch)
            todo.append((real_arch, real))
            continue
        with open(host, "rb") as f:
            data = f.read()
        if not data.startswith(b"\x7fELF"):
            continue
        elf = Elf(data, host)
        interp = elf.interp()
        if interp:
            rel = interp.lstrip("/")
            todo.append((rel, _host_path(lib_roots, rel)))
        for lib in elf.needed():
            todo.append(_find_lib(lib_roots, lib, host))
    return out


def _host_path(roots: list[str], rel: str) -> str:
    for root in roots:
        p = os.path.join(root, rel)
        if os.path.lexists(p):
            return p
    raise GuestError(f"/{rel} not found in {', '.join(roots)}")


def _find_lib(roots: list[str], lib: str, who: str) -> tuple[str, str]:
    for d in LIB_DIRS:
        rel = f"{d}/{lib}"
        for root in roots:
            if os.path.lexists(os.path.join(root, rel)):
                return rel, os.path.join(root, rel)
    raise GuestError(f"{who} needs {lib}, which is in none of {', '.join(roots)}")


def _copy(src: str, dst: str):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copyfile(src, dst)
        if os.stat(src).st_mode & 0o111:
            os.chmod(dst, 0o755)


def stage_rootfs(args, stage: str) -> dict:
    """Populate `stage` with the guest's root file system. Returns a summary."""
    kver = args.kernel_version
    src_moddir = os.path.join(args.kernel_root, "lib/modules", kver)
    if not os.path.isdir(src_moddir):
        raise GuestError(f"{src_moddir}: no modules for kernel {kver}")
    summary: dict = {}

    for d, _mode in SKELETON_DIRS.items():
        os.makedirs(os.path.join(stage, d), exist_ok=True)

    # busybox and its applet links (made here, not by `busybox --install` at
    # boot: every system call is expensive in the nested guest).
    busybox = os.path.join(args.busybox_root, "bin/busybox")
    _copy(busybox, os.path.join(stage, "bin/busybox"))
    os.chmod(os.path.join(stage, "bin/busybox"), 0o755)
    applets = [a for a in busybox_applets(busybox) if a != "bin/busybox" and "/" in a]
    for a in applets:
        dst = os.path.join(stage, a)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink("/bin/busybox", dst)
    summary["applets"] = len(applets)

    # e2fsprogs (before the overlay, so a file in rootfs/ would still win)
    summary["e2fsprogs_files"] = stage_e2fsprogs(args, stage)

    # /init, /etc and the verdigris.d scripts from the overlay in the repo.
    for root, dirs, files in os.walk(args.overlay):
        dirs.sort()
        for fn in sorted(files):
            src = os.path.join(root, fn)
            rel = os.path.relpath(src, args.overlay)
            dst = os.path.join(stage, rel)
            if os.path.lexists(dst):
                os.unlink(dst)  # an overlay file wins over an applet link
            _copy(src, dst)

    # kernel modules + depmod
    mods = module_closure(src_moddir, args.modules)
    dst_moddir = os.path.join(stage, "lib/modules", kver)
    for rel in sorted(mods.files.values()):
        data = strip_module_signature(read_module_file(os.path.join(src_moddir, rel)), rel)
        rel_ko = rel[: rel.find(".ko")] + ".ko"
        dst = os.path.join(dst_moddir, rel_ko)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(data)
    for meta in ("modules.builtin", "modules.builtin.modinfo"):
        p = os.path.join(src_moddir, meta)
        if os.path.exists(p):
            _copy(p, os.path.join(dst_moddir, meta))
    # modules.order (depmod sorts modules.dep by it) reduced to what we ship
    order_src = os.path.join(src_moddir, "modules.order")
    if os.path.exists(order_src):
        shipped = {rel[: rel.find(".ko")] + ".ko" for rel in mods.files.values()}
        with open(order_src) as f:
            kept = [line for line in f if line.strip() in shipped]
        with open(os.path.join(dst_moddir, "modules.order"), "w") as f:
            f.writelines(kept)
    empty_conf = os.path.join(stage, ".depmod.d")
    os.makedirs(empty_conf)
    r = subprocess.run([args.depmod, "-a", "-C", empty_conf, "-b", stage, kver], capture_output=True)
    os.rmdir(empty_conf)
    if r.returncode != 0 or r.stderr.strip():
        raise GuestError(f"depmod failed: {r.stderr.decode(errors='replace').strip() or r.returncode}")
    # depmod only needs modules.builtin.modinfo to write modules.builtin.alias.bin
    os.unlink(os.path.join(dst_moddir, "modules.builtin.modinfo"))
    summary["modules"] = sorted(mods.files)
    summary["builtin"] = mods.builtin

    # hyperv-daemons and their shared libraries
    starts = []
    for rel in HYPERV_DAEMONS:
        host = os.path.join(args.hyperv_root, rel)
        if not os.path.isfile(host):
            raise GuestError(f"{host}: missing from hyperv-daemons")
        starts.append((rel, host))
    helpers = os.path.join(args.hyperv_root, HYPERV_HELPERS_DIR)
    if os.path.isdir(helpers):
        for fn in sorted(os.listdir(helpers)):
            starts.append((f"{HYPERV_HELPERS_DIR}/{fn}", os.path.join(helpers, fn)))
    closure = elf_closure(starts, [args.libc_root])
    _install_closure(closure, stage)
    for rel in sorted(closure):
        if rel.startswith(HYPERV_HELPERS_DIR + "/"):
            _bash_to_sh(os.path.join(stage, rel))
    summary["hyperv_files"] = sorted(closure)
    return summary


def stage_e2fsprogs(args, stage: str) -> list[str]:
    """Put e2fsprogs' mke2fs, e2fsck and dumpe2fs into /sbin (replacing
    busybox's ext2-only mke2fs applet link), with the mkfs.ext*/fsck.ext*
    links, /etc/mke2fs.conf and every library they need: the PT_INTERP and
    DT_NEEDED closure, looked up in the libc6 and e2fsprogs library package
    trees only (never on the host). Returns the archive paths it added."""
    root = args.e2fsprogs_root
    lib_roots = [args.libc_root] + list(args.lib_root or [])
    starts = []
    for prog in E2FSPROGS_PROGRAMS:
        cands = [f"{d}/{prog}" for d in E2FSPROGS_PKG_DIRS]
        rel = next((c for c in cands if os.path.lexists(os.path.join(root, c))), None)
        if rel is None:
            raise GuestError(f"e2fsprogs package {root} has no {' or '.join('/' + c for c in cands)}")
        host, _ = resolve_in_roots([root], rel)
        starts.append((f"sbin/{prog}", host))
    for name in E2FSPROGS_PROGRAMS + list(E2FSPROGS_LINKS):
        dst = os.path.join(stage, "sbin", name)
        if os.path.islink(dst) and os.readlink(dst) == "/bin/busybox":
            os.unlink(dst)  # busybox's mke2fs applet: ext2 only
        elif os.path.lexists(dst):
            raise GuestError(f"/sbin/{name} is already staged by something other than busybox")
    closure = elf_closure(starts, lib_roots)
    added = _install_closure(closure, stage)
    for link, prog in sorted(E2FSPROGS_LINKS.items()):
        os.symlink(prog, os.path.join(stage, "sbin", link))
        added.append(f"sbin/{link}")
    conf = os.path.join(root, E2FSPROGS_CONFIG)
    if not os.path.isfile(conf) or os.path.islink(conf):
        raise GuestError(f"e2fsprogs package {root} has no /{E2FSPROGS_CONFIG}")
    _copy(conf, os.path.join(stage, E2FSPROGS_CONFIG))
    added.append(E2FSPROGS_CONFIG)
    return sorted(added)


def _install_closure(closure: dict[str, str], stage: str) -> list[str]:
    """Copy an elf_closure() result into the staging tree; returns the
    paths it added. A path already staged from the same file (the C library
    both closures need) is left alone; a different file there is an error."""
    added = []
    for rel, host in sorted(closure.items()):
        dst = os.path.join(stage, rel)
        if os.path.lexists(dst):
            if not _same_file(host, dst):
                raise GuestError(f"/{rel}: two different files want this path (one is {host})")
            continue
        _copy(host, dst)
        added.append(rel)
    return added


def _same_file(a: str, b: str) -> bool:
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    return filecmp.cmp(a, b, shallow=False)


def _bash_to_sh(path: str):
    """hv_kvp_daemon's helper scripts say #!/bin/bash but only use what
    busybox ash has (local, $(...), command -v); busybox has no bash, so the
    copy in the guest runs under /bin/sh."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"#!/bin/bash\n"):
        with open(path, "wb") as f:
            f.write(b"#!/bin/sh\n" + data[len(b"#!/bin/bash\n") :])


def tree_entries(stage: str, extra: list[Entry]) -> list[Entry]:
    """Archive entries for everything under `stage`, with normalised modes:
    0755/0644 for files (by the owner execute bit), SKELETON_DIRS modes or
    0755 for directories."""
    entries = list(extra)
    for root, dirs, files in os.walk(stage):
        dirs.sort()
        for name in sorted(dirs + files):
            host = os.path.join(root, name)
            rel = os.path.relpath(host, stage)
            st = os.lstat(host)
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, stat.S_IFLNK | 0o777, os.readlink(host).encode()))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, stat.S_IFDIR | SKELETON_DIRS.get(rel, 0o755)))
            elif stat.S_ISREG(st.st_mode):
                perm = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
                with open(host, "rb") as f:
                    entries.append(Entry(rel, stat.S_IFREG | perm, f.read()))
            else:
                raise GuestError(f"{host}: unexpected file type in staging tree")
    return entries


def device_entries() -> list[Entry]:
    return [Entry(n, m, b"", maj, mi) for n, (m, maj, mi) in DEVICE_NODES.items()]


def input_fingerprint(args) -> str:
    """Everything the archive depends on: the arguments (package trees are
    named <package>_<version>), the overlay, this file and depmod's version."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in ("out", "func", "force")}).encode())
    files = [(os.path.relpath(p, args.overlay), p) for p in _walk_files(args.overlay)]
    for label, path in sorted(files) + [("<vgguest.py>", os.path.abspath(__file__))]:
        h.update(label.encode() + b"\0")
        h.update(b"x" if os.lstat(path).st_mode & stat.S_IXUSR else b"-")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    r = subprocess.run([args.depmod, "--version"], capture_output=True)
    h.update(r.stdout)
    return h.hexdigest()


def _walk_files(top: str):
    for root, _dirs, files in os.walk(top):
        for fn in files:
            yield os.path.join(root, fn)


def _write_atomic(path: str, data: bytes):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_build_initramfs(args) -> int:
    stamp = args.out + ".inputs"
    fp = input_fingerprint(args)
    if not args.force and os.path.exists(args.out) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == fp:
                print(json.dumps({"status": "up-to-date", "out": args.out}))
                return 0
    workdir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".stage-") as stage:
        summary = stage_rootfs(args, stage)
        blob = write_newc(tree_entries(stage, device_entries()))
    _write_atomic(args.out, blob)
    _write_atomic(stamp, (fp + "\n").encode())
    summary.update({"status": "built", "out": args.out, "size": len(blob)})
    print(json.dumps(summary))
    return 0


def cmd_vmlinux(args) -> int:
    with open(args.bzimage, "rb") as f:
        blob = f.read()
    stamp = args.out + ".inputs"
    h = hashlib.sha256(blob)
    with open(os.path.abspath(__file__), "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    fp = h.hexdigest()
    if os.path.exists(args.out) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == fp:
                info = bzimage_info(blob)
                info.update({"status": "up-to-date", "out": args.out, "elf_size": os.path.getsize(args.out)})
                print(json.dumps(info))
                return 0
    elf, info = vmlinux_from_bzimage(blob)
    _write_atomic(args.out, elf)
    _write_atomic(stamp, (fp + "\n").encode())
    info.update({"status": "built", "out": args.out})
    print(json.dumps(info))
    return 0


def cmd_bzimage_info(args) -> int:
    with open(args.bzimage, "rb") as f:
        info = bzimage_info(f.read())
    if args.field:
        try:
            values = [info[k] for k in args.field.split(",")]
        except KeyError as e:
            raise GuestError(f"unknown field {e}; known: {', '.join(info)}") from None
        print(" ".join("-" if v is None else str(v) for v in values))
    else:
        print(json.dumps(info, indent=1))
    return 0


# --------------------------------------------------------------------------
# checker
# --------------------------------------------------------------------------


def _resolve_link(entries: dict[str, Entry], path: str, hops: int = 0) -> str | None:
    """Follow symlinks inside the archive (also in parent directories);
    return the final path or None if it dangles."""
    if hops > 16:
        return None
    parts = [p for p in path.split("/") if p and p != "."]
    cur: list[str] = []
    for i, part in enumerate(parts):
        if part == "..":
            if cur:
                cur.pop()
            continue
        cand = "/".join(cur + [part])
        e = entries.get(cand)
        if e is None:
            return None
        if stat.S_ISLNK(e.mode):
            target = e.data.decode(errors="replace")
            base = "" if target.startswith("/") else "/".join(cur)
            rest = "/".join(parts[i + 1 :])
            return _resolve_link(entries, "/".join(x for x in (base, target.lstrip("/"), rest) if x), hops + 1)
        cur.append(part)
    return "/".join(cur)


def check_archive(
    blob: bytes,
    kver: str | None = None,
    required_modules: list[str] | None = None,
    vmlinux: bytes | None = None,
) -> tuple[list[str], dict]:
    """Verify a guest initramfs. With `vmlinux` (the decompressed kernel),
    also check that every symbol each module needs is exported by the
    kernel or by a module in the archive. Returns (errors, facts)."""
    errors: list[str] = []
    facts: dict = {"size": len(blob)}
    try:
        entries_list = read_newc(blob)
    except GuestError as e:
        return [str(e)], facts
    facts["entries"] = len(entries_list)
    entries: dict[str, Entry] = {}
    prev = None
    for e in entries_list:
        if e.name in entries:
            errors.append(f"duplicate entry {e.name}")
        entries[e.name] = e
        if prev is not None and e.name.encode() <= prev.encode():
            errors.append(f"entries not sorted: {e.name} after {prev}")
        prev = e.name
        if e.mtime != FIXED_MTIME or e.uid or e.gid:
            errors.append(f"{e.name}: mtime/uid/gid not normalised")
        parent = os.path.dirname(e.name)
        if parent and (parent not in entries or not stat.S_ISDIR(entries[parent].mode)):
            errors.append(f"{e.name}: parent directory {parent} missing or not before it")

    def need(path: str, kind: str, exec_: bool = False):
        e = entries.get(path)
        if e is None:
            errors.append(f"missing /{path}")
            return None
        if e.kind != kind:
            errors.append(f"/{path} is a {e.kind}, expected a {kind}")
            return None
        if exec_ and not e.mode & 0o100:
            errors.append(f"/{path} is not executable")
        return e

    for d in SKELETON_DIRS:
        need(d, "dir")
    for name, (_mode, maj, mi) in DEVICE_NODES.items():
        e = need(name, "chardev")
        if e and (e.rdevmajor, e.rdevminor) != (maj, mi):
            errors.append(f"/{name} is {e.rdevmajor}:{e.rdevminor}, expected {maj}:{mi}")
    init = need("init", "file", exec_=True)
    if init and not init.data.startswith(b"#!/bin/sh"):
        errors.append("/init does not start with #!/bin/sh")
    bb = need("bin/busybox", "file", exec_=True)
    if bb:
        try:
            elf = Elf(bb.data, "/bin/busybox")
            if elf.interp() or elf.needed():
                errors.append("/bin/busybox is dynamically linked")
        except GuestError as ex:
            errors.append(str(ex))
    key_applets = (
        "bin/sh",
        "bin/mount",
        "sbin/modprobe",
        "sbin/poweroff",
        "bin/cttyhack",
        "usr/bin/setsid",
        "usr/bin/nproc",
    )
    for applet in key_applets:
        if _resolve_link(entries, applet) != "bin/busybox":
            errors.append(f"/{applet} does not lead to /bin/busybox")
    for f in ("etc/passwd", "etc/group", "etc/hostname"):
        need(f, "file")
    # the scripts the host's tests select with verdigris.script=NAME, and what they source
    for script in ("smoke", "checks", "readback", "devices", "disks"):
        need(f"etc/verdigris.d/{script}.sh", "file")
    host = entries.get("etc/hostname")
    if host and host.data.strip() != b"verdigris-guest":
        errors.append("/etc/hostname is not 'verdigris-guest'")

    # every symlink must land on something inside the archive
    for e in entries_list:
        if stat.S_ISLNK(e.mode) and _resolve_link(entries, e.name) is None:
            errors.append(f"dangling symlink /{e.name} -> {e.data.decode(errors='replace')}")

    # kernel modules
    mod_roots = sorted(
        {e.name.split("/")[2] for e in entries_list if e.name.startswith("lib/modules/") and e.name.count("/") >= 2}
    )
    if kver is None:
        if len(mod_roots) != 1:
            errors.append(f"expected one /lib/modules/<version>, found {mod_roots or 'none'}")
        kver = mod_roots[0] if mod_roots else ""
    facts["kernel_version"] = kver
    mroot = f"lib/modules/{kver}"
    if mroot not in entries:
        errors.append(f"missing /{mroot}")
    builtin = set()
    be = entries.get(f"{mroot}/modules.builtin")
    if be:
        builtin = {modname(w) for w in be.data.decode(errors="replace").split() if w}
    present: dict[str, str] = {}
    modinfos: dict[str, dict] = {}
    for e in entries_list:
        if e.name.startswith(mroot + "/") and e.name.endswith(".ko") and e.kind == "file":
            n = modname(e.name)
            present[n] = e.name[len(mroot) + 1 :]
            try:
                modinfos[n] = Elf(e.data, "/" + e.name).modinfo()
            except GuestError as ex:
                errors.append(str(ex))
    for n, info in sorted(modinfos.items()):
        vm = (info.get("vermagic") or [""])[0]
        if vm.split(" ")[0] != kver:
            errors.append(f"module {n}: vermagic '{vm}' does not match kernel {kver}")
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep and modname(dep) not in present and modname(dep) not in builtin:
                errors.append(f"module {n} depends on {dep}, which is missing")
    if vmlinux is not None:
        try:
            exports = Elf(vmlinux, "vmlinux").kernel_exports()
            mod_elfs = {
                modname(e.name): Elf(e.data, "/" + e.name)
                for e in entries_list
                if e.name.startswith(mroot + "/") and e.name.endswith(".ko") and e.kind == "file"
            }
            for m in mod_elfs.values():
                exports |= m.module_exports()
            for n, m in sorted(mod_elfs.items()):
                missing = sorted(set(m.undefined_symbols()) - exports)
                if missing:
                    more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
                    names = ", ".join(missing[:5]) + more
                    errors.append(f"module {n} needs symbols nothing in the archive or kernel exports: {names}")
            facts["symbols_checked"] = True
        except GuestError as ex:
            errors.append(str(ex))
    depmap: dict[str, list[str]] = {}
    de = entries.get(f"{mroot}/modules.dep")
    if de is None:
        errors.append(f"missing /{mroot}/modules.dep")
    else:
        for line in de.data.decode(errors="replace").splitlines():
            if not line.strip():
                continue
            mod, sep, deps = line.partition(":")
            if not sep:
                errors.append(f"modules.dep: bad line {line!r}")
                continue
            depmap[mod] = deps.split()
            for p in [mod] + deps.split():
                if f"{mroot}/{p}" not in entries:
                    errors.append(f"modules.dep names {p}, which is not in the archive")
        for n, rel in sorted(present.items()):
            if rel not in depmap:
                errors.append(f"modules.dep does not list {rel}")
                continue
            # modules.dep holds the full (transitive) closure; it must cover modinfo's depends=
            listed = {modname(p) for p in depmap[rel]}
            for dep in ",".join(modinfos.get(n, {}).get("depends", [])).split(","):
                if dep and modname(dep) not in listed:
                    errors.append(f"modules.dep entry of {n} lacks its dependency {dep}")
    for m in required_modules if required_modules is not None else DEFAULT_MODULES:
        if modname(m) not in present and modname(m) not in builtin:
            errors.append(f"required module {m} is neither in the archive nor built in")
    facts["modules"] = sorted(present)
    wanted = required_modules if required_modules is not None else DEFAULT_MODULES
    facts["builtin_required"] = sorted(
        modname(m) for m in wanted if modname(m) in builtin and modname(m) not in present
    )

    # dynamic executables: interpreter and libraries must be present
    checked = 0
    for e in entries_list:
        if e.kind != "file" or not e.data.startswith(b"\x7fELF") or e.name.endswith(".ko"):
            continue
        try:
            elf = Elf(e.data, "/" + e.name)
            interp = elf.interp()
            needed = elf.needed()
        except GuestError as ex:
            errors.append(str(ex))
            continue
        if interp:
            target = _resolve_link(entries, interp)
            if target is None:
                errors.append(f"/{e.name}: interpreter {interp} is missing")
            elif not _is_elf_file(entries.get(target)):
                errors.append(f"/{e.name}: interpreter {interp} leads to /{target}, which is not an ELF file")
        for lib in needed:
            target = _find_archive_lib(entries, lib)
            if target is None:
                errors.append(f"/{e.name}: needs {lib}, which is missing")
            elif not _is_elf_file(entries.get(target)):
                # each library is itself checked by this loop only if it is an ELF file
                errors.append(f"/{e.name}: needs {lib}, but /{target} is not an ELF file")
        checked += 1
    facts["elf_files"] = checked
    for e in entries_list:
        if e.kind == "file" and e.mode & 0o111 and e.data.startswith(b"#!"):
            interp = e.data[2:].split(b"\n", 1)[0].strip().split(b" ")[0].decode(errors="replace")
            if _resolve_link(entries, interp) is None:
                errors.append(f"/{e.name}: script interpreter {interp} is missing")
    for rel in HYPERV_DAEMONS:
        need(rel, "file", exec_=True)

    # e2fsprogs: the real programs (not busybox's ext2-only mke2fs), their
    # links, the configuration that gives ext4 its features. Their libraries
    # are checked by the loop above (every ELF file, libraries included, must
    # find its interpreter and DT_NEEDED libraries); this walk just names them.
    libs: set[str] = set()
    for prog in E2FSPROGS_PROGRAMS:
        if need(f"sbin/{prog}", "file", exec_=True):
            libs |= _archive_elf_closure(entries, f"sbin/{prog}") - {f"sbin/{prog}"}
    for link, prog in sorted(E2FSPROGS_LINKS.items()):
        if _resolve_link(entries, f"sbin/{link}") != f"sbin/{prog}":
            errors.append(f"/sbin/{link} does not lead to /sbin/{prog}")
    conf = need(E2FSPROGS_CONFIG, "file")
    if conf:
        features = mke2fs_conf_features(conf.data.decode(errors="replace"), "ext4")
        lacking = [f for f in ("has_journal", "extent") if f not in features]
        if lacking:
            errors.append(f"/{E2FSPROGS_CONFIG} does not give ext4 the features {', '.join(lacking)}")
    facts["e2fsprogs_libraries"] = sorted(libs)
    return errors, facts


def _is_elf_file(e: Entry | None) -> bool:
    return e is not None and e.kind == "file" and e.data.startswith(b"\x7fELF")


def _find_archive_lib(entries: dict[str, Entry], lib: str) -> str | None:
    """Final archive path of library `lib` as the loader finds it (first
    of LIB_DIRS that has it), or None."""
    for d in LIB_DIRS:
        target = _resolve_link(entries, f"{d}/{lib}")
        if target is not None:
            return target
    return None


def _archive_elf_closure(entries: dict[str, Entry], path: str) -> set[str]:
    """Final archive paths of `path` and everything it loads (interpreter
    and DT_NEEDED, transitively) that the archive has. Missing or broken
    pieces are left out: the per-file check reports them."""
    found: set[str] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        e = entries.get(p)
        if p in found or not _is_elf_file(e):
            continue
        found.add(p)
        try:
            elf = Elf(e.data, "/" + p)
            interp, needed = elf.interp(), elf.needed()
        except GuestError:
            continue
        if interp:
            t = _resolve_link(entries, interp)
            if t:
                todo.append(t)
        for lib in needed:
            t = _find_archive_lib(entries, lib)
            if t:
                todo.append(t)
    return found


def mke2fs_conf_features(text: str, fs_type: str) -> set[str]:
    """Features that the `[fs_types] <fs_type> = { features = ... }`
    stanza of an mke2fs.conf turns on (a `^name` turns one off). Enough of
    the profile syntax for the check: sections, `name = {` ... `}` blocks,
    `relation = value` lines, `#`/`;` comments."""
    section = None
    depth = 0
    in_type = False
    out: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if depth == 0 and line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*=\s*(.*)", line)
        if m and m.group(2) == "{":
            if depth == 0 and section == "fs_types" and m.group(1) == fs_type:
                in_type = True
            depth += 1
        elif line == "}":
            depth = max(depth - 1, 0)
            if depth == 0:
                in_type = False
        elif m and in_type and depth == 1 and m.group(1) == "features":
            for f in m.group(2).split(","):
                f = f.strip()
                if f.startswith("^"):
                    out.discard(f[1:])
                elif f:
                    out.add(f)
    return out


def cmd_check(args) -> int:
    kver = args.kernel_version
    path = args.initramfs
    env: dict[str, str] = {}
    if args.assets:
        env = read_assets_env(args.assets)
        path = path or env.get("INITRD")
        kver = kver or env.get("KERNEL_VERSION")
    if not path:
        raise GuestError("give an initramfs path or --assets FILE")
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise GuestError(f"cannot read {path}: {e.strerror}") from None
    required = args.require.split(",") if args.require else None
    vmlinux_path = args.vmlinux or (env.get("VMLINUX") if args.assets else None)
    vmlinux = None
    if vmlinux_path:
        try:
            with open(vmlinux_path, "rb") as f:
                vmlinux = f.read()
        except OSError as e:
            raise GuestError(f"cannot read {vmlinux_path}: {e.strerror}") from None
    errors, facts = check_archive(blob, kver, required, vmlinux)
    for err in errors:
        print(f"check-initramfs: error: {err}", file=sys.stderr)
    if errors:
        print(f"check-initramfs: {path}: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(facts))
    else:
        print(
            f"check-initramfs: OK {path}: {facts['size']} bytes, {facts['entries']} entries, "
            f"kernel {facts['kernel_version']}, {len(facts['modules'])} modules"
            f"{' (symbols resolved)' if facts.get('symbols_checked') else ''}, {facts['elf_files']} ELF files, "
            f"e2fsprogs {'/'.join(E2FSPROGS_PROGRAMS)} with {len(facts['e2fsprogs_libraries'])} library files"
        )
    return 0


def read_assets_env(path: str) -> dict[str, str]:
    """Parse the KEY=value / KEY='value' lines fetch-assets.sh writes."""
    out = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise GuestError(f"cannot read {path}: {e.strerror}") from None
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, val = line.partition("=")
        if not sep:
            raise GuestError(f"{path}: bad line {line!r}")
        if val.startswith("'") and val.endswith("'") and len(val) >= 2:
            val = val[1:-1].replace("'\\''", "'")
        out[key] = val
    return out


def cmd_list(args) -> int:
    with open(args.initramfs, "rb") as f:
        for e in read_newc(f.read()):
            extra = ""
            if e.kind == "symlink":
                extra = " -> " + e.data.decode(errors="replace")
            elif e.kind in ("chardev", "blockdev"):
                extra = f" {e.rdevmajor}:{e.rdevminor}"
            print(f"{stat.filemode(e.mode)} {len(e.data):9d} {e.name}{extra}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vgguest.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(required=True)

    p = sub.add_parser("bzimage-info", help="print the bzImage header facts (JSON) or one field")
    p.add_argument("bzimage")
    p.add_argument("--field", help="comma-separated fields to print space-separated ('-' for none)")
    p.set_defaults(func=cmd_bzimage_info)

    p = sub.add_parser("vmlinux", help="decompress a bzImage payload to an ELF vmlinux")
    p.add_argument("bzimage")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_vmlinux)

    p = sub.add_parser("build-initramfs", help="build the uncompressed newc initramfs")
    p.add_argument("--kernel-root", required=True, help="extracted linux-image package")
    p.add_argument("--kernel-version", required=True)
    p.add_argument("--busybox-root", required=True, help="extracted busybox-static package")
    p.add_argument("--hyperv-root", required=True, help="extracted hyperv-daemons package")
    p.add_argument("--libc-root", required=True, help="extracted libc6 package")
    p.add_argument("--e2fsprogs-root", required=True, help="extracted e2fsprogs package")
    p.add_argument(
        "--lib-root",
        action="append",
        default=[],
        help="extracted library package e2fsprogs depends on (repeat for each)",
    )
    p.add_argument("--overlay", required=True, help="directory copied over the root (init, etc)")
    p.add_argument("--depmod", default="depmod")
    p.add_argument("--modules", type=lambda s: [m for m in s.replace(",", " ").split() if m], default=DEFAULT_MODULES)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs did not change")
    p.set_defaults(func=cmd_build_initramfs)

    p = sub.add_parser("check", help="verify a guest initramfs")
    p.add_argument("initramfs", nargs="?")
    p.add_argument("--assets", help="assets.env written by fetch-assets.sh")
    p.add_argument("--kernel-version")
    p.add_argument("--require", help="comma-separated modules that must be present (default: the standard set)")
    p.add_argument("--vmlinux", help="decompressed kernel: also resolve every module's symbols")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("list", help="list an initramfs like `cpio -tv`")
    p.add_argument("initramfs")
    p.set_defaults(func=cmd_list)

    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except GuestError as e:
        print(f"vgguest: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
