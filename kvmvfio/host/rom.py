"""PCI expansion ROMs: what a function's option ROM holds, and what a VM's firmware will find.

A PCI function may carry an option ROM (its ROM BAR): a chain of images,
each starting with the signature ``55 AA`` and a 16-bit pointer at offset
0x18 to its PCI Data Structure (``PCIR``), which names the vendor and
device the image is for, its length (in 512-byte units), its code type and
whether it is the last image. A legacy BIOS (SeaBIOS) runs the first x86
image (code type 0) whose vendor and device match the function; UEFI
firmware (OVMF) loads the EFI images (code type 3) built for its machine
type. QEMU gives a guest the function's own ROM (read through VFIO's ROM
region) or a file (``romfile=``); a file that is no ROM for the device gives
the guest a display with no firmware driver, or none at all.

:func:`parse_rom` reads any bytes into an :class:`OptionRom` (images, and
the first problem that makes it unusable) and never raises for bad input:
ROM contents are untrusted data. :func:`read_sysfs_rom` reads a function's
ROM through sysfs: the kernel only lets ``rom`` be read after ``1`` is
written to it, so the read writes that enable switch and puts it back as it
found it, on every path. That switch only gates reads of the sysfs file (the
kernel maps the ROM BAR for the length of each read); it is the one write
this layer makes. :func:`check_romfile` checks a file given for QEMU's
``romfile`` against the device it is for.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from kvmvfio.errors import KernelError, KvmvfioError, PermissionDenied, UsageError
from kvmvfio.host.pci import PciDevice, is_vfio_driver
from kvmvfio.host.procs import enable_count

__all__ = [
    "MAX_ROM_SIZE",
    "CodeType",
    "InvalidRom",
    "OptionRom",
    "RomImage",
    "RomReport",
    "RomUnreadable",
    "check_romfile",
    "parse_rom",
    "read_sysfs_rom",
    "report_rom",
]

#: The largest ROM kvmvfio reads (a ROM BAR is at most 16 MiB).
MAX_ROM_SIZE = 16 << 20
ROM_SIGNATURE = b"\x55\xaa"
PCIR_SIGNATURE = b"PCIR"
EFI_SIGNATURE = 0x0EF1
#: Offsets in the ROM header and the PCI Data Structure (PCI Firmware 3.0, 5.1).
_PCIR_POINTER = 0x18
_PCIR_MIN_LENGTH = 0x18
_UNIT = 512


class CodeType(enum.IntEnum):
    """The code type of a ROM image (PCIR offset 0x14)."""

    X86 = 0x00
    OPEN_FIRMWARE = 0x01
    HP_PA_RISC = 0x02
    EFI = 0x03

    @property
    def label(self) -> str:
        """The name the JSON and the text use."""
        return _CODE_LABELS[self]


_CODE_LABELS = {
    CodeType.X86: "x86",
    CodeType.OPEN_FIRMWARE: "open-firmware",
    CodeType.HP_PA_RISC: "hp-pa-risc",
    CodeType.EFI: "efi",
}

#: EFI machine types of an EFI image (PE/COFF machine numbers).
EFI_MACHINES = {
    0x014C: "ia32",
    0x0200: "ia64",
    0x0EBC: "ebc",
    0x8664: "x64",
    0x01C2: "arm",
    0xAA64: "aarch64",
    0x5064: "riscv64",
    0x6264: "loongarch64",
}
#: EFI image subsystems (PE/COFF subsystem numbers) a driver ROM uses.
EFI_SUBSYSTEMS = {
    10: "application",
    11: "boot-service-driver",
    12: "runtime-driver",
}


class InvalidRom(UsageError):
    """A ROM file that is not a usable option ROM for the device it is given to."""

    def __init__(self, path: str, device: str, reason: str) -> None:
        self.path = path
        self.device = device
        self.reason = reason
        super().__init__(f"{path} is not an option ROM for {device}: {reason}")


class RomUnreadable(KvmvfioError):
    """A function's ROM could not be read (no ROM BAR, the kernel refused, not root)."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot read the option ROM of {address}: {reason}")


