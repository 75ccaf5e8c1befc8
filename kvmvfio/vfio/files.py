"""File descriptors with one owner, and opening VFIO's device nodes.

Every fd kvmvfio opens is held by exactly one :class:`OwnedFd` (defined in
:mod:`kvmvfio._closing`, below the layers, so that KVM's fds use it too).
Closing is idempotent; handing the fd to someone else is explicit
(:meth:`OwnedFd.detach`), never a copy of the integer; an owner dropped while
open warns (:class:`ResourceWarning`) and closes. Everything is opened with
``O_CLOEXEC`` so no child process inherits a device by accident.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kvmvfio._closing import Closing, FdClosed, OwnedFd
from kvmvfio.errors import Busy, KernelError, PermissionDenied
from kvmvfio.host.procs import holders

log = logging.getLogger(__name__)

__all__ = ["FdClosed", "FdObject", "OwnedFd", "open_node"]


def open_node(
    path: str | Path,
    subject: str,
    *,
    missing_hint: str | None = None,
    related: Sequence[str | Path] = (),
) -> OwnedFd:
    """Open a device node read-write with ``O_CLOEXEC``.

    Raises :class:`Busy` on EBUSY, naming the processes it finds in /proc
    holding ``path`` or one of the ``related`` nodes (the kernel makes a
    group and its devices' cdevs exclusive of each other),
    :class:`PermissionDenied` on EACCES/EPERM, and :class:`KernelError`
    otherwise; ``missing_hint`` explains an ENOENT.
    """
    text = str(path)
    try:
        fd = os.open(text, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        code = err.errno or errno.EIO
        if code == errno.EBUSY:
            who = holders(text, *related)
            raise Busy(code, "open", text, subject, holder=", ".join(who) or None) from err
        if code in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(
                code, "open", text, subject, "kvmvfio needs root (or access to it)"
            ) from err
        hint = missing_hint if code == errno.ENOENT else None
        raise KernelError(code, "open", text, subject, hint) from err
    log.debug("opened %s as fd %d (%s)", text, fd, subject)
    return OwnedFd(fd, text, subject)


class FdObject(Closing):
    """Base of the objects that own one kernel file: context managers, close, fileno.

    Usable as ``with`` and ``async with``; :meth:`close` is idempotent.
    Subclasses put their release steps in :meth:`_release`, which runs once,
    before the fd is closed.
    """

    def __init__(self, fd: OwnedFd) -> None:
        self._file = fd

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def subject(self) -> str:
        return self._file.subject

    @property
    def closed(self) -> bool:
        return self._file.closed

    def fileno(self) -> int:
        """The fd; raises :class:`FdClosed` after :meth:`close`."""
        return self._file.fileno()

    def _release(self) -> None:
        """Undo what this object did to the kernel beyond opening its file."""

    def close(self) -> None:
        """Release and close; safe to call twice."""
        if self._file.closed:
            return
        try:
            self._release()
        finally:
            self._file.close()
