#!/bin/sh
# Sanity checks of the built test guest: ELF64 executable, first PT_LOAD at physical 0x200000,
# entry at _start, whole image below 4 MiB, and no SSE/x87 instruction outside the quirks test
# (see .cargo/config.toml for why). Usage: ./check-elf.sh [debug|release]   (default: release)
set -eu
cd "$(dirname "$0")"
profile="${1:-release}"
elf="target/x86_64-unknown-linux-gnu/$profile/test-guest"
fail() { echo "check-elf: FAIL: $*" >&2; exit 1; }
[ -f "$elf" ] || fail "$elf not built (cargo build --release in guests/test-guest)"

readelf -h "$elf" | grep -q 'Class:.*ELF64' || fail "not ELF64"
readelf -h "$elf" | grep -q 'Type:.*EXEC' || fail "not a static executable (ET_EXEC)"
entry=$(readelf -h "$elf" | awk '/Entry point/ {print $4}')
start=$(nm "$elf" | awk '$3 == "_start" {print "0x" $1}')
[ "$(printf '%d' "$entry")" = "$(printf '%d' "$start")" ] || fail "entry $entry is not _start ($start)"
first_load=$(readelf -lW "$elf" | awk '$1 == "LOAD" {print $4; exit}')
[ "$(printf '%d' "$first_load")" = "$((0x200000))" ] || fail "first PT_LOAD at $first_load, not 0x200000"
readelf -lW "$elf" | awk '$1 == "LOAD" && $3 != $4 {bad=1} END {exit bad}' || fail "a PT_LOAD has vaddr != paddr"
end=$(nm "$elf" | awk '$3 == "__kernel_end" {print "0x" $1}')
[ "$(printf '%d' "$end")" -le "$((0x400000))" ] || fail "image ends at $end, above 4 MiB"

sse=$(objdump -d -M intel --no-show-raw-insn "$elf" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $2; next }
    fn ~ /quirks/ { next }
    /xmm|mxcsr|fxsave|fxrstor|xsave|xrstor|\tf(ld|st|add|mul|div|sub|ild|ist|wait|ninit)/ { print fn ": " $0 }')
[ -z "$sse" ] || fail "SSE/x87 code outside the quirks test:
$sse"

echo "check-elf: ok ($elf: entry $entry, loads at 0x200000, ends at $end, no stray SSE)"
