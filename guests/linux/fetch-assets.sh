#!/usr/bin/env bash
# Fetch and prepare the stock Debian 12 Linux guest for Verdigris.
#
# Downloads (apt-get download, never installs) the current Debian 12 cloud
# kernel, busybox-static, hyperv-daemons, libc6, e2fsprogs and the library
# packages e2fsprogs depends on into a cache outside git, then builds there:
#   vmlinuz-<ver>          the bzImage exactly as Debian ships it
#   vmlinux-<ver>          the same kernel decompressed on the host (ELF)
#   initramfs-<ver>.cpio   an uncompressed newc initramfs (busybox, /init,
#                          Hyper-V modules, hyperv-daemons, mkfs.ext4/e2fsck)
#   assets.env             KERNEL=, VMLINUX=, INITRD=, KERNEL_VERSION=, ...
# Idempotent: a second run downloads nothing and rebuilds nothing unless the
# inputs changed. See README.md in this directory.
set -euo pipefail
set -o errtrace

usage() {
	cat <<'EOF'
usage: fetch-assets.sh [--refresh] [--offline] [--force] [-h]

  --refresh  run apt-get update first, so a newer kernel is picked up
  --offline  no apt at all: reuse the packages of the last successful run
  --force    rebuild vmlinux and the initramfs even if their inputs are unchanged

Cache: ${VERDIGRIS_CACHE:-$HOME/.cache/verdigris}/linux/
EOF
}

die() {
	printf 'fetch-assets: error: %s\n' "$*" >&2
	exit 1
}
trap 'die "unexpected failure (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
META=linux-image-cloud-amd64
export LC_ALL=C DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1
export PATH="$PATH:/usr/sbin:/sbin"

REFRESH=0 OFFLINE=0 FORCE=0
for arg in "$@"; do
	case $arg in
	--refresh) REFRESH=1 ;;
	--offline) OFFLINE=1 ;;
	--force) FORCE=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		usage >&2
		die "unknown argument '$arg'"
		;;
	esac
done
[ "$REFRESH$OFFLINE" != 11 ] || die "--refresh and --offline exclude each other"

if [ -z "${VERDIGRIS_CACHE:-}" ] && [ -z "${HOME:-}" ]; then
	die "neither VERDIGRIS_CACHE nor HOME is set; set VERDIGRIS_CACHE to a cache directory"
fi
CACHE="${VERDIGRIS_CACHE:-$HOME/.cache/verdigris}/linux"
mkdir -p "$CACHE/debs" "$CACHE/pkgs" || die "cannot create $CACHE"
CACHE=$(cd "$CACHE" && pwd)

# One run at a time per cache (test suites may start several).
command -v flock >/dev/null || die "flock (util-linux) is required"
exec 9>"$CACHE/.lock"
flock -w 900 9 || die "timed out waiting for $CACHE/.lock (another fetch-assets.sh?)"

command -v python3 >/dev/null || die "python3 is required"
command -v dpkg-deb >/dev/null || die "dpkg-deb is required (this script expects Debian 12)"
command -v apt-get >/dev/null || die "apt-get is required (this script expects Debian 12)"
py() { python3 -B "$HERE/vgguest.py" "$@"; }

# Sets AS_ROOT to the prefix that runs a command as root, or dies saying why.
need_root() { # what-for
	if [ "$(id -u)" = 0 ]; then
		AS_ROOT=()
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		AS_ROOT=(sudo -n)
	else
		die "root (or password-less sudo) is needed to $1"
	fi
}

APT_UPDATED=0
apt_update_once() {
	[ "$APT_UPDATED" = 0 ] || return 0
	[ "$OFFLINE" = 0 ] || die "apt-get update would be needed, but --offline was given"
	need_root "run apt-get update"
	local log
	log=$("${AS_ROOT[@]}" apt-get update -qq 2>&1) || die "apt-get update failed: $(tail -n 3 <<<"$log")"
	APT_UPDATED=1
}

INSTALLED=()
ensure_tool() { # command package
	command -v "$1" >/dev/null 2>&1 && return 0
	[ "$OFFLINE" = 0 ] || die "'$1' is missing (Debian package $2) and --offline forbids installing it"
	need_root "install $2 (it provides '$1')"
	apt_update_once
	local log
	log=$("${AS_ROOT[@]}" apt-get install -y -qq --no-install-recommends "$2" 2>&1) ||
		die "apt-get install $2 failed: $(tail -n 3 <<<"$log")"
	command -v "$1" >/dev/null 2>&1 || die "installed $2 but '$1' is still not on PATH"
	INSTALLED+=("$2")
}

