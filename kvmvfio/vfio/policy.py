"""The choices a caller makes about a VFIO session, and applying them (import-light)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

from kvmvfio.errors import CoherencyRefused

log = logging.getLogger(__name__)


class Backend(enum.StrEnum):
    """Which of the kernel's ways to reach the devices."""

    AUTO = "auto"
    CDEV = "cdev"
    GROUP = "group"
    GROUP_IOMMUFD = "group-iommufd"


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
