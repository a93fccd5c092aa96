#!/usr/bin/env bash
# Builds the test guest for the riscv64-virt machine from Debian 13 ("trixie") packages:
#   - the stock riscv64 kernel Image (linux-image-riscv64's current 6.12 package),
#   - a gzip'd cpio (newc) initramfs: busybox-static, the virtio_mmio and virtio_blk modules
#     (and what they depend on), and an /init that loads them, runs a test script, powers off.
#
# apt-get runs with a private configuration (its own sources.list, state and cache under the
# cache folder, APT::Architecture=riscv64, an empty dpkg status): the system's sources and
# dpkg database are never touched. Nothing downloaded is committed; everything lives in
# $GUEST_DIR (default: <repo>/.build-guest). A second run with the cache filled downloads
# nothing and takes a second or two.
#
# Usage: build-guest.sh [--test FILE] [--name NAME] [--append-init LINE]
#   --test FILE  shell script run by /init (busybox sh) after the modules are loaded
#                (default: print "guest: hello" only)
#   --name NAME  name of the initramfs: $GUEST_DIR/initramfs-NAME.cpio.gz (default: test's basename or "hello")
# Prints two lines at the end:  KERNEL=<path>  and  INITRD=<path>
# Exit status 2 when the packages cannot be downloaded (no network): callers skip.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
GUEST_DIR="${GUEST_DIR:-$repo/.build-guest}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
test_script=""
name=""

while [ $# -gt 0 ]; do
    case "$1" in
        --test) test_script="$2"; shift 2 ;;
        --name) name="$2"; shift 2 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "build-guest: unknown argument $1" >&2; exit 1 ;;
    esac
done
if [ -z "$name" ]; then
    if [ -n "$test_script" ]; then name="$(basename "$test_script" .sh)"; else name=hello; fi
fi

log() { echo "build-guest: $*" >&2; }
# shellcheck source=../lib/private-apt.sh
. "$(dirname "$0")/../lib/private-apt.sh"

# Host tools: cpio, gzip, dpkg-deb, xz (Debian packages), installed when missing.
need_pkgs=""
command -v cpio >/dev/null || need_pkgs="$need_pkgs cpio"
command -v gzip >/dev/null || need_pkgs="$need_pkgs gzip"
command -v xz >/dev/null || need_pkgs="$need_pkgs xz-utils"
command -v dpkg-deb >/dev/null || need_pkgs="$need_pkgs dpkg"
if [ -n "$need_pkgs" ]; then
    log "installing$need_pkgs"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need_pkgs >/dev/null
fi

mkdir -p "$GUEST_DIR"
debs="$GUEST_DIR/debs"
apt_root="$GUEST_DIR/apt"

# --- 1. Download the packages with a private apt configuration (once) ---------------------
fetch() {
    mkdir -p "$debs"
    private_apt_setup "$apt_root"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    signed=""
    [ -f "$keyring" ] && signed=" signed-by=$keyring"
    echo "deb [arch=riscv64$signed] $MIRROR $SUITE main" > "$apt_root/etc/sources.list"
    apt_opts+=(-o "APT::Architecture=riscv64" -o "APT::Architectures=riscv64")
    log "apt-get update (private configuration, $SUITE riscv64)"
    if ! apt-get "${apt_opts[@]}" update -qq >"$GUEST_DIR/apt-update.log" 2>&1; then
        log "apt-get update failed (see $GUEST_DIR/apt-update.log)"; return 2
    fi
    if ! ls "$apt_root/lists/"*_Packages* >/dev/null 2>&1; then
        log "no package lists could be fetched from $MIRROR (offline?); see $GUEST_DIR/apt-update.log"; return 2
    fi
    # The metapackage depends on the current versioned kernel package.
    kpkg="$(apt-cache "${apt_opts[@]}" depends linux-image-riscv64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-riscv64\)$/\1/p' | head -1)"
    if [ -z "$kpkg" ]; then log "cannot resolve linux-image-riscv64's kernel package"; return 2; fi
    log "downloading $kpkg busybox-static"
    if ! (cd "$debs" && apt-get "${apt_opts[@]}" download -qq "$kpkg" busybox-static >"$GUEST_DIR/apt-download.log" 2>&1); then
        log "apt-get download failed (see $GUEST_DIR/apt-download.log)"; return 2
    fi
    echo "$kpkg" > "$debs/kernel-package"
}

kdeb() { ls "$debs"/linux-image-[0-9]*_riscv64.deb 2>/dev/null | head -1; }
bdeb() { ls "$debs"/busybox-static_*_riscv64.deb 2>/dev/null | head -1; }

if [ -z "$(kdeb)" ] || [ -z "$(bdeb)" ]; then
    fetch || exit 2
fi
kernel_deb="$(kdeb)"; busybox_deb="$(bdeb)"
[ -n "$kernel_deb" ] && [ -n "$busybox_deb" ] || { log "packages missing after download"; exit 2; }

# --- 2. Extract (once per package file) --------------------------------------------------
extract() { # deb dir
    local stamp="$2/.from"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(basename "$1")" ]; then return; fi
    rm -rf "$2"; mkdir -p "$2"
    dpkg-deb -x "$1" "$2"
    basename "$1" > "$stamp"
}
extract "$kernel_deb" "$GUEST_DIR/kernel-root"
extract "$busybox_deb" "$GUEST_DIR/busybox-root"
kroot="$GUEST_DIR/kernel-root"

