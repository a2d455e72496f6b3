#!/usr/bin/env python3
"""Check a Verdigris Linux guest initramfs (the self-check tests call).

usage: check-initramfs.py [INITRAMFS] [--assets assets.env] [--kernel-version V] [--vmlinux F]
                          [--require mod1,mod2] [--json]

Reads the uncompressed newc archive back and verifies: the archive is
well-formed, sorted and normalised (reproducible); /init, busybox and its
applet links, /dev/console, the skeleton directories and /etc files exist;
every symlink resolves inside the archive; every kernel module matches the
kernel version, its `depends=` closure is present (or built in) and listed in
modules.dep, and (with --vmlinux, or VMLINUX from --assets) every symbol it
needs is exported by the kernel or another module in the archive; the
required modules are there; every dynamic executable and library finds its
interpreter and libraries (as ELF files inside the archive), every script
its #! interpreter; e2fsprogs' /sbin/mke2fs, e2fsck and dumpe2fs are real
programs (not busybox's ext2-only applet), /sbin/mkfs.ext4 and fsck.ext4
lead to them and /etc/mke2fs.conf gives ext4 its journal and extents. Exit
status 0 = OK,
1 = problems (one `check-initramfs: error:` line each).
"""

import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vgguest  # noqa: E402

if __name__ == "__main__":
    sys.exit(vgguest.main(["check"] + sys.argv[1:]))
