"""A hostile QEMU: whatever it answers, kvmvfio ends with its own error or succeeds.

kvmvfio runs as root and QEMU does not; a guest that escaped into QEMU
answers for it. Here a fake QMP peer (tests/fakeqmp.py) plays a QEMU that
behaves (:class:`Model`: ports, devices, objects and fds, as QEMU keeps
them) and hypothesis corrupts what it says: any reply, the greeting, the
answer to ``qmp_capabilities`` and the events, with wrong types, missing
members, huge lists and strings, bytes that are not JSON or not UTF-8,
nested junk, errors without ``desc``, replies with neither ``return`` nor
``error``, replies that never come, and a peer that hangs up. For each
case, through ``attach`` and ``detach`` (both paths, one or two devices):

- the outcome is success or a :class:`~kvmvfio.errors.KvmvfioError`,
  never another exception;
- it ends within :data:`CASE_DEADLINE_S` (no hang);
- kvmvfio's process has the same open files afterwards as before, and
  nothing of the QMP session is left (no task whose error asyncio would
  print as a traceback when it is collected; checked once, at the end);
- what kvmvfio claims to roll back is rolled back: the iommufd object an
  attach created goes again when no device got in, and an fd QEMU refused
  to use is closed in QEMU (``closefd``), unless the peer is gone.

A second tier runs generated argument vectors through ``kvmvfio attach``
and ``detach`` (timeouts, addresses, sockets, pids, pid files) against a
well-behaved fake: exit 0, 1 or 2 with a sentence printed escaped, never a
traceback. A third gives the replies libvirt passes on as text
(``DomainMonitor``) any text at all.

Case counts and times are in docs/BENCHMARKS.md (Reliability);
``HOSTILE_CASES=N`` runs N cases per tier instead of 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import io
import json
import os
import random
import resource
import signal
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from fakeqmp import HANGUP, SILENT, Envelope, Error, FakeQmp, Raw
from fakesysfs import Dev, Topology
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from qemu.qmp import Runstate

from kvmvfio.cli import run
from kvmvfio.errors import KvmvfioError, QemuRefused, QemuReplyInvalid
from kvmvfio.host import Host
from kvmvfio.libvirt.monitor import DomainMonitor
from kvmvfio.qemu import Qemu, attach, detach, handoff, qdev_id, replies
from kvmvfio.qemu.handoff import IOMMUFD_OBJECT

#: Cases per run of each tier; docs/BENCHMARKS.md (Reliability) quotes them.
CASES = int(os.environ.get("HOSTILE_CASES", "1000"))
#: Seconds one case may take before it counts as a hang (a loaded 2-core machine included).
CASE_DEADLINE_S = 10
#: What the fake QEMU's QMP steps are given (short: a silent reply costs this).
COMMAND_TIMEOUT_S = 0.2
DETACH_TIMEOUT_S = 0.2

#: What asyncio reported of the cases' loops (an error left in a task no one awaited).
UNHANDLED: list[dict[str, object]] = []

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}
DEVICES = ("0000:00:03.0", "0000:00:04.0")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    root = tmp_path_factory.mktemp("hostile")
    devices = [Dev(a, driver="vfio-pci", group=3 + i, **EDU) for i, a in enumerate(DEVICES)]
    sysfs, devfs = Topology(devices=devices).build(root)
    return Host(sysfs, devfs, sysfs.parent / "proc")


@pytest.fixture(scope="module", autouse=True)
def _nothing_unhandled() -> Iterator[None]:
    """No case left an error in a task no one awaited (asyncio prints those as tracebacks)."""
    yield
    gc.collect()  # a future's unretrieved error is reported when it is collected
    assert not UNHANDLED, [(c.get("message"), c.get("exception")) for c in UNHANDLED]


@pytest.fixture(scope="module", autouse=True)
def _memlock() -> Iterator[None]:
    """attach raises its peer's RLIMIT_MEMLOCK; the peer is this process, and may not.

    (Raising a hard limit takes CAP_SYS_RESOURCE, which this machine's root
    lacks.) The limit kvmvfio reads and sets is kept here instead.
    """
    limits = {"memlock": (8 << 20, 8 << 20)}

    def prlimit(pid: int, what: int, new: tuple[int, int] | None = None) -> tuple[int, int]:
        assert pid == os.getpid()
        assert what == resource.RLIMIT_MEMLOCK
        old = limits["memlock"]
        if new is not None:
            limits["memlock"] = new
        return old

    fake = types.SimpleNamespace(
        prlimit=prlimit,
        RLIMIT_MEMLOCK=resource.RLIMIT_MEMLOCK,
        RLIM_INFINITY=resource.RLIM_INFINITY,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handoff, "resource", fake)
        yield


def _open_fds() -> set[tuple[str, str]]:
    """This process's open files: (number, what it is)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, gone by now
            found.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return found


