"""A VFIO group file, ``/dev/vfio/N``: the unit of isolation the IOMMU gives.

A group can be opened once at a time (a second open gets EBUSY). It is
*viable* when no member is bound to a host driver that does DMA of its own.
It joins a container, or an iommufd, with ``VFIO_GROUP_SET_CONTAINER``; then
``VFIO_GROUP_GET_DEVICE_FD`` opens its devices by name. No-IOMMU groups
(``/dev/vfio/noiommu-N``) give DMA with no translation and no isolation: the
kernel taints itself and wants ``CAP_SYS_RAWIO``.
"""

from __future__ import annotations

import contextlib
import errno
import uuid
from collections.abc import Sequence
from pathlib import Path

from kvmvfio import uapi
from kvmvfio.errors import Busy, KernelError, NoInterruptRemapping, NotADeviceOfGroup
from kvmvfio.vfio.device import Device
from kvmvfio.vfio.errors import VfTokenRefused
from kvmvfio.vfio.files import FdObject, OwnedFd, open_node


class Group(FdObject):
    """An open VFIO group."""

    def __init__(
        self,
        number: int,
        devfs: str | Path = "/dev",
        *,
        noiommu: bool = False,
        related: Sequence[str | Path] = (),
    ) -> None:
        """Open ``/dev/vfio/N`` (or ``noiommu-N``).

        Raises :class:`~kvmvfio.errors.Busy` naming the holder when another
        process has the group, or one of the ``related`` device cdevs of its
        members, open.
        """
        node = f"noiommu-{number}" if noiommu else str(number)
        fd = open_node(
            f"{devfs}/vfio/{node}",
            f"IOMMU group {number}",
            missing_hint="no device of the group is bound to vfio-pci",
            related=related,
        )
        super().__init__(fd)
        self.number = number
        self.noiommu = noiommu
        self.container_set = False

    def status(self) -> int:
        """``VFIO_GROUP_GET_STATUS`` flags (``VFIO_GROUP_FLAGS_*``)."""
        cmd = uapi.new("vfio_group_status")
        uapi.ioctl(self.fileno(), uapi.VFIO_GROUP_GET_STATUS, cmd, subject=self.subject)
        return int(cmd.flags)

    @property
    def viable(self) -> bool:
        """The kernel's word on viability (``VFIO_GROUP_FLAGS_VIABLE``)."""
        return bool(self.status() & uapi.VFIO_GROUP_FLAGS_VIABLE)

    def set_container(self, container_fd: int) -> None:
        """``VFIO_GROUP_SET_CONTAINER`` with a container fd or an iommufd fd."""
        ptr = uapi.ffi.new("int32_t *", container_fd)
        uapi.ioctl(self.fileno(), uapi.VFIO_GROUP_SET_CONTAINER, ptr, subject=self.subject)
        self.container_set = True

    def unset_container(self) -> None:
        """``VFIO_GROUP_UNSET_CONTAINER`` (needs every device fd of the group closed)."""
        uapi.ioctl(self.fileno(), uapi.VFIO_GROUP_UNSET_CONTAINER, subject=self.subject)
        self.container_set = False

    def open_device(self, address: str, *, vf_token: uuid.UUID | None = None) -> Device:
        """``VFIO_GROUP_GET_DEVICE_FD``: the device file of member ``address``.

        ``vf_token``: the VF token, for a VF whose PF is on vfio-pci (the
        kernel reads it from the name: ``ADDR vf_token=UUID``). Raises
        :class:`NotADeviceOfGroup` when the group has no such device, and
        :class:`VfTokenRefused` when the kernel refuses the token or its lack.
        """
        text = address if vf_token is None else f"{address} vf_token={vf_token}"
        name = uapi.ffi.new("char[]", text.encode())
        # The kernel's errnos, mapped where the call is made (uapi.ioctl):
        # EACCES is the VF token's (missing or wrong), EINVAL too when one
        # was given; EPERM on iommufd is the MSI isolation check of the
        # device's bind (iommufd_device_bind), which happens here.
        errors: dict[int, type[KernelError] | str] = {errno.EACCES: VfTokenRefused}
        if vf_token is not None:
            errors[errno.EINVAL] = VfTokenRefused
        if not self.noiommu:
            errors[errno.EPERM] = NoInterruptRemapping
        try:
            fd = uapi.ioctl(
                self.fileno(),
                uapi.VFIO_GROUP_GET_DEVICE_FD,
                name,
                subject=f"device {address}",
                errors=errors,
            )
        except KernelError as err:
            if err.errno == errno.ENODEV:  # not an error of the device: of the name
                raise NotADeviceOfGroup(address, self.number) from err
            raise
        return Device(OwnedFd(fd, f"{self.path}:{address}", f"device {address}"), address)

    def _release(self) -> None:
        # Closing the group file unsets the container by itself; doing it
        # explicitly first keeps the order visible and the error, if any, ours.
        if self.container_set:
            with contextlib.suppress(KernelError):
                self.unset_container()


def group_held(node: str | Path) -> bool:
    """Whether the kernel has the VFIO group ``node`` (``/dev/vfio/N``) open for someone.

    Opens the node and closes it at once (nothing else: no container, no
    device). A group is open once at a time, and the kernel keeps it open
    for every device file got through it, also after the process closed the
    group itself: then /proc shows only an anonymous inode naming no device,
    and this is how to tell. False when the node is missing or the open
    fails for another reason (those are the callers' other checks).
    """
    try:
        open_node(node, f"VFIO group node {node}").close()
    except Busy:
        return True
    except KernelError:
        return False
    return False
