"""PCI functions as sysfs shows them, read strictly.

Each PCI function is a directory, ``/sys/bus/pci/devices/<address>`` (a
symlink into ``/sys/devices/pci<domain>:<bus>/...``, where bridges nest the
functions behind them). The files kvmvfio reads, and what the kernel writes
in them (``drivers/pci/pci-sysfs.c``, ``drivers/pci/pci-driver.c``,
``drivers/pci/iov.c``, ``drivers/base/core.c``, ``drivers/base/bus.c``):

``uevent``
    ``KEY=value`` lines: ``DRIVER`` (when one is bound), ``PCI_CLASS``,
    ``PCI_ID`` (vendor:device), ``PCI_SUBSYS_ID``, ``PCI_SLOT_NAME``. One
    read gives what ``vendor``, ``device``, ``subsystem_*``, ``class`` and
    the ``driver`` symlink give in five, so those are not read.
``driver_override``
    the driver name, or ``(null)`` when unset
``iommu_group`` (symlink)
    ``.../kernel/iommu_groups/<N>``, absent without an (enabled) IOMMU
``numa_node``
    ``%d``; -1 when the firmware does not say
``reset_method``
    the reset methods in the order the kernel tries them, space-separated;
    absent when the function cannot be reset
``sriov_totalvfs``, ``sriov_numvfs``, ``virtfn<N>`` (symlinks)
    on an SR-IOV physical function; a virtual function has ``physfn``
``boot_vga``
    ``0`` or ``1``, on VGA-class functions only
``vfio-dev/vfio<N>``
    the function's VFIO device, while a VFIO driver has it. The directory
    exists whether or not the kernel has device cdevs
    (``CONFIG_VFIO_DEVICE_CDEV``); only with them does it hold ``dev``,
    and ``/dev/vfio/devices/vfio<N>`` exist.

The readers are strict: text the kernel never writes raises
:class:`~kvmvfio.errors.SysfsError`, never a bare ``ValueError``. A function
that disappears while it is read (hot unplug, VFs being disabled) is
reported as gone (``None``), not as an error.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kvmvfio.errors import InvalidAddress, KernelError, SysfsError
from kvmvfio.host.address import PciAddress

#: sysfs attributes fit in a page; anything longer is not from the kernel.
_PAGE = 4096

_DECIMAL = re.compile(r"-?[0-9]{1,10}")
_UNSIGNED = re.compile(r"[0-9]{1,10}")
_RESET_METHOD = re.compile(r"[a-z0-9_]{1,32}")
#: Longest driver name accepted (the kernel sets no limit; none is near it).
_MAX_NAME = 256
_VFIO_NODE = re.compile(r"vfio[0-9]{1,10}")
_VIRTFN = re.compile(r"virtfn([0-9]{1,10})")
# KEY=value lines, each ending in a newline; no control characters.
_UEVENT = re.compile(r"(?:[A-Z][A-Z0-9_]{0,63}=[^\x00-\x1f\x7f]*\n)*")
_UEVENT_PAIR = re.compile(r"([A-Z][A-Z0-9_]{0,63})=([^\x00-\x1f\x7f]*)\n")
# What dev_uevent + pci_uevent write when nothing else adds keys (no OF node).
_UEVENT_PCI = re.compile(
    r"(?:DRIVER=([^\x00-\x1f\x7f/]{1,256})\n)?"
    r"PCI_CLASS=([0-9a-fA-F]{1,6})\n"
    r"PCI_ID=([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\n"
    r"PCI_SUBSYS_ID=([0-9a-fA-F]{4}):([0-9a-fA-F]{4})\n"
    r"PCI_SLOT_NAME=([0-9a-f:.]{1,16})\n"
    r"MODALIAS=[\x20-\x7e]*\n"
)
_UEVENT_IDS = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{4}")
_UEVENT_CLASS = re.compile(r"[0-9a-fA-F]{1,6}")

#: Reset methods Linux 6.12 knows (``pci_reset_fn_methods``); others are
#: accepted if they look like a name, for kernels that add one.
KNOWN_RESET_METHODS = ("device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus")

#: The kernel prints a NULL string as this (``vsnprintf``).
_NULL = "(null)"

#: Errors that mean the file or its device went away between two reads.
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ENOTDIR})

# -- classes --------------------------------------------------------------

#: PCI class codes (base << 8 | sub) that make a function a bridge whose
#: header is not a plain endpoint's: PCI-to-PCI (PCIe root and switch ports
#: are these too), CardBus, semi-transparent PCI-to-PCI.
BRIDGE_CLASSES = frozenset({0x0604, 0x0607, 0x0609})
#: Classes that have ``boot_vga`` (``pci_is_vga``): VGA, and pre-2.0 VGA.
VGA_CLASSES = frozenset({0x0300, 0x0001})

_BASE_CLASSES = {
    0x00: "unclassified",
    0x01: "storage",
    0x02: "network",
    0x03: "display",
    0x04: "multimedia",
    0x05: "memory",
    0x06: "bridge",
    0x07: "communication",
    0x08: "system peripheral",
    0x09: "input",
    0x0A: "docking station",
    0x0B: "processor",
    0x0C: "serial bus",
    0x0D: "wireless",
    0x0E: "intelligent I/O",
    0x0F: "satellite",
    0x10: "encryption",
    0x11: "signal processing",
    0x12: "accelerator",
    0x13: "instrumentation",
    0x40: "coprocessor",
    0xFF: "unassigned",
}

# From include/linux/pci_ids.h (PCI_CLASS_*) and the PCI Code and ID
# Assignment specification; the ones a user of VFIO meets.
_SUB_CLASSES = {
    0x0001: "VGA-compatible (pre-2.0)",
    0x0100: "SCSI controller",
    0x0101: "IDE controller",
    0x0104: "RAID controller",
    0x0106: "SATA controller",
    0x0107: "SAS controller",
    0x0108: "NVMe controller",
    0x0180: "storage controller",
    0x0200: "Ethernet controller",
    0x0207: "InfiniBand controller",
    0x0280: "network controller",
    0x0300: "VGA controller",
    0x0301: "XGA controller",
    0x0302: "3D controller",
    0x0380: "display controller",
    0x0400: "video device",
    0x0401: "audio device",
    0x0403: "HD audio device",
    0x0480: "multimedia controller",
    0x0500: "RAM memory",
    0x0502: "CXL memory",
    0x0600: "host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0607: "CardBus bridge",
    0x0609: "semi-transparent PCI bridge",
    0x0680: "bridge",
    0x0700: "serial controller",
    0x0880: "system peripheral",
    0x0C03: "USB controller",
    0x0C05: "SMBus",
    0x0C07: "IPMI interface",
    0x0D80: "wireless controller",
    0x1000: "network encryption",
    0x1080: "encryption controller",
    0x1200: "processing accelerator",
    0xFF00: "unassigned class",
}


def class_name(class_code: int) -> str:
    """A short English name for a 24-bit PCI class code (``0x020000`` → Ethernet)."""
    sub = class_code >> 8
    if sub in _SUB_CLASSES:
        return _SUB_CLASSES[sub]
    base = _BASE_CLASSES.get(class_code >> 16)
    return f"{base} device" if base else f"class {sub:#06x}"


# -- drivers --------------------------------------------------------------


def is_vfio_driver(driver: str | None) -> bool:
    """True for vfio-pci and its variant drivers (``mlx5_vfio_pci``, ...).

    The variant drivers are modules named ``<vendor>-vfio-pci``, which
    register under their module name, with ``_`` for ``-``.
    """
    return driver is not None and (
        driver == "vfio-pci" or driver.endswith(("_vfio_pci", "-vfio-pci"))
    )


#: Drivers other than vfio-pci and its variants that set
#: ``driver_managed_dma``, i.e. do no DMA through the kernel's DMA API
#: (every one in Linux 6.12): for PCI pci-stub and pcieport; for the
#: non-PCI members a group may have, VFIO's platform, AMBA, CDX and fsl-mc
#: drivers.
DMA_MANAGED_DRIVERS = frozenset(
    {"pci-stub", "pcieport", "vfio-platform", "vfio-amba", "vfio-cdx", "vfio-fsl-mc"}
)


def driver_managed_dma(driver: str) -> bool:
    """True when binding ``driver`` leaves the IOMMU group free for VFIO."""
    return is_vfio_driver(driver) or driver in DMA_MANAGED_DRIVERS


# -- parsers of untrusted sysfs text ---------------------------------------


def decode_text(raw: bytes, path: str) -> str:
    """Decode one sysfs value: UTF-8, at most one trailing newline, nothing unprintable."""
    if len(raw) > _PAGE:
        raise SysfsError(path, f"{len(raw)} bytes, more than a page")
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SysfsError(path, f"not UTF-8: {raw[:40]!r}") from None
    if not text.isprintable():
        raise SysfsError(path, f"control characters in {text[:40]!r}")
    return text


def parse_unsigned(raw: bytes, path: str) -> int:
    """Parse ``%u``."""
    text = decode_text(raw, path)
    if not _UNSIGNED.fullmatch(text):
        raise SysfsError(path, f"{text[:40]!r} is not an unsigned number")
    return int(text)


def parse_numa_node(raw: bytes, path: str) -> int | None:
    """Parse ``numa_node``: ``%d``, -1 (no node known) gives None."""
    text = decode_text(raw, path)
    if not _DECIMAL.fullmatch(text):
        raise SysfsError(path, f"{text[:40]!r} is not a number")
    node = int(text)
    if node == -1:
        return None
    if node < 0:
        raise SysfsError(path, f"NUMA node {node} is negative")
    return node


def parse_bool(raw: bytes, path: str) -> bool:
    """Parse ``0`` or ``1``."""
    text = decode_text(raw, path)
    if text not in ("0", "1"):
        raise SysfsError(path, f"{text[:40]!r} is neither 0 nor 1")
    return text == "1"


def is_driver_name(text: str) -> bool:
    """True for text that can name a driver: printable, no ``/``, not too long.

    Driver names are not just identifiers: Linux 6.12 has PCI drivers
    named ``intel ips``, ``cx88-mpeg driver manager`` and ``CAFÉ NAND``.
    """
    return 0 < len(text) <= _MAX_NAME and text.isprintable() and "/" not in text


def parse_driver_override(raw: bytes, path: str) -> str | None:
    """Parse ``driver_override``: a driver name, or ``(null)`` (None) when unset."""
    text = decode_text(raw, path)
    if text in (_NULL, ""):
        return None
    if not is_driver_name(text):
        raise SysfsError(path, f"{text[:40]!r} is not a driver name")
    return text


def parse_reset_methods(raw: bytes, path: str) -> tuple[str, ...]:
    """Parse ``reset_method``: names separated by single spaces, in order."""
    text = decode_text(raw, path)
    if not text:
        return ()
    methods = tuple(text.split(" "))
    for method in methods:
        if not _RESET_METHOD.fullmatch(method):
            raise SysfsError(path, f"{method[:40]!r} is not a reset method name")
    if len(set(methods)) != len(methods):
        raise SysfsError(path, f"a reset method is listed twice in {text[:80]!r}")
    return methods


def _link_leaf(target: str, path: str, parent: str | None = None) -> str:
    """The last part of a symlink's target; with ``parent``, check the one before."""
    head, _, leaf = target.rstrip("/").rpartition("/")
    if not leaf or "\0" in target:
        raise SysfsError(path, f"symlink to {target[:80]!r}")
    if parent is not None and head.rpartition("/")[2] != parent:
        raise SysfsError(path, f"symlink to {target[:80]!r}, not into a {parent}/ directory")
    return leaf


