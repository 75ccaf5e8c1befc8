"""Moving one PCI function between drivers through sysfs, the kernel's way.

``driver_override`` names the only driver that may bind the device, and
``drivers_probe`` asks the kernel to bind it now; ``new_id`` is never used
(it would claim every device with those IDs). Each function here is one
host change, and says so in its docstring; :mod:`kvmvfio.prepare.journal`
records each one before it happens.

Addresses and driver names become parts of the paths written to, so each
is checked before any write: an address must be a canonical PCI address
(``0000:01:00.0``), a driver name a kernel driver name (no ``/``, no
whitespace or control characters, not ``.`` or ``..``, at most 255 bytes).
Anything else is refused with :class:`UnsafeSysfsName` and nothing is
written, so no name can lead a write outside ``<sysfs>/bus/pci``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import InvalidAddress, KernelError, SysfsError, shown
from kvmvfio.host import PciAddress
from kvmvfio.prepare.errors import UnsafeSysfsName

log = logging.getLogger(__name__)

#: Longest driver name: it is a folder name in /sys/bus/pci/drivers (NAME_MAX).
MAX_DRIVER_NAME = 255


def driver_name_problem(name: object) -> str | None:
    """Why ``name`` is not a kernel driver name, or None when it is one.

    A driver name is a folder name under ``/sys/bus/pci/drivers`` and a
    ``driver_override`` value: text of at most 255 bytes without ``/``,
    whitespace or control characters (NUL included), and not ``.`` or ``..``.
    """
    if not isinstance(name, str):
        return f"it is {type(name).__name__}, not text"
    if not name:
        return "it is empty"
    if "/" in name:
        return "it holds a '/'"
    if name in (".", ".."):
        return f"it is {name!r}"
    if any(c.isspace() for c in name):
        return "it holds whitespace"
    if not name.isprintable():
        return "it holds a control character or invalid Unicode"
    if len(name.encode()) > MAX_DRIVER_NAME:
        return f"it is longer than {MAX_DRIVER_NAME} bytes"
    return None


def canonical_address(addr: str | PciAddress) -> str:
    """``addr`` as the kernel names the device; raise :class:`UnsafeSysfsName` otherwise.

    Only the canonical form (``0000:01:00.0``) is taken as text: it is the
    name of the device's folder in sysfs.
    """
    if isinstance(addr, PciAddress):
        return str(addr)
    try:
        parsed = PciAddress.parse(addr)
    except InvalidAddress as err:
        raise UnsafeSysfsName("PCI address", addr, err.reason) from None
    if str(parsed) != addr:
        raise UnsafeSysfsName("PCI address", addr, f"the kernel names it {parsed}")
    return addr


def checked_driver(name: str) -> str:
    """``name`` if it is a kernel driver name; raise :class:`UnsafeSysfsName` otherwise."""
    problem = driver_name_problem(name)
    if problem is not None:
        raise UnsafeSysfsName("driver name", name, problem)
    return name


def _read_name(path: Path, name: str) -> str:
    problem = driver_name_problem(name)
    if problem is not None:
        raise SysfsError(str(path), f"{shown(repr(name), 80)} is not a driver name ({problem})")
    return name


@dataclass(frozen=True)
class DriverState:
    """What binds a device: its driver (None: none) and its ``driver_override``."""

    driver: str | None
    override: str | None


class Sysfs:
    """The PCI bus in sysfs under ``root`` (``/sys`` by default).

    Every method takes the device's canonical address and checks it (and
    any driver name) before it builds a path; see the module's docstring.
    """

    def __init__(self, root: str | Path = "/sys") -> None:
        self.root = Path(root)
        self.bus = self.root / "bus" / "pci"

    def device(self, addr: str) -> Path:
        """The device's folder (``<sysfs>/bus/pci/devices/ADDR``); the address is checked."""
        return self.bus / "devices" / canonical_address(addr)

    def driver(self, addr: str) -> str | None:
        """The name of the device's driver, from its ``driver`` link (None: none; no change).

        Raise :class:`~kvmvfio.errors.SysfsError` when the link's name is not
        a driver name (the kernel never makes such a link).
        """
        link = self.device(addr) / "driver"
        try:
            name = os.path.basename(os.readlink(link))
        except FileNotFoundError:
            return None
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "readlink", str(link)) from err
        return _read_name(link, name)

    def state(self, addr: str) -> DriverState:
        """Read the device's driver and override (no change).

        Raise :class:`~kvmvfio.errors.SysfsError` when either is not a
        driver name (the kernel never writes such a thing there).
        """
        driver = self.driver(addr)
        path = self.device(addr) / "driver_override"
        try:
            raw = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
            raise KernelError(code, "read", str(path)) from err
        override = None if raw in ("", "(null)") else _read_name(path, raw)
        return DriverState(driver, override)

    def _write(self, path: Path, text: str, subject: str) -> None:
        # O_NOFOLLOW: the attribute files written here are never links in sysfs.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "open", str(path), subject) from err
        try:
            os.write(fd, text.encode())
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "write", str(path), subject) from err
        finally:
            os.close(fd)

    def unbind(self, addr: str) -> None:
        """Host change: detach the device from its driver (no-op without one).

        The driver's name is read first (and checked), and ``unbind`` is
        written in that driver's folder under ``<sysfs>/bus/pci/drivers``.
        """
        driver = self.driver(addr)
        if driver is not None:
            self._write(self.bus / "drivers" / driver / "unbind", addr, f"PCI device {addr}")
            log.info("%s: unbound from %s", addr, driver)

    def set_override(self, addr: str, driver: str | None) -> None:
        """Host change: set (or with None, clear) ``driver_override``."""
        path = self.device(addr) / "driver_override"
        text = f"{checked_driver(driver)}\n" if driver is not None else "\n"
        self._write(path, text, addr)

    def probe(self, addr: str) -> None:
        """Host change: ask the kernel to bind a driver now (``drivers_probe``)."""
        addr = canonical_address(addr)
        self._write(self.bus / "drivers_probe", addr, f"PCI device {addr}")

    def bind(self, addr: str, driver: str) -> None:
        """Host change: bind ``driver`` explicitly (when probing picked another one)."""
        addr = canonical_address(addr)
        path = self.bus / "drivers" / checked_driver(driver) / "bind"
        self._write(path, addr, f"PCI device {addr}")

    def set_numvfs(self, pf: str, count: int) -> None:
        """Host change: write the PF's ``sriov_numvfs`` (the kernel makes or removes VFs)."""
        self._write(self.device(pf) / "sriov_numvfs", str(int(count)), f"PF {pf}")

    def set_autoprobe(self, pf: str, on: bool) -> None:
        """Host change: write the PF's ``sriov_drivers_autoprobe`` (1: VFs get a driver at once)."""
        self._write(self.device(pf) / "sriov_drivers_autoprobe", "1" if on else "0", f"PF {pf}")

    def reset(self, addr: str) -> None:
        """Host change: reset the function (``reset``, the kernel's best method)."""
        self._write(self.device(addr) / "reset", "1", f"PCI device {addr}")

    def wait_for(self, addr: str, driver: str | None, timeout: float = 10.0) -> bool:
        """Wait until the device's driver is ``driver``; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.state(addr).driver == driver:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