# -- a QEMU that behaves ------------------------------------------------------------------


@dataclass
class Model:
    """QEMU's state as QMP shows it, and the reply a QEMU that behaves gives each command."""

    ports: int = 2
    iommufd: bool = True
    objects: set[str] = field(default_factory=set)
    #: qdev id -> (bus, its iommufd link: "" on the legacy path)
    devices: dict[str, tuple[str, str]] = field(default_factory=dict)
    fds: set[str] = field(default_factory=set)

    def answer(self, command: str, args: dict[str, object]) -> object:
        if command == "qmp_capabilities":
            return {}
        if command == "qom-list-types":
            return [{"name": "iommufd", "parent": "object"}] if self.iommufd else []
        if command == "qom-list":
            return self._qom_list(str(args.get("path")))
        if command == "qom-get":
            return self._qom_get(str(args.get("path")), str(args.get("property")))
        if command == "query-memory-size-summary":
            return {"base-memory": 128 << 20, "plugged-memory": 0, "page-size": 4096}
        if command == "getfd":
            self.fds.add(str(args["fdname"]))
            return {}
        if command == "closefd":
            if args.get("fdname") not in self.fds:
                return Error("GenericError", "File descriptor named 'x' not found")
            self.fds.discard(str(args["fdname"]))
            return {}
        return self._change(command, args)

    def _qom_list(self, path: str) -> object:
        items: list[dict[str, object]] = [{"name": "type", "type": "string"}]
        if path == "/machine/peripheral":
            items += [
                {"name": f"rp{i}", "type": "child<pcie-root-port>"} for i in range(self.ports)
            ]
            items += [{"name": d, "type": "child<vfio-pci>"} for d in self.devices]
        elif path == "/objects":
            items += [{"name": o, "type": "child<iommufd>"} for o in self.objects]
        return items

    def _qom_get(self, path: str, prop: str) -> object:
        name = path.rpartition("/")[2]
        if name not in self.devices:
            return Error("DeviceNotFound", f"Device '{path}' not found")
        bus, link = self.devices[name]
        return f"/machine/peripheral/{bus}/{bus}.0" if prop == "parent_bus" else link

    def _change(self, command: str, args: dict[str, object]) -> object:
        if command == "object-add":
            if args.get("fd") not in self.fds or IOMMUFD_OBJECT in self.objects:
                return Error("GenericError", "cannot create the iommufd object")
            self.fds.discard(str(args["fd"]))
            self.objects.add(IOMMUFD_OBJECT)
            return {}
        if command == "object-del":
            if any(link for _, link in self.devices.values()):
                return Error(
                    "GenericError", "object 'kvmvfio-iommufd' is in use, can not be deleted"
                )
            self.objects.discard(str(args.get("id")))
            return {}
        if command == "device_add":
            return self._device_add(args)
        if command == "device_del":
            if args.get("id") not in self.devices:
                return Error("DeviceNotFound", f"Device '{args.get('id')}' not found")
            return {}
        return Error("CommandNotFound", f"The command {command} has not been found")

    def _device_add(self, args: dict[str, object]) -> object:
        ident, bus = str(args.get("id")), str(args.get("bus"))
        fd = args.get("fd")
        if fd is not None:
            self.fds.discard(str(fd))  # consumed, whatever happens next
        taken = {b for b, _ in self.devices.values()}
        if (
            ident in self.devices
            or bus in taken
            or bus not in {f"rp{i}" for i in range(self.ports)}
        ):
            return Error("GenericError", f"Bus '{bus}' not found or taken")
        link = f"/objects/{args['iommufd']}" if "iommufd" in args else ""
        self.devices[ident] = (bus, link)
        return {}

    def unplug(self, ident: str) -> dict[str, object]:
        """The guest lets go: the device goes, and QEMU says so."""
        self.devices.pop(ident, None)
        return {
            "event": "DEVICE_DELETED",
            "data": {"device": ident, "path": f"/machine/peripheral/{ident}"},
        }


