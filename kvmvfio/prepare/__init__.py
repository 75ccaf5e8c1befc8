"""Preparing host devices for VFIO, and giving them back, without ever losing one.

:func:`prepare` moves devices, and every other member of their IOMMU groups
that is not a bridge and not on a VFIO-safe driver, to vfio-pci through
``driver_override``; :func:`release` puts each back exactly as it was
(original driver or none, original ``driver_override``); :func:`recover`
does that for everything a crashed kvmvfio left, from the journal
(:mod:`kvmvfio.prepare.journal`). All three are idempotent.

A group is *claimed* by one owner (a VM name or a token) from prepare to
release: the journal record names it, and a lock file per group
(``flock``) makes check-and-claim atomic across processes, so two
preparers racing for a group get one winner and one error naming it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmvfio.errors import Busy, KvmvfioError, UsageError
from kvmvfio.host import (
    Host,
    IommuGroup,
    PciAddress,
    PciDevice,
    driver_managed_dma,
    is_vfio_driver,
)
from kvmvfio.host.procs import ProcessId, holders, unnamed_vfio_user
from kvmvfio.host.reset import answers
from kvmvfio.prepare import safety
from kvmvfio.prepare.driver import Sysfs
from kvmvfio.prepare.errors import ClaimedBy, DeviceNotAnswering, JournalError, UntrustedFile
from kvmvfio.prepare.journal import (
    DEFAULT_ROOT,
    Entry,
    Journal,
    Record,
    check_on_host,
    owner_problem,
)
from kvmvfio.prepare.members import UnlistedMembers, refuse_unlisted
from kvmvfio.prepare.owners import Liveness, OwnerWatch
from kvmvfio.prepare.rundir import RunFolder

log = logging.getLogger(__name__)

VFIO = "vfio-pci"

__all__ = [
    "ClaimedBy",
    "GroupStatus",
    "JournalError",
    "OwnerWatch",
    "Prepared",
    "Recovery",
    "Restored",
    "UnlistedMembers",
    "UntrustedFile",
    "groups_of",
    "needs_moving",
    "prepare",
    "recover",
    "release",
    "release_owner",
    "set_change_hook",
    "status",
]


@dataclass(frozen=True)
class Prepared:
    """One group after :func:`prepare`: who owns it, and what moved."""

    group: int
    owner: str
    moved: tuple[Entry, ...]
    members: tuple[str, ...]
    accepted: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restored:
    """One device put back by :func:`release` or :func:`recover`."""

    address: str
    driver: str | None
    override: str | None
    reset: bool = False


@dataclass(frozen=True)
class GroupStatus:
    """A journal record as :func:`status` reports it, with its owner's liveness.

    ``alive`` says whether the owner is still there (see
    :mod:`kvmvfio.prepare.owners`) and ``why`` the fact that decided it;
    ``holders`` are the processes that hold the group's VFIO files open.
    ``invalid`` is empty for a record kvmvfio acts on; otherwise it says why
    the record is refused (:class:`~kvmvfio.prepare.journal.JournalError`,
    :class:`~kvmvfio.prepare.rundir.UntrustedFile`), and only ``group`` is
    known.
    """

    group: int
    owner: str
    pid: int
    alive: bool
    devices: tuple[Entry, ...] = field(default=())
    why: str = ""
    pid_start: int | None = None
    holders: tuple[str, ...] = ()
    invalid: str = ""


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did: groups restored, live claims left alone, failures."""

    restored: tuple[Restored, ...] = ()
    skipped: tuple[GroupStatus, ...] = ()
    failed: tuple[tuple[int, str], ...] = ()


def _group_lock(
    root: str | Path, group: int, uid: int | None
) -> contextlib.AbstractContextManager[None]:
    """Hold the group's claim lock (``locks/group-N.lock``, opened without trust)."""
    return RunFolder(root, "locks", uid).locked(f"group-{group}.lock")


def _read_checked(host: Host, journal: Journal, group: int) -> Record | None:
    """The group's record, parsed and checked against the live host; None when there is none.

    Every record kvmvfio acts on comes through here. Raise
    :class:`JournalError` for a record that is invalid or does not fit the
    host, :class:`UntrustedFile` for a file kvmvfio did not make.
    """
    record = journal.read(group)
    if record is not None:
        check_on_host(host, record, journal.path(group))
    return record


