"""Resets in L1: what kvmvfio says a bus reset hits, and a device that stops answering.

The default topology has edu2 and edu3 behind a pcie-pci-bridge (br0), on
one secondary bus, and edu0 and the e1000e on the root bus. The kernel's own
answer to "what does a bus reset of edu2 hit" is
``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``, asked here with bare ioctls; kvmvfio
reads the same from sysfs before any VFIO file is opened.

A device that fell off the bus is made the way a real one looks to the
kernel: br0's secondary and subordinate bus numbers are moved, so config
cycles to edu2 and edu3 reach no device and the kernel reads all ones, and
put back after.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiokit import driver, group_of

from kvmvfio import uapi
from kvmvfio.lab.topology import Topology
from kvmvfio.prepare import recover
from kvmvfio.prepare.journal import Journal

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

PCI = Path("/sys/bus/pci/devices")
#: Offsets of a type 1 (bridge) header: secondary and subordinate bus numbers.
SECONDARY, SUBORDINATE = 0x19, 0x1A


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=120, check=False
    )


def kernel_hot_reset_set(addr: str) -> set[tuple[str, int]]:
    """(address, group) of every device the kernel says a hot reset of ``addr`` hits."""
    container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    group = os.open(f"/dev/vfio/{group_of(addr)}", os.O_RDWR | os.O_CLOEXEC)
    try:
        uapi.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, uapi.ffi.new("int32_t *", container))
        uapi.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        dev = uapi.ioctl(
            group, uapi.VFIO_GROUP_GET_DEVICE_FD, uapi.ffi.new("char[]", addr.encode())
        )
        try:
            info = uapi.new("vfio_pci_hot_reset_info", trailing=8)
            uapi.ioctl(dev, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info)
            return {
                (
                    f"{d.segment:04x}:{d.bus:02x}:{d.devfn >> 3:02x}.{d.devfn & 7}",
                    d.group_id,
                )
                for d in (info.devices[i] for i in range(info.count))
            }
        finally:
            os.close(dev)
    finally:
        os.close(group)
        os.close(container)


@pytest.fixture
def bridged(topology: Topology, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """edu2 and edu3 (one group behind br0) on vfio-pci by kvmvfio, put back after."""
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    before = (driver(edu2), driver(edu3))
    done = kvmvfio("prepare", "--owner", "reset-test", "--root", str(tmp_path), edu2, edu3)
    assert done.returncode == 0, done.stderr
    yield edu2, edu3
    recover(root=tmp_path)
    assert (driver(edu2), driver(edu3)) == before


def test_group_says_what_a_bus_reset_hits_as_the_kernel_does(
    topology: Topology, bridged: tuple[str, str]
) -> None:
    edu2, edu3 = bridged
    bridge = topology.guest_address("br0")
    # The kernel listed `bus` for edu2 when it added it, before edu3 was on the bus,
    # and none for edu3: a bus reset of edu2 alone is refused now.
    assert (PCI / edu2 / "reset_method").read_text().split() == ["bus"]
    assert not (PCI / edu3 / "reset_method").exists()
    done = kvmvfio("group", edu2, "--json")
    assert done.returncode == 0, done.stderr
    devices = {d["address"]: d for d in json.loads(done.stdout)["devices"]}
    reset = devices[edu2]["reset"]
    assert (reset["own"], reset["bridge"]) == (False, bridge)
    assert reset["affected"] == [{"address": edu3, "driver": "vfio-pci"}]
    # The kernel's answers, from vfio-pci: the reset it tried at open failed (no
    # VFIO_DEVICE_FLAGS_RESET) for both, and a hot reset hits both, each in its group.
    check = kvmvfio("check", "--no-kvm", "--json", edu2, edu3)
    assert check.returncode == 0, check.stderr
    doc = json.loads(check.stdout)
    assert {d["address"]: d["info"]["reset"] for d in doc["devices"]} == {
        edu2: False,
        edu3: False,
    }
    group = group_of(edu2)
    assert kernel_hot_reset_set(edu2) == {(edu2, group), (edu3, group)}
    text = kvmvfio("group", edu2).stdout
    assert (
        f"{edu2}: reset: none of its own (the kernel lists bus, but refuses it while others "
        f"share the bus); only a bus reset by bridge {bridge}, which also resets {edu3} "
        "(vfio-pci)\n"
    ) in text
    # check (the plan every way in uses) says it before anything is handed out.
    planned = {d["address"]: d["reset"] for d in doc["plan"]["devices"]}
    assert planned[edu2].startswith("none of its own (the kernel lists bus"), planned


def test_a_root_bus_function_has_no_bus_reset(topology: Topology) -> None:
    edu0, nic = topology.guest_address("edu0"), topology.guest_address("nic0")
    docs = {}
    for addr in (edu0, nic):
        done = kvmvfio("group", addr, "--json")
        docs[addr] = next(d for d in json.loads(done.stdout)["devices"] if d["address"] == addr)
    assert docs[edu0]["reset"] == {
        "own": False,
        "bridge": None,
        "affected": [],
        "summary": docs[edu0]["reset"]["summary"],
    }
    assert docs[edu0]["reset"]["summary"].startswith("reset: none; the kernel cannot reset it")
    methods = (PCI / nic / "reset_method").read_text().split()
    assert methods, "QEMU's e1000e has a reset the kernel knows"
    assert docs[nic]["reset_methods"] == methods
    assert (docs[nic]["reset"]["own"], docs[nic]["reset"]["bridge"]) == (True, None)


def _config_byte(addr: str, offset: int, value: int | None = None) -> int:
    fd = os.open(PCI / addr / "config", os.O_RDWR | os.O_CLOEXEC)
    try:
        if value is not None:
            os.pwrite(fd, bytes([value]), offset)
        return os.pread(fd, 1, offset)[0]
    finally:
        os.close(fd)


@contextlib.contextmanager
def cut_off(bridge: str) -> Iterator[None]:
    """``bridge``'s bus numbers moved away: the kernel reads all ones from what is behind it."""
    saved = (_config_byte(bridge, SECONDARY), _config_byte(bridge, SUBORDINATE))
    try:
        _config_byte(bridge, SUBORDINATE, 0xFE)
        _config_byte(bridge, SECONDARY, 0xFE)
        yield
    finally:
        _config_byte(bridge, SECONDARY, saved[0])
        _config_byte(bridge, SUBORDINATE, saved[1])


