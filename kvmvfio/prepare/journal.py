"""The journal: what kvmvfio changed on the host, written down before it changes it.

One file per IOMMU group kvmvfio prepared, under ``/run/kvmvfio/journal``
(root only, mode 0600): the owner, and for each member that had to move,
its original driver and ``driver_override``, plus how many host changes
were made so far. The file is rewritten (temporary file, ``fsync``,
``rename``, ``fsync`` of the folder) *before* each host change, so after a
crash of kvmvfio or of user space the journal always covers every change
made. ``/run`` is a tmpfs: a reboot empties it, and a reboot also undoes
every binding, so nothing is lost there either.

Format (JSON, ``"version": 1``)::

    {"version": 1, "group": 4, "owner": "vm1", "pid": 1234, "pid_start": 56789,
     "steps": 3,
     "devices": [{"address": "0000:01:01.0", "driver": "e1000e", "override": null}]}

``pid`` is the owner's process (0: none recorded) and ``pid_start`` its start
time in clock ticks after boot (``/proc/PID/stat``; absent in records of
older kvmvfio versions), so that a reused pid is not taken for the owner.

A record is input like any other: a crash, a full disk or a careless hand
can damage it, and kvmvfio acts on it as root. :meth:`Journal.read` parses
it once, into a :class:`Record` whose every field is checked (the keys, each
value's type and range, PCI addresses in the kernel's canonical form, driver
names as the kernel allows them, the group agreeing with the file's name);
:func:`check_on_host` then checks that the devices it names are in its
group on the live host. A record that fails either is never acted on: it is
refused with :class:`JournalError` (what is wrong, which file, what to do)
and left for the operator. The files themselves are opened without trust
(:mod:`kvmvfio.prepare.rundir`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmvfio.errors import DeviceNotFound, KvmvfioError, NoIommuGroup
from kvmvfio.host import Host, PciAddress
from kvmvfio.host.procs import ProcessId
from kvmvfio.prepare.driver import driver_name_problem
from kvmvfio.prepare.errors import JournalError
from kvmvfio.prepare.rundir import RunFolder

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_ROOT = Path("/run/kvmvfio")

#: Largest journal file read; a record of a 256-device group is about 20 KiB.
MAX_BYTES = 1 << 20
#: Most devices one record may name.
MAX_DEVICES = 4096
#: Longest owner name (prepare refuses longer ones).
MAX_OWNER = 200
#: Largest IOMMU group number, pid, and count (``steps``, ``pid_start``).
MAX_GROUP = 2**31 - 1
MAX_PID = 2**31 - 1
MAX_COUNT = 2**63 - 1

#: The only file names read: ``group-N.json``, N in decimal without leading zeros.
_FILE_NAME = re.compile(r"group-(0|[1-9][0-9]{0,9})\.json")
_REQUIRED = ("version", "group", "owner", "pid", "devices")
#: ``steps`` and ``pid_start`` are absent from records written by older kvmvfio versions.
_OPTIONAL = ("steps", "pid_start")
_ENTRY_KEYS = ("address", "driver", "override")
#: ``reset`` is written only when true, so a record without one reads as before.
_ENTRY_OPTIONAL = ("reset",)


def owner_problem(owner: str) -> str | None:
    """Why ``owner`` cannot name a claim's owner, or None when it can.

    An owner is a short name (a VM name, ``libvirt:NAME``): 1 to 200
    characters, no whitespace, no NUL, valid Unicode. Other control
    characters are allowed, and printed escaped.
    """
    if not owner:
        return "it is empty"
    if len(owner) > MAX_OWNER:
        return f"it is longer than {MAX_OWNER} characters"
    if any(c.isspace() for c in owner):
        return "it holds whitespace"
    if "\0" in owner:
        return "it holds a NUL"
    if any("\ud800" <= c <= "\udfff" for c in owner):
        return "it is not valid Unicode (a lone surrogate)"
    return None


@dataclass
class Entry:
    """One device kvmvfio moved: what it had before, and whether to reset it on the way back.

    ``reset`` is the wish of whoever prepared it (a domain's ``reset="yes"``),
    kept so that any release honours it: the hook's, the agent's for a
    stopped domain, ``kvmvfio release`` and ``recover``.
    """

    address: str
    driver: str | None
    override: str | None
    reset: bool = False


@dataclass
class Record:
    """One group's journal."""

    group: int
    owner: str
    pid: int
    steps: int = 0
    devices: list[Entry] = field(default_factory=list)
    pid_start: int | None = None

    @property
    def process(self) -> ProcessId | None:
        """The owner's process as recorded, or None."""
        return ProcessId(self.pid, self.pid_start) if self.pid > 0 else None


class Journal:
    """The journal folder (``/run/kvmvfio/journal``).

    ``uid`` is the owner its folder and files must have (default: the
    effective uid kvmvfio runs as); see :mod:`kvmvfio.prepare.rundir`.
    """

    def __init__(self, root: str | Path = DEFAULT_ROOT, uid: int | None = None) -> None:
        self.folder = RunFolder(root, "journal", uid)
        self.dir = self.folder.path

    @staticmethod
    def file_name(group: int) -> str:
        return f"group-{group}.json"

    def path(self, group: int) -> Path:
        return self.dir / self.file_name(group)

    def write(self, record: Record) -> None:
        """Write ``record`` durably (fsync of the file and the folder) before a change."""
        doc = {"version": VERSION, **asdict(record)}
        for entry in doc["devices"]:
            if not entry["reset"]:
                del entry["reset"]
        data = json.dumps(doc, indent=1).encode()
        self.folder.write(self.file_name(record.group), data)

    def read(self, group: int) -> Record | None:
        """The group's record, or None when kvmvfio changed nothing there.

        Raise :class:`JournalError` for a record that is not valid,
        :class:`~kvmvfio.prepare.rundir.UntrustedFile` for a file or folder
        kvmvfio did not make.
        """
        raw = self.folder.read(self.file_name(group), MAX_BYTES)
        return None if raw is None else parse_record(self.path(group), group, raw)

    def groups(self) -> list[int]:
        """The groups that have a journal file, sorted (their records are not read)."""
        names = self.folder.keys(
            _FILE_NAME, "a journal file name (group-N.json)", lambda n: int(n) <= MAX_GROUP
        )
        return sorted(int(n) for n in names)

    def records(self) -> list[Record]:
        """Every valid record, by group; an invalid one is logged and skipped.

        (:meth:`read` raises for it; ``kvmvfio status`` shows it.)
        """
        out = []
        for group in self.groups():
            try:
                record = self.read(group)
            except KvmvfioError as err:
                log.error("group %d: %s", group, err)
                continue
            if record is not None:
                out.append(record)
        return out

    def remove(self, group: int) -> None:
        self.folder.remove(self.file_name(group))


# -- parsing -----------------------------------------------------------------------------


class _Invalid(Exception):
    """One thing wrong with a record (becomes a JournalError naming the file)."""


@dataclass(frozen=True)
class _Literal:
    """A JSON number kvmvfio never writes (a fraction, an exponent, 21 digits or more)."""

    text: str


def _shown(value: object) -> str:
    """``value`` as JSON, bounded: for messages about hostile records."""
    if isinstance(value, _Literal):
        text = value.text
    elif isinstance(value, list):
        return "a list"
    elif isinstance(value, dict):
        return "an object"
    else:
        text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:59]}…"


