"""The host: where its sysfs and /dev are, and what they hold.

:class:`Host` is the one entry point of :mod:`kvmvfio.host`. Like pyudev's
``Context``, it carries the roots as values, so the same code reads the
real ``/sys`` and ``/dev`` and the fake trees the tests build. Every method
reads the files afresh and returns frozen values: a snapshot, never a live
view. Nothing here writes to the host.
"""

from __future__ import annotations

import errno
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import (
    DeviceNotFound,
    GroupNotFound,
    InvalidAddress,
    InvalidGroup,
    KernelError,
    NoIommuGroup,
    SysfsError,
)
from kvmvfio.host.address import PciAddress
from kvmvfio.host.iommu import NOIOMMU_NAME, ForeignMember, HostIommu, IommuGroup, NoGroup
from kvmvfio.host.mdev import Mdev, MdevParent, mdev, mdev_parents, mdevs
from kvmvfio.host.pci import (
    PciDevice,
    decode_text,
    driver_from_link,
    group_from_link,
    read_device,
    read_file,
    vfio_cdev_map,
)
from kvmvfio.host.support import HostSupport

_ADDRESS_KEY = operator.attrgetter("domain", "bus", "slot", "function")
_DEVICE_KEY = operator.attrgetter(
    "address.domain", "address.bus", "address.slot", "address.function"
)
_GROUP_NUMBER = re.compile(r"[0-9]{1,10}")
_MAX_GROUP = 2**31 - 1
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.ENOTDIR})


def _listdir(path: str) -> list[str] | None:
    """The names in directory ``path``; None when it does not exist (or no longer)."""
    try:
        return os.listdir(path)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise KernelError(err.errno or errno.EIO, "listdir", path) from err


