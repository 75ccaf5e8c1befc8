"""HostSupport: which VFIO, iommufd and KVM files the host has."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from fakesysfs import Dev, Topology

from kvmvfio.host import Host, HostSupport

BuildHost = Callable[[Topology], Host]


def test_everything_present(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)]))
    support = host.support()
    assert support == HostSupport(
        vfio_container=True,
        iommufd=True,
        device_cdev=True,
        kvm=True,
        vfio_pci_driver=True,
        iommu=True,
    )
    assert support.usable
    assert support.missing() == ()
    assert support.explain() == (
        "Host can assign devices via: group + container, group on iommufd, device cdev."
    )


@pytest.mark.parametrize(
    ("options", "absent", "phrase"),
    [
        ({"dev_nodes": {"iommu", "kvm"}}, {"vfio_container"}, "no /dev/vfio/vfio"),
        ({"dev_nodes": {"vfio", "kvm"}}, {"iommufd"}, "no /dev/iommu"),
        ({"dev_nodes": {"vfio", "iommu"}}, {"kvm"}, "no /dev/kvm"),
        ({"iommu": False}, {"iommu"}, "no IOMMU in use"),
        ({"cdev": False}, {"device_cdev"}, "CONFIG_VFIO_DEVICE_CDEV"),
        # Without vfio-pci nothing is bound to it, so no cdev shows either.
        ({"drivers": (), "driver": None}, {"vfio_pci_driver", "device_cdev"}, "modprobe vfio-pci"),
    ],
)
def test_each_missing_piece_is_seen_and_explained(
    build_host: BuildHost, options: dict[str, Any], absent: set[str], phrase: str
) -> None:
    options = dict(options)  # the parameter is shared between runs
    driver = options.pop("driver", "vfio-pci")
    topology = Topology(devices=[Dev("0000:00:03.0", driver=driver)], **options)
    support = build_host(topology).support()
    flags = support.as_dict()
    assert {name for name, present in flags.items() if not present} == absent
    assert len(support.missing()) == len(absent)
    assert any(phrase in m for m in support.missing())
    assert phrase in support.explain()


def test_no_cdev_before_any_device_is_bound(build_host: BuildHost) -> None:
    support = build_host(Topology(devices=[Dev("0000:00:03.0", driver="e1000e")])).support()
    assert not support.device_cdev
    assert support.usable  # the group paths do not need cdevs
    assert support.explain().startswith("Host can assign devices via: group + container, ")
    assert "device cdev." not in support.explain()


def test_cdevs_seen_in_sysfs_without_the_dev_directory(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci")]))
    for name in os.listdir(host.devfs / "vfio" / "devices"):
        os.unlink(host.devfs / "vfio" / "devices" / name)
    os.rmdir(host.devfs / "vfio" / "devices")
    assert host.support().device_cdev  # /sys/class/vfio-dev/vfio0/dev


def test_nothing_at_all(tmp_path: os.PathLike[str]) -> None:
    support = HostSupport.probe(tmp_path, tmp_path)
    assert not any(support.as_dict().values())
    assert not support.usable
    assert support.explain().startswith("Host cannot assign devices to VMs. Missing: no IOMMU")
    assert len(support.missing()) == 6
