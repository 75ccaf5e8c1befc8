"""Handing VFIO devices to QEMU: over QMP to a running VM, or on its command line.

:class:`~kvmvfio.qemu.qmp.Qemu` is a QMP connection whose peer is checked
(``SO_PEERCRED``) before anything is sent; :func:`~kvmvfio.qemu.handoff.attach`
and :func:`~kvmvfio.qemu.handoff.detach` move devices in and out of a
running VM; :func:`~kvmvfio.qemu.coldplug.coldplug` gives a launcher the
arguments and fds to start one with its devices. Read
:mod:`kvmvfio.qemu.handoff` first.
"""

from kvmvfio.qemu.coldplug import ColdPlug, coldplug
from kvmvfio.qemu.handoff import (
    IOMMUFD_OBJECT,
    Attachment,
    HandoffPath,
    attach,
    detach,
    free_ports,
    qdev_id,
)
from kvmvfio.qemu.qmp import Qemu, peer_credentials, read_pidfile

__all__ = [
    "IOMMUFD_OBJECT",
    "Attachment",
    "ColdPlug",
    "HandoffPath",
    "Qemu",
    "attach",
    "coldplug",
    "detach",
    "free_ports",
    "peer_credentials",
    "qdev_id",
    "read_pidfile",
]