def parse_group_number(value: int | str) -> int:
    """Return the IOMMU group number ``value`` names (decimal text or an int).

    Raise :class:`~kvmvfio.errors.InvalidGroup` for anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidGroup(repr(value))
    if isinstance(value, str):
        if not _GROUP_NUMBER.fullmatch(value):
            raise InvalidGroup(value)
        number = int(value)
    else:
        number = value
    if not 0 <= number <= _MAX_GROUP:
        raise InvalidGroup(str(value))
    return number


@dataclass(frozen=True, slots=True)
class Inventory:
    """Every PCI function and IOMMU group of the host, what it supports, its IOMMUs,
    and its mediated devices with their parents."""

    devices: tuple[PciDevice, ...]
    groups: tuple[IommuGroup, ...]
    support: HostSupport
    iommu: HostIommu
    mdev_parents: tuple[MdevParent, ...] = ()
    mdevs: tuple[Mdev, ...] = ()

    def groups_by_number(self) -> dict[int, IommuGroup]:
        """The groups keyed by number."""
        return {g.number: g for g in self.groups}

    def no_group(self, device: PciDevice) -> NoGroup | None:
        """Why ``device`` is in no IOMMU group; None when it is in one."""
        return self.iommu.no_group(device)


class Host:
    """A host's PCI devices, IOMMU groups and VFIO/KVM support, read from its files."""

    def __init__(
        self, sysfs: str | Path = "/sys", devfs: str | Path = "/dev", procfs: str | Path = "/proc"
    ) -> None:
        """Read ``sysfs``, ``devfs`` and ``procfs`` (command line, CPU vendor); nothing yet."""
        self.sysfs = Path(sysfs)
        self.devfs = Path(devfs)
        self.procfs = Path(procfs)
        self._bus = f"{self.sysfs}/bus/pci/devices"
        self._groups = f"{self.sysfs}/kernel/iommu_groups"

    def __repr__(self) -> str:
        return (
            f"Host(sysfs={str(self.sysfs)!r}, devfs={str(self.devfs)!r}, "
            f"procfs={str(self.procfs)!r})"
        )

    # -- devices ----------------------------------------------------------

    def addresses(self) -> list[PciAddress]:
        """The addresses of every PCI function, sorted.

        An empty list when the host has no PCI bus. Raise
        :class:`~kvmvfio.errors.SysfsError` for an entry that is not a PCI
        address (the kernel names each one after its address).
        """
        out = []
        for name in _listdir(self._bus) or ():
            try:
                out.append(PciAddress.parse(name))
            except InvalidAddress as err:
                # repr: the name may hold anything, even undecodable bytes.
                raise SysfsError(
                    self._bus, f"entry {name!r} is not a PCI address: {err.reason}"
                ) from None
        out.sort(key=_ADDRESS_KEY)
        return out

    def devices(self) -> list[PciDevice]:
        """Read every PCI function, sorted by address; skip any that vanish meanwhile."""
        cdevs = vfio_cdev_map(str(self.sysfs))
        out = []
        for addr in self.addresses():
            dev = read_device(f"{self._bus}/{addr}", addr, cdevs)
            if dev is not None:
                out.append(dev)
        return out

    def device(self, addr: str | PciAddress) -> PciDevice:
        """Read the function at ``addr``.

        Raise :class:`~kvmvfio.errors.InvalidAddress` for a malformed
        address, :class:`~kvmvfio.errors.DeviceNotFound` when there is no
        such function.
        """
        address = PciAddress.coerce(addr)
        dev = read_device(f"{self._bus}/{address}", address)
        if dev is None:
            raise DeviceNotFound(str(address), str(self.sysfs))
        return dev

    # -- groups -----------------------------------------------------------

    def group_numbers(self) -> list[int]:
        """The numbers of every IOMMU group, sorted; empty without an IOMMU."""
        out = []
        for name in _listdir(self._groups) or ():
            if not _GROUP_NUMBER.fullmatch(name):
                raise SysfsError(self._groups, f"entry {name!r} is not an IOMMU group number")
            out.append(int(name))
        out.sort()
        return out

    def groups(self) -> list[IommuGroup]:
        """Read every IOMMU group with its members, sorted by number."""
        return self._all_groups({d.address: d for d in self.devices()})

    def _all_groups(self, known: dict[PciAddress, PciDevice]) -> list[IommuGroup]:
        # Members already read (``known``) are not read again; a group that
        # vanishes between the listing and the read is skipped.
        out = []
        for number in self.group_numbers():
            group = self._read_group(number, known)
            if group is not None:
                out.append(group)
        return out

    def group(self, number: int | str) -> IommuGroup:
        """Read IOMMU group ``number``.

        Raise :class:`~kvmvfio.errors.InvalidGroup` when ``number`` is not a
        group number, :class:`~kvmvfio.errors.GroupNotFound` when there is
        no such group.
        """
        n = parse_group_number(number)
        group = self._read_group(n, {})
        if group is None:
            raise GroupNotFound(str(n), str(self.sysfs))
        return group

    def group_of(self, addr: str | PciAddress, *, brief: bool = False) -> IommuGroup:
        """Read the IOMMU group of the function at ``addr``.

        ``brief``: read each member only as far as VFIO's checks need
        (:func:`~kvmvfio.host.pci.read_device`'s ``brief``).

        Raise :class:`~kvmvfio.errors.DeviceNotFound` when there is no such
        function, :class:`~kvmvfio.errors.NoIommuGroup` when it is in no
        group, with the reason (:meth:`no_group`).
        """
        address = PciAddress.coerce(addr)
        path = f"{self._bus}/{address}"
        try:
            target = os.readlink(f"{path}/iommu_group")
        except OSError as err:
            if err.errno not in _GONE:
                raise KernelError(
                    err.errno or errno.EIO, "readlink", f"{path}/iommu_group"
                ) from err
            if not os.path.isdir(path):
                raise DeviceNotFound(str(address), str(self.sysfs)) from None
            # None when it got its group meanwhile (a driver bound): then the
            # error says only that it had none.
            raise NoIommuGroup(str(address), self.no_group(address)) from None
        number = group_from_link(target, f"{path}/iommu_group")
        group = self._read_group(number, {}, brief=brief)
        if group is None:  # the group went away with its last device
            raise DeviceNotFound(str(address), str(self.sysfs))
        return group

    def _read_group(
        self, number: int, known: dict[PciAddress, PciDevice], *, brief: bool = False
    ) -> IommuGroup | None:
        base = f"{self._groups}/{number}"
        names = _listdir(f"{base}/devices")
        if names is None:
            return None
        members: list[PciDevice] = []
        foreign: list[ForeignMember] = []
        for name in names:
            try:
                addr = PciAddress.parse(name)
            except InvalidAddress:
                member = self._foreign(f"{base}/devices/{name}", name)
                if member is not None:
                    foreign.append(member)
                continue
            dev = known.get(addr)
            if dev is None:
                dev = read_device(f"{base}/devices/{name}", addr, brief=brief)
            if dev is not None:
                members.append(dev)
        members.sort(key=_DEVICE_KEY)
        foreign.sort(key=lambda f: f.name)
        # The kernel names an mdev's emulated-IOMMU group "vfio-noiommu" too (one
        # vfio_noiommu_group_alloc makes both kinds), yet its node is /dev/vfio/N and
        # it needs no no-IOMMU mode: only the type differs, and sysfs shows no type.
        named = self._noiommu(base)
        emulated = named and any(f.mdev for f in foreign)
        noiommu = named and not emulated
        return IommuGroup(number, tuple(members), noiommu, tuple(foreign), emulated=emulated)

    @staticmethod
    def _noiommu(base: str) -> bool:
        path = f"{base}/name"
        if not os.access(path, os.F_OK):  # the usual case, and no exception to build
            return False
        raw = read_file(path)
        return raw is not None and decode_text(raw, path) == NOIOMMU_NAME

    @staticmethod
    def _foreign(path: str, name: str) -> ForeignMember | None:
        if not name.isprintable():
            raise SysfsError(path.rpartition("/")[0], f"a member named {name!r}")
        if not os.path.exists(path):
            return None
        mdev = os.path.realpath(f"{path}/subsystem").endswith("/bus/mdev")
        try:
            target = os.readlink(f"{path}/driver")
        except OSError as err:
            if err.errno in _GONE:
                return ForeignMember(name, None, mdev)
            raise KernelError(err.errno or errno.EIO, "readlink", f"{path}/driver") from err
        return ForeignMember(name, driver_from_link(target, f"{path}/driver"), mdev)

    def no_group(self, addr: str | PciAddress) -> NoGroup | None:
        """Why the function at ``addr`` is in no IOMMU group; None when it is in one.

        Raise :class:`~kvmvfio.errors.DeviceNotFound` when there is no such function.
        """
        return self.iommu().no_group(self.device(addr))

    # -- mediated devices -------------------------------------------------

    def mdev_parents(self) -> list[MdevParent]:
        """Every device that can have mdevs, with its types, sorted by name (see
        :mod:`kvmvfio.host.mdev`); empty without the mdev core.

        Raise :class:`~kvmvfio.errors.SysfsError` for what the kernel never writes there.
        """
        return mdev_parents(self.sysfs)

    def mdevs(self) -> list[Mdev]:
        """Every mediated device, sorted by parent then UUID; skip any that vanish meanwhile.

        Raise :class:`~kvmvfio.errors.SysfsError` for an entry of
        ``/sys/bus/mdev/devices`` that is not a UUID.
        """
        return mdevs(self.sysfs)

    def mdev(self, uuid: str) -> Mdev:
        """Read the mediated device ``uuid``.

        Raise :class:`~kvmvfio.errors.InvalidMdevUuid` for text that is not a
        UUID, :class:`~kvmvfio.errors.MdevNotFound` when there is no such mdev.
        """
        return mdev(uuid, self.sysfs)

    # -- support ----------------------------------------------------------

    def support(self) -> HostSupport:
        """What the host offers for VFIO, iommufd and KVM (see :class:`HostSupport`)."""
        return HostSupport.probe(self.sysfs, self.devfs)

    def iommu(self) -> HostIommu:
        """The IOMMUs the kernel uses, and why there are none (see :class:`HostIommu`)."""
        return HostIommu.probe(self.sysfs, self.procfs)

    def inventory(self) -> Inventory:
        """Read devices, groups, support, IOMMUs and mdevs in one pass over sysfs."""
        devices = self.devices()
        groups = self._all_groups({d.address: d for d in devices})
        return Inventory(
            tuple(devices),
            tuple(groups),
            self.support(),
            self.iommu(),
            tuple(self.mdev_parents()),
            tuple(self.mdevs()),
        )
