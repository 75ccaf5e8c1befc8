"""Argument types shared by the commands: paths checked before anything reads them.

A path given on the command line is the user's input like any other: an
over-long one, one with a NUL, or one that names no folder gets a sentence
and exit status 2, never an ``OSError`` from deep inside a read.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from kvmvfio.errors import shown
from kvmvfio.vfio.policy import VfioPath, old_spelling

#: Linux's limits on a path and on one of its components (bytes).
PATH_MAX = 4096
NAME_MAX = 255


def path_text(text: str) -> str:
    """A path argument that the kernel can take at all (length, NUL); not looked up."""
    raw = os.fsencode(text)
    if not raw:
        raise argparse.ArgumentTypeError("an empty path")
    if b"\0" in raw:
        raise argparse.ArgumentTypeError(f"{shown(text, 80)}: a path cannot hold a NUL byte")
    if len(raw) >= PATH_MAX:
        raise argparse.ArgumentTypeError(
            f"{shown(text, 80)}: {len(raw)} bytes, longer than a path can be ({PATH_MAX - 1})"
        )
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise argparse.ArgumentTypeError(
            f"{shown(text, 80)}: a name in it has {len(longest)} bytes, more than {NAME_MAX}"
        )
    return text


def existing_dir(text: str) -> str:
    """A path argument naming a folder that exists."""
    path_text(text)
    try:
        mode = os.stat(text).st_mode
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{shown(text, 80)}: {err.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise argparse.ArgumentTypeError(f"{shown(text, 80)}: not a directory")
    return text


def device_file(text: str) -> tuple[str, str]:
    """A ``DEVICE=FILE`` argument (``--romfile``): the device as written, and the path."""
    device, sep, path = text.partition("=")
    if not sep or not device or not path:
        raise argparse.ArgumentTypeError(
            f"{shown(text, 80)}: expected DEVICE=FILE (e.g. 0000:01:00.0=/path/to/vbios.rom)"
        )
    return device, path_text(path)


#: What ``--path`` takes (old spellings are read too, with a notice).
PATHS = [p.value for p in VfioPath]


def vfio_path(text: str) -> str:
    """A ``--path`` argument in kvmvfio's one vocabulary (:class:`VfioPath`).

    An old spelling (``iommufd``, ``legacy``) is taken with a one-line
    notice naming the new one; anything else is left for ``choices`` to refuse.
    """
    notice = old_spelling(text, "--path ")
    if notice is None:
        return text
    print(f"kvmvfio: {notice}", file=sys.stderr)
    return VfioPath(text).value
