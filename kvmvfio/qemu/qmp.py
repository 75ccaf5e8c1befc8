"""A running QEMU, reached over its QMP socket, whose identity is checked first.

kvmvfio holds the privilege to open VFIO files and QEMU does not; before
a single file descriptor crosses the socket, the peer must be the QEMU
process the caller named. The socket is connected here, its peer
credentials (``SO_PEERCRED``: the pid, uid and gid of the process that
created the listening socket, i.e. QEMU) compared with the expected pid,
and only then handed to ``qemu.qmp``'s :class:`~qemu.qmp.QMPClient`.

What QEMU answers is input too: a guest that escaped into QEMU would
answer for it. Every step has a deadline (``connect`` included: a socket
nobody accepts on, a greeting that never comes, a ``qmp_capabilities``
never answered), every reply is checked against QEMU's schema where it
arrives (:mod:`kvmvfio.qemu.replies`), and what does not fit is a
:class:`~kvmvfio.errors.QemuReplyInvalid` naming the command, never a
Python error from deeper in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
    StateError,
)
from qemu.qmp.error import ProtocolError
from qemu.qmp.message import DeserializationError, Message, UnexpectedTypeError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from kvmvfio.errors import (
    QemuError,
    QemuGone,
    QemuNoAnswer,
    QemuPeerMismatch,
    QemuRefused,
    QemuReplyInvalid,
    UsageError,
    shown,
)
from kvmvfio.host.procs import pid_alive
from kvmvfio.qemu import replies
from kvmvfio.qemu.deadline import seconds
from kvmvfio.qemu.replies import (
    MAX_MESSAGE,
    DeviceDeleted,
    MemorySize,
    QomProperty,
    QomType,
    ReplyMisfit,
)
from kvmvfio.vfio.files import OwnedFd

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
T = TypeVar("T")

JsonObject = dict[str, object]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``SO_PEERCRED`` of a connected UNIX socket: (pid, uid, gid)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def read_pidfile(path: str | Path) -> int:
    """The pid in QEMU's ``-pidfile``; :class:`UsageError` when unreadable or malformed.

    Only a regular file is read (a FIFO would block, a device never end),
    and only its first bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except (OSError, ValueError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise UsageError(f"cannot read the pid file {shown(str(path))}: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"the pid file {shown(str(path))} is not a regular file")
        raw = os.read(fd, 64)
    except OSError as err:
        raise UsageError(f"cannot read the pid file {shown(str(path))}: {err.strerror}") from None
    finally:
        os.close(fd)
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit() or not 0 < int(text) < 1 << 22:  # the kernel's PID_MAX_LIMIT
        raise UsageError(f"the pid file {shown(str(path))} holds {text[:20]!r}, not a pid")
    return int(text)


def _device_deleted(event: object) -> bool:
    """The filter of kvmvfio's one event listener: never raises, whatever QEMU sent."""
    return isinstance(event, dict | Mapping) and event.get("event") == "DEVICE_DELETED"


def _no_event(_event: object) -> bool:
    return False


def _misfit(err: BaseException | None) -> str | None:
    """What was wrong with what QEMU sent, when that is why the connection ended."""
    while isinstance(err, ConnectError | GreetingError | NegotiationError):
        err = err.exc
    if isinstance(err, DeserializationError):
        return "a message that is not JSON"
    if isinstance(err, UnexpectedTypeError):
        return "a message that is not a JSON object"
    if isinstance(err, UnicodeError):
        return "a message that is not UTF-8"
    if isinstance(err, RecursionError):
        return "a message nested too deeply"
    if isinstance(err, ValueError) and "Separator" in str(err):  # asyncio's readline, too long
        return f"a message longer than {MAX_MESSAGE} bytes"
    if isinstance(err, ValueError):  # json: an integer of thousands of digits
        return f"a message kvmvfio cannot read ({err})"
    if isinstance(err, ProtocolError | KeyError | TypeError | AssertionError):
        return f"a message that is not QMP ({type(err).__name__}: {err})"
    return None


#: Waits until QEMU has deleted the device it was made for.
DeletedWaiter = Callable[[], Awaitable[None]]


class _NotAsked(Exception):
    """A question of :class:`Together` not asked, since one before it failed."""


async def _after(previous: asyncio.Task[Any], question: Coroutine[Any, Any, T]) -> T:
    """``question``, once ``previous`` has succeeded (one command at a time)."""
    await asyncio.wait({previous})
    if previous.cancelled() or previous.exception() is not None:
        question.close()
        raise _NotAsked
    return await question


class Together:
    """Questions to QEMU asked at once (``async with monitor.together() as ask``).

    ``ask(monitor.qom_list(...))`` starts the question and returns its task;
    on leaving the block every one has been answered, and the first failure
    *in the order asked* is raised, whatever finished first, so what a
    caller sees does not depend on timing. Each command keeps its own
    deadline. QEMU answers one command at a time, in the order sent; what
    the questions save is the wait between them (one round trip for all,
    instead of one each). ``at_once=False`` asks one after the other and
    stops at the first failure, for a carrier that takes one command at a
    time. Only for questions: a command that changes QEMU is never sent
    before the answers it depends on are in.
    """

    def __init__(self, *, at_once: bool) -> None:
        self.at_once = at_once
        self.tasks: list[asyncio.Task[Any]] = []

    def __call__(self, question: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        if not self.at_once and self.tasks:
            question = _after(self.tasks[-1], question)
        task = asyncio.ensure_future(question)
        self.tasks.append(task)
        return task

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            for task in self.tasks:
                task.cancel()
        # return_exceptions: every failure is retrieved here, none left for asyncio to print.
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if exc is not None:
            return
        for task in self.tasks:
            if task.cancelled():
                raise asyncio.CancelledError
            err = task.exception()
            if err is not None:
                raise err


class Monitor:
    """What the handoff needs of a running QEMU, whoever carries the commands.

    :class:`Qemu` speaks QMP on QEMU's own socket; a libvirt-run QEMU is
    reached through libvirt (:class:`kvmvfio.libvirt.monitor.DomainMonitor`).
    Subclasses give :meth:`execute`, :meth:`send_fd` and :meth:`alive`, and
    set :attr:`pid` and :attr:`uid` (the QEMU process, as the kernel knows it).

    The typed methods (:meth:`qom_list`, :meth:`memory_size`, :meth:`perform`,
    ...) are what kvmvfio's own steps use: each checks QEMU's reply against
    the command's schema (:mod:`kvmvfio.qemu.replies`) and raises
    :class:`QemuReplyInvalid` when it does not fit.
    """

    pid: int = 0
    uid: int = 0
    #: QOM types by the interface asked (``qom-list-types``): a QEMU's types do not change.
    _types: dict[str, tuple[QomType, ...]] | None = None

    def together(self) -> Together:
        """Questions asked together (:class:`Together`); here one after the other."""
        return Together(at_once=False)

    async def execute(self, command: str, arguments: JsonObject | None = None) -> object:
        """Run a QMP command and return its ``return`` value, unchecked.

        :class:`QemuRefused` keeps QEMU's error class and words;
        :class:`QemuReplyInvalid` when the reply is neither a return nor an
        error. Callers that act on the value use the typed methods instead.
        """
        raise NotImplementedError

    async def send_fd(self, fd: OwnedFd, name: str) -> None:
        """Pass ``fd`` to QEMU and name it there (``getfd``); ``fd`` stays ours to close."""
        raise NotImplementedError

    def alive(self) -> bool:
        """Whether the QEMU process still exists."""
        return pid_alive(self.pid)

    def invalid(self, command: str, problem: str) -> QemuReplyInvalid:
        """The error for QEMU's reply to ``command`` that does not fit its schema."""
        return QemuReplyInvalid(command, problem, self.pid)

    async def call(
        self, command: str, arguments: JsonObject | None, parse: Callable[[object], T]
    ) -> T:
        """Run ``command``; its reply as ``parse`` (from :mod:`~kvmvfio.qemu.replies`) reads it."""
        raw = await self.execute(command, arguments)
        try:
            return parse(raw)
        except ReplyMisfit as err:
            raise self.invalid(command, err.problem) from None

    async def perform(self, command: str, arguments: JsonObject | None = None) -> None:
        """Run a command that answers nothing (``{}``): ``device_add``, ``object-del``, ..."""
        await self.call(command, arguments, replies.empty)

    async def close_fd(self, name: str) -> None:
        """``closefd``: drop a passed fd QEMU did not consume (best effort)."""
        with contextlib.suppress(QemuRefused):  # consumed or already gone
            await self.perform("closefd", {"fdname": name})

    async def qom_list(self, path: str) -> tuple[QomProperty, ...]:
        """``qom-list`` of ``path``: its properties, as QEMU lists them."""
        return await self.call("qom-list", {"path": path}, replies.qom_list)

    async def qom_link(self, path: str, prop: str) -> str:
        """``qom-get`` of a ``link<>`` property: the QOM path it points to ("" when unset)."""
        return await self.call("qom-get", {"path": path, "property": prop}, replies.qom_path)

    async def qom_list_types(self, implements: str) -> tuple[QomType, ...]:
        """``qom-list-types`` of the types that implement ``implements``.

        Asked once per monitor: the types of a running QEMU are those of its
        binary (the command loads every module first), and a monitor speaks
        to one process. A refusal is not kept.
        """
        if self._types is None:
            self._types = {}
        if implements not in self._types:
            self._types[implements] = await self.call(
                "qom-list-types", {"implements": implements}, replies.qom_list_types
            )
        return self._types[implements]

    async def memory_size(self) -> MemorySize:
        """``query-memory-size-summary``: the guest's RAM."""
        return await self.call("query-memory-size-summary", None, replies.memory_size)

    @contextlib.asynccontextmanager
    async def watch_deleted(self, qdev_id: str) -> AsyncIterator[DeletedWaiter]:
        """Watch for the deletion of ``qdev_id``, from before the ``device_del`` is sent.

        This default polls QOM (twice a second) until the device is gone:
        it works over any carrier. :class:`Qemu` waits for the
        ``DEVICE_DELETED`` event instead.
        """

        async def deleted() -> None:
            while True:
                names = {p.name for p in await self.qom_list("/machine/peripheral")}
                if qdev_id not in names:
                    return
                await asyncio.sleep(0.5)

        yield deleted


class Qemu(Monitor):
    """A QMP connection to one QEMU process (async context manager).

    ``pid`` is the QEMU the caller means (from its launcher, or
    :func:`read_pidfile`); ``None`` accepts any peer and is meant for tests
    and for callers that verified the socket otherwise. :attr:`pid`,
    :attr:`uid` and :attr:`gid` are the peer's, as the kernel reports them.
    ``greeting_timeout`` bounds the whole of :meth:`connect` (the socket,
    QEMU's greeting and the capabilities negotiation), ``command_timeout``
    each command.
    """

    def __init__(
        self,
        socket_path: str | Path,
        pid: int | None = None,
        *,
        greeting_timeout: float = 10.0,
        command_timeout: float = 120.0,
    ) -> None:
        self.socket_path = str(socket_path)
        self.greeting_timeout = seconds(greeting_timeout, "greeting_timeout", positive=True)
        self.command_timeout = seconds(command_timeout, "command_timeout", positive=True)
        self.expected_pid = pid
        self.pid = 0
        self.uid = 0
        self.gid = 0
        # One message (one line) is read whole before it is parsed: bound it.
        self.client = _Client("kvmvfio", readbuflen=MAX_MESSAGE)
        # qemu.qmp logs what QEMU sent (an unknown reply id, a message it could
        # not parse) in QEMU's own words: through kvmvfio's logger, escaped.
        self.client.logger = _WIRE_LOG
        # qemu.qmp's default listener (which cannot be removed) keeps every event
        # QEMU sends, forever, for a reader kvmvfio does not have: 1000
        # attach/detach cycles grew this process by 3 MiB (the soak). Events are
        # listened for where they are awaited; the default one takes none.
        self.client.events.event_filter = _no_event
        self._connected = False
        self._sock: socket.socket | None = None
        # An fd and the getfd that names it travel together: no other command between.
        self._fd_lock = asyncio.Lock()
        # The commands sent and not yet answered, in the order sent (one object each).
        self._in_flight: list[_Sent] = []
        # Why the session ended, found out once (by the first to see it), and what
        # was then waiting for QEMU: every one of those is told the same.
        self._ending: asyncio.Task[BaseException | None] | None = None
        self._ended_during: tuple[_Sent, ...] = ()

    def together(self) -> Together:
        """Questions sent at once (:class:`Together`): one round trip's wait for all."""
        return Together(at_once=True)

    @property
    def _where(self) -> str:
        return shown(self.socket_path)

    async def _socket(self, deadline: float) -> socket.socket:
        """A socket connected to QEMU's, its peer checked; by ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            while True:
                try:
                    sock.connect(self.socket_path)
                    break
                except BlockingIOError:  # a full listen queue: nobody accepts there
                    if loop.time() >= deadline:
                        raise QemuError(
                            f"nobody accepted a connection on the QMP socket {self._where} within "
                            f"{self.greeting_timeout:g} s: its listen queue is full (the process "
                            "behind it is stuck, or does not serve it)"
                        ) from None
                    await asyncio.sleep(0.05)
            self.pid, self.uid, self.gid = peer_credentials(sock)
            if self.expected_pid is not None and self.pid != self.expected_pid:
                raise QemuPeerMismatch(self._where, self.expected_pid, self.pid, self.uid)
        except (OSError, ValueError) as err:  # ValueError: a NUL in the path
            sock.close()
            why = getattr(err, "strerror", None) or str(err)
            raise QemuError(f"cannot connect to the QMP socket {self._where}: {why}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    async def connect(self) -> Self:
        """Connect, verify the peer, and negotiate QMP, all within ``greeting_timeout``.

        Raises :class:`QemuError` when the socket cannot be reached or does
        not answer in time, :class:`QemuPeerMismatch` (nothing sent) when its
        peer is another process than ``pid``, :class:`QemuReplyInvalid` when
        the greeting or the negotiation is not QMP, :class:`QemuGone` when
        the peer hangs up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.greeting_timeout
        sock = await self._socket(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                await self.client.connect(sock)
        except TimeoutError:
            # The deadline may pass just as the session is made: then it is made.
            if self.client.runstate is not Runstate.RUNNING:
                greeted = self.client.greeting is not None
                await self._abandon(sock)
                if greeted:
                    raise QemuNoAnswer(
                        "qmp_capabilities", self.pid, self.greeting_timeout
                    ) from None
                raise QemuError(
                    f"QEMU pid {self.pid} did not greet on {self._where} within "
                    f"{self.greeting_timeout:g} s: a QMP socket serves one client at a time, and "
                    "another one (libvirt, a launcher) holds it, or QEMU is stuck"
                ) from None
        except ConnectError as err:
            await self._abandon(sock)
            raise self._failed_to_connect(err) from err
        except BaseException:
            await self._abandon(sock)
            raise
        self._connected = True
        self._sock = sock
        self._ending, self._ended_during = None, ()
        self._types = None  # a new connection may reach a new QEMU (pid=None takes any)
        log.info("connected to QEMU pid %d (uid %d) at %s", self.pid, self.uid, self._where)
        return self

    async def _abandon(self, sock: socket.socket) -> None:
        """Undo a connection that failed half way: qemu.qmp's session (and its tasks), the socket.

        A session left running would hold the socket and, once the peer
        hangs up, leave an error in a task no one awaits (asyncio prints
        that as a traceback).
        """
        if self.client.runstate is not Runstate.IDLE:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.client.disconnect()
        sock.close()

    def _failed_to_connect(self, err: ConnectError) -> QemuError:
        step = "greeting" if self.client.greeting is None else "qmp_capabilities"
        problem = _misfit(err)
        if problem is not None:
            return self.invalid(step, problem)
        cause = err.exc
        if isinstance(cause, EOFError | ConnectionError | asyncio.IncompleteReadError):
            return QemuGone(f"the QMP {step} on {self._where}", "QEMU hung up")
        return QemuError(f"QMP negotiation on {self._where} failed: {shown(str(err))}")

    async def _hang_up(self) -> BaseException | None:
        """Disconnect; return what ended the connection, if something did."""
        if not self._connected:
            return None
        self._connected = False
        try:
            async with asyncio.timeout(5):
                await self.client.disconnect()
        except TimeoutError:  # a writer stuck on a peer that reads nothing
            log.debug("QMP disconnect from pid %d took more than 5 s", self.pid)
        except Exception as err:  # QEMU died first, or sent what ended the session
            log.debug("QMP disconnect from pid %d: %r", self.pid, err)
            return err
        finally:
            # qemu.qmp's transport closes it, but not on every path where QEMU died
            # first (the lab saw it left to the garbage collector): close it here too.
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        return None

    async def close(self) -> None:
        """Disconnect; safe to call twice."""
        if self._ending is not None:  # a lost session's hang-up, under way or done
            await asyncio.shield(self._ending)
        await self._hang_up()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _lost(
        self, step: str, err: BaseException, command: str | None = None, sent: _Sent | None = None
    ) -> QemuError:
        """The error for a connection that ended during ``step``: what QEMU sent, or its leaving.

        ``command`` is what QEMU was answering (the step itself, by default);
        ``sent``, the command's own record when it was sent and awaits its
        answer. When what QEMU sent ended the session, every command then
        waiting gets the same error, naming them all: a message that is not
        QMP cannot be matched to the command it answered.
        """
        mine = sent or _Sent(command or step)
        if self._ending is None:
            waiting = self._in_flight
            self._ended_during = (*waiting, *(() if mine in waiting else (mine,)))
            self._ending = asyncio.ensure_future(self._hang_up())
        problem = _misfit(await asyncio.shield(self._ending))
        if problem is not None and mine in self._ended_during:
            names = tuple(dict.fromkeys(s.command for s in self._ended_during))
            return QemuReplyInvalid(names[0], problem, self.pid, among=names)
        return QemuGone(step, shown(str(err)) or type(err).__name__)

    async def execute(self, command: str, arguments: JsonObject | None = None) -> object:
        """Run a QMP command and return its ``return`` value, unchecked.

        :class:`QemuRefused` keeps QEMU's error class and words;
        :class:`QemuReplyInvalid` when the reply is neither a return nor a
        well-formed error, or QEMU sent something that is not QMP;
        :class:`QemuGone` when the connection drops meanwhile;
        :class:`QemuNoAnswer` when QEMU does not answer within
        ``command_timeout`` seconds (a stuck QEMU must not hang its caller).
        """
        log.debug("qmp %s %s", command, arguments or "")
        sent = _Sent(command)
        self._in_flight.append(sent)
        try:
            async with asyncio.timeout(self.command_timeout):
                return await self.client.execute(command, arguments)
        except TimeoutError:
            raise QemuNoAnswer(command, self.pid, self.command_timeout) from None
        except ExecuteError as err:
            raise QemuRefused(command, err.error_class, err.error.error.desc) from err
        except ProtocolError as err:  # routed to us, but neither a return nor an error
            problem = (
                "its 'error' has no string 'class' and 'desc'"
                if "malformed" in err.error_message
                else "it has neither 'return' nor 'error'"
            )
            raise self.invalid(command, problem) from None
        except (
            ExecInterruptedError,
            StateError,
            EOFError,
            OSError,
            asyncio.IncompleteReadError,
        ) as err:
            raise await self._lost(command, err, sent=sent) from err
        finally:
            self._in_flight.remove(sent)

    async def send_fd(self, fd: OwnedFd, name: str) -> None:
        """Pass ``fd`` to QEMU with SCM_RIGHTS and name it there (``getfd``).

        QEMU receives its own copy; ``fd`` stays ours to close.
        """
        async with self._fd_lock:
            try:
                self.client.send_fd_scm(fd.fileno())
            except (OSError, StateError) as err:
                raise await self._lost(f"passing {fd.subject}", err, "getfd") from err
            await self.perform("getfd", {"fdname": name})
        log.info("passed %s to QEMU pid %d as %r", fd.subject, self.pid, name)

    async def _ended(self) -> None:
        while self.client.runstate is Runstate.RUNNING:
            await self.client.runstate_changed()

    async def _next_event(self, listener: EventListener, name: str) -> object:
        """The next event ``listener`` takes; :class:`QemuGone` (or why) if the connection ends."""
        get = asyncio.ensure_future(listener.get())
        ended = asyncio.ensure_future(self._ended())
        try:
            await asyncio.wait({get, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (get, ended):
                task.cancel()
            await asyncio.gather(get, ended, return_exceptions=True)
        if get.done() and not get.cancelled():
            return get.result()
        raise await self._lost(f"waiting for {name}", EOFError("the connection ended"), name)

    @contextlib.asynccontextmanager
    async def watch_deleted(self, qdev_id: str) -> AsyncIterator[DeletedWaiter]:
        """Wait for QEMU's ``DEVICE_DELETED`` event of ``qdev_id`` (listening starts here).

        An event of that name whose data does not fit its schema raises
        :class:`QemuReplyInvalid`; the wait ends with :class:`QemuGone` if
        the connection does.
        """
        listener = EventListener(event_filter=_device_deleted)
        with self.client.listen(listener):

            async def deleted() -> None:
                while True:
                    event = await self._next_event(listener, "DEVICE_DELETED")
                    assert isinstance(event, Mapping)  # _device_deleted let it through
                    try:
                        gone: DeviceDeleted = replies.device_deleted(event.get("data"))
                    except ReplyMisfit as err:
                        raise self.invalid("DEVICE_DELETED", err.problem) from None
                    if gone.device == qdev_id:
                        return

            yield deleted


class _Client(QMPClient):
    """qemu.qmp's client, formatting a message for its log only when the log takes it.

    qemu.qmp's hooks on every message in and out (``_cb_outbound``,
    ``_cb_inbound``, there for subclasses) log it pretty-printed, and
    format it so (``json.dumps`` with an indent: Python's pure-Python
    encoder) before the logger decides to drop it: the largest cost of
    kvmvfio's own CPU time in an attach (issue 19's profile).
    """

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_outbound(msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            return super()._cb_inbound(msg)
        return msg


class _Sent:
    """A command sent and awaiting its answer (compared by identity)."""

    __slots__ = ("command",)

    def __init__(self, command: str) -> None:
        self.command = command


class _Escaped(logging.Filter):
    """Print what qemu.qmp logs (QEMU's words among it) escaped and bounded."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = shown(record.getMessage(), 400), None
        return True


_WIRE_LOG = log.getChild("wire")
_WIRE_LOG.addFilter(_Escaped())


__all__ = [
    "DeletedWaiter",
    "DeviceDeleted",
    "MemorySize",
    "Monitor",
    "Qemu",
    "QomProperty",
    "QomType",
    "Together",
    "peer_credentials",
    "read_pidfile",
]
