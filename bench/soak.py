"""Soak test, run inside L1: many attach/detach and prepare/release cycles, nothing left behind.

    make soak        # = kvmvfio lab run --timeout 14400 -- python3 bench/soak.py

Part 1: CYCLES attach/detach cycles of two edu devices on one L2 QEMU,
by fd (iommufd), through kvmvfio.qemu. That QEMU runs with its vCPUs
stopped (``-S``): its guest never powers the hotplug slots, so QEMU
completes each unplug at once. A guest that answers hot-unplug costs PCIe's
5 s attention-button wait per device (1000 cycles: about three hours), so
part 1b runs GUEST_CYCLES cycles on a booted guest that answers them, with
the same counters. Tried first, and given up: a booted guest told to leave
the slots alone (``pcie_ports=compat``: after a dozen instant unplugs one
waited for the guest forever), and a booted guest answering through q35's
ACPI hotplug (``L2Qemu(acpi_hotplug=True)``; QEMU 10.0.13 died of SIGSEGV in
the first cycle). QEMU also died of SIGSEGV after about a dozen cycles of
part 1 when L1 ran other work beside the soak: run it alone.

Part 2: PREPARE_CYCLES prepare/release cycles of the e1000e through
kvmvfio.prepare (driver e1000e -> vfio-pci -> e1000e, netdev back).

Every 100 cycles (and at the start and the end) it records kvmvfio's own
open fds and RSS, QEMU's fds, and the devices' drivers, and fails if the
fds grow, RSS grows by more than 8 MiB, or a device is not where it
should be. Prints a markdown table; writes JSON to /mnt/job/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit import bind
from labkit import driver as _driver

from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.l2 import L2Qemu
from kvmvfio.prepare import prepare, release
from kvmvfio.qemu import Qemu, attach, detach

PCI = Path("/sys/bus/pci/devices")
RSS_SLACK = 8 << 20
EVERY = int(os.environ.get("KVMVFIO_SOAK_EVERY", "100"))


@dataclass
class Sample:
    part: str
    cycle: int
    seconds: float
    fds: int
    rss_kib: int
    qemu_fds: int
    drivers: str


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def part1(cycles: int, edus: list[str], samples: list[Sample], *, guest: bool) -> None:
    for addr in edus:
        if _driver(addr) != "vfio-pci":
            bind(addr, "vfio-pci")
    label = "attach/detach x2 by fd, guest running" if guest else "attach/detach x2 by fd"
    l2 = L2Qemu(ports=2, guest=guest)
    try:
        if guest:
            l2.wait_guest()
        start = time.monotonic()
        async with Qemu(l2.qmp, pid=l2.pid) as qemu:

            def sample(cycle: int) -> Sample:
                s = Sample(
                    label,
                    cycle,
                    round(time.monotonic() - start, 1),
                    _fds(),
                    _rss_kib(),
                    len(l2.fds()),
                    ",".join(_driver(a) for a in edus),
                )
                print(f"soak: {s}", flush=True)
                samples.append(s)
                return s

            for cycle in range(cycles + 1):
                if cycle % EVERY == 0 or cycle == cycles or (guest and cycle % 5 == 0):
                    sample(cycle)
                if cycle == cycles:
                    break
                await attach(qemu, edus)
                await detach(qemu, edus, timeout=120)
    except BaseException:
        _post_mortem(l2)
        raise
    finally:
        l2.kill()


def _post_mortem(l2: L2Qemu) -> None:
    """What a failed cycle needs to be understood: QEMU's words, the kernel's, memory."""
    time.sleep(0.5)
    print(f"soak: QEMU exit status: {l2.proc.poll()} (negative: killed by that signal)")
    print("soak: QEMU stderr:", l2.stderr.read_text(errors="replace")[-2000:], sep="\n")
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    print("soak: dmesg tail:", *dmesg.splitlines()[-25:], sep="\n")
    meminfo = Path("/proc/meminfo").read_text().splitlines()[:5]
    print("soak: meminfo:", *meminfo, sep="\n", flush=True)


def part2(cycles: int, nic: str, root: Path, samples: list[Sample]) -> None:
    start = time.monotonic()
    for cycle in range(cycles + 1):
        if cycle % 100 == 0 or cycle == cycles:
            s = Sample(
                "prepare/release e1000e",
                cycle,
                round(time.monotonic() - start, 1),
                _fds(),
                _rss_kib(),
                0,
                _driver(nic),
            )
            print(f"soak: {s}", flush=True)
            samples.append(s)
        if cycle == cycles:
            break
        prepare([nic], "soak", root=root)
        assert _driver(nic) == "vfio-pci"
        release([nic], "soak", root=root)


def verdict(samples: list[Sample]) -> list[str]:
    problems = []
    for part in sorted({s.part for s in samples}):
        mine = [s for s in samples if s.part == part]
        first, last = mine[0], mine[-1]
        # The first sample is taken before anything ran; compare with the second
        # (after 100 cycles) for steady state, and with the first for drivers.
        steady = mine[1] if len(mine) > 2 else first
        if last.fds > steady.fds:
            problems.append(f"{part}: fds grew from {steady.fds} to {last.fds}")
        if (last.rss_kib - steady.rss_kib) * 1024 > RSS_SLACK:
            problems.append(f"{part}: RSS grew from {steady.rss_kib} to {last.rss_kib} KiB")
        if last.qemu_fds > steady.qemu_fds:
            problems.append(f"{part}: QEMU's fds grew from {steady.qemu_fds} to {last.qemu_fds}")
        if any(s.drivers != first.drivers for s in mine):
            problems.append(f"{part}: drivers changed: {[s.drivers for s in mine]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--guest-cycles", type=int, default=20)
    parser.add_argument("--prepare-cycles", type=int, default=200)
    args = parser.parse_args()
    topology = topo_mod.load(os.environ.get("KVMVFIO_LAB_TOPOLOGY", "default"))
    edus = [topology.guest_address("edu0"), topology.guest_address("edu1")]
    nic = topology.guest_address("nic0")
    samples: list[Sample] = []
    t0 = time.monotonic()
    asyncio.run(part1(args.cycles, edus, samples, guest=False))
    t1a = time.monotonic()
    asyncio.run(part1(args.guest_cycles, edus, samples, guest=True))
    t1 = time.monotonic()
    part2(args.prepare_cycles, nic, Path("/run/kvmvfio-soak"), samples)
    t2 = time.monotonic()
    problems = verdict(samples)
    print("\n| part | cycle | s | kvmvfio fds | kvmvfio RSS KiB | QEMU fds | drivers |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in samples:
        print(f"| {s.part} | {s.cycle} | {s.seconds} | {s.fds} | {s.rss_kib} | "
              f"{s.qemu_fds or '-'} | {s.drivers} |")  # fmt: skip
    print(f"\nsoak: part 1 {t1a - t0:.0f} s, part 1b {t1 - t1a:.0f} s, part 2 {t2 - t1:.0f} s; "
          f"{'OK' if not problems else 'PROBLEMS: ' + '; '.join(problems)}")  # fmt: skip
    job = Path(os.environ.get("KVMVFIO_LAB_JOB", "/tmp"))
    doc = {
        "cycles": args.cycles,
        "prepare_cycles": args.prepare_cycles,
        "guest_cycles": args.guest_cycles,
        "seconds": {
            "part1": round(t1a - t0, 1),
            "part1b": round(t1 - t1a, 1),
            "part2": round(t2 - t1, 1),
        },
        "samples": [asdict(s) for s in samples],
        "problems": problems,
    }
    (job / "soak.json").write_text(json.dumps(doc, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
