"""A fake VFIO/iommufd kernel behind kvmvfio's syscall seam (``uapi.set_backend``).

It answers the ioctls a plan and a session make, in the kernel's terms, and
records each call (ioctl name, file path) so a test can assert on the order
and on what was never asked. The files are the fake tree's regular files,
opened for real; a device fd from ``VFIO_GROUP_GET_DEVICE_FD`` is a new
open of ``/dev/null``.

Hot reset: ``bus`` is what every device's slot or bus reset reaches, as
``(address, group)`` (None: the devices have no slot or bus reset, the
kernel's ENODEV). ``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`` answers ENOSPC
with the count when given too little room, names the devices by group
(a device from a group) or by devid (a cdev: a file under
``vfio/devices``); ``VFIO_DEVICE_PCI_HOT_RESET`` applies the kernel's
ownership rule (every group's file given; an empty list on a cdev) and
records the group files it was given in ``resets``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmvfio import uapi
from kvmvfio.host import PciAddress


@dataclass
class FakeVfio:
    """The kernel's answers: coherency, viability; and every call made."""

    coherent: bool = True
    viable: bool = True
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    #: The names given to VFIO_GROUP_GET_DEVICE_FD (``ADDR`` or ``ADDR vf_token=UUID``).
    opened: list[str] = field(default_factory=list)
    #: An errno VFIO_DEVICE_BIND_IOMMUFD fails with, if any.
    bind_errno: int | None = None
    #: What a hot reset reaches, as (address, group); None: no slot or bus reset (ENODEV).
    bus: Sequence[tuple[str, int]] | None = None
    #: An errno VFIO_DEVICE_PCI_HOT_RESET fails with (after its own checks), if any.
    reset_errno: int | None = None
    #: Each hot reset made: the paths of the group files given (empty on a cdev).
    resets: list[list[str]] = field(default_factory=list)

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
            if self.bind_errno is not None:
                raise OSError(self.bind_errno, os.strerror(self.bind_errno))
            arg.out_devid = 1
            return 0
        if name == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO":
            assert not isinstance(arg, int)
            return self._hot_reset_info(fd, arg)
        if name == "VFIO_DEVICE_PCI_HOT_RESET":
            assert not isinstance(arg, int)
            return self._hot_reset(fd, arg)
        if name == "IOMMU_IOAS_ALLOC":
            assert not isinstance(arg, int)
            arg.out_ioas_id = 2
            return 0
        return 0

    @staticmethod
    def _is_cdev(fd: int) -> bool:
        return "/vfio/devices/" in (uapi.fd_path(fd) or "")

    def _hot_reset_info(self, fd: int, arg: uapi.CData) -> int:
        if self.bus is None:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        header = uapi.ffi.sizeof("struct vfio_pci_hot_reset_info")
        room = (arg.argsz - header) // uapi.ffi.sizeof("struct vfio_pci_dependent_device")
        if room < len(self.bus):
            arg.count = len(self.bus)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        cdev = self._is_cdev(fd)
        arg.flags = (
            uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
            if cdev
            else 0
        )
        arg.count = len(self.bus)
        for index, (address, group) in enumerate(self.bus):
            entry = arg.devices[index]
            addr = PciAddress.parse(address)
            entry.segment, entry.bus, entry.devfn = addr.domain, addr.bus, addr.devfn
            if cdev:
                entry.devid = index + 1
            else:
                entry.group_id = group
        return 0

    def _hot_reset(self, fd: int, arg: uapi.CData) -> int:
        if (arg.count == 0) != self._is_cdev(fd):
            raise OSError(errno.EINVAL, "zero-length array is only for cdev opened devices")
        if self.bus is None:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        given = [uapi.fd_path(arg.group_fds[i]) or "" for i in range(arg.count)]
        if arg.count:
            numbers = {os.path.basename(p) for p in given}
            if not {str(g) for _, g in self.bus} <= numbers:
                raise OSError(errno.EINVAL, "a group is not in the set")
        if self.reset_errno is not None:
            raise OSError(self.reset_errno, os.strerror(self.reset_errno))
        self.resets.append(given)
        return 0

    def names(self) -> list[str]:
        """The ioctls made, by name, in order."""
        return [name for name, _ in self.calls]

    def asked_coherency(self) -> int:
        """How many times the coherency question was asked."""
        return self.names().count("VFIO_CHECK_EXTENSION")
