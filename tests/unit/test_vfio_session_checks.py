"""What a VFIO session refuses before it touches the kernel, on fake sysfs trees.

The kernel side of sessions is tested in the lab (tests/lab/test_vfio_session.py);
these cover the decisions taken from sysfs alone, and that a failure after
the first open leaves no fd behind.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable

import pytest
from fakesysfs import Dev, Topology

from kvmvfio.cli import run
from kvmvfio.errors import (
    DeviceNotBoundToVfio,
    GroupNotViable,
    InvalidAddress,
    KernelError,
    KernelUnsupported,
    NoIommuRefused,
    SessionStateError,
    UsageError,
)
from kvmvfio.host import Host
from kvmvfio.vfio import Backend, VfioSession, choose_backend

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}

BuildHost = Callable[[Topology], Host]


def _host(build_host: BuildHost, *devices: Dev, **topo: object) -> Host:
    return build_host(Topology(devices=devices, **topo))  # type: ignore[arg-type]


def test_a_device_not_on_vfio_is_named(build_host: BuildHost) -> None:
    host = _host(build_host, Dev("0000:00:05.0", driver="e1000e", group=3))
    with pytest.raises(DeviceNotBoundToVfio) as refused:
        VfioSession(["00:05.0"], host=host).open()
    assert refused.value.driver == "e1000e"
    assert "0000:00:05.0 is bound to e1000e, not vfio-pci" in str(refused.value)


def test_a_group_with_a_host_driver_member_is_not_viable(build_host: BuildHost) -> None:
    host = _host(
        build_host,
        Dev(
            "0000:00:06.0",
            bridge=True,
            group=4,
            children=[
                Dev("0000:01:01.0", driver="vfio-pci", group=4, **EDU),  # type: ignore[arg-type]
                Dev("0000:01:02.0", driver="pci-pf-stub", group=4, **EDU),  # type: ignore[arg-type]
            ],
        ),
    )
    with pytest.raises(GroupNotViable) as refused:
        VfioSession(["0000:01:01.0"], host=host).open()
    assert [b.address for b in refused.value.blockers] == ["0000:01:02.0"]
    assert "pci-pf-stub" in str(refused.value)


def test_noiommu_needs_consent(build_host: BuildHost) -> None:
    host = _host(
        build_host,
        Dev("0000:00:03.0", driver="vfio-pci", group=0, **EDU),  # type: ignore[arg-type]
        noiommu_groups=[0],
    )
    with pytest.raises(NoIommuRefused) as refused:
        VfioSession(["0000:00:03.0"], host=host).open()
    assert "no-IOMMU group" in str(refused.value)


def test_bad_input(build_host: BuildHost) -> None:
    with pytest.raises(InvalidAddress):
        VfioSession(["../x"])
    with pytest.raises(UsageError):
        VfioSession([])
    with pytest.raises(ValueError, match="'gruop' is not a valid VfioPath"):
        VfioSession(["00:03.0"], backend="gruop")


@pytest.mark.parametrize(
    ("nodes", "requested", "expected"),
    [
        ({"vfio", "iommu"}, Backend.AUTO, Backend.CDEV),
        ({"vfio"}, Backend.AUTO, Backend.GROUP),
        ({"iommu"}, Backend.AUTO, Backend.CDEV),
        ({"vfio", "iommu"}, Backend.GROUP_IOMMUFD, Backend.GROUP_IOMMUFD),
    ],
)
def test_choose_backend(
    build_host: BuildHost, nodes: set[str], requested: Backend, expected: Backend
) -> None:
    host = _host(
        build_host,
        Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU),  # type: ignore[arg-type]
        dev_nodes=nodes,
    )
    assert choose_backend(requested, host, [host.device("0000:00:03.0")]) is expected


@pytest.mark.parametrize(
    ("nodes", "requested", "words"),
    [
        ({"vfio"}, Backend.CDEV, "no /dev/iommu"),
        ({"iommu"}, Backend.GROUP, "no /dev/vfio/vfio"),
        ({"vfio"}, Backend.GROUP_IOMMUFD, "no /dev/iommu"),
        (set(), Backend.AUTO, "neither /dev/vfio/vfio nor /dev/iommu"),
    ],
)
def test_a_path_the_kernel_lacks(
    build_host: BuildHost, nodes: set[str], requested: Backend, words: str
) -> None:
    host = _host(
        build_host,
        Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU),  # type: ignore[arg-type]
        dev_nodes=nodes,
    )
    with pytest.raises(KernelUnsupported, match=words):
        choose_backend(requested, host, [host.device("0000:00:03.0")])


def test_a_failure_after_opening_closes_everything(build_host: BuildHost) -> None:
    """The fake /dev nodes are plain files: the first ioctl fails, and nothing stays open."""
    host = _host(
        build_host,
        Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU),  # type: ignore[arg-type]
    )
    before = set(os.listdir("/proc/self/fd"))
    session = VfioSession(["0000:00:03.0"], backend="group", host=host)
    with pytest.raises(KernelError) as failed:
        session.open()
    assert failed.value.op == "VFIO_GET_API_VERSION"
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(SessionStateError):
        session.open()
    session.close()  # idempotent


def test_a_device_named_twice_is_refused_before_anything_is_opened(build_host: BuildHost) -> None:
    """However spelled, one device named twice is refused, and no file is left open.

    Before the plan refused it, ``check 0000:00:03.0 00:03.0`` opened the
    cdev twice and dropped the first file unclosed (the argv tier,
    test_cli_fuzz.py, found it by its owner's ResourceWarning).
    """
    host = _host(
        build_host,
        Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU),  # type: ignore[arg-type]
    )
    session = VfioSession(["0000:00:03.0", "00:03.0"], backend="cdev", host=host)
    before = set(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UsageError, match="a device is named twice"):
            session.open()
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert set(os.listdir("/proc/self/fd")) == before


def test_report_needs_an_open_session() -> None:
    with pytest.raises(SessionStateError, match="cannot report a session that is idle"):
        VfioSession(["0000:00:03.0"]).report()


def test_check_cli_names_the_device(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = _host(build_host, Dev("0000:00:05.0", driver="e1000e", group=3))
    roots = ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs), "--no-kvm"]
    assert run(["check", *roots, "05.0"]) == 2
    assert "not a PCI address" in capsys.readouterr().err
    assert run(["check", *roots, "00:05.0"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "kvmvfio: PCI device 0000:00:05.0 is bound to e1000e, not vfio-pci: prepare it first "
        "(`kvmvfio prepare --owner NAME 0000:00:05.0` moves it there)\n"
    )