def driver_from_link(target: str, path: str) -> str:
    """The driver name in a ``driver`` symlink's target (``.../drivers/<name>``)."""
    name = _link_leaf(target, path, "drivers")
    if not is_driver_name(name):
        raise SysfsError(path, f"{name[:40]!r} is not a driver name")
    return name


def group_from_link(target: str, path: str) -> int:
    """The group number in an ``iommu_group`` symlink's target."""
    leaf = _link_leaf(target, path, "iommu_groups")
    if not _UNSIGNED.fullmatch(leaf):
        raise SysfsError(path, f"{leaf[:40]!r} is not an IOMMU group number")
    return int(leaf)


def address_from_link(target: str, path: str) -> PciAddress:
    """The PCI address a ``physfn`` / ``virtfnN`` symlink points to."""
    leaf = _link_leaf(target, path)
    try:
        return PciAddress.parse(leaf)
    except InvalidAddress as err:
        raise SysfsError(path, f"symlink to {target[:80]!r}: {err.reason}") from None


class Uevent(NamedTuple):
    """What a PCI function's ``uevent`` file says about it."""

    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int | None
    subsystem_device: int | None
    driver: str | None
    slot_name: str | None


def parse_uevent(raw: bytes, path: str) -> Uevent:
    """Parse a PCI function's ``uevent``: ``KEY=value`` lines.

    ``dev_uevent`` writes ``DRIVER`` when a driver is bound and
    ``pci_uevent`` writes ``PCI_CLASS=%04X``, ``PCI_ID=%04X:%04X``,
    ``PCI_SUBSYS_ID=%04X:%04X`` and ``PCI_SLOT_NAME``; other keys are
    ignored. Raise :class:`~kvmvfio.errors.SysfsError` for a malformed
    line, a repeated key, or a missing ``PCI_CLASS`` / ``PCI_ID``.
    """
    if len(raw) > _PAGE:
        raise SysfsError(path, f"{len(raw)} bytes, more than a page")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SysfsError(path, f"not UTF-8: {raw[:40]!r}") from None
    m = _UEVENT_PCI.fullmatch(text)
    # The layout of every PCI function on x86: no lookups needed.
    if m is not None and (m[1] is None or m[1].isprintable()):
        driver, cls, vendor, device, sub_vendor, sub_device, slot = m.groups()
        return Uevent(
            int(vendor, 16),
            int(device, 16),
            int(cls, 16),
            int(sub_vendor, 16),
            int(sub_device, 16),
            driver,
            slot,
        )
    # One pass of a compiled pattern checks every line; then split them.
    if not _UEVENT.fullmatch(text) or not text.replace("\n", "").isprintable():
        bad = next((ln for ln in text.split("\n") if ln and not _UEVENT.fullmatch(ln + "\n")), text)
        raise SysfsError(path, f"not KEY=value lines: {bad[:60]!r}")
    pairs = _UEVENT_PAIR.findall(text)
    env = dict(pairs)
    if len(env) != len(pairs):
        raise SysfsError(path, "a key appears twice")
    ids = env.get("PCI_ID")
    cls = env.get("PCI_CLASS")
    if ids is None or cls is None:
        raise SysfsError(path, "no PCI_ID or PCI_CLASS: not a PCI function's uevent")
    if not _UEVENT_IDS.fullmatch(ids):
        raise SysfsError(path, f"PCI_ID={ids[:40]!r} is not VVVV:DDDD")
    if not _UEVENT_CLASS.fullmatch(cls):
        raise SysfsError(path, f"PCI_CLASS={cls[:40]!r} is not a 24-bit hex number")
    sub_vendor = sub_device = None
    subsys = env.get("PCI_SUBSYS_ID")
    if subsys is not None:
        if not _UEVENT_IDS.fullmatch(subsys):
            raise SysfsError(path, f"PCI_SUBSYS_ID={subsys[:40]!r} is not VVVV:DDDD")
        sub_vendor, sub_device = int(subsys[:4], 16), int(subsys[5:], 16)
    driver = env.get("DRIVER")
    if driver is not None and not is_driver_name(driver):
        raise SysfsError(path, f"DRIVER={driver[:40]!r} is not a driver name")
    return Uevent(
        vendor=int(ids[:4], 16),
        device=int(ids[5:], 16),
        class_code=int(cls, 16),
        subsystem_vendor=sub_vendor,
        subsystem_device=sub_device,
        driver=driver,
        slot_name=env.get("PCI_SLOT_NAME"),
    )


