"""How the kernel can reset a PCI function, what else that reset hits, and whether it answers.

A function is reset by the kernel in two situations that matter to a VM
user: by vfio-pci when the VM opens and closes it (so that the next user
does not inherit the last one's state), and by ``VFIO_DEVICE_PCI_HOT_RESET``
when a VMM asks for a bus or slot reset. What the kernel can do
(``drivers/pci/pci.c``, ``drivers/vfio/pci/vfio_pci_core.c``, Linux 6.12):

- the function's own resets, in ``reset_method`` in the order the kernel
  tries them: ``device_specific``, ``acpi``, ``flr`` (PCIe function level
  reset), ``af_flr``, ``pm`` (D3hot and back, only when the device says it
  then resets: ``No_Soft_Reset`` clear), ``bus``, ``cxl_bus``. Its ``bus``
  method is a secondary bus reset of the bridge above, done only when the
  function is *alone* on that bus (``pci_parent_bus_reset``), so it never
  hits another device. The kernel decides which methods to list when it
  adds the function and asks again only when it resets: a function added
  before its neighbours on the bus (function 0 of a GPU, before its audio
  function) lists ``bus``, and its reset then fails (the lab's edu2 shows
  it). kvmvfio counts ``bus`` as the function's own only while nothing
  else is behind its bridge. An empty ``reset_method`` (the file absent)
  means the kernel has no reset for the function by itself: vfio-pci's
  ``VFIO_DEVICE_RESET`` fails, and QEMU's reset of the guest leaves the
  device as it was;
- a bus (or hotplug slot) reset of the bridge above, which resets every
  function on that bus and below it. No bridge above (a function on a root
  bus, as integrated devices and the devices of QEMU's q35 root complex
  are) means no bus reset at all. vfio-pci does such a reset by itself
  when a device without a reset of its own is closed, but only when every
  device the reset hits is on vfio-pci and none of them is open
  (``vfio_pci_dev_set_try_reset``); a VMM asks for one with
  ``VFIO_DEVICE_PCI_HOT_RESET``, which needs every affected group (or
  every affected cdev bound to its iommufd).

This is why a GPU whose functions have no FLR (many do not) is only reset
when its audio function is on vfio-pci too, and why a device sharing its bus
with one a host driver uses cannot be reset between VMs at all.

:func:`reset_scope` reads that into a :class:`ResetScope`; :func:`answers`
reads the function's config space to tell whether it is still there: a
device that fell off the bus (a failed reset, a link down, a GPU hung by its
last user) reads as all ones, and a host driver probed on it hangs or
fails. Both read sysfs only and change nothing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import KernelError
from kvmvfio.host.address import PciAddress
from kvmvfio.host.pci import PciDevice

__all__ = ["Affected", "Liveness", "ResetScope", "answers", "reset_scope", "reset_scopes"]

#: The kernel's own reset methods that reset the function alone.
FUNCTION_RESETS = ("device_specific", "acpi", "flr", "af_flr", "pm", "bus", "cxl_bus")


@dataclass(frozen=True, slots=True)
class Affected:
    """A function a bus reset also hits, and who has it now."""

    address: PciAddress
    driver: str | None

    def describe(self) -> str:
        return f"{self.address} ({self.driver or 'no driver'})"


@dataclass(frozen=True, slots=True)
class ResetScope:
    """What resets the kernel has for one function, and what a bus reset would also hit.

    ``methods`` is ``reset_method`` as read; ``bridge`` is the bridge whose
    secondary bus reset reaches the function (None: it is on a root bus, no
    bus reset exists); ``affected`` lists every other function behind that
    bridge, which such a reset resets too.
    """

    address: PciAddress
    methods: tuple[str, ...]
    bridge: PciAddress | None
    affected: tuple[Affected, ...] = ()

    @property
    def stale(self) -> tuple[str, ...]:
        """Methods the kernel lists that it will refuse now: ``bus`` with others on the bus."""
        return ("bus",) if "bus" in self.methods and self.affected else ()

    @property
    def working(self) -> tuple[str, ...]:
        """The kernel's methods that can reset this function alone now."""
        return tuple(m for m in self.methods if m not in self.stale)

    @property
    def own(self) -> bool:
        """The kernel can reset this function by itself (``VFIO_DEVICE_RESET`` works)."""
        return bool(self.working)

    @property
    def bus_reset(self) -> bool:
        """A bus (or slot) reset exists for it: there is a bridge above."""
        return self.bridge is not None

    def blocking_bus_reset(self) -> tuple[Affected, ...]:
        """The affected functions that keep vfio-pci from doing the bus reset: not on vfio-pci."""
        return tuple(a for a in self.affected if a.driver != "vfio-pci")

    def summary(self) -> str:
        """One sentence: which reset the kernel uses, and what else it hits."""
        if self.own:
            return f"reset: {', '.join(self.working)} (the kernel's own, tried in this order)"
        if self.bridge is None:
            return (
                "reset: none; the kernel cannot reset it (no FLR or PM reset, and no bridge "
                "above for a bus reset): a VM gets it as the last user left it"
            )
        if not self.affected:
            return f"reset: none of its own; a bus reset by bridge {self.bridge} hits only it"
        others = ", ".join(a.describe() for a in self.affected)
        blockers = self.blocking_bus_reset()
        tail = (
            "; vfio-pci does that reset between users only once they are all on vfio-pci"
            if blockers
            else ""
        )
        listed = (
            f" (the kernel lists {', '.join(self.stale)}, but refuses it while others share "
            "the bus)"
            if self.stale
            else ""
        )
        return (
            f"reset: none of its own{listed}; only a bus reset by bridge {self.bridge}, "
            f"which also resets {others}{tail}"
        )


