"""Mediated devices made and removed on a fake tree: records first, refusals, recover, mdevctl.

A plain fake sysfs folder cannot make a device when ``create`` is written,
so :class:`FakeMdevCore` stands in for the kernel's mdev core and mtty at
the one place kvmvfio writes (``kvmvfio.prepare.mdev._write``): ``create``
makes the mdev's folder, links and VFIO nodes as the kernel lays them out,
or refuses as the kernel does (EEXIST, EINVAL, ENOSPC as mtty says when
its ports are gone); ``remove`` takes them away. What the real kernel
does is shown in the lab (tests/lab/test_mdev_life.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmvfio import prepare
from kvmvfio.cli import run
from kvmvfio.errors import (
    InvalidMdevUuid,
    JournalError,
    KvmvfioError,
    MdevClaimed,
    MdevExists,
    MdevInUse,
    MdevNotFound,
    NoMdevInstances,
    NotAnMdevParent,
    UnknownMdevType,
    UsageError,
)
from kvmvfio.host import Host
from kvmvfio.host.mdev import read_mdev
from kvmvfio.host.procs import VFIO_DEVICE_FILE
from kvmvfio.prepare import mdev as pmdev
from kvmvfio.prepare.journal import Journal, Record
from kvmvfio.prepare.owners import OwnerWatch

U1 = "11111111-2222-4333-8444-555555555555"
U2 = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
#: Ports of the fake mtty: mtty-1 takes one, mtty-2 two (as samples/vfio-mdev/mtty.c).
PORTS = 4
NR_PORTS = {"mtty-1": 1, "mtty-2": 2}
FIRST_GROUP = 20


class FakeMdevCore:
    """The kernel's mdev core and mtty, at ``create`` and ``remove``, on a fake tree."""

    def __init__(self, root: Path) -> None:
        self.sys, self.dev, self.proc = root / "sys", root / "dev", root / "proc"
        self.parent = self.sys / "devices/virtual/mtty/mtty"
        self.ports = PORTS
        self.next_group = FIRST_GROUP
        self.writes: list[tuple[str, str]] = []
        for d in (self.sys / "class/mdev_bus", self.sys / "bus/mdev/devices",
                  self.sys / "kernel/iommu_groups", self.sys / "bus/mdev/drivers/vfio_mdev",
                  self.sys / "bus/pci/devices/0000:00:03.0", self.dev / "vfio/devices",
                  self.proc):  # fmt: skip
            d.mkdir(parents=True, exist_ok=True)
        (self.sys / "class/mdev_bus/mtty").symlink_to(self.parent)
        for type_id, nr in NR_PORTS.items():
            t = self.parent / "mdev_supported_types" / type_id
            (t / "devices").mkdir(parents=True)
            (t / "name").write_text("Single port serial\n" if nr == 1 else "Dual port serial\n")
            (t / "description").write_text("")
            (t / "device_api").write_text("vfio-pci\n")
            (t / "create").write_text("")
        self._available()

    def _available(self) -> None:
        for type_id, nr in NR_PORTS.items():
            t = self.parent / "mdev_supported_types" / type_id
            (t / "available_instances").write_text(f"{self.ports // nr}\n")

    def host(self) -> Host:
        return Host(self.sys, self.dev, self.proc)

    def write(self, path: Path, text: str, subject: str) -> None:
        self.writes.append((str(path), text))
        if path.name == "create":
            self._create(path.parent.name, text)
        elif path.name == "remove":
            if not path.exists():
                raise FileNotFoundError(errno.ENOENT, "gone", str(path))
            self._remove(path.parent.name)
        else:
            raise AssertionError(f"unexpected write to {path}")

    def _create(self, type_id: str, text: str) -> None:
        uuid = text.strip().lower()
        if len(uuid) != 36:
            raise OSError(errno.EINVAL, "Invalid argument")
        if (self.sys / "bus/mdev/devices" / uuid).exists():
            raise OSError(errno.EEXIST, "File exists")
        if self.ports < NR_PORTS[type_id]:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.make(uuid, type_id)

    def make(self, uuid: str, type_id: str) -> int:
        """An mdev as the kernel lays it out (also for one kvmvfio did not make)."""
        self.ports -= NR_PORTS[type_id]
        group, self.next_group = self.next_group, self.next_group + 1
        folder = self.parent / uuid
        (folder / f"vfio-dev/vfio{group}").mkdir(parents=True)
        (folder / f"vfio-dev/vfio{group}/dev").write_text(f"511:{group}\n")
        (folder / "remove").write_text("")
        types = self.parent / "mdev_supported_types"
        (folder / "mdev_type").symlink_to(types / type_id)
        (self.sys / f"kernel/iommu_groups/{group}/devices").mkdir(parents=True)
        (self.sys / f"kernel/iommu_groups/{group}/devices" / uuid).symlink_to(folder)
        (folder / "iommu_group").symlink_to(self.sys / f"kernel/iommu_groups/{group}")
        (folder / "driver").symlink_to(self.sys / "bus/mdev/drivers/vfio_mdev")
        (self.sys / "bus/mdev/devices" / uuid).symlink_to(folder)
        (types / type_id / "devices" / uuid).symlink_to(folder)
        (self.dev / f"vfio/{group}").write_text("")
        (self.dev / f"vfio/devices/vfio{group}").write_text("")
        self._available()
        return group

    def _remove(self, uuid: str) -> None:
        folder = self.parent / uuid
        type_id = os.path.basename(os.readlink(folder / "mdev_type"))
        group = int(os.path.basename(os.readlink(folder / "iommu_group")))
        (self.sys / "bus/mdev/devices" / uuid).unlink()
        (self.parent / "mdev_supported_types" / type_id / "devices" / uuid).unlink()
        shutil.rmtree(self.sys / f"kernel/iommu_groups/{group}")
        shutil.rmtree(folder)
        (self.dev / f"vfio/{group}").unlink()
        (self.dev / f"vfio/devices/vfio{group}").unlink()
        self.ports += NR_PORTS[type_id]
        self._available()

    def hold(self, node: Path, pid: int = 4242) -> None:
        """Process ``pid`` holds ``node`` open (its /proc/PID/fd link)."""
        (self.proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
        (self.proc / str(pid) / "comm").write_text("qemu-system-x86\n")
        (self.proc / str(pid) / "fd" / "7").symlink_to(node)


@pytest.fixture
def core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMdevCore:
    fake = FakeMdevCore(tmp_path / "root")
    monkeypatch.setattr(pmdev, "_write", fake.write)
    return fake


@pytest.fixture
def host(core: FakeMdevCore) -> Host:
    return core.host()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    return folder


@pytest.fixture
def defs(tmp_path: Path) -> Path:
    return tmp_path / "etc/mdevctl.d"


@pytest.fixture
def hook() -> Iterator[list[int]]:
    calls: list[int] = []
    old = prepare.set_change_hook(calls.append)
    yield calls
    prepare.set_change_hook(old)


@pytest.fixture
def live() -> OwnerWatch:
    return OwnerWatch(proc=Path("/proc"))


def _digest(*roots: Path) -> str:
    h = hashlib.sha256()
    for root in roots:
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            h.update(folder.encode())
            for name in sorted(files + [d for d in dirs if os.path.islink(Path(folder) / d)]):
                path = Path(folder) / name
                h.update(str(path).encode())
                if path.is_symlink():
                    h.update(os.readlink(path).encode())
                elif path.is_file():
                    h.update(path.read_bytes())
    return h.hexdigest()


def _create(host: Host, root: Path, defs: Path, **kw: object) -> pmdev.MdevChange:
    args: dict[str, object] = {"uuid": U1, "host": host, "root": root, "mdevctl_root": defs}
    args.update(kw)
    return pmdev.create_mdev("mtty", "mtty-2", "vm1", **args)  # type: ignore[arg-type]


# -- making and removing ------------------------------------------------------------------


def test_the_record_is_written_before_the_create_write_and_the_remove_write(
    host: Host, root: Path, defs: Path, core: FakeMdevCore, hook: list[int]
) -> None:
    seen: list[tuple[pmdev.MdevRecord | None, bool]] = []
    prepare.set_change_hook(
        lambda n: seen.append((pmdev.MdevJournal(root).read(U1), read_mdev(U1, host.sysfs) is None))
    )
    done = _create(host, root, defs)
    assert done == pmdev.MdevChange(
        U1, "mtty", "mtty-2", "vm1", persistent=False, definition=None, group=FIRST_GROUP,
        cdev=f"vfio{FIRST_GROUP}",
    )  # fmt: skip
    creating = pmdev.MdevRecord(U1, "mtty", "mtty-2", "vm1", 0, None, False, "creating")
    assert seen == [(creating, False)]  # one host change, made with the record already there
    assert pmdev.MdevJournal(root).read(U1) == pmdev.MdevRecord(
        U1, "mtty", "mtty-2", "vm1", 0, None, False, "created"
    )
    seen.clear()
    gone = pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    assert (gone.uuid, gone.parent, gone.type_id, gone.group) == (U1, "mtty", "mtty-2", 20)
    removing = pmdev.MdevRecord(U1, "mtty", "mtty-2", "vm1", 0, None, False, "removing")
    assert seen == [(removing, True)]
    assert pmdev.MdevJournal(root).uuids() == []
    assert read_mdev(U1, host.sysfs) is None
    assert core.ports == PORTS


def test_a_new_mdev_gets_a_random_uuid(host: Host, root: Path, defs: Path) -> None:
    done = _create(host, root, defs, uuid=None)
    assert done.uuid != U1
    assert read_mdev(done.uuid, host.sysfs) is not None
    assert pmdev.MdevJournal(root).uuids() == [done.uuid]


def test_persist_writes_mdevctls_definition_and_remove_removes_it(
    host: Host, root: Path, defs: Path, hook: list[int]
) -> None:
    done = _create(host, root, defs, persist=True, uuid=U1.upper())
    path = defs / "mtty" / U1
    assert (done.uuid, done.persistent, done.definition) == (U1, True, str(path))
    assert json.loads(path.read_text()) == {"mdev_type": "mtty-2", "start": "auto", "attrs": []}
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert len(hook) == 2  # the create write, the definition
    (state,) = pmdev.mdev_states(host=host, root=root, mdevctl_root=defs)
    assert (state.owner, state.state, state.persistent) == ("vm1", "created", True)
    assert state.definition == pmdev.MdevDefinition(str(path), "mtty-2", "auto")
    gone = pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    assert gone.definition == str(path)
    assert not path.exists()
    assert not path.parent.exists()
    assert len(hook) == 4


@pytest.mark.parametrize(
    ("parent", "type_id", "uuid", "owner", "error", "words"),
    [
        ("nope", "mtty-2", U1, "vm1", NotAnMdevParent, "'nope' is no device with mdev support"),
        ("0000:00:03.0", "mtty-2", U1, "vm1", NotAnMdevParent,
         "is a PCI device whose driver registered no mdev types"),
        ("../mtty", "mtty-2", U1, "vm1", NotAnMdevParent, "parents: mtty"),
        ("mtty", "mtty-9", U1, "vm1", UnknownMdevType,
         "mtty has no mdev type 'mtty-9' (its types: mtty-1, mtty-2"),
        ("mtty", "mtty-2", "1234", "vm1", InvalidMdevUuid, "'1234' is not a mediated device"),
        ("mtty", "mtty-2", U1 + "0", "vm1", InvalidMdevUuid, "is not a mediated device's UUID"),
        ("mtty", "mtty-2", U1.replace("1", "g"), "vm1", InvalidMdevUuid, "not a mediated"),
        ("mtty", "mtty-2", U1, "two words", UsageError, "short name"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_by_name_and_changes_nothing(
    host: Host, root: Path, defs: Path, parent: str, type_id: str, uuid: str, owner: str,
    error: type[Exception], words: str,
) -> None:  # fmt: skip
    before = _digest(host.sysfs, host.devfs, root / "mdev")
    with pytest.raises(error) as refused:
        pmdev.create_mdev(parent, type_id, owner, uuid=uuid, host=host, root=root,
                          mdevctl_root=defs)  # fmt: skip
    assert words in str(refused.value)
    assert _digest(host.sysfs, host.devfs, root / "mdev") == before
    assert not defs.exists()


def test_a_reused_uuid_is_refused_whoever_made_it(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    core.make(U1, "mtty-1")  # made by someone else, not kvmvfio
    before = _digest(host.sysfs, host.devfs, root / "mdev")
    with pytest.raises(MdevExists, match=f"the UUID {U1} is already used .by mdev {U1} of mtty"):
        _create(host, root, defs)
    assert _digest(host.sysfs, host.devfs, root / "mdev") == before
    assert core.writes == []


def test_a_uuid_in_an_mdevctl_definition_is_refused(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    (defs / "0000:00:02.0").mkdir(parents=True)
    (defs / "0000:00:02.0" / U1).write_text('{"mdev_type": "i915-GVTg_V5_4", "start": "manual"}')
    with pytest.raises(MdevExists, match="by mdevctl's definition .*0000:00:02.0/" + U1):
        _create(host, root, defs, persist=True)
    assert core.writes == []
    assert pmdev.MdevJournal(root).uuids() == []


def test_no_instance_left_is_refused_by_name(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    _create(host, root, defs)
    _create(host, root, defs, uuid=U2)
    before = _digest(host.sysfs, host.devfs, root / "mdev")
    with pytest.raises(NoMdevInstances) as refused:
        _create(host, root, defs, uuid=None)
    assert str(refused.value).startswith("mtty has no mtty-2 instance left to create; nothing")
    assert refused.value.errno is None  # seen in available_instances; the kernel was not asked
    assert _digest(host.sysfs, host.devfs, root / "mdev") == before


def test_the_kernels_no_is_mapped_and_its_record_dropped(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    _create(host, root, defs)
    core.ports = 1  # another mtty-1 took a port meanwhile; available_instances still says 1
    (core.parent / "mdev_supported_types/mtty-2/available_instances").write_text("1\n")
    with pytest.raises(NoMdevInstances, match=r"the kernel said ENOSPC") as refused:
        _create(host, root, defs, uuid=U2)
    assert refused.value.errno == errno.ENOSPC
    assert pmdev.MdevJournal(root).uuids() == [U1]


# -- removing: claims and uses ---------------------------------------------------------------


def test_an_mdev_open_in_a_process_is_not_removed(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    _create(host, root, defs)
    core.hold(host.devfs / "vfio" / str(FIRST_GROUP))
    before = _digest(host.sysfs, host.devfs, root / "mdev")
    with pytest.raises(MdevInUse) as refused:
        pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    assert f"mediated device {U1} is in use: it is open in pid 4242 (qemu-system-x86)" in str(
        refused.value
    )
    assert _digest(host.sysfs, host.devfs, root / "mdev") == before
    kept = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert kept.removed == ()
    assert [u for u, _ in kept.skipped] == [U1]


def test_an_mdev_held_by_its_device_file_alone_is_not_removed(
    host: Host, root: Path, defs: Path, core: FakeMdevCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No node names the holder; the kernel's busy group does (the lab shows
    the real kernel keeping it open, and the remove hanging without this)."""
    from kvmvfio.vfio import group as vfio_group  # noqa: PLC0415

    _create(host, root, defs)
    core.hold(Path(VFIO_DEVICE_FILE))
    asked: list[Path] = []
    monkeypatch.setattr(vfio_group, "group_held", lambda node: asked.append(node) or True)
    assert pmdev.mdev_uses(host, read_mdev(U1, host.sysfs), root=root) == ()  # no probe: a read
    assert asked == []
    with pytest.raises(MdevInUse) as refused:
        pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    assert str(refused.value).startswith(
        f"mediated device {U1} is in use: it is open by its device file alone, which keeps "
        f"IOMMU group {FIRST_GROUP} open in the kernel (/proc does not say which device such a "
        "file is; the processes holding a VFIO device file: pid 4242 (qemu-system-x86))"
    )
    assert asked == [host.devfs / "vfio" / str(FIRST_GROUP)]
    kept = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert [u for u, _ in kept.skipped] == [U1]


def test_the_group_probe_opens_and_closes_and_reads_busy_only_as_held(tmp_path: Path) -> None:
    from kvmvfio.vfio.group import group_held  # noqa: PLC0415

    node = tmp_path / "7"
    assert not group_held(node)  # missing: the other checks say so
    node.write_bytes(b"")
    fds = sorted(os.listdir("/proc/self/fd"))
    assert not group_held(node)  # opens: nobody has it
    assert sorted(os.listdir("/proc/self/fd")) == fds  # and closed again


@pytest.mark.parametrize(("code", "held"), [(errno.EBUSY, True), (errno.EACCES, False)])
def test_only_the_kernels_busy_means_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, held: bool
) -> None:
    from kvmvfio.vfio import files as vfio_files  # noqa: PLC0415
    from kvmvfio.vfio import group as vfio_group  # noqa: PLC0415

    def refuse(*_: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(vfio_files.os, "open", refuse)
    assert vfio_group.group_held(tmp_path / "7") is held


def test_an_mdev_whose_group_is_prepared_is_not_removed(host: Host, root: Path, defs: Path) -> None:
    _create(host, root, defs)
    Journal(root).write(Record(FIRST_GROUP, "vm7", 0))
    with pytest.raises(MdevInUse, match=f"is in IOMMU group {FIRST_GROUP}, which kvmvfio holds "
                       "for 'vm7'"):  # fmt: skip
        pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    assert read_mdev(U1, host.sysfs) is not None


def test_a_live_owners_mdev_is_not_removed_by_another(
    host: Host, root: Path, defs: Path, live: OwnerWatch
) -> None:
    _create(host, root, defs, owner_pid=os.getpid(), watch=live)
    with pytest.raises(MdevClaimed) as refused:
        pmdev.remove_mdev(U1, "vm2", host=host, root=root, mdevctl_root=defs, watch=live)
    assert str(refused.value).startswith(
        f"mediated device {U1} was created for 'vm1' (process {os.getpid()} runs)"
    )
    assert refused.value.owner == "vm1"
    assert read_mdev(U1, host.sysfs) is not None
    kept = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs, watch=live)
    assert kept.skipped == ((U1, f"vm1: process {os.getpid()} runs"),)


def test_a_gone_owners_mdev_is_taken_over(host: Host, root: Path, defs: Path) -> None:
    _create(host, root, defs)  # no pid: nothing says the owner is there
    gone = pmdev.remove_mdev(U1, "vm2", host=host, root=root, mdevctl_root=defs)
    assert gone.owner == "vm2"
    assert read_mdev(U1, host.sysfs) is None


def test_an_unknown_uuid_is_not_found(host: Host, root: Path, defs: Path) -> None:
    with pytest.raises(MdevNotFound, match=f"no mediated device {U1} on this host"):
        pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    with pytest.raises(InvalidMdevUuid):
        pmdev.remove_mdev("../../x", "vm1", host=host, root=root, mdevctl_root=defs)


def test_an_mdev_kvmvfio_did_not_make_is_removed_only_when_named(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    core.make(U2, "mtty-1")
    assert pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs) == pmdev.MdevRecovery()
    assert read_mdev(U2, host.sysfs) is not None
    (state,) = pmdev.mdev_states(host=host, root=root, mdevctl_root=defs)
    assert (state.owner, state.persistent) == (None, False)
    pmdev.remove_mdev(U2, "admin", host=host, root=root, mdevctl_root=defs)
    assert read_mdev(U2, host.sysfs) is None
    assert pmdev.MdevJournal(root).uuids() == []


# -- recover ------------------------------------------------------------------------------


def test_recover_removes_a_gone_owners_mdev_and_leaves_a_persistent_one(
    host: Host, root: Path, defs: Path
) -> None:
    _create(host, root, defs)
    _create(host, root, defs, uuid=U2, persist=True)
    done = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert [c.uuid for c in done.removed] == [U1]
    ((uuid, why),) = done.skipped
    assert uuid == U2
    assert "it is persistent" in why
    assert f"kvmvfio mdev remove {U2}" in why
    assert read_mdev(U1, host.sysfs) is None
    assert read_mdev(U2, host.sysfs) is not None
    assert pmdev.MdevJournal(root).uuids() == [U2]


@pytest.mark.parametrize(("persist", "crash_at"), [(False, 1), (True, 1), (True, 2)])
def test_a_crash_at_every_step_of_create_is_recovered(
    host: Host, root: Path, defs: Path, core: FakeMdevCore, live: OwnerWatch, persist: bool,
    crash_at: int,
) -> None:  # fmt: skip
    made: list[int] = []

    def crash(n: int) -> None:  # n counts the process's changes: count this call's
        made.append(n)
        if len(made) == crash_at:
            raise SystemExit("killed")

    old = prepare.set_change_hook(crash)
    try:
        with pytest.raises(SystemExit):
            # A live owner: a record left "creating" is finished whoever the owner is.
            _create(host, root, defs, persist=persist, owner_pid=os.getpid(), watch=live)
    finally:
        prepare.set_change_hook(old)
    assert pmdev.MdevJournal(root).read(U1).state == "creating"  # type: ignore[union-attr]
    done = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs, watch=live)
    assert [c.uuid for c in done.removed] == [U1]
    assert read_mdev(U1, host.sysfs) is None
    assert not (defs / "mtty" / U1).exists()
    assert pmdev.MdevJournal(root).uuids() == []
    assert core.ports == PORTS


def test_a_crash_before_the_create_write_leaves_a_record_recover_drops(
    host: Host, root: Path, defs: Path
) -> None:
    pmdev.MdevJournal(root).write(
        pmdev.MdevRecord(U1, "mtty", "mtty-2", "vm1", 0, None, True, "creating")
    )
    done = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert [(c.uuid, c.group, c.definition) for c in done.removed] == [(U1, None, None)]
    assert pmdev.MdevJournal(root).uuids() == []


def test_a_crash_during_remove_is_finished_by_recover(
    host: Host, root: Path, defs: Path, hook: list[int]
) -> None:
    _create(host, root, defs, persist=True)

    def crash(n: int) -> None:
        raise SystemExit("killed")

    prepare.set_change_hook(crash)
    with pytest.raises(SystemExit):
        pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)
    prepare.set_change_hook(None)
    assert (defs / "mtty" / U1).exists()  # the crash came before the definition went
    done = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert [(c.uuid, c.definition) for c in done.removed] == [(U1, str(defs / "mtty" / U1))]
    assert not (defs / "mtty" / U1).exists()
    assert pmdev.MdevJournal(root).uuids() == []


def test_a_record_of_another_mdev_is_dropped_and_the_mdev_left(
    host: Host, root: Path, defs: Path, core: FakeMdevCore
) -> None:
    core.make(U1, "mtty-1")
    pmdev.MdevJournal(root).write(
        pmdev.MdevRecord(U1, "mtty", "mtty-2", "vm1", 0, None, False, "created")
    )
    done = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert done.removed == ()
    assert "not the mtty-2 of mtty" in done.skipped[0][1]
    assert read_mdev(U1, host.sysfs) is not None
    assert pmdev.MdevJournal(root).uuids() == []


# -- hostile records ----------------------------------------------------------------------


def _good() -> dict[str, object]:
    return {"version": 1, "uuid": U1, "parent": "mtty", "type_id": "mtty-2", "owner": "vm1",
            "pid": 0, "pid_start": None, "persist": False, "state": "created"}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"extra": 1}, "unknown key"),
        ({"uuid": U2}, f"its 'uuid' is \"{U2}\""),
        ({"version": 2}, "version 2"),
        ({"parent": "../../etc"}, "'parent' \"../../etc\" is refused"),
        ({"type_id": "a/b"}, "'type_id' \"a/b\" is refused"),
        ({"owner": "two words"}, "'owner'"),
        ({"pid": -1}, "'pid' must be a whole number"),
        ({"pid": True}, "'pid' must be a whole number"),
        ({"persist": 1}, "'persist' must be true or false"),
        ({"state": "gone"}, "'state' \"gone\" is not one of creating, created, removing"),
    ],
)
def test_a_hostile_record_is_refused_naming_its_file(
    host: Host, root: Path, defs: Path, core: FakeMdevCore, change: dict[str, object], words: str
) -> None:
    core.make(U1, "mtty-2")
    pmdev.MdevJournal(root).folder.write(f"{U1}.json", json.dumps({**_good(), **change}).encode())
    with pytest.raises(JournalError) as refused:
        pmdev.MdevJournal(root).read(U1)
    assert refused.value.path == root / "mdev" / f"{U1}.json"
    assert words in str(refused.value)
    done = pmdev.recover_mdevs(host=host, root=root, mdevctl_root=defs)
    assert done.removed == ()
    assert [u for u, _ in done.failed] == [U1]
    assert read_mdev(U1, host.sysfs) is not None  # nothing a refused record names is acted on
    with pytest.raises(JournalError):
        pmdev.remove_mdev(U1, "vm1", host=host, root=root, mdevctl_root=defs)


def test_a_record_too_large_or_not_json_is_refused(root: Path) -> None:
    mj = pmdev.MdevJournal(root)
    mj.folder.write(f"{U1}.json", b"[" * 100_000)
    with pytest.raises(JournalError, match="larger than"):
        mj.read(U1)
    mj.folder.write(f"{U1}.json", b"\xff")
    with pytest.raises(JournalError, match="not UTF-8"):
        mj.read(U1)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.dictionaries(st.sampled_from(list(_good())), st.none() | st.integers() | st.text(),
                        max_size=9).map(lambda d: json.dumps({**_good(), **d}).encode()),
    )
)  # fmt: skip
def test_any_record_parses_or_is_a_journal_error(raw: bytes) -> None:
    try:
        record = pmdev.parse_mdev_record(Path("/run/kvmvfio/mdev/x.json"), U1, raw)
    except JournalError:
        return
    assert record.uuid == U1
    assert record.state in ("creating", "created", "removing")


# -- the command line ---------------------------------------------------------------------


def _cli(host: Host, root: Path, defs: Path, *words: str) -> list[str]:
    return [*words, "--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs),
            "--root", str(root), "--mdevctl-root", str(defs)]  # fmt: skip


def test_the_cli_creates_lists_and_removes(
    host: Host, root: Path, defs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(_cli(host, root, defs, "mdev", "types", "mtty", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    (parent,) = doc["parents"]
    assert [(t["id"], t["available"]) for t in parent["types"]] == [("mtty-1", 4), ("mtty-2", 2)]
    words = ("mdev", "create", "mtty", "mtty-2", "--uuid", U1, "--owner", "vm1", "--persist")
    assert run(_cli(host, root, defs, *words, "--json")) == 0
    created = json.loads(capsys.readouterr().out)["created"]
    assert (created["uuid"], created["persistent"], created["group"]) == (U1, True, FIRST_GROUP)
    assert run(_cli(host, root, defs, "mdev", "list", "--json")) == 0
    (listed,) = json.loads(capsys.readouterr().out)["mdevs"]
    assert {k: listed[k] for k in ("uuid", "parent", "type_id", "owner", "persistent")} == {
        "uuid": U1, "parent": "mtty", "type_id": "mtty-2", "owner": "vm1", "persistent": True,
    }  # fmt: skip
    assert listed["definition"]["start"] == "auto"
    assert run(_cli(host, root, defs, "mdev", "list")) == 0
    assert capsys.readouterr().out == (
        f"{U1} mtty mtty-2: IOMMU group {FIRST_GROUP}; for vm1; persistent (mdevctl)\n"
    )
    assert run(_cli(host, root, defs, "mdev", "remove", U1, "--owner", "vm1")) == 0
    assert capsys.readouterr().out.startswith(f"mdev {U1}: removed (mtty-2 of mtty)\n")


@pytest.mark.parametrize(
    ("words", "code", "start"),
    [
        (("create", "mtty", "mtty-7", "--owner", "vm1"), 2, "kvmvfio: mtty has no mdev type"),
        (("create", "gpu0", "x-1", "--owner", "vm1"), 2, "kvmvfio: 'gpu0' is no device"),
        (("create", "mtty", "mtty-1", "--uuid", "x", "--owner", "vm1"), 2,
         "kvmvfio: 'x' is not a mediated device's UUID"),
        (("create", "mtty", "mtty-1", "--uuid", U1, "--owner", "vm1"), 1,
         f"kvmvfio: the UUID {U1} is already used"),
        (("remove", U2, "--owner", "vm1"), 1, f"kvmvfio: no mediated device {U2}"),
        (("create", "mtty", "mtty-1"), 2, "usage:"),
    ],
)  # fmt: skip
def test_the_cli_refuses_in_one_sentence(
    host: Host, root: Path, defs: Path, core: FakeMdevCore, capsys: pytest.CaptureFixture[str],
    words: tuple[str, ...], code: int, start: str,
) -> None:  # fmt: skip
    core.make(U1, "mtty-1")
    before = _digest(host.sysfs, host.devfs, root / "mdev")
    assert run(_cli(host, root, defs, "mdev", *words)) == code
    err = capsys.readouterr().err
    assert err.startswith(start)
    assert "Traceback" not in err
    if code == 1 or "kvmvfio:" in start:
        assert err.count("\n") == 1
    assert _digest(host.sysfs, host.devfs, root / "mdev") == before


def test_recover_reports_mdevs_in_its_json(
    host: Host, root: Path, defs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _create(host, root, defs)
    assert run(_cli(host, root, defs, "recover", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["uuid"] for c in doc["mdevs"]["removed"]] == [U1]
    assert doc["mdevs"]["skipped"] == []
    assert doc["mdevs"]["failed"] == []
    assert read_mdev(U1, host.sysfs) is None


def test_every_refusal_is_a_kvmvfio_error() -> None:
    for cls in (NotAnMdevParent, UnknownMdevType, MdevExists, NoMdevInstances, MdevInUse,
                MdevClaimed):  # fmt: skip
        assert issubclass(cls, KvmvfioError)
