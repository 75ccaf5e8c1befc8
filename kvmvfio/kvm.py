"""KVM's side of device assignment: the VM, and its kvm-vfio pseudo-device.

A KVM virtual machine is a file: ``KVM_CREATE_VM`` on ``/dev/kvm`` returns
it. KVM learns which VFIO groups and devices a VM's guest uses through one
pseudo-device per VM, *kvm-vfio*, which ``KVM_CREATE_DEVICE`` with
``KVM_DEV_TYPE_VFIO`` creates on the VM. ``KVM_SET_DEVICE_ATTR`` on it with
group ``KVM_DEV_VFIO_FILE`` and attribute ``KVM_DEV_VFIO_FILE_ADD`` hands it a
VFIO file, a group (``/dev/vfio/N``) or a device (a device fd from a group,
or a ``/dev/vfio/devices/vfioN`` cdev); ``KVM_DEV_VFIO_FILE_DEL`` takes it
back. Either way ``kvm_device_attr.addr`` points to an ``int32`` that holds
the fd. (The ``KVM_DEV_VFIO_GROUP*`` names are the same numbers, kept from
before device files could be added.)

What KVM does with a file it is given (``virt/kvm/vfio.c``):

- it takes its own reference to the file, so the file stays open while KVM
  holds it, whatever the caller closes;
- it tells VFIO which VM the file belongs to (``vfio_file_set_kvm``). The
  VFIO core hands that VM to the device driver when the device is opened,
  so files are added *before* their devices are opened
  (:mod:`kvmvfio.vfio.session` keeps that order);
- it counts an assigned device, and recomputes whether any DMA can be
  non-coherent, which decides whether the guest's ``WBINVD`` is honoured.

A VM has at most one kvm-vfio device: a second ``KVM_CREATE_DEVICE`` gets
EBUSY, and QEMU creates its own at its first VFIO device. Closing the
kvm-vfio device's fd releases every file it still holds (``kvm_vfio_release``),
so closing is always a complete undo; :meth:`KvmVfioDevice.close` still takes
back the files it added one by one, newest first, so each step is logged and
the order is the one an explicit teardown would use.

:class:`KvmVm` creates a VM (one with no memory and no vCPUs is enough to
hold a kvm-vfio device) or borrows the fd of one owned by someone else;
:class:`KvmVfioDevice` is the VM's kvm-vfio device. Both are context
managers, sync and async, and their ``close()`` is safe to call twice.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from typing import Self

from kvmvfio import uapi
from kvmvfio._closing import Closing, OwnedFd
from kvmvfio.errors import (
    AlreadyAssociated,
    KernelError,
    KernelUnsupported,
    KvmClosed,
    KvmRefusedFile,
    KvmVfioDeviceExists,
    NotAssociated,
    PermissionDenied,
    UsageError,
)

log = logging.getLogger(__name__)

#: What ``/proc/self/fd/N`` shows for the files KVM creates.
VM_FILE = "anon_inode:kvm-vm"
KVM_VFIO_FILE = "anon_inode:kvm-vfio"


def _describe(fd: int) -> str:
    path = uapi.fd_path(fd)
    return f"{path} (fd {fd})" if path else f"fd {fd}"


def _bad_fd_hint(fd: int) -> str:
    return f"fd {fd} is not an open file descriptor of this process"


class KvmVm(Closing):
    """A KVM virtual machine's file: created here, or borrowed from its owner."""

    path: str
    subject: str
    _file: OwnedFd

    def __init__(self, path: str | os.PathLike[str] = "/dev/kvm", *, machine_type: int = 0) -> None:
        """Create a VM: open ``path`` (``/dev/kvm``) and ``KVM_CREATE_VM``.

        The new VM has no memory and no vCPUs; it uses a little kernel memory
        until :meth:`close`. ``/dev/kvm`` itself is closed again at once.
        Raises :class:`~kvmvfio.errors.KernelUnsupported` when ``path`` does
        not exist or speaks another KVM API version,
        :class:`~kvmvfio.errors.PermissionDenied` when it may not be opened,
        and :class:`~kvmvfio.errors.KernelError` when KVM refuses the VM.
        """
        self.path = os.fspath(path)
        kvm = _open_kvm(self.path)
        try:
            where = f"KVM ({self.path})"
            version = uapi.ioctl(kvm, uapi.KVM_GET_API_VERSION, subject=where)
            if version != uapi.KVM_API_VERSION:
                raise KernelUnsupported(
                    f"KVM API version {version}",
                    f"kvmvfio speaks version {uapi.KVM_API_VERSION}, the only one Linux has had",
                )
            fd = uapi.ioctl(kvm, uapi.KVM_CREATE_VM, machine_type, subject=where)
        finally:
            # /dev/kvm is needed for these two ioctls only: opened and closed
            # within this try, it needs no owner.
            os.close(kvm)
        # KVM opens the VM file with O_CLOEXEC itself (kvm_dev_ioctl_create_vm).
        self.subject = f"KVM VM (fd {fd})"
        self._file = OwnedFd(fd, VM_FILE, self.subject)
        log.info("created %s from %s", self.subject, self.path)

    @classmethod
    def borrow(cls, vm_fd: int, *, subject: str | None = None) -> Self:
        """Wrap the VM file open on ``vm_fd``, owned by the caller (e.g. QEMU's).

        :meth:`close` forgets the fd and never closes it. Raises
        :class:`~kvmvfio.errors.UsageError` when ``vm_fd`` is open on
        something else than a KVM VM, :class:`~kvmvfio.errors.KernelError`
        (EBADF) when it is not open.
        """
        path = uapi.fd_path(vm_fd)
        if path is None:
            raise KernelError(errno.EBADF, "borrow", None, f"fd {vm_fd}", _bad_fd_hint(vm_fd))
        if path != VM_FILE:
            raise UsageError(f"fd {vm_fd} is open on {path}, not on a KVM VM ({VM_FILE})")
        vm = cls.__new__(cls)
        vm.path = path
        vm.subject = subject or f"KVM VM (fd {vm_fd}, borrowed)"
        vm._file = OwnedFd(vm_fd, path, vm.subject, borrowed=True)
        return vm

    @property
    def owned(self) -> bool:
        """Whether :meth:`close` closes the fd (False for a borrowed VM)."""
        return not self._file.borrowed

    @property
    def closed(self) -> bool:
        return self._file.closed

    def fileno(self) -> int:
        """The VM's fd. Raises :class:`~kvmvfio.errors.KvmClosed` after :meth:`close`."""
        if self._file.closed:
            raise KvmClosed("use its fd", self.subject)
        return self._file.fileno()

    def detach(self) -> int:
        """Give up the fd: return it, and leave closing it to the caller.

        This object is closed afterwards. Raises
        :class:`~kvmvfio.errors.KvmClosed` when it is closed already.
        """
        self.fileno()  # KvmClosed, not FdClosed, when closed already
        return self._file.detach()

    def close(self) -> None:
        """Close the VM's fd if it is ours (a borrowed one is only forgotten); safe twice.

        KVM destroys the VM once no file refers to it any more: a kvm-vfio
        device still open keeps it alive.
        """
        if self._file.closed:
            return
        self._file.close()
        if self.owned:
            log.info("closed %s", self.subject)

    def vfio_device(self) -> KvmVfioDevice:
        """Create this VM's kvm-vfio device; see :class:`KvmVfioDevice`."""
        return KvmVfioDevice(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._file.fileno()}"
        return f"<KvmVm {state} owned={self.owned}>"


