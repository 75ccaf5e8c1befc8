"""Moving one PCI function between drivers through sysfs, the kernel's way.

``driver_override`` names the only driver that may bind the device, and
``drivers_probe`` asks the kernel to bind it now; ``new_id`` is never used
(it would claim every device with those IDs). Each function here is one
host change, and says so in its docstring; :mod:`kvmvfio.prepare.journal`
records each one before it happens.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import KernelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverState:
    """What binds a device: its driver (None: none) and its ``driver_override``."""

    driver: str | None
    override: str | None


class Sysfs:
    """The PCI bus in sysfs under ``root`` (``/sys`` by default)."""

    def __init__(self, root: str | Path = "/sys") -> None:
        self.root = Path(root)
        self.bus = self.root / "bus" / "pci"

    def device(self, addr: str) -> Path:
        return self.bus / "devices" / addr

    def state(self, addr: str) -> DriverState:
        """Read the device's driver and override (no change)."""
        dev = self.device(addr)
        try:
            driver: str | None = os.path.basename(os.readlink(dev / "driver"))
        except FileNotFoundError:
            driver = None
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "readlink", str(dev / "driver")) from err
        try:
            raw = (dev / "driver_override").read_text().strip()
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "read", str(dev / "driver_override")) from err
        return DriverState(driver, None if raw in ("", "(null)") else raw)

    def _write(self, path: Path, text: str, subject: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "open", str(path), subject) from err
        try:
            os.write(fd, text.encode())
        except OSError as err:
            raise KernelError(err.errno or errno.EIO, "write", str(path), subject) from err
        finally:
            os.close(fd)

    def unbind(self, addr: str) -> None:
        """Host change: detach the device from its driver (no-op without one)."""
        link = self.device(addr) / "driver"
        if link.exists():
            self._write(link / "unbind", addr, f"PCI device {addr}")
            log.info("%s: unbound", addr)

    def set_override(self, addr: str, driver: str | None) -> None:
        """Host change: set (or with None, clear) ``driver_override``."""
        self._write(self.device(addr) / "driver_override", f"{driver}\n" if driver else "\n", addr)

    def probe(self, addr: str) -> None:
        """Host change: ask the kernel to bind a driver now (``drivers_probe``)."""
        self._write(self.bus / "drivers_probe", addr, f"PCI device {addr}")

    def bind(self, addr: str, driver: str) -> None:
        """Host change: bind ``driver`` explicitly (when probing picked another one)."""
        self._write(self.bus / "drivers" / driver / "bind", addr, f"PCI device {addr}")

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
