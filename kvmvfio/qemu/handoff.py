"""Hand VFIO devices to a running QEMU, and take them back.

The point: QEMU runs without any access to ``/dev/vfio`` or ``/dev/iommu``.
kvmvfio, holding the privilege, checks the devices, opens what is needed
and passes QEMU file descriptors over its QMP socket.

iommufd path (QEMU >= 9 with its ``iommufd`` object; a kernel with
``/dev/iommu`` and VFIO device cdevs)::

    getfd      kvmvfio-iommufd-fd     <- /dev/iommu            (once per VM)
    object-add iommufd id=kvmvfio-iommufd fd=kvmvfio-iommufd-fd
    getfd      kvmvfio-fd-DDDD-BB-SS-F <- /dev/vfio/devices/vfioN (unbound)
    device_add vfio-pci id=kvmvfio-DDDD-BB-SS-F iommufd=kvmvfio-iommufd fd=kvmvfio-fd-... bus=PORT

Before the ``/dev/iommu`` fd goes, kvmvfio makes it charge what QEMU pins
to QEMU's own process rather than to its user (``IOMMU_OPTION_RLIMIT_MODE``,
:func:`kvmvfio.vfio.iommufd.open_for_vmm`): with the kernel's default, all
QEMUs of one uid share one ``RLIMIT_MEMLOCK``, and the second VM of a user
fails to pin its RAM.

QEMU binds the cdev and makes the KVM association itself, in the right
order; kvmvfio must not bind the cdev before handing it over. A failed
``device_add`` consumes the fd name, so every attempt sends the fd again.
The names are fixed per VM and per device: a ``getfd`` of a name QEMU
already holds replaces (and closes) the old fd, so an fd that a killed
kvmvfio passed but never used (between ``getfd`` and ``device_add``) is
dropped by the next attempt instead of keeping the device open in QEMU.

Legacy path (no iommufd in QEMU or the kernel): QEMU refuses passed fds
there ("Use FD passing only with iommufd backend") and keeps a refused
device fd open, holding the group busy, so kvmvfio never sends one.
Instead it grants QEMU's uid access to exactly the group node it needs
(a POSIX ACL entry), runs ``device_add vfio-pci,host=ADDR``, and revokes
the entry on detach.

Detach: ``device_del``, then wait for ``DEVICE_DELETED``. A guest must
answer the PCIe hot-unplug request; one that never does gets a
:class:`~kvmvfio.errors.DetachTimeout` and the device stays as QEMU has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import shutil
import subprocess
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import (
    DetachTimeout,
    KernelError,
    KernelUnsupported,
    KvmvfioError,
    MemlockTooLow,
    MixedVfioBackends,
    NoHotplugPort,
    NotAttached,
    QemuConfined,
    QemuError,
    QemuRefused,
    UsageError,
)
from kvmvfio.host import Host, PciAddress, PciDevice
from kvmvfio.host.confinement import PolicyUnreadable, confinement, refused_paths
from kvmvfio.host.mdev import canonical_name, is_uuid, parse_uuid
from kvmvfio.host.mdev import mdev as mdev_of
from kvmvfio.host.procs import holders
from kvmvfio.host.rom import check_romfile
from kvmvfio.qemu.deadline import seconds
from kvmvfio.qemu.qmp import JsonObject, Monitor
from kvmvfio.qemu.replies import MemorySize, QomProperty
from kvmvfio.vfio.files import open_node
from kvmvfio.vfio.iommufd import RlimitMode, open_for_vmm
from kvmvfio.vfio.plan import DevicePlan, KernelPaths, Opener, Plan, make_plan
from kvmvfio.vfio.plan import choose_path as _choose
from kvmvfio.vfio.policy import Coherency, VfioPath

#: The old name of :class:`VfioPath` here (``HandoffPath.IOMMUFD`` is ``VfioPath.CDEV``).
HandoffPath = VfioPath

log = logging.getLogger(__name__)

#: The one iommufd object kvmvfio creates per VM, shared by its devices.
IOMMUFD_OBJECT = "kvmvfio-iommufd"
#: Port types a device can be hot-plugged into (PCIe native hotplug).
HOTPLUG_PORTS = frozenset({"pcie-root-port", "ioh3420", "xio3130-downstream"})
#: What VFIO may pin beyond the guest's RAM (libvirt adds 1 GiB too).
MEMLOCK_MARGIN = 1 << 30
_PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")


@dataclass(frozen=True)
class Attachment:
    """One device kvmvfio attached to a QEMU."""

    address: str
    qdev_id: str
    bus: str | None
    path: VfioPath
    group: int
    coherent: bool | None
    unsafe: tuple[str, ...] = ()


def qdev_id(address: str | PciAddress) -> str:
    """The QEMU device id kvmvfio gives ``address`` (``kvmvfio-0000-00-03-0``).

    An mdev's is ``kvmvfio-mdev-UUID``.
    """
    if isinstance(address, str) and "-" in address:
        return f"kvmvfio-mdev-{parse_uuid(address)}"
    a = PciAddress.coerce(address)
    return f"kvmvfio-{a.domain:04x}-{a.bus:02x}-{a.slot:02x}-{a.function:x}"


# -- what QEMU and the kernel offer ------------------------------------------------


async def qemu_has_iommufd(qemu: Monitor) -> bool:
    """Whether this QEMU has the ``iommufd`` object, and so vfio-pci's ``iommufd=``/``fd=``.

    Both came in QEMU 9.0. Asking for the types that implement ``iommufd``
    is one short answer; vfio-pci's property list is a long one.
    """
    try:
        types = await qemu.qom_list_types("iommufd")
    except QemuRefused:
        return False
    return any(t.name == "iommufd" for t in types)


async def choose_path(
    qemu: Monitor, host: Host, devices: Sequence[PciDevice], requested: VfioPath
) -> tuple[VfioPath, str]:
    """Resolve ``auto`` from QEMU's and the kernel's capabilities; say why."""
    in_qemu = await qemu_has_iommufd(qemu)
    kernel = KernelPaths.of(host, devices)
    return _choose(VfioPath(requested), kernel, Opener.QEMU, qemu_iommufd=in_qemu)


#: QEMU's user-created devices: (container, item) for each, from one listing per container.
Peripherals = list[tuple[str, QomProperty]]


async def peripherals(qemu: Monitor) -> Peripherals:
    """``qom-list`` of ``/machine/peripheral`` and ``-anon``: every device a user added."""
    async with qemu.together() as ask:
        lists = [ask(qemu.qom_list(c)) for c in _PERIPHERALS]
    return _peripherals(lists)


def _peripherals(lists: Sequence[asyncio.Task[tuple[QomProperty, ...]]]) -> Peripherals:
    return [
        (c, item) for c, listed in zip(_PERIPHERALS, lists, strict=True) for item in listed.result()
    ]


async def free_ports(
    qemu: Monitor, listing: Peripherals | None = None
) -> tuple[list[str], list[str]]:
    """The hotpluggable ports with nothing plugged in, and the taken ones, by QEMU id.

    A port whose ``hotplug`` switch is off is not told apart: QEMU's
    ``device_add`` then refuses with its own words. ``listing``: QEMU's
    :func:`peripherals`, when the caller has it already.
    """
    ports: list[str] = []
    async with qemu.together() as ask:  # where each device sits, asked at once
        buses = []
        for container, item in listing if listing is not None else await peripherals(qemu):
            if item.child_type is None:
                continue
            if container == _PERIPHERALS[0] and item.child_type in HOTPLUG_PORTS:
                ports.append(item.name)
                continue  # ports sit on the root bus: no need to ask where
            buses.append(ask(qemu.qom_link(f"{container}/{item.name}", "parent_bus")))
    occupied = {b.result().rstrip("/").rpartition("/")[2] for b in buses if b.result()}
    ports.sort(key=lambda name: (len(name), name))  # rp2 before rp10
    free = [p for p in ports if p not in occupied]
    return free, [p for p in ports if p in occupied]


# -- limits and access ----------------------------------------------------------------


def memlock_limit(pid: int) -> int:
    """The soft RLIMIT_MEMLOCK of ``pid`` in bytes (``resource.RLIM_INFINITY`` = no limit)."""
    soft, _ = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)
    return soft


async def ensure_memlock(
    qemu: Monitor, *, raise_it: bool = True, memory: MemorySize | None = None
) -> int:
    """Make sure QEMU may lock its RAM plus :data:`MEMLOCK_MARGIN`; return the limit.

    Raises the limit of QEMU's process (as ``prlimit`` does) when
    ``raise_it`` and kvmvfio may; otherwise :class:`MemlockTooLow`, which
    says exactly what to change. ``memory``: QEMU's answer to
    ``query-memory-size-summary``, when the caller has it.
    """
    if memory is None:
        memory = await qemu.memory_size()
    needed = memory.total + MEMLOCK_MARGIN
    soft, hard = resource.prlimit(qemu.pid, resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if not raise_it:
        raise MemlockTooLow(qemu.pid, soft, needed, "kvmvfio was told not to raise it")
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    try:
        resource.prlimit(qemu.pid, resource.RLIMIT_MEMLOCK, (needed, new_hard))
    except OSError as err:
        raise MemlockTooLow(
            qemu.pid, soft, needed, f"kvmvfio could not raise it ({err.strerror})"
        ) from err
    log.info("raised RLIMIT_MEMLOCK of QEMU pid %d from %d to %d", qemu.pid, soft, needed)
    return needed


def _setfacl(args: list[str], node: Path) -> None:
    tool = shutil.which("setfacl")
    if tool is None:
        raise KernelUnsupported(
            "POSIX ACLs on the VFIO group node", "setfacl is missing: apt-get install acl"
        )
    done = subprocess.run([tool, *args, str(node)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KernelError(errno.EPERM, "setfacl", str(node), None, done.stderr.strip())


def grant(node: Path, uid: int) -> bool:
    """Let ``uid`` open ``node`` (an ACL entry); False when nothing was needed (root)."""
    if uid == 0:
        return False
    _setfacl(["-m", f"u:{uid}:rw"], node)
    log.info("granted uid %d access to %s", uid, node)
    return True


def revoke(node: Path, uid: int) -> None:
    """Take back what :func:`grant` gave (no-op for root, or if the node is gone)."""
    if uid == 0 or not node.exists():
        return
    _setfacl(["-x", f"u:{uid}"], node)
    log.info("revoked uid %d's access to %s", uid, node)


# -- attach ------------------------------------------------------------------------------


async def _ensure_iommufd_object(
    qemu: Monitor,
    devfs: Path,
    *,
    accounting: RlimitMode | None = RlimitMode.PROCESS,
    objects: Sequence[QomProperty] | None = None,
) -> bool:
    """Create the VM's iommufd object from our /dev/iommu fd; False if it existed.

    The fd charges what QEMU pins to QEMU's process, not to its user
    (``accounting``, set before QEMU sees the fd; ``None`` leaves the
    kernel's per-user default, for the lab's record of what that does).
    ``objects``: QEMU's ``qom-list /objects``, when the caller has it.
    """
    if objects is None:
        objects = await qemu.qom_list("/objects")
    if IOMMUFD_OBJECT in {o.name for o in objects}:
        return False
    name = f"{IOMMUFD_OBJECT}-fd"
    fd = open_for_vmm(devfs, f"QEMU pid {qemu.pid}", accounting=accounting)
    try:
        await qemu.send_fd(fd, name)
    finally:
        fd.close()  # QEMU has its own copy now, or nothing
    try:
        await qemu.perform("object-add", {"qom-type": "iommufd", "id": IOMMUFD_OBJECT, "fd": name})
    except QemuRefused:
        await qemu.close_fd(name)
        raise
    log.info("created iommufd object %s in QEMU pid %d", IOMMUFD_OBJECT, qemu.pid)
    return True


def rom_options(
    plan: Plan,
    romfiles: Mapping[str, str | os.PathLike[str]] | None,
    no_rombar: Collection[str] | None,
    host: Host,
) -> dict[str, JsonObject]:
    """vfio-pci's ROM properties per device address: ``romfile`` (checked) and ``rombar``.

    ``no_rombar`` names devices QEMU shows without a ROM BAR (``rombar=0``:
    the guest's firmware runs no ROM of theirs; the usual cure for a
    secondary GPU whose ROM hangs the guest's boot). Raises what
    :func:`checked_romfiles` raises, and :class:`UsageError` for a device
    that is given both or is not in ``plan``.
    """
    out: dict[str, JsonObject] = {
        addr: {"romfile": path}
        for addr, path in checked_romfiles(plan, romfiles or {}, host).items()
    }
    planned = {dev.address for dev in plan.devices}
    for addr in no_rombar or ():
        address = canonical_name(str(addr))
        if address not in planned:
            raise UsageError(f"no ROM BAR asked for {address}, which is not one of the devices")
        if address in out:
            raise UsageError(f"{address} is given a ROM file and no ROM BAR: choose one")
        out[address] = {"rombar": 0}
    return out


def checked_romfiles(
    plan: Plan, romfiles: Mapping[str, str | os.PathLike[str]], host: Host
) -> dict[str, str]:
    """Each ROM file checked against its device (:func:`~kvmvfio.host.rom.check_romfile`),
    by the device's address, as absolute paths (QEMU would otherwise also look for a
    relative name in its data folders). Raises :class:`UsageError` for a file given for a
    device that is not in ``plan``, and what ``check_romfile`` raises."""
    planned = {dev.address: dev for dev in plan.devices}
    out: dict[str, str] = {}
    for addr, path in romfiles.items():
        address = canonical_name(str(addr))
        if address not in planned:
            raise UsageError(f"a ROM file for {address}, which is not one of the devices")
        if planned[address].mdev:
            raise UsageError(f"a ROM file for {address}, a mediated device: it has no option ROM")
        check_romfile(os.fspath(path), host.device(address))
        out[address] = os.path.realpath(path)
    return out


async def _attach_fd(
    qemu: Monitor, plan: Plan, dev: DevicePlan, bus: str | None, rom: JsonObject | None = None
) -> None:
    name = qdev_id(dev.address).replace("kvmvfio-", "kvmvfio-fd-", 1)
    fd = open_node(
        dev.file, f"device {dev.address} ({dev.cdev})", related=[plan.group(dev.group).node]
    )
    try:
        await qemu.send_fd(fd, name)
    finally:
        fd.close()  # QEMU has its own copy now, or nothing
    args: JsonObject = {
        "driver": "vfio-pci",
        "id": qdev_id(dev.address),
        "iommufd": IOMMUFD_OBJECT,
        "fd": name,
    }
    args.update(rom or {})  # a romfile QEMU reads itself, as its own user
    if dev.sysfsdev is not None:
        # QEMU tells an mdev by its sysfs folder's bus, and attaches one to the IOAS
        # itself (no hardware page table): by fd alone it would take it for a PCI
        # function. The folder is world-readable; QEMU opens nothing there.
        args["sysfsdev"] = dev.sysfsdev
    if bus is not None:
        args["bus"] = bus
    try:
        await qemu.perform("device_add", args)
    except QemuRefused:
        await qemu.close_fd(name)  # QEMU consumes it on failure; in case it did not
        raise


async def _attach_legacy(
    qemu: Monitor, plan: Plan, dev: DevicePlan, bus: str | None, rom: JsonObject | None = None
) -> None:
    node = dev.file  # the group node: QEMU opens it itself
    container = plan.devfs / "vfio" / "vfio"
    if container.exists() and os.stat(container).st_mode & 0o006 != 0o006:
        grant(container, qemu.uid)  # it grants no device by itself; left in place
    granted = grant(node, qemu.uid)
    args: JsonObject = {"driver": "vfio-pci", "id": qdev_id(dev.address)}
    if dev.sysfsdev is not None:
        args["sysfsdev"] = dev.sysfsdev  # an mdev: QEMU finds its group from there
    else:
        args["host"] = dev.address
    token = plan.token_for(dev.address)
    if token is not None:
        args["vf-token"] = str(token)  # QEMU opens the VF itself, with the token
    args.update(rom or {})
    if bus is not None:
        args["bus"] = bus
    try:
        await qemu.perform("device_add", args)
    except BaseException:
        if granted:
            revoke(node, qemu.uid)
        raise


async def plan_attach(
    qemu: Monitor,
    addresses: Sequence[str | PciAddress],
    *,
    path: VfioPath | str = VfioPath.AUTO,
    coherency: Coherency | str = Coherency.WARN,
    allow_noiommu: bool = False,
    vf_token: uuid.UUID | str | None = None,
    host: Host | None = None,
    present: Mapping[str, str] | None = None,
    qemu_iommufd: bool | None = None,
) -> Plan:
    """The plan for attaching ``addresses`` to the QEMU behind ``qemu``; nothing is sent.

    Asks QEMU whether it has the ``iommufd`` object (the cdev path by fd;
    ``qemu_iommufd``: :func:`qemu_has_iommufd`, when the caller has it) and
    which backend its vfio-pci devices use (``present``:
    :func:`vfio_devices`, when the caller has it), then
    :func:`~kvmvfio.vfio.plan.make_plan` for a running QEMU. Raises what
    that raises.
    """
    in_qemu = await qemu_has_iommufd(qemu) if qemu_iommufd is None else qemu_iommufd
    backend = await vfio_backend(qemu, present)
    if backend is not None and VfioPath(path) is VfioPath.AUTO:
        path = backend  # one VM, one VFIO backend (see refuse_mixed_backends)
    return make_plan(
        addresses,
        path=path,
        coherency=coherency,
        allow_noiommu=allow_noiommu,
        opener=Opener.QEMU,
        qemu_iommufd=in_qemu,
        vf_token=vf_token,
        host=host,
    )


async def attach(
    qemu: Monitor,
    addresses: Sequence[str | PciAddress] | Plan,
    *,
    path: VfioPath | str = VfioPath.AUTO,
    coherency: Coherency | str = Coherency.WARN,
    buses: Sequence[str] | None = None,
    allow_noiommu: bool = False,
    raise_memlock: bool = True,
    vf_token: uuid.UUID | str | None = None,
    host: Host | None = None,
    romfiles: Mapping[str, str | os.PathLike[str]] | None = None,
    no_rombar: Collection[str] | None = None,
) -> list[Attachment]:
    """Attach the devices at ``addresses`` (or of a plan) to the QEMU behind ``qemu``.

    Plans first (:func:`plan_attach`, unless given a plan it made), hands
    over after: each device must be on vfio-pci in a viable group, the
    coherency policy holds, QEMU's memlock limit covers its RAM (raised if
    kvmvfio may), and a free hotpluggable port waits for each device (or
    ``buses`` names them). Then the devices go over one by one; on a
    failure the ones already attached stay attached (they are listed in the
    log) and the error propagates. Raises the errors of
    :func:`~kvmvfio.vfio.plan.make_plan`, :class:`MemlockTooLow`,
    :class:`NoHotplugPort`,
    :class:`~kvmvfio.vfio.iommufd.RlimitModeRefused` (kvmvfio lacks
    ``CAP_SYS_RESOURCE`` to make the new iommufd count per process),
    :class:`~kvmvfio.errors.QemuRefused` (QEMU's own words) and
    :class:`~kvmvfio.errors.QemuGone`.

    ``romfiles`` gives a device (by address) an option ROM file instead of
    its own, checked before anything is sent (:func:`checked_romfiles`;
    :class:`~kvmvfio.host.rom.InvalidRom` for a file that is not one for
    its device) and passed as QEMU's ``romfile=``: QEMU opens it itself,
    so its user must be able to read it. ``no_rombar`` names devices QEMU
    shows without a ROM BAR (:func:`rom_options`).
    """
    # What attach asks QEMU before it changes anything, asked at once: one round
    # trip's wait instead of one per question (issue 19). QEMU answers in the order
    # sent, and the first failure in that order is the one raised. One listing of
    # QEMU's devices (and of its vfio-pci devices' backends) serves the plan, the
    # mixed-backend check and the free ports.
    given = addresses.made_for(Opener.QEMU, "plan_attach") if isinstance(addresses, Plan) else None
    async with qemu.together() as ask:
        lists = [ask(qemu.qom_list(c)) for c in _PERIPHERALS]
        in_qemu = ask(qemu_has_iommufd(qemu)) if given is None else None
        memory = ask(qemu.memory_size())
        legacy = VfioPath(given.path if given else path) is VfioPath.GROUP
        objects = None if legacy else ask(qemu.qom_list("/objects"))
    listing = _peripherals(lists)
    present = await vfio_devices(qemu, listing)
    if isinstance(addresses, Plan):
        plan = addresses  # checked above: made for QEMU
    else:
        assert in_qemu is not None  # asked above, with no plan given
        plan = await plan_attach(
            qemu,
            addresses,
            path=path,
            coherency=coherency,
            allow_noiommu=allow_noiommu,
            vf_token=vf_token,
            host=host,
            present=present,
            qemu_iommufd=in_qemu.result(),
        )
    addrs = list(plan.addresses)
    if buses is not None and len(buses) != len(addrs):
        raise UsageError(f"{len(addrs)} devices but {len(buses)} buses")
    roms = rom_options(plan, romfiles, no_rombar, host or Host())
    log.info(
        "attaching %s to QEMU pid %d by %s (%s)", ", ".join(addrs), qemu.pid, plan.path, plan.why
    )
    await refuse_mixed_backends(qemu, plan.path, present=present)
    if buses is None:
        free, taken = await free_ports(qemu, listing)
        if len(free) < len(addrs):
            raise NoHotplugPort(addrs[len(free)], taken)
        chosen_buses: list[str | None] = list(free[: len(addrs)])
    else:
        chosen_buses = list(buses)
    refuse_confined(qemu, plan)
    # The first change to QEMU's state comes after every read-only check.
    await ensure_memlock(qemu, raise_it=raise_memlock, memory=memory.result())
    created_object = False
    if plan.path is VfioPath.CDEV:
        created_object = await _ensure_iommufd_object(
            qemu, plan.devfs, objects=objects.result() if objects is not None else None
        )
    done: list[Attachment] = []
    try:
        for dev, bus in zip(plan.devices, chosen_buses, strict=True):
            if plan.path is VfioPath.CDEV:
                await _attach_fd(qemu, plan, dev, bus, roms.get(dev.address))
            else:
                await _attach_legacy(qemu, plan, dev, bus, roms.get(dev.address))
            done.append(
                Attachment(
                    address=dev.address,
                    qdev_id=qdev_id(dev.address),
                    bus=bus,
                    path=plan.path,
                    group=dev.group,
                    coherent=dev.coherent,
                    unsafe=dev.notes,
                )
            )
            log.info(
                "attached %s to QEMU pid %d as %s on %s",
                dev.address,
                qemu.pid,
                qdev_id(dev.address),
                bus,
            )
    except BaseException:
        if done:
            log.warning("attached before the failure: %s", ", ".join(a.address for a in done))
        elif created_object and qemu.alive():
            await _drop_object(qemu)
        raise
    return done


def refuse_confined(qemu: Monitor, plan: Plan) -> None:
    """Raise :class:`QemuConfined` when QEMU's AppArmor profile would refuse what ``plan`` needs.

    On the group path QEMU opens the group node (and the container) itself,
    by path: its profile must allow them. On the cdev path kvmvfio passes
    the files; the kernel checks a received file against the receiver's
    profile only when the sender was confined (:mod:`kvmvfio.host.confinement`),
    so the check runs only for a confined kvmvfio. A policy that cannot be
    asked is logged and the handoff goes on: QEMU's own error then tells.
    """
    try:
        if plan.path is VfioPath.CDEV:
            own = confinement("self")
            if own is None or not own.confined:
                return  # files an unconfined process opened pass to any profile
        for dev in plan.devices:
            if plan.path is VfioPath.CDEV:
                paths, how = [str(dev.file), str(plan.devfs / "iommu")], "passing the files of"
            else:
                paths = [str(dev.file), str(plan.devfs / "vfio" / "vfio")]
                how = "opening the group node of"
            found = refused_paths(qemu.pid, paths)
            if found is not None:
                conf, refused = found
                raise QemuConfined(dev.address, qemu.pid, conf.label, refused, how)
    except PolicyUnreadable as err:
        log.warning("cannot ask AppArmor what QEMU pid %d may open: %s", qemu.pid, err)


async def _drop_object(qemu: Monitor) -> None:
    try:
        await qemu.perform("object-del", {"id": IOMMUFD_OBJECT})
    except QemuError as err:  # in use, or QEMU gone: nothing more to do here
        log.info("kept iommufd object %s: %s", IOMMUFD_OBJECT, err)


# -- detach ------------------------------------------------------------------------------


async def vfio_devices(qemu: Monitor, listing: Peripherals | None = None) -> dict[str, str]:
    """Every vfio-pci device in QEMU, kvmvfio's or not: QOM path -> its iommufd link.

    The link is "" for a device on the legacy container (group path).
    """
    async with qemu.together() as ask:
        links = {
            f"{c}/{item.name}": ask(qemu.qom_link(f"{c}/{item.name}", "iommufd"))
            for c, item in (listing if listing is not None else await peripherals(qemu))
            if item.child_type == "vfio-pci"
        }
    return {where: link.result() for where, link in links.items()}


async def vfio_backend(qemu: Monitor, present: Mapping[str, str] | None = None) -> VfioPath | None:
    """The path QEMU's vfio-pci devices are on (``group`` or ``cdev``); None without any.

    ``present``: :func:`vfio_devices`, when the caller has it already.
    """
    links = set((present if present is not None else await vfio_devices(qemu)).values())
    if not links:
        return None
    return VfioPath.GROUP if links == {""} else VfioPath.CDEV


async def refuse_mixed_backends(
    qemu: Monitor,
    path: VfioPath,
    listing: Peripherals | None = None,
    present: Mapping[str, str] | None = None,
) -> None:
    """Refuse to add a device on the other VFIO backend than QEMU's devices use.

    QEMU 10.0 aborts when one VM's address space gets both: a legacy-container
    device added after an iommufd one (or the other way round) fails QOM's
    cast to ``vfio-iommu-legacy`` and the whole VM dies (seen in the lab with
    QEMU 10.0.13). Raises :class:`MixedVfioBackends` naming the devices there.
    """
    if present is None:
        present = await vfio_devices(qemu, listing)
    wanted_legacy = path is not VfioPath.CDEV
    other = [where for where, link in present.items() if (link == "") != wanted_legacy]
    if other:
        there = VfioPath.GROUP if not wanted_legacy else VfioPath.CDEV
        raise MixedVfioBackends(qemu.pid, path.value, there.value, other)


async def kvmvfio_devices(qemu: Monitor) -> dict[str, str]:
    """kvmvfio's vfio-pci devices in QEMU: qdev id -> their iommufd link ("" = legacy)."""
    found = {}
    for item in await qemu.qom_list(_PERIPHERALS[0]):
        if item.name.startswith("kvmvfio-") and item.child_type == "vfio-pci":
            found[item.name] = await qemu.qom_link(f"{_PERIPHERALS[0]}/{item.name}", "iommufd")
    return found


async def detach(
    qemu: Monitor,
    addresses: Sequence[str | PciAddress],
    *,
    timeout: float = 30.0,
    host: Host | None = None,
    drop_iommufd: bool = False,
) -> list[str]:
    """Detach devices kvmvfio attached: ``device_del``, wait for ``DEVICE_DELETED``.

    Then revoke the legacy path's access grant. The VM's iommufd object
    stays for the next attach (as libvirt keeps one per domain): QEMU never
    closes an iommufd it was given by fd, so each delete-and-recreate left
    one more open file in QEMU (kvmvfio's soak test). ``drop_iommufd``
    removes it once no kvmvfio device uses it. Returns the QEMU ids detached.
    Raises :class:`NotAttached` for a device kvmvfio did not attach there,
    and :class:`DetachTimeout` when the guest does not let go in time (the
    device stays attached as QEMU has it).
    """
    timeout = seconds(timeout, "the detach timeout")
    host = host or Host()
    addrs = [canonical_name(str(a)) for a in addresses]
    present = await kvmvfio_devices(qemu)
    missing = [a for a in addrs if qdev_id(a) not in present]
    if missing:
        # Perhaps an earlier detach timed out and the guest let go since:
        # finish that one's cleanup before saying so.
        for addr in missing:
            with contextlib.suppress(KvmvfioError):
                revoke(_group_node(host, addr), qemu.uid)
        if drop_iommufd:
            await _drop_unused_object(qemu)
        raise NotAttached(missing[0], qdev_id(missing[0]))
    gone = []
    for addr in addrs:
        ident = qdev_id(addr)
        nodes = _device_nodes(host, addr)
        await _device_del(qemu, addr, ident, timeout)
        await _until_closed(qemu, addr, nodes)
        gone.append(ident)
        if not present[ident]:  # legacy: QEMU opened the group node through our grant
            revoke(_group_node(host, addr), qemu.uid)
        log.info("detached %s (%s) from QEMU pid %d", addr, ident, qemu.pid)
    if drop_iommufd:
        await _drop_unused_object(qemu)
    return gone


def _group_node(host: Host, name: str) -> Path:
    """The group node of a PCI function or an mdev (by UUID)."""
    if is_uuid(name):
        node = mdev_of(name, host.sysfs).group_node(host.devfs)
        if node is None:
            raise NotAttached(name, qdev_id(name))
        return node
    return host.group_of(name).dev_node(host.devfs)


def _device_nodes(host: Host, addr: str) -> set[str]:
    """The VFIO files of ``addr`` QEMU may hold: its group node and its cdev."""
    nodes: set[str] = set()
    with contextlib.suppress(KvmvfioError):
        nodes.add(str(_group_node(host, addr)))
        target = mdev_of(addr, host.sysfs) if is_uuid(addr) else host.device(addr)
        cdev = target.cdev_node(host.devfs)
        if cdev is not None:
            nodes.add(str(cdev))
    return nodes


async def _until_closed(qemu: Monitor, addr: str, nodes: set[str], limit: float = 10.0) -> None:
    """Wait until QEMU has closed the device's files.

    QEMU reports a device deleted (QOM, ``DEVICE_DELETED``) before it
    finalizes it and closes its VFIO fd; in the lab, a libvirt-run QEMU
    still held the cdev just after. Until it closes, the device is not free:
    releasing it would be refused as busy.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while nodes and holders(*nodes, pids=[qemu.pid]):
        if loop.time() > deadline:
            log.warning("QEMU pid %d still holds %s %g s after deleting it", qemu.pid, addr, limit)
            return
        await asyncio.sleep(0.05)


async def _drop_unused_object(qemu: Monitor) -> None:
    """Remove the iommufd object once no kvmvfio device uses it.

    QEMU never closes an iommufd it was given by ``fd=`` (such a backend is
    not "owned", backends/iommufd.c), so the emptied /dev/iommu file stays
    open in QEMU until it exits; it holds no device.
    """
    remaining = await kvmvfio_devices(qemu)
    if any(remaining.values()):
        return
    objects = {o.name for o in await qemu.qom_list("/objects")}
    if IOMMUFD_OBJECT in objects:
        await _drop_object(qemu)


async def _device_del(qemu: Monitor, addr: str, ident: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with qemu.watch_deleted(ident) as deleted:
        while True:
            try:
                await qemu.perform("device_del", {"id": ident})
                break
            except QemuRefused as err:
                # QEMU refuses while the guest still handles a previous hotplug
                # event of that slot (a just-plugged device): ask again shortly.
                if "guest is busy" not in err.desc or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)
        try:
            await asyncio.wait_for(deleted(), max(deadline - loop.time(), 0.1))
        except TimeoutError:
            raise DetachTimeout(addr, ident, timeout) from None


__all__ = [
    "HOTPLUG_PORTS",
    "IOMMUFD_OBJECT",
    "Attachment",
    "HandoffPath",
    "attach",
    "choose_path",
    "detach",
    "ensure_memlock",
    "free_ports",
    "grant",
    "memlock_limit",
    "plan_attach",
    "qdev_id",
    "qemu_has_iommufd",
    "revoke",
]
