"""``kvmvfio doctor``: the host checked against docs/requirements.md, feature by feature.

Reads only (and runs ``--version`` of QEMU and libvirt's daemon when they
are on PATH). ``--json`` prints the schema documented in
``docs/cli-json.md``; :func:`doctor_json` is its one definition. Exit
status: 0 when at least one VFIO path has everything it needs, 1 when none
has, 2 for a malformed argument.
"""

from __future__ import annotations

import argparse
import json

from kvmvfio.cli.args import existing_dir, path_text
from kvmvfio.errors import shown
from kvmvfio.host import Host
from kvmvfio.host.doctor import (
    Check,
    Diagnosis,
    Feature,
    Status,
    Tool,
    diagnose,
    find_tools,
    gather,
)

#: Version of the ``--json`` schema (bumped only when a field changes meaning or goes).
SCHEMA = 1

JsonObject = dict[str, object]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``doctor`` to the top-level subparsers."""
    doc = sub.add_parser(
        "doctor",
        help="check this host against what each kvmvfio feature needs, and say how to get it",
        description=(
            "For each kvmvfio feature (the three VFIO paths, fd handoff to a running QEMU, "
            "the KVM association, the libvirt hook and agent, SR-IOV, mdevs, the coherency "
            "question, Python), say whether this host has what it needs and, for what is "
            "missing, how to get it: a kernel option, a module to load, a kernel argument, a "
            "package (docs/requirements.md has the table). Reads /proc, /sys, /dev and the "
            "module lists; runs only the --version of QEMU and libvirt's daemon, when on "
            "PATH. Exit status: 0 when at least one VFIO path is complete, 1 when none is, "
            "2 for a malformed argument."
        ),
    )
    doc.add_argument(
        "--json",
        action="store_true",
        help="print JSON (schema in docs/cli-json.md) instead of text",
    )
    for flag, default, text in (
        ("--sysfs-root", "/sys", "sysfs to read (default: /sys)"),
        ("--dev-root", "/dev", "/dev to look in (default: /dev)"),
        ("--proc-root", "/proc", "/proc to read (default: /proc)"),
    ):
        doc.add_argument(flag, metavar="DIR", default=default, type=existing_dir, help=text)
    # For tests and chroots: where the module lists and the kernel configuration are.
    doc.add_argument(
        "--modules-root", default="/lib/modules", type=path_text, help=argparse.SUPPRESS
    )
    doc.add_argument("--boot-root", default="/boot", type=path_text, help=argparse.SUPPRESS)
    doc.set_defaults(handler=_doctor)


def _check_json(c: Check) -> JsonObject:
    return {"name": c.name, "ok": c.ok, "seen": c.seen, "fix": c.fix}


def _feature_json(f: Feature) -> JsonObject:
    return {
        "name": f.name,
        "title": f.title,
        "status": f.status.value,
        "vfio_path": f.vfio_path,
        "checks": [_check_json(c) for c in f.checks],
    }


def _tool_json(t: Tool) -> JsonObject:
    version = t.version
    return {
        "name": t.name,
        "path": t.path,
        "version": None if version is None else ".".join(map(str, version)),
        "text": t.text,
    }


def doctor_json(d: Diagnosis) -> JsonObject:
    """The whole ``doctor --json`` document."""
    k, t = d.kernel, d.tools
    return {
        "schema": SCHEMA,
        "usable": d.usable,
        "kernel": {
            "release": k.release,
            "config": k.config_source,
            "cmdline": list(d.kernel_args),
        },
        "features": [_feature_json(f) for f in d.features],
        "tools": {
            "qemu": _tool_json(t.qemu),
            "libvirt": _tool_json(t.libvirt),
            "setfacl": _tool_json(t.setfacl),
            "libvirt_python": t.libvirt_python,
            "python": ".".join(map(str, t.python)),
        },
    }


_MARK = {True: "ok", False: "MISSING", None: "unknown"}


def render_doctor(d: Diagnosis) -> str:
    """The human report: the kernel, then each feature with its checks and fixes."""
    k = d.kernel
    lines = [
        f"kernel {shown(k.release or 'unknown', 64)}; configuration: "
        f"{k.config_source or 'not readable (some options cannot be told)'}",
        f"IOMMU arguments: {' '.join(d.kernel_args) or 'none'}",
        "",
    ]
    for f in d.features:
        lines.append(f"{f.status.value.upper():8} {f.name:14} {f.title}")
        for c in f.checks:
            if f.status is Status.OK and c.ok:
                continue
            lines.append(f"           {_MARK[c.ok]:8} {c.name}: {shown(c.seen, 200)}")
            if c.fix:
                lines.append(f"                    -> {shown(c.fix, 300)}")
    lines.append("")
    if d.usable:
        ok = [f.name for f in d.features if f.vfio_path and f.status is Status.OK]
        lines.append(f"This host can hand devices to VMs via: {', '.join(ok)}.")
    else:
        lines.append("This host cannot hand devices to VMs yet: see the fixes above.")
    return "\n".join(lines)


def _doctor(args: argparse.Namespace) -> int:
    host = Host(args.sysfs_root, args.dev_root, args.proc_root)
    facts = gather(host, find_tools(), args.modules_root, args.boot_root)
    d = diagnose(facts)
    if args.json:
        print(json.dumps(doctor_json(d), indent=2))
    else:
        print(render_doctor(d))
    return 0 if d.usable else 1
