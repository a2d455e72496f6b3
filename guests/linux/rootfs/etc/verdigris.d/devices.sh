# Shared by the check scripts: lists the VMBus devices the host offered (one line each, by
# class GUID) and sets SCSI to the synthetic SCSI controller's sysfs directory, if offered.
SCSI=
for d in /sys/bus/vmbus/devices/*; do
	[ -e "$d/class_id" ] || continue
	read -r c <"$d/class_id"
	echo "verdigris-guest: vmbus device $c"
	if [ "$c" = "{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}" ]; then
		SCSI=$d
	fi
done
