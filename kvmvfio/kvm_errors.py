"""Errors of :mod:`kvmvfio.kvm`: a VM's kvm-vfio device and the files KVM holds.

They live beside :mod:`kvmvfio.kvm` rather than in it so that naming one
(``except KvmClosed``) costs no cffi import; re-exported by
:mod:`kvmvfio.errors`.
"""

from __future__ import annotations

from kvmvfio.errors import Busy, KernelError, KvmvfioError, SessionStateError

__all__ = [
    "AlreadyAssociated",
    "KvmClosed",
    "KvmRefusedFile",
    "KvmVfioDeviceExists",
    "NotAssociated",
]


class KvmRefusedFile(KernelError):
    """EINVAL from ``KVM_DEV_VFIO_FILE_ADD``: the file is not a VFIO group or device file."""

    default_hint = "KVM refused the file: it is not a VFIO group (/dev/vfio/N) or VFIO device file"


class AlreadyAssociated(KernelError):
    """EEXIST from ``KVM_DEV_VFIO_FILE_ADD``: KVM holds this file already."""

    default_hint = "the file was added to this VM's kvm-vfio device before"


class NotAssociated(KernelError):
    """ENOENT from ``KVM_DEV_VFIO_FILE_DEL``: KVM does not hold this file."""

    default_hint = "the file was never added to this VM's kvm-vfio device, or was removed already"


class KvmVfioDeviceExists(Busy):
    """EBUSY from ``KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO)``: the VM has its kvm-vfio device."""

    default_hint = (
        "a VM has at most one kvm-vfio device and this VM has one already (QEMU creates "
        "its own as soon as it has a VFIO device); add files through that device instead"
    )


class KvmClosed(SessionStateError):
    """A KVM VM or kvm-vfio device was used after ``close()`` or after its fd was handed over."""

    def __init__(self, action: str, subject: str) -> None:
        self.action = action
        self.state = "closed"
        self.subject = subject
        KvmvfioError.__init__(self, f"cannot {action}: {subject} is closed (or was handed over)")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.action, self.subject))
