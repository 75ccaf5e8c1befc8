"""``kvmvfio reset ADDR...``: a PCI hot reset of the slot or bus the devices are on.

The devices must be on vfio-pci already (``kvmvfio prepare`` moves them),
and every function the reset reaches must be named: kvmvfio asks the
kernel first and refuses, naming each function in the way, before
anything is reset. ``--info`` only asks.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from kvmvfio.cli.args import PATHS, existing_dir, vfio_path
from kvmvfio.cli.check_cmds import error_json
from kvmvfio.errors import KvmvfioError
from kvmvfio.host import Host
from kvmvfio.vfio.policy import VfioPath

if TYPE_CHECKING:
    from kvmvfio.vfio.device import DependentDevice, HotResetInfo
    from kvmvfio.vfio.reset import HotResetReport

SCHEMA = 1

JsonObject = dict[str, object]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reset`` to the top-level subparsers."""
    reset = sub.add_parser(
        "reset",
        help="hot-reset the PCI slot or bus of devices on vfio-pci (or, with --info, list it)",
        description=(
            "Reset the slot or the bus the PCI functions at ADDR... are on "
            "(VFIO_DEVICE_PCI_HOT_RESET). Such a reset reaches every function there, so each "
            "must be on vfio-pci, free, and named here; kvmvfio asks the kernel which they are "
            "and refuses before resetting anything otherwise. A device on a root bus has no "
            "such reset. Exit status: 0 when reset (or, with --info, listed), 1 when refused, "
            "2 for bad arguments."
        ),
    )
    reset.add_argument("addresses", nargs="+", metavar="ADDR", help="PCI address (03:00.0)")
    reset.add_argument(
        "--path",
        type=vfio_path,
        choices=PATHS,
        default=VfioPath.AUTO.value,
        help="which of the kernel's ways to open the devices (default: auto, cdev + iommufd "
        "where present)",
    )
    reset.add_argument(
        "--info",
        action="store_true",
        help="only list the functions a hot reset would reach; reset nothing",
    )
    reset.add_argument("--json", action="store_true", help="print JSON (docs/cli-json.md)")
    reset.add_argument("--sysfs-root", default="/sys", type=existing_dir, help=argparse.SUPPRESS)
    reset.add_argument("--dev-root", default="/dev", type=existing_dir, help=argparse.SUPPRESS)
    reset.set_defaults(handler=_reset)


def _device_json(dev: DependentDevice) -> JsonObject:
    return {"address": str(dev.address), "group": dev.group, "devid": dev.devid, "owned": dev.owned}


def info_json(info: HotResetInfo) -> JsonObject:
    """One slot or bus: the device asked through and the functions it reaches."""
    return {
        "through": info.address,
        "by_devid": info.by_devid,
        "devices": [_device_json(d) for d in info.devices],
    }


def report_json(report: HotResetReport) -> JsonObject:
    """The ``reset --json`` document (``--info``: ``reset`` is false)."""
    return {
        "schema": SCHEMA,
        "ok": True,
        "path": report.path.value,
        "reset": report.done,
        "resets": [info_json(i) for i in report.resets],
    }


def _where(dev: DependentDevice) -> str:
    if dev.group is not None:
        return f"IOMMU group {dev.group}"
    if dev.devid is not None:
        return f"devid {dev.devid}"
    return "owned" if dev.owned else "not owned by this iommufd"


def render(report: HotResetReport) -> str:
    """The human report: per slot or bus, the functions it reaches."""
    lines = [f"path:       {report.path.value}"]
    for info in report.resets:
        what = "reset" if report.done else "would reset"
        lines.append(f"{what} through {info.address} (its slot or bus):")
        lines.extend(f"  {d.address} ({_where(d)})" for d in info.devices)
    lines.append("released:   every file closed" + ("" if report.done else "; nothing was reset"))
    return "\n".join(lines)


def _reset(args: argparse.Namespace) -> int:
    from kvmvfio.vfio.reset import hot_reset, hot_reset_info  # noqa: PLC0415 (on use)

    host = Host(args.sysfs_root, args.dev_root)
    try:
        act = hot_reset_info if args.info else hot_reset
        report = act(args.addresses, path=args.path, host=host)
    except KvmvfioError as err:
        if args.json:
            json.dump(error_json(err), sys.stdout, indent=2)
            sys.stdout.write("\n")
        raise
    if args.json:
        json.dump(report_json(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(report))
    return 0
