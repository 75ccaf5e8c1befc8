"""Errors of the libvirt integration: libvirt's refusals, the qemu hook's files.

Raised by :mod:`kvmvfio.libvirt`; re-exported by :mod:`kvmvfio.errors`.
:class:`~kvmvfio.libvirt.metadata.MetadataError` is of this layer too and
still lives in :mod:`kvmvfio.libvirt.metadata`.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from kvmvfio.errors import KernelError, KvmvfioError, UsageError

__all__ = ["ForeignHook", "HookFileError", "HooksDirMissing", "LibvirtError", "StatusFileInvalid"]


class LibvirtError(KvmvfioError):
    """libvirt refused a call; its error code and words are kept."""

    def __init__(self, call: str, code: int, message: str, domain: str | None = None) -> None:
        self.call = call
        self.code = code
        self.message = message
        self.domain = domain
        where = f" for domain {domain!r}" if domain else ""
        super().__init__(f"libvirt refused {call}{where}: {message} (libvirt error {code})")


class HookFileError(KernelError):
    """A file operation on the hooks folder failed (EACCES, EROFS, ...)."""

    hints: ClassVar[Mapping[int, str]] = {
        errno.EACCES: "libvirt's hooks folder belongs to root: run kvmvfio hook as root",
        errno.EPERM: "libvirt's hooks folder belongs to root: run kvmvfio hook as root",
        errno.EROFS: "that file system is mounted read-only",
        errno.ENOSPC: "that file system is full",
        errno.EDQUOT: "that file system is full",
    }


class ForeignHook(KvmvfioError):
    """A file at the hook's path was not written by kvmvfio; it was left alone."""

    def __init__(self, path: Path, action: str, hint: str) -> None:
        self.path = path
        self.action = action
        super().__init__(
            f"refusing to {action} {path}: kvmvfio did not write it (its header has no "
            f"kvmvfio marker line); {hint}"
        )


class HooksDirMissing(UsageError):
    """The folder that should hold libvirt's hooks folder does not exist."""

    def __init__(self, hooks_dir: Path) -> None:
        self.hooks_dir = hooks_dir
        super().__init__(
            f"cannot create {hooks_dir}: {hooks_dir.parent} does not exist (is libvirt "
            "installed? name libvirt's hooks folder with --hooks-dir)"
        )


class StatusFileInvalid(KvmvfioError):
    """The agent's status file holds something the agent never writes; nothing was shown from it."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(
            f"{path} is not a status the kvmvfio agent writes: {why}. The agent rewrites it at "
            "its next reconcile; if none runs, remove the file"
        )
