"""``kvmvfio inventory`` and ``kvmvfio group``: the host model on the command line.

Both read only; ``--sysfs-root``, ``--dev-root`` and ``--proc-root`` point
them at another tree (a fake one in tests, a chroot's). ``--json`` prints the stable schema
documented in ``docs/cli-json.md``; the functions that build it
(:func:`device_json`, :func:`group_json`, :func:`inventory_json`) are
the one definition of that schema.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kvmvfio.cli.args import existing_dir
from kvmvfio.errors import InvalidGroup, MdevNotReady
from kvmvfio.host import (
    Host,
    HostIommu,
    HostSupport,
    Inventory,
    IommuGroup,
    Mdev,
    MdevParent,
    MdevType,
    NoGroup,
    NoGroupCause,
    PciAddress,
    PciDevice,
    blocker_of,
)
from kvmvfio.host.console import ConsoleUse, console_use
from kvmvfio.host.mdev import is_uuid, read_mdev
from kvmvfio.host.mdev import mdev as mdev_of
from kvmvfio.host.reset import ResetScope, reset_scopes
from kvmvfio.host.rom import RomReport, report_rom

#: Version of the ``--json`` schema; bumped only when a field changes
#: meaning or goes away (adding fields does not bump it).
SCHEMA = 1

_GROUP_NUMBER = re.compile(r"[0-9]{1,10}")

JsonObject = dict[str, object]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``inventory`` and ``group`` to the top-level subparsers."""
    inv = sub.add_parser(
        "inventory",
        help="list PCI functions, their drivers and IOMMU groups, and what the host supports",
        description=(
            "List every PCI function with its IDs, class, driver, IOMMU group, whether "
            "that group is viable for VFIO, and its VFIO device cdev (for a function in "
            "no group, why); then the mediated-device parents with their types and the "
            "mdevs, when the host has any; then say which IOMMUs the kernel uses and which "
            "VFIO, iommufd and KVM files the host has. Reads only."
        ),
    )
    _common(inv)
    inv.set_defaults(handler=_inventory)

    grp = sub.add_parser(
        "group",
        help="show an IOMMU group's members and whether VFIO can use it",
        description=(
            "Show the IOMMU group numbered N, or the group of the PCI function at ADDR: "
            "its members (an mdev's group has the mdev alone), their drivers, and whether "
            "the group is viable (every member on vfio-pci or a variant, pci-stub, "
            "pcieport, or no driver; an mdev), naming each "
            "member in the way and why. For a function in no IOMMU group, say why "
            "(no IOMMU in use, the function is the IOMMU, not probed until a driver "
            "binds, not covered). Exit status: 0 viable, 1 not viable, not found or in "
            "no group, 2 malformed argument."
        ),
    )
    grp.add_argument(
        "target",
        metavar="ADDR|UUID|N",
        help="a PCI address ([DDDD:]BB:SS.F, e.g. 0000:01:00.0), an mdev's UUID, or an "
        "IOMMU group number",
    )
    _common(grp)
    grp.set_defaults(handler=_group)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON (schema in docs/cli-json.md) instead of text",
    )
    parser.add_argument(
        "--sysfs-root",
        metavar="DIR",
        default="/sys",
        type=existing_dir,
        help="sysfs to read (default: /sys)",
    )
    parser.add_argument(
        "--dev-root",
        metavar="DIR",
        default="/dev",
        type=existing_dir,
        help="/dev to look in (default: /dev)",
    )
    parser.add_argument(
        "--proc-root",
        metavar="DIR",
        default="/proc",
        type=existing_dir,
        help="/proc to read the kernel command line and CPU vendor from (default: /proc)",
    )


def _host(args: argparse.Namespace) -> Host:
    return Host(args.sysfs_root, args.dev_root, args.proc_root)


# -- JSON -------------------------------------------------------------------


def _hex(value: int | None, digits: int) -> str | None:
    return None if value is None else f"0x{value:0{digits}x}"


def no_group_json(why: NoGroup | None) -> JsonObject | None:
    """Why a function is in no IOMMU group, as the ``--json`` schema has it."""
    if why is None:
        return None
    return {
        "cause": why.cause.value,
        "iommu": None if why.iommu is None else why.iommu.value,
        "units": list(why.units),
        "setting": why.setting,
        "bind_gives_group": why.bind_gives_group,
        "reason": why.reason,
    }


