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
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmvfio.errors import KvmvfioError
from kvmvfio.host.procs import ProcessId

VERSION = 1
DEFAULT_ROOT = Path("/run/kvmvfio")


class JournalError(KvmvfioError):
    """A journal file is unreadable or malformed; it is left in place for a human."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(
            f"the kvmvfio journal {path} is unusable ({problem}); it was left as it is: "
            "check the devices it names by hand, then remove it"
        )


@dataclass
class Entry:
    """One device kvmvfio moved: what it had before."""

    address: str
    driver: str | None
    override: str | None


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
    """The journal folder (``/run/kvmvfio/journal``)."""

    def __init__(self, root: str | Path = DEFAULT_ROOT) -> None:
        self.dir = Path(root) / "journal"

    def path(self, group: int) -> Path:
        return self.dir / f"group-{group}.json"

    def write(self, record: Record) -> None:
        """Write ``record`` durably (fsync of the file and the folder) before a change."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        final = self.path(record.group)
        tmp = final.with_suffix(".tmp")
        data = json.dumps({"version": VERSION, **asdict(record)}, indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def read(self, group: int) -> Record | None:
        """The group's record, or None when kvmvfio changed nothing there."""
        path = self.path(group)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return _parse(path, raw)

    def records(self) -> list[Record]:
        """Every record, by group."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.glob("group-*.json")):
            out.append(_parse(path, path.read_bytes()))
        return sorted(out, key=lambda r: r.group)

    def remove(self, group: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(group).unlink()


def _parse(path: Path, raw: bytes) -> Record:
    try:
        doc = json.loads(raw)
        if doc.get("version") != VERSION:
            raise JournalError(path, f"version {doc.get('version')!r}, expected {VERSION}")
        devices = [
            Entry(str(d["address"]), d.get("driver"), d.get("override")) for d in doc["devices"]
        ]
        return Record(
            group=int(doc["group"]),
            owner=str(doc["owner"]),
            pid=int(doc["pid"]),
            steps=int(doc.get("steps", 0)),
            devices=devices,
            pid_start=_optional_count(doc.get("pid_start")),
        )
    except JournalError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise JournalError(path, f"{type(err).__name__}: {err}") from None


def _optional_count(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 63:
        raise ValueError(f"pid_start is {value!r}, not a count of clock ticks")
    return value
