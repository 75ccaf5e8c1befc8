"""kvmvfio.errors: the base classes here, the leaves beside their layers, one class each."""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

import kvmvfio
import kvmvfio.errors
from kvmvfio import uapi
from kvmvfio.errors import Busy, KernelError, KvmvfioError

#: Every class and helper importable from kvmvfio.errors before the leaves moved.
BEFORE = [
    "MAX_SHOWN",
    "shown",
    "Interface",
    "interface",
    "speaking_to",
    "KvmvfioError",
    "UsageError",
    "InvalidAddress",
    "InvalidGroup",
    "NotFound",
    "DeviceNotFound",
    "GroupNotFound",
    "NoIommuGroup",
    "Blocker",
    "GroupNotViable",
    "SysfsError",
    "KernelError",
    "PermissionDenied",
    "Busy",
    "NoInterruptRemapping",
    "NotADeviceOfGroup",
    "DeviceNotBoundToVfio",
    "NoIommuRefused",
    "SessionStateError",
    "KvmRefusedFile",
    "AlreadyAssociated",
    "NotAssociated",
    "KvmVfioDeviceExists",
    "KvmClosed",
    "KernelUnsupported",
    "CoherencyRefused",
    "QemuError",
    "QemuRefused",
    "QemuPeerMismatch",
    "QemuGone",
    "QemuNoAnswer",
    "QemuReplyInvalid",
    "NoHotplugPort",
    "DetachTimeout",
    "NotAttached",
    "MemlockTooLow",
    "QemuConfined",
    "LabError",
    "LibvirtError",
]

#: Leaves that lived beside their modules, and still import from there.
BESIDE = {
    "kvmvfio.vfio.iommufd": "RlimitModeRefused",
    "kvmvfio.vfio.files": "FdClosed",
    "kvmvfio.vfio": "FdClosed",
    "kvmvfio.libvirt.install": "HookFileError ForeignHook HooksDirMissing",
    "kvmvfio.libvirt.metadata": "MetadataError",
    "kvmvfio.prepare.driver": "UnsafeSysfsName",
    "kvmvfio.prepare": "ClaimedBy JournalError UntrustedFile",
    "kvmvfio.prepare.rundir": "UntrustedFile",
    "kvmvfio.prepare.safety": "UnsafeToUnbind accept_advice",
    "kvmvfio.prepare.journal": "JournalError",
}


@pytest.fixture
def null_fd() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("name", BEFORE)
def test_every_old_name_imports_from_errors(name: str) -> None:
    assert name in kvmvfio.errors.__all__
    assert name in dir(kvmvfio.errors)
    obj = getattr(kvmvfio.errors, name)
    if isinstance(obj, type):
        assert obj.__name__ == name  # check --json prints type(err).__name__


@pytest.mark.parametrize("name", sorted(kvmvfio.errors._MOVED))
def test_a_leaf_is_one_class_from_both_places(name: str) -> None:
    home = importlib.import_module(kvmvfio.errors._MOVED[name])
    assert getattr(kvmvfio.errors, name) is getattr(home, name)
    assert getattr(home, name).__module__ == home.__name__


@pytest.mark.parametrize(("module", "names"), BESIDE.items())
def test_beside_names_still_import(module: str, names: str) -> None:
    mod = importlib.import_module(module)
    for name in names.split():
        obj = getattr(mod, name)
        if isinstance(obj, type):
            assert obj is getattr(kvmvfio.errors, name)


def test_all_is_honest() -> None:
    names = kvmvfio.errors.__all__
    assert len(names) == len(set(names))
    for name in names:
        getattr(kvmvfio.errors, name)
    with pytest.raises(AttributeError):
        kvmvfio.errors.NoSuchError  # noqa: B018


