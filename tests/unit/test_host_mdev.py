"""Mediated devices as sysfs shows them (kvmvfio.host.mdev), on fake trees.

The trees mirror what the lab's 6.12 kernel shows for its sample parents
(tests/lab/test_mdev_see.py): mtty with types mtty-1 and mtty-2, mdpy with
three display types, and an mdev in an emulated-IOMMU group of its own.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

import pytest
from fakesysfs import Dev, Mediated, Parent, ParentType, Topology, mdev_dir
from hypothesis import given
from hypothesis import strategies as st

from kvmvfio.errors import InvalidMdevUuid, KvmvfioError, MdevNotFound, SysfsError
from kvmvfio.host import Host, Mdev
from kvmvfio.host.mdev import _count, find_parent, is_uuid, parse_uuid, read_mdev

BuildHost = Callable[[Topology], Host]

U1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
U2 = "0b5e2c4a-8d3f-4e1a-9c7b-2f6d1e0a3b4c"
GVT_DESCRIPTION = (
    "low_gm_size: 128MB\nhigh_gm_size: 512MB\nfence: 4\nresolution: 1920x1200\nweight: 4"
)

MTTY = Parent(
    "mtty",
    [
        ParentType("mtty-1", "Single port serial", available=22),
        ParentType("mtty-2", "Dual port serial", available=11),
    ],
)
MDPY = Parent(
    "mdpy",
    [
        ParentType("mdpy-vga", "mdpy-vga", "virtual display, 640x480 framebuffer", available=4),
        ParentType("mdpy-hd", "mdpy-hd", "virtual display, 1920x1080 framebuffer", available=4),
    ],
)
#: An Intel GPU with GVT-g: a PCI parent on i915, whose types say five lines each.
GVT = Parent(
    "0000:00:02.0",
    [ParentType("i915-GVTg_V5_4", "GVTg_V5_4", GVT_DESCRIPTION, available=3)],
    function="0000:00:02.0",
)
HOST = Topology(
    devices=[
        Dev("0000:00:02.0", cls=0x030000, driver="i915", group=0),
        Dev("0000:00:03.0", driver="vfio-pci", group=3),
    ],
    mdev_parents=[MTTY, MDPY, GVT],
    mdevs=[
        Mediated(U1, "mtty", "mtty-2", driver="mtty", group=20),
        Mediated(U2, "0000:00:02.0", "i915-GVTg_V5_4", driver="vfio_mdev", group=21),
    ],
)


def test_parents_and_their_types(build_host: BuildHost) -> None:
    host = build_host(HOST)
    parents = host.mdev_parents()
    assert [p.name for p in parents] == ["0000:00:02.0", "mdpy", "mtty"]
    gvt, mdpy, mtty = parents
    assert mtty.path == str(host.sysfs / "devices" / "virtual" / "mtty" / "mtty")
    assert (mtty.driver, gvt.driver) == (None, "i915")
    assert [t.id for t in mtty.types] == ["mtty-1", "mtty-2"]
    one, two = mtty.types
    assert (one.parent, one.name, one.description, one.device_api, one.available) == (
        "mtty",
        "Single port serial",
        None,
        "vfio-pci",
        22,
    )
    assert (two.available, two.devices) == (11, (U1,))
    assert mtty.type("mtty-2") == two
    assert mtty.type("mtty-3") is None
    assert [t.id for t in mdpy.types] == ["mdpy-hd", "mdpy-vga"]
    vga = mdpy.type("mdpy-vga")
    assert vga is not None
    assert vga.description == "virtual display, 640x480 framebuffer"


def test_a_description_of_several_lines_is_kept_whole(build_host: BuildHost) -> None:
    # i915's GVT-g writes five "key: value" lines; one bad line must not lose the host.
    host = build_host(HOST)
    (t,) = host.mdev_parents()[0].types
    assert t.description == GVT_DESCRIPTION
    assert t.devices == (U2,)


def test_mdevs(build_host: BuildHost) -> None:
    host = build_host(HOST)
    found = host.mdevs()
    assert [m.uuid for m in found] == [U2, U1]  # by parent, then UUID
    gvt, mtty = found
    assert mtty == Mdev(
        uuid=U1,
        parent="mtty",
        type_id="mtty-2",
        driver="mtty",
        group=20,
        cdev=mtty.cdev,
        path=str(host.sysfs / "devices" / "virtual" / "mtty" / "mtty" / U1),
    )
    assert mtty.cdev is not None
    assert mtty.cdev.startswith("vfio")
    assert mtty.cdev_node(host.devfs) == host.devfs / "vfio" / "devices" / mtty.cdev
    assert mtty.group_node(host.devfs) == host.devfs / "vfio" / "20"
    assert (gvt.parent, gvt.type_id, gvt.driver, gvt.group) == (
        "0000:00:02.0",
        "i915-GVTg_V5_4",
        "vfio_mdev",
        21,
    )
    assert gvt.path.startswith(str(host.sysfs / "devices" / "pci0000:00" / "0000:00:02.0"))
    assert host.mdev(U1.upper()) == mtty


def test_an_mdev_without_a_driver_has_no_group_and_no_cdev(build_host: BuildHost) -> None:
    host = build_host(Topology(mdev_parents=[MTTY], mdevs=[Mediated(U1, "mtty", "mtty-1")]))
    (m,) = host.mdevs()
    assert (m.driver, m.group, m.cdev) == (None, None, None)
    assert (m.group_node(), m.cdev_node()) == (None, None)


def test_without_device_cdevs_an_mdev_has_none(build_host: BuildHost) -> None:
    host = build_host(
        Topology(mdev_parents=[MTTY], mdevs=[Mediated(U1, "mtty", "mtty-1", "mtty", 7)], cdev=False)
    )
    assert host.mdev(U1).cdev is None


def test_an_mdev_group_is_viable(build_host: BuildHost) -> None:
    host = build_host(HOST)
    group = host.group(20)
    assert group.members == ()
    assert [(f.name, f.driver, f.mdev) for f in group.foreign] == [(U1, "mtty", True)]
    assert group.viable
    assert group.blockers == ()
    # VFIO names it vfio-noiommu, as it does a no-IOMMU group; its node says otherwise.
    assert (host.sysfs / "kernel/iommu_groups/20/name").read_text() == "vfio-noiommu\n"
    assert (group.noiommu, group.emulated) == (False, True)
    assert group.dev_node(host.devfs) == host.devfs / "vfio" / "20"
    inv = host.inventory()
    assert [p.name for p in inv.mdev_parents] == ["0000:00:02.0", "mdpy", "mtty"]
    assert [m.uuid for m in inv.mdevs] == [U2, U1]
    assert inv.groups_by_number()[21].viable


def test_a_no_iommu_group_is_still_one(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci", group=4)],
            noiommu_groups=[4],
            mdev_parents=[MTTY],
            mdevs=[Mediated(U1, "mtty", "mtty-1", "mtty", 5)],
        )
    )
    four, five = host.groups()
    assert (four.noiommu, four.emulated, four.node_name) == (True, False, "noiommu-4")
    assert (five.noiommu, five.emulated, five.node_name) == (False, True, "5")


def test_a_host_without_the_mdev_core(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)]))
    assert (host.mdev_parents(), host.mdevs()) == ([], [])
    inv = host.inventory()
    assert (inv.mdev_parents, inv.mdevs) == ((), ())
    with pytest.raises(MdevNotFound, match=f"no mediated device {U1} on this host"):
        host.mdev(U1)


def test_lookups(build_host: BuildHost) -> None:
    host = build_host(HOST)
    assert find_parent("mtty", host.sysfs) == host.mdev_parents()[2]
    for name in ("nope", "", "..", ".", "a/b", "\x1b[2J"):
        assert find_parent(name, host.sysfs) is None
    assert read_mdev(U2.replace("0b5e", "ffff"), host.sysfs) is None
    with pytest.raises(InvalidMdevUuid):
        host.mdev("../../../etc")


# -- hostile or racing sysfs ----------------------------------------------------


def _hostile(host: Host) -> str:
    """What reading every parent and mdev does: "ok", or the error's class and path."""
    try:
        host.inventory()
    except SysfsError as err:
        return f"SysfsError {err.path}"
    return "ok"


