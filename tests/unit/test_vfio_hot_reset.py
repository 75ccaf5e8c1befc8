"""PCI hot reset on the fake VFIO kernel: what is asked, what is refused before the reset.

The real kernel's answers are in tests/lab/test_hot_reset.py; here the fake
(tests/fakevfio.py) answers as 6.12 does (ENOSPC with the count, groups or
devids, the ownership rule) so the decisions and the CLI can be checked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from fakesysfs import Dev, Topology
from fakevfio import FakeVfio

from kvmvfio import uapi
from kvmvfio.cli import run
from kvmvfio.errors import (
    Busy,
    DeviceNotBoundToVfio,
    HotResetBlocked,
    HotResetRefused,
    InvalidAddress,
    NoBusReset,
    NoInterruptRemapping,
    UsageError,
)
from kvmvfio.host import Host
from kvmvfio.vfio import VfioPath, VfioSession, hot_reset, hot_reset_info

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}
BuildHost = Callable[[Topology], Host]
ROOT, EDU2, EDU3, NIC = "0000:00:03.0", "0000:01:01.0", "0000:01:02.0", "0000:01:03.0"


@pytest.fixture
def kernel() -> Iterator[FakeVfio]:
    with uapi.using_backend(FakeVfio(bus=[(EDU2, 4), (EDU3, 4)])) as fake:
        yield fake


def _host(build_host: BuildHost, third: Dev | None = None) -> Host:
    """edu0 on the root bus (group 1); edu2 and edu3 behind a bridge, sharing group 4."""
    behind: list[Dev] = [
        Dev(EDU2, driver="vfio-pci", group=4, reset_methods=(), **EDU),  # type: ignore[arg-type]
        Dev(EDU3, driver="vfio-pci", group=4, reset_methods=(), **EDU),  # type: ignore[arg-type]
    ]
    if third is not None:
        behind.append(third)
    return build_host(
        Topology(
            devices=[
                Dev(ROOT, driver="vfio-pci", group=1, reset_methods=("pm",), **EDU),  # type: ignore[arg-type]
                Dev("0000:00:06.0", bridge=True, group=3, children=behind),
            ]
        )
    )


@pytest.fixture
def host(build_host: BuildHost) -> Host:
    return _host(build_host)


def _fds() -> set[str]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            found.add(os.readlink(f"/proc/self/fd/{name}"))
    return found


# -- the device's two ioctls ---------------------------------------------------------


@pytest.mark.parametrize("path", [VfioPath.GROUP, VfioPath.GROUP_IOMMUFD])
def test_info_on_a_group_path_names_groups(host: Host, kernel: FakeVfio, path: VfioPath) -> None:
    with VfioSession([EDU2], backend=path, host=host, coherency="ignore") as session:
        info = session.devices[EDU2].hot_reset_info()
    assert info.addresses == (EDU2, EDU3)
    assert [d.group for d in info.devices] == [4, 4]
    assert [d.devid for d in info.devices] == [None, None]
    assert not info.by_devid
    # Asked twice: once with no room (ENOSPC and the count), once with room.
    assert kernel.names().count("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO") == 2


def test_info_on_the_cdev_path_names_devids(host: Host, kernel: FakeVfio) -> None:
    with VfioSession([EDU2], backend="cdev", host=host, coherency="ignore") as session:
        info = session.devices[EDU2].hot_reset_info()
    assert info.by_devid
    assert info.all_owned
    assert [(str(d.address), d.devid, d.owned, d.group) for d in info.devices] == [
        (EDU2, 1, True, None),
        (EDU3, 2, True, None),
    ]


def test_the_kernel_wants_group_files_on_a_group_path(host: Host, kernel: FakeVfio) -> None:
    session = VfioSession([EDU2, EDU3], backend="group", host=host, coherency="ignore")
    with session, pytest.raises(HotResetRefused) as refused:
        session.devices[EDU2].hot_reset([])
    assert refused.value.errno == errno.EINVAL
    assert "owned by the caller" in str(refused.value)


# -- hot_reset(): refuse before, or reset --------------------------------------------


@pytest.mark.parametrize("path", ["group", "group-iommufd", "cdev"])
def test_a_reset_of_every_function_named(host: Host, kernel: FakeVfio, path: str) -> None:
    before = _fds()
    report = hot_reset([EDU3, EDU2], path=path, host=host)
    assert report.path == path
    assert report.done
    assert report.reset == (EDU2, EDU3)
    # One bus, one reset, asked through the first device named.
    (reset,) = kernel.resets
    assert report.resets[0].address == EDU3
    if path == "cdev":
        assert reset == []
    else:
        assert [os.path.basename(p) for p in reset] == ["4"]
    assert _fds() == before


def test_info_resets_nothing(host: Host, kernel: FakeVfio) -> None:
    report = hot_reset_info([EDU2], path="group", host=host)
    assert not report.done
    assert report.reset == (EDU2, EDU3)
    assert "VFIO_DEVICE_PCI_HOT_RESET" not in kernel.names()


def test_a_function_not_named_is_refused_before_the_reset(host: Host, kernel: FakeVfio) -> None:
    before = _fds()
    with pytest.raises(HotResetBlocked) as refused:
        hot_reset([EDU2], path="group", host=host)
    err = refused.value
    assert err.reaches == (EDU2, EDU3)
    assert [b.address for b in err.bystanders] == [EDU3]
    assert "0000:01:02.0 (group 4): on vfio-pci but not asked for" in str(err)
    assert "Nothing was reset" in str(err)
    assert "VFIO_DEVICE_PCI_HOT_RESET" not in kernel.names()
    assert _fds() == before


def test_a_function_on_another_driver_is_named(build_host: BuildHost) -> None:
    host = _host(build_host, Dev(NIC, driver="e1000e", group=5))
    fake = FakeVfio(bus=[(EDU2, 4), (EDU3, 4), (NIC, 5)])
    with uapi.using_backend(fake), pytest.raises(HotResetBlocked) as refused:
        hot_reset([EDU2, EDU3], path="cdev", host=host)
    (nic,) = refused.value.bystanders
    assert (nic.driver, nic.group) == ("e1000e", 5)
    assert "0000:01:03.0 (group 5): bound to e1000e, not vfio-pci" in str(refused.value)
    assert fake.resets == []


def test_a_function_held_elsewhere_names_the_holder(build_host: BuildHost) -> None:
    host = _host(build_host, Dev(NIC, driver="vfio-pci", group=5, **EDU))  # type: ignore[arg-type]
    node = host.devfs / "vfio" / "5"
    code = f"f = open({str(node)!r}); print(flush=True); input()"
    fake = FakeVfio(bus=[(EDU2, 4), (EDU3, 4), (NIC, 5)])
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None
        holder.stdout.readline()
        try:
            with uapi.using_backend(fake), pytest.raises(HotResetBlocked) as refused:
                hot_reset([EDU2, EDU3], path="group", host=host)
        finally:
            holder.kill()
    (nic,) = refused.value.bystanders
    assert len(nic.holders) == 1
    assert nic.holders[0].startswith(f"pid {holder.pid} (")
    assert f"its group 5 is open by pid {holder.pid}" in str(refused.value)


def test_a_group_owned_elsewhere_names_the_holder_on_the_cdev_path(host: Host) -> None:
    """6.12 answers the bind with EPERM when another iommufd owns the group (seen in the lab)."""
    fake = FakeVfio(bus=[(EDU2, 4), (EDU3, 4)], bind_errno=errno.EPERM)
    with uapi.using_backend(fake), pytest.raises(NoInterruptRemapping):
        hot_reset([EDU2], path="cdev", host=host)
    other = host.device(EDU3).cdev_node(host.devfs)
    code = f"f = open({str(other)!r}); print(flush=True); input()"
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None
        holder.stdout.readline()
        try:
            with uapi.using_backend(fake), pytest.raises(Busy) as refused:
                hot_reset([EDU2], path="cdev", host=host)
        finally:
            holder.kill()
    assert refused.value.errno == errno.EPERM
    assert refused.value.holder is not None
    assert refused.value.holder.startswith(f"pid {holder.pid} (")


def test_a_root_bus_device_has_no_hot_reset(host: Host) -> None:
    with uapi.using_backend(FakeVfio(bus=None)), pytest.raises(NoBusReset) as refused:
        hot_reset([ROOT], path="group", host=host)
    assert refused.value.errno == errno.ENODEV
    text = str(refused.value)
    assert "0000:00:03.0 is on a root bus or has no slot or bus reset" in text
    assert "its reset_method: pm" in text


def test_the_kernels_refusals_keep_their_errno(host: Host) -> None:
    fake = FakeVfio(bus=[(EDU2, 4), (EDU3, 4)], reset_errno=errno.EBUSY)
    with uapi.using_backend(fake), pytest.raises(Busy) as busy:
        hot_reset([EDU2, EDU3], path="cdev", host=host)
    assert busy.value.op == "VFIO_DEVICE_PCI_HOT_RESET"
    fake = FakeVfio(bus=[(EDU2, 4), (EDU3, 4)], reset_errno=errno.EINVAL)
    with uapi.using_backend(fake), pytest.raises(HotResetRefused):
        hot_reset([EDU2, EDU3], path="cdev", host=host)


def test_bad_input(host: Host, kernel: FakeVfio) -> None:
    with pytest.raises(UsageError):
        hot_reset([], host=host)
    with pytest.raises(InvalidAddress):
        hot_reset(["5f3c1f3e-0000-4000-8000-000000000000"], host=host)
    with pytest.raises(UsageError, match="named twice"):
        hot_reset([EDU2, "01:01.0"], host=host)
    assert kernel.calls == []


def test_a_device_not_on_vfio(build_host: BuildHost, kernel: FakeVfio) -> None:
    host = _host(build_host, Dev(NIC, driver="e1000e", group=5))
    with pytest.raises(DeviceNotBoundToVfio):
        hot_reset([NIC], host=host)


# -- the command ---------------------------------------------------------------------


def _roots(host: Host) -> list[str]:
    return ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs)]


def test_cli_reset(host: Host, kernel: FakeVfio, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["reset", *_roots(host), "--path", "group", EDU2, EDU3]) == 0
    out = capsys.readouterr().out
    assert "reset through 0000:01:01.0 (its slot or bus):" in out
    assert "  0000:01:02.0 (IOMMU group 4)" in out
    assert len(kernel.resets) == 1


def test_cli_info_json(host: Host, kernel: FakeVfio, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["reset", *_roots(host), "--info", "--json", EDU2]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "schema": 1,
        "ok": True,
        "path": "cdev",
        "reset": False,
        "resets": [
            {
                "through": EDU2,
                "by_devid": True,
                "devices": [
                    {"address": EDU2, "group": None, "devid": 1, "owned": True},
                    {"address": EDU3, "group": None, "devid": 2, "owned": True},
                ],
            }
        ],
    }
    assert kernel.resets == []


def test_cli_refusal(host: Host, kernel: FakeVfio, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["reset", *_roots(host), "--json", EDU2]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False
    assert doc["error"]["type"] == "HotResetBlocked"
    assert "Traceback" not in captured.err
    assert "`kvmvfio reset --info ADDR` lists them" in captured.err


@pytest.mark.parametrize("bad", [["reset"], ["reset", "zz"], ["reset", "--path", "x", EDU2]])
def test_cli_bad_input(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(bad) == 2
    assert "Traceback" not in capsys.readouterr().err
