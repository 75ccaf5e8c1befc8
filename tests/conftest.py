"""Fixtures shared by the unit and lab tests: fake sysfs and /dev trees, a clean event loop."""

from __future__ import annotations

import asyncio
import warnings
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


@pytest.fixture(autouse=True)
def _close_stray_event_loop() -> None:
    """Close the idle event loop pytest-asyncio leaves set as current after an async test.

    pytest-asyncio 0.25 ends each async test by setting a fresh loop as the
    thread's current one. A later ``asyncio.run()`` (every CLI test, many lab
    tests) replaces it and drops it unclosed, and the garbage collector then
    warns for the loop and its two AF_UNIX self-pipe sockets in whichever
    test it happens to run: the "leaked QMP socket" of the lab runs of
    2026-12-03, which was this.
    """
    policy = asyncio.get_event_loop_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = policy.get_event_loop()
        except RuntimeError:  # none set: nothing to close
            return
    if loop.is_running() or loop.is_closed() or getattr(loop, "__pytest_asyncio", False):
        return
    loop.close()
    policy.set_event_loop(None)
