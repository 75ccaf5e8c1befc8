"""Checks before a device is taken from its host driver, each with its override.

Taking a device from the host can take the host's console, disk or network
with it. Each check names what it found and the ``--force`` value that
accepts it:

``boot-vga``       the device is the boot VGA (it likely drives the console)
``mounted``        a block device on it has mounted file systems
``default-route``  a network interface on it carries the default route
``in-use``         a process holds one of its device nodes open
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from kvmvfio.errors import KvmvfioError
from kvmvfio.host import PciDevice
from kvmvfio.vfio.files import holders

CHECKS = ("boot-vga", "mounted", "default-route", "in-use")


class UnsafeToUnbind(KvmvfioError):
    """Taking the device from its host driver would take something the host uses."""

    def __init__(self, address: str, driver: str, check: str, found: str) -> None:
        self.address = address
        self.driver = driver
        self.check = check
        self.found = found
        super().__init__(
            f"PCI device {address} ({driver}) {found}; taking it from the host could cut "
            f"off what uses it. Pass --force {check} to accept that"
        )


def _nodes_under(device_dir: Path) -> list[tuple[str, str]]:
    """(kind, "MAJ:MIN") of the device nodes registered under a PCI function's folder."""
    found = []
    for dirpath, dirnames, filenames in os.walk(device_dir, followlinks=False):
        # Do not wander into the functions behind a bridge, or into driver links.
        dirnames[:] = [d for d in dirnames if not d.startswith(("0000:", "driver", "subsystem"))]
        if "dev" in filenames and dirpath != str(device_dir):
            try:
                number = (Path(dirpath) / "dev").read_text().strip()
            except OSError:
                continue
            kind = "block" if "/block/" in dirpath or Path(dirpath, "partition").exists() else None
            if kind is None:
                sub = os.path.realpath(Path(dirpath) / "subsystem")
                kind = "block" if sub.endswith("/block") else "char"
            found.append((kind, number))
    return found


def _block_names(device_dir: Path) -> list[str]:
    names = []
    for dirpath, dirnames, _ in os.walk(device_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(("0000:", "driver", "subsystem"))]
        if (
            os.path.basename(os.path.dirname(dirpath)) == "block"
            or Path(dirpath, "partition").exists()
        ):
            names.append(os.path.basename(dirpath))
    return names


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
) -> list[str]:
    """Run the checks on a device about to leave its host driver.

    Raises :class:`UnsafeToUnbind` for the first check that finds something
    and is not in ``force``; returns the findings that ``force`` accepted.
    """
    addr = str(device.address)
    driver = device.driver or "no driver"
    folder = Path(sysfs) / "bus" / "pci" / "devices" / addr
    findings: list[tuple[str, str]] = []
    if device.boot_vga:
        findings.append(("boot-vga", "is the boot VGA device"))
    blocks = _block_names(folder)
    if blocks:
        mounts = Path(proc, "self", "mounts").read_text().split("\n")
        sources = {line.split(" ", 1)[0] for line in mounts if line}
        mounted = sorted(b for b in blocks if f"/dev/{b}" in sources)
        if mounted:
            findings.append(("mounted", f"has mounted file systems ({', '.join(mounted)})"))
    net = folder / "net"
    ifaces = set(os.listdir(net)) if net.is_dir() else set()
    routed = ifaces & _default_route_ifaces(Path(proc))
    if routed:
        findings.append(
            ("default-route", f"carries the default route ({', '.join(sorted(routed))})")
        )
    paths = [Path(devfs) / kind / number for kind, number in _nodes_under(folder)]
    busy = holders(*[os.path.realpath(p) for p in paths if p.exists()], proc=proc)
    if busy:
        findings.append(("in-use", f"is in use by {', '.join(busy)}"))
    accepted = []
    for name, found in findings:
        if name not in force:
            raise UnsafeToUnbind(addr, driver, name, found)
        accepted.append(f"{addr}: {found} (accepted by --force {name})")
    return accepted
