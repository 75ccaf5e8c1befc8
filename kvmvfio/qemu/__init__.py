"""Handing VFIO devices to QEMU: over QMP to a running VM, or on its command line.

:class:`~kvmvfio.qemu.qmp.Qemu` is a QMP connection whose peer is checked
(``SO_PEERCRED``) before anything is sent; :func:`~kvmvfio.qemu.handoff.attach`
and :func:`~kvmvfio.qemu.handoff.detach` move devices in and out of a
running VM (:func:`~kvmvfio.qemu.handoff.plan_attach` shows first what
``attach`` would do); :func:`~kvmvfio.qemu.coldplug.coldplug` gives a launcher the
arguments and fds to start one with its devices. Read
:mod:`kvmvfio.qemu.handoff` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmvfio._lazy import lazy_getattr

if TYPE_CHECKING:
    from kvmvfio.qemu.coldplug import ColdPlug, coldplug, plan_coldplug
    from kvmvfio.qemu.handoff import (
        IOMMUFD_OBJECT,
        Attachment,
        attach,
        detach,
        free_ports,
        plan_attach,
        qdev_id,
    )
    from kvmvfio.qemu.paths import HandoffPath
    from kvmvfio.qemu.qmp import Qemu, peer_credentials, read_pidfile

# Imported on first use: the CLI and the host-only paths never pay for the
# layers below (cffi declarations, asyncio, QMP) unless they use them.
_LAZY = {
    "ColdPlug": "kvmvfio.qemu.coldplug",
    "coldplug": "kvmvfio.qemu.coldplug",
    "plan_coldplug": "kvmvfio.qemu.coldplug",
    "plan_attach": "kvmvfio.qemu.handoff",
    "Attachment": "kvmvfio.qemu.handoff",
    "IOMMUFD_OBJECT": "kvmvfio.qemu.handoff",
    "attach": "kvmvfio.qemu.handoff",
    "detach": "kvmvfio.qemu.handoff",
    "free_ports": "kvmvfio.qemu.handoff",
    "qdev_id": "kvmvfio.qemu.handoff",
    "HandoffPath": "kvmvfio.qemu.paths",
    "Qemu": "kvmvfio.qemu.qmp",
    "peer_credentials": "kvmvfio.qemu.qmp",
    "read_pidfile": "kvmvfio.qemu.qmp",
}

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
    "plan_attach",
    "plan_coldplug",
    "qdev_id",
    "read_pidfile",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
