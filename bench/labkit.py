"""What the lab benchmarks share: moving a device between drivers, and timing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

from kvmvfio.prepare.driver import Sysfs


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
