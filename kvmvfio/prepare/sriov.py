"""SR-IOV virtual functions: made on a physical function and removed, journaled.

The kernel's interface, in the PF's sysfs folder:

``sriov_totalvfs``
    How many VFs the device can have.
``sriov_numvfs``
    How many it has. Writing N makes N VFs; from M > 0 to another N > 0 the
    kernel refuses (EBUSY): the count goes through 0, which removes every VF.
``sriov_drivers_autoprobe``
    1 (the default): each new VF is probed at once, and the PF's VF driver
    (``ixgbevf``, ``iavf``, ``nvme``...) takes it. 0: a VF is probed only
    when its ``driver_override`` names a driver, so VFs meant for VMs come
    up with no driver and nothing of the host has touched them.

:func:`set_vfs` changes the count for an owner, the way
:func:`kvmvfio.prepare.prepare` moves drivers: the PF's record (its count
and autoprobe before, the owner and its process) is written durably under
``/run/kvmvfio/sriov`` *before* each change, so a crash at any step leaves
a record covering it, and :func:`reset_vfs` or :func:`recover_vfs` (run by
``kvmvfio recover``) puts the count back once the owner is gone. The VFs
themselves are handed out like any PCI function: ``kvmvfio prepare``,
sessions, ``attach``, the hook.

The count of a PF whose VFs are in use is never changed: a VF on vfio-pci,
in a group kvmvfio's journal holds for an owner, or open (its VFIO files
held by a process) is named in :class:`VfsInUse`, and nothing is written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmvfio.errors import KernelError, KvmvfioError, SysfsError, UsageError, shown
from kvmvfio.host import Host, PciAddress, PciDevice, is_vfio_driver
from kvmvfio.host.procs import ProcessId, holders, unnamed_vfio_user
from kvmvfio.prepare.driver import Sysfs, canonical_address
from kvmvfio.prepare.errors import JournalError
from kvmvfio.prepare.journal import (
    DEFAULT_ROOT,
    MAX_COUNT,
    MAX_PID,
    Journal,
    _address,
    _count,
    _decode,
    _Invalid,
    _keys,
    _name,
    owner_problem,
)
from kvmvfio.prepare.owners import Liveness, OwnerWatch
from kvmvfio.prepare.rundir import RunFolder

log = logging.getLogger(__name__)

VERSION = 1
#: A PCI function has at most 65535 VFs (the SR-IOV capability's TotalVFs is 16 bits).
MAX_VFS = 0xFFFF
MAX_BYTES = 1 << 16
_FILE_NAME = re.compile(r"pf-([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\.json")
_KEYS = ("version", "pf", "owner", "pid", "pid_start", "before", "autoprobe_before", "count")


class NotSriovCapable(UsageError):
    """The function named as a PF has no SR-IOV capability, or is a VF itself."""

    def __init__(self, address: str, why: str) -> None:
        self.address = address
        self.why = why
        super().__init__(f"PCI device {address} {why}: it cannot have virtual functions")


class VfsInUse(KvmvfioError):
    """The PF's VFs are in use: its count is not changed."""

    def __init__(self, pf: str, uses: list[tuple[str, str]]) -> None:
        self.pf = pf
        self.uses = tuple(uses)
        listed = "; ".join(f"VF {vf} {why}" for vf, why in uses)
        super().__init__(
            f"the VF count of PF {pf} is left as it is: {listed}. Release them first "
            "(`kvmvfio release --owner OWNER VF`, or stop the VM that has them)"
        )


class PfHasVfs(KvmvfioError):
    """A PF with VFs is not moved off its driver: that would remove its VFs."""

    def __init__(self, pf: str, driver: str, count: int) -> None:
        self.pf = pf
        self.driver = driver
        self.count = count
        super().__init__(
            f"PF {pf} ({driver}) has {count} VFs: unbinding {driver} turns SR-IOV off and "
            f"removes them behind the journal's back. Remove them first (`kvmvfio sriov set "
            f"{pf} 0 --owner OWNER`), or hand out the VFs instead of the PF"
        )


class PfClaimed(KvmvfioError):
    """Another owner set the PF's VF count, and is alive."""

    def __init__(self, pf: str, owner: str, why: str) -> None:
        self.pf = pf
        self.owner = owner
        super().__init__(
            f"the VFs of PF {pf} were made for {shown(owner)!r} ({why}); "
            f"`kvmvfio sriov reset {pf} --owner {shown(owner)}` gives them back"
        )