def _open_kvm(path: str) -> int:
    # The caller closes it in a finally a few lines on; no owner needed.
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        code = err.errno if err.errno is not None else errno.EIO
        if code == errno.ENOENT:
            raise KernelUnsupported(
                f"KVM ({path})",
                "load kvm_intel or kvm_amd, and enable virtualization in the firmware "
                "(or nested virtualization, in a VM)",
            ) from err
        if code in (errno.EACCES, errno.EPERM):
            raise PermissionDenied(
                code, "open", path, f"KVM ({path})", "join the kvm group, or run as root"
            ) from err
        raise KernelError(code, "open", path, f"KVM ({path})") from err


@dataclass(frozen=True)
class KvmFile:
    """A file a :class:`KvmVfioDevice` handed to KVM.

    ``dev`` and ``ino`` identify the file that was open on ``fd`` then, so a
    number the caller closed and reused for another file is not mistaken
    for it.
    """

    fd: int
    subject: str
    dev: int
    ino: int

    def still_open(self) -> bool:
        """Whether ``fd`` is still open on the same file."""
        try:
            st = os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)


class KvmVfioDevice(Closing):
    """A VM's kvm-vfio device: the door through which KVM learns of VFIO files."""

    subject: str
    _file: OwnedFd
    _files: list[KvmFile]

    def __init__(self, vm: KvmVm) -> None:
        """Create the kvm-vfio device of ``vm`` (``KVM_CREATE_DEVICE``, ``KVM_DEV_TYPE_VFIO``).

        Raises :class:`~kvmvfio.errors.KvmVfioDeviceExists` (EBUSY) when the
        VM has one already, :class:`~kvmvfio.errors.KernelUnsupported` when
        the kernel lacks it (``CONFIG_KVM_VFIO``, ENODEV),
        :class:`~kvmvfio.errors.KvmClosed` when ``vm`` is closed, and
        :class:`~kvmvfio.errors.KernelError` for other refusals.
        """
        cmd = uapi.new("kvm_create_device", type=uapi.KVM_DEV_TYPE_VFIO)
        try:
            uapi.ioctl(
                vm.fileno(),
                uapi.KVM_CREATE_DEVICE,
                cmd,
                subject=vm.subject,
                label="KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO)",
                errors={errno.EBUSY: KvmVfioDeviceExists},
            )
        except KernelError as err:
            if err.errno == errno.ENODEV:
                raise KernelUnsupported(
                    "KVM's VFIO device (kvm-vfio)", "the kernel was built without CONFIG_KVM_VFIO"
                ) from err
            raise
        # KVM opens the device file with O_CLOEXEC itself (kvm_ioctl_create_device).
        fd = int(cmd.fd)
        self.subject = f"the kvm-vfio device (fd {fd}) of {vm.subject}"
        self._file = OwnedFd(fd, KVM_VFIO_FILE, self.subject)
        self._files = []
        log.info("created %s", self.subject)

    @classmethod
    def borrow(cls, device_fd: int, *, subject: str | None = None) -> Self:
        """Wrap a kvm-vfio device fd owned by the caller.

        :meth:`close` takes back the files added through this object and
        forgets the fd without closing it. Raises
        :class:`~kvmvfio.errors.UsageError` when ``device_fd`` is open on
        something else, :class:`~kvmvfio.errors.KernelError` (EBADF) when it
        is not open.
        """
        path = uapi.fd_path(device_fd)
        if path is None:
            raise KernelError(
                errno.EBADF, "borrow", None, f"fd {device_fd}", _bad_fd_hint(device_fd)
            )
        if path != KVM_VFIO_FILE:
            raise UsageError(
                f"fd {device_fd} is open on {path}, not on a kvm-vfio device ({KVM_VFIO_FILE})"
            )
        dev = cls.__new__(cls)
        dev.subject = subject or f"the kvm-vfio device (fd {device_fd}, borrowed)"
        dev._file = OwnedFd(device_fd, path, dev.subject, borrowed=True)
        dev._files = []
        return dev

    @property
    def owned(self) -> bool:
        """Whether :meth:`close` closes the fd (False for a borrowed device)."""
        return not self._file.borrowed

    @property
    def closed(self) -> bool:
        return self._file.closed

    @property
    def files(self) -> tuple[KvmFile, ...]:
        """The files added through this object and not taken back, oldest first."""
        return tuple(self._files)

    def fileno(self) -> int:
        """The device's fd. Raises :class:`~kvmvfio.errors.KvmClosed` after :meth:`close`."""
        if self._file.closed:
            raise KvmClosed("use its fd", self.subject)
        return self._file.fileno()

    def _file_attr(self, attr: int, fd: int, what: str, errors: uapi.ErrorMap) -> None:
        # kvm_vfio_set_file() reads the fd through addr as an int32.
        value = uapi.ffi.new("int32_t *", fd)
        cmd = uapi.new(
            "kvm_device_attr",
            group=uapi.KVM_DEV_VFIO_FILE,
            attr=attr,
            addr=int(uapi.ffi.cast("uintptr_t", value)),
        )
        name = (
            "KVM_DEV_VFIO_FILE_ADD"
            if attr == uapi.KVM_DEV_VFIO_FILE_ADD
            else "KVM_DEV_VFIO_FILE_DEL"
        )
        uapi.ioctl(
            self.fileno(),
            uapi.KVM_SET_DEVICE_ATTR,
            cmd,
            subject=what,
            errors=errors,
            label=f"KVM_SET_DEVICE_ATTR({name})",
        )

    def add(self, fd: int, *, subject: str | None = None) -> None:
        """Hand the VFIO group or device file open on ``fd`` to KVM (``KVM_DEV_VFIO_FILE_ADD``).

        KVM takes its own reference to the file and tells VFIO which VM the
        file belongs to; ``subject`` names the file in logs and errors.
        Raises :class:`~kvmvfio.errors.KvmClosed` after :meth:`close`,
        :class:`~kvmvfio.errors.KvmRefusedFile` (EINVAL) for a file that is
        no VFIO group or device, :class:`~kvmvfio.errors.AlreadyAssociated`
        (EEXIST) for a file KVM holds already, and
        :class:`~kvmvfio.errors.KernelError` (EBADF) when ``fd`` is not open.
        """
        what = subject or _describe(fd)
        if self.closed:
            raise KvmClosed(f"add {what}", self.subject)
        self._file_attr(
            uapi.KVM_DEV_VFIO_FILE_ADD,
            fd,
            what,
            {
                errno.EINVAL: KvmRefusedFile,
                errno.EEXIST: AlreadyAssociated,
                errno.EBADF: _bad_fd_hint(fd),
            },
        )
        st = os.fstat(fd)
        self._files.append(KvmFile(fd, what, st.st_dev, st.st_ino))
        log.info("KVM: added %s to %s", what, self.subject)

    def remove(self, fd: int, *, subject: str | None = None) -> None:
        """Take the file open on ``fd`` back from KVM (``KVM_DEV_VFIO_FILE_DEL``).

        KVM tells VFIO the file no longer belongs to a VM and drops its
        reference. Raises :class:`~kvmvfio.errors.KvmClosed` after
        :meth:`close`, :class:`~kvmvfio.errors.NotAssociated` (ENOENT) for a
        file KVM does not hold, and :class:`~kvmvfio.errors.KernelError`
        (EBADF) when ``fd`` is not open.
        """
        known = self._find(fd)
        what = subject or (known.subject if known else _describe(fd))
        if self.closed:
            raise KvmClosed(f"remove {what}", self.subject)
        try:
            self._del(fd, what)
        except NotAssociated:
            # KVM does not hold it, whatever we recorded: forget the record.
            if known is not None:
                self._files.remove(known)
            raise
        if known is not None:
            self._files.remove(known)
        log.info("KVM: removed %s from %s", what, self.subject)

    def _del(self, fd: int, what: str) -> None:
        self._file_attr(
            uapi.KVM_DEV_VFIO_FILE_DEL,
            fd,
            what,
            {errno.ENOENT: NotAssociated, errno.EBADF: _bad_fd_hint(fd)},
        )

    def _find(self, fd: int) -> KvmFile | None:
        for record in reversed(self._files):
            if record.fd == fd and record.still_open():
                return record
        return None

    def has_attr(
        self, attr: int = uapi.KVM_DEV_VFIO_FILE_ADD, group: int = uapi.KVM_DEV_VFIO_FILE
    ) -> bool:
        """Whether the device knows attribute ``attr`` of ``group`` (``KVM_HAS_DEVICE_ATTR``).

        Changes nothing. Raises :class:`~kvmvfio.errors.KvmClosed` after
        :meth:`close`, :class:`~kvmvfio.errors.KernelError` for an error
        other than ENXIO (which means no).
        """
        cmd = uapi.new("kvm_device_attr", group=group, attr=attr)
        try:
            uapi.ioctl(self.fileno(), uapi.KVM_HAS_DEVICE_ATTR, cmd, subject=self.subject)
        except KernelError as err:
            if err.errno == errno.ENXIO:
                return False
            raise
        return True

    def close(self) -> None:
        """Take back the files added here, newest first, then close the device; safe twice.

        A borrowed device's fd is forgotten, not closed. A file whose fd the
        caller closed (or reused) meanwhile is skipped, and a removal KVM
        refuses is logged, not raised: closing the device's fd releases every
        file KVM still holds anyway.
        """
        if self.closed:
            return
        try:
            while self._files:
                record = self._files.pop()
                if not record.still_open():
                    log.debug(
                        "%s: fd %d no longer refers to %s; closing the device releases it",
                        self.subject,
                        record.fd,
                        record.subject,
                    )
                    continue
                try:
                    self._del(record.fd, record.subject)
                except KernelError as err:
                    log.warning("%s; closing the device releases it", err)
                else:
                    log.info("KVM: removed %s from %s", record.subject, self.subject)
        finally:
            self._file.close()
            if self.owned:
                log.info("closed %s", self.subject)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._file.fileno()}"
        return f"<KvmVfioDevice {state} owned={self.owned} files={len(self._files)}>"
