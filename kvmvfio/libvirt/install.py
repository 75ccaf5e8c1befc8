"""Installing kvmvfio's libvirt hook: a shell front in ``/etc/libvirt/hooks/qemu.d``.

libvirt runs every executable file of ``hooks/qemu.d/`` (in name order,
after ``hooks/qemu`` if that exists) for every event of every QEMU domain:
argv ``NAME OP SUBOP EXTRA``, the domain XML on stdin, a minimal
environment. A non-zero exit with a message on stderr stops a domain start.

kvmvfio acts on ``prepare begin`` and ``release end`` of domains whose XML
carries its metadata namespace, and nothing else. The installed file is a
POSIX shell front (the package's ``hook-front.sh``) that tells those events
apart without starting Python, and only then runs ``python -m
kvmvfio.libvirt.hook`` with the interpreter and ``PYTHONPATH`` fixed at
install time. :func:`install` writes it atomically; :func:`uninstall`
removes it. Neither touches a file that kvmvfio did not write (found by the
marker line :data:`MARKER` in its header) unless asked to.

libvirt looks for hooks when the daemon starts (and again on ``SIGHUP``),
not at each event: a host's *first* qemu hook is only run after the daemon
(libvirtd, or virtqemud with the modular daemons) was restarted or reloaded.
:attr:`InstallResult.restart_needed` says when that is the case.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import logging
import os
import re
import shlex
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import kvmvfio
from kvmvfio.errors import KvmvfioError, UsageError
from kvmvfio.libvirt.errors import ForeignHook, HookFileError, HooksDirMissing
from kvmvfio.prepare.journal import DEFAULT_ROOT

log = logging.getLogger(__name__)

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks")
DEFAULT_NAME = "kvmvfio"
#: The header line that marks a file as written by kvmvfio.
MARKER = "# kvmvfio-hook-front: written by `kvmvfio hook install`"
#: How far into a file :data:`MARKER` is looked for (it is on line 2).
_HEADER_BYTES = 4096
_TEMPLATE = "hook-front.sh"
_PLACEHOLDER = re.compile(r"@(PYTHON|PYTHONPATH|VERSION|RUNDIR)@")


@dataclass(frozen=True)
class InstallResult:
    """What :func:`install` did."""

    #: The hook file written (``<hooks_dir>/qemu.d/<name>``).
    path: Path
    #: The interpreter and ``PYTHONPATH`` the front runs the hook with.
    python: str
    pythonpath: str
    #: An older kvmvfio hook was at ``path`` and was replaced.
    replaced: bool
    #: A file kvmvfio had not written was at ``path`` and was overwritten (``force``).
    forced: bool
    #: No qemu hook existed before: libvirt runs this one only once the daemon
    #: was restarted (or reloaded).
    restart_needed: bool


@contextlib.contextmanager
def _oserror(op: str, path: Path) -> Iterator[None]:
    """Turn an OSError of the block into a :class:`HookFileError` naming ``path``."""
    try:
        yield
    except OSError as err:
        if isinstance(err, KvmvfioError):
            raise
        raise HookFileError(err.errno or _errno.EIO, op, str(path)) from err


def check_python(python: str) -> str:
    """Return ``python`` if the hook can be run with it; raise :class:`UsageError` if not.

    It must be an absolute path (libvirt runs hooks with a minimal ``PATH``)
    to an executable file. It is not resolved: a virtualenv's interpreter is
    a symbolic link that must stay one.
    """
    if not os.path.isabs(python):
        raise UsageError(
            f"the hook's interpreter must be an absolute path, not {python!r}: libvirt runs "
            "hooks with a minimal PATH"
        )
    try:
        st = os.stat(python)
    except OSError as err:
        raise UsageError(f"the hook's interpreter {python} cannot be used: {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode) or not os.access(python, os.X_OK):
        raise UsageError(f"the hook's interpreter {python} is not an executable file")
    return python


#: What the hook imports when it runs (kvmvfio's hook, and what it needs).
HOOK_IMPORTS = ("kvmvfio.libvirt.hook", "cffi", "qemu.qmp")
#: libvirt's and systemd's environment for what they start: PATH, nothing of ours.
_CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_REPORT = "import kvmvfio, platform; print(kvmvfio.__file__); print(platform.python_version())"


@dataclass(frozen=True)
class Interpreter:
    """An interpreter as libvirt or systemd will run it, and the kvmvfio it imports."""

    #: The interpreter's path, and its version (``3.11.7``).
    python: str
    python_version: str
    #: The ``PYTHONPATH`` it was run with (None: unset).
    pythonpath: str | None
    #: The folder holding the ``kvmvfio`` package it imported.
    package_dir: str


def probe(
    python: str,
    pythonpath: str | None,
    imports: tuple[str, ...] = HOOK_IMPORTS,
    *,
    who: str = "the interpreter",
    what: str = "kvmvfio's hook",
) -> Interpreter:
    """Run ``python`` in a minimal environment, import ``imports``, and say which kvmvfio it got.

    ``PYTHONPATH`` is ``pythonpath``, or unset if None; the working folder is
    ``/`` (libvirt's and systemd's), so a checkout in the current folder is
    not found by accident. Raises :class:`UsageError` naming the interpreter
    and Python's own words (``No module named 'cffi'``) when it cannot
    (``who`` and ``what`` name the interpreter and the imports there).
    """
    check_python(python)
    code = "import " + ", ".join(imports) + "; " + _REPORT
    env = {"PATH": _CLEAN_PATH}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    try:
        proc = subprocess.run(
            [python, "-c", code],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"{who} {python} could not be run: {err}") from None
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) < 2:
        errs = [line for line in proc.stderr.splitlines() if line.strip()]
        why = errs[-1] if errs else f"exit status {proc.returncode}"
        pp = "unset" if pythonpath is None else pythonpath
        raise UsageError(f"{who} {python} cannot import {what} (PYTHONPATH={pp}): {why}")
    return Interpreter(python, lines[-1], pythonpath, str(Path(lines[-2]).parent.parent))


def check_imports(python: str, pythonpath: str | None = None) -> Interpreter:
    """Run ``python`` as libvirt will run the hook; check it imports the hook from ``pythonpath``.

    ``pythonpath`` defaults to :func:`default_pythonpath`. Raises
    :class:`UsageError` naming the interpreter and Python's own words
    (``No module named 'cffi'``) when it cannot import what the hook needs,
    or when the kvmvfio it imports is not the one in ``pythonpath``: a hook
    installed so would fail, or run other code than the user checked.
    """
    if pythonpath is None:
        pythonpath = default_pythonpath()
    found = probe(python, pythonpath, who="the hook's interpreter")
    if os.path.realpath(found.package_dir) != os.path.realpath(pythonpath):
        raise UsageError(
            f"the hook's interpreter {python} imports kvmvfio from {found.package_dir}, "
            f"not from its PYTHONPATH {pythonpath}"
        )
    return found


def is_source_checkout(folder: str) -> bool:
    """Say whether ``folder`` is a kvmvfio source checkout rather than an installed package.

    A checkout has ``pyproject.toml`` beside ``kvmvfio/`` and no
    ``kvmvfio-*.dist-info`` (an editable install pins its checkout so).
    A hook or unit pinned to one stops working when it is moved or deleted.
    """
    path = Path(folder)
    return (path / "pyproject.toml").is_file() and not any(path.glob("kvmvfio-*.dist-info"))


def checkout_warning(folder: str, what: str) -> str:
    """The sentence that says ``what`` runs kvmvfio from the source checkout ``folder``."""
    return (
        f"{what} runs kvmvfio from the source checkout {folder}, not from an installed "
        "package: it stops working if the checkout is moved or deleted (install the wheel, "
        "docs/quickstart-operators.md#installing, and run this again from it)"
    )


def default_pythonpath() -> str:
    """Return the folder that holds the ``kvmvfio`` package being run now."""
    return str(Path(kvmvfio.__file__).resolve().parents[1])


def render(python: str, pythonpath: str | None = None, run_root: str | Path = DEFAULT_ROOT) -> str:
    """Return the front's text for ``python`` and ``pythonpath`` (checked first).

    ``run_root`` is kvmvfio's state folder, where the front looks for a
    running agent to hand requests to (:mod:`kvmvfio.libvirt.hookserve`).

    ``pythonpath`` defaults to :func:`default_pythonpath`. Raises
    :class:`UsageError` for an interpreter :func:`check_python` refuses, or a
    ``pythonpath`` that is relative or that Python would split (``:``).
    """
    check_python(python)
    if pythonpath is None:
        pythonpath = default_pythonpath()
    if ":" in pythonpath or not os.path.isabs(pythonpath):
        raise UsageError(
            f"the hook's PYTHONPATH must be one absolute folder without ':', not {pythonpath!r}"
        )
    # Single-quoted for the shell (shlex.quote is POSIX quoting), so no path
    # can end the assignment or be expanded; one pass, so a path that looks
    # like a placeholder stays as it is.
    values = {
        "PYTHON": shlex.quote(python),
        "PYTHONPATH": shlex.quote(pythonpath),
        "VERSION": kvmvfio.__version__,
        "RUNDIR": shlex.quote(str(run_root)),
    }
    template = resources.files("kvmvfio.libvirt").joinpath(_TEMPLATE).read_text(encoding="utf-8")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def is_kvmvfio_hook(path: Path) -> bool:
    """Say whether the file at ``path`` carries kvmvfio's marker line in its header.

    Raises :class:`HookFileError` if it cannot be read.
    """
    with _oserror("read", path), open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    return MARKER.encode() in head.splitlines()[:5]


def _is_executable(path: Path) -> bool:
    """Say whether libvirt counts ``path`` as a hook (its ``virFileIsExecutable``)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return not stat.S_ISDIR(st.st_mode) and bool(st.st_mode & 0o111)


