"""``python -m kvmvfio.uapi``: the ioctl numbers and struct sizes kvmvfio uses.

Without options, a table for people. ``--json`` prints one JSON object,
a stable interface::

    {"ioctls": {"VFIO_GET_API_VERSION": 15204, ...},
     "sizes": {"vfio_group_status": 8, ...}}

with every ioctl and every struct :mod:`kvmvfio.uapi` declares. ``--full``
adds ``"offsets"`` (``"kvm_device_attr.addr": 16``, every field of every
struct) and ``"constants"`` (every ``#define`` and enumerator). The header
test compiles a C program from this output against the real kernel headers
and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from kvmvfio import uapi


def make_parser() -> argparse.ArgumentParser:
    """The command line parser (for ``main`` and for documentation)."""
    parser = argparse.ArgumentParser(
        prog="python -m kvmvfio.uapi",
        description=(
            f"Print the ioctl numbers and struct sizes kvmvfio uses "
            f"(Linux {uapi.KERNEL_RELEASE} uAPI)."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also field offsets and constants (implies --json)",
    )
    return parser


def report(*, full: bool = False) -> dict[str, dict[str, int]]:
    """The ``--json`` object: ioctl numbers and struct sizes (and with ``full`` more)."""
    out = {
        "ioctls": {name: op.number for name, op in uapi.IOCTLS.items()},
        "sizes": dict(uapi.SIZES),
    }
    if full:
        out["offsets"] = uapi.field_offsets()
        out["constants"] = dict(uapi.CONSTANTS)
    return out


def _table() -> str:
    lines = [f"ioctls (Linux {uapi.KERNEL_RELEASE} uAPI)", ""]
    lines.append(f"{'name':36} {'number':>10}  {'dir':10} {'type':>4} {'nr':>4} {'size':>4}  arg")
    for op in uapi.IOCTLS.values():
        lines.append(
            f"{op.name:36} {op.number:#10x}  {op.direction:10} {op.type:#4x} {op.nr:#4x} "
            f"{op.size:4}  {op.arg or '-'}"
        )
    lines += ["", "structs", "", f"{'name':40} {'size':>4}  header"]
    for name, size in uapi.SIZES.items():
        lines.append(f"{name:40} {size:4}  {uapi.STRUCT_HEADERS.get(name, '?')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table or the JSON object; return the exit status (2 for bad arguments)."""
    args = make_parser().parse_args(argv)
    text = json.dumps(report(full=args.full), indent=2) if args.json or args.full else _table()
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `| head` closed the pipe: the reader's choice, not an error. Point
        # stdout at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
