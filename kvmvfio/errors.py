"""The one error hierarchy of kvmvfio: its base classes, and a map of the rest.

Every error kvmvfio raises on purpose derives from :class:`KvmvfioError`.
``str(err)`` is a sentence a user can act on; the attributes carry the same
facts for programs (the device or group concerned, the kernel's errno, QEMU's
own error class and words).

A failed system call is also an :class:`OSError` (see :class:`KernelError`):
``err.errno`` is the kernel's errno, ``err.filename`` the path of the file the
call was made on, and ``err.op`` names the call (``"VFIO_GROUP_GET_STATUS"``).
Errno is mapped once, where the call is made (for an ioctl, in
:func:`kvmvfio.uapi.ioctl`), and kept: a call that gives one errno a meaning
of its own names the :class:`KernelError` subclass for it there, and the
subclass words it with :attr:`~KernelError.hints` or
:attr:`~KernelError.default_hint`.

This module holds the base classes and what every layer shares (:func:`shown`,
:class:`Interface`, :func:`speaking_to`). The leaves live beside the layer
whose concept they name, in that layer's ``errors`` module, and are
re-exported here: ``from kvmvfio.errors import QemuRefused`` and ``from
kvmvfio.qemu.errors import QemuRefused`` give the same class. Loading one
layer's leaves loads nothing of the others.

The hierarchy (``[module]``: where a leaf lives, under ``kvmvfio.``)::

    KvmvfioError
     +-- UsageError                        (exit status 2)
     |    +-- InvalidAddress, InvalidGroup (also ValueError)     [host.errors]
     |    +-- UnsafeSysfsName, NotAnMdevParent, UnknownMdevType  [prepare.errors]
     |    +-- InvalidMdevUuid (also ValueError)                  [host.errors]
     |    +-- NotSriovCapable                                    [prepare.sriov]
     |    +-- VfTokenNeeded                                      [vfio.plan]
     |    +-- HooksDirMissing                                    [libvirt.errors]
     |    +-- MetadataError                                      [libvirt.metadata]
     +-- NotFound
     |    +-- DeviceNotFound, GroupNotFound, MdevNotFound        [host.errors]
     +-- KernelError                       (also OSError: errno, filename, op)
     |    +-- PermissionDenied                                   [errors]
     |    +-- Busy                                               [errors]
     |    |    +-- KvmVfioDeviceExists                           [kvm_errors]
     |    +-- NoInterruptRemapping, RlimitModeRefused,
     |    |   VfTokenRefused, NoBusReset, HotResetRefused        [vfio.errors]
     |    +-- KvmRefusedFile, AlreadyAssociated, NotAssociated   [kvm_errors]
     |    +-- HookFileError                                      [libvirt.errors]
     +-- SessionStateError
     |    +-- KvmClosed                                          [kvm_errors]
     +-- NoIommuGroup, SysfsError, KernelUnsupported             [host.errors]
     +-- GroupNotViable, NotADeviceOfGroup, DeviceNotBoundToVfio,
     |   NoIommuRefused, CoherencyRefused, HotResetBlocked,
     |   MdevNotReady                                            [vfio.errors]
     +-- FdClosed                                                [_closing; vfio.errors]
     +-- QemuError                                               [qemu.errors]
     |    +-- QemuRefused, QemuGone, QemuNoAnswer, QemuReplyInvalid,
     |        QemuPeerMismatch, NoHotplugPort, DetachTimeout,
     |        NotAttached, MemlockTooLow, MixedVfioBackends,
     |        QemuConfined                                       [qemu.errors]
     +-- ClaimedBy, UnsafeToUnbind, JournalError, UntrustedFile,
     |   MdevExists, NoMdevInstances, MdevInUse, MdevClaimed,
     |   DeviceNotAnswering                                      [prepare.errors]
     +-- VfsInUse, PfHasVfs, PfClaimed, PfInUse, NotEnoughVfs    [prepare.sriov]
     +-- GroupNotViable > UnlistedMembers                        [prepare.members]
     +-- UsageError > InvalidRom; RomUnreadable                  [host.rom]
     +-- LibvirtError, ForeignHook, StatusFileInvalid            [libvirt.errors]
     +-- LabError                                                [lab.errors]

:class:`~kvmvfio.host.errors.Blocker` (one group member in the way, data
for :class:`~kvmvfio.vfio.errors.GroupNotViable`) lives in ``host.errors``.
The KVM leaves sit in ``kvm_errors`` beside the module :mod:`kvmvfio.kvm`,
not in it, so that catching one costs no cffi import.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import errno as _errno
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar

from kvmvfio._lazy import lazy_getattr

if TYPE_CHECKING:
    from kvmvfio._closing import FdClosed
    from kvmvfio.host.errors import (
        Blocker,
        DeviceNotFound,
        GroupNotFound,
        InvalidAddress,
        InvalidGroup,
        InvalidMdevUuid,
        KernelUnsupported,
        MdevNotFound,
        NoIommuGroup,
        SysfsError,
    )
    from kvmvfio.host.rom import InvalidRom, RomUnreadable
    from kvmvfio.kvm_errors import (
        AlreadyAssociated,
        KvmClosed,
        KvmRefusedFile,
        KvmVfioDeviceExists,
        NotAssociated,
    )
    from kvmvfio.lab.errors import LabError
    from kvmvfio.libvirt.errors import (
        ForeignHook,
        HookFileError,
        HooksDirMissing,
        LibvirtError,
        StatusFileInvalid,
    )
    from kvmvfio.libvirt.metadata import MetadataError
    from kvmvfio.prepare.errors import (
        ClaimedBy,
        DeviceNotAnswering,
        JournalError,
        MdevClaimed,
        MdevExists,
        MdevInUse,
        NoMdevInstances,
        NotAnMdevParent,
        UnknownMdevType,
        UnsafeSysfsName,
        UnsafeToUnbind,
        UntrustedFile,
    )
    from kvmvfio.prepare.members import UnlistedMembers
    from kvmvfio.qemu.errors import (
        DetachTimeout,
        MemlockTooLow,
        MixedVfioBackends,
        NoHotplugPort,
        NotAttached,
        QemuConfined,
        QemuError,
        QemuGone,
        QemuNoAnswer,
        QemuPeerMismatch,
        QemuRefused,
        QemuReplyInvalid,
    )
    from kvmvfio.vfio.errors import (
        CoherencyRefused,
        DeviceNotBoundToVfio,
        GroupNotViable,
        HotResetBlocked,
        HotResetRefused,
        MdevNotReady,
        NoBusReset,
        NoInterruptRemapping,
        NoIommuRefused,
        NotADeviceOfGroup,
        RlimitModeRefused,
        VfTokenRefused,
    )

#: The leaves, by the module each lives in (see the map above). Each is
#: imported on first use (PEP 562): the layers' modules import this one.
_LEAVES = {
    "kvmvfio.host.errors": (
        "InvalidAddress",
        "InvalidGroup",
        "DeviceNotFound",
        "GroupNotFound",
        "InvalidMdevUuid",
        "MdevNotFound",
        "NoIommuGroup",
        "Blocker",
        "SysfsError",
        "KernelUnsupported",
    ),
    "kvmvfio.vfio.errors": (
        "GroupNotViable",
        "NoInterruptRemapping",
        "NotADeviceOfGroup",
        "MdevNotReady",
        "DeviceNotBoundToVfio",
        "NoIommuRefused",
        "CoherencyRefused",
        "RlimitModeRefused",
        "VfTokenRefused",
        "NoBusReset",
        "HotResetRefused",
        "HotResetBlocked",
    ),
    "kvmvfio._closing": ("FdClosed",),
    "kvmvfio.kvm_errors": (
        "KvmRefusedFile",
        "AlreadyAssociated",
        "NotAssociated",
        "KvmVfioDeviceExists",
        "KvmClosed",
    ),
    "kvmvfio.qemu.errors": (
        "QemuError",
        "QemuRefused",
        "QemuPeerMismatch",
        "QemuGone",
        "QemuNoAnswer",
        "QemuReplyInvalid",
        "NoHotplugPort",
        "MixedVfioBackends",
        "DetachTimeout",
        "NotAttached",
        "MemlockTooLow",
        "QemuConfined",
    ),
    "kvmvfio.prepare.errors": (
        "ClaimedBy",
        "UnsafeToUnbind",
        "UnsafeSysfsName",
        "JournalError",
        "UntrustedFile",
        "NotAnMdevParent",
        "UnknownMdevType",
        "MdevExists",
        "NoMdevInstances",
        "MdevInUse",
        "MdevClaimed",
        "DeviceNotAnswering",
    ),
    "kvmvfio.prepare.members": ("UnlistedMembers",),
    "kvmvfio.host.rom": ("InvalidRom", "RomUnreadable"),
    "kvmvfio.libvirt.errors": (
        "LibvirtError",
        "HookFileError",
        "ForeignHook",
        "HooksDirMissing",
        "StatusFileInvalid",
    ),
    "kvmvfio.libvirt.metadata": ("MetadataError",),
    "kvmvfio.lab.errors": ("LabError",),
}
_MOVED = {name: module for module, names in _LEAVES.items() for name in names}

# In the order of the map: the bases, then each layer's leaves.
__all__ = [  # noqa: RUF022
    "MAX_SHOWN",
    "shown",
    "Interface",
    "interface",
    "speaking_to",
    "KvmvfioError",
    "UsageError",
    "NotFound",
    "KernelError",
    "PermissionDenied",
    "Busy",
    "SessionStateError",
    "InvalidAddress",
    "InvalidGroup",
    "DeviceNotFound",
    "GroupNotFound",
    "InvalidMdevUuid",
    "MdevNotFound",
    "NoIommuGroup",
    "Blocker",
    "SysfsError",
    "KernelUnsupported",
    "GroupNotViable",
    "NoInterruptRemapping",
    "NotADeviceOfGroup",
    "MdevNotReady",
    "DeviceNotBoundToVfio",
    "NoIommuRefused",
    "CoherencyRefused",
    "FdClosed",
    "RlimitModeRefused",
    "VfTokenRefused",
    "NoBusReset",
    "HotResetRefused",
    "HotResetBlocked",
    "KvmRefusedFile",
    "AlreadyAssociated",
    "NotAssociated",
    "KvmVfioDeviceExists",
    "KvmClosed",
    "QemuError",
    "QemuRefused",
    "QemuPeerMismatch",
    "QemuGone",
    "QemuNoAnswer",
    "QemuReplyInvalid",
    "NoHotplugPort",
    "MixedVfioBackends",
    "DetachTimeout",
    "NotAttached",
    "MemlockTooLow",
    "QemuConfined",
    "ClaimedBy",
    "UnsafeToUnbind",
    "UnsafeSysfsName",
    "JournalError",
    "UntrustedFile",
    "NotAnMdevParent",
    "UnknownMdevType",
    "MdevExists",
    "NoMdevInstances",
    "MdevInUse",
    "MdevClaimed",
    "DeviceNotAnswering",
    "UnlistedMembers",
    "InvalidRom",
    "RomUnreadable",
    "LibvirtError",
    "HookFileError",
    "ForeignHook",
    "HooksDirMissing",
    "StatusFileInvalid",
    "MetadataError",
    "LabError",
]

__getattr__ = lazy_getattr(__name__, _MOVED)


def __dir__() -> list[str]:
    return sorted({*globals(), *_MOVED})


#: Longest piece of untrusted text :func:`shown` keeps.
MAX_SHOWN = 200


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` as it may be printed: control characters escaped, at most ``limit`` characters.

    For strings kvmvfio did not write itself (owner names read back from the
    journal, QEMU's words, XML values): a terminal must never receive their
    control characters raw.
    """
    if text.isprintable() and len(text) <= limit:
        return text
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else f"{safe[: limit - 1]}…"


