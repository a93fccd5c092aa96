# Guest test run by /init (busybox sh): writes a byte pattern to /dev/vda with dd
# conv=fsync, drops the page cache, reads it back and prints both checksums.
# Parameters come from the kernel command line (init's environment):
#   PATTERN  byte value, decimal (default 171 = 0xab)
#   SEEK     offset on the disk in MiB (default 0)
#   COUNT    MiB to write (default 4)
P=${PATTERN:-171}; SEEK_MB=${SEEK:-0}; N=${COUNT:-4}
oct=$(printf '%03o' "$P")
dd if=/dev/zero bs=1M count="$N" 2>/dev/null | tr '\000' "\\$oct" > /tmp/pattern
echo "guest: pattern md5 $(md5sum < /tmp/pattern | cut -d' ' -f1)"
up() { cut -d' ' -f1 /proc/uptime; }
t0=$(up)
dd if=/tmp/pattern of=/dev/vda bs=1M seek="$SEEK_MB" conv=fsync 2>/dev/null || echo "guest: write failed"
t1=$(up)
echo 3 > /proc/sys/vm/drop_caches
t2=$(up)
dd if=/dev/vda of=/tmp/back bs=1M skip="$SEEK_MB" count="$N" 2>/dev/null || echo "guest: read failed"
t3=$(up)
awk -v n="$N" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN {
    printf "guest: dd write %d MiB in %.2f s (%.1f MiB/s)\n", n, b - a, (b > a) ? n / (b - a) : 0
    printf "guest: dd read %d MiB in %.2f s (%.1f MiB/s)\n", n, d - c, (d > c) ? n / (d - c) : 0 }'
echo "guest: readback md5 $(md5sum < /tmp/back | cut -d' ' -f1)"
