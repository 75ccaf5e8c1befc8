"""Where the hook's ``prepare begin`` or ``release end`` spends its time, under cProfile, in L1.

    kvmvfio lab run -- python3 bench/profile_hook.py [--event prepare|release] [--rounds N]

What the agent runs when it serves the event for a domain that holds the
lab's e1000e NIC (kvmvfio metadata, ``handoff="libvirt"``): the hook's own
:func:`kvmvfio.libvirt.hook.handle`, in this warm process. Each round
prepares the NIC and releases it, profiling the chosen event; the NIC's
driver move alone, the same way (what any hook must do), is timed beside
it with three bare sysfs writes as the hand-written hook does them.
Prints the medians, then the functions that took the most time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from labkit import driver, lab_topology

from kvmvfio.lab.libvirtd import domain_xml
from kvmvfio.libvirt import hook
from kvmvfio.libvirt.metadata import NAMESPACE

PCI = Path("/sys/bus/pci/devices")


def wait_driver(addr: str, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while driver(addr) != want:
        if time.monotonic() > deadline:
            raise SystemExit(f"{addr} not on {want} within {timeout:g} s")
        time.sleep(0.002)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--event", choices=["prepare", "release"], default="release")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    nic = lab_topology().guest_address("nic0")
    original = driver(nic)
    meta = (
        f'<k:devices xmlns:k="{NAMESPACE}" coherency="warn"><k:device address="{nic}"/></k:devices>'
    )
    xml = domain_xml("vm", metadata=meta, hostdevs=[nic]).encode()
    root = Path(tempfile.mkdtemp(prefix="kvmvfio-profile-"))
    profile = cProfile.Profile()
    hooked: list[float] = []
    moves: list[float] = []
    err = io.StringIO()
    prepare = args.event == "prepare"

    def timed(op: str, subop: str, want: str, profiled: bool) -> float:
        t = time.monotonic()
        if profiled:
            profile.enable()
        assert hook.handle("vm", op, subop, xml, err, root=root) == 0, err.getvalue()
        wait_driver(nic, want)
        if profiled:
            profile.disable()
        return time.monotonic() - t

    def bare(override: str, want: str) -> float:
        t = time.monotonic()
        (PCI / nic / "driver_override").write_text(override)
        if (PCI / nic / "driver").exists():
            (PCI / nic / "driver" / "unbind").write_text(nic)
        Path("/sys/bus/pci/drivers_probe").write_text(nic)
        wait_driver(nic, want)
        return time.monotonic() - t

    for i in range(args.rounds + 1):
        took_prepare = timed("prepare", "begin", "vfio-pci", profiled=i > 0 and prepare)
        took_release = timed("release", "end", original, profiled=i > 0 and not prepare)
        # The hand-written hook's moves: the same, three sysfs writes each way.
        bare_prepare = bare("vfio-pci", "vfio-pci")
        bare_release = bare("\n", original)
        if i:
            hooked.append(took_prepare if prepare else took_release)
            moves.append(bare_prepare if prepare else bare_release)
    ms = 1000
    event = "prepare begin" if prepare else "release end"
    print(f"NIC {nic}, {args.rounds} rounds (median): hook {event} "
          f"{statistics.median(hooked) * ms:.0f} ms, the bare move "
          f"{statistics.median(moves) * ms:.0f} ms")  # fmt: skip
    stats = pstats.Stats(profile)
    for key in ("cumulative", "tottime"):
        stats.sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
