#!/usr/bin/env bash
# Longest pause a writer sees during a live snapshot: `nbd --qmp` (ours) against
# qemu-storage-daemon, driven by the same QMP commands (Tests/Scripts/python/snapshot_pause.py:
# an NBD client writes 4 KiB blocks back to back through a writable export while
# blockdev-snapshot-sync runs; per snapshot, the longest write overlapping the command).
# Prints the median over ROUNDS snapshots of each, and the ratio ours/QEMU.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$(cd "$ROOT" && swift build -c release --show-bin-path)}"
ROUNDS="${ROUNDS:-7}"
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing; skipped"; exit 0; }
python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp || { echo "qemu.qmp missing; skipped"; exit 0; }
[ -x "$BIN/nbd" ] || { echo "build nbd first (make release)"; exit 1; }

run() {  # run TAG COMMAND...
    local tag=$1; shift
    local dir; dir=$(mktemp -d "/tmp/snap-pause-$tag.XXXXXX")
    qemu-img create -q -f qcow2 "$dir/base.qcow2" 64M
    local sock="$dir/qmp.sock"
    "$@" "$sock" >"$dir/daemon.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    python3 "$ROOT/Tests/Scripts/python/snapshot_pause.py" "$sock" "$dir" "$ROUNDS"
    wait "$pid" 2>/dev/null || true
    # Ours also reports how long writers were actually held (the drained section).
    awk '/^transaction:/ { held = ($3 + $7 + $10) / 1000; if (held > max) max = held; sum += held; n++ }
         END { if (n) printf "  writers held (drained section): mean %.3f ms, max %.3f ms\n", sum / n, max }' "$dir/daemon.log"
    rm -rf "$dir"
}

qsd() { qemu-storage-daemon --chardev "socket,path=$1,server=on,wait=off,id=m0" --monitor chardev=m0; }
ours() { QBLOCK_QMP_TRACE=1 "$BIN/nbd" --qmp "$1"; }

o=$(run ours ours)
q=$(run qemu qsd)
echo "longest write during a snapshot command (median, max over $ROUNDS snapshots; p99 of all writes):"
echo "nbd --qmp:           $(echo "$o" | head -1)"
echo "$o" | tail -n +2
echo "qemu-storage-daemon: $q"
awk -v a="$(echo "$o" | head -1 | awk '{print $2}')" -v b="$(echo "$q" | awk '{print $2}')" \
    'BEGIN { if (b > 0) printf "median pause ratio ours/qemu: %.2f\n", a / b }'
