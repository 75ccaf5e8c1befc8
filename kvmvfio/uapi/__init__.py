"""The kernel's interface, as kvmvfio uses it: structs, constants, ioctls, one ioctl helper.

VFIO, iommufd and KVM are driven through ``ioctl(fd, request, arg)``. The
request number packs four fields, as the kernel's ``_IOC`` macro does
(``include/uapi/asm-generic/ioctl.h``): a direction (does user space write
the argument, read it, both, or neither), a type byte naming the subsystem
(``';'`` for VFIO and iommufd, ``0xAE`` for KVM), a command number, and the
size of the argument. KVM declares its structs' sizes in its numbers
(``_IOW(KVMIO, 0xe1, struct kvm_device_attr)``), so a wrong struct size gives
a different number and the kernel answers ENOTTY. VFIO and iommufd use bare
``_IO`` numbers instead and put the size inside the struct (``argsz`` for
VFIO, ``size`` for iommufd): the kernel reads that many bytes, and a struct
that grows in a later kernel stays compatible both ways. :func:`new` fills
that field in.

Every struct and constant comes from one place, the cffi declarations in
:mod:`kvmvfio.uapi._cdef`, which mirror the Linux 6.12 headers. The numbers
are computed from them here with the kernel's own macros, so they cannot
drift from the structs.

API:

- the constants by their kernel names (``VFIO_TYPE1v2_IOMMU``,
  ``KVM_DEV_VFIO_FILE_ADD``...), and :data:`CONSTANTS`, all of them by name;
- one :class:`Ioctl` per request (``VFIO_GROUP_GET_STATUS``...), and
  :data:`IOCTLS`, all of them by name; :data:`SIZES`, every struct's size;
- :func:`new` allocates a zeroed struct with its size field filled in;
- :func:`ioctl` is the only place kvmvfio makes an ioctl; :func:`ioctl_str`
  passes a NUL-terminated string. A failure is raised as a
  :class:`~kvmvfio.errors.KernelError` (also an :class:`OSError`) carrying
  errno, the ioctl's name and the path of the fd. :func:`set_backend`
  replaces the system call underneath, for tests.

``python -m kvmvfio.uapi --json`` prints the ioctl numbers and struct sizes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kvmvfio.errors import Busy, KernelError, PermissionDenied
from kvmvfio.uapi import _cdef
from kvmvfio.uapi import _ffi as _ffi_module

__all__ = [
    "CONSTANTS",
    "IOCTLS",
    "KERNEL_RELEASE",
    "SIZES",
    "STRUCT_HEADERS",
    "Backend",
    "CBuffer",
    "CData",
    "ErrorMap",
    "Ffi",
    "Ioctl",
    "fd_path",
    "ffi",
    "field_offsets",
    "ioctl",
    "ioctl_str",
    "kernel_error",
    "new",
    "set_backend",
    "using_backend",
]


class CData(Protocol):
    """A cffi object: a pointer to a kernel struct, or a C array.

    Fields read and write as ints (every field kvmvfio touches is an
    integer); indexing is for integer arrays such as ``int32_t[1]``;
    ``int()`` is for a pointer cast to ``uintptr_t``.
    """

    def __getattr__(self, name: str) -> int: ...
    def __setattr__(self, name: str, value: int) -> None: ...
    def __getitem__(self, index: int) -> int: ...
    def __setitem__(self, index: int, value: int) -> None: ...
    def __int__(self) -> int: ...


class CBuffer(Protocol):
    """The raw bytes of a :class:`CData` (``ffi.buffer``)."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: slice) -> bytes: ...
    def __setitem__(self, index: slice, value: bytes) -> None: ...


class Ffi(Protocol):
    """The part of :class:`cffi.FFI` kvmvfio uses, typed."""

    def new(self, cdecl: str, init: object = None, /) -> CData: ...
    def cast(self, cdecl: str, value: object, /) -> CData: ...
    def sizeof(self, cdecl: str | CData, /) -> int: ...
    def offsetof(self, cdecl: str, *fields: str | int) -> int: ...
    def string(self, cdata: CData, maxlen: int = -1, /) -> bytes: ...
    def buffer(self, cdata: CData, size: int = -1, /) -> CBuffer: ...


#: The kernel release whose uAPI the declarations mirror.
KERNEL_RELEASE: Final = _cdef.KERNEL_RELEASE

# cffi's out-of-line ABI mode: tools/gen_ffi.py parsed the declarations into
# kvmvfio.uapi._ffi, which loads without pycparser (no C parser at import,
# no C compiler ever); tests/unit/test_uapi.py checks it is up to date.
_ffi = _ffi_module.ffi
# In ABI mode cffi hands out #define and enum values through a library
# object; the process itself (dlopen(None)) is the cheapest one to open.
_lib = _ffi.dlopen(None)

#: The cffi instance that knows every struct of :mod:`kvmvfio.uapi._cdef`.
ffi: Final[Ffi] = _ffi


def _const(name: str) -> int:
    return int(getattr(_lib, name))


#: Every constant declared (``#define`` and enumerators), by kernel name.
CONSTANTS: Final[dict[str, int]] = {name: _const(name) for name in sorted(dir(_lib))}