def test_importing_errors_loads_no_layer() -> None:
    code = (
        "import sys, kvmvfio.errors; "
        "print(sorted(m for m in sys.modules if m.startswith('kvmvfio.') and "
        "m not in ('kvmvfio.errors', 'kvmvfio._lazy')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_leaf_loads_only_its_layer() -> None:
    code = (
        "import sys; from kvmvfio.errors import QemuRefused; "
        "print(sorted(m for m in sys.modules if m.startswith('kvmvfio.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(
        ["kvmvfio._lazy", "kvmvfio.errors", "kvmvfio.qemu", "kvmvfio.qemu.errors"]
    )


def test_every_leaf_derives_from_the_base() -> None:
    for name in kvmvfio.errors._MOVED:
        obj = getattr(kvmvfio.errors, name)
        if name != "Blocker":
            assert issubclass(obj, KvmvfioError), name


def _every_error_class() -> Iterator[type[KvmvfioError]]:
    """Every KvmvfioError subclass kvmvfio defines, every module of it imported."""
    for found in pkgutil.walk_packages(kvmvfio.__path__, "kvmvfio."):
        if not found.name.endswith("__main__"):
            importlib.import_module(found.name)
    todo = [KvmvfioError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("kvmvfio."):
            yield cls


def test_the_map_names_every_error_with_its_module() -> None:
    """The hierarchy in kvmvfio.errors' docstring lists each class under its module's tag."""
    lines = (kvmvfio.errors.__doc__ or "").splitlines()
    missing = []
    for cls in _every_error_class():
        module = cls.__module__.removeprefix("kvmvfio.")
        tags = (f"[{module}]", f"[{module};")  # FdClosed: [_closing; vfio.errors]
        # A line names classes and, on its last line of a block, their module.
        at = [i for i, ln in enumerate(lines) if re.search(rf"\b{cls.__name__}\b", ln)]
        tagged = any(
            any(t in ln for t in tags) or cls.__module__ == "kvmvfio.errors"
            for i in at
            for ln in lines[i : i + 4]
        )
        if not tagged:
            missing.append(f"{cls.__name__} [{module}]")
    assert missing == [], "classes the map in kvmvfio/errors.py lacks"


def test_kernel_error_subclasses_share_one_constructor() -> None:
    """A KernelError leaf words its errnos with class attributes, not its own __init__."""
    own = {
        name
        for name in kvmvfio.errors.__all__
        if isinstance(cls := getattr(kvmvfio.errors, name), type)
        and issubclass(cls, KernelError)
        and "__init__" in vars(cls)
    }
    assert own == {"KernelError", "Busy"}  # Busy takes the holder's name instead of a hint


def test_busy_words_a_missing_holder_with_its_class() -> None:
    from kvmvfio.errors import KvmVfioDeviceExists  # noqa: PLC0415

    assert str(Busy(errno.EBUSY, "open", "/p", "g")).endswith("; another process holds it")
    assert str(Busy(errno.EBUSY, "open", "/p", "g", "pid 1 (x)")).endswith("; held by pid 1 (x)")
    exists = KvmVfioDeviceExists(errno.EBUSY, "op")
    assert exists.holder is None
    assert "at most one kvm-vfio device" in str(exists)


def test_the_ioctl_helper_names_the_leaf_for_an_errno(null_fd: int) -> None:
    from kvmvfio.errors import NoInterruptRemapping  # noqa: PLC0415

    def refuse(fd: int, op: uapi.Ioctl, arg: object) -> int:
        raise OSError(errno.EPERM, "refused")

    previous = uapi.set_backend(refuse)
    try:
        with pytest.raises(NoInterruptRemapping) as caught:
            uapi.ioctl(
                null_fd,
                uapi.VFIO_SET_IOMMU,
                uapi.VFIO_TYPE1v2_IOMMU,
                subject="the container of IOMMU group 14",
                errors={errno.EPERM: NoInterruptRemapping},
            )
    finally:
        uapi.set_backend(previous)
    err = caught.value
    assert (err.errno, err.op, err.filename) == (errno.EPERM, "VFIO_SET_IOMMU", "/dev/null")
    assert str(err).startswith(
        "VFIO_SET_IOMMU on the container of IOMMU group 14 failed: Operation not permitted "
        "(EPERM); the IOMMU has no interrupt remapping"
    )
