"""Mediated devices (mdevs), as the kernel's mdev core shows them in sysfs.

A *parent* is a device whose driver registered with the mdev core (a GPU
for vGPUs; the kernel's samples ``mtty``, ``mdpy`` and ``mbochs`` register
virtual ones). ``/sys/class/mdev_bus/`` links every parent; each has
``mdev_supported_types/TYPE/`` with ``name``, ``description``,
``device_api``, ``available_instances``, ``devices/`` and the write-only
``create``. TYPE is ``DRIVER-NAME`` (``mtty-2``, ``nvidia-63``).

An *mdev* is a child of its parent named by a UUID, on the ``mdev`` bus
(``/sys/bus/mdev/devices/UUID``), with ``mdev_type`` linking its type and
the write-only ``remove``. Its driver (the parent's mdev driver) registers
it with VFIO as an emulated-IOMMU device: it gets an IOMMU group of its own
(``iommu_group``; the group's only member, named by the UUID) and, with
device cdevs, ``vfio-dev/vfioN``. VFIO opens it by that group, or by that
cdev, and names it by its UUID (``VFIO_GROUP_GET_DEVICE_FD``).

Everything here is read as untrusted input: names are checked before they
become paths, numbers are parsed strictly, and a parent or mdev that
vanishes while it is read is skipped, not an error.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import KernelError, SysfsError, shown
from kvmvfio.host.address import PciAddress
from kvmvfio.host.errors import InvalidMdevUuid, MdevNotFound
from kvmvfio.host.pci import _GONE, decode_text, driver_from_link, group_from_link, read_file

#: The kernel writes UUIDs lower case (``%pUl``), and takes either case in ``create``.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: A type's folder: the parent driver's name, a dash, the type's own name.
_TYPE_ID = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")
_VFIO_NODE = re.compile(r"vfio[0-9]{1,9}")
#: ``available_instances`` and the like are at most this long; more is not the kernel.
_MAX_ATTR = 4096


def parse_uuid(text: str) -> str:
    """``text`` as a UUID in the kernel's spelling (lower case); :class:`InvalidMdevUuid`."""
    if not isinstance(text, str) or len(text) != 36:
        raise InvalidMdevUuid(str(text))
    lowered = text.lower()
    if not _UUID.fullmatch(lowered):
        raise InvalidMdevUuid(text)
    return lowered


def canonical_name(text: str) -> str:
    """A device's name as kvmvfio keeps it: an mdev's UUID in lower case, else a PCI address.

    Raises :class:`~kvmvfio.errors.InvalidMdevUuid` for text with a dash (a
    UUID gone wrong: PCI addresses have none), else
    :class:`~kvmvfio.errors.InvalidAddress` for text that is neither.
    """
    if isinstance(text, str) and "-" in text:
        return parse_uuid(text)
    return str(PciAddress.coerce(text))


def is_uuid(text: str) -> bool:
    """Whether ``text`` looks like an mdev's UUID (and so is not a PCI address)."""
    return isinstance(text, str) and len(text) == 36 and bool(_UUID.fullmatch(text.lower()))


@dataclass(frozen=True, slots=True)
class MdevType:
    """One type a parent offers: what ``mdev_supported_types/TYPE/`` says."""

    parent: str
    id: str
    name: str | None
    #: The parent driver's words, None when it has none (mtty); may hold several lines.
    description: str | None
    device_api: str | None
    available: int | None
    #: The UUIDs of this type's mdevs.
    devices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MdevParent:
    """A device that can have mediated devices."""

    name: str
    path: str
    driver: str | None
    types: tuple[MdevType, ...]

    def type(self, type_id: str) -> MdevType | None:
        """The type called ``type_id`` (``mtty-2``), or None."""
        return next((t for t in self.types if t.id == type_id), None)


@dataclass(frozen=True, slots=True)
class Mdev:
    """One mediated device."""

    uuid: str
    #: The parent's device name: a PCI address for a GPU, ``mtty`` for the sample.
    parent: str
    type_id: str | None
    driver: str | None
    #: Its IOMMU group (an emulated one, made when its driver registered it with VFIO).
    group: int | None
    #: ``vfioN`` when the kernel has device cdevs and VFIO has the device.
    cdev: str | None
    path: str

    # What a plan asks of a PCI function, answered for an mdev.

    @property
    def address(self) -> str:
        """The name VFIO knows it by: its UUID (``VFIO_GROUP_GET_DEVICE_FD`` takes it)."""
        return self.uuid

    @property
    def vfio_cdev(self) -> str | None:
        """Its cdev's name, as :attr:`PciDevice.vfio_cdev <kvmvfio.host.PciDevice>` has it."""
        return self.cdev

    @property
    def physfn(self) -> None:
        """An mdev is no SR-IOV VF."""
        return None

    @property
    def is_physfn(self) -> bool:
        """An mdev is no SR-IOV PF."""
        return False

    @property
    def sysfsdev(self) -> str:
        """``/sys/bus/mdev/devices/UUID``: what QEMU's vfio-pci ``sysfsdev=`` names."""
        return f"/sys/bus/mdev/devices/{self.uuid}"

    def cdev_node(self, devfs: str | Path = "/dev") -> Path | None:
        """``/dev/vfio/devices/vfioN``, or None without a cdev."""
        return None if self.cdev is None else Path(f"{devfs}/vfio/devices/{self.cdev}")

    def group_node(self, devfs: str | Path = "/dev") -> Path | None:
        """``/dev/vfio/N``, or None when it has no group (no VFIO driver)."""
        return None if self.group is None else Path(devfs) / "vfio" / str(self.group)


# -- reading --------------------------------------------------------------------------


