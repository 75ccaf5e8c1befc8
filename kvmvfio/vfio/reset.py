"""PCI hot reset of a set of devices: ask the kernel what it reaches, refuse or reset.

A hot reset (``VFIO_DEVICE_PCI_HOT_RESET``) resets a slot or the secondary
bus of a bridge, and so every function there, whoever uses them. The
kernel lets it happen only when the caller owns every one of them (see
:mod:`kvmvfio.vfio.device`). kvmvfio adds its own rule on top: every
function the reset reaches must have been named by the user, so nobody
resets a device without saying so.

:func:`hot_reset` opens the named devices the way ``kvmvfio check
--no-kvm`` does (a :class:`~kvmvfio.vfio.session.VfioSession`, no KVM, the
coherency question not asked), asks the kernel which functions each
device's reset reaches (``VFIO_DEVICE_GET_PCI_HOT_RESET_INFO``), refuses
with :class:`~kvmvfio.errors.HotResetBlocked` before any reset when one of
them was not named (saying, for each, whether it is on another driver or
its group is open by another process), then resets each slot or bus once
and releases everything. :func:`hot_reset_info` only asks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import KvmvfioError, UsageError
from kvmvfio.host import Host, PciAddress
from kvmvfio.host.procs import holders
from kvmvfio.vfio.device import Device, HotResetInfo
from kvmvfio.vfio.errors import HotResetBlocked, NoBusReset, ResetBystander
from kvmvfio.vfio.policy import Coherency, VfioPath
from kvmvfio.vfio.session import VfioSession

log = logging.getLogger(__name__)

__all__ = ["HotResetReport", "hot_reset", "hot_reset_info"]


@dataclass(frozen=True)
class HotResetReport:
    """What :func:`hot_reset` did, or :func:`hot_reset_info` found: one entry per slot or bus."""

    #: The path the devices were opened on (never ``auto``).
    path: VfioPath
    #: The kernel's answer for each slot or bus, asked before any reset (through ``address``).
    resets: tuple[HotResetInfo, ...]
    #: Whether the resets were made (False: :func:`hot_reset_info`).
    done: bool = True

    @property
    def reset(self) -> tuple[str, ...]:
        """Every function reset (or, when not ``done``, that a reset would reach)."""
        return tuple(a for info in self.resets for a in info.addresses)


def _addresses(addresses: Sequence[str | PciAddress]) -> list[str]:
    if not addresses:
        raise UsageError("a hot reset needs at least one PCI device")
    # PCI functions only: an mdev has no bus of its own (InvalidAddress for a UUID).
    return [str(PciAddress.coerce(a)) for a in addresses]


def _session(addresses: Sequence[str], path: VfioPath | str, host: Host) -> VfioSession:
    return VfioSession(addresses, backend=path, coherency=Coherency.IGNORE, host=host)


def _ask(device: Device, host: Host) -> HotResetInfo:
    try:
        return device.hot_reset_info()
    except NoBusReset as err:
        raise _no_bus_reset(err, device.address, host) from err


def _no_bus_reset(err: NoBusReset, address: str, host: Host) -> NoBusReset:
    try:
        methods = ", ".join(host.device(address).reset_methods) or "none"
    except KvmvfioError:
        methods = "unknown"
    hint = (
        f"{address} is on a root bus or has no slot or bus reset, so a hot reset cannot reach "
        f"it; only its own reset applies (VFIO_DEVICE_RESET; its reset_method: {methods})"
    )
    return NoBusReset(err.errno or 0, err.op, err.filename, err.subject, hint)


def _domains(session: VfioSession, host: Host) -> list[HotResetInfo]:
    """The kernel's answer for each slot or bus the session's devices are on, each once."""
    found: list[HotResetInfo] = []
    covered: set[str] = set()
    for address, device in session.devices.items():
        if address in covered:
            continue
        info = _ask(device, host)
        covered.update(info.addresses)
        found.append(info)
    return found


def _bystander(address: str, host: Host) -> ResetBystander:
    """Why ``address`` is in the way, as sysfs and /proc show it."""
    try:
        dev = host.device(address)
    except KvmvfioError:
        return ResetBystander(address, driver=None, group=None)
    nodes: list[str | Path] = []
    if dev.iommu_group is not None:
        nodes.append(Path(host.devfs) / "vfio" / str(dev.iommu_group))
    cdev = dev.cdev_node(host.devfs)
    if cdev is not None:
        nodes.append(cdev)
    who = tuple(holders(*nodes)) if nodes else ()
    return ResetBystander(address, driver=dev.driver, group=dev.iommu_group, holders=who)


def _check(infos: Sequence[HotResetInfo], named: Sequence[str], host: Host) -> None:
    for info in infos:
        others = [a for a in info.addresses if a not in named]
        if others:
            raise HotResetBlocked(
                info.address, info.addresses, [_bystander(a, host) for a in others]
            )


def hot_reset_info(
    addresses: Sequence[str | PciAddress],
    *,
    path: VfioPath | str = VfioPath.AUTO,
    host: Host | None = None,
) -> HotResetReport:
    """Ask which functions a hot reset of the devices at ``addresses`` reaches; reset nothing.

    Opens the devices (they must be on vfio-pci) on ``path`` and releases
    them again. One answer per slot or bus; ``done`` is False. Raises the session's errors
    (:class:`~kvmvfio.errors.DeviceNotBoundToVfio`,
    :class:`~kvmvfio.errors.Busy` naming the holder, ...) and
    :class:`~kvmvfio.errors.NoBusReset` for a device no slot or bus reset
    reaches.
    """
    host = host or Host()
    named = _addresses(addresses)
    with _session(named, path, host) as session:
        infos = tuple(_domains(session, host))
        assert session.backend is not None  # open
        return HotResetReport(path=session.backend, resets=infos, done=False)


def hot_reset(
    addresses: Sequence[str | PciAddress],
    *,
    path: VfioPath | str = VfioPath.AUTO,
    host: Host | None = None,
) -> HotResetReport:
    """Reset the slot or bus of each device at ``addresses``, if it reaches only those devices.

    Opens the devices on ``path`` (no KVM), asks the kernel what each reset
    reaches, and refuses with :class:`~kvmvfio.errors.HotResetBlocked`
    before resetting anything when a function reached was not named. Then
    resets each slot or bus once and releases everything. Raises what
    :func:`hot_reset_info` raises, and the kernel's refusals of the reset
    (:class:`~kvmvfio.errors.HotResetRefused`, :class:`~kvmvfio.errors.Busy`).
    """
    host = host or Host()
    named = _addresses(addresses)
    with _session(named, path, host) as session:
        infos = _domains(session, host)
        _check(infos, named, host)
        for info in infos:
            device = session.devices[info.address]
            fds = [] if info.by_devid else _group_fds(session, info)
            log.info("hot reset through %s: %s", info.address, ", ".join(info.addresses))
            device.hot_reset(fds)
        assert session.backend is not None  # open
        return HotResetReport(path=session.backend, resets=tuple(infos))


def _group_fds(session: VfioSession, info: HotResetInfo) -> list[int]:
    numbers = dict.fromkeys(d.group for d in info.devices if d.group is not None)
    return [session.groups[n].fileno() for n in numbers]
