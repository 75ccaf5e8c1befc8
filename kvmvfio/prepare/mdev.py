"""Mediated devices made and removed for an owner, journaled, optionally kept by mdevctl.

The kernel's interface (``drivers/vfio/mdev/mdev_sysfs.c``, ``mdev_core.c``):

``<parent>/mdev_supported_types/TYPE/create``
    Writing a UUID makes an mdev of TYPE named by it: EEXIST when an mdev
    already has that UUID, EINVAL for text that is not one, EUSERS from the
    mdev core when the type's ``available_instances`` is 0 (a driver that
    counts its own resources, as ``mtty`` does, refuses in its probe
    instead, with its own errno). The write returns once the mdev is on the
    bus and its driver registered it with VFIO (its own IOMMU group, its
    cdev).
``/sys/bus/mdev/devices/UUID/remove``
    Writing 1 removes it. The kernel does not refuse an mdev in use: the
    write *blocks* until the last process with its VFIO device open closes
    it (``vfio_unregister_group_dev``), so kvmvfio refuses first.

:func:`create_mdev` makes one for an owner, the way
:func:`kvmvfio.prepare.sriov.set_vfs` sets a VF count: a record (its UUID,
parent, type, owner and process, and a state) is written durably under
``/run/kvmvfio/mdev/UUID.json`` *before* the create write, so after a crash
at any step :func:`recover_mdevs` (run by ``kvmvfio recover``) knows what
was made and removes it once its owner is gone. :func:`remove_mdev`
writes its record ("removing") before the remove write and drops it after.
A record's state says where a crash happened: ``creating`` and
``removing`` are finished by recover whoever the owner (the per-UUID lock
is free, so the process that wrote it is gone); ``created`` waits for its
owner to go.

An mdev is never removed while it is in use: its group node
(``/dev/vfio/N``) or its cdev (``/dev/vfio/devices/vfioN``) open in a
process, or its IOMMU group held by a journal record (``kvmvfio
prepare``). An mdev created for another owner that is alive is refused
with :class:`MdevClaimed`; one kvmvfio did not create is never removed by
recover (only when named to :func:`remove_mdev`).

Persistence across reboot is mdevctl's: with ``persist``, the definition is
written where mdevctl keeps it (``/etc/mdevctl.d/PARENT/UUID``, JSON
``{"mdev_type": TYPE, "start": "auto", "attrs": []}``), and mdevctl's udev
rule creates the mdev again when its parent appears at boot. kvmvfio's
record is in ``/run`` and goes with the reboot: an mdev mdevctl brings back
has no owner. Recover leaves a persistent mdev; :func:`remove_mdev` removes
the mdev and its definition.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import stat
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from kvmvfio.errors import KernelError, KvmvfioError, UsageError, shown
from kvmvfio.host import Host
from kvmvfio.host.errors import InvalidMdevUuid, MdevNotFound
from kvmvfio.host.mdev import (
    _TYPE_ID,
    Mdev,
    MdevParent,
    find_parent,
    mdev_parents,
    mdevs,
    parse_uuid,
    read_mdev,
)
from kvmvfio.host.procs import ProcessId, device_file_holders, holders
from kvmvfio.prepare.driver import driver_name_problem
from kvmvfio.prepare.errors import (
    JournalError,
    MdevClaimed,
    MdevExists,
    MdevInUse,
    NoMdevInstances,
    NotAnMdevParent,
    UnknownMdevType,
)
from kvmvfio.prepare.journal import (
    DEFAULT_ROOT,
    MAX_COUNT,
    MAX_PID,
    Journal,
    _count,
    _decode,
    _Invalid,
    _keys,
    _name,
    _shown,
    owner_problem,
)
from kvmvfio.prepare.owners import Liveness, OwnerWatch
from kvmvfio.prepare.rundir import RunFolder

log = logging.getLogger(__name__)

__all__ = [
    "MDEVCTL_ROOT",
    "MdevChange",
    "MdevDefinition",
    "MdevJournal",
    "MdevRecord",
    "MdevRecovery",
    "MdevState",
    "create_mdev",
    "definition",
    "mdev_parent",
    "mdev_states",
    "mdev_uses",
    "mdevctl_installed",
    "parse_mdev_record",
    "recover_mdevs",
    "remove_mdev",
]

VERSION = 1
#: Where mdevctl keeps its definitions: ``PARENT/UUID``, one JSON file each.
MDEVCTL_ROOT = Path("/etc/mdevctl.d")
#: Largest record read; kvmvfio writes about 300 bytes.
MAX_BYTES = 1 << 16
#: Largest mdevctl definition read (attrs are short sysfs values).
MAX_DEFINITION = 1 << 16
_FILE_NAME = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.json")
_KEYS = ("version", "uuid", "parent", "type_id", "owner", "pid", "pid_start", "persist", "state")

#: ``creating``: written before the create write; ``created``: made (and defined, with
#: ``persist``); ``removing``: written before the remove write.
State = Literal["creating", "created", "removing"]
_STATES: tuple[State, ...] = ("creating", "created", "removing")


@dataclass(frozen=True)
class MdevRecord:
    """What kvmvfio made (or is removing), for whom, and how far it got."""

    uuid: str
    parent: str
    type_id: str | None
    owner: str
    pid: int
    pid_start: int | None
    persist: bool
    state: State

    @property
    def process(self) -> ProcessId | None:
        return ProcessId(self.pid, self.pid_start) if self.pid > 0 else None


@dataclass(frozen=True)
class MdevChange:
    """An mdev made or removed: its UUID, parent, type, owner, group and cdev, its definition.

    ``definition`` is the path of its mdevctl definition (written with
    ``persist``, or removed with the mdev), None when it has none.
    """

    uuid: str
    parent: str
    type_id: str | None
    owner: str
    persistent: bool
    definition: str | None
    group: int | None
    cdev: str | None


class MdevJournal:
    """The mdev records (``/run/kvmvfio/mdev``), opened without trust like the journal's."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> None:
        self.folder = RunFolder(root, "mdev", uid)
        self.locks = RunFolder(root, "locks", uid)

    @staticmethod
    def file_name(uuid: str) -> str:
        return f"{parse_uuid(uuid)}.json"

    def locked(self, uuid: str) -> contextlib.AbstractContextManager[None]:
        return self.locks.locked(f"mdev-{parse_uuid(uuid)}.lock")

    def write(self, record: MdevRecord) -> None:
        data = json.dumps({"version": VERSION, **asdict(record)}, indent=1).encode()
        self.folder.write(self.file_name(record.uuid), data)

    def read(self, uuid: str) -> MdevRecord | None:
        """The mdev's record, or None; :class:`JournalError`, :class:`UntrustedFile`."""
        name = self.file_name(uuid)
        raw = self.folder.read(name, MAX_BYTES)
        return None if raw is None else parse_mdev_record(self.folder.path / name, uuid, raw)

    def remove(self, uuid: str) -> None:
        self.folder.remove(self.file_name(uuid))

    def uuids(self) -> list[str]:
        """The UUIDs that have a record (not read), sorted."""
        return self.folder.keys(_FILE_NAME, "an mdev record name")