class PfInUse(KvmvfioError):
    """A VF is not handed out while another owner holds its PF."""

    def __init__(self, vf: str, pf: str, owner: str) -> None:
        self.vf = vf
        self.pf = pf
        self.owner = owner
        super().__init__(
            f"VF {vf} is not handed out: its PF {pf} is held by {shown(owner)!r}, whose "
            "user-space driver controls the VFs (and their VF token). Hand the VF out under "
            "that owner, or release the PF first"
        )


@dataclass(frozen=True)
class VfRecord:
    """What kvmvfio changed on one PF, and what it had before."""

    pf: str
    owner: str
    pid: int
    pid_start: int | None
    before: int
    autoprobe_before: bool
    count: int

    @property
    def process(self) -> ProcessId | None:
        return ProcessId(self.pid, self.pid_start) if self.pid > 0 else None


@dataclass(frozen=True)
class VfChange:
    """A PF's VF count before and after a change, and its VFs now."""

    pf: str
    before: int
    after: int
    autoprobe: bool
    vfs: tuple[str, ...]


class VfJournal:
    """The PF records (``/run/kvmvfio/sriov``), opened without trust like the journal's."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> None:
        self.folder = RunFolder(root, "sriov", uid)
        self.locks = RunFolder(root, "locks", uid)

    @staticmethod
    def file_name(pf: str) -> str:
        return f"pf-{canonical_address(pf)}.json"

    def locked(self, pf: str) -> contextlib.AbstractContextManager[None]:
        return self.locks.locked(f"pf-{canonical_address(pf)}.lock")

    def write(self, record: VfRecord) -> None:
        data = json.dumps({"version": VERSION, **asdict(record)}, indent=1).encode()
        self.folder.write(self.file_name(record.pf), data)

    def read(self, pf: str) -> VfRecord | None:
        raw = self.folder.read(self.file_name(pf), MAX_BYTES)
        return (
            None if raw is None else parse_vf_record(self.folder.path / self.file_name(pf), pf, raw)
        )

    def remove(self, pf: str) -> None:
        self.folder.remove(self.file_name(pf))

    def pfs(self) -> list[str]:
        """The PFs that have a record (not read), sorted."""
        return self.folder.keys(_FILE_NAME, "a PF record name")


def parse_vf_record(path: Path, pf: str, raw: bytes) -> VfRecord:
    """The record in ``raw`` (the file of PF ``pf``); :class:`JournalError` for anything else."""
    try:
        doc = _decode(raw)
        if not isinstance(doc, dict):
            raise _Invalid("it is not a JSON object")
        _keys("it ", doc, _KEYS)
        if type(doc["version"]) is not int or doc["version"] != VERSION:
            raise _Invalid(f"version {doc['version']!r}, expected {VERSION}")
        if _address("'pf'", doc["pf"]) != pf:
            raise _Invalid(f"it is the file of PF {pf} but its 'pf' is {shown(str(doc['pf']))}")
        autoprobe = doc["autoprobe_before"]
        if type(autoprobe) is not bool:
            raise _Invalid("'autoprobe_before' must be true or false")
        start = doc["pid_start"]
        return VfRecord(
            pf=pf,
            owner=_name("'owner'", doc["owner"], owner_problem),
            pid=_count("'pid'", doc["pid"], MAX_PID),
            pid_start=None if start is None else _count("'pid_start'", start, MAX_COUNT),
            before=_count("'before'", doc["before"], MAX_VFS),
            autoprobe_before=autoprobe,
            count=_count("'count'", doc["count"], MAX_VFS),
        )
    except _Invalid as err:
        raise JournalError(path, str(err)) from None


# -- reading the PF --------------------------------------------------------------------


def physical_function(host: Host, pf: str | PciAddress) -> PciDevice:
    """The PF at ``pf``; :class:`NotSriovCapable` for a VF or a function without SR-IOV."""
    dev = host.device(pf)
    if dev.is_virtfn:
        raise NotSriovCapable(str(dev.address), f"is a VF (of PF {dev.physfn}), not a PF")
    if not dev.is_physfn:
        raise NotSriovCapable(str(dev.address), "has no SR-IOV capability (no sriov_totalvfs)")
    return dev


def autoprobe(sysfs: Sysfs, pf: str) -> bool:
    """The PF's ``sriov_drivers_autoprobe``."""
    path = sysfs.device(pf) / "sriov_drivers_autoprobe"
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise KernelError(err.errno or errno.EIO, "read", str(path)) from err
    if text not in ("0", "1"):
        raise SysfsError(str(path), f"holds {shown(text, 20)!r}, not 0 or 1")
    return text == "1"