#: The header each struct comes from: ``{"vfio_group_status": "linux/vfio.h"}``.
STRUCT_HEADERS: Final[dict[str, str]] = {}
for _header, _text in _cdef.HEADERS:
    for _line in _text.splitlines():
        _words = _line.split()
        if len(_words) == 3 and _words[0] == "struct" and _words[2] == "{":
            STRUCT_HEADERS[_words[1]] = _header
del _header, _text, _line, _words

#: Every struct declared, by its kernel name (without ``struct``): its size in bytes.
SIZES: Final[dict[str, int]] = {
    name: _ffi.sizeof(f"struct {name}") for name in sorted(_ffi.list_types()[1])
}


def field_offsets() -> dict[str, int]:
    """Every field of every declared struct: ``{"kvm_device_attr.addr": 16, ...}``.

    Members of anonymous unions count as fields of the struct, as in C.
    """
    out: dict[str, int] = {}
    for name in SIZES:
        for field, _cfield in _ffi.typeof(f"struct {name}").fields:
            out[f"{name}.{field}"] = _ffi.offsetof(f"struct {name}", field)
    return out


# --- constants, by header, in header order ---

# linux/vfio.h
VFIO_API_VERSION: Final[int] = _const("VFIO_API_VERSION")
VFIO_TYPE1_IOMMU: Final[int] = _const("VFIO_TYPE1_IOMMU")
VFIO_SPAPR_TCE_IOMMU: Final[int] = _const("VFIO_SPAPR_TCE_IOMMU")
VFIO_TYPE1v2_IOMMU: Final[int] = _const("VFIO_TYPE1v2_IOMMU")
VFIO_DMA_CC_IOMMU: Final[int] = _const("VFIO_DMA_CC_IOMMU")
VFIO_EEH: Final[int] = _const("VFIO_EEH")
VFIO_TYPE1_NESTING_IOMMU: Final[int] = _const("VFIO_TYPE1_NESTING_IOMMU")
VFIO_SPAPR_TCE_v2_IOMMU: Final[int] = _const("VFIO_SPAPR_TCE_v2_IOMMU")
VFIO_NOIOMMU_IOMMU: Final[int] = _const("VFIO_NOIOMMU_IOMMU")
VFIO_UNMAP_ALL: Final[int] = _const("VFIO_UNMAP_ALL")
VFIO_UPDATE_VADDR: Final[int] = _const("VFIO_UPDATE_VADDR")
VFIO_TYPE: Final[int] = _const("VFIO_TYPE")
VFIO_BASE: Final[int] = _const("VFIO_BASE")
VFIO_GROUP_FLAGS_VIABLE: Final[int] = _const("VFIO_GROUP_FLAGS_VIABLE")
VFIO_GROUP_FLAGS_CONTAINER_SET: Final[int] = _const("VFIO_GROUP_FLAGS_CONTAINER_SET")
VFIO_DEVICE_FLAGS_RESET: Final[int] = _const("VFIO_DEVICE_FLAGS_RESET")
VFIO_DEVICE_FEATURE_MASK: Final[int] = _const("VFIO_DEVICE_FEATURE_MASK")
VFIO_DEVICE_FEATURE_GET: Final[int] = _const("VFIO_DEVICE_FEATURE_GET")
VFIO_DEVICE_FEATURE_SET: Final[int] = _const("VFIO_DEVICE_FEATURE_SET")
VFIO_DEVICE_FEATURE_PROBE: Final[int] = _const("VFIO_DEVICE_FEATURE_PROBE")
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: Final[int] = _const("VFIO_DEVICE_FEATURE_PCI_VF_TOKEN")
VFIO_DEVICE_FLAGS_PCI: Final[int] = _const("VFIO_DEVICE_FLAGS_PCI")
VFIO_DEVICE_FLAGS_PLATFORM: Final[int] = _const("VFIO_DEVICE_FLAGS_PLATFORM")
VFIO_DEVICE_FLAGS_AMBA: Final[int] = _const("VFIO_DEVICE_FLAGS_AMBA")
VFIO_DEVICE_FLAGS_CCW: Final[int] = _const("VFIO_DEVICE_FLAGS_CCW")
VFIO_DEVICE_FLAGS_AP: Final[int] = _const("VFIO_DEVICE_FLAGS_AP")
VFIO_DEVICE_FLAGS_FSL_MC: Final[int] = _const("VFIO_DEVICE_FLAGS_FSL_MC")
VFIO_DEVICE_FLAGS_CAPS: Final[int] = _const("VFIO_DEVICE_FLAGS_CAPS")
VFIO_DEVICE_FLAGS_CDX: Final[int] = _const("VFIO_DEVICE_FLAGS_CDX")
VFIO_REGION_INFO_FLAG_READ: Final[int] = _const("VFIO_REGION_INFO_FLAG_READ")
VFIO_REGION_INFO_FLAG_WRITE: Final[int] = _const("VFIO_REGION_INFO_FLAG_WRITE")
VFIO_REGION_INFO_FLAG_MMAP: Final[int] = _const("VFIO_REGION_INFO_FLAG_MMAP")
VFIO_REGION_INFO_FLAG_CAPS: Final[int] = _const("VFIO_REGION_INFO_FLAG_CAPS")
VFIO_REGION_INFO_CAP_SPARSE_MMAP: Final[int] = _const("VFIO_REGION_INFO_CAP_SPARSE_MMAP")
VFIO_REGION_INFO_CAP_TYPE: Final[int] = _const("VFIO_REGION_INFO_CAP_TYPE")
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: Final[int] = _const("VFIO_REGION_INFO_CAP_MSIX_MAPPABLE")
VFIO_IRQ_INFO_EVENTFD: Final[int] = _const("VFIO_IRQ_INFO_EVENTFD")
VFIO_IRQ_INFO_MASKABLE: Final[int] = _const("VFIO_IRQ_INFO_MASKABLE")
VFIO_IRQ_INFO_AUTOMASKED: Final[int] = _const("VFIO_IRQ_INFO_AUTOMASKED")
VFIO_IRQ_INFO_NORESIZE: Final[int] = _const("VFIO_IRQ_INFO_NORESIZE")
VFIO_IRQ_SET_DATA_NONE: Final[int] = _const("VFIO_IRQ_SET_DATA_NONE")
VFIO_IRQ_SET_DATA_BOOL: Final[int] = _const("VFIO_IRQ_SET_DATA_BOOL")
VFIO_IRQ_SET_DATA_EVENTFD: Final[int] = _const("VFIO_IRQ_SET_DATA_EVENTFD")
VFIO_IRQ_SET_ACTION_MASK: Final[int] = _const("VFIO_IRQ_SET_ACTION_MASK")
VFIO_IRQ_SET_ACTION_UNMASK: Final[int] = _const("VFIO_IRQ_SET_ACTION_UNMASK")
VFIO_IRQ_SET_ACTION_TRIGGER: Final[int] = _const("VFIO_IRQ_SET_ACTION_TRIGGER")
VFIO_IRQ_SET_DATA_TYPE_MASK: Final[int] = _const("VFIO_IRQ_SET_DATA_TYPE_MASK")
VFIO_IRQ_SET_ACTION_TYPE_MASK: Final[int] = _const("VFIO_IRQ_SET_ACTION_TYPE_MASK")
VFIO_PCI_BAR0_REGION_INDEX: Final[int] = _const("VFIO_PCI_BAR0_REGION_INDEX")
VFIO_PCI_BAR1_REGION_INDEX: Final[int] = _const("VFIO_PCI_BAR1_REGION_INDEX")
VFIO_PCI_BAR2_REGION_INDEX: Final[int] = _const("VFIO_PCI_BAR2_REGION_INDEX")
VFIO_PCI_BAR3_REGION_INDEX: Final[int] = _const("VFIO_PCI_BAR3_REGION_INDEX")
VFIO_PCI_BAR4_REGION_INDEX: Final[int] = _const("VFIO_PCI_BAR4_REGION_INDEX")
VFIO_PCI_BAR5_REGION_INDEX: Final[int] = _const("VFIO_PCI_BAR5_REGION_INDEX")
VFIO_PCI_ROM_REGION_INDEX: Final[int] = _const("VFIO_PCI_ROM_REGION_INDEX")
VFIO_PCI_CONFIG_REGION_INDEX: Final[int] = _const("VFIO_PCI_CONFIG_REGION_INDEX")
VFIO_PCI_VGA_REGION_INDEX: Final[int] = _const("VFIO_PCI_VGA_REGION_INDEX")
VFIO_PCI_NUM_REGIONS: Final[int] = _const("VFIO_PCI_NUM_REGIONS")
VFIO_PCI_INTX_IRQ_INDEX: Final[int] = _const("VFIO_PCI_INTX_IRQ_INDEX")
VFIO_PCI_MSI_IRQ_INDEX: Final[int] = _const("VFIO_PCI_MSI_IRQ_INDEX")
VFIO_PCI_MSIX_IRQ_INDEX: Final[int] = _const("VFIO_PCI_MSIX_IRQ_INDEX")
VFIO_PCI_ERR_IRQ_INDEX: Final[int] = _const("VFIO_PCI_ERR_IRQ_INDEX")
VFIO_PCI_REQ_IRQ_INDEX: Final[int] = _const("VFIO_PCI_REQ_IRQ_INDEX")
VFIO_PCI_NUM_IRQS: Final[int] = _const("VFIO_PCI_NUM_IRQS")
VFIO_PCI_DEVID_OWNED: Final[int] = _const("VFIO_PCI_DEVID_OWNED")
VFIO_PCI_DEVID_NOT_OWNED: Final[int] = _const("VFIO_PCI_DEVID_NOT_OWNED")
VFIO_PCI_HOT_RESET_FLAG_DEV_ID: Final[int] = _const("VFIO_PCI_HOT_RESET_FLAG_DEV_ID")
VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED: Final[int] = _const("VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED")
VFIO_IOMMU_INFO_PGSIZES: Final[int] = _const("VFIO_IOMMU_INFO_PGSIZES")
VFIO_IOMMU_INFO_CAPS: Final[int] = _const("VFIO_IOMMU_INFO_CAPS")
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: Final[int] = _const("VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE")
VFIO_DMA_MAP_FLAG_READ: Final[int] = _const("VFIO_DMA_MAP_FLAG_READ")
VFIO_DMA_MAP_FLAG_WRITE: Final[int] = _const("VFIO_DMA_MAP_FLAG_WRITE")
VFIO_DMA_MAP_FLAG_VADDR: Final[int] = _const("VFIO_DMA_MAP_FLAG_VADDR")
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: Final[int] = _const("VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP")
VFIO_DMA_UNMAP_FLAG_ALL: Final[int] = _const("VFIO_DMA_UNMAP_FLAG_ALL")
VFIO_DMA_UNMAP_FLAG_VADDR: Final[int] = _const("VFIO_DMA_UNMAP_FLAG_VADDR")