ensure_tool depmod kmod

# ---- resolve the package set --------------------------------------------

# Packages fetched besides the kernel, in this order after it (state.txt
# keeps the order), then the library packages of e2fsprogs.
FIXED=(busybox-static hyperv-daemons libc6 e2fsprogs)
declare -A VER DEPS
PKGS=()
E2FS_LIBS=()

# Candidate records of several packages, one `apt-cache show` call (each
# call parses all indexes: ~0.7 s). Fails when apt knows one of them not.
show_candidates() {
	apt-cache show --no-all-versions "$@" 2>/dev/null
}

# SHOW_OUT = the candidate records of packages; runs apt-get update once
# if apt does not know one of them.
show_known() { # what-for packages...
	local what=$1
	shift
	if ! SHOW_OUT=$(show_candidates "$@"); then
		apt_update_once
		SHOW_OUT=$(show_candidates "$@") ||
			die "apt does not know $what (is this Debian 12 with 'main' enabled?)"
	fi
}

# Fill VER[] and DEPS[] (Depends and Pre-Depends joined by ", ") from
# `apt-cache show` records.
parse_records() {
	local line cur=""
	while IFS= read -r line; do
		case $line in
		"Package: "*) cur=${line#Package: } ;;
		"Version: "*) VER[$cur]=${line#Version: } ;;
		"Depends: "* | "Pre-Depends: "*) DEPS[$cur]="${DEPS[$cur]:+${DEPS[$cur]}, }${line#*: }" ;;
		esac
	done <<<"$1"
}

# The shared-library packages (Debian names them lib<soname>) among the
# Depends/Pre-Depends of a package: first alternatives, without versions
# or architecture qualifiers, minus the fixed set.
lib_deps() { # package
	local name
	tr ',' '\n' <<<"${DEPS[$1]:-}" | sed -E 's/^ *//; s/ *\|.*//; s/[ (:].*//' |
		while IFS= read -r name; do
			case " ${FIXED[*]} " in *" $name "*) continue ;; esac
			[[ $name != lib* ]] || printf '%s\n' "$name"
		done
}

# Every versioned relation between fetched packages must hold for apt's
# candidates (e2fsprogs wants libext2fs2 of exactly its own version).
check_relations() {
	local p rel name op want
	declare -A fetched=()
	for p in "${PKGS[@]}"; do fetched[$p]=1; done
	for p in "${PKGS[@]}"; do
		while IFS= read -r rel; do
			[[ $rel =~ ^\ *([^\ :\(]+)(:[a-z0-9]+)?\ *\(([<>=]+)\ *([^\)]+)\) ]] || continue
			name=${BASH_REMATCH[1]} op=${BASH_REMATCH[3]} want=${BASH_REMATCH[4]}
			[ -n "${fetched[$name]:-}" ] || continue
			dpkg --compare-versions "${VER[$name]}" "$op" "$want" ||
				die "$p ${VER[$p]} needs $name ($op $want) but apt's candidate is ${VER[$name]}"
		done < <(tr ',' '\n' <<<"${DEPS[$p]:-}" | sed 's/ *|.*//')
	done
}

