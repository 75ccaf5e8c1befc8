"""The disk-in-use check on L1's own disks: each way a disk is used stops prepare.

The ``disks`` topology gives L1 five small virtio-blk disks (each its own PCI
function) and an NVMe controller with one namespace, beside its root disk
(virtio-blk, /dev/vda, mounted on /). Each test puts a disk to one use (LVM
volume mounted, LUKS mapping open, md RAID1 member, swap, NVMe namespace
mounted, a mount in another mount namespace), checks that ``prepare``
refuses the controller through the API and the CLI with the chain named and
nothing moved (driver link, ``driver_override``, no journal record), then
tears the use down and checks that the same controller now goes to vfio-pci
and comes back with its disk. Cleanup runs in ``finally`` blocks so that a
failing test leaves L1's disks free for the next one.

L1 has no udev: LVM is told to make its device nodes itself and not to
wait for udev (``LVM_CONFIG``; cryptsetup and mdadm notice on their own);
partitions are made by writing an MBR and asking the kernel to re-read it
(L1 has no sfdisk), file systems with busybox's mke2fs (no e2fsprogs).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vfiokit import driver

from kvmvfio.host import Host
from kvmvfio.host.blockdev import exclusive_claim
from kvmvfio.lab.topology import Topology
from kvmvfio.prepare import prepare, recover, release, status
from kvmvfio.prepare.safety import UnsafeToUnbind, check

pytestmark = [pytest.mark.lab, pytest.mark.topology("disks")]

PCI = Path("/sys/bus/pci/devices")
BLOCK = Path("/sys/block")
# No udev in L1: without udev_rules = 0, lvcreate fails ("/dev/vg/lv: not
# found: device not cleared"), waiting for a node udev would have made.
LVM_CONFIG = (
    "activation { udev_sync = 0 udev_rules = 0 } devices { obtain_device_list_from_udev = 0 }"
)
CLAIMED = (
    "is claimed exclusively by the kernel (a file system, RAID or device mapper kvmvfio "
    "could not name)"
)
BLKRRPART = 0x125F


@pytest.fixture(autouse=True)
def _leave_nothing_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left prepared is put back before the next one."""
    yield
    recover(root=tmp_path)


def sh(*cmd: str, stdin: str | None = None) -> str:
    """Run ``cmd``; fail the test with its stderr if it fails."""
    done = subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def quietly(*cmd: str) -> None:
    """Run a cleanup command; its failure is not the test's."""
    subprocess.run(cmd, capture_output=True, timeout=300, check=False)


def lvm(*args: str) -> str:
    return sh(args[0], "--config", LVM_CONFIG, *args[1:])


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def disk_by_serial(serial: str) -> str:
    """The kernel name of the disk with this serial (a virtio-blk disk, an NVMe namespace)."""
    found: list[str] = []

    def look() -> bool:
        for name in sorted(os.listdir(BLOCK)):
            for attr in ("serial", "device/serial"):
                with contextlib.suppress(OSError):
                    if (BLOCK / name / attr).read_text().strip() == serial:
                        found.append(name)
                        return True
        return False

    wait_for(f"the disk with serial {serial}", look)
    return found[0]


def part(disk: str, n: int) -> str:
    return f"{disk}p{n}" if disk[-1].isdigit() else f"{disk}{n}"


def make_partitions(disk: str, sizes_mb: list[int]) -> list[str]:
    """Write an MBR with one partition per size and have the kernel read it."""
    mbr = bytearray(512)
    start = 2048
    for i, size in enumerate(sizes_mb):
        sectors = size * 2048
        mbr[446 + 16 * i : 462 + 16 * i] = struct.pack(
            "<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, sectors
        )
        start += sectors
    mbr[510:512] = b"\x55\xaa"
    with open(f"/dev/{disk}", "r+b") as f:
        f.write(mbr)
        f.flush()
        os.fsync(f.fileno())
        fcntl.ioctl(f.fileno(), BLKRRPART)
    names = [part(disk, i + 1) for i in range(len(sizes_mb))]
    wait_for("the partitions", lambda: all(Path(f"/dev/{n}").exists() for n in names))
    return names


def wipe(*names: str) -> None:
    """Zero the first MiB of each device: no label of this test survives into the next."""
    for name in names:
        with contextlib.suppress(OSError), open(f"/dev/{name}", "r+b") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    with contextlib.suppress(OSError), open(f"/dev/{names[0]}", "rb") as f:
        fcntl.ioctl(f.fileno(), BLKRRPART)


def mkfs(name: str) -> None:
    if shutil.which("mkfs.ext4"):
        sh("mkfs.ext4", "-q", "-F", f"/dev/{name}")
    else:
        sh("busybox", "mke2fs", "-q", f"/dev/{name}")


def mountpoint(tag: str) -> str:
    path = Path(f"/mnt/kvmvfio-{tag}")
    path.mkdir(exist_ok=True)
    return str(path)


def holder_of(name: str) -> str:
    (holder,) = os.listdir(f"/sys/class/block/{name}/holders")
    return holder


