"""VFIO sessions: open what a VM needs, in the order the kernel needs, and release it.

The kernel offers three ways to reach a device from user space:

``group`` (group + container)
    ``/dev/vfio/vfio`` and ``/dev/vfio/N``; every kernel with VFIO has it.
``group-iommufd`` (group on iommufd)
    ``/dev/vfio/N`` joined to ``/dev/iommu`` instead of a container.
``cdev`` (device cdev + iommufd)
    ``/dev/vfio/devices/vfioN`` bound to ``/dev/iommu``; needs
    ``CONFIG_IOMMUFD`` and ``CONFIG_VFIO_DEVICE_CDEV``.

``auto`` picks ``cdev`` where the kernel has it, else ``group``.

KVM association. KVM's VFIO pseudo-device learns of a group or device file
through ``KVM_DEV_VFIO_FILE_ADD``, which reaches the kernel's
``vfio_file_set_kvm``. The VFIO core hands that KVM to the device driver at
one moment only: when the device is first opened for use (group path: the
first ``VFIO_GROUP_GET_DEVICE_FD``, when the device's open count goes from 0
to 1; cdev path: ``VFIO_DEVICE_BIND_IOMMUFD``). So a session adds its files
to KVM *before* it opens or binds any device, and it releases in reverse:
the kvm-vfio device holds its own reference to each file, so files are
removed from KVM before the last fd of ours is closed, or the device would
stay open (and bound) through KVM's reference.

Coherency. Whether the IOMMU enforces DMA cache coherency is what
``vfio_file_enforced_coherent`` answers KVM; when it does not, KVM must let
the guest flush caches (WBINVD) for the sake of non-coherent DMA. A policy
(``require``, ``warn``, ``ignore``) is applied before anything is handed to
KVM: ``require`` refuses, naming the group and its devices.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from kvmvfio.errors import (
    DeviceNotBoundToVfio,
    GroupNotViable,
    KernelUnsupported,
    NoIommuGroup,
    NoIommuRefused,
    SessionStateError,
    UsageError,
)
from kvmvfio.host import Host, IommuGroup, PciAddress, PciDevice, is_vfio_driver
from kvmvfio.kvm import KvmVfioDevice
from kvmvfio.vfio.container import Container
from kvmvfio.vfio.device import Device, DeviceInfo, IrqInfo, RegionInfo
from kvmvfio.vfio.group import Group
from kvmvfio.vfio.iommufd import Iommufd
from kvmvfio.vfio.policy import Backend, Coherency, apply_coherency

log = logging.getLogger(__name__)


class Runstate(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class DeviceReport:
    """What a session learned of one device."""

    address: str
    group: int
    cdev: str | None
    info: DeviceInfo
    regions: tuple[RegionInfo, ...]
    irqs: tuple[IrqInfo, ...]


@dataclass(frozen=True)
class SessionReport:
    """What a session opened and what the kernel answered."""

    backend: Backend
    groups: tuple[int, ...]
    coherent: bool | None
    kvm_associated: bool
    unsafe: tuple[str, ...] = ()
    devices: tuple[DeviceReport, ...] = field(default=())


def choose_backend(requested: Backend, host: Host, devices: Sequence[PciDevice]) -> Backend:
    """Resolve ``auto`` and check that the kernel has what ``requested`` needs."""
    # Two stats, not a full HostSupport probe: this runs at every session open.
    has_iommufd = os.path.exists(host.devfs / "iommu")
    has_container = os.path.exists(host.devfs / "vfio" / "vfio")
    cdev_ok = has_iommufd and all(d.vfio_cdev for d in devices)
    if requested is Backend.AUTO:
        if cdev_ok:
            return Backend.CDEV
        if has_container:
            return Backend.GROUP
        if has_iommufd:
            return Backend.GROUP_IOMMUFD
        raise KernelUnsupported(
            "VFIO", "neither /dev/vfio/vfio nor /dev/iommu exists; load vfio / vfio-pci"
        )
    if requested is Backend.CDEV and not cdev_ok:
        missing = (
            "/dev/iommu (CONFIG_IOMMUFD)"
            if not has_iommufd
            else "VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV)"
        )
        raise KernelUnsupported("the cdev path", f"the kernel has no {missing}; use --path group")
    if requested is Backend.GROUP and not has_container:
        raise KernelUnsupported(
            "the group + container path",
            "no /dev/vfio/vfio (CONFIG_VFIO_CONTAINER); use --path cdev",
        )
    if requested is Backend.GROUP_IOMMUFD and not has_iommufd:
        raise KernelUnsupported(
            "the group-on-iommufd path", "no /dev/iommu (CONFIG_IOMMUFD); use --path group"
        )
    return requested


def check_devices(
    host: Host, addresses: Sequence[str], *, allow_noiommu: bool = False
) -> tuple[list[PciDevice], dict[int, IommuGroup], list[str]]:
    """Check from sysfs that each device can be opened; return devices, groups, warnings.

    Raises :class:`DeviceNotBoundToVfio`, :class:`GroupNotViable` (naming
    the members in the way), :class:`NoIommuRefused`, and the host model's
    errors (:class:`~kvmvfio.errors.DeviceNotFound`, ...). Changes nothing.
    """
    devices: list[PciDevice] = []
    groups: dict[int, IommuGroup] = {}
    unsafe: list[str] = []
    for addr in addresses:
        # The group's members are read anyway: take the device from them.
        try:
            group = host.group_of(addr)
        except NoIommuGroup:
            # virtio-iommu gives a device its group only once a driver
            # binds it; say what is wrong with the device first.
            dev = host.device(addr)
            if not is_vfio_driver(dev.driver):
                raise DeviceNotBoundToVfio(str(dev.address), dev.driver) from None
            raise
        canonical = str(PciAddress.coerce(addr))
        dev = next(m for m in group.members if str(m.address) == canonical)
        if not is_vfio_driver(dev.driver):
            raise DeviceNotBoundToVfio(canonical, dev.driver)
        if group.noiommu:
            if not allow_noiommu:
                raise NoIommuRefused(group.number, canonical)
            unsafe.append(f"IOMMU group {group.number} is a no-IOMMU group: no DMA isolation")
        if not group.viable:
            raise GroupNotViable(str(group.number), group.blockers)
        groups[group.number] = group
        devices.append(dev)
    return devices, groups, unsafe


def probe_cdev_coherency(host: Host, dev: PciDevice, related: Sequence[Path] = ()) -> bool:
    """Whether the IOMMU enforces DMA cache coherency for ``dev`` (on vfio-pci, with a cdev).

    Binds the device to a scratch iommufd and IOAS, asks, and lets go of
    everything: afterwards the device is as unopened as before.
    """
    if dev.vfio_cdev is None:
        raise KernelUnsupported(
            f"a VFIO device cdev for {dev.address}", "the kernel lacks CONFIG_VFIO_DEVICE_CDEV"
        )
    with (
        Iommufd(host.devfs) as scratch,
        Device.open_cdev(str(dev.address), dev.vfio_cdev, host.devfs, related=related) as probe,
    ):
        probe.bind_iommufd(scratch.fileno())
        ioas = scratch.alloc_ioas()
        probe.attach(ioas)
        scratch.set_compat_ioas(ioas)
        return scratch.enforces_coherency()


class VfioSession:
    """The VFIO files one VM needs for a set of devices, opened in order.

    Usage::

        async with VfioSession(["0000:00:03.0"], kvm=kvm_vfio_device) as session:
            fd = session.devices["0000:00:03.0"].fileno()

    Opening checks that each device is on vfio-pci and its group is viable,
    picks the backend, applies the coherency policy, adds the group or
    device files to ``kvm`` (when given) and only then opens the devices.
    Any failure releases everything opened so far before the error
    propagates. :meth:`close` releases in reverse order and is idempotent.
    """

    def __init__(
        self,
        addresses: Sequence[str | PciAddress],
        *,
        backend: Backend | str = Backend.AUTO,
        kvm: KvmVfioDevice | None = None,
        coherency: Coherency | str = Coherency.WARN,
        allow_noiommu: bool = False,
        host: Host | None = None,
    ) -> None:
        if not addresses:
            raise UsageError("a VFIO session needs at least one device")
        self.addresses = tuple(str(PciAddress.parse(str(a))) for a in addresses)
        self.requested = Backend(backend)
        self.coherency = Coherency(coherency)
        self.allow_noiommu = allow_noiommu
        self.kvm = kvm
        self.host = host or Host()
        self.state = Runstate.IDLE
        self.backend: Backend | None = None
        self.coherent: bool | None = None
        self.unsafe: list[str] = []
        self.devices: dict[str, Device] = {}
        self.groups: dict[int, Group] = {}
        self.container: Container | None = None
        self.iommufd: Iommufd | None = None
        self._kvm_files: list[tuple[int, str]] = []
        self._members: dict[int, IommuGroup] = {}

    # -- life cycle ---------------------------------------------------------

    def open(self) -> Self:
        """Open everything; see the class docstring for the order and the errors."""
        if self.state is not Runstate.IDLE:
            raise SessionStateError("open", self.state.value)
        self.state = Runstate.OPEN
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release in reverse order: devices, KVM files, groups, container/iommufd."""
        if self.state is Runstate.CLOSED:
            return
        self.state = Runstate.CLOSED
        errors: list[Exception] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except Exception as err:  # finish releasing; report the first error after
                errors.append(err)

        # cdev: the kvm-vfio device's reference would keep a bound cdev open
        # past our close, so KVM lets go first. group: devices close first
        # (dropping their KVM reference), then the group leaves KVM.
        kvm_first = self.backend is Backend.CDEV
        if kvm_first:
            self._kvm_remove_all(attempt)
        for dev in reversed(self.devices.values()):
            attempt(dev.close)
        if not kvm_first:
            self._kvm_remove_all(attempt)
        for group in reversed(self.groups.values()):
            attempt(group.close)
        for ctx in (self.container, self.iommufd):
            if ctx is not None:
                attempt(ctx.close)
        self.devices.clear()
        if errors:
            log.warning("errors while releasing: %s", "; ".join(str(e) for e in errors))
            raise errors[0]

    async def __aenter__(self) -> Self:
        return self.open()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it found ------------------------------------------------------

    def report(self) -> SessionReport:
        """What was opened and answered (devices' regions and irqs included)."""
        if self.state is not Runstate.OPEN or self.backend is None:
            raise SessionStateError("report", self.state.value)
        devices = []
        for addr, dev in self.devices.items():
            info = dev.info()
            devices.append(
                DeviceReport(
                    address=addr,
                    group=self._group_number(addr),
                    cdev=dev.cdev,
                    info=info,
                    regions=tuple(dev.regions()),
                    irqs=tuple(dev.irqs()),
                )
            )
        return SessionReport(
            backend=self.backend,
            groups=tuple(self.groups) or tuple(sorted(self._members)),
            coherent=self.coherent,
            kvm_associated=bool(self._kvm_files),
            unsafe=tuple(self.unsafe),
            devices=tuple(devices),
        )

    # -- the steps ----------------------------------------------------------

    def _group_number(self, addr: str) -> int:
        for number, group in self._members.items():
            if any(str(m.address) == addr for m in group.members):
                return number
        raise KeyError(addr)

    def _resolve(self) -> list[PciDevice]:
        devices, groups, unsafe = check_devices(
            self.host, self.addresses, allow_noiommu=self.allow_noiommu
        )
        self._members.update(groups)
        self.unsafe.extend(unsafe)
        return devices

    def _open(self) -> None:
        devices = self._resolve()
        self.backend = choose_backend(self.requested, self.host, devices)
        log.info("devices %s: backend %s", ", ".join(self.addresses), self.backend)
        if self.backend is Backend.CDEV:
            self._open_cdev(devices)
        else:
            self._open_groups(devices)

    def _apply_policy(self, coherent: bool, subject: str, members: Sequence[str]) -> None:
        self.coherent = coherent if self.coherent is None else (self.coherent and coherent)
        note = apply_coherency(self.coherency, coherent, subject, members)
        if note:
            self.unsafe.append(note)

    def _kvm_add(self, fd: int, subject: str) -> None:
        if self.kvm is None:
            return
        self.kvm.add(fd, subject=subject)
        self._kvm_files.append((fd, subject))
        log.info("added %s to KVM", subject)

    def _kvm_remove_all(self, attempt: Callable[[Callable[[], object]], None]) -> None:
        kvm = self.kvm
        if kvm is None:
            return
        while self._kvm_files:
            fd, subject = self._kvm_files.pop()
            attempt(functools.partial(kvm.remove, fd, subject=subject))

    def _cdev_path(self, dev: PciDevice) -> Path | None:
        if dev.vfio_cdev is None:
            return None
        return self.host.devfs / "vfio" / "devices" / dev.vfio_cdev

    def _group_node(self, number: int) -> Path:
        return self._members[number].dev_node(self.host.devfs)

    def _open_groups(self, devices: Sequence[PciDevice]) -> None:
        if self.backend is Backend.GROUP_IOMMUFD:
            self.iommufd = Iommufd(self.host.devfs)
            ctx_fd = self.iommufd.fileno()
        else:
            self.container = Container(self.host.devfs)
            ctx_fd = self.container.fileno()
        for number, model in self._members.items():
            cdevs = [self._cdev_path(m) for m in model.members]
            group = Group(
                number,
                self.host.devfs,
                noiommu=model.noiommu,
                related=[p for p in cdevs if p is not None],
            )
            self.groups[number] = group
            if not group.viable:  # the kernel's word, in case sysfs changed under us
                raise GroupNotViable(str(number), model.blockers)
            group.set_container(ctx_fd)
        names = ", ".join(f"IOMMU group {n}" for n in self.groups)
        check = self.coherency is not Coherency.IGNORE
        if self.container is not None:
            self.container.set_iommu(groups=names)
            if check:
                self._apply_policy(self.container.enforces_coherency(), names, self.addresses)
        elif check and self.kvm is not None:
            # Group on iommufd: the compat IOAS has no hwpt (and so answers
            # "coherent") until a device is attached, which happens at device
            # open. The policy must be applied before KVM is involved, so
            # open each device once to learn the answer; closing drops the
            # open count back to 0, and the real open below still takes KVM.
            for dev in devices:
                addr = str(dev.address)
                with self.groups[self._group_number(addr)].open_device(addr):
                    coherent = self._iommufd().enforces_coherency()
                self._apply_policy(coherent, f"IOMMU group {self._group_number(addr)}", [addr])
        for number, group in self.groups.items():
            self._kvm_add(group.fileno(), f"IOMMU group {number} ({group.path})")
        for dev in devices:
            addr = str(dev.address)
            self.devices[addr] = self.groups[self._group_number(addr)].open_device(addr)
        if check and self.iommufd is not None and self.kvm is None:
            # No KVM to protect: ask once the devices are attached.
            self._apply_policy(self._iommufd().enforces_coherency(), names, self.addresses)

    def _iommufd(self) -> Iommufd:
        if self.iommufd is None:
            raise SessionStateError("use iommufd of", self.state.value)
        return self.iommufd

    def _probe_cdev_coherency(self, dev: PciDevice, related: Sequence[Path]) -> bool:
        return probe_cdev_coherency(self.host, dev, related)

    def _open_cdev(self, devices: Sequence[PciDevice]) -> None:
        related = {
            str(dev.address): [self._group_node(self._group_number(str(dev.address)))]
            for dev in devices
        }
        check = self.coherency is not Coherency.IGNORE
        if check and self.kvm is not None:
            # The policy comes before KVM, and KVM before the bind: learn the
            # answer on a scratch iommufd first.
            for dev in devices:
                addr = str(dev.address)
                coherent = self._probe_cdev_coherency(dev, related[addr])
                self._apply_policy(coherent, f"device {addr}", [addr])
        for dev in devices:
            assert dev.vfio_cdev is not None
            addr = str(dev.address)
            self.devices[addr] = Device.open_cdev(
                addr, dev.vfio_cdev, self.host.devfs, related=related[addr]
            )
        # KVM first: BIND_IOMMUFD is where the device takes the file's KVM.
        for addr, device in self.devices.items():
            self._kvm_add(device.fileno(), f"device {addr} ({device.path})")
        iommufd = self.iommufd = Iommufd(self.host.devfs)
        ioas = iommufd.alloc_ioas()
        for device in self.devices.values():
            device.bind_iommufd(iommufd.fileno())
            device.attach(ioas)
        iommufd.set_compat_ioas(ioas)
        if check and self.kvm is None:
            # No KVM to protect: ask once the devices are attached. One IOAS
            # holds them all, so the answer covers every device at once.
            subject = ", ".join(f"device {a}" for a in self.devices)
            self._apply_policy(iommufd.enforces_coherency(), subject, list(self.devices))
