#!/usr/bin/env python3
"""Foundation benchmarks (results go to docs/PERFORMANCE.md).

  (b) time from `verdigris run` process start to the first byte the test guest writes on COM1
  (c) the worker's resident memory beyond guest RAM, 1 VP, 128 MiB guest
  (d) the stock Debian kernel's time to user space (our /init's first line), with quirk counts

Usage: scripts/bench.py [--linux]   (needs a release build and the test guest built)
"""
import os
import re
import select
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/verdigris")
TG = os.path.join(ROOT, "guests/test-guest/target/x86_64-unknown-linux-gnu/release/test-guest")


def first_byte(runs=5):
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        p = subprocess.Popen([BIN, "run", "--kernel", TG, "--cmdline", "test=hello",
                              "--memory", "128M", "--serial", "stdio"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        os.read(p.stdout.fileno(), 1)
        times.append(time.monotonic() - t0)
        p.wait()
    times.sort()
    return times[len(times) // 2], times


def rss_beyond_ram(mem_mib=128):
    p = subprocess.Popen([BIN, "run", "--kernel", TG, "--cmdline", "test=panic",
                          "--memory", f"{mem_mib}M", "--serial", "none"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    time.sleep(3)  # the guest has panicked on purpose and halts forever
    total = guest = 0
    cur_size = 0
    with open(f"/proc/{p.pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                cur_size = int(m.group(2), 16) - int(m.group(1), 16)
                continue
            if line.startswith("Rss:"):
                kb = int(line.split()[1])
                total += kb
                if cur_size == mem_mib << 20:
                    guest += kb
    p.kill()
    p.wait()
    return total, guest


def linux_boot():
    env = dict(l.strip().split("=", 1) for l in open(os.path.expanduser(
        os.environ.get("VERDIGRIS_CACHE", "~/.cache/verdigris") + "/linux/assets.env"))
        if "=" in l and not l.startswith("#"))
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "run", "--kernel", env["KERNEL"], "--initrd", env["INITRD"],
                          "--cmdline", "console=ttyS0 verdigris.script=smoke",
                          "--memory", "512M", "--cpus", "2", "--serial", "stdio"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    buf = b""
    marks = {}
    while p.poll() is None:
        r, _, _ = select.select([p.stdout], [], [], 1.0)
        if r:
            chunk = os.read(p.stdout.fileno(), 65536)
            buf += chunk
            for key, pat in (("banner", b"Linux version"), ("init", b"verdigris-guest: init"),
                             ("smoke", b"verdigris-guest: smoke")):
                if key not in marks and pat in buf:
                    marks[key] = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace")
    quirks = [l for l in err.splitlines() if "quirks handled" in l]
    return marks, p.returncode, quirks, time.monotonic() - t0


if __name__ == "__main__":
    med, all_t = first_byte()
    print(f"(b) start to first COM1 byte: median {med * 1000:.0f} ms over {len(all_t)} runs "
          f"(min {all_t[0] * 1000:.0f}, max {all_t[-1] * 1000:.0f})")
    total, guest = rss_beyond_ram()
    print(f"(c) RSS {total / 1024:.1f} MiB, of which guest RAM {guest / 1024:.1f} MiB: "
          f"worker beyond guest RAM {(total - guest) / 1024:.1f} MiB")
    if "--linux" in sys.argv:
        marks, rc, quirks, total_t = linux_boot()
        print(f"(d) stock kernel: banner at {marks.get('banner', float('nan')):.0f} s, "
              f"user space (/init) at {marks.get('init', float('nan')):.0f} s, "
              f"smoke command at {marks.get('smoke', float('nan')):.0f} s, "
              f"powered off at {total_t:.0f} s, exit {rc}")
        for q in quirks:
            print("    " + q)
