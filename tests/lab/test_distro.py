"""kvmvfio on L1 booted as a Debian host runs (the `distro` topology).

Two things real hosts have and the other topologies leave out:

- **AppArmor** (issue 20, point 3). libvirtd runs under Debian's profile for
  it, and libvirt's AppArmor driver has ``virt-aa-helper`` write a profile
  per domain (``libvirt-UUID``) that lists the files of the devices in the
  domain's XML. The tests show which of kvmvfio's ways work under that
  confinement and that the one that cannot is refused before anything is
  handed over, with the reason and the rule that makes it work.
- **udev and libvirt's node-device driver** (point 5): ``virsh nodedev-*``
  sees the devices move as kvmvfio moves them, and what happens when an
  operator moves a device kvmvfio holds with ``virsh nodedev-reattach``.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from libvirtkit import AgentProcess, create, destroy, metadata, qemu_fds, wait_for
from vfiokit import cdev_of, driver, group_of

from kvmvfio.host.confinement import allows, confinement
from kvmvfio.lab.l2 import NOBODY, L2Qemu
from kvmvfio.lab.libvirtd import Libvirtd, virsh
from kvmvfio.lab.topology import Topology
from kvmvfio.libvirt.monitor import qemu_pid
from kvmvfio.prepare import prepare, release, status

pytestmark = [pytest.mark.lab, pytest.mark.topology("distro")]

LOCAL_ABSTRACTION = Path("/etc/apparmor.d/local/abstractions/libvirt-qemu")
KVMVFIO = [sys.executable, "-m", "kvmvfio"]


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMVFIO, *args], capture_output=True, text=True, check=False)


def nodedev(addr: str) -> str:
    """libvirt's node-device name of a PCI function."""
    return "pci_" + re.sub(r"[:.]", "_", addr)


def nodedev_driver(addr: str) -> str | None:
    """The driver libvirt's node-device view gives ``addr`` (None: none)."""
    xml = virsh("nodedev-dumpxml", nodedev(addr)).stdout
    m = re.search(r"<driver>\s*<name>([^<]+)</name>", xml)
    return m.group(1) if m else None


def profile_of(pid: int) -> str:
    found = confinement(pid)
    assert found is not None, f"pid {pid} has no AppArmor label"
    return str(found)


# -- the host as Debian boots it --------------------------------------------------------


def test_l1_runs_udev_and_apparmor_and_libvirtd_is_confined(libvirtd: Libvirtd) -> None:
    assert Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    assert "apparmor" in Path("/sys/kernel/security/lsm").read_text().split(",")
    udevd = subprocess.run(["pidof", "systemd-udevd"], capture_output=True, text=True, check=False)
    assert udevd.returncode == 0, "udevd is not running"
    (pid,) = map(
        int,
        subprocess.run(
            ["pidof", "libvirtd"], capture_output=True, text=True, check=True
        ).stdout.split(),
    )
    assert profile_of(pid) == "libvirtd (enforce)"
    # The node-device driver answers (it fails without udev: LAB.md).
    listed = virsh("nodedev-list", "--cap", "pci").stdout.split()
    assert nodedev("0000:00:03.0") in listed


# -- AppArmor: what works under libvirt's confinement -----------------------------------


