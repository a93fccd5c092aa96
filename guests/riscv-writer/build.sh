#!/usr/bin/env bash
# Builds lvwriter (static riscv64 Linux, no libc) with the Swift toolchain's clang and lld.
# Usage: build.sh OUT   (CLANG overrides the compiler)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT}"
clang="${CLANG:-}"
if [ -z "$clang" ]; then
    for c in /opt/swift/usr/bin/clang "$(command -v clang || true)"; do [ -n "$c" ] && [ -x "$c" ] && { clang="$c"; break; }; done
fi
[ -n "$clang" ] || { echo "build.sh: no clang" >&2; exit 2; }
"$clang" --target=riscv64-unknown-linux-gnu -march=rv64gc -mabi=lp64d -nostdlib -static -ffreestanding \
    -fno-stack-protector -fno-builtin -O2 -fuse-ld=lld -Wl,--build-id=none -o "$out" "$here/writer.c"
