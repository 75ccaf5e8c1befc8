"""SR-IOV on the lab's 6.12 kernel: what sysfs and VFIO do with a real PF and its VFs.

The ``sriov`` topology's PF is QEMU's NVMe controller with SR-IOV (4 VFs at
most), bound to L1's nvme driver at boot. These tests pin down the kernel's
rules that kvmvfio's SR-IOV support builds on (docs/sriov.md says what each
one means): how VFs come and go through ``sriov_numvfs``, which IOMMU group
each VF gets, that a VF is opened like any function once on vfio-pci, and
the VF token vfio-pci asks for when the PF itself is on vfio-pci, on the
group path and (not, on 6.12) on the cdev path.

Every test starts from the PF as booted (nvme, no VFs, autoprobe 1,
vfio-pci's ``enable_sriov`` off) and the ``pf`` fixture puts that back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiokit import cdev_of, driver, group_of

from kvmvfio.errors import KernelError
from kvmvfio.lab.topology import Topology
from kvmvfio.vfio.container import Container
from kvmvfio.vfio.device import Device
from kvmvfio.vfio.group import Group
from kvmvfio.vfio.iommufd import Iommufd

pytestmark = [pytest.mark.lab, pytest.mark.topology("sriov")]

PCI = Path("/sys/bus/pci")
ENABLE_SRIOV = Path("/sys/module/vfio_pci/parameters/enable_sriov")


def write(path: Path, text: str) -> None:
    """One write(2) of ``text`` to a sysfs file; the kernel's refusal is the OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def refused(path: Path, text: str) -> int:
    """The errno of the kernel's refusal of ``text`` written to ``path``."""
    try:
        write(path, text)
    except OSError as err:
        return err.errno or 0
    raise AssertionError(f"the kernel took {text!r} written to {path}")


class Pf:
    """The PF's sysfs folder."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.dir = PCI / "devices" / addr

    def read(self, name: str) -> str:
        return (self.dir / name).read_text().strip()

    def set_numvfs(self, count: int) -> None:
        write(self.dir / "sriov_numvfs", str(count))

    def set_autoprobe(self, on: bool) -> None:
        write(self.dir / "sriov_drivers_autoprobe", "1" if on else "0")

    def vfs(self) -> list[str]:
        """The VFs' addresses, VF 0 first (the ``virtfnN`` links)."""
        links = sorted(self.dir.glob("virtfn*"), key=lambda p: int(p.name[len("virtfn") :]))
        return [os.path.basename(os.readlink(link)) for link in links]

    def bind(self, new: str | None) -> None:
        """Move the PF to driver ``new`` (None: the driver its ids choose, i.e. nvme)."""
        if driver(self.addr) is not None:
            write(self.dir / "driver" / "unbind", self.addr)
        write(self.dir / "driver_override", new if new is not None else "\n")
        write(PCI / "drivers_probe", self.addr)
        assert driver(self.addr) == (new or "nvme")


@pytest.fixture
def pf(topology: Topology) -> Iterator[Pf]:
    """The PF as booted, put back after the test (no VFs, nvme, autoprobe, enable_sriov)."""
    dev = Pf(topology.guest_address("sriov0"))
    booted = (driver(dev.addr), dev.read("sriov_drivers_autoprobe"), ENABLE_SRIOV.read_text())
    assert booted == ("nvme", "1", "N\n"), "the PF is not as booted: an earlier test left it"
    assert dev.vfs() == []
    reset_methods = dev.read("reset_method")
    yield dev
    # The count first (vfio-pci refuses even 0 while enable_sriov is off),
    # then the PF's driver, then the knobs.
    if dev.vfs():
        if driver(dev.addr) == "vfio-pci":
            write(ENABLE_SRIOV, "Y")
        dev.set_numvfs(0)
    if driver(dev.addr) != "nvme":
        dev.bind(None)
    dev.set_autoprobe(True)
    write(ENABLE_SRIOV, "N")
    write(dev.dir / "reset_method", reset_methods)
    assert dev.vfs() == []


def bind_vf(vf: str) -> None:
    """VF to vfio-pci (it goes with the count: nothing to undo)."""
    if driver(vf) is not None:
        write(PCI / "devices" / vf / "driver" / "unbind", vf)
    write(PCI / "devices" / vf / "driver_override", "vfio-pci")
    write(PCI / "drivers_probe", vf)
    assert driver(vf) == "vfio-pci"


@contextlib.contextmanager
def group_path(addr: str) -> Iterator[Group]:
    """``addr``'s group in a type1 container of its own, ready for VFIO_GROUP_GET_DEVICE_FD."""
    with Container() as container, Group(group_of(addr)) as group:
        group.set_container(container.fileno())
        container.set_iommu()
        yield group


