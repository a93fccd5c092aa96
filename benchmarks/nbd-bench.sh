#!/usr/bin/env bash
# Compares our `nbd` server with qemu-nbd on the same 1 GiB qcow2 (half data, half
# holes and zeros):
#   1. nbdcopy of the whole export to /dev/null (sparse reads: holes are not sent);
#   2. 4 KiB random reads at queue depth 32 with fio's nbd engine, if fio has it.
# Usage: BIN=<dir holding nbd> bash benchmarks/nbd-bench.sh   (make bench sets BIN)
set -euo pipefail

BIN="${BIN:-$(swift build -c release --show-bin-path 2>/dev/null || echo .build/release)}"
NBD="$BIN/nbd"
RUNS="${RUNS:-3}"
FIO_SECONDS="${FIO_SECONDS:-10}"
for t in "$NBD" qemu-nbd qemu-img qemu-io nbdcopy; do
    command -v "$t" >/dev/null || { echo "nbd-bench: $t not found (make deps; swift build -c release)"; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/nbd-bench.XXXXXX")"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

IMG="$WORK/disk.qcow2"
SOCK="$WORK/nbd.sock"
# Data in the first 512 MiB (random bytes, so nothing compresses or reads as zeros);
# the second half: 256 MiB of zero clusters and 256 MiB never written.
head -c $((512 << 20)) /dev/urandom > "$WORK/data.raw"
truncate -s 1G "$WORK/data.raw"
qemu-img convert -f raw -O qcow2 "$WORK/data.raw" "$IMG"
rm -f "$WORK/data.raw"
qemu-io -f qcow2 -c "write -z 512M 256M" "$IMG" >/dev/null

start_server() {  # $1: nbd | qemu-nbd
    rm -f "$SOCK"
    if [ "$1" = nbd ]; then "$NBD" -t -r -e 8 -f qcow2 -k "$SOCK" "$IMG" & else qemu-nbd -t -r -e 8 -f qcow2 -k "$SOCK" "$IMG" & fi
    SERVER_PID=$!
    for _ in $(seq 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
    sleep 0.1
}
stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

now() { date +%s.%N; }

copy_time() {  # best of $RUNS, seconds
    local best=""
    for _ in $(seq "$RUNS"); do
        local t0 t1 d
        t0=$(now)
        nbdcopy "nbd+unix:///?socket=$SOCK" null:
        t1=$(now)
        d=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
        if [ -z "$best" ] || awk -v d="$d" -v b="$best" 'BEGIN { exit !(d < b) }'; then best=$d; fi
    done
    printf '%.3f' "$best"
}

have_fio_nbd=0
if command -v fio >/dev/null && fio --enghelp 2>/dev/null | grep -qw nbd; then have_fio_nbd=1; fi

fio_iops() {
    fio --name=randread --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=randread --bs=4k --iodepth=32 \
        --size=1G --time_based --runtime="$FIO_SECONDS" --numjobs=1 --output-format=terse --terse-version=3 2>/dev/null \
        | awk -F';' 'NF > 8 { v = $8 } END { print v }'
}

declare -A COPY IOPS
for s in nbd qemu-nbd; do
    start_server "$s"
    COPY[$s]=$(copy_time)
    if [ $have_fio_nbd = 1 ]; then IOPS[$s]=$(fio_iops); else IOPS[$s]="n/a"; fi
    stop_server
done

echo
echo "nbd vs qemu-nbd on a 1 GiB qcow2 (512 MiB data, 256 MiB zero clusters, 256 MiB unallocated), read-only, Unix socket"
printf '%-44s %14s %14s %10s\n' "test" "nbd" "qemu-nbd" "ratio"
ratio=$(awk -v a="${COPY[nbd]}" -v b="${COPY[qemu-nbd]}" 'BEGIN { print a / b }')
printf '%-44s %13ss %13ss %9.2fx\n' "nbdcopy export -> null: (best of $RUNS)" "${COPY[nbd]}" "${COPY[qemu-nbd]}" "$ratio"
if [ $have_fio_nbd = 1 ]; then
    ratio=$(awk -v a="${IOPS[nbd]}" -v b="${IOPS[qemu-nbd]}" 'BEGIN { print (b > 0 ? a / b : 0) }')
    printf '%-44s %14s %14s %9.2fx\n' "fio nbd 4k randread QD32, IOPS (${FIO_SECONDS}s)" "${IOPS[nbd]}" "${IOPS[qemu-nbd]}" "$ratio"
else
    echo "fio with the nbd engine is not available: random-read test skipped (apt-get install fio)"
fi
echo "(time ratio: lower is better for nbd; IOPS ratio: higher is better)"
