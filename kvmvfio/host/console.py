"""What holds a display function on the host beyond its PCI driver: console, DRM, firmware.

A GPU's driver is not its only user on the host. Three more can hold it:

- the framebuffer console. A DRM driver with fbdev emulation (or an fbdev
  driver) registers a framebuffer, ``/sys/class/graphics/fbN``, whose
  ``device`` is the PCI function; fbcon, when it is bound
  (``/sys/class/vtconsole/vtconN``: ``name`` "frame buffer device", ``bind``
  1), draws the text consoles on it. fbcon's map of consoles to
  framebuffers is not in sysfs: a bound fbcon is taken to use every
  framebuffer of the function (by default it maps all consoles to the first
  one registered, which on a one-GPU host is this one);
- DRM clients: ``/sys/class/drm/cardN`` and ``renderDN`` whose ``device``
  is the function, and the processes that hold ``/dev/dri/cardN`` or
  ``/dev/dri/renderDN`` open. The DRM master (the X server, a Wayland
  compositor) is such a holder;
- a firmware framebuffer: the boot firmware's framebuffer (EFI GOP, VESA)
  lies in one of the function's memory BARs, and efifb, vesafb, simpledrm
  or simplefb (``BOOTFB`` is the resource the kernel's sysfb registers for
  it) can keep that memory in ``/proc/iomem`` even after the GPU's own
  driver took over; vfio-pci then cannot reserve the BAR.

:func:`console_use` reads all three into a :class:`ConsoleUse` and changes
nothing. Sysfs and /proc are read as untrusted input: what does not parse
is skipped, never raised. ``/proc/iomem`` shows addresses only to root
(zeros otherwise): then :attr:`ConsoleUse.iomem_known` is False.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.host.procs import holders

__all__ = [
    "FIRMWARE_FRAMEBUFFERS",
    "ConsoleUse",
    "DrmNode",
    "FirmwareFramebuffer",
    "Framebuffer",
    "MemoryRange",
    "console_use",
    "parse_iomem",
    "parse_resource",
]

#: Names in ``/proc/iomem`` of what keeps a firmware framebuffer's memory.
FIRMWARE_FRAMEBUFFERS = ("efifb", "vesafb", "simpledrm", "simplefb", "bootfb")
#: The memory-space bit of a resource's flags (``IORESOURCE_MEM``).
IORESOURCE_MEM = 0x200
#: Longest file read here; the kernel's are a few KiB (``/proc/iomem``: tens).
_MAX_READ = 1 << 20
_FB = re.compile(r"fb[0-9]{1,4}")
_VTCON = re.compile(r"vtcon[0-9]{1,4}")
_DRM = re.compile(r"(card|renderD)[0-9]{1,4}")
_IOMEM = re.compile(r"( *)([0-9a-fA-F]{1,16})-([0-9a-fA-F]{1,16}) : (.{0,200})")
_HEX = re.compile(r"0x[0-9a-fA-F]{1,16}")


@dataclass(frozen=True)
class MemoryRange:
    """An inclusive range of physical addresses, as sysfs and /proc/iomem give them."""

    start: int
    end: int

    def overlaps(self, other: MemoryRange) -> bool:
        return self.start <= other.end and other.start <= self.end

    def __str__(self) -> str:
        return f"{self.start:#x}-{self.end:#x}"


@dataclass(frozen=True)
class Framebuffer:
    """A framebuffer device of the function: ``fb0``, with its driver's name for it."""

    name: str
    #: ``/sys/class/graphics/fbN/name`` ("bochs-drmdrmfb", "amdgpudrmfb"); "" if unreadable.
    id: str = ""


@dataclass(frozen=True)
class DrmNode:
    """A DRM device node of the function (``card0``, ``renderD128``) and who holds it open."""

    name: str
    node: str
    #: ``"pid N (comm)"`` of each process that has the node open.
    holders: tuple[str, ...] = ()


@dataclass(frozen=True)
class FirmwareFramebuffer:
    """A firmware framebuffer's memory in one of the function's BARs (``/proc/iomem``)."""

    #: What owns it, as /proc/iomem names it: "efifb", "BOOTFB", "simpledrm", ...
    owner: str
    range: MemoryRange
    bar: int
    bar_range: MemoryRange


