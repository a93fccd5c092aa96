#!/usr/bin/env bash
# Boot-to-power-off wall time and guest dd throughput on virtio-blk: QMachine's `vm`
# against qemu-system-riscv64 (-M virt -accel tcg -smp 1 -m 512M), same kernel, same
# initramfs, same raw disk size, in one run. Best of $RUNS (default 3) for each.
#   BIN=<dir with vm> bash benchmarks/vm-boot.sh      (make bench sets BIN to the release build)
# The guest writes COUNT MiB (default 32) with dd conv=fsync, drops caches and reads it back.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
RUNS="${RUNS:-3}"
COUNT="${COUNT:-32}"
BIN="${BIN:-$repo/.build/release}"
VM="$BIN/vm"
[ -x "$VM" ] || { echo "vm-boot: $VM not built (swift build -c release --product vm)"; exit 1; }

if ! command -v qemu-system-riscv64 >/dev/null; then
    echo "vm-boot: installing qemu-system-misc"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-system-misc >/dev/null
fi

set +e
out="$(bash "$repo/scripts/guest/build-guest.sh" --test "$repo/scripts/guest/tests/disk-pattern.sh")"; rc=$?
set -e
if [ $rc = 2 ]; then echo "vm-boot: guest cannot be downloaded; skipped"; exit 0; fi
[ $rc = 0 ] || exit $rc
eval "$out"   # KERNEL=, INITRD=

work="$(mktemp -d /tmp/vm-boot.XXXXXX)"
trap 'rm -rf "$work"' EXIT
append="console=ttyS0 cryptomgr.notests PATTERN=171 SEEK=0 COUNT=$COUNT"

now() { date +%s.%N; }
# run NAME CMD... : prints "seconds write_MiBps read_MiBps"
measure() {
    local log="$work/$1.log"; shift
    truncate -s 0 "$work/disk.raw"; truncate -s 256M "$work/disk.raw"
    local t0 t1
    t0=$(now)
    timeout 900 "$@" > "$log" 2>&1 < /dev/null || { echo "vm-boot: $1 failed:"; tail -20 "$log"; exit 1; }
    t1=$(now)
    grep -q "guest: test exit 0" "$log" || { echo "vm-boot: guest test failed:"; tail -20 "$log"; exit 1; }
    local p b w r
    p=$(sed -n 's/^guest: pattern md5 \([0-9a-f]*\).*/\1/p' "$log"); b=$(sed -n 's/^guest: readback md5 \([0-9a-f]*\).*/\1/p' "$log")
    [ -n "$p" ] && [ "$p" = "$b" ] || { echo "vm-boot: checksum mismatch"; exit 1; }
    w=$(sed -n 's/^guest: dd write .*(\([0-9.]*\) MiB\/s).*/\1/p' "$log")
    r=$(sed -n 's/^guest: dd read .*(\([0-9.]*\) MiB\/s).*/\1/p' "$log")
    echo "$(echo "$t1 - $t0" | bc -l) $w $r"
}

best() { # kind: collects RUNS measurements, prints best time and best throughputs
    local kind="$1"; shift
    local bt=999999 bw=0 br=0 t w r
    for i in $(seq "$RUNS"); do
        read -r t w r < <(measure "$kind" "$@")
        echo "  $kind run $i: ${t%????} s, write $w MiB/s, read $r MiB/s" >&2
        bt=$(echo "if ($t < $bt) $t else $bt" | bc -l)
        bw=$(echo "if ($w > $bw) $w else $bw" | bc -l)
        br=$(echo "if ($r > $br) $r else $br" | bc -l)
    done
    echo "$bt $bw $br"
}

command -v bc >/dev/null || { SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo; $SUDO apt-get install -y -qq bc >/dev/null; }

echo "kernel: $(basename "$KERNEL"); initramfs: $(basename "$INITRD"); dd $COUNT MiB; best of $RUNS"
read -r vt vw vr < <(best vm "$VM" --machine riscv64-virt --kernel "$KERNEL" --initrd "$INITRD" --memory 512M \
    --append "$append" --drive "file=$work/disk.raw,format=raw")
read -r qt qw qr < <(best qemu qemu-system-riscv64 -M virt -accel tcg -smp 1 -m 512M -nographic -no-reboot \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$append" \
    -drive "file=$work/disk.raw,format=raw,if=none,id=d0" -device virtio-blk-device,drive=d0)

printf "\n%-28s %12s %12s %12s\n" "" "vm" "qemu (tcg)" "ratio"
printf '%-28s %12.2f %12.2f %12.2f\n' "boot to power-off (s)" "$vt" "$qt" "$(echo "$qt / $vt" | bc -l)"
printf '%-28s %12.1f %12.1f %12.2f\n' "guest dd write (MiB/s)" "$vw" "$qw" "$(echo "$vw / $qw" | bc -l)"
printf '%-28s %12.1f %12.1f %12.2f\n' "guest dd read (MiB/s)" "$vr" "$qr" "$(echo "$vr / $qr" | bc -l)"
echo "ratio: qemu time / vm time for the boot, vm / qemu for throughput; above 1 means vm is faster"