def vf_index(dev: PciDevice, pf: PciDevice | None) -> int | None:
    """The VF's index under its PF (``virtfnN``), or None (not a VF, PF unknown)."""
    if pf is None or dev.physfn is None or dev.address not in pf.virtfns:
        return None
    return pf.virtfns.index(dev.address)


def device_json(
    dev: PciDevice,
    no_group: NoGroup | None = None,
    pf: PciDevice | None = None,
    rom: RomReport | None = None,
    reset: ResetScope | None = None,
) -> JsonObject:
    """One PCI function as the ``--json`` schema has it.

    ``no_group``: why it has none; ``pf``: its PF, for a VF (its index, the
    PF's driver); ``rom``: its option ROM (None: it has no ROM BAR);
    ``reset``: its reset scope (None: not read).
    """
    return {
        "address": str(dev.address),
        "vendor": _hex(dev.vendor, 4),
        "device": _hex(dev.device, 4),
        "subsystem_vendor": _hex(dev.subsystem_vendor, 4),
        "subsystem_device": _hex(dev.subsystem_device, 4),
        "class": _hex(dev.class_code, 6),
        "class_name": dev.class_name,
        "is_bridge": dev.is_bridge,
        "driver": dev.driver,
        "driver_override": dev.driver_override,
        "iommu_group": dev.iommu_group,
        "numa_node": dev.numa_node,
        "reset_methods": list(dev.reset_methods),
        "physfn": None if dev.physfn is None else str(dev.physfn),
        "vf_index": vf_index(dev, pf),
        "pf_driver": None if pf is None or dev.physfn is None else pf.driver,
        "virtfns": [str(a) for a in dev.virtfns],
        "sriov_totalvfs": dev.sriov_totalvfs,
        "sriov_numvfs": dev.sriov_numvfs,
        "vfio_cdev": dev.vfio_cdev,
        "boot_vga": dev.boot_vga,
        "no_group": no_group_json(no_group),
        "rom": rom_json(rom),
        "reset": reset_json(reset),
    }


def reset_json(scope: ResetScope | None) -> JsonObject | None:
    """A function's reset scope as the ``--json`` schema has it (None: not read)."""
    if scope is None:
        return None
    return {
        "own": scope.own,
        "bridge": None if scope.bridge is None else str(scope.bridge),
        "affected": [{"address": str(a.address), "driver": a.driver} for a in scope.affected],
        "summary": scope.summary(),
    }


#: Reset scopes by function address (read with :func:`resets_of`).
Resets = Mapping[str, ResetScope]


def resets_of(host: Host, devices: Sequence[PciDevice], every: Sequence[PciDevice]) -> Resets:
    """The reset scope of each of ``devices``; ``every``: the host's functions."""
    return reset_scopes(host.sysfs, devices, every)


def rom_json(report: RomReport | None) -> JsonObject | None:
    """A function's option ROM as the ``--json`` schema has it (None: no ROM BAR)."""
    if report is None:
        return None
    rom = report.rom
    if rom is None:
        return {
            "read": False,
            "reason": report.unread,
            "size": None,
            "valid": None,
            "problem": None,
            "legacy_bios": None,
            "uefi": [],
            "images": [],
        }
    return {
        "read": True,
        "reason": None,
        "size": rom.size,
        "valid": rom.valid,
        "problem": rom.problem,
        "legacy_bios": rom.legacy_bios,
        "uefi": list(rom.uefi),
        "images": [
            {
                "offset": i.offset,
                "length": i.length,
                "vendor": _hex(i.vendor, 4),
                "device": _hex(i.device, 4),
                "code_type": i.code_type_name,
                "efi_machine": i.efi_machine_name,
                "efi_subsystem": i.efi_subsystem,
                "checksum_ok": i.checksum_ok,
                "last": i.last,
            }
            for i in rom.images
        ],
    }


#: Option ROMs by function address (read with :func:`roms_of`).
Roms = Mapping[str, RomReport]


def roms_of(sysfs: str | Path, devices: Sequence[PciDevice]) -> dict[str, RomReport]:
    """Read the option ROMs of ``devices`` for the reports (functions without one left out)."""
    found = {str(d.address): report_rom(sysfs, d) for d in devices}
    return {addr: r for addr, r in found.items() if r is not None}


