"""How long an inventory of the host model takes, against the shell loop people use.

Builds SR-IOV heavy fake sysfs trees (tests/fakesysfs.py) of 512, 1024, 2048
and 4096 PCI functions: each root port (pcieport) has one physical function
(mlx5_core) with 62 VFs enabled, i.e. 64 functions and 64 IOMMU groups per
port. VFs are on vfio-pci, on no driver, or on the PF's driver, in turn by
port, so viable and blocked groups both occur. On each tree it takes the
median of several runs of

- ``Host.devices()`` then ``Host.groups()`` (two reads of every function:
  groups hold their members' full records),
- ``Host.inventory()`` (one read of everything: what ``kvmvfio inventory``
  does),
- the widespread shell loop over ``/sys/kernel/iommu_groups/*/devices/*``
  that cats vendor, device and class and reads the driver link, run by bash
  on the same tree.

Run from the repository root::

    python bench/bench_inventory.py            # the figures in docs/BENCHMARKS.md
    python bench/bench_inventory.py --sizes 512 1024 --runs 3 --shell-runs 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakesysfs import Dev, Topology  # noqa: E402

from kvmvfio.host import Host, PciAddress  # noqa: E402

FUNCTIONS_PER_PORT = 64  # root port + PF + 62 VFs
VF_DRIVERS = ("vfio-pci", None, "mlx5_core")

#: The loop found in wikis and forum answers, reading the same facts.
SHELL_LOOP = r"""
shopt -s nullglob
for g in "$1"/kernel/iommu_groups/*; do
    for d in "$g"/devices/*; do
        drv=$(readlink "$d/driver")
        echo "group ${g##*/} ${d##*/} $(cat "$d/vendor") $(cat "$d/device")" \
             "$(cat "$d/class") ${drv##*/}"
    done
done
"""


def sriov_topology(functions: int) -> Topology:
    """``functions`` PCI functions: root ports, each with a PF and 62 VFs."""
    if functions % FUNCTIONS_PER_PORT:
        raise SystemExit(f"sizes must be multiples of {FUNCTIONS_PER_PORT}")
    ports = []
    group = 1
    for i in range(functions // FUNCTIONS_PER_PORT):
        pf = Dev(
            f"0000:{i + 1:02x}:00.0",
            vendor=0x15B3,
            device=0x1017,
            driver="mlx5_core",
            group=group + 1,
            numa_node=i % 2,
            vfs=62,
            totalvfs=127,
            vf_device=0x1018,
            vf_driver=VF_DRIVERS[i % len(VF_DRIVERS)],
            vf_group=group + 2,
        )
        port = PciAddress(0, 0, 1 + i // 8, i % 8)
        ports.append(Dev(str(port), bridge=True, driver="pcieport", group=group, children=[pf]))
        group += FUNCTIONS_PER_PORT
    return Topology(devices=ports)


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shell_loop(sysfs: Path) -> int:
    out = subprocess.run(
        ["bash", "-c", SHELL_LOOP, "loop", str(sysfs)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.count("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--runs", type=int, default=9, help="runs per measure (median)")
    parser.add_argument("--shell-runs", type=int, default=3, help="runs of the shell loop")
    parser.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where to build the trees (default: /dev/shm, in memory like sysfs)",
    )
    args = parser.parse_args()

    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, trees in {args.dir or tempfile.gettempdir()}"
    )
    print()
    print(
        "| functions | groups | devices()+groups() | per function | inventory() "
        "| per function | shell loop | shell / devices()+groups() |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            sysfs, devfs = sriov_topology(size).build(tmp)
            host = Host(sysfs, devfs)
            devices, groups = host.devices(), host.groups()
            assert len(devices) == size, len(devices)
            assert shell_loop(sysfs) == size
            both = median_time(lambda: (host.devices(), host.groups()), args.runs)  # noqa: B023
            inv = median_time(host.inventory, args.runs)
            shell = median_time(lambda: shell_loop(sysfs), args.shell_runs)  # noqa: B023
            print(
                f"| {size} | {len(groups)} | {both * 1e3:.0f} ms | {both / size * 1e6:.0f} µs "
                f"| {inv * 1e3:.0f} ms | {inv / size * 1e6:.0f} µs | {shell:.1f} s "
                f"| {shell / both:.0f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
