"""The one error hierarchy of kvmvfio.

Every error kvmvfio raises on purpose derives from :class:`KvmvfioError`.
``str(err)`` is a sentence a user can act on; the attributes carry the same
facts for programs (the device or group concerned, the kernel's errno, QEMU's
own error class and words).

A failed system call is also an :class:`OSError` (see :class:`KernelError`):
``err.errno`` is the kernel's errno, ``err.filename`` the path of the file the
call was made on, and ``err.op`` names the call (``"VFIO_GROUP_GET_STATUS"``).
Errno is mapped once, where the call is made, and kept.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import errno as _errno
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from kvmvfio.host.iommu import NoGroup

#: Longest piece of untrusted text :func:`shown` keeps.
MAX_SHOWN = 200


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` as it may be printed: control characters escaped, at most ``limit`` characters.

    For strings kvmvfio did not write itself (owner names read back from the
    journal, QEMU's words, XML values): a terminal must never receive their
    control characters raw.
    """
    if text.isprintable() and len(text) <= limit:
        return text
    safe = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return safe if len(safe) <= limit else f"{safe[: limit - 1]}…"


class Interface(enum.Enum):
    """Where a user meets kvmvfio: advice in messages is worded for it."""

    API = "api"  # a Python caller: arguments
    CLI = "cli"  # the kvmvfio command: flags
    METADATA = "metadata"  # a libvirt domain's kvmvfio metadata: attributes


_interface: contextvars.ContextVar[Interface] = contextvars.ContextVar(
    "kvmvfio_interface", default=Interface.API
)


def interface() -> Interface:
    """The interface the current call reached kvmvfio through (``API`` unless set)."""
    return _interface.get()


@contextlib.contextmanager
def speaking_to(where: Interface) -> Iterator[None]:
    """Word the advice of errors raised inside this block for ``where``."""
    token = _interface.set(where)
    try:
        yield
    finally:
        _interface.reset(token)


class KvmvfioError(Exception):
    """Base of every error kvmvfio raises on purpose."""

    #: Process exit status the CLI uses for this error.
    exit_code = 1


class UsageError(KvmvfioError):
    """The caller asked for something malformed (bad argument, bad file)."""

    exit_code = 2


class InvalidAddress(UsageError, ValueError):
    """Text that is not a PCI address in ``[domain:]bus:slot.func`` form."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"{text!r} is not a PCI address ({reason}); expected [DDDD:]BB:SS.F")


class InvalidGroup(UsageError, ValueError):
    """Text that is not an IOMMU group number."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(f"{text!r} is neither an IOMMU group number nor a PCI address")


class NotFound(KvmvfioError):
    """Something named by the caller does not exist on this host."""


class DeviceNotFound(NotFound):
    """No PCI device at this address."""

    def __init__(self, address: str, root: str = "/sys") -> None:
        self.address = address
        self.root = root
        super().__init__(f"no PCI device {address} on this host (looked in {root}/bus/pci/devices)")


class GroupNotFound(NotFound):
    """No IOMMU group with this number."""

    def __init__(self, group: str, root: str = "/sys") -> None:
        self.group = group
        self.root = root
        super().__init__(
            f"no IOMMU group {group} on this host (looked in {root}/kernel/iommu_groups)"
        )


class NoIommuGroup(KvmvfioError):
    """The device is in no IOMMU group; ``why`` (a :class:`~kvmvfio.host.NoGroup`) says why.

    ``why.cause`` is the reason as data (no IOMMU in use, the device is the
    IOMMU, not probed until a driver binds, not covered), ``why.iommu`` the
    IOMMU concerned; the sentence is ``why.reason``.
    """

    def __init__(self, address: str, why: NoGroup | None = None) -> None:
        self.address = address
        self.why = why
        reason = "the host's IOMMU does not translate it" if why is None else why.reason
        super().__init__(f"PCI device {address} is in no IOMMU group: {reason}")


@dataclass(frozen=True)
class Blocker:
    """One member of an IOMMU group that keeps the group from being viable."""

    address: str
    driver: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.address} ({self.reason})"