def _int_literal(text: str) -> int | _Literal:
    # Python refuses ints above 4300 digits with its own ValueError: never get there.
    return int(text) if len(text) <= 20 else _Literal(text)


def _constant(text: str) -> object:
    raise _Invalid(f"it holds {text}, which JSON does not have")


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"the key {_shown(key)} appears twice")
        out[key] = value
    return out


def _count(where: str, value: object, top: int) -> int:
    # bool is an int in Python, not in a record.
    if type(value) is not int or not 0 <= value <= top:
        raise _Invalid(f"{where} must be a whole number in 0..{top}, not {_shown(value)}")
    return value


def _name(where: str, value: object, problem: Callable[[str], str | None]) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be text, not {_shown(value)}")
    why = problem(value)
    if why is not None:
        raise _Invalid(f"{where} {_shown(value)} is refused: {why}")
    return value


def _optional_driver(where: str, value: object) -> str | None:
    return None if value is None else _name(where, value, driver_name_problem)


def _keys(
    where: str, doc: dict[str, object], required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    known = (*required, *optional)
    unknown = [k for k in doc if k not in known]
    if unknown:
        raise _Invalid(
            f"{where}has an unknown key {_shown(unknown[0])} (known: {', '.join(known)})"
        )
    missing = [k for k in required if k not in doc]
    if missing:
        raise _Invalid(f"{where}has no {missing[0]!r}")


def _address(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{where} must be a PCI address, not {_shown(value)}")
    try:
        parsed = PciAddress.parse(value)
    except KvmvfioError:
        raise _Invalid(f"{where} {_shown(value)} is not a PCI address") from None
    if str(parsed) != value:
        raise _Invalid(f"{where} {_shown(value)} is not as kvmvfio writes it ({parsed})")
    return value


def _entries(value: object) -> list[Entry]:
    if not isinstance(value, list):
        raise _Invalid(f"'devices' must be a list, not {_shown(value)}")
    if len(value) > MAX_DEVICES:
        raise _Invalid(f"'devices' names {len(value)} devices, more than {MAX_DEVICES}")
    out: list[Entry] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        where = f"devices[{i}]"
        if not isinstance(item, dict):
            raise _Invalid(f"{where} must be an object, not {_shown(item)}")
        _keys(f"{where} ", item, _ENTRY_KEYS, _ENTRY_OPTIONAL)
        address = _address(f"{where}.address", item["address"])
        if address in seen:
            raise _Invalid(f"{where}.address {address} appears twice")
        seen.add(address)
        driver = _optional_driver(f"{where}.driver", item["driver"])
        override = _optional_driver(f"{where}.override", item["override"])
        reset = item.get("reset", False)
        if type(reset) is not bool:
            raise _Invalid(f"{where}.reset must be true or false, not {_shown(reset)}")
        out.append(Entry(address, driver, override, reset))
    return out


def _decode(raw: bytes) -> object:
    if len(raw) > MAX_BYTES:
        raise _Invalid(f"it is larger than {MAX_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Invalid(f"it is not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_float=_Literal,
            parse_int=_int_literal,
        )
    except json.JSONDecodeError as err:
        raise _Invalid(
            f"it is not JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise _Invalid("it is nested too deeply to be a record") from None


def parse_record(path: Path, group: int, raw: bytes) -> Record:
    """The record in ``raw``, read from ``path``, the file of IOMMU group ``group``.

    Raise :class:`JournalError`, naming ``path`` and the first problem
    found, for anything that is not a record as kvmvfio writes it.
    """
    try:
        doc = _decode(raw)
        if not isinstance(doc, dict):
            raise _Invalid(f"it is {_shown(doc)}, not a JSON object")
        if "version" not in doc:
            raise _Invalid("it has no 'version'")
        version = doc["version"]
        if type(version) is not int or version != VERSION:
            raise _Invalid(f"version {_shown(version)}, expected {VERSION}")
        _keys("it ", doc, _REQUIRED, _OPTIONAL)
        number = _count("'group'", doc["group"], MAX_GROUP)
        if number != group:
            raise _Invalid(f"it is the file of IOMMU group {group} but its 'group' is {number}")
        start = doc.get("pid_start")
        return Record(
            group=number,
            owner=_name("'owner'", doc["owner"], owner_problem),
            pid=_count("'pid'", doc["pid"], MAX_PID),
            steps=_count("'steps'", doc.get("steps", 0), MAX_COUNT),
            devices=_entries(doc["devices"]),
            pid_start=None if start is None else _count("'pid_start'", start, MAX_COUNT),
        )
    except _Invalid as err:
        raise JournalError(path, str(err)) from None


def check_on_host(host: Host, record: Record, path: Path) -> None:
    """Check that every device ``record`` names is in its IOMMU group on ``host``.

    Raise :class:`JournalError` for one that is not (in another group, in
    none, not on the host): nothing of such a record may be acted on.
    """
    for i, entry in enumerate(record.devices):
        where = f"devices[{i}] {entry.address}"
        try:
            number = host.group_of(entry.address).number
        except DeviceNotFound:
            raise JournalError(path, f"{where} is not on this host") from None
        except NoIommuGroup:
            raise JournalError(path, f"{where} is in no IOMMU group on this host") from None
        if number != record.group:
            raise JournalError(
                path, f"{where} is in IOMMU group {number} on this host, not {record.group}"
            )
