#!/usr/bin/env bash
# The slice of QEMU's qemu-iotests that `make test` runs: the tests listed in
# scripts/iotests/slice ("FORMAT TEST" per line, FORMAT qcow2, raw or nbd), with our tools
# only; each must pass. Offline (the suite cannot be fetched): says so and exits 0.
#   BIN=<dir with img io nbd> scripts/iotests/slice.sh
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${IOTESTS_CACHE:-$HOME/.cache/qblock-iotests}"
"$here/fetch-suite.sh" "$cache" > /dev/null
rc=$?
if [ $rc = 2 ]; then echo "iotests slice: SKIPPED, QEMU's source package cannot be fetched (offline)"; exit 0; fi
[ $rc = 0 ] || exit $rc
status=0
for fmt in $(awk '!/^#/ && NF { print $1 }' "$here/slice" | sort -u); do
    tests="$(awk -v f="$fmt" '!/^#/ && $1 == f { print $2 }' "$here/slice" | tr '\n' ' ')"
    IOTESTS_ONLY=ours IOTESTS_GROUP= IOTESTS_FORMATS="$fmt" bash "$here/run.sh" $tests || status=1
done
exit $status
