"""kvmvfio's /run/kvmvfio in a test folder: files written as kvmvfio writes them, or not.

:func:`put` writes a file the way kvmvfio does (folder 0700, file 0600,
owned by the test's uid), for journal records a test wants to damage by
hand; :func:`plant` puts something else where a file or folder is expected
(a link, a FIFO, a folder, a file of another mode or owner, a hard link).
"""

from __future__ import annotations

import os
from pathlib import Path

#: A uid that owns nothing on a test machine (for "owned by someone else").
STRANGER = 4242

#: What :func:`plant` can put in place of a file or folder.
KINDS = ("symlink", "dangling", "fifo", "folder", "file", "mode", "owner", "hardlink")


def folder(path: Path) -> Path:
    """Make ``path`` (and its parents) as kvmvfio makes its folders: mode 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def put(path: Path, data: bytes | str) -> Path:
    """Write ``data`` at ``path`` as kvmvfio writes its files (0600, folders 0700)."""
    folder(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    return path


def plant(path: Path, kind: str, target: Path, data: bytes = b"{}") -> None:
    """Put a ``kind`` (one of :data:`KINDS`) at ``path``; ``target`` is what links point to.

    ``file``, ``mode`` and ``owner`` hold ``data``; ``owner`` needs root
    (chown), callers skip it otherwise.
    """
    folder(path.parent)
    if kind == "symlink":
        os.symlink(target, path)
    elif kind == "dangling":
        os.symlink(target.parent / "no-such-file", path)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "folder":
        path.mkdir(mode=0o700)
    elif kind == "file":
        put(path, data)
    elif kind == "mode":
        put(path, data)
        os.chmod(path, 0o644)
    elif kind == "owner":
        put(path, data)
        os.chown(path, STRANGER, STRANGER)
    elif kind == "hardlink":
        os.link(target, path)
    else:
        raise ValueError(kind)
