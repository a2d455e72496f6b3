#!/usr/bin/env bash
# Sets up and boots the stock Debian Linux guest with its serial console on this terminal.
# Fetches the guest assets (kernel, busybox initramfs) into ~/.cache/verdigris on first use.
# Extra arguments are passed to `verdigris run` (e.g. --cpus 4 --memory 1G).
# Quit with Ctrl-] or `poweroff -f` in the guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash guests/linux/fetch-assets.sh >&2
# shellcheck disable=SC1090
. "${VERDIGRIS_CACHE:-$HOME/.cache/verdigris}/linux/assets.env"
cargo build --release --quiet -p verdigris
exec ./target/release/verdigris run --kernel "$KERNEL" --initrd "$INITRD" \
    --cmdline "${VERDIGRIS_CMDLINE:-console=ttyS0}" --memory 512M --cpus 2 "$@"