def _folder(bus: str, address: PciAddress) -> str | None:
    """The function's folder under ``/sys/devices``; None when it is gone.

    ``/sys/bus/pci/devices/<address>`` is the kernel's relative link
    (``../../../devices/pci0000:00/...``) out of folders that are no links
    themselves, so the link's target joined to its folder is the real path:
    one readlink, where resolving it component by component takes one per
    folder on the way.
    """
    try:
        target = os.readlink(f"{bus}/{address}")
    except OSError:
        return None
    return os.path.normpath(os.path.join(bus, target))


def _bridge_of(own: str | None) -> PciAddress | None:
    """The bridge whose folder holds the function's folder ``own``; None on a root bus."""
    parent = None if own is None else os.path.basename(os.path.dirname(own))
    if parent is None or parent.startswith("pci"):
        return None  # pci0000:00: a root bus (asked without building an error)
    try:
        return PciAddress.parse(parent)
    except ValueError:
        return None


def reset_scopes(
    sysfs: str | Path, devices: Sequence[PciDevice], others: Sequence[PciDevice]
) -> dict[str, ResetScope]:
    """The reset scope of each of ``devices`` by address; ``others``: the host's functions.

    The bridge above is the parent folder of the function's folder under
    ``/sys/devices`` when that is a PCI function; a function is affected when
    its folder lies below that bridge's. Each function's folder is resolved
    once, however many scopes it is looked for in.
    """
    bus = f"{sysfs}/bus/pci/devices"
    folders = {d.address: _folder(bus, d.address) for d in (*devices, *others)}
    out: dict[str, ResetScope] = {}
    for dev in devices:
        own = folders[dev.address]
        bridge = _bridge_of(own)
        affected: list[Affected] = []
        if bridge is not None and own is not None:
            below = os.path.dirname(own) + os.sep
            for other in others:
                path = folders[other.address]
                if other.address != dev.address and path is not None and path.startswith(below):
                    affected.append(Affected(other.address, other.driver))
        affected.sort(key=lambda a: str(a.address))
        out[str(dev.address)] = ResetScope(dev.address, dev.reset_methods, bridge, tuple(affected))
    return out


def reset_scope(sysfs: str | Path, dev: PciDevice, others: Sequence[PciDevice]) -> ResetScope:
    """The reset scope of ``dev`` (:func:`reset_scopes` for one function)."""
    return reset_scopes(sysfs, [dev], others)[str(dev.address)]


#: How much of the config header is read: IDs, command/status, revision and class.
_HEADER = 12


@dataclass(frozen=True, slots=True)
class Liveness:
    """What a function's config space and power state said when read."""

    address: str
    #: The vendor ID read from config space; None when it could not be read.
    vendor: int | None
    #: ``power_state`` (D0, D3hot, D3cold, unknown...); None when absent.
    power_state: str | None
    #: The first bytes of the header as read (empty when not readable).
    header: bytes = b""

    @property
    def dead(self) -> bool:
        """The header reads all ones: nothing answers at this address.

        Not the vendor ID alone: an SR-IOV virtual function reads 0xffff
        there by the PCI spec (the kernel takes its PF's), while its class
        code and status are real.
        """
        return len(self.header) == _HEADER and self.header == b"\xff" * _HEADER

    def describe(self) -> str:
        state = f", power state {self.power_state}" if self.power_state else ""
        if self.vendor is None:
            return f"config space not readable{state}"
        return f"vendor ID reads {self.vendor:#06x}{state}"


def answers(sysfs: str | Path, address: str) -> Liveness:
    """Read ``address``'s vendor ID from its config space, and its power state.

    Reading config space through sysfs wakes a runtime-suspended function
    first (``pci_config_pm_runtime_get``), so a healthy function idle in
    D3hot under vfio-pci reads its real vendor ID. Raises
    :class:`~kvmvfio.errors.KernelError` only for an unexpected failure; a
    function gone from sysfs reads as not readable.
    """
    folder = Path(sysfs) / "bus" / "pci" / "devices" / address
    vendor: int | None = None
    raw = b""
    try:
        fd = os.open(folder / "config", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENODEV, errno.EACCES, errno.EPERM):
            raise KernelError(err.errno or errno.EIO, "open", str(folder / "config")) from err
    else:
        try:
            raw = os.pread(fd, _HEADER, 0)
            if len(raw) >= 2:
                vendor = int.from_bytes(raw[:2], "little")
        except OSError:
            raw = b""  # EIO on a read of a device the kernel gave up on
        finally:
            os.close(fd)
    power: str | None = None
    try:
        text = (folder / "power_state").read_bytes()[:32].decode("ascii", "replace").strip()
        power = text or None
    except OSError:
        power = None
    return Liveness(address, vendor, power, raw)
