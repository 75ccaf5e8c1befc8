"""The legacy VFIO container, ``/dev/vfio/vfio``.

A container is one IOMMU context. Groups join it (``VFIO_GROUP_SET_CONTAINER``
on the group), and once the first group has joined, ``VFIO_SET_IOMMU`` picks
the IOMMU model (type1v2 on x86) and attaches the groups to an IOMMU domain.
Only then does ``VFIO_CHECK_EXTENSION(VFIO_DMA_CC_IOMMU)`` answer for real:
whether every domain of the container enforces DMA cache coherency. The
kernel gives KVM the same answer for a group in this container
(``vfio_file_enforced_coherent`` → ``vfio_container_ioctl_check_extension``).
"""

from __future__ import annotations

import errno
from pathlib import Path

from kvmvfio import uapi
from kvmvfio.errors import KernelError, KernelUnsupported, NoInterruptRemapping
from kvmvfio.vfio.files import FdObject, open_node


class Container(FdObject):
    """An open ``/dev/vfio/vfio``."""

    def __init__(self, devfs: str | Path = "/dev") -> None:
        """Open the container and check the API version.

        Raises :class:`KernelUnsupported` when the kernel has no container
        (``CONFIG_VFIO_CONTAINER``) or speaks another VFIO API version.
        """
        try:
            fd = open_node(f"{devfs}/vfio/vfio", "the VFIO container")
        except KernelError as err:
            if err.errno == errno.ENOENT:
                raise KernelUnsupported(
                    "the VFIO container (/dev/vfio/vfio)",
                    "the kernel lacks CONFIG_VFIO_CONTAINER, or vfio is not loaded; "
                    "use the iommufd path",
                ) from err
            raise
        super().__init__(fd)
        self.iommu_type: int | None = None
        try:
            version = uapi.ioctl(self.fileno(), uapi.VFIO_GET_API_VERSION, subject=self.subject)
            if version != uapi.VFIO_API_VERSION:
                raise KernelUnsupported(
                    f"VFIO API version {version}", f"kvmvfio speaks version {uapi.VFIO_API_VERSION}"
                )
        except BaseException:
            self.close()
            raise

    def check_extension(self, extension: int) -> int:
        """``VFIO_CHECK_EXTENSION``: the kernel's answer (0 = no)."""
        return uapi.ioctl(self.fileno(), uapi.VFIO_CHECK_EXTENSION, extension, subject=self.subject)

    def set_iommu(self, iommu_type: int = uapi.VFIO_TYPE1v2_IOMMU, *, groups: str = "") -> None:
        """``VFIO_SET_IOMMU``: attach the joined groups to an IOMMU domain.

        Raises :class:`NoInterruptRemapping` for the EPERM the kernel gives
        when the IOMMU cannot isolate MSIs.
        """
        try:
            uapi.ioctl(
                self.fileno(),
                uapi.VFIO_SET_IOMMU,
                iommu_type,
                subject=groups or self.subject,
                errors={errno.EPERM: NoInterruptRemapping},
            )
        except KernelError as err:
            # Asked here rather than up front: one ioctl fewer per session.
            if err.errno in (errno.EINVAL, errno.ENODEV) and not self.check_extension(iommu_type):
                raise KernelUnsupported(
                    f"VFIO IOMMU type {iommu_type}",
                    "the kernel lacks CONFIG_VFIO_IOMMU_TYPE1 (or it is not loaded)",
                ) from err
            raise
        self.iommu_type = iommu_type

    def enforces_coherency(self) -> bool:
        """Whether the IOMMU domains enforce DMA cache coherency (after :meth:`set_iommu`)."""
        return bool(self.check_extension(uapi.VFIO_DMA_CC_IOMMU))
