#!/usr/bin/env bash
# Mirror of a 1 GiB qcow2 image over QMP: seconds to BLOCK_JOB_READY and from
# block-job-complete to BLOCK_JOB_COMPLETED, with no writer and with a steady NBD writer
# (qemu-io, 2000 random 4k..64k writes through a writable export), QBlock's `nbd --qmp`
# vs qemu-storage-daemon driven by the same QMP commands (Tests/Scripts/python/jobs/mirror_run.py).
# COPY_MODES (default "background") lists the copy modes to run: "background write-blocking".
# BIN is the directory of the built tools (make bench sets it).
set -euo pipefail
BIN=${BIN:-$(swift build -c release --show-bin-path)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
RUN="$HERE/Tests/Scripts/python/jobs/mirror_run.py"
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing: skipped"; exit 0; }
python3 -c 'import qemu.qmp' 2>/dev/null || { echo "python qemu.qmp missing (pip install qemu.qmp): skipped"; exit 0; }
[ -x "$BIN/nbd" ] || { echo "no $BIN/nbd: skipped"; exit 0; }

W=$(mktemp -d /tmp/mirror-bench.XXXXXX)
trap 'rm -rf "$W"' EXIT
qemu-img create -q -f qcow2 "$W/golden.qcow2" 1G
# 1 GiB of data in 8 MiB runs of varying patterns, a 64 MiB hole every 256 MiB.
cmds=()
for ((i = 0; i < 128; i++)); do
  (( i % 32 == 8 )) && continue
  cmds+=(-c "write -P $((i % 250 + 1)) $((i * 8))M 8M")
done
qemu-io "${cmds[@]}" "$W/golden.qcow2" >/dev/null

one() {  # one KIND WRITES MODE -> "ready complete"
  local kind=$1 writes=$2 mode=$3 d="$W/$1-$2-$3" pid out
  rm -rf "$d"; mkdir -p "$d"; cp "$W/golden.qcow2" "$d/src.qcow2"
  if [ "$kind" = ours ]; then
    "$BIN/nbd" --qmp "$d/qmp.sock" >/dev/null 2>&1 & pid=$!
  else
    qemu-storage-daemon --chardev socket,id=c0,path="$d/qmp.sock",server=on,wait=off --monitor chardev=c0 >/dev/null 2>&1 & pid=$!
  fi
  for _ in $(seq 200); do [ -S "$d/qmp.sock" ] && break; sleep 0.02; done
  out=$(python3 "$RUN" "$d/qmp.sock" "$d" --writes "$writes" --copy-mode "$mode")
  wait $pid 2>/dev/null || true
  qemu-img compare -q "$d/ref.qcow2" "$d/tgt.qcow2" || { echo "$kind: target differs from the reference" >&2; exit 1; }
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["ready_s"], r["complete_s"])' "$out"
}

printf '%-38s %10s %10s %10s %10s %8s %8s\n' "case" "ours rdy" "ours cmp" "qsd rdy" "qsd cmp" "rdy x" "cmp x"
for mode in ${COPY_MODES:-background}; do
for writes in 0 2000; do
  [ "$mode" = background ] || [ "$writes" != 0 ] || continue
  read -r or oc < <(one ours $writes $mode)
  read -r qr qc < <(one qsd $writes $mode)
  label=$([ $writes = 0 ] && echo "1 GiB, no writer" || echo "1 GiB, steady writer")
  [ "$mode" = background ] || label="$label, $mode"
  python3 - "$label" "$or" "$oc" "$qr" "$qc" <<'PY'
import sys
label, o_r, o_c, q_r, q_c = sys.argv[1], *map(float, sys.argv[2:])
ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "-"
print(f"{label:<38} {o_r:10.3f} {o_c:10.3f} {q_r:10.3f} {q_c:10.3f} {ratio(o_r, q_r):>8} {ratio(o_c, q_c):>8}")
PY
done
done
echo "(seconds; ratios are ours / qemu-storage-daemon, lower is better for us)"