class GroupNotViable(KvmvfioError):
    """An IOMMU group has a member bound to a host driver VFIO cannot share with."""

    def __init__(self, group: str, blockers: Sequence[Blocker]) -> None:
        self.group = group
        self.blockers = tuple(blockers)
        listed = "; ".join(str(b) for b in self.blockers) or "the kernel reports it not viable"
        super().__init__(
            f"IOMMU group {group} is not viable: {listed}. Every member must be bound to "
            "vfio-pci (or to no driver) before the group can be used"
        )


class SysfsError(KvmvfioError):
    """A sysfs file held something the kernel never writes there."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(f"unexpected contents in {path}: {detail}")


class KernelError(KvmvfioError, OSError):
    """A system call failed. Also an OSError: ``errno``, ``filename`` are set.

    ``op`` names the call (an ioctl name such as ``VFIO_SET_IOMMU``, or
    ``open``); ``subject`` names what it concerned, for the sentence.
    A subclass explains its errnos by setting :attr:`hints` (errno ->
    sentence) or :attr:`default_hint`, not by copying the constructor.
    """

    #: What each errno means for this call, when the caller gives no hint.
    hints: ClassVar[Mapping[int, str]] = {}
    #: The hint for any other errno, when the caller gives none.
    default_hint: ClassVar[str | None] = None

    def __init__(
        self,
        err: int,
        op: str,
        path: str | None = None,
        subject: str | None = None,
        hint: str | None = None,
    ) -> None:
        OSError.__init__(self, err, os.strerror(err), path)
        self.op = op
        self.subject = subject
        self.hint = hint or self.hints.get(err) or self.default_hint

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        where = self.subject or self.filename or "the file"
        text = f"{self.op} on {where} failed: {self.strerror} ({name})"
        if self.hint:
            text += f"; {self.hint}"
        return text

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.errno, self.op, self.filename, self.subject, self.hint))


class PermissionDenied(KernelError):
    """EPERM/EACCES on a kvmvfio call, with what privilege was needed."""


class Busy(KernelError):
    """EBUSY: another process (``holder``, when found) has the group or device open."""

    def __init__(
        self,
        err: int,
        op: str,
        path: str | None = None,
        subject: str | None = None,
        holder: str | None = None,
    ) -> None:
        hint = f"held by {holder}" if holder else "another process holds it"
        super().__init__(err, op, path, subject, hint)
        self.holder = holder


class NoInterruptRemapping(KernelError):
    """EPERM from VFIO_SET_IOMMU / VFIO_DEVICE_BIND_IOMMUFD: MSIs cannot be isolated."""

    def __init__(self, op: str, path: str | None, subject: str) -> None:
        super().__init__(
            _errno.EPERM,
            op,
            path,
            subject,
            "the IOMMU has no interrupt remapping, so a device could forge interrupts; enable "
            "interrupt remapping (intel_iommu=on with x2APIC, intremap=on for a vIOMMU), or accept "
            "the risk with vfio_iommu_type1.allow_unsafe_interrupts=1 / "
            "iommufd.allow_unsafe_interrupts=1",
        )


class NotADeviceOfGroup(KvmvfioError):
    """VFIO_GROUP_GET_DEVICE_FD was given a name that is not a member of the group."""

    def __init__(self, address: str, group: int) -> None:
        self.address = address
        self.group = group
        super().__init__(f"{address} is not a device of IOMMU group {group}")


class DeviceNotBoundToVfio(KvmvfioError):
    """A device a VFIO session needs is not on vfio-pci."""

    def __init__(self, address: str, driver: str | None) -> None:
        self.address = address
        self.driver = driver
        where = f"bound to {driver}" if driver else "bound to no driver"
        how = {
            Interface.CLI: f"`kvmvfio prepare --owner NAME {address}` moves it there",
            Interface.METADATA: "list it in the domain's kvmvfio metadata to have the hook "
            "move it there",
            Interface.API: f"kvmvfio.prepare.prepare([{address!r}], owner) moves it there",
        }[interface()]
        super().__init__(f"PCI device {address} is {where}, not vfio-pci: prepare it first ({how})")


class NoIommuRefused(KvmvfioError):
    """A no-IOMMU group was asked for without the caller allowing it."""

    def __init__(self, group: int, address: str) -> None:
        self.group = group
        self.address = address
        super().__init__(
            f"IOMMU group {group} ({address}) is a no-IOMMU group: the device could DMA anywhere "
            "in host memory and the kernel taints itself; allow it explicitly (--allow-noiommu) "
            "only if you accept that"
        )


class SessionStateError(KvmvfioError):
    """A method was called in a state where it cannot run (e.g. open twice)."""

    def __init__(self, action: str, state: str) -> None:
        self.action = action
        self.state = state
        super().__init__(f"cannot {action} a session that is {state}")


class KvmRefusedFile(KernelError):
    """EINVAL from ``KVM_DEV_VFIO_FILE_ADD``: the file is not a VFIO group or device file."""

    default_hint = "KVM refused the file: it is not a VFIO group (/dev/vfio/N) or VFIO device file"


class AlreadyAssociated(KernelError):
    """EEXIST from ``KVM_DEV_VFIO_FILE_ADD``: KVM holds this file already."""

    default_hint = "the file was added to this VM's kvm-vfio device before"


class NotAssociated(KernelError):
    """ENOENT from ``KVM_DEV_VFIO_FILE_DEL``: KVM does not hold this file."""

    default_hint = "the file was never added to this VM's kvm-vfio device, or was removed already"


class KvmVfioDeviceExists(Busy):
    """EBUSY from ``KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO)``: the VM has its kvm-vfio device."""

    def __init__(
        self,
        err: int,
        op: str,
        path: str | None = None,
        subject: str | None = None,
        hint: str | None = None,
    ) -> None:
        KernelError.__init__(
            self,
            err,
            op,
            path,
            subject,
            hint
            or "a VM has at most one kvm-vfio device and this VM has one already (QEMU creates "
            "its own as soon as it has a VFIO device); add files through that device instead",
        )
        self.holder = None


class KvmClosed(SessionStateError):
    """A KVM VM or kvm-vfio device was used after ``close()`` or after its fd was handed over."""

    def __init__(self, action: str, subject: str) -> None:
        self.action = action
        self.state = "closed"
        self.subject = subject
        KvmvfioError.__init__(self, f"cannot {action}: {subject} is closed (or was handed over)")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.action, self.subject))


class KernelUnsupported(KvmvfioError):
    """The running kernel lacks a feature the caller asked for."""

    def __init__(self, feature: str, hint: str) -> None:
        self.feature = feature
        self.hint = hint
        super().__init__(f"this kernel does not support {feature}: {hint}")


class CoherencyRefused(KvmvfioError):
    """Policy ``require``: the IOMMU does not enforce DMA cache coherency."""

    def __init__(self, subject: str, devices: Sequence[str]) -> None:
        self.subject = subject
        self.devices = tuple(devices)
        super().__init__(
            f"{subject} ({', '.join(self.devices)}) cannot have enforced DMA cache coherency: "
            "the IOMMU does not enforce snooping, so the guest's non-coherent DMA would need "
            f"KVM to emulate WBINVD. {_COHERENCY_ADVICE[interface()]} to accept that, or a host "
            "whose IOMMU enforces snooping"
        )


_COHERENCY_ADVICE = {
    Interface.CLI: "Use --coherency=warn",
    Interface.METADATA: "Set coherency='warn' on the device in the domain's kvmvfio metadata",
    Interface.API: "Pass coherency='warn'",
}


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
    not fit.
    """

    def __init__(self, command: str, problem: str, pid: int | None = None) -> None:
        self.command = command
        self.problem = problem
        self.pid = pid
        who = f"QEMU pid {pid}" if pid else "QEMU"
        if command == "greeting":
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


class LabError(KvmvfioError):
    """The nested lab could not be built, booted or used."""


class LibvirtError(KvmvfioError):
    """libvirt refused a call; its error code and words are kept."""

    def __init__(self, call: str, code: int, message: str, domain: str | None = None) -> None:
        self.call = call
        self.code = code
        self.message = message
        self.domain = domain
        where = f" for domain {domain!r}" if domain else ""
        super().__init__(f"libvirt refused {call}{where}: {message} (libvirt error {code})")