# -- the device -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PciDevice:
    """One PCI function, as sysfs showed it when it was read."""

    address: PciAddress
    vendor: int
    device: int
    class_code: int
    subsystem_vendor: int | None = None
    subsystem_device: int | None = None
    driver: str | None = None
    driver_override: str | None = None
    iommu_group: int | None = None
    numa_node: int | None = None
    reset_methods: tuple[str, ...] = ()
    physfn: PciAddress | None = None
    virtfns: tuple[PciAddress, ...] = ()
    sriov_totalvfs: int | None = None
    sriov_numvfs: int | None = None
    vfio_cdev: str | None = None
    boot_vga: bool | None = None
    #: Read with ``brief=True`` (:func:`read_device`): ``driver_override``,
    #: ``numa_node``, ``sriov_numvfs``, ``virtfns`` and ``boot_vga`` were not read.
    brief: bool = False

    def cdev_node(self, devfs: str | Path = "/dev") -> Path | None:
        """Its VFIO cdev, ``/dev/vfio/devices/vfioN``; None when the kernel made none."""
        return None if self.vfio_cdev is None else Path(f"{devfs}/vfio/devices/{self.vfio_cdev}")

    @property
    def is_bridge(self) -> bool:
        """A PCI-to-PCI bridge (PCIe root or switch port included) or CardBus bridge."""
        return self.class_code >> 8 in BRIDGE_CLASSES

    @property
    def is_virtfn(self) -> bool:
        """An SR-IOV virtual function."""
        return self.physfn is not None

    @property
    def is_physfn(self) -> bool:
        """An SR-IOV capable physical function."""
        return self.sriov_totalvfs is not None

    @property
    def vfio_bound(self) -> bool:
        """Bound to vfio-pci or one of its variant drivers."""
        return is_vfio_driver(self.driver)

    @property
    def class_name(self) -> str:
        """The class code in words (``Ethernet controller``)."""
        return class_name(self.class_code)

    @property
    def ids(self) -> str:
        """``vendor:device`` in the form lspci -n prints (``8086:10d3``)."""
        return f"{self.vendor:04x}:{self.device:04x}"


