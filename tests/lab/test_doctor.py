"""``kvmvfio doctor`` in L1: every VFIO path complete, and its checks agree with the kernel."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", "doctor", *args], check=False, capture_output=True, text=True, timeout=120
    )


def checks_of(doc: dict[str, object], feature: str) -> dict[str, dict[str, object]]:
    features = doc["features"]
    assert isinstance(features, list)
    (found,) = [f for f in features if f["name"] == feature]
    return {c["name"]: c for c in found["checks"]}


def test_every_path_is_there_and_agrees_with_the_kernel(edu0: str) -> None:
    # edu0 is bound to vfio-pci, so its cdev shows (L1's kernel has no readable config).
    done = doctor("--json")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    doc = json.loads(done.stdout)
    status = {f["name"]: f["status"] for f in doc["features"]}
    assert doc["usable"] is True
    for name in ("group", "group-iommufd", "cdev", "kvm", "coherency", "python"):
        assert status[name] == "ok", (name, doc)
    # What the kernel shows, read here directly.
    assert doc["kernel"]["release"] == os.uname().release
    cmdline = Path("/proc/cmdline").read_text().split()
    assert all(arg in cmdline for arg in doc["kernel"]["cmdline"])
    assert os.path.exists("/dev/iommu")
    assert os.path.isdir("/sys/module/vfio_pci")
    assert os.path.exists("/dev/vfio/vfio")
    assert os.path.exists("/dev/kvm")
    assert os.listdir("/sys/class/iommu")
    cdev = checks_of(doc, "cdev")
    assert cdev["iommufd"]["ok"] is True
    assert cdev["device-cdev"]["ok"] is True
    assert cdev["iommu"]["ok"] is True
    assert "Intel VT-d" in str(cdev["iommu"]["seen"])
    assert "built in" in str(cdev["vfio-pci"]["seen"])  # L1's kernel has no modules
    assert checks_of(doc, "group")["container"]["ok"] is True


def test_the_tools_l1_has_are_found() -> None:
    doc = json.loads(doctor("--json").stdout)
    tools = doc["tools"]
    assert tools["qemu"]["path"] is not None
    major = int(tools["qemu"]["version"].split(".")[0])
    assert major >= 9  # L1's QEMU 11.1
    handoff = checks_of(doc, "qemu-handoff")
    assert handoff["qemu-fd"]["ok"] is True
    assert tools["libvirt"]["path"] is not None
    assert checks_of(doc, "libvirt-hook")["libvirt"]["ok"] is True


def test_in_words() -> None:
    done = doctor()
    print(done.stdout)  # what L1 has, for the record (pytest -rP shows it)
    assert done.returncode == 0, done.stderr
    assert "This host can hand devices to VMs via: group, group-iommufd" in done.stdout
