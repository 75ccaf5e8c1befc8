"""The disks behind a PCI function, and every way the host uses them.

A storage controller (virtio-blk, NVMe, AHCI, a SCSI HBA) carries disks:
taking it from its driver takes them from the host. The kernel shows each
disk and partition as a folder below the controller's PCI function whose
``subsystem`` is the block class (for NVMe with native multipath, the
namespaces hang off the controller's *subsystem*,
``/sys/class/nvme-subsystem/nvme-subsysN``, which links to the
controller). A disk is in use when:

- a file system on it is mounted: ``/proc/self/mountinfo`` names it by
  ``MAJ:MIN``, so the root file system is found whatever ``/proc/mounts``
  calls it (``/dev/root``);
- it is swap: ``/proc/swaps`` names it by path;
- something is stacked on it: its ``holders/`` folder lists the
  device-mapper devices (LVM volumes, LUKS mappings, multipath: name in
  ``dm/name``) and md arrays (``md/level``) built on it, whatever they are
  used for in turn (found the same way, down the chain);
- the kernel holds it exclusively for anything else (a btrfs member, a
  file system mounted in another mount namespace, ZFS): an exclusive open
  (``O_EXCL``) of its device node fails with EBUSY. That open is the only
  thing here that is not a read; it is closed at once.

Pure reads, like the rest of :mod:`kvmvfio.host`: the sysfs, /proc and /dev
roots are values. What cannot be read is not taken as "unused": it becomes
a :attr:`UseKind.UNKNOWN` use naming what could not be read.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

#: Holder chains deeper than this are taken as a loop (a real one is 2 or 3 deep).
MAX_DEPTH = 16

_NUMBER = re.compile(r"[0-9]{1,10}:[0-9]{1,10}")
_PCI_NAME = re.compile(r"[0-9a-fA-F]{4,}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_DEVNAME = re.compile(r"[A-Za-z0-9_.:+-]+(/[A-Za-z0-9_.:+-]+)*")
_OCTAL = re.compile(rb"\\([0-7]{3})")


class UseKind(enum.Enum):
    """How the host uses a disk (or what it stacked on it)."""

    #: A file system on it is mounted (``mountpoints`` says where).
    MOUNTED = "mounted"
    #: It is active swap.
    SWAP = "swap"
    #: A device is stacked on it (an active LV, an open LUKS mapping, an md array).
    HELD = "held"
    #: The kernel holds it exclusively for something kvmvfio cannot name (EBUSY).
    CLAIMED = "claimed"
    #: What kvmvfio needed to tell could not be read (``detail`` says what).
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Holder:
    """A block device stacked on another one (listed in its ``holders/``)."""

    #: Kernel name: ``dm-0``, ``md0``.
    name: str
    #: ``LVM``, ``LUKS``, ``dm-crypt``, ``multipath``, ``device mapper``, ``RAID1``
    #: (an md array, from its level), or ``""`` when unknown.
    kind: str = ""
    #: The device-mapper name (``vg0-data``), ``""`` for md arrays or when unknown.
    label: str = ""

    @property
    def is_md(self) -> bool:
        """Whether this is an md (software RAID) array."""
        return self.name.startswith("md")

    def shown(self) -> str:
        """``dm-0 (LVM vg0-data)``, ``md0 (RAID1)``, or the bare name when nothing is known."""
        words = " ".join(w for w in (self.kind, self.label) if w)
        return f"{self.name} ({words})" if words else self.name


@dataclass(frozen=True)
class BlockUse:
    """One use of a disk or partition behind a PCI function."""

    #: Kernel name of the disk or partition (``vdb1``); ``""`` for a folder
    #: that could not be read while looking for disks (``detail`` says which).
    device: str
    kind: UseKind
    #: The stacked devices between ``device`` and the use, nearest first:
    #: ``vdb1`` → ``dm-0`` (mounted on /data) has ``via = (dm-0,)``.
    via: tuple[Holder, ...] = ()
    #: :attr:`UseKind.MOUNTED`: where (as ``/proc/self/mountinfo`` says).
    mountpoints: tuple[str, ...] = ()
    #: :attr:`UseKind.UNKNOWN`: what could not be read, and why.
    detail: str = ""


@dataclass(frozen=True)
class BlockDevice:
    """A disk or partition, as sysfs shows it."""

    #: Kernel name: ``vdb``, ``vdb1``, ``nvme0n1``.
    name: str
    #: ``MAJ:MIN`` from its ``dev`` file; None when unreadable or malformed.
    number: str | None
    #: Its sysfs folder.
    folder: Path
    #: The kernel name of the whole disk (itself for a disk).
    disk: str
    #: Its node's path below /dev (``DEVNAME`` of its ``uevent``, else its name).
    devname: str

    @property
    def is_partition(self) -> bool:
        """Whether this is a partition of :attr:`disk`."""
        return self.name != self.disk


@dataclass(frozen=True)
class _Mount:
    numbers: frozenset[str]
    source: str
    mountpoint: str


@dataclass(frozen=True)
class _Swap:
    path: str
    number: str | None


@dataclass(frozen=True)
class HostTables:
    """The host's mount and swap tables, read once for every disk of a check."""

    mounts: tuple[_Mount, ...] = ()
    #: Why the mount table could not be read ("" when it could).
    mounts_unread: str = ""
    swaps: tuple[_Swap, ...] = ()
    swaps_unread: str = ""

    @classmethod
    def read(cls, proc: str | Path = "/proc", devfs: str | Path = "/dev") -> HostTables:
        """Read ``proc``/self/mountinfo and ``proc``/swaps (device paths: in ``devfs``)."""
        mounts, mounts_unread = _read_mountinfo(Path(proc) / "self" / "mountinfo", Path(devfs))
        swaps, swaps_unread = _read_swaps(Path(proc) / "swaps", Path(devfs))
        return cls(mounts, mounts_unread, swaps, swaps_unread)

    def mountpoints(self, number: str | None, paths: Iterable[str]) -> tuple[str, ...]:
        """Where the device ``number`` (or known by one of ``paths``) is mounted."""
        names = set(paths)
        found = [
            m.mountpoint
            for m in self.mounts
            if (number is not None and number in m.numbers) or m.source in names
        ]
        return tuple(dict.fromkeys(found))

    def is_swap(self, number: str | None, paths: Iterable[str]) -> bool:
        """Whether the device ``number`` (or known by one of ``paths``) is active swap."""
        names = set(paths)
        return any(
            (number is not None and s.number == number) or s.path in names for s in self.swaps
        )


