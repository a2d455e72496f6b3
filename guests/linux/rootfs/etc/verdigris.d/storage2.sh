# Second boot of the storage test: the files the first boot wrote read back byte-exact (the
# host compares these checksums with the first boot's).
. /etc/verdigris.d/disks.sh
if [ -n "$RW" ] && mount -t ext4 "$RW" /mnt; then
	for f in numbers random dir/note; do
		echo "verdigris-guest: md5 $(md5sum </mnt/$f | cut -d' ' -f1) $f"
	done
	umount /mnt
	echo "verdigris-guest: storage read back"
else
	echo "verdigris-guest: storage FAILED to mount"
fi
