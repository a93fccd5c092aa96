#!/usr/bin/env bash
# Builds and runs Examples/ as another project would use QBlock: a separate package that
# depends on it by version (swift-tools-version 6, Swift 6 language mode). The committed
# HEAD is cloned into a scratch bare repository and tagged QBLOCK_PACKAGE_VERSION; the
# example package resolves QBlock from there. SwiftPM refuses a dependency with unsafe build
# flags reached this way, so this also proves the library products have none.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SWIFT="${SWIFT:-swift}"
VERSION="${QBLOCK_PACKAGE_VERSION:-1.0.0}"
WORK="$(mktemp -d /tmp/qblock-consumer.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

git clone -q --bare "$ROOT" "$WORK/qblock.git"
git -C "$WORK/qblock.git" tag -f "$VERSION" HEAD >/dev/null
cp -r "$ROOT/Examples" "$WORK/Examples"
rm -rf "$WORK/Examples/.build"
cd "$WORK/Examples"
export QBLOCK_PACKAGE_URL="file://$WORK/qblock.git" QBLOCK_PACKAGE_VERSION="$VERSION"
SCRATCH="${EXAMPLES_SCRATCH:-$ROOT/.build-examples}"
# Each example's product alone: only what it needs of QBlock is built (not the tools).
for example in Sources/*/; do
    "$SWIFT" build --scratch-path "$SCRATCH" --product "$(basename "$example")" 2>&1 | grep -E "error|warning:" || true
    "$SWIFT" build --scratch-path "$SCRATCH" --product "$(basename "$example")" >/dev/null
done
# The example package turns QBlock's "Tools" trait off: swift-argument-parser, which only the
# command-line tools use, must not even be resolved for it.
if grep -q '"identity" *: *"swift-argument-parser"' "$SCRATCH/workspace-state.json"; then
    echo "consumer check: swift-argument-parser was resolved for a package that only uses the library" >&2
    exit 1
fi
BIN="$("$SWIFT" build --scratch-path "$SCRATCH" --show-bin-path)"
for example in Sources/*/; do
    name="$(basename "$example")"
    echo "== example $name"
    mkdir -p "$WORK/run-$name"
    "$BIN/$name" "$WORK/run-$name"
done
echo "consumer check: QBlock $VERSION from a tagged clone builds and runs in a separate package"