def _has_qemu_hook(hooks_dir: Path) -> bool:
    """Say whether libvirt, started now, would find a qemu hook in ``hooks_dir``."""
    if _is_executable(hooks_dir / "qemu"):
        return True
    try:
        entries = os.listdir(hooks_dir / "qemu.d")
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as err:
        raise HookFileError(err.errno or _errno.EIO, "listdir", str(hooks_dir / "qemu.d")) from err
    return any(_is_executable(hooks_dir / "qemu.d" / e) for e in entries)


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise UsageError(f"{name!r} cannot name a file in qemu.d")


def _mkdir(path: Path) -> None:
    """Create ``path`` with mode 0755 (whatever the umask) if it does not exist."""
    if path.is_dir():
        return
    with _oserror("mkdir", path):
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return
        os.chmod(path, 0o755)
    log.info("created %s", path)


def _fsync_dir(path: Path) -> None:
    with _oserror("fsync", path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(target: Path, data: bytes) -> None:
    """Replace ``target`` by an executable file holding ``data``, all or nothing.

    libvirt runs every executable file of ``qemu.d``, so the temporary file
    is written one folder up (libvirt runs nothing there but files named
    after its drivers), mode 0600 until complete and 0755 just before the
    rename into ``qemu.d``: libvirt never sees a partial hook, nor two.
    """
    folder = target.parent
    with _oserror("open", folder.parent):
        fd, tmp = tempfile.mkstemp(dir=folder.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with _oserror("write", Path(tmp)):
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.fchmod(fd, 0o755)
            finally:
                os.close(fd)
        with _oserror("rename", target):
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def install(
    hooks_dir: str | Path = DEFAULT_HOOKS_DIR,
    python: str = sys.executable,
    name: str = DEFAULT_NAME,
    *,
    force: bool = False,
    pythonpath: str | None = None,
    run_root: str | Path = DEFAULT_ROOT,
) -> InstallResult:
    """Write the hook front to ``<hooks_dir>/qemu.d/<name>`` (mode 0755), atomically.

    The front runs ``python -m kvmvfio.libvirt.hook`` with ``PYTHONPATH`` set
    to ``pythonpath`` (default: the folder holding this ``kvmvfio``).
    Creates ``hooks_dir`` and ``qemu.d`` (0755) if needed. Replaces an older
    kvmvfio front; refuses to overwrite any other file unless ``force``.

    Raises :class:`UsageError` for a bad interpreter, path or name,
    :class:`ForeignHook` for a file kvmvfio did not write, and
    :class:`HookFileError` (errno kept) when the file system refuses.
    """
    _check_name(name)
    if pythonpath is None:
        pythonpath = default_pythonpath()
    text = render(python, pythonpath, run_root)
    hooks_dir = Path(hooks_dir)
    qemu_d = hooks_dir / "qemu.d"
    target = qemu_d / name
    restart_needed = not _has_qemu_hook(hooks_dir)
    replaced = forced = False
    if os.path.lexists(target):
        if target.is_dir():
            raise ForeignHook(target, "overwrite", "it is a folder")
        if target.exists() and is_kvmvfio_hook(target):
            replaced = True
        elif not force:
            raise ForeignHook(
                target, "overwrite", "move it away, or install with --force to replace it"
            )
        else:
            forced = True
    if not hooks_dir.is_dir() and not hooks_dir.parent.is_dir():
        raise HooksDirMissing(hooks_dir)
    _mkdir(hooks_dir)
    _mkdir(qemu_d)
    _write_atomically(target, text.encode("utf-8"))
    result = InstallResult(
        path=target,
        python=python,
        pythonpath=pythonpath,
        replaced=replaced,
        forced=forced,
        restart_needed=restart_needed,
    )
    log.info(
        "installed %s (python %s, replaced %s, forced %s, restart needed %s)",
        target,
        python,
        replaced,
        forced,
        restart_needed,
    )
    return result


def uninstall(hooks_dir: str | Path = DEFAULT_HOOKS_DIR, name: str = DEFAULT_NAME) -> bool:
    """Remove the kvmvfio front ``<hooks_dir>/qemu.d/<name>``; return False if none was there.

    Raises :class:`ForeignHook` (and removes nothing) if the file there was
    not written by kvmvfio, :class:`HookFileError` when the file system
    refuses.
    """
    _check_name(name)
    target = Path(hooks_dir) / "qemu.d" / name
    if not os.path.lexists(target):
        return False
    if target.is_dir() or not target.exists() or not is_kvmvfio_hook(target):
        raise ForeignHook(target, "remove", "remove it by hand if it should go")
    with _oserror("unlink", target):
        os.unlink(target)
    _fsync_dir(target.parent)
    log.info("removed %s", target)
    return True
