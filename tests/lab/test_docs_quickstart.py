"""The quick starts (docs/quickstart-*.md) and docs/undo.md's hook removal, followed verbatim.

Every ``sh`` block of the page is run as written (the blocks read by
tests/docpages.py, which the unit tier also uses to check every guide's
commands against the CLI's parser), in order, in a folder
holding the page's files (``xml title="..."`` blocks); the only thing the
test adds is what a host has already: libvirtd running (started after the
hook is installed, as the page's "restart libvirt once" says). After each
step, what the page promises is checked on the kernel and in libvirt.
docs/undo.md's hook removal starts from the libvirt quick start's running
vm1 and adds only the domain's stop (`virsh destroy`) and a `kvmvfio
status` to see what the page says happens in between.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from docpages import blocks
from vfiokit import driver

from kvmvfio.lab.libvirtd import Libvirtd, virsh
from kvmvfio.lab.topology import Topology
from kvmvfio.libvirt import install
from kvmvfio.prepare import recover

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "quickstart-libvirt.md"


@pytest.fixture
def host_with_libvirt(tmp_path: Path) -> Iterator[Libvirtd]:
    daemon = Libvirtd()
    yield daemon
    virsh("destroy", "vm1", check=False)
    virsh("undefine", "vm1", check=False)
    daemon.stop()
    install.uninstall()
    recover()


def run_block(body: str, cwd: Path, status: int = 0) -> str:
    argv = ["sh", "-e", "-x", "-c", body]
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == status, f"the page's block:\n{body}\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.mark.timeout(900)
def test_the_libvirt_quick_start_works_as_written(
    topology: Topology, host_with_libvirt: Libvirtd, tmp_path: Path
) -> None:
    nic = topology.guest_address("nic0")
    assert nic in PAGE.read_text(), "the page's example device is the lab's NIC"
    assert driver(nic) == "e1000e"
    for _lang, title, body in blocks(PAGE):
        if title:
            (tmp_path / title).write_text(body)
    scripts = [body for lang, _, body in blocks(PAGE) if lang == "sh"]
    assert len(scripts) == 5, "the test follows the page's five steps"
    assert scripts[0].strip().splitlines()[-1].startswith("kvmvfio group")
    find, hook, define, start, stop = scripts

    # `kvmvfio group` exits 1 while the group is not viable, as the page says.
    out = run_block(find, tmp_path, status=1)
    assert f"{nic}  8086:10d3  Ethernet controller   e1000e" in out
    shown = next(body for lang, _, body in blocks(PAGE) if lang == "text")
    assert shown.strip().splitlines()[-1] in out  # the page shows what the user sees
    assert "1 member(s) keep the group from VFIO" in out
    run_block(hook, tmp_path)
    assert (Path("/etc/libvirt/hooks/qemu.d/kvmvfio")).is_file()
    host_with_libvirt.start()  # the host's libvirtd, (re)started after the install
    run_block(define, tmp_path)
    out = run_block(start, tmp_path)
    assert driver(nic) == "vfio-pci"
    assert "claimed by libvirt:vm1" in out
    assert nic in out
    assert virsh("domstate", "vm1").stdout.strip() == "running"
    out = run_block(stop, tmp_path)
    assert "kvmvfio holds no IOMMU group" in out
    assert driver(nic) == "e1000e"


UNDO_PAGE = PAGE.with_name("undo.md")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("give_back", ["recover", "release"])
def test_removing_the_hook_while_the_domain_runs_works_as_written(
    topology: Topology, host_with_libvirt: Libvirtd, tmp_path: Path, give_back: str
) -> None:
    """docs/undo.md: the hook goes while vm1 runs; at its stop nothing gives the NIC back
    (no hook, no agent) until the page's `recover`, or its `release`, does."""
    nic = topology.guest_address("nic0")
    undo = [body for lang, _, body in blocks(UNDO_PAGE) if lang == "sh"]
    uninstall, recover_block, release_block = undo[:3]
    assert uninstall.split() == ["kvmvfio", "hook", "uninstall", "kvmvfio", "status"]
    assert recover_block.strip() == "kvmvfio recover"
    assert nic in release_block, "the page's example device is the lab's NIC"
    # The libvirt quick start's steps 2 to 4: the hook, vm1 defined and started.
    for _lang, title, body in blocks(PAGE):
        if title:
            (tmp_path / title).write_text(body)
    _find, hook, define, start, _stop = [body for lang, _, body in blocks(PAGE) if lang == "sh"]
    run_block(hook, tmp_path)
    host_with_libvirt.start()
    run_block(define, tmp_path)
    run_block(start, tmp_path)
    assert driver(nic) == "vfio-pci"

    out = run_block(uninstall, tmp_path)
    assert "removed /etc/libvirt/hooks/qemu.d/kvmvfio" in out
    assert "claimed by libvirt:vm1; owner alive: pid " in out
    assert "holds its VFIO files open" in out
    # libvirt lists qemu.d at each hook call: no restart, and no hook at release end.
    virsh("destroy", "vm1")
    assert driver(nic) == "vfio-pci"
    out = run_block("kvmvfio status", tmp_path)
    assert "claimed by libvirt:vm1; owner gone: libvirt domain vm1 is not running" in out

    out = run_block(recover_block if give_back == "recover" else release_block, tmp_path)
    assert f"{give_back}: {nic} back on e1000e" in out
    assert driver(nic) == "e1000e"
    assert "kvmvfio holds no IOMMU group" in run_block("kvmvfio status", tmp_path)


PYTHON_PAGE = PAGE.with_name("quickstart-python.md")


@pytest.mark.timeout(600)
def test_the_python_quick_start_works_as_written(topology: Topology, tmp_path: Path) -> None:
    found = {(lang, title): body for lang, title, body in blocks(PYTHON_PAGE)}
    qemu_cmd, script = found[("text", "")], found[("python", "launcher.py")]
    edu0 = topology.guest_address("edu0")
    assert f'DEVICE = "{edu0}"' in script, "the page's example device is the lab's edu0"
    before = driver(edu0)
    qemu = subprocess.Popen(["sh", "-c", "exec " + qemu_cmd.replace("\\\n", " ")])
    try:
        deadline = time.monotonic() + 60
        while not (Path("/run/vm1.qmp").exists() and Path("/run/vm1.pid").exists()):
            assert qemu.poll() is None, "the page's QEMU command line did not start"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (tmp_path / "launcher.py").write_text(script)
        done = subprocess.run(
            ["python3", "launcher.py"], cwd=tmp_path, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"attached {edu0} as kvmvfio-0000-00-03-0 on rp0 by cdev" in done.stdout
        assert f"detached {edu0}" in done.stdout
        assert driver(edu0) == before
    finally:
        qemu.kill()
        qemu.wait()
        for leftover in ("/run/vm1.qmp", "/run/vm1.pid"):
            Path(leftover).unlink(missing_ok=True)
        recover()