def _claims(root: str | Path, uid: int | None) -> dict[str, str]:
    """Each address the journal holds, with its owner (an unreadable journal holds none)."""
    claimed: dict[str, str] = {}
    with contextlib.suppress(KvmvfioError):
        for record in Journal(root, uid).records():
            for entry in record.devices:
                claimed[entry.address] = record.owner
    return claimed


def _uses_of(host: Host, addr: str, claimed: dict[str, str]) -> list[str]:
    """What uses the VF at ``addr``: a journal claim, vfio-pci, an open VFIO file."""
    dev = host.device(addr)
    why = []
    if addr in claimed:
        why.append(f"is claimed by {shown(claimed[addr])!r}")
    if is_vfio_driver(dev.driver):
        why.append(f"is on {dev.driver}")
    nodes = [str(n) for n in (dev.cdev_node(host.devfs),) if n is not None]
    with contextlib.suppress(KvmvfioError):
        nodes.append(str(host.group_of(addr).dev_node(host.devfs)))
    held = holders(*nodes, proc=host.procfs)
    if held:
        why.append(f"is open in {', '.join(held)}")
    elif is_vfio_driver(dev.driver):
        unnamed = unnamed_vfio_user(host.sysfs, addr, host.procfs)
        if unnamed is not None:
            why.append(f"is open in {unnamed}")
    return why


def vf_uses(
    host: Host, pf: PciDevice, *, root: str | Path, uid: int | None
) -> list[tuple[str, str]]:
    """What uses each of the PF's VFs now: vfio-pci, a journal claim, an open VFIO file."""
    claimed = _claims(root, uid)
    uses: list[tuple[str, str]] = []
    for vf in pf.virtfns:
        why = _uses_of(host, str(vf), claimed)
        if why:
            uses.append((str(vf), " and ".join(why)))
    return uses


# -- choosing VFs to hand out ----------------------------------------------------------------


class NotEnoughVfs(KvmvfioError):
    """Fewer VFs of the PF are free than were asked for."""

    def __init__(self, pf: str, count: int, free: int, taken: list[tuple[str, str]]) -> None:
        self.pf = pf
        self.count = count
        self.free = free
        self.taken = tuple(taken)
        listed = "; ".join(f"VF {vf} {why}" for vf, why in taken[:8])
        more = f" (and {len(taken) - 8} more)" if len(taken) > 8 else ""
        has = f"{free} of its VFs are free" if free != 1 else "1 of its VFs is free"
        super().__init__(
            f"{count} VFs of PF {pf} were asked for and {has}"
            + (f": {listed}{more}" if taken else ": it has no more VFs")
            + ". Make more (`kvmvfio sriov set "
            f"{pf} N --owner OWNER`) or release some"
        )


def pick_vfs(
    pf: str | PciAddress,
    count: int,
    owner: str,
    *,
    exclude: tuple[str, ...] | frozenset[str] = (),
    held_only: bool = False,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
) -> tuple[str, ...]:
    """``count`` VFs of PF ``pf`` for ``owner``, in VF order: its own first, then free ones.

    The VFs the journal already holds for ``owner`` come first, so the same
    question asked again after they were prepared names the same VFs (the
    hook's prepare, the agent's attach and the hook's release agree). Free
    means: no journal claim, no driver, no VFIO file open (how ``kvmvfio
    sriov set`` makes them). A VF on a host driver is never picked (the host
    may be using it: name it to hand it out), nor one on vfio-pci that the
    journal does not hold (someone else's), nor one in ``exclude`` (named
    elsewhere in the request).
    ``held_only``: only ``owner``'s, as many as there are up to ``count``
    (for giving them back). Raises :class:`NotSriovCapable`,
    :class:`UsageError` for a count below 1, :class:`NotEnoughVfs`.
    """
    host = host or Host()
    dev = physical_function(host, pf)
    if type(count) is not int or count < 1:
        raise UsageError(
            f"a count of VFs to hand out must be 1 or more, not {shown(repr(count), 40)}"
        )
    claimed = _claims(root, uid)
    vfs = [str(v) for v in dev.virtfns if str(v) not in exclude]
    mine = [v for v in vfs if claimed.get(v) == owner]
    if held_only:
        return tuple(mine[:count])
    free: list[str] = []
    taken: list[tuple[str, str]] = []
    for vf in vfs:
        if vf in mine:
            continue
        driver = host.device(vf).driver
        why = _uses_of(host, vf, claimed)
        if driver is not None and not is_vfio_driver(driver):
            why.append(f"is on its host driver {driver} (name it to hand it out)")
        if why:
            taken.append((vf, " and ".join(why)))
        else:
            free.append(vf)
    if len(mine) + len(free) < count:
        raise NotEnoughVfs(str(dev.address), count, len(mine) + len(free), taken)
    return tuple((mine + free)[:count])


