#!/usr/bin/env bash
# Live operations as the guest sees them (docs/live-vm.md): the lvwriter guest appends 4 KiB
# O_DIRECT blocks under `vm --qmp` while Tests/Scripts/python/livevm/livevm.py
#   - takes live snapshots, and pivots mirrors (background copy mode, block-job-complete),
#     each inside a 1 s window of the guest's own write-latency probe, next to a quiet 1 s
#     window (the baseline: the interpreter's own jitter);
#   - measures the guest's write throughput over 3 s with no job, and with a mirror in each
#     copy mode running (READY, so the job copies only what the guest writes).
# Targets: no guest-visible stall over 10 ms for a snapshot or pivot; background mirroring
# costs under 20% of the guest's write throughput. Results: docs/performance.md.
# Usage: BIN=<release bin dir> benchmarks/livevm-bench.sh [ROUNDS]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
BIN="${BIN:-$(cd "$repo" && swift build -c release --show-bin-path)}"
ROUNDS="${1:-3}"
export LIVEVM_DISK_SIZE="${LIVEVM_DISK_SIZE:-1024M}"   # room for ~90 s of appends
[ -x "$BIN/vm" ] || { echo "livevm-bench: $BIN/vm not built (make release)"; exit 1; }
set +e
guest="$(bash "$repo/guests/riscv-writer/make-guest.sh")"
rc=$?
set -e
if [ $rc = 2 ]; then echo "livevm-bench: skipped (the guest cannot be downloaded)"; exit 0; fi
[ $rc = 0 ] || exit 1
KERNEL="$(echo "$guest" | sed -n 's/^KERNEL=//p')"
INITRD="$(echo "$guest" | sed -n 's/^INITRD=//p')"
python3 -c 'import qemu.qmp' 2>/dev/null || { echo "livevm-bench: skipped (python3 qemu.qmp missing)"; exit 0; }
DIR="$(mktemp -d "${TMPDIR:-/tmp}/livevm-bench.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT

steps=""
for i in $(seq "$ROUNDS"); do steps="$steps,lat-snapshot"; done
for i in $(seq "$ROUNDS"); do steps="$steps,lat-pivot"; done
for i in $(seq "$ROUNDS"); do steps="$steps,throughput"; done
python3 "$repo/Tests/Scripts/python/livevm/livevm.py" --vm "$BIN/vm" --kernel "$KERNEL" --initrd "$INITRD" \
    --workdir "$DIR/run" --steps "${steps#,}" --trace --json "$DIR/result.json" >"$DIR/log" 2>&1 || {
    cat "$DIR/log"; echo "livevm-bench: the run failed"; exit 1; }
grep '^livevm: ' "$DIR/log" | grep -v 'qemu-img check' || true
python3 - "$DIR/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
def ms(us): return "%.1f" % (us / 1000)
print()
print("| operation | guest's longest write, quiet 1 s before | guest's longest write, 1 s around the operation | writers held (host) |")
print("| --- | --- | --- | --- |")
for k in sorted(x for x in r if x.startswith(("snapshot", "pivot"))):
    v = r[k]
    held = "-" if v.get("held_us") is None else ms(v["held_us"]) + " ms"
    print("| %s | %s ms | %s ms | %s |" % (k, ms(v["baseline"]["maxlat_us"]), ms(v["during"]["maxlat_us"]), held))
tp = [k for k in r if k.startswith("tp")]
if tp:
    print()
    print("| guest writes (4 KiB O_DIRECT) | KiB/s | vs no job |")
    print("| --- | --- | --- |")
    base = [r[k]["KiB/s"] for k in tp if r[k]["mode"] == "no job"]
    b = sum(base) / len(base) if base else None
    for mode in ("no job", "mirror background (ready)", "mirror write-blocking (ready)"):
        vals = [r[k]["KiB/s"] for k in tp if r[k]["mode"] == mode]
        if vals:
            v = sum(vals) / len(vals)
            print("| %s | %.0f (%s) | %s |" % (mode, v, ", ".join("%.0f" % x for x in vals), "%.0f%%" % (100 * v / b) if b else "-"))
PY
