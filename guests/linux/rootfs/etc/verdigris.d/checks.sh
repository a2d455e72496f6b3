# The stock-Linux check shared by the host's tests (one boot serves them all; see
# crates/vmms/tests/stock_linux.rs; readback.sh is its second boot). In order:
#  1. smoke: kernel release and processor count;
#  2. the VMBus devices the host offers (class GUIDs);
#  3. storage, when the host attached a 64 MiB read-write disk and a 16 MiB read-only one:
#     ext4 made on the read-write LUN through hv_storvsc, files written, the page cache
#     dropped, the files read back; the read-only LUN reads the host's bytes and refuses a write;
#  4. the clock set back so the host's time sync has something to correct;
#  5. until the host shuts the guest down: the year and the KVP pool the host writes.
echo "verdigris-guest: smoke uname=$(uname -r) cpus=$(nproc)"
. /etc/verdigris.d/devices.sh

RW=
RO=
if [ -n "$SCSI" ]; then
	. /etc/verdigris.d/disks.sh
fi
if [ -n "$RW" ]; then
	# The disk is a new dynamic VHDX, which reads zeros where nothing was written: mkfs need
	# not zero the inode tables and the journal, nor discard (each costs emulated ring-0 time
	# here), and the kernel need not zero the tables in the background either.
	if mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$RW" &&
		mount -t ext4 -o noinit_itable "$RW" /mnt; then
		seq 1 20000 >/mnt/numbers
		dd if=/dev/urandom of=/mnt/random bs=65536 count=4 2>/dev/null
		mkdir -p /mnt/dir && echo "verdigris marker: written by the guest through hv_storvsc" >/mnt/dir/note
		report_md5 md5
		sync
		umount /mnt && echo "verdigris-guest: storage written"
		echo 3 >/proc/sys/vm/drop_caches
		if mount -t ext4 -o ro "$RW" /mnt; then
			report_md5 reread
			umount /mnt && echo "verdigris-guest: storage read back"
		fi
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

# The SCSI controller's VMBus channels: the primary plus the sub-channels storvsc opened.
if [ -n "$SCSI" ]; then
	set -- "$SCSI"/channels/*
	echo "verdigris-guest: scsi channels $#"
fi

# Prints pool N's items as hv_kvp_daemon stores them: records of a 512-byte key and a
# 2048-byte value, each NUL-terminated (the bytes after the NUL are not cleared).
kvp_pool() {
	f=/var/lib/hyperv/.kvp_pool_$1
	[ -f "$f" ] || return 0
	size=$(wc -c <"$f")
	n=$((size / 2560))
	i=0
	while [ $i -lt $n ]; do
		k=$(dd if="$f" bs=2560 skip=$i count=1 2>/dev/null | head -c 512 | tr '\000' '\n' | head -n 1)
		v=$(dd if="$f" bs=2560 skip=$i count=1 2>/dev/null | tail -c 2048 | tr '\000' '\n' | head -n 1)
		echo "verdigris-guest: kvp$1 item $k=$v"
		i=$((i + 1))
	done
}

date -s "2001-01-01 00:00:00" >/dev/null 2>&1
echo "verdigris-guest: clock set back to $(date +%Y)"
echo "verdigris-guest: ready for the host"
i=0
while [ $i -lt 1000 ]; do
	sleep 2
	echo "verdigris-guest: year $(date +%Y)"
	kvp_pool 0
	i=$((i + 1))
done
