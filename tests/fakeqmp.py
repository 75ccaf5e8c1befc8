"""A fake QMP peer for fast unit tests: a UNIX socket server speaking QMP's wire format.

It greets, accepts ``qmp_capabilities``, answers commands from a table the
test gives (a value, an error, or a function of the arguments), can send
events after a command, and records every command with the fds that came
with it (SCM_RIGHTS). What real QEMU does is tested in the lab; this peer
checks kvmvfio's side of the protocol.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

Reply = object  # a value, an Error, SILENT, or a callable(arguments) -> value | Error

#: A reply that never comes (a QEMU stuck in a command).
SILENT = object()


@dataclass
class Error:
    cls: str
    desc: str


@dataclass
class FakeQmp:
    path: Path
    replies: dict[str, Reply] = field(default_factory=dict)
    #: command -> events sent right after its reply
    events: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    greet: bool = True
    received: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    fds_received: int = 0
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._server is not None:
            self._server.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._server is not None
        while True:
            conn, _ = await loop.sock_accept(self._server)
            conn.setblocking(False)
            try:
                await self._session(conn)
            finally:
                conn.close()

    async def _send(self, conn: socket.socket, msg: dict[str, object]) -> None:
        await asyncio.get_running_loop().sock_sendall(conn, json.dumps(msg).encode() + b"\r\n")

    async def _session(self, conn: socket.socket) -> None:
        asyncio.get_running_loop()
        if not self.greet:
            await asyncio.sleep(3600)
        await self._send(conn, {"QMP": {"version": {"qemu": {"major": 10}}, "capabilities": []}})
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
        reply: Reply = (
            {}
            if command == "qmp_capabilities"
            else self.replies.get(
                command, Error("CommandNotFound", f"The command {command} has not been found")
            )
        )
        if callable(reply):
            reply = reply(args)
        if reply is SILENT:
            return
        out: dict[str, object] = {"id": msg.get("id")}
        if isinstance(reply, Error):
            out["error"] = {"class": reply.cls, "desc": reply.desc}
        else:
            out["return"] = reply
        await self._send(conn, out)
        for event in self.events.get(command, []):
            await self._send(
                conn,
                {
                    "event": event["event"],
                    "data": event.get("data", {}),
                    "timestamp": {"seconds": 0, "microseconds": 0},
                },
            )


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