# linux/iommufd.h
IOMMUFD_TYPE: Final[int] = _const("IOMMUFD_TYPE")
IOMMUFD_CMD_BASE: Final[int] = _const("IOMMUFD_CMD_BASE")
IOMMUFD_CMD_DESTROY: Final[int] = _const("IOMMUFD_CMD_DESTROY")
IOMMUFD_CMD_IOAS_ALLOC: Final[int] = _const("IOMMUFD_CMD_IOAS_ALLOC")
IOMMUFD_CMD_IOAS_ALLOW_IOVAS: Final[int] = _const("IOMMUFD_CMD_IOAS_ALLOW_IOVAS")
IOMMUFD_CMD_IOAS_COPY: Final[int] = _const("IOMMUFD_CMD_IOAS_COPY")
IOMMUFD_CMD_IOAS_IOVA_RANGES: Final[int] = _const("IOMMUFD_CMD_IOAS_IOVA_RANGES")
IOMMUFD_CMD_IOAS_MAP: Final[int] = _const("IOMMUFD_CMD_IOAS_MAP")
IOMMUFD_CMD_IOAS_UNMAP: Final[int] = _const("IOMMUFD_CMD_IOAS_UNMAP")
IOMMUFD_CMD_OPTION: Final[int] = _const("IOMMUFD_CMD_OPTION")
IOMMUFD_CMD_VFIO_IOAS: Final[int] = _const("IOMMUFD_CMD_VFIO_IOAS")
IOMMUFD_CMD_HWPT_ALLOC: Final[int] = _const("IOMMUFD_CMD_HWPT_ALLOC")
IOMMUFD_CMD_GET_HW_INFO: Final[int] = _const("IOMMUFD_CMD_GET_HW_INFO")
IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING: Final[int] = _const("IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING")
IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP: Final[int] = _const("IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP")
IOMMUFD_CMD_HWPT_INVALIDATE: Final[int] = _const("IOMMUFD_CMD_HWPT_INVALIDATE")
IOMMUFD_CMD_FAULT_QUEUE_ALLOC: Final[int] = _const("IOMMUFD_CMD_FAULT_QUEUE_ALLOC")
IOMMU_IOAS_MAP_FIXED_IOVA: Final[int] = _const("IOMMU_IOAS_MAP_FIXED_IOVA")
IOMMU_IOAS_MAP_WRITEABLE: Final[int] = _const("IOMMU_IOAS_MAP_WRITEABLE")
IOMMU_IOAS_MAP_READABLE: Final[int] = _const("IOMMU_IOAS_MAP_READABLE")
IOMMU_OPTION_RLIMIT_MODE: Final[int] = _const("IOMMU_OPTION_RLIMIT_MODE")
IOMMU_OPTION_HUGE_PAGES: Final[int] = _const("IOMMU_OPTION_HUGE_PAGES")
IOMMU_OPTION_OP_SET: Final[int] = _const("IOMMU_OPTION_OP_SET")
IOMMU_OPTION_OP_GET: Final[int] = _const("IOMMU_OPTION_OP_GET")
IOMMU_VFIO_IOAS_GET: Final[int] = _const("IOMMU_VFIO_IOAS_GET")
IOMMU_VFIO_IOAS_SET: Final[int] = _const("IOMMU_VFIO_IOAS_SET")
IOMMU_VFIO_IOAS_CLEAR: Final[int] = _const("IOMMU_VFIO_IOAS_CLEAR")
IOMMU_HWPT_ALLOC_NEST_PARENT: Final[int] = _const("IOMMU_HWPT_ALLOC_NEST_PARENT")
IOMMU_HWPT_ALLOC_DIRTY_TRACKING: Final[int] = _const("IOMMU_HWPT_ALLOC_DIRTY_TRACKING")
IOMMU_HWPT_FAULT_ID_VALID: Final[int] = _const("IOMMU_HWPT_FAULT_ID_VALID")
IOMMU_HWPT_DATA_NONE: Final[int] = _const("IOMMU_HWPT_DATA_NONE")
IOMMU_HWPT_DATA_VTD_S1: Final[int] = _const("IOMMU_HWPT_DATA_VTD_S1")
IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17: Final[int] = _const("IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17")
IOMMU_HW_INFO_TYPE_NONE: Final[int] = _const("IOMMU_HW_INFO_TYPE_NONE")
IOMMU_HW_INFO_TYPE_INTEL_VTD: Final[int] = _const("IOMMU_HW_INFO_TYPE_INTEL_VTD")
IOMMU_HW_CAP_DIRTY_TRACKING: Final[int] = _const("IOMMU_HW_CAP_DIRTY_TRACKING")
IOMMU_HW_CAP_PCI_PASID_EXEC: Final[int] = _const("IOMMU_HW_CAP_PCI_PASID_EXEC")
IOMMU_HW_CAP_PCI_PASID_PRIV: Final[int] = _const("IOMMU_HW_CAP_PCI_PASID_PRIV")

