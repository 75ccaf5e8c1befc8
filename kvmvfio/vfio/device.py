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
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

from kvmvfio import uapi
from kvmvfio.errors import Busy, KernelError, NoInterruptRemapping
from kvmvfio.host.address import PciAddress
from kvmvfio.host.procs import holders
from kvmvfio.vfio.errors import HotResetRefused, NoBusReset
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


@dataclass(frozen=True)
class DependentDevice:
    """One PCI function a hot reset reaches (an entry of ``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``).

    The kernel names it by IOMMU group when asked through a device opened
    from its group, and by devid when asked through a cdev bound to an
    iommufd; so exactly one of :attr:`group` and :attr:`owned` is set.
    """

    address: PciAddress
    #: Its IOMMU group (group path); None on the cdev path.
    group: int | None = None
    #: Its devid in the asking iommufd (cdev path, when bound to it); None otherwise.
    devid: int | None = None
    #: cdev path: whether the asking iommufd owns it (bound to it, or its group held by it).
    owned: bool | None = None


@dataclass(frozen=True)
class HotResetInfo:
    """What a hot reset of one device would reach, as the kernel answered."""

    #: The device asked through.
    address: str
    devices: tuple[DependentDevice, ...]
    #: The kernel named the devices by devid (the device was opened as a cdev).
    by_devid: bool = False
    #: cdev path: every device is owned by the asking iommufd (the reset may go ahead).
    all_owned: bool = False

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(str(d.address) for d in self.devices)


def _dependent(entry: uapi.CData, by_devid: bool) -> DependentDevice:
    devfn = int(entry.devfn)
    address = PciAddress(int(entry.segment), int(entry.bus), devfn >> 3, devfn & 7)
    if not by_devid:
        return DependentDevice(address, group=int(entry.group_id))
    # The kernel stores VFIO_PCI_DEVID_NOT_OWNED (-1) in the __u32.
    devid = int(uapi.ffi.cast("int32_t", entry.devid))
    owned = devid != uapi.VFIO_PCI_DEVID_NOT_OWNED
    return DependentDevice(address, devid=devid if devid > 0 else None, owned=owned)


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
        fd = open_node(
            f"{devfs}/vfio/devices/{cdev}",
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
        opened for use once at a time) or another iommufd owns its IOMMU
        group (EPERM from the group's DMA ownership, when a holder of the
        ``related`` nodes is found: 6.12 answers that, not EBUSY).
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
            if err.errno in (errno.EBUSY, errno.EINVAL, errno.EPERM):
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

    def read_rom(self, limit: int = 16 << 20) -> bytes:
        """The option ROM as vfio-pci serves it: what QEMU shows the guest without ``romfile``.

        Reads the ROM region (``VFIO_PCI_ROM_REGION_INDEX``; for the boot VGA
        device the kernel serves its shadow copy), at most ``limit`` bytes.
        Empty when the device has no ROM. Needs only the device's file, not
        root's sysfs switch (:func:`kvmvfio.host.rom.read_sysfs_rom`). Raises
        :class:`KernelError` for a read the kernel refuses.
        """
        try:
            info = self.region(uapi.VFIO_PCI_ROM_REGION_INDEX)
        except KernelError as err:
            if err.errno == errno.EINVAL:  # no ROM region on this device
                return b""
            raise
        if info.size == 0:
            return b""
        try:
            return os.pread(self.fileno(), min(info.size, limit), info.offset)
        except OSError as err:
            raise KernelError(
                err.errno or errno.EIO, "read of the ROM region", self.path, self.subject
            ) from err

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` (raises :class:`KernelError` when the device has no reset)."""
        uapi.ioctl(self.fileno(), uapi.VFIO_DEVICE_RESET, subject=self.subject)

    def hot_reset_info(self) -> HotResetInfo:
        """``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``: the functions a hot reset of this device reaches.

        Asks twice: with no room (the kernel answers ENOSPC and the count),
        then with room for that many. Changes nothing. Raises
        :class:`NoBusReset` (ENODEV) when the device has no slot or bus
        reset, and :class:`KernelError` otherwise (EPERM: an affected
        function has no IOMMU group).
        """
        errors: uapi.ErrorMap = {errno.ENODEV: NoBusReset}
        cmd = uapi.new("vfio_pci_hot_reset_info")
        count = 0
        for _ in range(3):  # the bus may gain a function between the two calls (hotplug)
            cmd = uapi.new("vfio_pci_hot_reset_info", trailing=count) if count else cmd
            try:
                uapi.ioctl(
                    self.fileno(),
                    uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
                    cmd,
                    subject=self.subject,
                    errors=errors,
                )
                break
            except KernelError as err:
                if err.errno != errno.ENOSPC or int(cmd.count) <= count:
                    raise
                count = int(cmd.count)
        else:
            raise KernelError(
                errno.ENOSPC,
                "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
                self.path,
                self.subject,
                "the bus kept changing while it was read",
            )
        by_devid = bool(cmd.flags & uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID)
        # A flexible array of structs, which the CData protocol does not type.
        entries = cast("Sequence[uapi.CData]", cmd.devices)
        return HotResetInfo(
            address=self.address,
            devices=tuple(_dependent(entries[i], by_devid) for i in range(int(cmd.count))),
            by_devid=by_devid,
            all_owned=bool(cmd.flags & uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED),
        )

    def hot_reset(self, group_fds: Sequence[int] = ()) -> None:
        """``VFIO_DEVICE_PCI_HOT_RESET``: reset every function on this device's slot or bus.

        ``group_fds`` are open group files (borrowed, not closed) of every
        affected function's IOMMU group, on the group paths; on the cdev
        path it is empty and the kernel checks that the functions are bound
        to (or their groups held by) this device's iommufd. The kernel
        zaps the affected devices' BAR mappings and resets the bus.
        Raises :class:`NoBusReset` (ENODEV: no slot or bus reset),
        :class:`HotResetRefused` (EINVAL: an affected function is not on
        vfio-pci or not owned; or the list does not suit the path),
        :class:`Busy` (EBUSY: another user holds an affected device's
        memory lock).
        """
        fds = list(group_fds)
        cmd = uapi.ffi.new(
            "struct vfio_pci_hot_reset *",
            {
                "argsz": uapi.ffi.sizeof("struct vfio_pci_hot_reset") + 4 * len(fds),
                "count": len(fds),
                "group_fds": fds,
            },
        )
        uapi.ioctl(
            self.fileno(),
            uapi.VFIO_DEVICE_PCI_HOT_RESET,
            cmd,
            subject=self.subject,
            errors={errno.ENODEV: NoBusReset, errno.EINVAL: HotResetRefused},
        )
