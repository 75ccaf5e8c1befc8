"""Errors of the QEMU layer: QMP, hot plug and unplug, what QEMU may lock.

``QemuError`` is the layer's base; its leaves keep QEMU's own words
(``QemuRefused``: the command, QEMU's error class and description). Raised
by :mod:`kvmvfio.qemu` and by :mod:`kvmvfio.libvirt` when it speaks QMP
through libvirt; re-exported by :mod:`kvmvfio.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmvfio.errors import Interface, KvmvfioError, interface, shown

__all__ = [
    "DetachTimeout",
    "MemlockTooLow",
    "NoHotplugPort",
    "NotAttached",
    "QemuConfined",
    "QemuError",
    "QemuGone",
    "QemuNoAnswer",
    "QemuPeerMismatch",
    "QemuRefused",
    "QemuReplyInvalid",
]


class QemuError(KvmvfioError):
    """Something went wrong talking to QEMU."""


class QemuRefused(QemuError):
    """QEMU answered a QMP command with an error; its class and words are kept."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        # QEMU is less trusted than kvmvfio: its words are printed escaped and bounded.
        super().__init__(f"QEMU refused {command}: {shown(desc)} ({shown(error_class, 64)})")


class QemuPeerMismatch(QemuError):
    """The process behind a QMP socket is not the QEMU the caller named."""

    def __init__(self, socket: str, expected: int, peer: int, uid: int) -> None:
        self.socket = socket
        self.expected = expected
        self.peer = peer
        self.uid = uid
        super().__init__(
            f"the QMP socket {socket} belongs to pid {peer} (uid {uid}), not to QEMU pid "
            f"{expected}: refusing to hand it any file descriptor"
        )


class QemuGone(QemuError):
    """QEMU closed the QMP connection (or died) in the middle of a step."""

    def __init__(self, step: str, detail: str = "") -> None:
        self.step = step
        more = f" ({detail})" if detail else ""
        super().__init__(
            f"QEMU went away during {step}{more}; kvmvfio released everything it had opened"
        )


class QemuNoAnswer(QemuError):
    """QEMU did not answer a QMP command in time: it is stuck, or far too slow."""

    def __init__(self, command: str, pid: int, timeout: float) -> None:
        self.command = command
        self.pid = pid
        self.timeout = timeout
        super().__init__(
            f"QEMU pid {pid} did not answer {command} within {timeout:g} s; it may be stuck "
            f"(its threads' kernel stacks: /proc/{pid}/task/*/stack). kvmvfio released "
            "everything it had opened"
        )


class QemuReplyInvalid(QemuError):
    """QEMU's reply to a QMP command, or an event it sent, is not of the shape QEMU documents.

    QEMU runs unprivileged and a guest that escaped into it would speak for
    it: kvmvfio checks every reply it uses against QEMU's schema and acts on
    none that does not fit. ``command`` is the command answered (or the
    event's name, in capitals, or ``greeting``); ``problem`` says what did
    not fit. ``among``: the commands QEMU had yet to answer when what it
    sent ended the session, when there were several (sent together): a
    message that is not QMP carries no id to tell which one it answered,
    so all are named, and ``command`` is their names joined.
    """

    def __init__(
        self, command: str, problem: str, pid: int | None = None, *, among: Sequence[str] = ()
    ) -> None:
        self.among = tuple(among)
        self.command = ", ".join(self.among) if len(self.among) > 1 else command
        self.problem = problem
        self.pid = pid
        who = f"QEMU pid {pid}" if pid else "QEMU"
        if len(self.among) > 1:
            what = (
                f"message while {len(self.among)} commands awaited its answer ("
                f"{', '.join(self.among)}; which one it answered cannot be told)"
            )
        elif command == "greeting":
            what = "QMP greeting"
        elif command.isupper():  # QAPI names events in capitals, commands in lower case
            what = f"{command} event"
        else:
            what = f"reply to {command}"
        super().__init__(
            f"{who}'s {what} does not fit QEMU's schema ({shown(problem)}); kvmvfio stopped at "
            "that step and used none of it. A QEMU whose guest has taken it over could answer "
            "this way: stop that VM and look at it"
        )


