"""The old name of :class:`~kvmvfio.vfio.policy.VfioPath` for the handoff (import-light).

``HandoffPath.IOMMUFD`` is ``VfioPath.CDEV`` and ``HandoffPath.LEGACY`` is
``VfioPath.GROUP``: one vocabulary for the kernel's ways, whoever opens the
files.
"""

from __future__ import annotations

from kvmvfio.vfio.policy import VfioPath

HandoffPath = VfioPath

__all__ = ["HandoffPath", "VfioPath"]
