"""kvmvfio.kvm: the VM and its kvm-vfio device.

Tests marked ``kvm`` run against the host's real ``/dev/kvm`` (a VM with no
memory and no vCPUs is enough) and are skipped where it cannot be opened.
This host has no VFIO, so no real VFIO file can be added; what KVM answers
for everything else (EINVAL, EBADF, ENOENT, EBUSY) is checked for real, and
the bookkeeping of adds and removes is checked against a fake KVM behind
the ioctl seam. Every test checks that it leaves no fd open.
"""

from __future__ import annotations

import errno
import gc
import inspect
import logging
import os
import pickle
import warnings
from collections.abc import Iterator

import pytest

from kvmvfio import uapi
from kvmvfio.errors import (
    AlreadyAssociated,
    Busy,
    KernelError,
    KernelUnsupported,
    KvmClosed,
    KvmRefusedFile,
    KvmVfioDeviceExists,
    KvmvfioError,
    NotAssociated,
    SessionStateError,
    UsageError,
)
from kvmvfio.kvm import KVM_VFIO_FILE, VM_FILE, KvmVfioDevice, KvmVm


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    if inspect.iscoroutinefunction(request.function):
        # The event loop's own fds close after this fixture; async tests count
        # inside their body.
        yield
        return
    before = _fd_count()
    yield
    assert _fd_count() == before, "a test left an fd open"


@pytest.fixture
def dev_kvm() -> str:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        pytest.skip(f"/dev/kvm cannot be opened: {err.strerror}")
    return "/dev/kvm"


@pytest.fixture
def vm(dev_kvm: str) -> Iterator[KvmVm]:
    with KvmVm(dev_kvm) as vm:
        yield vm


@pytest.fixture
def device(vm: KvmVm) -> Iterator[KvmVfioDevice]:
    with vm.vfio_device() as device:
        yield device


@pytest.fixture
def null_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _closed_fd() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


# -- against the real /dev/kvm -----------------------------------------------------


@pytest.mark.kvm
def test_vm_and_kvm_vfio_device(vm: KvmVm, device: KvmVfioDevice) -> None:
    assert uapi.fd_path(vm.fileno()) == VM_FILE
    assert uapi.fd_path(device.fileno()) == KVM_VFIO_FILE
    # No child process inherits a VM or a device by accident.
    assert not os.get_inheritable(vm.fileno())
    assert not os.get_inheritable(device.fileno())
    assert vm.owned
    assert device.owned
    assert device.files == ()


@pytest.mark.kvm
def test_has_attr(device: KvmVfioDevice) -> None:
    assert device.has_attr(uapi.KVM_DEV_VFIO_FILE_ADD)
    assert device.has_attr(uapi.KVM_DEV_VFIO_FILE_DEL)
    assert device.has_attr(uapi.KVM_DEV_VFIO_GROUP_ADD, uapi.KVM_DEV_VFIO_GROUP)
    assert not device.has_attr(99)  # ENXIO
    assert not device.has_attr(uapi.KVM_DEV_VFIO_FILE_ADD, group=99)


@pytest.mark.kvm
def test_adding_dev_null_is_refused(device: KvmVfioDevice, null_fd: int) -> None:
    with pytest.raises(KvmRefusedFile) as caught:
        device.add(null_fd)
    err = caught.value
    assert isinstance(err, KernelError)
    assert isinstance(err, OSError)
    assert err.errno == errno.EINVAL
    assert err.op == "KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE_ADD)"
    assert err.filename == KVM_VFIO_FILE
    assert "/dev/null" in str(err)
    assert "not a VFIO group" in str(err)
    assert device.files == ()


@pytest.mark.kvm
@pytest.mark.parametrize("what", ["pipe", "dev-kvm", "vm", "itself"])
def test_other_files_than_vfio_are_refused(
    dev_kvm: str, vm: KvmVm, device: KvmVfioDevice, what: str
) -> None:
    opened: list[int] = []
    if what == "pipe":
        opened += os.pipe()
        fd = opened[0]
    elif what == "dev-kvm":
        fd = os.open(dev_kvm, os.O_RDWR | os.O_CLOEXEC)
        opened.append(fd)
    else:
        fd = vm.fileno() if what == "vm" else device.fileno()
    try:
        with pytest.raises(KvmRefusedFile) as caught:
            device.add(fd, subject=f"the {what}")
        assert caught.value.errno == errno.EINVAL
        assert f"on the {what} failed" in str(caught.value)
    finally:
        for each in opened:
            os.close(each)


