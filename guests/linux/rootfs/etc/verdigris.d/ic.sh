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
