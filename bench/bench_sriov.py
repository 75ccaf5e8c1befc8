"""Making N VFs and binding them to vfio-pci: kvmvfio against the shell loop people write.

Runs inside the lab's L1 on the ``sriov`` topology (QEMU's NVMe PF with 4 VFs
at most)::

    kvmvfio lab run --topology sriov -- python3 bench/bench_sriov.py [--rounds N]

For N = 1, 2 and 4 it times, in the same run:

- the shell loop: ``echo N > sriov_numvfs``, then for each VF
  ``echo vfio-pci > driver_override`` and ``echo VF > drivers_probe``
  (run by ``sh``, as an operator's script would), and the way back
  (``echo 0 > sriov_numvfs``). The PF's nvme driver probes each new VF
  first (autoprobe on), which is part of what that loop costs;
- kvmvfio: ``sriov.set_vfs`` (autoprobe off, the record written before each
  change) and ``prepare`` of each VF (safety checks, journal), then
  ``release`` and ``reset_vfs``.

Prints a Markdown table; the figures go to docs/BENCHMARKS.md. Timings are
under TCG: far slower than on hardware; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from labkit import lab_topology

from kvmvfio.host import Host
from kvmvfio.prepare import prepare, release, sriov

PCI = Path("/sys/bus/pci/devices")

SHELL_UP = """
pf=$1; n=$2
echo "$n" > /sys/bus/pci/devices/$pf/sriov_numvfs
for i in $(seq 0 $((n - 1))); do
    vf=$(basename "$(readlink /sys/bus/pci/devices/$pf/virtfn$i)")
    echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
    [ -e /sys/bus/pci/devices/$vf/driver ] && echo "$vf" > /sys/bus/pci/devices/$vf/driver/unbind
    echo "$vf" > /sys/bus/pci/drivers_probe
done
"""
SHELL_DOWN = """
pf=$1
echo 0 > /sys/bus/pci/devices/$pf/sriov_numvfs
"""


def _shell(script: str, *args: str) -> None:
    subprocess.run(["sh", "-c", script, "sh", *args], check=True)


def _drivers(pf: str) -> list[str | None]:
    out = []
    for vf in Host().device(pf).virtfns:
        link = PCI / str(vf) / "driver"
        out.append(link.resolve().name if link.exists() else None)
    return out


def shell_round(pf: str, n: int) -> tuple[float, float]:
    start = time.perf_counter()
    _shell(SHELL_UP, pf, str(n))
    up = time.perf_counter() - start
    assert _drivers(pf) == ["vfio-pci"] * n, _drivers(pf)
    start = time.perf_counter()
    _shell(SHELL_DOWN, pf)
    return up, time.perf_counter() - start


def kvmvfio_round(pf: str, n: int, root: Path) -> tuple[float, float]:
    start = time.perf_counter()
    vfs = sriov.set_vfs(pf, n, "bench", root=root).vfs
    prepare(list(vfs), "bench", root=root)
    up = time.perf_counter() - start
    assert _drivers(pf) == ["vfio-pci"] * n, _drivers(pf)
    start = time.perf_counter()
    release(list(vfs), "bench", root=root)
    sriov.reset_vfs(pf, "bench", root=root)
    return up, time.perf_counter() - start


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pf = lab_topology().guest_address("sriov0")
    root = Path(tempfile.mkdtemp(prefix="kvmvfio-bench-"))
    print(f"PF {pf}, {args.rounds} rounds, median ms (under TCG)\n")
    print("| VFs | shell loop: make + bind | kvmvfio: set_vfs + prepare | ratio | "
          "shell: remove | kvmvfio: release + reset | ratio |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in (1, 2, 4):
        shell = [shell_round(pf, n) for _ in range(args.rounds)]
        ours = [kvmvfio_round(pf, n, root) for _ in range(args.rounds)]
        s_up, s_down = median([u for u, _ in shell]), median([d for _, d in shell])
        k_up, k_down = median([u for u, _ in ours]), median([d for _, d in ours])
        print(
            f"| {n} | {s_up:.0f} | {k_up:.0f} | {k_up / s_up:.2f} | {s_down:.0f} | "
            f"{k_down:.0f} | {k_down / s_down:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
