"""``kvmvfio hook install|uninstall|show`` and the shell front it installs.

The front is run for real, with ``/bin/sh``, dash, bash and busybox where
present, and with the kernel's ``#!`` (as libvirt runs it). Its ``--python``
is a fake interpreter (a shell script in ``tmp_path``) that writes down its
argv, its ``PYTHONPATH`` and its stdin, so the tests see exactly what the
Python side would get, or that it was never started.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kvmvfio
from kvmvfio.cli import hook_cmds, run
from kvmvfio.errors import UsageError
from kvmvfio.libvirt import install as inst
from kvmvfio.libvirt.install import (
    MARKER,
    ForeignHook,
    HookFileError,
    HooksDirMissing,
    install,
    render,
    uninstall,
)

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "kvmvfio" / "libvirt" / "hook-front.sh"
#: The namespace the front looks for (kvmvfio.libvirt.metadata.NAMESPACE).
NS = "urn:kvmvfio:libvirt:1"
#: What libvirt leaves a hook: PATH (and a few others), no PYTHONPATH.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
ARGV_TAIL = ["vm1", "prepare", "begin", "-"]
BIG_PAD = 1600  # disks in the ~200 KB domain


def _shells() -> dict[str, list[str]]:
    shells = {"sh": ["/bin/sh"]}
    for name, argv in (("dash", ["dash"]), ("bash", ["bash", "--posix"])):
        if shutil.which(name):
            shells[name] = argv
    busybox = ["busybox", "sh"]
    if (
        shutil.which("busybox")
        and subprocess.run([*busybox, "-c", ":"], check=False).returncode == 0
    ):
        shells["busybox"] = busybox
    return shells


#: The shells to run the front with; "exec" lets the kernel read its #!/bin/sh, like libvirt.
SHELLS = [pytest.param([], id="exec")] + [pytest.param(a, id=n) for n, a in _shells().items()]

# -- a fake interpreter -------------------------------------------------------


@dataclass(frozen=True)
class FakePython:
    """A shell script standing in for python3; it records what it was given."""

    path: Path
    record: Path

    @property
    def ran(self) -> bool:
        return (self.record / "argv").exists()

    def argv(self) -> list[str]:
        raw = (self.record / "argv").read_bytes()
        return raw.decode().split("\0")[:-1]

    def stdin(self) -> bytes:
        return (self.record / "stdin").read_bytes()

    def pythonpath(self) -> str | None:
        p = self.record / "pythonpath"
        return p.read_text() if p.exists() else None


def make_fake_python(
    folder: Path, *, exit_code: int = 0, stderr: str = "", name: str = "python3"
) -> FakePython:
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "record"
    record.mkdir()
    path = folder / name
    rec = shlex.quote(str(record))
    path.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\0' \"$@\" > {rec}/argv\n"
        f'if [ "${{PYTHONPATH+set}}" ]; then printf %s "$PYTHONPATH" > {rec}/pythonpath; fi\n'
        f"cat > {rec}/stdin\n"
        # As `kvmvfio hook install` runs it (-c): say where kvmvfio came from, like Python.
        'if [ "$1" = -c ]; then printf \'%s/kvmvfio/__init__.py\\n3.11.0\\n\' "$PYTHONPATH"; fi\n'
        f"printf %s {shlex.quote(stderr)} >&2\n"
        f"exit {exit_code}\n"
    )
    path.chmod(0o755)
    return FakePython(path, record)


@pytest.fixture
def fake(tmp_path: Path) -> FakePython:
    return make_fake_python(tmp_path / "bin")


@pytest.fixture
def hooks(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "libvirt" / "hooks"


@pytest.fixture
def pypath(tmp_path: Path) -> str:
    p = tmp_path / "site"
    (p / "kvmvfio").mkdir(parents=True)  # the front checks it is there
    return str(p)


@pytest.fixture
def front(hooks: Path, fake: FakePython, pypath: str) -> Path:
    (hooks.parent).mkdir(parents=True)
    return install(hooks, str(fake.path), pythonpath=pypath).path


def run_front(
    shell: list[str],
    front: Path,
    args: list[str],
    stdin: bytes | int = b"",
    timeout: float = 20,
    env: dict[str, str] = ENV,
) -> subprocess.CompletedProcess[bytes]:
    cmd = [*shell, str(front), *args]
    if isinstance(stdin, int):
        return subprocess.run(
            cmd, check=False, stdin=stdin, capture_output=True, env=env, timeout=timeout
        )
    return subprocess.run(
        cmd, check=False, input=stdin, capture_output=True, env=env, timeout=timeout
    )


def domain_xml(*, namespace: str | None = NS, pad: int = 0, extra: str = "") -> bytes:
    """A libvirt-like domain XML, with kvmvfio metadata if ``namespace``."""
    meta = (
        f'    <kvmvfio:devices xmlns:kvmvfio="{namespace}">\n'
        '      <kvmvfio:device address="0000:03:00.0"/>\n'
        "    </kvmvfio:devices>\n"
        if namespace
        else ""
    )
    disks = "".join(
        f"    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/d{i}.qcow2'/>"
        f"<target dev='vd{i}' bus='virtio'/></disk>\n"
        for i in range(pad)
    )
    return (
        "<domain type='kvm'>\n  <name>vm1</name>\n"
        "  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>\n"
        f"  <metadata>\n{meta}  </metadata>\n"
        f"  <description>{extra}</description>\n"
        f"  <devices>\n{disks}  </devices>\n</domain>\n"
    ).encode()


# -- the template -------------------------------------------------------------


def test_template_header_marker_and_placeholders(fake: FakePython, pypath: str) -> None:
    lines = TEMPLATE.read_text().splitlines()
    assert lines[0] == "#!/bin/sh"
    assert lines[1] == MARKER
    assert "@VERSION@" in lines[2]
    text = render(str(fake.path), pypath)
    assert not re.search(r"@[A-Z]+@", text), "a placeholder was left in the rendered front"
    assert f"kvmvfio {kvmvfio.__version__}" in text.splitlines()[2]
    assert f"python={shlex.quote(str(fake.path))}\n" in text
    assert f"PYTHONPATH={shlex.quote(pypath)}\n" in text


def _namespaces_in_template() -> list[str]:
    return re.findall(r'^\*"([^"$]*)"\*\)', TEMPLATE.read_text(), re.MULTILINE)


def test_front_looks_for_the_metadata_namespace() -> None:
    if importlib.util.find_spec("kvmvfio.libvirt.metadata") is None:
        pytest.skip("kvmvfio.libvirt.metadata is not written yet")
    from kvmvfio.libvirt.metadata import NAMESPACE  # noqa: PLC0415 (may be absent)

    assert _namespaces_in_template() == [NAMESPACE]
    assert NS == NAMESPACE


@pytest.mark.parametrize("shell", SHELLS[1:])
def test_front_parses(shell: list[str], fake: FakePython, pypath: str, tmp_path: Path) -> None:
    script = tmp_path / "front.sh"
    script.write_text(render(str(fake.path), pypath))
    proc = subprocess.run([*shell, "-n", str(script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_package_data_ships_the_template() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert "hook-front.sh" in data["kvmvfio.libvirt"]
    assert data["kvmvfio.lab"] == ["topologies/*.toml"]


def test_cli_defaults_match_the_library() -> None:
    assert Path(hook_cmds.DEFAULT_HOOKS_DIR) == inst.DEFAULT_HOOKS_DIR
    assert hook_cmds.DEFAULT_NAME == inst.DEFAULT_NAME


# -- running the front ----------------------------------------------------------

IGNORED = [
    ("prepare", "end"),
    ("release", "begin"),
    ("start", "begin"),
    ("started", "begin"),
    ("stopped", "end"),
    ("migrate", "begin"),
    ("restore", "begin"),
    ("reconnect", "begin"),
    ("attach", "begin"),
]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("op", "subop"), IGNORED)
def test_other_events_exit_without_reading_stdin(
    shell: list[str], op: str, subop: str, front: Path, fake: FakePython
) -> None:
    # The write end stays open: a front that read stdin would block until the timeout.
    sent = domain_xml()
    r, w = os.pipe()
    try:
        os.write(w, sent)
        proc = run_front(shell, front, ["vm1", op, subop, "-"], stdin=r, timeout=10)
        os.set_blocking(r, False)
        left = os.read(r, 1 << 16)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""  # for migrate/restore libvirt would take it as the new XML
    assert left == sent, "the front read from stdin"
    assert not fake.ran


@pytest.mark.parametrize("shell", SHELLS)
def test_no_arguments_exit_0(shell: list[str], front: Path, fake: FakePython) -> None:
    proc = run_front(shell, front, [], stdin=domain_xml())
    assert (proc.returncode, fake.ran) == (0, False)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("op", "subop"), [("prepare", "begin"), ("release", "end")])
@pytest.mark.parametrize(
    "xml",
    [
        pytest.param(domain_xml(namespace=None, pad=40), id="no-metadata"),
        pytest.param(domain_xml(namespace="urn:kvmvfio:libvirt:2"), id="other-version"),
        pytest.param(domain_xml(namespace="urn:kvmvfio:libvirt"), id="prefix"),
        pytest.param(b"", id="empty"),
    ],
)
def test_domains_without_the_namespace_do_not_start_python(
    shell: list[str], op: str, subop: str, xml: bytes, front: Path, fake: FakePython
) -> None:
    proc = run_front(shell, front, ["vm1", op, subop, "-"], stdin=xml)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    assert not fake.ran


STRANGE = (
    "quotes ' \" `uname` $HOME ${x} $(false) \\ \\n \\c \\0 %s %d %% *?[a] -n -e "
    "é ü 日本語 🦀 \t tab\r\n-- leading dash line"
)
PAYLOADS = [
    pytest.param(domain_xml(), id="small"),
    pytest.param(domain_xml(pad=BIG_PAD), id="200KB"),
    pytest.param(domain_xml(extra=STRANGE), id="quotes-dollar-backslash-percent-utf8"),
    pytest.param(domain_xml().rstrip(b"\n"), id="no-final-newline"),
    pytest.param(domain_xml() + b"\n\n\n", id="final-newlines"),  # reach Python without them
    pytest.param(b"\n\n" + domain_xml() + b"x", id="ends-with-x"),
    pytest.param("é".encode("latin-1") + domain_xml(), id="not-utf8"),
]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("xml", PAYLOADS)
def test_kvmvfio_domains_reach_python_unchanged(
    shell: list[str], xml: bytes, front: Path, fake: FakePython, pypath: str
) -> None:
    proc = run_front(shell, front, ARGV_TAIL, stdin=xml)
    assert proc.returncode == 0, proc.stderr
    assert fake.argv() == ["-m", "kvmvfio.libvirt.hook", *ARGV_TAIL]
    assert fake.stdin() == xml.rstrip(b"\n")  # trailing newlines: XML ignores them
    assert fake.pythonpath() == pypath


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("bad", [b"\0", b"\x01"], ids=["NUL", "SOH"])
def test_a_nul_byte_is_refused_not_dropped(
    shell: list[str], bad: bytes, front: Path, fake: FakePython
) -> None:
    xml = domain_xml(extra="a" + bad.decode() + "b")
    proc = run_front(shell, front, ARGV_TAIL, stdin=xml)
    assert proc.returncode == 1
    assert proc.stderr.decode() == (
        "kvmvfio: the domain XML holds a NUL or U+0001 byte, which XML forbids; refused\n"
    )
    assert not fake.ran  # Python never saw XML the shell had changed


@pytest.mark.parametrize("shell", SHELLS)
def test_a_nul_byte_in_another_domain_changes_nothing(
    shell: list[str], front: Path, fake: FakePython
) -> None:
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml(namespace=None, extra="a\0b"))
    assert proc.returncode == 0
    assert not fake.ran


@pytest.mark.parametrize("shell", SHELLS)
def test_a_stray_pythonpath_is_replaced(
    shell: list[str], front: Path, fake: FakePython, pypath: str
) -> None:
    env = {**ENV, "PYTHONPATH": "/not/this/one"}
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml(), env=env)
    assert proc.returncode == 0, proc.stderr
    assert fake.pythonpath() == pypath


def test_the_200kb_payload_is_that_big() -> None:
    assert len(domain_xml(pad=BIG_PAD)) > 200_000


@pytest.mark.parametrize("shell", SHELLS)
def test_release_end_reaches_python(shell: list[str], front: Path, fake: FakePython) -> None:
    args = ["vm 2", "release", "end", "-"]
    proc = run_front(shell, front, args, stdin=domain_xml())
    assert proc.returncode == 0, proc.stderr
    assert fake.argv() == ["-m", "kvmvfio.libvirt.hook", *args]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("code", [0, 1, 3])
def test_python_exit_status_and_stderr_pass_through(
    shell: list[str], code: int, hooks: Path, tmp_path: Path, pypath: str
) -> None:
    said = f"kvmvfio: IOMMU group 4 is not viable (exit {code})"
    fake = make_fake_python(tmp_path / "bin", exit_code=code, stderr=said)
    hooks.parent.mkdir(parents=True)
    front = install(hooks, str(fake.path), pythonpath=pypath).path
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == code
    assert proc.stderr.decode() == said
    assert fake.ran


WEIRD = 'it\'s a "dir" with $HOME, `x`, \\ and\nnewline'


@pytest.mark.parametrize("shell", SHELLS)
def test_paths_with_spaces_and_quotes(shell: list[str], hooks: Path, tmp_path: Path) -> None:
    fake = make_fake_python(tmp_path / WEIRD, name="py thon'3")
    pythonpath = tmp_path / f"site {WEIRD}"
    (pythonpath / "kvmvfio").mkdir(parents=True)
    hooks.parent.mkdir(parents=True)
    front = install(hooks, str(fake.path), pythonpath=str(pythonpath)).path
    xml = domain_xml()
    proc = run_front(shell, front, ARGV_TAIL, stdin=xml)
    assert proc.returncode == 0, proc.stderr
    assert fake.argv() == ["-m", "kvmvfio.libvirt.hook", *ARGV_TAIL]
    assert fake.stdin() == xml.rstrip(b"\n")
    assert fake.pythonpath() == str(pythonpath)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("gone", ["python", "kvmvfio"])
def test_front_says_to_reinstall_when_its_python_or_kvmvfio_is_gone(
    shell: list[str], gone: str, hooks: Path, tmp_path: Path
) -> None:
    fake = make_fake_python(tmp_path / WEIRD, name="py thon'3")
    pythonpath = tmp_path / f"site {WEIRD}"
    (pythonpath / "kvmvfio").mkdir(parents=True)
    hooks.parent.mkdir(parents=True)
    front = install(hooks, str(fake.path), pythonpath=str(pythonpath)).path
    if gone == "python":
        fake.path.unlink()  # a venv removed
    else:
        (pythonpath / "kvmvfio").rmdir()  # a checkout moved
    proc = run_front(shell, front, ARGV_TAIL, stdin=domain_xml())
    assert proc.returncode == 1
    said = proc.stderr.decode()
    assert said == (
        f"kvmvfio: this hook runs {fake.path} with kvmvfio from {pythonpath}, and one of them "
        "is gone (moved or removed since the hook was installed); run `kvmvfio hook install` "
        "again with the kvmvfio to use\n"
    )
    assert not fake.ran
    # Other domains' events still pass, without a word.
    other = run_front(shell, front, ARGV_TAIL, stdin=domain_xml(namespace=None))
    assert (other.returncode, other.stdout, other.stderr) == (0, b"", b"")


# -- install --------------------------------------------------------------------


@pytest.fixture
def umask077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask077")
def test_install_writes_the_front(hooks: Path, fake: FakePython, pypath: str) -> None:
    hooks.parent.mkdir(parents=True)
    res = install(hooks, str(fake.path), pythonpath=pypath)
    target = hooks / "qemu.d" / "kvmvfio"
    assert res == inst.InstallResult(
        path=target,
        python=str(fake.path),
        pythonpath=pypath,
        replaced=False,
        forced=False,
        restart_needed=True,
    )
    assert target.read_text() == render(str(fake.path), pypath)
    assert (_mode(hooks), _mode(hooks / "qemu.d"), _mode(target)) == (0o755, 0o755, 0o755)
    assert os.listdir(hooks / "qemu.d") == ["kvmvfio"]  # no temporary file left


def test_install_defaults_to_this_kvmvfio(hooks: Path, fake: FakePython) -> None:
    hooks.parent.mkdir(parents=True)
    res = install(hooks, str(fake.path))
    assert res.pythonpath == str(REPO)
    assert Path(res.pythonpath, "kvmvfio", "__init__.py") == Path(kvmvfio.__file__).resolve()
    assert f"PYTHONPATH={shlex.quote(str(REPO))}\n" in res.path.read_text()


def test_install_name(hooks: Path, fake: FakePython, pypath: str) -> None:
    hooks.parent.mkdir(parents=True)
    res = install(hooks, str(fake.path), name="50-kvmvfio", pythonpath=pypath)
    assert res.path == hooks / "qemu.d" / "50-kvmvfio"
    assert uninstall(hooks, name="50-kvmvfio")
    for bad in ("", ".", "..", "a/b"):
        with pytest.raises(UsageError):
            install(hooks, str(fake.path), name=bad, pythonpath=pypath)


def test_reinstall_replaces_and_needs_no_restart(front: Path, fake: FakePython) -> None:
    front.write_text(front.read_text().replace("kvmvfio 0", "kvmvfio older 0"))
    res = install(front.parent.parent, str(fake.path), pythonpath="/elsewhere")
    assert (res.replaced, res.forced, res.restart_needed) == (True, False, False)
    assert "PYTHONPATH=/elsewhere\n" in front.read_text()
    assert os.listdir(front.parent) == ["kvmvfio"]


def test_libvirt_never_sees_a_second_hook_while_one_is_written(
    front: Path, fake: FakePython, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real_replace = os.replace

    def replace(src: str, dst: object) -> None:
        seen.append(sorted(os.listdir(front.parent)))  # what libvirt would run now
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(inst.os, "replace", replace)
    install(front.parent.parent, str(fake.path), pythonpath="/elsewhere")
    assert seen == [["kvmvfio"]]
    assert sorted(os.listdir(front.parent)) == ["kvmvfio"]
    assert [e for e in os.listdir(front.parent.parent) if e.endswith(".tmp")] == []


def _exe(path: Path, text: str = "#!/bin/sh\n", mode: int = 0o755) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.mark.parametrize(
    ("before", "restart"),
    [
        pytest.param({}, True, id="nothing"),
        pytest.param({"qemu": 0o755}, False, id="qemu-script"),
        pytest.param({"qemu": 0o644}, True, id="qemu-not-executable"),
        pytest.param({"qemu.d/other": 0o700}, False, id="another-hook"),
        pytest.param({"qemu.d/notes.txt": 0o644}, True, id="only-non-executable"),
        pytest.param({"qemu.d/sub/": 0o755}, True, id="only-a-folder"),
        pytest.param({"lxc": 0o755, "qemu.d/": 0o755}, True, id="other-driver"),
    ],
)
def test_restart_needed_when_libvirt_had_no_qemu_hook(
    before: dict[str, int], restart: bool, hooks: Path, fake: FakePython, pypath: str
) -> None:
    hooks.mkdir(parents=True)
    for rel, mode in before.items():
        if rel.endswith("/"):
            (hooks / rel).mkdir(parents=True, mode=mode)
        else:
            _exe(hooks / rel, mode=mode)
    res = install(hooks, str(fake.path), pythonpath=pypath)
    assert res.restart_needed is restart


def test_install_refuses_a_foreign_file(hooks: Path, fake: FakePython, pypath: str) -> None:
    target = hooks / "qemu.d" / "kvmvfio"
    _exe(target, "#!/bin/sh\n# someone's own kvmvfio script\nexit 0\n")
    with pytest.raises(ForeignHook) as exc:
        install(hooks, str(fake.path), pythonpath=pypath)
    assert str(target) in str(exc.value)
    assert "--force" in str(exc.value)
    assert target.read_text().startswith("#!/bin/sh\n# someone's")
    res = install(hooks, str(fake.path), force=True, pythonpath=pypath)
    assert (res.replaced, res.forced) == (False, True)
    assert target.read_text() == render(str(fake.path), pypath)


def test_marker_deep_in_a_file_does_not_count(hooks: Path, fake: FakePython, pypath: str) -> None:
    target = hooks / "qemu.d" / "kvmvfio"
    _exe(target, "#!/bin/sh\n" + "# padding\n" * 10 + MARKER + "\n")
    with pytest.raises(ForeignHook):
        install(hooks, str(fake.path), pythonpath=pypath)


def test_install_refuses_a_folder_and_a_dangling_link(
    hooks: Path, fake: FakePython, pypath: str
) -> None:
    target = hooks / "qemu.d" / "kvmvfio"
    target.mkdir(parents=True)
    with pytest.raises(ForeignHook, match="folder"):
        install(hooks, str(fake.path), force=True, pythonpath=pypath)
    target.rmdir()
    target.symlink_to(hooks / "nowhere")
    with pytest.raises(ForeignHook, match=re.escape(str(target))):
        install(hooks, str(fake.path), pythonpath=pypath)
    assert target.is_symlink()


def test_install_checks_the_interpreter(hooks: Path, tmp_path: Path, pypath: str) -> None:
    hooks.parent.mkdir(parents=True)
    plain = tmp_path / "plain"
    plain.write_text("")
    folder = tmp_path / "folder"
    folder.mkdir()
    for python in ("python3", str(tmp_path / "missing"), str(plain), str(folder)):
        with pytest.raises(UsageError) as exc:
            install(hooks, python, pythonpath=pypath)
        assert repr(python) in str(exc.value) or python in str(exc.value)
    assert not hooks.exists()


def test_install_refuses_a_pythonpath_python_would_split(hooks: Path, fake: FakePython) -> None:
    hooks.parent.mkdir(parents=True)
    for bad in ("/a:/b", "relative"):
        with pytest.raises(UsageError, match=re.escape(repr(bad))):
            install(hooks, str(fake.path), pythonpath=bad)


def test_install_needs_libvirts_folder(tmp_path: Path, fake: FakePython, pypath: str) -> None:
    with pytest.raises(HooksDirMissing, match="is libvirt installed"):
        install(tmp_path / "no" / "hooks", str(fake.path), pythonpath=pypath)


@pytest.mark.parametrize(
    ("patch", "err", "op", "words"),
    [
        ("tempfile.mkstemp", errno.EACCES, "open", "as root"),
        ("os.replace", errno.EROFS, "rename", "read-only"),
        ("os.fsync", errno.ENOSPC, "write", "full"),
        ("os.mkdir", errno.EPERM, "mkdir", "as root"),
    ],
)
def test_install_file_system_errors_are_sentences(
    patch: str,
    err: int,
    op: str,
    words: str,
    hooks: Path,
    fake: FakePython,
    pypath: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hooks.parent.mkdir(parents=True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(patch, refuse)
    with pytest.raises(HookFileError) as exc:
        install(hooks, str(fake.path), pythonpath=pypath)
    monkeypatch.undo()
    assert exc.value.errno == err
    assert exc.value.op == op
    assert exc.value.filename is not None
    assert exc.value.filename.startswith(str(hooks))
    assert exc.value.filename in str(exc.value)
    assert words in str(exc.value)
    assert errno.errorcode[err] in str(exc.value)
    qemu_d = hooks / "qemu.d"
    assert not qemu_d.exists() or os.listdir(qemu_d) == []  # nothing half-written left


# -- uninstall ------------------------------------------------------------------


def test_uninstall_removes_the_front(front: Path) -> None:
    assert uninstall(front.parent.parent) is True
    assert not front.exists()
    assert uninstall(front.parent.parent) is False


def test_uninstall_with_nothing_there(tmp_path: Path) -> None:
    assert uninstall(tmp_path / "hooks") is False


def test_uninstall_refuses_a_foreign_file(hooks: Path) -> None:
    target = hooks / "qemu.d" / "kvmvfio"
    _exe(target, "#!/bin/sh\nexit 0\n")
    with pytest.raises(ForeignHook, match=re.escape(f"refusing to remove {target}")):
        uninstall(hooks)
    assert target.exists()


def test_uninstall_file_system_error(front: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("os.unlink", refuse)
    with pytest.raises(HookFileError) as exc:
        uninstall(front.parent.parent)
    monkeypatch.undo()
    assert (exc.value.errno, exc.value.filename) == (errno.EROFS, str(front))
    assert front.exists()


# -- the CLI --------------------------------------------------------------------


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_install_uninstall(
    hooks: Path, fake: FakePython, capsys: pytest.CaptureFixture[str]
) -> None:
    hooks.parent.mkdir(parents=True)
    args = ["hook", "install", "--hooks-dir", str(hooks), "--python", str(fake.path)]
    target = hooks / "qemu.d" / "kvmvfio"
    code, out, err = _cli(args, capsys)
    # The tests run kvmvfio from its checkout: install says what that means.
    assert (code, err) == (0, f"kvmvfio: warning: {inst.checkout_warning(str(REPO), 'the hook')}\n")
    assert "the checkout is moved or deleted" in err
    assert f"runs {fake.path} (Python 3.11.0) -m kvmvfio.libvirt.hook" in out
    assert out.splitlines()[0].startswith(
        f"installed {target}; restart libvirtd (or virtqemud) so that libvirt notices its "
        "first qemu hook"
    )
    assert f"PYTHONPATH={REPO}" in out
    assert target.read_text() == render(str(fake.path))

    code, out, err = _cli(args, capsys)
    assert code == 0
    assert out.splitlines()[0] == f"replaced the kvmvfio hook {target}"

    code, out, err = _cli(["hook", "uninstall", "--hooks-dir", str(hooks)], capsys)
    assert (code, out, err) == (0, f"removed {target}\n", "")
    code, out, err = _cli(["hook", "uninstall", "--hooks-dir", str(hooks)], capsys)
    assert (code, out) == (0, f"no kvmvfio hook at {target}: nothing to remove\n")


def test_cli_refusals(hooks: Path, fake: FakePython, capsys: pytest.CaptureFixture[str]) -> None:
    target = hooks / "qemu.d" / "kvmvfio"
    _exe(target, "#!/bin/sh\n")
    base = ["hook", "install", "--hooks-dir", str(hooks)]
    code, out, err = _cli([*base, "--python", str(fake.path)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"kvmvfio: refusing to overwrite {target}: ")
    code, out, err = _cli(["hook", "uninstall", "--hooks-dir", str(hooks)], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"kvmvfio: refusing to remove {target}: ")
    code, out, err = _cli([*base, "--python", "python3"], capsys)
    assert code == 2
    assert "'python3'" in err
    code, out, err = _cli([*base, "--python", str(fake.path), "--force"], capsys)
    assert code == 0
    assert out.startswith(f"installed {target} over a file kvmvfio had not written\n")


def test_cli_show(fake: FakePython, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["hook", "show", "--python", str(fake.path)], capsys)
    assert (code, err) == (0, "")
    assert out == render(str(fake.path))


# -- the interpreter can import the hook -------------------------------------------


def test_this_interpreter_imports_the_hook() -> None:
    found = inst.check_imports(sys.executable)  # what `kvmvfio hook install` checks by default
    assert found.package_dir == str(REPO)
    assert found.python_version == platform.python_version()
    assert found.pythonpath == str(REPO)


def test_an_interpreter_importing_another_kvmvfio_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "python3"
    other.write_text("#!/bin/sh\nprintf '/elsewhere/kvmvfio/__init__.py\\n3.11.0\\n'\n")
    other.chmod(0o755)
    with pytest.raises(UsageError) as refused:
        inst.check_imports(str(other), str(tmp_path))
    assert str(refused.value) == (
        f"the hook's interpreter {other} imports kvmvfio from /elsewhere, "
        f"not from its PYTHONPATH {tmp_path}"
    )


def test_a_checkout_is_told_from_an_installed_package(tmp_path: Path) -> None:
    assert inst.is_source_checkout(str(REPO))
    site = tmp_path / "site-packages"
    (site / "kvmvfio").mkdir(parents=True)
    (site / "kvmvfio-0.1.0.dist-info").mkdir()
    assert not inst.is_source_checkout(str(site))
    # An editable install's checkout keeps its dist-info elsewhere: still a checkout.
    (tmp_path / "pyproject.toml").write_text("")
    assert inst.is_source_checkout(str(tmp_path))


def test_agent_unit_records_and_checks_its_kvmvfio(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(["agent", "--unit"], capsys)
    assert code == 0
    # Whichever way this interpreter finds the checkout (an editable install, or
    # PYTHONPATH that the unit then sets), the unit runs this kvmvfio.
    assert out.splitlines()[0] == (
        f"# kvmvfio {kvmvfio.__version__} from {REPO}, Python {platform.python_version()}: "
        "checked by `kvmvfio agent --unit`"
    )
    assert f"ExecStart={sys.executable} -m kvmvfio agent" in out.splitlines()
    assert err == f"kvmvfio: warning: {inst.checkout_warning(str(REPO), 'the unit')}\n"


def test_agent_unit_text_quotes_its_pythonpath() -> None:
    from kvmvfio.libvirt.units import AGENT, unit_text  # noqa: PLC0415 (as the CLI imports it)

    text = unit_text(AGENT, "/venv/bin/python", '/a b/"c"\\d%e', "kvmvfio 0.1.0")
    lines = text.splitlines()
    assert lines[0] == "# kvmvfio 0.1.0"
    assert 'Environment="PYTHONPATH=/a b/\\"c\\"\\\\d%%e"' in lines
    bare = unit_text(AGENT, "/p").splitlines()
    assert bare[0] == "[Unit]"  # no header without `about`
    assert not any(line.startswith("Environment") for line in bare)


def test_an_interpreter_without_the_hooks_imports_is_refused_by_name(tmp_path: Path) -> None:
    bad = make_fake_python(
        tmp_path / "venv" / "bin",
        exit_code=1,
        stderr="Traceback (most recent call last):\n  ...\n"
        "ModuleNotFoundError: No module named 'cffi'\n",
    )
    with pytest.raises(UsageError) as refused:
        inst.check_imports(str(bad.path), str(tmp_path))
    said = str(refused.value)
    assert f"the hook's interpreter {bad.path} cannot import kvmvfio's hook" in said
    assert said.endswith("No module named 'cffi'")
    assert bad.argv()[0] == "-c"
    assert bad.argv()[1].startswith("import kvmvfio.libvirt.hook, cffi, qemu.qmp; ")
    assert bad.pythonpath() == str(tmp_path)


def test_cli_install_checks_the_interpreter_before_writing(
    hooks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = make_fake_python(tmp_path / "bin", exit_code=1, stderr="No module named 'kvmvfio'\n")
    hooks.mkdir(parents=True)
    code = run(["hook", "install", "--hooks-dir", str(hooks), "--python", str(bad.path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "cannot import kvmvfio's hook" in err
    assert "No module named 'kvmvfio'" in err
    assert not (hooks / "qemu.d").exists()
