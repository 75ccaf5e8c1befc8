#!/usr/bin/env bash
# Build the L1 root filesystem image: Debian trixie minbase by debootstrap,
# packages.txt by apt-get in a chroot, pip.txt from wheels downloaded on the
# host, and our init. Usage: build.sh OUTDIR WORKDIR
set -euo pipefail
out=$1 work=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$work/root
for tool in debootstrap mkfs.ext4 pip3; do
    command -v "$tool" >/dev/null || { echo "rootfs: $tool not found" >&2; exit 1; }
done
# The mirror this machine's apt already uses (deb822 sources, then sources.list).
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
[ -n "$mirror" ] || { echo "rootfs: no Debian mirror found in /etc/apt sources" >&2; exit 1; }

cleanup() {
    for m in dev/pts dev proc sys; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    return 0
}
trap cleanup EXIT
cleanup
if [ -e "$root" ]; then
    echo "rootfs: removing the previous tree"
    rm -rf "$root"
fi
mkdir -p "$root" "$out"
echo "rootfs: debootstrap trixie (minbase)"
debootstrap --variant=minbase trixie "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -30 "$work/debootstrap.log" >&2; exit 1; }
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
# trixie-backports too: apt takes nothing from it but what packages.txt
# names as PACKAGE/trixie-backports (and what that needs).
echo "deb $mirror trixie-backports main" >"$root/etc/apt/sources.list.d/backports.list"
chmod +x "$root/usr/sbin/policy-rc.d"
pkgs=$(grep -v '^#' "$here/packages.txt" | xargs)
echo "rootfs: apt-get install $pkgs"
chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends $pkgs" >"$work/apt.log" 2>&1 ||
    { tail -30 "$work/apt.log" >&2; exit 1; }
echo "rootfs: pip packages"
wheels=$work/wheels
rm -rf "$wheels"; mkdir -p "$wheels"
grep -v '^#' "$here/pip.txt" | xargs pip3 download -q --no-deps -d "$wheels"
cp -r "$wheels" "$root/tmp/wheels"
chroot "$root" sh -c 'pip3 install -q --no-index --find-links /tmp/wheels --break-system-packages /tmp/wheels/*' ||
    { echo "rootfs: pip install in the chroot failed" >&2; exit 1; }
rm -rf "$root/tmp/wheels" "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
install -m 0755 "$here/init" "$root/sbin/kvmvfio-init"
install -m 0755 "$here/kvmvfio-wrapper" "$root/usr/local/bin/kvmvfio"
echo 'kvmvfio-lab' >"$root/etc/hostname"
cleanup
size_mb=$(( $(du -sm "$root" | cut -f1) * 13 / 10 + 512 ))
echo "rootfs: mkfs.ext4 (${size_mb} MiB)"
rm -f "$out/rootfs.img"
mkfs.ext4 -q -L kvmvfio-lab -d "$root" "$out/rootfs.img" "${size_mb}M"
echo "rootfs: done"
