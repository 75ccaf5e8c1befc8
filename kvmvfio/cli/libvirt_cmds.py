"""``kvmvfio agent``: hand devices to libvirt domains by fd, following libvirt's events.

See :mod:`kvmvfio.libvirt.agent`. ``--unit`` prints a systemd unit for it;
``agent status`` shows what a running agent last did
(:mod:`kvmvfio.libvirt.status`). :func:`checked_unit` also serves
``kvmvfio recover --unit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import kvmvfio
from kvmvfio.cli.args import path_text
from kvmvfio.cli.qemu_cmds import positive_seconds_arg, seconds_arg
from kvmvfio.errors import shown
from kvmvfio.prepare.journal import DEFAULT_ROOT

if TYPE_CHECKING:
    from kvmvfio.libvirt.status import AgentReport, AgentStatus, Refusal

#: The exit status of `agent status` when no agent runs (0: one runs; 1: its file is bad).
NOT_RUNNING = 3


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
    sub_agent = p.add_subparsers(dest="agent_command", metavar="[status]", parser_class=type(p))
    st = sub_agent.add_parser(
        "status",
        help="what the running agent last did with each domain's devices",
        description=(
            "Show the running agent's status file (/run/kvmvfio/status/agent.json): each "
            "domain's devices, whether QEMU holds them, what the agent last did with them and "
            "any refusal waiting for a retry. Exit status 0 when the agent runs, "
            f"{NOT_RUNNING} when none does (no status file, or its writer is gone), 1 when "
            "the file is not one the agent writes."
        ),
    )
    st.add_argument("--json", action="store_true", help="print JSON (docs/cli-json.md)")
    st.add_argument("--root", default=str(DEFAULT_ROOT), type=path_text, help=argparse.SUPPRESS)
    st.add_argument("--proc-root", default="/proc", type=path_text, help=argparse.SUPPRESS)
    st.set_defaults(handler=_status)


def _agent(args: argparse.Namespace) -> int:
    from kvmvfio.libvirt.agent import Agent  # noqa: PLC0415 (imported on use)

    if args.unit:
        from kvmvfio.libvirt.units import AGENT  # noqa: PLC0415 (imported on use)

        sys.stdout.write(checked_unit(AGENT))
        return 0
    agent = Agent(args.uri, root=args.root, resync=args.resync, detach_timeout=args.detach_timeout)
    # Decisions are the agent's output: log them even without -v.
    logging.getLogger("kvmvfio").setLevel(logging.INFO)
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(_until_sigterm(agent.run()))
    return 0


async def _until_sigterm(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work``, cancelled by SIGTERM (systemd's stop), so that its cleanup runs."""
    task = asyncio.ensure_future(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await task


def checked_unit(kind: str) -> str:
    """Return unit ``kind`` (``agent``, ``recover``) for this interpreter, checked as systemd would.

    systemd starts the unit without ``PYTHONPATH``: when this interpreter does
    not import this kvmvfio so (it runs from a checkout by ``PYTHONPATH``),
    the unit sets it. Warns when the kvmvfio pinned is a source checkout.
    """
    from kvmvfio.libvirt.install import (  # noqa: PLC0415 (imported on use)
        checkout_warning,
        default_pythonpath,
        is_source_checkout,
        probe,
    )
    from kvmvfio.libvirt.units import unit_text  # noqa: PLC0415

    folder = default_pythonpath()
    python = sys.executable
    who, what = f"the {kind} unit's interpreter", "kvmvfio"
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
        f"Python {found.python_version}: checked by `kvmvfio {kind} --unit`"
    )
    return unit_text(kind, python, pythonpath, about)


# -- agent status ----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from kvmvfio.libvirt.status import agent_report  # noqa: PLC0415 (imported on use)

    report = agent_report(args.root, proc=args.proc_root)
    if args.json:
        doc = {
            "schema": 1,
            "running": report.running,
            "why": report.why,
            "file": str(report.path),
            "agent": None if report.status is None else _agent_doc(report.status),
        }
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(status_text(report))
    return 0 if report.running else NOT_RUNNING


def _agent_doc(status: AgentStatus) -> dict[str, object]:
    doc = status.to_json()
    del doc["schema"]
    return doc


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _refusal_line(subject: str, r: Refusal) -> str:
    return (
        f"  {subject}: {shown(r.message)} ({shown(r.error, 64)}, {_when(r.at)}; "
        f"tried again by {_when(r.retry_at)})"
    )


def status_text(report: AgentReport) -> str:
    """``agent status`` for people: who runs, a table of devices, the refusals waiting."""
    st = report.status
    if st is None:
        return f"agent not running: {report.why}\n"
    link = "connected to" if st.connected else "not connected to"
    head = (
        f"agent running: pid {st.pid} since {_when(st.started)}, {link} {shown(st.uri, 200)}; "
        f"status of {_when(st.updated)}, resync every {st.resync:g} s"
        if report.running
        else f"agent not running: {report.why}; its last status, of {_when(st.updated)}, was:"
    )
    rows = [("DOMAIN", "STATE", "DEVICE", "HANDOFF", "PATH", "QEMU", "LAST ACTION")]
    refusals: list[str] = []
    for dom in st.domains:
        name = shown(dom.name, 64)
        state = "running" if dom.running else "stopped"
        if dom.refusal is not None:
            refusals.append(_refusal_line(name, dom.refusal))
        if not dom.devices:
            rows.append((name, state, "-", "-", "-", "-", "-"))
        for d in dom.devices:
            held = "holds" if d.held else "-"
            wanted = "" if d.wanted else " (not wanted)"
            action = f"{d.action.value} {_when(d.at)}{wanted}"
            rows.append(
                (name, state, d.address, shown(d.handoff, 16), shown(d.path, 16), held, action)
            )
            if d.refusal is not None:
                refusals.append(_refusal_line(f"{name} {d.address}", d.refusal))
    lines = [head]
    if len(rows) == 1:
        lines.append("no domain has asked the agent for a device")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
            lines.append("  ".join([*cells, row[-1]]))
    if refusals:
        lines += ["refusals waiting for a retry:", *refusals]
    return "\n".join(lines) + "\n"
