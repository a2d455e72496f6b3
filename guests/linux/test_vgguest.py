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
import sys
import tempfile
import unittest

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

    def test_wrong_kernel_version_is_caught(self):
        errors, _ = vgguest.check_archive(self.blob, "6.1.0-0-other", None, None)
        self.assertTrue(any("missing /lib/modules/6.1.0-0-other" in e for e in errors), errors)


if __name__ == "__main__":
    unittest.main()