# -- changing the count --------------------------------------------------------------------


def _checked_count(count: object, pf: PciDevice) -> int:
    if type(count) is not int:
        raise UsageError(f"a VF count must be a whole number, not {shown(repr(count), 40)}")
    total = pf.sriov_totalvfs or 0
    if not 0 <= count <= total:
        raise UsageError(f"PF {pf.address} can have 0 to {total} VFs, not {count}")
    return count


def set_vfs(
    pf: str | PciAddress,
    count: int,
    owner: str,
    *,
    owner_pid: int | None = None,
    host_drivers: bool = False,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    watch: OwnerWatch | None = None,
) -> VfChange:
    """Give PF ``pf`` ``count`` VFs, for ``owner``; journaled, idempotent.

    Host changes, each recorded first: ``sriov_drivers_autoprobe`` (0 unless
    ``host_drivers``: the VFs are for VMs, and no host driver should take
    them first), ``sriov_numvfs`` through 0 when it had VFs, then the new
    count. Raises :class:`NotSriovCapable`, :class:`UsageError` for a count
    out of range or an owner that is not a short name, :class:`VfsInUse`,
    :class:`PfClaimed`, and :class:`~kvmvfio.errors.KernelError` when sysfs
    refuses (whatever was changed is in the record; :func:`reset_vfs` or
    ``kvmvfio recover`` puts it back).
    """
    if not isinstance(owner, str) or owner_problem(owner) is not None:
        raise UsageError(f"owner {shown(repr(owner), 60)} must be a short name without spaces")
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    dev = physical_function(host, pf)
    count = _checked_count(count, dev)
    addr = str(dev.address)
    process = watch.owner_process(owner_pid)
    sysfs = Sysfs(host.sysfs)
    vfj = VfJournal(root, uid)
    with vfj.locked(addr):
        record = vfj.read(addr)
        if record is not None and record.owner != owner:
            state = _liveness(host, watch, record, root=root, uid=uid)
            if state.alive:
                raise PfClaimed(addr, record.owner, state.why)
        probe = host_drivers  # autoprobe on only when host drivers may take the VFs
        current, probing = dev.sriov_numvfs or 0, autoprobe(sysfs, addr)
        if current == count and probing == probe:
            return VfChange(addr, current, count, probing, tuple(str(v) for v in dev.virtfns))
        if current:
            uses = vf_uses(host, dev, root=root, uid=uid)
            if uses:
                raise VfsInUse(addr, uses)
        # A record (this owner's, or a gone owner's) keeps what the PF had first.
        before, auto_before = (
            (current, probing) if record is None else (record.before, record.autoprobe_before)
        )
        record = VfRecord(
            addr,
            owner,
            process.pid if process else 0,
            process.start if process else None,
            before,
            auto_before,
            count,
        )
        vfj.write(record)  # before the first change: a crash after it is covered
        _apply(sysfs, addr, current=current, count=count, probing=probing, probe=probe)
        if count == before and probe == auto_before:
            vfj.remove(addr)  # back where it was: nothing left to undo
    after = physical_function(host, addr)
    log.info("PF %s: %d VFs (was %d) for %s, autoprobe %d", addr, count, current, owner, probe)
    return VfChange(addr, current, count, probe, tuple(str(v) for v in after.virtfns))


