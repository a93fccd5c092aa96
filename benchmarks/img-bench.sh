#!/usr/bin/env bash
# img bench vs qemu-img bench, side by side on the same files in one run.
# 4 KiB requests at depth 32; the step is a large prime number of blocks, so that with the
# offset wrapping at the end of the image successive requests land far apart (a scattered,
# "random" pattern that both tools produce identically).
# Usage: BIN=<dir with img> benchmarks/img-bench.sh   (make bench sets BIN)
set -euo pipefail
BIN="${BIN:-$(swift build -c release --show-bin-path)}"
IMG="$BIN/img"
command -v qemu-img >/dev/null || { echo "qemu-img not installed (make deps)"; exit 1; }
DIR="$(mktemp -d "${TMPDIR:-/var/tmp}/qblock-bench.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT
SIZE=1G
STEP=$((4096 * 104729))
READS=${READS:-200000}
WRITES=${WRITES:-50000}
DIRECT_READS=${DIRECT_READS:-30000}

seconds() { grep -o 'Run completed in [0-9.]*' | awk '{print $4}'; }

prepare_full() { # fmt file
    qemu-img create -q -f "$1" "$2" $SIZE
    qemu-io -f "$1" -c "write -P 0x5a 0 $SIZE" "$2" >/dev/null
}

row() { # label count ours_seconds qemu_seconds
    awk -v l="$1" -v c="$2" -v a="$3" -v b="$4" 'BEGIN {
        printf "| %-34s | %9.0f | %9.0f | %5.2f |\n", l, c / a, c / b, b / a }'
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(qemu-img --version | head -1)"
echo
echo "| workload (4 KiB, depth 32)         |  img IOPS | qemu IOPS | ratio |"
echo "|------------------------------------|-----------|-----------|-------|"
for fmt in qcow2 raw; do
    f="$DIR/full.$fmt"
    prepare_full $fmt "$f"
    for cache in writeback none; do
        n=$READS; [ $cache = none ] && n=$DIRECT_READS
        # Warm the page cache equally for both, then alternate runs.
        cat "$f" >/dev/null
        a=$("$IMG" bench -f $fmt -t $cache -c $n -d 32 -s 4k -S $STEP "$f" | seconds)
        b=$(qemu-img bench -f $fmt -t $cache -c $n -d 32 -s 4k -S $STEP "$f" | seconds)
        row "$fmt read, -t $cache" $n $a $b
    done
    for cache in writeback none; do
        n=$WRITES
        for tool in img qemu; do
            w="$DIR/w-$tool.$fmt"; rm -f "$w"; qemu-img create -q -f $fmt "$w" $SIZE
        done
        a=$("$IMG" bench -w -f $fmt -t $cache -c $n -d 32 -s 4k -S $STEP "$DIR/w-img.$fmt" | seconds)
        b=$(qemu-img bench -w -f $fmt -t $cache -c $n -d 32 -s 4k -S $STEP "$DIR/w-qemu.$fmt" | seconds)
        row "$fmt allocating write, -t $cache" $n $a $b
        if [ $fmt = qcow2 ]; then qemu-img check -q "$DIR/w-img.$fmt"; fi
    done
    rm -f "$f"
done
echo
echo "ratio = img IOPS / qemu-img IOPS (above 1: img is faster)"
