"""Lab images: the L1 kernel, its root filesystem and the QEMU it runs under, from ``vm-images/``.

Each image is built by a recipe, a folder of ``vm-images/`` with a
``build.sh OUTDIR WORKDIR``. What a recipe built is cached under
``~/.cache/kvmvfio/`` (``$KVMVFIO_CACHE`` overrides) in a folder named after a
hash of the recipe's files and of its inputs (the kernel source package), so
an image is rebuilt only when its recipe changes (or its input: the kernel
source package, the host's qemu-system-x86 package). A build goes to a temporary
folder first and is renamed into place when complete: an interrupted build
leaves nothing that looks finished. Long builds print what step they are on
and the elapsed time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from kvmvfio.errors import LabError

KERNEL_SOURCE = Path("/usr/src/linux-source-6.12.tar.xz")

#: Free space a cold build needs in the cache folder (kernel tree with
#: objects, root filesystem tree and image, QEMU's source and build trees:
#: about 350 MiB), with a margin.
_NEEDED_BYTES = {"kernel": 4 << 30, "rootfs": 3 << 30, "qemu": 1 << 30}
_ARTIFACTS = {"kernel": ("bzImage",), "rootfs": ("rootfs.img",), "qemu": ("qemu-system-x86_64",)}
KINDS = tuple(_ARTIFACTS)
#: Debian packages the host needs to build each image (checked before a build).
_HOST_TOOLS = {
    "kernel": {"make": "make", "gcc": "gcc", "bc": "bc", "flex": "flex", "bison": "bison"},
    "rootfs": {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs"},
    "qemu": {
        "apt-get": "apt",
        "patch": "patch",
        "meson": "meson",
        "ninja": "ninja-build",
        "pkg-config": "pkg-config",
    },
}


def cache_dir() -> Path:
    """Where built images live (created on demand)."""
    env = os.environ.get("KVMVFIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmvfio"


def checkout_dir() -> Path:
    """The kvmvfio checkout this module runs from (it holds ``vm-images/``)."""
    env = os.environ.get("KVMVFIO_CHECKOUT")
    root = Path(env) if env else Path(__file__).resolve().parents[2]
    if not (root / "vm-images").is_dir():
        raise LabError(
            f"no vm-images/ in {root}: the lab runs from a kvmvfio checkout "
            "(install it with `pip install -e .`, or set KVMVFIO_CHECKOUT)"
        )
    return root


@dataclass(frozen=True)
class LabImages:
    """Paths of a built kernel, root filesystem image and L1 emulator."""

    kernel: Path
    rootfs: Path
    qemu: Path


def recipe_key(recipe: Path, extra: bytes = b"") -> str:
    """Hash of every file of a recipe folder (names and contents) and ``extra``."""
    digest = hashlib.sha256(extra)
    for path in sorted(p for p in recipe.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(recipe)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _inputs(kind: str) -> bytes:
    if kind == "qemu":
        # Debian's source of the host's QEMU is the input: a new package, a new build.
        return _qemu_package_version().encode()
    if kind != "kernel":
        return b""
    # The kernel source is an input: a new linux-source package means a new kernel.
    try:
        st = KERNEL_SOURCE.stat()
    except FileNotFoundError:
        raise LabError(
            f"{KERNEL_SOURCE} is missing: install it with `apt-get install linux-source-6.12`"
        ) from None
    return f"{st.st_size}:{int(st.st_mtime)}".encode()


def _qemu_package_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "qemu-system-x86"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        out = None
    if out is None or out.returncode != 0 or not out.stdout:
        raise LabError(
            "qemu-system-x86 is not installed: install it with `apt-get install qemu-system-x86` "
            "(the lab builds its L1 emulator from that package's source)"
        )
    return out.stdout


class ImageBuilder:
    """Build or reuse the lab images of one checkout."""

    def __init__(
        self,
        checkout: Path | None = None,
        cache: Path | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.checkout = checkout or checkout_dir()
        self.cache = cache or cache_dir()
        self.out = out or sys.stderr

    def path_for(self, kind: str) -> Path:
        """The cache folder the current recipe of ``kind`` builds into."""
        recipe = self.checkout / "vm-images" / kind
        return self.cache / f"{kind}-{recipe_key(recipe, _inputs(kind))}"

    def cached(self, kind: str) -> bool:
        """Whether the current recipe of ``kind`` has a complete build."""
        folder = self.path_for(kind)
        return all((folder / name).is_file() for name in _ARTIFACTS[kind])

    def ensure(self, *, rebuild: bool = False) -> LabImages:
        """Return the images, building what is missing or out of date.

        Raises :class:`LabError` when a tool is missing, the disk is too full,
        or a build fails (with the end of its log).
        """
        folders = {kind: self._ensure_one(kind, rebuild) for kind in KINDS}
        return LabImages(
            kernel=folders["kernel"] / "bzImage",
            rootfs=folders["rootfs"] / "rootfs.img",
            qemu=folders["qemu"] / "qemu-system-x86_64",
        )

    def _ensure_one(self, kind: str, rebuild: bool) -> Path:
        target = self.path_for(kind)
        if self.cached(kind) and not rebuild:
            self._say(f"{kind}: reusing {target}")
            return target
        self._check_host(kind)
        self.cache.mkdir(parents=True, exist_ok=True)
        # One build of a kind at a time: the work folder is shared between
        # builds, and a second `kvmvfio lab ...` started meanwhile waits and
        # then reuses what the first one built.
        with open(self.cache / f"{kind}.lock", "a") as lock:
            if not _try_lock(lock):
                self._say(f"{kind}: another kvmvfio is building it; waiting")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if self.cached(kind) and not rebuild:
                self._say(f"{kind}: reusing {target}")
                return target
            return self._build_one(kind, target)

    def _build_one(self, kind: str, target: Path) -> Path:
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        work = self.cache / "work" / kind
        tmp.mkdir(parents=True)
        work.mkdir(parents=True, exist_ok=True)
        script = self.checkout / "vm-images" / kind / "build.sh"
        self._say(f"{kind}: building into {target} (recipe {script})")
        try:
            self._run_build(kind, [str(script), str(tmp), str(work)])
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._prune(kind, keep=target)
        return target

    def _check_host(self, kind: str) -> None:
        missing = sorted({pkg for tool, pkg in _HOST_TOOLS[kind].items() if not shutil.which(tool)})
        if missing:
            raise LabError(
                f"cannot build the {kind} image: missing host tools; "
                f"install them with `apt-get install {' '.join(missing)}`"
            )
        if os.geteuid() != 0 and kind == "rootfs":
            raise LabError("building the root filesystem needs root (debootstrap, chroot)")
        self.cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache).free
        need = _NEEDED_BYTES[kind]
        if free < need:
            raise LabError(
                f"no disk space for the {kind} image: {free / 2**30:.1f} GiB free in {self.cache}, "
                f"a build needs about {need / 2**30:.0f} GiB (set KVMVFIO_CACHE to a roomier place)"
            )

    def _run_build(self, kind: str, argv: list[str]) -> None:
        start = time.monotonic()
        tail: list[str] = []
        last_line = [start]

        def stamp() -> str:
            minutes, seconds = divmod(int(time.monotonic() - start), 60)
            return f"{minutes:02d}:{seconds:02d}"

        proc = subprocess.Popen(
            ["bash", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=_heartbeat,
            args=(stop, lambda: self._say(f"{kind}: still working [{stamp()}]"), last_line),
            daemon=True,
        )
        heartbeat.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                last_line[0] = time.monotonic()
                tail = [*tail[-39:], line.rstrip()]
                self._say(f"[{stamp()}] {line.rstrip()}")
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            stop.set()
            if proc.stdout is not None:
                proc.stdout.close()
        if rc != 0:
            log = "\n  ".join(tail[-20:])
            raise LabError(f"building the {kind} image failed (exit {rc}); last lines:\n  {log}")
        self._say(f"{kind}: built in {stamp()}")

    def _prune(self, kind: str, keep: Path) -> None:
        """Drop older builds of ``kind``: one complete image per recipe is enough."""
        for old in self.cache.glob(f"{kind}-*"):
            if old != keep and old.is_dir() and ".tmp-" not in old.name:
                shutil.rmtree(old, ignore_errors=True)

    def _say(self, text: str) -> None:
        print(f"lab: {text}", file=self.out, flush=True)


def _try_lock(lock: TextIO) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _heartbeat(stop: threading.Event, say: Callable[[], None], last_line: list[float]) -> None:
    while not stop.wait(30):
        if time.monotonic() - last_line[0] >= 30:
            say()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