_O_READ = os.O_RDONLY | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

# Files are opened by name rather than listed first: a listing costs more
# than the few lookups that fail, and the files only some functions have
# are asked for only where they can exist (``boot_vga`` on VGA functions,
# ``sriov_*`` on functions that are not VFs, ``vfio-dev`` under a VFIO
# driver, ``virtfnN`` up to ``sriov_numvfs``). Each helper returns None
# when the file is not there, and raises KernelError for any other failure.


def _failed(err: OSError, op: str, path: str) -> KernelError:
    return KernelError(err.errno or errno.EIO, op, path)


def _read_at(dfd: int, name: str, path: str) -> bytes | None:
    try:
        fd = os.open(name, _O_READ, dir_fd=dfd)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "open", f"{path}/{name}") from err
    try:
        return os.read(fd, _PAGE + 1)
    except OSError as err:
        if err.errno in _GONE:  # ENODEV: the device went away after the open
            return None
        raise _failed(err, "read", f"{path}/{name}") from err
    finally:
        os.close(fd)


def read_file(path: str) -> bytes | None:
    """Read a sysfs file (a page at most, plus one byte); None when it does not exist."""
    try:
        fd = os.open(path, _O_READ)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "open", path) from err
    try:
        return os.read(fd, _PAGE + 1)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "read", path) from err
    finally:
        os.close(fd)


