"""Errors of the VFIO layer: groups, containers, iommufd, device files, a session.

Raised by :mod:`kvmvfio.vfio` and by the layers above that open VFIO files
through it; re-exported by :mod:`kvmvfio.errors`.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

# FdClosed is raised by the fd owner below the layers (KVM's fds too); named here as before.
from kvmvfio._closing import FdClosed
from kvmvfio.errors import Interface, KernelError, KvmvfioError, interface

if TYPE_CHECKING:
    from kvmvfio.host.errors import Blocker

__all__ = [
    "CoherencyRefused",
    "DeviceNotBoundToVfio",
    "FdClosed",
    "GroupNotViable",
    "HotResetBlocked",
    "HotResetRefused",
    "NoBusReset",
    "NoInterruptRemapping",
    "NoIommuRefused",
    "NotADeviceOfGroup",
    "ResetBystander",
    "RlimitModeRefused",
    "VfTokenRefused",
]


class GroupNotViable(KvmvfioError):
    """An IOMMU group has a member bound to a host driver VFIO cannot share with."""

    def __init__(self, group: str, blockers: Sequence[Blocker]) -> None:
        self.group = group
        self.blockers = tuple(blockers)
        listed = "; ".join(str(b) for b in self.blockers) or "the kernel reports it not viable"
        super().__init__(
            f"IOMMU group {group} is not viable: {listed}. Every member must be bound to "
            "vfio-pci (or to no driver) before the group can be used"
        )


class NoInterruptRemapping(KernelError):
    """EPERM from VFIO_SET_IOMMU / VFIO_DEVICE_BIND_IOMMUFD: MSIs cannot be isolated."""

    default_hint = (
        "the IOMMU has no interrupt remapping, so a device could forge interrupts; enable "
        "interrupt remapping (intel_iommu=on with x2APIC, intremap=on for a vIOMMU), or accept "
        "the risk with vfio_iommu_type1.allow_unsafe_interrupts=1 / "
        "iommufd.allow_unsafe_interrupts=1"
    )


class NotADeviceOfGroup(KvmvfioError):
    """VFIO_GROUP_GET_DEVICE_FD was given a name that is not a member of the group."""

    def __init__(self, address: str, group: int) -> None:
        self.address = address
        self.group = group
        super().__init__(f"{address} is not a device of IOMMU group {group}")


class MdevNotReady(KvmvfioError):
    """A mediated device that VFIO does not have: no driver, or no IOMMU group."""

    def __init__(self, uuid: str, why: str) -> None:
        self.uuid = uuid
        self.why = why
        super().__init__(
            f"mediated device {uuid} {why}; remove it and create it again "
            f"(`kvmvfio mdev remove {uuid}`), or see the kernel's log for its parent driver"
        )


class DeviceNotBoundToVfio(KvmvfioError):
    """A device a VFIO session needs is not on vfio-pci."""

    def __init__(self, address: str, driver: str | None) -> None:
        self.address = address
        self.driver = driver
        where = f"bound to {driver}" if driver else "bound to no driver"
        how = {
            Interface.CLI: f"`kvmvfio prepare --owner NAME {address}` moves it there",
            Interface.METADATA: "list it in the domain's kvmvfio metadata to have the hook "
            "move it there",
            Interface.API: f"kvmvfio.prepare.prepare([{address!r}], owner) moves it there",
        }[interface()]
        super().__init__(f"PCI device {address} is {where}, not vfio-pci: prepare it first ({how})")


class NoIommuRefused(KvmvfioError):
    """A no-IOMMU group was asked for without the caller allowing it."""

    def __init__(self, group: int, address: str) -> None:
        self.group = group
        self.address = address
        super().__init__(
            f"IOMMU group {group} ({address}) is a no-IOMMU group: the device could DMA anywhere "
            "in host memory and the kernel taints itself; allow it explicitly (--allow-noiommu) "
            "only if you accept that"
        )


class CoherencyRefused(KvmvfioError):
    """Policy ``require``: the IOMMU does not enforce DMA cache coherency."""

    def __init__(self, subject: str, devices: Sequence[str]) -> None:
        self.subject = subject
        self.devices = tuple(devices)
        super().__init__(
            f"{subject} ({', '.join(self.devices)}) cannot have enforced DMA cache coherency: "
            "the IOMMU does not enforce snooping, so the guest's non-coherent DMA would need "
            f"KVM to emulate WBINVD. {_COHERENCY_ADVICE[interface()]} to accept that, or a host "
            "whose IOMMU enforces snooping"
        )


_COHERENCY_ADVICE = {
    Interface.CLI: "Use --coherency=warn",
    Interface.METADATA: "Set coherency='warn' on the device in the domain's kvmvfio metadata",
    Interface.API: "Pass coherency='warn'",
}


class VfTokenRefused(KernelError):
    """The kernel refused a VF's token, or the lack of one (``VFIO_GROUP_GET_DEVICE_FD``).

    A VF whose PF is on vfio-pci opens only with the token its PF's user set
    (``VFIO_DEVICE_FEATURE_PCI_VF_TOKEN``): the VF's user proves it works
    with whoever drives the PF. ``errno`` says which way it failed.
    """

    hints: ClassVar[Mapping[int, str]] = {
        errno.EACCES: "the VF's PF is on vfio-pci, so the kernel wants the VF token set on the "
        "PF (VFIO_DEVICE_FEATURE_PCI_VF_TOKEN); none or another one was given: pass the PF "
        "user's token (vf_token=, --vf-token)",
        errno.EINVAL: "a VF token was given, but the device is not a VF whose PF is on "
        "vfio-pci (nor a PF on vfio-pci); open it without one",
    }


class RlimitModeRefused(KernelError):
    """The kernel refused to set or read an iommufd's pinned-memory accounting mode.

    ``errno`` says why: EPERM (the caller lacks ``CAP_SYS_RESOURCE``),
    EBUSY (the iommufd holds an object already), EOPNOTSUPP or ENOTTY (the
    kernel does not know the option: :attr:`unsupported`).
    """

    hints: ClassVar[Mapping[int, str]] = {
        errno.EPERM: "setting an iommufd's pinned-memory accounting needs CAP_SYS_RESOURCE",
        errno.EBUSY: "the iommufd holds objects already (an IO address space or a bound device); "
        "the accounting mode can only be set on a fresh /dev/iommu, before anything uses it",
        errno.EINVAL: "the kernel knows only 0 (per user) and 1 (per process)",
        errno.EOPNOTSUPP: "this kernel's iommufd has no IOMMU_OPTION_RLIMIT_MODE; "
        "it charges pinned memory per user",
        errno.ENOTTY: "this kernel's iommufd has no IOMMU_OPTION ioctl; "
        "it charges pinned memory per user",
    }

    @property
    def unsupported(self) -> bool:
        """Whether the kernel lacks the option (as opposed to refusing this caller or fd)."""
        return self.errno in (errno.EOPNOTSUPP, errno.ENOTTY)


class NoBusReset(KernelError):
    """ENODEV from a hot reset (or the question before it): no slot or bus reset reaches the device.

    A device on a root bus (or behind a bridge that cannot reset its
    secondary bus) has none; only its own reset applies
    (``VFIO_DEVICE_RESET``, with the methods its ``reset_method`` in sysfs
    lists).
    """

    default_hint = (
        "the device is on a root bus or has no slot or bus reset, so a hot reset cannot reach "
        "it; only its own reset applies (VFIO_DEVICE_RESET, by the methods in its sysfs "
        "reset_method)"
    )


class HotResetRefused(KernelError):
    """EINVAL from ``VFIO_DEVICE_PCI_HOT_RESET``: the kernel's ownership rule was not met."""

    default_hint = (
        "every function the reset reaches must be on vfio-pci and owned by the caller: its "
        "IOMMU group's file given (group path), or bound to the caller's iommufd (cdev path)"
    )


