"""PCI hot reset on the real kernel: what it reaches, that it happens, and what is refused.

edu2 and edu3 sit behind the pcie-pci-bridge br0, on its secondary bus, in
one IOMMU group: a hot reset of either is a secondary bus reset of br0 and
reaches both. edu0 is on the root bus, where there is no bus to reset.

That the kernel really reset the bus is read from a kprobe on
``pci_reset_bus``, counted for this process only. vfio-pci itself also
resets the bus when the last device of the set is closed and one of them
has no reset of its own (``vfio_pci_dev_set_try_reset``), so the count of a
hot reset is compared with the count of only asking (open, ask, close).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfiokit import assert_released, cdev_of, driver, group_of, kprobe

from kvmvfio.errors import Busy, HotResetBlocked, NoBusReset
from kvmvfio.lab.topology import Topology
from kvmvfio.prepare import prepare, release
from kvmvfio.vfio import hot_reset, hot_reset_info

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

PATHS = ("group", "group-iommufd", "cdev")
OWNER = "hot-reset-test"


@pytest.fixture
def prepared(topology: Topology, tmp_path: Path) -> Iterator[Callable[..., list[str]]]:
    """``prepared("edu2", ...)`` puts devices on vfio-pci with kvmvfio.prepare; released after."""
    done: list[str] = []
    before: dict[str, str | None] = {}

    def put(*ids: str) -> list[str]:
        addrs = [topology.guest_address(i) for i in ids]
        before.update({a: driver(a) for a in addrs if a not in before})
        prepare(addrs, OWNER, root=tmp_path)
        done.extend(addrs)
        return addrs

    yield put
    if done:
        release(done, root=tmp_path)
    assert {a: driver(a) for a in before} == before


@pytest.fixture
def bus_resets() -> Iterator[Callable[[], int]]:
    """How many times this process made the kernel call ``pci_reset_bus`` so far."""
    definition = "p:kvmvfio_reset_bus pci_reset_bus dev=%di:x64"
    with kprobe("kvmvfio_reset_bus", definition, "dev", 16) as seen:
        yield lambda: len(seen())


@pytest.mark.parametrize("path", PATHS)
def test_info_names_the_bus(path: str, prepared: Callable[..., list[str]]) -> None:
    edu2, edu3 = prepared("edu2", "edu3")
    report = hot_reset_info([edu2], path=path)
    assert not report.done
    assert report.path == path
    (info,) = report.resets
    assert info.address == edu2
    assert info.addresses == (edu2, edu3)
    if path == "cdev":
        assert info.by_devid
        assert [d.group for d in info.devices] == [None, None]
        assert all(d.owned for d in info.devices)
        # edu2 is bound to the iommufd asked through; edu3 is not, but its group is
        # held by that iommufd: VFIO_PCI_DEVID_OWNED, no devid.
        assert info.devices[0].devid is not None
        assert info.devices[1].devid is None
        assert info.all_owned
    else:
        assert not info.by_devid
        assert [d.group for d in info.devices] == [group_of(edu2)] * 2
    assert_released(edu2)
    assert_released(edu3)


@pytest.mark.parametrize("path", PATHS)
def test_a_hot_reset_resets_the_bus(
    path: str,
    prepared: Callable[..., list[str]],
    bus_resets: Callable[[], int],
    no_fd_leak: None,
) -> None:
    edu2, edu3 = prepared("edu2", "edu3")
    start = bus_resets()
    hot_reset_info([edu2, edu3], path=path)
    asked = bus_resets()
    report = hot_reset([edu2, edu3], path=path)
    assert report.done
    assert report.path == path
    assert report.reset == (edu2, edu3)
    # One more bus reset than opening, asking and closing makes.
    assert bus_resets() - asked == asked - start + 1
    assert_released(edu2)
    assert_released(edu3)


@pytest.mark.parametrize("path", ["group", "cdev"])
def test_a_function_not_named_is_refused_before_the_reset(
    path: str,
    prepared: Callable[..., list[str]],
    bus_resets: Callable[[], int],
    no_fd_leak: None,
) -> None:
    edu2, edu3 = prepared("edu2", "edu3")
    start = bus_resets()
    hot_reset_info([edu2], path=path)
    asked = bus_resets()
    with pytest.raises(HotResetBlocked) as refused:
        hot_reset([edu2], path=path)
    assert [b.address for b in refused.value.bystanders] == [edu3]
    assert f"{edu3} (group {group_of(edu3)}): on vfio-pci but not asked for" in str(refused.value)
    # No reset beyond what opening and closing makes.
    assert bus_resets() - asked == asked - start
    assert (driver(edu2), driver(edu3)) == ("vfio-pci", "vfio-pci")
    assert_released(edu2)
    assert_released(edu3)


@pytest.mark.parametrize("path", ["group", "cdev"])
def test_a_function_on_no_driver_is_named(
    path: str,
    topology: Topology,
    vfio_bind: Callable[..., None],
    bus_resets: Callable[[], int],
    no_fd_leak: None,
) -> None:
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    vfio_bind(edu2)
    assert driver(edu3) is None  # the lab's edu has no L1 driver
    start = bus_resets()
    hot_reset_info([edu2], path=path)
    asked = bus_resets()
    with pytest.raises(HotResetBlocked) as refused:
        hot_reset([edu2], path=path)
    (edu3_why,) = refused.value.bystanders
    assert (edu3_why.address, edu3_why.driver) == (edu3, None)
    assert f"{edu3} (group {group_of(edu3)}): bound to no driver, not vfio-pci" in str(
        refused.value
    )
    assert bus_resets() - asked == asked - start
    assert (driver(edu2), driver(edu3)) == ("vfio-pci", None)
    assert_released(edu2)


HOLD = """
import os, sys
from kvmvfio import uapi
iommufd = os.open("/dev/iommu", os.O_RDWR)
dev = os.open(sys.argv[1], os.O_RDWR)
bind = uapi.new("vfio_device_bind_iommufd", iommufd=iommufd)
uapi.ioctl(dev, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind)
print("bound", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("path", ["group", "cdev"])
def test_a_function_held_elsewhere_names_the_holder(
    path: str, prepared: Callable[..., list[str]], no_fd_leak: None
) -> None:
    edu2, edu3 = prepared("edu2", "edu3")
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), cdev_of(edu3)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        try:
            assert holder.stdout.readline().strip() == "bound"
            with pytest.raises(Busy) as refused:
                hot_reset([edu2, edu3], path=path)
        finally:
            holder.kill()
    assert refused.value.holder is not None
    assert f"pid {holder.pid} (" in refused.value.holder
    assert_released(edu2)
    assert_released(edu3)


@pytest.mark.parametrize("path", ["group", "cdev"])
def test_a_root_bus_device_has_no_hot_reset(
    path: str, prepared: Callable[..., list[str]], no_fd_leak: None
) -> None:
    (edu0,) = prepared("edu0")
    with pytest.raises(NoBusReset) as refused:
        hot_reset([edu0], path=path)
    assert refused.value.errno == errno.ENODEV
    assert f"{edu0} is on a root bus or has no slot or bus reset" in str(refused.value)
    assert driver(edu0) == "vfio-pci"
    assert_released(edu0)


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_command(prepared: Callable[..., list[str]]) -> None:
    edu0, edu2, edu3 = prepared("edu0", "edu2", "edu3")
    done = kvmvfio("reset", "--info", "--json", "--path", "group", edu2)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [d["address"] for d in doc["resets"][0]["devices"]] == [edu2, edu3]
    assert doc["reset"] is False
    done = kvmvfio("reset", edu2, edu3)
    assert done.returncode == 0, done.stderr
    assert f"reset through {edu2}" in done.stdout
    done = kvmvfio("reset", edu0)
    assert done.returncode == 1
    assert "root bus" in done.stderr
    assert "Traceback" not in done.stderr
