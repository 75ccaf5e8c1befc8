"""``kvmvfio attach`` and ``kvmvfio detach``: devices in and out of a running QEMU.

Both talk to QEMU over its QMP socket, after checking that the socket's
peer is the QEMU the user named (``--pid`` or ``--pidfile``), or to a
libvirt domain's QEMU through libvirt (``--domain``, by fd on the iommufd
path); see :mod:`kvmvfio.qemu.handoff` for what crosses the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from kvmvfio.cli.args import PATHS, device_file, vfio_path
from kvmvfio.errors import UsageError
from kvmvfio.host import Host
from kvmvfio.host.mdev import canonical_name
from kvmvfio.qemu.deadline import parse_seconds
from kvmvfio.vfio.policy import Coherency, VfioPath

if TYPE_CHECKING:
    from kvmvfio.qemu.handoff import Attachment
    from kvmvfio.qemu.qmp import Monitor

SCHEMA = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``attach`` and ``detach`` to the top-level subparsers."""
    att = sub.add_parser(
        "attach",
        help="hand devices to a running QEMU over QMP (by fd: QEMU needs no /dev/vfio access)",
        description=(
            "Check the devices (on vfio-pci, viable group, coherency policy), make sure QEMU "
            "may lock its RAM, find a free hotpluggable port per device, and hand the devices "
            "to QEMU: by file descriptor on the iommufd path, or by granting QEMU's uid access "
            "to the group node on the legacy path. Exit status: 0 attached, 1 refused, 2 bad "
            "arguments."
        ),
    )
    _common(att)
    att.add_argument(
        "--path",
        type=vfio_path,
        choices=PATHS,
        default=VfioPath.AUTO.value,
        help=(
            "cdev (by fd: QEMU opens nothing), group (host= with an ACL grant on the group "
            "node), or auto (default: cdev where QEMU and the kernel have it); group-iommufd "
            "is for kvmvfio's own sessions"
        ),
    )
    att.add_argument(
        "--bus",
        action="append",
        metavar="PORT",
        help="QEMU id of the port to plug into, once per device (default: free root ports)",
    )
    att.add_argument(
        "--coherency",
        choices=[c.value for c in Coherency],
        default=Coherency.WARN.value,
        help="what to do when the IOMMU does not enforce DMA cache coherency (default: warn)",
    )
    att.add_argument(
        "--vf-token",
        metavar="UUID",
        help="the VF token, for a VF whose PF is on vfio-pci (docs/sriov.md)",
    )
    att.add_argument(
        "--romfile",
        action="append",
        type=device_file,
        metavar="ADDR=FILE",
        help=(
            "give the device at ADDR this option ROM instead of its own (QEMU's romfile=), "
            "checked first to be a ROM for that device; QEMU reads the file itself"
        ),
    )
    att.add_argument(
        "--no-rombar",
        action="append",
        metavar="ADDR",
        help="show the device at ADDR to the guest without its ROM BAR (QEMU's rombar=0)",
    )
    att.add_argument(
        "--no-raise-memlock",
        action="store_true",
        help="refuse instead of raising QEMU's RLIMIT_MEMLOCK when it is too low",
    )
    att.set_defaults(handler=_attach)

    det = sub.add_parser(
        "detach",
        help="take devices kvmvfio attached back from a running QEMU",
        description=(
            "Ask QEMU to unplug each device (device_del), wait for the guest to release it "
            "(DEVICE_DELETED), then revoke what kvmvfio granted. A guest that does not answer "
            "in time gets a clear error and the device stays attached."
        ),
    )
    _common(det)
    det.add_argument(
        "--timeout",
        type=seconds_arg,
        default=30.0,
        metavar="S",
        help="seconds to wait for the guest (default 30; at most a week)",
    )
    det.set_defaults(handler=_detach)


def seconds_arg(text: str, *, positive: bool = False) -> float:
    """An argparse ``type`` for a number of seconds: finite, not negative, at most a week.

    ``nan``, ``inf``, ``1e400`` and ``-1`` are refused (exit 2) with a sentence.
    """
    try:
        return parse_seconds(text, "the value", positive=positive)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_seconds_arg(text: str) -> float:
    """:func:`seconds_arg`, and more than 0 (a period to repeat something at)."""
    return seconds_arg(text, positive=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "addresses", nargs="+", metavar="ADDR", help="PCI address (03:00.0) or mdev UUID"
    )
    parser.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP UNIX socket")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--pid", type=int, help="QEMU's pid: the socket's peer must be this process")
    who.add_argument("--pidfile", help="QEMU's -pidfile, instead of --pid")
    parser.add_argument(
        "--domain",
        metavar="NAME",
        help="a running libvirt domain, reached through libvirt (instead of --qmp and --pid)",
    )
    parser.add_argument(
        "--uri", default="qemu:///system", help="libvirt URI for --domain (default qemu:///system)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (docs/cli-json.md)")
    parser.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    parser.add_argument("--dev-root", default="/dev", help=argparse.SUPPRESS)


