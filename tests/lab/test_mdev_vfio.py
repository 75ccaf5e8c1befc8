"""Mediated devices opened through VFIO on the real kernel: each path, KVM, coherency, QEMU.

The kernel's sample ``mtty`` (built in to the lab kernel) is the parent: an
mdev of its type ``mtty-2`` is a PCI serial card with two ports (vendor
0x4348, device 0x3253). Each test makes its own with a plain sysfs write
and removes it. What is checked is what the kernel did: the files this
process or QEMU holds, the kvm pointer the device took at open (a kprobe
on ``vfio_device_get_kvm_safe``: what a vendor driver gets as
``vdev->kvm``), and the coherency answer KVM was given for the mdev's file
(a return probe on ``vfio_file_enforced_coherent``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from libvirtkit import AgentProcess, create, destroy, qemu_fds, wait_for
from vfiokit import fd_table, kprobe

from kvmvfio.errors import CoherencyRefused, MixedVfioBackends
from kvmvfio.kvm import KvmVfioDevice
from kvmvfio.lab.l2 import L2Qemu
from kvmvfio.libvirt.metadata import NAMESPACE
from kvmvfio.libvirt.monitor import qemu_pid
from kvmvfio.prepare import status
from kvmvfio.qemu import Qemu, attach, coldplug, detach, qdev_id
from kvmvfio.vfio import VfioSession

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

HOOK_LOG = Path("/var/log/kvmvfio/hook.log")
MTTY2 = Path("/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2")
MDEVS = Path("/sys/bus/mdev/devices")
#: mtty's PCI identity, as the L2 guest's uevents name it (vendor:device).
MTTY_ID = "4348:3253"
BACKENDS = ("group", "group-iommufd", "cdev")


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _group(uid: str) -> int:
    return int(os.path.basename(os.readlink(MDEVS / uid / "iommu_group")))


def _cdev(uid: str) -> str:
    (name,) = os.listdir(MDEVS / uid / "vfio-dev")
    return f"/dev/vfio/devices/{name}"


@pytest.fixture
def make_mtty() -> Iterator[Callable[[], str]]:
    """Make mtty-2 mdevs by a plain sysfs write; every one is removed afterwards."""
    made: list[str] = []

    def make() -> str:
        uid = str(uuid.uuid4())
        _write(MTTY2 / "create", uid)
        made.append(uid)
        return uid

    yield make
    for uid in made:
        if (MDEVS / uid).exists():
            _write(MDEVS / uid / "remove", "1")


@pytest.fixture
def coherency_told() -> Iterator[Callable[[], list[int]]]:
    """A return probe on ``vfio_file_enforced_coherent``: what KVM is told per VFIO file added."""
    definition = "r:kvmvfio_cc vfio_file_enforced_coherent ret=$retval:u8"
    with kprobe("kvmvfio_cc", definition, "ret") as seen:
        yield seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_mdev_opens_on_each_path_with_the_vms_kvm(
    backend: str,
    make_mtty: Callable[[], str],
    kvm: KvmVfioDevice,
    kvm_probe: Callable[[], list[int]],
    no_fd_leak: None,
) -> None:
    uid = make_mtty()
    with VfioSession([uid], backend=backend, kvm=kvm, coherency="warn") as session:
        report = session.report()
        (dev,) = report.devices
        assert dev.address == uid
        assert dev.group == _group(uid)
        assert dev.info.is_pci  # mtty's device API: vfio-pci
        assert report.kvm_associated
        held = set(fd_table().values())
        if backend == "cdev":
            assert _cdev(uid) in held
            assert f"/dev/vfio/{_group(uid)}" not in held
        else:
            assert f"/dev/vfio/{_group(uid)}" in held
        assert session.coherent is False
        assert session.unsafe == [
            f"mediated device {uid} (it has no IOMMU of its own): the IOMMU does not enforce "
            "DMA cache coherency"
        ]
    # The open took the VM's kvm: what an mdev vendor driver finds in vdev->kvm.
    # No scratch open came before it (the mdev's coherency answer needs none).
    assert kvm_probe() != []
    assert all(seen != 0 for seen in kvm_probe())


def test_kvm_is_told_an_mdev_is_not_coherent(
    make_mtty: Callable[[], str],
    kvm: KvmVfioDevice,
    coherency_told: Callable[[], list[int]],
) -> None:
    uid = make_mtty()
    with pytest.raises(CoherencyRefused, match=f"mediated device {uid}"):
        VfioSession([uid], backend="cdev", kvm=kvm, coherency="require").open()
    with VfioSession([uid], backend="cdev", kvm=kvm, coherency="warn") as session:
        assert session.coherent is False
    # KVM_DEV_VFIO_FILE_ADD of the mdev's cdev: the kernel told KVM 0 (not
    # enforced), as the plan said without asking a scratch IOAS (which has no
    # domain for an mdev and answers "coherent").
    assert coherency_told() != []
    assert set(coherency_told()) == {0}


def test_check_takes_a_uuid(make_mtty: Callable[[], str]) -> None:
    uid = make_mtty()
    done = subprocess.run(
        ["kvmvfio", "check", uid.upper(), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (dev,) = json.loads(done.stdout)["plan"]["devices"]
    assert (dev["address"], dev["mdev"], dev["coherent"]) == (uid, True, False)
    bad = subprocess.run(
        ["kvmvfio", "check", uid[:-1] + "x"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2
    assert "is not a mediated device's UUID" in bad.stderr
    assert "Traceback" not in bad.stderr
    gone = subprocess.run(
        ["kvmvfio", "check", str(uuid.uuid4())], capture_output=True, text=True, check=False
    )
    assert gone.returncode != 0
    assert "no mediated device" in gone.stderr


async def test_mdevs_reach_an_unprivileged_guest_one_backend_at_a_time(
    make_mtty: Callable[[], str],
) -> None:
    by_fd, by_group = make_mtty(), make_mtty()
    l2 = L2Qemu.booted(ports=2, acpi_hotplug=True)
    try:
        since = l2.wait_pci_events(MTTY_ID, (0, 0), timeout=0)
        async with Qemu(l2.qmp, pid=l2.pid) as qemu:
            (fd,) = await attach(qemu, [by_fd], path="cdev")
            assert fd.path == "cdev"
            assert _cdev(by_fd) in l2.fds()  # QEMU (nobody) holds the cdev, given by fd
            assert fd.qdev_id == qdev_id(by_fd) == f"kvmvfio-mdev-{by_fd}"
            # The guest's kernel enumerated the mtty card.
            assert l2.wait_pci_events(MTTY_ID, (1, 0), since=since, timeout=120) == (1, 0)
            # QEMU 10.0 aborts on a legacy-container device beside an iommufd one
            # ("is not an instance of type vfio-iommu-legacy"): refused, the VM lives.
            with pytest.raises(MixedVfioBackends, match="already has VFIO devices on the cdev"):
                await attach(qemu, [by_group], path="group")
            assert await qemu.execute("query-status") is not None
            assert f"/dev/vfio/{_group(by_group)}" not in l2.fds()
            # auto follows the backend QEMU uses.
            (auto,) = await attach(qemu, [by_group])
            assert auto.path == "cdev"
            await detach(qemu, [by_fd, by_group], timeout=120)
            assert _cdev(by_fd) not in l2.fds()
            # With no VFIO device left, the group path is free to take.
            (grp,) = await attach(qemu, [by_group], path="group")
            assert grp.path == "group"
            assert f"/dev/vfio/{_group(by_group)}" in l2.fds()  # opened through a grant
            await detach(qemu, [by_group], timeout=120)
    finally:
        l2.kill()


@pytest.mark.timeout(1200)
def test_libvirt_starts_a_domain_with_mdevs_through_the_hook_and_agent(
    make_mtty: Callable[[], str], agent: AgentProcess, tmp_path: Path
) -> None:
    by_libvirt, by_agent = make_mtty(), make_mtty()
    meta = (
        f'<kvmvfio:devices xmlns:kvmvfio="{NAMESPACE}" coherency="warn">'
        f'<kvmvfio:device address="{by_libvirt}"/>'
        f'<kvmvfio:device address="{by_agent}" handoff="agent"/></kvmvfio:devices>'
    )
    done = create(tmp_path, "mdevs", paused=False, metadata=meta, hostdevs=[by_libvirt])
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("mdevs")
    # libvirt's QEMU opened the first mdev's group itself (the hook checked it);
    # the agent would give the second by fd, on iommufd: beside a legacy device
    # that would kill QEMU 10.0, so it refuses and says so, and the VM lives.
    assert f"/dev/vfio/{_group(by_libvirt)}" in qemu_fds(pid)
    assert f"{by_libvirt} (libvirt, group)" in HOOK_LOG.read_text()
    wait_for(lambda: "MixedVfioBackends" in agent.text() or "would mix" in agent.text(), 120,
             "the agent's refusal")  # fmt: skip
    assert _cdev(by_agent) not in qemu_fds(pid)
    destroy("mdevs")
    wait_for(lambda: not (Path("/proc") / str(pid)).exists(), 60, "QEMU gone")
    # Alone, the agent's mdev goes by fd.
    alone = meta.replace(f'<kvmvfio:device address="{by_libvirt}"/>', "")
    done = create(tmp_path, "mdev1", paused=False, metadata=alone)
    assert done.returncode == 0, done.stderr
    pid = qemu_pid("mdev1")
    wait_for(lambda: _cdev(by_agent) in qemu_fds(pid), 120, "QEMU holding the agent's mdev")
    time.sleep(6)  # more than one resync: the agent reads back its record of the mdev
    assert "Traceback" not in agent.text()
    assert "unusable" not in agent.text()
    assert agent.text().count(f"attached {by_agent} by fd") == 1
    destroy("mdev1")
    wait_for(lambda: not (Path("/proc") / str(pid)).exists(), 60, "QEMU gone")
    # A domain asking for an mdev that does not exist does not start, and says why.
    missing = str(uuid.uuid4())
    bad_meta = (
        f'<kvmvfio:devices xmlns:kvmvfio="{NAMESPACE}">'
        f'<kvmvfio:device address="{missing}" handoff="agent"/></kvmvfio:devices>'
    )
    bad = create(tmp_path, "nomdev", metadata=bad_meta)
    assert bad.returncode != 0
    assert "no mediated device" in bad.stderr
    assert status() == []  # nothing was moved for an mdev, nothing is left claimed


async def test_cold_plug_starts_qemu_with_an_mdev(make_mtty: Callable[[], str]) -> None:
    uid = make_mtty()
    with coldplug([uid], buses=["rp0"]) as plug:
        assert f"sysfsdev=/sys/bus/mdev/devices/{uid}" in " ".join(plug.args)
        qemu = L2Qemu(ports=1, extra=plug.args, pass_fds=plug.pass_fds)
    try:
        assert qemu.proc.poll() is None, qemu.stderr.read_text()
        async with Qemu(qemu.qmp, pid=qemu.pid) as qmp:  # answers once devices are realized
            peripherals = {i.name for i in await qmp.qom_list("/machine/peripheral")}
        assert qdev_id(uid) in peripherals
        held = qemu.fds()
        assert _cdev(uid) in held
        assert "anon_inode:kvm-vfio" in held
    finally:
        qemu.kill()
