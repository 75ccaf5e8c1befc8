"""A running QEMU, reached over its QMP socket, whose identity is checked first.

kvmvfio holds the privilege to open VFIO files and QEMU does not; before
a single file descriptor crosses the socket, the peer must be the QEMU
process the caller named. The socket is connected here, its peer
credentials (``SO_PEERCRED``: the pid, uid and gid of the process that
created the listening socket, i.e. QEMU) compared with the expected pid,
and only then handed to ``qemu.qmp``'s :class:`~qemu.qmp.QMPClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Self, cast

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    StateError,
)

from kvmvfio.errors import (
    QemuError,
    QemuGone,
    QemuNoAnswer,
    QemuPeerMismatch,
    QemuRefused,
    UsageError,
)
from kvmvfio.host.procs import pid_alive
from kvmvfio.vfio.files import OwnedFd

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")

JsonObject = dict[str, object]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``SO_PEERCRED`` of a connected UNIX socket: (pid, uid, gid)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def read_pidfile(path: str | Path) -> int:
    """The pid in QEMU's ``-pidfile``; :class:`UsageError` when unreadable or malformed."""
    try:
        text = Path(path).read_text().strip()
    except OSError as err:
        raise UsageError(f"cannot read the pid file {path}: {err.strerror}") from None
    if not text.isdigit() or int(text) <= 0:
        raise UsageError(f"the pid file {path} holds {text[:20]!r}, not a pid")
    return int(text)


def _no_event(_event: object) -> bool:
    return False


#: Waits until QEMU has deleted the device it was made for.
DeletedWaiter = Callable[[], Awaitable[None]]