def _apply(sysfs: Sysfs, pf: str, *, current: int, count: int, probing: bool, probe: bool) -> None:
    """The writes, in the kernel's order, each a host change counted like prepare's."""
    from kvmvfio.prepare import _after_change  # noqa: PLC0415 (the shared change counter)

    if probing != probe:
        sysfs.set_autoprobe(pf, probe)
        _after_change()
    if current == count:
        return
    if current:
        sysfs.set_numvfs(pf, 0)  # M -> N > 0 is EBUSY: the count goes through 0
        _after_change()
    if count:
        sysfs.set_numvfs(pf, count)
        _after_change()


def _restore(
    host: Host, vfj: VfJournal, record: VfRecord, *, root: str | Path, uid: int | None
) -> VfChange:
    sysfs = Sysfs(host.sysfs)
    dev = physical_function(host, record.pf)
    current, probing = dev.sriov_numvfs or 0, autoprobe(sysfs, record.pf)
    if current and current != record.before:
        uses = vf_uses(host, dev, root=root, uid=uid)
        if uses:
            raise VfsInUse(record.pf, uses)
    if current != record.before or probing != record.autoprobe_before:
        _apply(
            sysfs,
            record.pf,
            current=current,
            count=record.before,
            probing=probing,
            probe=record.autoprobe_before,
        )
    vfj.remove(record.pf)
    after = physical_function(host, record.pf)
    log.info(
        "PF %s: %d VFs again (had %d from %s)", record.pf, record.before, current, record.owner
    )
    return VfChange(
        record.pf,
        current,
        record.before,
        record.autoprobe_before,
        tuple(str(v) for v in after.virtfns),
    )


def reset_vfs(
    pf: str | PciAddress,
    owner: str,
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
) -> VfChange | None:
    """Put back the VF count (and autoprobe) PF ``pf`` had before ``owner`` changed it.

    None when kvmvfio changed nothing there. Raises :class:`PfClaimed` for
    another owner's record, :class:`VfsInUse`, and what :func:`set_vfs` raises.
    """
    host = host or Host()
    addr = str(physical_function(host, pf).address)
    vfj = VfJournal(root, uid)
    with vfj.locked(addr):
        record = vfj.read(addr)
        if record is None:
            return None
        if record.owner != owner:
            raise PfClaimed(addr, record.owner, "its record names that owner")
        return _restore(host, vfj, record, root=root, uid=uid)


def _liveness(
    host: Host, watch: OwnerWatch, record: VfRecord, *, root: str | Path, uid: int | None
) -> Liveness:
    """Whether the owner of a PF record still counts: its process, its domain, or VFs in use."""
    uses = vf_uses(host, physical_function(host, record.pf), root=root, uid=uid)
    if uses:
        return Liveness(True, "; ".join(f"VF {vf} {why}" for vf, why in uses))
    return watch.liveness(record.owner, record.process, [])


@dataclass(frozen=True)
class VfRecovery:
    """What :func:`recover_vfs` did: counts put back, live owners left, failures."""

    restored: tuple[VfChange, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()


def recover_vfs(
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    watch: OwnerWatch | None = None,
) -> VfRecovery:
    """Put back the VF counts of owners that are gone; leave live ones; go on past failures."""
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    vfj = VfJournal(root, uid)
    restored: list[VfChange] = []
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for pf in vfj.pfs():
        try:
            with vfj.locked(pf):
                record = vfj.read(pf)
                if record is None:
                    continue
                state = _liveness(host, watch, record, root=root, uid=uid)
                if state.alive:
                    skipped.append((pf, f"{record.owner}: {state.why}"))
                    continue
                restored.append(_restore(host, vfj, record, root=root, uid=uid))
        except KvmvfioError as err:
            log.warning("PF %s: VF count not restored: %s", pf, err)
            failed.append((pf, str(err)))
    return VfRecovery(tuple(restored), tuple(skipped), tuple(failed))


def records(root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> Iterator[VfRecord]:
    """Every valid PF record (an invalid one is logged and skipped)."""
    vfj = VfJournal(root, uid)
    for pf in vfj.pfs():
        try:
            record = vfj.read(pf)
        except KvmvfioError as err:
            log.error("PF %s: %s", pf, err)
            continue
        if record is not None:
            yield record