# linux/kvm.h
KVM_API_VERSION: Final[int] = _const("KVM_API_VERSION")
KVMIO: Final[int] = _const("KVMIO")
KVM_CAP_DEVICE_CTRL: Final[int] = _const("KVM_CAP_DEVICE_CTRL")
KVM_CREATE_DEVICE_TEST: Final[int] = _const("KVM_CREATE_DEVICE_TEST")
KVM_DEV_VFIO_FILE: Final[int] = _const("KVM_DEV_VFIO_FILE")
KVM_DEV_VFIO_FILE_ADD: Final[int] = _const("KVM_DEV_VFIO_FILE_ADD")
KVM_DEV_VFIO_FILE_DEL: Final[int] = _const("KVM_DEV_VFIO_FILE_DEL")
KVM_DEV_VFIO_GROUP: Final[int] = _const("KVM_DEV_VFIO_GROUP")
KVM_DEV_VFIO_GROUP_ADD: Final[int] = _const("KVM_DEV_VFIO_GROUP_ADD")
KVM_DEV_VFIO_GROUP_DEL: Final[int] = _const("KVM_DEV_VFIO_GROUP_DEL")
KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE: Final[int] = _const("KVM_DEV_VFIO_GROUP_SET_SPAPR_TCE")
KVM_DEV_TYPE_FSL_MPIC_20: Final[int] = _const("KVM_DEV_TYPE_FSL_MPIC_20")
KVM_DEV_TYPE_FSL_MPIC_42: Final[int] = _const("KVM_DEV_TYPE_FSL_MPIC_42")
KVM_DEV_TYPE_XICS: Final[int] = _const("KVM_DEV_TYPE_XICS")
KVM_DEV_TYPE_VFIO: Final[int] = _const("KVM_DEV_TYPE_VFIO")
KVM_DEV_TYPE_ARM_VGIC_V2: Final[int] = _const("KVM_DEV_TYPE_ARM_VGIC_V2")
KVM_DEV_TYPE_FLIC: Final[int] = _const("KVM_DEV_TYPE_FLIC")
KVM_DEV_TYPE_ARM_VGIC_V3: Final[int] = _const("KVM_DEV_TYPE_ARM_VGIC_V3")
KVM_DEV_TYPE_ARM_VGIC_ITS: Final[int] = _const("KVM_DEV_TYPE_ARM_VGIC_ITS")
KVM_DEV_TYPE_XIVE: Final[int] = _const("KVM_DEV_TYPE_XIVE")
KVM_DEV_TYPE_ARM_PV_TIME: Final[int] = _const("KVM_DEV_TYPE_ARM_PV_TIME")
KVM_DEV_TYPE_RISCV_AIA: Final[int] = _const("KVM_DEV_TYPE_RISCV_AIA")
KVM_DEV_TYPE_MAX: Final[int] = _const("KVM_DEV_TYPE_MAX")


