"""Release refuses a device still open, also when no node under /dev says so.

A process that closed the group after getting a device's file (or was passed
that file) holds an anonymous inode naming no device; unbinding vfio-pci then
waits until it lets go, with kvmvfio's release stuck in the kernel. The
kernel's count of enables (sysfs ``enable``) is what finds it. The lab shows
the real kernel doing both (tests/lab/test_prepare.py); here the fake tree
and a fake /proc meet the wordings.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology, tree_files

from kvmvfio.errors import Busy
from kvmvfio.host import Host
from kvmvfio.host.procs import VFIO_DEVICE_FILE, enable_count
from kvmvfio.prepare import release, status
from kvmvfio.prepare.journal import Entry, Journal, Record
from kvmvfio.prepare.owners import OwnerWatch

BuildHost = Callable[[Topology], Host]
GONE_PID = 2**22 + 12345
ADDR = "0000:00:05.0"


def _host(build_host: BuildHost, enable: bytes) -> Host:
    return build_host(
        Topology(
            devices=[Dev(ADDR, driver="vfio-pci", group=7, files={"enable": enable})],
            drivers=("vfio-pci", "e1000e"),
        )
    )


def _recorded(
    build_host: BuildHost, tmp_path: Path, enable: bytes, driver: str = "e1000e"
) -> tuple[Host, Path]:
    """The tree with ``enable`` written, and a journal (returned) whose record
    says ``vm1`` took group 7 from ``driver``."""
    root = tmp_path / "run"
    Journal(root).write(Record(7, "vm1", GONE_PID, devices=[Entry(ADDR, driver, None)]))
    return _host(build_host, enable), root


def _process(host: Host, pid: int, comm: str, *links: str) -> None:
    """A fake /proc/PID with ``comm`` and fds 3, 4, ... linking to ``links``."""
    fd = host.procfs / str(pid) / "fd"
    fd.mkdir(parents=True)
    (host.procfs / str(pid) / "comm").write_text(comm + "\n")
    for n, target in enumerate(links, start=3):
        os.symlink(target, fd / str(n))


def test_a_device_file_held_without_its_group_stops_the_release(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host, root = _recorded(build_host, tmp_path, b"1\n")
    _process(host, 4242, "dpdk-app", "/dev/null", VFIO_DEVICE_FILE)
    _process(host, 4343, "bash", "/dev/pts/0")
    before = tree_files(host.sysfs)
    with pytest.raises(Busy) as refused:
        release([ADDR], "vm1", host=host, root=root)
    assert refused.value.holder == (
        f"a process that has {ADDR} open by its device file alone (the kernel counts it enabled "
        "once; /proc does not say which device such a file is; the processes holding a VFIO "
        "device file: pid 4242 (dpdk-app)), and vfio-pci's unbind would wait until it lets go"
    )
    assert "IOMMU group 7" in str(refused.value)
    assert tree_files(host.sysfs) == before  # no unbind: it would have hung
    assert Journal(root).read(7) is not None
    (held,) = status(host=host, root=root, watch=OwnerWatch(proc=host.procfs))
    assert held.holders == (refused.value.holder,)


def test_with_no_holder_in_sight_the_count_alone_refuses(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host, root = _recorded(build_host, tmp_path, b"2\n")
    with pytest.raises(Busy, match=r"enabled 2 times.*no process kvmvfio can see holds one"):
        release([ADDR], "vm1", host=host, root=root)


@pytest.mark.parametrize("enable", [b"0\n", b"", b"garbage\n"])
def test_a_device_nobody_opened_is_given_back(
    build_host: BuildHost, tmp_path: Path, enable: bytes
) -> None:
    """A count of 0, or none readable, is no user: the release goes on (the
    record says vfio-pci was the device's driver before: the fake tree has no
    driver to move it to)."""
    host, root = _recorded(build_host, tmp_path, enable, "vfio-pci")
    _process(host, 4242, "qemu", VFIO_DEVICE_FILE)  # some other device's file
    (done,) = release([ADDR], "vm1", host=host, root=root)
    assert done.driver == "vfio-pci"
    assert Journal(root).read(7) is None


def test_the_count_is_read_as_the_kernel_writes_it(build_host: BuildHost) -> None:
    host = _host(build_host, b"3\n")
    assert enable_count(str(host.sysfs), ADDR) == 3
    assert enable_count(str(host.sysfs), "0000:00:06.0") is None  # no such device
