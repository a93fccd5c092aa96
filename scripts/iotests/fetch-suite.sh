#!/usr/bin/env bash
# Fetches Debian's qemu source package (the version apt offers beside the installed
# qemu-utils, 7.2 on Debian 12) once into CACHE with a private apt configuration (its own
# deb-src sources.list, state and cache; the system's apt setup is not touched), unpacks
# it with its Debian patches, and prints the source tree's path.
#
#   scripts/iotests/fetch-suite.sh CACHE
#
# Exit status 2 when the package cannot be fetched (offline).
set -uo pipefail
cache="${1:?usage: fetch-suite.sh CACHE}"
log() { echo "iotests: $*" >&2; }

mkdir -p "$cache"
if [ -x "$cache/src/tests/qemu-iotests/check" ]; then echo "$cache/src"; exit 0; fi

if ! command -v dpkg-source >/dev/null; then
    log "installing dpkg-dev (dpkg-source unpacks the source package)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null && \
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
fi

apt_root="$cache/apt"
# shellcheck source=../lib/private-apt.sh
. "$(dirname "$0")/../lib/private-apt.sh"
private_apt_setup "$apt_root"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed=""; [ -f "$keyring" ] && signed=" [signed-by=$keyring]"
# The installed release's code name (bookworm for Debian 12).
suite="$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-bookworm}")"
mirror="${IOTESTS_MIRROR:-http://deb.debian.org/debian}"
{
    echo "deb-src$signed $mirror $suite main"
    echo "deb-src$signed $mirror $suite-updates main"
    echo "deb-src$signed ${IOTESTS_SECURITY_MIRROR:-http://deb.debian.org/debian-security} $suite-security main"
} > "$apt_root/etc/sources.list"

log "apt-get update (private configuration, deb-src $suite)"
if ! apt-get "${apt_opts[@]}" update -qq > "$cache/apt-update.log" 2>&1 \
        || ! ls "$apt_root/lists/"*_Sources* >/dev/null 2>&1; then
    log "cannot fetch the source lists (offline?); see $cache/apt-update.log"; exit 2
fi

# The source version that built the installed qemu-utils, when apt has it; else the newest.
want="$(dpkg-query -W -f='${source:Version}' qemu-utils 2>/dev/null || true)"
pkg="qemu"; [ -n "$want" ] && pkg="qemu=$want"
dl="$cache/download"
rm -rf "$dl"; mkdir -p "$dl"
log "apt-get source --download-only $pkg"
if ! (cd "$dl" && apt-get "${apt_opts[@]}" source --download-only -qq "$pkg" > "$cache/apt-source.log" 2>&1); then
    if [ "$pkg" != qemu ]; then
        log "$pkg is not offered; taking the newest qemu source"
        (cd "$dl" && apt-get "${apt_opts[@]}" source --download-only -qq qemu > "$cache/apt-source.log" 2>&1) \
            || { log "apt-get source failed; see $cache/apt-source.log"; exit 2; }
    else
        log "apt-get source failed; see $cache/apt-source.log"; exit 2
    fi
fi
dsc="$(ls "$dl"/qemu_*.dsc | head -1)"
rm -rf "$cache/src.tmp"
log "unpacking $(basename "$dsc")"
dpkg-source -q --no-check -x "$dsc" "$cache/src.tmp" > "$cache/unpack.log" 2>&1 \
    || { log "dpkg-source failed; see $cache/unpack.log"; exit 1; }
rm -rf "$cache/src" "$dl"
mv "$cache/src.tmp" "$cache/src"
echo "$cache/src"
