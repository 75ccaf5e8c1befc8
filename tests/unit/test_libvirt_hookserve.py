"""The agent serving the hook (kvmvfio.libvirt.hookserve) and the front handing it requests.

The front is run for real with dash (and /bin/sh); the agent's side is a
:class:`HookServer` in this process with a fake ``handle`` that records
what it was given, so the tests see what reaches the hook's code, what
the front prints and exits with, and that Python is started only when no
agent runs. The real handle on a real host is in the lab
(tests/lab/test_libvirt.py).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_libvirt_install import (
    ARGV_TAIL,
    ENV,
    FakePython,
    domain_xml,
    make_fake_python,
    run_front,
)

from kvmvfio.host.procs import start_time
from kvmvfio.libvirt import hookserve
from kvmvfio.libvirt.hookserve import MAGIC, HookServer, parse_request
from kvmvfio.libvirt.install import install

SHELLS = [pytest.param(["/bin/sh"], id="sh")] + (
    [pytest.param(["dash"], id="dash")] if shutil.which("dash") else []
)


class FakeHandle:
    """Stands in for kvmvfio.libvirt.hook.handle: records calls, answers as told."""

    def __init__(self, status: int = 0, said: str = "", delay: float = 0.0) -> None:
        self.status, self.said, self.delay = status, said, delay
        self.calls: list[tuple[str, str, str, bytes]] = []
        self.done = threading.Event()

    def __call__(self, name: str, op: str, subop: str, data: bytes, err: io.StringIO,
                 **_: Any) -> int:  # fmt: skip
        time.sleep(self.delay)
        self.calls.append((name, op, subop, data))
        self.done.set()
        if op == "prepare":
            err.write(self.said)
            return self.status
        return 0


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    root.mkdir(mode=0o700)
    return root


@pytest.fixture
def fake(tmp_path: Path) -> FakePython:
    return make_fake_python(tmp_path / "bin")


@pytest.fixture
def front(tmp_path: Path, fake: FakePython, run_root: Path) -> Path:
    hooks = tmp_path / "etc" / "libvirt" / "hooks"
    hooks.parent.mkdir(parents=True)
    site = tmp_path / "site"
    (site / "kvmvfio").mkdir(parents=True)
    return install(hooks, str(fake.path), pythonpath=str(site), run_root=run_root).path


@pytest.fixture
def handle() -> FakeHandle:
    return FakeHandle()


@pytest.fixture
def server(run_root: Path, handle: FakeHandle) -> Iterator[HookServer]:
    srv = HookServer(run_root, host=lambda: None, handle=handle)  # type: ignore[arg-type,return-value]
    assert srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _impatient(front: Path, seconds: int) -> None:
    text = front.read_text()
    assert "patience=120\n" in text
    front.write_text(text.replace("patience=120\n", f"patience={seconds}\n"))


def _files(run_root: Path) -> list[str]:
    return sorted(n for n in os.listdir(run_root / "hook") if n not in ("agent", "requests"))


# -- the front and a running agent ---------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_prepare_is_served_by_the_agent_and_python_is_not_started(
    shell: list[str], front: Path, fake: FakePython, server: HookServer, handle: FakeHandle,
    run_root: Path,
) -> None:  # fmt: skip
    xml = domain_xml()
    proc = run_front(shell, front, ARGV_TAIL, stdin=xml)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert handle.calls == [("vm1", "prepare", "begin", xml.rstrip(b"\n"))]
    assert not fake.ran
    _wait(lambda: _files(run_root) == [])  # request and reply removed (just after the answer)


@pytest.mark.parametrize("shell", SHELLS)
def test_a_refusal_reaches_libvirt_as_the_hook_would_print_it(
    shell: list[str], front: Path, fake: FakePython, server: HookServer, handle: FakeHandle
) -> None:
    handle.status = 1
    handle.said = "kvmvfio: IOMMU group 4 is not viable: 0000:03:00.1 (on host driver x)\n"
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == 1
    assert proc.stderr.decode() == handle.said
    assert not fake.ran


def test_a_sentence_of_several_lines_and_strange_bytes_passes_whole(
    front: Path, server: HookServer, handle: FakeHandle
) -> None:
    handle.status = 1
    handle.said = "kvmvfio: one\n  two with \\n, $HOME, `x`, %s and 'quotes'\n.\n"
    proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml())
    assert (proc.returncode, proc.stderr.decode()) == (1, handle.said)


@pytest.mark.parametrize("shell", SHELLS)
def test_release_is_handed_over_without_waiting(
    shell: list[str], front: Path, fake: FakePython, server: HookServer, handle: FakeHandle
) -> None:
    handle.delay = 1.0
    args = ["vm 2", "release", "end", "-"]
    t = time.monotonic()
    proc = run_front(shell, front, args, stdin=domain_xml())
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert time.monotonic() - t < handle.delay  # did not wait for the agent
    assert handle.done.wait(10)
    assert handle.calls[0][:3] == ("vm 2", "release", "end")
    assert not fake.ran


def test_requests_are_served_in_the_order_they_came(
    front: Path, server: HookServer, handle: FakeHandle
) -> None:
    run_front(["dash"], front, ["vm1", "release", "end", "-"], stdin=domain_xml())
    proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == 0
    assert [c[1] for c in handle.calls] == ["release", "prepare"]


def test_domains_without_the_namespace_never_reach_the_agent(
    front: Path, fake: FakePython, server: HookServer, handle: FakeHandle
) -> None:
    proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml(namespace=None))
    assert proc.returncode == 0
    assert handle.calls == []
    assert not fake.ran


# -- no agent, a dead one, a hung one: the fallback and the timeout ------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_without_an_agent_python_runs_as_before(
    shell: list[str], front: Path, fake: FakePython, run_root: Path
) -> None:
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == 0
    assert fake.argv() == ["-m", "kvmvfio.libvirt.hook", *ARGV_TAIL]


@pytest.mark.parametrize(
    "pidfile",
    [
        pytest.param(lambda: f"{os.getpid()} 1\n", id="reused-pid"),
        pytest.param(lambda: "999999999 5\n", id="dead-pid"),
        pytest.param(lambda: "not a pid\n", id="garbage"),
        pytest.param(lambda: "", id="empty"),
    ],
)
def test_an_agent_that_is_gone_means_python(
    pidfile: Any, front: Path, fake: FakePython, server: HookServer, handle: FakeHandle,
    run_root: Path,
) -> None:  # fmt: skip
    (run_root / "hook" / "agent").write_text(pidfile())
    proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == 0
    assert fake.ran
    assert handle.calls == []


def test_a_stopped_agent_means_python(
    front: Path, fake: FakePython, server: HookServer, handle: FakeHandle, run_root: Path
) -> None:
    server.stop()
    assert not (run_root / "hook" / "agent").exists()
    proc = run_front(["dash"], front, ["vm1", "release", "end", "-"], stdin=domain_xml())
    assert proc.returncode == 0
    assert fake.ran
    assert handle.calls == []


def _hung_agent(run_root: Path) -> None:
    """A live process (this one) named as the agent, and nobody reading the FIFO."""
    folder = run_root / "hook"
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / "requests", 0o600)
    (folder / "agent").write_text(f"{os.getpid()} {start_time(os.getpid())}\n")


@pytest.mark.parametrize("shell", SHELLS)
def test_a_hung_agent_refuses_the_start_after_the_wait_and_python_does_not_run(
    shell: list[str], front: Path, fake: FakePython, run_root: Path
) -> None:
    _hung_agent(run_root)
    _impatient(front, 2)
    t = time.monotonic()
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml())
    assert 1.5 < time.monotonic() - t < 15
    assert proc.returncode == 1
    assert proc.stderr.decode() == (
        f"kvmvfio: the agent (pid {os.getpid()}) did not answer within 2 s; the domain is not "
        "started (the hook handed the request to the agent, so it did not act itself: see "
        "journalctl -t kvmvfio-agent)\n"
    )
    assert not fake.ran  # never both
    assert _files(run_root) == []  # the front cleaned up after itself
    # No timer left behind holding libvirt's pipes: the run above returned at all.


@pytest.mark.parametrize("leftover", ["req", "reply"])
def test_a_leftover_file_of_the_same_id_means_python_and_stays(
    leftover: str, front: Path, fake: FakePython, server: HookServer, handle: FakeHandle,
    run_root: Path,
) -> None:  # fmt: skip
    # The front's id is its pid: the shell that touches the file execs the front.
    script = f'touch "$1/{leftover}.$$"; exec dash "$2" vm1 prepare begin -'
    proc = subprocess.run(
        ["dash", "-c", script, "-", str(run_root / "hook"), str(front)],
        input=domain_xml(), capture_output=True, env=ENV, check=False, timeout=20,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert fake.ran
    assert handle.calls == []
    assert [n.split(".")[0] for n in _files(run_root)] == [leftover]


# -- the agent's side: malformed input, leftovers, lateness ---------------------------------


def _request(rid: str, op: str = "prepare", subop: str = "begin", deadline: object = 10**9,
             name: str = "vm1", xml: bytes = b"<domain/>") -> bytes:  # fmt: skip
    return b"\0".join([MAGIC, str(deadline).encode(),
                       name.encode("utf-8", "surrogateescape"), op.encode(),
                       subop.encode(), b"-", xml])  # fmt: skip


def test_parse_request_takes_what_the_front_writes_and_names_anything_else() -> None:
    req = parse_request("12", _request("12", xml=b"<domain>\0?</domain>"))
    assert (req.name, req.op, req.subop, req.xml) == (
        "vm1",
        "prepare",
        "begin",
        b"<domain>\0?</domain>",
    )
    for raw, said in [
        (b"", "does not start as"),
        (b"other\0" + _request("1")[len(MAGIC) + 1 :], "does not start as"),
        (_request("1", deadline="x1"), "is not a number"),
        (_request("1", op="started"), "is not an event"),
        (_request("1", name="\udcff"), "not UTF-8"),
        (_request("1") + b"x" * hookserve.MAX_REQUEST, "larger than"),
    ]:
        with pytest.raises(hookserve.BadRequest, match=said):
            parse_request("1", raw)


def _write_request(run_root: Path, rid: str, raw: bytes) -> None:
    path = run_root / "hook" / f"req.{rid}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, raw)
    os.close(fd)


def _send(run_root: Path, line: bytes) -> None:
    fd = os.open(run_root / "hook" / "requests", os.O_RDWR)
    os.write(fd, line)
    os.close(fd)


def _wait(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_malformed_lines_and_files_are_named_and_dropped_and_serving_goes_on(
    server: HookServer, handle: FakeHandle, run_root: Path, caplog: pytest.LogCaptureFixture,
    front: Path,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, "kvmvfio.libvirt.hookserve")
    _write_request(run_root, "77", b"garbage")
    (run_root / "hook" / "req.78").write_bytes(_request("78", op="release", subop="end"))
    os.chmod(run_root / "hook" / "req.78", 0o644)  # not the front's mode
    _send(run_root, b"../etc/passwd\n" + b"x" * 100 + b"\n77\n78\n79\n" + b"9" * 40)
    _send(run_root, b"\n")
    _wait(lambda: "not a request id" in caplog.text and "req.78" in caplog.text)
    _wait(lambda: "no file req.79" in caplog.text)
    assert "request 77 does not start as the hook's front writes one; dropped" in caplog.text
    assert "mode 0644" in caplog.text
    assert handle.calls == []
    # ...and the next request is served.
    proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == 0
    assert len(handle.calls) == 1


def test_leftovers_at_start_a_waiting_front_is_served_the_rest_dropped(
    run_root: Path, handle: FakeHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvmvfio.libvirt.hookserve")
    folder = run_root / "hook"
    folder.mkdir(mode=0o700)
    _write_request(run_root, "10", _request("10", op="release", subop="end"))
    _write_request(run_root, "11", _request("11"))  # its front is gone: no reply FIFO
    os.mkfifo(folder / "reply.12", 0o600)  # a reply with no request
    _write_request(run_root, "13", _request("13"))
    os.mkfifo(folder / "reply.13", 0o600)
    reader = os.open(folder / "reply.13", os.O_RDONLY | os.O_NONBLOCK)  # its front waits
    srv = HookServer(run_root, host=lambda: None, handle=handle)  # type: ignore[arg-type,return-value]
    try:
        assert srv.start()
        assert [c[1] for c in handle.calls] == ["prepare"]
        os.set_blocking(reader, True)
        assert os.read(reader, 100) == b"0 0\n"
        assert _files(run_root) == []
        assert "domain vm1 release end, left by an agent that stopped; dropped" in caplog.text
        assert (
            "hook request 11: domain vm1 prepare begin: its front is gone; dropped" in caplog.text
        )
    finally:
        os.close(reader)
        srv.stop()


def test_a_prepare_that_ends_too_late_is_undone_and_refused(
    run_root: Path, front: Path, fake: FakePython
) -> None:
    handle = FakeHandle()
    looks = [0.0, 1e12]  # in time when it starts, past any deadline when it is done

    def clock() -> float:
        return looks.pop(0) if len(looks) > 1 else looks[0]

    srv = HookServer(run_root, host=lambda: None, handle=handle, clock=clock)  # type: ignore[arg-type,return-value]
    try:
        assert srv.start()
        proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml())
    finally:
        srv.stop()
    assert [c[1] for c in handle.calls] == ["prepare", "release"]
    assert proc.returncode == 1
    assert "took longer than the hook waits; what it prepared is put back" in proc.stderr.decode()
    assert not fake.ran


def test_a_request_past_its_deadline_is_refused_untouched(
    run_root: Path, front: Path, fake: FakePython
) -> None:
    handle = FakeHandle()
    srv = HookServer(run_root, host=lambda: None, handle=handle, clock=lambda: 1e12)  # type: ignore[arg-type,return-value]
    try:
        assert srv.start()
        proc = run_front(["dash"], front, ARGV_TAIL, stdin=domain_xml())
    finally:
        srv.stop()
    assert handle.calls == []
    assert proc.returncode == 1
    assert "too close to the hook's deadline; nothing was done" in proc.stderr.decode()


def test_a_fifo_that_is_not_the_agents_is_not_served(
    run_root: Path, handle: FakeHandle, caplog: pytest.LogCaptureFixture
) -> None:
    folder = run_root / "hook"
    folder.mkdir(mode=0o700)
    (folder / "requests").write_text("")  # a regular file, not a FIFO
    srv = HookServer(run_root, host=lambda: None, handle=handle)  # type: ignore[arg-type,return-value]
    assert not srv.start()
    assert "not serving the libvirt hook" in caplog.text
    assert "is a regular file" in caplog.text
    assert not (folder / "agent").exists()


def test_the_served_request_runs_the_hooks_own_code(run_root: Path) -> None:
    assert hookserve.HookServer(run_root)._handle is hookserve.hook.handle


def test_the_front_is_still_posix(front: Path) -> None:
    # No bash-isms: dash parses it (and runs it in the tests above); checkbashisms if present.
    assert subprocess.run(["dash", "-n", str(front)], check=False).returncode == 0
    if shutil.which("checkbashisms"):
        done = subprocess.run(["checkbashisms", str(front)], capture_output=True, check=False)
        assert done.returncode == 0, done.stderr


def test_env_is_what_libvirt_gives() -> None:
    assert set(ENV) == {"PATH"}


def test_a_request_that_came_before_the_stop_is_served(run_root: Path, handle: FakeHandle) -> None:
    srv = HookServer(run_root, host=lambda: None, handle=handle)  # type: ignore[arg-type,return-value]
    assert srv.start()
    _write_request(run_root, "41", _request("41", op="release", subop="end"))
    _send(run_root, b"41\n")
    srv.stop()
    assert [c[1] for c in handle.calls] == ["release"]
    assert not (run_root / "hook" / "agent").exists()


def test_sigterm_cancels_the_agent_so_its_cleanup_runs() -> None:
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from kvmvfio.cli.libvirt_cmds import _until_sigterm  # noqa: PLC0415

    cleaned = []

    async def agent() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        finally:
            cleaned.append(True)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(_until_sigterm(agent()))
    assert cleaned == [True]