@pytest.mark.kvm
@pytest.mark.parametrize("fd", [-1, 9999, None])
def test_bad_fds_are_ebadf(device: KvmVfioDevice, fd: int | None) -> None:
    number = _closed_fd() if fd is None else fd
    assert uapi.fd_path(number) is None
    with pytest.raises(KernelError) as caught:
        device.add(number)
    assert caught.value.errno == errno.EBADF
    assert f"fd {number} is not an open file descriptor" in str(caught.value)
    with pytest.raises(KernelError) as removing:
        device.remove(number)
    assert removing.value.errno == errno.EBADF


@pytest.mark.kvm
def test_removing_what_was_never_added(device: KvmVfioDevice, null_fd: int) -> None:
    with pytest.raises(NotAssociated) as caught:
        device.remove(null_fd)
    assert caught.value.errno == errno.ENOENT
    assert caught.value.op == "KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE_DEL)"
    assert "never added" in str(caught.value)


@pytest.mark.kvm
def test_one_kvm_vfio_device_per_vm(vm: KvmVm, device: KvmVfioDevice) -> None:
    with pytest.raises(KvmVfioDeviceExists) as caught:
        KvmVfioDevice(vm)
    err = caught.value
    assert isinstance(err, Busy)
    assert err.errno == errno.EBUSY
    assert err.op == "KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO)"
    assert err.filename == VM_FILE
    assert "at most one kvm-vfio device" in str(err)
    assert "QEMU" in str(err)
    # Closing the device frees the VM's slot (kvm_vfio_release).
    device.close()
    with KvmVfioDevice(vm) as again:
        assert again.has_attr()


@pytest.mark.kvm
def test_close_is_idempotent_and_later_use_refused(dev_kvm: str, null_fd: int) -> None:
    vm = KvmVm(dev_kvm)
    device = vm.vfio_device()
    device.close()
    device.close()
    assert device.closed
    with pytest.raises(KvmClosed) as caught:
        device.add(null_fd, subject="group 7")
    assert isinstance(caught.value, SessionStateError)
    assert isinstance(caught.value, KvmvfioError)
    assert str(caught.value) == (
        f"cannot add group 7: {device.subject} is closed (or was handed over)"
    )
    assert device.subject.startswith("the kvm-vfio device (fd ")
    assert device.subject.endswith(f"of {vm.subject}")
    with pytest.raises(KvmClosed):
        device.remove(null_fd)
    with pytest.raises(KvmClosed):
        device.fileno()
    vm.close()
    vm.close()
    with pytest.raises(KvmClosed, match="cannot use its fd: KVM VM"):
        vm.fileno()
    with pytest.raises(KvmClosed):
        vm.vfio_device()


@pytest.mark.kvm
def test_device_outlives_its_vm_object(dev_kvm: str) -> None:
    # The kvm-vfio device holds a reference to the VM: closing the VM's fd
    # first does not break it.
    vm = KvmVm(dev_kvm)
    device = vm.vfio_device()
    vm.close()
    try:
        assert device.has_attr()
    finally:
        device.close()


@pytest.mark.kvm
async def test_async_context_managers(dev_kvm: str) -> None:
    before = _fd_count()
    async with KvmVm(dev_kvm) as vm, vm.vfio_device() as device:
        assert device.has_attr()
    assert device.closed
    assert vm.closed
    assert _fd_count() == before


@pytest.mark.kvm
def test_borrowed_vm_is_not_closed(dev_kvm: str) -> None:
    owner = KvmVm(dev_kvm)
    fd = owner.detach()  # the caller owns it now, as QEMU would
    assert owner.closed
    try:
        with KvmVm.borrow(fd, subject="QEMU's VM") as vm:
            assert not vm.owned
            assert vm.subject == "QEMU's VM"
            with vm.vfio_device() as device:
                assert device.has_attr()
        assert vm.closed
        assert uapi.fd_path(fd) == VM_FILE  # still open
    finally:
        os.close(fd)


