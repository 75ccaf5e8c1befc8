"""Pinned-memory accounting of the iommufds kvmvfio hands to QEMU, through the ioctl seam.

The kernel's side (EPERM, EBUSY, what QEMU then may pin) is in the lab
(tests/lab/test_iommufd_accounting.py). Here a fake backend under
:func:`kvmvfio.uapi.ioctl` records each ``IOMMU_OPTION`` call: what it
asked, on which file, and what QEMU had received by then.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fakeqmp import FakeQmp
from fakesysfs import Dev, Topology

from kvmvfio import uapi
from kvmvfio.errors import KernelError
from kvmvfio.host import Host
from kvmvfio.qemu import Qemu, attach, coldplug, handoff
from kvmvfio.vfio.iommufd import (
    Iommufd,
    RlimitMode,
    RlimitModeRefused,
    get_rlimit_mode,
    open_for_vmm,
    set_rlimit_mode,
)

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}
BuildHost = Callable[[Topology], Host]


@dataclass
class Option:
    """One IOMMU_OPTION call as the kernel would have read it."""

    path: str | None
    option_id: int
    op: int
    reserved: int
    object_id: int
    val64: int
    size: int
    #: Set by the test: what QEMU had received when the call was made.
    qemu_fds_by_then: int = -1


@dataclass
class Kernel:
    """A fake backend: answers IOMMU_OPTION from ``mode``, or fails with ``error``."""

    mode: int = 0
    error: int | None = None
    calls: list[Option] = field(default_factory=list)
    before_each: Callable[[], int] | None = None

    def __call__(self, fd: int, op: uapi.Ioctl, arg: uapi.CData | int) -> int:
        assert op is uapi.IOMMU_OPTION, f"unexpected {op.name}"
        assert not isinstance(arg, int)
        call = Option(
            uapi.fd_path(fd),
            arg.option_id,
            arg.op,
            getattr(arg, "__reserved"),  # arg.__reserved: a class body would mangle it
            arg.object_id,
            arg.val64,
            arg.size,
        )
        if self.before_each is not None:
            call.qemu_fds_by_then = self.before_each()
        self.calls.append(call)
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        if arg.op == uapi.IOMMU_OPTION_OP_GET:
            arg.val64 = self.mode
        else:
            self.mode = arg.val64
        return 0


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    with uapi.using_backend(Kernel()) as fake:
        yield fake


@pytest.fixture
def devfs(tmp_path: Path) -> Path:
    (tmp_path / "iommu").write_bytes(b"")  # opened for real; ioctls go to the fake
    return tmp_path


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- the calls themselves --------------------------------------------------------------


def test_set_sends_the_option_as_the_header_lays_it_out(kernel: Kernel, devfs: Path) -> None:
    with Iommufd(devfs) as iommufd:
        iommufd.set_rlimit_mode(RlimitMode.PROCESS)
        assert iommufd.rlimit_mode() is RlimitMode.PROCESS
    set_call, get_call = kernel.calls
    assert set_call == Option(
        str(devfs / "iommu"),
        option_id=uapi.IOMMU_OPTION_RLIMIT_MODE,
        op=uapi.IOMMU_OPTION_OP_SET,
        reserved=0,  # the kernel refuses anything else with EOPNOTSUPP
        object_id=0,  # a global option: the kernel refuses an object with EOPNOTSUPP
        val64=1,
        size=24,
    )
    assert (get_call.op, get_call.val64) == (uapi.IOMMU_OPTION_OP_GET, 0)


def test_get_reads_the_kernels_answer(kernel: Kernel, devfs: Path) -> None:
    fd = os.open(devfs / "iommu", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert get_rlimit_mode(fd) is RlimitMode.USER
        set_rlimit_mode(fd, RlimitMode.PROCESS)
        assert get_rlimit_mode(fd) is RlimitMode.PROCESS
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("code", "words", "unsupported"),
    [
        (errno.EPERM, "needs CAP_SYS_RESOURCE", False),
        (errno.EBUSY, "holds objects already", False),
        (errno.EINVAL, "only 0 (per user) and 1 (per process)", False),
        (errno.EOPNOTSUPP, "has no IOMMU_OPTION_RLIMIT_MODE", True),
        (errno.ENOTTY, "has no IOMMU_OPTION ioctl", True),
    ],
)
def test_a_refusal_keeps_errno_op_and_path_and_says_what_it_means(
    kernel: Kernel, devfs: Path, code: int, words: str, unsupported: bool
) -> None:
    kernel.error = code
    with Iommufd(devfs) as iommufd, pytest.raises(RlimitModeRefused) as refused:
        iommufd.set_rlimit_mode(RlimitMode.PROCESS)
    err = refused.value
    assert isinstance(err, KernelError)
    assert isinstance(err, OSError)
    assert (err.errno, err.op, err.filename) == (
        code,
        "IOMMU_OPTION(IOMMU_OPTION_RLIMIT_MODE)",
        str(devfs / "iommu"),
    )
    assert words in str(err)
    assert str(err).startswith("IOMMU_OPTION(IOMMU_OPTION_RLIMIT_MODE) on iommufd failed: ")
    assert err.unsupported is unsupported
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again)) == (RlimitModeRefused, str(err))


# -- opening one for QEMU --------------------------------------------------------------


def test_open_for_vmm_sets_per_process_and_says_for_whom(
    kernel: Kernel, devfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvmvfio.vfio.iommufd")
    fd = open_for_vmm(devfs, "QEMU pid 4242")
    try:
        assert [(c.path, c.op, c.val64) for c in kernel.calls] == [
            (str(devfs / "iommu"), uapi.IOMMU_OPTION_OP_SET, RlimitMode.PROCESS)
        ]
        assert uapi.fd_path(fd.fileno()) == str(devfs / "iommu")
    finally:
        fd.close()
    (record,) = caplog.records
    assert record.getMessage() == (
        "iommufd for QEMU pid 4242: pinned memory counted per process, against its own "
        "RLIMIT_MEMLOCK (IOMMU_OPTION(IOMMU_OPTION_RLIMIT_MODE)=1)"
    )


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOTTY])
def test_a_kernel_without_the_option_gets_a_warning_and_the_fd(
    kernel: Kernel, devfs: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    kernel.error = code
    fd = open_for_vmm(devfs, "QEMU pid 4242")
    fd.close()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("iommufd for QEMU pid 4242: IOMMU_OPTION(")
    assert "share one RLIMIT_MEMLOCK" in record.getMessage()


@pytest.mark.parametrize("code", [errno.EPERM, errno.EBUSY, errno.EINVAL])
def test_any_other_refusal_is_an_error_and_leaves_nothing_open(
    kernel: Kernel, devfs: Path, code: int
) -> None:
    kernel.error = code
    before = _open_fds()
    with pytest.raises(RlimitModeRefused) as refused:
        open_for_vmm(devfs, "QEMU pid 4242")
    assert refused.value.errno == code
    assert _open_fds() == before


def test_accounting_none_leaves_the_default_and_says_so(
    kernel: Kernel, devfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvmvfio.vfio.iommufd")
    open_for_vmm(devfs, "QEMU pid 4242", accounting=None).close()
    assert kernel.calls == []
    assert "left counted per user" in caplog.records[0].getMessage()


# -- cold plug ---------------------------------------------------------------------------


def test_cold_plug_passes_the_iommufd_it_set(kernel: Kernel, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    with coldplug(["00:03.0"], coherency="ignore", host=host) as plug:
        iommufd = plug.pass_fds[0]
        assert plug.args[1] == f"iommufd,id=kvmvfio-iommufd,fd={iommufd}"
        (call,) = kernel.calls
        assert (call.path, call.op, call.val64) == (
            str(host.devfs / "iommu"),
            uapi.IOMMU_OPTION_OP_SET,
            RlimitMode.PROCESS,
        )
        assert call.path == uapi.fd_path(iommufd)


def test_cold_plug_refused_accounting_opens_nothing(kernel: Kernel, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    kernel.error = errno.EPERM
    before = _open_fds()
    with pytest.raises(RlimitModeRefused, match="CAP_SYS_RESOURCE"):
        coldplug(["00:03.0"], coherency="ignore", host=host)
    assert _open_fds() == before


# -- attach ------------------------------------------------------------------------------


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    peer = await FakeQmp(tmp_path / "qmp.sock").start()
    peer.replies.update(
        {
            "qom-list-types": [{"name": "iommufd"}],
            "query-memory-size-summary": {"base-memory": 1 << 30},
            "qom-list": lambda a: (
                [{"name": "rp0", "type": "child<pcie-root-port>"}]
                if a["path"] == "/machine/peripheral"
                else []
            ),
            "getfd": {},
            "object-add": {},
            "device_add": {},
        }
    )
    yield peer
    await peer.stop()


@pytest.fixture(autouse=True)
def no_memlock_change(monkeypatch: pytest.MonkeyPatch) -> None:
    # The limit is another test's subject; this process's own must not change.
    async def ensure_memlock(qemu: object, *, raise_it: bool = True, memory: object = None) -> int:
        return 0

    monkeypatch.setattr(handoff, "ensure_memlock", ensure_memlock)


async def test_attach_sets_the_option_before_qemu_gets_the_iommufd(
    kernel: Kernel, fake: FakeQmp, build_host: BuildHost, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "kvmvfio.vfio.iommufd")
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    kernel.before_each = lambda: fake.fds_received
    async with Qemu(fake.path) as qemu:
        (done,) = await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert done.path == "cdev"
    (call,) = kernel.calls
    assert (call.path, call.op, call.val64) == (
        str(host.devfs / "iommu"),
        uapi.IOMMU_OPTION_OP_SET,
        RlimitMode.PROCESS,
    )
    assert call.qemu_fds_by_then == 0  # set on our fd, before QEMU had any fd of ours
    sent = [(c, a.get("fdname")) for c, a in fake.received if c == "getfd"]
    assert sent == [("getfd", "kvmvfio-iommufd-fd"), ("getfd", "kvmvfio-fd-0000-00-03-0")]
    assert fake.fds_received == 2
    assert f"iommufd for QEMU pid {os.getpid()}: pinned memory counted per process" in (caplog.text)


async def test_attach_to_a_vm_with_its_iommufd_object_sets_nothing(
    kernel: Kernel, fake: FakeQmp, build_host: BuildHost
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    listing = {
        "/machine/peripheral": [{"name": "rp0", "type": "child<pcie-root-port>"}],
        "/objects": [{"name": "kvmvfio-iommufd", "type": "child<iommufd>"}],
    }
    fake.replies["qom-list"] = lambda a: listing.get(str(a["path"]), [])
    async with Qemu(fake.path) as qemu:
        await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert kernel.calls == []  # QEMU's iommufd holds objects: its mode is what it is
    assert [a.get("fdname") for c, a in fake.received if c == "getfd"] == [
        "kvmvfio-fd-0000-00-03-0"
    ]


async def test_attach_refused_accounting_sends_qemu_nothing(
    kernel: Kernel, fake: FakeQmp, build_host: BuildHost
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    kernel.error = errno.EPERM
    async with Qemu(fake.path) as qemu:
        with pytest.raises(RlimitModeRefused, match="CAP_SYS_RESOURCE"):
            await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert fake.fds_received == 0
    assert not {"getfd", "object-add", "device_add"} & {c for c, _ in fake.received}
    ours = {uapi.fd_path(int(name)) for name in _open_fds()}
    assert str(host.devfs / "iommu") not in ours
