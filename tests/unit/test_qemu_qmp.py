"""kvmvfio's side of QMP against a fake peer: identity, errors, ports, unplug.

Real QEMU is in the lab (tests/lab/test_qemu_handoff.py). Here the peer is
this test process itself, so SO_PEERCRED reports our own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fakeqmp import HANGUP, SILENT, Envelope, Error, FakeQmp, Raw
from fakesysfs import Dev, Topology
from qemu.qmp.message import Message

from kvmvfio.errors import (
    DetachTimeout,
    NoHotplugPort,
    NotAttached,
    QemuConfined,
    QemuError,
    QemuGone,
    QemuNoAnswer,
    QemuPeerMismatch,
    QemuRefused,
    QemuReplyInvalid,
    UsageError,
)
from kvmvfio.host import Host
from kvmvfio.host import confinement as conf
from kvmvfio.qemu import Qemu, attach, detach, free_ports, handoff, qdev_id, read_pidfile
from kvmvfio.qemu.handoff import qemu_has_iommufd
from kvmvfio.qemu.qmp import Monitor, Together

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    peer = await FakeQmp(tmp_path / "qmp.sock").start()
    yield peer
    await peer.stop()


def _peripheral(*children: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": "type", "type": "string"}] + [
        {"name": n, "type": f"child<{t}>"} for n, t in children
    ]


async def test_the_peer_must_be_the_named_pid(fake: FakeQmp) -> None:
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        assert (qemu.pid, qemu.uid) == (os.getpid(), os.getuid())
    with pytest.raises(QemuPeerMismatch, match=f"belongs to pid {os.getpid()}"):
        await Qemu(fake.path, pid=os.getpid() + 100000).connect()
    # Only the first connection negotiated; the refused one sent nothing.
    assert [c for c, _ in fake.received] == ["qmp_capabilities"]


async def test_an_unreachable_socket(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="cannot connect to the QMP socket"):
        await Qemu(tmp_path / "none.sock", pid=1).connect()


async def test_a_silent_monitor_is_named(fake: FakeQmp) -> None:
    fake.greet = False
    with pytest.raises(QemuError, match="serves one client at a time"):
        await Qemu(fake.path, greeting_timeout=0.5).connect()


async def test_qemu_errors_keep_class_and_words(fake: FakeQmp) -> None:
    fake.replies["device_add"] = Error("GenericError", "Bus 'pcie.0' does not support hotplugging")
    async with Qemu(fake.path) as qemu:
        with pytest.raises(QemuRefused) as refused:
            await qemu.execute("device_add", {"driver": "vfio-pci"})
    assert refused.value.error_class == "GenericError"
    assert str(refused.value) == (
        "QEMU refused device_add: Bus 'pcie.0' does not support hotplugging (GenericError)"
    )


async def test_free_ports(fake: FakeQmp) -> None:
    listing = _peripheral(
        ("rp10", "pcie-root-port"),
        ("rp2", "pcie-root-port"),
        ("rp0", "pcie-root-port"),
        ("nic", "e1000e"),
    )
    fake.replies["qom-list"] = lambda a: listing if a["path"] == "/machine/peripheral" else []
    fake.replies["qom-get"] = "/machine/peripheral/rp0/rp0"  # the NIC sits on rp0
    async with Qemu(fake.path) as qemu:
        assert await free_ports(qemu) == (["rp2", "rp10"], ["rp0"])


async def test_attach_without_a_free_port_sends_no_fd(
    fake: FakeQmp, build_host: Callable[[Topology], Host]
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    fake.replies["qom-list-types"] = [{"name": "iommufd"}]
    fake.replies["query-memory-size-summary"] = {"base-memory": 1 << 20}
    fake.replies["qom-list"] = lambda a: []
    async with Qemu(fake.path) as qemu:
        with pytest.raises(NoHotplugPort, match="pcie-root-port"):
            await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert fake.fds_received == 0
    assert "getfd" not in [c for c, _ in fake.received]


async def test_detach_retries_while_the_guest_is_busy(fake: FakeQmp) -> None:
    ident = qdev_id("0000:00:03.0")
    calls = {"device_del": 0}

    def device_del(args: dict[str, object]) -> object:
        calls["device_del"] += 1
        if calls["device_del"] < 3:
            return Error(
                "GenericError", "Hot-unplug failed: guest is busy (power indicator blinking)"
            )
        return {}

    fake.replies["device_del"] = device_del
    fake.events["device_del"] = [
        {
            "event": "DEVICE_DELETED",
            "data": {"device": ident, "path": f"/machine/peripheral/{ident}"},
        }
    ]
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    async with Qemu(fake.path) as qemu:
        assert await detach(qemu, ["0000:00:03.0"], host=Host("/nonexistent")) == [ident]
    assert calls["device_del"] == 3


async def test_detach_times_out_and_yanks_nothing(fake: FakeQmp) -> None:
    ident = qdev_id("0000:00:03.0")
    fake.replies["device_del"] = {}
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    async with Qemu(fake.path) as qemu:
        with pytest.raises(DetachTimeout, match="stays attached as QEMU has it"):
            await detach(qemu, ["0000:00:03.0"], timeout=0.3)
    assert "object-del" not in [c for c, _ in fake.received]


async def test_detach_of_a_device_kvmvfio_did_not_attach(fake: FakeQmp) -> None:
    fake.replies["qom-list"] = lambda a: []
    async with Qemu(fake.path) as qemu:
        with pytest.raises(NotAttached, match="kvmvfio-0000-00-03-0"):
            await detach(qemu, ["0000:00:03.0"], host=Host("/nonexistent"))


async def test_events_nobody_waits_for_are_not_kept(fake: FakeQmp) -> None:
    """A long-lived connection (1000 cycles in the soak) must not hoard QEMU's events."""
    fake.replies["query-status"] = {"running": True}
    fake.events["query-status"] = [
        {"event": "DEVICE_DELETED", "data": {"device": f"d{i}", "path": f"/d{i}"}}
        for i in range(50)
    ]
    async with Qemu(fake.path) as qemu:
        for _ in range(4):
            await qemu.execute("query-status")
        await asyncio.sleep(0.1)  # let the reader take in the events
        queued = sum(
            listener._queue.qsize() + len(listener._history)  # qemu.qmp keeps both
            for listener in qemu.client._listeners
        )
        assert queued == 0


