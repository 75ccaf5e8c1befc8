"""iommufd, ``/dev/iommu``: the IOMMU context of the modern VFIO paths.

An iommufd holds IO address spaces (IOAS). A VFIO device cdev is bound to an
iommufd (``VFIO_DEVICE_BIND_IOMMUFD``) and attached to an IOAS
(``VFIO_DEVICE_ATTACH_IOMMUFD_PT``), which gives it a hardware page table
(hwpt). A VFIO group can join an iommufd too (``VFIO_GROUP_SET_CONTAINER``
with the iommufd's fd): the kernel then creates a "compat" IOAS and attaches
each device to it when it is opened.

iommufd also answers the legacy container's ioctls for the compat IOAS
(drivers/iommu/iommufd/vfio_compat.c). ``VFIO_CHECK_EXTENSION(VFIO_DMA_CC_IOMMU)``
answers 1 only when every hwpt of that IOAS enforces cache coherency; an IOAS
with no device attached has no hwpt and answers 1, so the answer means
something only once a device is attached (kvmvfio checks that).

Pinned memory. An iommufd pins the pages it maps for DMA and charges them
to someone, by its "rlimit mode" (``IOMMU_OPTION_RLIMIT_MODE``,
drivers/iommu/iommufd/ioas.c and pages.c). By default (:attr:`RlimitMode.USER`)
it charges the pinning process's *user* (``user->locked_vm``), checked
against that process's ``RLIMIT_MEMLOCK``: every process of one uid fills
one count, so two QEMUs of one uid, each allowed its own RAM, cannot both
pin theirs. :attr:`RlimitMode.PROCESS` charges the pinning process
(``mm->locked_vm``, as VFIO's type1 container always did), checked against
its own limit. Setting it needs ``CAP_SYS_RESOURCE`` and an iommufd that
holds no object yet (no IOAS, no bound device); the kernel says EBUSY
otherwise. :func:`open_for_vmm` opens ``/dev/iommu`` for another process
in per-process mode; libvirt does the same for its domains.
"""

from __future__ import annotations

import errno
import logging
from enum import IntEnum
from pathlib import Path

from kvmvfio import uapi
from kvmvfio.errors import KernelError, KernelUnsupported
from kvmvfio.vfio.errors import RlimitModeRefused
from kvmvfio.vfio.files import FdObject, OwnedFd, open_node

log = logging.getLogger(__name__)

#: The call, as errors and the log name it.
RLIMIT_MODE_OP = "IOMMU_OPTION(IOMMU_OPTION_RLIMIT_MODE)"


class RlimitMode(IntEnum):
    """Whom an iommufd charges for the pages it pins: ``IOMMU_OPTION_RLIMIT_MODE``'s value.

    The header documents the values (0 and 1) but names neither.
    """

    #: The kernel's default: the pinning process's user, against that process's limit.
    USER = 0
    #: The pinning process itself (``mm->locked_vm``), against its own limit.
    PROCESS = 1


def _rlimit_option(fd: int, op: int, value: int, subject: str) -> int:
    cmd = uapi.new(
        "iommu_option", option_id=uapi.IOMMU_OPTION_RLIMIT_MODE, op=op, object_id=0, val64=value
    )
    uapi.ioctl(
        fd,
        uapi.IOMMU_OPTION,
        cmd,
        subject=subject,
        errors=dict.fromkeys(RlimitModeRefused.hints, RlimitModeRefused),
        label=RLIMIT_MODE_OP,
    )
    return int(cmd.val64)


def get_rlimit_mode(fd: int, subject: str = "iommufd (/dev/iommu)") -> RlimitMode:
    """Read the accounting mode of the iommufd ``fd`` (``IOMMU_OPTION_OP_GET``).

    Changes nothing; needs no privilege. Raises :class:`RlimitModeRefused`
    (EOPNOTSUPP or ENOTTY from a kernel without the option), or
    :class:`~kvmvfio.errors.KernelError` for an errno the option never gives.
    """
    return RlimitMode(_rlimit_option(fd, uapi.IOMMU_OPTION_OP_GET, 0, subject))


def set_rlimit_mode(fd: int, mode: RlimitMode, subject: str = "iommufd (/dev/iommu)") -> None:
    """Make the iommufd ``fd`` charge what it pins as ``mode`` says (``IOMMU_OPTION_OP_SET``).

    Call it before anything else uses the fd. Raises :class:`RlimitModeRefused`
    (EPERM without ``CAP_SYS_RESOURCE``, EBUSY once the fd holds an object,
    EOPNOTSUPP or ENOTTY from a kernel without the option), or
    :class:`~kvmvfio.errors.KernelError` for an errno the option never gives.
    """
    _rlimit_option(fd, uapi.IOMMU_OPTION_OP_SET, int(mode), subject)


