"""Where a session's open + KVM association + release spends its time, under cProfile.

Runs inside the lab's L1, on the device bench_vfio_open.py times::

    kvmvfio lab run -- python3 bench/profile_vfio_open.py [--path cdev] [--rounds N]

Opens and releases a :class:`kvmvfio.vfio.VfioSession` (with a KVM VM's
kvm-vfio device, coherency check off, as the benchmark's middle column)
``rounds`` times after one warm-up, and prints the functions that took the
most time: by cumulative time, then by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats

from labkit import bind, lab_topology

from kvmvfio.kvm import KvmVm
from kvmvfio.vfio import VfioSession


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="cdev", choices=["group", "group-iommufd", "cdev"])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    addr = lab_topology().guest_address("edu0")
    bind(addr, "vfio-pci")
    profile = cProfile.Profile()
    try:
        with KvmVm() as vm, vm.vfio_device() as kvm:

            def once() -> None:
                with VfioSession([addr], backend=args.path, kvm=kvm, coherency="ignore"):
                    pass

            once()
            profile.enable()
            for _ in range(args.rounds):
                once()
            profile.disable()
    finally:
        bind(addr, None)
    print(f"device {addr}, the {args.path} path, {args.rounds} rounds")
    stats = pstats.Stats(profile)
    for key in ("cumulative", "tottime"):
        stats.sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
