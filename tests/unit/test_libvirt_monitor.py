"""kvmvfio's side of libvirt's monitor passthrough, against a fake libvirt_qemu.

Real libvirtd and QEMU are in the lab (tests/lab/test_libvirt.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmvfio.errors import LibvirtError, QemuError, QemuGone, QemuRefused
from kvmvfio.libvirt.monitor import DomainMonitor, VirDomain, qemu_pid
from kvmvfio.vfio.files import OwnedFd


class FakeLibvirtError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.message


class FakeDomain:
    def __init__(self, name: str = "vm1", active: bool = True) -> None:
        self._name = name
        self.active = active

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return "u-1"

    def isActive(self) -> int:
        return int(self.active)

    def XMLDesc(self, flags: int = 0) -> str:
        return f"<domain><name>{self._name}</name></domain>"


Reply = object


class FakeApi:
    """Answers commands from a table: a value, an Exception, or a callable of the arguments."""

    def __init__(self, replies: dict[str, Reply]) -> None:
        self.replies = replies
        self.sent: list[tuple[str, dict[str, object], list[int]]] = []

    def _answer(self, cmd: str, files: list[int]) -> str:
        doc = json.loads(cmd)
        name, args = doc["execute"], doc.get("arguments", {})
        self.sent.append((name, args, [os.fstat(f).st_ino for f in files]))
        reply = self.replies.get(name, {})
        if callable(reply):
            reply = reply(args)
        if isinstance(reply, Exception):
            raise reply
        if isinstance(reply, tuple):  # (class, desc): a QMP error
            return json.dumps({"id": "libvirt-7", "error": {"class": reply[0], "desc": reply[1]}})
        return json.dumps({"id": "libvirt-7", "return": reply})

    def qemuMonitorCommand(self, domain: VirDomain, cmd: str, flags: int) -> str:
        assert flags == 0
        return self._answer(cmd, [])

    def qemuMonitorCommandWithFiles(
        self, domain: VirDomain, cmd: str, files: list[int], flags: int = 0
    ) -> tuple[str, list[object]]:
        return self._answer(cmd, files), []


def _spawn(name_arg: str) -> subprocess.Popen[bytes]:
    """A process with ``-name NAME_ARG`` on its command line, once it has exec'd."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-name", name_arg]
    )
    for _ in range(500):  # until /proc shows the new program, not our fork's
        if name_arg.encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            return proc
        time.sleep(0.01)
    raise AssertionError("the fake QEMU did not start")


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A process whose command line looks like libvirt's QEMU for domain vm1, and its pid file."""
    proc = _spawn("guest=vm1,debug-threads=on")
    (tmp_path / "vm1.pid").write_text(f"{proc.pid}\n")
    yield tmp_path, proc.pid
    proc.kill()
    proc.wait()


def monitor(run_dir: Path, replies: dict[str, Reply]) -> tuple[DomainMonitor, FakeApi]:
    api = FakeApi(replies)
    return DomainMonitor(FakeDomain(), run_dir=run_dir, api=api), api


async def test_commands_and_their_errors_keep_qemus_words(fake_qemu: tuple[Path, int]) -> None:
    run_dir, pid = fake_qemu
    mon, api = monitor(
        run_dir,
        {
            "query-status": {"running": True},
            "device_add": ("GenericError", "Bus 'pcie.0' does not support hotplugging"),
            "cont": FakeLibvirtError(55, "Requested operation is not valid: domain is not running"),
            "stop": FakeLibvirtError(1, "internal error: something"),
        },
    )
    async with mon:
        assert (mon.pid, mon.uid) == (pid, os.getuid())
        assert await mon.execute("query-status") == {"running": True}
        with pytest.raises(QemuRefused) as refused:
            await mon.execute("device_add", {"driver": "vfio-pci"})
        assert (refused.value.error_class, refused.value.desc) == (
            "GenericError",
            "Bus 'pcie.0' does not support hotplugging",
        )
        with pytest.raises(QemuGone, match="domain is not running"):
            await mon.execute("cont")
        with pytest.raises(LibvirtError, match=r"libvirt refused stop for domain 'vm1': inter"):
            await mon.execute("stop")
    assert [s[:2] for s in api.sent] == [
        ("query-status", {}),
        ("device_add", {"driver": "vfio-pci"}),
        ("cont", {}),
        ("stop", {}),
    ]


async def test_an_fd_travels_with_its_getfd(fake_qemu: tuple[Path, int], tmp_path: Path) -> None:
    run_dir, _ = fake_qemu
    mon, api = monitor(run_dir, {})
    node = tmp_path / "node"
    node.write_text("")
    fd = OwnedFd(os.open(node, os.O_RDONLY | os.O_CLOEXEC), str(node), "a test file")
    async with mon:
        await mon.send_fd(fd, "kvmvfio-1234")
    assert api.sent == [("getfd", {"fdname": "kvmvfio-1234"}, [os.stat(node).st_ino])]
    assert fd.fileno() >= 0  # still ours to close
    fd.close()


async def test_deletion_is_seen_by_polling_qom(fake_qemu: tuple[Path, int]) -> None:
    run_dir, _ = fake_qemu
    ours = {"name": "kvmvfio-0000-00-03-0", "type": "child<vfio-pci>"}
    answers = iter([[ours], [ours], []])
    mon, api = monitor(run_dir, {"qom-list": lambda _a: next(answers)})
    async with mon, mon.watch_deleted("kvmvfio-0000-00-03-0") as deleted:
        await deleted()
    assert [s[0] for s in api.sent] == ["qom-list"] * 3


async def test_a_stopped_domain_is_gone(tmp_path: Path) -> None:
    mon = DomainMonitor(FakeDomain(active=False), run_dir=tmp_path, api=FakeApi({}))
    with pytest.raises(QemuGone, match="the domain is not running"):
        await mon.connect()


@pytest.mark.parametrize(
    ("setup", "error", "words"),
    [
        (lambda d, pid: None, QemuGone, "no {d}/vm1.pid"),
        (lambda d, pid: (d / "vm1.pid").write_text("12x"), QemuError, "invalid literal"),
        # A pid file naming a process that is not the domain's QEMU: this test process.
        (lambda d, pid: (d / "vm1.pid").write_text(str(os.getpid())), QemuError,
         "is not domain 'vm1''s QEMU"),
    ],
)  # fmt: skip
def test_the_qemu_process_is_checked(
    tmp_path: Path, setup: Callable[[Path, int], object], error: type[Exception], words: str
) -> None:
    setup(tmp_path, 0)
    with pytest.raises(error) as refused:
        qemu_pid("vm1", tmp_path)
    assert words.format(d=tmp_path) in str(refused.value)


def test_a_name_with_a_comma_is_matched_as_libvirt_escapes_it(tmp_path: Path) -> None:
    proc = _spawn("guest=a,,b,debug-threads=on")
    try:
        (tmp_path / "a,b.pid").write_text(str(proc.pid))
        assert qemu_pid("a,b", tmp_path) == proc.pid
        (tmp_path / "a.pid").write_text(str(proc.pid))
        with pytest.raises(QemuError, match="is not domain 'a''s QEMU"):
            qemu_pid("a", tmp_path)
    finally:
        proc.kill()
        proc.wait()
