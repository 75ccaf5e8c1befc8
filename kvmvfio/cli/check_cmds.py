"""``kvmvfio check ADDR...``: open what a VM would open, report, and release it all.

A dry run a user can trust before starting a VM: it opens the devices on
the path a VM would use, asks the kernel whether their groups are viable
and whether the IOMMU enforces DMA cache coherency, hands the files to a
scratch KVM VM's kvm-vfio device (so KVM's acceptance is tested too),
reads each device's regions and interrupts, and then releases everything
in order. Nothing on the host is changed: devices must already be on
vfio-pci (``kvmvfio prepare`` moves them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvmvfio.cli.args import PATHS, existing_dir, vfio_path
from kvmvfio.errors import KvmvfioError
from kvmvfio.host import Host
from kvmvfio.vfio.policy import Coherency, VfioPath

if TYPE_CHECKING:
    from kvmvfio.kvm import KvmVfioDevice
    from kvmvfio.vfio.device import DeviceInfo, IrqInfo, RegionInfo
    from kvmvfio.vfio.session import SessionReport

SCHEMA = 1

JsonObject = dict[str, object]

_REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5"}
_REGION_NAMES |= {6: "ROM", 7: "config", 8: "VGA"}
_IRQ_NAMES = {0: "INTx", 1: "MSI", 2: "MSI-X", 3: "ERR", 4: "REQ"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` to the top-level subparsers."""
    check = sub.add_parser(
        "check",
        help="open devices as a VM would, report viability, path, coherency and KVM, release",
        description=(
            "Open the PCI functions at ADDR... the way a VM would (the devices must be on "
            "vfio-pci already), hand their files to a scratch KVM VM, report the kernel's "
            "answers (viability, the path used, enforced DMA cache coherency, each "
            "device's regions and interrupts) and release everything. Exit status: 0 "
            "when a VM could use the devices under the chosen policy, 1 when not, 2 for "
            "bad arguments."
        ),
    )
    check.add_argument(
        "addresses", nargs="+", metavar="ADDR", help="PCI address (03:00.0) or mdev UUID"
    )
    check.add_argument(
        "--path",
        type=vfio_path,
        choices=PATHS,
        default=VfioPath.AUTO.value,
        help="which of the kernel's ways to use (default: auto, cdev + iommufd where present)",
    )
    check.add_argument(
        "--coherency",
        choices=[c.value for c in Coherency],
        default=Coherency.WARN.value,
        help="what to do when the IOMMU does not enforce DMA cache coherency (default: warn)",
    )
    check.add_argument(
        "--no-kvm", action="store_true", help="do not test the KVM association (no /dev/kvm)"
    )
    check.add_argument(
        "--allow-noiommu",
        action="store_true",
        help="accept no-IOMMU groups (no DMA isolation; taints the kernel)",
    )
    check.add_argument(
        "--vf-token",
        metavar="UUID",
        help="the VF token, for a VF whose PF is on vfio-pci (docs/sriov.md)",
    )
    check.add_argument("--json", action="store_true", help="print JSON (docs/cli-json.md)")
    check.add_argument("--sysfs-root", default="/sys", type=existing_dir, help=argparse.SUPPRESS)
    check.add_argument("--dev-root", default="/dev", type=existing_dir, help=argparse.SUPPRESS)
    check.set_defaults(handler=_check)


@contextlib.contextmanager
def _scratch_kvm(path: str) -> Iterator[KvmVfioDevice]:
    from kvmvfio.kvm import KvmVm  # noqa: PLC0415 (the CLI imports layers on use)

    with KvmVm(path) as vm, vm.vfio_device() as device:
        yield device


def _region_json(region: RegionInfo) -> JsonObject:
    return {
        "index": region.index,
        "name": _REGION_NAMES.get(region.index, f"region{region.index}"),
        "size": region.size,
        "flags": region.flags,
        "mappable": region.mappable,
    }


def _irq_json(irq: IrqInfo) -> JsonObject:
    return {
        "index": irq.index,
        "name": _IRQ_NAMES.get(irq.index, f"irq{irq.index}"),
        **{
            "count": irq.count,
            "flags": irq.flags,
        },
    }


