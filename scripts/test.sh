#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (guest assets via apt
# packages into ~/.cache/verdigris), checks formatting and lints, runs every test.
#
# The stock-Linux test boots the Debian kernel twice, which takes most of the suite's time on
# hosts that emulate guest ring 0, and keeps about one core busy. It starts as soon as it is
# built and runs beside the other steps, which run at the lowest CPU priority so that the
# guest's virtual processors keep their core. Every step runs even after another one failed;
# the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
failed=()
check() { # check NAME COMMAND...: runs the command, remembers a failure
    local name=$1
    shift
    if ! "$@"; then
        echo "FAILED: $name"
        failed+=("$name")
    fi
}

step "guest assets (stock Debian kernel, busybox, hv modules)"
# Without the assets nothing below can run the guest: stop here.
bash guests/linux/fetch-assets.sh || exit 1
check "initramfs check" python3 guests/linux/check-initramfs.py \
    --assets "${VERDIGRIS_CACHE:-$HOME/.cache/verdigris}/linux/assets.env"
check "guest asset tool tests" python3 -m unittest discover -s guests/linux -p 'test_*.py' -q

step "build the stock-Linux test and start it (it runs beside the steps below)"
linux_dir=$(mktemp -d /tmp/verdigris-linux-test.XXXXXX)
linux_pid=
if cargo build --release --quiet -p verdigris &&
    cargo test --release -p vmms --test stock_linux --no-run --message-format=json >"$linux_dir/build.json"; then
    exe=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "stock_linux":
        print(m["executable"])' "$linux_dir/build.json")
    # Copies, so that the builds below cannot replace the executables under the running test.
    cp target/release/verdigris "$exe" "$linux_dir/"
    (cd crates/vmms && VERDIGRIS_BIN="$linux_dir/verdigris" \
        "$linux_dir/$(basename "$exe")" --test-threads 1 --nocapture >"$linux_dir/log" 2>&1)&
    linux_pid=$!
    echo "started: stock_linux (log: $linux_dir/log)"
else
    failed+=("stock-Linux test build")
fi

step "format and lints"
check "cargo fmt" nice -n 19 cargo fmt --all -- --check
check "cargo clippy" nice -n 19 cargo clippy --workspace --all-targets --quiet -- -D warnings

step "tests (unit, integration, test guest)"
check "cargo test" nice -n 19 cargo test --workspace --release --no-fail-fast -- --skip stock_linux 2>&1

step "fuzz smoke: every guest-facing parser, briefly"
check "fuzz smoke" env FUZZ_SECONDS="${FUZZ_SECONDS:-10}" nice -n 19 bash scripts/fuzz-smoke.sh

step "stock Linux guest under the management service (two boots; started above)"
if [ -n "$linux_pid" ]; then
    wait "$linux_pid"
    rc=$?
    cat "$linux_dir/log"
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: stock_linux (exit $rc)"
        failed+=("stock_linux")
    fi
fi
rm -rf "$linux_dir"

step "done"
if [ ${#failed[@]} -ne 0 ]; then
    printf 'failed steps: %s\n' "${failed[*]}"
    exit 1
fi
echo "all steps passed"
