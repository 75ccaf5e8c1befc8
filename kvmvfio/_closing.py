"""The context-manager protocol of every kvmvfio object that owns a resource."""

from __future__ import annotations

from typing import Self


class Closing:
    """``with`` and ``async with`` that end in :meth:`close` (which subclasses define)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
