"""The choices a caller makes about a VFIO session (import-light: enums only)."""

from __future__ import annotations

import enum


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
