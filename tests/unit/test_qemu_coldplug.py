"""Cold plug arguments on a fake host (the real QEMU start is in the lab)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from fakesysfs import Dev, Topology

from kvmvfio.errors import DeviceNotBoundToVfio, KernelUnsupported
from kvmvfio.host import Host
from kvmvfio.qemu import coldplug

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}
BuildHost = Callable[[Topology], Host]


def test_arguments_name_the_fds_to_pass(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    with coldplug(["00:03.0"], coherency="ignore", buses=["rp0"], host=host) as plug:
        iommufd, device = plug.pass_fds
        assert plug.args == [
            "-object", f"iommufd,id=kvmvfio-iommufd,fd={iommufd}",
            "-device",
            f"vfio-pci,id=kvmvfio-0000-00-03-0,iommufd=kvmvfio-iommufd,fd={device},bus=rp0",
        ]  # fmt: skip
        assert os.readlink(f"/proc/self/fd/{iommufd}") == str(host.devfs / "iommu")
        assert os.readlink(f"/proc/self/fd/{device}").startswith(
            str(host.devfs / "vfio" / "devices" / "vfio")
        )
    for fd in (iommufd, device):
        with pytest.raises(OSError):  # noqa: PT011 (EBADF: ours are closed)
            os.fstat(fd)


def test_refusals_open_nothing(build_host: BuildHost) -> None:
    before = set(os.listdir("/proc/self/fd"))
    host = build_host(
        Topology(
            devices=[
                Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU),
                Dev("0000:00:05.0", driver="e1000e", group=3),
            ],
            dev_nodes={"vfio"},
        )
    )
    with pytest.raises(KernelUnsupported, match="/dev/iommu"):
        coldplug(["0000:00:03.0"], coherency="ignore", host=host)
    with pytest.raises(DeviceNotBoundToVfio):
        coldplug(["0000:00:05.0"], coherency="ignore", host=host)
    assert set(os.listdir("/proc/self/fd")) == before
