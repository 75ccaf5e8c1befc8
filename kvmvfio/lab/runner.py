"""Boot the lab's L1 guest and run one command inside it.

L1 is a q35 machine under QEMU TCG (software emulation) with an emulated
IOMMU, so that it has real VFIO, real iommufd and real (nested) KVM although
the host has none of them. The guest's init (``vm-images/rootfs/init``)
mounts two 9p shares: the kvmvfio checkout read-only at ``/mnt/src``, and a
per-run job folder read-write at ``/mnt/job``, from which it runs ``job.sh``
and into which it writes the job's exit status (``rc``). The job's output
comes back over a virtio console on QEMU's stdout and is streamed as it
comes; the kernel's console goes to a log file, whose last lines are shown
when the guest fails.

The VM is always stopped: at the end of the job, on a timeout, on Ctrl-C
(the task is cancelled), and when anything here fails. QEMU runs in its own
session so no signal meant for us reaches it half-way, and with a parent
death signal (``PR_SET_PDEATHSIG``), so that even when this process is
killed outright (SIGKILL, an OOM kill) the kernel kills QEMU with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kvmvfio.errors import LabError
from kvmvfio.lab import stall
from kvmvfio.lab.images import LabImages
from kvmvfio.lab.topology import BOOTED_ENV, Topology

#: Addresses of the lab's own devices on pcie.0, high enough to stay out of
#: the way of topology devices (which may ask for any slot below 0x10).
_INFRA_SLOTS = {"root": "0x10", "src": "0x11", "job": "0x12", "console": "0x13"}
_GUEST_SRC = "/mnt/src"
GUEST_JOB = "/mnt/job"


@dataclass(frozen=True)
class LabRun:
    """Everything that defines one boot of L1."""

    topology: Topology
    images: LabImages
    checkout: Path
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    timeout: float = 1800.0
    #: The emulator; by default the lab's own build (``images.qemu``, vm-images/qemu).
    qemu: str | None = None
    extra_qemu_args: tuple[str, ...] = field(default=())
    #: The guest's console on this terminal, both ways (``kvmvfio lab shell``).
    interactive: bool = False


def kernel_cmdline(topology: Topology) -> str:
    """The L1 kernel command line for ``topology``."""
    args = [
        "console=ttyS0",
        "root=/dev/vda",
        "rw",
        "init=/sbin/kvmvfio-init",
        "quiet",
        # A guest panic must end the run, not hang it until the timeout.
        "panic=-1",
        *topology.kernel_cmdline(),
    ]
    return " ".join(args)


def qemu_argv(run: LabRun, job_dir: Path, console_log: Path) -> list[str]:
    """The full QEMU command line for ``run`` (pure: easy to test)."""
    topo = run.topology
    argv = [
        emulator(run),
        "-machine", "q35",
        # thread=single: L1 crashed early in boot in a few percent of boots
        # with multi-threaded TCG, and never with it single (LAB.md).
        "-accel", "tcg,thread=single",
        "-cpu", "max",
        "-smp", str(topo.smp),
        "-m", str(topo.memory_mb),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-serial", f"file:{console_log}",
        "-kernel", str(run.images.kernel),
        "-append", kernel_cmdline(topo),
        # The vIOMMU comes before every PCI device so that all sit behind it.
        "-device", topo.viommu_arg(),
    ]  # fmt: skip
    for dev in topo.devices:
        argv += ["-device", dev.qemu_arg()]
    for disk in topo.disks:
        argv += disk.qemu_args(str(job_dir / disk.image_name()))
    slots = _INFRA_SLOTS
    argv += [
        "-drive", f"id=root,if=none,file={run.images.rootfs},format=raw,snapshot=on",
        "-device", f"virtio-blk-pci,drive=root,addr={slots['root']}",
        "-fsdev", f"local,id=src,path={run.checkout},security_model=none,readonly=on",
        "-device", f"virtio-9p-pci,fsdev=src,mount_tag=src,addr={slots['src']}",
        "-fsdev", f"local,id=job,path={job_dir},security_model=none",
        "-device", f"virtio-9p-pci,fsdev=job,mount_tag=job,addr={slots['job']}",
        "-chardev", "stdio,id=out,signal=off",
        "-device", f"virtio-serial-pci,addr={slots['console']}",
        "-device", "virtconsole,chardev=out",
        # L1's human monitor, for a person looking into a run that hangs:
        # `socat - UNIX-CONNECT:JOB/l1-monitor.sock`, then `info registers`, `nmi`...
        "-monitor", f"unix:{job_dir / 'l1-monitor.sock'},server=on,wait=off",
        *run.extra_qemu_args,
    ]  # fmt: skip
    return argv


def emulator(run: LabRun) -> str:
    """The QEMU binary ``run`` boots L1 with."""
    return run.qemu if run.qemu is not None else str(run.images.qemu)


def job_script(run: LabRun) -> str:
    """The shell script L1's init runs: environment, then the command."""
    env = {
        "PYTHONPATH": _GUEST_SRC,
        # The checkout is read-only in the guest.
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HOME": "/root",
        BOOTED_ENV: guest_topology(run.topology),
        "KVMVFIO_LAB_JOB": GUEST_JOB,
        # L1's own kernel, for the L2 guests the QEMU handoff tests boot.
        "KVMVFIO_LAB_KERNEL": f"{GUEST_JOB}/bzImage",
        **dict(run.env),
    }
    lines = ["#!/bin/sh", "# Written by kvmvfio lab; run by L1's init."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [f"cd {_GUEST_SRC}", "exec " + shlex.join(run.command)]
    return "\n".join(lines) + "\n"


def guest_topology(topology: Topology) -> str:
    """What a job in L1 loads ``topology`` by: a built-in one's name, or the copy of its file.

    :func:`run_in_lab` puts that copy in the job folder, under the file's own
    name (so the topology keeps its name in L1).
    """
    if topology.file is None:
        return topology.name
    return f"{GUEST_JOB}/topology/{topology.file.name}"


def _share_topology(topology: Topology, job_dir: Path) -> None:
    if topology.file is None:
        return
    target = job_dir / "topology" / topology.file.name
    try:
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(topology.file, target)
    except OSError as err:
        raise LabError(f"cannot copy topology file {topology.file} for L1: {err.strerror}") from err


def _make_disks(topology: Topology, job_dir: Path) -> None:
    """Create each disk of ``topology`` as an empty sparse raw image in the job folder."""
    for disk in topology.disks:
        image = job_dir / disk.image_name()
        try:
            with open(image, "wb") as f:
                f.truncate(disk.size_mb << 20)
        except OSError as err:
            raise LabError(f"cannot create disk image {image} for L1: {err.strerror}") from err


def _share_kernel(kernel: Path, target: Path) -> None:
    """Put L1's kernel in the job folder (a hard link where it can be), for L2 guests."""
    target.unlink(missing_ok=True)
    try:
        os.link(kernel, target)
    except OSError:
        shutil.copyfile(kernel, target)


def _console_tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "  (no console output)"
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(f"  | {ln}" for ln in tail) or "  (no console output)"


async def run_in_lab(run: LabRun, out: BinaryIO | None = None, job_dir: Path | None = None) -> int:
    """Boot L1 for ``run``, stream the command's output to ``out``, return its exit code.

    ``job_dir``, when given, is the folder shared with the guest as
    ``/mnt/job`` (the caller reads files the job leaves there); otherwise a
    temporary one is used. Raises :class:`LabError` when QEMU is missing,
    fails to start, the guest stops before the job ends (with the last
    console lines), or the timeout passes; the VM is stopped in every case.
    """
    stream = out or sys.stdout.buffer
    if run.qemu is not None and shutil.which(run.qemu) is None:
        raise LabError(f"{run.qemu} not found on the host")
    for image in (run.images.kernel, run.images.rootfs, run.images.qemu):
        if not image.is_file():
            raise LabError(f"lab image {image} is missing: run `kvmvfio lab build`")
    with contextlib.ExitStack() as stack:
        if job_dir is None:
            job_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvmvfio-job-")))
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "rc").unlink(missing_ok=True)
        (job_dir / "job.sh").write_text(job_script(run))
        _share_kernel(run.images.kernel, job_dir / "bzImage")
        _share_topology(run.topology, job_dir)
        _make_disks(run.topology, job_dir)
        console_log = job_dir / "console.log"
        console_log.unlink(missing_ok=True)
        argv = qemu_argv(run, job_dir, console_log)
        # Interactive: QEMU gets this terminal (its stdio chardev makes it raw,
        # and signal=off sends Ctrl-C to the guest) and stays in our session.
        pipe = None if run.interactive else asyncio.subprocess.PIPE
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=None if run.interactive else asyncio.subprocess.DEVNULL,
                stdout=pipe,
                stderr=pipe,
                start_new_session=not run.interactive,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as err:
            raise LabError(f"cannot start {emulator(run)}: {err.strerror}") from err
        try:
            async with asyncio.timeout(run.timeout):
                stderr = await _run_watched(proc, stream, run, job_dir / "l1-monitor.sock")
        except TimeoutError:
            raise LabError(
                f"the lab run on topology {run.topology.name} did not finish within "
                f"{run.timeout:.0f} s; stopped it. Last console lines:\n"
                f"{_console_tail(console_log)}"
            ) from None
        finally:
            await _stop(proc)
        rc_file = job_dir / "rc"
        if not rc_file.exists():
            detail = stderr.decode(errors="replace").strip()
            qemu_said = f"\nQEMU said: {detail}" if detail else ""
            raise LabError(
                f"the L1 guest (topology {run.topology.name}) stopped before the job finished "
                f"(QEMU exit {proc.returncode}){qemu_said}\nLast console lines:\n"
                f"{_console_tail(console_log)}"
            )
        try:
            return int(rc_file.read_text().strip())
        except ValueError:
            raise LabError(f"the L1 guest wrote a malformed exit status to {rc_file}") from None


