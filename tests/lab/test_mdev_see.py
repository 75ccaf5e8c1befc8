"""Seeing mediated devices on the lab's 6.12 kernel: the sample parents mtty and mdpy.

The lab kernel has the mdev core and the samples built in
(``CONFIG_SAMPLE_VFIO_MDEV_MTTY=y``, ``_MDPY=y``), so L1 boots with two
virtual parents, ``/sys/devices/virtual/mtty/mtty`` (types ``mtty-1`` and
``mtty-2``: 24 serial ports shared, one or two per mdev) and
``/sys/devices/virtual/mdpy/mdpy`` (``mdpy-vga``, ``mdpy-xga``, ``mdpy-hd``:
4 displays shared). These tests pin down what ``kvmvfio inventory`` and
``kvmvfio group`` say of them, and of an mdev made by hand the way a user
makes one: a UUID written to the type's ``create``.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

MTTY = Path("/sys/devices/virtual/mtty/mtty")
MDEV_BUS = Path("/sys/bus/mdev/devices")


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], check=False, capture_output=True, text=True, timeout=120
    )


def inventory() -> dict[str, Any]:
    done = kvmvfio("inventory", "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def types_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every type of every parent, by its id."""
    return {t["type"]: t for p in doc["mdev_parents"] for t in p["types"]}


@pytest.fixture
def mtty2() -> Iterator[str]:
    """An mtty-2 mdev, created and removed by plain sysfs writes."""
    name = str(uuid.uuid4())
    (MTTY / "mdev_supported_types" / "mtty-2" / "create").write_text(f"{name}\n")
    try:
        yield name
    finally:
        (MDEV_BUS / name / "remove").write_text("1\n")
        assert not (MDEV_BUS / name).exists()


def test_inventory_lists_the_sample_parents_and_their_types() -> None:
    doc = inventory()
    parents = {p["name"]: p for p in doc["mdev_parents"]}
    print("mdev parents:", {n: p["path"] for n, p in parents.items()})
    assert set(parents) >= {"mtty", "mdpy"}
    assert parents["mtty"]["path"] == str(MTTY)
    assert parents["mdpy"]["path"] == "/sys/devices/virtual/mdpy/mdpy"
    assert parents["mtty"]["driver"] is None  # a class device, on no driver
    assert sorted(os.listdir("/sys/class/mdev_bus")) == sorted(parents)
    types = types_of(doc)
    print("types:", {k: (t["name"], t["available_instances"]) for k, t in types.items()})
    assert [t["type"] for t in parents["mtty"]["types"]] == ["mtty-1", "mtty-2"]
    assert [t["type"] for t in parents["mdpy"]["types"]] == ["mdpy-hd", "mdpy-vga", "mdpy-xga"]
    assert types["mtty-1"]["name"] == "Single port serial"
    assert types["mtty-2"]["name"] == "Dual port serial"
    assert types["mtty-1"]["description"] is None  # mtty has no show_description
    assert types["mdpy-vga"]["description"] == "virtual display, 640x480 framebuffer"
    assert {t["device_api"] for t in types.values()} == {"vfio-pci"}
    # Nothing made yet: all 24 ports, all 4 displays.
    assert types["mtty-1"]["available_instances"] == 24
    assert types["mtty-2"]["available_instances"] == 12
    assert {types[t]["available_instances"] for t in ("mdpy-vga", "mdpy-xga", "mdpy-hd")} == {4}
    assert doc["mdevs"] == []
    # The PCI part of the document is as it was: additions only.
    assert {"schema", "host", "devices", "groups"} <= set(doc)


def test_an_mdev_made_by_hand_shows_with_its_group_and_cdev(mtty2: str) -> None:
    doc = inventory()
    (m,) = doc["mdevs"]
    print("mdev:", m)
    assert (m["uuid"], m["type"], m["parent"], m["driver"]) == (mtty2, "mtty-2", "mtty", "mtty")
    assert m["path"] == str(MTTY / mtty2)
    assert os.path.realpath(MDEV_BUS / mtty2) == str(MTTY / mtty2)
    group = m["iommu_group"]
    assert isinstance(group, int)
    assert m["dev_node"] == f"/dev/vfio/{group}"
    assert os.path.exists(f"/dev/vfio/{group}")
    assert os.listdir(f"/sys/kernel/iommu_groups/{group}/devices") == [mtty2]
    assert m["vfio_cdev"] is not None
    assert os.path.exists(f"/dev/vfio/devices/{m['vfio_cdev']}")
    types = types_of(doc)
    assert types["mtty-2"]["mdevs"] == [mtty2]
    # Two of the 24 ports are taken.
    assert (types["mtty-1"]["available_instances"], types["mtty-2"]["available_instances"]) == (
        22,
        11,
    )
    (g,) = [g for g in doc["groups"] if g["number"] == group]
    assert g["viable"] is True
    # VFIO names the emulated group as it names a no-IOMMU one; the /dev node differs.
    assert Path(f"/sys/kernel/iommu_groups/{group}/name").read_text() == "vfio-noiommu\n"
    assert not os.path.exists(f"/dev/vfio/noiommu-{group}")
    assert (g["noiommu"], g["emulated"], g["dev_node"]) == (False, True, f"/dev/vfio/{group}")
    assert g["other_members"] == [{"name": mtty2, "driver": "mtty", "mdev": True}]
    assert g["members"] == []

    done = kvmvfio("group", str(group), "--json")
    assert done.returncode == 0, done.stderr  # viable
    one = json.loads(done.stdout)
    assert one["group"]["blockers"] == []
    assert one["mdevs"] == [m]
    text = kvmvfio("group", str(group))
    assert text.returncode == 0, text.stderr
    print(text.stdout)
    assert f"emulated IOMMU group {group} (/dev/vfio/{group}): viable" in text.stdout
    assert "No IOMMU isolates" not in text.stdout
    assert f"{mtty2}  -    mdev mtty-2  mtty    ok (on mtty, cdev {m['vfio_cdev']})" in text.stdout


def test_inventory_in_words_names_the_parents_and_the_mdev(mtty2: str) -> None:
    done = kvmvfio("inventory")
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    lines = done.stdout.splitlines()
    assert any(line.split()[:3] == ["mtty", "mtty-2", "Dual"] for line in lines)
    (row,) = [line for line in lines if line.startswith(mtty2)]
    assert row.split()[1:4] == ["mtty-2", "mtty", "mtty"]
    assert row.split()[5] == "yes"
