"""VFIO from user space: containers, iommufd, groups, devices, and sessions.

One class per kernel object, each owning its file:
:class:`~kvmvfio.vfio.container.Container` (``/dev/vfio/vfio``),
:class:`~kvmvfio.vfio.iommufd.Iommufd` (``/dev/iommu``),
:class:`~kvmvfio.vfio.group.Group` (``/dev/vfio/N``) and
:class:`~kvmvfio.vfio.device.Device` (a device file, from a group or a cdev).
:class:`~kvmvfio.vfio.session.VfioSession` puts them together for a VM, in
the order the kernel needs, with the KVM association and the coherency
policy; read its module documentation first.
"""

from kvmvfio.vfio.container import Container
from kvmvfio.vfio.device import Device, DeviceInfo, IrqInfo, RegionInfo
from kvmvfio.vfio.files import FdClosed, OwnedFd, holders, open_node
from kvmvfio.vfio.group import Group
from kvmvfio.vfio.iommufd import Iommufd
from kvmvfio.vfio.session import Backend, Coherency, SessionReport, VfioSession, choose_backend

__all__ = [
    "Backend",
    "Coherency",
    "Container",
    "Device",
    "DeviceInfo",
    "FdClosed",
    "Group",
    "Iommufd",
    "IrqInfo",
    "OwnedFd",
    "RegionInfo",
    "SessionReport",
    "VfioSession",
    "choose_backend",
    "holders",
    "open_node",
]
