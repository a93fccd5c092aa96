#!/usr/bin/env bash
# Times `img convert` against `qemu-img convert` on one 1 GiB source: half random data,
# a quarter written zeros, a quarter holes (interleaved in 64 MiB stripes), for
#   raw -> qcow2, qcow2 -> raw, qcow2 -> qcow2 -c (zlib, zstd), a backing chain flattened,
# plus `cp --sparse=always` for the raw copy. Prints a table with the ratios.
#
#   BIN=<dir with img> bash benchmarks/img-convert.sh     (make bench sets BIN)
# Environment: SIZE_MB (default 1024), RUNS (best of, default 3), WORK (scratch directory).
set -euo pipefail
BIN="${BIN:-$(swift build -c release --show-bin-path 2>/dev/null)}"
IMG="$(cd "$BIN" && pwd)/img"
[ -x "$IMG" ] || { echo "img not found in $BIN (build with: swift build -c release)"; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img not installed; benchmark skipped"; exit 0; }
SIZE_MB="${SIZE_MB:-1024}"
RUNS="${RUNS:-3}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/img-convert-bench.XXXXXX")}"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# The source: stripes of 64 MiB (or SIZE_MB/16): data, data, zeros, hole, repeated.
stripe=$((SIZE_MB / 16)); [ "$stripe" -ge 1 ] || stripe=1
truncate -s "${SIZE_MB}M" src.raw
i=0
while [ $((i * stripe)) -lt "$SIZE_MB" ]; do
    case $((i % 4)) in
        0|1) head -c "${stripe}M" /dev/urandom | dd of=src.raw bs=1M seek=$((i * stripe)) conv=notrunc status=none ;;
        2) dd if=/dev/zero of=src.raw bs=1M seek=$((i * stripe)) count="$stripe" conv=notrunc status=none ;;
        3) ;;
    esac
    i=$((i + 1))
done
qemu-img convert -O qcow2 src.raw src.qcow2
# A chain: the qcow2 copy of the source as base, and an overlay that rewrites every
# fourth stripe with a pattern and zeroes part of another.
qemu-img create -q -f qcow2 -b src.qcow2 -F qcow2 top.qcow2
i=0
while [ $((i * stripe)) -lt "$SIZE_MB" ]; do
    [ $((i % 4)) = 1 ] && qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) $((i * stripe))M ${stripe}M" top.qcow2 >/dev/null
    [ $((i % 8)) = 0 ] && qemu-io -f qcow2 -c "write -z $((i * stripe))M $(( (stripe + 1) / 2 ))M" top.qcow2 >/dev/null
    i=$((i + 1))
done
sync

best() { # best wall time of RUNS runs of the command, in seconds
    local b=""
    for _ in $(seq "$RUNS"); do
        rm -f out.*
        # Write back the previous run's output first, so that neither tool pays for it.
        sync
        local s e
        s=$(date +%s.%N)
        "$@" >/dev/null 2>err.txt || { echo "failed: $* ($(cat err.txt))" >&2; exit 1; }
        e=$(date +%s.%N)
        b=$(echo "$s $e ${b:-}" | awk '{t=$2-$1; if ($3 == "" || t < $3) print t; else print $3}')
    done
    echo "$b"
}

printf "%-28s %10s %12s %12s %8s\n" "case (${SIZE_MB} MiB source)" "img (s)" "qemu-img (s)" "cp (s)" "ratio"
row() { # name, then img args (qemu-img gets the same)
    local name=$1; shift
    local a q
    a=$(best "$IMG" convert "$@")
    q=$(best qemu-img convert "$@")
    printf "%-28s %10.3f %12.3f %12s %7.2fx\n" "$name" "$a" "$q" "-" "$(echo "$a $q" | awk '{print $2/$1}')"
}
a=$(best "$IMG" convert -O raw src.raw out.raw)
q=$(best qemu-img convert -O raw src.raw out.raw)
c=$(best cp --sparse=always src.raw out.raw)
printf "%-28s %10.3f %12.3f %12.3f %7.2fx\n" "raw -> raw" "$a" "$q" "$c" "$(echo "$a $q" | awk '{print $2/$1}')"
row "raw -> qcow2" -O qcow2 src.raw out.qcow2
row "qcow2 -> raw" -O raw src.qcow2 out.raw
row "qcow2 -> qcow2" -O qcow2 src.qcow2 out.qcow2
row "qcow2 -> qcow2 -c zlib" -c -O qcow2 -o compression_type=zlib src.qcow2 out.qcow2
row "qcow2 -> qcow2 -c zstd" -c -O qcow2 -o compression_type=zstd src.qcow2 out.qcow2
row "chain -> qcow2 (flatten)" -O qcow2 top.qcow2 out.qcow2
echo "ratio = qemu-img time / img time (higher is better for img); $(nproc) cores; best of $RUNS"