def open_errno(group: Group, name: str, token: uuid.UUID | None = None) -> int:
    """The errno of VFIO_GROUP_GET_DEVICE_FD's refusal of ``name`` (and ``token``)."""
    with pytest.raises(KernelError) as caught:
        group.open_device(name, vf_token=token).close()
    assert caught.value.errno is not None
    return caught.value.errno


def vfio_pci_pf_with_vfs(pf: Pf, count: int) -> list[str]:
    """PF on vfio-pci with ``enable_sriov`` on, ``count`` VFs (autoprobe off: no driver yet).

    The PF's reset methods are turned off first: vfio-pci resets a device
    when it is opened and closed, and QEMU 7.2's nvme drops its VFs on a
    function reset (``nvme_ctrl_reset``: ``pcie_sriov_pf_disable_vfs``); L1
    keeps them, and each VF opened afterwards waits 65 s for an FLR that
    never completes (docs/sriov.md). Real PFs bring their VFs back.
    """
    write(pf.dir / "reset_method", "\n")
    pf.bind("vfio-pci")
    pf.set_autoprobe(False)
    write(ENABLE_SRIOV, "Y")
    pf.set_numvfs(count)
    return pf.vfs()


# -- sysfs: the count, autoprobe, groups -----------------------------------------------


def test_the_pf_as_booted(pf: Pf) -> None:
    assert pf.addr == "0000:00:04.0"
    assert pf.read("sriov_totalvfs") == "4"
    assert pf.read("sriov_numvfs") == "0"
    assert (pf.read("sriov_offset"), pf.read("sriov_stride")) == ("1", "1")
    # vfio-pci's module parameter is writable at run time (mode 0644).
    assert ENABLE_SRIOV.stat().st_mode & 0o777 == 0o644


def test_vfs_without_autoprobe_have_no_driver_and_groups_of_their_own(pf: Pf) -> None:
    pf_group = group_of(pf.addr)
    pf.set_autoprobe(False)
    pf.set_numvfs(2)
    vfs = pf.vfs()
    assert vfs == ["0000:00:04.1", "0000:00:04.2"]
    for vf in vfs:
        assert driver(vf) is None
        assert (PCI / "devices" / vf / "driver_override").read_text() == "(null)\n"
        assert os.path.basename(os.readlink(PCI / "devices" / vf / "physfn")) == pf.addr
        assert os.listdir(f"/sys/kernel/iommu_groups/{group_of(vf)}/devices") == [vf]
    assert len({group_of(vf) for vf in vfs} | {pf_group}) == 3
    assert group_of(pf.addr) == pf_group


def test_the_count_goes_through_zero(pf: Pf) -> None:
    pf.set_autoprobe(False)
    pf.set_numvfs(2)
    assert refused(pf.dir / "sriov_numvfs", "3") == errno.EBUSY
    pf.set_numvfs(2)  # the same count: accepted, nothing happens
    assert refused(pf.dir / "sriov_numvfs", "5") == errno.ERANGE  # more than sriov_totalvfs
    assert pf.read("sriov_numvfs") == "2"
    pf.set_numvfs(0)
    assert pf.vfs() == []
    pf.set_numvfs(3)
    assert len(pf.vfs()) == 3


def test_a_vf_on_vfio_pci_opens_on_both_paths(pf: Pf) -> None:
    pf.set_autoprobe(False)
    pf.set_numvfs(2)
    vf = pf.vfs()[0]
    bind_vf(vf)
    with group_path(vf) as group:
        with group.open_device(vf) as device:
            assert device.info().is_pci
        # A token for a VF whose PF is not on vfio-pci is a mistake to the kernel.
        assert open_errno(group, vf, uuid.uuid4()) == errno.EINVAL
    cdev = os.path.basename(cdev_of(vf))
    with Iommufd() as iommufd, Device.open_cdev(vf, cdev) as device:
        device.bind_iommufd(iommufd.fileno())


def kernel_log() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()


def test_autoprobe_gives_the_vfs_to_nvme_which_gives_up(pf: Pf) -> None:
    """QEMU's secondary controllers are offline until ``nvme virt-mgmt`` gives them resources.

    nvme probes each VF (asynchronously), reads CSTS.CFS and gives up at
    once: the VFs stay without a driver.
    """
    gave_up = "Device not ready; aborting initialisation, CSTS=0x2"
    before = sum(gave_up in line for line in kernel_log())
    pf.set_numvfs(2)  # autoprobe is on, as booted
    deadline = time.monotonic() + 30
    while sum(gave_up in line for line in kernel_log()) < before + 2:
        assert time.monotonic() < deadline, "nvme did not try both VFs within 30 s"
        time.sleep(0.2)
    assert [driver(vf) for vf in pf.vfs()] == [None, None]


