"""``kvmvfio prepare|release|recover|status``: host devices to vfio-pci and back.

See :mod:`kvmvfio.prepare`. Every change is journaled under ``/run/kvmvfio``
first, so ``kvmvfio recover`` can undo what a crashed kvmvfio left.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from kvmvfio.cli.args import existing_dir, path_text
from kvmvfio.errors import shown
from kvmvfio.host import Host, PciAddress
from kvmvfio.prepare import (
    GroupStatus,
    Prepared,
    Restored,
    prepare,
    recover,
    release,
    safety,
    status,
)
from kvmvfio.prepare.journal import DEFAULT_ROOT

SCHEMA = 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``prepare``, ``release``, ``recover`` and ``status``."""
    p = sub.add_parser(
        "prepare",
        help="move devices (and the rest of their IOMMU groups) to vfio-pci, journaled",
        description=(
            "Move each device, and every other member of its IOMMU group that is not a bridge, "
            "to vfio-pci through driver_override, after safety checks; claim the groups for "
            "OWNER. Every change is journaled first; `kvmvfio release` or `kvmvfio recover` "
            "puts everything back."
        ),
    )
    common_args(p, addresses=True)
    p.add_argument("--owner", required=True, help="who claims the groups (a VM name, a token)")
    p.add_argument("--owner-pid", type=int, help="the owner's process, to detect stale claims")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        choices=(*safety.CHECKS, *safety.ALIASES),
        help=(
            "accept what a safety check found (repeatable; "
            + ", ".join(f"{old} is the old name of {new}" for old, new in safety.ALIASES.items())
            + ")"
        ),
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help=(
            "reset each device when it leaves vfio-pci again (journaled: every later "
            "release or recover does it)"
        ),
    )
    p.set_defaults(handler=_prepare)

    r = sub.add_parser("release", help="put prepared devices back on their original drivers")
    common_args(r, addresses=True)
    r.add_argument("--owner", help="refuse if another owner holds a group")
    r.add_argument("--reset", action="store_true", help="reset each device before it leaves")
    r.set_defaults(handler=_release)

    rc = sub.add_parser(
        "recover",
        help="restore what dead owners left moved; live claims are left alone and listed",
        description=(
            "Put back every group of the journal whose owner is gone (its process, its libvirt "
            "domain, and every process holding its VFIO files). Claims whose owner is alive are "
            "left alone and listed; a group that cannot be restored is reported and the others "
            "are still restored (exit status 1 then). The same for the mdevs kvmvfio made "
            "and the VF counts it set."
        ),
    )
    common_args(rc, addresses=False)
    rc.add_argument(
        "--mdevctl-root", default="/etc/mdevctl.d", type=path_text, help=argparse.SUPPRESS
    )
    rc.add_argument(
        "--unit",
        action="store_true",
        help="print a systemd unit that runs `kvmvfio recover` before libvirtd or virtqemud",
    )
    rc.set_defaults(handler=_recover)

    st = sub.add_parser("status", help="the groups kvmvfio holds and their owners")
    common_args(st, addresses=False)
    st.set_defaults(handler=_status)


def common_args(parser: argparse.ArgumentParser, *, addresses: bool) -> None:
    """The arguments of the commands that change the host: --json and the roots (hidden)."""
    if addresses:
        parser.add_argument("addresses", nargs="+", metavar="ADDR", help="PCI address")
    parser.add_argument("--json", action="store_true", help="print JSON (docs/cli-json.md)")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), type=path_text, help=argparse.SUPPRESS)
    parser.add_argument("--sysfs-root", default="/sys", type=existing_dir, help=argparse.SUPPRESS)
    parser.add_argument("--dev-root", default="/dev", type=existing_dir, help=argparse.SUPPRESS)


