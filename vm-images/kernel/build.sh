#!/usr/bin/env bash
# Build the lab kernel: Debian's linux-source-6.12, defconfig + kvm_guest.config
# + fragment.config, no modules. Usage: build.sh OUTDIR WORKDIR
# OUTDIR receives bzImage and config; WORKDIR keeps the source tree between
# builds so that a recipe change rebuilds incrementally.
set -euo pipefail
out=$1 work=$2
here=$(cd "$(dirname "$0")" && pwd)
tarball=/usr/src/linux-source-6.12.tar.xz
[ -r "$tarball" ] || { echo "kernel: $tarball missing (apt-get install linux-source-6.12)" >&2; exit 1; }
mkdir -p "$work" "$out"
src=$work/linux-source-6.12
stamp=$work/.extracted-$(stat -c %s-%Y "$tarball")
if [ ! -e "$stamp" ]; then
    echo "kernel: extracting $tarball"
    rm -rf "$src" "$work"/.extracted-*
    tar -C "$work" -xf "$tarball"
    touch "$stamp"
fi
cd "$src"
echo "kernel: configuring (defconfig + kvm_guest.config + fragment)"
make -s defconfig >/dev/null
make -s kvm_guest.config >/dev/null
scripts/kconfig/merge_config.sh -m .config "$here/fragment.config" >/dev/null
make -s olddefconfig >/dev/null
missing=0
while IFS= read -r line; do
    case $line in ''|'#'*) continue ;; esac
    opt=${line%%=*} want=${line#*=}
    if [ "$want" = n ]; then
        if grep -q "^$opt=[ym]" .config; then echo "kernel: $opt is set but the fragment says n" >&2; missing=1; fi
    elif ! grep -qx "$opt=$want" .config; then
        echo "kernel: $opt=$want did not stick (got: $(grep "^$opt=\|^# $opt is not set" .config || echo absent))" >&2
        missing=1
    fi
done < "$here/fragment.config"
[ "$missing" = 0 ] || { echo "kernel: required options missing, see above" >&2; exit 1; }
echo "kernel: make -j$(nproc) bzImage"
make -j"$(nproc)" bzImage >"$work/make.log" 2>&1 || { tail -40 "$work/make.log" >&2; exit 1; }
cp arch/x86/boot/bzImage "$out/bzImage"
cp .config "$out/config"
echo "kernel: done ($(du -h "$out/bzImage" | cut -f1))"