# -- what a hostile QEMU says instead -------------------------------------------------------

_KEYS = st.sampled_from(
    ["name", "type", "base-memory", "plugged-memory", "abstract", "device", "path", "return",
     "error", "class", "desc", "id", "event", "data"]
) | st.text(max_size=8)  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "\x1b[2J\x1b[31mroot", "child<pcie-root-port>", "iommufd", "rp0"])
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=10,
)

#: Bytes that are no QMP message: not JSON, not UTF-8, not an object, too deep, too long.
RAW = st.sampled_from(
    [
        b"not json",
        b"\xff\xfe\x80 not utf-8",
        b'{"return": "\xc3\x28"}',
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b"",
        b"[" * 200_000,
        b"1" * 5000,
        b'{"id": 1, "return": ' + b"9" * 5000 + b"}",
        b" " * (2 << 20),
        b'{"QMP": {}}',
    ]
).map(Raw)

#: Replies with the command's id but the wrong members.
ENVELOPES = st.one_of(
    st.just(Envelope({})),
    st.just(Envelope({"error": {"class": "GenericError"}})),
    st.just(Envelope({"error": {"desc": "no class"}})),
    st.just(Envelope({"error": "GenericError"})),
    st.builds(lambda v: Envelope({"error": v}), JSON),
    st.builds(lambda v: Envelope({"error": {"class": v, "desc": "x"}}), JSON),
    st.builds(lambda v: Envelope({"return2": v}), JSON),
    st.just(Envelope({"event": "DEVICE_DELETED", "data": {}})),
)

#: QEMU refusing, in words of any kind (escaped when printed).
REFUSALS = st.builds(
    Error,
    st.sampled_from(["GenericError", "DeviceNotFound", "CommandNotFound", "\x1b]0;pwned\x07"]),
    st.text(max_size=30) | st.sampled_from(["guest is busy", "x" * 5000]),
)


