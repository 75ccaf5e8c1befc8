"""kvmvfio.uapi: pinned numbers and sizes, struct allocation, and the ioctl seam.

The golden tables below are the Linux 6.12 values (checked against the real
headers by test_uapi_headers.py). A change to the cdef text that moves one of
them fails here, on any machine, without a compiler.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cffi
import pytest

from kvmvfio import uapi
from kvmvfio.errors import Busy, KernelError, KvmvfioError, PermissionDenied
from kvmvfio.uapi.__main__ import main, report

IOCTL_NUMBERS = {
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
    "VFIO_DEVICE_SET_IRQS": 0x3B6E,
    "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO": 0x3B70,
    "VFIO_DEVICE_PCI_HOT_RESET": 0x3B71,
    "VFIO_DEVICE_FEATURE": 0x3B75,
    "VFIO_DEVICE_BIND_IOMMUFD": 0x3B76,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": 0x3B78,
    "VFIO_IOMMU_GET_INFO": 0x3B70,
    "VFIO_IOMMU_MAP_DMA": 0x3B71,
    "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
    "IOMMU_DESTROY": 0x3B80,
    "IOMMU_IOAS_ALLOC": 0x3B81,
    "IOMMU_IOAS_ALLOW_IOVAS": 0x3B82,
    "IOMMU_IOAS_COPY": 0x3B83,
    "IOMMU_IOAS_IOVA_RANGES": 0x3B84,
    "IOMMU_IOAS_MAP": 0x3B85,
    "IOMMU_IOAS_UNMAP": 0x3B86,
    "IOMMU_OPTION": 0x3B87,
    "IOMMU_VFIO_IOAS": 0x3B88,
    "IOMMU_HWPT_ALLOC": 0x3B89,
    "IOMMU_GET_HW_INFO": 0x3B8A,
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_CREATE_DEVICE": 0xC00CAEE0,
    "KVM_SET_DEVICE_ATTR": 0x4018AEE1,
    "KVM_GET_DEVICE_ATTR": 0x4018AEE2,
    "KVM_HAS_DEVICE_ATTR": 0x4018AEE3,
}

STRUCT_SIZES = {
    "iommu_destroy": 8,
    "iommu_hw_info": 40,
    "iommu_hw_info_vtd": 24,
    "iommu_hwpt_alloc": 48,
    "iommu_ioas_alloc": 12,
    "iommu_ioas_allow_iovas": 24,
    "iommu_ioas_copy": 40,
    "iommu_ioas_iova_ranges": 32,
    "iommu_ioas_map": 40,
    "iommu_ioas_unmap": 24,
    "iommu_iova_range": 16,
    "iommu_option": 24,
    "iommu_vfio_ioas": 12,
    "kvm_create_device": 12,
    "kvm_device_attr": 24,
    "kvm_vfio_spapr_tce": 8,
    "vfio_device_attach_iommufd_pt": 12,
    "vfio_device_feature": 8,
    "vfio_device_bind_iommufd": 16,
    "vfio_device_detach_iommufd_pt": 8,
    "vfio_device_info": 24,
    "vfio_group_status": 8,
    "vfio_info_cap_header": 8,
    "vfio_iommu_type1_dma_map": 32,
    "vfio_iommu_type1_dma_unmap": 24,
    "vfio_iommu_type1_info": 24,
    "vfio_iommu_type1_info_cap_iova_range": 16,
    "vfio_iova_range": 16,
    "vfio_irq_info": 16,
    "vfio_irq_set": 20,
    "vfio_pci_dependent_device": 8,
    "vfio_pci_hot_reset": 12,
    "vfio_pci_hot_reset_info": 12,
    "vfio_region_info": 32,
    "vfio_region_info_cap_sparse_mmap": 16,
    "vfio_region_info_cap_type": 16,
    "vfio_region_sparse_mmap_area": 16,
}

# The offsets a wrong declaration is most likely to move: u64s after u32s,
# anonymous unions, and fields that 6.12 has and older/newer kernels do not.
OFFSETS = {
    "kvm_device_attr.group": 4,
    "kvm_device_attr.attr": 8,
    "kvm_device_attr.addr": 16,
    "kvm_create_device.fd": 4,
    "vfio_region_info.size": 16,
    "vfio_region_info.offset": 24,
    "vfio_device_bind_iommufd.out_devid": 12,
    "vfio_device_attach_iommufd_pt.pt_id": 8,
    "vfio_iommu_type1_dma_map.vaddr": 8,
    "vfio_iommu_type1_dma_map.iova": 16,
    "vfio_iommu_type1_dma_map.size": 24,
    "vfio_iommu_type1_dma_unmap.data": 24,
    "vfio_pci_dependent_device.group_id": 0,
    "vfio_pci_dependent_device.devid": 0,
    "vfio_pci_dependent_device.segment": 4,
    "vfio_pci_dependent_device.devfn": 7,
    "vfio_pci_hot_reset_info.devices": 12,
    "iommu_ioas_map.user_va": 16,
    "iommu_ioas_map.iova": 32,
    "iommu_ioas_unmap.iova": 8,
    "iommu_vfio_ioas.op": 8,
    "iommu_option.option_id": 4,
    "iommu_option.op": 8,
    "iommu_option.__reserved": 10,
    "iommu_option.object_id": 12,
    "iommu_option.val64": 16,
    "iommu_hw_info.out_data_type": 24,
    "iommu_hw_info.out_max_pasid_log2": 28,
    "iommu_hw_info.out_capabilities": 32,
}


def test_ioctl_numbers_are_pinned() -> None:
    assert {name: op.number for name, op in uapi.IOCTLS.items()} == IOCTL_NUMBERS


def test_struct_sizes_are_pinned() -> None:
    assert uapi.SIZES == STRUCT_SIZES


def test_field_offsets_are_pinned() -> None:
    offsets = uapi.field_offsets()
    assert {key: offsets[key] for key in OFFSETS} == OFFSETS
    assert uapi.ffi.offsetof("struct kvm_device_attr", "addr") == 16


def test_key_constants() -> None:
    assert uapi.KVM_API_VERSION == 12
    assert uapi.KVM_DEV_TYPE_VFIO == 4
    assert (uapi.KVM_DEV_VFIO_FILE, uapi.KVM_DEV_VFIO_FILE_ADD, uapi.KVM_DEV_VFIO_FILE_DEL) == (
        1,
        1,
        2,
    )
    assert (uapi.KVM_DEV_VFIO_GROUP, uapi.KVM_DEV_VFIO_GROUP_ADD, uapi.KVM_DEV_VFIO_GROUP_DEL) == (
        uapi.KVM_DEV_VFIO_FILE,
        uapi.KVM_DEV_VFIO_FILE_ADD,
        uapi.KVM_DEV_VFIO_FILE_DEL,
    )
    assert uapi.VFIO_API_VERSION == 0
    assert (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_DMA_CC_IOMMU) == (1, 3, 4)
    assert uapi.VFIO_NOIOMMU_IOMMU == 8
    assert uapi.VFIO_DEVICE_FLAGS_CDX == 1 << 8
    assert uapi.VFIO_PCI_CONFIG_REGION_INDEX == 7
    assert uapi.VFIO_PCI_NUM_REGIONS == 9
    assert uapi.VFIO_PCI_MSIX_IRQ_INDEX == 2
    assert uapi.VFIO_PCI_DEVID_NOT_OWNED == -1
    assert uapi.IOMMU_IOAS_MAP_READABLE == 1 << 2
    assert (uapi.IOMMU_VFIO_IOAS_GET, uapi.IOMMU_VFIO_IOAS_SET, uapi.IOMMU_VFIO_IOAS_CLEAR) == (
        0,
        1,
        2,
    )
    assert (uapi.IOMMU_OPTION_RLIMIT_MODE, uapi.IOMMU_OPTION_HUGE_PAGES) == (0, 1)
    assert (uapi.IOMMU_OPTION_OP_SET, uapi.IOMMU_OPTION_OP_GET) == (0, 1)
    assert uapi.IOMMUFD_CMD_OPTION == 0x87
    assert uapi.VFIO_TYPE == uapi.IOMMUFD_TYPE == ord(";")
    assert uapi.KVMIO == 0xAE


def test_every_ioctl_is_exported_under_its_name() -> None:
    for name, op in uapi.IOCTLS.items():
        assert getattr(uapi, name) is op
        assert op.name == name == str(op)
        assert op.header in {"linux/vfio.h", "linux/iommufd.h", "linux/kvm.h"}
        if op.struct is not None:
            assert op.struct in uapi.SIZES
            assert uapi.STRUCT_HEADERS[op.struct] == op.header


def test_every_constant_is_exported_with_its_value() -> None:
    assert len(uapi.CONSTANTS) > 100
    for name, value in uapi.CONSTANTS.items():
        assert getattr(uapi, name) == value, name


def test_every_struct_has_its_header() -> None:
    assert set(uapi.STRUCT_HEADERS) == set(uapi.SIZES)


def test_ioctl_fields_decode_like_the_kernel_macros() -> None:
    attr = uapi.KVM_SET_DEVICE_ATTR
    assert (attr.direction, attr.type, attr.nr, attr.size) == ("write", 0xAE, 0xE1, 24)
    create = uapi.KVM_CREATE_DEVICE
    assert (create.direction, create.size, create.struct) == ("read-write", 12, "kvm_create_device")
    status = uapi.VFIO_GROUP_GET_STATUS
    # VFIO defines every ioctl with _IO: the size is in argsz, not in the number.
    assert (status.direction, status.type, status.nr, status.size) == ("none", 0x3B, 103, 0)
    assert status.struct == "vfio_group_status"
    assert uapi.VFIO_GROUP_SET_CONTAINER.arg == "__s32"
    assert uapi.VFIO_GROUP_SET_CONTAINER.struct is None
    assert uapi.VFIO_CHECK_EXTENSION.arg is None


# -- new() ------------------------------------------------------------------


def test_new_fills_argsz_for_vfio() -> None:
    status = uapi.new("vfio_group_status")
    assert status.argsz == 8
    assert status.flags == 0


def test_new_fills_size_for_iommufd() -> None:
    cmd = uapi.new("iommu_ioas_map", ioas_id=3, flags=uapi.IOMMU_IOAS_MAP_READABLE)
    assert (cmd.size, cmd.ioas_id, cmd.flags) == (40, 3, 4)


def test_new_leaves_kvm_structs_without_size_field() -> None:
    attr = uapi.new("kvm_device_attr", group=1, attr=2)
    assert (attr.flags, attr.group, attr.attr, attr.addr) == (0, 1, 2, 0)


def test_new_counts_a_trailing_array_in_argsz() -> None:
    info = uapi.new("vfio_pci_hot_reset_info", trailing=3)
    assert info.argsz == 12 + 3 * 8
    assert uapi.ffi.sizeof(info) == 8  # the pointer; the struct is argsz long


def test_new_refuses_unknown_structs_and_bad_trailing() -> None:
    with pytest.raises(ValueError, match="not declared"):
        uapi.new("vfio_nonsense")
    with pytest.raises(ValueError, match="no trailing flexible array"):
        uapi.new("vfio_group_status", trailing=2)


# -- the seam -----------------------------------------------------------------


class Recorder:
    """A backend that records its calls and answers from a script."""

    def __init__(self, result: int = 0, error: int | None = None) -> None:
        self.result = result
        self.error = error
        self.calls: list[tuple[int, uapi.Ioctl, object]] = []

    def __call__(self, fd: int, op: uapi.Ioctl, arg: object) -> int:
        self.calls.append((fd, op, arg))
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        return self.result


@pytest.fixture
def seam() -> Iterator[Recorder]:
    recorder = Recorder()
    previous = uapi.set_backend(recorder)
    try:
        yield recorder
    finally:
        uapi.set_backend(previous)


@pytest.fixture
def devnull() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def test_set_backend_returns_the_previous_and_none_restores(seam: Recorder) -> None:
    other = Recorder()
    assert uapi.set_backend(other) is seam
    assert uapi.set_backend(None) is other
    assert uapi.set_backend(seam).__name__ == "_fcntl_backend"


def test_ioctl_returns_the_int_result(seam: Recorder, devnull: int) -> None:
    seam.result = 17  # e.g. the device fd VFIO_GROUP_GET_DEVICE_FD returns
    assert uapi.ioctl_str(devnull, uapi.VFIO_GROUP_GET_DEVICE_FD, "0000:00:03.0") == 17
    ((fd, op, arg),) = seam.calls
    assert (fd, op) == (devnull, uapi.VFIO_GROUP_GET_DEVICE_FD)
    # NUL-terminated, as the kernel's strndup_user() wants it.
    assert uapi.ffi.buffer(arg)[:] == b"0000:00:03.0\0"


def test_ioctl_str_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        uapi.ioctl_str(0, uapi.VFIO_GROUP_GET_DEVICE_FD, "a\0b")


def test_backend_writes_are_seen_by_the_caller(devnull: int) -> None:
    def backend(fd: int, op: uapi.Ioctl, arg: uapi.CData | int) -> int:
        assert not isinstance(arg, int)
        arg.flags = uapi.VFIO_GROUP_FLAGS_VIABLE
        return 0

    previous = uapi.set_backend(backend)
    try:
        status = uapi.new("vfio_group_status")
        assert uapi.ioctl(devnull, uapi.VFIO_GROUP_GET_STATUS, status) == 0
        assert status.flags == uapi.VFIO_GROUP_FLAGS_VIABLE
    finally:
        uapi.set_backend(previous)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.EBUSY, Busy),
        (errno.EPERM, PermissionDenied),
        (errno.EACCES, PermissionDenied),
        (errno.ENOTTY, KernelError),
        (errno.EINVAL, KernelError),
    ],
)
def test_errno_becomes_a_typed_error(
    seam: Recorder, devnull: int, code: int, kind: type[KernelError]
) -> None:
    seam.error = code
    with pytest.raises(kind) as caught:
        uapi.ioctl(devnull, uapi.VFIO_DEVICE_RESET, subject="device 0000:00:03.0")
    err = caught.value
    assert type(err) is kind
    assert isinstance(err, OSError)
    assert isinstance(err, KvmvfioError)
    assert err.errno == code
    assert err.op == "VFIO_DEVICE_RESET"
    assert err.filename == "/dev/null"
    assert err.subject == "device 0000:00:03.0"
    assert isinstance(err.__cause__, OSError)
    assert str(err).startswith("VFIO_DEVICE_RESET on device 0000:00:03.0 failed: ")
    assert errno.errorcode[code] in str(err)


def test_errors_map_refines_per_errno(seam: Recorder, devnull: int) -> None:
    class Special(KernelError):
        pass

    seam.error = errno.EINVAL
    with pytest.raises(Special) as caught:
        uapi.ioctl(devnull, uapi.VFIO_DEVICE_RESET, errors={errno.EINVAL: Special})
    assert caught.value.errno == errno.EINVAL
    seam.error = errno.EBADF
    with pytest.raises(KernelError) as hinted:
        uapi.ioctl(
            devnull,
            uapi.VFIO_DEVICE_RESET,
            errors={errno.EBADF: "that fd is closed"},
            label="RESET(now)",
        )
    assert str(hinted.value) == (
        "RESET(now) on /dev/null failed: Bad file descriptor (EBADF); that fd is closed"
    )
    assert hinted.value.op == "RESET(now)"


def test_error_path_of_a_closed_fd_is_none(seam: Recorder) -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    seam.error = errno.EBADF
    with pytest.raises(KernelError) as caught:
        uapi.ioctl(fd, uapi.VFIO_DEVICE_RESET)
    assert caught.value.filename is None
    assert uapi.fd_path(fd) is None


def test_argument_types_are_checked_before_the_call(seam: Recorder) -> None:
    with pytest.raises(TypeError, match="takes a pointer to struct vfio_group_status, not an"):
        uapi.ioctl(0, uapi.VFIO_GROUP_GET_STATUS, 0)
    with pytest.raises(TypeError, match="not struct vfio_device_info"):
        uapi.ioctl(0, uapi.VFIO_GROUP_GET_STATUS, uapi.new("vfio_device_info"))
    with pytest.raises(TypeError, match="takes an integer argument"):
        uapi.ioctl(0, uapi.VFIO_CHECK_EXTENSION, uapi.new("vfio_device_info"))
    assert seam.calls == []
    # typedefs resolve: __s32 is int32_t, and an array passes for a pointer.
    uapi.ioctl(0, uapi.VFIO_GROUP_SET_CONTAINER, uapi.ffi.new("int32_t *", 5))
    uapi.ioctl(0, uapi.VFIO_GROUP_GET_DEVICE_FD, uapi.ffi.new("char[]", b"x"))
    uapi.ioctl(0, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU)
    assert len(seam.calls) == 3


def test_argsz_larger_than_the_allocation_is_refused(seam: Recorder) -> None:
    info = uapi.new("vfio_region_info")
    info.argsz = 80  # as the kernel leaves it when a capability chain needs room
    with pytest.raises(ValueError, match=r"argsz is 80 but only 32 bytes are allocated"):
        uapi.ioctl(0, uapi.VFIO_DEVICE_GET_REGION_INFO, info)
    with pytest.raises(ValueError, match=r"iommu_ioas_map.size is 41"):
        uapi.ioctl(0, uapi.IOMMU_IOAS_MAP, uapi.new("iommu_ioas_map", size=41))
    assert seam.calls == []
    reset = uapi.new("vfio_pci_hot_reset_info", trailing=2)
    uapi.ioctl(0, uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, reset)  # 28 of 28 bytes
    assert len(seam.calls) == 1


# -- the real system call -------------------------------------------------------


def test_real_ioctl_on_dev_null_is_enotty(devnull: int) -> None:
    with pytest.raises(KernelError) as caught:
        uapi.ioctl(devnull, uapi.VFIO_GET_API_VERSION)
    err = caught.value
    assert type(err) is KernelError
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOTTY
    assert err.filename == "/dev/null"
    assert err.op == "VFIO_GET_API_VERSION"
    assert "VFIO_GET_API_VERSION on /dev/null failed" in str(err)


def test_fcntl_backend_uses_a_mutable_buffer(monkeypatch: pytest.MonkeyPatch, devnull: int) -> None:
    seen: list[tuple[int, bool]] = []

    def fake_ioctl(fd: int, request: int, arg: object = 0, mutate: bool = True) -> int:
        view = memoryview(arg)
        assert not view.readonly  # with bytes, fcntl would return a copy, not the result
        seen.append((request, mutate))
        view[4:8] = (3).to_bytes(4, sys.byteorder)  # the kernel writing flags
        return 7

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    status = uapi.new("vfio_group_status")
    assert uapi.ioctl(devnull, uapi.VFIO_GROUP_GET_STATUS, status) == 7
    assert seen == [(uapi.VFIO_GROUP_GET_STATUS.number, True)]
    assert status.flags == 3


def test_fcntl_backend_retries_eintr(monkeypatch: pytest.MonkeyPatch, devnull: int) -> None:
    answers: list[int | None] = [None, 5]

    def fake_ioctl(fd: int, request: int, arg: object = 0, mutate: bool = True) -> int:
        answer = answers.pop(0)
        if answer is None:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return answer

    monkeypatch.setattr(fcntl, "ioctl", fake_ioctl)
    assert uapi.ioctl(devnull, uapi.VFIO_CHECK_EXTENSION, 3) == 5
    assert answers == []


def _open_kvm() -> int:
    try:
        return os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        pytest.skip(f"/dev/kvm cannot be opened: {err.strerror}")


@pytest.mark.kvm
def test_real_kvm_ioctls_return_ints_and_fill_structs() -> None:
    kvm = _open_kvm()
    opened = [kvm]
    try:
        assert uapi.ioctl(kvm, uapi.KVM_GET_API_VERSION) == 12
        vm = uapi.ioctl(kvm, uapi.KVM_CREATE_VM, 0)  # the new fd is the return value
        opened.append(vm)
        assert uapi.fd_path(vm) == "anon_inode:kvm-vm"
        cmd = uapi.new("kvm_create_device", type=uapi.KVM_DEV_TYPE_VFIO)
        assert uapi.ioctl(vm, uapi.KVM_CREATE_DEVICE, cmd) == 0
        opened.append(cmd.fd)  # written back into the struct
        assert uapi.fd_path(cmd.fd) == "anon_inode:kvm-vfio"
    finally:
        for fd in reversed(opened):
            os.close(fd)


# -- python -m kvmvfio.uapi -----------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmvfio.uapi", *args], capture_output=True, text=True, check=False
    )


def test_cli_json_is_exactly_ioctls_and_sizes() -> None:
    done = _run("--json")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"ioctls": IOCTL_NUMBERS, "sizes": STRUCT_SIZES}


def test_cli_full_adds_offsets_and_constants() -> None:
    full = report(full=True)
    assert set(full) == {"ioctls", "sizes", "offsets", "constants"}
    assert full["offsets"]["kvm_device_attr.addr"] == 16
    assert full["constants"]["KVM_DEV_TYPE_VFIO"] == 4


def test_cli_table_names_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in [*uapi.IOCTLS, *uapi.SIZES]:
        assert name in out
    assert "0x4018aee1" in out


@pytest.mark.parametrize("args", [["--bogus"], ["extra"], ["--json=yes"]])
def test_cli_bad_arguments_exit_2(args: list[str]) -> None:
    done = _run(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert done.stdout == ""


# -- the pre-parsed declarations (kvmvfio/uapi/_ffi.py) ------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import gen_ffi  # noqa: E402 (tools/ is not a package)


def test_the_pre_parsed_declarations_are_the_cdef_text() -> None:
    """Every constant, size and offset as cffi parsing _cdef now gives them.

    Compared by meaning, not text: another cffi release may write the same
    declarations differently. A failure means: run ``python tools/gen_ffi.py``.
    """
    assert gen_ffi.TARGET.exists()
    parsed = cffi.FFI()
    for _header, text in uapi._cdef.HEADERS:
        parsed.cdef(text)
    lib = parsed.dlopen(None)
    assert {n: int(getattr(lib, n)) for n in sorted(dir(lib))} == uapi.CONSTANTS
    structs = sorted(parsed.list_types()[1])
    assert sorted(uapi.SIZES) == structs
    for name in structs:
        assert uapi.SIZES[name] == parsed.sizeof(f"struct {name}"), name
        for field, _ in parsed.typeof(f"struct {name}").fields:
            key = f"{name}.{field}"
            assert uapi.field_offsets()[key] == parsed.offsetof(f"struct {name}", field), key


def test_importing_uapi_needs_no_c_parser() -> None:
    code = "import sys, kvmvfio.uapi; print('pycparser' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
