"""IOMMU groups, and whether VFIO can use one (its *viability*).

The IOMMU translates DMA per *group*: the smallest set of devices it can
tell apart (functions behind a PCIe-to-PCI bridge, or without ACS between
them, share one). Linux lists each group in ``/sys/kernel/iommu_groups/N``:
``devices/`` holds a symlink per member, and ``name`` exists only when the
group was named, which VFIO does for the fake groups of no-IOMMU mode
(``vfio-noiommu``, ``drivers/vfio/group.c``).

VFIO gives userspace a whole group or nothing, because every member can DMA
wherever the group's IOMMU domain allows. Since Linux 5.19 the kernel
decides this through DMA ownership (``drivers/iommu/iommu.c``): binding a
driver that does DMA through the kernel's DMA API claims the group for the
kernel (``iommu_device_use_default_domain``), and ``VFIO_GROUP_GET_STATUS``
reports the group *viable* only while no such claim is held
(``!iommu_group_dma_owner_claimed``). Drivers that set
``driver_managed_dma`` make no claim: vfio-pci and its variant drivers,
pci-stub, and pcieport (PCIe ports). A member with no driver makes none
either. So a group is viable when every member is unbound, or bound to one
of those; any other driver blocks it, a bridge's included (a PCI bridge on
``shpchp`` blocks its group; one on ``pcieport`` or on no driver does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import Blocker
from kvmvfio.host.pci import PciDevice, driver_managed_dma, is_vfio_driver

#: What the ``name`` file of a VFIO no-IOMMU group says.
NOIOMMU_NAME = "vfio-noiommu"


@dataclass(frozen=True, slots=True)
class ForeignMember:
    """A member of an IOMMU group that is not a PCI function (a platform device)."""

    name: str
    driver: str | None


def blocker_of(device: PciDevice) -> Blocker | None:
    """Say why ``device`` keeps its group from VFIO, or None if it does not."""
    driver = device.driver
    if driver is None or driver_managed_dma(driver):
        return None
    if device.is_bridge:
        reason = (
            f"a bridge bound to {driver}, which does DMA through the kernel (only pcieport "
            "or no driver leave a bridge's group free); unbind it"
        )
    else:
        reason = f"bound to {driver}, a host driver that does DMA; rebind it to vfio-pci"
    return Blocker(str(device.address), driver, reason)


def _foreign_blocker(member: ForeignMember) -> Blocker | None:
    if member.driver is None or driver_managed_dma(member.driver):
        return None
    return Blocker(
        member.name,
        member.driver,
        f"a non-PCI device bound to {member.driver}, a host driver that does DMA; unbind it",
    )


@dataclass(frozen=True, slots=True)
class IommuGroup:
    """One IOMMU group: its members and, from their drivers, its viability."""

    number: int
    members: tuple[PciDevice, ...]
    noiommu: bool = False
    #: Members that are not PCI functions (rare on x86; platform devices on Arm).
    foreign: tuple[ForeignMember, ...] = ()

    @property
    def blockers(self) -> tuple[Blocker, ...]:
        """The members that keep the group from VFIO, each with the reason."""
        found = [blocker_of(m) for m in self.members]
        found += [_foreign_blocker(f) for f in self.foreign]
        return tuple(b for b in found if b is not None)

    @property
    def viable(self) -> bool:
        """True when VFIO can take the group now (the kernel's rule, see the module doc)."""
        return not self.blockers

    @property
    def vfio_bound(self) -> tuple[PciDevice, ...]:
        """The members bound to vfio-pci or a variant driver."""
        return tuple(m for m in self.members if is_vfio_driver(m.driver))

    @property
    def node_name(self) -> str:
        """The group's file name in ``/dev/vfio``: ``N``, or ``noiommu-N``."""
        return f"noiommu-{self.number}" if self.noiommu else str(self.number)

    def dev_node(self, devfs: str | Path = "/dev") -> Path:
        """The group's VFIO file, ``/dev/vfio/N`` (``/dev/vfio/noiommu-N``).

        It exists once a member is bound to a VFIO driver.
        """
        return Path(devfs) / "vfio" / self.node_name