async def test_a_qemu_that_does_not_answer_is_named_not_waited_for_forever(
    fake: FakeQmp,
) -> None:
    fake.replies["query-status"] = SILENT
    async with Qemu(fake.path, pid=os.getpid(), command_timeout=0.3) as qemu:
        with pytest.raises(QemuNoAnswer) as stuck:
            await qemu.execute("query-status")
    said = str(stuck.value)
    assert f"QEMU pid {os.getpid()} did not answer query-status within 0.3 s" in said
    assert f"/proc/{os.getpid()}/task/*/stack" in said


async def test_attach_asks_its_questions_at_once_in_a_fixed_order(
    fake: FakeQmp, build_host: Callable[[Topology], Host]
) -> None:
    """The read-only questions go out together: one stuck answer does not hold the others back.

    The order is fixed (the lab's test that kills QEMU before each step counts
    on it), and the first failure in that order is the one raised.
    """
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    fake.replies.update(
        {
            "qom-list-types": SILENT,
            "qom-list": lambda a: (
                _peripheral(("rp0", "pcie-root-port")) if a["path"] == "/machine/peripheral" else []
            ),
            "query-memory-size-summary": Error("GenericError", "later in the order"),
        }
    )
    async with Qemu(fake.path, pid=os.getpid(), command_timeout=0.3) as qemu:
        with pytest.raises(QemuNoAnswer, match="did not answer qom-list-types"):
            await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert fake.received == [
        ("qmp_capabilities", {}),
        ("qom-list", {"path": "/machine/peripheral"}),
        ("qom-list", {"path": "/machine/peripheral-anon"}),
        ("qom-list-types", {"implements": "iommufd"}),
        ("query-memory-size-summary", {}),  # sent before qom-list-types was answered
        ("qom-list", {"path": "/objects"}),
    ]


