"""Write the reference pages of the docs from the code: the CLI from its parser, the API
from its docstrings. ``python tools/reference.py`` rewrites docs/reference/; the unit
tier checks that what is committed is what this writes (tests/unit/test_docs.py).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference"

#: The public modules, in the order a reader meets them (layers, bottom up).
API_MODULES = (
    "kvmvfio.errors",
    "kvmvfio.host",
    "kvmvfio.kvm",
    "kvmvfio.vfio.session",
    "kvmvfio.vfio.reset",
    "kvmvfio.qemu.qmp",
    "kvmvfio.qemu.handoff",
    "kvmvfio.qemu.coldplug",
    "kvmvfio.prepare",
    "kvmvfio.libvirt.metadata",
    "kvmvfio.libvirt.monitor",
    "kvmvfio.libvirt.agent",
)
#: Modules whose page says where each re-exported name lives (the errors' map).
_REEXPORTING = ("kvmvfio.errors",)
_HEADER = "<!-- Written by tools/reference.py from the code; do not edit by hand. -->\n\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps them only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> str:
    """The CLI reference: every command's --help, as argparse prints it."""
    from kvmvfio.cli import make_parser  # noqa: PLC0415 (after sys.path is set in main)

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: make it one width
    # Some defaults name this interpreter (`hook install --python`): write the
    # page as for the system's python3, whatever venv or tox runs this.
    executable, sys.executable = sys.executable, "/usr/bin/python3"
    try:
        return _cli_text(make_parser())
    finally:
        sys.executable = executable


def _cli_text(parser: argparse.ArgumentParser) -> str:
    parser.prog = "kvmvfio"
    out = [_HEADER, "# CLI reference\n\n", "```text\n", parser.format_help(), "```\n"]
    for name, sub in _subparsers(parser).items():
        out += [f"\n## kvmvfio {name}\n\n", "```text\n", sub.format_help(), "```\n"]
        for subname, subsub in _subparsers(sub).items():
            out += [f"\n### kvmvfio {name} {subname}\n\n", "```text\n", subsub.format_help()]
            out.append("```\n")
    return "".join(out)


def _public(module: object) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    items = []
    for name in names:
        obj = getattr(module, name)
        if not str(getattr(obj, "__module__", "")).startswith("kvmvfio"):
            continue  # imported from elsewhere (dataclasses.field, ...)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            items.append((name, obj))
    return items


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "(undocumented)")


def _signature(name: str, obj: object) -> str:
    try:
        text = f"{name}{inspect.signature(obj)}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name
    return re.sub(r" at 0x[0-9a-f]+>", ">", text)  # object reprs: no addresses, stable pages


def api_page() -> str:
    """The API reference: each public module's docstring, classes and functions."""
    out = [_HEADER, "# API reference\n"]
    for modname in API_MODULES:
        module = importlib.import_module(modname)
        out += [f"\n## `{modname}`\n\n", _doc(module), "\n"]
        for name, obj in _public(module):
            kind = "class" if inspect.isclass(obj) else "def"
            out += [f"\n### `{name}`\n\n```python\n{kind} {_signature(name, obj)}\n```\n\n"]
            home = getattr(obj, "__module__", modname)
            if modname in _REEXPORTING and home != modname:
                out += [f"Lives in `{home}`; re-exported here.\n\n"]
            out += [_doc(obj), "\n"]
            if inspect.isclass(obj):
                for mname, member in vars(obj).items():
                    if mname.startswith("_") or not callable(member) or not member.__doc__:
                        continue
                    out += [f"\n- `{_signature(mname, member)}`: {_doc(member).splitlines()[0]}\n"]
    return "".join(out)


PAGES = {"cli.md": cli_page, "api.md": api_page}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, page in PAGES.items():
        (OUT / name).write_text(page())
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