def open_for_vmm(
    devfs: str | Path,
    recipient: str,
    *,
    accounting: RlimitMode | None = RlimitMode.PROCESS,
) -> OwnedFd:
    """Open ``/dev/iommu`` for another process (a VMM) to own, its accounting set first.

    ``recipient`` names that process in the log (``"QEMU pid 4242"``).
    ``accounting`` is set before anything else touches the fd; ``None``
    leaves the kernel's default (per user) and says so. A kernel without
    the option gets a warning and the fd as it is. Raises what
    :func:`~kvmvfio.vfio.files.open_node` raises, and
    :class:`RlimitModeRefused` for any other refusal (the fd is closed then).
    """
    fd = open_node(Path(devfs) / "iommu", "iommufd (/dev/iommu)")
    try:
        _apply_accounting(fd, recipient, accounting)
    except BaseException:
        fd.close()
        raise
    return fd


def _apply_accounting(fd: OwnedFd, recipient: str, accounting: RlimitMode | None) -> None:
    if accounting is None:
        log.info(
            "iommufd for %s: pinned memory left counted per user (the kernel's default)", recipient
        )
        return
    try:
        set_rlimit_mode(fd.fileno(), accounting, fd.subject)
    except RlimitModeRefused as err:
        if not err.unsupported:
            raise
        log.warning(
            "iommufd for %s: %s; QEMUs of one uid then share one RLIMIT_MEMLOCK", recipient, err
        )
        return
    how = {
        RlimitMode.PROCESS: "per process, against its own RLIMIT_MEMLOCK",
        RlimitMode.USER: "per user",
    }[accounting]
    log.info(
        "iommufd for %s: pinned memory counted %s (%s=%d)",
        recipient,
        how,
        RLIMIT_MODE_OP,
        accounting,
    )


class Iommufd(FdObject):
    """An open ``/dev/iommu`` and the IOAS objects it allocated."""

    def __init__(self, devfs: str | Path = "/dev") -> None:
        """Open ``/dev/iommu``; :class:`KernelUnsupported` without CONFIG_IOMMUFD."""
        try:
            fd = open_node(f"{devfs}/iommu", "iommufd")
        except KernelError as err:
            if err.errno == errno.ENOENT:
                raise KernelUnsupported(
                    "iommufd (/dev/iommu)",
                    "the kernel lacks CONFIG_IOMMUFD (Debian's kernels do); "
                    "use the group + container path",
                ) from err
            raise
        super().__init__(fd)
        self._objects: list[int] = []

    def alloc_ioas(self) -> int:
        """``IOMMU_IOAS_ALLOC``: a new, empty IO address space; returns its id."""
        cmd = uapi.new("iommu_ioas_alloc")
        uapi.ioctl(self.fileno(), uapi.IOMMU_IOAS_ALLOC, cmd, subject=self.subject)
        ioas_id = int(cmd.out_ioas_id)
        self._objects.append(ioas_id)
        return ioas_id

    def destroy(self, object_id: int) -> None:
        """``IOMMU_DESTROY`` an object this iommufd allocated."""
        cmd = uapi.new("iommu_destroy")
        cmd.id = object_id
        uapi.ioctl(self.fileno(), uapi.IOMMU_DESTROY, cmd, subject=self.subject)
        if object_id in self._objects:
            self._objects.remove(object_id)

    def _vfio_ioas(self, op: int, ioas_id: int = 0) -> int:
        cmd = uapi.new("iommu_vfio_ioas")
        cmd.op = op
        cmd.ioas_id = ioas_id
        uapi.ioctl(self.fileno(), uapi.IOMMU_VFIO_IOAS, cmd, subject=self.subject)
        return int(cmd.ioas_id)

    def set_compat_ioas(self, ioas_id: int) -> None:
        """Make ``ioas_id`` the IOAS that the VFIO compatibility ioctls act on."""
        self._vfio_ioas(uapi.IOMMU_VFIO_IOAS_SET, ioas_id)

    def compat_ioas(self) -> int | None:
        """The compat IOAS id, or None when there is none."""
        try:
            return self._vfio_ioas(uapi.IOMMU_VFIO_IOAS_GET)
        except KernelError as err:
            if err.errno == errno.ENOENT:
                return None
            raise

    def rlimit_mode(self) -> RlimitMode:
        """Whom this iommufd charges for pinned pages; see :func:`get_rlimit_mode`."""
        return get_rlimit_mode(self.fileno(), self.subject)

    def set_rlimit_mode(self, mode: RlimitMode) -> None:
        """Charge pinned pages as ``mode`` says; see :func:`set_rlimit_mode`."""
        set_rlimit_mode(self.fileno(), mode, self.subject)

    def check_extension(self, extension: int) -> int:
        """``VFIO_CHECK_EXTENSION`` answered by iommufd's VFIO compatibility layer."""
        return uapi.ioctl(self.fileno(), uapi.VFIO_CHECK_EXTENSION, extension, subject=self.subject)

    def enforces_coherency(self) -> bool:
        """Whether every hwpt of the compat IOAS enforces DMA cache coherency.

        Meaningful only once a device is attached to that IOAS. Raises
        :class:`KernelError` (ENODEV) when there is no compat IOAS.
        """
        return bool(self.check_extension(uapi.VFIO_DMA_CC_IOMMU))

    def _release(self) -> None:
        # Closing the iommufd frees its objects; nothing to undo one by one.
        self._objects.clear()
