"""Host-side tests of the lab runner: topologies, command lines, the VM's life cycle.

A fake QEMU (a small script that reads the same command line) stands in for
the real one, so timeouts, crashes and missing images are tested fast. The
lab tier itself proves the real QEMU boots with these arguments.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kvmvfio.errors import LabError
from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.images import KINDS, ImageBuilder, LabImages, recipe_key
from kvmvfio.lab.runner import LabRun, job_script, kernel_cmdline, qemu_argv, run_in_lab
from kvmvfio.lab.tier import read_junit, summary


def test_builtin_topologies_cover_the_issue() -> None:
    assert {"default", "coherent", "virtio-iommu"} <= set(topo_mod.builtin_names())
    default = topo_mod.load("default")
    assert default.viommu == "intel-iommu"
    assert not default.snoop_control
    drivers = [d.driver for d in default.devices]
    assert drivers.count("edu") == 4
    assert "e1000e" in drivers
    assert "pcie-pci-bridge" in drivers
    assert topo_mod.load("coherent").snoop_control is True
    assert topo_mod.load("virtio-iommu").viommu == "virtio-iommu"


def test_guest_addresses_of_default() -> None:
    topo = topo_mod.load("default")
    assert topo.guest_address("edu0") == "0000:00:03.0"
    assert topo.guest_address("nic0") == "0000:00:05.0"
    assert topo.guest_address("edu2") == "0000:01:01.0"
    assert topo.guest_address("edu3") == "0000:01:02.0"
    with pytest.raises(LabError, match="no device with id 'nope'"):
        topo.guest_address("nope")


def test_unknown_topology_names_the_choices() -> None:
    with pytest.raises(LabError, match=r"unknown topology 'nosuch'.*coherent, default"):
        topo_mod.load("nosuch")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[viommu]\nmodel = "amd-iommu"\n', r"viommu.model: 'amd-iommu' is not one of"),
        ('colour = 1\n[viommu]\nmodel = "intel-iommu"\n', r"top level: unknown field 'colour'"),
        ("description = 3\n", r"description: must be a string"),
        (
            '[viommu]\nmodel = "intel-iommu"\n[[device]]\nid = "x"\n',
            r"device\[0\]: missing field 'driver'",
        ),
        (
            '[viommu]\nmodel = "intel-iommu"\n[[device]]\ndriver = "edu,id=evil"\n',
            r"device\[0\].driver: 'edu,id=evil' is not allowed",
        ),
        (
            '[viommu]\nmodel = "intel-iommu"\n[[device]]\ndriver = "edu"\nbus = "br9"\n',
            r"device\[0\].bus: 'br9' is not the id of a device above it",
        ),
        (
            '[viommu]\nmodel = "virtio-iommu"\nsnoop-control = true\n',
            r"only intel-iommu has snoop-control",
        ),
        ('smp = 0\n[viommu]\nmodel = "intel-iommu"\n', r"smp: must be an integer from 1 to 8"),
        (
            'common-tests = "no"\n[viommu]\nmodel = "intel-iommu"\n',
            r"common-tests: must be true or false",
        ),
        ("[viommu\n", r"not valid TOML"),
    ],
)
def test_bad_topology_files_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(LabError, match=message) as info:
        topo_mod.load(str(path))
    assert str(path) in str(info.value)


def test_only_distro_leaves_out_the_common_lab_tests() -> None:
    # tests/lab/conftest.py skips the unmarked lab tests on such a topology.
    skipping = [n for n in topo_mod.builtin_names() if not topo_mod.load(n).common_tests]
    assert skipping == ["distro"]


def test_user_topology_file_without_code(tmp_path: Path) -> None:
    path = tmp_path / "two-nics.toml"
    path.write_text(
        textwrap.dedent(
            """
            description = "two NICs"
            [viommu]
            model = "intel-iommu"
            snoop-control = true
            [[device]]
            driver = "e1000e"
            id = "a"
            addr = "0x07"
            [device.props]
            mac = "52:54:00:12:34:56"
            """
        )
    )
    topo = topo_mod.load(str(path))
    assert topo.name == "two-nics"
    assert topo.devices[0].qemu_arg() == "e1000e,id=a,addr=0x07,mac=52:54:00:12:34:56"


def _images(tmp_path: Path) -> LabImages:
    kernel, rootfs, qemu = tmp_path / "bzImage", tmp_path / "rootfs.img", tmp_path / "qemu"
    kernel.write_bytes(b"k")
    rootfs.write_bytes(b"r")
    qemu.write_bytes(b"q")
    return LabImages(kernel=kernel, rootfs=rootfs, qemu=qemu)


def test_qemu_command_line(tmp_path: Path) -> None:
    topo = topo_mod.load("coherent")
    run = LabRun(topology=topo, images=_images(tmp_path), checkout=tmp_path, command=("true",))
    argv = qemu_argv(run, tmp_path / "job", tmp_path / "console.log")
    joined = " ".join(argv)
    # L1 runs under the lab's own QEMU build unless the run names another.
    assert argv[0] == str(tmp_path / "qemu")
    assert qemu_argv(replace(run, qemu="/opt/q"), tmp_path, tmp_path / "c")[0] == "/opt/q"
    assert argv[argv.index("-accel") + 1] == "tcg,thread=single"
    assert argv[argv.index("-smp") + 1] == "1"
    assert "-no-reboot" in argv
    # The vIOMMU precedes every PCI device.
    first_device = argv.index("-device")
    assert argv[first_device + 1] == "intel-iommu,intremap=on,snoop-control=on"
    assert "edu,id=edu2,bus=br0,addr=0x01" in argv
    assert f"local,id=src,path={tmp_path},security_model=none,readonly=on" in argv
    assert "snapshot=on" in joined
    cmdline = kernel_cmdline(topo)
    assert "panic=-1" in cmdline
    assert "intel_iommu=on" in cmdline
    assert "init=/sbin/kvmvfio-init" in cmdline


def test_virtio_iommu_command_line(tmp_path: Path) -> None:
    topo = topo_mod.load("virtio-iommu")
    run = LabRun(topology=topo, images=_images(tmp_path), checkout=tmp_path, command=("true",))
    argv = qemu_argv(run, tmp_path, tmp_path / "c.log")
    assert argv[argv.index("-device") + 1].startswith("virtio-iommu-pci")
    assert "vfio_iommu_type1.allow_unsafe_interrupts=1" in kernel_cmdline(topo)
    assert "intel_iommu=on" not in kernel_cmdline(topo)


def test_job_script_quotes_the_command(tmp_path: Path) -> None:
    run = LabRun(
        topology=topo_mod.load("default"),
        images=_images(tmp_path),
        checkout=tmp_path,
        command=("sh", "-c", "echo 'a b'; exit 3"),
    )
    script = job_script(run)
    assert "export KVMVFIO_LAB_TOPOLOGY=default" in script
    assert script.rstrip().endswith("""exec sh -c 'echo '"'"'a b'"'"'; exit 3'""")


# A stand-in for qemu-system-x86_64: finds the job share and console file in
# its command line and behaves as the test asks (MODE in its environment).
FAKE_QEMU = """\
#!{python}
import os, re, subprocess, sys, time
argv = sys.argv[1:]
job = next(re.search(r"path=([^,]+)", a).group(1) for a in argv if a.startswith("local,id=job,"))
console = next(a[len("file:"):] for a in argv if a.startswith("file:"))
mode = os.environ.get("FAKE_QEMU_MODE", "ok")
open(os.path.join(job, "pid"), "w").write(str(os.getpid()))
with open(console, "w") as c:
    c.write("Linux version 6.12.0 (fake)\\n")
    if mode == "panic":
        c.write("Kernel panic - not syncing: VFS: Unable to mount root fs\\n")
        sys.exit(0)
