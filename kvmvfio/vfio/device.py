"""A VFIO device file: what a VMM uses to reach one PCI function.

There are two ways to get one:

- from a group: ``VFIO_GROUP_GET_DEVICE_FD`` on ``/dev/vfio/N`` with the
  device's name. The group must already be in a container (or an iommufd);
  the device is usable at once.
- as a cdev: ``open("/dev/vfio/devices/vfioN")``. The file does nothing until
  ``VFIO_DEVICE_BIND_IOMMUFD`` binds it to an iommufd, and then
  ``VFIO_DEVICE_ATTACH_IOMMUFD_PT`` attaches it to an IOAS.

Either way the kernel takes the KVM association at the moment the device is
first opened for use (group: the first ``GET_DEVICE_FD``; cdev: the bind):
a file added to KVM's VFIO device after that point reaches KVM but not the
device driver. :class:`kvmvfio.vfio.session.VfioSession` enforces that order.
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kvmvfio import uapi
from kvmvfio.errors import Busy, KernelError, NoInterruptRemapping
from kvmvfio.host.procs import holders
from kvmvfio.vfio.files import FdObject, OwnedFd, open_node


@dataclass(frozen=True)
class DeviceInfo:
    """``VFIO_DEVICE_GET_INFO``."""

    flags: int
    num_regions: int
    num_irqs: int

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & uapi.VFIO_DEVICE_FLAGS_PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & uapi.VFIO_DEVICE_FLAGS_RESET)


@dataclass(frozen=True)
class RegionInfo:
    """``VFIO_DEVICE_GET_REGION_INFO`` of one region (a BAR, config space, ROM, VGA)."""

    index: int
    flags: int
    size: int
    offset: int

    @property
    def mappable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP)


@dataclass(frozen=True)
class IrqInfo:
    """``VFIO_DEVICE_GET_IRQ_INFO`` of one interrupt index (INTx, MSI, MSI-X, ...)."""

    index: int
    flags: int
    count: int


_T = TypeVar("_T")


def _present(ask: Callable[[int], _T], count: int) -> list[_T]:
    found = []
    for index in range(count):
        try:
            found.append(ask(index))
        except KernelError as err:
            if err.errno != errno.EINVAL:
                raise
    return found


class Device(FdObject):
    """An open VFIO device file (from a group, or a cdev)."""

    def __init__(
        self,
        fd: OwnedFd,
        address: str,
        cdev: str | None = None,
        related: Sequence[str | Path] = (),
    ) -> None:
        super().__init__(fd)
        self.address = address
        self.cdev = cdev
        self.related = tuple(related)
        self.bound = False
        self.devid: int | None = None
        self.attached_to: int | None = None

    @classmethod
    def open_cdev(
        cls,
        address: str,
        cdev: str,
        devfs: str | Path = "/dev",
        *,
        related: Sequence[str | Path] = (),
    ) -> Device:
        """Open ``/dev/vfio/devices/<cdev>`` (unbound: nothing happens to the device yet).

        ``related`` names the group node, whose holder (the kernel's EBUSY
        when someone has the group open) is named in :class:`Busy`.
        """
        path = Path(devfs) / "vfio" / "devices" / cdev
        fd = open_node(
            path,
            f"device {address} ({cdev})",
            missing_hint="the device is not bound to vfio-pci",
            related=related,
        )
        return cls(fd, address, cdev, related)

    def set_vf_token(self, token: uuid.UUID) -> None:
        """``VFIO_DEVICE_FEATURE(SET, PCI_VF_TOKEN)``: the token this PF's VFs open with.

        On a PF on vfio-pci. The kernel checks it when a VF is opened through
        its group (the name ``ADDR vf_token=UUID``). Raises
        :class:`~kvmvfio.errors.KernelError` with the kernel's errno (EINVAL:
        the device is not a PF on vfio-pci).
        """
        data = list(token.bytes)
        cmd = uapi.ffi.new(
            "struct vfio_device_feature *",
            {
                "argsz": uapi.ffi.sizeof("struct vfio_device_feature") + len(data),
                "flags": uapi.VFIO_DEVICE_FEATURE_SET | uapi.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN,
                "data": data,
            },
        )
        uapi.ioctl(
            self.fileno(),
            uapi.VFIO_DEVICE_FEATURE,
            cmd,
            subject=self.subject,
            label="VFIO_DEVICE_FEATURE(SET, PCI_VF_TOKEN)",
        )

    def bind_iommufd(self, iommufd_fd: int) -> int:
        """``VFIO_DEVICE_BIND_IOMMUFD``: open the device for use on an iommufd; return its devid.

        Raises :class:`NoInterruptRemapping` for the EPERM of an IOMMU that
        cannot isolate MSIs, and :class:`Busy` naming the holder when another
        file has the device bound already (the kernel's EINVAL: a cdev is
        opened for use once at a time).
        """
        cmd = uapi.new("vfio_device_bind_iommufd")
        cmd.iommufd = iommufd_fd
        op = "VFIO_DEVICE_BIND_IOMMUFD"
        try:
            uapi.ioctl(
                self.fileno(),
                uapi.VFIO_DEVICE_BIND_IOMMUFD,
                cmd,
                subject=self.subject,
                errors={errno.EPERM: NoInterruptRemapping},
            )
        except KernelError as err:
            if err.errno in (errno.EBUSY, errno.EINVAL):
                who = holders(self.path, *self.related)
                if who:
                    raise Busy(err.errno, op, self.path, self.subject, ", ".join(who)) from err
            raise
        self.bound = True
        self.devid = int(cmd.out_devid)
        return self.devid

    def attach(self, pt_id: int) -> None:
        """``VFIO_DEVICE_ATTACH_IOMMUFD_PT``: attach to an IOAS (or hwpt)."""
        cmd = uapi.new("vfio_device_attach_iommufd_pt")
        cmd.pt_id = pt_id
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd, subject=self.subject)
        self.attached_to = pt_id

    def detach(self) -> None:
        """``VFIO_DEVICE_DETACH_IOMMUFD_PT``."""
        cmd = uapi.new("vfio_device_detach_iommufd_pt")
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, cmd, subject=self.subject)
        self.attached_to = None

    def info(self) -> DeviceInfo:
        """``VFIO_DEVICE_GET_INFO``."""
        cmd = uapi.new("vfio_device_info")
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_GET_INFO, cmd, subject=self.subject)
        return DeviceInfo(
            flags=int(cmd.flags), num_regions=int(cmd.num_regions), num_irqs=int(cmd.num_irqs)
        )

    def region(self, index: int) -> RegionInfo:
        """``VFIO_DEVICE_GET_REGION_INFO`` for region ``index``."""
        cmd = uapi.new("vfio_region_info")
        cmd.index = index
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_GET_REGION_INFO, cmd, subject=self.subject)
        return RegionInfo(
            index=index, flags=int(cmd.flags), size=int(cmd.size), offset=int(cmd.offset)
        )

    def irq(self, index: int) -> IrqInfo:
        """``VFIO_DEVICE_GET_IRQ_INFO`` for interrupt index ``index``."""
        cmd = uapi.new("vfio_irq_info")
        cmd.index = index
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_GET_IRQ_INFO, cmd, subject=self.subject)
        return IrqInfo(index=index, flags=int(cmd.flags), count=int(cmd.count))

    def regions(self) -> list[RegionInfo]:
        """The regions the device has, among the ``num_regions`` indexes it reports.

        vfio-pci reports every index it knows and answers EINVAL for the
        ones this device lacks (the VGA region of a device that is not VGA).
        """
        return _present(self.region, self.info().num_regions)

    def irqs(self) -> list[IrqInfo]:
        """The interrupt indexes the device has (no ERR index on conventional PCI)."""
        return _present(self.irq, self.info().num_irqs)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (raises :class:`KernelError` when the device has no reset)."""
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_RESET, subject=self.subject)