@pytest.mark.kvm
def test_borrowed_device_is_not_closed(device: KvmVfioDevice) -> None:
    borrowed = KvmVfioDevice.borrow(device.fileno())
    assert not borrowed.owned
    assert borrowed.has_attr()
    borrowed.close()
    assert uapi.fd_path(device.fileno()) == KVM_VFIO_FILE


def test_borrow_refuses_other_files(null_fd: int) -> None:
    with pytest.raises(UsageError, match="not on a KVM VM"):
        KvmVm.borrow(null_fd)
    with pytest.raises(UsageError, match="not on a kvm-vfio device"):
        KvmVfioDevice.borrow(null_fd)
    closed = _closed_fd()
    with pytest.raises(KernelError) as caught:
        KvmVm.borrow(closed)
    assert caught.value.errno == errno.EBADF
    with pytest.raises(KernelError):
        KvmVfioDevice.borrow(closed)


@pytest.mark.kvm
def test_fd_count_is_back_after_everything_closes(dev_kvm: str, null_fd: int) -> None:
    before = _fd_count()
    vm = KvmVm(dev_kvm)
    device = vm.vfio_device()
    with pytest.raises(KvmRefusedFile):
        device.add(null_fd)
    with pytest.raises(KvmVfioDeviceExists):
        KvmVfioDevice(vm)
    assert _fd_count() == before + 2  # the VM and the device; /dev/kvm is closed again
    device.close()
    vm.close()
    assert _fd_count() == before


def test_missing_kvm_is_unsupported(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(KernelUnsupported, match="KVM"):
        KvmVm(os.path.join(tmp_path, "kvm"))


def test_a_file_that_is_not_kvm(null_fd: int) -> None:
    with pytest.raises(KernelError) as caught:
        KvmVm(os.devnull)
    assert caught.value.errno == errno.ENOTTY
    assert caught.value.op == "KVM_GET_API_VERSION"


def test_errors_pickle() -> None:
    for err in (
        KvmRefusedFile(errno.EINVAL, "op", "p", "s"),
        AlreadyAssociated(errno.EEXIST, "op"),
        NotAssociated(errno.ENOENT, "op"),
        KvmVfioDeviceExists(errno.EBUSY, "op", "p"),
        KvmClosed("add x", "the device"),
    ):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err)
        assert str(again) == str(err)


# -- bookkeeping, against a fake KVM behind the seam --------------------------------


class FakeKvm:
    """Plays /dev/kvm behind uapi.set_backend: VMs and devices are /dev/null fds.

    It holds files by (st_dev, st_ino), as KVM holds struct files, and
    answers FILE_ADD / FILE_DEL with KVM's errnos.
    """

    def __init__(self) -> None:
        self.held: list[tuple[int, int]] = []
        self.log: list[tuple[str, int]] = []
        self.refuse_del: set[int] = set()

    def _new_fd(self) -> int:
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def __call__(self, fd: int, op: uapi.Ioctl, arg: uapi.CData | int) -> int:
        if op is uapi.KVM_GET_API_VERSION:
            return 12
        if op is uapi.KVM_CREATE_VM:
            return self._new_fd()
        assert not isinstance(arg, int)
        if op is uapi.KVM_CREATE_DEVICE:
            assert arg.type == uapi.KVM_DEV_TYPE_VFIO
            arg.fd = self._new_fd()
            return 0
        if op is uapi.KVM_SET_DEVICE_ATTR:
            assert arg.group == uapi.KVM_DEV_VFIO_FILE
            target = uapi.ffi.cast("int32_t *", arg.addr)[0]
            st = os.fstat(target)  # EBADF as the kernel's fget()
            key = (st.st_dev, st.st_ino)
            if arg.attr == uapi.KVM_DEV_VFIO_FILE_ADD:
                if key in self.held:
                    raise OSError(errno.EEXIST, "exists")
                self.held.append(key)
                self.log.append(("add", target))
            else:
                if key not in self.held or target in self.refuse_del:
                    raise OSError(errno.ENOENT, "not found")
                self.held.remove(key)
                self.log.append(("del", target))
            return 0
        raise OSError(errno.ENOTTY, "not a fake ioctl")


@pytest.fixture
def fake() -> Iterator[FakeKvm]:
    with uapi.using_backend(FakeKvm()) as fake:
        yield fake


