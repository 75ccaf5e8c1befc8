"""A libvirt-run QEMU's monitor, reached through libvirt, and attach/detach by ``virDomain``.

libvirt owns the QMP socket of every QEMU it runs (a QMP socket serves one
client), so kvmvfio speaks to such a QEMU through libvirt's monitor
passthrough: ``virDomainQemuMonitorCommand`` for commands and
``virDomainQemuMonitorCommandWithFiles`` (libvirt >= 8.2) for the one
command that carries a file descriptor, ``getfd``: the fd travels with
that command over libvirt's local socket, and libvirt passes it on to
QEMU with SCM_RIGHTS. kvmvfio's handoff steps
(:mod:`kvmvfio.qemu.handoff`) then run unchanged, so a device reaches a
libvirt domain by fd on the iommufd path, on libvirt versions that have no
iommufd hostdevs of their own.

libvirt marks a domain driven this way as tainted ("custom-monitor"), and
does not know of the devices kvmvfio adds: they are not in the domain's
XML, libvirt will not migrate or save them, and a libvirt hotplug onto a
port kvmvfio used fails. The QEMU process is found from libvirt's pid file
and checked to be that domain's QEMU before anything is sent: its memlock
limit must be raised for VFIO (libvirt raises it only for the hostdevs it
knows of).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar, cast

from kvmvfio.errors import KvmvfioError, LibvirtError, QemuError, QemuGone, QemuRefused, UsageError
from kvmvfio.host import Host, PciAddress
from kvmvfio.qemu import replies
from kvmvfio.qemu.handoff import Attachment
from kvmvfio.qemu.handoff import attach as _attach
from kvmvfio.qemu.handoff import detach as _detach
from kvmvfio.qemu.qmp import JsonObject, Monitor
from kvmvfio.qemu.replies import ReplyMisfit
from kvmvfio.vfio.files import OwnedFd
from kvmvfio.vfio.policy import Coherency, VfioPath

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Where the system libvirt daemon keeps its QEMU pid files.
RUN_DIR = Path("/run/libvirt/qemu")
VIR_ERR_NO_DOMAIN = 42
# libvirt error codes that mean the domain (or its QEMU) is not there.
_GONE_CODES = {VIR_ERR_NO_DOMAIN, 55}  # and VIR_ERR_OPERATION_INVALID ("not running")


class VirDomain(Protocol):
    """What kvmvfio uses of a ``libvirt.virDomain``."""

    def name(self) -> str: ...
    def UUIDString(self) -> str: ...
    def isActive(self) -> int: ...
    def XMLDesc(self, flags: int = 0) -> str: ...


class QemuApi(Protocol):
    """The two calls of ``libvirt_qemu`` kvmvfio makes (a seam for tests)."""

    def qemuMonitorCommand(self, domain: VirDomain, cmd: str, flags: int) -> str: ...
    def qemuMonitorCommandWithFiles(
        self, domain: VirDomain, cmd: str, files: list[int], flags: int = 0
    ) -> tuple[str, list[object]]: ...


def _libvirt_qemu() -> QemuApi:
    try:
        import libvirt_qemu  # noqa: PLC0415 (only where libvirt is used)
    except ImportError:
        raise UsageError(
            "libvirt-python is not installed: apt-get install python3-libvirt, "
            "or pip install 'kvmvfio[libvirt]'"
        ) from None
    return cast(QemuApi, libvirt_qemu)


async def call_libvirt(fn: Callable[..., T], *args: object) -> T:
    """Make a blocking libvirt call without blocking the event loop where that is safe.

    Under an asyncio event implementation for libvirt (``libvirtaio``, as the
    agent registers it), libvirt calls it back to watch its sockets, and
    that adapter is not thread-safe: there the call is made in the loop's
    own thread (libvirt's client polls its socket itself meanwhile). Without
    one, the call goes to a worker thread.
    """
    aio = sys.modules.get("libvirtaio")
    if aio is not None and aio.getCurrentImpl() is not None:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def error_of(err: Exception) -> tuple[int, str]:
    """libvirt's error code and message of ``err`` (-1 and its text for other errors)."""
    code = getattr(err, "get_error_code", lambda: -1)()
    message = getattr(err, "get_error_message", lambda: str(err))()
    return int(code or -1), str(message or err)


def _guest_name(arg: bytes) -> str | None:
    """The NAME of ``guest=NAME,...``, as libvirt writes ``-name`` (a comma doubled)."""
    if not arg.startswith(b"guest="):
        return None
    text = arg[len(b"guest=") :].decode(errors="replace")
    out, i = [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] != ",":
                break
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def qemu_pid(name: str, run_dir: Path = RUN_DIR) -> int:
    """The pid of the QEMU libvirt runs for domain ``name``, checked against its command line.

    Raises :class:`QemuGone` when there is no such process, and
    :class:`QemuError` when the pid file names a process that is not that
    domain's QEMU (a stale or forged pid file).
    """
    pidfile = run_dir / f"{name}.pid"
    try:
        text = pidfile.read_text().strip()
        pid = int(text)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise QemuGone(
            f"finding domain {name}'s QEMU", f"no {pidfile} or no such process"
        ) from None
    except (OSError, ValueError) as err:
        raise QemuError(f"cannot read domain {name!r}'s QEMU pid from {pidfile}: {err}") from None
    if not any(_guest_name(arg) == name for arg in cmdline):
        raise QemuError(
            f"pid {pid} from {pidfile} is not domain {name!r}'s QEMU (its command line has "
            f"no -name guest={name}); refusing to touch it"
        )
    return pid


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # the effective uid
    raise QemuError(f"/proc/{pid}/status has no Uid line")


class DomainMonitor(Monitor):
    """The monitor of a running libvirt domain's QEMU, through libvirt (async context manager).

    ``domain`` is the caller's ``libvirt.virDomain``; it stays the caller's.
    Entering finds and checks the QEMU process (:func:`qemu_pid`).
    """

    def __init__(
        self, domain: VirDomain, *, run_dir: Path = RUN_DIR, api: QemuApi | None = None
    ) -> None:
        self.domain = domain
        self.name = domain.name()
        self.run_dir = run_dir
        self._api = api

    @property
    def api(self) -> QemuApi:
        if self._api is None:
            self._api = _libvirt_qemu()
        return self._api

    async def connect(self) -> Self:
        """Find the domain's QEMU; :class:`QemuGone` when the domain is not running."""
        try:
            active = await call_libvirt(self.domain.isActive)
        except Exception as err:
            raise self._map("virDomainIsActive", err) from err
        if not active:
            raise QemuGone(f"reaching domain {self.name}", "the domain is not running")
        self.pid = qemu_pid(self.name, self.run_dir)
        self.uid = _uid_of(self.pid)
        log.info("domain %s: QEMU pid %d (uid %d), through libvirt", self.name, self.pid, self.uid)
        return self

    async def close(self) -> None:
        """Nothing to let go: the connection to libvirt is the caller's."""

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _map(self, call: str, err: Exception) -> QemuError | LibvirtError:
        code, message = error_of(err)
        if code in _GONE_CODES:
            return QemuGone(f"{call} on domain {self.name}", message)
        return LibvirtError(call, code, message, self.name)

    def _reply(self, command: str, text: str) -> object:
        """The ``return`` value of QEMU's reply, passed on by libvirt as text; checked.

        :class:`QemuRefused` for an error reply, :class:`QemuReplyInvalid`
        for one that is not QMP (see :mod:`kvmvfio.qemu.replies`).
        """
        try:
            answer = replies.outcome(replies.decode(text))
        except ReplyMisfit as err:
            raise self.invalid(command, err.problem) from None
        if isinstance(answer, replies.Refusal):
            raise QemuRefused(command, answer.error_class, answer.desc)
        return answer

    async def execute(self, command: str, arguments: JsonObject | None = None) -> object:
        """Run a QMP command through ``virDomainQemuMonitorCommand``."""
        cmd = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        log.debug("domain %s: qmp %s", self.name, cmd)
        try:
            text = await call_libvirt(self.api.qemuMonitorCommand, self.domain, cmd, 0)
        except Exception as err:
            raise self._map(command, err) from err
        return self._reply(command, text)

    async def send_fd(self, fd: OwnedFd, name: str) -> None:
        """``getfd`` with ``fd`` attached, through ``virDomainQemuMonitorCommandWithFiles``."""
        cmd = json.dumps({"execute": "getfd", "arguments": {"fdname": name}})
        try:
            text, files = await call_libvirt(
                self.api.qemuMonitorCommandWithFiles, self.domain, cmd, [fd.fileno()], 0
            )
        except Exception as err:
            raise self._map("getfd", err) from err
        for extra in files or ():  # QEMU returns none for getfd; never keep what we did not ask
            if isinstance(extra, int):
                os.close(extra)
            else:
                getattr(extra, "close", lambda: None)()
        try:
            replies.empty(self._reply("getfd", text))
        except ReplyMisfit as err:
            raise self.invalid("getfd", err.problem) from None
        log.info(
            "passed %s to domain %s (QEMU pid %d) as %r", fd.subject, self.name, self.pid, name
        )


def lookup_domain(conn: Any, name: str) -> VirDomain | None:
    """``conn.lookupByName(name)``; None when libvirt has no such domain.

    Raises :class:`~kvmvfio.errors.LibvirtError` for any other refusal.
    Blocking: call it through :func:`call_libvirt` from async code.
    """
    try:
        return cast(VirDomain, conn.lookupByName(name))
    except Exception as err:
        code, message = error_of(err)
        if code == VIR_ERR_NO_DOMAIN:
            return None
        raise LibvirtError("virDomainLookupByName", code, message, name) from err


@contextlib.contextmanager
def open_domain(
    uri: str, name: str, *, opener: Callable[[str], Any] | None = None
) -> Iterator[VirDomain]:
    """A connection to libvirt at ``uri`` and its domain ``name``, closed on exit.

    Raises :class:`~kvmvfio.errors.LibvirtError` naming the URI or the domain
    when libvirt cannot be reached or has no such domain.
    """
    if opener is None:
        try:
            import libvirt  # noqa: PLC0415 (only where libvirt is used)
        except ImportError:
            raise KvmvfioError(
                "the libvirt Python bindings are not installed (Debian: python3-libvirt)"
            ) from None
        opener = libvirt.open
    try:
        conn = opener(uri)
    except Exception as err:
        code, message = error_of(err)
        raise LibvirtError(f"a connection to {uri}", code, message) from None
    try:
        dom = lookup_domain(conn, name)
        if dom is None:
            raise UsageError(f"libvirt at {uri} has no domain named {name!r}")
        yield dom
    finally:
        with contextlib.suppress(Exception):
            conn.close()


async def attach(
    domain: VirDomain,
    addresses: Sequence[str | PciAddress],
    *,
    coherency: Coherency | str = Coherency.WARN,
    buses: Sequence[str] | None = None,
    raise_memlock: bool = True,
    host: Host | None = None,
    run_dir: Path = RUN_DIR,
) -> list[Attachment]:
    """:func:`kvmvfio.qemu.attach` for a running libvirt domain: the devices go by fd.

    Only the iommufd path crosses libvirt (the legacy path would have
    QEMU open ``/dev/vfio/N`` itself, which libvirt's namespaces and
    cgroups keep from it: give such a domain a ``<hostdev managed='no'>``
    instead). Raises what :func:`kvmvfio.qemu.attach` raises, and
    :class:`~kvmvfio.errors.LibvirtError` when libvirt refuses.
    """
    async with DomainMonitor(domain, run_dir=run_dir) as monitor:
        return await _attach(
            monitor,
            addresses,
            path=VfioPath.CDEV,
            coherency=coherency,
            buses=buses,
            raise_memlock=raise_memlock,
            host=host,
        )


async def detach(
    domain: VirDomain,
    addresses: Sequence[str | PciAddress],
    *,
    timeout: float = 30.0,
    host: Host | None = None,
    run_dir: Path = RUN_DIR,
) -> list[str]:
    """:func:`kvmvfio.qemu.detach` for a running libvirt domain."""
    async with DomainMonitor(domain, run_dir=run_dir) as monitor:
        return await _detach(monitor, addresses, timeout=timeout, host=host)
