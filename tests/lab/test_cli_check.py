"""``kvmvfio check`` as a user runs it in L1: what it says, its exit status, what it leaves."""

from __future__ import annotations

import json
import subprocess

import pytest
from vfiokit import assert_released, expected_coherent, group_of

from kvmvfio.lab.topology import Topology

pytestmark = pytest.mark.lab


def kvmvfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], check=False, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("path", ["group", "group-iommufd", "cdev"])
def test_check_reports_and_releases(topology: Topology, path: str, edu0: str) -> None:
    done = kvmvfio("check", "--json", "--path", path, edu0)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is True
    assert doc["path"] == path
    assert doc["groups"] == [group_of(edu0)]
    assert doc["coherent"] is expected_coherent(topology)
    assert doc["kvm"] == {"checked": True, "accepted": True}
    (dev,) = doc["devices"]
    assert dev["address"] == edu0
    assert {r["name"]: r["size"] for r in dev["regions"]}["BAR0"] == 1 << 20
    assert_released(edu0)


def test_check_in_words(topology: Topology, edu0: str) -> None:
    done = kvmvfio("check", edu0.removeprefix("0000:"))
    assert done.returncode == 0, done.stderr
    assert "path:       cdev" in done.stdout
    assert f"device {edu0} (vfio" in done.stdout
    assert "BAR0 1 MiB mmap" in done.stdout
    enforced = "enforced by the IOMMU" in done.stdout
    assert enforced is expected_coherent(topology)
    assert_released(edu0)


@pytest.mark.topology("default")
def test_require_refuses_non_coherent(edu0: str) -> None:
    done = kvmvfio("check", "--coherency", "require", "--json", edu0)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["type"] == "CoherencyRefused"
    assert edu0 in done.stderr
    assert "Traceback" not in done.stderr
    assert_released(edu0)


@pytest.mark.topology("default", "coherent")
def test_not_on_vfio_is_named(topology: Topology) -> None:
    nic = topology.guest_address("nic0")
    done = kvmvfio("check", nic)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"kvmvfio: PCI device {nic} is bound to e1000e, not vfio-pci: prepare it first "
        f"(`kvmvfio prepare --owner NAME {nic}` moves it there)"
    )


def test_bad_address_is_a_usage_error() -> None:
    done = kvmvfio("check", "0000:00:03.0/../..")
    assert done.returncode == 2
    assert "is not a PCI address" in done.stderr
    assert "Traceback" not in done.stderr
