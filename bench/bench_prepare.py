"""prepare + release of N devices, versus the bare sysfs writes of a hook script.

Runs inside the lab's L1 (default topology)::

    kvmvfio lab run -- python3 bench/bench_prepare.py [--rounds N]

N = 1, 2, 4 edu devices with no driver (edu0; edu0 and edu1; edu0, edu1 and
the bridge group's edu2 and edu3). Compared in the same run:

- the shell a libvirt hook typically runs (one ``sh`` per round): for each
  device ``driver_override``, ``drivers_probe``; then ``unbind`` and clear
  the override. No checks, no journal, no waiting for the bind;
- ``kvmvfio.prepare.prepare`` + ``release`` called from Python (journal
  with fsync before each change, claims, safety checks, waiting for the
  kernel to bind);
- the ``kvmvfio prepare`` and ``kvmvfio release`` commands (two processes
  per round, as a hook would run them).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from labkit import lab_topology, median_ms

from kvmvfio.prepare import prepare, release

_SCRIPT = """
for d in "$@"; do
    echo vfio-pci > /sys/bus/pci/devices/$d/driver_override
    echo $d > /sys/bus/pci/drivers_probe
done
for d in "$@"; do
    echo $d > /sys/bus/pci/devices/$d/driver/unbind
    echo > /sys/bus/pci/devices/$d/driver_override
done
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    topo = lab_topology()
    edus = [topo.guest_address(i) for i in ("edu0", "edu1", "edu2", "edu3")]
    sets = {1: edus[:1], 2: edus[:2], 4: edus}
    root = Path(tempfile.mkdtemp(prefix="kvmvfio-bench-"))
    rows = []
    for n, devices in sets.items():
        named = devices[:3] if n == 4 else devices  # edu3 comes with edu2's group

        def shell(devices: list[str] = devices) -> None:
            subprocess.run(["sh", "-c", _SCRIPT, "sh", *devices], check=True)

        def api(named: list[str] = named) -> None:
            prepare(named, "bench", root=root)
            release(named, "bench", root=root)

        def cli(named: list[str] = named) -> None:
            subprocess.run(
                ["kvmvfio", "prepare", "--root", str(root), "--owner", "bench", *named], check=True
            )
            subprocess.run(["kvmvfio", "release", "--root", str(root), *named], check=True)

        floor = median_ms(shell, args.rounds)
        rows.append((n, floor, median_ms(api, args.rounds), median_ms(cli, args.rounds)))
    print(f"Lab topology {topo.name}, edu devices with no driver, median of {args.rounds}.\n")
    print("| devices | hook shell (floor) | kvmvfio API | ratio | kvmvfio CLI (2 runs) | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, floor, api_ms, cli_ms in rows:
        print(
            f"| {n} | {floor:.0f} ms | {api_ms:.0f} ms | {api_ms / floor:.2f}x "
            f"| {cli_ms:.0f} ms | {cli_ms / floor:.2f}x |"
        )


if __name__ == "__main__":
    main()