# include/uapi/asm-generic/ioctl.h: the layout of a request number on x86 and
# arm64 (powerpc, mips and sparc use other widths; kvmvfio does not run there).
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2
_DIRECTIONS: Final = {0: "none", 1: "write", 2: "read", 3: "read-write"}


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the size field")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


@dataclass(frozen=True)
class Ioctl:
    """One ioctl request: its kernel name, its number, and what its argument is.

    ``arg`` is the C type the argument points to, spelled as the kernel does
    (``"struct vfio_group_status"``, ``"__s32"``, ``"char"``), or ``None``
    when the argument is an integer passed by value, or unused.
    """

    name: str
    number: int
    arg: str | None
    header: str

    @property
    def struct(self) -> str | None:
        """The struct the argument points to, without ``struct``, if it is one."""
        if self.arg is not None and self.arg.startswith("struct "):
            return self.arg.removeprefix("struct ")
        return None

    @property
    def direction(self) -> str:
        """``_IOC_DIR``: "none", "write", "read" or "read-write" (seen from user space)."""
        return _DIRECTIONS[(self.number >> _IOC_DIRSHIFT) & 3]

    @property
    def type(self) -> int:
        """``_IOC_TYPE``: the subsystem's byte (``0x3B`` VFIO and iommufd, ``0xAE`` KVM)."""
        return (self.number >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)

    @property
    def nr(self) -> int:
        """``_IOC_NR``: the command number within the subsystem."""
        return (self.number >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)

    @property
    def size(self) -> int:
        """``_IOC_SIZE``: the argument size encoded in the number (0 for ``_IO``)."""
        return (self.number >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)

    def __str__(self) -> str:
        return self.name


#: Every ioctl declared, by kernel name.
IOCTLS: Final[dict[str, Ioctl]] = {}


def _define(
    name: str, header: str, direction: int, type_: int, nr: int, *, arg: str | None
) -> Ioctl:
    # The size goes into the number only for _IOR/_IOW/_IOWR, and then it is
    # sizeof(the argument's type), exactly as the kernel macro computes it.
    size = _ffi.sizeof(arg) if direction != _IOC_NONE and arg is not None else 0
    op = Ioctl(name, _ioc(direction, type_, nr, size), arg, header)
    IOCTLS[name] = op
    return op


def _vfio(name: str, offset: int, arg: str | None = None) -> Ioctl:
    # vfio.h documents _IOR/_IOW/_IOWR for most of these but defines all of
    # them with _IO: the size lives in argsz, not in the number.
    return _define(name, "linux/vfio.h", _IOC_NONE, VFIO_TYPE, VFIO_BASE + offset, arg=arg)


