"""``kvmvfio inventory`` and ``kvmvfio group``: output, JSON schema, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Foreign, Iommu, Mediated, Parent, ParentType, Topology

from kvmvfio.cli import run
from kvmvfio.host import Host

BuildHost = Callable[[Topology], Host]
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "cli-json.md"

TOPOLOGY = Topology(
    devices=[
        Dev(
            "0000:00:1c.0",
            bridge=True,
            device=0xA110,
            subsystem_device=0x7270,
            driver="pcieport",
            group=1,
            reset_methods=(),
            children=[Dev("0000:01:00.0", driver="e1000e", group=1)],
        ),
        Dev("0000:00:02.0", cls=0x030000, boot_vga=True, group=2, driver_override="vfio-pci"),
        Dev("0000:00:03.0", vendor=0x1234, device=0x11E8, cls=0x00FF00, driver="vfio-pci", group=3),
        Dev("0000:3b:00.0", driver="i40e", group=4, vfs=2, totalvfs=8, vf_group=5, numa_node=1,
            vf_driver="vfio-pci", vf_offset=0x10),
        Dev("0000:00:1f.0", driver="lpc_ich"),  # in no group
    ],
    foreign=[Foreign("soc:dma@0", group=3)],
)  # fmt: skip


def _roots(host: Host) -> list[str]:
    return [
        "--sysfs-root",
        str(host.sysfs),
        "--dev-root",
        str(host.devfs),
        "--proc-root",
        str(host.procfs),
    ]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- inventory ----------------------------------------------------------------


def test_inventory_table(build_host: BuildHost, capsys: pytest.CaptureFixture[str]) -> None:
    host = build_host(TOPOLOGY)
    code, out, err = _run(["inventory", *_roots(host)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ADDRESS", "IDS", "CLASS", "DRIVER", "GROUP", "VIABLE", "CDEV", "NOTES",
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:8]}
    assert list(rows) == [
        "0000:00:02.0", "0000:00:03.0", "0000:00:1c.0", "0000:00:1f.0",
        "0000:01:00.0", "0000:3b:00.0", "0000:3b:02.0",
    ]  # fmt: skip
    assert re.fullmatch(
        r"0000:00:03\.0 +1234:11e8 +unclassified device +vfio-pci +3 +yes +vfio0",
        rows["0000:00:03.0"],
    )
    assert re.fullmatch(
        r"0000:01:00\.0 +8086:10d3 +Ethernet controller +e1000e +1 +no +-", rows["0000:01:00.0"]
    )
    assert re.fullmatch(
        r"0000:00:1f\.0 .* lpc_ich +- +- +- +no group: outside the IOMMU", rows["0000:00:1f.0"]
    )
    assert rows["0000:00:02.0"].endswith("override=vfio-pci, boot VGA")
    assert rows["0000:3b:00.0"].endswith("PF 2/8 VFs")
    assert rows["0000:3b:02.0"].endswith("VF 0 of 0000:3b:00.0 (i40e)")
    assert lines[-2:] == [
        "IOMMU: Intel VT-d (dmar0). 1 function(s) in no IOMMU group; `kvmvfio group ADDR` "
        "says why.",
        "Host can assign devices via: group + container, group on iommufd, device cdev.",
    ]


def test_inventory_json_follows_the_documented_schema(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(TOPOLOGY)
    code, out, _ = _run(["inventory", "--json", *_roots(host)], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == 1
    assert set(doc) == {"schema", "host", "devices", "groups", "mdev_parents", "mdevs"}
    assert (doc["mdev_parents"], doc["mdevs"]) == ([], [])
    documented = _documented_fields()
    assert set(doc["host"]) == documented["Host object"]
    for dev in doc["devices"]:
        assert set(dev) == documented["Device object"]
    for group in doc["groups"]:
        assert set(group) == documented["Group object"]
    assert [d["address"] for d in doc["devices"]][:3] == [
        "0000:00:02.0",
        "0000:00:03.0",
        "0000:00:1c.0",
    ]
    assert [g["number"] for g in doc["groups"]] == [1, 2, 3, 4, 5, 6]
    pf = next(d for d in doc["devices"] if d["address"] == "0000:3b:00.0")
    assert pf["virtfns"] == ["0000:3b:02.0", "0000:3b:02.1"]
    assert (pf["sriov_totalvfs"], pf["sriov_numvfs"], pf["numa_node"]) == (8, 2, 1)
    assert (pf["vendor"], pf["class"], pf["driver"]) == ("0x8086", "0x020000", "i40e")
    group3 = doc["groups"][2]
    assert group3["members"] == ["0000:00:03.0"]
    assert group3["other_members"] == [{"name": "soc:dma@0", "driver": None, "mdev": False}]
    assert group3["dev_node"] == str(host.devfs / "vfio" / "3")
    assert doc["host"]["missing"] == []
    assert doc["host"]["iommu_units"] == [{"name": "dmar0", "kind": "intel-vt-d", "function": None}]
    assert (doc["host"]["iommu_groups_supported"], doc["host"]["cpu_vendor"]) == (
        True,
        "GenuineIntel",
    )
    assert (doc["host"]["iommu_off_by"], doc["host"]["iommu_firmware_tables"]) == (None, None)
    lpc = next(d for d in doc["devices"] if d["address"] == "0000:00:1f.0")
    assert set(lpc["no_group"]) == documented["No-group object"]
    assert lpc["no_group"]["cause"] == "not-covered"
    assert lpc["no_group"]["iommu"] == "intel-vt-d"
    assert lpc["no_group"]["units"] == ["dmar0"]
    assert [d["address"] for d in doc["devices"] if d["no_group"]] == ["0000:00:1f.0"]


def _documented_fields() -> dict[str, set[str]]:
    """The field names in each ``### ... object`` table of docs/cli-json.md."""
    out: dict[str, set[str]] = {}
    section = None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            section = line[4:].strip()
            out[section] = set()
        elif section and (m := re.match(r"\| `([a-z_]+)` \|", line)):
            out[section].add(m[1])
    return out