_HOLDER = """
import sys, time
from kvmvfio.vfio.container import Container
from kvmvfio.vfio.group import Group
vf, number = sys.argv[1], int(sys.argv[2])
with Container() as container, Group(number) as group:
    group.set_container(container.fileno())
    container.set_iommu()
    with group.open_device(vf):
        print("open", flush=True)
        time.sleep(300)
"""


def test_the_count_waits_for_an_open_vf(pf: Pf) -> None:
    """Writing 0 blocks while a VF is open, and ends once it is closed.

    vfio-pci's remove waits for the device's users ("No device request
    channel registered, blocked until released by user"). Reading
    ``sriov_numvfs`` meanwhile would block too (the PF's device lock).
    """
    pf.set_autoprobe(False)
    pf.set_numvfs(2)
    vf = pf.vfs()[0]
    bind_vf(vf)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, vf, str(group_of(vf))], stdout=subprocess.PIPE, text=True
    )
    writer = threading.Thread(target=pf.set_numvfs, args=(0,))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "open\n"
        writer.start()
        writer.join(3)
        assert writer.is_alive()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    closed = time.monotonic()
    writer.join(30)
    assert not writer.is_alive()
    assert time.monotonic() - closed < 10
    assert pf.vfs() == []


# -- the PF on vfio-pci ------------------------------------------------------------------


def test_vfio_pci_makes_vfs_only_with_enable_sriov(pf: Pf) -> None:
    pf.bind("vfio-pci")
    assert refused(pf.dir / "sriov_numvfs", "2") == errno.ENOENT
    write(ENABLE_SRIOV, "Y")
    pf.set_numvfs(2)  # autoprobe on: the VFs go straight to vfio-pci
    for vf in pf.vfs():
        # vfio-pci's bus notifier sets each new VF's driver_override to its own name.
        assert (PCI / "devices" / vf / "driver_override").read_text() == "vfio-pci\n"
        assert driver(vf) == "vfio-pci"
    # With enable_sriov off again, vfio-pci refuses every count, 0 included.
    write(ENABLE_SRIOV, "N")
    assert refused(pf.dir / "sriov_numvfs", "0") == errno.ENOENT


def test_vf_token_on_the_group_path(pf: Pf) -> None:
    vf, _ = vfio_pci_pf_with_vfs(pf, 2)
    bind_vf(vf)
    token = uuid.uuid4()
    with group_path(pf.addr) as pf_group, group_path(vf) as vf_group:
        with pf_group.open_device(pf.addr) as pf_device:
            pf_device.set_vf_token(token)
        assert open_errno(vf_group, vf) == errno.EACCES
        assert open_errno(vf_group, vf, uuid.uuid4()) == errno.EACCES
        assert open_errno(vf_group, f"{vf} vf_token=not-a-uuid") == errno.EINVAL
        with vf_group.open_device(vf, vf_token=token):
            # A VF in use: the PF now wants the token too.
            assert open_errno(pf_group, pf.addr) == errno.EACCES
            assert open_errno(pf_group, pf.addr, uuid.uuid4()) == errno.EACCES
            pf_group.open_device(pf.addr, vf_token=token).close()
        # No VF in use: the PF opens without one again.
        pf_group.open_device(pf.addr).close()


def test_cdev_path_checks_no_vf_token_on_6_12(pf: Pf) -> None:
    """6.12 checks the token only in vfio_pci_core_match, i.e. VFIO_GROUP_GET_DEVICE_FD.

    The cdev's VFIO_DEVICE_BIND_IOMMUFD has no token field on 6.12 (later
    kernels add VFIO_DEVICE_BIND_FLAG_TOKEN), so a VF of a vfio-pci PF binds
    with none; it still counts as a VF user, so the PF's group path then
    wants the token.
    """
    vf, _ = vfio_pci_pf_with_vfs(pf, 2)
    bind_vf(vf)
    cdev = os.path.basename(cdev_of(vf))
    with Iommufd() as iommufd, Device.open_cdev(vf, cdev) as device:
        device.bind_iommufd(iommufd.fileno())
        with group_path(pf.addr) as pf_group:
            assert open_errno(pf_group, pf.addr) == errno.EACCES
    with group_path(vf) as vf_group:
        assert open_errno(vf_group, vf) == errno.EACCES


def test_unbinding_a_vfio_pci_pf_removes_its_vfs(pf: Pf) -> None:
    vfs = vfio_pci_pf_with_vfs(pf, 2)
    bind_vf(vfs[0])
    started = time.monotonic()
    pf.bind(None)
    assert pf.vfs() == []
    assert not (PCI / "devices" / vfs[0]).exists()
    assert time.monotonic() - started < 30