async def test_a_message_that_ends_the_session_names_every_command_awaiting_it(
    fake: FakeQmp,
) -> None:
    fake.replies.update({"qom-list": [], "query-memory-size-summary": Raw(b"not json")})
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        with pytest.raises(QemuReplyInvalid) as invalid:  # noqa: PT012
            async with qemu.together() as ask:
                ask(qemu.qom_list("/a"))
                ask(qemu.memory_size())
                ask(qemu.qom_list("/b"))
    assert invalid.value.among == ("query-memory-size-summary", "qom-list")
    assert "while 2 commands awaited its answer (query-memory-size-summary, qom-list;" in str(
        invalid.value
    )
    # A command sent after the end is not said to have been answered by it.
    with pytest.raises(QemuGone):
        await qemu.execute("query-status")


async def test_qemus_types_are_asked_once_per_connection(fake: FakeQmp) -> None:
    fake.replies["qom-list-types"] = [{"name": "iommufd"}]
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        assert await qemu_has_iommufd(qemu)
        assert await qemu_has_iommufd(qemu)
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        assert await qemu_has_iommufd(qemu)
    assert [c for c, _ in fake.received].count("qom-list-types") == 2


async def test_questions_one_at_a_time_stop_at_the_first_failure(fake: FakeQmp) -> None:
    """A carrier that takes one command at a time (libvirt's) asks in order, and stops."""
    fake.replies.update({"qom-list": Error("GenericError", "no"), "query-status": {}})
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        with pytest.raises(QemuRefused, match="no"):  # noqa: PT012
            async with Together(at_once=False) as ask:
                ask(qemu.qom_list("/a"))
                ask(qemu.execute("query-status"))
    assert [c for c, _ in fake.received] == ["qmp_capabilities", "qom-list"]


# -- what QEMU says is checked; every step has a deadline --------------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_socket_nobody_accepts_on_is_given_up_on(tmp_path: Path) -> None:
    """A listener whose queue is full: ``connect`` waits until the deadline, then says so."""
    path = tmp_path / "stuck.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    try:
        for _ in range(4):  # fill the queue: later connections wait (or EAGAIN)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            with contextlib.suppress(BlockingIOError):
                s.connect(str(path))
            queued.append(s)
        before = _open_fds()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(QemuError, match="nobody accepted a connection on the QMP socket"):
            await Qemu(path, greeting_timeout=0.3).connect()
        assert 0.3 <= loop.time() - start < 2
        assert _open_fds() == before
    finally:
        for s in queued:
            s.close()
        listener.close()


async def test_capabilities_never_answered_are_named(fake: FakeQmp) -> None:
    fake.replies["qmp_capabilities"] = SILENT
    with pytest.raises(QemuNoAnswer, match=r"did not answer qmp_capabilities within 0\.3 s"):
        await Qemu(fake.path, pid=os.getpid(), greeting_timeout=0.3).connect()


@pytest.mark.parametrize(
    ("greeting", "said"),
    [
        (Raw(b"\xff\xfe not json"), "QMP greeting does not fit QEMU's schema (a message that is"),
        ({"QMP": []}, "QMP greeting does not fit QEMU's schema (a message that is not QMP"),
        ({"qmp": {}}, "QMP greeting does not fit QEMU's schema (a message that is not QMP"),
    ],
)
async def test_a_greeting_that_is_not_qmp(
    fake: FakeQmp, greeting: dict[str, object] | Raw, said: str
) -> None:
    fake.greet = greeting
    with pytest.raises(QemuReplyInvalid, match=re.escape(said)):
        await Qemu(fake.path).connect()


