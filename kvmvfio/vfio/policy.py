"""The choices a caller makes about a VFIO session, and applying them (import-light)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

from kvmvfio.errors import CoherencyRefused

log = logging.getLogger(__name__)


class VfioPath(enum.StrEnum):
    """The kernel's ways to reach a device: kvmvfio's one vocabulary for them.

    ``cdev``
        The device's cdev (``/dev/vfio/devices/vfioN``) bound to ``/dev/iommu``.
        QEMU takes it by file descriptor (``iommufd=``, ``fd=``).
    ``group``
        The group node (``/dev/vfio/N``) in a container (``/dev/vfio/vfio``).
        QEMU opens it itself (``host=``).
    ``group-iommufd``
        The group node joined to ``/dev/iommu`` instead of a container;
        kvmvfio's own sessions only (no QEMU opens a group that way).
    ``auto``
        The first of ``cdev``, ``group``, ``group-iommufd`` that the kernel
        and whoever opens the files both have.

    The API, every ``--path`` and the domain metadata's ``path=`` take these
    names. The handoff's old names are still read: ``iommufd`` is ``cdev``
    and ``legacy`` is ``group`` (:func:`old_spelling` words the notice).
    """

    AUTO = "auto"
    CDEV = "cdev"
    GROUP = "group"
    GROUP_IOMMUFD = "group-iommufd"
    # The handoff's old member names, as aliases (not listed when iterating).
    IOMMUFD = "cdev"
    LEGACY = "group"

    @classmethod
    def _missing_(cls, value: object) -> VfioPath | None:
        return cls.__members__[_OLD_SPELLINGS[value]] if value in _OLD_SPELLINGS else None


#: Old spellings of a path (``kvmvfio attach --path``, ``HandoffPath``) -> member name.
_OLD_SPELLINGS = {"iommufd": "CDEV", "legacy": "GROUP"}

#: Old names of :class:`VfioPath`, kept for callers written against them.
Backend = VfioPath


def old_spelling(text: str, where: str) -> str | None:
    """The notice for ``text`` when it is an old spelling of a path, else None.

    ``where`` is how the user wrote it: ``"--path"``, ``"path="``.
    """
    if text not in _OLD_SPELLINGS:
        return None
    new = VfioPath(text).value
    return f"{where}{text} is now spelled {where}{new} (the old spelling still works)"


class Coherency(enum.StrEnum):
    """What to do when the IOMMU does not enforce DMA cache coherency."""

    REQUIRE = "require"
    WARN = "warn"
    IGNORE = "ignore"


def apply_coherency(
    policy: Coherency, coherent: bool, subject: str, members: Sequence[str]
) -> str | None:
    """Apply ``policy`` to the IOMMU's coherency answer for ``subject``.

    Raises :class:`CoherencyRefused` under ``require`` when it is not
    coherent; returns (and logs) the warning to report under ``warn``;
    None when there is nothing to say.
    """
    if coherent or policy is Coherency.IGNORE:
        return None
    if policy is Coherency.REQUIRE:
        raise CoherencyRefused(subject, members)
    text = f"{subject}: the IOMMU does not enforce DMA cache coherency"
    log.warning("%s (%s)", text, ", ".join(members))
    return text