class MixedVfioBackends(QemuError):
    """QEMU's VFIO devices are on the other backend: adding this one would kill the VM."""

    def __init__(self, pid: int, path: str, there: str, devices: Sequence[str]) -> None:
        self.pid = pid
        self.path = path
        self.there = there
        self.devices = tuple(devices)
        names = ", ".join(shown(d, 80) for d in self.devices[:4])
        super().__init__(
            f"QEMU pid {pid} already has VFIO devices on the {there} path ({names}); adding one "
            f"on the {path} path would mix the legacy container and iommufd in one VM, which "
            f"QEMU 10.0 answers by aborting (the VM dies). Attach on the {there} path "
            f"(--path {there}), or detach those first"
        )


class NoHotplugPort(QemuError):
    """The VM has no free PCIe port a device could be hot-plugged into."""

    def __init__(self, address: str, busy: Sequence[str]) -> None:
        self.address = address
        self.busy = tuple(busy)
        taken = f" (taken: {', '.join(self.busy)})" if self.busy else ""
        super().__init__(
            f"the VM has no free hotpluggable port for {address}{taken}: QEMU's q35 root bus "
            "does not take hotplugged devices; start QEMU with one "
            "`-device pcie-root-port,id=rpN,chassis=N` per device to plug, or name a bus"
        )


class QemuConfined(QemuError):
    """QEMU's AppArmor profile would refuse a file the handoff needs it to open or receive."""

    def __init__(
        self, address: str, pid: int, profile: str, paths: Sequence[str], how: str
    ) -> None:
        self.address = address
        self.pid = pid
        self.profile = profile
        self.paths = tuple(paths)
        listed = ", ".join(shown(p) for p in self.paths)
        rules = " ".join(f"{shown(p)} rw," for p in self.paths)
        if profile.startswith("libvirt-"):  # virt-aa-helper's, per domain
            where = (
                "/etc/apparmor.d/local/abstractions/libvirt-qemu, then reload the domain's profile "
                f"(`apparmor_parser -r /etc/apparmor.d/libvirt/{shown(profile)}`)"
            )
        else:
            where = f"the profile {shown(profile)}, then reload it (`apparmor_parser -r FILE`)"
        super().__init__(
            f"QEMU (pid {pid}) runs confined by the AppArmor profile {shown(profile)}, which does "
            f"not allow {listed}: {how} {address} would be refused by the kernel, so nothing was "
            f"handed over. {_CDEV_ADVICE[interface()]} (the files are then opened by kvmvfio "
            f"and passed), or add `{rules}` to {where} (docs/qemu.md, AppArmor)"
        )


_CDEV_ADVICE = {
    Interface.CLI: "Use --path cdev",
    Interface.METADATA: "Set path='cdev' on the device in the domain's kvmvfio metadata",
    Interface.API: "Pass path='cdev'",
}


class DetachTimeout(QemuError):
    """The guest did not release a device within the time given."""

    def __init__(self, address: str, qdev_id: str, timeout: float) -> None:
        self.address = address
        self.qdev_id = qdev_id
        self.timeout = timeout
        super().__init__(
            f"the guest did not release {address} (QEMU device {qdev_id}) within {timeout:g} s; "
            "it stays attached as QEMU has it (nothing was yanked). The guest must answer the "
            "PCIe hot-unplug request: retry later, or shut the guest down"
        )


class NotAttached(QemuError):
    """A device kvmvfio was asked to detach is not one it attached to that QEMU."""

    def __init__(self, address: str, qdev_id: str) -> None:
        self.address = address
        self.qdev_id = qdev_id
        super().__init__(
            f"{address} is not attached to this QEMU by kvmvfio (no device {qdev_id}); if an "
            "earlier detach timed out, the guest has let go of it since, and kvmvfio has now "
            "revoked what it had granted"
        )


class MemlockTooLow(QemuError):
    """QEMU may not lock enough memory for VFIO to pin the guest's RAM."""

    def __init__(self, pid: int, limit: int, needed: int, why: str) -> None:
        self.pid = pid
        self.limit = limit
        self.needed = needed
        super().__init__(
            f"QEMU pid {pid} may lock {limit >> 20} MiB but VFIO pins all guest RAM "
            f"({needed >> 20} MiB with margin) and {why}: raise it with "
            f"`prlimit --pid {pid} --memlock={needed}:{needed}` (as root), or start QEMU "
            "with that limit (LimitMEMLOCK= in systemd, ulimit -l)"
        )
