"""Errors of the prepare layer: claims, the journal, the run folder, unbinding, mdevs.

Raised by :mod:`kvmvfio.prepare` while it moves devices between drivers,
and by :mod:`kvmvfio.prepare.mdev` while it makes and removes mediated
devices, and records what it did; re-exported by :mod:`kvmvfio.errors`.
"""

from __future__ import annotations

import errno as _errno
from pathlib import Path
from typing import TYPE_CHECKING

from kvmvfio.errors import Interface, KvmvfioError, UsageError, interface, shown

if TYPE_CHECKING:
    from kvmvfio.prepare.owners import Liveness

__all__ = [
    "ClaimedBy",
    "DeviceNotAnswering",
    "JournalError",
    "MdevClaimed",
    "MdevExists",
    "MdevInUse",
    "NoMdevInstances",
    "NotAnMdevParent",
    "UnknownMdevType",
    "UnsafeSysfsName",
    "UnsafeToUnbind",
    "UntrustedFile",
    "accept_advice",
]


class ClaimedBy(KvmvfioError):
    """Another owner holds the group."""

    def __init__(self, group: int, owner: str, pid: int, liveness: Liveness) -> None:
        self.group = group
        self.owner = owner
        self.pid = pid
        self.alive = liveness.alive
        self.why = liveness.why
        if liveness.alive:
            tail = f" ({liveness.why})"
        else:
            tail = (
                f", which is gone ({liveness.why}): `kvmvfio release --owner {owner} ADDR` "
                "(ADDR: any device of the group) or `kvmvfio recover` frees it"
            )
        super().__init__(f"IOMMU group {group} is claimed by {shown(owner)!r}{tail}")


class UnsafeToUnbind(KvmvfioError):
    """Taking the device from its host driver would take something the host uses."""

    def __init__(self, address: str, driver: str, check: str, found: str) -> None:
        self.address = address
        self.driver = driver
        self.check = check
        self.found = found
        super().__init__(
            f"PCI device {address} ({driver}) {found}; taking it from the host could cut "
            f"off what uses it. {accept_advice(check)}"
        )


def accept_advice(check: str) -> str:
    """How the user accepts finding ``check``, worded for the interface they used."""
    return {
        Interface.CLI: f"Pass --force {check} to accept that",
        Interface.METADATA: f"Add accept='{check}' to the device's <kvmvfio:device> element in "
        "the domain's metadata to accept that",
        Interface.API: f"Pass force=[{check!r}] to accept that",
    }[interface()]


class DeviceNotAnswering(KvmvfioError):
    """A device to be given back to its host driver does not answer; nothing was changed."""

    def __init__(self, address: str, driver: str | None, group: int, state: str) -> None:
        self.address = address
        self.driver = driver
        self.group = group
        self.state = state
        back = (
            f"given back to {driver}, whose probe would hang or fail on it"
            if driver
            else ("let go by vfio-pci")
        )
        super().__init__(
            f"PCI device {address} does not answer ({state}): it fell off the bus or its last "
            f"reset failed. IOMMU group {group} stays on vfio-pci, its record kept, rather than "
            f"{back}. Bring the device back (a slot power cycle, or `echo 1 > "
            f"/sys/bus/pci/devices/{address}/remove` and a rescan of its bridge), then release "
            "it again"
        )


class UnsafeSysfsName(UsageError):
    """An address or driver name that cannot be part of a sysfs path; nothing was written."""

    def __init__(self, what: str, value: object, problem: str) -> None:
        self.what = what
        self.value = value
        self.problem = problem
        text = shown(repr(value), 80)
        super().__init__(
            f"kvmvfio will not write to sysfs for the {what} {text}: {problem}; nothing was written"
        )


