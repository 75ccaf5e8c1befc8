"""kvmvfio with a real libvirtd in L1: the hook, the agent, attach/detach by virDomain.

libvirtd (trixie's 11.3) runs with kvmvfio's hook installed in
``/etc/libvirt/hooks/qemu.d/``; domains are of type kvm (nested KVM in L1)
and boot L1's kernel. Each test checks the kernel's view (drivers, what
QEMU's process holds) and libvirt's (whether the domain runs, its error).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from libvirtkit import HOOKS, AgentProcess, create, destroy, metadata, qemu_fds, wait_for
from vfiokit import cdev_of, driver, group_of

from kvmvfio.lab.libvirtd import Libvirtd, virsh, wait_guest
from kvmvfio.lab.topology import Topology
from kvmvfio.libvirt.metadata import NAMESPACE, DevicePath, DeviceRequest, Handoff, to_xml
from kvmvfio.libvirt.monitor import qemu_pid
from kvmvfio.prepare import status
from kvmvfio.qemu.handoff import qdev_id

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

PCI = Path("/sys/bus/pci/devices")
HOOK_LOG = Path("/var/log/kvmvfio/hook.log")


# -- the hook ----------------------------------------------------------------------------


def test_hook_prepares_the_nic_for_the_domain_and_gives_it_back(
    topology: Topology, clean: None, tmp_path: Path
) -> None:
    nic = topology.guest_address("nic0")
    assert driver(nic) == "e1000e"
    done = create(tmp_path, "hooked", metadata=metadata(f"{nic} reset=yes"), hostdevs=[nic])
    assert done.returncode == 0, done.stderr
    # The hook moved it before libvirt looked at the hostdev; libvirt's QEMU
    # opened the group itself (handoff="libvirt", the group path).
    assert driver(nic) == "vfio-pci"
    (held,) = status()
    assert held.owner == "libvirt:hooked"
    assert [e.address for e in held.devices] == [nic]
    assert f"/dev/vfio/{group_of(nic)}" in qemu_fds(qemu_pid("hooked"))
    destroy("hooked")
    wait_for(lambda: driver(nic) == "e1000e", 30, "the NIC back on e1000e")
    assert status() == []
    wait_for(lambda: bool(os.listdir(PCI / nic / "net")), 10, "its netdev back")
    log = HOOK_LOG.read_text()
    assert f"domain hooked: {nic} back on e1000e after a reset" in log


@pytest.mark.timeout(900)
def test_the_agent_serves_the_hook_and_without_it_python_does(
    topology: Topology,
    agent: AgentProcess,
    tmp_path: Path,
    vfio_bind: Callable[..., None],
) -> None:
    nic = topology.guest_address("nic0")
    wait_for(lambda: "serving the libvirt hook" in agent.text(), 120, "the agent serving")
    hook_log = HOOK_LOG.read_text() if HOOK_LOG.exists() else ""
    # Served: the agent prepares the NIC, libvirt's QEMU opens its group.
    done = create(tmp_path, "served", metadata=metadata(f"{nic} reset=yes"), hostdevs=[nic])
    assert done.returncode == 0, done.stderr
    assert driver(nic) == "vfio-pci"
    (held,) = status()
    assert held.owner == "libvirt:served"
    assert f"/dev/vfio/{group_of(nic)}" in qemu_fds(qemu_pid("served"))
    assert "domain served prepare begin served (status 0" in agent.text()
    destroy("served")
    wait_for(lambda: driver(nic) == "e1000e", 30, "the NIC back on e1000e")
    wait_for(lambda: status() == [], 30, "the journal empty")
    wait_for(lambda: "domain served release end served (status 0" in agent.text(), 30, "release")
    # The hook's own decisions, logged by the agent; no hook process logged any.
    assert f"domain served: {nic} back on e1000e after a reset" in agent.text()
    new = (HOOK_LOG.read_text() if HOOK_LOG.exists() else "")[len(hook_log) :]
    assert "domain served" not in new
    # A refusal served by the agent reaches libvirt's error, the host untouched.
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    vfio_bind(edu3, driver="pci-pf-stub")
    before = (driver(edu2), driver(edu3))
    done = create(tmp_path, "greedy", metadata=metadata(f"{edu2} handoff=none"))
    assert done.returncode != 0
    assert f"kvmvfio: IOMMU group {group_of(edu2)} is not viable" in done.stderr
    assert "domain greedy prepare begin served (status 1" in agent.text()
    assert (driver(edu2), driver(edu3)) == before
    assert status() == []
    # The agent killed (its pid file left behind, naming a dead process): Python again.
    agent.kill()
    done = create(tmp_path, "fallback", metadata=metadata(nic), hostdevs=[nic])
    assert done.returncode == 0, done.stderr
    assert driver(nic) == "vfio-pci"
    destroy("fallback")
    wait_for(lambda: driver(nic) == "e1000e", 30, "the NIC back on e1000e after the fallback")
    wait_for(lambda: status() == [], 30, "the journal empty after the fallback")
    new = (HOOK_LOG.read_text() if HOOK_LOG.exists() else "")[len(hook_log) :]
    assert "domain fallback: prepare begin" in new
    assert f"domain fallback: {nic} back on e1000e" in new
    assert "domain fallback" not in agent.text()
    assert "Traceback" not in agent.text()


def test_hook_refuses_a_group_with_an_unlisted_member_on_a_host_driver(
    topology: Topology, clean: None, tmp_path: Path, vfio_bind: Callable[..., None]
) -> None:
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    vfio_bind(edu3, driver="pci-pf-stub")  # a host driver VFIO cannot share a group with
    before = (driver(edu2), driver(edu3))
    done = create(tmp_path, "greedy", metadata=metadata(f"{edu2} handoff=agent"))
    assert done.returncode != 0
    # libvirt's error carries the hook's sentence.
    assert f"IOMMU group {group_of(edu2)} is not viable" in done.stderr
    assert f"{edu3} (on host driver pci-pf-stub" in done.stderr
    assert "Traceback" not in done.stderr
    assert virsh("domstate", "greedy", check=False).returncode != 0  # not running
    assert (driver(edu2), driver(edu3)) == before
    assert status() == []


def test_hook_refuses_a_hostdev_rom_file_that_is_not_the_devices(
    topology: Topology, clean: None, tmp_path: Path
) -> None:
    edu0, nic = topology.guest_address("edu0"), topology.guest_address("nic0")
    # The e1000e's own option ROM (iPXE, 8086:10d3), read as kvmvfio reads ROMs.
    (PCI / nic / "rom").write_text("1")
    try:
        data = (PCI / nic / "rom").read_bytes()
    finally:
        (PCI / nic / "rom").write_text("0")
    assert data[:2] == b"\x55\xaa"
    wrong = tmp_path / "efi-e1000e.rom"
    wrong.write_bytes(data)
    before = driver(edu0)
    done = create(
        tmp_path, "romfile", metadata=metadata(edu0), hostdevs=[edu0], roms={edu0: str(wrong)}
    )
    assert done.returncode != 0
    assert f"{wrong} is not an option ROM for {edu0}: image 0 is for 8086:10d3" in done.stderr
    assert "Traceback" not in done.stderr
    assert virsh("domstate", "romfile", check=False).returncode != 0
    assert driver(edu0) == before
    assert status() == []


@pytest.mark.topology("default", "coherent")
def test_hook_applies_the_coherency_policy(
    topology: Topology, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    edu1 = topology.guest_address("edu1")
    done = create(
        tmp_path, "coherent", metadata=metadata(f"{edu1} handoff=agent", coherency="require")
    )
    try:
        if topology.snoop_control:
            assert done.returncode == 0, done.stderr
            assert driver(edu1) == "vfio-pci"
        else:
            assert done.returncode != 0
            assert "cannot have enforced DMA cache coherency" in done.stderr
            assert edu1 in done.stderr
            assert driver(edu1) is None  # put back as it was: edu has no L1 driver
            assert status() == []
    finally:
        destroy("coherent")
    wait_for(lambda: driver(edu1) is None, 30, "edu1 back on no driver")
    assert status() == []


HOSTILE = {
    "entity bomb": (
        '<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
        '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        f'<domain><name>vm</name><metadata><k:devices xmlns:k="{NAMESPACE}">&c;'
        "</k:devices></metadata></domain>",
        "DOCTYPE",
    ),
    "external entity": (
        '<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/shadow">]>'
        f'<domain><name>vm</name><metadata><k:devices xmlns:k="{NAMESPACE}">&x;'
        "</k:devices></metadata></domain>",
        "DOCTYPE",
    ),
    "bad address": (
        f'<domain><name>vm</name><metadata><k:devices xmlns:k="{NAMESPACE}">'
        '<k:device address="../../../x" handoff="agent"/></k:devices></metadata></domain>',
        "contains a path separator",
    ),
    "unknown attribute": (
        f'<domain><name>vm</name><metadata><k:devices xmlns:k="{NAMESPACE}">'
        '<k:device address="00:03.0" handoff="agent" coherncy="require"/>'
        "</k:devices></metadata></domain>",
        "unknown attribute 'coherncy'",
    ),
    "not XML": (f"<domain><name>vm</name><metadata {NAMESPACE}", "not well formed"),
    "huge": (f"<domain><name>vm</name><!-- {NAMESPACE} -->" + "x" * (20 << 20), "bytes"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_the_installed_hook_refuses_hostile_xml_and_changes_nothing(
    topology: Topology, libvirtd: Libvirtd, case: str
) -> None:
    xml, expected = HOSTILE[case]
    edus = [topology.guest_address(e) for e in ("edu0", "edu1")]
    before = [driver(a) for a in edus]
    done = subprocess.run(
        [str(HOOKS / "qemu.d" / "kvmvfio"), "vm", "prepare", "begin", "-"],
        input=xml.encode(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert expected in stderr
    assert stderr.startswith("kvmvfio: domain 'vm': ") or stderr.startswith("kvmvfio: the domain")
    assert "Traceback" not in stderr
    assert done.stdout == b""
    assert [driver(a) for a in edus] == before
    assert status() == []


def test_metadata_accepts_a_named_finding_and_the_refusal_says_how(
    topology: Topology, clean: None, tmp_path: Path
) -> None:
    nic = topology.guest_address("nic0")
    iface = os.listdir(PCI / nic / "net")[0]
    subprocess.run(["ip", "link", "set", iface, "up"], check=True)
    subprocess.run(["ip", "route", "add", "default", "dev", iface], check=True)
    try:
        refused = create(tmp_path, "routed", metadata=metadata(nic), hostdevs=[nic])
        assert refused.returncode != 0
        assert f"carries the default route ({iface})" in refused.stderr
        # The advice a libvirt user can follow: an attribute, not a CLI flag.
        assert (
            "Add accept='default-route' to the device's <kvmvfio:device> element in the "
            "domain's metadata to accept that"
        ) in refused.stderr
        assert driver(nic) == "e1000e"
        assert status() == []
        done = create(
            tmp_path, "routed", metadata=metadata(f"{nic} accept=default-route"), hostdevs=[nic]
        )
        assert done.returncode == 0, done.stderr
        assert driver(nic) == "vfio-pci"
        assert (
            f"{nic}: carries the default route ({iface}) (accepted by "
            "accept='default-route' in the domain's metadata)"
        ) in HOOK_LOG.read_text()
        destroy("routed")
        wait_for(lambda: driver(nic) == "e1000e", 30, "the NIC back on e1000e")
    finally:
        destroy("routed")
        subprocess.run(["ip", "route", "del", "default"], check=False)


# -- recover beside running domains -----------------------------------------------------


def test_recover_leaves_a_running_domain_alone_and_restores_a_killed_one(
    topology: Topology, clean: None, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    """Both claims were made by the hook; libvirtd dies, then one domain's QEMU."""
    edu0, edu1 = topology.guest_address("edu0"), topology.guest_address("edu1")
    for name, edu in (("alive", edu0), ("killed", edu1)):
        done = create(tmp_path, name, metadata=metadata(edu), hostdevs=[edu])
        assert done.returncode == 0, done.stderr
    assert (driver(edu0), driver(edu1)) == ("vfio-pci", "vfio-pci")
    alive_pid, killed_pid = qemu_pid("alive"), qemu_pid("killed")
    # No libvirtd: nobody runs the release hook for the killed domain, as
    # after a host-wide crash of the management stack.
    libvirtd.stop()
    try:
        os.kill(killed_pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{killed_pid}").exists(), 30, "the killed QEMU gone")
        by_owner = {g.owner: g for g in status()}
        assert by_owner["libvirt:alive"].alive
        assert f"pid {alive_pid} (qemu-system-x86" in by_owner["libvirt:alive"].why
        assert not by_owner["libvirt:killed"].alive
        assert by_owner["libvirt:killed"].why.startswith("libvirt domain killed is not running")
        cli = subprocess.run(
            ["kvmvfio", "recover"], capture_output=True, text=True, timeout=120, check=False
        )
        assert cli.returncode == 0, cli.stderr
        assert f"recover: {edu1} back on no driver" in cli.stdout
        assert f"recover: left IOMMU group {group_of(edu0)} to libvirt:alive" in cli.stdout
        # The kernel's view: the killed domain's device left vfio-pci, the
        # running one's is still on it and still open in its QEMU.
        assert driver(edu1) is None
        assert driver(edu0) == "vfio-pci"
        assert f"/dev/vfio/{group_of(edu0)}" in qemu_fds(alive_pid)
        assert [g.owner for g in status()] == ["libvirt:alive"]
    finally:
        libvirtd.start()
    destroy("alive")
    wait_for(lambda: driver(edu0) is None, 30, "edu0 back on no driver")
    # The record goes last, after the driver is back: wait for it too.
    wait_for(lambda: status() == [], 30, "the record of edu0 gone")


# -- the agent and the API ----------------------------------------------------------------


def agent_status() -> tuple[int, dict[str, Any]]:
    """``kvmvfio agent status --json``: its exit status and document."""
    out = subprocess.run(
        [sys.executable, "-m", "kvmvfio", "agent", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Traceback" not in out.stderr
    assert out.returncode in (0, 3), out.stderr
    return out.returncode, json.loads(out.stdout)


def agent_action(domain: str, address: str) -> str | None:
    """The last action `agent status` gives for ``address`` in ``domain``."""
    seen = agent_device(domain, address)
    return None if seen is None else str(seen["action"])


def agent_device(domain: str, address: str) -> dict[str, Any] | None:
    """What the running agent's status says of ``address`` in ``domain`` (None: not running)."""
    code, doc = agent_status()
    if code != 0:
        return None
    for dom in doc["agent"]["domains"]:
        if dom["name"] == domain:
            return next((d for d in dom["devices"] if d["address"] == address), None)
    return None


def set_live(name: str, *devices: DeviceRequest) -> None:
    """What a user does to change a running domain's devices: ``virsh metadata --live``."""
    xml = to_xml(devices, naked=True)
    virsh("metadata", name, NAMESPACE, "--live", "--key", "kvmvfio", "--set", xml)


@pytest.mark.timeout(1200)
def test_agent_hands_a_device_by_fd_and_takes_it_back_across_restarts(
    topology: Topology, agent: AgentProcess, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    edu0 = topology.guest_address("edu0")
    done = create(tmp_path, "byfd", paused=False, metadata=metadata(f"{edu0} handoff=agent"))
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("byfd")
    cdev = cdev_of(edu0)  # the hook put it on vfio-pci

    def held() -> bool:
        return cdev in qemu_fds(pid)

    wait_for(held, 120, f"QEMU holding {cdev}")
    fds = qemu_fds(pid)
    assert "/dev/iommu" in fds
    assert f"/dev/vfio/{group_of(edu0)}" not in fds  # by fd: QEMU opened no group itself
    # ...nor could it: the cdev is root's only.
    assert os.stat(cdev).st_uid == 0
    assert os.stat(cdev).st_mode & 0o077 == 0
    assert driver(edu0) == "vfio-pci"
    # `agent status` says so: handed over, QEMU holds it, nothing refused.
    wait_for(lambda: agent_action("byfd", edu0) == "attached", 30, "edu0 attached in status")
    seen = agent_device("byfd", edu0)
    assert seen is not None
    assert (seen["action"], seen["held"], seen["wanted"]) == ("attached", True, True)
    assert (seen["handoff"], seen["path"], seen["refusal"]) == ("agent", "cdev", None)

    # The agent dies and comes back: nothing attached twice, nothing lost.
    dead = agent.proc.pid if agent.proc else 0
    agent.kill()
    code, doc = agent_status()
    assert (code, doc["running"]) == (3, False)
    assert doc["why"] == f"process {dead} has exited"
    assert doc["agent"]["pid"] == dead  # its last status is still shown
    agent.start()
    wait_for(lambda: agent.text().count("connected to libvirt") >= 2, 120, "agent back")
    time.sleep(8)  # more than one resync
    assert qemu_fds(pid).count(cdev) == 1
    # The new agent found it in QEMU, already recorded: nothing to do.
    seen = agent_device("byfd", edu0)
    assert seen is not None
    assert (seen["action"], seen["held"]) == ("unchanged", True)
    # libvirtd restarts: the agent reconnects; QEMU still holds the device.
    libvirtd.restart()
    wait_for(lambda: agent.text().count("connected to libvirt") >= 3, 120, "agent reconnected")
    assert held()
    assert [s.owner for s in status()] == ["libvirt:byfd"]

    # Taken out of the live metadata: unplugged (the guest must answer) and released.
    wait_guest("byfd", timeout=600)
    set_live("byfd")
    wait_for(lambda: not held(), 180, f"QEMU letting go of {cdev}")
    wait_for(lambda: driver(edu0) is None, 30, "edu0 back on no driver")
    # The record goes last, after the driver is back: wait for it too.
    wait_for(lambda: status() == [], 30, "the record of edu0 gone")
    wait_for(lambda: agent_action("byfd", edu0) == "released", 30, "edu0 released in status")
    seen = agent_device("byfd", edu0)
    assert seen is not None
    assert (seen["action"], seen["held"], seen["wanted"]) == ("released", False, False)
    # ...and back in: attached again at once.
    set_live("byfd", DeviceRequest(edu0, Handoff.AGENT, DevicePath.CDEV))
    wait_for(held, 120, f"QEMU holding {cdev} again")

    # The domain stops while the agent is down: the hook gives the device back.
    agent.kill()
    destroy("byfd")
    wait_for(lambda: driver(edu0) is None, 30, "edu0 back after the stop")
    wait_for(lambda: status() == [], 30, "the record of edu0 gone after the stop")
    assert "Traceback" not in agent.text()


@pytest.mark.timeout(1200)
def test_python_api_attaches_and_detaches_by_virdomain(
    topology: Topology, clean: None, tmp_path: Path, vfio_bind: Callable[..., None]
) -> None:
    import libvirt  # noqa: PLC0415 (lab only)

    from kvmvfio.libvirt import monitor  # noqa: PLC0415

    edu1 = topology.guest_address("edu1")
    vfio_bind(edu1)
    done = create(tmp_path, "api", paused=False)
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("api")
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName("api")
        (att,) = asyncio.run(monitor.attach(dom, [edu1]))
        assert att.path == "cdev"
        assert cdev_of(edu1) in qemu_fds(pid)
        qom_list = '{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}'
        reply = json.loads(virsh("qemu-monitor-command", "api", qom_list).stdout)
        assert qdev_id(edu1) in {p["name"] for p in reply["return"]}
        wait_guest("api", timeout=600)
        gone = asyncio.run(monitor.detach(dom, [edu1], timeout=180))
        assert gone == [qdev_id(edu1)]
        assert cdev_of(edu1) not in qemu_fds(pid)

        # The same from the command line: kvmvfio attach/detach --domain.
        cli = [sys.executable, "-m", "kvmvfio"]
        out = subprocess.run(
            [*cli, "attach", edu1, "--domain", "api", "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["qemu_pid"] == pid
        assert [a["path"] for a in doc["attached"]] == ["iommufd"]  # the old spelling, kept
        assert [a["vfio_path"] for a in doc["attached"]] == ["cdev"]
        assert cdev_of(edu1) in qemu_fds(pid)
        out = subprocess.run(
            [*cli, "detach", edu1, "--domain", "api", "--timeout", "180"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"detached {qdev_id(edu1)} from QEMU pid {pid}"
        assert cdev_of(edu1) not in qemu_fds(pid)
        out = subprocess.run(
            [*cli, "attach", edu1, "--domain", "nosuch"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 2
        assert "libvirt at qemu:///system has no domain named 'nosuch'" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        conn.close()
        destroy("api")