@dataclass(frozen=True)
class RomImage:
    """One image of an option ROM's chain."""

    offset: int
    length: int
    vendor: int
    device: int
    class_code: int
    code_type: int
    revision: int
    last: bool
    device_list: tuple[int, ...] = ()
    efi_subsystem: int | None = None
    efi_machine: int | None = None
    efi_compressed: bool | None = None
    checksum_ok: bool | None = None

    @property
    def code_type_name(self) -> str:
        """``x86``, ``efi``, ``open-firmware``, ``hp-pa-risc`` or ``0xNN``."""
        try:
            return CodeType(self.code_type).label
        except ValueError:
            return f"{self.code_type:#04x}"

    @property
    def efi_machine_name(self) -> str | None:
        """The EFI image's machine type (``x64``, ``aarch64``, ...), None for other images."""
        if self.efi_machine is None:
            return None
        return EFI_MACHINES.get(self.efi_machine, f"{self.efi_machine:#06x}")

    def is_for(self, vendor: int, device: int) -> bool:
        """Whether the image names this vendor and device (its device id or its device list)."""
        return self.vendor == vendor and (self.device == device or device in self.device_list)

    def describe(self) -> str:
        """``x86`` or ``efi x64``, with the length: the words of the text output."""
        kind = self.code_type_name
        if self.efi_machine is not None:
            kind += f" {self.efi_machine_name}"
        return kind


@dataclass(frozen=True)
class OptionRom:
    """An option ROM as read: its size, its images, and what makes it unusable.

    ``problem`` is None for a ROM whose image chain is well formed (and, when
    checked against a device, has an image for it); else the first fault
    found, in words. ``images`` are those read before any fault.
    """

    size: int
    images: tuple[RomImage, ...]
    problem: str | None = None

    @property
    def valid(self) -> bool:
        """A well-formed chain of at least one image, each for the device checked against."""
        return self.problem is None and bool(self.images)

    @property
    def legacy_bios(self) -> bool:
        """Whether a legacy BIOS (SeaBIOS) finds an x86 image here."""
        return self.valid and any(i.code_type == CodeType.X86 for i in self.images)

    @property
    def uefi(self) -> tuple[str, ...]:
        """The machine types of the EFI images (what UEFI firmware can load), in order."""
        if not self.valid:
            return ()
        return tuple(i.efi_machine_name or "?" for i in self.images if i.code_type == CodeType.EFI)

    def summary(self) -> str:
        """One short phrase for the text outputs: ``ROM 38 KiB: x86, efi x64``."""
        head = f"ROM {_kib(self.size)}"
        if not self.valid:
            return f"{head}: invalid ({self.problem or 'no image'})"
        return f"{head}: " + ", ".join(i.describe() for i in self.images)


def _kib(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} bytes"


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u24(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "little")


class _Fault(Exception):
    """A fault in the image chain, in words (internal: parse_rom turns it into OptionRom)."""


def parse_rom(data: bytes, *, vendor: int | None = None, device: int | None = None) -> OptionRom:
    """Read ``data`` as a PCI expansion ROM; never raise for its contents.

    Walk the image chain (at most one image per 512 bytes, none past the
    data): each image needs ``55 AA``, a ``PCIR`` structure inside it, a
    non-zero length that fits; the chain ends at the image marked last.
    Given ``vendor`` and ``device``, every image must name them (as the
    firmware skips an image for another device). Bytes after the last image
    are ignored, as firmware does (a ROM BAR is larger than its ROM).
    """
    data = bytes(data[:MAX_ROM_SIZE])
    images: list[RomImage] = []
    offset = 0
    try:
        if not data or not data.strip(b"\xff") or not data.strip(b"\x00"):
            raise _Fault("empty (all bytes 0x00 or 0xff: no ROM behind the BAR)")
        while True:
            image = _image(data, offset, len(images))
            if vendor is not None and device is not None and not image.is_for(vendor, device):
                images.append(image)
                raise _Fault(
                    f"image {len(images) - 1} is for {image.vendor:04x}:{image.device:04x}, "
                    f"not {vendor:04x}:{device:04x}"
                )
            images.append(image)
            if image.last:
                break
            offset += image.length
            if offset >= len(data):
                raise _Fault(f"image {len(images) - 1} is not marked last, and no image follows it")
    except _Fault as fault:
        return OptionRom(len(data), tuple(images), str(fault))
    return OptionRom(len(data), tuple(images))