def snapshot(addr: str) -> tuple[str | None, str]:
    return driver(addr), (PCI / addr / "driver_override").read_text().strip()


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=120, check=False
    )


def refused(addr: str, root: Path) -> str:
    """Check that prepare refuses ``addr`` for a disk in use, and moves nothing; return why.

    The pure check comes first: were it to pass wrongly, prepare would take
    the disk from under its user.
    """
    before = snapshot(addr)
    with pytest.raises(UnsafeToUnbind) as pure:
        check(Host().device(addr))
    found = pure.value.found
    assert pure.value.check == "disk-in-use"
    with pytest.raises(UnsafeToUnbind) as api:
        prepare([addr], "vm1", root=root)
    assert (api.value.check, api.value.found) == ("disk-in-use", found)
    cli = kvmvfio("prepare", "--root", str(root), "--owner", "vm1", addr)
    assert cli.returncode == 1, cli.stderr
    assert "Traceback" not in cli.stderr
    assert f"PCI device {addr} (" in cli.stderr
    assert found in cli.stderr
    assert "--force disk-in-use" in cli.stderr
    assert snapshot(addr) == before  # driver link and driver_override as they were
    assert status(root=root) == []
    assert not list(root.rglob("group-*.json"))  # no claim, no journal record
    return found


def moves_and_comes_back(addr: str, serial: str, root: Path) -> None:
    """With its disk free, the controller goes to vfio-pci and back, disk and all."""
    before = snapshot(addr)
    (done,) = prepare([addr], "vm1", root=root)
    assert addr in [e.address for e in done.moved]
    assert driver(addr) == "vfio-pci"
    release([addr], "vm1", root=root)
    assert snapshot(addr) == before
    disk_by_serial(serial)  # the disk is back


def test_l1s_root_disk_is_refused(tmp_path: Path) -> None:
    root_disk = Path(os.path.realpath(BLOCK / "vda"))
    addr = next(p for p in root_disk.parts if p.startswith("0000:"))
    assert refused(addr, tmp_path) == "has disks in use: vda is mounted on /"
    # /proc/mounts calls it /dev/root: only its number tells it is vda.
    mounts = Path("/proc/self/mounts").read_text()
    assert "/dev/root / " in mounts
    assert "/dev/vda " not in mounts


def test_an_lvm_volume(topology: Topology, tmp_path: Path) -> None:
    addr = topology.guest_address("lvm")
    disk = disk_by_serial("lvm")
    where = mountpoint("lvm")
    try:
        lvm("pvcreate", "-y", f"/dev/{disk}")
        lvm("vgcreate", "labvg", f"/dev/{disk}")
        lvm("lvcreate", "-y", "-n", "data", "-L", "16M", "labvg")
        dm = holder_of(disk)
        mkfs(dm)
        sh("mount", "/dev/mapper/labvg-data", where)
        assert refused(addr, tmp_path) == (
            f"has disks in use: {disk} is used by {dm} (LVM labvg-data), which is mounted on "
            f"{where}"
        )
        sh("umount", where)
        # Unmounted, the volume is still active: still in use.
        assert (
            refused(addr, tmp_path) == f"has disks in use: {disk} is used by {dm} (LVM labvg-data)"
        )
    finally:
        quietly("umount", where)
        quietly("vgremove", "--config", LVM_CONFIG, "-f", "labvg")
        quietly("pvremove", "--config", LVM_CONFIG, "-ff", "-y", f"/dev/{disk}")
        wipe(disk)
    assert os.listdir(f"/sys/class/block/{disk}/holders") == []
    moves_and_comes_back(addr, "lvm", tmp_path)


def test_a_luks_mapping(topology: Topology, tmp_path: Path) -> None:
    addr = topology.guest_address("luks")
    disk = disk_by_serial("luks")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    try:
        # pbkdf2 with few iterations: argon2's default costs minutes under TCG.
        sh("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
           "--pbkdf-force-iterations", "1000", "--key-file", str(key), f"/dev/{disk}")  # fmt: skip
        sh("cryptsetup", "open", "--key-file", str(key), f"/dev/{disk}", "labsecret")
        dm = holder_of(disk)
        assert (
            refused(addr, tmp_path) == f"has disks in use: {disk} is used by {dm} (LUKS labsecret)"
        )
    finally:
        quietly("cryptsetup", "close", "labsecret")
        wipe(disk)
    moves_and_comes_back(addr, "luks", tmp_path)


def test_an_md_raid1_member(topology: Topology, tmp_path: Path) -> None:
    addr = topology.guest_address("raid")
    disk = disk_by_serial("raid")
    parts: list[str] = []
    try:
        parts = make_partitions(disk, [28, 28])
        sh("mdadm", "--create", "/dev/md0", "--run", "--level=1", "--raid-devices=2",
           "--metadata=1.2", *(f"/dev/{p}" for p in parts))  # fmt: skip
        md = holder_of(parts[0])
        assert refused(addr, tmp_path) == (
            f"has disks in use: {parts[0]} is a member of {md} (RAID1); "
            f"{parts[1]} is a member of {md} (RAID1)"
        )
    finally:
        quietly("mdadm", "--stop", "/dev/md0")
        for p in parts:
            quietly("mdadm", "--zero-superblock", f"/dev/{p}")
        wipe(disk, *parts)
    moves_and_comes_back(addr, "raid", tmp_path)