def _readlink_at(dfd: int, name: str, path: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "readlink", f"{path}/{name}") from err


def _listdir_at(dfd: int, name: str, path: str) -> list[str] | None:
    try:
        fd = os.open(name, _O_DIR, dir_fd=dfd)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "open", f"{path}/{name}") from err
    try:
        return os.listdir(fd)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "listdir", f"{path}/{name}") from err
    finally:
        os.close(fd)


def _vfio_cdev(dfd: int, path: str) -> str | None:
    """The ``vfioN`` cdev of a device bound to a VFIO driver, if the kernel has cdevs."""
    nodes = sorted(n for n in _listdir_at(dfd, "vfio-dev", path) or () if _VFIO_NODE.fullmatch(n))
    if len(nodes) > 1:
        raise SysfsError(f"{path}/vfio-dev", f"more than one VFIO device: {', '.join(nodes)}")
    if not nodes:
        return None
    try:
        os.stat(f"vfio-dev/{nodes[0]}/dev", dir_fd=dfd)
    except OSError as err:
        if err.errno in _GONE:
            return None  # no device number: the kernel has no VFIO device cdevs
        raise _failed(err, "stat", f"{path}/vfio-dev/{nodes[0]}/dev") from err
    return nodes[0]


def _virtfns(dfd: int, path: str, numvfs: int) -> tuple[PciAddress, ...]:
    """The VFs of a PF: ``virtfn0`` .. ``virtfn<numvfs-1>``, in order."""
    out = []
    for i in range(numvfs):
        target = _readlink_at(dfd, f"virtfn{i}", path)
        if target is None:
            break  # VFs are being enabled or disabled: take the links there are
        out.append(address_from_link(target, f"{path}/virtfn{i}"))
    else:
        return tuple(out)
    numbered = []
    for name in _listdir_at(dfd, ".", path) or ():
        m = _VIRTFN.fullmatch(name)
        target = _readlink_at(dfd, name, path) if m else None
        if m and target is not None:
            numbered.append((int(m[1]), address_from_link(target, f"{path}/{name}")))
    return tuple(addr for _, addr in sorted(numbered))


