#!/usr/bin/env bash
# Two builds of img side by side on the same files: OLD and NEW (paths to img binaries), alternating
# runs, medians. Usage: OLD=<old img> NEW=<new img> [RUNS=9] [WORKLOADS="read write convert-q2r convert-r2q"] bash benchmarks/compare-builds.sh
set -euo pipefail
OLD="${OLD:?OLD=<path of the old img>}"; NEW="${NEW:?NEW=<path of the new img>}"
DIR=$(mktemp -d /var/tmp/cmp.XXXXXX); trap 'rm -rf $DIR' EXIT
STEP=$((4096 * 104729))
qemu-img create -q -f qcow2 $DIR/full.qcow2 1G; qemu-io -f qcow2 -c "write -P 0x5a 0 1G" $DIR/full.qcow2 >/dev/null
# convert source: half random data, a quarter zeros, a quarter holes
qemu-img create -q -f qcow2 $DIR/src.qcow2 1G
head -c 256M /dev/urandom > $DIR/rand; qemu-io -f qcow2 -c "write -z 256M 256M" $DIR/src.qcow2 >/dev/null
qemu-img dd -f raw -O qcow2 if=$DIR/rand of=$DIR/tmp.qcow2 bs=1M 2>/dev/null || true
dd if=$DIR/rand of=$DIR/src.raw bs=1M conv=notrunc status=none; truncate -s 1G $DIR/src.raw
secs() { grep -o 'Run completed in [0-9.]*' | awk '{print $4}'; }
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t() { local s=$(date +%s.%N); "$@" >/dev/null; echo "$(date +%s.%N) - $s" | bc; }
for w in ${WORKLOADS:-read write convert-q2r convert-r2q}; do
  o=(); n=()
  for i in $(seq 1 ${RUNS:-3}); do
    for v in old new; do
      B=$OLD; [ $v = new ] && B=$NEW
      case $w in
        read) cat $DIR/full.qcow2 >/dev/null; r=$($B bench -f qcow2 -t writeback -c 200000 -d 32 -s 4k -S $STEP $DIR/full.qcow2 | secs);;
        write) rm -f $DIR/w.qcow2; qemu-img create -q -f qcow2 $DIR/w.qcow2 1G; r=$($B bench -w -f qcow2 -t writeback -c 50000 -d 32 -s 4k -S $STEP $DIR/w.qcow2 | secs);;
        convert-q2r) rm -f $DIR/o.raw; sync; r=$(t $B convert -f qcow2 -O raw $DIR/full.qcow2 $DIR/o.raw);;
        convert-r2q) rm -f $DIR/o.qcow2; sync; r=$(t $B convert -f raw -O qcow2 $DIR/src.raw $DIR/o.qcow2);;
      esac
      [ $v = old ] && o+=($r) || n+=($r)
    done
  done
  mo=$(printf "%s\n" "${o[@]}" | med); mn=$(printf "%s\n" "${n[@]}" | med)
  printf "| %-12s | %8.3f s | %8.3f s | %5.2f |\n" $w $mo $mn $(echo "$mo / $mn" | bc -l)
done