def _huge(valid: object) -> object:
    """``valid`` made large: a list of thousands of entries (or of 100 000), a long string."""
    if isinstance(valid, list) and valid:
        return valid * (5000 // len(valid) + 1)
    if isinstance(valid, list):
        return [{"name": f"x{i}", "type": "child<pcie-root-port>"} for i in range(100_000)]
    if isinstance(valid, str):
        return valid + "x" * 5000
    if isinstance(valid, dict):
        return {**valid, "name": "n" * 5000, "base-memory": 2**64, "plugged-memory": 2**63}
    return valid


def _mutated(valid: object, rnd: random.Random, junk: object, key: str) -> object:
    """``valid`` with one thing wrong: a member gone or of another type, wrapped, or one more.

    The choices come from ``rnd`` and the junk was drawn beforehand, so the
    same script mutates the same way whenever its reply is asked for.
    """
    if isinstance(valid, list) and valid:
        i = rnd.randrange(len(valid))
        return [*valid[:i], _mutated(valid[i], rnd, junk, key), *valid[i + 1 :]]
    if isinstance(valid, dict) and valid:
        member = rnd.choice(sorted(valid))
        how = rnd.choice(["drop", "junk", "extra", "wrap"])
        if how == "drop":
            return {k: v for k, v in valid.items() if k != member}
        if how == "junk":
            return {**valid, member: junk}
        if how == "extra":
            return {**valid, key: junk}
        return [valid]
    return junk


#: In a hundred replies, about this many are not what QEMU would say.
HOSTILE_PERCENT = 12
_KINDS = ["junk", "mutated", "refused", "envelope", "raw", "huge", "hangup", "silent"]
#: Replies (and events after them) drawn per case, before the case runs; the
#: commands past them (no flow sends this many) get QEMU's own answer.
SCRIPT_LENGTH = 24


@dataclass(frozen=True)
class Slot:
    """What the peer does for the Nth command it gets, drawn before the case runs.

    Drawn up front, not as commands arrive: on a loaded machine a command's
    timeout may fire or not, and a script drawn as it goes would then draw
    differently when hypothesis replays a case (FlakyStrategyDefinition).
    """

    kind: str = "valid"
    #: the reply when it does not depend on QEMU's own answer; junk for "mutated"
    payload: object = None
    key: str = ""
    seed: int = 0
    #: how DEVICE_DELETED comes after a device_del (see :func:`_events`)
    deleted: str = "valid"
    deleted_junk: object = None
    #: a junk event after the reply, or None
    junk_event: Raw | None = None


@st.composite
def _slots(draw: st.DrawFn) -> Slot:
    kind = "valid"
    if draw(st.integers(0, 99), label="hostile?") < HOSTILE_PERCENT:
        kind = draw(st.sampled_from(_KINDS), label="kind")
    payload: object = None
    if kind == "refused":
        payload = draw(REFUSALS)
    elif kind == "envelope":
        payload = draw(ENVELOPES)
    elif kind == "raw":
        payload = draw(RAW)
    elif kind in ("junk", "mutated"):
        payload = draw(JSON)
    key = draw(_KEYS) if kind == "mutated" else ""
    seed = draw(st.integers(0, 2**32 - 1)) if kind == "mutated" else 0
    deleted = draw(
        st.sampled_from(["valid"] * 6 + ["none", "junk data", "other first", "raw", "odd name"]),
        label="DEVICE_DELETED",
    )
    deleted_junk: object = None
    if deleted == "junk data":
        deleted_junk = draw(JSON)
    elif deleted == "raw":
        deleted_junk = draw(RAW)
    junk_event = None
    if draw(st.integers(0, 19), label="junk event") == 0:
        junk_event = Raw(json.dumps({"event": draw(JSON), "data": draw(JSON)}).encode())
    return Slot(kind, payload, key, seed, deleted, deleted_junk, junk_event)


def _reply(slot: Slot, valid: Callable[[], object]) -> tuple[str, object]:
    """The kind of reply and the reply: mostly what QEMU would say, else not."""
    kind = slot.kind
    event(f"reply: {kind}")
    if kind in ("refused", "envelope", "raw"):
        return kind, slot.payload
    if kind in ("silent", "hangup"):
        return kind, SILENT if kind == "silent" else HANGUP
    good = valid()  # QEMU did what was asked; only its answer is wrong
    if kind == "valid" or isinstance(good, Error):
        return "valid", good
    if kind == "junk":
        return kind, slot.payload
    if kind == "huge":
        return kind, _huge(good)
    return kind, _mutated(good, random.Random(slot.seed), slot.payload, slot.key)


def _events(
    slot: Slot, model: Model, command: str, args: dict[str, object]
) -> list[dict[str, object] | Raw]:
    """Events after a reply: DEVICE_DELETED when a device was asked to go, now and then junk."""
    out: list[dict[str, object] | Raw] = []
    if command == "device_del" and args.get("id") in model.devices:
        how = slot.deleted
        event(f"DEVICE_DELETED: {how}")
        ident = str(args["id"])
        if how == "junk data":
            out.append(
                Raw(json.dumps({"event": "DEVICE_DELETED", "data": slot.deleted_junk}).encode())
            )
        elif how == "raw":
            assert isinstance(slot.deleted_junk, Raw)
            out.append(slot.deleted_junk)
        elif how == "odd name":
            out.append(
                Raw(json.dumps({"event": ["DEVICE_DELETED"], "data": {"device": ident}}).encode())
            )
        elif how == "other first":
            out.append({"event": "DEVICE_DELETED", "data": {"device": "other", "path": "/x"}})
        if how not in ("none", "raw"):
            out.append(model.unplug(ident))
    if slot.junk_event is not None:
        out.append(slot.junk_event)
    return out


# -- one case -------------------------------------------------------------------------------


@dataclass
class Case:
    """A hostile peer's case: what kvmvfio saw acknowledged, and what it was refused."""

    model: Model
    acked: list[str] = field(default_factory=list)
    refused: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    #: the peer closed the connection, or sent what ends it
    broken: bool = False
    #: commands the peer has answered (the next one gets script[asked])
    asked: int = 0


_COMMANDS = ("qmp_capabilities", "qom-list-types", "qom-list", "qom-get",
             "query-memory-size-summary", "getfd", "closefd", "object-add", "object-del",
             "device_add", "device_del")  # fmt: skip


def _peer(data: st.DataObject, fake: FakeQmp, case: Case) -> None:
    """Make ``fake`` the hostile QEMU of this case, its whole script drawn now."""
    script = data.draw(
        st.lists(_slots(), min_size=SCRIPT_LENGTH, max_size=SCRIPT_LENGTH), label="script"
    )
    turn: list[Slot] = []  # the slot of the command being answered

    def respond(command: str) -> Callable[[dict[str, object]], object]:
        def reply(args: dict[str, object]) -> object:
            if case.broken:
                return SILENT
            slot = script[case.asked] if case.asked < len(script) else Slot()
            case.asked += 1
            turn[:] = [slot]
            kind, out = _reply(slot, lambda: case.model.answer(command, args))
            if kind in ("raw", "hangup"):
                case.broken = True
            elif isinstance(out, Error):
                case.refused.append((command, args))
            elif kind == "valid":
                case.acked.append(command)
            return out

        return reply

    fake.replies = {c: respond(c) for c in _COMMANDS}
    fake.after = lambda command, args: (
        [] if case.broken or not turn else _events(turn[0], case.model, command, args)
    )
    greeting = "QEMU"
    if data.draw(st.integers(0, 99), label="greeting hostile?") < 3:
        greeting = data.draw(st.sampled_from(["junk", "raw", "no QMP", "silent"]), label="greeting")
    event(f"greeting: {greeting}")
    if greeting == "junk":
        fake.greet = {"QMP": data.draw(JSON)}
    elif greeting == "raw":
        fake.greet = data.draw(RAW)
    elif greeting == "no QMP":
        fake.greet = {"qmp": {"version": {}, "capabilities": []}}
    elif greeting == "silent":
        fake.greet = False


async def _flow(flow: str, qemu: Qemu, host: Host) -> None:
    if flow == "attach":
        await attach(qemu, DEVICES[:1], coherency="ignore", host=host)
    elif flow == "attach two":
        await attach(qemu, DEVICES, coherency="ignore", host=host)
    elif flow == "attach legacy":
        await attach(qemu, DEVICES[:1], path="legacy", coherency="ignore", host=host)
    elif flow == "detach":
        await detach(qemu, DEVICES[:1], timeout=DETACH_TIMEOUT_S, host=host)
    else:
        await detach(qemu, DEVICES, timeout=DETACH_TIMEOUT_S, host=host, drop_iommufd=True)


async def _case(
    sock: Path, flow: str, data: st.DataObject, host: Host
) -> tuple[Case, FakeQmp, str]:
    model = Model(
        ports=data.draw(st.integers(0, 3), label="ports"),
        iommufd=data.draw(st.booleans(), label="iommufd"),
    )
    if flow.startswith("detach"):
        model.objects.add(IOMMUFD_OBJECT)
        for i, addr in enumerate(DEVICES):
            model.devices[qdev_id(addr)] = (f"rp{i}", f"/objects/{IOMMUFD_OBJECT}")
        model.ports = 2
    case = Case(model)
    # An error left in a task nobody awaits is a traceback on the CLI's stderr:
    # asyncio prints it when the task is collected. Count them instead.
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: UNHANDLED.append(ctx))
    outcome = "ok"
    qemu = Qemu(sock, pid=os.getpid(), greeting_timeout=0.3, command_timeout=COMMAND_TIMEOUT_S)
    fake = await FakeQmp(sock).start()
    try:
        _peer(data, fake, case)
        async with asyncio.timeout(CASE_DEADLINE_S):
            try:
                async with qemu:
                    await _flow(flow, qemu, host)
            except KvmvfioError as err:
                outcome, said = type(err).__name__, str(err)
                if not said:
                    raise AssertionError(f"{outcome} says nothing") from err
            # The peer sees the hang-up before this case counts its files.
            for _ in range(200):
                if fake.sessions == 0:
                    break
                await asyncio.sleep(0.005)
    finally:
        await fake.stop()
    # Nothing of the QMP session is left: no task that could fail unseen later.
    assert qemu.client.runstate is Runstate.IDLE, qemu.client.runstate
    return case, fake, outcome