def test_the_documented_example_is_what_the_command_prints(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(Topology(devices=[TOPOLOGY.devices[0]]))
    code, out, _ = _run(["group", "1", "--json", *_roots(host)], capsys)
    assert code == 1
    printed = json.loads(out.replace(str(host.devfs), "/dev"))
    example = DOC.read_text().split("## Example", 1)[1].split("```json\n", 1)[1].split("```")[0]
    assert printed == json.loads(example)


# -- group --------------------------------------------------------------------


def test_group_viable_by_number_exits_0(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(TOPOLOGY)
    code, out, err = _run(["group", "5", *_roots(host)], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"IOMMU group 5 ({host.devfs}/vfio/5): viable"
    assert re.search(
        r"^0000:3b:02\.0 +8086:10d3 +Ethernet controller +vfio-pci +"
        r"ok \(VF 0 of 0000:3b:00\.0 \(i40e\)\)$",
        out,
        re.M,
    )


def test_group_not_viable_by_address_exits_1_with_reasons(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(TOPOLOGY)
    code, out, err = _run(["group", "01:00.0", *_roots(host)], capsys)
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == f"IOMMU group 1 ({host.devfs}/vfio/1): NOT viable"
    assert re.fullmatch(r"0000:00:1c\.0 .* pcieport +ok", lines[2])
    assert re.fullmatch(
        r"0000:01:00\.0 .* e1000e +blocks: bound to e1000e, a host driver that does DMA; "
        r"rebind it to vfio-pci",
        lines[3],
    )
    assert lines[4].startswith("1 member(s) keep the group from VFIO")


def test_group_json_exit_status_follows_viability(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(TOPOLOGY)
    code, out, _ = _run(["group", "0000:00:1c.0", "--json", *_roots(host)], capsys)
    doc = json.loads(out)
    assert code == 1
    assert doc["group"]["viable"] is False
    assert doc["group"]["blockers"][0]["driver"] == "e1000e"
    assert [d["address"] for d in doc["devices"]] == ["0000:00:1c.0", "0000:01:00.0"]


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [
        ("../x", 2, "'../x' is not a PCI address (contains a path separator or NUL)"),
        ("abc", 2, "'abc' is neither an IOMMU group number nor a PCI address"),
        ("-1", 2, "'-1' is neither an IOMMU group number nor a PCI address"),
        ("0000:00:20.0", 2, "slot 0x20 is above 0x1f"),
        ("99", 1, "no IOMMU group 99 on this host"),
        ("0000:00:04.0", 1, "no PCI device 0000:00:04.0 on this host"),
        (
            "0000:00:1f.0",
            1,
            "0000:00:1f.0 is in no IOMMU group: Intel VT-d (dmar0) does not translate it",
        ),
    ],
)
def test_group_bad_arguments(
    build_host: BuildHost,
    capsys: pytest.CaptureFixture[str],
    target: str,
    code: int,
    message: str,
) -> None:
    host = build_host(TOPOLOGY)
    got, out, err = _run(["group", target, *_roots(host)], capsys)
    assert got == code
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("kvmvfio: ")
    assert message in err


def test_a_root_that_is_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["inventory", "--sysfs-root", str(tmp_path / "nope")], capsys)
    assert (code, out) == (2, "")
    assert err.endswith(
        f"kvmvfio: error: argument --sysfs-root: {tmp_path / 'nope'}: No such file or directory\n"
    )
    (tmp_path / "file").write_text("")
    code, out, err = _run(["inventory", "--dev-root", str(tmp_path / "file")], capsys)
    assert err.endswith(f"argument --dev-root: {tmp_path / 'file'}: not a directory\n")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("inventory", "--sysfs-root"),
        ("group", "--proc-root"),
        ("status", "--root"),
        ("recover", "--sysfs-root"),
        ("check", "--dev-root"),
        ("prepare", "--root"),
    ],
)
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("a" * 5000, "5000 bytes, longer than a path can be (4095)"),
        ("a/" * 3000, "longer than a path can be"),
        ("/tmp/" + "b" * 300, "a name in it has 300 bytes, more than 255"),
        ("", "an empty path"),
    ],
    ids=["long", "deep", "long-name", "empty"],
)
def test_impossible_paths_are_refused_before_any_read(
    command: str, flag: str, value: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["3"] if command in ("group", "check") else ["00:03.0", "--owner", "x"]
    extra = extra if command in ("group", "check", "prepare") else []
    code, out, err = _run([command, *extra, flag, value], capsys)
    assert (code, out) == (2, "")
    assert words in err
    assert "Traceback" not in err
    assert len(err) < 600  # the offending value is shown shortened


def test_a_path_that_is_not_utf8_is_shown_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = os.fsdecode(bytes(tmp_path) + b"/\xff\x1b[2J")
    code, _, err = _run(["inventory", "--sysfs-root", odd], capsys)
    assert code == 2
    assert "\x1b" not in err
    assert "No such file or directory" in err


def test_a_broken_tree_is_one_line_not_a_traceback(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(TOPOLOGY)
    (host.sysfs / "bus/pci/devices/0000:00:03.0/numa_node").write_bytes(b"\xff\n")
    code, _, err = _run(["inventory", *_roots(host)], capsys)
    assert code == 1
    assert err.startswith("kvmvfio: unexpected contents in ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "where", ["bus/pci/devices", "kernel/iommu_groups", "kernel/iommu_groups/1/devices"]
)
def test_undecodable_names_in_sysfs_print_as_one_line(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    host = build_host(TOPOLOGY)
    os.symlink(b".", os.fsencode(host.sysfs / where) + b"/\xff\x1b[2J")
    code, out, err = _run(["inventory", *_roots(host)], capsys)
    assert (code, out) == (1, "")
    assert "'\\udcff\\x1b[2J'" in err  # escaped, not sent to the terminal
    assert err.count("\n") == 1


def test_missing_argument_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["group"]) == 2
    assert "the following arguments are required: ADDR|UUID|N" in capsys.readouterr().err


def test_help_states_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["group", "--help"]) == 0
    assert "0 viable, 1 not viable, not found or in no group, 2 malformed argument" in " ".join(
        capsys.readouterr().out.split()
    )


def test_empty_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    roots = ["--sysfs-root", "--dev-root", "--proc-root"]
    code, out, _ = _run(["inventory", *(a for r in roots for a in (r, str(tmp_path)))], capsys)
    assert code == 0
    assert out.startswith(
        "No PCI functions found.\n\nIOMMU: none in use.\nHost cannot assign devices to VMs. "
        "Missing: no IOMMU in use, because this kernel has no IOMMU support "
        "(no /sys/kernel/iommu_groups)"
    )


# -- functions in no IOMMU group ---------------------------------------------------

VIRTIO_IOMMU = Topology(
    devices=[
        Dev("0000:00:02.0", vendor=0x1AF4, device=0x1057, cls=0x00FF00, driver="virtio-pci"),
        Dev("0000:00:03.0", vendor=0x1234, device=0x11E8, cls=0x00FF00),
        Dev("0000:00:05.0", driver="e1000e", group=0),
    ],
    iommus=[Iommu.virtio_pci("0000:00:02.0")],
    acpi_tables=["VIOT"],
    cmdline="console=ttyS0 iommu.strict=1",
)


def test_inventory_says_why_a_function_has_no_group(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(VIRTIO_IOMMU)
    code, out, _ = _run(["inventory", *_roots(host)], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:4]}
    assert rows["0000:00:02.0"].endswith("no group: the IOMMU itself")
    assert rows["0000:00:03.0"].endswith("no group until a driver binds")
    assert out.splitlines()[-2] == (
        "IOMMU: virtio-iommu (0000:00:02.0). Kernel command line: iommu.strict=1. 2 function(s) in "
        "no IOMMU group; `kvmvfio group ADDR` says why."
    )
    code, out, _ = _run(["inventory", "--json", *_roots(host)], capsys)
    doc = json.loads(out)
    assert doc["host"]["iommu_units"] == [
        {"name": "0000:00:02.0", "kind": "virtio-iommu", "function": "0000:00:02.0"}
    ]
    assert doc["host"]["iommu_firmware_tables"] == ["VIOT"]
    assert doc["host"]["iommu_kernel_args"] == ["iommu.strict=1"]
    why = {d["address"]: d["no_group"] for d in doc["devices"]}
    assert why["0000:00:05.0"] is None
    assert (why["0000:00:02.0"]["cause"], why["0000:00:02.0"]["bind_gives_group"]) == (
        "is-iommu",
        False,
    )
    assert why["0000:00:03.0"] == {
        "cause": "not-probed",
        "iommu": "virtio-iommu",
        "units": ["0000:00:02.0"],
        "setting": None,
        "bind_gives_group": True,
        "reason": "it has no driver, and virtio-iommu (0000:00:02.0) takes a device only when a "
        "driver binds it: bind it to vfio-pci (driver_override, then drivers_probe) and it "
        "gets its group",
    }


def test_group_of_a_function_in_no_group_says_why(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(VIRTIO_IOMMU)
    for flags in ([], ["--json"]):
        code, out, err = _run(["group", "0000:00:02.0", *flags, *_roots(host)], capsys)
        assert (code, out) == (1, "")
        assert err == (
            "kvmvfio: PCI device 0000:00:02.0 is in no IOMMU group: it is the IOMMU itself "
            "(virtio-iommu), which does not translate its own DMA: it cannot be given "
            "to a VM\n"
        )


def test_inventory_of_a_host_whose_iommu_is_off(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="e1000e")],
            iommu=False,
            acpi_tables=["DMAR"],
            cmdline="intel_iommu=on intel_iommu=off",
            cpu_vendor="AuthenticAMD",
        )
    )
    code, out, _ = _run(["inventory", *_roots(host)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert re.fullmatch(r"0000:00:03\.0 .* e1000e +- +- +-", lines[1])  # said once, below
    assert lines[-2] == ("IOMMU: none in use. Kernel command line: intel_iommu=on intel_iommu=off.")
    assert lines[-1].startswith(
        "Host cannot assign devices to VMs. Missing: no IOMMU in use, because the kernel "
        "command line turns Intel VT-d off (intel_iommu=off): remove intel_iommu=off and reboot;"
    )
    _, out, _ = _run(["inventory", "--json", *_roots(host)], capsys)
    doc = json.loads(out)
    assert doc["host"]["iommu_off_by"] == "intel_iommu=off"
    assert doc["devices"][0]["no_group"]["cause"] == "iommu-off"
    assert doc["devices"][0]["no_group"]["setting"] == "intel_iommu=off"


def test_a_proc_root_that_is_not_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["inventory", "--proc-root", str(tmp_path / "nope")], capsys)
    assert code == 2
    assert err.endswith(f"argument --proc-root: {tmp_path / 'nope'}: No such file or directory\n")


def test_python_m_kvmvfio_group_bad_address_exits_2_without_traceback() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "kvmvfio", "group", "../x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        "kvmvfio: '../x' is not a PCI address (contains a path separator or NUL); "
        "expected [DDDD:]BB:SS.F\n"
    )


