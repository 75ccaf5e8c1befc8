"""Claims and their owners: who is alive, what recover restores and what it leaves alone.

The liveness answers come from the real /proc (this test's own process, a
child it starts) and from files the tests write (libvirt pid files). The
driver moves themselves, and recover beside a running libvirt domain, are
shown in the lab (tests/lab/test_prepare.py, tests/lab/test_libvirt.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakerun import put
from fakesysfs import Dev, Topology

from kvmvfio.cli import run
from kvmvfio.errors import UsageError
from kvmvfio.host import Host
from kvmvfio.host.procs import ProcessId, read_pidfile, start_time
from kvmvfio.prepare import ClaimedBy, OwnerWatch, prepare, recover, status
from kvmvfio.prepare.journal import Entry, Journal, JournalError, Record
from kvmvfio.prepare.owners import libvirt_owner

BuildHost = Callable[[Topology], Host]
GONE_PID = 2**22 + 12345  # above the kernel's pid_max: never a live process


@pytest.fixture
def host(build_host: BuildHost) -> Host:
    return build_host(
        Topology(devices=[Dev(f"0000:00:0{n}.0", driver="vfio-pci", group=n) for n in (3, 4, 5)])
    )


@pytest.fixture
def watch(tmp_path: Path) -> OwnerWatch:
    run_dir = tmp_path / "libvirt-run"
    run_dir.mkdir()
    return OwnerWatch(libvirt_run=run_dir)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(["sleep", "60"])
    yield child
    child.kill()
    child.wait()


def claim(root: Path, group: int, owner: str, pid: int = 0, start: int | None = None) -> None:
    Journal(root).write(Record(group, owner, pid, pid_start=start))


def test_start_time_is_read_past_a_comm_with_parentheses(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text("7 (a) b) S" + " 1" * 18 + " 424242 0 0\n")
    assert start_time(7, tmp_path) == 424242
    (tmp_path / "7" / "stat").write_text("7 (a) S 1 2\n")  # too short: not identified
    assert start_time(7, tmp_path) is None
    assert start_time(8, tmp_path) is None
    assert start_time(os.getpid()) is not None


def test_a_live_process_owner_is_left_alone_and_listed(
    tmp_path: Path, host: Host, watch: OwnerWatch
) -> None:
    me = watch.identify(os.getpid())
    assert me is not None
    claim(tmp_path, 3, "vm1", me.pid, me.start)
    done = recover(host=host, root=tmp_path, watch=watch)
    assert done.restored == ()
    (skipped,) = done.skipped
    assert (skipped.group, skipped.owner, skipped.alive) == (3, "vm1", True)
    assert skipped.why == f"process {me.pid} runs"
    assert Journal(tmp_path).read(3) is not None


def test_a_reused_pid_is_not_taken_for_the_owner(
    tmp_path: Path, host: Host, watch: OwnerWatch
) -> None:
    me = watch.identify(os.getpid())
    assert me is not None
    assert me.start is not None
    claim(tmp_path, 3, "vm1", me.pid, me.start + 1)  # same pid, another process
    (held,) = status(host=host, root=tmp_path, watch=watch)
    assert not held.alive
    assert held.why == f"pid {me.pid} now belongs to another process"
    done = recover(host=host, root=tmp_path, watch=watch)
    assert done.skipped == ()
    assert done.failed == ()
    assert Journal(tmp_path).read(3) is None


def test_an_old_record_without_start_time_still_counts_a_live_pid(
    tmp_path: Path, host: Host, watch: OwnerWatch
) -> None:
    claim(tmp_path, 3, "vm1", os.getpid(), None)
    (held,) = status(host=host, root=tmp_path, watch=watch)
    assert held.alive


def test_a_libvirt_domain_is_alive_while_its_pid_file_names_a_process(
    tmp_path: Path, host: Host, watch: OwnerWatch, sleeper: subprocess.Popen[bytes]
) -> None:
    claim(tmp_path, 3, libvirt_owner("web"))
    claim(tmp_path, 4, libvirt_owner("db"))
    (watch.libvirt_run / "web.pid").write_text(f"{sleeper.pid}\n")
    (watch.libvirt_run / "db.pid").write_text(f"{GONE_PID}\n")  # left by a crashed libvirtd
    web, db = status(host=host, root=tmp_path, watch=watch)
    assert (web.alive, web.why) == (True, f"libvirt domain web runs (QEMU pid {sleeper.pid})")
    assert not db.alive
    assert db.why.startswith("libvirt domain db is not running")
    done = recover(host=host, root=tmp_path, watch=watch)
    assert [g.group for g in done.skipped] == [3]
    assert Journal(tmp_path).read(4) is None
    assert Journal(tmp_path).read(3) is not None


def test_a_process_holding_the_group_keeps_a_name_only_claim_alive(
    tmp_path: Path, host: Host, watch: OwnerWatch
) -> None:
    node = host.devfs / "vfio" / "5"
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_bytes(b"")
    claim(tmp_path, 5, "by-hand")
    (held,) = status(host=host, root=tmp_path, watch=watch)
    assert not held.alive
    assert held.why == "no owner process was recorded and no process holds its devices"
    with node.open("rb") as f:
        child = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        (held,) = status(host=host, root=tmp_path, watch=watch)
        assert held.alive
        assert held.holders == (f"pid {child.pid} (sleep)",)
        assert recover(host=host, root=tmp_path, watch=watch).skipped == (held,)
    finally:
        child.kill()
        child.wait()
    assert recover(host=host, root=tmp_path, watch=watch).skipped == ()
    assert Journal(tmp_path).read(5) is None


def test_one_group_that_fails_does_not_stop_the_others(
    tmp_path: Path, host: Host, watch: OwnerWatch
) -> None:
    journal = Journal(tmp_path)
    # A device the host no longer has: restoring it fails (sysfs says ENOENT).
    journal.write(Record(3, "gone", GONE_PID, devices=[Entry("0000:00:03.0", None, None)]))
    (host.sysfs / "bus/pci/devices/0000:00:03.0/driver_override").unlink()
    claim(tmp_path, 4, "gone-too", GONE_PID)
    done = recover(host=host, root=tmp_path, watch=watch)
    ((number, message),) = done.failed
    assert number == 3
    assert "driver_override" in message
    assert journal.read(3) is not None  # kept for the operator
    assert journal.read(4) is None


def test_the_cli_lists_what_it_left_and_fails_on_a_failure(
    tmp_path: Path, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    me = OwnerWatch().identify(os.getpid())
    assert me is not None
    claim(tmp_path, 3, "vm1", me.pid, me.start)
    common = ["--root", str(tmp_path), "--sysfs-root", str(host.sysfs)]
    common += ["--dev-root", str(host.devfs)]
    assert run(["recover", *common]) == 0
    out = capsys.readouterr().out
    assert f"recover: left IOMMU group 3 to vm1: process {me.pid} runs" in out
    assert run(["status", *common]) == 0
    out = capsys.readouterr().out
    assert f"IOMMU group 3: claimed by vm1; owner alive: process {me.pid} runs; moved: none" in out
    Journal(tmp_path).write(Record(4, "x", GONE_PID, devices=[Entry("0000:00:09.0", None, None)]))
    assert run(["recover", *common]) == 1
    assert "IOMMU group 4 not restored" in capsys.readouterr().err


def test_owner_names_are_printed_escaped(
    tmp_path: Path, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    claim(tmp_path, 3, "vm\x1b[2J")  # a damaged record: prepare never writes such a name
    args = ["status", "--root", str(tmp_path), "--sysfs-root", str(host.sysfs)]
    assert run([*args, "--dev-root", str(host.devfs)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "vm\\x1b[2J" in out


def test_prepare_records_the_owner_start_time(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver=None, group=1)]))
    Journal(tmp_path).write(Record(1, "vm1", os.getpid(), pid_start=start_time(os.getpid())))
    with pytest.raises(ClaimedBy) as refused:
        prepare(["0000:00:03.0"], "vm2", host=host, root=tmp_path, watch=OwnerWatch())
    assert str(refused.value) == (f"IOMMU group 1 is claimed by 'vm1' (process {os.getpid()} runs)")
    assert refused.value.alive


def test_an_owner_pid_that_does_not_run_is_refused(host: Host, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"owner pid {GONE_PID}: no such process runs"):
        prepare(["0000:00:03.0"], "vm1", owner_pid=GONE_PID, host=host, root=tmp_path)
    assert Journal(tmp_path).records() == []


@pytest.mark.parametrize("value", ["1", -1, 1.5, True, 2**64])
def test_a_bad_start_time_in_the_journal_is_named(tmp_path: Path, value: object) -> None:
    journal = Journal(tmp_path)
    doc = '{"version": 1, "group": 1, "owner": "a", "pid": 3, "devices": [], "pid_start": %s}'
    put(journal.path(1), doc % ('"1"' if value == "1" else str(value).lower()))
    with pytest.raises(JournalError, match="pid_start"):
        journal.read(1)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"1234\n", 1234), (b"", None), (b"12a", None), (b"-5", None), (b"9" * 11, None)],
)
def test_pid_files_are_read_strictly(tmp_path: Path, content: bytes, expected: int | None) -> None:
    path = tmp_path / "x.pid"
    path.write_bytes(content)
    assert read_pidfile(path) == expected


def test_pid_files_are_not_followed_nor_waited_on(tmp_path: Path) -> None:
    target = tmp_path / "real.pid"
    target.write_text("1234\n")
    (tmp_path / "link.pid").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.pid")
    assert read_pidfile(tmp_path / "link.pid") is None
    assert read_pidfile(tmp_path / "fifo.pid") is None  # returns at once, no writer needed
    assert read_pidfile(tmp_path) is None


def test_process_ids_print_as_pids() -> None:
    assert str(ProcessId(12, 5)) == "pid 12"
    assert sys.platform == "linux"