def _vfs(dfd: int, path: str, totalvfs: int) -> tuple[int, tuple[PciAddress, ...]]:
    """A PF's ``sriov_numvfs`` and its VFs."""
    raw = _read_at(dfd, "sriov_numvfs", path)
    if raw is None:
        raise SysfsError(f"{path}/sriov_numvfs", "missing next to sriov_totalvfs")
    numvfs = parse_unsigned(raw, f"{path}/sriov_numvfs")
    if numvfs > totalvfs:
        raise SysfsError(f"{path}/sriov_numvfs", f"{numvfs} VFs, above {totalvfs}")
    return numvfs, _virtfns(dfd, path, numvfs)


def vfio_cdev_map(sysfs: str) -> dict[str, str | None]:
    """Map each PCI function that has a VFIO device to its ``vfioN``, from one listing.

    ``/sys/class/vfio-dev`` links every VFIO device into its function's
    ``vfio-dev/``; the value is None when the kernel has no device cdevs
    (no ``dev`` file: the option is the kernel's, so one device tells).
    Scans use this instead of listing ``vfio-dev/`` in each function.
    """
    base = f"{sysfs}/class/vfio-dev"
    try:
        names = sorted(n for n in os.listdir(base) if _VFIO_NODE.fullmatch(n))
    except OSError as err:
        if err.errno in _GONE:
            return {}
        raise _failed(err, "listdir", base) from err
    cdev = None if not names else os.access(f"{base}/{names[0]}/dev", os.F_OK)
    out: dict[str, str | None] = {}
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError as err:
            if err.errno in _GONE:
                continue  # unbound since the listing
            raise _failed(err, "readlink", f"{base}/{name}") from err
        parts = target.split("/")
        if len(parts) < 3 or parts[-2:] != ["vfio-dev", name]:
            raise SysfsError(f"{base}/{name}", f"symlink to {target[:80]!r}, not into a vfio-dev/")
        out[parts[-3]] = name if cdev else None
    return out


