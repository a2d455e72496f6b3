# The second boot of the stock-Linux test (crates/vmms/tests/stock_linux.rs): the host
# restarted the VM, this time without integration services. The ext4 filesystem the first boot
# made on the read-write disk must be clean, and its files byte-exact, after the VHDX was closed
# and opened again by a new worker.
echo "verdigris-guest: second boot uname=$(uname -r)"
. /etc/verdigris.d/devices.sh
RW=
if [ -n "$SCSI" ]; then
	. /etc/verdigris.d/disks.sh
fi
if [ -n "$RW" ]; then
	if e2fsck -fn "$RW" >/dev/null 2>&1; then
		echo "verdigris-guest: fsck clean"
	else
		echo "verdigris-guest: fsck found problems (exit $?)"
	fi
	if mount -t ext4 -o ro "$RW" /mnt; then
		report_md5 second-boot
		umount /mnt && echo "verdigris-guest: read back after reboot"
	else
		echo "verdigris-guest: second boot FAILED to mount ext4"
	fi
fi
