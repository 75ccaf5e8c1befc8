"""What the lab benchmarks share: moving a device between drivers, and timing."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

from kvmvfio.errors import LabError
from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.topology import Topology
from kvmvfio.prepare.driver import Sysfs


def lab_topology() -> Topology:
    """The topology L1 was booted with (:func:`kvmvfio.lab.topology.booted`).

    Exits with the sentence that names what is wrong when it cannot be read.
    """
    try:
        return topo_mod.booted()
    except LabError as err:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: {err}") from None


def bind(addr: str, driver: str | None) -> None:
    """Set up (not timed): move ``addr`` to ``driver``, or to none."""
    sysfs = Sysfs()
    sysfs.unbind(addr)
    sysfs.set_override(addr, driver)
    if driver:
        sysfs.probe(addr)


def driver(addr: str) -> str:
    """The driver ``addr`` is bound to, or ``"none"``."""
    link = f"/sys/bus/pci/devices/{addr}/driver"
    return os.path.basename(os.readlink(link)) if os.path.exists(link) else "none"


def median_ms(fn: Callable[[], None], rounds: int) -> float:
    """The median of ``rounds`` calls of ``fn``, in ms, after one warm-up call."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000