def vendor_bytes(addr: str) -> bytes:
    with open(PCI / addr / "config", "rb") as f:
        return f.read(2)


def test_release_keeps_a_device_that_does_not_answer(
    bridged: tuple[str, str], tmp_path: Path, topology: Topology
) -> None:
    edu2, edu3 = bridged
    assert vendor_bytes(edu2) == b"\x34\x12"  # edu's vendor ID, 0x1234, while it answers
    with cut_off(topology.guest_address("br0")):
        assert vendor_bytes(edu2) == b"\xff\xff", "the kernel reads all ones from it now"
        done = kvmvfio("release", "--root", str(tmp_path), edu2)
        assert done.returncode != 0
        assert done.stderr.startswith(
            f"kvmvfio: PCI device {edu2} does not answer (vendor ID reads 0xffff"
        )
        assert f"IOMMU group {group_of(edu2)} stays on vfio-pci, its record kept" in done.stderr
        assert "Traceback" not in done.stderr
        assert (driver(edu2), driver(edu3)) == ("vfio-pci", "vfio-pci")
        assert Journal(tmp_path).read(group_of(edu2)) is not None
    # Once it answers again, the same release gives the group back.
    assert vendor_bytes(edu2) == b"\x34\x12"
    done = kvmvfio("release", "--root", str(tmp_path), edu2)
    assert done.returncode == 0, done.stderr
    assert (driver(edu2), driver(edu3)) == (None, None)
    assert Journal(tmp_path).read(group_of(edu2)) is None
