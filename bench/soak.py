"""Soak test, run inside L1: many attach/detach and prepare/release cycles, nothing left behind.

    make soak        # = kvmvfio lab run --timeout 14400 -- python3 bench/soak.py

Part 1: CYCLES attach/detach cycles of two edu devices on one running L2
VM, by fd (iommufd), through kvmvfio.qemu. The VM is a booted guest on
q35's ACPI hotplug, which answers each unplug within a second (native PCIe
hotplug would cost its 5 s attention button per device: three hours for
1000 cycles). The guest reports its own PCI uevents on its serial port
(``L2Qemu.pci_event_counts``): at every sample it must have added and
removed each device once per cycle. QEMU is trixie-backports' 11.1 (the
lab's root filesystem): trixie's 10.0.13 died of SIGSEGV in the first cycle
on ACPI hotplug, and after about a dozen cycles on a paused VM when L1 ran
other work beside the soak.

Part 2: PREPARE_CYCLES prepare/release cycles of the e1000e through
kvmvfio.prepare (driver e1000e -> vfio-pci -> e1000e, netdev back).

Every 100 cycles (and at the start and the end) it records kvmvfio's own
open fds and RSS, QEMU's fds, the devices' drivers and the guest's PCI
uevents, and fails if the fds grow, RSS grows by more than 8 MiB, a device
is not where it should be, or the guest missed an add or a remove.
Prints a markdown table; writes JSON to /mnt/job/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from labkit import bind, lab_topology
from labkit import driver as _driver

from kvmvfio.lab.l2 import EDU_ID, L2Qemu
from kvmvfio.prepare import prepare, release
from kvmvfio.qemu import Qemu, attach, detach

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
    guest: str = "-"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def part1(cycles: int, edus: list[str], samples: list[Sample]) -> None:
    for addr in edus:
        if _driver(addr) != "vfio-pci":
            bind(addr, "vfio-pci")
    booting = time.monotonic()
    l2 = L2Qemu.booted(ports=2, acpi_hotplug=True)
    try:
        print(
            f"soak: the L2 guest booted in {time.monotonic() - booting:.0f} s "
            f"(its QEMU used {l2.cpu_seconds():.0f} s of CPU)",
            flush=True,
        )
        start = time.monotonic()
        async with Qemu(l2.qmp, pid=l2.pid) as qemu:

            def sample(cycle: int) -> None:
                adds, removes = l2.wait_pci_events(EDU_ID, (2 * cycle, 2 * cycle), timeout=10)
                s = Sample(
                    "attach/detach x2 by fd, guest running",
                    cycle,
                    round(time.monotonic() - start, 1),
                    _fds(),
                    _rss_kib(),
                    len(l2.fds()),
                    ",".join(_driver(a) for a in edus),
                    f"+{adds} -{removes}",
                )
                print(f"soak: {s}", flush=True)
                if s.guest != _guest_should_see(cycle) and l2.garbled_pci_lines:
                    print(f"soak: the guest's garbled lines: {l2.garbled_pci_lines}", flush=True)
                samples.append(s)

            watchdog = Watchdog(l2, stall=180)
            for cycle in range(cycles + 1):
                watchdog.progress = time.monotonic()
                if cycle % EVERY == 0 or cycle == cycles:
                    sample(cycle)
                if cycle == cycles:
                    break
                await attach(qemu, edus)
                await detach(qemu, edus, timeout=120)
            watchdog.stop()
    except BaseException:
        _post_mortem(l2)
        raise
    finally:
        l2.kill()


class Watchdog(threading.Thread):
    """Says where everything is once a cycle takes longer than ``stall`` seconds.

    A thread, so it also speaks when the event loop itself is blocked (a
    system call that does not return); it says it once, and the soak goes on
    waiting: a stall that ends is a finding too.
    """

    def __init__(self, l2: L2Qemu, stall: float) -> None:
        super().__init__(daemon=True)
        self.l2, self.stall = l2, stall
        self.progress = time.monotonic()
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(10):
            if time.monotonic() - self.progress > self.stall:
                print(f"soak: no cycle finished for {self.stall:.0f} s", flush=True)
                faulthandler.dump_traceback(all_threads=True)
                _post_mortem(self.l2)
                return

    def stop(self) -> None:
        self._done.set()


def _stacks(pid: int) -> str:
    """Where each of QEMU's threads is in the kernel (root only): name, wchan, stack."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            name = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            stack = (task / "stack").read_text().strip()
        except OSError as err:
            out.append(f"{task.name}: {err}")
            continue
        out.append(f"thread {task.name} ({name}), wchan {wchan}:\n{stack}")
    return "\n".join(out)


def _post_mortem(l2: L2Qemu) -> None:
    """What a failed cycle needs to be understood: QEMU's words, the kernel's, memory."""
    time.sleep(0.5)
    print(f"soak: QEMU exit status: {l2.proc.poll()} (negative: killed by that signal)")
    print("soak: QEMU stderr:", l2.stderr.read_text(errors="replace")[-2000:], sep="\n")
    if l2.proc.poll() is None:
        print(f"soak: QEMU used {l2.cpu_seconds():.0f} s of CPU; its threads:", flush=True)
        print(_stacks(l2.pid))
        print("soak: the guest's last serial lines:", *l2.console().splitlines()[-10:], sep="\n")
        # Every blocked task's stack, into the kernel log read below.
        Path("/proc/sysrq-trigger").write_text("w")
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    print("soak: dmesg tail:", *dmesg.splitlines()[-80:], sep="\n")
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
        assert _driver(nic) == "e1000e"


def _guest_should_see(cycle: int) -> str:
    """A sample's guest column after ``cycle`` cycles: both devices added and removed."""
    return f"+{2 * cycle} -{2 * cycle}"


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
        for s in mine:
            if s.guest not in ("-", _guest_should_see(s.cycle)):
                problems.append(f"{part}: at cycle {s.cycle} the guest saw {s.guest}, "
                                f"not {_guest_should_see(s.cycle)}")  # fmt: skip
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--prepare-cycles", type=int, default=200)
    args = parser.parse_args()
    topology = lab_topology()
    edus = [topology.guest_address("edu0"), topology.guest_address("edu1")]
    nic = topology.guest_address("nic0")
    samples: list[Sample] = []
    t0 = time.monotonic()
    asyncio.run(part1(args.cycles, edus, samples))
    t1 = time.monotonic()
    part2(args.prepare_cycles, nic, Path("/run/kvmvfio-soak"), samples)
    t2 = time.monotonic()
    problems = verdict(samples)
    print("\n| part | cycle | s | kvmvfio fds | kvmvfio RSS KiB | QEMU fds | drivers "
          "| guest +add -remove |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for s in samples:
        print(f"| {s.part} | {s.cycle} | {s.seconds} | {s.fds} | {s.rss_kib} | "
              f"{s.qemu_fds or '-'} | {s.drivers} | {s.guest} |")  # fmt: skip
    print(f"\nsoak: part 1 {t1 - t0:.0f} s, part 2 {t2 - t1:.0f} s; "
          f"{'OK' if not problems else 'PROBLEMS: ' + '; '.join(problems)}")  # fmt: skip
    job = Path(os.environ.get("KVMVFIO_LAB_JOB", "/tmp"))
    doc = {
        "cycles": args.cycles,
        "prepare_cycles": args.prepare_cycles,
        "seconds": {
            "part1": round(t1 - t0, 1),
            "part2": round(t2 - t1, 1),
        },
        "samples": [asdict(s) for s in samples],
        "problems": problems,
    }
    (job / "soak.json").write_text(json.dumps(doc, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
