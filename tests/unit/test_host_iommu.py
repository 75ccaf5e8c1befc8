"""IommuGroup: members, viability as the kernel decides it, blockers, lookups."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Foreign, Topology

from kvmvfio.errors import (
    Blocker,
    DeviceNotFound,
    GroupNotFound,
    GroupNotViable,
    InvalidAddress,
    InvalidGroup,
    NoIommuGroup,
    UsageError,
)
from kvmvfio.host import Host, IommuGroup, PciAddress, parse_group_number

BuildHost = Callable[[Topology], Host]


def _one_group(build_host: BuildHost, *devs: Dev) -> IommuGroup:
    return build_host(Topology(devices=list(devs))).group(5)


@pytest.mark.parametrize(
    "driver",
    [None, "vfio-pci", "mlx5_vfio_pci", "hisi_acc_vfio_pci", "pci-stub"],
)
def test_endpoints_that_leave_the_group_viable(build_host: BuildHost, driver: str | None) -> None:
    group = _one_group(
        build_host, Dev("0000:00:03.0", driver=driver, group=5), Dev("0000:00:03.1", group=5)
    )
    assert group.viable
    assert group.blockers == ()


def test_a_host_driver_blocks_and_is_named(build_host: BuildHost) -> None:
    group = _one_group(
        build_host,
        Dev("0000:00:03.0", driver="vfio-pci", group=5),
        Dev("0000:00:03.1", driver="e1000e", group=5),
    )
    assert not group.viable
    assert group.blockers == (
        Blocker(
            "0000:00:03.1",
            "e1000e",
            "bound to e1000e, a host driver that does DMA; rebind it to vfio-pci",
        ),
    )


def test_every_blocker_is_listed_in_address_order(build_host: BuildHost) -> None:
    group = _one_group(
        build_host,
        Dev("0000:00:1f.6", driver="e1000e", group=5),
        Dev("0000:00:1f.0", driver="lpc_ich", group=5),
        Dev("0000:00:1f.3", driver="snd_hda_intel", group=5),
        Dev("0000:00:1f.4", group=5),
    )
    assert [(b.address, b.driver) for b in group.blockers] == [
        ("0000:00:1f.0", "lpc_ich"),
        ("0000:00:1f.3", "snd_hda_intel"),
        ("0000:00:1f.6", "e1000e"),
    ]


@pytest.mark.parametrize(
    ("driver", "viable"), [("pcieport", True), (None, True), ("shpchp", False)]
)
def test_bridges(build_host: BuildHost, driver: str | None, viable: bool) -> None:
    # A PCIe-to-PCI bridge shares its group with what is behind it.
    group = _one_group(
        build_host,
        Dev(
            "0000:00:1e.0",
            bridge=True,
            driver=driver,
            group=5,
            children=[Dev("0000:05:00.0", driver="vfio-pci", group=5)],
        ),
    )
    assert [str(m.address) for m in group.members] == ["0000:00:1e.0", "0000:05:00.0"]
    assert group.members[0].is_bridge
    assert group.viable is viable
    if not viable:
        (blocker,) = group.blockers
        assert blocker.address == "0000:00:1e.0"
        assert "a bridge bound to shpchp" in blocker.reason
        assert "pcieport" in blocker.reason


def test_pcieport_on_a_non_bridge_is_still_dma_managed(build_host: BuildHost) -> None:
    # driver_managed_dma is the driver's property, whatever it is bound to.
    group = _one_group(build_host, Dev("0000:00:03.0", driver="pcieport", group=5))
    assert group.viable


def test_groups_match_the_devices_links(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev(
                    "0000:00:01.0",
                    bridge=True,
                    driver="pcieport",
                    group=1,
                    children=[
                        Dev("0000:01:00.0", driver="e1000e", group=1),
                    ],
                ),
                Dev("0000:00:03.0", driver="vfio-pci", group=3),
                Dev("0000:02:00.0", vfs=3, vf_group=10, vf_driver="vfio-pci", group=9),
                Dev("0000:00:1f.0"),  # no IOMMU group
            ]
        )
    )
    groups = host.groups()
    assert [g.number for g in groups] == [1, 3, 9, 10, 11, 12]
    for group in groups:
        assert all(m.iommu_group == group.number for m in group.members)
        assert host.group(group.number) == group
    assert {g.number: g.viable for g in groups} == {
        1: False, 3: True, 9: True, 10: True, 11: True, 12: True,
    }  # fmt: skip
    inv = host.inventory()
    assert list(inv.devices) == host.devices()
    assert list(inv.groups) == groups
    assert inv.groups_by_number()[1].blockers[0].driver == "e1000e"


def test_group_lookups(build_host: BuildHost) -> None:
    host = build_host(
        Topology(devices=[Dev("0000:00:03.0", group=3), Dev("0000:00:1f.0", driver="lpc_ich")])
    )
    assert host.group("3") == host.group(3) == host.group_of("00:03.0")
    assert host.group_of(PciAddress(0, 0, 3, 0)).number == 3
    with pytest.raises(GroupNotFound, match="no IOMMU group 4 "):
        host.group(4)
    with pytest.raises(NoIommuGroup, match=r"0000:00:1f\.0 is in no IOMMU group"):
        host.group_of("0000:00:1f.0")
    with pytest.raises(DeviceNotFound):
        host.group_of("0000:00:04.0")
    with pytest.raises(InvalidAddress):
        host.group_of("3")


@pytest.mark.parametrize("value", ["-1", "3a", "", " 3", "3\n", "٣", "99999999999", -1, True, 2.0])
def test_malformed_group_numbers(value: object) -> None:
    with pytest.raises(InvalidGroup) as info:
        parse_group_number(value)  # type: ignore[arg-type]
    assert isinstance(info.value, UsageError)


def test_group_numbers_parse() -> None:
    assert parse_group_number("0") == 0
    assert parse_group_number("0042") == 42
    assert parse_group_number(7) == 7


def test_noiommu_group(build_host: BuildHost) -> None:
    host = build_host(
        Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=0)], noiommu_groups={0})
    )
    group = host.group(0)
    assert group.noiommu
    assert group.dev_node(host.devfs) == host.devfs / "vfio" / "noiommu-0"
    assert group.dev_node(host.devfs).exists()
    assert host.group_of("0000:00:03.0") == group


def test_dev_node_of_an_ordinary_group(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=12)]))
    group = host.group(12)
    assert not group.noiommu
    assert group.dev_node(host.devfs) == host.devfs / "vfio" / "12"
    assert group.dev_node(host.devfs).exists()
    assert group.dev_node() == Path("/dev/vfio/12")
    assert [str(d.address) for d in group.vfio_bound] == ["0000:00:03.0"]


@pytest.mark.parametrize(
    ("driver", "viable"), [("pl330", False), (None, True), ("vfio-platform", True)]
)
def test_members_that_are_not_pci(build_host: BuildHost, driver: str | None, viable: bool) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci", group=5)],
            foreign=[Foreign("soc:dma@10000", group=5, driver=driver)],
        )
    )
    group = host.group(5)
    assert [(f.name, f.driver) for f in group.foreign] == [("soc:dma@10000", driver)]
    assert [str(m.address) for m in group.members] == ["0000:00:03.0"]
    assert group.viable is viable
    if not viable:
        assert group.blockers[0].address == "soc:dma@10000"
        assert "non-PCI device bound to pl330" in group.blockers[0].reason


def test_group_not_viable_error_names_the_blockers(build_host: BuildHost) -> None:
    group = _one_group(build_host, Dev("0000:00:03.0", driver="e1000e", group=5))
    err = GroupNotViable(str(group.number), group.blockers)
    assert "IOMMU group 5 is not viable: 0000:00:03.0 (bound to e1000e" in str(err)
