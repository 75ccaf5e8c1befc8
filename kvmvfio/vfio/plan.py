"""Plan, then act: what a VM's devices need, decided once before anything is handed over.

Every way kvmvfio gives devices to a VM starts the same: check each device
(on vfio-pci, its IOMMU group viable, no-IOMMU only when accepted), choose
one of the kernel's ways to reach them (:class:`~kvmvfio.vfio.policy.VfioPath`)
for whoever will open the files, ask the kernel whether the IOMMU enforces
DMA cache coherency, and apply the user's policy to the answer.
:func:`make_plan` makes those decisions, once, and returns them as a frozen
:class:`Plan`; :class:`~kvmvfio.vfio.session.VfioSession`,
:func:`kvmvfio.qemu.attach`, :func:`kvmvfio.qemu.coldplug`, the libvirt
hook and ``kvmvfio check`` only act on one. So ``kvmvfio check`` answers,
by construction, what a VM would get.

A launcher can make the plan itself, show it, and act on it::

    plan = make_plan(["0000:03:00.0"], coherency="require")
    print("\\n".join(plan.lines()))
    with VfioSession.from_plan(plan, kvm=kvm_vfio_device) as session:
        ...

Planning hands nothing over and leaves nothing behind: it reads sysfs and
``/dev``, and (unless the policy is ``ignore``) asks the kernel the
coherency question on scratch files of its own (an iommufd, a container, a
group), which it closes before it returns; the devices are as unopened
afterwards as before. The answer is the IOMMU's, and it does not change
while the devices stay where they are. A plan is a snapshot: acting on it
later, the kernel still checks what it checks (a group that lost its
viability, a device someone else opened) and says so.

Who opens the files (:class:`Opener`) decides which paths are on offer:
kvmvfio's own session takes any of the three; a running QEMU takes a cdev
by fd (QEMU >= 9) or opens a group itself; a QEMU started with kvmvfio's
arguments takes fds only, so the cdev path only.
"""

from __future__ import annotations

import contextlib
import enum
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmvfio.errors import (
    DeviceNotBoundToVfio,
    GroupNotViable,
    Interface,
    KernelUnsupported,
    MdevNotReady,
    NoIommuGroup,
    NoIommuRefused,
    UsageError,
    interface,
    shown,
)
from kvmvfio.host import Host, IommuGroup, PciAddress, PciDevice, is_vfio_driver
from kvmvfio.host.mdev import Mdev, canonical_name, is_uuid, read_mdev
from kvmvfio.host.mdev import mdev as mdev_of
from kvmvfio.host.reset import reset_scopes
from kvmvfio.vfio.policy import Coherency, VfioPath, apply_coherency

if TYPE_CHECKING:
    from kvmvfio.vfio.group import Group

#: What a plan opens: a PCI function on a VFIO driver, or a mediated device.
Target = PciDevice | Mdev

JsonObject = dict[str, object]
_NOIOMMU = "IOMMU group {number} is a no-IOMMU group: no DMA isolation"
_CDEV_TOKEN = (
    "VF {address}: the kernel's cdev path checks no VF token on this kernel (Linux 6.12: "
    "only the group path's VFIO_GROUP_GET_DEVICE_FD does); the group path enforces it"
)


class VfTokenNeeded(UsageError):
    """A VF whose PF is on vfio-pci was asked for without the VF token."""

    def __init__(self, address: str, pf: str) -> None:
        self.address = address
        self.pf = pf
        how = {
            Interface.CLI: "--vf-token UUID",
            Interface.API: "vf_token=UUID",
            Interface.METADATA: "vf_token=UUID",
        }[interface()]
        super().__init__(
            f"VF {address}: its PF {pf} is on vfio-pci, and the kernel opens the VF only with "
            f"the VF token the PF's user set (VFIO_DEVICE_FEATURE_PCI_VF_TOKEN); give it: {how}"
        )


