"""Where the hook's ``release end`` spends its time, under cProfile, inside L1.

    kvmvfio lab run -- python3 bench/profile_hook_release.py [--rounds N]

What the agent runs when it serves ``release end`` for a domain that holds
the lab's e1000e NIC (kvmvfio metadata, ``handoff="libvirt"``): the hook's
own :func:`kvmvfio.libvirt.hook.handle`, in this warm process. Each round
prepares the NIC (``prepare begin``, not profiled), then profiles the
release; the NIC's driver move alone (the unbind from vfio-pci and
e1000e's probe, what any hook must do) is timed beside it, with three bare
sysfs writes as the hand-written hook does them. Prints the medians, then
the functions that took the most time.
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
    hooked, bare = [], []
    err = io.StringIO()
    for i in range(args.rounds + 1):
        assert hook.handle("vm", "prepare", "begin", xml, err, root=root) == 0, err.getvalue()
        t = time.monotonic()
        if i:
            profile.enable()
        assert hook.handle("vm", "release", "end", xml, err, root=root) == 0, err.getvalue()
        wait_driver(nic, original)
        if i:
            profile.disable()
            hooked.append(time.monotonic() - t)
        # The hand-written hook's release: the same move, three sysfs writes.
        (PCI / nic / "driver_override").write_text("vfio-pci")
        (PCI / nic / "driver" / "unbind").write_text(nic)
        Path("/sys/bus/pci/drivers_probe").write_text(nic)
        wait_driver(nic, "vfio-pci")
        t = time.monotonic()
        (PCI / nic / "driver" / "unbind").write_text(nic)
        (PCI / nic / "driver_override").write_text("\n")
        Path("/sys/bus/pci/drivers_probe").write_text(nic)
        wait_driver(nic, original)
        if i:
            bare.append(time.monotonic() - t)
    ms = 1000
    print(f"NIC {nic}, {args.rounds} rounds (median): hook release end "
          f"{statistics.median(hooked) * ms:.0f} ms, the bare move "
          f"{statistics.median(bare) * ms:.0f} ms")  # fmt: skip
    stats = pstats.Stats(profile)
    for key in ("cumulative", "tottime"):
        stats.sort_stats(key).print_stats(args.top)


if __name__ == "__main__":
    main()
