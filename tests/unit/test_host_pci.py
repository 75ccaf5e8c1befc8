"""PciDevice: every field, read from fake trees laid out like the kernel's sysfs."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology, device_dir, unplug, write_attr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvmvfio.errors import DeviceNotFound, InvalidAddress, KernelError, SysfsError
from kvmvfio.host import Host, PciAddress, PciDevice, class_name, is_vfio_driver
from kvmvfio.host.pci import (
    parse_bool,
    parse_driver_override,
    parse_numa_node,
    parse_reset_methods,
    parse_uevent,
    parse_unsigned,
)

BuildHost = Callable[[Topology], Host]
A = PciAddress.parse


def test_every_field_of_a_function(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev(
                    "0000:00:02.0",
                    vendor=0x10DE,
                    device=0x2204,
                    cls=0x030000,
                    subsystem_vendor=0x1458,
                    subsystem_device=0x403B,
                    driver="vfio-pci",
                    driver_override="vfio-pci",
                    group=7,
                    numa_node=1,
                    reset_methods=("device_specific", "flr", "bus"),
                    boot_vga=False,
                )
            ]
        )
    )
    assert host.device("0000:00:02.0") == PciDevice(
        address=PciAddress(0, 0, 2, 0),
        vendor=0x10DE,
        device=0x2204,
        class_code=0x030000,
        subsystem_vendor=0x1458,
        subsystem_device=0x403B,
        driver="vfio-pci",
        driver_override="vfio-pci",
        iommu_group=7,
        numa_node=1,
        reset_methods=("device_specific", "flr", "bus"),
        physfn=None,
        virtfns=(),
        sriov_totalvfs=None,
        sriov_numvfs=None,
        vfio_cdev="vfio0",
        boot_vga=False,
    )


def test_what_absent_files_mean(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:1f.3", reset_methods=(), numa_node=-1)]))
    dev = host.device(PciAddress(0, 0, 0x1F, 3))
    assert dev.driver is None  # no driver link
    assert dev.driver_override is None  # "(null)"
    assert dev.iommu_group is None  # no iommu_group link
    assert dev.numa_node is None  # -1
    assert dev.reset_methods == ()  # no reset_method file
    assert dev.vfio_cdev is None
    assert dev.boot_vga is None  # only VGA functions have boot_vga
    assert dev.sriov_totalvfs is None
    assert dev.virtfns == ()
    assert dev.physfn is None


def test_devices_are_sorted_and_bridges_nest_their_children(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev(
                    "0000:00:1c.0",
                    bridge=True,
                    driver="pcieport",
                    group=1,
                    children=[
                        Dev("0000:03:00.0", group=1),
                        Dev("0000:03:00.1", group=1),
                    ],
                ),
                Dev("0000:00:03.0", group=2),
                Dev("10000:e1:00.0", group=3),
            ]
        )
    )
    assert [str(d.address) for d in host.devices()] == [
        "0000:00:03.0",
        "0000:00:1c.0",
        "0000:03:00.0",
        "0000:03:00.1",
        "10000:e1:00.0",
    ]
    child = device_dir(host.sysfs, "0000:03:00.1")
    assert child.parent == device_dir(host.sysfs, "0000:00:1c.0")
    assert child.parent.parent.name == "pci0000:00"
    assert device_dir(host.sysfs, "10000:e1:00.0").parent.name == "pci10000:e1"


def test_sriov_physical_and_virtual_functions(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev(
                    "0000:3b:00.0",
                    vendor=0x8086,
                    device=0x1572,
                    driver="i40e",
                    group=40,
                    vfs=12,
                    totalvfs=64,
                    vf_offset=0x10,
                    vf_device=0x154C,
                    vf_driver="vfio-pci",
                    vf_group=41,
                )
            ]
        )
    )
    pf = host.device("0000:3b:00.0")
    assert pf.is_physfn
    assert not pf.is_virtfn
    assert (pf.sriov_totalvfs, pf.sriov_numvfs) == (64, 12)
    # virtfn10 and virtfn11 come after virtfn9: numeric order, not textual.
    assert [str(a) for a in pf.virtfns] == [
        "0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2", "0000:3b:02.3",
        "0000:3b:02.4", "0000:3b:02.5", "0000:3b:02.6", "0000:3b:02.7",
        "0000:3b:03.0", "0000:3b:03.1", "0000:3b:03.2", "0000:3b:03.3",
    ]  # fmt: skip
    vf = host.device(pf.virtfns[11])
    assert vf.is_virtfn
    assert not vf.is_physfn
    assert vf.physfn == pf.address
    assert (vf.device, vf.driver, vf.iommu_group) == (0x154C, "vfio-pci", 52)
    assert vf.sriov_totalvfs is None
    # VFs sit next to their PF in the device tree.
    assert (
        device_dir(host.sysfs, str(vf.address)).parent
        == device_dir(host.sysfs, "0000:3b:00.0").parent
    )


def test_sriov_capable_with_no_vfs_enabled(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:05:00.0", totalvfs=8)]))
    pf = host.device("0000:05:00.0")
    assert (pf.sriov_totalvfs, pf.sriov_numvfs, pf.virtfns) == (8, 0, ())


def test_vfs_being_changed_are_listed_from_the_links_present(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:05:00.0", vfs=3, vf_offset=1)]))
    # sriov_numvfs already says 3 but virtfn1 is not there (yet, or any more).
    os.unlink(device_dir(host.sysfs, "0000:05:00.0") / "virtfn1")
    assert host.device("0000:05:00.0").virtfns == (A("0000:05:00.1"), A("0000:05:00.3"))


def test_a_brief_read_leaves_out_only_what_vfio_never_asks(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev("0000:00:02.0", cls=0x030000, boot_vga=True, driver="vfio-pci", group=2),
                Dev(
                    "0000:05:00.0",
                    vfs=2,
                    vf_offset=1,
                    driver="vfio-pci",
                    group=5,
                    vf_group=6,
                    vf_driver="vfio-pci",
                ),
            ]
        )
    )
    unread = {
        "driver_override": None,
        "numa_node": None,
        "sriov_numvfs": None,
        "virtfns": (),
        "boot_vga": None,
        "brief": True,
    }
    for addr in ("0000:00:02.0", "0000:05:00.0", "0000:05:00.1"):
        full = host.device(addr)
        group = host.group_of(addr, brief=True)
        (brief,) = (m for m in group.members if m.address == full.address)
        assert brief == replace(full, **unread)
        assert brief.vfio_cdev is not None
        assert brief.vfio_cdev == full.vfio_cdev
    assert host.group_of("0000:05:00.0", brief=True).members[0].is_physfn  # sriov_totalvfs


@pytest.mark.parametrize("cdev", [True, False])
def test_vfio_cdev_only_with_a_device_number(build_host: BuildHost, cdev: bool) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="e1000e"), Dev("0000:00:04.0", driver="vfio-pci")],
            cdev=cdev,
        )
    )
    # vfio-dev/vfio0 exists either way; only a kernel with cdevs gives it a dev file.
    assert (device_dir(host.sysfs, "0000:00:04.0") / "vfio-dev" / "vfio0").is_dir()
    expected = "vfio0" if cdev else None
    assert host.device("0000:00:04.0").vfio_cdev == expected  # per-device lookup
    by_addr = {str(d.address): d for d in host.devices()}  # one listing of /sys/class/vfio-dev
    assert by_addr["0000:00:04.0"].vfio_cdev == expected
    assert by_addr["0000:00:03.0"].vfio_cdev is None


def test_variant_driver_has_a_cdev_too(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:04.0", driver="mlx5_vfio_pci")]))
    assert host.device("0000:00:04.0").vfio_cdev == "vfio0"
    assert host.device("0000:00:04.0").vfio_bound


@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("vfio-pci", True),
        ("mlx5_vfio_pci", True),
        ("nvgrace_gpu_vfio_pci", True),
        ("virtio_vfio_pci", True),
        ("pci-stub", False),
        ("vfio", False),
        ("vfio-pci-core", False),
        (None, False),
    ],
)
def test_is_vfio_driver(driver: str | None, expected: bool) -> None:
    assert is_vfio_driver(driver) is expected


@pytest.mark.parametrize(
    ("cls", "bridge", "name"),
    [
        (0x060400, True, "PCI bridge"),
        (0x060401, True, "PCI bridge"),
        (0x060900, True, "semi-transparent PCI bridge"),
        (0x060700, True, "CardBus bridge"),
        (0x060000, False, "host bridge"),
        (0x060100, False, "ISA bridge"),
        (0x020000, False, "Ethernet controller"),
        (0x010802, False, "NVMe controller"),
        (0x030200, False, "3D controller"),
        (0x0C0330, False, "USB controller"),
        (0x028000, False, "network controller"),
        (0x0B4000, False, "processor device"),
        (0x990000, False, "class 0x9900"),
    ],
)
def test_bridges_and_class_names(build_host: BuildHost, cls: int, bridge: bool, name: str) -> None:
    dev = build_host(Topology(devices=[Dev("0000:00:01.0", cls=cls)])).device("0000:00:01.0")
    assert dev.class_code == cls
    assert dev.is_bridge is bridge
    assert dev.class_name == name == class_name(cls)


def test_boot_vga_is_read_on_vga_functions(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev("0000:00:02.0", cls=0x030000, boot_vga=True),
                Dev("0000:01:00.0", cls=0x030000, boot_vga=False),
                # A file where the kernel never puts one is not read.
                Dev("0000:02:00.0", cls=0x020000, files={"boot_vga": b"1\n"}),
            ]
        )
    )
    assert [d.boot_vga for d in host.devices()] == [True, False, None]


@pytest.mark.parametrize("driver", ["intel ips", "CAFÉ NAND", "cx88-mpeg driver manager"])
def test_driver_names_are_not_just_identifiers(build_host: BuildHost, driver: str) -> None:
    # Real PCI driver names from Linux 6.12.
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver=driver, group=3)]))
    assert host.device("0000:00:03.0").driver == driver
    assert host.group(3).blockers[0].driver == driver


def test_uevent_with_other_keys_and_no_driver(build_host: BuildHost) -> None:
    uevent = (
        b"OF_NAME=pcie\nOF_FULLNAME=/soc/pcie@0\nPCI_CLASS=108020\nPCI_ID=144D:A808\n"
        b"PCI_SUBSYS_ID=144D:A801\nPCI_SLOT_NAME=0001:01:00.0\nMODALIAS=pci:v0000144D\n"
    )
    host = build_host(Topology(devices=[Dev("0001:01:00.0", files={"uevent": uevent})]))
    dev = host.device("0001:01:00.0")
    assert (dev.vendor, dev.device, dev.class_code) == (0x144D, 0xA808, 0x108020)
    assert (dev.subsystem_vendor, dev.subsystem_device) == (0x144D, 0xA801)
    assert dev.driver is None


# -- not found, gone, broken ----------------------------------------------


def test_unknown_and_malformed_addresses(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0")]))
    with pytest.raises(DeviceNotFound, match=r"no PCI device 0000:00:04\.0"):
        host.device("00:04.0")
    with pytest.raises(InvalidAddress):
        host.device("../../../etc")


def test_a_function_unplugged_during_a_scan_is_skipped(build_host: BuildHost) -> None:
    host = build_host(
        Topology(devices=[Dev("0000:00:03.0", group=3), Dev("0000:00:04.0", group=4)])
    )
    unplug(host.sysfs, "0000:00:03.0")  # its bus and group links still point at it
    assert [str(d.address) for d in host.devices()] == ["0000:00:04.0"]
    assert [g.number for g in host.groups()] == [3, 4]
    assert host.group(3).members == ()
    with pytest.raises(DeviceNotFound):
        host.device("0000:00:03.0")


def test_no_pci_bus_at_all(tmp_path: Path) -> None:
    host = Host(tmp_path, tmp_path)
    assert host.devices() == []
    assert host.groups() == []


def test_a_bus_entry_that_is_not_an_address(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0")]))
    os.symlink("0000:00:03.0", host.sysfs / "bus" / "pci" / "devices" / "evil")
    with pytest.raises(SysfsError, match="evil"):
        host.devices()


@pytest.mark.parametrize(
    ("name", "data", "detail"),
    [
        ("uevent", b"PCI_CLASS=20000\n", "no PCI_ID"),
        ("uevent", b"garbage", "not KEY=value"),
        ("uevent", b"PCI_CLASS=20000\nPCI_ID=8086:10D3\nPCI_ID=8086:10D3\n", "twice"),
        ("uevent", b"PCI_CLASS=2000000\nPCI_ID=8086:10D3\n", "24-bit"),
        ("uevent", b"PCI_CLASS=20000\nPCI_ID=8086:10D3\nPCI_SLOT_NAME=0000:00:04.0\n", "is not"),
        ("uevent", b"DRIVER=a/b\nPCI_CLASS=20000\nPCI_ID=8086:10D3\n", "driver name"),
        ("uevent", b"DRIVER=\x1b[2J\nPCI_CLASS=20000\nPCI_ID=8086:10D3\n", "KEY=value"),
        ("uevent", b"DRIVER=e\xc2\x9b1\nPCI_CLASS=20000\nPCI_ID=8086:10D3\n", "KEY=value"),
        ("numa_node", b"zero\n", "not a number"),
        ("numa_node", b"-2\n", "negative"),
        ("driver_override", b"vfio-pci\x1b[2J\n", "control characters"),
        ("driver_override", b"vfio\xc2\x85pci\n", "control characters"),  # U+0085, NEL
        ("reset_method", b"flr  bus\n", "reset method name"),
        ("reset_method", b"flr flr\n", "twice"),
        ("reset_method", b"\xff\n", "not UTF-8"),
        ("reset_method", b"FLR\n", "reset method name"),
        ("sriov_numvfs", b"9\n", "above 8"),
        ("sriov_totalvfs", b"-1\n", "unsigned"),
        ("uevent", b"x" * 5000, "more than a page"),
    ],
)
def test_contents_the_kernel_never_writes(
    build_host: BuildHost, name: str, data: bytes, detail: str
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", totalvfs=8)]))
    write_attr(host.sysfs, "0000:00:03.0", name, data)
    with pytest.raises(SysfsError, match=detail) as info:
        host.device("0000:00:03.0")
    assert info.value.path.endswith(f"0000:00:03.0/{name}")


@pytest.mark.parametrize(
    ("link", "target", "detail"),
    [
        ("iommu_group", "../../../kernel/iommu_groups/x", "not an IOMMU group number"),
        ("iommu_group", "../../../kernel/elsewhere/3", "not into a iommu_groups/"),
        ("physfn", "../not-an-address", "symlink to"),
        ("physfn", "/", "symlink to"),
    ],
)
def test_links_the_kernel_never_makes(
    build_host: BuildHost, link: str, target: str, detail: str
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0")]))
    os.symlink(target, device_dir(host.sysfs, "0000:00:03.0") / link)
    with pytest.raises(SysfsError, match=detail):
        host.device("0000:00:03.0")


def test_a_read_failure_is_a_kernel_error_with_errno(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", files={"numa_node": None})]))
    (device_dir(host.sysfs, "0000:00:03.0") / "numa_node").mkdir()
    with pytest.raises(KernelError) as info:
        host.device("0000:00:03.0")
    assert info.value.errno == errno.EISDIR
    assert info.value.op == "read"
    assert info.value.filename == str(host.sysfs / "bus/pci/devices/0000:00:03.0/numa_node")


def test_a_function_without_uevent_is_a_broken_tree(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", files={"uevent": None})]))
    with pytest.raises(SysfsError, match="missing"):
        host.device("0000:00:03.0")


# -- the parsers, one by one ----------------------------------------------


@pytest.mark.parametrize(
    ("parse", "raw", "value"),
    [
        (parse_numa_node, b"-1\n", None),
        (parse_numa_node, b"3\n", 3),
        (parse_unsigned, b"64\n", 64),
        (parse_bool, b"1\n", True),
        (parse_bool, b"0\n", False),
        (parse_driver_override, b"(null)\n", None),
        (parse_driver_override, b"vfio-pci\n", "vfio-pci"),
        (parse_driver_override, b"intel ips\n", "intel ips"),
        (parse_reset_methods, b"flr bus\n", ("flr", "bus")),
        (parse_reset_methods, b"\n", ()),
    ],
)
def test_parsers_read_what_the_kernel_writes(
    parse: Callable[[bytes, str], object], raw: bytes, value: object
) -> None:
    assert parse(raw, "/sys/x") == value


PARSERS = [
    parse_numa_node,
    parse_unsigned,
    parse_bool,
    parse_driver_override,
    parse_reset_methods,
    parse_uevent,
]


@given(st.sampled_from(PARSERS), st.binary(max_size=300))
@example(parse_uevent, b"PCI_CLASS=\nPCI_ID=:\n")
@example(parse_numa_node, "\u0663".encode())  # ARABIC-INDIC DIGIT THREE: int() takes it
def test_parsers_give_a_value_or_sysfs_error(
    parse: Callable[[bytes, str], object], raw: bytes
) -> None:
    out = _outcome(lambda: parse(raw, "/sys/x"))
    if isinstance(out, SysfsError):
        assert out.path == "/sys/x"
        assert out.detail


def _outcome(fn: Callable[[], object]) -> object:
    """What ``fn`` returns, or the SysfsError it raises (anything else propagates)."""
    try:
        return fn()
    except SysfsError as err:
        return err


UEVENT_KEYS = ["DRIVER", "PCI_CLASS", "PCI_ID", "PCI_SUBSYS_ID", "PCI_SLOT_NAME", "MODALIAS"]


@given(
    st.lists(
        st.tuples(
            st.sampled_from([*UEVENT_KEYS, "OF_NAME", "lower", "A B", ""]),
            st.one_of(
                st.sampled_from(["20000", "8086:10D3", "vfio-pci", "0000:00:03.0", ""]),
                st.text(max_size=12),
            ),
        ),
        max_size=8,
    )
)
def test_structured_uevents_give_a_value_or_sysfs_error(lines: list[tuple[str, str]]) -> None:
    raw = "".join(f"{k}={v}\n" for k, v in lines).encode("utf-8")
    try:
        ev = parse_uevent(raw, "p")
    except SysfsError:
        return
    env = dict(lines)
    assert ev.vendor == int(env["PCI_ID"][:4], 16)
    assert ev.class_code == int(env["PCI_CLASS"], 16)
    assert ev.driver == env.get("DRIVER")


@given(
    vendor=st.integers(0, 0xFFFF),
    device=st.integers(0, 0xFFFF),
    cls=st.integers(0, 0xFFFFFF),
    driver=st.one_of(st.none(), st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True)),
)
def test_uevent_fast_and_general_paths_agree(
    vendor: int, device: int, cls: int, driver: str | None
) -> None:
    text = (
        (f"DRIVER={driver}\n" if driver else "")
        + f"PCI_CLASS={cls:04X}\nPCI_ID={vendor:04X}:{device:04X}\n"
        + f"PCI_SUBSYS_ID={vendor:04X}:0001\nPCI_SLOT_NAME=0000:00:03.0\nMODALIAS=pci:v\n"
    )
    fast = parse_uevent(text.encode(), "p")
    general = parse_uevent(b"OF_NAME=x\n" + text.encode(), "p")  # a layout the fast path skips
    assert fast == general
    assert (fast.vendor, fast.device, fast.class_code, fast.driver) == (vendor, device, cls, driver)
    assert (fast.subsystem_vendor, fast.subsystem_device) == (vendor, 1)


@given(st.integers(-1, 2**31 - 1))
def test_numa_node_round_trip(node: int) -> None:
    assert parse_numa_node(b"%d\n" % node, "p") == (None if node == -1 else node)


@given(st.lists(st.sampled_from(["flr", "bus", "pm", "acpi", "af_flr"]), unique=True))
def test_reset_methods_round_trip(methods: list[str]) -> None:
    raw = (" ".join(methods) + "\n").encode() if methods else b""
    assert parse_reset_methods(raw, "p") == tuple(methods)


# -- arbitrary bytes in a real-looking tree ---------------------------------


@pytest.fixture(scope="module")
def fuzz_host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    """One tree for all examples: a VGA PF with VFs (so every file is read)."""
    sysfs, devfs = Topology(
        devices=[
            Dev("0000:00:02.0", cls=0x030000, boot_vga=True, driver="vfio-pci", group=2, vfs=2)
        ]
    ).build(tmp_path_factory.mktemp("fuzz"))
    return Host(sysfs, devfs)


FILES = [
    "uevent",
    "numa_node",
    "driver_override",
    "reset_method",
    "sriov_totalvfs",
    "sriov_numvfs",
    "boot_vga",
]  # vendor, device and class are not read: uevent has them


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(name=st.sampled_from(FILES), data=st.binary(max_size=200))
@example(name="numa_node", data=b"")
@example(name="driver_override", data=b"\n")
@example(name="sriov_totalvfs", data=b"0")
def test_any_bytes_in_a_file_give_a_device_or_sysfs_error(
    fuzz_host: Host, name: str, data: bytes
) -> None:
    path = device_dir(fuzz_host.sysfs, "0000:00:02.0") / name
    original = path.read_bytes()
    path.write_bytes(data)
    try:
        out = _outcome(lambda: fuzz_host.device("0000:00:02.0"))
    finally:
        path.write_bytes(original)
    if isinstance(out, SysfsError):
        # A total below the VFs already made is told at sriov_numvfs ("2 VFs, above 0").
        at_fault = {name, "sriov_numvfs"} if name == "sriov_totalvfs" else {name}
        assert Path(out.path).parent == fuzz_host.sysfs / "bus/pci/devices/0000:00:02.0"
        assert Path(out.path).name in at_fault
    else:
        assert isinstance(out, PciDevice)
        assert out.address == A("0000:00:02.0")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    link=st.sampled_from(["iommu_group", "physfn", "virtfn0"]),
    # Any text a symlink can hold: no NUL, no lone surrogates (not encodable).
    target=st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1, max_size=80
    ),
)
@example(link="iommu_group", target="../../../kernel/iommu_groups/-1")
@example(link="virtfn0", target="../0000:00:02.0/../x")
def test_any_link_target_gives_a_device_or_sysfs_error(
    fuzz_host: Host, link: str, target: str
) -> None:
    path = device_dir(fuzz_host.sysfs, "0000:00:02.0") / link
    original = os.readlink(path) if path.is_symlink() else None
    if original is not None:
        path.unlink()
    try:
        os.symlink(target, path)
    except OSError:  # a name too long for the file system
        if original is not None:
            os.symlink(original, path)
        return
    try:
        out = _outcome(lambda: fuzz_host.device("0000:00:02.0"))
    finally:
        path.unlink()
        if original is not None:
            os.symlink(original, path)
    if isinstance(out, SysfsError):
        assert out.path.endswith(f"0000:00:02.0/{link}")
    else:
        assert isinstance(out, PciDevice)