class Opener(enum.StrEnum):
    """Who opens the files a plan names."""

    #: kvmvfio itself: :class:`~kvmvfio.vfio.session.VfioSession`, ``kvmvfio check``.
    SESSION = "session"
    #: A running QEMU: a cdev by fd, or a group node it opens itself (``attach``).
    QEMU = "qemu"
    #: A QEMU started with kvmvfio's arguments: fds only (``coldplug``).
    COLDPLUG = "coldplug"


@dataclass(frozen=True)
class DevicePlan:
    """What the plan decided for one device."""

    address: str
    group: int
    #: Its VFIO cdev's name (``vfio0``), when the kernel made one.
    cdev: str | None
    #: The file that reaches it: its cdev on the cdev path, else its group node.
    file: Path
    #: The IOMMU's answer on DMA cache coherency; None when not asked (policy ``ignore``).
    coherent: bool | None
    #: What a user should know before using it (no isolation, no coherency).
    notes: tuple[str, ...] = ()
    #: Opened with the plan's VF token: a VF whose PF is on vfio-pci, or such a PF.
    vf_token: bool = False
    #: A mediated device (``address`` is its UUID), not a PCI function.
    mdev: bool = False
    #: What resets it when it has no reset of its own (None: it has one, or is an mdev).
    reset: str | None = None

    @property
    def sysfsdev(self) -> str | None:
        """An mdev's ``/sys/bus/mdev/devices/UUID`` (QEMU's ``sysfsdev=``); None for PCI."""
        return f"/sys/bus/mdev/devices/{self.address}" if self.mdev else None