# --- 3. The kernel Image -------------------------------------------------------------------
kver="$(ls "$kroot/usr/lib/modules" 2>/dev/null | head -1)"
[ -n "$kver" ] || kver="$(ls "$kroot/lib/modules" | head -1)"
moddir="$kroot/usr/lib/modules/$kver"; [ -d "$moddir" ] || moddir="$kroot/lib/modules/$kver"
image="$GUEST_DIR/Image-$kver"
if [ ! -s "$image" ]; then
    src=""
    for f in "$kroot/boot/vmlinux-$kver" "$kroot/boot/vmlinuz-$kver" "$kroot/boot/Image-$kver"; do
        [ -f "$f" ] && { src="$f"; break; }
    done
    [ -n "$src" ] || { log "no kernel image in $kernel_deb"; exit 1; }
    magic="$(od -An -tx1 -j0 -N2 "$src" | tr -d ' ')"
    case "$magic" in
        1f8b) gzip -dc "$src" > "$image.tmp" ;;          # a gzip'd Image (vmlinuz)
        *) cp "$src" "$image.tmp" ;;
    esac
    # A RISC-V Linux Image carries "RSC\x05" at offset 56.
    m2="$(od -An -tx1 -j56 -N4 "$image.tmp" | tr -d ' ')"
    [ "$m2" = "52534305" ] || { log "$src is not a RISC-V Image (magic $m2)"; rm -f "$image.tmp"; exit 1; }
    mv "$image.tmp" "$image"
fi

# --- 4. Modules: virtio_mmio and virtio_blk with their dependencies, in load order --------
# The package ships no modules.dep (depmod makes it at install time): dependencies come from
# each module's own .modinfo "depends=" entry; modules.builtin names what is built in.
mods="$GUEST_DIR/modules-$kver"
if [ ! -f "$mods/order" ]; then
    rm -rf "$mods"; mkdir -p "$mods"
    : > "$mods/order.tmp"
    add_module() { # module name, e.g. virtio_blk
        local m="$1" f out deps d
        grep -qx "$m" "$mods/order.tmp" && return 0
        if grep -qE "/$m\.ko\$" "$moddir/modules.builtin"; then return 0; fi
        f="$(find "$moddir/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -1)"
        [ -n "$f" ] || { log "module $m not found"; return 1; }
        out="$mods/$m.ko"
        case "$f" in
            *.xz) xz -dc "$f" > "$out" ;;
            *.zst) zstd -dcq "$f" > "$out" ;;
            *.gz) gzip -dc "$f" > "$out" ;;
            *) cp "$f" "$out" ;;
        esac
        deps="$(tr '\0' '\n' < "$out" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')"
        for d in $deps; do add_module "${d//-/_}" || return 1; done
        echo "$m" >> "$mods/order.tmp"
    }
    for m in virtio_mmio virtio_blk; do add_module "$m" || exit 1; done
    sed 's/$/.ko/' "$mods/order.tmp" > "$mods/order"; rm -f "$mods/order.tmp"
fi

# --- 5. The initramfs ------------------------------------------------------------------------
initrd="$GUEST_DIR/initramfs-$name.cpio.gz"
stage="$GUEST_DIR/stage-$name"
test_copy="$GUEST_DIR/test-$name.sh"
if [ -n "$test_script" ]; then cp "$test_script" "$test_copy.new"; else echo 'echo "guest: hello"' > "$test_copy.new"; fi
# Rebuild only when the test script, the modules or this builder changed.
if [ -s "$initrd" ] && [ -f "$test_copy" ] && cmp -s "$test_copy" "$test_copy.new" \
    && [ "$initrd" -nt "$mods/order" ] && [ "$initrd" -nt "$0" ]; then
    rm -f "$test_copy.new"
else
    mv "$test_copy.new" "$test_copy"
    rm -rf "$stage"; mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib/modules,etc}
    bb="$GUEST_DIR/busybox-root/usr/bin/busybox"; [ -f "$bb" ] || bb="$GUEST_DIR/busybox-root/bin/busybox"
    cp "$bb" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    cp "$mods"/*.ko "$stage/lib/modules/" 2>/dev/null || true
    cp "$mods/order" "$stage/lib/modules/order"
    cp "$test_copy" "$stage/test.sh"
    cat > "$stage/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m || echo "guest: insmod $m failed"
done
# Give the drivers a moment to probe the disks.
i=0; while [ $i -lt 50 ] && ! ls /sys/block/ 2>/dev/null | grep -q vd; do sleep 0.1; i=$((i+1)); done
echo "guest: disks: $(ls /sys/block | tr '\n' ' ')"
sh /test.sh
echo "guest: test exit $?"
poweroff -f
INIT
    chmod +x "$stage/init" "$stage/test.sh"
    if [ "$(id -u)" = 0 ]; then mknod -m 600 "$stage/dev/console" c 5 1; fi
    (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9n > "$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
fi

echo "KERNEL=$image"
echo "INITRD=$initrd"
