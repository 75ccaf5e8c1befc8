"""The guides' fenced blocks, and the command lines in them, for the tests that run or check them.

One reader of the pages for every tier: the lab follows the quick starts
verbatim with :func:`blocks` (tests/lab/test_docs_quickstart.py); the unit
tier hands every ``kvmvfio`` command line of every guide to the real
argument parser (:func:`cli_refusal`, also what tests/unit/test_advice.py
checks the commands that error messages suggest with) and compiles every
Python snippet (tests/unit/test_docs.py).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from kvmvfio.cli import make_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```$", re.S | re.M)
#: Blocks whose every line is a command (a shell script as the reader types it).
SHELL = frozenset({"sh", "bash", "shell"})
#: Blocks of a terminal session: commands are the lines after a ``$`` prompt.
SESSION = frozenset({"console", "text", ""})
#: Shell operators that end one simple command and start the next.
_SEPARATORS = frozenset({"&&", "||", ";", "|", "&"})
#: Placeholders a page or a message may write where the reader puts a value.
PLACEHOLDERS = {"NAME": "vm1", "ADDR": "0000:03:00.0", "OWNER": "vm1", "PID": "4242"}


class Block(NamedTuple):
    """One fenced block: its language (``""`` for none), its ``title="..."``, its text."""

    lang: str
    title: str
    body: str


def guides() -> list[Path]:
    """The pages a reader follows: README.md and docs/*.md (not the generated reference)."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, in order."""
    out = []
    for lang, info, body in _BLOCK.findall(page.read_text()):
        title = re.search(r'title="([^"]+)"', info)
        out.append(Block(lang, title.group(1) if title else "", body))
    return out


def _lines(block: Block) -> Iterator[str]:
    """The command lines of a block, continuations joined."""
    text = block.body.replace("\\\n", " ")
    for line in text.splitlines():
        if block.lang in SHELL:
            yield line
        elif block.lang in SESSION and line.startswith("$ "):
            yield line[2:]
        elif block.lang == "ini" and line.startswith("ExecStart="):
            yield line[len("ExecStart=") :]


def _simple_commands(line: str) -> Iterator[list[str]]:
    """Split a shell line into its simple commands' words, without redirections or comments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token in _SEPARATORS:
            if words:
                yield words
            words = []
        else:
            words.append(token)


def _without_redirections(words: list[str]) -> list[str]:
    for i, word in enumerate(words):
        if word and set(word) <= set("<>"):
            # `2> file`: the fd number is its own word before the operator.
            return words[: i - 1] if i and words[i - 1].isdigit() else words[:i]
    return words


def _without_optional(words: list[str]) -> list[str]:
    """Drop ``[...]`` (the pages' syntax for what may be left out), over one word or several."""
    out, depth = [], 0
    for word in words:
        depth += word.startswith("[")
        if not depth:
            out.append(word)
        depth -= word.endswith("]") and depth > 0
    return out


def kvmvfio_args(words: list[str]) -> list[str] | None:
    """The arguments of a simple command that runs kvmvfio, or None for another program.

    kvmvfio is run as ``kvmvfio``, by a path (``/opt/kvmvfio/bin/kvmvfio``), or as
    ``python3 -m kvmvfio``; ``sudo`` and ``VAR=value`` in front are skipped.
    """
    while words and (words[0] == "sudo" or re.match(r"^[A-Za-z_]\w*=", words[0])):
        words = words[1:]
    if words and words[0].rsplit("/", 1)[-1] == "kvmvfio":
        return words[1:]
    if words[1:3] == ["-m", "kvmvfio"] and re.fullmatch(r"(\S*/)?python3?", words[0]):
        return words[3:]
    return None


def kvmvfio_commands(block: Block) -> Iterator[list[str]]:
    """The argument lists of every kvmvfio command line in ``block``."""
    for line in _lines(block):
        for words in _simple_commands(line):
            args = kvmvfio_args(_without_redirections(words))
            if args is not None:
                yield _without_optional(args)


def cli_refusal(args: list[str] | str) -> str:
    """``''`` when kvmvfio's own parser takes ``args``, else its complaint.

    ``args`` are the words after ``kvmvfio`` (a string is split as a shell
    would, its first word being ``kvmvfio``); :data:`PLACEHOLDERS` are
    replaced by values first.
    """
    words = shlex.split(args)[1:] if isinstance(args, str) else args
    words = [PLACEHOLDERS.get(w, w) for w in words]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            make_parser().parse_args(words)
        except SystemExit as exit_:
            if exit_.code not in (0, None):  # --help and --version exit 0
                return err.getvalue() or f"exit {exit_.code}"
    return ""
