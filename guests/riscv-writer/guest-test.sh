# Guest test run by /init (busybox sh) in the live-operations initramfs: runs lvwriter on
# /dev/vda until the host types 'q' on the console. Kernel command line parameters:
#   WBLOCKS  at most this many blocks (default 0: the whole disk)
#   WSYNC    fdatasync every this many blocks (default 32; 0 never)
echo "guest: writer starting"
/bin/lvwriter /dev/vda "${WBLOCKS:-0}" "${WSYNC:-32}"
echo "guest: writer exit $?"
