"""The agent serves libvirt's hook: ``prepare begin`` and ``release end`` without a Python start.

The hook's shell front (``hook-front.sh``) hands a kvmvfio domain's
``prepare begin`` or ``release end`` to a running agent instead of
starting Python, when one runs; else it starts Python as before. Both
then run :func:`kvmvfio.libvirt.hook.handle`: the same parse, the same
checks, the same journal.

The protocol, in ``ROOT/hook/`` (``/run/kvmvfio/hook``: root's, 0700,
checked like every folder of :mod:`kvmvfio.prepare.rundir`):

``agent``
    ``PID START\\n``: the serving agent's pid and its start time (clock
    ticks after boot, field 22 of ``/proc/PID/stat``), written once the
    agent reads ``requests``, removed when it stops. The front takes the
    agent as live only when ``/proc/PID/stat`` gives that start time (a
    pid reused by another process does not count).
``requests``
    A FIFO (root's, 0600). The front writes one line, its request id (its
    own pid, decimal), opening it read-write so that the open never
    blocks; a line that short is written whole (``PIPE_BUF``).
``req.ID``
    The request (root's, 0600, written by the front under ``umask 077``
    before its line): ``kvmvfio-hook-request-1``, the front's deadline
    (whole seconds of ``/proc/uptime``, i.e. ``CLOCK_BOOTTIME``), NAME,
    OP, SUBOP, EXTRA, each followed by a NUL, then the domain XML. The
    agent reads it as untrusted, at most :data:`MAX_REQUEST` bytes, and
    removes it.
``reply.ID``
    ``prepare begin`` only: a FIFO (0600) the front makes and reads. The
    agent writes ``STATUS N\\n`` and the N lines the hook would have
    written to stderr, then removes it. The front also runs ``sleep``
    with the FIFO's write end open until its deadline, so its read ends
    by then even if no agent ever answers: the front then refuses the
    start (it handed the request over, so it must not also act itself).

The agent serves requests in order, one at a time, on a thread of its own
(never on the event loop, which a libvirt call may block while libvirt
runs this very hook). A ``prepare begin`` is acted on only when its
front still waits (the reply FIFO has a reader) and its deadline is more
than :data:`MARGIN` seconds away; a prepare that finishes later than that
is undone (:func:`~kvmvfio.libvirt.hook.release_own`) and refused, so
that a front that gave up never leaves devices behind. A ``release end``
is acted on whenever it comes: the front did not wait. Requests found at
start, which an agent that died left unserved, are served the same way
(a prepare whose front still waits) or dropped (a release: the agent's
reconciliation releases what a stopped domain still holds, and a domain
may have started again meanwhile). A malformed line or file is logged,
named, and dropped.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import KvmvfioError, shown
from kvmvfio.host import Host
from kvmvfio.host.procs import start_time
from kvmvfio.libvirt import hook
from kvmvfio.libvirt.metadata import MAX_XML_BYTES
from kvmvfio.prepare.errors import UntrustedFile
from kvmvfio.prepare.journal import DEFAULT_ROOT
from kvmvfio.prepare.rundir import RunFolder, describe

log = logging.getLogger(__name__)

FOLDER = "hook"
PIDFILE = "agent"
FIFO = "requests"
MAGIC = b"kvmvfio-hook-request-1"
#: The request file's header fields (MAGIC, deadline, name, op, subop, extra).
_FIELDS = 6
#: Largest request file read: the XML's bound and room for the header.
MAX_REQUEST = MAX_XML_BYTES + 4096
#: A prepare must be done this many seconds before the front's deadline, or it is undone.
MARGIN = 10
#: Longest request line (a pid); a longer one is dropped.
_MAX_LINE = 20


def boottime() -> float:
    """Seconds since boot, as ``/proc/uptime`` counts them (the front's clock)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Request:
    """One hook call handed over by the front."""

    id: str
    deadline: int
    name: str
    op: str
    subop: str
    xml: bytes


class BadRequest(ValueError):
    """A request file that is not what the front writes (logged and dropped, never raised on)."""


def parse_request(rid: str, raw: bytes) -> Request:
    """The request in file ``req.RID``'s bytes ``raw``; :class:`BadRequest` for anything else."""
    if len(raw) > MAX_REQUEST:
        raise BadRequest(f"request {rid} is larger than {MAX_REQUEST} bytes")
    parts = raw.split(b"\0", _FIELDS)
    if len(parts) != _FIELDS + 1 or parts[0] != MAGIC:
        raise BadRequest(f"request {rid} does not start as the hook's front writes one")
    deadline, name, op, subop = parts[1:5]
    if not deadline.isdigit() or len(deadline) > 12:
        raise BadRequest(f"request {rid}: the deadline {shown(repr(deadline), 40)} is not a number")
    try:
        texts = [b.decode() for b in (name, op, subop)]
    except UnicodeDecodeError:
        raise BadRequest(f"request {rid}: its arguments are not UTF-8") from None
    if (texts[1], texts[2]) not in (hook.PREPARE, hook.RELEASE):
        raise BadRequest(
            f"request {rid}: {shown(repr(texts[1] + ' ' + texts[2]), 60)} is not an event "
            "the front hands over"
        )
    return Request(rid, int(deadline), texts[0], texts[1], texts[2], parts[_FIELDS])


def _request_id(line: bytes) -> str | None:
    text = line.decode("ascii", "replace")
    return text if text.isdigit() and len(text) <= 10 and text[0] != "0" else None


class HookServer:
    """The agent's side of the hook: reads ``ROOT/hook/requests`` on a thread, acts, answers.

    ``handle`` is :func:`kvmvfio.libvirt.hook.handle` (a seam for tests);
    ``host`` builds the host model for each request (read afresh: drivers
    change). :meth:`start` makes the folder and FIFO and writes the pid
    file; :meth:`stop` removes the pid file and ends the thread.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        *,
        host: Callable[[], Host] | None = None,
        uid: int | None = None,
        proc: str | Path = "/proc",
        clock: Callable[[], float] = boottime,
        handle: Callable[..., int] = hook.handle,
    ) -> None:
        self.root = Path(root)
        self.folder = RunFolder(root, FOLDER, uid)
        self.path = self.folder.path
        self._host = host or Host
        self._proc = proc
        self._clock = clock
        self._handle = handle
        self._fifo: int | None = None
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None
        #: Requests served so far (for tests and logs).
        self.served = 0

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> bool:
        """Open the request FIFO, serve leftovers, start the thread, write the pid file.

        Returns False (logged) when the folder or FIFO is not kvmvfio's: the
        fronts then start Python as they do without an agent.
        """
        try:
            self._fifo = self._open_fifo()
        except (KvmvfioError, OSError) as err:
            log.error("not serving the libvirt hook: %s", err)
            return False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="kvmvfio-hook", daemon=True)
        self._thread.start()
        me = os.getpid()
        start = start_time(me, self._proc)
        try:
            self.folder.write(PIDFILE, f"{me} {start}\n".encode())
        except KvmvfioError as err:
            log.error("not serving the libvirt hook: %s", err)
            self.stop()
            return False
        log.info("serving the libvirt hook on %s", self.path / FIFO)
        return True

    def stop(self) -> None:
        """Stop serving: remove the pid file (fronts start Python again), end the thread."""
        with contextlib.suppress(KvmvfioError):
            self.folder.remove(PIDFILE)
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._fifo, self._stop_r, self._stop_w):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fifo, self._stop_r, self._stop_w = None, -1, -1

    def _open_fifo(self) -> int:
        with self.folder.opened(create=True) as folder:
            assert folder is not None  # created
            with contextlib.suppress(FileExistsError):
                os.mkfifo(FIFO, 0o600, dir_fd=folder)
            # Read-write: no open blocks, and no EOF when the last front closes it.
            fd = os.open(FIFO, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=folder)  # fmt: skip
            try:
                self._check_fifo(self.path / FIFO, os.fstat(fd), fix_mode=fd)
            except BaseException:
                os.close(fd)
                raise
            os.set_blocking(fd, True)
            self._leftovers(folder)
            return fd

    def _check_fifo(self, path: Path, st: os.stat_result, *, fix_mode: int | None = None) -> None:
        expected = f"a FIFO owned by uid {self.folder.uid} with mode 0600"
        if not stat.S_ISFIFO(st.st_mode):
            raise UntrustedFile(path, f"is {describe(st)}", expected)
        if st.st_uid != self.folder.uid:
            raise UntrustedFile(path, f"is owned by uid {st.st_uid}", expected)
        if st.st_nlink != 1:
            raise UntrustedFile(path, f"has {st.st_nlink} hard links", expected)
        if stat.S_IMODE(st.st_mode) != 0o600:
            if fix_mode is None:
                raise UntrustedFile(path, f"has mode {stat.S_IMODE(st.st_mode):04o}", expected)
            os.fchmod(fix_mode, 0o600)  # ours (checked above): the umask took bits

    def _leftovers(self, folder: int) -> None:
        """Serve or drop what an agent that died left: requests, and replies nobody made."""
        for name in sorted(os.listdir(folder)):
            if name.startswith("req."):
                rid = _request_id(name[4:].encode())
                if rid is None:
                    log.warning("hook request file %s: not a request id; removed", shown(name))
                    self._remove(name)
                    continue
                self._serve(rid, leftover=True)
        for name in sorted(os.listdir(folder)):
            if name.startswith("reply.") and not (self.path / f"req.{name[6:]}").exists():
                # Its front has given up or will by its deadline; removing it makes sure.
                self._remove(name)

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        pending = b""
        assert self._fifo is not None
        stopping = False
        while True:
            ready, _, _ = select.select([self._fifo, self._stop_r], [], [], 0 if stopping else None)
            if self._stop_r in ready:
                # The pid file is gone: no new front hands over. Serve what
                # came before, then stop.
                stopping = True
                os.read(self._stop_r, 1)
                continue
            if self._fifo not in ready:
                return
            chunk = os.read(self._fifo, 4096)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE:
                log.error("hook request line %s...: too long; dropped", shown(repr(pending[:40])))
                pending = b""
            for line in lines:
                rid = _request_id(line)
                if rid is None:
                    log.error("hook request line %s: not a request id; dropped",
                              shown(repr(line[:40])))  # fmt: skip
                    continue
                try:
                    self._serve(rid)
                except Exception:  # a bug: keep serving the others
                    log.exception("hook request %s: serving it failed", rid)

    # -- one request ---------------------------------------------------------------------

    def _remove(self, name: str) -> None:
        with contextlib.suppress(KvmvfioError):
            self.folder.remove(name)

    def _serve(self, rid: str, *, leftover: bool = False) -> None:
        file = f"req.{rid}"
        try:
            raw = self.folder.read(file, MAX_REQUEST)
            if raw is None:
                log.info("hook request %s: no file %s (served already); dropped", rid, file)
                return
            request = parse_request(rid, raw)
        except (KvmvfioError, BadRequest) as err:
            log.error("hook request %s: %s; dropped", rid, err)
            self._remove(file)
            self._remove(f"reply.{rid}")
            return
        self._remove(file)
        event = f"{request.op} {request.subop}"
        if (request.op, request.subop) == hook.RELEASE:
            if leftover:
                log.warning(
                    "hook request %s: domain %s %s, left by an agent that stopped; dropped "
                    "(the agent releases what a stopped domain holds when it reconciles)",
                    rid,
                    shown(request.name),
                    event,
                )
                return
            t = time.monotonic()
            status, _ = self._act(request)
            self.served += 1
            log.info(
                "hook request %s: domain %s %s served (status %d, %.2f s)",
                rid, shown(request.name), event, status, time.monotonic() - t,
            )  # fmt: skip
            return
        self._prepare(request)

    def _act(self, request: Request) -> tuple[int, str]:
        err = io.StringIO()
        status = self._handle(
            request.name, request.op, request.subop, request.xml, err,
            host=self._host(), root=self.root,
        )  # fmt: skip
        return status, err.getvalue()

    def _prepare(self, request: Request) -> None:
        rid, name = request.id, shown(request.name)
        reply = f"reply.{rid}"
        fd = self._open_reply(reply)
        if fd is None:
            log.warning("hook request %s: domain %s prepare begin: its front is gone; dropped",
                        rid, name)  # fmt: skip
            self._remove(reply)
            return
        try:
            if self._clock() > request.deadline - MARGIN:
                status, said = (
                    1,
                    (
                        f"kvmvfio: the agent (pid {os.getpid()}) got the request too close to "
                        "the hook's deadline; nothing was done, start the domain again\n"
                    ),
                )
                log.warning("hook request %s: domain %s prepare begin: too late; refused",
                            rid, name)  # fmt: skip
            else:
                t = time.monotonic()
                status, said = self._act(request)
                late = self._clock() > request.deadline - MARGIN
                if status == 0 and late:
                    self._undo(request)
                    status, said = (
                        1,
                        (
                            f"kvmvfio: the agent (pid {os.getpid()}) took longer than the hook "
                            "waits; what it prepared is put back, start the domain again\n"
                        ),
                    )
                self.served += 1
                log.info(
                    "hook request %s: domain %s prepare begin served (status %d%s, %.2f s)",
                    rid, name, status, ", undone: too late" if late else "",
                    time.monotonic() - t,
                )  # fmt: skip
            if not self._answer(fd, status, said) and status == 0:
                log.warning("hook request %s: domain %s: its front left before the answer; "
                            "undoing the prepare", rid, name)  # fmt: skip
                self._undo(request)
        finally:
            os.close(fd)
            self._remove(reply)

    def _undo(self, request: Request) -> None:
        self._act(Request(request.id, request.deadline, request.name, *hook.RELEASE, request.xml))

    def _open_reply(self, name: str) -> int | None:
        """The reply FIFO's write end, checked; None when it is gone or no front reads it."""
        with self.folder.opened(create=False) as folder:
            if folder is None:
                return None
            try:
                self._check_fifo(self.path / name, os.stat(name, dir_fd=folder,
                                                           follow_symlinks=False))  # fmt: skip
                fd = os.open(name, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=folder)  # fmt: skip
            except FileNotFoundError:
                return None
            except OSError as err:
                if err.errno == errno.ENXIO:  # no reader: the front is gone
                    return None
                raise
            except KvmvfioError as err:
                log.error("hook reply %s: %s", name, err)
                return None
            try:
                self._check_fifo(self.path / name, os.fstat(fd))
            except KvmvfioError as err:
                os.close(fd)
                log.error("hook reply %s: %s", name, err)
                return None
            return fd

    @staticmethod
    def _answer(fd: int, status: int, said: str) -> bool:
        """Write the verdict; False when the front no longer reads it."""
        lines = said.splitlines()
        data = "".join([f"{status} {len(lines)}\n"] + [f"{line}\n" for line in lines]).encode()
        os.set_blocking(fd, True)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BrokenPipeError:
            return False
        return True
