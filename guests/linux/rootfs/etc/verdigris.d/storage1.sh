# First boot of the storage test: ext4 made on the read-write LUN, files written and
# checksummed, then unmounted; the read-only LUN must read back the host's bytes and refuse a
# write. The guest then powers off (the host checks the image and boots again: storage2).
echo "verdigris-guest: smoke uname=$(uname -r) cpus=$(nproc)"
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
