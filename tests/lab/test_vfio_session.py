"""VFIO sessions against the real kernel, on each of its three paths.

Every test here checks what the kernel did, not what kvmvfio believes: the
fds left in ``/proc/self/fd``, whether the group and the device can be
opened and bound again by plain ioctls afterwards (which fails while
anything, KVM's reference included, still holds them), the kernel's own
answers to VFIO_GROUP_GET_STATUS and VFIO_CHECK_EXTENSION, and a kprobe on
``vfio_device_get_kvm_safe`` for the order of KVM association and open.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from vfiokit import assert_released, cdev_of, expected_coherent, group_of, raw_cdev_bind

from kvmvfio import uapi
from kvmvfio.errors import (
    AlreadyAssociated,
    Busy,
    CoherencyRefused,
    GroupNotViable,
    KernelError,
    KvmClosed,
    KvmRefusedFile,
    NoInterruptRemapping,
    NotADeviceOfGroup,
    NotAssociated,
)
from kvmvfio.host import Host
from kvmvfio.kvm import KvmVfioDevice, KvmVm
from kvmvfio.lab.topology import Topology
from kvmvfio.vfio import Group, VfioSession

pytestmark = pytest.mark.lab

BACKENDS = ("group", "group-iommufd", "cdev")

# -- what the kernel shows ------------------------------------------------------


# -- fixtures -------------------------------------------------------------------


# -- the three paths -------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_open_associate_report_release(
    backend: str, edu0: str, kvm: KvmVfioDevice, no_fd_leak: None
) -> None:
    async with VfioSession([edu0], backend=backend, kvm=kvm, coherency="ignore") as session:
        report = session.report()
        assert report.backend == backend
        assert report.kvm_associated
        (dev,) = report.devices
        assert dev.address == edu0
        assert dev.group == group_of(edu0)
        assert dev.info.is_pci
        # vfio-pci: 6 BARs, ROM, config space, VGA; INTx, MSI, MSI-X, ERR, REQ.
        assert dev.info.num_regions == 9
        assert dev.info.num_irqs == 5
        regions = {r.index: r for r in dev.regions}
        assert regions[0].size == 1 << 20  # edu's BAR0: 1 MiB of MMIO
        assert regions[0].mappable
        assert regions[7].size == 256  # conventional PCI config space
        assert 8 not in regions  # no VGA
        irqs = {i.index: i.count for i in dev.irqs}
        # INTx, one MSI, no MSI-X, no ERR (not PCIe), REQ.
        assert irqs == {0: 1, 1: 1, 2: 0, 4: 1}
        # The kernel holds what KVM was given: adding it again is EEXIST.
        held = session.groups[dev.group] if backend != "cdev" else session.devices[edu0]
        with pytest.raises(AlreadyAssociated):
            kvm.add(held.fileno())
        # ...and nobody else can have the device meanwhile.
        with pytest.raises(OSError):  # noqa: PT011 (EBUSY or EINVAL, by path)
            raw_cdev_bind(edu0)
    assert kvm.files == ()
    assert_released(edu0)
    # The same session can be had again at once.
    async with VfioSession([edu0], backend=backend, kvm=kvm, coherency="ignore") as again:
        assert again.report().devices[0].info.num_regions == 9
    assert_released(edu0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_use_without_kvm(backend: str, edu0: str, no_fd_leak: None) -> None:
    with VfioSession([edu0], backend=backend, coherency="warn") as session:
        assert not session.report().kvm_associated
        assert session.devices[edu0].info().is_pci
    assert_released(edu0)


def test_auto_picks_cdev_here(edu0: str, no_fd_leak: None) -> None:
    with VfioSession([edu0], coherency="ignore") as session:
        assert session.backend == "cdev"


# -- coherency ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_kvm", [True, False], ids=["kvm", "no-kvm"])
def test_coherency_answer_and_policy(
    topology: Topology,
    backend: str,
    with_kvm: bool,
    edu0: str,
    kvm: KvmVfioDevice,
    no_fd_leak: None,
) -> None:
    expected = expected_coherent(topology)
    target = kvm if with_kvm else None
    with VfioSession([edu0], backend=backend, kvm=target, coherency="warn") as session:
        assert session.coherent is expected
        assert bool(session.report().unsafe) is not expected
    if expected:
        with VfioSession([edu0], backend=backend, kvm=target, coherency="require") as session:
            assert session.coherent is True
    else:
        with pytest.raises(CoherencyRefused) as refused:
            VfioSession([edu0], backend=backend, kvm=target, coherency="require").open()
        assert edu0 in str(refused.value)
        if backend != "cdev":
            assert f"IOMMU group {group_of(edu0)}" in str(refused.value)
        assert kvm.files == ()
    assert_released(edu0)


# -- viability -----------------------------------------------------------------------


@pytest.mark.topology("default", "coherent")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bridge_group_needs_every_member_on_vfio(
    topology: Topology, backend: str, vfio_bind: Callable[..., None], no_fd_leak: None
) -> None:
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    vfio_bind(edu2)
    vfio_bind(edu3, driver="pci-pf-stub")  # a host driver that does its own DMA
    # The kernel's word first: the group is not viable.
    fd = os.open(f"/dev/vfio/{group_of(edu2)}", os.O_RDWR | os.O_CLOEXEC)
    try:
        status = uapi.new("vfio_group_status")
        uapi.ioctl(fd, uapi.VFIO_GROUP_GET_STATUS, status)
        assert not status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE
    finally:
        os.close(fd)
    with pytest.raises(GroupNotViable) as refused:
        VfioSession([edu2], backend=backend, coherency="ignore").open()
    assert edu3 in str(refused.value)
    assert "pci-pf-stub" in str(refused.value)
    assert [b.address for b in refused.value.blockers] == [edu3]
    vfio_bind(edu3)  # now both are on vfio-pci
    with VfioSession([edu2, edu3], backend=backend, coherency="ignore") as session:
        assert set(session.devices) == {edu2, edu3}
        assert len({d.group for d in session.report().devices}) == 1


@pytest.mark.topology("default", "coherent")
def test_a_name_outside_the_group(topology: Topology, edu0: str, no_fd_leak: None) -> None:
    edu1 = topology.guest_address("edu1")
    with VfioSession([edu0], backend="group", coherency="ignore") as session:
        group: Group = session.groups[group_of(edu0)]
        with pytest.raises(NotADeviceOfGroup) as refused:
            group.open_device(edu1)
    assert f"{edu1} is not a device of IOMMU group {group_of(edu0)}" in str(refused.value)


# -- a busy device ---------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from kvmvfio.vfio import VfioSession
    with VfioSession([sys.argv[1]], backend=sys.argv[2], coherency="ignore"):
        print("ready", flush=True)
        sys.stdin.read()
    """
)


