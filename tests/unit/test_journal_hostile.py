"""The journal, the claim locks and the agent's records are input: damaged ones are refused.

Two tiers. Examples first: each kind of damage, and the sentence kvmvfio
answers with. Then a property-based tier (hypothesis): generated journal
folders (valid and damaged records, huge numbers, hostile strings, file
names that disagree with the record, links, FIFOs and folders in place of
files, other modes and owners) go through ``status``, ``recover`` and
``release`` on a fake host, and for each case:

- the answer is a result or a kvmvfio error, never another exception;
- it comes within :data:`DEADLINE_S` seconds (no FIFO blocks it);
- nothing changes anywhere under the test's folder (the fake sysfs, the run
  root, the files links point to) except what kvmvfio may change for the
  records that are valid: their devices' ``driver_override`` and
  ``unbind``, their journal files, and new lock files and folders;
- every valid record is served (restored, or left to its live owner) and
  every invalid one is refused, kept, and listed (``failed``, ``invalid``).

The fake sysfs does not bind drivers, so valid records only name drivers
the devices have now: restoring them writes ``driver_override`` and
``unbind`` and never waits for a probe.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakerun import STRANGER, folder, plant, put
from fakesysfs import Dev, Topology, device_dir, tree_files
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmvfio.cli import run
from kvmvfio.errors import KvmvfioError, SysfsError
from kvmvfio.host import Host
from kvmvfio.host.procs import start_time
from kvmvfio.libvirt.agent import DomainState, StateStore
from kvmvfio.prepare import (
    GroupStatus,
    OwnerWatch,
    Recovery,
    UntrustedFile,
    prepare,
    recover,
    release,
    release_owner,
    status,
)
from kvmvfio.prepare.driver import Sysfs, UnsafeSysfsName
from kvmvfio.prepare.journal import Entry, Journal, JournalError, Record

BuildHost = Callable[[Topology], Host]
ROOT = os.geteuid() == 0

#: Cases per run of the property tier; docs/BENCHMARKS.md (Reliability) quotes it.
CASES = 1000
#: Seconds one operation may take before the case counts as a hang.
DEADLINE_S = 5

#: The fake host: the members of each IOMMU group, and the driver each has now.
GROUPS: dict[int, tuple[str, ...]] = {
    3: ("0000:00:03.0",),
    4: ("0000:00:04.0", "0000:00:04.1"),
    5: ("0000:00:05.0",),
    7: (),  # no such group: a record of it may only name no device
}
DRIVER_NOW: dict[str, str | None] = {
    "0000:00:03.0": None,
    "0000:00:04.0": None,
    "0000:00:04.1": "vfio-pci",
    "0000:00:05.0": "e1000e",
}
NO_GROUP = "0000:00:06.0"
ABSENT = "0000:00:1f.7"
GONE_PID = 2**22 + 12345  # above the kernel's pid_max: never a live process


def _topology() -> Topology:
    return Topology(
        devices=[
            Dev("0000:00:03.0", group=3),
            Dev("0000:00:04.0", group=4),
            Dev("0000:00:04.1", driver="vfio-pci", group=4),
            Dev("0000:00:05.0", driver="e1000e", group=5),
            Dev(NO_GROUP, group=None),
        ],
        drivers=("vfio-pci", "e1000e"),
    )


@pytest.fixture
def host(build_host: BuildHost) -> Host:
    return build_host(_topology())


def _record(group: int, devices: tuple[str, ...] = (), owner: str = "vm1") -> Record:
    return Record(group, owner, GONE_PID, devices=[Entry(a, DRIVER_NOW[a], None) for a in devices])


# -- the files themselves --------------------------------------------------------------


def test_a_symlinked_journal_folder_is_refused_not_followed(tmp_path: Path, host: Host) -> None:
    elsewhere = folder(tmp_path / "elsewhere")
    Journal(tmp_path / "other-root").write(_record(3, GROUPS[3]))
    shutil.move(tmp_path / "other-root" / "journal" / "group-3.json", elsewhere / "group-3.json")
    root = folder(tmp_path / "run")
    os.symlink(elsewhere, root / "journal")
    before = tree_files(host.sysfs)
    expected = (
        f"{root}/journal is a symbolic link; kvmvfio keeps a folder owned by uid "
        f"{os.geteuid()} with mode 0700 there, so it did not use it and left it as it is. "
        "Find out who put it there and remove it, then run the command again"
    )
    for call in (
        lambda: recover(host=host, root=root),
        lambda: status(host=host, root=root),
        lambda: release(["0000:00:03.0"], host=host, root=root),
    ):
        with pytest.raises(UntrustedFile) as refused:
            call()
        assert str(refused.value) == expected
    assert (elsewhere / "group-3.json").exists()
    assert tree_files(host.sysfs) == before


@pytest.mark.parametrize("kind", ["symlink", "dangling", "fifo", "folder", "mode", "hardlink"])
def test_a_journal_file_that_is_not_kvmvfios_is_refused_and_kept(
    tmp_path: Path, host: Host, kind: str
) -> None:
    root = tmp_path / "run"
    journal = Journal(root)
    journal.write(_record(4, GROUPS[4]))  # a good record beside it is still served
    # What the planted file holds, or points to, is a valid record of group 3.
    data = json.dumps(
        {"version": 1, "group": 3, "owner": "vm1", "pid": 0, "steps": 1, "devices": []}
    ).encode()
    target = put(tmp_path / "outside" / "record", data)
    plant(journal.path(3), kind, target, data)
    done = recover(host=host, root=root)
    ((number, message),) = done.failed
    assert number == 3
    found = {
        "symlink": "is a symbolic link",
        "dangling": "is a symbolic link",
        "fifo": "is a FIFO",
        "folder": "is a folder",
        "mode": "has mode 0644",
        "hardlink": "has 2 hard links",
    }[kind]
    assert message.startswith(f"{journal.path(3)} {found}; kvmvfio keeps a regular file")
    assert sorted(r.address for r in done.restored) == list(GROUPS[4])
    assert os.path.lexists(journal.path(3))
    assert target.read_bytes() == data
    (shown,) = status(host=host, root=root)
    assert shown.group == 3
    assert found in shown.invalid
    with pytest.raises(UntrustedFile, match=found):
        release(["0000:00:03.0"], host=host, root=root)


def test_a_journal_file_of_another_owner_is_refused(tmp_path: Path, host: Host) -> None:
    root = tmp_path / "run"
    Journal(root).write(_record(3, GROUPS[3]))
    me = os.geteuid()
    # As another user would see it: the expected owner is a value.
    with pytest.raises(UntrustedFile) as refused:
        status(host=host, root=root, uid=me + 1)
    assert str(refused.value).startswith(f"{root} is owned by uid {me}; kvmvfio keeps a folder")
    if ROOT:
        os.chown(Journal(root).path(3), STRANGER, STRANGER)
        (shown,) = status(host=host, root=root)
        assert f"group-3.json is owned by uid {STRANGER}; kvmvfio keeps" in shown.invalid
        assert f"`chown 0 {Journal(root).path(3)}`" in shown.invalid


@pytest.mark.parametrize("kind", ["symlink", "dangling", "fifo", "folder", "mode", "hardlink"])
def test_a_lock_file_that_is_not_kvmvfios_is_refused(tmp_path: Path, host: Host, kind: str) -> None:
    root = tmp_path / "run"
    Journal(root).write(_record(3, GROUPS[3]))
    secret = put(tmp_path / "outside" / "secret", "secret\n")
    lock = root / "locks" / "group-3.lock"
    plant(lock, kind, secret)
    before = tree_files(host.sysfs)
    with pytest.raises(UntrustedFile) as refused:
        release(["0000:00:03.0"], host=host, root=root)
    assert str(refused.value).startswith(f"{lock} ")
    assert recover(host=host, root=root).failed == ((3, str(refused.value)),)
    assert secret.read_bytes() == b"secret\n"
    assert not (tmp_path / "outside" / "no-such-file").exists()  # the dangling link's target
    assert tree_files(host.sysfs) == before
    assert Journal(root).read(3) is not None


def test_files_are_written_private_through_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "run"
    old = os.umask(0o077 | 0o200)  # even a umask that takes the owner's write bit
    try:
        Journal(root).write(_record(3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "journal").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root / "journal" / "group-3.json").st_mode) == 0o600
    assert os.listdir(root / "journal") == ["group-3.json"]
    # A link where the record goes is replaced, not written through.
    os.unlink(root / "journal" / "group-3.json")
    secret = put(tmp_path / "secret", "secret\n")
    os.symlink(secret, root / "journal" / "group-3.json")
    Journal(root).write(_record(3))
    assert secret.read_text() == "secret\n"
    assert Journal(root).read(3) == _record(3)


def test_a_world_writable_root_is_refused(tmp_path: Path) -> None:
    root = folder(tmp_path / "run")
    os.chmod(root, 0o777)
    with pytest.raises(UntrustedFile) as refused:
        Journal(root).records()
    assert str(refused.value).startswith(
        f"{root} has mode 0777; kvmvfio keeps a folder owned by uid {os.geteuid()} that no one "
        f"else may write there"
    )
    assert f"`chmod go-w {root}`" in str(refused.value)


def test_a_missing_root_is_nothing_to_do_and_is_not_made(tmp_path: Path, host: Host) -> None:
    root = tmp_path / "run"
    assert status(host=host, root=root) == []
    assert recover(host=host, root=root) == Recovery()
    assert not root.exists()


def test_names_that_are_not_journal_files_are_ignored(tmp_path: Path, host: Host) -> None:
    root = tmp_path / "run"
    journal = Journal(root)
    journal.write(_record(3, GROUPS[3]))
    data = journal.path(3).read_bytes()
    os.unlink(journal.path(3))
    for name in ("group-03.json", "group-x.json", "group-3.json.bak", ".group-3.json.tmp"):
        put(journal.dir / name, data)
    assert status(host=host, root=root) == []
    assert recover(host=host, root=root) == Recovery()
    assert len(os.listdir(journal.dir)) == 4


# -- records that do not fit the host -----------------------------------------------------


@pytest.mark.parametrize(
    ("devices", "problem"),
    [
        (
            ("0000:00:03.0", "0000:00:04.0"),
            "devices[1] 0000:00:04.0 is in IOMMU group 4 on this host, not 3",
        ),
        ((NO_GROUP,), f"devices[0] {NO_GROUP} is in no IOMMU group on this host"),
        ((ABSENT,), f"devices[0] {ABSENT} is not on this host"),
    ],
)
def test_a_record_naming_a_device_outside_its_group_is_not_acted_on(
    tmp_path: Path, host: Host, devices: tuple[str, ...], problem: str
) -> None:
    root = tmp_path / "run"
    journal = Journal(root)
    journal.write(Record(3, "vm1", GONE_PID, devices=[Entry(a, None, None) for a in devices]))
    journal.write(_record(5, GROUPS[5]))
    before = tree_files(host.sysfs)
    expected = (
        f"the kvmvfio journal {journal.path(3)} is unusable ({problem}); kvmvfio acted on none "
        "of it and left it as it is: check the devices it names by hand, then remove it"
    )
    with pytest.raises(JournalError) as refused:
        release(["0000:00:03.0"], "vm1", host=host, root=root)
    assert str(refused.value) == expected
    assert tree_files(host.sysfs) == before
    done = recover(host=host, root=root)
    assert done.failed == ((3, expected),)
    assert [r.address for r in done.restored] == ["0000:00:05.0"]  # the other record is served
    changed = {p for p, data in tree_files(host.sysfs).items() if before[p] != data}
    five = device_dir(host.sysfs, "0000:00:05.0")
    assert changed == {str(five / "driver_override")}  # it stays on e1000e, as recorded
    assert journal.read(3) is not None
    (shown,) = status(host=host, root=root)
    assert shown.invalid == expected
    with pytest.raises(JournalError) as refused:
        prepare(["0000:00:03.0"], "vm1", host=host, root=root)
    assert str(refused.value) == expected


def test_the_cli_says_which_record_it_did_not_act_on(
    tmp_path: Path, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "run"
    journal = Journal(root)
    journal.write(Record(3, "vm1", GONE_PID, devices=[Entry("0000:00:04.0", None, None)]))
    args = ["--root", str(root), "--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs)]
    assert run(["status", *args]) == 1  # listed, and a problem: not a state to exit 0 on
    out, err = capsys.readouterr()
    assert err == "kvmvfio: a journal record is invalid and is not acted on; see its line\n"
    assert out == (
        f"IOMMU group 3: not acted on: the kvmvfio journal {journal.path(3)} is unusable "
        "(devices[0] 0000:00:04.0 is in IOMMU group 4 on this host, not 3); kvmvfio acted on "
        "none of it and left it as it is: check the devices it names by hand, then remove it\n"
    )
    assert run(["recover", *args]) == 1
    assert "recover: IOMMU group 3 not restored: the kvmvfio journal" in capsys.readouterr().err
    assert run(["status", "--json", *args]) == 1
    (doc,) = json.loads(capsys.readouterr().out)["groups"]
    assert doc["group"] == 3
    assert doc["invalid"].startswith("the kvmvfio journal")


def test_release_owner_serves_the_owners_other_groups_first(tmp_path: Path, host: Host) -> None:
    root = tmp_path / "run"
    journal = Journal(root)
    journal.write(Record(3, "vm1", GONE_PID, devices=[Entry("0000:00:04.0", None, None)]))
    journal.write(_record(5, GROUPS[5]))
    put(journal.path(4), b"{damaged")  # whose it is cannot be told: logged, left
    with pytest.raises(JournalError, match="is in IOMMU group 4 on this host, not 3"):
        release_owner("vm1", host=host, root=root)
    assert journal.read(5) is None
    assert journal.path(3).exists()
    assert journal.path(4).read_bytes() == b"{damaged"


def test_prepare_refuses_owner_names_the_journal_would_refuse(host: Host, tmp_path: Path) -> None:
    for owner in ("vm\x00", "vm\ud800"):
        with pytest.raises(KvmvfioError, match="must be a short name"):
            prepare(["0000:00:03.0"], owner, host=host, root=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- sysfs paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda s: s.set_override("../../../../x", None), "PCI address '../../../../x'"),
        (lambda s: s.set_override("00:03.0", None), "the kernel names it 0000:00:03.0"),
        (lambda s: s.set_override("0000:00:03.0", "../../x"), "it holds a '/'"),
        (lambda s: s.set_override("0000:00:03.0", ""), "it is empty"),
        (lambda s: s.bind("0000:00:03.0", ".."), "it is '..'"),
        (lambda s: s.bind("0000:00:03.0", "vfio pci"), "it holds whitespace"),
        (lambda s: s.bind("0000:00:03.0", "a\x00"), "control character"),
        (lambda s: s.bind("0000:00:03.0", "x" * 256), "longer than 255 bytes"),
        (lambda s: s.probe("0000:00:03.0\n"), "PCI address"),
        (lambda s: s.unbind("0000:00:03.0/../../.."), "PCI address"),
        (lambda s: s.reset("0000:00:03.0/.."), "PCI address"),
    ],
)
def test_sysfs_writes_refuse_names_that_could_leave_the_bus(
    host: Host, call: Callable[[Sysfs], None], words: str
) -> None:
    before = tree_files(host.sysfs)
    with pytest.raises(UnsafeSysfsName, match="nothing was written") as refused:
        call(Sysfs(host.sysfs))
    assert words in str(refused.value)
    assert tree_files(host.sysfs) == before


def test_unbind_finds_the_driver_name_before_writing(host: Host, tmp_path: Path) -> None:
    sysfs = Sysfs(host.sysfs)
    before = tree_files(host.sysfs)
    sysfs.unbind("0000:00:03.0")  # no driver: nothing to write
    assert tree_files(host.sysfs) == before
    sysfs.unbind("0000:00:05.0")
    assert (host.sysfs / "bus/pci/drivers/e1000e/unbind").read_text() == "0000:00:05.0"
    link = device_dir(host.sysfs, "0000:00:04.0") / "driver"
    os.symlink("../../../bus/pci/drivers/bad name", link)
    with pytest.raises(SysfsError, match="is not a driver name"):
        sysfs.unbind("0000:00:04.0")
    (device_dir(host.sysfs, "0000:00:03.0") / "driver_override").write_text("a/b\n")
    with pytest.raises(SysfsError, match="'a/b' is not a driver name"):
        sysfs.state("0000:00:03.0")


# -- the agent's records ------------------------------------------------------------------


def test_the_agents_records_are_opened_without_trust(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(tmp_path / "run")
    store.write(DomainState("vm1", "u-1", {"0000:00:03.0": True}))
    path = store.dir / "vm1.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o644)  # as the agent wrote them before (umask 022)
    assert store.read("vm1") is None
    assert "has mode 0644" in caplog.text
    store.write(DomainState("vm1", "u-1", {}))  # the next write replaces it
    assert store.read("vm1") == DomainState("vm1", "u-1", {})
    # An mdev is kept by its UUID, as the agent writes it (lower case).
    mdev = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
    store.write(DomainState("vm1", "u-1", {mdev: False}))
    assert store.read("vm1") == DomainState("vm1", "u-1", {mdev: False})
    store.write(DomainState("vm1", "u-1", {mdev.upper(): False}))
    assert store.read("vm1") is None
    assert "is not a PCI address or mdev UUID as the agent writes it" in caplog.text
    os.unlink(path)
    os.mkfifo(path, 0o600)
    assert store.read("vm1") is None  # no hang
    os.unlink(path)
    for doc in (
        {"name": "vm2", "uuid": None, "devices": {}},
        {"name": "vm1", "uuid": None, "devices": {"../x": True}},
        {"name": "vm1", "uuid": None, "devices": {"0000:00:03.0": 1}},
        {"name": "vm1", "uuid": None, "devices": {}, "more": 1},
        {"name": "vm1", "uuid": 5, "devices": {}},
    ):
        put(path, json.dumps(doc))
        assert store.read("vm1") is None, doc
    os.unlink(path)
    secret = put(tmp_path / "secret", "secret\n")
    os.rmdir(store.dir)
    os.symlink(tmp_path, store.dir)
    assert store.names() == []
    with pytest.raises(UntrustedFile, match="is a symbolic link"):
        store.write(DomainState("vm1", "u-1", {}))
    assert secret.read_text() == "secret\n"
    assert not (tmp_path / "vm1.json").exists()


# -- the property tier --------------------------------------------------------------------

_OWNER = st.from_regex(r"[A-Za-z0-9_.@+-]{1,30}", fullmatch=True) | st.from_regex(
    r"libvirt:[A-Za-z0-9_.-]{1,20}", fullmatch=True
)
_LITERALS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1.0", "1E5", "0.5", "9" * 5000]
_LIT = "\x00literal\x00"  # a placeholder, replaced by a raw literal after json.dumps


def _bad_count(top: int, nullable: bool = False) -> st.SearchStrategy[Any]:
    others = [True, False, "3", "", [], {}, [3], {"a": 1}]
    if not nullable:
        others.append(None)
    return st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=top + 1, max_value=top * 2**8),
        st.sampled_from(others),
        st.floats(allow_nan=False),
        st.sampled_from(_LITERALS).map(lambda lit: (_LIT, lit)),
    )


_ANY_TEXT = st.text(max_size=12)
_WHITESPACE = st.sampled_from([" ", "\t", "\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000"])
_bad_owner = st.one_of(
    st.just(""),
    st.just("x" * 201),
    st.tuples(_ANY_TEXT, _WHITESPACE, _ANY_TEXT).map("".join),
    st.tuples(_ANY_TEXT, st.just("\x00"), _ANY_TEXT).map("".join),
    st.tuples(_ANY_TEXT, st.sampled_from(["\ud800", "\udfff"]), _ANY_TEXT).map("".join),
    st.sampled_from([None, 5, True, [], {}, 1.5]),
)
_bad_driver = st.one_of(
    st.sampled_from(["", ".", "..", "x" * 256, "é" * 128, "\x1b[2J", "vfio-pci\n"]),
    st.tuples(_ANY_TEXT, st.just("/"), _ANY_TEXT).map("".join),
    st.sampled_from(["../../../../outside", "../../drivers/e1000e", "/etc/passwd"]),
    st.tuples(_ANY_TEXT, _WHITESPACE | st.just("\x00") | st.just("\x07"), _ANY_TEXT).map("".join),
    st.sampled_from([5, True, False, [], {}, 0.0]),
)
_CANONICAL = set(DRIVER_NOW) | {NO_GROUP, ABSENT}
_bad_address = st.one_of(
    st.sampled_from(
        [
            "../../../../outside",
            "0000:00:03.0/../../../..",
            "00:03.0",
            "0000:00:03.0\n",
            " 0000:00:03.0",
            "0000:00:03.00",
            "10000:00:03.0",
            "0000:00:1F.0",
            "",
        ]
    ),
    _ANY_TEXT.filter(lambda t: t not in _CANONICAL),
    st.sampled_from([None, 3, True, [], {}]),
)


@st.composite
def _clean_doc(draw: st.DrawFn, group: int) -> tuple[dict[str, Any], bool]:
    """A valid record of ``group``, and whether its owner is alive (this process)."""
    members = GROUPS[group]
    addrs = draw(st.permutations(members))[: draw(st.integers(1, len(members)))] if members else []
    devices = [
        {
            "address": a,
            "driver": draw(st.sampled_from([None, DRIVER_NOW[a]])),
            "override": draw(st.sampled_from([None, "vfio-pci", "pci-stub"])),
        }
        for a in addrs
    ]
    who = draw(st.sampled_from(["none", "gone", "gone-nostart", "live"]))
    pid, start = {
        "none": (0, None),
        "gone": (GONE_PID, 12345),
        "gone-nostart": (GONE_PID, None),
        "live": (os.getpid(), start_time(os.getpid())),
    }[who]
    doc: dict[str, Any] = {"version": 1, "group": group, "owner": draw(_OWNER), "pid": pid}
    if draw(st.booleans()):
        doc["steps"] = draw(st.integers(0, 2**40))
    doc["devices"] = devices
    if start is not None or draw(st.booleans()):
        doc["pid_start"] = start
    return doc, who == "live" and not doc["owner"].startswith("libvirt:")


def _encode(doc: Any, indent: int | None) -> bytes:
    literal = None

    def strip(value: Any) -> Any:
        nonlocal literal
        if isinstance(value, tuple) and value and value[0] == _LIT:
            literal = value[1]
            return _LIT
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    text = json.dumps(strip(doc), indent=indent)
    if literal is not None:
        text = text.replace(json.dumps(_LIT), literal)
    return text.encode("utf-8", "surrogatepass")


_TOP = ("version", "group", "owner", "pid", "steps", "devices", "pid_start")
_DAMAGE = [
    "version",
    "group",
    "mismatch",
    "owner",
    "pid",
    "pid_start",
    "steps",
    "drop",
    "unknown",
    "devices",
    "entry",
    "entry-drop",
    "entry-unknown",
    "address",
    "foreign",
    "driver",
    "override",
    "duplicate",
    "text-duplicate",
    "truncate",
    "raw",
    "bom",
]


@st.composite
def _damaged(draw: st.DrawFn, group: int) -> tuple[bytes, str]:
    """Bytes of a record of ``group`` that kvmvfio must refuse, and how it was damaged."""
    doc, _ = draw(_clean_doc(group))
    indent = draw(st.sampled_from([None, 1]))
    how = draw(st.sampled_from(_DAMAGE))
    devices = doc["devices"]
    if how in (
        "entry",
        "entry-drop",
        "entry-unknown",
        "address",
        "driver",
        "override",
        "duplicate",
    ):
        if not devices:  # group 7: give it one (already foreign: it names group 3's device)
            devices.append({"address": "0000:00:03.0", "driver": None, "override": None})
        i = draw(st.integers(0, len(devices) - 1))
    if how == "version":
        doc["version"] = draw(st.sampled_from([0, 2, "1", 1.0, True, None, [1], (_LIT, "1.0")]))
    elif how == "group":
        doc["group"] = draw(_bad_count(2**31 - 1))
    elif how == "mismatch":
        doc["group"] = draw(st.sampled_from([g for g in (0, 3, 4, 5, 7, 2**31 - 1) if g != group]))
    elif how == "owner":
        doc["owner"] = draw(_bad_owner)
    elif how == "pid":
        doc["pid"] = draw(_bad_count(2**31 - 1))
    elif how == "pid_start":
        doc["pid_start"] = draw(_bad_count(2**63 - 1, nullable=True))
    elif how == "steps":
        doc["steps"] = draw(_bad_count(2**63 - 1))
    elif how == "drop":
        del doc[draw(st.sampled_from(["version", "group", "owner", "pid", "devices"]))]
    elif how == "unknown":
        doc[draw(_ANY_TEXT.filter(lambda k: k not in _TOP))] = draw(st.sampled_from([0, None, ""]))
    elif how == "devices":
        doc["devices"] = draw(st.sampled_from([{}, "x", None, 5, {"0000:00:03.0": {}}]))
    elif how == "entry":
        devices[i] = draw(st.sampled_from(["0000:00:03.0", None, 5, [], True]))
    elif how == "entry-drop":
        del devices[i][draw(st.sampled_from(["address", "driver", "override"]))]
    elif how == "entry-unknown":
        devices[i][draw(_ANY_TEXT.filter(lambda k: k not in ("address", "driver", "override")))] = 0
    elif how == "address":
        devices[i]["address"] = draw(_bad_address)
    elif how == "foreign":
        other = [a for g, m in GROUPS.items() if g != group for a in m] + [NO_GROUP, ABSENT]
        entry = {"address": draw(st.sampled_from(other)), "driver": None, "override": None}
        devices.insert(draw(st.integers(0, len(devices))), entry)
    elif how in ("driver", "override"):
        devices[i][how] = draw(_bad_driver)
    elif how == "duplicate":
        devices.append(copy.deepcopy(devices[i]))
    text = _encode(doc, indent)
    if how == "text-duplicate":
        key = draw(st.sampled_from(["version", "group", "owner", "pid", "devices"]))
        text = b"{" + json.dumps(key).encode() + b": 0, " + text[1:]
    elif how == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif how == "raw":
        text = draw(
            st.sampled_from(
                [b"", b"null", b"[]", b"1e400", b'"x"', b"\xff\xfe{}", b"[" * 5000, b"{" * 5000]
            )
            | st.binary(max_size=64)
        )
    elif how == "bom":
        text = "\ufeff".encode() + text
    return text, how


_FILE_KINDS = ["symlink", "dangling", "fifo", "folder", "mode", "hardlink"] + (
    ["owner"] if ROOT else []
)
_FOLDER_KINDS = ["symlink", "fifo", "file", "mode"] + (["owner"] if ROOT else [])
_ODD_NAMES = ["group-03.json", "group-x.json", "group-3.json.bak", "group-99999999999.json"]


@dataclass
class _File:
    clean: bool
    live: bool
    data: bytes
    devices: tuple[str, ...]
    how: str  # "regular", "planted:KIND" (a valid record in a file that is not kvmvfio's),
    # or "damaged:HOW" (an invalid record in a good file)


@dataclass
class _Case:
    root: str  # "ok", "missing", "mode", "symlink"
    journal: str  # "ok", "missing", or a folder kind
    locks: str  # "ok", "missing", or a folder kind
    files: dict[int, _File] = field(default_factory=dict)
    lock_files: dict[int, str] = field(default_factory=dict)
    odd: list[str] = field(default_factory=list)
    op: str = "status"
    target: int = 3


@st.composite
def _cases(draw: st.DrawFn) -> _Case:
    # Folders are mostly fine, so that most cases reach the records.
    case = _Case(
        root=draw(st.sampled_from(["ok"] * 20 + ["missing", "mode", "symlink"])),
        journal=draw(st.sampled_from(["ok"] * 24 + ["missing", *_FOLDER_KINDS])),
        locks=draw(st.sampled_from(["ok"] * 16 + ["missing"] * 4 + _FOLDER_KINDS)),
        op=draw(st.sampled_from(["status", "recover", "release"])),
        target=draw(st.sampled_from([3, 4, 5])),
    )
    for group in draw(st.lists(st.sampled_from(sorted(GROUPS)), unique=True, max_size=4)):
        doc, live = draw(_clean_doc(group))
        clean = _encode(doc, draw(st.sampled_from([None, 1])))
        devices = tuple(d["address"] for d in doc["devices"])
        state = draw(st.sampled_from(["clean", "clean", "damaged", "planted"]))
        if state == "clean":
            case.files[group] = _File(True, live, clean, devices, "regular")
        elif state == "damaged":
            data, how = draw(_damaged(group))
            case.files[group] = _File(False, False, data, (), f"damaged:{how}")
        else:
            kind = draw(st.sampled_from(_FILE_KINDS))
            case.files[group] = _File(False, False, clean, devices, f"planted:{kind}")
    if draw(st.integers(0, 3)) == 0:
        for group in draw(st.lists(st.sampled_from([3, 4, 5]), unique=True, max_size=2)):
            case.lock_files[group] = draw(st.sampled_from(_FILE_KINDS))
    case.odd = draw(st.lists(st.sampled_from(_ODD_NAMES), unique=True, max_size=2))
    return case


def _plant_folder(path: Path, kind: str, outside: Path) -> None:
    if kind == "missing":
        return
    if kind == "ok":
        folder(path)
    elif kind == "symlink":
        os.symlink(outside, path)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "file":
        put(path, b"")
    elif kind == "mode":
        folder(path)
        os.chmod(path, 0o755)
    elif kind == "owner":
        folder(path)
        os.chown(path, STRANGER, STRANGER)


def _build(case: _Case, base: Path) -> Path:
    """Lay the case out under ``base``; return the run root."""
    outside = folder(base / "outside")
    secret = put(outside / "secret", "secret\n")
    lure = folder(outside / "journal")  # what a followed link would find: valid records
    folder(outside / "locks")
    for group, spec in case.files.items():
        put(lure / f"group-{group}.json", spec.data)
    root = base / "run"
    if case.root == "missing":
        # Nothing can be under a root that is not there.
        return root
    if case.root == "symlink":
        real = folder(outside / "run")
        os.symlink(real, root)
        base_root = real
    else:
        base_root = folder(root)
    journal = base_root / "journal"
    if case.journal in ("ok", "mode", "owner"):  # a real folder: the files go in it
        folder(journal)
        for group, spec in case.files.items():
            path = journal / f"group-{group}.json"
            if spec.how.startswith("planted:"):
                target = put(outside / f"record-{group}", spec.data)
                plant(path, spec.how.partition(":")[2], target, spec.data)
            else:
                put(path, spec.data)
        for name in case.odd:
            put(journal / name, case.files.get(3, _File(True, False, b"{}", (), "")).data)
    locks = base_root / "locks"
    if case.locks == "ok":
        for group, kind in case.lock_files.items():
            plant(locks / f"group-{group}.lock", kind, secret)
    # Last: put() would have made these folders kvmvfio's again.
    _plant_folder(journal, case.journal, lure)
    _plant_folder(locks, case.locks, outside / "locks")
    if case.root == "mode":
        os.chmod(base_root, 0o777)
    return root


Snapshot = dict[str, tuple[int, int, int, int, bytes | None]]


def _snapshot(top: Path) -> Snapshot:
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st_ = os.lstat(path)
            content: bytes | None = None
            if stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            elif stat.S_ISLNK(st_.st_mode):
                content = os.readlink(path).encode()
            out[path] = (
                stat.S_IFMT(st_.st_mode),
                stat.S_IMODE(st_.st_mode),
                st_.st_uid,
                st_.st_nlink if not stat.S_ISDIR(st_.st_mode) else 0,
                content,
            )
    return out


def _changes(before: Snapshot, after: Snapshot) -> set[str]:
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


class _Hang(BaseException):
    """No answer within the deadline (a BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise _Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass(repr=False)
class _World:
    host: Host
    base: Path
    watch: OwnerWatch
    pristine: Snapshot
    #: The fake host's files a valid record may have kvmvfio write.
    writable: list[str]
    seconds: list[float] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"_World({self.base})"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> _World:
    base = tmp_path_factory.mktemp("hostile")
    sysfs, devfs = _topology().build(base / "host")
    (base / "libvirt").mkdir()
    host = Host(sysfs, devfs, sysfs.parent / "proc")
    watch = OwnerWatch(proc=Path("/proc"), libvirt_run=base / "libvirt")
    writable = [str(device_dir(sysfs, a) / "driver_override") for a in DRIVER_NOW]
    writable += [str(sysfs / "bus/pci/drivers" / d / "unbind") for d in ("vfio-pci", "e1000e")]
    return _World(host, base, watch, _snapshot(base), writable)


def _allowed(world: _World, case: _Case, groups: set[int], root: Path) -> set[str]:
    """What kvmvfio may change when it serves ``groups``: sysfs files and journal files."""
    sysfs = world.host.sysfs
    out = {
        str(root),  # may be made, with its locks folder and lock files
        str(root / "locks"),
        *(str(root / "locks" / f"group-{g}.lock") for g in (3, 4, 5, 7)),
    }
    for g in groups:
        out.add(str(root / "journal" / f"group-{g}.json"))
        for addr in case.files[g].devices:
            out.add(str(device_dir(sysfs, addr) / "driver_override"))
            if DRIVER_NOW[addr] is not None:
                out.add(str(sysfs / "bus" / "pci" / "drivers" / str(DRIVER_NOW[addr]) / "unbind"))
    return out


def _check_new_only(before: Snapshot, changed: set[str], bookkeeping: set[str]) -> None:
    """Bookkeeping paths may appear; nothing that was there may change."""
    for path in changed & bookkeeping:
        assert path not in before, f"{path} was there and changed"


@settings(
    max_examples=CASES,
    deadline=None,  # the hang guard is _deadline; a loaded CI machine must not fail on time
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=_cases())
def test_any_journal_gets_served_or_refused_and_nothing_else_changes(
    world: _World, case: _Case
) -> None:
    base = world.base / "case"
    if base.exists():
        shutil.rmtree(base)
    for path in world.writable:  # the fake host as it was built, whatever the last case did
        Path(path).write_bytes(world.pristine[path][4] or b"")
    root = _build(case, base)
    before = _snapshot(world.base)
    host = world.host
    address = GROUPS[case.target][0]
    result: object = None
    error: KvmvfioError | None = None
    started = time.monotonic()
    try:
        with _deadline(DEADLINE_S):
            if case.op == "status":
                result = status(host=host, root=root, watch=world.watch)
            elif case.op == "recover":
                result = recover(host=host, root=root, watch=world.watch)
            else:
                result = release([address], host=host, root=root)
    except KvmvfioError as err:  # anything else fails the test, as a hang does
        error = err
    world.seconds.append(time.monotonic() - started)
    after = _snapshot(world.base)
    changed = _changes(before, after)
    event(f"{case.op}: {'refused' if error else 'answered'}")

    if case.root == "missing":
        folders_bad, files = False, {}
    else:
        folders_bad = case.root in ("mode", "symlink") or case.journal not in ("ok", "missing")
        files = case.files if case.journal == "ok" and not folders_bad else {}
    locks_bad = case.root != "missing" and case.locks not in ("ok", "missing")
    bad_lock = set(case.lock_files) if case.root != "missing" and case.locks == "ok" else set()
    bookkeeping = _allowed(world, case, set(), root)

    if case.op == "status":
        assert not changed, changed
        if folders_bad:
            assert isinstance(error, UntrustedFile), error
            return
        assert error is None, error
        assert isinstance(result, list)
        shown: dict[int, GroupStatus] = {g.group: g for g in result}
        assert set(shown) == set(files)
        for group, spec in files.items():
            if spec.clean:
                assert shown[group].invalid == "", shown[group].invalid
            else:
                assert str(root / "journal" / f"group-{group}.json") in shown[group].invalid
        return

    if case.op == "recover":
        if folders_bad:
            assert isinstance(error, UntrustedFile), error
            assert not changed, changed
            return
        assert error is None, error
        assert isinstance(result, Recovery)
        refused = {g for g, s in files.items() if not s.clean or locks_bad or g in bad_lock}
        assert {g for g, _ in result.failed} == refused, result.failed
        live = {g for g, s in files.items() if g not in refused and s.live}
        assert {g.group for g in result.skipped} == live
        served = set(files) - refused - live
    else:
        refused_now = (
            folders_bad
            or locks_bad
            or case.target in bad_lock
            or (case.target in files and not files[case.target].clean)
        )
        if refused_now:
            assert error is not None, (case, result)
            assert not changed - bookkeeping, changed - bookkeeping
            _check_new_only(before, changed, bookkeeping)
            return
        assert error is None, error
        served = {case.target} & set(files)
    event(f"{case.op}: served {len(served)} record(s)")
    assert isinstance(result, (list, Recovery))
    restored = result.restored if isinstance(result, Recovery) else tuple(result)
    expected = sorted(a for g in served for a in files[g].devices)
    assert sorted(r.address for r in restored) == expected
    allowed = _allowed(world, case, served, root)
    assert not changed - allowed, sorted(changed - allowed)
    _check_new_only(before, changed, bookkeeping)
    for g in served:
        assert not os.path.lexists(root / "journal" / f"group-{g}.json")
    for r in restored:
        # The fake's files keep what a shorter write did not cover ("\nnull)\n").
        override = (device_dir(host.sysfs, r.address) / "driver_override").read_text()
        assert override.startswith(f"{r.override}\n" if r.override else "\n"), override