def _iommufd(name: str, cmd: int, arg: str) -> Ioctl:
    return _define(name, "linux/iommufd.h", _IOC_NONE, IOMMUFD_TYPE, cmd, arg=arg)


def _kvm(name: str, direction: int, nr: int, arg: str | None = None) -> Ioctl:
    return _define(name, "linux/kvm.h", direction, KVMIO, nr, arg=arg)


# linux/vfio.h: on the container, /dev/vfio/vfio
VFIO_GET_API_VERSION: Final = _vfio("VFIO_GET_API_VERSION", 0)
VFIO_CHECK_EXTENSION: Final = _vfio("VFIO_CHECK_EXTENSION", 1)
VFIO_SET_IOMMU: Final = _vfio("VFIO_SET_IOMMU", 2)
# on a group, /dev/vfio/N
VFIO_GROUP_GET_STATUS: Final = _vfio("VFIO_GROUP_GET_STATUS", 3, "struct vfio_group_status")
VFIO_GROUP_SET_CONTAINER: Final = _vfio("VFIO_GROUP_SET_CONTAINER", 4, "__s32")
VFIO_GROUP_UNSET_CONTAINER: Final = _vfio("VFIO_GROUP_UNSET_CONTAINER", 5)
VFIO_GROUP_GET_DEVICE_FD: Final = _vfio("VFIO_GROUP_GET_DEVICE_FD", 6, "char")
# on a device file
VFIO_DEVICE_GET_INFO: Final = _vfio("VFIO_DEVICE_GET_INFO", 7, "struct vfio_device_info")
VFIO_DEVICE_GET_REGION_INFO: Final = _vfio(
    "VFIO_DEVICE_GET_REGION_INFO", 8, "struct vfio_region_info"
)
VFIO_DEVICE_GET_IRQ_INFO: Final = _vfio("VFIO_DEVICE_GET_IRQ_INFO", 9, "struct vfio_irq_info")
VFIO_DEVICE_SET_IRQS: Final = _vfio("VFIO_DEVICE_SET_IRQS", 10, "struct vfio_irq_set")
VFIO_DEVICE_RESET: Final = _vfio("VFIO_DEVICE_RESET", 11)
VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: Final = _vfio(
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", 12, "struct vfio_pci_hot_reset_info"
)
VFIO_DEVICE_PCI_HOT_RESET: Final = _vfio(
    "VFIO_DEVICE_PCI_HOT_RESET", 13, "struct vfio_pci_hot_reset"
)
VFIO_DEVICE_FEATURE: Final = _vfio("VFIO_DEVICE_FEATURE", 17, "struct vfio_device_feature")
VFIO_DEVICE_BIND_IOMMUFD: Final = _vfio(
    "VFIO_DEVICE_BIND_IOMMUFD", 18, "struct vfio_device_bind_iommufd"
)
VFIO_DEVICE_ATTACH_IOMMUFD_PT: Final = _vfio(
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT", 19, "struct vfio_device_attach_iommufd_pt"
)
VFIO_DEVICE_DETACH_IOMMUFD_PT: Final = _vfio(
    "VFIO_DEVICE_DETACH_IOMMUFD_PT", 20, "struct vfio_device_detach_iommufd_pt"
)
# on a type1 container (same command numbers as device ioctls: other fds)
VFIO_IOMMU_GET_INFO: Final = _vfio("VFIO_IOMMU_GET_INFO", 12, "struct vfio_iommu_type1_info")
VFIO_IOMMU_MAP_DMA: Final = _vfio("VFIO_IOMMU_MAP_DMA", 13, "struct vfio_iommu_type1_dma_map")
VFIO_IOMMU_UNMAP_DMA: Final = _vfio("VFIO_IOMMU_UNMAP_DMA", 14, "struct vfio_iommu_type1_dma_unmap")

# linux/iommufd.h: on /dev/iommu
IOMMU_DESTROY: Final = _iommufd("IOMMU_DESTROY", IOMMUFD_CMD_DESTROY, "struct iommu_destroy")
IOMMU_IOAS_ALLOC: Final = _iommufd(
    "IOMMU_IOAS_ALLOC", IOMMUFD_CMD_IOAS_ALLOC, "struct iommu_ioas_alloc"
)
IOMMU_IOAS_ALLOW_IOVAS: Final = _iommufd(
    "IOMMU_IOAS_ALLOW_IOVAS", IOMMUFD_CMD_IOAS_ALLOW_IOVAS, "struct iommu_ioas_allow_iovas"
)
IOMMU_IOAS_COPY: Final = _iommufd(
    "IOMMU_IOAS_COPY", IOMMUFD_CMD_IOAS_COPY, "struct iommu_ioas_copy"
)
IOMMU_IOAS_IOVA_RANGES: Final = _iommufd(
    "IOMMU_IOAS_IOVA_RANGES", IOMMUFD_CMD_IOAS_IOVA_RANGES, "struct iommu_ioas_iova_ranges"
)
IOMMU_IOAS_MAP: Final = _iommufd("IOMMU_IOAS_MAP", IOMMUFD_CMD_IOAS_MAP, "struct iommu_ioas_map")
IOMMU_IOAS_UNMAP: Final = _iommufd(
    "IOMMU_IOAS_UNMAP", IOMMUFD_CMD_IOAS_UNMAP, "struct iommu_ioas_unmap"
)
IOMMU_OPTION: Final = _iommufd("IOMMU_OPTION", IOMMUFD_CMD_OPTION, "struct iommu_option")
IOMMU_VFIO_IOAS: Final = _iommufd(
    "IOMMU_VFIO_IOAS", IOMMUFD_CMD_VFIO_IOAS, "struct iommu_vfio_ioas"
)
IOMMU_HWPT_ALLOC: Final = _iommufd(
    "IOMMU_HWPT_ALLOC", IOMMUFD_CMD_HWPT_ALLOC, "struct iommu_hwpt_alloc"
)
IOMMU_GET_HW_INFO: Final = _iommufd(
    "IOMMU_GET_HW_INFO", IOMMUFD_CMD_GET_HW_INFO, "struct iommu_hw_info"
)

