"""What each lab topology gives L1, checked against the real kernel.

These are the lab's own acceptance tests: the IOMMU groups each topology
implies, the VFIO/iommufd/KVM nodes, a device bound to vfio-pci with a
viable group and its cdev, and the IOMMU's answer to enforced DMA cache
coherency (0 on ``default``, 1 on ``coherent``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmvfio import uapi
from kvmvfio.host import Host, IommuKind, NoGroupCause
from kvmvfio.lab.topology import Topology

pytestmark = pytest.mark.lab


def _group_members(number: int) -> set[str]:
    return set(os.listdir(f"/sys/kernel/iommu_groups/{number}/devices"))


def _group_of(addr: str) -> int:
    return int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group")))


def _kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.topology("default", "coherent")
def test_groups_the_topology_implies(topology: Topology) -> None:
    edu0, edu1 = topology.guest_address("edu0"), topology.guest_address("edu1")
    bridge = topology.guest_address("br0")
    behind = {topology.guest_address("edu2"), topology.guest_address("edu3")}
    # Each edu on the root bus sits alone in its group.
    assert _group_members(_group_of(edu0)) == {edu0}
    assert _group_members(_group_of(edu1)) == {edu1}
    assert _group_of(edu0) != _group_of(edu1)
    # A PCIe-to-PCI bridge cannot isolate its children: one group for all three.
    assert _group_members(_group_of(bridge)) == {bridge, *behind}
    # kvmvfio's host model sees the same groups.
    host = Host()
    assert {str(d.address) for d in host.group(_group_of(bridge)).members} == {bridge, *behind}


@pytest.mark.topology("virtio-iommu")
def test_virtio_iommu_groups_devices_when_a_driver_binds(
    topology: Topology, vfio_bind: Callable[..., None]
) -> None:
    """virtio-iommu gives a device its group at DMA configuration, i.e. when a driver binds."""
    nic = topology.guest_address("nic0")
    # edu1: no other test of this topology binds it, so it has never had a
    # driver in this boot (a group, once made, stays after the unbind).
    edu1 = topology.guest_address("edu1")
    assert _group_members(_group_of(nic)) == {nic}  # e1000e bound at boot
    assert not Path(f"/sys/bus/pci/devices/{edu1}/iommu_group").exists()
    # kvmvfio says so; prepare refuses with that, and changes nothing.
    why = Host().no_group(edu1)
    assert why is not None
    assert (why.cause, why.iommu) == (NoGroupCause.NOT_PROBED, IommuKind.VIRTIO)
    assert why.bind_gives_group
    refused = _kvmvfio("prepare", "--owner", "lab-nogroup", edu1)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"kvmvfio: PCI device {edu1} is in no IOMMU group: {why.reason}\n",
    )
    assert not Path(f"/sys/bus/pci/devices/{edu1}/driver").exists()
    vfio_bind(edu1)  # what the sentence says to do
    assert _group_members(_group_of(edu1)) == {edu1}
    # ... after which prepare takes the device as it is.
    done = _kvmvfio("prepare", "--owner", "lab-nogroup", edu1)
    assert done.returncode == 0, done.stderr
    assert _kvmvfio("release", "--owner", "lab-nogroup", edu1).returncode == 0


def test_vfio_iommufd_and_kvm_nodes_exist() -> None:
    support = Host().support()
    assert Path("/dev/vfio/vfio").is_char_device()
    assert Path("/dev/iommu").is_char_device()
    assert Path("/dev/kvm").is_char_device()
    assert support.vfio_container
    assert support.iommufd
    assert support.kvm
    assert support.vfio_pci_driver


def test_edu_on_vfio_pci_has_a_viable_group_and_a_cdev(
    topology: Topology, vfio_bind: Callable[..., None]
) -> None:
    edu0 = topology.guest_address("edu0")
    vfio_bind(edu0)
    group = _group_of(edu0)
    assert Path(f"/dev/vfio/{group}").is_char_device()
    cdevs = os.listdir(f"/sys/bus/pci/devices/{edu0}/vfio-dev")
    assert len(cdevs) == 1
    assert cdevs[0].startswith("vfio")
    assert Path(f"/dev/vfio/devices/{cdevs[0]}").is_char_device()
    # The kernel's own answer on viability...
    fd = os.open(f"/dev/vfio/{group}", os.O_RDWR | os.O_CLOEXEC)
    try:
        status = uapi.new("vfio_group_status")
        uapi.ioctl(fd, uapi.VFIO_GROUP_GET_STATUS, status)
        assert status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE
    finally:
        os.close(fd)
    # ...and kvmvfio's model of it agree.
    device = Host().device(edu0)
    assert device.driver == "vfio-pci"
    assert device.vfio_cdev == cdevs[0]
    assert Host().group(group).viable


def _expected_cc(topology: Topology) -> int:
    # intel-iommu enforces snooping only with snoop-control=on (the
    # enforce_cache_coherency op); virtio-iommu has no such op.
    return 1 if topology.viommu == "intel-iommu" and topology.snoop_control else 0


def test_dma_cc_iommu_on_a_type1v2_container(
    topology: Topology, vfio_bind: Callable[..., None]
) -> None:
    edu0 = topology.guest_address("edu0")
    vfio_bind(edu0)
    container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    group = os.open(f"/dev/vfio/{_group_of(edu0)}", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert uapi.ioctl(container, uapi.VFIO_GET_API_VERSION) == uapi.VFIO_API_VERSION
        assert uapi.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU) == 1
        ptr = uapi.ffi.new("int32_t *", container)
        uapi.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, ptr)
        uapi.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        answer = uapi.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU)
        assert answer == _expected_cc(topology)
    finally:
        os.close(group)
        os.close(container)
