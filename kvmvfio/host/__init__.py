"""The host as sysfs and /dev show it: PCI functions, IOMMU groups, support.

Pure reads. :class:`Host` takes the sysfs and /dev roots as values (the real
``/sys`` and ``/dev`` by default, a fake tree in tests) and returns frozen
snapshots:

- :class:`PciAddress`: ``[domain:]bus:slot.function``, parsed strictly;
- :class:`PciDevice`: one function (IDs, class, driver, IOMMU group, NUMA
  node, reset methods, SR-IOV links, VFIO cdev);
- :class:`IommuGroup`: its members and viability as the kernel decides it,
  with a :class:`~kvmvfio.errors.Blocker` per member in the way;
- :class:`HostSupport`: which VFIO / iommufd / KVM files exist;
- :class:`HostIommu`: the IOMMUs the kernel uses (:class:`IommuUnit`, of an
  :class:`IommuKind`), and :class:`NoGroup`: why a function is in no group
  (a :class:`NoGroupCause`);
- :class:`MdevParent` (its types: :class:`MdevType`) and :class:`Mdev`: mediated
  devices (:mod:`kvmvfio.host.mdev`).
"""

from kvmvfio.host.address import PciAddress
from kvmvfio.host.context import Host, Inventory, parse_group_number
from kvmvfio.host.iommu import (
    ForeignMember,
    HostIommu,
    IommuGroup,
    IommuKind,
    IommuUnit,
    NoGroup,
    NoGroupCause,
    blocker_of,
)
from kvmvfio.host.mdev import Mdev, MdevParent, MdevType
from kvmvfio.host.pci import (
    PciDevice,
    class_name,
    driver_managed_dma,
    is_vfio_driver,
    read_device,
)
from kvmvfio.host.support import HostSupport

__all__ = [
    "ForeignMember",
    "Host",
    "HostIommu",
    "HostSupport",
    "Inventory",
    "IommuGroup",
    "IommuKind",
    "IommuUnit",
    "Mdev",
    "MdevParent",
    "MdevType",
    "NoGroup",
    "NoGroupCause",
    "PciAddress",
    "PciDevice",
    "blocker_of",
    "class_name",
    "driver_managed_dma",
    "is_vfio_driver",
    "parse_group_number",
    "read_device",
]
