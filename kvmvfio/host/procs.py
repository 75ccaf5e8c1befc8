"""Processes as /proc shows them: who is alive, who holds a file open.

Pure reads, with the /proc root as a value. A process is named by its pid
*and* its start time (field 22 of ``/proc/PID/stat``, in clock ticks since
boot): pids are reused, so a record that says "owned by pid 1234" is only
believed while pid 1234 is still the process that was recorded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

#: Longest /proc/PID/stat read; the kernel's line is a few hundred bytes.
_MAX_STAT = 4096


@dataclass(frozen=True)
class ProcessId:
    """A process, as pid and start time (None: unknown, e.g. an old record)."""

    pid: int
    start: int | None = None

    def __str__(self) -> str:
        return f"pid {self.pid}"


def start_time(pid: int, proc: str | Path = "/proc") -> int | None:
    """The start time of process ``pid`` (clock ticks after boot); None when it is gone.

    Also None when /proc holds something the kernel never writes there: a
    process that cannot be identified is not taken for the one recorded.
    """
    if pid <= 0:
        return None
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            raw = f.read(_MAX_STAT)
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it
    # start after the *last* ')'.
    _, sep, rest = raw.rpartition(b")")
    fields = rest.split()
    if not sep or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_running(process: ProcessId, proc: str | Path = "/proc") -> bool:
    """Whether ``process`` still runs: same pid and, when recorded, same start time."""
    start = start_time(process.pid, proc)
    if start is None:
        return False
    return process.start is None or process.start == start


def comm(pid: int, proc: str | Path = "/proc") -> str:
    """The process's command name (``?`` when it cannot be read)."""
    try:
        with open(os.path.join(proc, str(pid), "comm"), "rb") as f:
            raw = f.read(64)
    except OSError:
        return "?"
    # The kernel caps comm at 15 bytes; anything can be in them.
    return raw.decode("utf-8", "replace").strip().encode("unicode_escape").decode("ascii")


def holders(
    *paths: str | Path, proc: str | Path = "/proc", pids: Collection[int] | None = None
) -> list[str]:
    """Other processes that have any of ``paths`` open, as ``"pid N (comm)"`` (best effort).

    Reads ``/proc/*/fd`` (only ``pids``' when given); processes we may not
    inspect, or that are gone, are skipped.
    """
    targets = {str(p) for p in paths}
    found: list[str] = []
    me = os.getpid()
    if pids is None:
        try:
            pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
        except OSError:
            return []
    for pid in pids:
        if pid == me:
            continue
        fd_dir = os.path.join(proc, str(pid), "fd")
        try:
            links = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in links:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in targets:
                    break
            except OSError:
                continue
        else:
            continue
        found.append(f"pid {pid} ({comm(pid, proc)})")
    return found


#: How ``/proc/PID/fd`` shows a device file got through a VFIO group: an
#: anonymous inode, the same for every device (6.12's fdinfo does not say
#: which device either).
VFIO_DEVICE_FILE = "anon_inode:[vfio-device]"


def enable_count(sysfs: str | Path, address: str) -> int | None:
    """The kernel's count of enables of PCI function ``address`` (sysfs ``enable``).

    None when it cannot be read. A VFIO driver enables a function when a
    user opens it (``vfio_pci_core_enable``) and disables it when the last
    user closes it, so on vfio-pci a count above zero means a device file is
    open somewhere, whatever /proc shows.
    """
    path = os.path.join(sysfs, "bus", "pci", "devices", address, "enable")
    try:
        with open(path, "rb") as f:
            raw = f.read(16).strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


def unnamed_vfio_user(sysfs: str | Path, address: str, proc: str | Path = "/proc") -> str | None:
    """Who has function ``address`` (on a VFIO driver) open when no node under /dev says so.

    None when the kernel counts no user. A process that closed the group
    after getting the device's file, or was passed that file, holds an
    anonymous inode (:data:`VFIO_DEVICE_FILE`) that names no device, and
    unbinding the driver then waits until that process lets go: the kernel's
    count (:func:`enable_count`) finds it, and the processes holding any
    VFIO device file are named as the ones it may be.
    """
    count = enable_count(sysfs, address)
    if not count:
        return None
    times = "once" if count == 1 else f"{count} times"
    return (
        f"a process that has {address} open by its device file alone (the kernel counts it "
        f"enabled {times}; {device_file_holders(proc)}), and vfio-pci's unbind would wait "
        "until it lets go"
    )


def device_file_holders(proc: str | Path = "/proc") -> str:
    """The processes that may hold a device file /proc cannot tie to its device, as a phrase.

    Every process holding a :data:`VFIO_DEVICE_FILE` is named: the kernel
    does not say which device each such file is.
    """
    maybe = holders(VFIO_DEVICE_FILE, proc=proc)
    who = (
        f"the processes holding a VFIO device file: {', '.join(maybe)}"
        if maybe
        else "no process kvmvfio can see holds one: another PID namespace, or this process"
    )
    return f"/proc does not say which device such a file is; {who}"


def read_pidfile(path: str | Path) -> int | None:
    """The pid a pid file names; None when it is missing or holds anything else.

    Opened without following a link and without blocking (a FIFO put there
    must not hang kvmvfio); only a regular file is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 32).strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(text) if text.isdigit() and 0 < len(text) <= 10 else None
