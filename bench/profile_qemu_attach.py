"""Where ``kvmvfio.qemu.attach`` to a running QEMU spends its time.

Runs inside the lab's L1, on the device and QEMU bench_qemu_attach.py uses::

    kvmvfio lab run -- python3 bench/profile_qemu_attach.py [--rounds N]

After one warm-up round (which creates the VM's iommufd object), times
``rounds`` attach + detach rounds (the detach not counted) and prints, per
attach: the wall time, this process's CPU time, the time spent waiting on
each QMP command (from sending it to its answer; concurrent commands
overlap), planning (``make_plan``: sysfs checks and the coherency probe),
and opening files; then the functions that took the most time under
cProfile, in a second set of rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import logging
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from labkit import bind, lab_topology

from kvmvfio.lab.l2 import L2Qemu
from kvmvfio.qemu import Qemu, attach, handoff
from kvmvfio.qemu.handoff import _device_del, ensure_memlock

#: name -> seconds, per round
SPENT: collections.defaultdict[str, float] = collections.defaultdict(float)


def _timed_async(name: Callable[..., str], fn: Callable[..., Awaitable[Any]]) -> Any:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            SPENT[name(*args, **kwargs)] += time.perf_counter() - start

    return wrapper


def _timed(name: str, fn: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def _instrument() -> None:
    Qemu.execute = _timed_async(  # type: ignore[method-assign]
        lambda _self, command, arguments=None: f"qmp {command}", Qemu.execute
    )
    handoff.make_plan = _timed("make_plan", handoff.make_plan)
    handoff.open_node = _timed("open cdev", handoff.open_node)
    handoff.Host = _timed("Host()", handoff.Host)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    addr = lab_topology().guest_address("edu0")
    bind(addr, "vfio-pci")
    _instrument()
    l2 = L2Qemu(ports=1)
    walls, cpus = [], []
    per: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    profile = cProfile.Profile()
    try:
        async with Qemu(l2.qmp, pid=l2.pid) as qemu:
            await ensure_memlock(qemu)

            async def once() -> tuple[float, float]:
                SPENT.clear()
                wall, cpu = time.perf_counter(), time.process_time()
                (done,) = await attach(qemu, [addr])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                await _device_del(qemu, done.qdev_id, done.qdev_id, 60)
                return wall, cpu

            await once()  # warm-up: the iommufd object
            for _ in range(args.rounds):
                wall, cpu = await once()
                walls.append(wall)
                cpus.append(cpu)
                for name, spent in SPENT.items():
                    per[name].append(spent)
            profile.enable()
            for _ in range(args.rounds):
                await once()
            profile.disable()
    finally:
        l2.kill()
        bind(addr, None)
    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    print(f"device {addr}, paused unprivileged L2 QEMU, median of {args.rounds} rounds\n")
    print("| part of one attach | ms |")
    print("| --- | ---: |")
    print(f"| wall | {ms(walls):.1f} |")
    print(f"| CPU of this process | {ms(cpus):.1f} |")
    for name in sorted(per):
        print(f"| {name} | {ms(per[name]):.1f} |")
    stats = pstats.Stats(profile)
    for key in ("cumulative", "tottime"):
        stats.sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    asyncio.run(main())
