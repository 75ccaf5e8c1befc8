"""The lab tier: these tests run inside the L1 guest, via `kvmvfio lab test`.

Outside the lab (no ``--lab-topology``) every test here is skipped with a
reason; inside, the tests whose ``topology(...)`` marker leaves out the
booted topology are skipped too.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from libvirtkit import HOOKS, AgentProcess, destroy, hooked_libvirtd
from vfiokit import fd_table, kprobe

from kvmvfio.kvm import KvmVfioDevice, KvmVm
from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.libvirtd import Libvirtd, virsh
from kvmvfio.lab.topology import Topology
from kvmvfio.libvirt import install
from kvmvfio.prepare import recover, status

SYSFS_PCI = Path("/sys/bus/pci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lab-topology",
        default=None,
        help="name of the lab topology L1 was booted with (set by kvmvfio lab test)",
    )


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_lab_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collect at each lab test's teardown, so a leak's warning fails the test that leaked.

    (An object dropped unclosed is an error, as in the unit tiers: pyproject's
    filterwarnings. The one such leak the lab showed was pytest-asyncio's
    idle event loop, closed by tests/conftest.py.)
    """
    yield
    if request.node.get_closest_marker("lab") is not None:
        gc.collect()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    name = config.getoption("--lab-topology")
    # The runner's way to the booted topology: a built-in name, or the copy of a file.
    common = (
        name is None or topo_mod.load(os.environ.get("KVMVFIO_LAB_TOPOLOGY", name)).common_tests
    )
    for item in items:
        if item.get_closest_marker("lab") is None:
            continue
        if name is None:
            item.add_marker(
                pytest.mark.skip(reason="lab test: runs inside L1, see `kvmvfio lab test`")
            )
            continue
        marker = item.get_closest_marker("topology")
        if marker is not None and name not in marker.args:
            item.add_marker(pytest.mark.skip(reason=f"not for topology {name}"))
        elif marker is None and not common:
            item.add_marker(pytest.mark.skip(reason=f"topology {name} runs only its own tests"))


@pytest.fixture(scope="session")
def topology(pytestconfig: pytest.Config) -> Topology:
    name = pytestconfig.getoption("--lab-topology")
    assert name, "lab fixtures are only usable inside the lab"
    # The runner's way to it: a built-in name, or the copy of a topology file.
    booted = topo_mod.load(os.environ.get("KVMVFIO_LAB_TOPOLOGY", ""))
    assert booted.name == name, "booted topology and --lab-topology differ"
    return booted


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def bind_driver(addr: str, driver: str = "vfio-pci") -> str | None:
    """Move ``addr`` to ``driver`` with plain sysfs writes; return its old driver.

    The lab's own minimal helper, independent of kvmvfio's binding layer, so
    that tests of kvmvfio have a reference to compare with.
    """
    dev = SYSFS_PCI / "devices" / addr
    old = dev / "driver"
    previous = os.path.basename(os.readlink(old)) if old.exists() else None
    if previous == driver:
        return previous
    if previous is not None:
        _write(old / "unbind", addr)
    _write(dev / "driver_override", driver)
    _write(SYSFS_PCI / "drivers_probe", addr)
    assert os.path.basename(os.readlink(dev / "driver")) == driver
    return previous


def bind_vfio(addr: str) -> str | None:
    """Move ``addr`` to vfio-pci; return its old driver."""
    return bind_driver(addr, "vfio-pci")


def unbind_vfio(addr: str, previous: str | None) -> None:
    """Undo :func:`bind_driver`: back to ``previous`` (or no driver)."""
    dev = SYSFS_PCI / "devices" / addr
    if (dev / "driver").exists():
        _write(dev / "driver" / "unbind", addr)
    _write(dev / "driver_override", "\n")
    if previous is not None:
        _write(SYSFS_PCI / "drivers_probe", addr)


@pytest.fixture
def vfio_bind() -> Iterator[Callable[..., None]]:
    """``vfio_bind(addr, ..., driver="vfio-pci")`` moves devices for one test, and back after it.

    A device bound twice is restored to what it had before the first bind.
    """
    bound: list[tuple[str, str | None]] = []

    def bind(*addrs: str, driver: str = "vfio-pci") -> None:
        for addr in addrs:
            previous = bind_driver(addr, driver)
            if all(a != addr for a, _ in bound):
                bound.append((addr, previous))

    yield bind
    for addr, previous in reversed(bound):
        unbind_vfio(addr, previous)


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves an fd open that was not open before."""
    before = fd_table()
    yield
    # pytest-asyncio's event loop (an epoll fd and a socketpair) may outlive
    # this fixture; everything else must be as it was.
    leaked = {
        fd: path
        for fd, path in fd_table().items()
        if before.get(fd) != path and not path.startswith(("socket:", "anon_inode:[eventpoll]"))
    }
    assert leaked == {}, f"fds left open: {leaked}"


@pytest.fixture
def edu0(topology: Topology, vfio_bind: Callable[..., None]) -> str:
    addr = topology.guest_address("edu0")
    vfio_bind(addr)
    return addr


@pytest.fixture
def kvm() -> Iterator[KvmVfioDevice]:
    with KvmVm() as vm, vm.vfio_device() as device:
        yield device


# -- libvirtd with kvmvfio's hook, and the agent (tests/lab/libvirtkit.py) ----------


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[Libvirtd]:
    """libvirtd with kvmvfio's hook installed (before the start: libvirt looks for hooks then)."""
    result = install.install(HOOKS, python=sys.executable)
    assert result.path == HOOKS / "qemu.d" / "kvmvfio"
    with hooked_libvirtd() as daemon:
        yield daemon


@pytest.fixture
def clean(libvirtd: Libvirtd) -> Iterator[None]:
    """Each test starts and ends with no domain and nothing in the journal."""
    assert status() == []
    yield
    for name in virsh("list", "--name", check=False).stdout.split():
        destroy(name)
    leftover = status()
    recover()
    assert leftover == [], f"the journal still held {leftover}"


@pytest.fixture
def agent(clean: None, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "agent.log")
    proc.start()
    yield proc
    proc.kill()


# -- the kvm a device takes at open (a kprobe) --------------------------------------


@pytest.fixture
def kvm_probe() -> Iterator[Callable[[], list[int]]]:
    """A kprobe on ``vfio_device_get_kvm_safe(device, kvm)``: the kvm a device takes at open.

    Yields a function returning the kvm pointers this process's opens
    passed (0 = the device was opened with no KVM to take).
    """
    definition = "p:kvmvfio_getkvm vfio_device_get_kvm_safe kvm=%si:x64"
    with kprobe("kvmvfio_getkvm", definition, "kvm", 16) as seen:
        yield seen
