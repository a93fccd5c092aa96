#!/usr/bin/env bash
# QEMU's own test suite (tests/qemu-iotests from Debian's qemu 7.2 source package) run twice
# on this machine: once with QEMU's qemu-img, qemu-io and qemu-nbd, once with ours (img, io,
# nbd) under those names; prints both pass lists and the tests that pass with QEMU's tools
# and not with ours.
#
#   BIN=<dir with img io nbd> scripts/iotests/run.sh [check options and tests...]
#
# Environment:
#   BIN               our tools (required)
#   IOTESTS_CACHE     where the source package is kept (default ~/.cache/qblock-iotests;
#                     outside the repository, nothing downloaded is committed)
#   IOTESTS_FORMATS   image formats/protocols to run, default "qcow2 raw nbd"
#                     (nbd = raw images served by qemu-nbd, check's -nbd)
#   IOTESTS_GROUP     check's -g, default "quick"; empty to run the tests named on the
#                     command line (or every test)
#   IOTESTS_JOBS      tests run at once, default 2
#   IOTESTS_TIMEOUT   seconds after which a test is stopped and fails, default 300
#   IOTESTS_QEMU      "skip" to reuse the QEMU pass lists of an earlier run (they do not
#                     change while the installed QEMU does not)
#   IOTESTS_ONLY      "ours" to run our tools only and require every test run to pass
#                     (the slice `make test` runs); the QEMU run is skipped
#   IOTESTS_KNOWN     the file that explains each expected difference, default
#                     docs/iotests.md (rows "| fmt | test | reason |")
#
# Exit status: 0 when every test that passes with QEMU's tools passes with ours or is
# explained in IOTESTS_KNOWN; 1 otherwise; 2 when the suite cannot be fetched (offline).
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
: "${BIN:?set BIN to the folder that holds img, io and nbd}"
BIN="$(cd "$BIN" && pwd)"
cache="${IOTESTS_CACHE:-$HOME/.cache/qblock-iotests}"
formats="${IOTESTS_FORMATS:-qcow2 raw nbd}"
group="${IOTESTS_GROUP-quick}"
jobs="${IOTESTS_JOBS:-2}"
known="${IOTESTS_KNOWN:-$repo/docs/iotests.md}"

log() { echo "iotests: $*" >&2; }

src="$("$here/fetch-suite.sh" "$cache")" || exit $?
iotests="$src/tests/qemu-iotests"

# Our tools under QEMU's names: they name themselves after argv[0] in their diagnostics.
ours="$cache/bin-ours"
mkdir -p "$ours"
for t in img io nbd; do
    [ -x "$BIN/$t" ] || { log "no $BIN/$t"; exit 1; }
    ln -sfn "$BIN/$t" "$ours/qemu-$t"
done

qemu_prog="$(command -v qemu-system-x86_64 || true)"
qsd_prog="$(command -v qemu-storage-daemon || true)"
[ -n "$qemu_prog" ] || { log "qemu-system-x86_64 is missing (Debian's qemu-system-x86)"; exit 1; }
[ -n "$qsd_prog" ] || { log "qemu-storage-daemon is missing (Debian's qemu-system-common)"; exit 1; }

results="$cache/results"
mkdir -p "$results"