class Monitor:
    """What the handoff needs of a running QEMU, whoever carries the commands.

    :class:`Qemu` speaks QMP on QEMU's own socket; a libvirt-run QEMU is
    reached through libvirt (:class:`kvmvfio.libvirt.monitor.DomainMonitor`).
    Subclasses give :meth:`execute`, :meth:`send_fd` and :meth:`alive`, and
    set :attr:`pid` and :attr:`uid` (the QEMU process, as the kernel knows it).
    """

    pid: int = 0
    uid: int = 0

    async def execute(self, command: str, arguments: JsonObject | None = None) -> object:
        """Run a QMP command; :class:`QemuRefused` keeps QEMU's error class and words."""
        raise NotImplementedError

    async def send_fd(self, fd: OwnedFd, name: str) -> None:
        """Pass ``fd`` to QEMU and name it there (``getfd``); ``fd`` stays ours to close."""
        raise NotImplementedError

    def alive(self) -> bool:
        """Whether the QEMU process still exists."""
        return pid_alive(self.pid)

    async def close_fd(self, name: str) -> None:
        """``closefd``: drop a passed fd QEMU did not consume (best effort)."""
        with contextlib.suppress(QemuRefused):  # consumed or already gone
            await self.execute("closefd", {"fdname": name})

    async def qom_list(self, path: str) -> list[JsonObject]:
        """``qom-list`` of ``path``: its properties, as QEMU lists them."""
        return cast(list[JsonObject], await self.execute("qom-list", {"path": path}))

    async def qom_get(self, path: str, prop: str) -> object:
        """``qom-get``."""
        return await self.execute("qom-get", {"path": path, "property": prop})

    @contextlib.asynccontextmanager
    async def watch_deleted(self, qdev_id: str) -> AsyncIterator[DeletedWaiter]:
        """Watch for the deletion of ``qdev_id``, from before the ``device_del`` is sent.

        This default polls QOM (twice a second) until the device is gone:
        it works over any carrier. :class:`Qemu` waits for the
        ``DEVICE_DELETED`` event instead.
        """

        async def deleted() -> None:
            while True:
                names = {str(i["name"]) for i in await self.qom_list("/machine/peripheral")}
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
        self.greeting_timeout = greeting_timeout
        self.command_timeout = command_timeout
        self.expected_pid = pid
        self.pid = 0
        self.uid = 0
        self.gid = 0
        self.client = QMPClient("kvmvfio")
        # qemu.qmp's default listener (which cannot be removed) keeps every event
        # QEMU sends, forever, for a reader kvmvfio does not have: 1000
        # attach/detach cycles grew this process by 3 MiB (the soak). Events are
        # listened for where they are awaited; the default one takes none.
        self.client.events.event_filter = _no_event
        self._connected = False
        # An fd and the getfd that names it travel together: no other command between.
        self._fd_lock = asyncio.Lock()

    async def connect(self) -> Self:
        """Connect, verify the peer, and negotiate QMP.

        Raises :class:`QemuError` when the socket cannot be reached,
        :class:`QemuPeerMismatch` (nothing sent) when its peer is another
        process than ``pid``.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.socket_path)
            self.pid, self.uid, self.gid = peer_credentials(sock)
            if self.expected_pid is not None and self.pid != self.expected_pid:
                raise QemuPeerMismatch(self.socket_path, self.expected_pid, self.pid, self.uid)
        except OSError as err:
            sock.close()
            raise QemuError(
                f"cannot connect to the QMP socket {self.socket_path}: {err.strerror}"
            ) from None
        except BaseException:
            sock.close()
            raise
        try:
            await asyncio.wait_for(self.client.connect(sock), self.greeting_timeout)
        except TimeoutError:
            sock.close()
            raise QemuError(
                f"QEMU pid {self.pid} did not greet on {self.socket_path} within "
                f"{self.greeting_timeout:g} s: a QMP socket serves one client at a time, and "
                "another one (libvirt, a launcher) holds it"
            ) from None
        except ConnectError as err:
            sock.close()
            raise QemuError(f"QMP negotiation on {self.socket_path} failed: {err}") from err
        self._connected = True
        log.info("connected to QEMU pid %d (uid %d) at %s", self.pid, self.uid, self.socket_path)
        return self

    async def close(self) -> None:
        """Disconnect; safe to call twice."""
        if self._connected:
            self._connected = False
            try:
                await self.client.disconnect()
            except Exception as err:  # QEMU died first: what broke was reported already
                log.debug("QMP disconnect from pid %d: %r", self.pid, err)

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def execute(self, command: str, arguments: JsonObject | None = None) -> object:
        """Run a QMP command; :class:`QemuRefused` keeps QEMU's error class and words.

        :class:`QemuGone` when the connection drops meanwhile,
        :class:`QemuNoAnswer` when QEMU does not answer within
        ``command_timeout`` seconds (a stuck QEMU must not hang its caller).
        """
        log.debug("qmp %s %s", command, arguments or "")
        try:
            async with asyncio.timeout(self.command_timeout):
                return await self.client.execute(command, arguments)
        except TimeoutError:
            raise QemuNoAnswer(command, self.pid, self.command_timeout) from None
        except ExecuteError as err:
            raise QemuRefused(command, err.error_class, str(err)) from err
        except (
            ExecInterruptedError,
            StateError,
            EOFError,
            ConnectionError,
            asyncio.IncompleteReadError,
        ) as err:
            raise QemuGone(command, str(err) or type(err).__name__) from err

    async def send_fd(self, fd: OwnedFd, name: str) -> None:
        """Pass ``fd`` to QEMU with SCM_RIGHTS and name it there (``getfd``).

        QEMU receives its own copy; ``fd`` stays ours to close.
        """
        async with self._fd_lock:
            try:
                self.client.send_fd_scm(fd.fileno())
            except OSError as err:
                raise QemuGone(f"passing {fd.subject}", err.strerror or "") from err
            await self.execute("getfd", {"fdname": name})
        log.info("passed %s to QEMU pid %d as %r", fd.subject, self.pid, name)

    @contextlib.asynccontextmanager
    async def watch_deleted(self, qdev_id: str) -> AsyncIterator[DeletedWaiter]:
        """Wait for QEMU's ``DEVICE_DELETED`` event of ``qdev_id`` (listening starts here)."""
        listener = EventListener("DEVICE_DELETED")
        with self.client.listen(listener):

            async def deleted() -> None:
                async for event in listener:
                    data = cast(JsonObject, event.get("data") or {})
                    if data.get("device") == qdev_id:
                        return

            yield deleted
