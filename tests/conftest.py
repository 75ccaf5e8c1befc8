"""Fixtures shared by the unit tests: fake sysfs and /dev trees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Topology

from kvmvfio.host import Host


@pytest.fixture
def build_host(tmp_path: Path) -> Callable[[Topology], Host]:
    """Build a topology's fake tree under ``tmp_path`` and return a Host reading it."""

    def build(topology: Topology) -> Host:
        sysfs, devfs = topology.build(tmp_path / "root")
        return Host(sysfs, devfs, sysfs.parent / "proc")

    return build