def test_a_name_that_is_not_a_uuid_on_the_mdev_bus(build_host: BuildHost) -> None:
    host = build_host(HOST)
    os.symlink("../../../devices/virtual/mtty/mtty", host.sysfs / "bus/mdev/devices/not-a-uuid")
    assert _hostile(host) == f"SysfsError {host.sysfs}/bus/mdev/devices"
    with pytest.raises(SysfsError, match="holds 'not-a-uuid'"):
        host.mdevs()


def test_an_undecodable_name_on_the_mdev_bus_is_shown_escaped(build_host: BuildHost) -> None:
    host = build_host(HOST)
    os.symlink(b".", os.fsencode(host.sysfs / "bus/mdev/devices") + b"/\xff\x1b[2J")
    with pytest.raises(SysfsError) as caught:
        host.mdevs()
    assert "\x1b" not in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [b"lots\n", b"-1\n", b"\n", b"12345678901\n", b"\xff\n", b"\xd9\xa3\n", b"1 2\n"],
    ids=["word", "negative", "empty", "too-long", "not-utf8", "arabic-digit", "two"],
)
def test_a_count_that_is_not_a_number(build_host: BuildHost, data: bytes) -> None:
    host = build_host(HOST)
    path = host.sysfs / "devices/virtual/mtty/mtty/mdev_supported_types/mtty-1/available_instances"
    path.write_bytes(data)
    assert _hostile(host) == f"SysfsError {path}"