@dataclass(frozen=True)
class ResetBystander:
    """A function a hot reset would reach that kvmvfio will not reset, and why."""

    address: str
    #: Its driver (None: no driver).
    driver: str | None
    #: Its IOMMU group, when it has one.
    group: int | None
    #: Processes holding its group or cdev (``pid N (comm)``).
    holders: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"group {self.group}" if self.group is not None else "no IOMMU group"
        if self.holders:
            why = f"its {where} is open by {', '.join(self.holders)}"
        elif self.driver != "vfio-pci":
            why = f"bound to {self.driver or 'no driver'}, not vfio-pci"
        else:
            why = "on vfio-pci but not asked for"
        return f"{self.address} ({where}): {why}"


class HotResetBlocked(KvmvfioError):
    """A hot reset would reach functions not asked for; refused before the reset ioctl.

    ``bystanders`` names each one and why: on another driver, its group open
    by another process, or only not named. Nothing was reset.
    """

    def __init__(
        self, address: str, reaches: Sequence[str], bystanders: Sequence[ResetBystander]
    ) -> None:
        self.address = address
        self.reaches = tuple(reaches)
        self.bystanders = tuple(bystanders)
        how = {
            Interface.CLI: "name every one of them (`kvmvfio reset --info ADDR` lists them)",
            Interface.METADATA: "name every one of them",
            Interface.API: "pass every one of them (hot_reset_info() lists them)",
        }[interface()]
        listed = "; ".join(str(b) for b in self.bystanders)
        super().__init__(
            f"a hot reset of {address} resets every function on its slot or bus "
            f"({', '.join(self.reaches)}), not only those asked for: {listed}. Nothing was "
            f"reset. Put each on vfio-pci, free it, and {how}"
        )