def _info_json(info: DeviceInfo) -> JsonObject:
    return {"flags": info.flags, "pci": info.is_pci, "reset": info.can_reset}


def report_json(report: SessionReport, *, kvm_checked: bool) -> JsonObject:
    """The ``check --json`` document for a session that opened."""
    plan = report.plan.to_json() if report.plan is not None else None
    return {
        "schema": SCHEMA,
        "ok": True,
        "path": report.backend.value,
        "groups": list(report.groups),
        "coherent": report.coherent,
        "kvm": {"checked": kvm_checked, "accepted": report.kvm_associated},
        "unsafe": list(report.unsafe),
        "plan": plan,
        "devices": [
            {
                "address": dev.address,
                "group": dev.group,
                "cdev": dev.cdev,
                "info": _info_json(dev.info),
                "regions": [_region_json(r) for r in dev.regions],
                "irqs": [_irq_json(i) for i in dev.irqs],
            }
            for dev in report.devices
        ],
    }


def error_json(err: KvmvfioError) -> JsonObject:
    """The ``check --json`` document when the check failed."""
    return {
        "schema": SCHEMA,
        "ok": False,
        "error": {
            "type": type(err).__name__,
            "message": str(err),
            "errno": getattr(err, "errno", None),
        },
    }


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def render(report: SessionReport, *, kvm_checked: bool, policy: Coherency) -> str:
    """The human report of a session that opened: its plan, then what the kernel answered."""
    # The plan's own coherency line would say again what the kernel's answer below says.
    plan = report.plan.lines() if report.plan is not None else []
    lines = [line for line in plan if not line.startswith("coherency:")]
    lines.append(f"path:       {report.backend.value}")
    lines.append("groups:     " + ", ".join(f"IOMMU group {g} (viable)" for g in report.groups))
    if report.coherent is None:
        lines.append("coherency:  not checked (--coherency=ignore)")
    elif report.coherent:
        lines.append("coherency:  enforced by the IOMMU")
    else:
        lines.append(
            f"coherency:  NOT enforced (policy {policy.value}): KVM will honour the guest's "
            "WBINVD, see docs/coherency.md"
        )
    if kvm_checked:
        lines.append("KVM:        accepted every file (KVM_DEV_VFIO_FILE_ADD), then let go")
    else:
        lines.append("KVM:        not checked (--no-kvm)")
    for dev in report.devices:
        regions = ", ".join(
            f"{_REGION_NAMES.get(r.index, r.index)} {_size(r.size)}"
            + (" mmap" if r.mappable else "")
            for r in dev.regions
            if r.size
        )
        irqs = ", ".join(f"{_IRQ_NAMES.get(i.index, i.index)} {i.count}" for i in dev.irqs)
        where = f" ({dev.cdev})" if dev.cdev else ""
        lines.append(f"device {dev.address}{where}, group {dev.group}:")
        lines.append(f"  regions:  {regions or 'none'}")
        lines.append(f"  irqs:     {irqs or 'none'}")
    for text in report.unsafe:
        lines.append(f"warning:    {text}")
    lines.append("released:   every file closed, nothing left with KVM")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    from kvmvfio.vfio.session import VfioSession  # noqa: PLC0415 (imported on use)

    host = Host(args.sysfs_root, args.dev_root)
    policy = Coherency(args.coherency)
    try:
        with contextlib.ExitStack() as stack:
            kvm = None if args.no_kvm else stack.enter_context(_scratch_kvm(f"{args.dev_root}/kvm"))
            session = VfioSession(
                args.addresses,
                backend=args.path,
                kvm=kvm,
                coherency=policy,
                allow_noiommu=args.allow_noiommu,
                vf_token=args.vf_token,
                host=host,
            )
            with session:
                report = session.report()
    except KvmvfioError as err:
        if args.json:
            json.dump(error_json(err), sys.stdout, indent=2)
            sys.stdout.write("\n")
        raise
    if args.json:
        json.dump(report_json(report, kvm_checked=kvm is not None), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(report, kvm_checked=kvm is not None, policy=policy))
    return 0
