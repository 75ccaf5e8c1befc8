"""The ``kvmvfio`` command line.

Each command family lives in its own module with a ``register(subparsers)``
function; :func:`make_parser` collects them, so documentation and tests can
build the parser without running anything. :func:`run` is the one runner: it
prints a :class:`~kvmvfio.errors.KvmvfioError` as a sentence on stderr and
returns its exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from kvmvfio import __version__
from kvmvfio.errors import Interface, KvmvfioError, shown, speaking_to

#: What a command's handler returns: the process exit status.
Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        # argparse quotes the user's words (an unknown argument) raw: escape them.
        self.exit(2, f"kvmvfio: error: {shown(message, 4096)}\n")


def make_parser() -> argparse.ArgumentParser:
    """Build the full ``kvmvfio`` argument parser."""
    from kvmvfio.cli import (  # noqa: PLC0415 (cli/__init__ is imported by them)
        check_cmds,
        doctor_cmds,
        hook_cmds,
        host_cmds,
        lab_cmds,
        libvirt_cmds,
        mdev_cmds,
        prepare_cmds,
        qemu_cmds,
        reset_cmds,
        sriov_cmds,
    )

    parser = _Parser(
        prog="kvmvfio",
        description="Hand PCI devices to QEMU/KVM virtual machines through Linux VFIO.",
    )
    parser.add_argument("--version", action="version", version=f"kvmvfio {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each decision to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for module in (
        host_cmds,
        doctor_cmds,
        prepare_cmds,
        sriov_cmds,
        mdev_cmds,
        check_cmds,
        reset_cmds,
        qemu_cmds,
        hook_cmds,
        libvirt_cmds,
        lab_cmds,
    ):
        module.register(sub)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, and return the exit status."""
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="kvmvfio: %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        with speaking_to(Interface.CLI):
            return handler(args)
    except KvmvfioError as err:
        print(f"kvmvfio: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kvmvfio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