async def test_a_peer_that_hangs_up_at_once(fake: FakeQmp) -> None:
    fake.replies["qmp_capabilities"] = HANGUP
    with pytest.raises(QemuGone, match="QEMU went away during the QMP qmp_capabilities"):
        await Qemu(fake.path).connect()


# The replies issue 21 lists, each answered with what did not fit and where.
_MISFITS = [
    ("query-memory-size-summary", [], "reply to query-memory-size-summary does not fit QEMU's "
     "schema (the reply is a list, not an object (MemoryInfo))"),
    ("query-memory-size-summary", {"base-memory": "1073741824"},
     "(the reply's 'base-memory' is a string, not an integer)"),
    ("query-memory-size-summary", {"base-memory": True}, "'base-memory' is a boolean"),
    ("query-memory-size-summary", {"base-memory": -1}, "outside QAPI's size"),
    ("query-memory-size-summary", {"base-memory": 1 << 60}, "more than a 52-bit physical"),
    ("query-memory-size-summary", {"plugged-memory": 0}, "the reply has no 'base-memory'"),
    ("query-memory-size-summary", Envelope({"error": {"class": "GenericError"}}),
     "(its 'error' has no string 'class' and 'desc')"),
    ("query-memory-size-summary", Envelope({"error": "GenericError"}),
     "(its 'error' has no string 'class' and 'desc')"),
    ("query-memory-size-summary", Envelope({"bogus": 1}), "(it has neither 'return' nor 'error')"),
    ("query-memory-size-summary", Raw(b"not json"), "(a message that is not JSON)"),
    ("query-memory-size-summary", Raw(b"\xc3\x28"), "(a message that is not"),
    ("query-memory-size-summary", Raw(b"[" * 100_000), "(a message nested too deeply)"),
    ("query-memory-size-summary", Raw(b" " * (2 << 20)), "(a message longer than 1048576 bytes)"),
    ("query-memory-size-summary", Raw(b"1" * 5000), "(a message kvmvfio cannot read (Exceeds"),
    ("qom-list", {"name": "rp0"}, "(the reply is an object, not a list of ObjectPropertyInfo)"),
    ("qom-list", [{"name": ["rp0"], "type": "child<pcie-root-port>"}],
     "(entry 0's 'name' is a list, not a string)"),
    ("qom-list", [{"name": "rp\x1b[2J", "type": "child<pcie-root-port>"}],
     "(entry 0's 'name' holds control characters: 'rp\\x1b[2J')"),
    ("qom-list", [{"name": "rp0", "type": "child<x>"}] * 5000,
     "(the reply lists 5000 entries (at most 4096))"),
    ("qom-list", [{"name": "n" * 5000, "type": "string"}], "is 5000 characters long"),
    ("qom-list-types", [{"name": "iommufd", "abstract": "no"}], "'abstract' is a string"),
    ("qom-list-types", None, "the reply is null, not a list of ObjectTypeInfo"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "reply", "said"), _MISFITS)