@pytest.fixture
def files() -> Iterator[list[int]]:
    """Three files of distinct inodes (read ends of pipes: a pipe's two ends share one)."""
    pipes = [os.pipe() for _ in range(3)]
    try:
        yield [r for r, _w in pipes]
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_close_removes_in_reverse_order(fake: FakeKvm, files: list[int]) -> None:
    with KvmVm(os.devnull) as vm, vm.vfio_device() as device:
        for fd in files:
            device.add(fd)
        assert [f.fd for f in device.files] == files
    assert fake.log == [("add", fd) for fd in files] + [("del", fd) for fd in reversed(files)]
    assert fake.held == []


def test_remove_updates_what_close_removes(fake: FakeKvm, files: list[int]) -> None:
    with KvmVm(os.devnull) as vm, vm.vfio_device() as device:
        device.add(files[0], subject="group 3")
        device.add(files[1])
        device.remove(files[0])
        pipe = f"pipe:[{os.fstat(files[1]).st_ino}] (fd {files[1]})"
        assert [f.subject for f in device.files] == [pipe]
    assert fake.log[-2:] == [("del", files[0]), ("del", files[1])]


def test_adding_twice_is_already_associated(fake: FakeKvm, files: list[int]) -> None:
    with KvmVm(os.devnull) as vm, vm.vfio_device() as device:
        device.add(files[0])
        with pytest.raises(AlreadyAssociated) as caught:
            device.add(files[0])
        assert caught.value.errno == errno.EEXIST
        assert len(device.files) == 1


def test_close_skips_fds_closed_or_reused_meanwhile(
    fake: FakeKvm, files: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvmvfio.kvm")
    with KvmVm(os.devnull) as vm, vm.vfio_device() as device:
        extra_r, extra_w = os.pipe()
        device.add(extra_r)
        device.add(files[0])
        os.close(extra_r)  # the caller closed it; KVM still holds the file
        os.close(extra_w)
    # Only files[0] was removed one by one; closing the device releases the rest.
    assert fake.log[-1] == ("del", files[0])
    assert ("del", extra_r) not in fake.log
    assert "no longer refers to" in caplog.text


def test_close_logs_a_refused_removal_and_still_closes(
    fake: FakeKvm, files: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    vm = KvmVm(os.devnull)
    device = vm.vfio_device()
    device.add(files[0])
    fake.refuse_del.add(files[0])
    device.close()  # does not raise
    assert device.closed
    assert "KVM_DEV_VFIO_FILE_DEL" in caplog.text
    vm.close()


def test_remove_of_a_stale_record_forgets_it(fake: FakeKvm, files: list[int]) -> None:
    with KvmVm(os.devnull) as vm, vm.vfio_device() as device:
        device.add(files[0])
        fake.held.clear()  # someone else took it back
        with pytest.raises(NotAssociated):
            device.remove(files[0])
        assert device.files == ()


# -- owners dropped without close() ---------------------------------------------------


def test_a_vm_and_device_dropped_open_warn_and_close(fake: FakeKvm) -> None:
    vm = KvmVm(os.devnull)
    vm_fd = vm.fileno()
    box: list[object] = [vm.vfio_device()]
    device_fd = box[0].fileno()  # type: ignore[attr-defined]
    with pytest.warns(ResourceWarning) as caught:
        box.clear()
    assert [str(w.message) for w in caught] == [
        f"unclosed the kvm-vfio device (fd {device_fd}) of KVM VM (fd {vm_fd}) "
        f"(fd {device_fd}, {KVM_VFIO_FILE})"
    ]
    box = [vm]
    del vm
    with pytest.warns(ResourceWarning, match=rf"^unclosed KVM VM \(fd {vm_fd}\) \(fd {vm_fd}, "):
        box.clear()
    # no_fd_leak checks that both fds were closed


@pytest.mark.kvm
def test_borrowed_owners_dropped_open_are_silent(vm: KvmVm, device: KvmVfioDevice) -> None:
    box: list[object] = [KvmVm.borrow(vm.fileno()), KvmVfioDevice.borrow(device.fileno())]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        box.clear()
        gc.collect()
    assert uapi.fd_path(vm.fileno()) == VM_FILE
    assert uapi.fd_path(device.fileno()) == KVM_VFIO_FILE
