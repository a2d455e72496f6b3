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

step "tests (unit, integration, test guest)"
cargo test --workspace --release --no-fail-fast -- --skip stock_linux 2>&1

step "fuzz smoke: every guest-facing parser, briefly"
FUZZ_SECONDS="${FUZZ_SECONDS:-10}" bash scripts/fuzz-smoke.sh

step "stock Linux guest under the management service (one long boot shared by every check)"
cargo test --release -p vmms --test stock_linux 2>&1
