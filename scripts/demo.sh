#!/usr/bin/env bash
# A short tour of the img and io tools: a raw base image, a qcow2 overlay on it, I/O
# through the chain, and what info, map and check say about it.
set -euo pipefail
BIN="${BIN:-$(swift build -c release --show-bin-path)}"
IMG="$BIN/img"
IO="$BIN/io"
DIR="$(mktemp -d "${TMPDIR:-/tmp}/qblock-demo.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$IMG" create -f raw base.raw 64M
step "$IO" -f raw -c "write -P 0xaa 0 1M" -c "write -P 0xbb 8M 64k" base.raw
step "$IMG" create -f qcow2 -b base.raw -F raw overlay.qcow2
step "$IO" -f qcow2 -c "write -P 0xcc 512k 1M" -c "write -z 8M 64k" overlay.qcow2
step "$IO" -f qcow2 -c "read -P 0xaa 0 512k" -c "read -P 0xcc 512k 1M" -c "read -P 0 8M 64k" overlay.qcow2
step "$IMG" info --backing-chain overlay.qcow2
step "$IMG" map overlay.qcow2
step "$IMG" map --output=json overlay.qcow2
step "$IMG" check overlay.qcow2
echo
echo "demo done (images were in $DIR)"
