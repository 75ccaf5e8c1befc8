"""``kvmvfio mdev types|list|create|remove``: mediated devices, made and removed for an owner.

See :mod:`kvmvfio.prepare.mdev`. ``create`` records the mdev under
``/run/kvmvfio/mdev`` before it writes to the kernel, so ``remove`` and
``kvmvfio recover`` find what it made; ``--persist`` also writes mdevctl's
definition, so mdevctl makes it again at boot.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from kvmvfio.cli.args import path_text
from kvmvfio.cli.prepare_cmds import common_args, print_doc
from kvmvfio.errors import shown
from kvmvfio.host import Host

if TYPE_CHECKING:
    from kvmvfio.host.mdev import MdevParent
    from kvmvfio.prepare.mdev import MdevChange, MdevState


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mdev`` and its subcommands to the top-level subparsers."""
    top = sub.add_parser(
        "mdev",
        help="mediated devices: their types, made for an owner and removed (journaled)",
        description=(
            "List the mdev types of each parent, list the mdevs, make one for an owner, or "
            "remove one. 'create' records the mdev before it is made, so 'remove' and "
            "'kvmvfio recover' find it; --persist also writes mdevctl's definition "
            "(/etc/mdevctl.d), so mdevctl makes it again at boot. An mdev in use (its VFIO "
            "files open, its group prepared) is never removed. Exit status: 0 done, 1 refused, "
            "2 bad arguments."
        ),
    )
    cmds = top.add_subparsers(dest="mdev_command", metavar="SUBCOMMAND", required=True)

    types = cmds.add_parser("types", help="each parent's mdev types and how many are left")
    types.add_argument("parent", metavar="PARENT", nargs="?", help="only this parent")
    _args(types)
    types.set_defaults(handler=_types)

    ls = cmds.add_parser("list", help="the mdevs: parent, type, group, owner, persistent, in use")
    _args(ls)
    ls.set_defaults(handler=_list)

    cr = cmds.add_parser("create", help="make an mdev of TYPE on PARENT for an owner")
    cr.add_argument("parent", metavar="PARENT", help="the parent device (mtty, 0000:00:02.0)")
    cr.add_argument("type", metavar="TYPE", help="the mdev type (mtty-2, nvidia-63)")
    cr.add_argument("--uuid", help="the new mdev's UUID (default: a new random one)")
    cr.add_argument("--owner", required=True, help="who the mdev is for (a VM name, a token)")
    cr.add_argument("--owner-pid", type=int, help="the owner's process, to detect stale records")
    cr.add_argument(
        "--persist",
        action="store_true",
        help="also write mdevctl's definition, so mdevctl makes it again at boot",
    )
    _args(cr)
    cr.set_defaults(handler=_create)

    rm = cmds.add_parser("remove", help="remove an mdev (and its mdevctl definition)")
    rm.add_argument("uuid", metavar="UUID", help="the mdev's UUID")
    rm.add_argument("--owner", required=True, help="who removes it (refused if another has it)")
    _args(rm)
    rm.set_defaults(handler=_remove)


def _args(parser: argparse.ArgumentParser) -> None:
    common_args(parser, addresses=False)
    parser.add_argument(
        "--mdevctl-root", default="/etc/mdevctl.d", type=path_text, help=argparse.SUPPRESS
    )


def _host(args: argparse.Namespace) -> Host:
    return Host(args.sysfs_root, args.dev_root)


def _types(args: argparse.Namespace) -> int:
    from kvmvfio.host.mdev import mdev_parents  # noqa: PLC0415 (imported on use)
    from kvmvfio.prepare.mdev import mdev_parent  # noqa: PLC0415

    host = _host(args)
    parents: list[MdevParent] = (
        [mdev_parent(host, args.parent)] if args.parent else mdev_parents(host.sysfs)
    )
    if args.json:
        print_doc({"parents": [asdict(p) for p in parents]})
        return 0
    if not parents:
        print("no device on this host can have mediated devices")
    for p in parents:
        print(f"{p.name} ({p.driver or 'no driver'})")
        for t in p.types:
            left = "?" if t.available is None else t.available
            print(f"  {t.id}: {left} left, {len(t.devices)} made; {t.device_api or '?'}; "
                  f"{shown(t.name or '')} {shown(t.description or '')}".rstrip())  # fmt: skip
    return 0


def _state_doc(s: MdevState) -> dict[str, object]:
    return {
        **asdict(s.mdev),
        "owner": s.owner,
        "state": s.state,
        "persistent": s.persistent,
        "definition": None if s.definition is None else asdict(s.definition),
        "uses": list(s.uses),
    }


def _list(args: argparse.Namespace) -> int:
    from kvmvfio.prepare.mdev import mdev_states  # noqa: PLC0415 (imported on use)

    states = mdev_states(
        host=_host(args), root=Path(args.root), mdevctl_root=Path(args.mdevctl_root)
    )
    if args.json:
        print_doc({"mdevs": [_state_doc(s) for s in states]})
        return 0
    if not states:
        print("no mediated device on this host")
    for s in states:
        m = s.mdev
        owner = f"for {shown(s.owner)}" if s.owner else "not made by kvmvfio"
        if s.state not in (None, "created"):
            owner += f" ({s.state}: `kvmvfio recover` finishes it)"
        persist = "persistent (mdevctl)" if s.persistent else "transient"
        group = "no group" if m.group is None else f"IOMMU group {m.group}"
        print(f"{m.uuid} {m.parent} {m.type_id or '?'}: {group}; {owner}; {persist}")
        for use in s.uses:
            print(f"  in use: it {use}")
    return 0


def _change_doc(change: MdevChange) -> dict[str, object]:
    return asdict(change)


def _create(args: argparse.Namespace) -> int:
    from kvmvfio.prepare.mdev import create_mdev, mdevctl_installed  # noqa: PLC0415

    done = create_mdev(
        args.parent,
        args.type,
        args.owner,
        uuid=args.uuid,
        persist=args.persist,
        owner_pid=args.owner_pid,
        host=_host(args),
        root=Path(args.root),
        mdevctl_root=Path(args.mdevctl_root),
    )
    if args.json:
        print_doc({"created": _change_doc(done)})
        return 0
    group = "no group" if done.group is None else f"IOMMU group {done.group}"
    print(f"mdev {done.uuid}: {done.type_id} of {done.parent} for {shown(done.owner)}; {group}")
    if done.persistent:
        print(f"  persistent: mdevctl's definition {done.definition}")
        if not mdevctl_installed():
            print("  mdevctl is not installed: nothing makes it again at boot until it is")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from kvmvfio.prepare.mdev import remove_mdev  # noqa: PLC0415 (imported on use)

    done = remove_mdev(
        args.uuid,
        args.owner,
        host=_host(args),
        root=Path(args.root),
        mdevctl_root=Path(args.mdevctl_root),
    )
    if args.json:
        print_doc({"removed": _change_doc(done)})
        return 0
    print(f"mdev {done.uuid}: removed ({done.type_id} of {done.parent})")
    if done.definition:
        print(f"  and mdevctl's definition {done.definition}")
    return 0
