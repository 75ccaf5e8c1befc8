"""Any argument vector gets an answer: a result, or a sentence and exit 1 or 2, never a traceback.

Generated argument vectors for the commands that read or change the host
(inventory, group, check, prepare, release, recover, status), each run with
fake sysfs, /dev and journal roots, so that nothing on this machine is read
or written. The QEMU commands (attach, detach) have their own tier in
tests/unit/test_qemu_hostile.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmvfio.cli import run

#: Cases per run; docs/BENCHMARKS.md (Reliability) quotes it.
CASES = 1000
#: Seconds one command may take before the case counts as a hang.
DEADLINE_S = 10

_ROOTS = {
    "inventory": ("--sysfs-root", "--dev-root", "--proc-root"),
    "group": ("--sysfs-root", "--dev-root", "--proc-root"),
    "check": ("--sysfs-root", "--dev-root"),
    "prepare": ("--sysfs-root", "--dev-root", "--root"),
    "release": ("--sysfs-root", "--dev-root", "--root"),
    "recover": ("--sysfs-root", "--dev-root", "--root"),
    "status": ("--sysfs-root", "--dev-root", "--root"),
}

_addresses = st.sampled_from(
    ["0000:00:03.0", "00:04.0", "0000:00:09.0", "0000:01:00.0", "3", "14", "ffff:ff:1f.7"]
)
_numbers = st.sampled_from(["nan", "inf", "-1", "0", "1e400", str(2**70), "1", str(os.getpid())])
_junk = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=0, max_size=40
)
_undecodable = st.binary(min_size=1, max_size=12).map(lambda b: os.fsdecode(b.replace(b"\0", b"")))


_owners = st.sampled_from(["vm1", "vm2", "libvirt:web", "vm 1", ""]) | _junk
_choices = {
    "--path": ["auto", "cdev", "group", "group-iommufd", "iommufd", "legacy"],
    "--coherency": ["require", "warn", "ignore"],
    "--force": ["boot-vga", "console", "disk-in-use", "mounted", "default-route", "in-use"],
}
#: Per command: its options, each with the values it is tried with (None: a switch).
_OPTIONS: dict[str, dict[str, st.SearchStrategy[str] | None]] = {
    "inventory": {"--json": None},
    "group": {"--json": None},
    "check": {
        "--json": None,
        "--allow-noiommu": None,
        "--path": st.sampled_from(_choices["--path"]) | _junk,
        "--coherency": st.sampled_from(_choices["--coherency"]) | _junk,
    },
    "prepare": {
        "--json": None,
        "--owner": _owners,
        "--owner-pid": _numbers | _junk,
        "--force": st.sampled_from(_choices["--force"]) | _junk,
    },
    "release": {"--json": None, "--reset": None, "--owner": _owners},
    "recover": {"--json": None},
    "status": {"--json": None},
}
_POSITIONAL = {"group": (1, 1), "check": (1, 3), "prepare": (1, 3), "release": (1, 3)}


@st.composite
def _argv(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed command lines, with bad values and junk mixed in."""
    command = draw(st.sampled_from(sorted(_OPTIONS)))
    words = [command]
    low, high = _POSITIONAL.get(command, (0, 0))
    # Mostly real addresses (so commands get past parsing), sometimes junk.
    positional = st.one_of(_addresses, _addresses, _addresses, _junk)
    words += draw(st.lists(positional, min_size=low, max_size=high))
    if command == "prepare" and draw(st.integers(0, 4)):
        words += ["--owner", draw(st.sampled_from(["vm1", "vm2"]))]
    for option in draw(st.lists(st.sampled_from(sorted(_OPTIONS[command])), max_size=4)):
        values = _OPTIONS[command][option]
        words.append(option)
        if values is not None:
            words.append(draw(values))
    if draw(st.integers(0, 9)) == 0:  # now and then, a stray word anywhere
        words.insert(draw(st.integers(1, len(words))), draw(_junk | _numbers))
    return words


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("fuzz")
    devices = [Dev(f"0000:00:0{n}.0", driver="vfio-pci", group=n) for n in (3, 4, 5)]
    devices.append(Dev("0000:00:09.0", driver="vfio-pci", group=None))
    sysfs, devfs = Topology(devices=devices).build(base / "host")
    proc = base / "proc"
    proc.mkdir()
    (proc / "cmdline").write_text("console=ttyS0\n")
    return {
        "--sysfs-root": str(sysfs),
        "--dev-root": str(devfs),
        "--proc-root": str(proc),
        "--root": str(base / "run"),
    }


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def hang(*_: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _deadline(DEADLINE_S):
        try:
            code = run(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, err.getvalue()


def _leaks(argv: list[str]) -> tuple[int, str, list[str]]:
    """Run ``argv``; also what fd owners were dropped open meanwhile (their ResourceWarnings).

    Raised inside ``__del__``, the warning would reach pytest only as an
    unraisable exception after the whole test, with no case to shrink to.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        code, err = _run(argv)
    for w in caught:
        if not issubclass(w.category, ResourceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return code, err, [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@settings(
    max_examples=CASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(argv=_argv())
def test_any_argv_gets_a_result_or_a_sentence(roots: dict[str, str], argv: list[str]) -> None:
    command = argv[0]
    full = list(argv)
    for flag in _ROOTS[command]:
        full += [flag, roots[flag]]
    if command == "check":
        full.append("--no-kvm")
    code, err, leaks = _leaks(full)
    event(f"{command} exit {code}")
    assert not leaks, (full, leaks)
    assert code in (0, 1, 2), (full, code, err)
    assert "Traceback" not in err, (full, err)
    if code != 0:
        assert err.strip(), (full, "a failure must say why")
    # Nothing outside the given roots: the real journal folder is untouched.
    assert not Path("/run/kvmvfio/journal/group-3.json").exists()


def test_the_tier_can_fail_on_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle sees an exception that is not kvmvfio's (it escapes run())."""
    import kvmvfio.cli.prepare_cmds as cmds  # noqa: PLC0415

    def boom(_: object) -> int:
        raise ZeroDivisionError

    monkeypatch.setattr(cmds, "_status", boom)
    with pytest.raises(ZeroDivisionError):
        _run(["status", "--root", "/nonexistent"])
