"""``kvmvfio agent``: hand devices to libvirt domains by fd, following libvirt's events.

See :mod:`kvmvfio.libvirt.agent`. ``--unit`` prints a systemd unit for it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import kvmvfio
from kvmvfio.cli.args import path_text
from kvmvfio.cli.qemu_cmds import positive_seconds_arg, seconds_arg
from kvmvfio.prepare.journal import DEFAULT_ROOT


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``agent``."""
    p = sub.add_parser(
        "agent",
        help="follow libvirt domains and hand their handoff='agent' devices to QEMU by fd",
        description=(
            "Run until stopped: for every running libvirt domain whose kvmvfio metadata lists "
            "devices with handoff='agent', prepare them, check them and hand them to the "
            "domain's QEMU by file descriptor through libvirt (iommufd); unplug and release "
            "a device taken out of the live metadata, and release a stopped domain's "
            "devices. Restarting the agent or libvirtd loses nothing."
        ),
    )
    p.add_argument("--uri", default="qemu:///system", help="libvirt URI (default qemu:///system)")
    p.add_argument(
        "--resync",
        type=positive_seconds_arg,
        default=60.0,
        metavar="S",
        help="reconcile every domain every S seconds besides events (default 60)",
    )
    p.add_argument(
        "--detach-timeout",
        type=seconds_arg,
        default=60.0,
        metavar="S",
        help="seconds a guest has to let go of a device (default 60)",
    )
    p.add_argument("--unit", action="store_true", help="print a systemd unit for the agent")
    p.add_argument("--root", default=str(DEFAULT_ROOT), type=path_text, help=argparse.SUPPRESS)
    p.set_defaults(handler=_agent)


def _agent(args: argparse.Namespace) -> int:
    from kvmvfio.libvirt.agent import Agent  # noqa: PLC0415 (imported on use)

    if args.unit:
        sys.stdout.write(_unit())
        return 0
    agent = Agent(args.uri, root=args.root, resync=args.resync, detach_timeout=args.detach_timeout)
    # Decisions are the agent's output: log them even without -v.
    logging.getLogger("kvmvfio").setLevel(logging.INFO)
    asyncio.run(agent.run())
    return 0


def _unit() -> str:
    """Return the agent's unit for this interpreter, checked as systemd will run it.

    systemd starts the unit without ``PYTHONPATH``: when this interpreter does
    not import this kvmvfio so (it runs from a checkout by ``PYTHONPATH``),
    the unit sets it. Warns when the kvmvfio pinned is a source checkout.
    """
    from kvmvfio.libvirt.agent import unit_text  # noqa: PLC0415 (imported on use)
    from kvmvfio.libvirt.install import (  # noqa: PLC0415 (imported on use)
        checkout_warning,
        default_pythonpath,
        is_source_checkout,
        probe,
    )

    folder = default_pythonpath()
    python = sys.executable
    who, what = "the agent's interpreter", "kvmvfio"
    found = probe(python, None, ("kvmvfio",), who=who, what=what)
    pythonpath = None
    if os.path.realpath(found.package_dir) != os.path.realpath(folder):
        pythonpath = folder
        found = probe(python, folder, ("kvmvfio",), who=who, what=what)
    if is_source_checkout(found.package_dir):
        print(
            f"kvmvfio: warning: {checkout_warning(found.package_dir, 'the unit')}", file=sys.stderr
        )
    about = (
        f"kvmvfio {kvmvfio.__version__} from {found.package_dir}, "
        f"Python {found.python_version}: checked by `kvmvfio agent --unit`"
    )
    return unit_text(python, pythonpath, about)
