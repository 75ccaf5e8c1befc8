"""The docs say what the code does: quoted messages, generated reference pages, commands.

The quick starts are followed verbatim in the lab (tests/lab/test_docs_quickstart.py);
here, every kvmvfio command line of every guide's blocks is handed to the CLI's
own parser, and every Python snippet is compiled and must name only what kvmvfio
has (tests/docpages.py reads the pages for both tiers). ``mkdocs build --strict``
(tox -e docs) checks the site and its links.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import shlex
import sys
import types
from pathlib import Path

import pytest
from docpages import blocks, cli_refusal, guides, kvmvfio_commands
from troubleshooting_cases import CASES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT / "tools"))
import reference  # noqa: E402 (tools/ is not a package)


@pytest.mark.parametrize("case", list(CASES))
def test_troubleshooting_quotes_each_message_as_printed(case: str) -> None:
    page = (DOCS / "troubleshooting.md").read_text()
    assert f"kvmvfio: {CASES[case]}\n" in page


@pytest.mark.parametrize("name", list(reference.PAGES))
def test_reference_pages_are_up_to_date(name: str) -> None:
    committed = (DOCS / "reference" / name).read_text()
    assert committed == reference.PAGES[name](), (
        f"docs/reference/{name} is stale: run `python tools/reference.py`"
    )


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in guides():
        for block in blocks(page):
            found += [(page.name, args) for args in kvmvfio_commands(block)]
    return found


def test_the_command_reader_finds_the_commands_of_every_kind_of_block() -> None:
    found = {(page, shlex.join(args)) for page, args in _commands()}
    assert ("quickstart-libvirt.md", "hook install") in found  # ```sh
    assert ("quickstart-operators.md", "doctor") in found  # /opt/kvmvfio/bin/kvmvfio
    assert ("gpu.md", "reset --info 0000:01:01.0") in found  # ```console, after `$ `
    assert ("prepare.md", "recover") in found  # ```ini, ExecStart=
    assert ("prepare.md", "release --owner vm1 0000:03:00.0") in found  # [--reset] left out
    assert ("undo.md", "release --owner libvirt:vm1 --reset 0000:00:05.0") in found


@pytest.mark.parametrize(
    ("page", "args"), [pytest.param(p, a, id=f"{p}-{shlex.join(a)}") for p, a in _commands()]
)
def test_every_documented_command_is_accepted_by_the_cli(page: str, args: list[str]) -> None:
    refusal = cli_refusal(args)
    assert refusal == "", f"{page}: `kvmvfio {shlex.join(args)}` is refused: {refusal}"


def _snippets() -> list[object]:
    return [
        pytest.param(page.name, n, block.body, id=f"{page.name}-block{n}")
        for page in guides()
        for n, block in enumerate(blocks(page))
        if block.lang == "python"
    ]


def _kvmvfio_names(tree: ast.AST) -> dict[str, str]:
    """Each name a snippet binds by importing from kvmvfio, and what it names (``mod:attr``)."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kvmvfio":
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else "kvmvfio"
                    )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kvmvfio":
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    return bound


def _resolve(target: str) -> object:
    """The object ``mod`` or ``mod:attr`` names: an attribute, else a submodule."""
    module, _, attr = target.partition(":")
    found = importlib.import_module(module)
    if not attr:
        return found
    if hasattr(found, attr):
        return getattr(found, attr)
    return importlib.import_module(f"{module}.{attr}")


@pytest.mark.parametrize(("page", "n", "code"), _snippets())
def test_every_python_snippet_compiles_and_names_what_kvmvfio_has(
    page: str, n: int, code: str
) -> None:
    where = f"{page}, Python block {n}"
    tree = compile(code, where, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    compile(tree, where, "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    bound = _kvmvfio_names(tree)
    for name, target in bound.items():
        try:
            _resolve(target)
        except (ImportError, AttributeError) as err:
            pytest.fail(f"{where}: `{name}` ({target}) is not in kvmvfio: {err}")
    # `module.name` on an imported kvmvfio module, as in `sriov.set_vfs(...)`.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            owner = _resolve(bound[node.value.id])
            if isinstance(owner, types.ModuleType):
                assert hasattr(owner, node.attr) or importlib.util.find_spec(
                    f"{owner.__name__}.{node.attr}"
                ), f"{where}: {node.value.id}.{node.attr}: {owner.__name__} has no {node.attr}"


_SINCE = re.compile(r"\*[Ss]ince\s+(Linux|QEMU|libvirt)\s+([0-9][0-9.]*[0-9])\*")


def _since_marks() -> list[object]:
    return [
        pytest.param(page.name, project, version, id=f"{page.name}-{project} {version}")
        for page in guides()
        if page.name != "requirements.md"
        for project, version in _SINCE.findall(page.read_text())
    ]


def test_the_guides_mark_versions_with_since() -> None:
    # libvirt's way ("Since 6.5.0"), not ">= 9" or "9+": the versions live in requirements.md.
    assert len(_since_marks()) >= 10
    for page in guides():
        if page.name != "requirements.md":
            text = page.read_text()
            assert not re.search(r"(QEMU|libvirt|Linux) ?(>=|[0-9.]+\+)", text), page.name


@pytest.mark.parametrize(("page", "project", "version"), _since_marks())
def test_every_since_mark_is_a_version_requirements_md_gives(
    page: str, project: str, version: str
) -> None:
    table = (DOCS / "requirements.md").read_text()
    assert re.search(rf"{project} {re.escape(version)}(?![0-9.])", table), (
        f"{page}: *since {project} {version}* is not a version docs/requirements.md gives"
    )