def _image(data: bytes, offset: int, index: int) -> RomImage:
    where = f"image {index} (at {offset:#x})"
    if data[offset : offset + 2] != ROM_SIGNATURE:
        got = data[offset : offset + 2].hex(" ") or "nothing"
        raise _Fault(f"{where}: no 55 AA signature (found {got})")
    if offset + _PCIR_POINTER + 2 > len(data):
        raise _Fault(f"{where}: cut short before its PCIR pointer")
    pcir = offset + _u16(data, offset + _PCIR_POINTER)
    if pcir + _PCIR_MIN_LENGTH > len(data) or pcir == offset:
        raise _Fault(f"{where}: its PCIR pointer leads outside the ROM")
    if data[pcir : pcir + 4] != PCIR_SIGNATURE:
        raise _Fault(f"{where}: no PCIR signature at {pcir:#x}")
    length = _u16(data, pcir + 0x10) * _UNIT
    if length == 0:
        raise _Fault(f"{where}: its PCIR gives a length of 0")
    if offset + length > len(data):
        raise _Fault(f"{where}: its length ({length} bytes) runs past the end of the ROM")
    if pcir + _PCIR_MIN_LENGTH > offset + length:
        raise _Fault(f"{where}: its PCIR structure lies outside the image")
    revision = data[pcir + 0x0C]
    code_type = data[pcir + 0x14]
    image = RomImage(
        offset=offset,
        length=length,
        vendor=_u16(data, pcir + 4),
        device=_u16(data, pcir + 6),
        class_code=_u24(data, pcir + 0x0D),
        code_type=code_type,
        revision=revision,
        last=bool(data[pcir + 0x15] & 0x80),
        device_list=_device_list(data, pcir, offset + length) if revision >= 3 else (),
    )
    if code_type == CodeType.EFI:
        return _efi(data, offset, image, where)
    if code_type == CodeType.X86:
        return _x86(data, offset, image)
    return image


def _device_list(data: bytes, pcir: int, end: int) -> tuple[int, ...]:
    """PCI 3.0's list of other device ids the image supports (0-terminated), if any."""
    pointer = _u16(data, pcir + 8)
    if pointer == 0:
        return ()
    ids: list[int] = []
    at = pcir + pointer
    while at + 2 <= end and len(ids) < 256:
        value = _u16(data, at)
        if value == 0:
            break
        ids.append(value)
        at += 2
    return tuple(ids)


def _efi(data: bytes, offset: int, image: RomImage, where: str) -> RomImage:
    if _u16(data, offset + 4) != EFI_SIGNATURE or _u16(data, offset + 6) != 0:
        raise _Fault(f"{where}: code type EFI, but no EFI signature 0x0EF1 in its header")
    return replace(
        image,
        efi_subsystem=_u16(data, offset + 8),
        efi_machine=_u16(data, offset + 0x0A),
        efi_compressed=_u16(data, offset + 0x0C) != 0,
    )


def _x86(data: bytes, offset: int, image: RomImage) -> RomImage:
    """A legacy image's checksum: its initialization size (byte 2, 512-byte units) sums to 0."""
    size = data[offset + 2] * _UNIT
    if size == 0 or size > image.length:
        return replace(image, checksum_ok=False)
    return replace(image, checksum_ok=sum(data[offset : offset + size]) % 256 == 0)


# -- reading ------------------------------------------------------------------


