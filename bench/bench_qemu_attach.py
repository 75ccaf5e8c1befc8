"""Attach latency: kvmvfio's fd handoff versus QEMU opening the device itself.

Runs inside the lab's L1, against an unprivileged, paused L2 QEMU (a paused
guest that never powered the slot lets QEMU unplug at once, so rounds
repeat quickly)::

    kvmvfio lab run -- python3 bench/bench_qemu_attach.py [--rounds N]

Compared, in the same run, on the same device and QEMU:

- ``kvmvfio attach``: everything ``kvmvfio.qemu.attach`` does: sysfs checks,
  the coherency probe, QEMU's memlock limit, finding a free port, passing
  ``/dev/iommu`` (first round) and the cdev by SCM_RIGHTS, ``device_add``;
- QEMU opens it itself, iommufd backend: ``object-add iommufd`` (QEMU opens
  ``/dev/iommu``) and ``device_add vfio-pci,host=...,iommufd=...``, with QEMU's
  uid given access to the files by ACL beforehand (not timed);
- QEMU opens it itself, legacy: ``device_add vfio-pci,host=...`` (QEMU opens
  the container and the group).

Each round ends with ``device_del`` (not timed). Median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

from labkit import bind, lab_topology

from kvmvfio.lab.l2 import NOBODY, L2Qemu
from kvmvfio.qemu import Qemu, attach, detach, qdev_id
from kvmvfio.qemu.handoff import _device_del, ensure_memlock


def _acl(op: str, path: str) -> None:
    entry = f"u:{NOBODY}:rw" if op == "-m" else f"u:{NOBODY}"
    subprocess.run(["setfacl", op, entry, path], check=True)


async def _unplug(qemu: Qemu, ident: str) -> None:
    # On DEVICE_DELETED, not when QOM forgets the id: QEMU closes the
    # device's files only at the former.
    await _device_del(qemu, ident, ident, 60)


async def _rounds(
    qemu: Qemu,
    rounds: int,
    plug: Callable[[], Awaitable[str]],
    unplug: Callable[[str], Awaitable[None]] | None = None,
) -> float:
    samples = []
    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        ident = await plug()
        samples.append(time.perf_counter() - start)
        if unplug is None:
            await _unplug(qemu, ident)
        else:
            await unplug(ident)
    return statistics.median(samples[1:]) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    topology = lab_topology()
    addr = topology.guest_address("edu0")
    bind(addr, "vfio-pci")
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{addr}/iommu_group"))
    (cdev,) = os.listdir(f"/sys/bus/pci/devices/{addr}/vfio-dev")
    l2 = L2Qemu(ports=1)
    try:
        async with Qemu(l2.qmp, pid=l2.pid) as qemu:
            await ensure_memlock(qemu)  # all three need it; not timed

            # The VM's iommufd object is made once, by the warm-up round, and
            # kept between rounds, as QEMU's own object is in the rows below.
            async def by_fd() -> str:
                (done,) = await attach(qemu, [addr])
                return done.qdev_id

            async def by_fd_unchecked() -> str:
                (done,) = await attach(qemu, [addr], coherency="ignore")
                return done.qdev_id

            ours = await _rounds(qemu, args.rounds, by_fd)
            unchecked = await _rounds(qemu, args.rounds, by_fd_unchecked)
            await attach(qemu, [addr], coherency="ignore")
            await detach(qemu, [addr])  # and the object goes

            granted = ["/dev/iommu", f"/dev/vfio/devices/{cdev}", f"/dev/vfio/{group}"]
            for path in granted:
                _acl("-m", path)
            try:
                await qemu.execute("object-add", {"qom-type": "iommufd", "id": "own"})

                async def own_iommufd() -> str:
                    args = {"driver": "vfio-pci", "host": addr, "iommufd": "own", "bus": "rp0"}
                    await qemu.execute("device_add", {**args, "id": "own-dev"})
                    return "own-dev"

                own_fd = await _rounds(qemu, args.rounds, own_iommufd)

                async def own_legacy() -> str:
                    args = {"driver": "vfio-pci", "host": addr, "bus": "rp0", "id": "legacy"}
                    await qemu.execute("device_add", args)
                    return "legacy"

                own_legacy_ms = await _rounds(qemu, args.rounds, own_legacy)
            finally:
                for path in granted:
                    _acl("-x", path)
    finally:
        l2.kill()
        bind(addr, None)
    print(f"Lab topology {topology.name}, device {addr} (edu), unprivileged paused L2 QEMU,")
    print(f"median of {args.rounds} rounds after one warm-up; {qdev_id(addr)} on rp0.\n")
    print("| how | attach latency | kvmvfio / this |")
    print("| --- | ---: | ---: |")
    print(f"| kvmvfio attach (checks + fds over SCM_RIGHTS) | {ours:.0f} ms | 1.00x |")
    print(f"| kvmvfio attach, coherency check off | {unchecked:.0f} ms | {ours / unchecked:.2f}x |")
    print(f"| QEMU opens it itself, iommufd backend | {own_fd:.0f} ms | {ours / own_fd:.2f}x |")
    print(
        f"| QEMU opens it itself, legacy container | {own_legacy_ms:.0f} ms "
        f"| {ours / own_legacy_ms:.2f}x |"
    )


if __name__ == "__main__":
    asyncio.run(main())
