"""Errors of the nested lab; re-exported by :mod:`kvmvfio.errors`."""

from __future__ import annotations

from kvmvfio.errors import KvmvfioError

__all__ = ["LabError"]


class LabError(KvmvfioError):
    """The nested lab could not be built, booted or used."""