@pytest.mark.parametrize("name", ["name", "description", "device_api", "available_instances"])
def test_a_huge_attribute(build_host: BuildHost, name: str) -> None:
    host = build_host(HOST)
    path = host.sysfs / "devices/virtual/mdpy/mdpy/mdev_supported_types/mdpy-vga" / name
    path.write_bytes(b"x" * 100_000)
    assert _hostile(host) == f"SysfsError {path}"


def test_control_characters_in_a_name(build_host: BuildHost) -> None:
    host = build_host(HOST)
    path = host.sysfs / "devices/virtual/mdpy/mdpy/mdev_supported_types/mdpy-vga/name"
    path.write_bytes(b"\x1b[2Jgone\n")
    assert _hostile(host) == f"SysfsError {path}"


def test_a_type_folder_with_a_strange_name(build_host: BuildHost) -> None:
    host = build_host(HOST)
    base = host.sysfs / "devices/virtual/mtty/mtty/mdev_supported_types"
    (base / "a b\x1b").mkdir()
    assert _hostile(host) == f"SysfsError {base}"


def test_a_link_that_is_a_file(build_host: BuildHost) -> None:
    host = build_host(HOST)
    path = mdev_dir(host.sysfs, U1) / "mdev_type"
    path.unlink()
    path.write_text("mtty-2\n")
    assert _hostile(host) == f"SysfsError {path}"


def test_a_group_link_to_a_strange_place(build_host: BuildHost) -> None:
    host = build_host(HOST)
    path = mdev_dir(host.sysfs, U1) / "iommu_group"
    path.unlink()
    os.symlink("../../../../kernel/iommu_groups/x1", path)
    assert _hostile(host) == f"SysfsError {path}"


def test_an_mdev_that_vanished_is_skipped(build_host: BuildHost) -> None:
    # Removed between the listing of bus/mdev/devices and its read: the link dangles.
    host = build_host(HOST)
    folder = mdev_dir(host.sysfs, U1)
    for link in (folder / "mdev_type" / "devices" / U1, folder / "driver" / U1):
        link.unlink()
    shutil.rmtree(folder)
    assert [m.uuid for m in host.mdevs()] == [U2]
    assert read_mdev(U1, host.sysfs) is None
    with pytest.raises(MdevNotFound):
        host.mdev(U1)


def test_a_parent_that_vanished_is_skipped(build_host: BuildHost) -> None:
    host = build_host(Topology(mdev_parents=[MTTY, MDPY]))
    shutil.rmtree(host.sysfs / "devices/virtual/mdpy")
    assert [p.name for p in host.mdev_parents()] == ["mtty"]


def test_a_parent_without_types_folder_is_skipped(build_host: BuildHost) -> None:
    host = build_host(Topology(mdev_parents=[MTTY, Parent("empty")]))
    assert [p.name for p in host.mdev_parents()] == ["mtty"]


def test_a_type_that_lacks_its_files(build_host: BuildHost) -> None:
    odd = ParentType("odd-1", files={"name": None, "device_api": None, "available_instances": None})
    host = build_host(Topology(mdev_parents=[Parent("odd", [odd])]))
    (t,) = host.mdev_parents()[0].types
    assert (t.name, t.description, t.device_api, t.available) == (None, None, None, None)


# -- UUIDs ----------------------------------------------------------------------


def test_parse_uuid() -> None:
    assert parse_uuid(U1.upper()) == U1
    assert is_uuid(U1)
    assert is_uuid(U1.upper())
    for bad in ("", U1[:-1], U1 + "0", U1.replace("-", "_"), "g" * 36, f" {U1[1:]}"):
        assert not is_uuid(bad)
        with pytest.raises(InvalidMdevUuid):
            parse_uuid(bad)


@given(st.text(max_size=80))
def test_parse_uuid_takes_any_text(text: str) -> None:
    if is_uuid(text):
        assert parse_uuid(text) == text.lower()
        return
    with pytest.raises(InvalidMdevUuid) as caught:
        parse_uuid(text)
    assert isinstance(caught.value, KvmvfioError)
    assert str(caught.value).isprintable()


@given(st.binary(max_size=64))
def test_any_count_file_is_a_count_or_a_sysfs_error(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    path = tmp_path_factory.mktemp("count") / "available_instances"
    path.write_bytes(data)
    # What the kernel's "%u\n" can look like, give or take spaces a parser may forgive.
    number = re.fullmatch(rb" *([0-9]{1,10}) *\n?", data)
    if number is not None:
        assert _count(str(path)) == int(number[1])
        return
    with pytest.raises(SysfsError) as caught:
        _count(str(path))
    assert caught.value.path == str(path)
