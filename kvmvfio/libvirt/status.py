"""The agent's status file: what it did with each domain's devices, for ``kvmvfio agent status``.

The agent rewrites ``/run/kvmvfio/status/agent.json`` after each
reconciliation (a temporary file renamed over the old one, through
:class:`~kvmvfio.prepare.rundir.RunFolder`: no link followed, root's files
of mode 0600 only). It says who wrote it (the agent's pid and that
process's start time, so a file left by an agent that is gone, or whose pid
was reused, is told from a live one) and, per domain: its devices, whether
QEMU held each at the last look, what the agent last did with it and when,
and a refusal waiting for a retry.

The file is input to whoever reads it: :func:`parse_status` checks its
size, shape and every type, and anything else is refused with
:class:`~kvmvfio.libvirt.errors.StatusFileInvalid` naming the file. Nothing
acts on it; it is only shown.

It lives in a folder of its own, not beside the agent's per-domain records
(``agent/NAME.json``), so that no domain name can collide with it.
"""

from __future__ import annotations

import enum
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmvfio.errors import shown
from kvmvfio.host.mdev import canonical_name
from kvmvfio.host.procs import ProcessId
from kvmvfio.libvirt.errors import StatusFileInvalid
from kvmvfio.prepare.journal import DEFAULT_ROOT
from kvmvfio.prepare.owners import OwnerWatch
from kvmvfio.prepare.rundir import RunFolder

__all__ = [
    "STATUS_FILE",
    "STATUS_FOLDER",
    "Action",
    "AgentReport",
    "AgentStatus",
    "DeviceStatus",
    "DomainStatus",
    "Refusal",
    "StatusFile",
    "agent_report",
    "own_process",
    "parse_status",
]

#: The folder under ``/run/kvmvfio`` and the file the agent's status is in.
STATUS_FOLDER = "status"
STATUS_FILE = "agent.json"
#: Largest status file read: a few hundred domains of a few devices each is ~100 KiB.
MAX_STATUS = 1 << 20
#: Most domains, and devices per domain, a status file may list.
_MAX_ITEMS = 4096
#: Longest string a status file may hold (a refusal's sentence is the longest).
_MAX_TEXT = 4096
#: The version of the file's shape (and of ``agent status --json``).
SCHEMA = 1


class Action(enum.StrEnum):
    """What the agent last did with a device."""

    ATTACHED = "attached"  # handed to QEMU by fd
    ADOPTED = "adopted"  # found in QEMU and recorded as the agent's (a restart of ours)
    UNCHANGED = "unchanged"  # found in QEMU, already recorded: nothing to do
    RELEASED = "released"  # unplugged (or the domain stopped) and given back to its driver
    REFUSED = "refused"  # not attached: see the refusal; tried again at the next reconcile


@dataclass(frozen=True)
class Refusal:
    """A refusal waiting for a retry: kvmvfio's sentence, its class, when, and the next try."""

    message: str
    error: str
    at: float
    retry_at: float | None


@dataclass(frozen=True)
class DeviceStatus:
    """One device of a domain as the agent last saw it."""

    address: str
    handoff: str
    path: str
    wanted: bool
    held: bool
    action: Action
    at: float
    refusal: Refusal | None = None


@dataclass(frozen=True)
class DomainStatus:
    """One domain: running or not, its devices, and a refusal of the whole domain."""

    name: str
    uuid: str | None
    running: bool
    checked: float
    devices: tuple[DeviceStatus, ...] = ()
    refusal: Refusal | None = None