@pytest.mark.parametrize("holder_backend", BACKENDS)
def test_second_opener_is_told_who_holds_it(
    holder_backend: str, edu0: str, no_fd_leak: None
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, edu0, holder_backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        for backend in BACKENDS:
            with pytest.raises(Busy) as busy:
                VfioSession([edu0], backend=backend, coherency="ignore").open()
            assert f"pid {holder.pid}" in str(busy.value), (backend, str(busy.value))
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert_released(edu0)


# -- KVM -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvm_refusals_are_typed(
    backend: str, edu0: str, kvm: KvmVfioDevice, no_fd_leak: None
) -> None:
    with VfioSession([edu0], backend=backend, kvm=kvm, coherency="ignore") as session:
        held = session.devices[edu0] if backend == "cdev" else session.groups[group_of(edu0)]
        with pytest.raises(AlreadyAssociated):
            kvm.add(held.fileno())
        # A file KVM was never given: the device fd on the group paths, the
        # iommufd on the cdev path.
        other = session.devices[edu0] if backend != "cdev" else session.iommufd
        assert other is not None
        with pytest.raises(NotAssociated):
            kvm.remove(other.fileno())
        with open("/dev/null") as null, pytest.raises(KvmRefusedFile):
            kvm.add(null.fileno())
    assert kvm.files == ()
    assert_released(edu0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_vm_refuses_and_nothing_stays_open(
    backend: str, edu0: str, no_fd_leak: None
) -> None:
    vm = KvmVm()
    device = vm.vfio_device()
    device.close()
    vm.close()
    with pytest.raises(KvmClosed):
        VfioSession([edu0], backend=backend, kvm=device, coherency="ignore").open()
    assert_released(edu0)


# -- the order: KVM before the first device open -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_devices_open_with_the_kvm_they_were_associated_with(
    backend: str, edu0: str, kvm: KvmVfioDevice, kvm_probe: Callable[[], list[int]]
) -> None:
    with VfioSession([edu0], backend=backend, kvm=kvm, coherency="warn"):
        pass
    # The real open (the last) took the VM's KVM. The coherency probes made
    # before it (group-iommufd, cdev) ran before KVM was involved: none.
    seen = kvm_probe()
    assert seen != []
    assert seen[-1] != 0
    assert seen[:-1] == ([0] if backend != "group" else [])


def test_the_probe_tells_a_swapped_order(
    edu0: str, kvm: KvmVfioDevice, kvm_probe: Callable[[], list[int]]
) -> None:
    """The control: device opened first, group added to KVM after, and the device has no KVM."""
    container = os.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
    group = os.open(f"/dev/vfio/{group_of(edu0)}", os.O_RDWR | os.O_CLOEXEC)
    try:
        uapi.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, uapi.ffi.new("int32_t *", container))
        uapi.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
        name = uapi.ffi.new("char[]", edu0.encode())
        device = uapi.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, name)
        kvm.add(group)
        kvm.remove(group)
        os.close(device)
    finally:
        os.close(group)
        os.close(container)
    assert kvm_probe() == [0]


# -- interrupt remapping -----------------------------------------------------------------


@pytest.mark.topology("virtio-iommu")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_interrupt_remapping_is_named(backend: str, edu0: str, no_fd_leak: None) -> None:
    """virtio-iommu cannot isolate MSIs on x86: the kernel refuses unless told to allow it."""
    switches = [
        Path("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"),
        Path("/sys/module/iommufd/parameters/allow_unsafe_interrupts"),
    ]
    saved = [p.read_text() for p in switches]
    try:
        for p in switches:
            p.write_text("N")
        with pytest.raises(NoInterruptRemapping) as refused:
            VfioSession([edu0], backend=backend, coherency="ignore").open()
        assert "interrupt remapping" in str(refused.value)
    finally:
        for p, value in zip(switches, saved, strict=True):
            p.write_text(value)
    assert_released(edu0)


def test_kernel_errors_keep_errno(edu0: str) -> None:
    with pytest.raises(KernelError) as failed:
        Group(group_of(edu0) + 1000)
    assert failed.value.errno == errno.ENOENT
    assert "IOMMU group" in str(failed.value)


def test_host_model_matches_the_session(edu0: str) -> None:
    device = Host().device(edu0)
    with VfioSession([edu0], backend="cdev", coherency="ignore") as session:
        assert session.devices[edu0].path == cdev_of(edu0)
        assert device.vfio_cdev == os.path.basename(cdev_of(edu0))
