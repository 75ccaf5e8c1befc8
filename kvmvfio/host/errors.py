"""Errors of the host layer: addresses, the sysfs model, IOMMU groups, kernel support.

Raised by :mod:`kvmvfio.host` (pure reads of sysfs and /dev) and by the
layers above when they ask it; re-exported by :mod:`kvmvfio.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmvfio.errors import KvmvfioError, NotFound, UsageError, shown

if TYPE_CHECKING:
    from kvmvfio.host.iommu import NoGroup

__all__ = [
    "Blocker",
    "DeviceNotFound",
    "GroupNotFound",
    "InvalidAddress",
    "InvalidGroup",
    "KernelUnsupported",
    "NoIommuGroup",
    "SysfsError",
]


class InvalidAddress(UsageError, ValueError):
    """Text that is not a PCI address in ``[domain:]bus:slot.func`` form."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"{text!r} is not a PCI address ({reason}); expected [DDDD:]BB:SS.F")


class InvalidGroup(UsageError, ValueError):
    """Text that is not an IOMMU group number."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(f"{text!r} is neither an IOMMU group number nor a PCI address")


class DeviceNotFound(NotFound):
    """No PCI device at this address."""

    def __init__(self, address: str, root: str = "/sys") -> None:
        self.address = address
        self.root = root
        super().__init__(f"no PCI device {address} on this host (looked in {root}/bus/pci/devices)")


class GroupNotFound(NotFound):
    """No IOMMU group with this number."""

    def __init__(self, group: str, root: str = "/sys") -> None:
        self.group = group
        self.root = root
        super().__init__(
            f"no IOMMU group {group} on this host (looked in {root}/kernel/iommu_groups)"
        )


class InvalidMdevUuid(UsageError, ValueError):
    """A text that should name a mediated device is not a UUID."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(
            f"{shown(text, 60)!r} is not a mediated device's UUID "
            "(8-4-4-4-12 hexadecimal digits, like 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001)"
        )


class MdevNotFound(NotFound):
    """No mediated device with this UUID."""

    def __init__(self, uuid: str, root: str = "/sys") -> None:
        self.uuid = uuid
        self.root = root
        super().__init__(
            f"no mediated device {uuid} on this host (looked in {root}/bus/mdev/devices)"
        )


class NoIommuGroup(KvmvfioError):
    """The device is in no IOMMU group; ``why`` (a :class:`~kvmvfio.host.NoGroup`) says why.

    ``why.cause`` is the reason as data (no IOMMU in use, the device is the
    IOMMU, not probed until a driver binds, not covered), ``why.iommu`` the
    IOMMU concerned; the sentence is ``why.reason``.
    """

    def __init__(self, address: str, why: NoGroup | None = None) -> None:
        self.address = address
        self.why = why
        reason = "the host's IOMMU does not translate it" if why is None else why.reason
        super().__init__(f"PCI device {address} is in no IOMMU group: {reason}")


@dataclass(frozen=True)
class Blocker:
    """One member of an IOMMU group that keeps the group from being viable."""

    address: str
    driver: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.address} ({self.reason})"


class SysfsError(KvmvfioError):
    """A sysfs file held something the kernel never writes there."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"unexpected contents in {path}: {detail}")


class KernelUnsupported(KvmvfioError):
    """The running kernel lacks a feature the caller asked for."""

    def __init__(self, feature: str, hint: str) -> None:
        self.feature = feature
        self.hint = hint
        super().__init__(f"this kernel does not support {feature}: {hint}")
