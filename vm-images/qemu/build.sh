#!/usr/bin/env bash
# Build the emulator L1 runs under: Debian's own QEMU (the source of the
# host's qemu-system-x86 package, with Debian's patches) plus ours in
# patches/, x86_64 system emulation only. Usage: build.sh OUTDIR WORKDIR
# OUTDIR receives qemu-system-x86_64 and VERSION; WORKDIR keeps the source
# and build trees between builds.
#
# Why not the packaged binary: its TCG loses an interrupt now and then when
# L1 runs a KVM guest (patches/0001-*), and L1 then stops for good
# (docs/lab.md). The binary looks for firmware where Debian's does, so the
# packages qemu-system-x86 pulls in (seabios, ipxe-qemu, qemu-system-data)
# provide it.
set -euo pipefail
out=$1 work=$2
here=$(cd "$(dirname "$0")" && pwd)
version=$(dpkg-query -W -f='${db:Status-Status} ${source:Version}' qemu-system-x86 2>/dev/null) || true
case $version in
    "installed "*) version=${version#installed } ;;
    *) echo "qemu: qemu-system-x86 is not installed (apt-get install qemu-system-x86)" >&2; exit 1 ;;
esac
mkdir -p "$work" "$out"
# A new Debian version or a change of our patches starts from a clean tree.
stamp=$(printf '%s\n' "$version" | cat - "$here"/patches/*.patch | sha256sum | cut -c1-16)
src=$work/src
if [ ! -e "$src/.kvmvfio-$stamp" ]; then
    rm -rf "$src" "$work/dl"
    mkdir -p "$work/dl" "$src"
    echo "qemu: fetching Debian's source of qemu $version"
    (cd "$work/dl" && apt-get source --download-only -q "qemu=$version" >"$work/dl/log" 2>&1) || {
        tail -5 "$work/dl/log" >&2
        echo "qemu: apt-get source qemu=$version failed: apt needs deb-src lines (.ci/install-host-deps adds them)" >&2
        exit 1
    }
    tar -C "$src" --strip-components=1 -xf "$work"/dl/qemu_*.orig.tar.*
    tar -C "$src" -xf "$work"/dl/qemu_*.debian.tar.*
    echo "qemu: applying Debian's patches, then ours"
    while IFS= read -r p; do
        case $p in ''|'#'*) continue ;; esac
        patch -d "$src" -p1 -s -N <"$src/debian/patches/${p%% *}"
    done <"$src/debian/patches/series"
    for p in "$here"/patches/*.patch; do
        echo "qemu: applying $(basename "$p")"
        patch -d "$src" -p1 -s -N <"$p"
    done
    touch "$src/.kvmvfio-$stamp"
fi
# --prefix: anything but /usr. QEMU relocates every path under its prefix
# to the binary's own folder; the firmware paths must stay Debian's.
configure=(
    --prefix=/opt/kvmvfio-lab-qemu
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
    --target-list=x86_64-softmmu --meson=meson --disable-debug-info --disable-werror
    --enable-virtfs --disable-docs --disable-tools --disable-guest-agent
    --disable-gtk --disable-sdl --disable-vnc --disable-opengl --disable-virglrenderer
    --disable-spice --disable-curses --disable-xen --disable-libusb --disable-usb-redir
    --disable-capstone --disable-slirp
)
if ! printf '%s\n' "${configure[@]}" | cmp -s - "$src/build/.kvmvfio-configure" 2>/dev/null; then
    echo "qemu: configuring (x86_64-softmmu, no UI, no tools)"
    rm -rf "$src/build"
    mkdir -p "$src/build"
    (cd "$src/build" && ../configure "${configure[@]}") >"$work/configure.log" 2>&1 ||
        { tail -30 "$work/configure.log" >&2; rm -rf "$src/build"; exit 1; }
    printf '%s\n' "${configure[@]}" >"$src/build/.kvmvfio-configure"
fi
cd "$src/build"
echo "qemu: ninja -j$(nproc) qemu-system-x86_64"
ninja -j"$(nproc)" qemu-system-x86_64 >"$work/ninja.log" 2>&1 || { tail -40 "$work/ninja.log" >&2; exit 1; }
cp qemu-system-x86_64 "$out/qemu-system-x86_64"
# It must find the firmware of Debian's packages (SeaBIOS first) where it
# looks. (Asked of the copy: next to the build tree's qemu-bundle/ the binary
# looks there instead.)
found=
while IFS= read -r dir; do
    [ -e "$dir/bios-256k.bin" ] && found=$dir
done < <("$out/qemu-system-x86_64" -L help)
[ -n "$found" ] || {
    echo "qemu: the build finds no bios-256k.bin in: $("$out/qemu-system-x86_64" -L help | tr '\n' ' ')(apt-get install seabios)" >&2
    exit 1
}
echo "Debian qemu $version + $(cd "$here/patches" && echo *.patch)" >"$out/VERSION"
echo "qemu: done ($(cat "$out/VERSION"))"