def group_json(group: IommuGroup, devfs: str | Path) -> JsonObject:
    """One IOMMU group as the ``--json`` schema has it (members by address)."""
    blockers = group.blockers
    return {
        "number": group.number,
        "noiommu": group.noiommu,
        "emulated": group.emulated,
        "viable": not blockers,
        "dev_node": str(group.dev_node(devfs)),
        "members": [str(m.address) for m in group.members],
        "other_members": [
            {"name": f.name, "driver": f.driver, "mdev": f.mdev} for f in group.foreign
        ],
        "blockers": [
            {"address": b.address, "driver": b.driver, "reason": b.reason} for b in blockers
        ],
    }


def iommu_json(iommu: HostIommu) -> JsonObject:
    """The host's IOMMU facts, as fields of the ``--json`` schema's host object."""
    tables = iommu.firmware_tables
    return {
        "iommu_units": [
            {
                "name": u.name,
                "kind": u.kind.value,
                "function": None if u.function is None else str(u.function),
            }
            for u in iommu.units
        ],
        "iommu_groups_supported": iommu.groups_supported,
        "iommu_kernel_args": list(iommu.kernel_args),
        "iommu_off_by": iommu.off_by if not iommu.in_use else None,
        "iommu_firmware_tables": None if tables is None else list(tables),
        "cpu_vendor": iommu.cpu_vendor,
    }


def support_json(support: HostSupport, iommu: HostIommu | None = None) -> JsonObject:
    """What the host supports (and, given ``iommu``, its IOMMUs), as the ``--json`` schema has
    it."""
    doc: JsonObject = {**support.as_dict(), "missing": list(support.missing(iommu))}
    if iommu is not None:
        doc.update(iommu_json(iommu))
    return doc


def mdev_type_json(t: MdevType) -> JsonObject:
    """One type a parent offers, as the ``--json`` schema has it."""
    return {
        "type": t.id,
        "name": t.name,
        "description": t.description,
        "device_api": t.device_api,
        "available_instances": t.available,
        "mdevs": list(t.devices),
    }


def mdev_parent_json(parent: MdevParent) -> JsonObject:
    """One mediated-device parent with its types, as the ``--json`` schema has it."""
    return {
        "name": parent.name,
        "path": parent.path,
        "driver": parent.driver,
        "types": [mdev_type_json(t) for t in parent.types],
    }


def mdev_json(m: Mdev, devfs: str | Path) -> JsonObject:
    """One mediated device, as the ``--json`` schema has it."""
    node = m.group_node(devfs)
    return {
        "uuid": m.uuid,
        "type": m.type_id,
        "parent": m.parent,
        "driver": m.driver,
        "iommu_group": m.group,
        "dev_node": None if node is None else str(node),
        "vfio_cdev": m.cdev,
        "path": m.path,
    }


def inventory_json(
    inv: Inventory, devfs: str | Path, roms: Roms | None = None, resets: Resets | None = None
) -> JsonObject:
    """The whole ``inventory --json`` document (``roms``: option ROMs, ``resets``: reset
    scopes, by address)."""
    roms, resets = roms or {}, resets or {}
    return {
        "schema": SCHEMA,
        "host": support_json(inv.support, inv.iommu),
        "devices": [
            device_json(
                d,
                inv.no_group(d),
                _pf_of(inv, d),
                roms.get(str(d.address)),
                resets.get(str(d.address)),
            )
            for d in inv.devices
        ],
        "groups": [group_json(g, devfs) for g in inv.groups],
        "mdev_parents": [mdev_parent_json(p) for p in inv.mdev_parents],
        "mdevs": [mdev_json(m, devfs) for m in inv.mdevs],
    }


def _pf_of(inv: Inventory, dev: PciDevice) -> PciDevice | None:
    if dev.physfn is None:
        return None
    return next((d for d in inv.devices if d.address == dev.physfn), None)


def group_document(
    group: IommuGroup,
    devfs: str | Path,
    pfs: Mapping[str, PciDevice] | None = None,
    mdevs: Sequence[Mdev] = (),
    roms: Roms | None = None,
    *,
    resets: Resets | None = None,
) -> JsonObject:
    """The whole ``group --json`` document (``pfs``: the PFs of VF members, ``roms``: option
    ROMs, ``resets``: reset scopes, by address; ``mdevs``: the members that are mediated
    devices)."""
    pfs, roms, resets = pfs or {}, roms or {}, resets or {}
    return {
        "schema": SCHEMA,
        "group": group_json(group, devfs),
        "devices": [
            device_json(
                d,
                pf=pfs.get(str(d.physfn)),
                rom=roms.get(str(d.address)),
                reset=resets.get(str(d.address)),
            )
            for d in group.members
        ],
        "mdevs": [mdev_json(m, devfs) for m in mdevs],
    }