# -- mediated devices ----------------------------------------------------------------

MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
MEDIATED = Topology(
    devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)],
    mdev_parents=[
        Parent(
            "mtty",
            [
                ParentType("mtty-1", "Single port serial", available=22),
                ParentType("mtty-2", "Dual port serial", available=11),
            ],
        ),
        Parent(
            "mdpy",
            [ParentType("mdpy-vga", "mdpy-vga", "virtual display,\n640x480", available=4)],
        ),
    ],
    mdevs=[Mediated(MDEV, "mtty", "mtty-2", driver="mtty", group=20)],
)


def test_inventory_shows_mdev_parents_their_types_and_mdevs(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(MEDIATED)
    code, out, err = _run(["inventory", *_roots(host)], capsys)
    assert (code, err) == (0, "")
    blocks = out.split("\n\n")
    assert blocks[1].splitlines() == [
        "MDEV PARENT  TYPE      NAME                API       AVAILABLE  DESCRIPTION",
        "mdpy         mdpy-vga  mdpy-vga            vfio-pci  4          virtual display,; 640x480",
        "mtty         mtty-1    Single port serial  vfio-pci  22         -",
        "mtty         mtty-2    Dual port serial    vfio-pci  11         -",
    ]
    assert blocks[2].splitlines() == [
        "MDEV                                  TYPE    PARENT  DRIVER  GROUP  VIABLE  CDEV",
        f"{MDEV}  mtty-2  mtty    mtty    20     yes     vfio1",
    ]
    assert blocks[3].startswith("IOMMU: Intel VT-d (dmar0).")


def test_a_host_without_mdevs_prints_nothing_new(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(TOPOLOGY)
    _, out, _ = _run(["inventory", *_roots(host)], capsys)
    assert "MDEV" not in out
    assert len(out.split("\n\n")) == 2  # the table, then the IOMMU and support lines


def test_inventory_json_lists_mdev_parents_and_mdevs(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(MEDIATED)
    code, out, _ = _run(["inventory", "--json", *_roots(host)], capsys)
    assert code == 0
    doc = json.loads(out)
    documented = _documented_fields()
    assert [p["name"] for p in doc["mdev_parents"]] == ["mdpy", "mtty"]
    for parent in doc["mdev_parents"]:
        assert set(parent) == documented["Mdev parent object"]
        for t in parent["types"]:
            assert set(t) == documented["Mdev type object"]
    mtty = doc["mdev_parents"][1]
    assert (mtty["path"], mtty["driver"]) == (
        str(host.sysfs / "devices" / "virtual" / "mtty" / "mtty"),
        None,
    )
    assert mtty["types"][1] == {
        "type": "mtty-2",
        "name": "Dual port serial",
        "description": None,
        "device_api": "vfio-pci",
        "available_instances": 11,
        "mdevs": [MDEV],
    }
    assert doc["mdev_parents"][0]["types"][0]["description"] == "virtual display,\n640x480"
    (m,) = doc["mdevs"]
    assert set(m) == documented["Mdev object"]
    assert m == {
        "uuid": MDEV,
        "type": "mtty-2",
        "parent": "mtty",
        "driver": "mtty",
        "iommu_group": 20,
        "dev_node": str(host.devfs / "vfio" / "20"),
        "vfio_cdev": "vfio1",
        "path": str(host.sysfs / "devices" / "virtual" / "mtty" / "mtty" / MDEV),
    }
    group = doc["groups"][-1]
    assert set(group) == documented["Group object"]
    assert (group["number"], group["viable"], group["noiommu"], group["emulated"]) == (
        20,
        True,
        False,
        True,
    )
    assert group["other_members"] == [{"name": MDEV, "driver": "mtty", "mdev": True}]


def test_group_of_an_mdev(build_host: BuildHost, capsys: pytest.CaptureFixture[str]) -> None:
    host = build_host(MEDIATED)
    code, out, err = _run(["group", "20", *_roots(host)], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"emulated IOMMU group 20 ({host.devfs}/vfio/20): viable",
        "MEMBER                                IDS  CLASS        DRIVER  STATUS",
        f"{MDEV}  -    mdev mtty-2  mtty    ok (on mtty, cdev vfio1)",
    ]
    code, out, _ = _run(["group", "20", "--json", *_roots(host)], capsys)
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"schema", "group", "devices", "mdevs"}
    assert (doc["devices"], doc["group"]["blockers"]) == ([], [])
    assert [m["uuid"] for m in doc["mdevs"]] == [MDEV]
    _, out, _ = _run(["group", "3", "--json", *_roots(host)], capsys)
    assert json.loads(out)["mdevs"] == []


def test_a_broken_mdev_tree_is_one_line(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(MEDIATED)
    count = host.sysfs / "devices/virtual/mtty/mtty/mdev_supported_types/mtty-1"
    (count / "available_instances").write_bytes(b"\x1b[2J lots\n")
    code, out, err = _run(["inventory", "--json", *_roots(host)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"kvmvfio: unexpected contents in {count}/available_instances")
    assert "\x1b" not in err
    assert err.count("\n") == 1
