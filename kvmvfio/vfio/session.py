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

Plan, then act. The checks, the path and the coherency answer come from a
:class:`~kvmvfio.vfio.plan.Plan` (:func:`~kvmvfio.vfio.plan.make_plan`),
made when the session opens or given to it
(:meth:`VfioSession.from_plan`); the session only opens what the plan
names, in the kernel's order.
"""

from __future__ import annotations

import enum
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

from kvmvfio.errors import GroupNotViable, SessionStateError, UsageError
from kvmvfio.host import Host, PciAddress, PciDevice
from kvmvfio.host.mdev import canonical_name
from kvmvfio.kvm import KvmVfioDevice
from kvmvfio.vfio.container import Container
from kvmvfio.vfio.device import Device, DeviceInfo, IrqInfo, RegionInfo
from kvmvfio.vfio.group import Group
from kvmvfio.vfio.iommufd import Iommufd
from kvmvfio.vfio.plan import (
    KernelPaths,
    Plan,
    check_devices,
    choose_path,
    make_plan,
    probe_cdev_coherency,
)
from kvmvfio.vfio.policy import Backend, Coherency, VfioPath

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

    backend: VfioPath
    groups: tuple[int, ...]
    coherent: bool | None
    kvm_associated: bool
    unsafe: tuple[str, ...] = ()
    devices: tuple[DeviceReport, ...] = field(default=())
    #: The plan the session acted on.
    plan: Plan | None = None


def choose_backend(requested: VfioPath, host: Host, devices: Sequence[PciDevice]) -> VfioPath:
    """Resolve ``auto`` and check that the kernel has what ``requested`` needs.

    kvmvfio's own session's choice; :func:`~kvmvfio.vfio.plan.choose_path`
    makes it for every opener.
    """
    return choose_path(VfioPath(requested), KernelPaths.of(host, devices))[0]


class VfioSession:
    """The VFIO files one VM needs for a set of devices, opened in order.

    Usage::

        async with VfioSession(["0000:00:03.0"], kvm=kvm_vfio_device) as session:
            fd = session.devices["0000:00:03.0"].fileno()

    Opening makes the plan (:func:`~kvmvfio.vfio.plan.make_plan`: each
    device on vfio-pci, its group viable, the path, the coherency policy
    applied to the kernel's answer) unless one is given
    (:meth:`from_plan`), adds the group or device files to ``kvm`` (when
    given) and only then opens the devices. Any failure releases everything
    opened so far before the error propagates. :meth:`close` releases in
    reverse order and is idempotent.
    """

    def __init__(
        self,
        addresses: Sequence[str | PciAddress],
        *,
        backend: VfioPath | str = VfioPath.AUTO,
        kvm: KvmVfioDevice | None = None,
        coherency: Coherency | str = Coherency.WARN,
        allow_noiommu: bool = False,
        vf_token: uuid.UUID | str | None = None,
        host: Host | None = None,
    ) -> None:
        if not addresses:
            raise UsageError("a VFIO session needs at least one device")
        self.addresses = tuple(canonical_name(str(a)) for a in addresses)
        self.requested = VfioPath(backend)
        self.coherency = Coherency(coherency)
        self.allow_noiommu = allow_noiommu
        self.vf_token = vf_token
        self.kvm = kvm
        self.host = host or Host()
        self.state = Runstate.IDLE
        self.plan: Plan | None = None
        self.backend: VfioPath | None = None
        self.coherent: bool | None = None
        self.unsafe: list[str] = []
        self.devices: dict[str, Device] = {}
        self.groups: dict[int, Group] = {}
        self.container: Container | None = None
        self.iommufd: Iommufd | None = None
        self._kvm_files: list[tuple[int, str]] = []

    @classmethod
    def from_plan(
        cls, plan: Plan, *, kvm: KvmVfioDevice | None = None, host: Host | None = None
    ) -> VfioSession:
        """A session that opens what ``plan`` names, on its path, without planning again.

        ``host`` is only asked again when the kernel disagrees with the plan
        (a group that stopped being viable: its blockers are read then).
        """
        session = cls(
            plan.addresses,
            backend=plan.path,
            kvm=kvm,
            coherency=plan.coherency,
            host=host or Host(devfs=plan.devfs),
        )
        session.plan = plan
        return session

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
        kvm_first = self.backend is VfioPath.CDEV
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
        if self.state is not Runstate.OPEN or self.backend is None or self.plan is None:
            raise SessionStateError("report", self.state.value)
        devices = []
        for addr, dev in self.devices.items():
            info = dev.info()
            devices.append(
                DeviceReport(
                    address=addr,
                    group=self.plan.device(addr).group,
                    cdev=dev.cdev,
                    info=info,
                    regions=tuple(dev.regions()),
                    irqs=tuple(dev.irqs()),
                )
            )
        return SessionReport(
            backend=self.backend,
            groups=tuple(self.groups) or tuple(g.number for g in self.plan.groups),
            coherent=self.coherent,
            kvm_associated=bool(self._kvm_files),
            unsafe=tuple(self.unsafe),
            devices=tuple(devices),
            plan=self.plan,
        )

    # -- the steps ----------------------------------------------------------

    def _open(self) -> None:
        if self.plan is None:
            self.plan = make_plan(
                self.addresses,
                path=self.requested,
                coherency=self.coherency,
                allow_noiommu=self.allow_noiommu,
                vf_token=self.vf_token,
                host=self.host,
            )
        plan = self.plan
        self.backend = plan.path
        self.coherent = plan.coherent
        self.unsafe.extend(plan.notes)
        log.info("devices %s: backend %s (%s)", ", ".join(self.addresses), plan.path, plan.why)
        if plan.path is VfioPath.CDEV:
            self._open_cdev(plan)
        else:
            self._open_groups(plan)

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

    def _open_groups(self, plan: Plan) -> None:
        devfs = plan.devfs
        if plan.path is VfioPath.GROUP_IOMMUFD:
            self.iommufd = Iommufd(devfs)
            ctx_fd = self.iommufd.fileno()
        else:
            self.container = Container(devfs)
            ctx_fd = self.container.fileno()
        for model in plan.groups:
            group = Group(model.number, devfs, noiommu=model.noiommu, related=model.cdevs)
            self.groups[model.number] = group
            if not group.viable:  # the kernel's word, in case sysfs changed under us
                raise GroupNotViable(str(model.number), self.host.group(model.number).blockers)
            group.set_container(ctx_fd)
        if self.container is not None:
            self.container.set_iommu(groups=", ".join(f"IOMMU group {n}" for n in self.groups))
        for number, group in self.groups.items():
            self._kvm_add(group.fileno(), f"IOMMU group {number} ({group.path})")
        for dev in plan.devices:
            self.devices[dev.address] = self.groups[dev.group].open_device(
                dev.address, vf_token=plan.token_for(dev.address)
            )

    def _open_cdev(self, plan: Plan) -> None:
        for dev in plan.devices:
            assert dev.cdev is not None  # the plan chose cdev: every device has one
            group = plan.group(dev.group)
            # A holder of the group, or of another member's cdev, keeps this one from binding.
            self.devices[dev.address] = Device.open_cdev(
                dev.address, dev.cdev, plan.devfs, related=[group.node, *group.cdevs]
            )
        # KVM first: BIND_IOMMUFD is where the device takes the file's KVM.
        for addr, device in self.devices.items():
            self._kvm_add(device.fileno(), f"device {addr} ({device.path})")
        iommufd = self.iommufd = Iommufd(plan.devfs)
        ioas = iommufd.alloc_ioas()
        for device in self.devices.values():
            device.bind_iommufd(iommufd.fileno())
            device.attach(ioas)
        iommufd.set_compat_ioas(ioas)


__all__ = [
    "Backend",
    "DeviceReport",
    "SessionReport",
    "VfioSession",
    "check_devices",
    "choose_backend",
    "probe_cdev_coherency",
]