def pfs_of(host: Host, group: IommuGroup) -> dict[str, PciDevice]:
    """The PFs of the group's VF members, by address (read from ``host``)."""
    return {str(m.physfn): host.device(str(m.physfn)) for m in group.members if m.physfn}


def mdevs_of(host: Host, group: IommuGroup) -> list[Mdev]:
    """The group's members that are mediated devices (read from ``host``); those that
    vanished meanwhile are left out."""
    out = []
    for f in group.foreign:
        if f.mdev and is_uuid(f.name):
            found = read_mdev(f.name, host.sysfs)
            if found is not None:
                out.append(found)
    return out


def _print_json(doc: JsonObject) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


# -- text -------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


#: What the NOTES column says of a function in no group, when the reason is
#: its own (the host-wide reasons are said once, under the table).
_NO_GROUP_NOTES = {
    NoGroupCause.IS_IOMMU: "no group: the IOMMU itself",
    NoGroupCause.NOT_PROBED: "no group until a driver binds",
    NoGroupCause.NOT_COVERED: "no group: outside the IOMMU",
}


def _notes(
    dev: PciDevice,
    group: IommuGroup | None,
    why: NoGroup | None = None,
    pf: PciDevice | None = None,
    rom: RomReport | None = None,
    *,
    console: ConsoleUse | None = None,
    reset: ResetScope | None = None,
) -> str:
    notes = []
    if why is not None and why.cause in _NO_GROUP_NOTES:
        notes.append(_NO_GROUP_NOTES[why.cause])
    if dev.sriov_totalvfs is not None:
        notes.append(f"PF {dev.sriov_numvfs}/{dev.sriov_totalvfs} VFs")
    if dev.physfn is not None:
        index = vf_index(dev, pf)
        which = "VF" if index is None else f"VF {index}"
        driver = f" ({pf.driver or 'no driver'})" if pf is not None else ""
        notes.append(f"{which} of {dev.physfn}{driver}")
    if dev.driver_override is not None:
        notes.append(f"override={dev.driver_override}")
    if dev.boot_vga:
        notes.append("boot VGA")
    if group is not None and group.noiommu:
        notes.append("no-IOMMU")
    if rom is not None:
        notes.append(_rom_note(rom))
    if console is not None:
        notes += console.notes()
    if reset is not None and not reset.own and group is not None and not dev.is_bridge:
        # Only where a VM could get it: a function in an IOMMU group, not a bridge.
        notes.append("no reset" if not reset.bus_reset else "bus reset only")
    return ", ".join(notes)


def _rom_note(report: RomReport) -> str:
    """The compact words of the inventory's NOTES: ``ROM 39 KiB x86``, ``ROM invalid``."""
    rom = report.rom
    if rom is None:
        return "ROM not read"
    if not rom.valid:
        return "ROM invalid"
    kinds = "+".join(i.describe().replace(" ", "-") for i in rom.images)
    return (
        f"ROM {rom.summary().split(' ')[1]} KiB {kinds}"
        if rom.size % 1024 == 0
        else (f"ROM {rom.size} bytes {kinds}")
    )


def _viable(group: IommuGroup | None) -> str:
    if group is None:
        return "-"
    return "yes" if group.viable else "no"


def consoles_of(host: Host, devices: Sequence[PciDevice]) -> dict[str, ConsoleUse]:
    """What holds each display function beyond its driver (:mod:`kvmvfio.host.console`)."""
    return {
        str(d.address): console_use(str(d.address), host.sysfs, proc=host.procfs, devfs=host.devfs)
        for d in devices
        if d.class_code >> 16 == 0x03
    }


