"""Making K mdevs and opening each: kvmvfio against the sysfs shell loop people write.

Runs inside the lab's L1 on the ``default`` topology (the kernel's sample
``mtty`` is built in: parent ``mtty``, type ``mtty-2``, 12 instances at most)::

    kvmvfio lab run --topology default -- python3 bench/bench_mdev.py [--rounds N]

For K = 1, 4 and 12 it times, in the same run, each round alternating which
side goes first:

- the loop: ``echo $uuid > .../mtty-2/create`` for each of K UUIDs (made
  here and passed in, not by ``$(uuidgen)`` in the loop: one process fewer
  per mdev, in the loop's favour), run by ``sh`` as an operator's script
  would; then what a launcher does by hand to check that
  each opens: in this process, for each mdev, its cdev opened and bound
  (``VFIO_DEVICE_BIND_IOMMUFD``) to a fresh ``/dev/iommu``, then closed; and
  the way back, ``echo 1 > /sys/bus/mdev/devices/$uuid/remove`` for each,
  by ``sh``;
- kvmvfio: ``create_mdev`` for each (journaled, checked), one
  ``VfioSession`` of all K on the cdev path opened and closed (as a
  launcher would), then ``remove_mdev`` for each.

Not timed: that each mdev is there after the create side and gone after the
remove side. Prints a Markdown table; the figures go to docs/BENCHMARKS.md.
Timings are under TCG: far slower than on hardware; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from kvmvfio import uapi
from kvmvfio.prepare import mdev
from kvmvfio.vfio import VfioSession

MTTY2 = Path("/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2")
MDEVS = Path("/sys/bus/mdev/devices")
KS = (1, 4, 12)

SHELL_CREATE = """
for uuid in "$@"; do
    echo "$uuid" > /sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create
done
"""
SHELL_REMOVE = """
for uuid in "$@"; do
    echo 1 > /sys/bus/mdev/devices/$uuid/remove
done
"""


def _shell(script: str, uuids: list[str]) -> None:
    subprocess.run(["sh", "-c", script, "sh", *uuids], check=True)


def _bind_check(uid: str) -> None:
    """A launcher's check by hand: the mdev's cdev binds to a fresh iommufd."""
    (name,) = os.listdir(MDEVS / uid / "vfio-dev")
    iommufd = os.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
    try:
        dev = os.open(f"/dev/vfio/devices/{name}", os.O_RDWR | os.O_CLOEXEC)
        try:
            bind = uapi.new("vfio_device_bind_iommufd", iommufd=iommufd)
            uapi.ioctl(dev, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind)
        finally:
            os.close(dev)
    finally:
        os.close(iommufd)


def _check(uuids: list[str], *, there: bool) -> None:
    wrong = [u for u in uuids if (MDEVS / u).exists() != there]
    assert not wrong, f"{'missing' if there else 'left'}: {wrong}"


def shell_round(k: int) -> tuple[float, float, float]:
    """(create, open, remove) in seconds, the loop's way."""
    uuids = [str(uuid.uuid4()) for _ in range(k)]
    start = time.perf_counter()
    _shell(SHELL_CREATE, uuids)
    created = time.perf_counter()
    for uid in uuids:
        _bind_check(uid)
    opened = time.perf_counter()
    _check(uuids, there=True)
    start_remove = time.perf_counter()
    _shell(SHELL_REMOVE, uuids)
    removed = time.perf_counter()
    _check(uuids, there=False)
    return created - start, opened - created, removed - start_remove


def kvmvfio_round(k: int, root: Path) -> tuple[float, float, float]:
    """(create, open, remove) in seconds, through kvmvfio's API."""
    uuids = [str(uuid.uuid4()) for _ in range(k)]
    start = time.perf_counter()
    for uid in uuids:
        mdev.create_mdev("mtty", "mtty-2", "bench", uuid=uid, root=root)
    created = time.perf_counter()
    with VfioSession(uuids, backend="cdev", coherency="ignore"):
        pass
    opened = time.perf_counter()
    _check(uuids, there=True)
    start_remove = time.perf_counter()
    for uid in uuids:
        mdev.remove_mdev(uid, "bench", root=root)
    removed = time.perf_counter()
    _check(uuids, there=False)
    return created - start, opened - created, removed - start_remove


def ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    if not MTTY2.is_dir():
        raise SystemExit(f"bench_mdev.py: no {MTTY2}: run it in the lab's L1 (mtty built in)")
    left = int((MTTY2 / "available_instances").read_text())
    if left < max(KS):
        raise SystemExit(f"bench_mdev.py: mtty-2 has {left} instances left, {max(KS)} needed")
    root = Path(tempfile.mkdtemp(prefix="kvmvfio-bench-"))
    shell_round(1)  # warm-up (not counted): the page cache, sh, the imports kvmvfio does late
    kvmvfio_round(1, root)
    rows = []
    for k in KS:
        shell, ours = [], []
        for i in range(args.rounds):
            if i % 2:
                ours.append(kvmvfio_round(k, root))
                shell.append(shell_round(k))
            else:
                shell.append(shell_round(k))
                ours.append(kvmvfio_round(k, root))
        rows.append((k, shell, ours))
    print(f"mtty-2, {args.rounds} rounds, median ms (under TCG)\n")
    print("| K | loop: create + open | kvmvfio: create_mdev + VfioSession | ratio | "
          "loop: remove | kvmvfio: remove_mdev | ratio |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, shell, ours in rows:
        s_up, k_up = ms([c + o for c, o, _ in shell]), ms([c + o for c, o, _ in ours])
        s_down, k_down = ms([r for _, _, r in shell]), ms([r for _, _, r in ours])
        print(
            f"| {k} | {s_up:.0f} | {k_up:.0f} | {k_up / s_up:.2f}x | {s_down:.0f} | "
            f"{k_down:.0f} | {k_down / s_down:.2f}x |"
        )
    print("\nThe parts, median ms: create, then open\n")
    print("| K | loop: create (sh) | kvmvfio: create_mdev | ratio | "
          "loop: open + bind each | kvmvfio: VfioSession | ratio |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k, shell, ours in rows:
        s_c, k_c = ms([c for c, _, _ in shell]), ms([c for c, _, _ in ours])
        s_o, k_o = ms([o for _, o, _ in shell]), ms([o for _, o, _ in ours])
        print(
            f"| {k} | {s_c:.0f} | {k_c:.0f} | {k_c / s_c:.2f}x | {s_o:.0f} | "
            f"{k_o:.0f} | {k_o / s_o:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