# Fill VER[], DEPS[], PKGS, E2FS_LIBS and META_VER from the candidate of
# $META and its "Depends: linux-image-<ver>-cloud-amd64 (= <version>)", and
# from the library packages e2fsprogs depends on (transitively; their real
# names come from apt, e.g. libext2fs2 here, libext2fs2t64 on later releases).
resolve() {
	local kdep="" kver="" p q hints=()
	VER=() DEPS=() E2FS_LIBS=()
	# The library packages of the last run go into the same apt-cache call
	# (each call costs ~1 s); should apt know one of them no longer, ask
	# again without them.
	if [ -f "$STATE" ]; then
		mapfile -t hints < <(awk 'NR > 6 && $1 ~ /^lib[a-z0-9][a-z0-9+.-]*$/ { print $1 }' "$STATE")
	fi
	if [ "${#hints[@]}" = 0 ] || ! SHOW_OUT=$(show_candidates "$META" "${FIXED[@]}" "${hints[@]}"); then
		show_known "$META, ${FIXED[*]}" "$META" "${FIXED[@]}"
	fi
	parse_records "$SHOW_OUT"
	[ -n "${VER[$META]:-}" ] || die "apt has no candidate for $META"
	kdep=$(tr ',|' '\n' <<<"${DEPS[$META]:-}" | sed 's/^ *//' |
		grep -E '^linux-image-[0-9][^ ]*-cloud-amd64( |$)' | head -n 1) || true
	[ -n "$kdep" ] || die "no linux-image-<ver>-cloud-amd64 in the Depends of $META ${VER[$META]}"
	META_VER=${VER[$META]}
	kpkg=${kdep%% *}
	if [[ $kdep =~ \(=\ ([^\)]+)\) ]]; then
		kver=${BASH_REMATCH[1]}
	else
		kver=$(show_candidates "$kpkg" | sed -n 's/^Version: //p' | head -n 1) || true
	fi
	[ -n "$kver" ] || die "apt has no version of $kpkg"
	VER[$kpkg]=$kver
	for p in "${FIXED[@]}"; do
		[ -n "${VER[$p]:-}" ] || die "apt has no installable version of $p"
	done

	declare -A seen=()
	local todo=() next=() unknown=()
	mapfile -t todo < <(lib_deps e2fsprogs)
	[ "${#todo[@]}" -gt 0 ] || die "apt lists no library packages in the dependencies of e2fsprogs ${VER[e2fsprogs]}"
	for p in "${todo[@]}"; do seen[$p]=1; done
	while [ "${#todo[@]}" -gt 0 ]; do
		unknown=()
		for p in "${todo[@]}"; do [ -n "${VER[$p]:-}" ] || unknown+=("$p"); done
		if [ "${#unknown[@]}" -gt 0 ]; then
			show_known "the libraries of e2fsprogs: ${unknown[*]}" "${unknown[@]}"
			parse_records "$SHOW_OUT"
		fi
		next=()
		for p in "${todo[@]}"; do
			[ -n "${VER[$p]:-}" ] || die "apt has no installable version of $p (a library of e2fsprogs)"
			E2FS_LIBS+=("$p")
			for q in $(lib_deps "$p"); do
				[ -z "${seen[$q]:-}" ] || continue
				seen[$q]=1
				next+=("$q")
			done
		done
		todo=("${next[@]}")
	done
	mapfile -t E2FS_LIBS < <(printf '%s\n' "${E2FS_LIBS[@]}" | sort)
	PKGS=("$kpkg" "${FIXED[@]}" "${E2FS_LIBS[@]}")
	check_relations
}

deb_file() { # package version -> path of the cached .deb, or nothing
	local f
	for f in "$CACHE/debs/${1}_${2//:/%3a}_"*.deb; do
		[ -f "$f" ] && printf '%s\n' "$f" && return 0
	done
	return 0
}

missing_debs() {
	local p
	for p in "${PKGS[@]}"; do
		[ -n "$(deb_file "$p" "${VER[$p]}")" ] || printf '%s\n' "$p"
	done
}

download() { # packages...
	local part="$CACHE/debs/.partial" log p f sandbox=()
	rm -rf "$part"
	mkdir -p "$part"
	[ "$(id -u)" != 0 ] || sandbox=(-o APT::Sandbox::User=root)
	local specs=()
	for p in "$@"; do specs+=("$p=${VER[$p]}"); done
	log=$(cd "$part" && apt-get download -qq "${sandbox[@]}" "${specs[@]}" 2>&1) ||
		die "apt-get download ${specs[*]} failed: $(grep -E '^(E|Err):' <<<"$log" | head -n 3)"
	for p in "$@"; do
		f=$(compgen -G "$part/${p}_*.deb" | head -n 1) || true
		[ -n "$f" ] || die "apt-get download did not produce a .deb for $p"
		if [ "$(dpkg-deb -f "$f" Package)" != "$p" ] || [ "$(dpkg-deb -f "$f" Version)" != "${VER[$p]}" ]; then
			die "$f is not $p ${VER[$p]}"
		fi
		mv -f "$f" "$CACHE/debs/"
	done
	rm -rf "$part"
}

