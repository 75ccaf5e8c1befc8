"""The folders kvmvfio keeps its state in, under ``/run/kvmvfio``, opened without trust.

kvmvfio runs as root and acts on what these files say (the journal's
``journal/group-N.json``, the claim locks ``locks/group-N.lock``, the
agent's ``agent/NAME.json``), so a file put there by someone else, or a
link, must never be followed or believed. Every file is reached from a
folder's file descriptor (``openat``), never by a path that the kernel
would walk again:

- the root (``/run/kvmvfio``) must be a folder, not a link, owned by the
  expected uid and writable by nobody else;
- each folder under it (``journal``, ``locks``, ``agent``) is opened with
  ``O_NOFOLLOW | O_DIRECTORY`` and must be owned by the expected uid with
  mode 0700;
- each file is looked at first (``fstatat`` without following), then
  opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO put there must not block
  kvmvfio) and must be a regular file owned by the expected uid, with mode
  0600 and one link.

Anything else is refused with :class:`UntrustedFile`, which names the path
and what was found there, and is left as it is. The expected uid is the
effective uid kvmvfio runs as (root), passed as a value so that tests run
by another user work the same way.

Writes keep their durability: a temporary file in the same folder,
``fsync``, ``rename`` over the old file, ``fsync`` of the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmvfio.errors import KernelError, KvmvfioError, shown
from kvmvfio.prepare.errors import UntrustedFile

log = logging.getLogger(__name__)

FILE_MODE = 0o600
FOLDER_MODE = 0o700

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device node"),
    (stat.S_ISBLK, "a block device node"),
    (stat.S_ISREG, "a regular file"),
)


def describe(st: os.stat_result) -> str:
    """What kind of file ``st`` is, in words (``"a symbolic link"``)."""
    return next((text for test, text in _KINDS if test(st.st_mode)), "an unknown kind of file")


def _kernel(err: OSError, op: str, path: Path) -> KernelError:
    return KernelError(err.errno or errno.EIO, op, str(path))


class RunFolder:
    """One folder of kvmvfio's state under ``root`` (``journal``, ``locks``, ``agent``).

    ``uid`` is the owner every file and folder must have (default: the
    effective uid kvmvfio runs as). Nothing is kept open between calls.
    """

    def __init__(self, root: str | Path, name: str, uid: int | None = None) -> None:
        self.root = Path(root)
        self.name = name
        self.path = self.root / name
        self.uid = os.geteuid() if uid is None else uid

    # -- folders -------------------------------------------------------------------------

    @contextlib.contextmanager
    def opened(self, *, create: bool) -> Iterator[int | None]:
        """The folder's fd, checked; None when it does not exist and ``create`` is False.

        Raise :class:`UntrustedFile` for a link, a non-folder, another
        owner or another mode, at the root or at the folder.
        """
        root = self._open_root(create)
        if root is None:
            yield None
            return
        try:
            fd = self._open_folder(root, create)
        finally:
            os.close(root)
        if fd is None:
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_root(self, create: bool) -> int | None:
        made = False
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.makedirs(self.root, mode=FOLDER_MODE)
                made = True
            except FileExistsError:
                pass  # another kvmvfio made it meanwhile: checked below like any other
            except OSError as err:
                raise _kernel(err, "mkdir", self.root) from err
            try:
                fd = os.open(self.root, _DIR_FLAGS)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise self._found_at(self.root, None, "a folder") from None
                raise _kernel(err, "open", self.root) from err
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._found_at(self.root, None, "a folder") from None
            raise _kernel(err, "open", self.root) from err
        try:
            if made:
                os.fchmod(fd, FOLDER_MODE)  # the umask may have taken bits away
            st = os.fstat(fd)
            expected = f"a folder owned by uid {self.uid} that no one else may write"
            if st.st_uid != self.uid:
                raise UntrustedFile(
                    self.root,
                    f"is owned by uid {st.st_uid}",
                    expected,
                    f"chown {self.uid} {self.root}",
                )
            if st.st_mode & 0o022:
                raise UntrustedFile(
                    self.root,
                    f"has mode {stat.S_IMODE(st.st_mode):04o}",
                    expected,
                    f"chmod go-w {self.root}",
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_folder(self, root: int, create: bool) -> int | None:
        made = False
        try:
            fd = os.open(self.name, _DIR_FLAGS, dir_fd=root)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(self.name, FOLDER_MODE, dir_fd=root)
                made = True
            except FileExistsError:
                pass  # another kvmvfio made it meanwhile: checked below like any other
            except OSError as err:
                raise _kernel(err, "mkdir", self.path) from err
            try:
                fd = os.open(self.name, _DIR_FLAGS, dir_fd=root)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise self._found_at(self.path, root, "a folder") from None
                raise _kernel(err, "open", self.path) from err
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._found_at(self.path, root, "a folder") from None
            raise _kernel(err, "open", self.path) from err
        try:
            if made:
                os.fchmod(fd, FOLDER_MODE)  # the umask may have taken bits away
            self._check(self.path, os.fstat(fd), folder=True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- checks --------------------------------------------------------------------------

    def _expected(self, folder: bool) -> str:
        if folder:
            return f"a folder owned by uid {self.uid} with mode {FOLDER_MODE:04o}"
        return f"a regular file owned by uid {self.uid} with mode {FILE_MODE:04o}"

    def _check(self, path: Path, st: os.stat_result, *, folder: bool) -> None:
        expected = self._expected(folder)
        is_kind = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
        if not is_kind:
            raise UntrustedFile(path, f"is {describe(st)}", expected)
        if st.st_uid != self.uid:
            raise UntrustedFile(
                path, f"is owned by uid {st.st_uid}", expected, f"chown {self.uid} {path}"
            )
        mode = FOLDER_MODE if folder else FILE_MODE
        if stat.S_IMODE(st.st_mode) != mode:
            raise UntrustedFile(
                path,
                f"has mode {stat.S_IMODE(st.st_mode):04o}",
                expected,
                f"chmod {mode:o} {path}",
            )
        if not folder and st.st_nlink != 1:
            # A hard link would let a write here change a file somewhere else.
            raise UntrustedFile(path, f"has {st.st_nlink} hard links", expected)

    def _found_at(self, path: Path, dir_fd: int | None, kind: str) -> KvmvfioError:
        """The refusal for ``path``, which open() would not take as ``kind``."""
        try:
            if dir_fd is None:
                st = os.stat(path, follow_symlinks=False)
            else:
                st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as err:
            return _kernel(err, "stat", path)
        folder = kind == "a folder"
        expected = (
            f"a folder owned by uid {self.uid} that no one else may write"
            if dir_fd is None
            else self._expected(folder)
        )
        return UntrustedFile(path, f"is {describe(st)}", expected)

    # -- files ---------------------------------------------------------------------------

    def _open_file(self, folder: int, name: str, flags: int, *, create: bool) -> int | None:
        """Open ``name`` in ``folder`` as a trusted file; None when absent and not ``create``."""
        path = self.path / name
        for _ in range(3):  # another kvmvfio may create or remove it meanwhile
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=folder, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            except OSError as err:
                raise _kernel(err, "stat", path) from err
            if st is None and not create:
                return None
            if st is not None:
                # Looked at before open(): opening a device node can have effects of its own.
                self._check(path, st, folder=False)
            extra = os.O_CREAT | os.O_EXCL if st is None else 0
            try:
                fd = os.open(name, flags | _FILE_FLAGS | extra, FILE_MODE, dir_fd=folder)
            except (FileExistsError, FileNotFoundError):
                continue
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
                    raise self._found_at(path, folder, "a file") from None
                raise _kernel(err, "open", path) from err
            try:
                if st is None:
                    os.fchmod(fd, FILE_MODE)
                self._check(path, os.fstat(fd), folder=False)
            except BaseException:
                os.close(fd)
                raise
            return fd
        raise KernelError(errno.EAGAIN, "open", str(path), hint="it kept changing; try again")

    def read(self, name: str, limit: int) -> bytes | None:
        """The first ``limit + 1`` bytes of file ``name``; None when it or the folder is absent.

        Raise :class:`UntrustedFile` when the file or a folder on the way is
        not kvmvfio's, :class:`~kvmvfio.errors.KernelError` when reading fails.
        """
        with self.opened(create=False) as folder:
            if folder is None:
                return None
            fd = self._open_file(folder, name, os.O_RDONLY, create=False)
            if fd is None:
                return None
            chunks: list[bytes] = []
            got = 0
            try:
                while got <= limit:
                    chunk = os.read(fd, limit + 1 - got)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
            except OSError as err:
                raise _kernel(err, "read", self.path / name) from err
            finally:
                os.close(fd)
            return b"".join(chunks)

    def write(self, name: str, data: bytes) -> None:
        """Replace file ``name`` with ``data`` durably (temporary file, fsync, rename, fsync).

        The rename replaces whatever entry is there (a link is replaced, not
        followed; nothing is written through it). Raise
        :class:`UntrustedFile` when a folder on the way is not kvmvfio's,
        :class:`~kvmvfio.errors.KernelError` when a write fails (a folder
        in the file's place: ``EISDIR``).
        """
        with self.opened(create=True) as folder:
            assert folder is not None  # created
            path = self.path / name
            tmp = f".{name}.tmp"
            with contextlib.suppress(FileNotFoundError):
                self._unlink(folder, tmp)  # left by a crash; a link is removed, not followed
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    FILE_MODE,
                    dir_fd=folder,
                )
            except OSError as err:
                raise _kernel(err, "open", self.path / tmp) from err
            try:
                os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as err:
                raise _kernel(err, "write", self.path / tmp) from err
            finally:
                os.close(fd)
            try:
                os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
                os.fsync(folder)
            except OSError as err:
                raise _kernel(err, "rename", path) from err

    def _unlink(self, folder: int, name: str) -> None:
        try:
            os.unlink(name, dir_fd=folder)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise _kernel(err, "unlink", self.path / name) from err

    def remove(self, name: str) -> None:
        """Remove file ``name`` (a no-op when it is absent); a link is removed, not followed."""
        with self.opened(create=False) as folder:
            if folder is not None:
                with contextlib.suppress(FileNotFoundError):
                    self._unlink(folder, name)

    def names(self) -> list[str]:
        """The names in the folder, sorted; empty when it does not exist."""
        with self.opened(create=False) as folder:
            if folder is None:
                return []
            try:
                return sorted(os.listdir(folder))
            except OSError as err:
                raise _kernel(err, "listdir", self.path) from err

    def keys(
        self, pattern: re.Pattern[str], what: str, accept: Callable[[str], bool] | None = None
    ) -> list[str]:
        """The first group of each name ``pattern`` matches and ``accept`` takes, by name.

        Any other name is logged as not ``what`` and skipped, except ``.NAME.tmp``
        (a write in progress, or a crash's). Files are not read.
        """
        out = []
        for name in self.names():
            match = pattern.fullmatch(name)
            if match is not None and (accept is None or accept(match[1])):
                out.append(match[1])
            elif not name.startswith("."):
                log.warning("%s/%s: not %s; ignored", self.path, shown(name), what)
        return out

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold an exclusive ``flock`` on file ``name`` (created if absent) for the block.

        Raise :class:`UntrustedFile` for a lock file that is not kvmvfio's
        (a FIFO, a link, a folder, another owner or mode): nothing is locked.
        """
        with self.opened(create=True) as folder:
            assert folder is not None  # created
            fd = self._open_file(folder, name, os.O_RDWR, create=True)
        assert fd is not None  # created
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
