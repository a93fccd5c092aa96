#!/usr/bin/env bash
# Times `img convert` against `qemu-img convert` on one 1 GiB source: half random data,
# a quarter written zeros, a quarter holes (interleaved in 64 MiB stripes), for
#   raw -> qcow2, qcow2 -> raw, qcow2 -> qcow2 -c (zlib, zstd), a backing chain flattened,
# plus `cp --sparse=always` for the raw copy. Prints a table with the ratios.
#
#   BIN=<dir with img> bash benchmarks/img-convert.sh     (make bench sets BIN)
# Environment: SIZE_MB (default 1024), RUNS (runs of each tool, alternating; default 9), CRUNS
# (the same for the compressed cases; default 3), WORK (scratch directory).
set -euo pipefail
BIN="${BIN:-$(swift build -c release --show-bin-path 2>/dev/null)}"
IMG="$(cd "$BIN" && pwd)/img"
[ -x "$IMG" ] || { echo "img not found in $BIN (build with: swift build -c release)"; exit 1; }
command -v qemu-img >/dev/null || { echo "qemu-img not installed; benchmark skipped"; exit 0; }
SIZE_MB="${SIZE_MB:-1024}"
RUNS="${RUNS:-9}"
CRUNS="${CRUNS:-3}"   # the compressed cases take seconds per run
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

once() { # wall time of one run of the command, in seconds
    rm -f out.*
    # Write back the previous run's output first, so that no run pays for another's.
    sync
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null 2>err.txt || { echo "failed: $* ($(cat err.txt))" >&2; exit 1; }
    e=$(date +%s.%N)
    echo "$s $e" | awk '{print $2 - $1}'
}
median() { tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
least() { tr ' ' '\n' | sed '/^$/d' | sort -g | head -1; }

printf "%-26s %9s %9s %11s %9s %9s %7s\n" "case (${SIZE_MB} MiB source)" "img" "qemu-img" "cp (best)" "img best" "qemu best" "ratio"
row() { # name, then convert's arguments (the same for both tools); the runs alternate
    local name=$1; shift
    local a="" q="" c="" cpcol="-" runs=$RUNS
    case "$name" in *" -c "*) runs=$CRUNS ;; esac
    for _ in $(seq "$runs"); do
        a="$a $(once "$IMG" convert "$@")"
        q="$q $(once qemu-img convert "$@")"
        [ "$name" = "raw -> raw" ] && c="$c $(once cp --sparse=always src.raw out.raw)"
    done
    local ma mq
    ma=$(echo "$a" | median); mq=$(echo "$q" | median)
    [ -n "$c" ] && cpcol=$(printf "%.3f/%.3f" "$(echo "$c" | median)" "$(echo "$c" | least)")
    printf "%-26s %9.3f %9.3f %11s %9.3f %9.3f %6.2fx\n" "$name" "$ma" "$mq" "$cpcol" \
        "$(echo "$a" | least)" "$(echo "$q" | least)" "$(echo "$ma $mq" | awk '{print $2/$1}')"
}
row "raw -> raw" -O raw src.raw out.raw
row "raw -> qcow2" -O qcow2 src.raw out.qcow2
row "qcow2 -> raw" -O raw src.qcow2 out.raw
row "qcow2 -> qcow2" -O qcow2 src.qcow2 out.qcow2
row "qcow2 -> qcow2 -c zlib" -c -O qcow2 -o compression_type=zlib src.qcow2 out.qcow2
row "qcow2 -> qcow2 -c zstd" -c -O qcow2 -o compression_type=zstd src.qcow2 out.qcow2
row "chain -> qcow2 (flatten)" -O qcow2 top.qcow2 out.qcow2
echo "seconds, median of $RUNS alternating runs ($CRUNS compressed; best in the next columns);"
echo "ratio = qemu-img median / img median"
echo "(higher is better for img); $(nproc) cores"