def test_the_hook_and_libvirts_own_group_node_work_confined(
    topology: Topology, clean: None, tmp_path: Path
) -> None:
    nic = topology.guest_address("nic0")
    done = create(tmp_path, "aahooked", metadata=metadata(nic), hostdevs=[nic])
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("aahooked")
    label = profile_of(pid)
    assert re.fullmatch(r"libvirt-[0-9a-f-]{36} \(enforce\)", label), label
    # virt-aa-helper listed the hostdev's group node in the domain's profile,
    # and QEMU opened it itself.
    node = f"/dev/vfio/{group_of(nic)}"
    assert allows(label.split()[0], node)
    assert node in qemu_fds(pid)
    # libvirt's node-device view agrees with sysfs while the domain runs, and
    # libvirt will not move a device its running domain has as a hostdev.
    wait_for(lambda: nodedev_driver(nic) == "vfio-pci", 30, "nodedev showing vfio-pci")
    for verb in ("nodedev-reattach", "nodedev-detach"):
        out = virsh(verb, nodedev(nic), check=False)
        assert out.returncode != 0
        assert f"PCI device {nic} is in use by driver QEMU, domain aahooked" in out.stderr
    assert driver(nic) == "vfio-pci"
    assert node in qemu_fds(pid)
    destroy("aahooked")
    wait_for(lambda: driver(nic) == "e1000e", 30, "the NIC back on e1000e")
    wait_for(lambda: nodedev_driver(nic) == "e1000e", 30, "nodedev showing e1000e")
    assert status() == []


@pytest.mark.timeout(1200)
def test_fds_from_the_agent_reach_a_confined_qemu(
    topology: Topology, agent: AgentProcess, tmp_path: Path
) -> None:
    edu0 = topology.guest_address("edu0")
    done = create(tmp_path, "aabyfd", paused=False, metadata=metadata(f"{edu0} handoff=agent"))
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("aabyfd")
    label = profile_of(pid)
    assert label.endswith("(enforce)")
    cdev = cdev_of(edu0)
    wait_for(lambda: cdev in qemu_fds(pid), 180, f"QEMU holding {cdev}")
    assert "/dev/iommu" in qemu_fds(pid)
    # The profile lists neither file: QEMU could not open them by path. The
    # kernel let them in because kvmvfio's agent, which opened them, is
    # unconfined (a file an unconfined task opened is not checked again).
    profile = label.split()[0]
    assert not allows(profile, cdev)
    assert not allows(profile, "/dev/iommu")
    assert profile_of(agent.proc.pid if agent.proc else 0) == "unconfined"
    destroy("aabyfd")
    wait_for(lambda: driver(edu0) is None, 30, "edu0 back after the stop")
    wait_for(lambda: status() == [], 30, "the record of edu0 gone")
    assert "Traceback" not in agent.text()


@contextlib.contextmanager
def local_rule(line: str) -> Iterator[None]:
    """A line in libvirt-qemu's local abstraction (what an operator adds), removed after."""
    before = LOCAL_ABSTRACTION.read_text() if LOCAL_ABSTRACTION.exists() else None
    LOCAL_ABSTRACTION.parent.mkdir(parents=True, exist_ok=True)
    LOCAL_ABSTRACTION.write_text((before or "") + line + "\n")
    try:
        yield
    finally:
        if before is None:
            LOCAL_ABSTRACTION.unlink()
        else:
            LOCAL_ABSTRACTION.write_text(before)


def acl_users(node: str) -> list[str]:
    out = subprocess.run(["getfacl", "-cpn", node], capture_output=True, text=True, check=True)
    return [
        line for line in out.stdout.splitlines() if line.startswith("user:") and line != "user::rw-"
    ]


LAB_PROFILE = "kvmvfio-lab-qemu"
LAB_PROFILE_FILE = Path("/etc/apparmor.d") / LAB_PROFILE
# A launcher's own profile for its QEMU, built as libvirt's per-domain ones are
# (on libvirt's abstraction), plus what the lab's L2Qemu needs to start.
LAB_PROFILE_TEXT = f"""abi <abi/3.0>,
include <tunables/global>

profile {LAB_PROFILE} flags=(attach_disconnected) {{
  include <abstractions/libvirt-qemu>
  capability setuid,
  capability setgid,
  /usr/bin/setpriv rix,
  /usr/bin/qemu-system-x86_64 rix,
  /tmp/kvmvfio-l2-*/ r,
  /tmp/kvmvfio-l2-*/** rwk,
}}
"""