class JournalError(KvmvfioError):
    """A journal file is unreadable, malformed or does not fit the host; it is left for a human.

    ``path`` is the file, ``problem`` what is wrong with it. kvmvfio acts
    on nothing a refused record names.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            f"the kvmvfio journal {path} is unusable ({problem}); kvmvfio acted on none of it "
            "and left it as it is: check the devices it names by hand, then remove it"
        )


class UntrustedFile(KvmvfioError):
    """A file or folder where kvmvfio keeps its state is not one kvmvfio made.

    ``path`` is where, ``found`` what is there (``"is a symbolic link"``,
    ``"is owned by uid 1000"``, ``"has mode 0644"``), ``expected`` what
    kvmvfio keeps there. Nothing was read from it or written through it.
    """

    def __init__(self, path: Path, found: str, expected: str, fix: str | None = None) -> None:
        self.path = path
        self.found = found
        self.expected = expected
        advice = (
            f"If kvmvfio made it, `{fix}`; otherwise find out who put it there and remove it"
            if fix
            else "Find out who put it there and remove it"
        )
        super().__init__(
            f"{path} {found}; kvmvfio keeps {expected} there, so it did not use it and left it "
            f"as it is. {advice}, then run the command again"
        )


# -- mediated devices ----------------------------------------------------------------------


class NotAnMdevParent(UsageError):
    """The device named as a parent has no mdev types (no driver registered it with mdev)."""

    def __init__(self, parent: str, why: str, known: tuple[str, ...]) -> None:
        self.parent = parent
        self.why = why
        self.known = known
        listed = ", ".join(known) if known else "none on this host"
        super().__init__(
            f"{shown(repr(parent), 80)} {why}: it cannot have mediated devices "
            f"(parents: {listed}; `kvmvfio mdev types` lists them with their types)"
        )


class UnknownMdevType(UsageError):
    """The parent offers no mdev type of this name."""

    def __init__(self, parent: str, type_id: str, known: tuple[str, ...]) -> None:
        self.parent = parent
        self.type_id = type_id
        self.known = known
        super().__init__(
            f"{parent} has no mdev type {shown(repr(type_id), 80)} "
            f"(its types: {', '.join(known) or 'none'}; `kvmvfio mdev types {parent}`)"
        )


class MdevExists(KvmvfioError):
    """The UUID is already taken: by a mediated device, or by an mdevctl definition."""

    def __init__(self, uuid: str, where: str) -> None:
        self.uuid = uuid
        self.where = where
        super().__init__(
            f"the UUID {uuid} is already used ({where}); nothing was created. Give another "
            "--uuid, or none and kvmvfio picks a new one"
        )


class NoMdevInstances(KvmvfioError):
    """The type has no instance left to create (``available_instances`` is 0).

    ``errno`` is the kernel's answer when it was the kernel that refused
    (the mdev core says EUSERS, a driver counting its own resources may say
    another, mtty ENOSPC); None when kvmvfio saw the 0 and did not ask.
    """

    def __init__(self, parent: str, type_id: str, errno: int | None = None) -> None:
        self.parent = parent
        self.type_id = type_id
        self.errno = errno
        said = "" if errno is None else f" (the kernel said {_errno.errorcode.get(errno, errno)})"
        super().__init__(
            f"{parent} has no {type_id} instance left to create{said}; nothing was created. "
            f"Remove one of its mdevs, or pick a type with available instances "
            f"(`kvmvfio mdev types {parent}`)"
        )


class MdevInUse(KvmvfioError):
    """The mdev is in use (its VFIO files are open, or a journal record claims its group)."""

    def __init__(self, uuid: str, uses: tuple[str, ...]) -> None:
        self.uuid = uuid
        self.uses = uses
        super().__init__(
            f"mediated device {uuid} is in use: it {' and '.join(uses)}; it was left as it is "
            "(removing it now would block until the last user closes it). Stop the VM that "
            "has it, or release its group, first"
        )


class MdevClaimed(KvmvfioError):
    """Another owner created the mdev, and is alive."""

    def __init__(self, uuid: str, owner: str, why: str) -> None:
        self.uuid = uuid
        self.owner = owner
        self.why = why
        super().__init__(
            f"mediated device {uuid} was created for {shown(owner)!r} ({why}); it was left as "
            f"it is. `kvmvfio mdev remove {uuid} --owner {shown(owner)}` removes it"
        )
