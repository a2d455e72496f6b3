#!/usr/bin/env python3
"""Tests for vgguest.py (the guest asset builder/checker).

    python3 -B guests/linux/test_vgguest.py

The synthetic tests need nothing. The tests on the real assets run when
fetch-assets.sh has been run (they read ${VERDIGRIS_CACHE:-~/.cache/verdigris}/
linux/assets.env) and are skipped otherwise.
"""

import gzip
import lzma
import os
import stat
import struct
import subprocess
import sys
import tempfile
import unittest
from types import SimpleNamespace

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vgguest  # noqa: E402
from vgguest import Entry, GuestError  # noqa: E402


def fake_elf(sections: dict[str, bytes] | None = None, load: bytes = b"", machine: int = 62, etype: int = 2) -> bytes:
    """A small little-endian ELF64: optional PT_LOAD segment with `load`,
    optional sections (plus .shstrtab)."""
    sections = dict(sections or {})
    phnum = 1 if load else 0
    body = bytearray(64 + 56 * phnum)
    load_off = len(body)
    body += load
    names = b"\0"
    sh = [(0, 0, 0, 0)]  # name, type, offset, size
    for name, data in sections.items():
        sh.append((len(names), 1, len(body), len(data)))
        names += name.encode() + b"\0"
        body += data
    shstr_name = len(names)
    names += b".shstrtab\0"
    sh.append((shstr_name, 3, len(body), len(names)))
    body += names
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)
    for name, typ, off, size in sh:
        body += struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)
    hdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    hdr += struct.pack(
        "<HHIQQQIHHHHHH",
        etype,
        machine,
        1,
        0x1000000,
        64 if phnum else 0,
        shoff,
        0,
        64,
        56,
        phnum,
        64,
        len(sh),
        len(sh) - 1,
    )
    body[:64] = hdr
    if phnum:
        body[64:120] = struct.pack(
            "<IIQQQQQQ", 1, 5, load_off, 0xFFFFFFFF81000000, 0x1000000, len(load), len(load), 0x200000
        )
    return bytes(body)


def fake_dyn_elf(needed: list[str], interp: str | None = None, tag: bytes = b"") -> bytes:
    """A small dynamic ELF64: PT_INTERP (when `interp`) and a .dynamic
    section with DT_NEEDED entries whose .dynstr is linked by sh_link.
    `tag` makes otherwise equal files differ."""
    dynstr = b"\0"
    dyn = b""
    for lib in needed:
        dyn += struct.pack("<qQ", 1, len(dynstr))
        dynstr += lib.encode() + b"\0"
    dyn += struct.pack("<qQ", 0, 0)
    interp_b = interp.encode() + b"\0" if interp else b""
    phnum = 1 if interp else 0
    body = bytearray(64 + 56 * phnum)
    interp_off = len(body)
    body += interp_b + tag
    while len(body) % 8:
        body += b"\0"
    dynstr_off = len(body)
    body += dynstr
    while len(body) % 8:
        body += b"\0"
    dyn_off = len(body)
    body += dyn
    names = b"\0.dynstr\0.dynamic\0.shstrtab\0"
    names_off = len(body)
    body += names
    while len(body) % 8:
        body += b"\0"
    shoff = len(body)
    sh = [
        (0, 0, 0, 0, 0),
        (1, 3, dynstr_off, len(dynstr), 0),  # .dynstr: SHT_STRTAB
        (9, 6, dyn_off, len(dyn), 1),  # .dynamic: SHT_DYNAMIC, sh_link -> .dynstr
        (18, 3, names_off, len(names), 0),  # .shstrtab
    ]
    for name, typ, off, size, link in sh:
        body += struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, link, 0, 8, 16 if typ == 6 else 0)
    body[:64] = (
        b"\x7fELF"
        + bytes([2, 1, 1])
        + bytes(9)
        + struct.pack(
            "<HHIQQQIHHHHHH", 3, 62, 1, 0, 64 if phnum else 0, shoff, 0, 64, 56, phnum, 64, len(sh), len(sh) - 1
        )
    )
    if phnum:
        body[64:120] = struct.pack("<IIQQQQQQ", 3, 4, interp_off, 0, 0, len(interp_b), len(interp_b), 1)
    return bytes(body)


