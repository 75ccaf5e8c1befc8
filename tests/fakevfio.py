"""A fake VFIO/iommufd kernel behind kvmvfio's syscall seam (``uapi.set_backend``).

It answers the ioctls a plan and a session make, in the kernel's terms, and
records each call (ioctl name, file path) so a test can assert on the order
and on what was never asked. The files are the fake tree's regular files,
opened for real; a device fd from ``VFIO_GROUP_GET_DEVICE_FD`` is a new
open of ``/dev/null``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvmvfio import uapi


@dataclass
class FakeVfio:
    """The kernel's answers: coherency, viability; and every call made."""

    coherent: bool = True
    viable: bool = True
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    #: The names given to VFIO_GROUP_GET_DEVICE_FD (``ADDR`` or ``ADDR vf_token=UUID``).
    opened: list[str] = field(default_factory=list)

    def __call__(self, fd: int, op: uapi.Ioctl, arg: uapi.CData | int) -> int:
        name = op.name
        self.calls.append((name, uapi.fd_path(fd)))
        if name == "VFIO_GET_API_VERSION":
            return uapi.VFIO_API_VERSION
        if name == "VFIO_CHECK_EXTENSION":
            return int(self.coherent) if arg == uapi.VFIO_DMA_CC_IOMMU else 1
        if name == "VFIO_GROUP_GET_STATUS":
            assert not isinstance(arg, int)
            arg.flags = uapi.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0
            return 0
        if name == "VFIO_GROUP_GET_DEVICE_FD":
            assert not isinstance(arg, int)
            self.opened.append(uapi.ffi.string(arg).decode())
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        if name == "VFIO_DEVICE_BIND_IOMMUFD":
            assert not isinstance(arg, int)
            arg.out_devid = 1
            return 0
        if name == "IOMMU_IOAS_ALLOC":
            assert not isinstance(arg, int)
            arg.out_ioas_id = 2
            return 0
        return 0

    def names(self) -> list[str]:
        """The ioctls made, by name, in order."""
        return [name for name, _ in self.calls]

    def asked_coherency(self) -> int:
        """How many times the coherency question was asked."""
        return self.names().count("VFIO_CHECK_EXTENSION")
