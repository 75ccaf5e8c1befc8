"""Who owns a claim, and whether that owner is still there.

A claim (a journal record) names its owner in one of three ways, and each
has its own answer to "is the owner alive?":

``libvirt:NAME``   a libvirt domain (the hook and the agent claim for one):
                   alive while libvirt's pid file for it
                   (``/run/libvirt/qemu/NAME.pid``) names a running process
a name with a pid  a process (``kvmvfio prepare --owner-pid``): alive while
                   that pid runs *and* has the start time recorded with the
                   claim, so a reused pid is not taken for the owner
a name alone       nothing to watch: alive only while a process holds the
                   group's VFIO files open

Whatever the owner, a claim whose VFIO files some process holds open is
alive: that process is a VM using the devices, and taking the devices from
under it would hang the unbind (vfio-pci waits for the last close).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import UsageError
from kvmvfio.host.procs import ProcessId, is_running, read_pidfile, start_time

#: Owners of claims kvmvfio's libvirt integration makes start with this.
LIBVIRT_PREFIX = "libvirt:"
#: Where libvirt keeps the pid file of each running QEMU domain.
LIBVIRT_RUN_DIR = Path("/run/libvirt/qemu")


def libvirt_owner(domain: str) -> str:
    """The owner name of a claim made for the libvirt domain called ``domain``."""
    return f"{LIBVIRT_PREFIX}{domain}"


@dataclass(frozen=True)
class Liveness:
    """Whether a claim's owner is alive, and the fact that says so."""

    alive: bool
    why: str


@dataclass(frozen=True)
class OwnerWatch:
    """Where owners are looked for: /proc and libvirt's run folder (values, for tests)."""

    proc: Path = Path("/proc")
    libvirt_run: Path = LIBVIRT_RUN_DIR

    def liveness(self, owner: str, process: ProcessId | None, holders: list[str]) -> Liveness:
        """Decide whether the claim of ``owner`` (with ``process``, if recorded) is alive.

        ``holders`` are the processes holding the claim's VFIO files open.
        """
        if holders:
            return Liveness(True, f"{', '.join(holders)} holds its VFIO files open")
        if owner.startswith(LIBVIRT_PREFIX):
            return self._domain(owner[len(LIBVIRT_PREFIX) :])
        if process is not None:
            return self._process(process)
        return Liveness(False, "no owner process was recorded and no process holds its devices")

    def _domain(self, name: str) -> Liveness:
        pidfile = self.libvirt_run / f"{name}.pid"
        pid = read_pidfile(pidfile) if "/" not in name and name not in (".", "..") else None
        if pid is not None and start_time(pid, self.proc) is not None:
            return Liveness(True, f"libvirt domain {name} runs (QEMU pid {pid})")
        return Liveness(False, f"libvirt domain {name} is not running (no live pid in {pidfile})")

    def _process(self, process: ProcessId) -> Liveness:
        if is_running(process, self.proc):
            return Liveness(True, f"process {process.pid} runs")
        if start_time(process.pid, self.proc) is not None:
            return Liveness(False, f"pid {process.pid} now belongs to another process")
        return Liveness(False, f"process {process.pid} has exited")

    def owner_process(self, pid: int | None) -> ProcessId | None:
        """The owner's process for a new claim (None: none given); UsageError if none runs."""
        if pid is None:
            return None
        process = self.identify(pid)
        if process is None:
            raise UsageError(f"owner pid {pid}: no such process runs")
        return process

    def identify(self, pid: int) -> ProcessId | None:
        """``pid`` with its start time, for a new claim; None when no such process runs."""
        start = start_time(pid, self.proc)
        return None if start is None else ProcessId(pid, start)
