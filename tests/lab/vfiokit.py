"""What the kernel shows, read with bare syscalls: the lab tests' independent reference.

Nothing here uses kvmvfio's own VFIO code, so that a test comparing the two
checks kvmvfio against the kernel rather than against itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmvfio import uapi
from kvmvfio.lab.topology import Topology


def fd_table() -> dict[int, str]:
    table = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return table


def driver(addr: str) -> str | None:
    """The driver ``addr`` is bound to, as sysfs shows it (None: no driver)."""
    link = f"/sys/bus/pci/devices/{addr}/driver"
    return os.path.basename(os.readlink(link)) if os.path.exists(link) else None


def group_of(addr: str) -> int:
    return int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group")))


def cdev_of(addr: str) -> str:
    (name,) = os.listdir(f"/sys/bus/pci/devices/{addr}/vfio-dev")
    return f"/dev/vfio/devices/{name}"


def raw_group_open(addr: str) -> None:
    """Open ``addr`` through its group with bare ioctls, and close everything again.

    Raises OSError (EBUSY) while anything else holds the group or a cdev of it.
    """
    container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    try:
        group = os.open(f"/dev/vfio/{group_of(addr)}", os.O_RDWR | os.O_CLOEXEC)
        try:
            uapi.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, uapi.ffi.new("int32_t *", container))
            uapi.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
            name = uapi.ffi.new("char[]", addr.encode())
            os.close(uapi.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, name))
        finally:
            os.close(group)
    finally:
        os.close(container)


def raw_cdev_bind(addr: str) -> None:
    """Bind ``addr``'s cdev to a fresh iommufd with bare ioctls, and close again.

    Raises OSError (EINVAL) while another file has the device bound or open
    through its group.
    """
    iommufd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    try:
        dev = os.open(cdev_of(addr), os.O_RDWR | os.O_CLOEXEC)
        try:
            bind = uapi.new("vfio_device_bind_iommufd", iommufd=iommufd)
            uapi.ioctl(dev, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind)
        finally:
            os.close(dev)
    finally:
        os.close(iommufd)


def assert_released(addr: str) -> None:
    """Nothing holds ``addr`` any more: the kernel lets a newcomer open and bind it."""
    raw_group_open(addr)
    raw_cdev_bind(addr)


def expected_coherent(topology: Topology) -> bool:
    # intel-iommu enforces snooping only with snoop-control=on;
    # virtio-iommu has no enforce_cache_coherency at all.
    return topology.viommu == "intel-iommu" and topology.snoop_control


# -- tracefs (kprobes on what the kernel does) ------------------------------------------

TRACING = Path("/sys/kernel/tracing")


def tracefs_write(path: Path, text: str, *, truncate: bool = False) -> None:
    # Plain write(2): Python's append mode seeks to the end, which tracefs
    # files refuse (EINVAL).
    fd = os.open(path, os.O_WRONLY | (os.O_TRUNC if truncate else 0))
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def kprobe(
    name: str, definition: str, value: str, base: int = 10
) -> Iterator[Callable[[], list[int]]]:
    """A kprobe event ``name`` (``p:``/``r:`` ``definition`` as kprobe_events takes it).

    Yields a function returning, for each hit in this process, the integer
    the event printed as ``value=`` (in ``base``); the event is removed after.
    """
    if not (TRACING / "kprobe_events").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACING)], check=True)
    events = TRACING / "kprobe_events"
    line = re.compile(rf"-(\d+)\s+\[.*{name}:.* {value}=(?:0x)?([0-9a-f]+)")
    tracefs_write(events, f"{definition}\n")
    enable = TRACING / "events" / "kprobes" / name / "enable"
    try:
        tracefs_write(TRACING / "trace", "", truncate=True)
        tracefs_write(enable, "1")

        def seen() -> list[int]:
            me = str(os.getpid())
            return [
                int(m.group(2), base)
                for text in (TRACING / "trace").read_text().splitlines()
                if (m := line.search(text)) and m.group(1) == me
            ]

        yield seen
    finally:
        tracefs_write(enable, "0")
        tracefs_write(events, f"-:{name}\n")