def _unescape(field: bytes) -> str:
    """A /proc path field with the kernel's octal escapes (``\\040``) undone."""
    raw = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return raw.decode("utf-8", errors="backslashreplace")


def _node_number(devfs: Path, path: str) -> str | None:
    """``MAJ:MIN`` of the block node a /proc table names (``/dev/...``), looked up in ``devfs``."""
    if not path.startswith("/dev/") or "/../" in path:
        return None
    try:
        st = os.stat(devfs / path[len("/dev/") :])
    except (OSError, ValueError):
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _unread(path: Path, err: OSError) -> str:
    return f"kvmvfio could not read {path} ({err.strerror or err})"


def _read_mountinfo(path: Path, devfs: Path) -> tuple[tuple[_Mount, ...], str]:
    try:
        data = path.read_bytes()
    except OSError as err:
        return (), _unread(path, err)
    mounts = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        if not line:
            continue
        fields = line.split(b" ")
        # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS
        try:
            dash = fields.index(b"-", 6)
        except ValueError:
            dash = -1
        number = fields[2].decode("ascii", errors="replace") if len(fields) > 2 else ""
        if dash < 0 or len(fields) < dash + 3 or not _NUMBER.fullmatch(number):
            return (), f"line {n} of {path} is not as the kernel writes it"
        source = _unescape(fields[dash + 2])
        numbers = {number}
        if (resolved := _node_number(devfs, source)) is not None:
            numbers.add(resolved)
        mounts.append(_Mount(frozenset(numbers), source, _unescape(fields[4])))
    return tuple(mounts), ""


def _read_swaps(path: Path, devfs: Path) -> tuple[tuple[_Swap, ...], str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return (), ""  # a kernel without swap (CONFIG_SWAP=n) has no /proc/swaps
    except OSError as err:
        return (), _unread(path, err)
    swaps = []
    for n, line in enumerate(data.split(b"\n"), start=1):
        fields = line.split()
        if not fields or (n == 1 and fields[0] == b"Filename"):
            continue
        name = _unescape(fields[0])
        if not name.startswith("/"):
            return (), f"line {n} of {path} is not as the kernel writes it"
        swaps.append(_Swap(name, _node_number(devfs, name)))
    return tuple(swaps), ""


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="backslashreplace").strip()
    except OSError:
        return None


def _number(folder: Path) -> str | None:
    text = _read_text(folder / "dev")
    return text if text is not None and _NUMBER.fullmatch(text) else None


def _devname(folder: Path, name: str) -> str:
    """The node's path below /dev: the uevent's ``DEVNAME`` (kernel names with ``!`` → ``/``)."""
    text = _read_text(folder / "uevent") or ""
    for line in text.splitlines():
        if line.startswith("DEVNAME="):
            value = line[len("DEVNAME=") :]
            if _DEVNAME.fullmatch(value) and ".." not in value.split("/"):
                return value
    fallback = name.replace("!", "/")
    return fallback if _DEVNAME.fullmatch(fallback) else name


