#!/bin/sh
# Smoke test: proves the kernel reached user space, then powers off.
echo "verdigris-guest: smoke uname=$(uname -r) cpus=$(nproc)"
poweroff -f