def _rolled_back(case: Case, fake: FakeQmp, flow: str, outcome: str) -> None:
    """What attach says it undoes on a failure is undone, unless the peer is gone."""
    if outcome == "ok" or case.broken or not flow.startswith("attach"):
        return
    sent = [c for c, _ in fake.received]
    if "object-add" in case.acked and "device_add" not in case.acked:
        assert "object-del" in sent[sent.index("object-add") :], sent
    for command, args in case.refused:
        fd = args.get("fd")
        if command in ("device_add", "object-add") and isinstance(fd, str):
            assert ("closefd", {"fdname": fd}) in fake.received, fake.received


_FLOWS = st.sampled_from(["attach", "attach two", "attach legacy", "detach", "detach two"])


@settings(
    max_examples=CASES,
    # Hypothesis re-runs a case that overran its deadline to see whether it is flaky, and
    # a loaded machine overruns one now and then: a hang is caught in the case instead.
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(flow=_FLOWS, data=st.data())
def test_a_hostile_qemu_gets_an_error_never_a_crash(
    host: Host, tmp_path_factory: pytest.TempPathFactory, flow: str, data: st.DataObject
) -> None:
    sock = tmp_path_factory.getbasetemp() / "hostile.sock"
    sock.unlink(missing_ok=True)
    before = _open_fds()
    try:
        case, fake, outcome = asyncio.run(
            asyncio.wait_for(_case(sock, flow, data, host), 3 * CASE_DEADLINE_S)
        )
    except TimeoutError:
        pytest.fail(f"{flow}: kvmvfio hung for {3 * CASE_DEADLINE_S} s on a hostile QEMU")
    event(f"{flow}: {outcome}")
    assert not _open_fds() - before, "kvmvfio left files open"
    _rolled_back(case, fake, flow, outcome)


# -- argument vectors ---------------------------------------------------------------------


@dataclass
class Peer:
    """A well-behaved fake QEMU, served from its own thread for the CLI's own event loop."""

    sock: Path
    model: Model = field(default_factory=Model)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def _answer(self, command: str, args: dict[str, object]) -> object:
        return self.model.answer(command, args)

    def start(self) -> Peer:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            fake = self.loop.run_until_complete(FakeQmp(self.sock).start())
            fake.replies = {c: functools.partial(self._answer, c) for c in _COMMANDS}
            fake.after = lambda command, args: (
                [self.model.unplug(str(args["id"]))]
                if command == "device_del" and args.get("id") in self.model.devices
                else []
            )
            self.fake = fake
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(fake.stop())
            self.loop.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory, host: Host) -> Iterator[dict[str, str]]:
    """Sockets and pid files of every kind, and the fake host's roots."""
    base = tmp_path_factory.mktemp("argv")
    peer = Peer(base / "qemu.sock").start()
    (base / "file").write_text("")
    os.mkfifo(base / "fifo")
    (base / "dir").mkdir()
    pidfiles = {"good": f"{os.getpid()}\n", "junk": "\x1b[31mnot a pid", "empty": "",
                "huge": str(2**70), "zero": "0", "other": "1\n", "binary": "\xff\xfe"}  # fmt: skip
    for name, text in pidfiles.items():
        (base / f"pid-{name}").write_text(text, errors="surrogateescape")
    yield {
        "socket": str(peer.sock),
        "base": str(base),
        "sysfs": str(host.sysfs),
        "devfs": str(host.devfs),
    }
    peer.stop()


