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
"""

from __future__ import annotations

import errno
from pathlib import Path

from kvmvfio import uapi
from kvmvfio.errors import KernelError, KernelUnsupported
from kvmvfio.vfio.files import FdObject, open_node


class Iommufd(FdObject):
    """An open ``/dev/iommu`` and the IOAS objects it allocated."""

    def __init__(self, devfs: str | Path = "/dev") -> None:
        """Open ``/dev/iommu``; :class:`KernelUnsupported` without CONFIG_IOMMUFD."""
        path = Path(devfs) / "iommu"
        try:
            fd = open_node(path, "iommufd")
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