@dataclass(frozen=True)
class ConsoleUse:
    """What holds a PCI function on the host besides its driver; empty tuples: nothing."""

    address: str
    framebuffers: tuple[Framebuffer, ...] = ()
    #: The vtconsoles of fbcon that are bound (``vtcon1``), whatever framebuffer it uses.
    fbcon: tuple[str, ...] = ()
    drm: tuple[DrmNode, ...] = ()
    firmware: tuple[FirmwareFramebuffer, ...] = ()
    #: False when /proc/iomem gave no addresses (not root) or could not be read.
    iomem_known: bool = True

    @property
    def console(self) -> bool:
        """Whether fbcon is bound and the function has a framebuffer it draws on."""
        return bool(self.fbcon and self.framebuffers)

    @property
    def held(self) -> tuple[DrmNode, ...]:
        """The DRM nodes some process has open."""
        return tuple(n for n in self.drm if n.holders)

    def notes(self) -> list[str]:
        """Short notes for a listing: ``console on fb0``, ``card0 open``, ``efifb in BAR 0``."""
        out = []
        if self.console:
            out.append(f"console on {', '.join(f.name for f in self.framebuffers)}")
        out += [f"{n.name} open" for n in self.held]
        out += [f"{f.owner} in BAR {f.bar}" for f in self.firmware]
        return out


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_READ).decode("ascii", "replace")
    except OSError:
        return None


def _list(folder: Path, pattern: re.Pattern[str]) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted((n for n in names if pattern.fullmatch(n)), key=lambda n: (len(n), n))


def _of_function(link: Path, function: str) -> bool:
    """Whether ``link`` (a class device's ``device``) is the function or lies under it."""
    target = os.path.realpath(link)
    return target == function or target.startswith(function + os.sep)


def parse_resource(text: str) -> dict[int, MemoryRange]:
    """The memory BARs (index 0-5) of a function's sysfs ``resource`` file.

    Each line is ``start end flags`` in hex; unused BARs (all zero), I/O
    BARs and lines that do not parse are left out.
    """
    bars = {}
    for index, line in enumerate(text.splitlines()[:6]):
        fields = line.split()
        if len(fields) != 3 or not all(_HEX.fullmatch(f) for f in fields):
            continue
        start, end, flags = (int(f, 16) for f in fields)
        if flags & IORESOURCE_MEM and end > start:
            bars[index] = MemoryRange(start, end)
    return bars


def parse_iomem(text: str) -> list[tuple[str, MemoryRange]]:
    """The entries of ``/proc/iomem``, as (name, range), in order; bad lines are skipped."""
    out = []
    for line in text.splitlines():
        match = _IOMEM.fullmatch(line.rstrip("\n"))
        if match is None:
            continue
        start, end = int(match[2], 16), int(match[3], 16)
        if end >= start:
            out.append((match[4].strip(), MemoryRange(start, end)))
    return out


def _is_firmware_fb(name: str) -> bool:
    low = name.lower()
    return any(low.startswith(n) for n in FIRMWARE_FRAMEBUFFERS)


def _firmware(
    entries: list[tuple[str, MemoryRange]], bars: dict[int, MemoryRange]
) -> tuple[FirmwareFramebuffer, ...]:
    found = []
    for name, where in entries:
        if not _is_firmware_fb(name):
            continue
        for bar, span in sorted(bars.items()):
            if where.overlaps(span):
                found.append(FirmwareFramebuffer(name, where, bar, span))
    return tuple(dict.fromkeys(found))


def _fbcon(sysfs: Path) -> tuple[str, ...]:
    folder = sysfs / "class" / "vtconsole"
    bound = []
    for name in _list(folder, _VTCON):
        label, bind = _read(folder / name / "name"), _read(folder / name / "bind")
        if label and "frame buffer device" in label and (bind or "").strip() == "1":
            bound.append(name)
    return tuple(bound)


def console_use(
    address: str,
    sysfs: str | Path = "/sys",
    *,
    proc: str | Path = "/proc",
    devfs: str | Path = "/dev",
) -> ConsoleUse:
    """Find what holds PCI function ``address`` beyond its driver; change nothing.

    Reads ``/sys/class/graphics``, ``/sys/class/vtconsole``,
    ``/sys/class/drm``, the function's ``resource``, ``/proc/iomem`` and
    ``/proc/*/fd``. Raises nothing for what it reads: a missing or
    malformed file is taken as "nothing there".
    """
    sysfs, devfs = Path(sysfs), Path(devfs)
    function = os.path.realpath(sysfs / "bus" / "pci" / "devices" / address)
    graphics = sysfs / "class" / "graphics"
    fbs = tuple(
        Framebuffer(name, (_read(graphics / name / "name") or "").strip()[:64])
        for name in _list(graphics, _FB)
        if _of_function(graphics / name / "device", function)
    )
    drm_class = sysfs / "class" / "drm"
    drm = []
    for name in _list(drm_class, _DRM):
        if _of_function(drm_class / name / "device", function):
            node = devfs / "dri" / name
            held = holders(os.path.realpath(node), proc=proc) if node.exists() else []
            drm.append(DrmNode(name, str(node), tuple(held)))
    bars = parse_resource(_read(Path(function) / "resource") or "")
    iomem = parse_iomem(_read(Path(proc) / "iomem") or "")
    known = any(r.end for _, r in iomem)
    return ConsoleUse(
        address,
        framebuffers=fbs,
        fbcon=_fbcon(sysfs),
        drm=tuple(drm),
        firmware=_firmware(iomem, bars) if known else (),
        iomem_known=known,
    )
