# Integration services check (the host test drives it through the worker's control socket).
# Lists the VMBus devices the host offers, sets the clock back so the host's time sync has
# something to correct, then reports the year and the KVP pool the host writes, until the
# host shuts the guest down.
echo "verdigris-guest: smoke uname=$(uname -r) cpus=$(nproc)"
for d in /sys/bus/vmbus/devices/*; do
	[ -e "$d/class_id" ] || continue
	read -r c <"$d/class_id"
	echo "verdigris-guest: vmbus device $c"
done
# Storage (when the host attached disks): ext4 on the read-write LUN, files written and
# checksummed, then unmounted; the read-only LUN must refuse a write.
. /etc/verdigris.d/disks.sh
if [ -n "$RW" ]; then
	if mkfs.ext4 -q -F "$RW" && mount -t ext4 "$RW" /mnt; then
		seq 1 20000 >/mnt/numbers
		dd if=/dev/urandom of=/mnt/random bs=65536 count=16 2>/dev/null
		mkdir -p /mnt/dir && echo "written by the first boot" >/mnt/dir/note
		for f in numbers random dir/note; do
			echo "verdigris-guest: md5 $(md5sum </mnt/$f | cut -d' ' -f1) $f"
		done
		sync
		umount /mnt && echo "verdigris-guest: storage written"
	else
		echo "verdigris-guest: storage FAILED to make or mount ext4"
	fi
fi
if [ -n "$RO" ]; then
	echo "verdigris-guest: ro md5 $(head -c 1048576 "$RO" | md5sum | cut -d' ' -f1)"
	if dd if=/dev/zero of="$RO" bs=4096 count=1 conv=fsync 2>/dev/null; then
		echo "verdigris-guest: ro write ACCEPTED"
	else
		echo "verdigris-guest: ro write refused"
	fi
fi
date -s "2001-01-01 00:00:00" >/dev/null 2>&1
echo "verdigris-guest: clock set back to $(date +%Y)"
echo "verdigris-guest: ic ready"
i=0
while [ $i -lt 1000 ]; do
	sleep 2
	echo "verdigris-guest: year $(date +%Y)"
	if [ -f /var/lib/hyperv/.kvp_pool_0 ]; then
		echo "verdigris-guest: kvp0 $(tr -s '\000' ' ' </var/lib/hyperv/.kvp_pool_0)"
	fi
	i=$((i + 1))
done
