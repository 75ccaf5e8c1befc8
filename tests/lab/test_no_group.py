"""Functions in no IOMMU group, as the lab's topologies make them, and what kvmvfio says.

Each test checks the kernel's own files first, then kvmvfio's reading of them
(:meth:`Host.no_group`, ``kvmvfio group``, ``kvmvfio inventory --json``):

- ``default``, ``coherent``: VT-d gives every function a group when it
  registers, functions without a driver and behind the PCIe-to-PCI bridge
  included: nothing is in no group;
- ``virtio-iommu``: the virtio-iommu-pci function is the IOMMU itself and
  gets no group; functions without a driver get theirs only when a driver
  binds (``test_lab_topologies.py`` binds one and sees it);
- the IOMMU turned off on the command line needs a boot of its own, from a
  topology file the other lab tests do not expect (they need groups)::

      kvmvfio lab test --topology tests/lab/topologies/iommu-off.toml -- -k test_no_group
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from kvmvfio.host import Host, IommuKind, NoGroupCause, PciAddress
from kvmvfio.lab.topology import Topology

pytestmark = pytest.mark.lab

#: Where the lab puts the virtio-iommu (``Topology.viommu_arg``).
VIOMMU = "0000:00:02.0"
PCI = Path("/sys/bus/pci/devices")


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=120, check=False
    )


def _kernel_groups() -> dict[str, bool]:
    """Each PCI function, and whether the kernel gave it a group (the symlink)."""
    return {a: (PCI / a / "iommu_group").is_symlink() for a in sorted(os.listdir(PCI))}


def _driver(addr: str) -> str | None:
    link = PCI / addr / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


@pytest.mark.topology("default", "coherent")
def test_vt_d_gives_every_function_a_group_at_boot(topology: Topology) -> None:
    groups = _kernel_groups()
    assert all(groups.values()), groups
    # Functions no driver has ever had are in groups too, the ones behind the bridge included.
    edu2 = topology.guest_address("edu2")
    assert _driver(edu2) is None
    assert groups[edu2]
    inv = Host().inventory()
    assert [(u.name, u.kind, u.function) for u in inv.iommu.units] == [
        ("dmar0", IommuKind.INTEL_VTD, None)
    ]
    assert inv.iommu.firmware_tables == ("DMAR",)
    assert "intel_iommu=on" in inv.iommu.kernel_args
    assert [str(d.address) for d in inv.devices if inv.no_group(d) is not None] == []
    assert "IOMMU: Intel VT-d (dmar0)." in kvmvfio("inventory").stdout


@pytest.mark.topology("virtio-iommu")
def test_the_virtio_iommu_function_is_the_iommu_itself() -> None:
    # The kernel names the unit after its transport and links it to the virtio device.
    unit = Path("/sys/class/iommu") / VIOMMU
    assert os.path.basename(os.readlink(unit / "device" / "driver")) == "virtio_iommu"
    assert f"/{VIOMMU}/virtio" in os.readlink(unit)
    assert _driver(VIOMMU) == "virtio-pci"
    assert not _kernel_groups()[VIOMMU]
    host = Host()
    assert [(u.name, u.kind, u.function) for u in host.iommu().units] == [
        (VIOMMU, IommuKind.VIRTIO, PciAddress.parse(VIOMMU))
    ]
    why = host.no_group(VIOMMU)
    assert why is not None
    assert (why.cause, why.iommu, why.units) == (NoGroupCause.IS_IOMMU, IommuKind.VIRTIO, (VIOMMU,))
    assert not why.bind_gives_group
    shown = kvmvfio("group", VIOMMU)
    assert (shown.returncode, shown.stdout) == (1, "")
    assert shown.stderr == (
        f"kvmvfio: PCI device {VIOMMU} is in no IOMMU group: it is the IOMMU itself "
        "(virtio-iommu), which does not translate its own DMA: it cannot be given to a VM\n"
    )


@pytest.mark.topology("virtio-iommu")
def test_every_function_in_no_group_is_the_iommu_or_has_no_driver(topology: Topology) -> None:
    groups = _kernel_groups()
    doc = json.loads(kvmvfio("inventory", "--json").stdout)
    assert doc["host"]["iommu_units"] == [
        {"name": VIOMMU, "kind": "virtio-iommu", "function": VIOMMU}
    ]
    assert doc["host"]["iommu_firmware_tables"] == ["VIOT"]
    causes = {}
    for dev in doc["devices"]:
        addr = dev["address"]
        assert (dev["iommu_group"] is not None) is groups[addr]
        if groups[addr]:
            assert dev["no_group"] is None
            continue
        causes[addr] = dev["no_group"]["cause"]
        # What the kernel shows: the IOMMU's own function, or one no driver has.
        assert addr == VIOMMU or _driver(addr) is None
    # Every function on a driver has its group: none is outside the VIOT's ranges.
    assert set(causes.values()) <= {"is-iommu", "not-probed"}
    assert causes[VIOMMU] == "is-iommu"
    assert causes["0000:00:00.0"] == "not-probed"  # the host bridge: no driver ever
    nic = topology.guest_address("nic0")
    assert nic not in causes
    table = kvmvfio("inventory").stdout.splitlines()
    row = next(line for line in table if line.startswith("0000:00:00.0 "))
    assert row.endswith("no group until a driver binds")
    row = next(line for line in table if line.startswith(f"{VIOMMU} "))
    assert row.endswith("no group: the IOMMU itself")


@pytest.mark.topology("iommu-off")
def test_the_iommu_turned_off_on_the_command_line(topology: Topology) -> None:
    # The kernel: the firmware describes VT-d, the command line turns it off, no unit.
    assert Path("/sys/firmware/acpi/tables/DMAR").exists()
    assert Path("/proc/cmdline").read_text().split()[-1] == "intel_iommu=off"
    assert os.listdir("/sys/class/iommu") == []
    assert os.listdir("/sys/kernel/iommu_groups") == []
    assert not any(_kernel_groups().values())
    inv = Host().inventory()
    assert inv.iommu.off_by == "intel_iommu=off"
    causes = {(c.cause, c.setting) for d in inv.devices if (c := inv.no_group(d)) is not None}
    assert causes == {(NoGroupCause.IOMMU_OFF, "intel_iommu=off")}
    edu0 = topology.guest_address("edu0")
    sentence = (
        f"kvmvfio: PCI device {edu0} is in no IOMMU group: the kernel command line turns "
        "Intel VT-d off (intel_iommu=off): remove intel_iommu=off and reboot\n"
    )
    shown = kvmvfio("group", edu0)
    assert (shown.returncode, shown.stderr) == (1, sentence)
    # prepare refuses with the same sentence, and moves nothing.
    refused = kvmvfio("prepare", "--owner", "lab-nogroup", edu0)
    assert (refused.returncode, refused.stderr) == (1, sentence)
    assert _driver(edu0) is None
    doc = json.loads(kvmvfio("inventory", "--json").stdout)
    assert doc["host"]["iommu_off_by"] == "intel_iommu=off"
    assert doc["host"]["missing"][0] == (
        "no IOMMU in use, because the kernel command line turns Intel VT-d off "
        "(intel_iommu=off): remove intel_iommu=off and reboot"
    )


@pytest.mark.topology("iommu-off")
def test_binding_vfio_pci_gives_no_group_without_an_iommu(topology: Topology) -> None:
    """Unlike virtio-iommu's wait for a driver, here no driver helps: vfio-pci refuses."""
    edu0 = topology.guest_address("edu0")
    why = Host().no_group(edu0)
    assert why is not None
    assert not why.bind_gives_group
    dev = PCI / edu0
    try:
        (dev / "driver_override").write_text("vfio-pci")
        with contextlib.suppress(OSError):  # the probe's failure may come back here
            Path("/sys/bus/pci/drivers_probe").write_text(edu0)
        assert _driver(edu0) is None
        assert not (dev / "iommu_group").exists()
    finally:
        (dev / "driver_override").write_text("\n")
