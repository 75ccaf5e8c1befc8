"""Pinned memory of several unprivileged QEMUs of one uid, on iommufd, for real.

iommufd charges what it pins, by default, to the pinning process's *user*
and checks the sum against that process's RLIMIT_MEMLOCK. kvmvfio makes
every iommufd it opens for a QEMU charge QEMU's own process instead
(``IOMMU_OPTION_RLIMIT_MODE``). Here two paused L2 QEMUs of uid 65534, with
128 MiB of RAM each and each allowed to lock its own RAM plus a little,
get an edu device each: with kvmvfio's setting both get theirs; with the
kernel's default (kvmvfio's lower-level steps, told to leave it) the
second one's device_add fails to pin its RAM. docs/qemu.md records both.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from vfiokit import assert_released, cdev_of

from kvmvfio.errors import QemuRefused
from kvmvfio.host import Host
from kvmvfio.lab.l2 import L2Qemu
from kvmvfio.lab.topology import Topology
from kvmvfio.qemu import Qemu, attach, handoff, qdev_id
from kvmvfio.qemu.handoff import memlock_limit
from kvmvfio.vfio.iommufd import Iommufd, RlimitMode, RlimitModeRefused, get_rlimit_mode

pytestmark = [pytest.mark.lab, pytest.mark.topology("default"), pytest.mark.timeout(900)]

#: Each L2 guest's RAM: two of them pin 256 MiB of L1's 2 GiB.
RAM = 128 << 20
#: What each QEMU may lock beyond its RAM here (kvmvfio's default margin is 1 GiB,
#: under which two 128 MiB guests would fit one user's limit and prove nothing).
SLACK = 16 << 20
#: Pinned pages of a guest, in KiB, at least: its RAM less the legacy holes below 1 MiB.
PINNED_KIB = (RAM - (1 << 20)) >> 10
_SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike


@pytest.fixture
def edus(topology: Topology, vfio_bind: Callable[..., None]) -> tuple[str, str]:
    a, b = topology.guest_address("edu0"), topology.guest_address("edu1")
    vfio_bind(a, b)
    return a, b


@pytest.fixture
def qemus(edus: tuple[str, str]) -> Iterator[tuple[L2Qemu, L2Qemu]]:
    """Two paused L2 QEMUs as uid 65534, 128 MiB each (a later ``-m`` wins)."""
    pair = (L2Qemu(ports=1, extra=["-m", "128"]), L2Qemu(ports=1, extra=["-m", "128"]))
    try:
        yield pair
    finally:
        for qemu in pair:
            qemu.kill()
        for addr in edus:
            assert_released(addr)


@pytest.fixture(autouse=True)
def tight_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # ensure_memlock raises each QEMU's limit to its RAM plus this.
    monkeypatch.setattr(handoff, "MEMLOCK_MARGIN", SLACK)


def vm_kib(pid: int) -> dict[str, int]:
    """VmLck (mm->locked_vm) and VmPin (mm->pinned_vm) of ``pid``, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmLck", "VmPin"):
                out[key] = int(value.split()[0])
    return out