def render_inventory(
    inv: Inventory,
    roms: Roms | None = None,
    consoles: Mapping[str, ConsoleUse] | None = None,
    resets: Resets | None = None,
) -> str:
    """The human table of ``kvmvfio inventory``, then the host support sentence.

    ``consoles``: what holds display functions beyond their drivers, ``resets``: the
    functions' reset scopes, for NOTES.
    """
    roms, consoles, resets = roms or {}, consoles or {}, resets or {}
    groups = inv.groups_by_number()
    rows = [("ADDRESS", "IDS", "CLASS", "DRIVER", "GROUP", "VIABLE", "CDEV", "NOTES")]
    for dev in inv.devices:
        group = None if dev.iommu_group is None else groups.get(dev.iommu_group)
        rows.append(
            (
                str(dev.address),
                dev.ids,
                dev.class_name,
                dev.driver or "-",
                "-" if dev.iommu_group is None else str(dev.iommu_group),
                _viable(group),
                dev.vfio_cdev or "-",
                _notes(
                    dev,
                    group,
                    inv.no_group(dev),
                    _pf_of(inv, dev),
                    roms.get(str(dev.address)),
                    console=consoles.get(str(dev.address)),
                    reset=resets.get(str(dev.address)),
                ),
            )
        )
    text = _table(rows) if inv.devices else "No PCI functions found."
    mediated = render_mdevs(inv)
    if mediated:
        text += f"\n\n{mediated}"
    return f"{text}\n\n{render_iommu(inv)}\n{inv.support.explain(inv.iommu)}"


def _one_line(text: str | None) -> str:
    return "-" if not text else "; ".join(text.splitlines())


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def render_mdevs(inv: Inventory) -> str:
    """The mediated-device parents with their types, then the mdevs; empty without any."""
    parts = []
    if inv.mdev_parents:
        rows = [("MDEV PARENT", "TYPE", "NAME", "API", "AVAILABLE", "DESCRIPTION")]
        for parent in inv.mdev_parents:
            for t in parent.types:
                rows.append(
                    (
                        parent.name,
                        t.id,
                        t.name or "-",
                        t.device_api or "-",
                        _count(t.available),
                        _one_line(t.description),
                    )
                )
            if not parent.types:
                rows.append((parent.name, "-", "-", "-", "-", "no types"))
        parts.append(_table(rows))
    if inv.mdevs:
        groups = inv.groups_by_number()
        table = [("MDEV", "TYPE", "PARENT", "DRIVER", "GROUP", "VIABLE", "CDEV")]
        for m in inv.mdevs:
            table.append(
                (
                    m.uuid,
                    m.type_id or "-",
                    m.parent,
                    m.driver or "-",
                    _count(m.group),
                    _viable(None if m.group is None else groups.get(m.group)),
                    m.cdev or "-",
                )
            )
        parts.append(_table(table))
    return "\n\n".join(parts)


def render_iommu(inv: Inventory) -> str:
    """The line under the inventory table: the IOMMUs in use, and the functions in no group."""
    units = inv.iommu.units
    if not units:
        text = "IOMMU: none in use."
    else:
        kinds: dict[str, list[str]] = {}
        for u in units:
            kinds.setdefault(u.kind.label, []).append(u.name)
        text = "IOMMU: " + "; ".join(f"{k} ({', '.join(n)})" for k, n in kinds.items()) + "."
    if inv.iommu.kernel_args:
        text += f" Kernel command line: {' '.join(inv.iommu.kernel_args)}."
    lost = [d for d in inv.devices if d.iommu_group is None]
    if units and lost:
        text += f" {len(lost)} function(s) in no IOMMU group; `kvmvfio group ADDR` says why."
    return text