def _socket_paths(base: str) -> st.SearchStrategy[str]:
    return st.sampled_from(
        [f"{base}/qemu.sock"] * 4
        + [f"{base}/none.sock", f"{base}/file", f"{base}/dir", f"{base}/fifo", "/dev/null",
           "x" * 200, f"{base}/{'d' * 120}.sock", "", "relative.sock"]
    )  # fmt: skip


_NUMBERS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e400", "1e9", "0.05", "30",
                            "1_0", "0x10", str(2**70), "", " 5", "\x1b[31m"])  # fmt: skip
_WORDS = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
_ADDRESSES = st.sampled_from([*DEVICES, "00:03.0", "0000:00:09.0", "3:0.9", "ffff:ff:1f.7"])


def _mostly(draw: st.DrawFn, good: st.SearchStrategy[str], bad: st.SearchStrategy[str]) -> str:
    """A good value four times in five, else a bad one (so that commands get past parsing)."""
    return draw(good) if draw(st.integers(0, 4)) else draw(bad)


@st.composite
def _qemu_argv(draw: st.DrawFn, base: str) -> list[str]:
    """``attach``/``detach`` command lines: mostly sane, with bad values mixed in."""
    command = draw(st.sampled_from(["attach", "detach"]))
    count = draw(st.sampled_from([1, 1, 1, 2, 0, 3]))
    argv = [
        command,
        *(_mostly(draw, st.sampled_from(DEVICES), _ADDRESSES | _WORDS) for _ in range(count)),
    ]
    who = draw(st.sampled_from(["qmp+pid"] * 6 + ["qmp+pidfile"] * 2 + ["domain", "none"]))
    if who.startswith("qmp"):
        argv += ["--qmp", _mostly(draw, st.just(f"{base}/qemu.sock"), _socket_paths(base) | _WORDS)]
    if who == "qmp+pid":
        argv += ["--pid", _mostly(draw, st.just(str(os.getpid())), _NUMBERS)]
    if who == "qmp+pidfile":
        bad = ["junk", "empty", "huge", "zero", "other", "binary", "none"]
        odd = [f"{base}/pid-{n}" for n in bad] + [f"{base}/fifo", f"{base}/dir", "/dev/zero"]
        argv += ["--pidfile", _mostly(draw, st.just(f"{base}/pid-good"), st.sampled_from(odd))]
    if who == "domain":
        argv += ["--domain", draw(st.sampled_from(["vm1"]) | _WORDS)]
    options: dict[str, st.SearchStrategy[str] | None] = {
        "--timeout": st.sampled_from(["0.05", "1", "30"]),
        "--json": None,
    }
    if command == "attach":
        options = {
            "--path": st.sampled_from(["auto", "iommufd", "legacy"]),
            "--bus": st.sampled_from(["rp0", "rp1", "rp9"]),
            "--coherency": st.sampled_from(["require", "warn", "ignore"]),
            "--no-raise-memlock": None,
            "--json": None,
        }
    bad_values = {"--timeout": _NUMBERS}
    chosen = draw(st.lists(st.sampled_from(sorted(options)), max_size=3))
    for option in chosen:
        argv.append(option)
        values = options[option]
        if values is not None:
            argv.append(_mostly(draw, values, bad_values.get(option, _WORDS)))
    if command == "attach" and "--coherency" not in chosen:
        argv += ["--coherency", "ignore"]  # the fake cdevs answer no coherency probe
    return argv


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _cli(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
        _alarm(CASE_DEADLINE_S * 2),
    ):
        try:
            code = run(argv)
        except SystemExit as exit_:  # argparse: a usage error (2)
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, err.getvalue()