def _enter_lab_profile() -> None:
    # The next exec (setpriv, then QEMU) runs confined (change_onexec).
    with open("/proc/self/attr/apparmor/exec", "w") as f:
        f.write(f"exec {LAB_PROFILE}")


def _load(path: Path) -> None:
    subprocess.run(["apparmor_parser", "-r", str(path)], check=True, timeout=300)


@pytest.mark.timeout(900)
def test_the_group_path_to_a_confined_qemu_is_refused_with_the_rule_then_works_with_it(
    topology: Topology, vfio_bind: Callable[..., None]
) -> None:
    edu1 = topology.guest_address("edu1")
    vfio_bind(edu1)
    node = f"/dev/vfio/{group_of(edu1)}"
    LAB_PROFILE_FILE.write_text(LAB_PROFILE_TEXT)
    _load(LAB_PROFILE_FILE)
    qemu = L2Qemu(preexec_fn=_enter_lab_profile)
    try:
        assert profile_of(qemu.pid) == f"{LAB_PROFILE} (enforce)"
        assert not allows(LAB_PROFILE, node)
        where = ["--qmp", str(qemu.qmp), "--pid", str(qemu.pid), "--path", "group"]
        out = kvmvfio("attach", edu1, *where)
        assert out.returncode == 1, out.stderr
        assert (
            f"runs confined by the AppArmor profile {LAB_PROFILE}, which does not allow {node}"
            in out.stderr
        )
        assert "Use --path cdev (the files are then opened by kvmvfio and passed)" in out.stderr
        assert f"or add `{node} rw,` to the profile {LAB_PROFILE}, then reload it" in out.stderr
        assert "Traceback" not in out.stderr
        # Nothing was handed over: no grant on the node, nothing in QEMU.
        assert acl_users(node) == []
        assert node not in qemu_fds(qemu.pid)

        # The rule the refusal names, in libvirt's local abstraction that the
        # profile includes, and the profile reloaded: QEMU opens the node itself.
        with local_rule(f"  {node} rw,"):
            _load(LAB_PROFILE_FILE)
            assert allows(LAB_PROFILE, node)
            out = kvmvfio("attach", edu1, *where, "--json")
            assert out.returncode == 0, out.stderr
            assert [a["vfio_path"] for a in json.loads(out.stdout)["attached"]] == ["group"]
            assert node in qemu_fds(qemu.pid)
            assert acl_users(node) == [f"user:{NOBODY}:rw-"]
    finally:
        qemu.kill()
        subprocess.run(["setfacl", "-x", f"u:{NOBODY}", node], check=False)
        subprocess.run(["apparmor_parser", "-R", str(LAB_PROFILE_FILE)], check=False)
        LAB_PROFILE_FILE.unlink()


# -- udev and libvirt's node-device view ------------------------------------------------


def test_nodedev_sees_kvmvfio_move_a_device_and_reattach_takes_it_from_an_idle_claim(
    topology: Topology, clean: None
) -> None:
    nic = topology.guest_address("nic0")
    assert nodedev_driver(nic) == "e1000e"
    prepare([nic], "lab:distro")
    try:
        wait_for(lambda: nodedev_driver(nic) == "vfio-pci", 30, "nodedev showing vfio-pci")
        # An operator's `virsh nodedev-reattach` of a device kvmvfio holds for
        # no running VM: libvirt, as root, wins and puts it back on its driver.
        virsh("nodedev-reattach", nodedev(nic))
        assert driver(nic) == "e1000e"
        (held,) = status()
        assert held.owner == "lab:distro"  # kvmvfio's claim is still recorded
    finally:
        # ...and kvmvfio's release finds the device already where it puts it:
        # nothing is moved twice, the record is dropped.
        (back,) = release([nic], "lab:distro")
    assert back.driver == "e1000e"
    assert driver(nic) == "e1000e"
    assert status() == []
    wait_for(lambda: nodedev_driver(nic) == "e1000e", 30, "nodedev showing e1000e")