def render_group(
    group: IommuGroup,
    devfs: str | Path,
    pfs: Mapping[str, PciDevice] | None = None,
    mdevs: Sequence[Mdev] = (),
    roms: Roms | None = None,
    *,
    consoles: Mapping[str, ConsoleUse] | None = None,
    resets: Resets | None = None,
) -> str:
    """The human text of ``kvmvfio group`` (``pfs``: the PFs of VF members, ``roms``: option
    ROMs, ``resets``: reset scopes, by address; ``mdevs``: the members that are mediated
    devices; ``consoles``: what holds display members beyond their drivers)."""
    pfs, roms, consoles = pfs or {}, roms or {}, consoles or {}
    resets = resets or {}
    mediated = {m.uuid: m for m in mdevs}
    state = "viable" if group.viable else "NOT viable"
    kind = "IOMMU group"
    if group.noiommu:
        kind = "no-IOMMU group"
    elif group.emulated:
        kind = "emulated IOMMU group"
    head = f"{kind} {group.number} ({group.dev_node(devfs)}): {state}"
    rows = [("MEMBER", "IDS", "CLASS", "DRIVER", "STATUS")]
    for dev in group.members:
        blocker = blocker_of(dev)
        rows.append(
            (
                str(dev.address),
                dev.ids,
                dev.class_name,
                dev.driver or "-",
                (f"blocks: {blocker.reason}" if blocker else "ok")
                + (f" ({_notes(dev, None, pf=pfs.get(str(dev.physfn)))})" if dev.physfn else ""),
            )
        )
    foreign = {b.address: b for b in group.blockers}
    for f in group.foreign:
        b = foreign.get(f.name)
        status = f"blocks: {b.reason}" if b else "ok"
        kind = "non-PCI device"
        if f.mdev:
            m = mediated.get(f.name)
            kind = "mdev" if m is None or m.type_id is None else f"mdev {m.type_id}"
            if m is not None:
                status += f" (on {m.parent}{f', cdev {m.cdev}' if m.cdev else ''})"
        rows.append((f.name, "-", kind, f.driver or "-", status))
    lines = [head, _table(rows)]
    lines += [f"{addr}: {_rom_line(r)}" for addr, r in roms.items()]
    lines += [f"{a}: {', '.join(c.notes())}" for a, c in consoles.items() if c.notes()]
    # A function with a reset of its own is reset alone; only the others need a sentence.
    bridges = {str(d.address) for d in group.members if d.is_bridge}
    lines += [f"{a}: {r.summary()}" for a, r in resets.items() if not r.own and a not in bridges]
    if group.noiommu:
        lines.append(
            "No IOMMU isolates this group: a device in it can DMA anywhere in host memory."
        )
    if not group.viable:
        lines.append(
            f"{len(group.blockers)} member(s) keep the group from VFIO; every member must be "
            "on vfio-pci (or a variant), pci-stub, pcieport, or no driver."
        )
    return "\n".join(lines)


def _rom_line(report: RomReport) -> str:
    """A member's option ROM, and what a VM's firmware will find in it."""
    rom = report.rom
    if rom is None or not rom.valid:
        return report.summary()
    found = (["a legacy BIOS runs its x86 image"] if rom.legacy_bios else []) + [
        f"UEFI ({m}) loads its EFI driver" for m in rom.uefi
    ]
    return f"{rom.summary()}; {', '.join(found) or 'no firmware runs it'}"


# -- handlers ---------------------------------------------------------------


def _inventory(args: argparse.Namespace) -> int:
    host = _host(args)
    inv = host.inventory()
    roms = roms_of(host.sysfs, inv.devices)
    resets = resets_of(host, inv.devices, inv.devices)
    if args.json:
        _print_json(inventory_json(inv, host.devfs, roms, resets))
    else:
        print(render_inventory(inv, roms, consoles_of(host, inv.devices), resets))
    return 0


def resolve_group(host: Host, target: str) -> IommuGroup:
    """The group ``target`` names: a group number, or a PCI address or mdev UUID whose it is.

    Raise :class:`~kvmvfio.errors.InvalidAddress` /
    :class:`~kvmvfio.errors.InvalidGroup` for malformed text,
    :class:`~kvmvfio.errors.NotFound` subclasses or
    :class:`~kvmvfio.errors.NoIommuGroup` for what the host lacks.
    """
    if _GROUP_NUMBER.fullmatch(target):
        return host.group(target)
    if ":" in target or "." in target:
        return host.group_of(PciAddress.parse(target))
    if is_uuid(target) or (len(target) > 12 and "-" in target):  # an mdev's UUID, or one
        # gone wrong (InvalidMdevUuid says so); "-1" is a bad group number
        found = mdev_of(target, host.sysfs)
        if found.group is None:
            raise MdevNotReady(found.uuid, f"has no IOMMU group (driver {found.driver or 'none'})")
        return host.group(found.group)
    raise InvalidGroup(target)


def _group(args: argparse.Namespace) -> int:
    host = _host(args)
    group = resolve_group(host, args.target)
    pfs, mdevs = pfs_of(host, group), mdevs_of(host, group)
    roms = roms_of(host.sysfs, group.members)
    resets = resets_of(host, group.members, host.devices())
    if args.json:
        _print_json(group_document(group, host.devfs, pfs, mdevs, roms, resets=resets))
    else:
        consoles = consoles_of(host, group.members)
        print(render_group(group, host.devfs, pfs, mdevs, roms, consoles=consoles, resets=resets))
    return 0 if group.viable else 1
