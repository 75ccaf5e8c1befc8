"""VFIO from user space: containers, iommufd, groups, devices, and sessions.

One class per kernel object, each owning its file:
:class:`~kvmvfio.vfio.container.Container` (``/dev/vfio/vfio``),
:class:`~kvmvfio.vfio.iommufd.Iommufd` (``/dev/iommu``),
:class:`~kvmvfio.vfio.group.Group` (``/dev/vfio/N``) and
:class:`~kvmvfio.vfio.device.Device` (a device file, from a group or a cdev).
:class:`~kvmvfio.vfio.session.VfioSession` puts them together for a VM, in
the order the kernel needs, with the KVM association and the coherency
policy; read its module documentation first.
:func:`~kvmvfio.vfio.plan.make_plan` makes every decision before anything
is opened, for kvmvfio's sessions and for QEMU alike
(:class:`~kvmvfio.vfio.plan.Plan`); :class:`~kvmvfio.vfio.policy.VfioPath`
names the kernel's ways.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmvfio._lazy import lazy_getattr

if TYPE_CHECKING:
    from kvmvfio.host.procs import holders
    from kvmvfio.vfio.container import Container
    from kvmvfio.vfio.device import (
        DependentDevice,
        Device,
        DeviceInfo,
        HotResetInfo,
        IrqInfo,
        RegionInfo,
    )
    from kvmvfio.vfio.errors import FdClosed, RlimitModeRefused
    from kvmvfio.vfio.files import OwnedFd, open_node
    from kvmvfio.vfio.group import Group
    from kvmvfio.vfio.iommufd import Iommufd, RlimitMode, open_for_vmm
    from kvmvfio.vfio.plan import DevicePlan, GroupPlan, Opener, Plan, make_plan
    from kvmvfio.vfio.policy import Backend, Coherency, VfioPath
    from kvmvfio.vfio.reset import HotResetReport, hot_reset, hot_reset_info
    from kvmvfio.vfio.session import SessionReport, VfioSession, choose_backend

# Imported on first use: the CLI and the host-only paths never pay for the
# layers below (cffi declarations, asyncio, QMP) unless they use them.
_LAZY = {
    "Container": "kvmvfio.vfio.container",
    "Device": "kvmvfio.vfio.device",
    "DeviceInfo": "kvmvfio.vfio.device",
    "DependentDevice": "kvmvfio.vfio.device",
    "HotResetInfo": "kvmvfio.vfio.device",
    "HotResetReport": "kvmvfio.vfio.reset",
    "hot_reset": "kvmvfio.vfio.reset",
    "hot_reset_info": "kvmvfio.vfio.reset",
    "IrqInfo": "kvmvfio.vfio.device",
    "RegionInfo": "kvmvfio.vfio.device",
    "FdClosed": "kvmvfio.vfio.errors",
    "OwnedFd": "kvmvfio.vfio.files",
    "holders": "kvmvfio.host.procs",
    "open_node": "kvmvfio.vfio.files",
    "Group": "kvmvfio.vfio.group",
    "Iommufd": "kvmvfio.vfio.iommufd",
    "RlimitMode": "kvmvfio.vfio.iommufd",
    "RlimitModeRefused": "kvmvfio.vfio.errors",
    "open_for_vmm": "kvmvfio.vfio.iommufd",
    "Backend": "kvmvfio.vfio.policy",
    "Coherency": "kvmvfio.vfio.policy",
    "VfioPath": "kvmvfio.vfio.policy",
    "DevicePlan": "kvmvfio.vfio.plan",
    "GroupPlan": "kvmvfio.vfio.plan",
    "Opener": "kvmvfio.vfio.plan",
    "Plan": "kvmvfio.vfio.plan",
    "make_plan": "kvmvfio.vfio.plan",
    "SessionReport": "kvmvfio.vfio.session",
    "VfioSession": "kvmvfio.vfio.session",
    "choose_backend": "kvmvfio.vfio.session",
}

__all__ = [
    "Backend",
    "Coherency",
    "Container",
    "DependentDevice",
    "Device",
    "DeviceInfo",
    "DevicePlan",
    "FdClosed",
    "Group",
    "GroupPlan",
    "HotResetInfo",
    "HotResetReport",
    "Iommufd",
    "IrqInfo",
    "Opener",
    "OwnedFd",
    "Plan",
    "RegionInfo",
    "RlimitMode",
    "RlimitModeRefused",
    "SessionReport",
    "VfioPath",
    "VfioSession",
    "choose_backend",
    "holders",
    "hot_reset",
    "hot_reset_info",
    "make_plan",
    "open_for_vmm",
    "open_node",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