@dataclass(frozen=True)
class GroupPlan:
    """An IOMMU group the plan's devices are in."""

    number: int
    #: ``/dev/vfio/N`` (``noiommu-N``).
    node: Path
    #: Every member, by address (not only the plan's devices).
    members: tuple[str, ...]
    noiommu: bool = False
    #: The members' cdevs: a holder of one of them keeps the group busy.
    cdevs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Plan:
    """Every decision about a VM's devices, made before any of them is handed over."""

    opener: Opener
    #: The path asked for, and the one chosen (never ``auto``), and why.
    requested: VfioPath
    path: VfioPath
    why: str
    coherency: Coherency
    devices: tuple[DevicePlan, ...]
    groups: tuple[GroupPlan, ...]
    #: What is accepted that a default would refuse (a no-IOMMU group, no coherency).
    accepted: tuple[str, ...] = ()
    devfs: Path = field(default=Path("/dev"), compare=False)
    #: The VF token (a shared secret of the PF's and the VFs' users): never printed.
    vf_token: uuid.UUID | None = field(default=None, repr=False, compare=False)

    def made_for(self, opener: Opener, maker: str) -> Plan:
        """This plan, when it was made for ``opener``; UsageError naming ``maker`` otherwise."""
        if self.opener is not opener:
            raise UsageError(
                f"this plan is for {self.opener.value}, not {opener.value}: make it with {maker}()"
            )
        return self

    def token_for(self, address: str) -> uuid.UUID | None:
        """The VF token the device at ``address`` is opened with (None: none)."""
        return self.vf_token if self.device(address).vf_token else None

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(d.address for d in self.devices)

    @property
    def context_file(self) -> Path:
        """``/dev/vfio/vfio`` on the group path, else ``/dev/iommu``."""
        if self.path is VfioPath.GROUP:
            return self.devfs / "vfio" / "vfio"
        return self.devfs / "iommu"

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file opened for the VM, in the order it is opened."""
        if self.path is VfioPath.CDEV:
            return (self.context_file, *(d.file for d in self.devices))
        return (self.context_file, *(g.node for g in self.groups))

    @property
    def coherent(self) -> bool | None:
        """Whether the IOMMU enforces coherency for every device; None when not asked."""
        answers = [d.coherent for d in self.devices]
        if any(a is None for a in answers):
            return None
        return all(answers)

    @property
    def notes(self) -> tuple[str, ...]:
        """Every device's notes, each once, in order."""
        return tuple(dict.fromkeys(n for d in self.devices for n in d.notes))

    def device(self, address: str | PciAddress) -> DevicePlan:
        """The plan for the device at ``address``; KeyError when it is not in the plan."""
        canonical = canonical_name(str(address))
        for dev in self.devices:
            if dev.address == canonical:
                return dev
        raise KeyError(canonical)

    def group(self, number: int) -> GroupPlan:
        """The plan's IOMMU group ``number``; KeyError when it has none of that number."""
        for group in self.groups:
            if group.number == number:
                return group
        raise KeyError(number)

    def devices_of(self, number: int) -> tuple[DevicePlan, ...]:
        """The plan's devices in IOMMU group ``number``."""
        return tuple(d for d in self.devices if d.group == number)

    def to_json(self) -> JsonObject:
        """The plan as ``kvmvfio check --json`` prints it (docs/cli-json.md)."""
        return {
            "opener": self.opener.value,
            "requested": self.requested.value,
            "path": self.path.value,
            "why": self.why,
            "coherency": self.coherency.value,
            "coherent": self.coherent,
            "files": [str(f) for f in self.files],
            "groups": [
                {
                    "number": g.number,
                    "node": str(g.node),
                    "members": list(g.members),
                    "noiommu": g.noiommu,
                }
                for g in self.groups
            ],
            "devices": [
                {
                    "address": d.address,
                    "group": d.group,
                    "cdev": d.cdev,
                    "file": str(d.file),
                    "coherent": d.coherent,
                    "notes": list(d.notes),
                    "vf_token": d.vf_token,
                    "mdev": d.mdev,
                    "reset": d.reset,
                }
                for d in self.devices
            ],
            "accepted": list(self.accepted),
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        """The plan in a few lines, for a person."""
        out = [f"plan:       the {self.path.value} path ({self.why})"]
        out.append("files:      " + ", ".join(str(f) for f in self.files))
        if self.coherent is None:
            answer = "not asked (coherency policy ignore)"
        elif self.coherent:
            answer = "enforced by the IOMMU"
        else:
            answer = f"NOT enforced (coherency policy {self.coherency.value})"
        out.append(f"coherency:  {answer}")
        out.extend(f"accepted:   {text}" for text in self.accepted)
        out.extend(f"reset:      {d.address}: {d.reset}" for d in self.devices if d.reset)
        return out


# -- the path --------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPaths:
    """Which of the kernel's ways exist for a set of devices (two stats and the cdevs)."""

    iommufd: bool
    container: bool
    cdevs: bool

    @classmethod
    def of(cls, host: Host, devices: Sequence[Target]) -> KernelPaths:
        return cls(
            iommufd=os.path.exists(f"{host.devfs}/iommu"),
            container=os.path.exists(f"{host.devfs}/vfio/vfio"),
            cdevs=all(d.vfio_cdev for d in devices),
        )

    @property
    def cdev(self) -> bool:
        return self.iommufd and self.cdevs


def choose_path(
    requested: VfioPath,
    kernel: KernelPaths,
    opener: Opener = Opener.SESSION,
    *,
    qemu_iommufd: bool = True,
) -> tuple[VfioPath, str]:
    """Resolve ``auto`` for ``opener`` and check the kernel has the path; return it and why.

    ``qemu_iommufd`` says whether the QEMU (:attr:`Opener.QEMU`) has the
    ``iommufd`` object, and with it vfio-pci's ``fd=``. Raises
    :class:`KernelUnsupported` naming what is missing, and
    :class:`UsageError` for a path the opener cannot take.
    """
    if opener is Opener.SESSION:
        return _for_session(requested, kernel)
    if opener is Opener.QEMU:
        return _for_qemu(requested, kernel, qemu_iommufd)
    if requested not in (VfioPath.AUTO, VfioPath.CDEV):
        raise UsageError(
            f"cold plug passes file descriptors, which QEMU takes on the cdev path only, "
            f"not the {requested.value} path"
        )
    if not kernel.cdev:
        raise KernelUnsupported(
            "cold plug by fd", "it needs /dev/iommu and VFIO device cdevs (CONFIG_IOMMUFD)"
        )
    return VfioPath.CDEV, "cold plug passes fds: the cdev path"


def _for_session(requested: VfioPath, kernel: KernelPaths) -> tuple[VfioPath, str]:
    if requested is VfioPath.AUTO:
        if kernel.cdev:
            return VfioPath.CDEV, "the kernel has /dev/iommu and VFIO device cdevs"
        if kernel.container:
            return VfioPath.GROUP, "no /dev/iommu or no device cdevs; /dev/vfio/vfio is there"
        if kernel.iommufd:
            return VfioPath.GROUP_IOMMUFD, "no device cdevs and no /dev/vfio/vfio"
        raise KernelUnsupported(
            "VFIO", "neither /dev/vfio/vfio nor /dev/iommu exists; load vfio / vfio-pci"
        )
    if requested is VfioPath.CDEV and not kernel.cdev:
        missing = (
            "/dev/iommu (CONFIG_IOMMUFD)"
            if not kernel.iommufd
            else "VFIO device cdevs (CONFIG_VFIO_DEVICE_CDEV)"
        )
        raise KernelUnsupported("the cdev path", f"the kernel has no {missing}; use --path group")
    if requested is VfioPath.GROUP and not kernel.container:
        raise KernelUnsupported(
            "the group + container path",
            "no /dev/vfio/vfio (CONFIG_VFIO_CONTAINER); use --path cdev",
        )
    if requested is VfioPath.GROUP_IOMMUFD and not kernel.iommufd:
        raise KernelUnsupported(
            "the group-on-iommufd path", "no /dev/iommu (CONFIG_IOMMUFD); use --path group"
        )
    return requested, "asked for"


def _for_qemu(requested: VfioPath, kernel: KernelPaths, in_qemu: bool) -> tuple[VfioPath, str]:
    if requested is VfioPath.GROUP_IOMMUFD:
        raise UsageError(
            "QEMU opens a group only in a container: the group-iommufd path is kvmvfio's own "
            "sessions'; use --path cdev or --path group"
        )
    if requested is VfioPath.GROUP:
        return requested, "asked for"
    if in_qemu and kernel.cdev:
        return VfioPath.CDEV, "QEMU has the iommufd backend and the kernel has cdevs"
    missing = []
    if not in_qemu:
        missing.append("QEMU's vfio-pci has no iommufd/fd properties (QEMU < 9)")
    if not kernel.cdev:
        missing.append("the kernel has no /dev/iommu or no VFIO device cdevs")
    if requested is VfioPath.CDEV:
        raise KernelUnsupported("the iommufd handoff", "; ".join(missing))
    return VfioPath.GROUP, "; ".join(missing)


# -- the devices -------------------------------------------------------------------------


def check_devices(
    host: Host, addresses: Sequence[str], *, allow_noiommu: bool = False
) -> tuple[list[Target], dict[int, IommuGroup], list[str]]:
    """Check from sysfs that each device can be opened; return devices, groups, warnings.

    PCI functions, the devices and their groups' members, are read as far as
    the checks and a plan need (:attr:`~kvmvfio.host.PciDevice.brief`).

    ``addresses`` are PCI addresses or mdev UUIDs, in kvmvfio's spelling
    (:func:`~kvmvfio.host.mdev.canonical_name`). Raises
    :class:`~kvmvfio.errors.DeviceNotBoundToVfio`,
    :class:`~kvmvfio.errors.MdevNotReady`, :class:`GroupNotViable` (naming
    the members in the way), :class:`~kvmvfio.errors.NoIommuRefused`, and
    the host model's errors (:class:`~kvmvfio.errors.DeviceNotFound`,
    :class:`~kvmvfio.errors.MdevNotFound`, ...). Changes nothing.
    """
    devices: list[Target] = []
    groups: dict[int, IommuGroup] = {}
    unsafe: list[str] = []
    for addr in addresses:
        if is_uuid(addr):
            mdev, number = read_mdev_of(host, addr)
            group = host.group(number)
            if not group.viable:
                raise GroupNotViable(str(group.number), group.blockers)
            groups[group.number] = group
            devices.append(mdev)
            continue
        # The group's members are read anyway: take the device from them, read
        # as far as a plan needs.
        try:
            group = host.group_of(addr, brief=True)
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
            unsafe.append(_NOIOMMU.format(number=group.number))
        if not group.viable:
            raise GroupNotViable(str(group.number), group.blockers)
        groups[group.number] = group
        devices.append(dev)
    return devices, groups, unsafe


def read_mdev_of(host: Host, uuid: str) -> tuple[Mdev, int]:
    """The mdev ``uuid`` and its IOMMU group, checked to be VFIO's: a driver, a group.

    Raises :class:`~kvmvfio.errors.MdevNotFound` and
    :class:`~kvmvfio.errors.MdevNotReady`.
    """
    found = mdev_of(uuid, host.sysfs)
    if found.driver is None:
        raise MdevNotReady(found.uuid, "has no driver (its parent's mdev driver did not take it)")
    if found.group is None:
        raise MdevNotReady(
            found.uuid, f"has no IOMMU group: its driver {found.driver} gave it no VFIO device"
        )
    return found, found.group


def group_members(host: Host, group: IommuGroup) -> dict[str, Target]:
    """Every member of ``group`` that VFIO can name: its PCI functions and mdevs."""
    out: dict[str, Target] = {str(m.address): m for m in group.members}
    for f in group.foreign:
        if f.mdev and is_uuid(f.name):
            found = read_mdev(f.name, host.sysfs)
            if found is not None:
                out[found.uuid] = found
    return out


def _group_plan(host: Host, group: IommuGroup) -> GroupPlan:
    members = group_members(host, group)
    cdevs = (m.cdev_node(host.devfs) for m in members.values())
    return GroupPlan(
        number=group.number,
        node=group.dev_node(host.devfs),
        members=tuple(members),
        noiommu=group.noiommu,
        cdevs=tuple(c for c in cdevs if c is not None),
    )


# -- the coherency question --------------------------------------------------------------


def probe_cdev_coherency(host: Host, dev: Target, related: Sequence[Path] = ()) -> bool:
    """Whether the IOMMU enforces DMA cache coherency for ``dev`` (on vfio-pci, with a cdev).

    Binds the device to a scratch iommufd and IOAS, asks, and lets go of
    everything: afterwards the device is as unopened as before.
    """
    from kvmvfio.vfio.device import Device  # noqa: PLC0415 (cffi only when asked)
    from kvmvfio.vfio.iommufd import Iommufd  # noqa: PLC0415

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


@contextlib.contextmanager
def _scratch_group(host: Host, group: GroupPlan) -> Iterator[Group]:
    from kvmvfio.vfio.group import Group  # noqa: PLC0415 (cffi only when asked)

    with Group(group.number, host.devfs, noiommu=group.noiommu, related=group.cdevs) as opened:
        if not opened.viable:  # the kernel's word, in case sysfs changed under us
            raise GroupNotViable(str(group.number), host.group(group.number).blockers)
        yield opened


def probe_group_coherency(
    host: Host,
    path: VfioPath,
    group: GroupPlan,
    addresses: Sequence[str],
    tokens: Mapping[str, uuid.UUID | None] | None = None,
) -> bool:
    """Whether the IOMMU enforces coherency for group ``group`` on a group path.

    ``group``: in a scratch container, after ``VFIO_SET_IOMMU``.
    ``group-iommufd``: on a scratch iommufd, with ``addresses`` opened once
    (the compat IOAS has no hwpt, and so answers "coherent", until a device
    is attached, which happens at device open); closing drops each device's
    open count back to 0, so the real open still takes KVM.
    """
    from kvmvfio.vfio.container import Container  # noqa: PLC0415 (cffi only when asked)
    from kvmvfio.vfio.iommufd import Iommufd  # noqa: PLC0415

    if path is VfioPath.GROUP:
        with Container(host.devfs) as container, _scratch_group(host, group) as opened:
            opened.set_container(container.fileno())
            container.set_iommu(groups=f"IOMMU group {group.number}")
            return container.enforces_coherency()
    with Iommufd(host.devfs) as scratch, _scratch_group(host, group) as opened:
        opened.set_container(scratch.fileno())
        with contextlib.ExitStack() as stack:
            for addr in addresses:
                token = (tokens or {}).get(addr)
                stack.enter_context(opened.open_device(addr, vf_token=token))
            return scratch.enforces_coherency()


# -- the plan ----------------------------------------------------------------------------


def make_plan(
    addresses: Sequence[str | PciAddress],
    *,
    path: VfioPath | str = VfioPath.AUTO,
    coherency: Coherency | str = Coherency.WARN,
    allow_noiommu: bool = False,
    opener: Opener = Opener.SESSION,
    qemu_iommufd: bool = True,
    vf_token: uuid.UUID | str | None = None,
    host: Host | None = None,
) -> Plan:
    """Decide everything about handing the devices at ``addresses`` to a VM; see the module.

    Raises, before anything is handed over: :class:`UsageError` (no device,
    one named twice, a path ``opener`` cannot take), the host model's errors
    (:class:`~kvmvfio.errors.DeviceNotFound`, ...),
    :class:`~kvmvfio.errors.DeviceNotBoundToVfio`, :class:`GroupNotViable`,
    :class:`~kvmvfio.errors.NoIommuRefused`, :class:`KernelUnsupported`,
    :class:`~kvmvfio.errors.CoherencyRefused` under ``require``, and the
    kernel's refusals of the coherency question
    (:class:`~kvmvfio.errors.Busy` when someone else has a device open,
    :class:`~kvmvfio.errors.NoInterruptRemapping`), and :class:`VfTokenNeeded`
    for a VF whose PF is on vfio-pci without ``vf_token`` (or a token no
    device takes).
    """
    host = host or Host()
    token = _token(vf_token)
    requested = VfioPath(path)
    policy = Coherency(coherency)
    addrs = [canonical_name(str(a)) for a in addresses]
    if not addrs:
        raise UsageError("no device to plan for: name at least one")
    if len(set(addrs)) != len(addrs):
        raise UsageError(f"a device is named twice: {', '.join(addrs)}")
    devices, groups, _ = check_devices(host, addrs, allow_noiommu=allow_noiommu)
    chosen, why = choose_path(
        requested, KernelPaths.of(host, devices), opener, qemu_iommufd=qemu_iommufd
    )
    group_plans = {n: _group_plan(host, g) for n, g in groups.items()}
    group_of = {name: n for n, g in group_plans.items() for name in g.members}
    tokened = _token_users(host, devices, token)
    answers = _ask(
        host,
        chosen,
        policy=policy,
        devices=devices,
        groups=group_plans,
        group_of=group_of,
        tokens={a: token for a in tokened},
    )
    notes: dict[str, list[str]] = {a: [] for a in addrs}
    if chosen is VfioPath.CDEV:
        for addr in tokened:
            notes[addr].append(_CDEV_TOKEN.format(address=addr))
    accepted: list[str] = []
    for number, group in group_plans.items():
        if group.noiommu:
            accepted.append(f"IOMMU group {number} is a no-IOMMU group (no DMA isolation)")
            for addr in addrs:
                if group_of[addr] == number:
                    notes[addr].append(_NOIOMMU.format(number=number))
    for subject, members, coherent in _subjects(chosen, addrs, group_of, answers):
        note = apply_coherency(policy, coherent, subject, members)
        if note:
            accepted.append(f"{subject}: no enforced DMA cache coherency (policy {policy.value})")
            for addr in members:
                notes[addr].append(note)
    resets = _reset_notes(host, devices)
    plans = []
    for dev in devices:
        addr = str(dev.address)
        number = group_of[addr]
        cdev = dev.cdev_node(host.devfs) if chosen is VfioPath.CDEV else None
        plans.append(
            DevicePlan(
                address=addr,
                group=number,
                cdev=dev.vfio_cdev,
                file=cdev or group_plans[number].node,
                coherent=answers.get(addr),
                notes=tuple(notes[addr]),
                vf_token=addr in tokened,
                mdev=isinstance(dev, Mdev),
                reset=resets.get(addr),
            )
        )
    return Plan(
        opener=opener,
        requested=requested,
        path=chosen,
        why=why,
        coherency=policy,
        devices=tuple(plans),
        groups=tuple(group_plans.values()),
        accepted=tuple(accepted),
        devfs=host.devfs,
        vf_token=token,
    )


def _reset_notes(host: Host, devices: Sequence[Target]) -> dict[str, str]:
    """What a user should know of each PCI device's reset: only where it has none of its own."""
    pci = [d for d in devices if isinstance(d, PciDevice)]
    scopes = reset_scopes(host.sysfs, pci, ())
    if any(s.bus_reset and (not s.own or "bus" in s.methods) for s in scopes.values()):
        # Who else a bus reset hits (and whether `bus` still works): the host's functions,
        # read once for all the devices.
        scopes = reset_scopes(host.sysfs, pci, host.devices())
    return {a: s.summary().removeprefix("reset: ") for a, s in scopes.items() if not s.own}


def _token(value: uuid.UUID | str | None) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise UsageError(
            f"a VF token is a UUID (8-4-4-4-12 hex digits), not {shown(str(value), 60)!r}"
        ) from None


def _token_users(host: Host, devices: Sequence[Target], token: uuid.UUID | None) -> list[str]:
    """The devices opened with the VF token; refuse a token missing or taken by none.

    The kernel wants the token for a VF whose PF is on vfio-pci, and takes
    one for such a PF (it sets the token when no VF is in use yet).
    """
    users: list[str] = []
    for dev in devices:
        addr = str(dev.address)
        if dev.physfn is not None:
            pf = host.device(str(dev.physfn))
            if is_vfio_driver(pf.driver):
                if token is None:
                    raise VfTokenNeeded(addr, str(pf.address))
                users.append(addr)
        elif dev.is_physfn and is_vfio_driver(dev.driver) and token is not None:
            users.append(addr)
    if token is not None and not users:
        raise UsageError(
            "a VF token was given, but no device is a VF whose PF is on vfio-pci, nor such a "
            "PF: open them without one"
        )
    return users


def _ask(
    host: Host,
    path: VfioPath,
    *,
    policy: Coherency,
    devices: Sequence[Target],
    groups: Mapping[int, GroupPlan],
    group_of: Mapping[str, int],
    tokens: Mapping[str, uuid.UUID | None],
) -> dict[str, bool]:
    """The kernel's coherency answer per device, on scratch files; none under ``ignore``."""
    if policy is Coherency.IGNORE:
        return {}
    # An mdev has no IOMMU of its own: the kernel answers KVM "not enforced" for
    # its file (vfio_file_enforced_coherent: device_iommu_capable() is false),
    # whatever a scratch IOAS or container, which has no domain for it, says.
    answers = {d.uuid: False for d in devices if isinstance(d, Mdev)}
    pci = [d for d in devices if not isinstance(d, Mdev)]
    if path is VfioPath.CDEV:
        for d in pci:
            node = groups[group_of[str(d.address)]].node
            answers[str(d.address)] = probe_cdev_coherency(host, d, [node])
        return answers
    for number, group in groups.items():
        addrs = [str(d.address) for d in pci if group_of[str(d.address)] == number]
        if addrs:
            coherent = probe_group_coherency(host, path, group, addrs, tokens)
            answers.update(dict.fromkeys(addrs, coherent))
    return answers


def _subjects(
    path: VfioPath, addrs: Sequence[str], group_of: Mapping[str, int], answers: Mapping[str, bool]
) -> Iterator[tuple[str, list[str], bool]]:
    """What each coherency answer is about: a device (cdev), a group (group paths), an mdev."""
    if not answers:
        return
    for addr in addrs:
        if is_uuid(addr):
            yield f"mediated device {addr} (it has no IOMMU of its own)", [addr], answers[addr]
    pci = [a for a in addrs if not is_uuid(a)]
    if path is VfioPath.CDEV:
        for addr in pci:
            yield f"device {addr}", [addr], answers[addr]
        return
    for number in dict.fromkeys(group_of[a] for a in pci):
        members = [a for a in pci if group_of[a] == number]
        yield f"IOMMU group {number}", members, answers[members[0]]