@settings(
    max_examples=CASES,
    deadline=timedelta(seconds=4 * CASE_DEADLINE_S),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_attach_or_detach_argv_gets_a_result_or_a_sentence(
    places: dict[str, str], data: st.DataObject
) -> None:
    argv = data.draw(_qemu_argv(places["base"]), label="argv")
    full = [*argv, "--sysfs-root", places["sysfs"], "--dev-root", places["devfs"]]
    code, err = _cli(full)
    event(f"{argv[0]} exit {code}")
    event(f"said: {err.strip().splitlines()[-1][:70] if err.strip() else ''}")
    assert code in (0, 1, 2), (full, code, err)
    assert "Traceback" not in err, (full, err)
    if code != 0:
        assert err.strip(), (full, "a failure must say why")
    # What the user typed, QEMU's words: printed escaped, never raw to a terminal.
    assert not any(c != "\n" and not c.isprintable() for c in err), (full, err)


# -- the same replies, passed on by libvirt as text -----------------------------------------


class _Domain:
    def name(self) -> str:
        return "vm1"


_PARSERS = {
    "qom-list": replies.qom_list,
    "qom-list-types": replies.qom_list_types,
    "qom-get": replies.qom_path,
    "query-memory-size-summary": replies.memory_size,
    "device_add": replies.empty,
}
_TEXTS = st.one_of(
    JSON.map(lambda v: json.dumps({"return": v})),
    JSON.map(json.dumps),
    ENVELOPES.map(lambda e: json.dumps({"id": "libvirt-1", **e.members})),
    st.text(max_size=40),
    st.sampled_from(["[" * 100_000, "1" * 5000, " " * (2 << 20), "NaN", '{"return": {}}']),
)


@settings(max_examples=CASES, deadline=timedelta(seconds=CASE_DEADLINE_S))
@given(command=st.sampled_from(sorted(_PARSERS)), text=_TEXTS)
def test_any_reply_through_libvirt_is_a_value_or_a_kvmvfio_error(command: str, text: str) -> None:
    monitor = DomainMonitor(_Domain(), api=None)  # type: ignore[arg-type]
    said = "ok"
    try:
        _PARSERS[command](monitor._reply(command, text))  # as Monitor.call does
    except (QemuRefused, QemuReplyInvalid) as err:
        said = str(err)
    except replies.ReplyMisfit as err:  # Monitor.call makes it a QemuReplyInvalid
        said = err.problem
    event(said[:40])
    assert said
