# Shared by the storage scripts: finds the SCSI disks by size (the host test attaches a
# 64 MiB read-write disk and a 16 MiB read-only one) and sets RW and RO to their devices.
RW=
RO=
n=0
while [ $n -lt 60 ]; do
	for b in /sys/block/sd*; do
		[ -e "$b/size" ] || continue
		read -r sectors <"$b/size"
		case $sectors in
		131072) RW=/dev/${b##*/} ;;
		32768) RO=/dev/${b##*/} ;;
		esac
	done
	[ -n "$RW" ] && [ -n "$RO" ] && break
	sleep 1
	n=$((n + 1))
done
echo "verdigris-guest: disks rw=${RW:-none} ro=${RO:-none}"

# The files checks.sh writes on the read-write disk, and a line per file with its MD5 sum
# under /mnt, tagged $1 ("verdigris-guest: TAG SUM FILE"; the host compares them).
FILES="numbers random dir/note"
report_md5() {
	for f in $FILES; do
		echo "verdigris-guest: $1 $(md5sum </mnt/$f | cut -d' ' -f1) $f"
	done
}