def _parent_problem(name: str) -> str | None:
    # A parent is a device's name in sysfs (``mtty``, ``0000:00:02.0``): a folder name.
    return driver_name_problem(name)


def _type_problem(name: str) -> str | None:
    return None if _TYPE_ID.fullmatch(name) else "it is not an mdev type's name"


def parse_mdev_record(path: Path, uuid: str, raw: bytes) -> MdevRecord:
    """The record in ``raw`` (the file of mdev ``uuid``); :class:`JournalError` otherwise."""
    try:
        if len(raw) > MAX_BYTES:
            raise _Invalid(f"it is larger than {MAX_BYTES} bytes")
        doc = _decode(raw)
        if not isinstance(doc, dict):
            raise _Invalid(f"it is {_shown(doc)}, not a JSON object")
        _keys("it ", doc, _KEYS)
        if type(doc["version"]) is not int or doc["version"] != VERSION:
            raise _Invalid(f"version {_shown(doc['version'])}, expected {VERSION}")
        if doc["uuid"] != uuid:
            raise _Invalid(f"it is the file of mdev {uuid} but its 'uuid' is {_shown(doc['uuid'])}")
        persist, state, start, type_id = (
            doc["persist"],
            doc["state"],
            doc["pid_start"],
            doc["type_id"],
        )
        if type(persist) is not bool:
            raise _Invalid("'persist' must be true or false")
        if state not in _STATES:
            raise _Invalid(f"'state' {_shown(state)} is not one of {', '.join(_STATES)}")
        return MdevRecord(
            uuid=uuid,
            parent=_name("'parent'", doc["parent"], _parent_problem),
            type_id=None if type_id is None else _name("'type_id'", type_id, _type_problem),
            owner=_name("'owner'", doc["owner"], owner_problem),
            pid=_count("'pid'", doc["pid"], MAX_PID),
            pid_start=None if start is None else _count("'pid_start'", start, MAX_COUNT),
            persist=persist,
            state=state,
        )
    except _Invalid as err:
        raise JournalError(path, str(err)) from None