# linux/kvm.h: on /dev/kvm
KVM_GET_API_VERSION: Final = _kvm("KVM_GET_API_VERSION", _IOC_NONE, 0x00)
KVM_CREATE_VM: Final = _kvm("KVM_CREATE_VM", _IOC_NONE, 0x01)
KVM_CHECK_EXTENSION: Final = _kvm("KVM_CHECK_EXTENSION", _IOC_NONE, 0x03)
# on a VM
KVM_CREATE_DEVICE: Final = _kvm(
    "KVM_CREATE_DEVICE", _IOC_READ | _IOC_WRITE, 0xE0, "struct kvm_create_device"
)
# on a device made by KVM_CREATE_DEVICE
KVM_SET_DEVICE_ATTR: Final = _kvm("KVM_SET_DEVICE_ATTR", _IOC_WRITE, 0xE1, "struct kvm_device_attr")
KVM_GET_DEVICE_ATTR: Final = _kvm("KVM_GET_DEVICE_ATTR", _IOC_WRITE, 0xE2, "struct kvm_device_attr")
KVM_HAS_DEVICE_ATTR: Final = _kvm("KVM_HAS_DEVICE_ATTR", _IOC_WRITE, 0xE3, "struct kvm_device_attr")


def new(struct: str, *, trailing: int = 0, **fields: int) -> CData:
    """Allocate a zeroed ``struct <struct>`` and return a pointer to it.

    Its size field is filled in: ``argsz`` (VFIO) or ``size`` (iommufd),
    whichever the struct starts with. ``trailing`` allocates that many
    elements of the struct's trailing flexible array (such as
    ``vfio_pci_hot_reset_info.devices``), counted in the size field.
    ``fields`` set other fields. Touches nothing on the host; raises
    :class:`ValueError` for a struct that is not declared.
    """
    if struct not in SIZES:
        raise ValueError(f"struct {struct} is not declared in kvmvfio.uapi")
    cdecl = f"struct {struct}"
    ctype, size_field = _layout(cdecl)
    init: dict[str, int] | None = None
    if trailing:
        last, cfield = ctype.fields[-1]
        if cfield.type.kind != "array" or cfield.type.length is not None:
            raise ValueError(f"struct {struct} has no trailing flexible array")
        init = {last: trailing}
    ptr: CData = _ffi.new(f"{cdecl} *", init)
    if size_field is not None:
        setattr(ptr, size_field, _ffi.sizeof(ptr[0]) if trailing else SIZES[struct])
    for name, value in fields.items():
        setattr(ptr, name, value)
    return ptr


@functools.cache
def _layout(cdecl: str) -> tuple[Any, str | None]:  # cffi's CType has no stubs
    """The cffi type ``cdecl`` names, and the struct's size field (``argsz``, ``size``) if any.

    Asked at every :func:`new` and :func:`ioctl`; the declarations never
    change, so each type is looked into once.
    """
    ctype = _ffi.typeof(cdecl)
    if ctype.kind != "struct":
        return ctype, None
    first = ctype.fields[0][0]
    return ctype, first if first in ("argsz", "size") else None


#: What :func:`ioctl` calls to make the system call: ``backend(fd, op, arg)``
#: returns the ioctl's int result or raises :class:`OSError` with the errno.
Backend = Callable[[int, Ioctl, CData | int], int]


def _fcntl_backend(fd: int, op: Ioctl, arg: CData | int) -> int:
    while True:
        try:
            if isinstance(arg, int):
                return fcntl.ioctl(fd, op.number, arg)
            # A mutable buffer with mutate_flag=True: fcntl returns the
            # ioctl's int result (VFIO_GROUP_GET_DEVICE_FD returns the new fd
            # there) and writes what the kernel wrote back into the struct.
            # With bytes, it would return a copy of the buffer instead.
            return int(fcntl.ioctl(fd, op.number, _ffi.buffer(arg), True))
        except InterruptedError:
            # EINTR means the kernel did not do the call (a signal came
            # first); Python does not retry ioctl by itself (PEP 475).
            continue


class _Seam:
    # One mutable slot, read at every call, so set_backend() reaches callers
    # that imported ioctl() before the backend was replaced.
    backend: Backend = _fcntl_backend


@contextlib.contextmanager
def using_backend(backend: Backend) -> Iterator[Backend]:
    """:func:`set_backend` for the length of a ``with`` block (a test's fake kernel)."""
    previous = set_backend(backend)
    try:
        yield backend
    finally:
        set_backend(previous)


