"""A damaged journal in L1: `kvmvfio recover` refuses it with a sentence and changes nothing.

A record that names the host's NIC in another group's file would have
recover unbind the NIC from e1000e; a journal folder that is a link would
have it act on records kvmvfio never wrote. Both are refused (exit 1, the
sentence on stderr, no traceback), the devices keep their drivers and
``driver_override``, and once the operator fixes the journal, recover puts
the prepared device back. The journal goes to a folder per test (``--root``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiokit import driver

from kvmvfio.host import Host
from kvmvfio.lab.topology import Topology
from kvmvfio.prepare import prepare, recover
from kvmvfio.prepare.journal import Entry, Journal

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

PCI = Path("/sys/bus/pci/devices")


@pytest.fixture(autouse=True)
def _leave_nothing_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left prepared (or linked) is put back before the next one."""
    yield
    if (tmp_path / "journal").is_symlink():
        os.unlink(tmp_path / "journal")
        os.rename(tmp_path / "elsewhere", tmp_path / "journal")
    recover(root=tmp_path)


def snapshot(*addrs: str) -> dict[str, tuple[str | None, str]]:
    return {a: (driver(a), (PCI / a / "driver_override").read_text().strip()) for a in addrs}


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_recover_refuses_a_record_naming_a_device_of_another_group(
    topology: Topology, tmp_path: Path
) -> None:
    nic, edu0 = topology.guest_address("nic0"), topology.guest_address("edu0")
    host = Host()
    group, nic_group = host.group_of(edu0).number, host.group_of(nic).number
    assert group != nic_group
    (done,) = prepare([edu0], "vm1", root=tmp_path)
    journal = Journal(tmp_path)
    record = journal.read(group)
    assert record is not None
    good = journal.path(group).read_bytes()
    # Damaged: the record now says the NIC moved too, from no driver.
    record.devices.append(Entry(nic, None, None))
    journal.write(record)
    damaged = journal.path(group).read_bytes()
    before = snapshot(nic, edu0)
    assert before[nic][0] == "e1000e"
    assert before[edu0][0] == "vfio-pci"

    got = kvmvfio("recover", "--root", str(tmp_path))
    assert got.returncode == 1, got
    assert (
        f"recover: IOMMU group {group} not restored: the kvmvfio journal {journal.path(group)} "
        f"is unusable (devices[1] {nic} is in IOMMU group {nic_group} on this host, not "
        f"{group}); kvmvfio acted on none of it and left it as it is: check the devices it "
        "names by hand, then remove it\n"
    ) in got.stderr
    assert "Traceback" not in got.stderr
    assert snapshot(nic, edu0) == before
    assert journal.path(group).read_bytes() == damaged
    got = kvmvfio("release", "--root", str(tmp_path), edu0)
    assert got.returncode == 1
    assert f"kvmvfio: the kvmvfio journal {journal.path(group)} is unusable" in got.stderr
    assert snapshot(nic, edu0) == before

    # The operator puts the record right: recover serves it.
    journal.path(group).write_bytes(good)
    got = kvmvfio("recover", "--root", str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert f"recover: {edu0} back on no driver" in got.stdout
    assert driver(nic) == "e1000e"
    assert driver(edu0) is None
    assert [e.address for e in done.moved] == [edu0]


def test_recover_refuses_a_symlinked_journal_folder(topology: Topology, tmp_path: Path) -> None:
    edu0, nic = topology.guest_address("edu0"), topology.guest_address("nic0")
    root = tmp_path
    prepare([edu0], "vm1", root=root)
    elsewhere = tmp_path / "elsewhere"
    os.rename(root / "journal", elsewhere)
    os.symlink(elsewhere, root / "journal")
    before = snapshot(nic, edu0)
    listing = sorted(os.listdir(elsewhere))

    for command in ("recover", "status"):
        got = kvmvfio(command, "--root", str(root))
        assert got.returncode == 1, got
        assert got.stderr == (
            f"kvmvfio: {root}/journal is a symbolic link; kvmvfio keeps a folder owned by uid "
            "0 with mode 0700 there, so it did not use it and left it as it is. Find out who "
            "put it there and remove it, then run the command again\n"
        ), got.stderr
    assert snapshot(nic, edu0) == before
    assert sorted(os.listdir(elsewhere)) == listing

    os.unlink(root / "journal")
    os.rename(elsewhere, root / "journal")
    got = kvmvfio("recover", "--root", str(root))
    assert got.returncode == 0, got.stderr
    assert f"recover: {edu0} back on no driver" in got.stdout