STATE="$CACHE/state.txt" # "package version" lines of the last good run
DOWNLOADED=()
if [ "$OFFLINE" = 1 ]; then
	[ -f "$STATE" ] || die "--offline needs a previous successful run (no $STATE)"
	while read -r p v; do
		case $p in meta) META_VER=$v ;; *)
			PKGS+=("$p")
			VER[$p]=$v
			;;
		esac
	done <"$STATE"
	if [ "${#PKGS[@]}" -lt 5 ] || [ "${PKGS[*]:1:4}" != "${FIXED[*]}" ]; then
		die "$STATE is damaged or from an older package set; run once without --offline"
	fi
	E2FS_LIBS=("${PKGS[@]:5}")
	[ -z "$(missing_debs)" ] || die "--offline: cached packages are missing: $(missing_debs | tr '\n' ' ')"
else
	[ "$REFRESH" = 0 ] || apt_update_once
	resolve
	if [ -n "$(missing_debs)" ]; then
		# Indexes may be stale (old versions vanish from the security
		# mirror): refresh once, re-resolve, then download what is missing.
		if [ "$APT_UPDATED" = 0 ]; then
			apt_update_once
			resolve
		fi
		mapfile -t todo < <(missing_debs)
		if [ "${#todo[@]}" -gt 0 ]; then
			download "${todo[@]}"
			DOWNLOADED=("${todo[@]}")
		fi
	fi
fi
KPKG=${PKGS[0]}
KVER=${KPKG#linux-image-}

# ---- extract -------------------------------------------------------------

declare -A TREE
for p in "${PKGS[@]}"; do
	v=${VER[$p]}
	dir="$CACHE/pkgs/${p}_${v//:/%3a}"
	if [ ! -e "$dir/.complete" ]; then
		deb=$(deb_file "$p" "$v")
		rm -rf "$dir" "$dir.tmp"
		if ! dpkg-deb -x "$deb" "$dir.tmp"; then
			rm -rf "$dir.tmp" "$deb"
			die "$deb is damaged (dpkg-deb -x failed); removed it, run again to download it anew"
		fi
		touch "$dir.tmp/.complete"
		mv "$dir.tmp" "$dir"
	fi
	TREE[$p]=$dir
done
# Trees of older versions can be re-extracted from their .debs: drop them.
for dir in "$CACHE"/pkgs/*/; do
	dir=${dir%/}
	keep=0
	for p in "${PKGS[@]}"; do [ "$dir" != "${TREE[$p]}" ] || keep=1; done
	[ "$keep" = 1 ] || rm -rf "$dir"
done

{
	echo "meta $META_VER"
	for p in "${PKGS[@]}"; do echo "$p ${VER[$p]}"; done
} >"$STATE.tmp"
mv "$STATE.tmp" "$STATE"

# ---- kernel ----------------------------------------------------------------

KERNEL="$CACHE/vmlinuz-$KVER"
src="${TREE[$KPKG]}/boot/vmlinuz-$KVER"
[ -f "$src" ] || die "$KPKG has no /boot/vmlinuz-$KVER"
if ! cmp -s "$src" "$KERNEL"; then
	cp "$src" "$KERNEL.tmp"
	mv "$KERNEL.tmp" "$KERNEL"
fi

fields=$(py bzimage-info "$KERNEL" --field compression,tool) || die "cannot read the bzImage header of $KERNEL"
read -r COMPRESSION tool <<<"$fields"
case $tool in
-) ;;
lz4) ensure_tool lz4 lz4 ;;
zstd) ensure_tool zstd zstd ;;
lzop) ensure_tool lzop lzop ;;
*) die "no package known for the decompressor '$tool'" ;;
esac
VMLINUX="$CACHE/vmlinux-$KVER"
[ "$FORCE" = 0 ] || rm -f "$VMLINUX.inputs"
vmlinux_json=$(py vmlinux "$KERNEL" --out "$VMLINUX") || die "could not decompress $KERNEL"

# ---- initramfs -------------------------------------------------------------

INITRD="$CACHE/initramfs-$KVER.cpio"
force=() lib_roots=()
[ "$FORCE" = 0 ] || force=(--force)
for p in "${E2FS_LIBS[@]}"; do lib_roots+=(--lib-root "${TREE[$p]}"); done
initrd_json=$(py build-initramfs \
	--kernel-root "${TREE[$KPKG]}" --kernel-version "$KVER" \
	--busybox-root "${TREE[busybox-static]}" --hyperv-root "${TREE[hyperv-daemons]}" \
	--libc-root "${TREE[libc6]}" --e2fsprogs-root "${TREE[e2fsprogs]}" "${lib_roots[@]}" \
	--overlay "$HERE/rootfs" --depmod "$(command -v depmod)" \
	--out "$INITRD" "${force[@]}") || die "building $INITRD failed"
check_out=$(python3 -B "$HERE/check-initramfs.py" "$INITRD" --kernel-version "$KVER" --vmlinux "$VMLINUX" 2>&1) ||
	die "the new initramfs fails its check:"$'\n'"$check_out"

# ---- assets.env + summary ----------------------------------------------------

envq() { # shell-safe KEY=value: bare when plain, else single-quoted
	if [[ $2 =~ ^[A-Za-z0-9_./:+@%=,-]*$ ]]; then
		printf '%s=%s\n' "$1" "$2"
	else
		printf "%s='%s'\n" "$1" "${2//\'/\'\\\'\'}"
	fi
}
ASSETS="$CACHE/assets.env"
{
	echo "# Written by guests/linux/fetch-assets.sh; source it or parse KEY=value lines."
	envq KERNEL "$KERNEL"
	envq VMLINUX "$VMLINUX"
	envq INITRD "$INITRD"
	envq KERNEL_VERSION "$KVER"
	envq KERNEL_PACKAGE "$KPKG"
	envq KERNEL_PACKAGE_VERSION "${VER[$KPKG]}"
	envq KERNEL_COMPRESSION "$COMPRESSION"
} >"$ASSETS.tmp"
mv "$ASSETS.tmp" "$ASSETS"

# Outputs and packages of other versions are stale once assets.env moved on.
for f in "$CACHE"/vmlinuz-* "$CACHE"/vmlinux-* "$CACHE"/initramfs-*.cpio* "$CACHE"/debs/*.deb; do
	[ -e "$f" ] || continue
	case ${f##*/} in
	vmlinuz-"$KVER" | vmlinux-"$KVER" | vmlinux-"$KVER".inputs) continue ;;
	initramfs-"$KVER".cpio | initramfs-"$KVER".cpio.inputs) continue ;;
	esac
	keep=0
	for p in "${PKGS[@]}"; do [ "$f" != "$(deb_file "$p" "${VER[$p]}")" ] || keep=1; done
	[ "$keep" = 1 ] || rm -f "$f"