def qemu_iommufd_mode(qemu: L2Qemu) -> RlimitMode:
    """The accounting mode of the /dev/iommu file QEMU holds (read through a pidfd_getfd copy)."""
    fd_dir = f"/proc/{qemu.pid}/fd"
    (target,) = [int(n) for n in os.listdir(fd_dir) if os.readlink(f"{fd_dir}/{n}") == "/dev/iommu"]
    pidfd = os.pidfd_open(qemu.pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    try:
        return get_rlimit_mode(fd)
    finally:
        os.close(fd)


async def _shows(qemu: L2Qemu, addr: str) -> bool:
    """Whether QEMU's own QOM tree has kvmvfio's vfio-pci device for ``addr``."""
    async with Qemu(qemu.qmp, pid=qemu.pid) as qmp:
        peripherals = {i.name: i.type for i in await qmp.qom_list("/machine/peripheral")}
    return peripherals.get(qdev_id(addr)) == "child<vfio-pci>"


async def test_qemus_of_one_uid_each_pin_their_own_ram(
    qemus: tuple[L2Qemu, L2Qemu], edus: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvmvfio")
    assert 2 * RAM > RAM + SLACK  # one user's limit could not hold both
    for qemu, addr in zip(qemus, edus, strict=True):
        async with Qemu(qemu.qmp, pid=qemu.pid) as qmp:
            summary = await qmp.execute("query-memory-size-summary")
            assert isinstance(summary, dict)
            assert summary["base-memory"] == RAM
            (done,) = await attach(qmp, [addr])
        assert done.path == "cdev"
        assert memlock_limit(qemu.pid) == RAM + SLACK
        assert f"iommufd for QEMU pid {qemu.pid}: pinned memory counted per process" in caplog.text
        assert qemu_iommufd_mode(qemu) is RlimitMode.PROCESS
        # Charged to QEMU's own mm (locked_vm), as VFIO's type1 container does.
        kib = vm_kib(qemu.pid)
        print(f"QEMU pid {qemu.pid}, per-process accounting: {kib}")  # the record
        assert kib["VmLck"] >= PINNED_KIB, kib
        assert kib["VmPin"] >= PINNED_KIB, kib
    for qemu, addr in zip(qemus, edus, strict=True):
        assert await _shows(qemu, addr)
        assert cdev_of(addr) in qemu.fds()


async def test_without_the_option_the_second_qemu_cannot_pin_its_ram(
    qemus: tuple[L2Qemu, L2Qemu], edus: tuple[str, str]
) -> None:
    """For the record: kvmvfio's own steps, told to leave the kernel's per-user default."""
    host = Host()
    results: list[QemuRefused | None] = []
    for qemu, addr in zip(qemus, edus, strict=True):
        async with Qemu(qemu.qmp, pid=qemu.pid) as qmp:
            await handoff.ensure_memlock(qmp)
            await handoff._ensure_iommufd_object(qmp, host.devfs, accounting=None)
            try:
                plan = await handoff.plan_attach(qmp, [addr], path="cdev", host=host)
                await handoff._attach_fd(qmp, plan, plan.device(addr), "rp0")
                results.append(None)
            except QemuRefused as err:
                results.append(err)
        assert memlock_limit(qemu.pid) == RAM + SLACK
        assert qemu_iommufd_mode(qemu) is RlimitMode.USER
    first, second = qemus
    assert results[0] is None
    assert await _shows(first, edus[0])
    # Charged to uid 65534 (user->locked_vm), not to QEMU's mm: VmLck stays 0.
    kib = vm_kib(first.pid)
    print(f"first QEMU, per-user accounting: {kib}")  # the record
    assert kib["VmLck"] == 0, kib
    assert kib["VmPin"] >= PINNED_KIB, kib
    refused = results[1]
    assert refused is not None, "the second QEMU got its device: the premise is wrong"
    print(f"second QEMU, per-user accounting: {refused}")  # the record, for docs/qemu.md
    # QEMU 11.1: "vfio kvmvfio-0000-00-04-0: memory listener initialization failed:
    # Region pc.ram: vfio_container_dma_map(0x..., 0x100000, 0x7f00000, 0x...) = -12
    # (Cannot allocate memory)": the first 640 KiB of RAM still fitted the user's limit.
    assert "memory listener initialization failed" in refused.desc, refused.desc
    assert "= -12 (Cannot allocate memory)" in refused.desc, refused.desc
    assert not await _shows(second, edus[1])
    assert cdev_of(edus[1]) not in second.fds()


def test_the_kernel_answers_as_the_header_and_ioas_c_say() -> None:
    """Per user on a fresh fd; settable until the first object; EPERM without the capability."""
    with Iommufd() as iommufd:
        assert iommufd.rlimit_mode() is RlimitMode.USER
        iommufd.set_rlimit_mode(RlimitMode.PROCESS)
        assert iommufd.rlimit_mode() is RlimitMode.PROCESS
        iommufd.alloc_ioas()
        with pytest.raises(RlimitModeRefused) as busy:
            iommufd.set_rlimit_mode(RlimitMode.USER)
        assert busy.value.errno == errno.EBUSY
        assert "can only be set on a fresh /dev/iommu" in str(busy.value)
        assert iommufd.rlimit_mode() is RlimitMode.PROCESS
    # root without CAP_SYS_RESOURCE (dropped from the bounding set, so from the permitted one)
    probe = (
        "from kvmvfio.vfio.iommufd import open_for_vmm\n"
        "try:\n    open_for_vmm('/dev', 'a probe')\n"
        "except Exception as err:\n    print(type(err).__name__, err.errno, err)\n"
    )
    done = subprocess.run(
        ["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource", sys.executable,
         "-c", probe],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.startswith(f"RlimitModeRefused {errno.EPERM} "), done.stdout + done.stderr
    assert "needs CAP_SYS_RESOURCE" in done.stdout