def _write_switch(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read_all(path: str) -> bytes:
    """Read the sysfs ROM file; EINVAL means its enable switch is off."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        total = 0
        while total < MAX_ROM_SIZE:
            chunk = os.read(fd, min(1 << 20, MAX_ROM_SIZE - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_sysfs_rom(sysfs: str | Path, address: str) -> bytes:
    """Read the option ROM of the function at ``address`` through sysfs (root only).

    Write ``1`` to its ``rom`` file if reads are off (EINVAL), read, and
    write ``0\\n`` (the kernel takes exactly that, two bytes, as off) to put
    the switch back, also when the read fails. A switch found on is left on.
    Raises :class:`RomUnreadable` (no ROM BAR, not root, the kernel's
    error), whose ``__cause__`` is the OSError.
    """
    path = os.path.join(os.fspath(sysfs), "bus", "pci", "devices", address, "rom")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise RomUnreadable(address, "it has no ROM BAR (no rom file in sysfs)") from err
    except OSError as err:
        raise RomUnreadable(address, f"{path}: {err.strerror}") from err
    if not stat.S_ISREG(mode):
        raise RomUnreadable(address, f"{path} is not a regular file")
    try:
        return _read_all(path)
    except PermissionError as err:
        raise RomUnreadable(
            address, "reading it takes root (the kernel's rom file is 0600)"
        ) from err
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise RomUnreadable(address, f"{path}: {err.strerror}") from err
    # Reads were off: turn them on for this one read, and off again whatever happens.
    try:
        _write_switch(path, "1")
    except OSError as err:
        raise RomUnreadable(address, f"enabling {path}: {err.strerror}") from err
    try:
        return _read_all(path)
    except OSError as err:
        raise RomUnreadable(address, f"{path}: {err.strerror}") from err
    finally:
        try:
            _write_switch(path, "0\n")
        except OSError as err:
            # Only a read switch is left on; say so rather than hide the read's outcome.
            raise KernelError(
                err.errno or errno.EIO,
                "write",
                path,
                hint="ROM reads of this function were left on; write 0 to it as root",
            ) from err


# -- a file for QEMU's romfile ------------------------------------------------


def check_romfile(path: str | Path, device: PciDevice) -> OptionRom:
    """Check that the file at ``path`` is an option ROM for ``device``; return what it holds.

    Every image must name ``device``'s vendor and device id (or list the
    id, PCI 3.0). A symbolic link is followed, as QEMU follows it (Debian's
    /usr/share/qemu/*.rom are links). Raises :class:`InvalidRom` naming the
    fault (not a regular file, larger than 16 MiB, no ROM, an image for
    another device), :class:`PermissionDenied` or :class:`KernelError` when
    the file cannot be opened.
    """
    address = str(device.address)
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.EACCES:
            raise PermissionDenied(err.errno, "open", name, subject=f"ROM file {name}") from err
        raise KernelError(err.errno or errno.EIO, "open", name, subject=f"ROM file {name}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRom(name, address, "it is not a regular file")
        if st.st_size > MAX_ROM_SIZE:
            raise InvalidRom(name, address, f"it is larger than {MAX_ROM_SIZE >> 20} MiB")
        data = os.read(fd, MAX_ROM_SIZE + 1)
    finally:
        os.close(fd)
    rom = parse_rom(data, vendor=device.vendor, device=device.device)
    if not rom.valid:
        raise InvalidRom(name, address, rom.problem or "it holds no image")
    return rom


# -- what `group` and `inventory` say -------------------------------------------


@dataclass(frozen=True)
class RomReport:
    """A function's option ROM as ``kvmvfio group``/``inventory`` report it.

    ``rom`` is what was read; ``unread`` says why nothing was (then ``rom``
    is None).
    """

    rom: OptionRom | None
    unread: str | None = None

    def summary(self) -> str:
        """The phrase of the text outputs (``ROM 39 KiB: x86``, ``ROM not read: ...``)."""
        if self.rom is None:
            return f"ROM not read: {self.unread}"
        return self.rom.summary()


def _in_use_by_vfio(sysfs: str | Path, dev: PciDevice) -> bool:
    if not is_vfio_driver(dev.driver):
        return False
    return enable_count(sysfs, str(dev.address)) != 0  # unknown: leave it alone


def report_rom(sysfs: str | Path, dev: PciDevice) -> RomReport | None:
    """Read and check ``dev``'s option ROM for a report; None when it has no ROM BAR.

    A function on a VFIO driver that a VFIO user has enabled (a VM runs on
    it) is not read: turning its ROM BAR on under a running guest is not
    this report's business. Raises nothing for what the ROM holds or for a
    read the kernel refuses (that is ``unread``).
    """
    path = os.path.join(os.fspath(sysfs), "bus", "pci", "devices", str(dev.address), "rom")
    if not os.path.lexists(path):
        return None
    if _in_use_by_vfio(sysfs, dev):
        return RomReport(None, f"in use through {dev.driver} (not read under a running VM)")
    try:
        data = read_sysfs_rom(sysfs, str(dev.address))
    except RomUnreadable as err:
        return RomReport(None, err.reason)
    except KernelError as err:
        return RomReport(None, str(err))
    return RomReport(parse_rom(data, vendor=dev.vendor, device=dev.device))