def read_device(
    path: str,
    address: PciAddress,
    cdevs: Mapping[str, str | None] | None = None,
    *,
    brief: bool = False,
) -> PciDevice | None:
    """Read the function whose sysfs directory is ``path``; None if it is gone.

    ``cdevs``, from :func:`vfio_cdev_map`, saves a listing of ``vfio-dev/``
    for a function it names. ``brief`` reads only what VFIO's checks and a
    plan ask of a function (the uevent's IDs, class and driver, the IOMMU
    group, the reset methods, ``physfn`` and ``sriov_totalvfs``, the VFIO
    cdev) and leaves the rest unread (:attr:`PciDevice.brief`): six system
    calls fewer per function (more on a PF or a VGA function), on the path that opens a session.

    Raise :class:`~kvmvfio.errors.SysfsError` when a file holds what the
    kernel never writes, or the directory is not a PCI function's;
    :class:`~kvmvfio.errors.KernelError` when a read fails for another
    reason than the device going away.
    """
    try:
        dfd = os.open(path, _O_DIR)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise _failed(err, "open", path) from err
    try:
        return _read_device(dfd, path, address, cdevs, brief)
    finally:
        os.close(dfd)


def _read_device(
    dfd: int,
    path: str,
    address: PciAddress,
    cdevs: Mapping[str, str | None] | None,
    brief: bool,
) -> PciDevice | None:
    # One read of uevent gives the IDs, the class and the driver, which
    # would otherwise take three reads and a readlink.
    raw = _read_at(dfd, "uevent", path)
    if raw is None:
        if os.path.exists(path):
            raise SysfsError(f"{path}/uevent", "missing: every PCI function has it")
        return None  # unplugged since it was listed
    ev = parse_uevent(raw, f"{path}/uevent")
    # The directory's name is the function's name: the two must agree.
    name = path.rpartition("/")[2]
    if ev.slot_name is not None and ev.slot_name != name:
        raise SysfsError(f"{path}/uevent", f"PCI_SLOT_NAME={ev.slot_name[:40]!r} is not {address}")
    class_code, driver = ev.class_code, ev.driver
    # The files below may be missing on a function being unplugged; the
    # kernel unbinds its driver first, so what is read stays a consistent,
    # if stale, picture of a function that held no driver.
    override = numa = None
    if not brief:
        raw = _read_at(dfd, "driver_override", path)
        override = None if raw is None else parse_driver_override(raw, f"{path}/driver_override")
        raw = _read_at(dfd, "numa_node", path)
        numa = None if raw is None else parse_numa_node(raw, f"{path}/numa_node")
    link = _readlink_at(dfd, "iommu_group", path)
    group = None if link is None else group_from_link(link, f"{path}/iommu_group")
    raw = _read_at(dfd, "reset_method", path)
    resets = () if raw is None else parse_reset_methods(raw, f"{path}/reset_method")
    link = _readlink_at(dfd, "physfn", path)
    physfn = None if link is None else address_from_link(link, f"{path}/physfn")
    totalvfs = numvfs = None
    virtfns: tuple[PciAddress, ...] = ()
    if physfn is None:  # a VF is never a PF itself
        raw = _read_at(dfd, "sriov_totalvfs", path)
        if raw is not None:
            totalvfs = parse_unsigned(raw, f"{path}/sriov_totalvfs")
            if not brief:
                numvfs, virtfns = _vfs(dfd, path, totalvfs)
    boot_vga = None
    if class_code >> 8 in VGA_CLASSES and not brief:
        raw = _read_at(dfd, "boot_vga", path)
        boot_vga = None if raw is None else parse_bool(raw, f"{path}/boot_vga")
    cdev = None
    if is_vfio_driver(driver):
        known = cdevs is not None and name in cdevs
        cdev = cdevs[name] if cdevs is not None and known else _vfio_cdev(dfd, path)
    return PciDevice(
        address=address,
        vendor=ev.vendor,
        device=ev.device,
        class_code=class_code,
        subsystem_vendor=ev.subsystem_vendor,
        subsystem_device=ev.subsystem_device,
        driver=driver,
        driver_override=override,
        iommu_group=group,
        numa_node=numa,
        reset_methods=resets,
        physfn=physfn,
        virtfns=virtfns,
        sriov_totalvfs=totalvfs,
        sriov_numvfs=numvfs,
        vfio_cdev=cdev,
        boot_vga=boot_vga,
        brief=brief,
    )