def _is_block(folder: Path) -> bool:
    try:
        return os.path.basename(os.readlink(folder / "subsystem")) == "block"
    except OSError:
        return False


def _hidden(folder: Path) -> bool:
    # NVMe multipath's per-path disks (nvme0c0n1): no node, never used directly.
    return _read_text(folder / "hidden") == "1"


def _device(folder: Path, disk: str) -> BlockDevice:
    name = folder.name
    return BlockDevice(name, _number(folder), folder, disk, _devname(folder, name))


@dataclass(frozen=True)
class _Found:
    devices: tuple[BlockDevice, ...]
    #: Folders that could not be listed, as UNKNOWN uses.
    unread: tuple[BlockUse, ...]


def _walk(top: Path) -> _Found:
    """The disks (and their partitions) below ``top``, not entering other PCI functions."""
    devices: list[BlockDevice] = []
    unread: list[BlockUse] = []

    def failed(err: OSError) -> None:
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            where = Path(err.filename) if err.filename else top
            unread.append(BlockUse("", UseKind.UNKNOWN, detail=_unread(where, err)))

    for dirpath, dirnames, _ in os.walk(top, onerror=failed):
        folder = Path(dirpath)
        if folder != top and _is_block(folder):
            dirnames[:] = []
            if _hidden(folder):
                continue
            devices.append(_device(folder, folder.name))
            devices += _partitions(folder)
            continue
        dirnames[:] = sorted(d for d in dirnames if not _PCI_NAME.fullmatch(d))
    return _Found(tuple(devices), tuple(unread))


def _partitions(disk: Path) -> list[BlockDevice]:
    try:
        names = sorted(os.listdir(disk))
    except OSError:
        return []
    return [
        _device(disk / n, disk.name)
        for n in names
        if os.path.isfile(disk / n / "partition") and not os.path.islink(disk / n)
    ]


def _nvme_subsystem_disks(function: Path, sysfs: Path) -> _Found:
    """NVMe native multipath: the namespaces of the subsystems of ``function``'s controllers."""
    controllers = set()
    try:
        for name in os.listdir(function / "nvme"):
            controllers.add(os.path.realpath(function / "nvme" / name))
    except OSError:
        return _Found((), ())
    classdir = sysfs / "class" / "nvme-subsystem"
    try:
        subsystems = sorted(os.listdir(classdir))
    except OSError:
        return _Found((), ())
    devices: list[BlockDevice] = []
    unread: list[BlockUse] = []
    for sub in subsystems:
        folder = Path(os.path.realpath(classdir / sub))
        try:
            entries = os.listdir(folder)
        except OSError as err:
            unread.append(BlockUse("", UseKind.UNKNOWN, detail=_unread(folder, err)))
            continue
        links = {os.path.realpath(folder / e) for e in entries if os.path.islink(folder / e)}
        if links & controllers:
            found = _walk(folder)
            devices += found.devices
            unread += found.unread
    return _Found(tuple(devices), tuple(unread))


def block_devices(function_dir: str | Path, sysfs: str | Path = "/sys") -> tuple[BlockDevice, ...]:
    """The disks and partitions behind a PCI function (its sysfs folder), each disk first."""
    return _find(Path(function_dir), Path(sysfs)).devices


def _find(function_dir: Path, sysfs: Path) -> _Found:
    top = Path(os.path.realpath(function_dir))
    below = _walk(top)
    nvme = _nvme_subsystem_disks(top, sysfs)
    seen: set[str] = set()
    devices = []
    for dev in below.devices + nvme.devices:
        if dev.name not in seen:
            seen.add(dev.name)
            devices.append(dev)
    return _Found(tuple(devices), below.unread + nvme.unread)


#: ``probe(node, number)``: True when the block node ``node`` (device ``number``)
#: is held exclusively by the kernel, False when it is not, None when it
#: could not be told (no such block node, or another error).
ExclusiveProbe = Callable[[Path, str], bool | None]


def exclusive_claim(node: Path, number: str) -> bool | None:
    """Whether the kernel holds block device ``node`` exclusively (EBUSY on an ``O_EXCL`` open).

    Opens only a block device node whose number is ``number`` (``MAJ:MIN``),
    read-only and non-blocking, and closes it at once. Returns None when
    ``node`` is not that block device or the open fails otherwise.
    """
    try:
        st = os.stat(node)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode) or f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != number:
        return None
    try:
        fd = os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        return True if err.errno == errno.EBUSY else None
    os.close(fd)
    return False


