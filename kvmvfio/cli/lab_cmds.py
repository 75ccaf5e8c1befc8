"""``kvmvfio lab ...``: build the lab images, boot L1, run commands and tests in it."""

from __future__ import annotations

import argparse
import asyncio
import sys
import termios
from typing import Any

from kvmvfio.errors import UsageError
from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.images import ImageBuilder
from kvmvfio.lab.runner import LabRun, run_in_lab
from kvmvfio.lab.tier import run_tier, summary

DEFAULT_TIMEOUT = 1800.0
#: Per topology in `lab test`: the default topology's tests took about 35 min on
#: a 2-core machine (2026-12-03) and CI's machine is slower; a hang is ended
#: sooner by pytest's per-test timeout.
TEST_TIMEOUT = 3000.0


def register(sub: Any) -> None:
    """Add the ``lab`` command family to the top-level subparsers."""
    lab = sub.add_parser(
        "lab",
        help="the nested vIOMMU lab (L1 under TCG with real VFIO, iommufd and KVM)",
        description=(
            "Build and boot the nested lab. L1 runs under QEMU TCG with one CPU "
            "(-smp 2 crashed L1 in a few percent of boots under TCG; a topology may "
            "still ask for more)."
        ),
    )
    labsub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", parser_class=type(lab))
    labsub.required = True

    build = labsub.add_parser(
        "build",
        help="build the kernel, the root filesystem and L1's QEMU, or reuse the cached ones",
    )
    build.add_argument(
        "--rebuild", action="store_true", help="build even when the cache is current"
    )
    build.set_defaults(handler=_build)

    topos = labsub.add_parser("topologies", help="list the built-in topologies")
    topos.set_defaults(handler=_topologies)

    run = labsub.add_parser(
        "run", help="boot L1 with a topology, run CMD inside, return its exit status"
    )
    _common(run)
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command to run in L1"
    )
    run.set_defaults(handler=_run)

    test = labsub.add_parser(
        "test", help="run the lab test tier (pytest in L1, one boot per topology)"
    )
    test.add_argument(
        "--topology",
        action="append",
        metavar="NAME|FILE",
        help="topology to test (repeatable; default: every built-in one)",
    )
    test.add_argument("--timeout", type=float, default=TEST_TIMEOUT, help="seconds per topology")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="-- PYTEST_ARGS")
    test.set_defaults(handler=_test)

    shell = labsub.add_parser(
        "shell",
        help="boot L1 and give this terminal a root shell in it (exit ends the VM)",
        description=(
            "Boot L1 with a topology and open an interactive root shell on its console, in "
            "the checkout (kvmvfio is on PATH). With --libvirt, libvirtd runs there already "
            "(no systemd in L1: `python3 -m kvmvfio.lab.libvirtd restart` restarts it). "
            "`exit` powers L1 off."
        ),
    )
    _common(shell)
    shell.add_argument("--libvirt", action="store_true", help="start libvirtd in L1 first")
    shell.set_defaults(handler=_shell)

    demo = labsub.add_parser(
        "demo", help="boot the default topology and show what kvmvfio does, step by step"
    )
    demo.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds before the VM is stopped"
    )
    demo.set_defaults(handler=_demo)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--topology",
        default="default",
        metavar="NAME|FILE",
        help="built-in topology name or a .toml file",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds before the VM is stopped"
    )


def _strip_dashes(items: list[str]) -> list[str]:
    return items[1:] if items and items[0] == "--" else items


def _build(args: argparse.Namespace) -> int:
    images = ImageBuilder().ensure(rebuild=args.rebuild)
    print(f"kernel: {images.kernel}\nrootfs: {images.rootfs}\nqemu:   {images.qemu}")
    return 0


def _topologies(args: argparse.Namespace) -> int:
    for name in topo_mod.builtin_names():
        print(f"{name:14} {topo_mod.load(name).description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    cmd = _strip_dashes(args.cmd)
    if not cmd:
        raise UsageError(
            "kvmvfio lab run needs a command after --, e.g. `kvmvfio lab run -- kvmvfio inventory`"
        )
    topology = topo_mod.load(args.topology)
    builder = ImageBuilder()
    images = builder.ensure()
    run = LabRun(
        topology=topology,
        images=images,
        checkout=builder.checkout,
        command=tuple(cmd),
        timeout=args.timeout,
    )
    return asyncio.run(run_in_lab(run))


def _test(args: argparse.Namespace) -> int:
    names = args.topology or topo_mod.builtin_names()
    topologies = [topo_mod.load(n) for n in names]
    builder = ImageBuilder()
    images = builder.ensure()
    results = asyncio.run(
        run_tier(
            topologies, images, builder.checkout, _strip_dashes(args.pytest_args), args.timeout
        )
    )
    for r in results:
        state = "ok" if r.ok else "FAILED"
        print(
            f"lab: topology {r.topology}: {state} ({r.passed} passed, {r.failed} failed, "
            f"{r.errors} errors, {r.skipped} skipped)",
            file=sys.stderr,
        )
    print(summary(results), flush=True)
    return 0 if all(r.ok for r in results) else 1


#: The guest side of ``kvmvfio lab shell``: the console becomes the shell's
#: controlling terminal (init gave the job /dev/null and a plain console).
_SHELL = (
    "{libvirt}"
    "exec </dev/hvc0 >/dev/hvc0 2>&1; stty sane; "
    "echo 'kvmvfio lab shell: L1 on topology {topology}; exit (or Ctrl-D) powers it off'; "
    "exec setsid -c bash -i"
)


def _shell(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty():
        raise UsageError("kvmvfio lab shell needs a terminal; use `kvmvfio lab run -- CMD`")
    topology = topo_mod.load(args.topology)
    builder = ImageBuilder()
    images = builder.ensure()
    libvirt = "python3 -m kvmvfio.lab.libvirtd start && " if args.libvirt else ""
    script = _SHELL.format(libvirt=libvirt, topology=topology.name)
    run = LabRun(
        topology=topology,
        images=images,
        checkout=builder.checkout,
        command=("sh", "-c", script),
        timeout=args.timeout,
        interactive=True,
    )
    saved = termios.tcgetattr(sys.stdin.fileno())
    try:
        return asyncio.run(run_in_lab(run))
    finally:  # QEMU leaves the terminal raw if it is killed
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def _demo(args: argparse.Namespace) -> int:
    topology = topo_mod.load("default")
    builder = ImageBuilder()
    images = builder.ensure()
    run = LabRun(
        topology=topology,
        images=images,
        checkout=builder.checkout,
        command=("python3", "-m", "kvmvfio.lab.demo"),
        timeout=args.timeout,
    )
    return asyncio.run(run_in_lab(run))