def set_backend(backend: Backend | None) -> Backend:
    """Replace the system call under :func:`ioctl`, for tests; return the previous one.

    ``None`` restores the real one (``fcntl.ioctl``). The backend receives the
    argument :func:`ioctl` was given, after its type was checked, and raises
    :class:`OSError` to fail; :func:`ioctl` turns that into the typed error.
    """
    previous = _Seam.backend
    _Seam.backend = backend if backend is not None else _fcntl_backend
    return previous


def fd_path(fd: int) -> str | None:
    """What ``/proc/self/fd/<fd>`` points to (``"/dev/vfio/3"``, ``"anon_inode:kvm-vm"``).

    ``None`` when the fd is not open or /proc is not mounted.
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


#: ``errors`` of :func:`ioctl`: per errno, a KernelError class, or a hint for KernelError.
ErrorMap = Mapping[int, type[KernelError] | str]


def kernel_error(
    code: int,
    op: str,
    path: str | None = None,
    subject: str | None = None,
    errors: ErrorMap | None = None,
) -> KernelError:
    """The typed error for a failed call: :class:`Busy` for EBUSY,
    :class:`PermissionDenied` for EPERM/EACCES, else :class:`KernelError`.

    ``errors`` overrides that per errno with a class (constructed as
    ``cls(code, op, path, subject)``) or a hint sentence.
    """
    special = errors.get(code) if errors else None
    if isinstance(special, str):
        return KernelError(code, op, path, subject, special)
    if special is not None:
        return special(code, op, path, subject)
    if code == errno.EBUSY:
        return Busy(code, op, path, subject)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(code, op, path, subject)
    return KernelError(code, op, path, subject)


def _check_arg(op: Ioctl, arg: CData | int) -> None:
    # VFIO and iommufd numbers do not encode the argument's size, so the
    # kernel cannot tell a wrong struct from a right one; check it here.
    if op.arg is None:
        if not isinstance(arg, int):
            raise TypeError(f"{op.name} takes an integer argument, not {_ffi.typeof(arg).cname}")
        return
    if isinstance(arg, int):
        raise TypeError(f"{op.name} takes a pointer to {op.arg}, not an integer")
    given = _ffi.typeof(arg)
    expected, size_field = _layout(op.arg)
    if given.kind not in ("pointer", "array") or given.item is not expected:
        raise TypeError(f"{op.name} takes a pointer to {op.arg}, not {given.cname}")
    if size_field is not None:
        # The kernel writes up to argsz (VFIO) or size (iommufd) bytes; more
        # than was allocated would land past the struct, in Python's memory.
        # (After a first VFIO_DEVICE_GET_REGION_INFO the kernel raises argsz
        # to what the capability chain needs: reusing that struct is the
        # classic way to get here.)
        claimed, allocated = getattr(arg, size_field), len(_ffi.buffer(arg))
        if claimed > allocated:
            raise ValueError(
                f"{op.name}: {op.struct}.{size_field} is {claimed} but only {allocated} bytes "
                "are allocated; the kernel would write past them"
            )


def ioctl(
    fd: int,
    op: Ioctl,
    arg: CData | int = 0,
    *,
    subject: str | None = None,
    errors: ErrorMap | None = None,
    label: str | None = None,
) -> int:
    """Make the ioctl ``op`` on ``fd`` and return its int result.

    ``arg`` is an integer for ioctls that take one by value (or none), else a
    pointer from :func:`new` or ``ffi.new``, which the kernel reads and
    writes in place. What it does to the host is what ``op`` does.

    Raises :class:`TypeError` when ``arg`` is not of the type ``op`` takes,
    :class:`ValueError` when its ``argsz``/``size`` field claims more bytes
    than were allocated (both before any system call), and on failure of the call the error of
    :func:`kernel_error` (a :class:`~kvmvfio.errors.KernelError`, also an
    :class:`OSError`), with the errno, ``op``'s name, the path ``fd`` is
    open on and ``subject`` (what the call concerned, for the message).
    ``errors`` refines the error per errno (see :func:`kernel_error`);
    ``label`` names the call in the error instead of ``op.name``, e.g.
    ``"KVM_SET_DEVICE_ATTR(KVM_DEV_VFIO_FILE_ADD)"``.
    """
    _check_arg(op, arg)
    try:
        return _Seam.backend(fd, op, arg)
    except OSError as err:
        code = err.errno if err.errno is not None else errno.EIO
        raise kernel_error(code, label or op.name, fd_path(fd), subject, errors) from err


def ioctl_str(
    fd: int,
    op: Ioctl,
    text: str,
    *,
    subject: str | None = None,
    errors: ErrorMap | None = None,
) -> int:
    """:func:`ioctl` with a NUL-terminated string argument (``VFIO_GROUP_GET_DEVICE_FD``).

    Returns the ioctl's int result (for ``VFIO_GROUP_GET_DEVICE_FD``, the new
    device fd, which the caller then owns). Raises as :func:`ioctl` does, and
    :class:`ValueError` for text containing NUL.
    """
    if "\0" in text:
        raise ValueError(f"{text!r} contains a NUL character")
    return ioctl(fd, op, _ffi.new("char[]", text.encode()), subject=subject, errors=errors)
