"""kvmvfio's SR-IOV support on a real kernel: QEMU's NVMe PF with VFs, in L1.

The topology ``sriov`` gives L1 an NVMe controller with SR-IOV (4 VFs at
most) on its ``nvme`` driver. These tests make and remove VFs through
kvmvfio, hand one to an unprivileged L2 QEMU, recover after a kill at every
step, refuse what is in use, and open a VF of a PF on vfio-pci with and
without its VF token. Each test leaves the PF as it found it: no VF, on
nvme, autoprobe on. (The kernel's own behaviour, without kvmvfio, is in
test_sriov_kernel.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from libvirtkit import AgentProcess, create, destroy, qemu_fds, wait_for
from vfiokit import assert_released, cdev_of, driver

from kvmvfio.errors import UsageError
from kvmvfio.host import Host
from kvmvfio.lab.l2 import L2Qemu
from kvmvfio.lab.topology import Topology
from kvmvfio.libvirt.metadata import NAMESPACE
from kvmvfio.libvirt.monitor import qemu_pid
from kvmvfio.prepare import prepare, recover, release, sriov, status
from kvmvfio.qemu import Qemu, attach, qdev_id
from kvmvfio.vfio import VfioSession

pytestmark = [pytest.mark.lab, pytest.mark.topology("sriov"), pytest.mark.timeout(900)]

PCI = Path("/sys/bus/pci/devices")
ENABLE_SRIOV = Path("/sys/module/vfio_pci/parameters/enable_sriov")
#: QEMU's NVMe VFs, as the L2 guest's uevents name them (vendor:device).
NVME_ID = "1b36:0010"


def _attr(addr: str, name: str) -> str:
    return (PCI / addr / name).read_text().strip()


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def pf(topology: Topology, tmp_path: Path) -> Iterator[str]:
    """The PF, on nvme with no VF and autoprobe on, before and after each test."""
    addr = topology.guest_address("sriov0")
    assert driver(addr) == "nvme"
    assert _attr(addr, "sriov_numvfs") == "0"
    reset_methods = _attr(addr, "reset_method")
    yield addr
    recover(root=tmp_path)
    sriov.recover_vfs(root=tmp_path)
    if _attr(addr, "sriov_numvfs") != "0":
        _write(PCI / addr / "sriov_numvfs", "0")
    if driver(addr) != "nvme":
        if driver(addr):
            _write(PCI / addr / "driver/unbind", addr)
        _write(PCI / addr / "driver_override", "\n")
        _write(Path("/sys/bus/pci/drivers_probe"), addr)
    _write(PCI / addr / "sriov_drivers_autoprobe", "1")
    _write(ENABLE_SRIOV, "N")
    _write(PCI / addr / "reset_method", reset_methods)


def _vfs(pf: str) -> list[str]:
    return [str(a) for a in Host().device(pf).virtfns]


def test_vfs_are_made_for_vms_and_given_back(pf: str, tmp_path: Path) -> None:
    done = sriov.set_vfs(pf, 2, "vm1", root=tmp_path)
    assert (done.before, done.after) == (0, 2)
    assert list(done.vfs) == _vfs(pf)
    assert len(done.vfs) == 2
    # Autoprobe off: no host driver took them (the kernel's nvme would have).
    assert _attr(pf, "sriov_drivers_autoprobe") == "0"
    assert [driver(vf) for vf in done.vfs] == [None, None]
    assert sriov.VfJournal(tmp_path).read(pf) is not None
    # Another count goes through 0: the kernel refuses 2 -> 3 with EBUSY.
    again = sriov.set_vfs(pf, 3, "vm1", root=tmp_path)
    assert (again.before, again.after, len(_vfs(pf))) == (2, 3, 3)
    back = sriov.reset_vfs(pf, "vm1", root=tmp_path)
    assert back is not None
    assert (back.after, _vfs(pf), _attr(pf, "sriov_drivers_autoprobe")) == (0, [], "1")
    assert sriov.VfJournal(tmp_path).read(pf) is None
    assert driver(pf) == "nvme"


def test_bad_counts_and_vfs_in_use_are_refused(pf: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"PF {pf} can have 0 to 4 VFs, not 5"):
        sriov.set_vfs(pf, 5, "vm1", root=tmp_path)
    vf, _ = sriov.set_vfs(pf, 2, "vm1", root=tmp_path).vfs
    prepare([vf], "vm1", root=tmp_path)
    assert driver(vf) == "vfio-pci"
    with pytest.raises(sriov.VfsInUse, match=f"VF {vf} is claimed by 'vm1' and is on vfio-pci"):
        sriov.set_vfs(pf, 0, "vm1", root=tmp_path)
    assert len(_vfs(pf)) == 2
    with pytest.raises(sriov.VfsInUse):
        prepare([pf], "vm2", root=tmp_path)  # the PF with its VFs in use
    assert driver(pf) == "nvme"
    release([vf], "vm1", root=tmp_path)
    assert driver(vf) is None
    with pytest.raises(sriov.PfHasVfs, match=f"PF {pf} \\(nvme\\) has 2 VFs"):
        prepare([pf], "vm2", root=tmp_path)
    assert driver(pf) == "nvme"
    with pytest.raises(sriov.NotSriovCapable, match="is a VF"):
        sriov.set_vfs(vf, 0, "vm1", root=tmp_path)


KILLED_AT_CHANGE = """
import os, signal, sys
import kvmvfio.prepare
from kvmvfio.cli import run
n = int(sys.argv[1])
kvmvfio.prepare.set_change_hook(lambda k: k == n and os.kill(os.getpid(), signal.SIGKILL))
sys.exit(run(sys.argv[2:]))
"""


def test_a_kill_at_every_step_is_recovered(pf: str, tmp_path: Path) -> None:
    # set 2 from 0: autoprobe off, then the count; from 2 to 3: also through 0.
    for start, count, steps in ((0, 2, 2), (2, 3, 3)):
        for n in range(1, steps + 1):
            if start:
                sriov.set_vfs(pf, start, "setup", root=tmp_path, host_drivers=True)
                sriov.VfJournal(tmp_path).remove(pf)  # the PF's own count, as found
            killed = subprocess.run(
                [sys.executable, "-c", KILLED_AT_CHANGE, str(n), "sriov", "set", pf,
                 str(count), "--owner", "vm1", "--root", str(tmp_path)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert killed.returncode == -9, (start, n, killed.stderr)
            done = subprocess.run(
                ["kvmvfio", "recover", "--json", "--root", str(tmp_path)],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            restored = json.loads(done.stdout)["vfs"]["restored"]
            assert [(r["pf"], r["after"]) for r in restored] == [(pf, start)], (start, n)
            assert len(_vfs(pf)) == start
            assert _attr(pf, "sriov_drivers_autoprobe") == "1"
            assert sriov.VfJournal(tmp_path).pfs() == []
            if start:
                _write(PCI / pf / "sriov_numvfs", "0")


async def test_a_vf_reaches_an_unprivileged_guest_by_fd(pf: str, tmp_path: Path) -> None:
    vf, _ = sriov.set_vfs(pf, 2, "vm1", root=tmp_path).vfs
    prepare([vf], "vm1", root=tmp_path)
    l2 = L2Qemu.booted(ports=2, acpi_hotplug=True)
    try:
        since = l2.wait_pci_events(NVME_ID, (0, 0), timeout=0)
        async with Qemu(l2.qmp, pid=l2.pid) as qemu:
            (done,) = await attach(qemu, [vf])
        assert done.path == "cdev"
        assert cdev_of(vf) in l2.fds()  # QEMU (nobody) holds the VF's cdev, given by fd
        assert "/dev/iommu" in l2.fds()
        assert done.qdev_id == qdev_id(vf)
        # The guest's own kernel enumerated the VF (its PCI uevent, on its serial port).
        assert l2.wait_pci_events(NVME_ID, (1, 0), since=since, timeout=120) == (1, 0)
    finally:
        l2.kill()
    assert_released(vf)  # QEMU gone, nothing holds it (while it is still on vfio-pci)
    release([vf], "vm1", root=tmp_path)
    assert driver(vf) is None  # back as it came: no driver
    sriov.reset_vfs(pf, "vm1", root=tmp_path)
    assert _vfs(pf) == []


def test_a_vf_of_a_pf_on_vfio_pci_opens_only_with_its_token(pf: str, tmp_path: Path) -> None:
    token = uuid.uuid4()
    _write(ENABLE_SRIOV, "Y")
    # QEMU 7.2's nvme drops its VFs on a function reset, which vfio-pci does
    # at each open and close of the PF; each VF opened after it would wait
    # 65 s for an FLR (docs/sriov.md). Real PFs bring their VFs back.
    _write(PCI / pf / "reset_method", "\n")
    prepare([pf], "pfuser", root=tmp_path)  # a user-space PF driver's side
    assert driver(pf) == "vfio-pci"
    with VfioSession([pf], backend="group", vf_token=token) as session:
        session.devices[pf].set_vf_token(token)
        vf, _ = sriov.set_vfs(pf, 2, "pfuser", root=tmp_path, host_drivers=True).vfs
    # The kernel gave the VFs vfio-pci (driver_override) since their PF is on it.
    assert driver(vf) == "vfio-pci"
    check = ["kvmvfio", "check", vf, "--path", "group", "--json"]
    missing = subprocess.run(check, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2  # what the user must add: an argument
    assert json.loads(missing.stdout)["error"]["type"] == "VfTokenNeeded"
    assert f"its PF {pf} is on vfio-pci" in missing.stderr
    wrong = subprocess.run(
        [*check, "--vf-token", str(uuid.uuid4())],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert json.loads(wrong.stdout)["error"]["type"] == "VfTokenRefused"
    assert json.loads(wrong.stdout)["error"]["errno"] == 13  # EACCES, the kernel's word
    right = subprocess.run(
        [*check, "--vf-token", str(token)], capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert right.returncode == 0, right.stderr
    assert json.loads(right.stdout)["plan"]["devices"][0]["vf_token"] is True
    assert str(token) not in right.stdout


@pytest.mark.timeout(1200)
def test_a_domain_asks_for_vfs_by_count_through_the_hook_and_agent(
    pf: str, agent: AgentProcess, tmp_path: Path
) -> None:
    vfs = list(sriov.set_vfs(pf, 3, "lab", root=tmp_path).vfs)
    pool = (
        f'<kvmvfio:devices xmlns:kvmvfio="{NAMESPACE}">'
        f'<kvmvfio:vfs pf="{pf}" count="2" handoff="agent"/></kvmvfio:devices>'
    )
    done = create(tmp_path, "pooled", paused=False, metadata=pool)
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("pooled")
    # The hook picked the first two free VFs and put them on vfio-pci for the
    # domain; the agent (which asks the same question) handed them to QEMU by fd.
    held = {(r.owner, e.address) for r in status() for e in r.devices}
    assert held == {("libvirt:pooled", vfs[0]), ("libvirt:pooled", vfs[1])}
    cdevs = [cdev_of(vf) for vf in vfs[:2]]
    wait_for(lambda: all(c in qemu_fds(pid) for c in cdevs), 120, f"QEMU holding {cdevs}")
    assert driver(vfs[2]) is None
    # A second domain asking for two more finds one free: libvirt says why, nothing moves.
    greedy = create(tmp_path, "greedy", metadata=pool)
    assert greedy.returncode != 0
    assert f"2 VFs of PF {pf} were asked for and 1 of its VFs is free" in greedy.stderr
    assert f"VF {vfs[0]} is claimed by 'libvirt:pooled'" in greedy.stderr
    assert driver(vfs[2]) is None
    assert {(r.owner, e.address) for r in status() for e in r.devices} == held
    # The domain stops: the hook gives back the two it holds, and only those.
    destroy("pooled")
    wait_for(lambda: status() == [], 60, "the journal empty")
    assert [driver(vf) for vf in vfs] == [None, None, None]
    assert "Traceback" not in agent.text()
    sriov.reset_vfs(pf, "lab", root=tmp_path)
    assert _vfs(pf) == []