# run_check LABEL FMT IMG IO NBD [tests...]: runs each test of the group (or the tests named)
# on its own, IOTESTS_JOBS at a time, each in a scratch folder of its own and stopped after
# IOTESTS_TIMEOUT seconds (check has no timeout, and a hung test would stop the run);
# the TAP lines go to $results/LABEL-FMT.tap, each test's output to $results/LABEL-FMT.out/.
run_check() {
    local label="$1" fmt="$2" img="$3" io="$4" nbd="$5"; shift 5
    local fmtopts="-$fmt"
    [ "$fmt" = nbd ] && fmtopts="-raw -nbd"
    local list
    list="$(cd "$iotests" && QEMU_PROG="$qemu_prog" QSD_PROG="$qsd_prog" \
        QEMU_IMG_PROG="$img" QEMU_IO_PROG="$io" QEMU_NBD_PROG="$nbd" \
        python3 ./check -n $fmtopts ${group:+-g "$group"} "$@" 2>/dev/null)"
    local out="$results/$label-$fmt.out"
    rm -rf "$out"; mkdir -p "$out"
    log "$label: $(echo "$list" | wc -w) tests, check $fmtopts${group:+ -g $group} $*"
    export iotests qemu_prog qsd_prog img io nbd fmtopts out cache label fmt
    echo "$list" | xargs -P "$jobs" -n 1 bash -c '
        t="${0#tests/}"; scratch="$cache/scratch-$label-$fmt-${t//\//_}"
        rm -rf "$scratch"; mkdir -p "$scratch/sock"
        cd "$iotests" && TEST_DIR="$scratch" SOCK_DIR="$scratch/sock" \
            QEMU_PROG="$qemu_prog" QSD_PROG="$qsd_prog" \
            QEMU_IMG_PROG="$img" QEMU_IO_PROG="$io" QEMU_NBD_PROG="$nbd" \
            timeout -k 5 "${IOTESTS_TIMEOUT:-300}" python3 ./check -tap $fmtopts "$t" > "$out/${t//\//_}.tap" 2>&1
        rc=$?
        [ $rc = 124 ] || [ $rc = 137 ] && echo "not ok $fmt $t # timeout" >> "$out/${t//\//_}.tap"
        pkill -9 -f "$scratch" 2>/dev/null
        # (A test that exports over FUSE and fails can leave its mount behind.)
        awk -v d="$scratch/" "index(\$2, d) == 1 { print \$2 }" /proc/mounts | xargs -r -n 1 umount -l 2>/dev/null
        rm -rf "$scratch"'
    cat "$out"/*.tap 2>/dev/null | grep -E "^(not )?ok " > "$results/$label-$fmt.tap"
}

# passed FILE: the tests a TAP log reports as passed (not skipped).
passed() { sed -n 's/^ok [^ ]* \([^ #]*\) *$/\1/p' "$1" | sort -u; }

status=0
if [ "${IOTESTS_ONLY:-}" = ours ]; then
    for fmt in $formats; do
        run_check ours "$fmt" "$ours/qemu-img" "$ours/qemu-io" "$ours/qemu-nbd" "$@"
        passed "$results/ours-$fmt.tap" > "$results/ours-$fmt.pass"
        failed="$(grep -v -E '^ok [^ ]* [^ #]* *$' "$results/ours-$fmt.tap" | awk '{print ($1 == "not") ? $4 : $3 " (skipped)"}' | tr '\n' ' ')"
        echo "== $fmt: $(wc -l < "$results/ours-$fmt.pass") passed: $(tr '\n' ' ' < "$results/ours-$fmt.pass")"
        if [ -n "$failed" ]; then
            echo "FAILED or skipped with ours ($fmt): $failed (outputs in $results/ours-$fmt.out)"
            for t in $failed; do
                f="$results/ours-$fmt.out/${t//\//_}.tap"
                [ -f "$f" ] && sed -n '1,60p' "$f"
            done
            status=1
        fi
    done
    exit $status
fi
for fmt in $formats; do
    if [ "${IOTESTS_QEMU:-}" != skip ] || [ ! -s "$results/qemu-$fmt.tap" ]; then
        run_check qemu "$fmt" "$(command -v qemu-img)" "$(command -v qemu-io)" "$(command -v qemu-nbd)" "$@"
    fi
    run_check ours "$fmt" "$ours/qemu-img" "$ours/qemu-io" "$ours/qemu-nbd" "$@"
    passed "$results/qemu-$fmt.tap" > "$results/qemu-$fmt.pass"
    passed "$results/ours-$fmt.tap" > "$results/ours-$fmt.pass"
    comm -23 "$results/qemu-$fmt.pass" "$results/ours-$fmt.pass" > "$results/missing-$fmt"
    comm -13 "$results/qemu-$fmt.pass" "$results/ours-$fmt.pass" > "$results/extra-$fmt"
    # Explained differences: table rows "| fmt | test | reason |" in the known file.
    explained="$(sed -n "s/^| *$fmt *| *\([^ |]*\) *|.*/\1/p" "$known" 2>/dev/null | sort -u)"
    unexplained="$(comm -23 "$results/missing-$fmt" <(echo "$explained") | tr '\n' ' ')"
    echo "== $fmt (${group:-selected tests})"
    echo "QEMU's tools pass $(wc -l < "$results/qemu-$fmt.pass"): $(tr '\n' ' ' < "$results/qemu-$fmt.pass")"
    echo "ours pass        $(wc -l < "$results/ours-$fmt.pass"): $(tr '\n' ' ' < "$results/ours-$fmt.pass")"
    echo "pass with QEMU's tools, not with ours: $(tr '\n' ' ' < "$results/missing-$fmt")"
    [ -s "$results/extra-$fmt" ] && echo "pass with ours, not with QEMU's tools: $(tr '\n' ' ' < "$results/extra-$fmt")"
    if [ -n "${unexplained// /}" ]; then
        echo "NOT EXPLAINED in ${known#$repo/}: $unexplained"
        status=1
    fi
done
echo "(TAP logs and lists in $results)"
exit $status
