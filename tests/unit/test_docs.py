"""The docs say what the code does: quoted messages, generated reference pages, commands.

The quick starts are followed verbatim in the lab (tests/lab/test_docs_quickstart.py);
``mkdocs build --strict`` (tox -e docs) checks the site and its links.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
from troubleshooting_cases import CASES

from kvmvfio.cli import make_parser

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


_SH = re.compile(r"^```sh\n(.*?)^```$", re.S | re.M)


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for block in _SH.findall(page.read_text()):
            for raw in block.replace("\\\n", " ").splitlines():
                line = raw.split(" #", 1)[0].strip()
                if line.startswith("kvmvfio "):
                    found.append((page.name, line))
    return found


@pytest.mark.parametrize(("page", "line"), _commands())
def test_every_documented_command_is_accepted_by_the_cli(page: str, line: str) -> None:
    words = shlex.split(line, comments=True)
    # Shell around the command: a redirection or pipe ends it; [...] is optional syntax.
    words = words[: next((i for i, w in enumerate(words) if w in (">", "|", "&&")), len(words))]
    text = " ".join(words)
    text = re.sub(r"\[[^]]*\]", "", text)
    err = io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(err):
        try:
            make_parser().parse_args(shlex.split(text)[1:])
        except SystemExit as exit_:
            code = exit_.code
    assert code == 0, f"{page}: `{line}` is refused: {err.getvalue()}"
