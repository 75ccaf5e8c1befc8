"""What every kvmvfio object that owns a resource shares: ``close()`` and its fd.

:class:`Closing` is the context-manager protocol (``with`` and ``async with``
end in ``close()``). :class:`OwnedFd` is the one kind of object that holds a
file descriptor, in every layer (VFIO's files, KVM's VM and kvm-vfio device,
the fds handed to QEMU): it sits below the layers so that each of them uses it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Self

from kvmvfio.errors import KvmvfioError


class Closing:
    """``with`` and ``async with`` that end in :meth:`close` (which subclasses define)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class FdClosed(KvmvfioError):
    """An operation was asked of an fd that was already closed or handed over."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        super().__init__(f"{subject} is closed (or was handed over); open it again")


class OwnedFd:
    """One open file descriptor, the path it was opened from, and whether it is ours to close.

    ``borrowed=True`` wraps an fd that someone else (QEMU, a VMM) owns:
    :meth:`close` only forgets it. It is a flag rather than a second type so
    that every object holding an fd holds the same kind of thing, with one
    ``closed``, one :meth:`fileno` and one :meth:`detach`, and only the last
    step of :meth:`close` differs. An owned fd that is garbage-collected while
    still open is closed then, with a :class:`ResourceWarning` naming it, as
    Python's own files do.
    """

    __slots__ = ("_fd", "borrowed", "path", "subject")

    def __init__(self, fd: int, path: str, subject: str, *, borrowed: bool = False) -> None:
        self.path = path
        self.subject = subject
        self.borrowed = borrowed
        self._fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        """The fd number. Raises :class:`FdClosed` once closed or detached."""
        if self._fd is None:
            raise FdClosed(self.subject)
        return self._fd

    def detach(self) -> int:
        """Give up ownership: return the fd, which the caller must now close."""
        fd = self.fileno()
        self._fd = None
        return fd

    def close(self) -> None:
        """Close the fd (forget it, if borrowed); safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None and not self.borrowed:
            os.close(fd)

    def __del__(
        self,
        _warn: Callable[..., None] = warnings.warn,
        _close: Callable[[int], None] = os.close,
    ) -> None:
        # The defaults keep warnings.warn and os.close reachable at interpreter
        # shutdown, when module globals may already be gone (subprocess.Popen
        # does the same). getattr: __init__ may not have run to the end.
        fd = getattr(self, "_fd", None)
        if fd is None or getattr(self, "borrowed", True):
            return
        self._fd = None
        try:
            _warn(f"unclosed {self.subject} (fd {fd}, {self.path})", ResourceWarning, source=self)
        finally:
            _close(fd)

    def __repr__(self) -> str:
        borrowed = ", borrowed" if self.borrowed else ""
        return f"OwnedFd({self._fd}, {self.path!r}{borrowed})"
