#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (guest assets via apt
# packages into ~/.cache/verdigris), checks formatting and lints, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n== %s\n' "$*"; }

step "guest assets (stock Debian kernel, busybox, hv modules)"
bash guests/linux/fetch-assets.sh
python3 guests/linux/check-initramfs.py --assets "${VERDIGRIS_CACHE:-$HOME/.cache/verdigris}/linux/assets.env"
python3 -m unittest discover -s guests/linux -p 'test_*.py' -q

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "tests (unit, integration, test guest, stock Linux boot)"
cargo test --workspace --release 2>&1

if [ "${VERDIGRIS_LINUX_TESTS:-0}" = 1 ]; then
    step "stock Linux guest boots (long)"
    cargo test --release -p verdigris --test linux -- --ignored 2>&1
fi

step "fuzz smoke: every guest-facing parser, briefly"
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash scripts/fuzz-smoke.sh
