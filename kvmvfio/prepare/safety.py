"""Checks before a device is taken from its host driver, each with its override.

Taking a device from the host can take the host's console, disk or network
with it. Each check names what it found and the ``--force`` value that
accepts it:

``boot-vga``       the device is the boot VGA (it likely drives the console)
``console``        the host's console or display uses it beyond its driver: fbcon
                   draws on its framebuffer, a process (the DRM master) holds
                   its DRM card open, or a firmware framebuffer keeps memory in
                   one of its BARs (:mod:`kvmvfio.host.console`)
``disk-in-use``    a disk behind it is in use: mounted, swap, under device
                   mapper (LVM, LUKS) or md RAID, or claimed by the kernel
                   (``mounted``, its old name, is still accepted)
``default-route``  a network interface on it carries the default route
``in-use``         a process holds one of its device nodes open
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from kvmvfio.errors import Interface, interface
from kvmvfio.host import PciDevice
from kvmvfio.host.blockdev import BlockUse, ExclusiveProbe, UseKind, disk_uses, exclusive_claim
from kvmvfio.host.console import ConsoleUse, console_use
from kvmvfio.host.procs import holders
from kvmvfio.prepare.errors import UnsafeToUnbind, accept_advice  # noqa: F401 (re-exported)

CHECKS = ("boot-vga", "console", "disk-in-use", "default-route", "in-use")
#: Old names of checks, still accepted wherever a check is named (``--force``).
ALIASES = {"mounted": "disk-in-use"}
#: At most this many uses are named in a refusal; the rest are counted.
MAX_SHOWN = 6


def canonical(name: str) -> str:
    """The name of check ``name`` (an old name gives the current one; unknown names pass)."""
    return ALIASES.get(name, name)


def accepted_by(check: str) -> str:
    """What accepted finding ``check``, for the notes :func:`check` returns."""
    return {
        Interface.CLI: f"--force {check}",
        Interface.METADATA: f"accept='{check}' in the domain's metadata",
        Interface.API: f"force={check!r}",
    }[interface()]


def _nodes_under(device_dir: Path, devfs: Path) -> list[Path]:
    """The device nodes of what is registered under a PCI function's folder.

    Each is found by the name the kernel gives it in devtmpfs (``DEVNAME``
    in its ``uevent``), checked against its ``dev`` number; udev's
    ``/dev/block/MAJ:MIN`` and ``/dev/char/MAJ:MIN`` links are the fallback,
    since a host without udev (an initramfs, a container) has none.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(device_dir, followlinks=False):
        # Do not wander into the functions behind a bridge, or into driver links.
        dirnames[:] = [d for d in dirnames if not d.startswith(("0000:", "driver", "subsystem"))]
        if "dev" in filenames and dirpath != str(device_dir):
            try:
                number = (Path(dirpath) / "dev").read_text().strip()
                major, minor = (int(n) for n in number.split(":"))
            except (OSError, ValueError):
                continue
            kind = "block" if "/block/" in dirpath or Path(dirpath, "partition").exists() else None
            if kind is None:
                sub = os.path.realpath(Path(dirpath) / "subsystem")
                kind = "block" if sub.endswith("/block") else "char"
            node = _devname_node(Path(dirpath), devfs, os.makedev(major, minor))
            found.append(node or devfs / kind / number)
    return found


def _devname_node(folder: Path, devfs: Path, rdev: int) -> Path | None:
    try:
        uevent = (folder / "uevent").read_text(errors="replace")
    except OSError:
        return None
    for line in uevent.splitlines():
        name = line.removeprefix("DEVNAME=")
        if name != line and name and ".." not in name.split("/"):
            node = devfs / name
            try:
                if os.stat(node).st_rdev == rdev:
                    return node
            except OSError:
                return None
    return None


_CLAIMED = (
    "claimed exclusively by the kernel "
    "(a file system, RAID or device mapper kvmvfio could not name)"
)


