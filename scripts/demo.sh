#!/usr/bin/env bash
# The whole story in under two minutes: a riscv64 guest (Debian's stock kernel, busybox and
# the lvwriter workload) boots on a qcow2 disk under `vm --qmp` and keeps appending numbered,
# checksummed blocks to /dev/vda while, over QMP (QEMU's qemu.qmp client):
#   1. a live snapshot puts a qcow2 overlay on top of the disk,
#   2. a stream copies the base into the overlay and drops the backing file,
#   3. a write-blocking mirror copies the disk to an NBD server (this project's `nbd`) and
#      pivots the guest onto it, while the guest keeps writing,
# then the guest verifies every block it wrote and powers off, and img info / check /
# compare show that nothing was lost. Each step's timing is printed.
#
# Without network (the guest cannot be downloaded), the offline tour of img and io runs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
BIN="${BIN:-$(swift build -c release --show-bin-path)}"
IMG="$BIN/img"
IO="$BIN/io"
DIR="$(mktemp -d "${TMPDIR:-/tmp}/qblock-demo.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

offline_tour() {
    cd "$DIR"
    step "$IMG" create -f raw base.raw 64M
    step "$IO" -f raw -c "write -P 0xaa 0 1M" -c "write -P 0xbb 8M 64k" base.raw
    step "$IMG" create -f qcow2 -b base.raw -F raw overlay.qcow2
    step "$IO" -f qcow2 -c "write -P 0xcc 512k 1M" -c "write -z 8M 64k" overlay.qcow2
    step "$IO" -f qcow2 -c "read -P 0xaa 0 512k" -c "read -P 0xcc 512k 1M" -c "read -P 0 8M 64k" overlay.qcow2
    step "$IMG" info --backing-chain overlay.qcow2
    step "$IMG" map overlay.qcow2
    step "$IMG" check overlay.qcow2
    echo
    echo "demo done (images were in $DIR)"
}

start=$(date +%s.%N)
say "Building the guest (Debian trixie riscv64 kernel + busybox + lvwriter; downloaded once)"
set +e
guest="$(bash "$repo/guests/riscv-writer/make-guest.sh")"
rc=$?
set -e
if [ $rc = 2 ]; then
    echo "the guest cannot be downloaded (offline?): showing the img/io tour instead"
    offline_tour
    exit 0
fi
[ $rc = 0 ] || { echo "demo: building the guest failed" >&2; exit 1; }
KERNEL="$(echo "$guest" | sed -n 's/^KERNEL=//p')"
INITRD="$(echo "$guest" | sed -n 's/^INITRD=//p')"
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    echo "demo: python3's qemu.qmp is missing (make deps installs it)" >&2; exit 1
fi

say "Booting the guest under vm --qmp on base.qcow2; it writes while QMP drives the disks"
python3 "$repo/Tests/Scripts/python/livevm/livevm.py" --vm "$BIN/vm" --kernel "$KERNEL" --initrd "$INITRD" \
    --workdir "$DIR" --steps snapshot,stream,mirror-nbd --nbd-server "$BIN/nbd" \
    --reference "$DIR/expected.raw" --narrate

cd "$DIR"
say "What is on the host now"
step "$IMG" info base.qcow2
step "$IMG" info overlay.qcow2
step "$IMG" info target.qcow2
step "$IMG" check target.qcow2
say "The NBD target holds exactly the blocks the guest acknowledged (expected.raw is built from the guest's count)"
step "$IMG" compare -f raw -F qcow2 expected.raw target.qcow2
end=$(date +%s.%N)
awk -v a="$start" -v b="$end" -v d="$DIR" 'BEGIN { printf "\ndemo done in %.0f s (images were in %s)\n", b - a, d }'