class Interface(enum.Enum):
    """Where a user meets kvmvfio: advice in messages is worded for it."""

    API = "api"  # a Python caller: arguments
    CLI = "cli"  # the kvmvfio command: flags
    METADATA = "metadata"  # a libvirt domain's kvmvfio metadata: attributes


_interface: contextvars.ContextVar[Interface] = contextvars.ContextVar(
    "kvmvfio_interface", default=Interface.API
)


def interface() -> Interface:
    """The interface the current call reached kvmvfio through (``API`` unless set)."""
    return _interface.get()


@contextlib.contextmanager
def speaking_to(where: Interface) -> Iterator[None]:
    """Word the advice of errors raised inside this block for ``where``."""
    token = _interface.set(where)
    try:
        yield
    finally:
        _interface.reset(token)


class KvmvfioError(Exception):
    """Base of every error kvmvfio raises on purpose."""

    #: Process exit status the CLI uses for this error.
    exit_code = 1


class UsageError(KvmvfioError):
    """The caller asked for something malformed (bad argument, bad file)."""

    exit_code = 2


class NotFound(KvmvfioError):
    """Something named by the caller does not exist on this host."""


class KernelError(KvmvfioError, OSError):
    """A system call failed. Also an OSError: ``errno``, ``filename`` are set.

    ``op`` names the call (an ioctl name such as ``VFIO_SET_IOMMU``, or
    ``open``); ``subject`` names what it concerned, for the sentence.
    A subclass explains its errnos by setting :attr:`hints` (errno ->
    sentence) or :attr:`default_hint`, not by copying the constructor.
    """

    #: What each errno means for this call, when the caller gives no hint.
    hints: ClassVar[Mapping[int, str]] = {}
    #: The hint for any other errno, when the caller gives none.
    default_hint: ClassVar[str | None] = None

    def __init__(
        self,
        err: int,
        op: str,
        path: str | None = None,
        subject: str | None = None,
        hint: str | None = None,
    ) -> None:
        OSError.__init__(self, err, os.strerror(err), path)
        self.op = op
        self.subject = subject
        self.hint = hint or self.hints.get(err) or self.default_hint

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        where = self.subject or self.filename or "the file"
        text = f"{self.op} on {where} failed: {self.strerror} ({name})"
        if self.hint:
            text += f"; {self.hint}"
        return text

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.errno, self.op, self.filename, self.subject, self.hint))


class PermissionDenied(KernelError):
    """EPERM/EACCES on a kvmvfio call, with what privilege was needed."""


class Busy(KernelError):
    """EBUSY: another process (``holder``, when found) has the group or device open.

    A subclass words the case where no holder is named by setting
    :attr:`~KernelError.default_hint`.
    """

    default_hint = "another process holds it"

    def __init__(
        self,
        err: int,
        op: str,
        path: str | None = None,
        subject: str | None = None,
        holder: str | None = None,
    ) -> None:
        super().__init__(err, op, path, subject, f"held by {holder}" if holder else None)
        self.holder = holder

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.errno, self.op, self.filename, self.subject, self.holder))


class SessionStateError(KvmvfioError):
    """A method was called in a state where it cannot run (e.g. open twice)."""

    def __init__(self, action: str, state: str) -> None:
        self.action = action
        self.state = state
        super().__init__(f"cannot {action} a session that is {state}")
