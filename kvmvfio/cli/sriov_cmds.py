"""``kvmvfio sriov show|set|reset``: a PF's virtual functions, made and given back.

See :mod:`kvmvfio.prepare.sriov`. ``set`` records the PF's count and
autoprobe before it changes them (``/run/kvmvfio/sriov``), so ``reset`` and
``kvmvfio recover`` put them back.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from kvmvfio.cli.prepare_cmds import common_args, print_doc
from kvmvfio.errors import UsageError, shown
from kvmvfio.host import Host, PciAddress

if TYPE_CHECKING:
    from kvmvfio.prepare.sriov import VfChange


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sriov`` and its subcommands to the top-level subparsers."""
    top = sub.add_parser(
        "sriov",
        help="SR-IOV: a PF's virtual functions, made for VMs and given back (journaled)",
        description=(
            "Show, set or reset the VF count of an SR-IOV physical function. 'set' records "
            "what the PF had first, so 'reset' and 'kvmvfio recover' put it back; VFs in use "
            "(on vfio-pci, claimed, or open) are never removed. Exit status: 0 done, 1 refused, "
            "2 bad arguments."
        ),
    )
    cmds = top.add_subparsers(dest="sriov_command", metavar="SUBCOMMAND", required=True)

    show = cmds.add_parser("show", help="the PF's VFs: count, total, autoprobe, each VF's driver")
    show.add_argument("pf", metavar="PF", help="PCI address of the physical function")
    common_args(show, addresses=False)
    show.set_defaults(handler=_show)

    st = cmds.add_parser(
        "set",
        help="give the PF N VFs for an owner (autoprobe off: no host driver takes them)",
    )
    st.add_argument("pf", metavar="PF", help="PCI address of the physical function")
    st.add_argument("count", metavar="N", help="how many VFs (0 removes them)")
    st.add_argument("--owner", required=True, help="who the VFs are for (a VM name, a token)")
    st.add_argument("--owner-pid", type=int, help="the owner's process, to detect stale records")
    st.add_argument(
        "--host-drivers",
        action="store_true",
        help="let the PF's VF driver take the new VFs (sriov_drivers_autoprobe=1)",
    )
    common_args(st, addresses=False)
    st.set_defaults(handler=_set)

    rs = cmds.add_parser("reset", help="put back the VF count the PF had before OWNER's set")
    rs.add_argument("pf", metavar="PF", help="PCI address of the physical function")
    rs.add_argument("--owner", required=True, help="the owner that set it")
    common_args(rs, addresses=False)
    rs.set_defaults(handler=_reset)


def vf_count(text: str) -> int:
    """A VF count as typed: decimal digits only (no sign, no 0x, no 1e3)."""
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise UsageError(f"a VF count is a whole number from 0 to 65535, not {shown(text, 40)!r}")
    return int(text)


def _host(args: argparse.Namespace) -> Host:
    return Host(args.sysfs_root, args.dev_root)


def _show(args: argparse.Namespace) -> int:
    from kvmvfio.prepare import sriov  # noqa: PLC0415 (imported on use)

    host = _host(args)
    pf = sriov.physical_function(host, str(PciAddress.parse(args.pf)))
    from kvmvfio.prepare.driver import Sysfs  # noqa: PLC0415

    probing = sriov.autoprobe(Sysfs(host.sysfs), str(pf.address))
    vfs: list[dict[str, object]] = []
    for index, addr in enumerate(pf.virtfns):
        dev = host.device(str(addr))
        vfs.append(
            {"address": str(addr), "index": index, "driver": dev.driver, "group": dev.iommu_group}
        )
    record = next((r for r in sriov.records(Path(args.root)) if r.pf == str(pf.address)), None)
    if args.json:
        print_doc(
            {
                "pf": str(pf.address),
                "driver": pf.driver,
                "numvfs": pf.sriov_numvfs,
                "totalvfs": pf.sriov_totalvfs,
                "autoprobe": probing,
                "vfs": vfs,
                "record": None if record is None else asdict(record),
            }
        )
        return 0
    print(
        f"PF {pf.address} ({pf.driver or 'no driver'}): {pf.sriov_numvfs} of "
        f"{pf.sriov_totalvfs} VFs, autoprobe {'on' if probing else 'off'}"
    )
    for item in vfs:
        print(f"  VF {item['index']}: {item['address']} ({item['driver'] or 'no driver'}), "
              f"IOMMU group {item['group']}")  # fmt: skip
    if record is not None:
        print(
            f"  set for {shown(record.owner)}: had {record.before} VFs, autoprobe "
            f"{'on' if record.autoprobe_before else 'off'} (kvmvfio sriov reset puts that back)"
        )
    return 0


def _change_doc(change: VfChange) -> dict[str, object]:
    return asdict(change)


def _set(args: argparse.Namespace) -> int:
    from kvmvfio.prepare import sriov  # noqa: PLC0415 (imported on use)

    count = vf_count(args.count)
    done = sriov.set_vfs(
        str(PciAddress.parse(args.pf)),
        count,
        args.owner,
        owner_pid=args.owner_pid,
        host_drivers=args.host_drivers,
        host=_host(args),
        root=Path(args.root),
    )
    if args.json:
        print_doc({"set": _change_doc(done)})
        return 0
    vfs = ", ".join(done.vfs) or "none"
    print(f"PF {done.pf}: {done.after} VFs (had {done.before}) for {shown(args.owner)}; VFs: {vfs}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    from kvmvfio.prepare import sriov  # noqa: PLC0415 (imported on use)

    done = sriov.reset_vfs(
        str(PciAddress.parse(args.pf)), args.owner, host=_host(args), root=Path(args.root)
    )
    if args.json:
        print_doc({"reset": None if done is None else _change_doc(done)})
        return 0
    if done is None:
        print(f"PF {PciAddress.parse(args.pf)}: kvmvfio changed nothing there")
    else:
        print(f"PF {done.pf}: {done.after} VFs again (had {done.before})")
    return 0