async def test_a_reply_that_does_not_fit_is_named_not_a_traceback(
    fake: FakeQmp, build_host: Callable[[Topology], Host], command: str, reply: object, said: str
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    fake.replies.update(
        {
            "qom-list-types": [{"name": "iommufd"}],
            "qom-list": lambda a: (
                _peripheral(("rp0", "pcie-root-port")) if a["path"] == "/machine/peripheral" else []
            ),
            "query-memory-size-summary": {"base-memory": 1 << 20},
        }
    )
    fake.replies[command] = reply
    before = _open_fds()
    with pytest.raises(QemuReplyInvalid) as invalid:
        async with Qemu(fake.path, pid=os.getpid()) as qemu:
            await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert said in str(invalid.value)
    if invalid.value.among:
        # What ended the session (bytes that are no QMP message) carries no id, and attach
        # asks its questions at once: every command then awaiting an answer is named, in
        # the order sent; QEMU answers in order, so the first is the one whose turn it was.
        assert isinstance(reply, Raw)
        names = invalid.value.among
        assert names[0] == command
        assert invalid.value.command == ", ".join(names)
        assert str(invalid.value).startswith(
            f"QEMU pid {os.getpid()}'s message while {len(names)} commands awaited its answer "
            f"({', '.join(names)}; which one it answered cannot be told) does not fit"
        )
    else:
        assert str(invalid.value).startswith(f"QEMU pid {os.getpid()}'s reply to {command} ")
        assert invalid.value.command == command
    assert "getfd" not in [c for c, _ in fake.received]  # nothing handed over
    assert _open_fds() == before


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ([], "(its data is a list, not an object (DEVICE_DELETED))"),
        ({"device": 3, "path": "/x"}, "(its data's 'device' is an integer, not a string)"),
        ({"device": "kvmvfio-0000-00-03-0"}, "(its data has no 'path' (DEVICE_DELETED))"),
    ],
)
async def test_an_event_with_odd_data_is_named(fake: FakeQmp, data: object, said: str) -> None:
    ident = qdev_id("0000:00:03.0")
    fake.replies["device_del"] = {}
    fake.events["device_del"] = [
        Raw(json.dumps({"event": "DEVICE_DELETED", "data": data}).encode())
    ]
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        with pytest.raises(QemuReplyInvalid) as invalid:
            await detach(qemu, ["0000:00:03.0"], timeout=5, host=Host("/nonexistent"))
    assert str(invalid.value).startswith(f"QEMU pid {os.getpid()}'s DEVICE_DELETED event ")
    assert said in str(invalid.value)


