# Guest test with two disks: vda writable, vdb read-only with a serial. Prints what Linux
# sees (size, read-only flag, serial from VIRTIO_BLK_T_GET_ID), then checks that writes to
# vdb fail and vdb's content (a pattern the host wrote) reads back.
for d in vda vdb; do
    echo "guest: $d size=$(cat /sys/block/$d/size) ro=$(cat /sys/block/$d/ro) serial=$(cat /sys/block/$d/serial 2>/dev/null)"
done
if dd if=/dev/zero of=/dev/vdb bs=4k count=1 conv=fsync 2>/dev/null; then echo "guest: vdb write succeeded"; else echo "guest: vdb write refused"; fi
echo "guest: vdb md5 $(dd if=/dev/vdb bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "guest: discard $(blkdiscard /dev/vda 2>&1 && echo ok)"