if mode == "hang":
    time.sleep(600)
out = subprocess.run(["sh", os.path.join(job, "job.sh")], capture_output=True, cwd=job)
sys.stdout.buffer.write(out.stdout.replace(b"\\n", b"\\r\\n"))
open(os.path.join(job, "rc"), "w").write(str(out.returncode))
"""


@pytest.fixture
def fake_qemu(tmp_path: Path) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text(FAKE_QEMU.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _fake_run(tmp_path: Path, qemu: str, command: tuple[str, ...], timeout: float = 30) -> LabRun:
    # job.sh does `cd /mnt/src`, absent here: the fake runs it where it is.
    return LabRun(
        topology=topo_mod.load("default"),
        images=_images(tmp_path),
        checkout=tmp_path,
        command=command,
        qemu=qemu,
        timeout=timeout,
    )


async def test_runner_streams_output_and_returns_exit_code(
    tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    out = io.BytesIO()
    run = _fake_run(tmp_path, fake_qemu, ("sh", "-c", "echo hello from L1; exit 7"))
    assert await run_in_lab(run, out=out, job_dir=tmp_path / "job") == 7
    assert out.getvalue() == b"hello from L1\n"


async def test_a_topology_file_reaches_the_job_under_its_own_name(
    tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job in L1 loads the topology it was booted with, also one from a file of the user's."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "ok")
    mine = tmp_path / "mine.toml"
    mine.write_text(
        'description = "one edu"\nkernel-args = ["nokaslr"]\n'
        '[viommu]\nmodel = "intel-iommu"\n[[device]]\ndriver = "edu"\nid = "edu0"\n'
    )
    run = replace(
        _fake_run(tmp_path, fake_qemu, ("sh", "-c", 'echo "$KVMVFIO_LAB_TOPOLOGY"')),
        topology=topo_mod.load(str(mine)),
    )
    out = io.BytesIO()
    job = tmp_path / "job"
    assert await run_in_lab(run, out=out, job_dir=job) == 0
    assert out.getvalue() == b"/mnt/job/topology/mine.toml\n"
    in_l1 = topo_mod.load(str(job / "topology" / "mine.toml"))
    assert in_l1 == run.topology
    assert in_l1.name == "mine"


async def test_crashed_guest_shows_console_tail(
    tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "panic")
    with pytest.raises(
        LabError, match=r"stopped before the job finished[\s\S]*Unable to mount root fs"
    ):
        await run_in_lab(_fake_run(tmp_path, fake_qemu, ("true",)), out=io.BytesIO())


async def test_timeout_stops_the_vm(
    tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    job = tmp_path / "job"
    with pytest.raises(LabError, match=r"did not finish within 1 s[\s\S]*Linux version"):
        await run_in_lab(
            _fake_run(tmp_path, fake_qemu, ("true",), timeout=1), out=io.BytesIO(), job_dir=job
        )
    pid = int((job / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_cancel_stops_the_vm(
    tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C cancels the task: the VM must not outlive it."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    job = tmp_path / "job"
    task = asyncio.ensure_future(
        run_in_lab(_fake_run(tmp_path, fake_qemu, ("true",)), out=io.BytesIO(), job_dir=job)
    )
    for _ in range(100):
        if (job / "pid").exists() and (job / "pid").read_text():
            break
        await asyncio.sleep(0.05)
    pid = int((job / "pid").read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


_KILLED_RUNNER = """
import asyncio, io, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_lab_runner import _fake_run
from kvmvfio.lab.runner import run_in_lab
tmp = Path(sys.argv[1])
run = _fake_run(tmp, sys.argv[2], ("true",))
asyncio.run(run_in_lab(run, out=io.BytesIO(), job_dir=tmp / "job"))
"""


def test_a_killed_runner_takes_the_vm_with_it(
    tmp_path: Path, fake_qemu: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL leaves no chance to clean up: the kernel must stop QEMU (PR_SET_PDEATHSIG)."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "hang")
    runner = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUNNER, str(tmp_path), fake_qemu, str(Path(__file__).parent)]
    )
    job = tmp_path / "job"
    for _ in range(200):
        if (job / "pid").exists() and (job / "pid").read_text():
            break
        time.sleep(0.05)
    pid = int((job / "pid").read_text())
    os.kill(pid, 0)  # the fake QEMU runs
    runner.kill()
    runner.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_missing_qemu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"^no-such-qemu not found on the host$"):
        await run_in_lab(_fake_run(tmp_path, "no-such-qemu", ("true",)))
    # The lab's own build of QEMU is an image like the others.
    run = replace(_fake_run(tmp_path, "unused", ("true",)), qemu=None)
    run.images.qemu.unlink()
    with pytest.raises(LabError, match=r"qemu is missing: run `kvmvfio lab build`"):
        await run_in_lab(run)


async def test_missing_image_is_a_clear_error(tmp_path: Path, fake_qemu: str) -> None:
    run = _fake_run(tmp_path, fake_qemu, ("true",))
    run.images.rootfs.unlink()
    with pytest.raises(LabError, match=r"rootfs.img is missing: run `kvmvfio lab build`"):
        await run_in_lab(run)


def test_recipe_key_changes_with_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "build.sh").write_text("echo 1")
    first = recipe_key(tmp_path)
    assert recipe_key(tmp_path) == first
    (tmp_path / "build.sh").write_text("echo 2")
    assert recipe_key(tmp_path) != first


def _fake_checkout(tmp_path: Path, body: str) -> Path:
    checkout = tmp_path / "checkout"
    for kind in KINDS:
        recipe = checkout / "vm-images" / kind
        recipe.mkdir(parents=True)
        (recipe / "build.sh").write_text(body)
    return checkout


def test_no_disk_space_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = _fake_checkout(tmp_path, "exit 0")
    monkeypatch.setattr(
        "kvmvfio.lab.images.shutil.disk_usage", lambda _p: shutil._ntuple_diskusage(10, 9, 1 << 20)
    )
    monkeypatch.setattr("kvmvfio.lab.images._inputs", lambda _k: b"")
    builder = ImageBuilder(checkout=checkout, cache=tmp_path / "cache", out=io.StringIO())
    with pytest.raises(LabError, match=r"no disk space for the kernel image: 0.0 GiB free"):
        builder.ensure()


def test_build_caches_by_recipe_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = _fake_checkout(
        tmp_path,
        'echo "step one"; for f in bzImage rootfs.img qemu-system-x86_64; do '
        'echo x > "$1/$f"; done; '
        'echo built >> "$2/count"\n',
    )
    monkeypatch.setattr("kvmvfio.lab.images._inputs", lambda _k: b"")
    monkeypatch.setattr("kvmvfio.lab.images.os.geteuid", lambda: 0)
    monkeypatch.setattr("kvmvfio.lab.images._HOST_TOOLS", {kind: {} for kind in KINDS})
    log = io.StringIO()
    builder = ImageBuilder(checkout=checkout, cache=tmp_path / "cache", out=log)
    images = builder.ensure()
    assert images.kernel.read_text() == "x\n"
    assert images.qemu.name == "qemu-system-x86_64"
    assert images.qemu.read_text() == "x\n"
    assert "step one" in log.getvalue()
    builder.ensure()  # cached: the recipe does not run again
    assert (tmp_path / "cache" / "work" / "kernel" / "count").read_text() == "built\n"
    (checkout / "vm-images" / "kernel" / "build.sh").write_text(
        'echo "oops: no compiler" >&2; exit 3\n'
    )
    with pytest.raises(
        LabError, match=r"building the kernel image failed \(exit 3\)[\s\S]*oops: no compiler"
    ):
        builder.ensure()
    # The failed build left no half-made image behind, and the old one is kept.
    assert not list((tmp_path / "cache").glob("kernel-*.tmp-*"))


def test_junit_summary(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2">'
        "</testsuite></testsuites>"
    )
    result = read_junit(report, "default", 1)
    assert (result.passed, result.failed, result.errors, result.skipped) == (3, 1, 1, 2)
    assert not result.ok
    assert summary([result]) == "lab: 3 passed, 2 failed, 2 skipped"
    missing = read_junit(tmp_path / "absent.xml", "coherent", 2)
    assert not missing.ok


def test_the_emulator_build_follows_the_hosts_qemu_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L1's QEMU is rebuilt when the host's qemu-system-x86 changes, and needs it installed."""
    version = ["1:7.2+dfsg-7+deb12u18"]

    def dpkg_query(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        assert argv[:2] == ["dpkg-query", "-W"]
        if not version[0]:
            return subprocess.CompletedProcess(argv, 1, "", "no packages found")
        return subprocess.CompletedProcess(argv, 0, version[0], "")

    monkeypatch.setattr("kvmvfio.lab.images.subprocess.run", dpkg_query)
    checkout = _fake_checkout(tmp_path, "exit 0")
    builder = ImageBuilder(checkout=checkout, cache=tmp_path / "cache", out=io.StringIO())
    first = builder.path_for("qemu")
    assert builder.path_for("qemu") == first
    version[0] = "1:7.2+dfsg-7+deb12u19"
    assert builder.path_for("qemu") != first
    version[0] = ""
    with pytest.raises(LabError, match=r"qemu-system-x86 is not installed: install it with"):
        builder.path_for("qemu")