def _listdir(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise KernelError(err.errno or errno.EIO, "listdir", path) from err


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError as err:
        if err.errno in _GONE:
            return None
        if err.errno == errno.EINVAL:  # the kernel makes these links, never files
            raise SysfsError(path, "is not a symbolic link") from None
        raise KernelError(err.errno or errno.EIO, "readlink", path) from err


def _text(path: str) -> str | None:
    raw = read_file(path)
    if raw is None:
        return None
    if len(raw) > _MAX_ATTR:
        raise SysfsError(path, f"holds {len(raw)} bytes, more than a sysfs attribute")
    return decode_text(raw, path).strip()


def _lines(path: str) -> str | None:
    """A text of several lines: i915's GVT describes a type in five (``low_gm_size: 64MB``...)."""
    raw = read_file(path)
    if raw is None:
        return None
    if len(raw) > _MAX_ATTR:
        raise SysfsError(path, f"holds {len(raw)} bytes, more than a sysfs attribute")
    lines = raw.rstrip(b"\n").split(b"\n")
    return "\n".join(decode_text(line, path).strip() for line in lines).strip()


def _count(path: str) -> int | None:
    text = _text(path)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise SysfsError(path, f"holds {shown(text, 20)!r}, not a count")
    return int(text)


def _read_type(parent: str, folder: str, type_id: str) -> MdevType | None:
    if not os.path.isdir(folder):
        return None
    devices = [d for d in _listdir(f"{folder}/devices") or () if is_uuid(d)]
    return MdevType(
        parent=parent,
        id=type_id,
        name=_text(f"{folder}/name"),
        description=_lines(f"{folder}/description"),
        device_api=_text(f"{folder}/device_api"),
        available=_count(f"{folder}/available_instances"),
        devices=tuple(devices),
    )


def read_parent(path: str) -> MdevParent | None:
    """The parent whose sysfs folder is ``path``; None when it is gone or has no types."""
    real = os.path.realpath(path)
    base = f"{real}/mdev_supported_types"
    names = _listdir(base)
    if names is None:
        return None
    name = os.path.basename(real)
    types = []
    for type_id in names:
        if not _TYPE_ID.fullmatch(type_id):
            raise SysfsError(base, f"holds a type named {shown(type_id, 60)!r}")
        t = _read_type(name, f"{base}/{type_id}", type_id)
        if t is not None:
            types.append(t)
    link = _readlink(f"{real}/driver")
    driver = None if link is None else driver_from_link(link, f"{real}/driver")
    return MdevParent(name, real, driver, tuple(types))


def mdev_parents(sysfs: str | Path = "/sys") -> list[MdevParent]:
    """Every device that can have mdevs (``/sys/class/mdev_bus``), sorted by name."""
    base = f"{sysfs}/class/mdev_bus"
    out = []
    for name in _listdir(base) or ():
        parent = read_parent(f"{base}/{name}")
        if parent is not None:
            out.append(parent)
    return sorted(out, key=lambda p: p.name)


def find_parent(name: str, sysfs: str | Path = "/sys") -> MdevParent | None:
    """The parent named ``name`` (its device name: ``mtty``, ``0000:00:02.0``), or None."""
    if not name or "/" in name or name in (".", "..") or not name.isprintable():
        return None
    return read_parent(f"{sysfs}/class/mdev_bus/{name}")


def read_mdev(uuid: str, sysfs: str | Path = "/sys") -> Mdev | None:
    """The mdev ``uuid`` (checked first: :class:`InvalidMdevUuid`), or None when there is none."""
    uuid = parse_uuid(uuid)
    link = f"{sysfs}/bus/mdev/devices/{uuid}"
    if not os.path.lexists(link):
        return None
    real = os.path.realpath(link)
    if not os.path.isdir(real):
        return None
    parent = os.path.basename(os.path.dirname(real))
    type_link = _readlink(f"{real}/mdev_type")
    type_id = None if type_link is None else os.path.basename(type_link)
    if type_id is not None and not _TYPE_ID.fullmatch(type_id):
        raise SysfsError(f"{real}/mdev_type", f"links a type named {shown(type_id, 60)!r}")
    drv = _readlink(f"{real}/driver")
    group_link = _readlink(f"{real}/iommu_group")
    cdevs = [n for n in _listdir(f"{real}/vfio-dev") or () if _VFIO_NODE.fullmatch(n)]
    return Mdev(
        uuid=uuid,
        parent=parent,
        type_id=type_id,
        driver=None if drv is None else driver_from_link(drv, f"{real}/driver"),
        group=None if group_link is None else group_from_link(group_link, f"{real}/iommu_group"),
        cdev=cdevs[0] if cdevs and os.access(f"{real}/vfio-dev/{cdevs[0]}/dev", os.F_OK) else None,
        path=real,
    )


def mdev(uuid: str, sysfs: str | Path = "/sys") -> Mdev:
    """The mdev ``uuid``; :class:`InvalidMdevUuid`, :class:`MdevNotFound`."""
    found = read_mdev(uuid, sysfs)
    if found is None:
        raise MdevNotFound(parse_uuid(uuid), str(sysfs))
    return found


def mdevs(sysfs: str | Path = "/sys") -> list[Mdev]:
    """Every mediated device, sorted by parent then UUID; none without the mdev bus."""
    out = []
    for name in _listdir(f"{sysfs}/bus/mdev/devices") or ():
        if not is_uuid(name):
            raise SysfsError(f"{sysfs}/bus/mdev/devices", f"holds {shown(name, 60)!r}")
        found = read_mdev(name, sysfs)
        if found is not None:
            out.append(found)
    return sorted(out, key=lambda m: (m.parent, m.uuid))