async def _run_watched(
    proc: asyncio.subprocess.Process, stream: BinaryIO, run: LabRun, monitor: Path
) -> bytes:
    """Pump the job's output until QEMU exits; a stalled L1 ends it (:mod:`.stall`)."""
    if run.interactive:
        main: asyncio.Future[bytes] = asyncio.ensure_future(_wait_bytes(proc))
    else:
        main = asyncio.ensure_future(_pump(proc, stream))
    watcher: asyncio.Future[None] = asyncio.ensure_future(stall.watch(proc.pid, monitor))
    both: list[asyncio.Future[Any]] = [main, watcher]
    try:
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        if not main.done() and (stalled := watcher.exception()) is not None:
            raise stalled
        return await main
    finally:
        for task in (main, watcher):
            task.cancel()
        await asyncio.gather(main, watcher, return_exceptions=True)


async def _wait_bytes(proc: asyncio.subprocess.Process) -> bytes:
    await proc.wait()
    return b""


async def _pump(proc: asyncio.subprocess.Process, stream: BinaryIO) -> bytes:
    assert proc.stdout is not None
    assert proc.stderr is not None
    err_task = asyncio.ensure_future(proc.stderr.read())
    while chunk := await proc.stdout.read(4096):
        stream.write(chunk.replace(b"\r\n", b"\n"))
        stream.flush()
    await proc.wait()
    return await err_task


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when ``parent`` dies."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Stop QEMU (its whole session): TERM, then KILL after a grace period."""
    if proc.returncode is not None:
        return
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:  # interactive: QEMU is in our session, not its own
                os.kill(proc.pid, sig)
        try:
            # Shielded: this also runs while our task is being cancelled (Ctrl-C).
            await asyncio.shield(asyncio.wait_for(proc.wait(), grace))
            return
        except (TimeoutError, asyncio.CancelledError):
            continue