def test_swap_on_a_partition(topology: Topology, tmp_path: Path) -> None:
    addr = topology.guest_address("swap")
    disk = disk_by_serial("swap")
    parts: list[str] = []
    try:
        parts = make_partitions(disk, [28, 28])
        sh("mkswap", f"/dev/{parts[1]}")
        sh("swapon", f"/dev/{parts[1]}")
        assert refused(addr, tmp_path) == f"has disks in use: {parts[1]} is swap"
    finally:
        quietly("swapoff", f"/dev/{parts[1]}" if parts else "/dev/null")
        wipe(disk, *parts)
    moves_and_comes_back(addr, "swap", tmp_path)


def test_an_nvme_namespace(topology: Topology, tmp_path: Path) -> None:
    addr = topology.guest_address("nvme")
    ns = disk_by_serial("labnvme0")
    where = mountpoint("nvme")
    try:
        mkfs(ns)
        sh("mount", f"/dev/{ns}", where)
        assert refused(addr, tmp_path) == f"has disks in use: {ns} is mounted on {where}"
    finally:
        quietly("umount", where)
        wipe(ns)
    moves_and_comes_back(addr, "labnvme0", tmp_path)


def test_a_mount_only_another_namespace_sees(topology: Topology, tmp_path: Path) -> None:
    """What no table of ours names, the kernel's exclusive claim still tells."""
    addr = topology.guest_address("spare")
    disk = disk_by_serial("spare")
    moves_and_comes_back(addr, "spare", tmp_path)  # unused: free to go
    disk = disk_by_serial("spare")
    where = mountpoint("elsewhere")
    mkfs(disk)
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount /dev/{disk} {where} && echo ready && exec cat"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        assert f" {where} " not in Path("/proc/self/mountinfo").read_text()
        assert refused(addr, tmp_path) == f"has disks in use: {disk} {CLAIMED}"
    finally:
        holder.communicate("", timeout=30)
    number = (BLOCK / disk / "dev").read_text().strip()
    # The namespace's mount goes with its last process, a moment later.
    wait_for("the mount to go", lambda: exclusive_claim(Path(f"/dev/{disk}"), number) is False)
    wipe(disk)
    moves_and_comes_back(addr, "spare", tmp_path)


def test_a_process_holding_the_disk_open(topology: Topology, tmp_path: Path) -> None:
    """A VM using the disk as raw storage holds it open, not exclusively: in-use says who.

    L1 has no udev, so no /dev/block/MAJ:MIN link: the node is found by the
    name the kernel gives it (DEVNAME).
    """
    addr = topology.guest_address("spare")
    disk = disk_by_serial("spare")
    assert not Path("/dev/block").exists()  # the case this test is for
    before = snapshot(addr)
    with open(f"/dev/{disk}", "rb") as node:
        user = subprocess.Popen(["sleep", "600"], stdin=node)
    try:
        with pytest.raises(UnsafeToUnbind) as got:
            prepare([addr], "vm1", root=tmp_path)
        assert got.value.check == "in-use"
        assert got.value.found == f"is in use by pid {user.pid} (sleep)"
        assert snapshot(addr) == before
        assert status(root=tmp_path) == []
    finally:
        user.kill()
        user.wait()
    moves_and_comes_back(addr, "spare", tmp_path)


def test_the_old_force_name_accepts_it(topology: Topology, tmp_path: Path) -> None:
    """``--force mounted`` (the old name) still accepts a disk in use; nothing else does."""
    addr = topology.guest_address("nvme")
    ns = disk_by_serial("labnvme0")
    where = mountpoint("nvme")
    mkfs(ns)
    sh("mount", f"/dev/{ns}", where)
    try:
        for old in ("mounted", "disk-in-use"):
            (accepted,) = check(Host().device(addr), force=[old])
            assert f"{ns} is mounted on {where}" in accepted
        wrong = kvmvfio("prepare", "--root", str(tmp_path), "--owner", "vm1", "--force",
                        "default-route", addr)  # fmt: skip
        assert wrong.returncode == 1
        assert "--force disk-in-use" in wrong.stderr
    finally:
        quietly("umount", where)
        wipe(ns)
    assert snapshot(addr)[0] == "nvme"


def test_nothing_here_holds_a_disk_open(topology: Topology) -> None:
    """After the tests above, every disk of the topology is free again."""
    for disk in topology.disks:
        name = disk_by_serial(disk.serial or disk.id)
        number = (BLOCK / name / "dev").read_text().strip()
        assert exclusive_claim(Path(f"/dev/{name}"), number) is False, name
        assert os.listdir(BLOCK / name / "holders") == [], name