MKE2FS_CONF = b"""[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tblocksize = 4096

[fs_types]
\text3 = {
\t\tfeatures = has_journal
\t}
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t\tblocksize = 1024
\t}
"""


def fake_module(depends: str, extra: str = "") -> bytes:
    info = f"license=GPL\0depends={depends}\0vermagic=6.1.0-99-test SMP\0{extra}".encode()
    return fake_elf({".modinfo": info}, etype=1)


def fake_bzimage(payload: bytes, setup_sects: int = 1) -> bytes:
    pm = (setup_sects + 1) * 512
    img = bytearray(pm)
    img[0x1F1] = setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    struct.pack_into("<II", img, 0x248, 0x40, len(payload))
    img += bytes(0x40) + payload + bytes(16)
    return bytes(img)


class NewcTest(unittest.TestCase):
    def sample(self):
        return [
            Entry("bin", stat.S_IFDIR | 0o755),
            Entry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF" + b"x" * 13),
            Entry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
            Entry("dev", stat.S_IFDIR | 0o755),
            Entry("dev/console", stat.S_IFCHR | 0o600, b"", 5, 1),
            Entry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        ]

    def test_round_trip_keeps_names_modes_data_and_devices(self):
        blob = vgguest.write_newc(self.sample())
        back = {e.name: e for e in vgguest.read_newc(blob)}
        self.assertEqual(sorted(back), sorted(e.name for e in self.sample()))
        self.assertEqual(back["bin/busybox"].data, b"\x7fELF" + b"x" * 13)
        self.assertEqual(back["bin/sh"].kind, "symlink")
        self.assertEqual(back["bin/sh"].data, b"/bin/busybox")
        self.assertEqual((back["dev/console"].rdevmajor, back["dev/console"].rdevminor), (5, 1))
        self.assertEqual(back["init"].mode, stat.S_IFREG | 0o755)
        self.assertEqual(len(blob) % 4, 0)

    def test_output_does_not_depend_on_input_order_or_metadata(self):
        a = self.sample()
        b = list(reversed(self.sample()))
        for e in b:
            e.mtime, e.uid, e.gid, e.ino = 12345, 1000, 1000, 99
        self.assertEqual(vgguest.write_newc(a), vgguest.write_newc(b))
        names = [e.name for e in vgguest.read_newc(vgguest.write_newc(b))]
        self.assertEqual(names, sorted(names))
        for e in vgguest.read_newc(vgguest.write_newc(b)):
            self.assertEqual((e.mtime, e.uid, e.gid), (0, 0, 0))

    def test_duplicates_and_bad_names_are_refused(self):
        with self.assertRaisesRegex(GuestError, "duplicate"):
            vgguest.write_newc(self.sample() + [Entry("init", stat.S_IFREG | 0o644)])
        with self.assertRaisesRegex(GuestError, "bad archive entry name"):
            vgguest.write_newc([Entry("/abs", stat.S_IFREG | 0o644)])

    def test_malformed_archives_give_errors_not_crashes(self):
        blob = vgguest.write_newc(self.sample())
        cases = {
            "truncated": blob[: len(blob) // 2],
            "bad magic": b"070702" + blob[6:],
            "bad hex": blob[:6] + b"ZZZZZZZZ" + blob[14:],
            "no trailer": blob[: blob.rfind(b"070701")],
            "junk after trailer": blob + b"junk",
            "gzip": gzip.compress(blob),
            "empty": b"",
        }
        for what, bad in cases.items():
            with self.subTest(what), self.assertRaises(GuestError):
                vgguest.read_newc(bad)
        # zero padding after the trailer is what the kernel accepts too
        self.assertEqual(len(vgguest.read_newc(blob + bytes(512))), len(self.sample()))

    def test_huge_sizes_in_headers_are_bounded(self):
        blob = bytearray(vgguest.write_newc(self.sample()))
        blob[6 + 8 * 6 : 6 + 8 * 7] = b"7FFFFFFF"  # filesize of the first member
        with self.assertRaisesRegex(GuestError, "runs past the end"):
            vgguest.read_newc(bytes(blob))


class BzImageTest(unittest.TestCase):
    def kernel(self):
        return fake_elf(load=b"\x90" * 3000)

    def test_gzip_and_xz_payloads_decompress_to_the_elf(self):
        elf = self.kernel()
        raw = elf + b"RELOCS" * 10  # the relocation table follows the ELF
        for fmt, payload in (
            ("gzip", gzip.compress(raw)),
            ("xz", lzma.compress(raw, format=lzma.FORMAT_XZ) + struct.pack("<I", len(raw))),
        ):
            with self.subTest(fmt):
                img = fake_bzimage(payload)
                info = vgguest.bzimage_info(img)
                self.assertEqual(info["compression"], fmt)
                self.assertEqual(info["payload_length"], len(payload))
                self.assertEqual(info["uncompressed_size"], len(raw))
                out, info = vgguest.vmlinux_from_bzimage(img)
                self.assertEqual(out, elf)
                self.assertEqual(info["relocs_size"], 60)
                self.assertEqual(info["entry"], 0x1000000)

    def test_bad_headers_are_reported(self):
        good = fake_bzimage(gzip.compress(self.kernel()))
        no_magic = bytearray(good)
        no_magic[0x202:0x206] = b"XXXX"
        old = bytearray(good)
        struct.pack_into("<H", old, 0x206, 0x204)
        outside = bytearray(good)
        struct.pack_into("<I", outside, 0x24C, len(good))
        for what, img, msg in (
            ("short", good[:100], "too short"),
            ("magic", bytes(no_magic), "HdrS"),
            ("old protocol", bytes(old), "2.04"),
            ("payload outside", bytes(outside), "outside the file"),
        ):
            with self.subTest(what), self.assertRaisesRegex(GuestError, msg):
                vgguest.bzimage_info(img)

    def test_size_mismatch_and_non_x86_are_errors(self):
        raw = self.kernel()
        lying = lzma.compress(raw, format=lzma.FORMAT_XZ) + struct.pack("<I", len(raw) + 1)
        with self.assertRaisesRegex(GuestError, "payload says"):
            vgguest.vmlinux_from_bzimage(fake_bzimage(lying))
        arm = fake_elf(load=b"\0" * 64, machine=183)
        with self.assertRaisesRegex(GuestError, "not x86-64"):
            vgguest.vmlinux_from_bzimage(fake_bzimage(gzip.compress(arm)))


class ModuleClosureTest(unittest.TestCase):
    def tree(self, mods: dict[str, bytes], builtin=()):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        for rel, data in mods.items():
            p = os.path.join(d.name, "kernel", rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
        with open(os.path.join(d.name, "modules.builtin"), "w") as f:
            f.writelines(f"kernel/{b}.ko\n" for b in builtin)
        return d.name

    def test_depends_are_followed_and_builtins_reported(self):
        moddir = self.tree(
            {
                "drivers/a/top-mod.ko": fake_module("mid_mod,ext4"),
                "drivers/b/mid_mod.ko": fake_module("base"),
                "base.ko.xz": lzma.compress(fake_module("")),
                "unrelated.ko": fake_module(""),
            },
            builtin=["fs/ext4/ext4"],
        )
        ms = vgguest.module_closure(moddir, ["top_mod"])
        self.assertEqual(sorted(ms.files), ["base", "mid_mod", "top_mod"])
        self.assertEqual(ms.files["top_mod"], "kernel/drivers/a/top-mod.ko")
        self.assertEqual(ms.builtin, ["ext4"])

    def test_unknown_dependency_names_its_parent(self):
        moddir = self.tree({"x.ko": fake_module("ghost")})
        with self.assertRaisesRegex(GuestError, "ghost.*needed by x"):
            vgguest.module_closure(moddir, ["x"])

    def test_not_a_module(self):
        moddir = self.tree({"x.ko": b"not an elf"})
        with self.assertRaisesRegex(GuestError, "not an ELF"):
            vgguest.module_closure(moddir, ["x"])


class ModuleSignatureTest(unittest.TestCase):
    def signed(self, body: bytes, sig: bytes, signer: bytes = b"", key_id: bytes = b"") -> bytes:
        info = bytes([0, 0, 2, len(signer), len(key_id), 0, 0, 0]) + len(sig).to_bytes(4, "big")
        return body + signer + key_id + sig + info + vgguest.MODULE_SIG_MAGIC

    def test_signature_is_removed_and_the_module_kept(self):
        body = fake_module("")
        self.assertEqual(vgguest.strip_module_signature(self.signed(body, b"\x30" * 700)), body)
        self.assertEqual(vgguest.strip_module_signature(self.signed(body, b"s" * 9, b"ab", b"cde")), body)

    def test_unsigned_module_is_unchanged(self):
        body = fake_module("")
        self.assertEqual(vgguest.strip_module_signature(body), body)

    def test_bad_signature_lengths_are_errors(self):
        body = fake_module("")
        bad = self.signed(body, b"x" * 10)
        bad = bad[: -len(vgguest.MODULE_SIG_MAGIC) - 4] + (10**6).to_bytes(4, "big") + vgguest.MODULE_SIG_MAGIC
        with self.assertRaisesRegex(GuestError, "malformed module signature"):
            vgguest.strip_module_signature(bad, "x.ko")
        with self.assertRaisesRegex(GuestError, "truncated module signature"):
            vgguest.strip_module_signature(b"\x00" * 4 + vgguest.MODULE_SIG_MAGIC, "x.ko")


class ElfDynamicTest(unittest.TestCase):
    def test_fake_dynamic_elf_reads_back(self):
        elf = vgguest.Elf(fake_dyn_elf(["libext2fs.so.2", "libc.so.6"], "/lib64/ld-linux-x86-64.so.2"))
        self.assertEqual(elf.needed(), ["libext2fs.so.2", "libc.so.6"])
        self.assertEqual(elf.interp(), "/lib64/ld-linux-x86-64.so.2")
        self.assertIsNone(vgguest.Elf(fake_dyn_elf([])).interp())


class Mke2fsConfTest(unittest.TestCase):
    def test_features_of_one_fs_type(self):
        text = MKE2FS_CONF.decode()
        self.assertIn("metadata_csum", vgguest.mke2fs_conf_features(text, "ext4"))
        self.assertIn("extent", vgguest.mke2fs_conf_features(text, "ext4"))
        self.assertEqual(vgguest.mke2fs_conf_features(text, "ext3"), {"has_journal"})
        self.assertEqual(vgguest.mke2fs_conf_features(text, "small"), set())
        self.assertEqual(vgguest.mke2fs_conf_features(text, "ext2"), set())

    def test_negation_comments_and_other_sections(self):
        text = (
            "[options]\n ext4 = {\n  features = extent\n }\n"  # not [fs_types]: ignored
            "[fs_types]\n# ext4 = {\n ext4 = {\n  features = has_journal,extent,64bit\n"
            "  ; features = bogus\n  features = ^64bit\n }\n"
        )
        self.assertEqual(vgguest.mke2fs_conf_features(text, "ext4"), {"has_journal", "extent"})


class E2fsprogsStagingTest(unittest.TestCase):
    """stage_e2fsprogs on synthetic package trees laid out like Debian's."""

    LD = "/lib64/ld-linux-x86-64.so.2"

    def setUp(self):
        d = tempfile.TemporaryDirectory()
        self.addCleanup(d.cleanup)
        self.top = d.name
        self.libc = self.pkg(
            "libc6",
            {
                "lib/x86_64-linux-gnu/libc.so.6": fake_dyn_elf([], tag=b"libc"),
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": fake_dyn_elf([], tag=b"ld"),
                "lib64/ld-linux-x86-64.so.2": "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            },
        )
        prog = fake_dyn_elf(["libext2fs.so.2", "libc.so.6"], self.LD, b"prog")
        self.e2fs = self.pkg(
            "e2fsprogs",
            {
                "sbin/mke2fs": prog + b"mke2fs",
                "sbin/e2fsck": prog + b"e2fsck",
                "sbin/dumpe2fs": prog + b"dumpe2fs",
                "sbin/mkfs.ext4": "mke2fs",
                "sbin/debugfs": fake_dyn_elf(["libss.so.2"], self.LD),
                "etc/mke2fs.conf": MKE2FS_CONF,
            },
        )
        self.libs = [
            self.pkg(
                "libext2fs2",
                {
                    "lib/x86_64-linux-gnu/libext2fs.so.2.4": fake_dyn_elf(["libcom_err.so.2", "libc.so.6"]),
                    "lib/x86_64-linux-gnu/libext2fs.so.2": "libext2fs.so.2.4",
                },
            ),
            self.pkg("libcom-err2", {"usr/lib/x86_64-linux-gnu/libcom_err.so.2": fake_dyn_elf(["libc.so.6"])}),
            self.pkg("libss2", {"lib/x86_64-linux-gnu/libss.so.2": fake_dyn_elf(["libc.so.6"])}),
        ]
        self.stage = os.path.join(self.top, "stage")
        os.makedirs(os.path.join(self.stage, "sbin"))
        os.symlink("/bin/busybox", os.path.join(self.stage, "sbin/mke2fs"))  # busybox's ext2-only applet

    def pkg(self, name: str, files: dict) -> str:
        root = os.path.join(self.top, name)
        for rel, data in files.items():
            p = os.path.join(root, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if isinstance(data, str):
                os.symlink(data, p)
            else:
                with open(p, "wb") as f:
                    f.write(data)
                os.chmod(p, 0o755 if data.startswith(b"\x7fELF") and "/lib" not in rel else 0o644)
        return root

    def args(self, **kw):
        a = {"e2fsprogs_root": self.e2fs, "libc_root": self.libc, "lib_root": self.libs}
        a.update(kw)
        return SimpleNamespace(**a)

    def staged(self) -> dict[str, str]:
        out = {}
        for root, _dirs, files in os.walk(self.stage):
            for fn in files:
                p = os.path.join(root, fn)
                out[os.path.relpath(p, self.stage)] = "-> " + os.readlink(p) if os.path.islink(p) else "file"
        return out

    def test_programs_links_config_and_library_closure(self):
        added = vgguest.stage_e2fsprogs(self.args(), self.stage)
        got = self.staged()
        for prog in ("mke2fs", "e2fsck", "dumpe2fs"):
            self.assertEqual(got[f"sbin/{prog}"], "file", prog)
            with open(os.path.join(self.stage, "sbin", prog), "rb") as f:
                self.assertTrue(f.read().endswith(prog.encode()), prog)
            self.assertTrue(os.stat(os.path.join(self.stage, "sbin", prog)).st_mode & 0o100)
        for link, prog in vgguest.E2FSPROGS_LINKS.items():
            self.assertEqual(got[f"sbin/{link}"], f"-> {prog}")
        self.assertEqual(got["lib/x86_64-linux-gnu/libext2fs.so.2"], "-> libext2fs.so.2.4")
        self.assertEqual(got["lib/x86_64-linux-gnu/libext2fs.so.2.4"], "file")
        self.assertEqual(got["usr/lib/x86_64-linux-gnu/libcom_err.so.2"], "file")  # needed by a library
        self.assertEqual(got["lib64/ld-linux-x86-64.so.2"], "-> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        self.assertEqual(got["lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"], "file")
        self.assertEqual(got["etc/mke2fs.conf"], "file")
        # only what DT_NEEDED asks for: no libss (debugfs is not shipped), no debugfs
        self.assertNotIn("lib/x86_64-linux-gnu/libss.so.2", got)
        self.assertNotIn("sbin/debugfs", got)
        self.assertEqual(sorted(added), sorted(got))

    def test_staged_tree_passes_the_archive_checks(self):
        words = ("mke2fs", "e2fsck", "dumpe2fs", "mkfs.", "fsck.", "needs", "interpreter", "dangling", "ELF")

        def e2fs_errors():
            blob = vgguest.write_newc(vgguest.tree_entries(self.stage, []))
            errors, facts = vgguest.check_archive(blob, "6.1.0-99-test", [], None)
            return [e for e in errors if any(w in e for w in words)], facts

        # before staging, the checker misses them all (and busybox's mke2fs is no mke2fs)
        before, _ = e2fs_errors()
        self.assertIn("/sbin/mke2fs is a symlink, expected a file", before)
        self.assertIn("missing /sbin/e2fsck", before)
        self.assertIn("/sbin/mkfs.ext4 does not lead to /sbin/mke2fs", before)
        vgguest.stage_e2fsprogs(self.args(), self.stage)
        after, facts = e2fs_errors()
        self.assertEqual(after, [])
        self.assertEqual(
            facts["e2fsprogs_libraries"],
            [
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/libext2fs.so.2.4",
                "usr/lib/x86_64-linux-gnu/libcom_err.so.2",
            ],
        )

    def test_usr_sbin_layout_of_later_releases(self):
        e2fs = self.pkg(
            "e2fsprogs-usrmerge",
            {
                "usr/sbin/mke2fs": fake_dyn_elf(["libc.so.6"], self.LD, b"m"),
                "usr/sbin/e2fsck": fake_dyn_elf(["libc.so.6"], self.LD, b"e"),
                "usr/sbin/dumpe2fs": fake_dyn_elf(["libc.so.6"], self.LD, b"d"),
                "etc/mke2fs.conf": MKE2FS_CONF,
            },
        )
        vgguest.stage_e2fsprogs(self.args(e2fsprogs_root=e2fs), self.stage)
        got = self.staged()
        self.assertEqual(got["sbin/mke2fs"], "file")
        self.assertNotIn("usr/sbin/mke2fs", got)

    def test_missing_library_package_names_the_library(self):
        with self.assertRaisesRegex(GuestError, r"needs libcom_err\.so\.2, which is in none of"):
            vgguest.stage_e2fsprogs(self.args(lib_root=[self.libs[0]]), self.stage)

    def test_libraries_are_never_taken_from_the_host(self):
        # with no library packages at all, the host's /lib must not fill in
        with self.assertRaisesRegex(GuestError, r"needs libext2fs\.so\.2"):
            vgguest.stage_e2fsprogs(self.args(lib_root=[]), self.stage)

    def test_missing_program_is_an_error(self):
        os.unlink(os.path.join(self.e2fs, "sbin/dumpe2fs"))
        with self.assertRaisesRegex(GuestError, r"has no /sbin/dumpe2fs or /usr/sbin/dumpe2fs"):
            vgguest.stage_e2fsprogs(self.args(), self.stage)

    def test_missing_config_is_an_error(self):
        os.unlink(os.path.join(self.e2fs, "etc/mke2fs.conf"))
        with self.assertRaisesRegex(GuestError, r"has no /etc/mke2fs\.conf"):
            vgguest.stage_e2fsprogs(self.args(), self.stage)

    def test_conflicting_library_is_an_error(self):
        p = os.path.join(self.stage, "lib/x86_64-linux-gnu/libc.so.6")
        os.makedirs(os.path.dirname(p))
        with open(p, "wb") as f:
            f.write(b"another libc")
        with self.assertRaisesRegex(GuestError, r"/lib/x86_64-linux-gnu/libc\.so\.6: two different files"):
            vgguest.stage_e2fsprogs(self.args(), self.stage)

    def test_same_library_staged_twice_is_fine(self):
        # the hyperv-daemons closure stages the same libc afterwards
        vgguest.stage_e2fsprogs(self.args(), self.stage)
        closure = vgguest.elf_closure(
            [("usr/sbin/x", os.path.join(self.libc, "lib/x86_64-linux-gnu/libc.so.6"))], [self.libc]
        )
        self.assertEqual(vgguest._install_closure(closure, self.stage), ["usr/sbin/x"])


def _assets():
    root = os.environ.get("VERDIGRIS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "verdigris")
    path = os.path.join(root, "linux", "assets.env")
    return vgguest.read_assets_env(path) if os.path.exists(path) else None


ASSETS = _assets()


@unittest.skipUnless(ASSETS, "run guests/linux/fetch-assets.sh first")
class RealAssetsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(ASSETS["INITRD"], "rb") as f:
            cls.blob = f.read()
        with open(ASSETS["VMLINUX"], "rb") as f:
            cls.vmlinux = f.read()
        cls.kver = ASSETS["KERNEL_VERSION"]
        cls.entries = vgguest.read_newc(cls.blob)

    def check(self, entries):
        errors, _ = vgguest.check_archive(vgguest.write_newc(entries), self.kver, None, self.vmlinux)
        return errors

    def without(self, pred):
        return [e for e in self.entries if not pred(e.name)]

    def test_built_archive_passes(self):
        errors, facts = vgguest.check_archive(self.blob, self.kver, None, self.vmlinux)
        self.assertEqual(errors, [])
        for e in self.entries:
            if e.name.endswith(".ko"):
                self.assertFalse(e.data.endswith(vgguest.MODULE_SIG_MAGIC), f"{e.name} still signed")
        self.assertIn("hv_vmbus", facts["modules"])
        self.assertIn("scsi_transport_fc", facts["modules"])
        self.assertTrue(facts["symbols_checked"])

    def test_archive_is_canonical(self):
        self.assertEqual(vgguest.write_newc(self.entries), self.blob)

    def test_missing_dependency_module_is_caught(self):
        errors = self.check(self.without(lambda n: n.endswith("/scsi_mod.ko")))
        self.assertTrue(any("depends on scsi_mod" in e for e in errors), errors)
        self.assertTrue(any("needs symbols" in e and "scsi_transport_fc" in e for e in errors), errors)

    def test_missing_libc_is_caught(self):
        errors = self.check(self.without(lambda n: n.endswith("/libc.so.6")))
        self.assertTrue(any("hv_kvp_daemon: needs libc.so.6" in e for e in errors), errors)

    def test_stale_modules_dep_is_caught(self):
        entries = []
        for e in self.entries:
            if e.name.endswith("/modules.dep"):
                lines = [ln for ln in e.data.decode().splitlines() if "hv_storvsc" not in ln.split(":")[0]]
                e = Entry(e.name, e.mode, ("\n".join(lines) + "\n").encode())
            entries.append(e)
        errors = self.check(entries)
        self.assertTrue(any("modules.dep does not list" in e and "hv_storvsc" in e for e in errors), errors)

    def test_missing_console_and_dangling_link_are_caught(self):
        errors = self.check(self.without(lambda n: n in ("dev/console", "bin/busybox")))
        self.assertIn("missing /dev/console", errors)
        self.assertTrue(any(e.startswith("dangling symlink /bin/sh") for e in errors), errors)

    def test_missing_test_script_is_caught(self):
        errors = self.check(self.without(lambda n: n == "etc/verdigris.d/readback.sh"))
        self.assertIn("missing /etc/verdigris.d/readback.sh", errors)

    def test_e2fsprogs_and_its_libraries_are_there(self):
        _, facts = vgguest.check_archive(self.blob, self.kver, None, None)
        libs = {os.path.basename(p).split(".so")[0] for p in facts["e2fsprogs_libraries"]}
        for lib in ("libext2fs", "libe2p", "libcom_err", "libblkid", "libuuid", "libc", "ld-linux-x86-64"):
            self.assertIn(lib, libs)
        by_name = {e.name: e for e in self.entries}
        self.assertEqual(by_name["sbin/mkfs.ext4"].data, b"mke2fs")
        self.assertIn("metadata_csum", vgguest.mke2fs_conf_features(by_name["etc/mke2fs.conf"].data.decode(), "ext4"))

    def test_missing_e2fsprogs_library_is_caught(self):
        errors = self.check(self.without(lambda n: n.startswith("lib/x86_64-linux-gnu/libext2fs.so.2.")))
        self.assertIn("/sbin/mke2fs: needs libext2fs.so.2, which is missing", errors)
        self.assertIn("/sbin/e2fsck: needs libext2fs.so.2, which is missing", errors)
        errors = self.check(self.without(lambda n: "libcom_err" in n))
        self.assertIn("/lib/x86_64-linux-gnu/libext2fs.so.2.4: needs libcom_err.so.2, which is missing", errors)

    def test_library_that_is_not_an_elf_file_is_caught(self):
        real = "usr/lib/x86_64-linux-gnu/libuuid.so.1."
        entries = [Entry(e.name, e.mode, b"not a library") if e.name.startswith(real) else e for e in self.entries]
        errors = self.check(entries)
        self.assertTrue(any(e.startswith("/sbin/mke2fs: needs libuuid.so.1, but") for e in errors), errors)

    def test_busybox_mke2fs_instead_of_e2fsprogs_is_caught(self):
        entries = self.without(lambda n: n == "sbin/mke2fs")
        entries.append(Entry("sbin/mke2fs", stat.S_IFLNK | 0o777, b"/bin/busybox"))
        errors = self.check(entries)
        self.assertIn("/sbin/mke2fs is a symlink, expected a file", errors)
        self.assertIn("/sbin/mkfs.ext4 does not lead to /sbin/mke2fs", errors)
        errors = self.check(self.without(lambda n: n in ("sbin/fsck.ext4", "etc/mke2fs.conf")))
        self.assertIn("/sbin/fsck.ext4 does not lead to /sbin/e2fsck", errors)
        self.assertIn("missing /etc/mke2fs.conf", errors)

    def test_mke2fs_conf_without_ext4_features_is_caught(self):
        entries = [
            Entry(e.name, e.mode, e.data.replace(b"has_journal,extent,", b"")) if e.name == "etc/mke2fs.conf" else e
            for e in self.entries
        ]
        errors = self.check(entries)
        self.assertIn("/etc/mke2fs.conf does not give ext4 the features has_journal, extent", errors)

    @unittest.skipUnless(hasattr(os, "chroot") and os.geteuid() == 0, "needs root for chroot")
    def test_mkfs_ext4_and_e2fsck_run_from_the_archive(self):
        """Unpack the archive, chroot into it (so only its own loader and
        libraries can be used) and make and check a real ext4 image."""
        with tempfile.TemporaryDirectory() as root:
            for e in self.entries:
                p = os.path.join(root, e.name)
                if e.kind == "dir":
                    os.makedirs(p, exist_ok=True)
                elif e.kind == "symlink":
                    os.symlink(e.data.decode(), p)
                elif e.kind == "file":
                    with open(p, "wb") as f:
                        f.write(e.data)
                    os.chmod(p, e.mode & 0o777)
            with open(os.path.join(root, "tmp/disk.img"), "wb") as f:
                f.truncate(64 << 20)

            def run(*argv):
                return subprocess.run(["chroot", root] + list(argv), capture_output=True, timeout=120)

            r = run("/sbin/mkfs.ext4", "-F", "-q", "/tmp/disk.img")
            self.assertEqual(r.returncode, 0, r.stderr)
            r = run("/sbin/fsck.ext4", "-fn", "/tmp/disk.img")
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn(b"/tmp/disk.img: 11/", r.stdout)  # a fresh file system: 11 inodes in use
            r = run("/sbin/dumpe2fs", "-h", "/tmp/disk.img")
            self.assertEqual(r.returncode, 0, r.stderr)
            features = next(ln for ln in r.stdout.decode().splitlines() if ln.startswith("Filesystem features:"))
            for feat in ("has_journal", "extent", "flex_bg", "metadata_csum", "64bit"):
                self.assertIn(feat, features.split())

    def test_wrong_kernel_version_is_caught(self):
        errors, _ = vgguest.check_archive(self.blob, "6.1.0-0-other", None, None)
        self.assertTrue(any("missing /lib/modules/6.1.0-0-other" in e for e in errors), errors)


if __name__ == "__main__":
    unittest.main()