done

summary=$(
	VJ=$vmlinux_json IJ=$initrd_json python3 -B - <<'EOF'
import json, os
v = json.loads(os.environ["VJ"]); i = json.loads(os.environ["IJ"])
print(f"vmlinux {v['status']}, payload at file offset {v['payload_file_offset']:#x} ({v['payload_length']} bytes), "
      f"ELF {v['elf_size']} bytes")
size = os.path.getsize(i["out"])
extra = f", {len(i['modules'])} module files" if "modules" in i else ""
print(f"initramfs {i['status']}, {size} bytes ({size / 2**20:.1f} MiB){extra}")
EOF
)
echo "verdigris linux guest assets in $CACHE"
echo "  packages: $KPKG ${VER[$KPKG]} (from $META $META_VER), busybox-static ${VER[busybox-static]}, hyperv-daemons ${VER[hyperv-daemons]}, libc6 ${VER[libc6]}"
libs=""
for p in "${E2FS_LIBS[@]}"; do libs+="${libs:+, }$p ${VER[$p]}"; done
echo "  e2fsprogs ${VER[e2fsprogs]} with $libs"
[ "${#DOWNLOADED[@]}" = 0 ] || echo "  downloaded: ${DOWNLOADED[*]}"
[ "${#INSTALLED[@]}" = 0 ] || echo "  installed host tools: ${INSTALLED[*]}"
echo "  kernel compression: $COMPRESSION; ${summary%%$'\n'*}"
echo "  ${summary#*$'\n'}"
echo "  $check_out"
echo "  KERNEL=$KERNEL"
echo "  VMLINUX=$VMLINUX"
echo "  INITRD=$INITRD"
echo "  KERNEL_VERSION=$KVER"
echo "  assets: $ASSETS"