async def test_events_of_other_shapes_and_names_are_let_by(fake: FakeQmp) -> None:
    """An event name that is not a string, or events kvmvfio does not wait for, end nothing."""
    ident = qdev_id("0000:00:03.0")
    fake.replies["device_del"] = {}
    fake.events["device_del"] = [
        Raw(b'{"event": ["DEVICE_DELETED"], "data": {}}'),
        Raw(b'{"event": "SOMETHING", "data": [1, 2]}'),
        {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral-anon/device[3]"}},
        {"event": "DEVICE_DELETED", "data": {"device": ident, "path": f"/x/{ident}"}},
    ]
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        assert await detach(qemu, ["0000:00:03.0"], timeout=5, host=Host("/nonexistent")) == [ident]


async def test_a_peer_that_leaves_during_the_wait_is_said_gone(fake: FakeQmp) -> None:
    ident = qdev_id("0000:00:03.0")
    fake.replies["device_del"] = {}
    fake.events["device_del"] = [Raw(b"\xff")]  # not JSON: kvmvfio ends the session
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        with pytest.raises(QemuReplyInvalid, match="DEVICE_DELETED event does not fit"):
            await detach(qemu, ["0000:00:03.0"], timeout=30, host=Host("/nonexistent"))
    assert loop.time() - start < 5  # not the 30 s of the detach timeout


async def test_qemus_words_are_printed_escaped(fake: FakeQmp) -> None:
    fake.replies["device_add"] = Error("\x1b]0;x\x07", "no\x1b[2J" + "!" * 500)
    async with Qemu(fake.path) as qemu:
        with pytest.raises(QemuRefused) as refused:
            await qemu.perform("device_add", {"driver": "vfio-pci"})
    said = str(refused.value)
    assert "\x1b" not in said
    assert "no\\x1b[2J" in said
    assert len(said) < 400


async def test_messages_are_formatted_for_the_log_only_when_it_takes_them(
    fake: FakeQmp, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu.qmp pretty-prints every message for its debug log; only when someone reads it."""
    formatted: list[str] = []
    real = Message.__str__

    def counted(msg: Message) -> str:
        formatted.append(real(msg))
        return formatted[-1]

    monkeypatch.setattr(Message, "__str__", counted)
    fake.replies["query-status"] = {"running": True}
    async with Qemu(fake.path) as qemu:
        caplog.set_level(logging.INFO, logger="kvmvfio.qemu.qmp.wire")
        await qemu.execute("query-status")
        assert formatted == []
        caplog.set_level(logging.DEBUG, logger="kvmvfio.qemu.qmp.wire")
        await qemu.execute("query-status")
    wire = [r.getMessage() for r in caplog.records if r.name == "kvmvfio.qemu.qmp.wire"]
    assert any(m.startswith("--> ") and "query-status" in m for m in wire), wire
    assert any(m.startswith("<-- ") and "running" in m for m in wire), wire


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 1e400, 10**9])
async def test_deadlines_that_are_no_number_of_seconds_are_refused(value: float) -> None:
    with pytest.raises(UsageError, match="must be a number of seconds"):
        Qemu("/x", command_timeout=value)
    with pytest.raises(UsageError, match="the detach timeout must be a number of seconds"):
        await detach(Monitor(), ["0000:00:03.0"], timeout=value)


def test_a_pidfile_that_is_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "qemu.pid"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is not a regular file"):
        read_pidfile(fifo)
    (tmp_path / "big.pid").write_text(str(2**70))
    with pytest.raises(UsageError, match="not a pid"):
        read_pidfile(tmp_path / "big.pid")


async def test_attach_refuses_a_romfile_before_qemu_is_changed(
    fake: FakeQmp, build_host: Callable[[Topology], Host], tmp_path: Path
) -> None:
    from test_host_rom import image  # noqa: PLC0415 (a sibling test module's builder)

    from kvmvfio.host.rom import InvalidRom  # noqa: PLC0415

    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    fake.replies["qom-list-types"] = [{"name": "iommufd"}]
    fake.replies["query-memory-size-summary"] = {"base-memory": 1 << 20}
    fake.replies["qom-list"] = lambda a: []
    wrong = tmp_path / "other.rom"
    wrong.write_bytes(image(vendor=0x10DE, device=0x2204))
    async with Qemu(fake.path) as qemu:
        with pytest.raises(InvalidRom, match="image 0 is for 10de:2204, not 1234:11e8"):
            await attach(
                qemu, ["0000:00:03.0"], coherency="ignore", host=host,
                romfiles={"00:03.0": wrong},
            )  # fmt: skip
        with pytest.raises(UsageError, match=r"a ROM file for 0000:00:04\.0, which is not one"):
            await attach(
                qemu, ["0000:00:03.0"], coherency="ignore", host=host,
                romfiles={"0000:00:04.0": wrong},
            )  # fmt: skip
    sent = [c for c, _ in fake.received]
    assert not {"getfd", "add-fd", "object-add", "device_add", "qom-set"} & set(sent), sent
    assert fake.fds_received == 0


async def test_a_confined_qemu_is_refused_before_anything_is_handed_over(
    fake: FakeQmp, build_host: Callable[[Topology], Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    fake.replies["qom-list-types"] = [{"name": "iommufd"}]
    fake.replies["query-memory-size-summary"] = {"base-memory": 1 << 20}
    fake.replies["qom-list"] = lambda a: (
        [{"name": "rp0", "type": "child<pcie-root-port>"}]
        if a["path"] == "/machine/peripheral"
        else []
    )
    asked: list[list[str]] = []
    profile = conf.Confinement("libvirt-abc", "enforce")

    def refused(pid: int, paths: list[str]) -> tuple[conf.Confinement, list[str]]:
        asked.append(paths)
        return profile, paths[:1]

    monkeypatch.setattr(handoff, "refused_paths", refused)
    async with Qemu(fake.path) as qemu:
        with pytest.raises(QemuConfined) as err:
            await attach(qemu, ["0000:00:03.0"], path="group", coherency="ignore", host=host)
    assert asked
    assert asked[0][0].endswith("/vfio/1")  # QEMU would open the group node itself
    assert "libvirt-abc" in str(err.value)
    assert "apparmor_parser -r /etc/apparmor.d/libvirt/libvirt-abc" in str(err.value)
    sent = [c for c, _ in fake.received]
    assert "device_add" not in sent
    assert "getfd" not in sent