# -- mdevctl's definitions ---------------------------------------------------------------


@dataclass(frozen=True)
class MdevDefinition:
    """mdevctl's definition of an mdev (``/etc/mdevctl.d/PARENT/UUID``), as far as read.

    ``mdev_type`` and ``start`` are None when the file is not a definition
    kvmvfio can read (``problem`` says why); it is still there, and mdevctl
    may still act on it.
    """

    path: str
    mdev_type: str | None
    start: str | None
    problem: str | None = None


def mdevctl_installed() -> bool:
    """Whether ``mdevctl`` is on the PATH (its udev rule starts definitions at boot)."""
    return shutil.which("mdevctl") is not None


def _definition_path(mdevctl_root: str | Path, parent: str, uuid: str) -> Path:
    problem = _parent_problem(parent)
    if problem is not None:
        raise UsageError(f"mdev parent {shown(repr(parent), 80)} cannot name a folder: {problem}")
    return Path(mdevctl_root) / parent / parse_uuid(uuid)


def _read_definition(path: Path) -> MdevDefinition | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        return MdevDefinition(str(path), None, None, f"it cannot be opened: {err.strerror}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return MdevDefinition(str(path), None, None, "it is not a regular file")
        raw = os.read(fd, MAX_DEFINITION + 1)
    except OSError as err:
        return MdevDefinition(str(path), None, None, f"it cannot be read: {err.strerror}")
    finally:
        os.close(fd)
    try:
        if len(raw) > MAX_DEFINITION:
            raise _Invalid(f"it is larger than {MAX_DEFINITION} bytes")
        doc = _decode(raw)
        if not isinstance(doc, dict):
            raise _Invalid("it is not a JSON object")
        mdev_type, start = doc.get("mdev_type"), doc.get("start")
        if not isinstance(mdev_type, str) or _type_problem(mdev_type) is not None:
            raise _Invalid(f"its 'mdev_type' is {_shown(mdev_type)}")
        if start not in ("auto", "manual"):
            raise _Invalid(f"its 'start' is {_shown(start)}, not auto or manual")
    except _Invalid as err:
        return MdevDefinition(str(path), None, None, str(err))
    return MdevDefinition(str(path), mdev_type, start)


def definition(
    uuid: str, parent: str | None = None, mdevctl_root: str | Path = MDEVCTL_ROOT
) -> MdevDefinition | None:
    """mdevctl's definition of ``uuid`` (under ``parent``, or under any parent), or None."""
    uuid = parse_uuid(uuid)
    if parent is not None:
        return _read_definition(_definition_path(mdevctl_root, parent, uuid))
    try:
        parents = sorted(os.listdir(mdevctl_root))
    except OSError:
        return None
    for name in parents:
        if _parent_problem(name) is None:
            found = _read_definition(Path(mdevctl_root) / name / uuid)
            if found is not None:
                return found
    return None


def _write_definition(path: Path, type_id: str) -> None:
    """Host change: write mdevctl's definition (temporary file, fsync, rename, fsync)."""
    doc = {"mdev_type": type_id, "start": "auto", "attrs": []}
    data = (json.dumps(doc, indent=2) + "\n").encode()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        os.makedirs(path.parent, mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as err:
        raise KernelError(
            err.errno or errno.EIO, "write", str(path), "mdevctl's definition"
        ) from err


def _remove_definition(path: Path) -> bool:
    """Host change: remove mdevctl's definition (a link is removed, not followed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise KernelError(
            err.errno or errno.EIO, "unlink", str(path), "mdevctl's definition"
        ) from err
    with contextlib.suppress(OSError):
        os.rmdir(path.parent)  # the parent's folder, once its last definition is gone
    return True


# -- reading what there is ---------------------------------------------------------------


def mdev_parent(host: Host, name: str) -> MdevParent:
    """The parent named ``name``; :class:`NotAnMdevParent` naming the parents there are."""
    found = None if not isinstance(name, str) else find_parent(name, host.sysfs)
    if found is not None:
        return found
    known = tuple(p.name for p in mdev_parents(host.sysfs))
    text = str(name)
    pci = host.sysfs / "bus" / "pci" / "devices"
    if _parent_problem(text) is None and (pci / text).exists():
        why = "is a PCI device whose driver registered no mdev types"
    else:
        why = "is no device with mdev support on this host"
    raise NotAnMdevParent(text, why, known)


def _claims(root: str | Path, uid: int | None) -> dict[int, str]:
    """The IOMMU groups kvmvfio's journal holds, with their owners."""
    journal = Journal(root, uid)
    claimed: dict[int, str] = {}
    with contextlib.suppress(KvmvfioError):
        for group in journal.groups():
            try:
                record = journal.read(group)
            except KvmvfioError:
                claimed[group] = "an unusable record"
                continue
            if record is not None:
                claimed[group] = repr(shown(record.owner))
    return claimed


def mdev_uses(
    host: Host,
    m: Mdev,
    *,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    probe: bool = False,
) -> tuple[str, ...]:
    """What uses the mdev now: its VFIO files open in a process, a journal claim on its group.

    ``probe``: when no process shows either file, also open and close the
    group node to ask the kernel (:func:`~kvmvfio.vfio.group.group_held`),
    for a device file kept after its group was closed; the remove would
    wait for it. Only where kvmvfio is about to remove the mdev: a VM
    opening the group at that instant would find it busy.
    """
    uses = []
    if m.group is not None:
        owner = _claims(root, uid).get(m.group)
        if owner is not None:
            uses.append(f"is in IOMMU group {m.group}, which kvmvfio holds for {owner}")
    group_node = m.group_node(host.devfs)
    nodes = [n for n in (group_node, m.cdev_node(host.devfs)) if n is not None]
    held = holders(*nodes, proc=host.procfs) if nodes else []
    if held:
        uses.append(f"is open in {', '.join(held)}")
    elif probe and group_node is not None:
        from kvmvfio.vfio.group import group_held  # noqa: PLC0415 (the VFIO layer only here)

        if group_held(group_node):
            uses.append(
                f"is open by its device file alone, which keeps IOMMU group {m.group} open in "
                f"the kernel ({device_file_holders(host.procfs)})"
            )
    return tuple(uses)


@dataclass(frozen=True)
class MdevState:
    """One mdev as ``kvmvfio mdev list`` shows it: what sysfs says, who has it, if it persists."""

    mdev: Mdev
    #: The owner kvmvfio created it for (None: kvmvfio did not, or the record went with a reboot).
    owner: str | None
    #: The record's state (``created``; ``creating``/``removing`` after a crash), or None.
    state: str | None
    definition: MdevDefinition | None
    uses: tuple[str, ...]

    @property
    def persistent(self) -> bool:
        return self.definition is not None


def mdev_states(
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    mdevctl_root: str | Path = MDEVCTL_ROOT,
) -> list[MdevState]:
    """Every mdev on the host with its owner (from kvmvfio's record), definition and uses."""
    host = host or Host()
    mj = MdevJournal(root, uid)
    out = []
    for m in mdevs(host.sysfs):
        try:
            record = mj.read(m.uuid)
        except KvmvfioError as err:
            log.error("mdev %s: %s", m.uuid, err)
            record = None
        out.append(
            MdevState(
                m,
                None if record is None else record.owner,
                None if record is None else record.state,
                definition(m.uuid, m.parent, mdevctl_root),
                mdev_uses(host, m, root=root, uid=uid),
            )
        )
    return out


# -- making and removing ----------------------------------------------------------------


def _write(path: Path, text: str, subject: str) -> None:
    """Write ``text`` to a sysfs attribute; OSError as the kernel said it."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    log.info("%s: wrote %r to %s", subject, text, path)


def _change(
    m_uuid: str, record: MdevRecord | None, host: Host, *, definition_path: Path | None
) -> MdevChange:
    m = read_mdev(m_uuid, host.sysfs)
    return MdevChange(
        uuid=m_uuid,
        parent=m.parent if m else (record.parent if record else ""),
        type_id=m.type_id if m else (record.type_id if record else None),
        owner=record.owner if record else "",
        persistent=definition_path is not None and definition_path.exists(),
        definition=None if definition_path is None else str(definition_path),
        group=m.group if m else None,
        cdev=m.cdev if m else None,
    )


def _checked_owner(owner: object) -> str:
    if not isinstance(owner, str) or owner_problem(owner) is not None:
        raise UsageError(f"owner {shown(repr(owner), 60)} must be a short name without spaces")
    return owner


def create_mdev(
    parent: str,
    type_id: str,
    owner: str,
    *,
    uuid: str | None = None,
    persist: bool = False,
    owner_pid: int | None = None,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    mdevctl_root: str | Path = MDEVCTL_ROOT,
    watch: OwnerWatch | None = None,
) -> MdevChange:
    """Make an mdev of ``type_id`` on ``parent`` for ``owner``; journaled.

    ``uuid`` names it (default: a new random one). Host changes, each
    recorded first: the create write; with ``persist``, mdevctl's definition
    (``start: auto``). Raises, changing nothing: :class:`UsageError` for an
    owner that is not a short name,
    :class:`~kvmvfio.host.errors.InvalidMdevUuid`, :class:`NotAnMdevParent`,
    :class:`UnknownMdevType`, :class:`MdevExists` (the UUID is an mdev's or
    in an mdevctl definition), :class:`NoMdevInstances`; and
    :class:`~kvmvfio.errors.KernelError` when the kernel refuses otherwise.
    """
    owner = _checked_owner(owner)
    the_uuid = str(uuidlib.uuid4()) if uuid is None else parse_uuid(uuid)
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    found = mdev_parent(host, parent)
    if not isinstance(type_id, str) or found.type(type_id) is None:
        raise UnknownMdevType(found.name, str(type_id), tuple(t.id for t in found.types))
    process = watch.owner_process(owner_pid)
    mj = MdevJournal(root, uid)
    with mj.locked(the_uuid):
        existing = read_mdev(the_uuid, host.sysfs)
        if existing is not None:
            raise MdevExists(
                the_uuid, f"by mdev {the_uuid} of {existing.parent}, type {existing.type_id}"
            )
        defined = definition(the_uuid, None, mdevctl_root)
        if defined is not None:
            raise MdevExists(the_uuid, f"by mdevctl's definition {defined.path}")
        mtype = mdev_parent(host, found.name).type(type_id)  # fresh: what is left now
        if mtype is None:
            raise UnknownMdevType(found.name, type_id, tuple(t.id for t in found.types))
        if mtype.available == 0:
            raise NoMdevInstances(found.name, type_id)
        # A record left without its mdev (a crash before the create write) is replaced.
        record = MdevRecord(
            the_uuid,
            found.name,
            type_id,
            owner,
            process.pid if process else 0,
            process.start if process else None,
            persist,
            "creating",
        )
        mj.write(record)  # before the create write: a crash after it is covered
        _create(host, mj, record, Path(found.path))
        path = _definition_path(mdevctl_root, found.name, the_uuid)
        if persist:
            _write_definition(path, type_id)
            _after_change()
            if not mdevctl_installed():
                log.warning(
                    "mdev %s: defined in %s, but mdevctl is not installed: nothing "
                    "creates it at boot until it is",
                    the_uuid,
                    path,
                )
        mj.write(replace(record, state="created"))
    log.info("mdev %s: %s of %s for %s", the_uuid, type_id, found.name, owner)
    return _change(the_uuid, record, host, definition_path=path if persist else None)


def _create(host: Host, mj: MdevJournal, record: MdevRecord, parent_path: Path) -> None:
    assert record.type_id is not None
    create = parent_path / "mdev_supported_types" / record.type_id / "create"
    try:
        _write(create, record.uuid, f"mdev {record.uuid}")
    except OSError as err:
        if read_mdev(record.uuid, host.sysfs) is None:
            mj.remove(record.uuid)  # the kernel made nothing: nothing to undo
        code = err.errno or errno.EIO
        if code == errno.EEXIST:
            raise MdevExists(record.uuid, "by an mdev made meanwhile") from err
        if code in (errno.EUSERS, errno.ENOSPC):
            raise NoMdevInstances(record.parent, record.type_id, code) from err
        if code == errno.EINVAL:
            raise InvalidMdevUuid(record.uuid) from err
        raise KernelError(code, "write", str(create), f"mdev {record.uuid}") from err
    _after_change()


def _after_change() -> None:
    from kvmvfio.prepare import _after_change as counted  # noqa: PLC0415 (it imports this package)

    counted()


def _liveness(
    host: Host,
    watch: OwnerWatch,
    record: MdevRecord,
    m: Mdev | None,
    *,
    root: str | Path,
    uid: int | None,
) -> Liveness:
    """Whether the owner of a record still counts: the mdev in use, its process, its domain."""
    uses = () if m is None else mdev_uses(host, m, root=root, uid=uid)
    if uses:
        return Liveness(True, f"it {' and '.join(uses)}")
    return watch.liveness(record.owner, record.process, [])


def _remove(host: Host, m: Mdev) -> None:
    """Host change: write 1 to the mdev's ``remove`` (after the record says so)."""
    path = host.sysfs / "bus" / "mdev" / "devices" / m.uuid / "remove"
    try:
        _write(path, "1", f"mdev {m.uuid}")
    except OSError as err:
        if err.errno == errno.ENOENT and read_mdev(m.uuid, host.sysfs) is None:
            return  # gone meanwhile (its parent went, or someone removed it)
        raise KernelError(err.errno or errno.EIO, "write", str(path), f"mdev {m.uuid}") from err
    _after_change()


def _remove_recorded(
    host: Host, mj: MdevJournal, record: MdevRecord, m: Mdev | None, *, mdevctl_root: str | Path
) -> MdevChange:
    """Remove the mdev (if there) and, when the record persists it, its definition."""
    path = _definition_path(mdevctl_root, record.parent, record.uuid)
    if record.state != "removing":
        record = replace(record, state="removing")
        mj.write(record)  # before the remove write
    if m is not None:
        _remove(host, m)
    removed = record.persist and _remove_definition(path)
    if removed:
        _after_change()
    mj.remove(record.uuid)
    log.info(
        "mdev %s: removed (%s of %s, for %s)",
        record.uuid,
        record.type_id,
        record.parent,
        record.owner,
    )
    return MdevChange(
        record.uuid,
        record.parent,
        record.type_id,
        record.owner,
        persistent=False,
        definition=str(path) if removed else None,
        group=None if m is None else m.group,
        cdev=None if m is None else m.cdev,
    )


def remove_mdev(
    uuid: str,
    owner: str,
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    mdevctl_root: str | Path = MDEVCTL_ROOT,
    watch: OwnerWatch | None = None,
) -> MdevChange:
    """Remove mdev ``uuid`` for ``owner``, and its mdevctl definition if it has one; journaled.

    An mdev kvmvfio did not create (no record) is removed too, when it is
    named here. Raises, changing nothing:
    :class:`~kvmvfio.host.errors.InvalidMdevUuid`,
    :class:`~kvmvfio.host.errors.MdevNotFound` (no such mdev, and no record
    of it), :class:`MdevClaimed` (created for another owner that is alive),
    :class:`MdevInUse`; and :class:`~kvmvfio.errors.KernelError` when the
    kernel refuses (the record, state ``removing``, is left for
    ``kvmvfio recover``).
    """
    owner = _checked_owner(owner)
    the_uuid = parse_uuid(uuid)
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    mj = MdevJournal(root, uid)
    with mj.locked(the_uuid):
        record = mj.read(the_uuid)
        m = read_mdev(the_uuid, host.sysfs)
        if m is None and record is None:
            raise MdevNotFound(the_uuid, str(host.sysfs))
        if record is not None and record.owner != owner:
            state = _liveness(host, watch, record, m, root=root, uid=uid)
            if state.alive:
                raise MdevClaimed(the_uuid, record.owner, state.why)
        if m is not None:
            uses = mdev_uses(host, m, root=root, uid=uid, probe=True)
            if uses:
                raise MdevInUse(the_uuid, uses)
        parent = m.parent if m is not None else record.parent  # type: ignore[union-attr]
        defined = _definition_path(mdevctl_root, parent, the_uuid)
        removing = MdevRecord(
            the_uuid,
            parent,
            m.type_id if m is not None else record.type_id,  # type: ignore[union-attr]
            owner,
            0,
            None,
            os.path.lexists(defined) or (record is not None and record.persist),
            "removing",
        )
        mj.write(removing)
        return _remove_recorded(host, mj, removing, m, mdevctl_root=mdevctl_root)


@dataclass(frozen=True)
class MdevRecovery:
    """What :func:`recover_mdevs` did: mdevs removed, ones left (and why), failures."""

    removed: tuple[MdevChange, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()


def recover_mdevs(
    *,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
    uid: int | None = None,
    mdevctl_root: str | Path = MDEVCTL_ROOT,
    watch: OwnerWatch | None = None,
) -> MdevRecovery:
    """Remove the mdevs kvmvfio made for owners that are gone; go on past failures.

    Finished whoever the owner: a record left ``creating`` or ``removing``
    (its process died between the record and the end). Left, and listed in
    ``skipped``: an mdev in use, one whose owner is alive, a persistent one
    (mdevctl keeps it; ``kvmvfio mdev remove`` removes it), one that is not
    what the record says (another parent or type: not the one kvmvfio
    made; its record is dropped). Never touched: an mdev without a record.
    """
    host = host or Host()
    watch = watch or OwnerWatch(proc=host.procfs)
    mj = MdevJournal(root, uid)
    removed: list[MdevChange] = []
    skipped: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    for the_uuid in mj.uuids():
        try:
            with mj.locked(the_uuid):
                record = mj.read(the_uuid)
                if record is None:
                    continue
                why = _recover_one(
                    host,
                    mj,
                    watch,
                    record,
                    root=root,
                    uid=uid,
                    mdevctl_root=mdevctl_root,
                    removed=removed,
                )
                if why is not None:
                    log.info("mdev %s: left: %s", the_uuid, why)
                    skipped.append((the_uuid, why))
        except KvmvfioError as err:
            log.warning("mdev %s: not removed: %s", the_uuid, err)
            failed.append((the_uuid, str(err)))
    return MdevRecovery(tuple(removed), tuple(skipped), tuple(failed))


def _recover_one(
    host: Host,
    mj: MdevJournal,
    watch: OwnerWatch,
    record: MdevRecord,
    *,
    root: str | Path,
    uid: int | None,
    mdevctl_root: str | Path,
    removed: list[MdevChange],
) -> str | None:
    """Remove what ``record`` covers, or say why it is left (None: done)."""
    m = read_mdev(record.uuid, host.sysfs)
    if m is not None and (m.parent, m.type_id) != (record.parent, record.type_id):
        mj.remove(record.uuid)
        return (
            f"it is an mdev of {m.parent}, type {m.type_id}, not the {record.type_id} of "
            f"{record.parent} kvmvfio made for {shown(record.owner)}; its record was dropped"
        )
    if m is not None:
        uses = mdev_uses(host, m, root=root, uid=uid, probe=True)
        if uses:
            return f"{shown(record.owner)}: it {' and '.join(uses)}"
    if record.state == "created":
        if m is None:
            mj.remove(record.uuid)  # removed behind kvmvfio's back: nothing left to undo
            return None
        if record.persist:
            return (
                f"{shown(record.owner)}: it is persistent (mdevctl's definition); "
                f"`kvmvfio mdev remove {record.uuid} --owner {shown(record.owner)}` removes it"
            )
        state = watch.liveness(record.owner, record.process, [])
        if state.alive:
            return f"{shown(record.owner)}: {state.why}"
    removed.append(_remove_recorded(host, mj, record, m, mdevctl_root=mdevctl_root))
    return None


def records(root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> Iterator[MdevRecord]:
    """Every valid mdev record (an invalid one is logged and skipped)."""
    mj = MdevJournal(root, uid)
    for the_uuid in mj.uuids():
        try:
            record = mj.read(the_uuid)
        except KvmvfioError as err:
            log.error("mdev %s: %s", the_uuid, err)
            continue
        if record is not None:
            yield record
