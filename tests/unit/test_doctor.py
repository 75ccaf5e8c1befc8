"""``kvmvfio doctor``: the host checked against docs/requirements.md, on fake trees."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology

from kvmvfio.cli import run
from kvmvfio.host import Host
from kvmvfio.host.doctor import (
    Diagnosis,
    Kernel,
    ModuleState,
    Status,
    Tool,
    Tools,
    diagnose,
    find_tools,
    gather,
    parse_config,
    parse_version,
)

BuildHost = Callable[[Topology], Host]
REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "cli-json.md"
RELEASE = "6.12.0-test"
LOADED = ("vfio", "vfio_pci", "vfio_iommu_type1", "iommufd", "kvm", "kvm_intel")

#: A host with everything: QEMU and libvirt new enough, setfacl, the binding.
FULL_TOOLS = Tools(
    qemu=Tool("qemu-system-x86_64", "/usr/bin/qemu-system-x86_64", "QEMU emulator version 10.0.2"),
    libvirt=Tool("virtqemud", "/usr/sbin/virtqemud", "virtqemud (libvirt) 11.3.0"),
    setfacl=Tool("setfacl", "/usr/bin/setfacl"),
    libvirt_python="11.3.0",
    python=(3, 11, 7),
)


def kernel_files(
    host: Host,
    loaded: Iterable[str] = LOADED,
    *,
    builtin: Iterable[str] | None = None,
    loadable: Iterable[str] | None = None,
    config: str | None = None,
    release: str = RELEASE,
) -> Path:
    """Add what the fake tree lacks: osrelease, /sys/module, module lists, /boot/config.

    Return the folder that holds ``lib/modules`` and ``boot``.
    """
    root = host.sysfs.parent
    (host.procfs / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
    (host.procfs / "sys" / "kernel" / "osrelease").write_text(release + "\n")
    for name in loaded:
        (host.sysfs / "module" / name).mkdir(parents=True, exist_ok=True)
        (host.sysfs / "module" / name / "initstate").write_text("live\n")
    mods = root / "lib" / "modules" / release
    mods.mkdir(parents=True, exist_ok=True)
    (root / "boot").mkdir(exist_ok=True)
    if builtin is not None:
        (mods / "modules.builtin").write_text("".join(f"kernel/x/{n}.ko\n" for n in builtin))
    if loadable is not None:
        (mods / "modules.dep").write_text(
            "".join(f"kernel/drivers/x/{n}.ko.zst: kernel/y.ko.zst\n" for n in loadable)
        )
    if config is not None:
        (root / "boot" / f"config-{release}").write_text(config)
    return root


def run_diagnosis(host: Host, root: Path, tools: Tools = FULL_TOOLS) -> Diagnosis:
    return diagnose(gather(host, tools, root / "lib" / "modules", root / "boot"))


def status(d: Diagnosis) -> dict[str, str]:
    return {f.name: f.status.value for f in d.features}


def test_a_full_host_has_every_feature(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                Dev("0000:00:03.0", driver="vfio-pci", group=3),
                Dev("0000:3b:00.0", driver="i40e", group=4, vfs=1, totalvfs=8, vf_group=5),
            ]
        )
    )
    (host.sysfs / "bus" / "mdev").mkdir(parents=True)
    d = run_diagnosis(host, kernel_files(host))
    assert d.usable
    assert {n: s for n, s in status(d).items() if s != "ok"} == {"mdev": "unknown"}
    mdev = d.feature("mdev")
    assert [c.name for c in mdev.checks if c.ok is None] == ["mdev-parent"]
    assert d.kernel.release == RELEASE
    assert d.kernel.module("vfio-pci") is ModuleState.LOADED
    assert all(c.fix is None for f in d.features for c in f.checks if c.ok)


def test_without_iommufd_only_the_container_path_is_left(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)], dev_nodes={"vfio", "kvm"}
        )
    )
    root = kernel_files(
        host, ("vfio", "vfio_pci", "vfio_iommu_type1", "kvm"), builtin=(), loadable=("iommufd",)
    )
    d = run_diagnosis(host, root)
    assert d.usable  # the group + container path is complete
    found = status(d)
    assert found["group"] == "ok"
    assert found["group-iommufd"] == found["cdev"] == "missing"
    (missing,) = d.feature("cdev").missing
    assert missing.name == "iommufd"
    assert missing.fix is not None
    assert "modprobe iommufd" in missing.fix
    assert "/etc/modules-load.d/iommufd.conf" in missing.fix
    # QEMU 10 could take fds, but not without iommufd: the handoff goes by ACL grants.
    assert found["qemu-handoff"] == "ok"


def test_an_iommufd_kernel_without_it_built_says_which_option(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)], dev_nodes={"vfio", "kvm"}
        )
    )
    root = kernel_files(host, ("vfio", "vfio_pci"), builtin=(), loadable=())
    missing = run_diagnosis(host, root).feature("group-iommufd").missing
    assert [c.name for c in missing] == ["iommufd"]
    assert missing[0].fix is not None
    assert "CONFIG_IOMMUFD=y or =m" in missing[0].fix


def test_a_host_without_an_iommu_has_no_path(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="e1000e")],
            iommu=False,
            groups_dir=False,
            acpi_tables=("DMAR",),
        )
    )
    d = run_diagnosis(host, kernel_files(host))
    assert not d.usable
    for name in ("group", "group-iommufd", "cdev", "coherency"):
        assert d.feature(name).status is Status.MISSING
    (support,) = [c for c in d.feature("group").missing if c.name == "iommu-support"]
    assert support.fix is not None
    assert "CONFIG_IOMMU_SUPPORT" in support.fix
    assert "CONFIG_INTEL_IOMMU" in support.fix


def test_an_iommu_turned_off_names_the_argument(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci")],
            iommu=False,
            acpi_tables=("DMAR",),
            cmdline="root=/dev/sda1 intel_iommu=off",
        )
    )
    d = run_diagnosis(host, kernel_files(host))
    assert not d.usable
    assert d.kernel_args == ("intel_iommu=off",)
    (iommu,) = [c for c in d.feature("cdev").missing if c.name == "iommu"]
    assert iommu.fix is not None
    assert "remove intel_iommu=off and reboot" in iommu.fix


def test_no_vfio_pci_says_how_to_load_it_at_boot(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="e1000e", group=3)], drivers=()))
    root = kernel_files(host, ("vfio", "iommufd", "kvm"), builtin=(), loadable=("vfio-pci",))
    d = run_diagnosis(host, root)
    assert not d.usable
    (check,) = [c for c in d.feature("group").missing if c.name == "vfio-pci"]
    assert check.fix == (
        "modprobe vfio-pci; to load it at boot: echo vfio-pci > /etc/modules-load.d/vfio-pci.conf"
    )


def test_cdevs_before_a_device_is_bound(build_host: BuildHost) -> None:
    topo = Topology(devices=[Dev("0000:00:03.0", driver="e1000e", group=3)], cdev=False)
    host = build_host(topo)
    # No configuration: cannot be told, so "unknown", and the group paths carry the host.
    d = run_diagnosis(host, kernel_files(host))
    assert d.feature("cdev").status is Status.UNKNOWN
    assert d.usable


@pytest.mark.parametrize(
    ("config", "release", "expected"),
    [
        ("CONFIG_VFIO_DEVICE_CDEV=y\n", RELEASE, "ok"),
        ("# CONFIG_VFIO_DEVICE_CDEV is not set\nCONFIG_VFIO=y\n", RELEASE, "missing"),
        (None, "6.1.0-13-amd64", "missing"),  # before Linux 6.6: no cdevs at all
    ],
)
def test_cdevs_from_the_configuration_or_the_release(
    build_host: BuildHost, config: str | None, release: str, expected: str
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="e1000e", group=3)], cdev=False))
    d = run_diagnosis(host, kernel_files(host, config=config, release=release))
    assert d.feature("cdev").status.value == expected
    if config is not None:
        assert d.kernel.config_source == f"/boot/config-{release}"


def test_proc_config_gz_is_read_first(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)]))
    root = kernel_files(host, config="# CONFIG_PCI_IOV is not set\n")
    (host.procfs / "config.gz").write_bytes(gzip.compress(b"CONFIG_PCI_IOV=y\n"))
    d = run_diagnosis(host, root)
    assert d.kernel.config_source == "/proc/config.gz"
    assert d.kernel.option("CONFIG_PCI_IOV") is True
    # Built, but no function here has SR-IOV: nothing missing, nothing to use.
    assert d.feature("sriov").status is Status.UNKNOWN


def test_old_qemu_and_no_libvirt(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)]))
    tools = Tools(
        qemu=Tool(
            "qemu-system-x86_64", "/usr/bin/qemu-system-x86_64", "QEMU emulator version 8.2.2"
        ),
        python=(3, 11, 2),
    )
    d = run_diagnosis(host, kernel_files(host), tools)
    handoff = d.feature("qemu-handoff")
    assert handoff.status is Status.MISSING  # no fds before 9.0, and no setfacl for host=
    assert {c.name for c in handoff.missing} == {"qemu-fd", "setfacl"}
    assert "8.2.2 (< 9.0" in next(c.seen for c in handoff.missing if c.name == "qemu-fd")
    assert d.feature("libvirt-hook").missing[0].seen == "libvirtd: not found on PATH"
    assert {c.name for c in d.feature("agent").missing} == {"libvirt-files", "libvirt-python"}
    assert d.usable  # the kernel's paths do not depend on the tools


def test_find_tools_asks_only_what_is_on_path() -> None:
    asked: list[list[str]] = []

    def which(name: str) -> str | None:
        return {"qemu-system-x86_64": "/q", "libvirtd": "/l"}.get(name)

    def run_(argv: object) -> str | None:
        asked.append(list(argv))  # type: ignore[call-overload]
        return {"/q": "QEMU emulator version 11.1.0", "/l": "libvirtd (libvirt) 6.4.0"}[
            asked[-1][0]
        ]

    tools = find_tools(which, run_)
    assert asked == [["/l", "--version"], ["/q", "--version"]]
    assert tools.qemu.version == (11, 1, 0)
    assert tools.libvirt.name == "libvirtd"
    assert tools.libvirt.version == (6, 4, 0)
    assert tools.setfacl.path is None


def test_parsers() -> None:
    assert parse_version("virtqemud (libvirt) 11.3.0") == (11, 3, 0)
    assert parse_version("QEMU emulator version 9.0") == (9, 0)
    assert parse_version("nothing here") is None
    assert parse_config(b'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x"\nbad\n') == {
        "CONFIG_A": "y",
        "CONFIG_C": "x",
    }


def test_a_bare_tree_is_all_unknown_or_missing(tmp_path: Path) -> None:
    kernel = Kernel.probe(tmp_path, tmp_path, tmp_path, tmp_path)
    assert kernel.release is None
    assert kernel.config is None
    assert kernel.module("vfio_pci") is ModuleState.UNKNOWN


# -- the command --------------------------------------------------------------


def _args(host: Host, root: Path) -> list[str]:
    return [
        "doctor",
        "--sysfs-root", str(host.sysfs),
        "--dev-root", str(host.devfs),
        "--proc-root", str(host.procfs),
        "--modules-root", str(root / "lib" / "modules"),
        "--boot-root", str(root / "boot"),
    ]  # fmt: skip


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty PATH: no QEMU, libvirt or setfacl."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_cli_full_host_json(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str], no_tools: None
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)]))
    code = run([*_args(host, kernel_files(host)), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1
    assert doc["usable"] is True
    assert doc["kernel"] == {"release": RELEASE, "config": None, "cmdline": []}
    paths = {f["name"]: f["status"] for f in doc["features"] if f["vfio_path"]}
    assert paths == {"group": "ok", "group-iommufd": "ok", "cdev": "ok"}
    assert doc["tools"]["qemu"] == {
        "name": "qemu-system-x86_64",
        "path": None,
        "version": None,
        "text": None,
    }
    qemu = next(f for f in doc["features"] if f["name"] == "qemu-handoff")["checks"][0]
    assert qemu == {
        "name": "qemu",
        "ok": False,
        "seen": "qemu-system-x86_64: not found on PATH",
        "fix": "install QEMU (Debian: apt-get install qemu-system-x86)",
    }


def test_cli_no_iommu_text_and_exit_1(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str], no_tools: None
) -> None:
    host = build_host(
        Topology(devices=[Dev("0000:00:03.0", driver="e1000e")], iommu=False, groups_dir=False)
    )
    code = run(_args(host, kernel_files(host)))
    out, err = capsys.readouterr()
    assert code == 1
    assert err == ""
    assert f"kernel {RELEASE}; configuration: not readable" in out
    assert re.search(r"^MISSING  group +group \+ container", out, re.M)
    assert "MISSING  iommu-support: no /sys/kernel/iommu_groups" in out
    assert out.rstrip().endswith("This host cannot hand devices to VMs yet: see the fixes above.")


def test_cli_without_iommufd_text(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str], no_tools: None
) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)], dev_nodes={"vfio", "kvm"}
        )
    )
    code = run(_args(host, kernel_files(host)))
    out, _ = capsys.readouterr()
    assert code == 0
    assert "This host can hand devices to VMs via: group." in out
    assert "MISSING  iommufd: no /dev/iommu" in out


@pytest.mark.parametrize(
    "extra",
    [
        ["--sysfs-root", "/nonexistent/sys"],
        ["--proc-root", "a\0b"],
        ["--modules-root", "x" * 5000],
        ["--bogus"],
        ["extra-word"],
    ],
)
def test_cli_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    assert run(["doctor", *extra]) == 2
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "kvmvfio: error:" in err


def test_json_fields_are_documented(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str], no_tools: None
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=3)]))
    run([*_args(host, kernel_files(host)), "--json"])
    doc = json.loads(capsys.readouterr().out)
    section = DOC.read_text().split("## `kvmvfio doctor --json`", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    keys = set(doc) | set(doc["kernel"]) | set(doc["tools"]) | set(doc["tools"]["qemu"])
    keys |= set(doc["features"][0]) | set(doc["features"][0]["checks"][0])
    assert keys <= documented, keys - documented
    assert os.path.exists(DOC)
