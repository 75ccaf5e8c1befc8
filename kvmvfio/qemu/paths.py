"""How devices reach QEMU (import-light: an enum only)."""

from __future__ import annotations

import enum


class HandoffPath(enum.StrEnum):
    """How the devices reach QEMU."""

    AUTO = "auto"
    IOMMUFD = "iommufd"
    LEGACY = "legacy"