def _describe(folder: Path, name: str) -> Holder:
    if (folder / "dm").is_dir():
        uuid = _read_text(folder / "dm" / "uuid") or ""
        kind = "device mapper"
        for prefix, what in (
            ("LVM-", "LVM"),
            ("CRYPT-LUKS", "LUKS"),
            ("CRYPT-", "dm-crypt"),
            ("mpath-", "multipath"),
        ):
            if uuid.startswith(prefix):
                kind = what
                break
        return Holder(name, kind, _shown(_read_text(folder / "dm" / "name") or ""))
    if (folder / "md").is_dir():
        level = _read_text(folder / "md" / "level") or ""
        kind = level.upper() if level.startswith("raid") else (f"md {level}" if level else "md")
        return Holder(name, _shown(kind))
    return Holder(name)


def _shown(text: str) -> str:
    """``text`` safe to print: control characters escaped, at most 64 characters."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= 64 else text[:61] + "..."


class _Walker:
    """The uses of one device and of everything stacked on it."""

    def __init__(self, tables: HostTables, sysfs: Path) -> None:
        self.tables = tables
        self.sysfs = sysfs

    def uses(
        self,
        device: str,
        folder: Path,
        number: str | None,
        paths: tuple[str, ...],
        via: tuple[Holder, ...],
    ) -> list[BlockUse]:
        found: list[BlockUse] = []
        tables = self.tables
        # What could not be read is said once, of the device itself: a holder
        # is a use whatever else is known of it.
        unknown = [tables.mounts_unread, tables.swaps_unread] if not via else []
        if number is None and not via:
            unknown.append(f"kvmvfio could not read its device number from {folder / 'dev'}")
        found += [BlockUse(device, UseKind.UNKNOWN, detail=d) for d in unknown if d]
        if mountpoints := tables.mountpoints(number, paths):
            found.append(BlockUse(device, UseKind.MOUNTED, via, tuple(map(_shown, mountpoints))))
        if tables.is_swap(number, paths):
            found.append(BlockUse(device, UseKind.SWAP, via))
        return found + self.holder_uses(device, folder, via)

    def holder_uses(self, device: str, folder: Path, via: tuple[Holder, ...]) -> list[BlockUse]:
        where = folder / "holders"
        try:
            names = sorted(os.listdir(where))
        except FileNotFoundError:
            return []
        except OSError as err:
            return [BlockUse(device, UseKind.UNKNOWN, via, detail=_unread(where, err))]
        found: list[BlockUse] = []
        for name in names:
            hfolder = self.sysfs / "class" / "block" / name
            holder = _describe(hfolder, _shown(name))
            chain = (*via, holder)
            if len(chain) > MAX_DEPTH or any(h.name == holder.name for h in via):
                detail = f"its holders go deeper than {MAX_DEPTH} devices, or in a loop"
                found.append(BlockUse(device, UseKind.UNKNOWN, chain, detail=detail))
                continue
            paths: tuple[str, ...] = (f"/dev/{_devname(hfolder, name)}",)
            if (dm_name := _read_text(hfolder / "dm" / "name")) is not None:
                paths += (f"/dev/mapper/{dm_name}",)
            # An unreadable holder is still a holder: it counts as a use.
            below = self.uses(device, hfolder, _number(hfolder), paths, chain)
            found += below or [BlockUse(device, UseKind.HELD, chain)]
        return found


def disk_uses(
    function_dir: str | Path,
    *,
    sysfs: str | Path = "/sys",
    proc: str | Path = "/proc",
    devfs: str | Path = "/dev",
    probe: ExclusiveProbe = exclusive_claim,
) -> tuple[BlockUse, ...]:
    """Every use of every disk and partition behind the PCI function at ``function_dir``.

    Empty when the function has no disks, or none of them is used. Reads
    sysfs, ``proc``/self/mountinfo and ``proc``/swaps; ``probe`` (an
    exclusive open of the device node, by default) answers for each disk
    and partition the tables do not name a use for. Raises nothing for bad
    or unreadable contents: those are :attr:`UseKind.UNKNOWN` uses.
    """
    sysfs_, devfs_ = Path(sysfs), Path(devfs)
    found = _find(Path(function_dir), sysfs_)
    if not found.devices:
        return found.unread
    walker = _Walker(HostTables.read(proc, devfs_), sysfs_)
    named = {
        dev.name: walker.uses(dev.name, dev.folder, dev.number, (f"/dev/{dev.devname}",), ())
        for dev in found.devices
    }
    # Partitions first: a partition in use makes its whole disk busy too,
    # which is not news about the disk.
    for dev in sorted(found.devices, key=lambda d: not d.is_partition):
        if named[dev.name] or dev.number is None:
            continue
        parts = [named[d.name] for d in found.devices if d.disk == dev.name and d.is_partition]
        if any(parts):
            continue
        if probe(devfs_ / dev.devname, dev.number):
            named[dev.name] = [BlockUse(dev.name, UseKind.CLAIMED)]
    return found.unread + tuple(u for dev in found.devices for u in named[dev.name])
