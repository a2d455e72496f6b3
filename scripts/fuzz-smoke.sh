#!/usr/bin/env bash
# Runs every cargo-fuzz target of the workspace briefly (FUZZ_SECONDS each, default 15), so
# that CI notices a parser that panics on input a fuzzer finds quickly. Longer campaigns:
#   cd crates/<crate>/fuzz && cargo +nightly fuzz run <target>
# Needs the nightly toolchain (present on our machines) and cargo-fuzz (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-15}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
fi
# One target directory for every fuzz project: the shared dependencies build once.
export CARGO_TARGET_DIR="$PWD/target/fuzz"
status=0
for dir in crates/*/fuzz; do
    for t in "$dir"/fuzz_targets/*.rs; do
        [ -e "$t" ] || continue
        name=$(basename "$t" .rs)
        printf 'fuzz %-28s ' "${dir%/fuzz}/$name"
        log="$CARGO_TARGET_DIR/$name.log"
        mkdir -p "$CARGO_TARGET_DIR"
        if (cd "$dir" && cargo +nightly fuzz run "$name" -- -max_total_time="$secs" >"$log" 2>&1); then
            runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 || true)
            echo "ok (${runs:-ran})"
        else
            echo "FAILED (see $log)"
            tail -n 30 "$log"
            status=1
        fi
    done
done
exit $status
