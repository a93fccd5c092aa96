#!/usr/bin/env bash
# Builds the live-operations guest: the test guest of scripts/guest/build-guest.sh (Debian's
# riscv64 kernel, busybox initramfs) whose /init runs guest-test.sh, plus lvwriter appended
# as a second cpio archive (Linux unpacks concatenated archives in order).
# Prints KERNEL=<path> and INITRD=<path>. Exit status 2 when the guest cannot be downloaded.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
GUEST_DIR="${GUEST_DIR:-$repo/.build-guest}"
export GUEST_DIR
set +e
base="$(bash "$repo/scripts/guest/build-guest.sh" --test "$here/guest-test.sh" --name livevm)"
rc=$?
set -e
[ $rc = 0 ] || exit $rc
kernel="$(echo "$base" | sed -n 's/^KERNEL=//p')"
initrd="$(echo "$base" | sed -n 's/^INITRD=//p')"
stage="$GUEST_DIR/stage-lvwriter"
out="$GUEST_DIR/initramfs-livevm-writer.cpio.gz"
if [ ! -s "$out" ] || [ "$out" -ot "$initrd" ] || [ "$out" -ot "$here/writer.c" ] || [ "$out" -ot "$0" ]; then
    rm -rf "$stage"; mkdir -p "$stage/bin"
    bash "$here/build.sh" "$stage/bin/lvwriter"
    (cd "$stage" && printf 'bin\nbin/lvwriter\n' | cpio -o -H newc --quiet -R 0:0) | gzip -9n > "$out.extra"
    cat "$initrd" "$out.extra" > "$out.tmp"
    rm -f "$out.extra"
    mv "$out.tmp" "$out"
fi
echo "KERNEL=$kernel"
echo "INITRD=$out"