@dataclass(frozen=True)
class AgentStatus:
    """The whole file: who wrote it, when, and each domain."""

    pid: int
    pid_start: int | None
    started: float
    updated: float
    uri: str
    connected: bool
    resync: float
    domains: tuple[DomainStatus, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The document written (and printed by ``agent status --json``, with more)."""
        return {"schema": SCHEMA, **asdict(self)}


class StatusFile:
    """``ROOT/status/agent.json``, written and read without trust (uid: the owner expected)."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> None:
        self.folder = RunFolder(root, STATUS_FOLDER, uid)
        self.path = self.folder.path / STATUS_FILE

    def write(self, status: AgentStatus) -> None:
        """Replace the file with ``status`` (temporary file, rename)."""
        self.folder.write(STATUS_FILE, json.dumps(status.to_json()).encode())

    def read(self) -> AgentStatus | None:
        """The status the file holds; None when there is none.

        Raise :class:`~kvmvfio.prepare.errors.UntrustedFile` for a file (or
        folder) kvmvfio did not make, and :class:`StatusFileInvalid` for
        one whose contents are not a status the agent writes.
        """
        raw = self.folder.read(STATUS_FILE, MAX_STATUS)
        if raw is None:
            return None
        try:
            return parse_status(raw)
        except (ValueError, RecursionError) as err:
            raise StatusFileInvalid(self.path, str(err)) from None

    def remove(self) -> None:
        """Remove the file (nothing when it is absent)."""
        self.folder.remove(STATUS_FILE)


# -- reading without trust ------------------------------------------------------------------


def parse_status(raw: bytes) -> AgentStatus:
    """The status in ``raw``; ValueError, saying what is wrong, for anything else."""
    if len(raw) > MAX_STATUS:
        raise ValueError(f"it is larger than {MAX_STATUS} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"it is not JSON ({err.msg} at line {err.lineno})") from None
    top = _object(doc, "the document")
    if top.get("schema") != SCHEMA:
        raise ValueError(f"its 'schema' is not {SCHEMA}")
    domains = _list(top, "domains", "the document")
    return AgentStatus(
        pid=_int(top, "pid", "the document", low=1),
        pid_start=_int(top, "pid_start", "the document", low=0, null=True),
        started=_time(top, "started", "the document"),
        updated=_time(top, "updated", "the document"),
        uri=_text(top, "uri", "the document"),
        connected=_bool(top, "connected", "the document"),
        resync=_time(top, "resync", "the document"),
        domains=tuple(_domain(d, i) for i, d in enumerate(domains)),
    )


def _domain(value: object, index: int) -> DomainStatus:
    where = f"domain {index}"
    obj = _object(value, where)
    name = _text(obj, "name", where)
    where = f"domain {shown(repr(name), 80)}"
    devices = _list(obj, "devices", where)
    return DomainStatus(
        name=name,
        uuid=_text(obj, "uuid", where, null=True),
        running=_bool(obj, "running", where),
        checked=_time(obj, "checked", where),
        devices=tuple(_device(d, where) for d in devices),
        refusal=_refusal(obj, where),
    )


def _device(value: object, domain: str) -> DeviceStatus:
    obj = _object(value, f"a device of {domain}")
    address = _text(obj, "address", f"a device of {domain}")
    try:
        ok = canonical_name(address) == address
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{domain} lists {shown(repr(address), 80)}, not a PCI address or mdev UUID"
        )
    where = f"device {address} of {domain}"
    action = _text(obj, "action", where)
    if action not in set(Action):
        raise ValueError(f"the 'action' of {where} is not one of {', '.join(Action)}")
    return DeviceStatus(
        address=address,
        handoff=_text(obj, "handoff", where),
        path=_text(obj, "path", where),
        wanted=_bool(obj, "wanted", where),
        held=_bool(obj, "held", where),
        action=Action(action),
        at=_time(obj, "at", where),
        refusal=_refusal(obj, where),
    )


def _refusal(obj: dict[str, object], where: str) -> Refusal | None:
    value = _field(obj, "refusal", where)
    if value is None:
        return None
    where = f"the refusal of {where}"
    ref = _object(value, where)
    return Refusal(
        message=_text(ref, "message", where),
        error=_text(ref, "error", where),
        at=_time(ref, "at", where),
        retry_at=_time(ref, "retry_at", where, null=True),
    )


def _field(obj: dict[str, object], key: str, where: str) -> object:
    if key not in obj:
        raise ValueError(f"{where} has no {key!r}")
    return obj[key]


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} is not an object")
    return value


def _list(obj: dict[str, object], key: str, where: str) -> list[object]:
    value = _field(obj, key, where)
    if not isinstance(value, list) or len(value) > _MAX_ITEMS:
        raise ValueError(f"the {key!r} of {where} is not a list of at most {_MAX_ITEMS}")
    return value


def _text(obj: dict[str, object], key: str, where: str, *, null: bool = False) -> Any:
    value = _field(obj, key, where)
    if value is None and null:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise ValueError(f"the {key!r} of {where} is not a string of at most {_MAX_TEXT}")
    return value


def _bool(obj: dict[str, object], key: str, where: str) -> bool:
    value = _field(obj, key, where)
    if type(value) is not bool:
        raise ValueError(f"the {key!r} of {where} is not true or false")
    return value


def _int(obj: dict[str, object], key: str, where: str, *, low: int, null: bool = False) -> Any:
    value = _field(obj, key, where)
    if value is None and null:
        return None
    if type(value) is not int or not low <= value < 1 << 63:
        raise ValueError(f"the {key!r} of {where} is not a whole number of at least {low}")
    return value


def _time(obj: dict[str, object], key: str, where: str, *, null: bool = False) -> Any:
    value = _field(obj, key, where)
    if value is None and null:
        return None
    # bool is an int to Python, not a number of seconds to JSON.
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"the {key!r} of {where} is not a time in seconds")
    if not math.isfinite(value) or not 0 <= value < 1e11:
        raise ValueError(f"the {key!r} of {where} is not a time in seconds")
    return float(value)


# -- what `kvmvfio agent status` says --------------------------------------------------------


@dataclass(frozen=True)
class AgentReport:
    """The status file read, and whether the agent that wrote it still runs (and why not)."""

    path: Path
    status: AgentStatus | None
    running: bool
    why: str


def agent_report(
    root: str | Path = DEFAULT_ROOT, *, proc: str | Path = "/proc", uid: int | None = None
) -> AgentReport:
    """Read the agent's status file and tell whether its writer still runs.

    Raise :class:`~kvmvfio.prepare.errors.UntrustedFile` or
    :class:`StatusFileInvalid` for a file that is not the agent's.
    """
    file = StatusFile(root, uid)
    status = file.read()
    if status is None:
        return AgentReport(file.path, None, False, f"there is no status file {file.path}")
    watch = OwnerWatch(proc=Path(proc))
    live = watch.liveness("", ProcessId(status.pid, status.pid_start), [])
    if live.alive and status.pid_start is None:
        # Without a start time a reused pid would pass: not written by the agent.
        return AgentReport(file.path, status, False, f"{file.path} records no start time")
    why = f"pid {status.pid} runs" if live.alive else live.why
    return AgentReport(file.path, status, live.alive, why)


def own_process(proc: str | Path = "/proc") -> ProcessId:
    """This process, with its start time when /proc says it."""
    return OwnerWatch(proc=Path(proc)).identify(os.getpid()) or ProcessId(os.getpid())
