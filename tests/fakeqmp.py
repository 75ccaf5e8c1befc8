"""A fake QMP peer for fast unit tests: a UNIX socket server speaking QMP's wire format.

It greets, accepts ``qmp_capabilities``, answers commands from a table the
test gives (a value, an error, or a function of the arguments), can send
events after a command, and records every command with the fds that came
with it (SCM_RIGHTS). What real QEMU does is tested in the lab; this peer
checks kvmvfio's side of the protocol.

It can be hostile too (tests/unit/test_qemu_hostile.py): any reply, the
greeting, the answer to ``qmp_capabilities`` or an event may be bytes sent
as they are (:class:`Raw`: not JSON, not UTF-8, far too long), a message
with the command's id but any members (:class:`Envelope`: neither
``return`` nor ``error``, an error without ``desc``), no answer at all
(:data:`SILENT`), or the connection closed (:data:`HANGUP`).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Reply = (
    object  # a value, an Error, a Raw, an Envelope, SILENT, HANGUP, or a callable of the arguments
)

#: A reply that never comes (a QEMU stuck in a command).
SILENT = object()
#: The peer closes the connection instead of answering.
HANGUP = object()


@dataclass
class Error:
    cls: str
    desc: str


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are, followed by CRLF: anything but a well-formed QMP message."""

    data: bytes


@dataclass(frozen=True)
class Envelope:
    """A reply of these members, with the command's id added (unless ``members`` has one)."""

    members: dict[str, object]


@dataclass
class FakeQmp:
    path: Path
    replies: dict[str, Reply] = field(default_factory=dict)
    #: command -> events sent right after its reply (a dict with "event" and "data", or a Raw)
    events: dict[str, list[dict[str, object] | Raw]] = field(default_factory=dict)
    #: command, arguments -> more events to send after its reply (a stateful peer's)
    after: Callable[[str, dict[str, object]], list[dict[str, object] | Raw]] | None = None
    #: False: never greet; a dict or a Raw: this greeting instead of QEMU's
    greet: bool | dict[str, object] | Raw = True
    received: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    fds_received: int = 0
    #: connections open now (a test waits for 0 before counting its own fds)
    sessions: int = 0
    _server: socket.socket | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> FakeQmp:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(4)
        self._server.setblocking(False)
        self._task = asyncio.ensure_future(self._serve())
        return self

    async def stop(self) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task  # may raise what a reply function raised (hypothesis's own)
        finally:
            if self._server is not None:
                self._server.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._server is not None
        while True:
            conn, _ = await loop.sock_accept(self._server)
            conn.setblocking(False)
            self.sessions += 1
            try:
                await self._session(conn)
            except (_HungUp, ConnectionError, BrokenPipeError):
                pass
            finally:
                conn.close()
                self.sessions -= 1

    async def _send(self, conn: socket.socket, msg: dict[str, object] | Raw) -> None:
        data = msg.data if isinstance(msg, Raw) else json.dumps(msg).encode()
        await asyncio.get_running_loop().sock_sendall(conn, data + b"\r\n")

    async def _session(self, conn: socket.socket) -> None:
        if self.greet is False:
            await asyncio.sleep(3600)
        greeting: dict[str, object] | Raw = (
            {"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": []}}
            if self.greet is True
            else self.greet
        )
        await self._send(conn, greeting)
        decoder = json.JSONDecoder()
        text = ""
        while True:
            fds: array.array[int] = array.array("i")
            data = await _recvmsg(conn, fds)
            for fd in fds:
                self.fds_received += 1
                os.close(fd)
            if not data:
                return
            # qemu.qmp sends JSON objects back to back (and a space with each fd).
            text += data.decode()
            while text.strip():
                text = text.lstrip()
                try:
                    msg, end = decoder.raw_decode(text)
                except ValueError:
                    break
                text = text[end:]
                await self._answer(conn, msg)

    async def _answer(self, conn: socket.socket, msg: dict[str, object]) -> None:
        command = str(msg["execute"])
        args = msg.get("arguments") or {}
        assert isinstance(args, dict)
        self.received.append((command, args))
        missing = Error("CommandNotFound", f"The command {command} has not been found")
        reply: Reply = self.replies.get(command, {} if command == "qmp_capabilities" else missing)
        if callable(reply):
            reply = reply(args)
        if reply is SILENT:
            return
        if reply is HANGUP:
            raise _HungUp
        out: dict[str, object] | Raw
        if isinstance(reply, Raw):
            out = reply
        elif isinstance(reply, Envelope):
            out = {"id": msg.get("id"), **reply.members}
        elif isinstance(reply, Error):
            out = {"id": msg.get("id"), "error": {"class": reply.cls, "desc": reply.desc}}
        else:
            out = {"id": msg.get("id"), "return": reply}
        await self._send(conn, out)
        more = self.after(command, args) if self.after is not None else []
        for event in [*self.events.get(command, []), *more]:
            if isinstance(event, Raw):
                await self._send(conn, event)
                continue
            await self._send(
                conn,
                {
                    "event": event["event"],
                    "data": event.get("data", {}),
                    "timestamp": {"seconds": 0, "microseconds": 0},
                },
            )


class _HungUp(Exception):
    """The test asked the peer to close the connection."""


async def _recvmsg(conn: socket.socket, fds: array.array[int]) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    def ready() -> None:
        try:
            data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
        except BlockingIOError:
            return
        except OSError as err:
            loop.remove_reader(conn.fileno())
            fut.set_exception(err)
            return
        loop.remove_reader(conn.fileno())
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[: len(raw) - (len(raw) % fds.itemsize)])
        fut.set_result(data)

    loop.add_reader(conn.fileno(), ready)
    try:
        return await fut
    finally:
        if not fut.done():
            loop.remove_reader(conn.fileno())