def describe_use(use: BlockUse) -> str:
    """One use as a sentence: ``vdb1 is used by dm-0 (LVM vg0-data), which is mounted on /data``."""
    if not use.device:
        return use.detail
    text = use.device
    for i, holder in enumerate(use.via):
        verb = "is a member of" if holder.is_md else "is used by"
        text += f" {verb} " if i == 0 else f", which {verb} "
        text += holder.shown()
    if use.kind is UseKind.HELD:
        return text
    text += ", which" if use.via else ""
    if use.kind is UseKind.MOUNTED:
        return f"{text} is mounted on {', '.join(use.mountpoints)}"
    if use.kind is UseKind.SWAP:
        return f"{text} is swap"
    if use.kind is UseKind.CLAIMED:
        return f"{text} is {_CLAIMED}"
    return f"{text} might be in use ({use.detail})"


def _disks_finding(uses: tuple[BlockUse, ...]) -> str:
    said = list(dict.fromkeys(describe_use(u) for u in uses))
    more = len(said) - MAX_SHOWN
    tail = f"; and {more} more" if more > 0 else ""
    return f"has disks in use: {'; '.join(said[:MAX_SHOWN])}{tail}"


def console_finding(use: ConsoleUse) -> str | None:
    """What holds a display function beyond its driver, with what frees each; None: nothing."""
    said = []
    if use.console:
        fbs = ", ".join(f.name for f in use.framebuffers)
        unbind = " and ".join(f"`echo 0 > /sys/class/vtconsole/{v}/bind`" for v in use.fbcon)
        said.append(
            f"carries the framebuffer console (fbcon on {fbs}, {', '.join(use.fbcon)}): "
            f"{unbind} moves the console off it"
        )
    for node in use.held:
        said.append(
            f"has its DRM device {node.node} open in {', '.join(node.holders[:MAX_SHOWN])} "
            "(a display server or compositor, the DRM master, is one): stop the display "
            "manager or the program"
        )
    for fb in use.firmware:
        said.append(
            f"has a firmware framebuffer ({fb.owner}, {fb.range}) in its BAR {fb.bar} "
            f"({fb.bar_range}), which keeps vfio-pci from reserving it: unbind the framebuffer's "
            "platform device from its driver, or boot with `video=efifb:off` or "
            "`initcall_blacklist=sysfb_init`"
        )
    return "; and ".join(said) or None


def _default_route_ifaces(proc: Path) -> set[str]:
    try:
        lines = (proc / "net" / "route").read_text().splitlines()[1:]
    except OSError:
        return set()
    out = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            out.add(fields[0])
    return out


def check(
    device: PciDevice,
    sysfs: str | Path = "/sys",
    *,
    force: Collection[str] = (),
    proc: str | Path = "/proc",
    devfs: str | Path = "/dev",
    probe: ExclusiveProbe = exclusive_claim,
) -> list[str]:
    """Run the checks on a device about to leave its host driver; change nothing.

    ``force`` names the checks whose findings are accepted (old names, see
    :data:`ALIASES`, too). ``probe`` tells whether the kernel holds a disk
    exclusively (see :func:`kvmvfio.host.blockdev.disk_uses`). Raises
    :class:`UnsafeToUnbind` for the first check that finds something and
    is not in ``force``; returns the findings that ``force`` accepted.
    """
    forced = {canonical(name) for name in force}
    addr = str(device.address)
    driver = device.driver or "no driver"
    folder = Path(sysfs) / "bus" / "pci" / "devices" / addr
    findings: list[tuple[str, str]] = []
    if device.class_code >> 16 == 0x03:
        found = console_finding(console_use(addr, sysfs, proc=proc, devfs=devfs))
        if found:
            findings.append(("console", found))
    if device.boot_vga:
        findings.append(("boot-vga", "is the boot VGA device"))
    disks = disk_uses(folder, sysfs=sysfs, proc=proc, devfs=devfs, probe=probe)
    if disks:
        findings.append(("disk-in-use", _disks_finding(disks)))
    net = folder / "net"
    ifaces = set(os.listdir(net)) if net.is_dir() else set()
    routed = ifaces & _default_route_ifaces(Path(proc))
    if routed:
        findings.append(
            ("default-route", f"carries the default route ({', '.join(sorted(routed))})")
        )
    paths = _nodes_under(folder, Path(devfs))
    busy = holders(*[os.path.realpath(p) for p in paths if p.exists()], proc=proc)
    if busy:
        findings.append(("in-use", f"is in use by {', '.join(busy)}"))
    accepted = []
    for name, found in findings:
        if name not in forced:
            raise UnsafeToUnbind(addr, driver, name, found)
        accepted.append(f"{addr}: {found} (accepted by {accepted_by(name)})")
    return accepted