def print_doc(doc: dict[str, object]) -> None:
    """Print ``doc`` as the ``--json`` document of schema :data:`SCHEMA`."""
    json.dump({"schema": SCHEMA, **doc}, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _addrs(args: argparse.Namespace) -> list[str]:
    return [str(PciAddress.parse(a)) for a in args.addresses]


def _prepare(args: argparse.Namespace) -> int:
    host = Host(args.sysfs_root, args.dev_root)
    done: list[Prepared] = prepare(
        _addrs(args),
        args.owner,
        owner_pid=args.owner_pid,
        force=args.force,
        host=host,
        root=Path(args.root),
        reset=_addrs(args) if args.reset else (),
    )
    if args.json:
        print_doc({"prepared": [asdict(p) for p in done]})
        return 0
    for p in done:
        moved = ", ".join(f"{e.address} ({e.driver or 'no driver'})" for e in p.moved) or "none"
        print(f"IOMMU group {p.group}: on vfio-pci for {p.owner}; moved: {moved}")
        for note in p.accepted:
            print(f"  accepted: {note}")
    return 0


def _print_restored(restored: list[Restored], what: str) -> None:
    if not restored:
        print(f"{what}: nothing to do")
    for r in restored:
        extra = ", reset" if r.reset else ""
        print(f"{what}: {r.address} back on {r.driver or 'no driver'}{extra}")


def _release(args: argparse.Namespace) -> int:
    host = Host(args.sysfs_root, args.dev_root)
    done = release(_addrs(args), args.owner, reset=args.reset, host=host, root=Path(args.root))
    if args.json:
        print_doc({"released": [asdict(r) for r in done]})
    else:
        _print_restored(done, "release")
    return 0


def _recover(args: argparse.Namespace) -> int:
    from kvmvfio.prepare.mdev import recover_mdevs  # noqa: PLC0415 (imported on use)
    from kvmvfio.prepare.sriov import recover_vfs  # noqa: PLC0415

    if args.unit:
        from kvmvfio.cli.libvirt_cmds import checked_unit  # noqa: PLC0415 (imported on use)
        from kvmvfio.libvirt.units import RECOVER  # noqa: PLC0415

        sys.stdout.write(checked_unit(RECOVER))
        return 0
    host = Host(args.sysfs_root, args.dev_root)
    done = recover(host=host, root=Path(args.root))
    # mdevs after groups (a released group no longer holds its mdev) and before VFs
    # (an mdev's parent can be a VF: the VF count is put back once its mdevs are gone).
    mdevs = recover_mdevs(host=host, root=Path(args.root), mdevctl_root=Path(args.mdevctl_root))
    # VFs after groups: a VF given back from vfio-pci no longer keeps its count.
    vfs = recover_vfs(host=host, root=Path(args.root))
    if args.json:
        print_doc(
            {
                "recovered": [asdict(r) for r in done.restored],
                "skipped": [_status_doc(g) for g in done.skipped],
                "failed": [{"group": n, "message": m} for n, m in done.failed],
                "mdevs": {
                    "removed": [asdict(c) for c in mdevs.removed],
                    "skipped": [{"uuid": u, "why": w} for u, w in mdevs.skipped],
                    "failed": [{"uuid": u, "message": m} for u, m in mdevs.failed],
                },
                "vfs": {
                    "restored": [asdict(c) for c in vfs.restored],
                    "skipped": [{"pf": p, "why": w} for p, w in vfs.skipped],
                    "failed": [{"pf": p, "message": m} for p, m in vfs.failed],
                },
            }
        )
    else:
        _print_restored(list(done.restored), "recover")
        for g in done.skipped:
            print(f"recover: left IOMMU group {g.group} to {shown(g.owner)}: {g.why}")
        for number, message in done.failed:
            print(f"recover: IOMMU group {number} not restored: {message}", file=sys.stderr)
        for gone in mdevs.removed:
            print(
                f"recover: mdev {gone.uuid} removed ({gone.type_id} of {gone.parent}, "
                f"for {shown(gone.owner)})"
            )
        for u, why in mdevs.skipped:
            print(f"recover: left mdev {u}: {why}")
        for u, message in mdevs.failed:
            print(f"recover: mdev {u} not removed: {message}", file=sys.stderr)
        for c in vfs.restored:
            print(f"recover: PF {c.pf} back to {c.after} VFs (had {c.before})")
        for pf, why in vfs.skipped:
            print(f"recover: left the VFs of PF {pf}: {why}")
        for pf, message in vfs.failed:
            print(f"recover: PF {pf} not restored: {message}", file=sys.stderr)
    return 1 if done.failed or vfs.failed or mdevs.failed else 0


def _status_doc(g: GroupStatus) -> dict[str, object]:
    return asdict(g)


def _status(args: argparse.Namespace) -> int:
    groups = status(host=Host(args.sysfs_root, args.dev_root), root=Path(args.root))
    # A record kvmvfio cannot act on is a problem to see, not a state: exit 1.
    code = 1 if any(g.invalid for g in groups) else 0
    if code:
        print(
            "kvmvfio: a journal record is invalid and is not acted on; see its line",
            file=sys.stderr,
        )
    if args.json:
        print_doc({"groups": [_status_doc(g) for g in groups]})
        return code
    if not groups:
        print("kvmvfio holds no IOMMU group")
    for g in groups:
        if g.invalid:
            print(f"IOMMU group {g.group}: not acted on: {g.invalid}")
            continue
        state = "owner alive" if g.alive else "owner gone"
        moved = ", ".join(e.address for e in g.devices) or "none"
        print(
            f"IOMMU group {g.group}: claimed by {shown(g.owner)}; {state}: {g.why}; moved: {moved}"
        )
    return code
