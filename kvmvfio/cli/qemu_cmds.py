"""``kvmvfio attach`` and ``kvmvfio detach``: devices in and out of a running QEMU.

Both talk to QEMU over its QMP socket, after checking that the socket's
peer is the QEMU the user named (``--pid`` or ``--pidfile``); see
:mod:`kvmvfio.qemu.handoff` for what crosses the socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING

from kvmvfio.host import Host, PciAddress
from kvmvfio.qemu.paths import HandoffPath
from kvmvfio.vfio.policy import Coherency

if TYPE_CHECKING:
    from kvmvfio.qemu.handoff import Attachment

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
        choices=[p.value for p in HandoffPath],
        default=HandoffPath.AUTO.value,
        help="iommufd (fds), legacy (host= with an ACL grant), or auto (default)",
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
        "--timeout", type=float, default=30.0, help="seconds to wait for the guest (default 30)"
    )
    det.set_defaults(handler=_detach)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("addresses", nargs="+", metavar="ADDR", help="PCI address, e.g. 03:00.0")
    parser.add_argument("--qmp", required=True, metavar="SOCKET", help="QEMU's QMP UNIX socket")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--pid", type=int, help="QEMU's pid: the socket's peer must be this process")
    who.add_argument("--pidfile", help="QEMU's -pidfile, instead of --pid")
    parser.add_argument("--json", action="store_true", help="print JSON (docs/cli-json.md)")
    parser.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    parser.add_argument("--dev-root", default="/dev", help=argparse.SUPPRESS)


def _pid(args: argparse.Namespace) -> int:
    from kvmvfio.qemu.qmp import read_pidfile  # noqa: PLC0415 (imported on use)

    # Every argument is checked before QEMU is contacted.
    args.addresses = [str(PciAddress.parse(a)) for a in args.addresses]
    return int(args.pid) if args.pid is not None else read_pidfile(args.pidfile)


def attachment_json(a: Attachment) -> dict[str, object]:
    """One attached device as ``attach --json`` prints it."""
    return {
        "address": a.address,
        "qdev_id": a.qdev_id,
        "bus": a.bus,
        "path": a.path.value,
        "group": a.group,
        "coherent": a.coherent,
        "unsafe": list(a.unsafe),
    }


def _attach(args: argparse.Namespace) -> int:
    from kvmvfio.qemu import Qemu, attach  # noqa: PLC0415 (imported on use)

    host = Host(args.sysfs_root, args.dev_root)
    pid = _pid(args)

    async def run() -> list[Attachment]:
        async with Qemu(args.qmp, pid=pid) as qemu:
            return await attach(
                qemu,
                args.addresses,
                path=args.path,
                coherency=args.coherency,
                buses=args.bus,
                raise_memlock=not args.no_raise_memlock,
                host=host,
            )

    done = asyncio.run(run())
    if args.json:
        doc = {"schema": SCHEMA, "qemu_pid": pid, "attached": [attachment_json(a) for a in done]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for a in done:
        how = "by fd, QEMU opened nothing" if a.path is HandoffPath.IOMMUFD else "group ACL"
        print(f"attached {a.address} to QEMU pid {pid} as {a.qdev_id} on {a.bus} ({how})")
        for note in a.unsafe:
            print(f"  warning: {note}")
    return 0


def _detach(args: argparse.Namespace) -> int:
    from kvmvfio.qemu import Qemu, detach  # noqa: PLC0415 (imported on use)

    host = Host(args.sysfs_root, args.dev_root)
    pid = _pid(args)

    async def run() -> list[str]:
        async with Qemu(args.qmp, pid=pid) as qemu:
            return await detach(qemu, args.addresses, timeout=args.timeout, host=host)

    gone = asyncio.run(run())
    if args.json:
        doc = {"schema": SCHEMA, "qemu_pid": pid, "detached": gone}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for ident in gone:
        print(f"detached {ident} from QEMU pid {pid}")
    return 0