@contextlib.asynccontextmanager
async def _monitor(args: argparse.Namespace) -> AsyncIterator[Monitor]:
    """QEMU's monitor as the arguments name it: a QMP socket and its pid, or a libvirt domain.

    Every argument is checked before QEMU (or libvirt) is contacted.
    """
    args.addresses = [canonical_name(a) for a in args.addresses]
    if args.domain is not None:
        if args.qmp or args.pid is not None or args.pidfile:
            raise UsageError(
                "--domain reaches QEMU through libvirt: give no --qmp, --pid or --pidfile"
            )
        if getattr(args, "path", VfioPath.CDEV.value) not in (VfioPath.AUTO, VfioPath.CDEV):
            raise UsageError(
                f"--path {args.path} cannot go through libvirt (domain {args.domain!r}): QEMU "
                "would have to open /dev/vfio itself; give the domain a <hostdev managed='no'> "
                "instead"
            )
        args.path = VfioPath.CDEV.value
        from kvmvfio.libvirt.monitor import DomainMonitor, open_domain  # noqa: PLC0415

        with open_domain(args.uri, args.domain) as dom:
            async with DomainMonitor(dom) as monitor:
                yield monitor
        return
    if not args.qmp or (args.pid is None and not args.pidfile):
        raise UsageError("say which QEMU: --qmp SOCKET with --pid or --pidfile, or --domain NAME")
    from kvmvfio.qemu.qmp import Qemu, read_pidfile  # noqa: PLC0415 (imported on use)

    pid = int(args.pid) if args.pid is not None else read_pidfile(args.pidfile)
    async with Qemu(args.qmp, pid=pid) as qemu:
        yield qemu


#: ``attach --json``'s "path" keeps the spelling it had before ``vfio_path`` came.
_OLD_JSON_PATH = {VfioPath.CDEV: "iommufd", VfioPath.GROUP: "legacy"}


def attachment_json(a: Attachment) -> dict[str, object]:
    """One attached device as ``attach --json`` prints it."""
    return {
        "address": a.address,
        "qdev_id": a.qdev_id,
        "bus": a.bus,
        "path": _OLD_JSON_PATH[a.path],
        "vfio_path": a.path.value,
        "group": a.group,
        "coherent": a.coherent,
        "unsafe": list(a.unsafe),
    }


def _attach(args: argparse.Namespace) -> int:
    from kvmvfio.qemu import attach  # noqa: PLC0415 (imported on use)

    host = Host(args.sysfs_root, args.dev_root)

    async def run() -> tuple[int, list[Attachment]]:
        async with _monitor(args) as qemu:
            done = await attach(
                qemu,
                args.addresses,
                path=args.path,
                coherency=args.coherency,
                buses=args.bus,
                raise_memlock=not args.no_raise_memlock,
                vf_token=args.vf_token,
                host=host,
                romfiles=dict(args.romfile or []),
                no_rombar=args.no_rombar,
            )
            return qemu.pid, done

    pid, done = asyncio.run(run())
    if args.json:
        doc = {"schema": SCHEMA, "qemu_pid": pid, "attached": [attachment_json(a) for a in done]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for a in done:
        how = "by fd, QEMU opened nothing" if a.path is VfioPath.CDEV else "group ACL"
        print(f"attached {a.address} to QEMU pid {pid} as {a.qdev_id} on {a.bus} ({how})")
        for note in a.unsafe:
            print(f"  warning: {note}")
    return 0


def _detach(args: argparse.Namespace) -> int:
    from kvmvfio.qemu import detach  # noqa: PLC0415 (imported on use)

    host = Host(args.sysfs_root, args.dev_root)

    async def run() -> tuple[int, list[str]]:
        async with _monitor(args) as qemu:
            return qemu.pid, await detach(qemu, args.addresses, timeout=args.timeout, host=host)

    pid, gone = asyncio.run(run())
    if args.json:
        doc = {"schema": SCHEMA, "qemu_pid": pid, "detached": gone}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for ident in gone:
        print(f"detached {ident} from QEMU pid {pid}")
    return 0
