"""AppArmor confinement: what a process is confined by, and what its profile lets it open.

Debian and Ubuntu confine each QEMU that libvirt starts with a profile of its
own (``libvirt-UUID``, written by ``virt-aa-helper`` from the domain's XML):
it lists the files the domain's devices need, such as ``/dev/vfio/N`` for a
``<hostdev>``. kvmvfio hands QEMU devices the XML does not list, so it asks
the kernel what that profile allows before it acts:

- A file QEMU *opens by path* (the legacy group path: kvmvfio grants QEMU's
  uid the group node, QEMU opens it) is checked against QEMU's profile.
- A file *passed* to QEMU (SCM_RIGHTS) is checked again when QEMU receives
  it, unless the process that opened it was unconfined: the kernel lets an
  unconfined task delegate files (``aa_file_perm``, security/apparmor/file.c).
  So the fds kvmvfio opens unconfined (the CLI, the agent as a service) pass;
  those a confined kvmvfio opens (e.g. run from a confined hook) must be in
  QEMU's profile too.

The question goes to the kernel (``/sys/kernel/security/apparmor/.access``,
the interface libapparmor's ``aa_query_file_path`` uses): the answer is the
loaded policy's, includes and local additions counted. Pure reads; nothing
is changed.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: Where the kernel answers permission queries (securityfs).
ACCESS = Path("/sys/kernel/security/apparmor/.access")

_CLASS_FILE = 2  # AA_CLASS_FILE, security/apparmor/include/apparmor.h
MAY_WRITE = 0x2  # MAY_WRITE
MAY_READ = 0x4  # MAY_READ
#: The modes in which a profile's refusals are enforced (the others only log).
ENFORCING = frozenset({"enforce", "kill"})
_LABEL = re.compile(r"^(?P<label>[^\s()]+)(?: \((?P<mode>[a-z]+)\))?$")
_ANSWER = re.compile(
    r"^allow 0x(?P<allow>[0-9a-f]{8})\ndeny 0x(?P<deny>[0-9a-f]{8})\n"
    r"audit 0x[0-9a-f]{8}\nquiet 0x[0-9a-f]{8}\n$"
)
_MAX_LABEL = 4096


class PolicyUnreadable(Exception):
    """The kernel's policy cannot be asked (no securityfs, an answer it never gives)."""


@dataclass(frozen=True)
class Confinement:
    """The AppArmor label of a process, as ``/proc/PID/attr/apparmor/current`` says."""

    label: str  # "libvirt-2d1f...", or "unconfined"
    mode: str | None  # "enforce", "complain", ...; None for "unconfined"

    @property
    def confined(self) -> bool:
        return self.label != "unconfined"

    @property
    def enforcing(self) -> bool:
        return self.confined and self.mode in ENFORCING

    def __str__(self) -> str:
        return self.label if self.mode is None else f"{self.label} ({self.mode})"


def confinement(pid: int | str = "self", proc: str | Path = "/proc") -> Confinement | None:
    """The AppArmor label of process ``pid``; None when AppArmor is not what confines it.

    None too for a process that is gone: the caller's own checks find that.
    Raises :class:`PolicyUnreadable` for a label the kernel never writes.
    """
    where = Path(proc) / str(pid) / "attr" / "apparmor" / "current"
    try:
        with open(where, "rb") as f:
            raw = f.read(_MAX_LABEL + 1)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINVAL, errno.ESRCH, errno.ENOTDIR):
            return None  # no AppArmor (EINVAL: built in, not enabled), or no such process
        raise PolicyUnreadable(f"{where}: {e.strerror}") from e
    text = raw.decode("utf-8", "replace").rstrip("\n\0")
    m = _LABEL.match(text)
    if m is None or len(raw) > _MAX_LABEL:
        raise PolicyUnreadable(f"{where} holds {text[:80]!r}, not an AppArmor label")
    return Confinement(m["label"], m["mode"])


def allows(
    label: str,
    path: str | os.PathLike[str],
    mask: int = MAY_READ | MAY_WRITE,
    *,
    access: Path = ACCESS,
) -> bool:
    """Whether the policy of ``label`` lets it open ``path`` for ``mask``.

    The kernel's own answer for the loaded policy. Raises
    :class:`PolicyUnreadable` when it cannot be asked.
    """
    query = b"label\0" + label.encode() + b"\0" + bytes([_CLASS_FILE]) + os.fsencode(path)
    try:
        fd = os.open(access, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise PolicyUnreadable(f"{access}: {e.strerror}") from e
    try:
        os.write(fd, query)
        answer = os.read(fd, 256).decode("ascii", "replace")
    except OSError as e:
        raise PolicyUnreadable(f"{access}: asking about {label}: {e.strerror}") from e
    finally:
        os.close(fd)
    return answer_allows(answer, mask)


def answer_allows(answer: str, mask: int) -> bool:
    """Whether the kernel's answer to a query (``allow 0x...`` lines) grants all of ``mask``."""
    m = _ANSWER.match(answer)
    if m is None:
        raise PolicyUnreadable(f"the kernel's policy answered {answer[:80]!r}")
    allow, deny = int(m["allow"], 16), int(m["deny"], 16)
    return allow & mask == mask and not deny & mask


def refused_paths(
    pid: int,
    paths: list[str],
    *,
    proc: str | Path = "/proc",
    access: Path = ACCESS,
) -> tuple[Confinement, list[str]] | None:
    """The paths of ``paths`` that process ``pid``'s enforcing profile would refuse it.

    None when the process is not confined by an enforcing AppArmor profile,
    or every path is allowed.
    """
    conf = confinement(pid, proc)
    if conf is None or not conf.enforcing:
        return None
    refused = [p for p in paths if not allows(conf.label, p, access=access)]
    return (conf, refused) if refused else None