def needs_moving(member: PciDevice) -> bool:
    """Whether :func:`prepare` moves this group member to vfio-pci."""
    if member.is_bridge:
        return False  # bridges and ports stay on pcieport (or no driver)
    return member.driver is None or not driver_managed_dma(member.driver)


_changes_made = 0
#: Called after each host change with its ordinal in this process; None in use.
_change_hook: Callable[[int], None] | None = None


def set_change_hook(hook: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """Install ``hook`` to run after each host change (with its ordinal); return the old one.

    A test seam, like :func:`kvmvfio.uapi.set_backend`: the lab's crash tests
    kill their own process at change N to show that the journal covers every
    step. Product code never sets it.
    """
    global _change_hook
    old, _change_hook = _change_hook, hook
    return old


def _after_change() -> None:
    global _changes_made  # noqa: PLW0603 (one counter per process, across groups)
    _changes_made += 1
    if _change_hook is not None:
        _change_hook(_changes_made)


class _Changes:
    """Host changes of one group, each journaled (fsync) before it is made."""

    def __init__(self, journal: Journal, record: Record) -> None:
        self.journal = journal
        self.record = record

    def do(self, change: Callable[[], None]) -> None:
        self.record.steps += 1
        self.journal.write(self.record)
        change()
        _after_change()


def groups_of(host: Host, addresses: Sequence[str]) -> dict[int, IommuGroup]:
    """The IOMMU groups of ``addresses``, by number (each once)."""
    groups: dict[int, IommuGroup] = {}
    for addr in addresses:
        group = host.group_of(addr)
        groups.setdefault(group.number, group)
    return groups


def prepare(
    addresses: Sequence[str | PciAddress],
    owner: str,
    *,
    owner_pid: int | None = None,
    force: Collection[str] = (),
    accept: Mapping[str, Collection[str]] | None = None,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    watch: OwnerWatch | None = None,
    uid: int | None = None,
    listed: Collection[str] = (),
    reset: Collection[str] = (),
) -> list[Prepared]:
    """Move the devices and the rest of their groups to vfio-pci, for ``owner``.

    Idempotent for the same owner. ``owner_pid`` is the owner's process,
    recorded with its start time so that :func:`recover` knows when the
    owner is gone. Raises :class:`ClaimedBy` when another owner has a
    group, :class:`~kvmvfio.prepare.safety.UnsafeToUnbind` for a device
    the host still uses (unless ``force`` accepts it for every device, or
    ``accept`` for that device: address -> names of findings), the host
    model's errors, and :class:`~kvmvfio.errors.KernelError` when sysfs
    refuses a change; whatever was changed by then is in the journal, and
    :func:`release` or :func:`recover` puts it back. A journal record of a
    group that is invalid raises :class:`JournalError`; ``uid`` is the owner
    kvmvfio's files under ``root`` must have (default: the effective uid).
    ``reset`` names the devices to reset when they leave vfio-pci: the wish
    is journaled, and every release of the group (this owner's, the
    agent's, ``recover``'s after a crash) honours it.
    """
    if not isinstance(owner, str) or owner_problem(owner) is not None:
        raise UsageError(f"owner {owner!r} must be a short name without spaces (a VM name)")
    per_device = {str(PciAddress.coerce(a)): names for a, names in (accept or {}).items()}
    every = [*force, *(n for names in per_device.values() for n in names)]
    unknown = {name for name in every if safety.canonical(name) not in safety.CHECKS}
    if unknown:
        raise UsageError(f"unknown --force {', '.join(sorted(unknown))}; one of {safety.CHECKS}")
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    process = watch.owner_process(owner_pid)
    sysfs = Sysfs(host.sysfs)
    journal = Journal(root, uid)
    addrs = [str(PciAddress.coerce(a)) for a in addresses]
    groups = groups_of(host, addrs)
    named = {*addrs, *(str(PciAddress.coerce(a)) for a in listed)}
    resets = {str(PciAddress.coerce(a)) for a in reset}
    for group in groups.values():
        refuse_unlisted(group, named)
    done = []
    for number, group in groups.items():
        with _group_lock(root, number, uid):
            done.append(
                _prepare_group(
                    host,
                    sysfs,
                    journal,
                    group,
                    owner,
                    process=process,
                    watch=watch,
                    force=force,
                    accept=per_device,
                    reset=resets,
                )
            )
    return done


def _prepare_group(
    host: Host,
    sysfs: Sysfs,
    journal: Journal,
    group: IommuGroup,
    owner: str,
    *,
    process: ProcessId | None,
    watch: OwnerWatch,
    force: Collection[str],
    accept: Mapping[str, Collection[str]],
    reset: Collection[str],
) -> Prepared:
    number = group.number
    record = _read_checked(host, journal, number)
    if record is not None and record.owner != owner:
        raise _claimed(host, record, watch)
    if record is None:
        record = Record(
            number,
            owner,
            process.pid if process else 0,
            pid_start=process.start if process else None,
        )
    movers = [m for m in group.members if needs_moving(m)]
    _refuse_pfs_with_vfs(host, movers, root=journal.folder.root, uid=journal.folder.uid)
    _refuse_vfs_of_claimed_pfs(host, group.members, owner, journal)
    accepted: list[str] = []
    for m in movers:
        if m.driver is not None:
            mine = [*force, *accept.get(str(m.address), ())]
            accepted += safety.check(m, host.sysfs, force=mine, proc=host.procfs, devfs=host.devfs)
    for note in accepted:
        log.warning("group %d (owner %s): %s", number, owner, note)
    known = {e.address for e in record.devices}
    for m in movers:
        if str(m.address) not in known:
            state = sysfs.state(str(m.address))
            record.devices.append(Entry(str(m.address), state.driver, state.override))
    for entry in record.devices:
        if entry.address in reset:
            entry.reset = True  # a wish once made holds until the group is released
    changes = _Changes(journal, record)
    journal.write(record)  # the claim, and the originals, before any change
    for m in movers:
        addr = str(m.address)
        if sysfs.state(addr).override != VFIO:
            changes.do(functools.partial(sysfs.set_override, addr, VFIO))
        if sysfs.state(addr).driver is not None:
            changes.do(functools.partial(sysfs.unbind, addr))
        changes.do(functools.partial(sysfs.probe, addr))
        if not sysfs.wait_for(addr, VFIO):
            raise KvmvfioError(
                f"PCI device {addr} did not bind to vfio-pci (is vfio-pci loaded?); "
                f"`kvmvfio release {addr}` puts it back"
            )
        log.info("%s: %s -> vfio-pci (group %d, owner %s)", addr, m.driver, number, owner)
    return Prepared(
        group=number,
        owner=owner,
        moved=tuple(record.devices),
        members=tuple(str(m.address) for m in group.members),
        accepted=tuple(accepted),
    )


def _refuse_pfs_with_vfs(
    host: Host, movers: Sequence[PciDevice], *, root: str | Path, uid: int | None
) -> None:
    """A PF with VFs stays on its driver: unbinding it turns SR-IOV off and removes them."""
    from kvmvfio.prepare import sriov  # noqa: PLC0415 (it imports this package)

    for m in movers:
        if m.driver is None or not m.sriov_numvfs:
            continue
        uses = sriov.vf_uses(host, m, root=root, uid=uid)
        if uses:
            raise sriov.VfsInUse(str(m.address), uses)
        raise sriov.PfHasVfs(str(m.address), m.driver, m.sriov_numvfs)


def _refuse_vfs_of_claimed_pfs(
    host: Host, members: Sequence[PciDevice], owner: str, journal: Journal
) -> None:
    """A VF whose PF another owner holds is that owner's to give (the VF token is its secret)."""
    from kvmvfio.prepare import sriov  # noqa: PLC0415 (it imports this package)

    vfs = [m for m in members if m.physfn is not None]
    if not vfs:
        return
    claims = {e.address: r.owner for r in journal.records() for e in r.devices}
    for vf in vfs:
        holder = claims.get(str(vf.physfn))
        if holder is not None and holder != owner:
            raise sriov.PfInUse(str(vf.address), str(vf.physfn), holder)


def _vfio_holders(
    host: Host, group: int, entries: Sequence[Entry], proc: str | Path = "/proc"
) -> list[str]:
    """Who has the group or a member open: by the nodes under /dev, else by the kernel's count."""
    nodes = [host.devfs / "vfio" / str(group)]
    for e in entries:
        dev = host.sysfs / "bus" / "pci" / "devices" / e.address / "vfio-dev"
        if dev.is_dir():
            nodes += [host.devfs / "vfio" / "devices" / n for n in os.listdir(dev)]
    found = holders(*nodes, proc=proc)
    if found:
        return found
    sysfs = Sysfs(host.sysfs)
    for e in entries:
        with contextlib.suppress(KvmvfioError):  # a device gone is _refuse_dead's to say
            if is_vfio_driver(sysfs.driver(e.address)):
                who = unnamed_vfio_user(host.sysfs, e.address, proc)
                if who is not None:
                    found.append(who)
    return found


def _restore(sysfs: Sysfs, entry: Entry, reset: bool) -> Restored:
    addr = entry.address
    did_reset = False
    current = sysfs.state(addr)
    if reset and current.driver == VFIO:
        try:
            sysfs.reset(addr)
            did_reset = True
        except KvmvfioError as err:
            log.warning("%s: reset failed: %s", addr, err)
    if current.driver is not None and current.driver != entry.driver:
        sysfs.unbind(addr)
    sysfs.set_override(addr, entry.override)
    if entry.driver is not None and sysfs.state(addr).driver != entry.driver:
        sysfs.probe(addr)
        if not sysfs.wait_for(addr, entry.driver, timeout=5):
            if sysfs.state(addr).driver is not None:
                sysfs.unbind(addr)
            sysfs.bind(addr, entry.driver)
    log.info("%s: back on %s", addr, entry.driver or "no driver")
    return Restored(addr, entry.driver, entry.override, did_reset)


def _refuse_dead(host: Host, record: Record) -> None:
    """Raise :class:`DeviceNotAnswering` for the first member that reads as gone.

    Asked of every member before any is moved, so the group is either given
    back whole or left as it is: on vfio-pci, which does not touch a device
    nobody opens, with its record kept for a later release.
    """
    for entry in record.devices:
        if entry.driver == VFIO:
            continue  # it stays where it is
        alive = answers(host.sysfs, entry.address)
        if alive.dead:
            raise DeviceNotAnswering(entry.address, entry.driver, record.group, alive.describe())


def _release_record(
    host: Host, journal: Journal, record: Record, reset: bool | Collection[str]
) -> list[Restored]:
    sysfs = Sysfs(host.sysfs)
    busy = _vfio_holders(host, record.group, record.devices, host.procfs)
    if busy:
        # Unbinding vfio-pci from a device that is open blocks until it is closed.
        raise Busy(
            16,
            "release",
            str(host.devfs / "vfio" / str(record.group)),
            f"IOMMU group {record.group}",
            ", ".join(busy),
        )
    _refuse_dead(host, record)
    out = [
        _restore(sysfs, e, e.reset or (reset if isinstance(reset, bool) else e.address in reset))
        for e in reversed(record.devices)
    ]
    journal.remove(record.group)
    return out


def release(
    addresses: Sequence[str | PciAddress],
    owner: str | None = None,
    *,
    reset: bool | Collection[str] = False,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
) -> list[Restored]:
    """Put the groups of ``addresses`` back as they were before :func:`prepare`.

    Idempotent: a group kvmvfio did not prepare is left alone. With
    ``owner``, a group claimed by someone else raises :class:`ClaimedBy`.
    ``reset`` resets each device (the kernel's ``reset``) before it leaves
    vfio-pci; given addresses instead of True, only those. A device whose
    reset was asked at :func:`prepare` is reset whatever ``reset`` says. Raises
    :class:`~kvmvfio.errors.Busy` naming the process that still has a
    device open (unbinding then would hang), and :class:`JournalError` or
    :class:`UntrustedFile` for a group whose record kvmvfio will not act on
    (nothing of that group is changed).
    """
    host = host or Host()
    journal = Journal(root, uid)
    out: list[Restored] = []
    for number in groups_of(host, [str(PciAddress.coerce(a)) for a in addresses]):
        with _group_lock(root, number, uid):
            record = _read_checked(host, journal, number)
            if record is None:
                continue
            if owner is not None and record.owner != owner:
                raise _claimed(host, record, OwnerWatch(proc=host.procfs))
            out += _release_record(host, journal, record, reset)
    return out


def recover(
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    watch: OwnerWatch | None = None,
    uid: int | None = None,
) -> Recovery:
    """Restore what dead owners left in the journal (after a crash); idempotent.

    A claim whose owner is alive (see :mod:`kvmvfio.prepare.owners`) is left
    alone and listed in ``skipped``; a group that cannot be restored, or
    whose record is invalid or untrusted (nothing of it is acted on), is
    listed in ``failed`` with the reason, and the other groups are still
    served. Raises :class:`UntrustedFile` when the journal folder itself
    is not kvmvfio's.
    """
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    journal = Journal(root, uid)
    restored: list[Restored] = []
    skipped: list[GroupStatus] = []
    failed: list[tuple[int, str]] = []
    for number in journal.groups():
        try:
            with _group_lock(root, number, uid):
                record = _read_checked(host, journal, number)
                if record is None:
                    continue
                state = _status_of(host, record, watch)
                if state.alive:
                    log.info("group %d: left to %s: %s", number, record.owner, state.why)
                    skipped.append(state)
                    continue
                restored += _release_record(host, journal, record, False)
        except KvmvfioError as err:
            log.warning("group %d: not restored: %s", number, err)
            failed.append((number, str(err)))
    return Recovery(tuple(restored), tuple(skipped), tuple(failed))


def release_owner(
    owner: str,
    *,
    reset: bool | Collection[str] = False,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
) -> list[Restored]:
    """Release every group the journal says ``owner`` holds.

    Idempotent. Raises :class:`~kvmvfio.errors.Busy` as :func:`release` does.
    A record that cannot be read is logged and left (whose it is cannot be
    told); one of ``owner`` that does not fit the host raises
    :class:`JournalError` once the owner's other groups are released.
    """
    host = host or Host()
    journal = Journal(root, uid)
    out: list[Restored] = []
    refused: list[KvmvfioError] = []
    for number in journal.groups():
        try:
            record = journal.read(number)
        except KvmvfioError as err:
            log.error("group %d: %s", number, err)
            continue
        if record is None or record.owner != owner:
            continue
        with _group_lock(root, number, uid):
            try:
                fresh = _read_checked(host, journal, number)
            except (JournalError, UntrustedFile) as err:
                refused.append(err)
                continue
            if fresh is not None and fresh.owner == owner:
                out += _release_record(host, journal, fresh, reset)
    if refused:
        raise refused[0]
    return out


def status(
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    watch: OwnerWatch | None = None,
    uid: int | None = None,
) -> list[GroupStatus]:
    """The groups kvmvfio holds, their owners, and whether each owner is still there.

    A record kvmvfio will not act on is listed with ``invalid`` saying why.
    Raises :class:`UntrustedFile` when the journal folder is not kvmvfio's.
    """
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    journal = Journal(root, uid)
    out = []
    for number in journal.groups():
        try:
            record = _read_checked(host, journal, number)
        except KvmvfioError as err:
            out.append(GroupStatus(number, "", 0, False, invalid=str(err)))
            continue
        if record is not None:
            out.append(_status_of(host, record, watch))
    return out


def _status_of(host: Host, record: Record, watch: OwnerWatch) -> GroupStatus:
    held = _vfio_holders(host, record.group, record.devices, watch.proc)
    live = watch.liveness(record.owner, record.process, held)
    return GroupStatus(
        record.group,
        record.owner,
        record.pid,
        live.alive,
        tuple(record.devices),
        why=live.why,
        pid_start=record.pid_start,
        holders=tuple(held),
    )


def _claimed(host: Host, record: Record, watch: OwnerWatch) -> ClaimedBy:
    state = _status_of(host, record, watch)
    return ClaimedBy(record.group, record.owner, record.pid, Liveness(state.alive, state.why))
