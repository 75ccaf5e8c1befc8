"""A group goes to vfio-pci whole, but a function leaves its host driver only when named.

A GPU's display function and its HDMI audio function share a slot and, on
most hosts, an IOMMU group. Asking for the display alone must not take the
host's sound card silently: :func:`refuse_unlisted` refuses, naming each
other member a host driver still has, before anything changes. Members with
no driver, on a VFIO-safe driver (``driver_managed_dma``) and bridges are
fine, as the libvirt hook's rule for a domain's metadata
(:func:`kvmvfio.libvirt.hook.refuse_unlisted`) has it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from kvmvfio.errors import Interface, interface
from kvmvfio.host import IommuGroup, PciDevice, driver_managed_dma
from kvmvfio.host.errors import Blocker
from kvmvfio.vfio.errors import GroupNotViable

__all__ = ["UnlistedMembers", "refuse_unlisted", "unlisted"]


class UnlistedMembers(GroupNotViable):
    """Devices were asked for without the other members of their group that host drivers have.

    ``asked``: the group's members that were asked for; ``blockers``: each
    member left out, with its driver.
    """

    def __init__(self, group: int, asked: Sequence[str], blockers: Sequence[Blocker]) -> None:
        self.group = str(group)
        self.asked = tuple(asked)
        self.blockers = tuple(blockers)
        others = [b.address for b in self.blockers]
        how = {
            Interface.CLI: "`kvmvfio prepare --owner NAME "
            + " ".join([*self.asked, *others])
            + "` moves them all",
            Interface.METADATA: "list "
            + (" and ".join(others))
            + " in the domain's kvmvfio metadata too (with handoff='none' if the VM does not "
            "use it)",
            Interface.API: "pass " + " and ".join(repr(a) for a in others) + " in addresses too",
        }[interface()]
        alone = " and ".join(self.asked)
        Exception.__init__(
            self,
            f"{alone} cannot go to vfio-pci without the rest of IOMMU group {group}: "
            + "; ".join(str(b) for b in self.blockers)
            + ". A group goes to VFIO whole, and kvmvfio takes a function from its host driver "
            f"only when it is named: {how}",
        )


def unlisted(group: IommuGroup, listed: Collection[str]) -> list[PciDevice]:
    """The members of ``group`` a host driver has that ``listed`` leaves out, in address order."""
    return [
        m
        for m in group.members
        if str(m.address) not in listed
        and not m.is_bridge
        and m.driver is not None
        and not driver_managed_dma(m.driver)
    ]


def refuse_unlisted(group: IommuGroup, listed: Collection[str]) -> None:
    """Refuse ``group`` when a host driver has a member that ``listed`` leaves out.

    Change nothing. Raises :class:`UnlistedMembers` naming each such member,
    its class and its driver.
    """
    others = unlisted(group, listed)
    if not others:
        return
    asked = [str(m.address) for m in group.members if str(m.address) in listed]
    raise UnlistedMembers(
        group.number,
        asked,
        [
            Blocker(str(m.address), m.driver, f"{m.class_name} {m.ids}, on host driver {m.driver}")
            for m in others
        ],
    )
