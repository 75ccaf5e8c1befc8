"""Build kvmvfio's sdist and wheel, install the wheel in a fresh venv, and run it from there.

    python tools/package_check.py            # what `tox run -e package` runs
    python tools/package_check.py --keep     # and leave the temp folder to look at

What it checks, in order:

1. ``python -m build`` makes an sdist from a copy of the files git tracks
   (a used checkout's leftover egg-info would add files a fresh clone's
   build lacks) and the wheel from that sdist (so the sdist holds what a
   build needs).
2. Every file git tracks under ``kvmvfio/`` is in the sdist, and every one
   but the ``.py`` files' siblings that are not package data is in the
   wheel: the hook front, the cffi module, the lab topologies, any file
   added later. Nothing from ``tests/`` or ``tools/`` is in the wheel.
3. A venv made in a temp folder outside the checkout gets the wheel (not
   editable); from a folder outside the checkout, with ``PYTHONPATH``
   unset, it runs ``kvmvfio --help``, ``kvmvfio doctor --json`` (on this
   host: exit 0 or 1, JSON, no traceback), and ``kvmvfio inventory --json``
   on a fake sysfs tree (tests/fakesysfs.py, run by the venv's Python).
4. ``kvmvfio hook install --hooks-dir TMP`` writes a front naming the
   venv's interpreter and site-packages; the front, run as libvirt runs
   it (minimal environment, argv ``NAME OP SUBOP -``, the XML on stdin),
   starts that interpreter, which imports kvmvfio from the venv only
   (``PYTHONVERBOSE`` lists the files it loads) and refuses a domain whose
   kvmvfio metadata is malformed, with kvmvfio's sentence and exit 1.
5. ``kvmvfio agent --unit`` and ``recover --unit`` name the venv's interpreter in
   ``ExecStart``, record the venv's kvmvfio in their first line and set no
   ``PYTHONPATH``.
6. ``hook install`` run from a checkout (``PYTHONPATH``, a copy of it here)
   warns that the hook depends on the checkout, and once the checkout is
   moved, the front refuses kvmvfio's domains saying to run ``kvmvfio hook
   install`` again (no Python traceback).

The checkout is never on the venv's ``sys.path``: the wheel is the only
kvmvfio there. Exits 0 when everything holds, 1 with what failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What libvirt and systemd leave a process: PATH, nothing of ours.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: The namespace the hook looks for (kvmvfio.libvirt.metadata.NAMESPACE).
NS = "urn:kvmvfio:libvirt:1"


class CheckFailed(Exception):
    """One check did not hold; the message says which and what was seen."""


def _say(msg: str) -> None:
    print(f"package-check: {msg}", flush=True)


def _run(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    ok: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env if env is not None else CLEAN_ENV,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode not in ok:
        raise CheckFailed(
            f"{' '.join(argv)} exited {proc.returncode} (expected {ok}):\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
        )
    if "Traceback (most recent call last)" in proc.stderr:
        raise CheckFailed(f"{' '.join(argv)} printed a traceback:\n{proc.stderr[-4000:]}")
    return proc


def tracked_package_files() -> list[str]:
    """Return the files under ``kvmvfio/`` the checkout holds (git's list, else the tree's)."""
    files = tracked_files()
    if files is not None:
        return [f for f in files if f.startswith("kvmvfio/")]
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "kvmvfio").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def tracked_files() -> list[str] | None:
    """Return the files git tracks in the checkout, or None without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sorted(f for f in out.decode().split("\0") if f and (REPO / f).is_file())


def copy_checkout(dest: Path) -> None:
    """Copy the checkout's tracked files to ``dest`` (no egg-info, build/ or .tox).

    setuptools' sdist adds what a leftover ``kvmvfio.egg-info/SOURCES.txt``
    lists, so a build from a used checkout can hold files that a fresh clone's
    would not: the build starts from what git has.
    """
    files = tracked_files()
    if files is None:
        skip = shutil.ignore_patterns("*.egg-info", "build", "dist", ".tox", ".git", "__pycache__")
        shutil.copytree(REPO, dest, ignore=skip, symlinks=True)
        return
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f, follow_symlinks=False)


def build(src: Path, out: Path) -> tuple[Path, Path]:
    """Build the sdist of ``src`` and, from it, the wheel into ``out``; return their paths."""
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], cwd=out, env=None)
    sdists = list(out.glob("kvmvfio-*.tar.gz"))
    wheels = list(out.glob("kvmvfio-*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise CheckFailed(f"expected one sdist and one wheel in {out}, found {sdists + wheels}")
    return sdists[0], wheels[0]


def check_contents(sdist: Path, wheel: Path) -> None:
    """Check the sdist holds every file of the package and the wheel every runtime file."""
    wanted = tracked_package_files()
    with tarfile.open(sdist) as tar:
        # kvmvfio-0.1.0/kvmvfio/... -> kvmvfio/...
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = set(zf.namelist())
    missing_sdist = [f for f in wanted if f not in in_sdist]
    missing_wheel = [f for f in wanted if f not in in_wheel]
    for need in ("pyproject.toml", "README.md"):
        if need not in in_sdist:
            missing_sdist.append(need)
    stray = sorted(
        n for n in in_wheel if not n.startswith(("kvmvfio/", "kvmvfio-")) or "__pycache__" in n
    )
    problems = []
    if missing_sdist:
        problems.append(f"the sdist lacks {missing_sdist}")
    if missing_wheel:
        problems.append(f"the wheel lacks {missing_wheel}")
    if stray:
        problems.append(f"the wheel holds files outside the package: {stray}")
    if problems:
        raise CheckFailed("; ".join(problems))
    data = sorted(f for f in wanted if not f.endswith(".py"))
    _say(f"sdist and wheel hold all {len(wanted)} files of kvmvfio/ (data files: {data})")


def make_venv(where: Path, wheel: Path) -> Path:
    """Create a venv at ``where`` with ``wheel`` installed (not editable); return its python."""
    try:
        import ensurepip  # noqa: F401, PLC0415 (only to say what is missing)
    except ImportError:
        raise CheckFailed(
            f"{sys.executable} has no ensurepip, so its venvs have no pip "
            "(Debian's python3: apt-get install python3-venv)"
        ) from None
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    python = where / "bin" / "python"
    env = dict(CLEAN_ENV)
    # pip's own settings (an index, certificates) stay as the machine has them.
    for key, value in os.environ.items():
        if key.startswith("PIP_") or key in ("HOME", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            env[key] = value
    _run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        cwd=where,
        env=env,
    )
    return python


def check_installed(python: Path, work: Path) -> Path:
    """Check the venv's kvmvfio is the wheel's, nowhere near the checkout; return its folder."""
    proc = _run(
        [str(python), "-c", "import kvmvfio, sys; print(kvmvfio.__file__); print(sys.path)"],
        cwd=work,
    )
    where = Path(proc.stdout.splitlines()[0]).parent
    venv_root = python.parent.parent
    if not where.is_relative_to(venv_root) or where.is_relative_to(REPO):
        raise CheckFailed(f"the venv's python imports kvmvfio from {where}, not from the venv")
    if str(REPO) in proc.stdout.splitlines()[1]:
        raise CheckFailed(f"the checkout {REPO} is on the venv's sys.path: {proc.stdout}")
    return where


def check_cli(kvmvfio: Path, python: Path, work: Path) -> None:
    """Run the installed CLI: --help, doctor on this host, inventory on a fake tree."""
    out = _run([str(kvmvfio), "--help"], cwd=work).stdout
    if "usage: kvmvfio" not in out:
        raise CheckFailed(f"kvmvfio --help printed no usage: {out[:500]}")
    # doctor: 0 when a VFIO path is complete, 1 when none is (this host may have none).
    doc = _run([str(kvmvfio), "doctor", "--json"], cwd=work, ok=(0, 1))
    json.loads(doc.stdout)
    _say(f"kvmvfio doctor --json exited {doc.returncode} with JSON")
    # A fake sysfs tree, built by the venv's Python with the installed kvmvfio:
    # only tests/ is added to its path, for fakesysfs itself.
    tree = work / "tree"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from pathlib import Path\n"
        "from fakesysfs import Dev, Topology\n"
        "Topology(devices=[\n"
        "    Dev('0000:00:01.0', bridge=True, driver='pcieport', group=1, children=[\n"
        "        Dev('0000:01:00.0', driver='e1000e', group=1)]),\n"
        "    Dev('0000:00:03.0', vendor=0x1234, device=0x11E8, cls=0x00FF00,\n"
        "        driver='vfio-pci', group=3),\n"
        "]).build(Path(sys.argv[2]))\n"
    )
    tree.mkdir()
    _run([str(python), "-c", script, str(REPO / "tests"), str(tree)], cwd=work)
    sysfs, dev = tree / "sys", tree / "dev"
    if not sysfs.is_dir():
        found = sorted(p.name for p in tree.iterdir())
        raise CheckFailed(f"the fake tree has no sys/ folder: {found}")
    args = ["inventory", "--json", "--sysfs-root", str(sysfs), "--dev-root", str(dev)]
    inv = json.loads(_run([str(kvmvfio), *args], cwd=work).stdout)
    text = json.dumps(inv)
    for addr in ("0000:01:00.0", "0000:00:03.0"):
        if addr not in text:
            raise CheckFailed(f"kvmvfio inventory --json on the fake tree does not list {addr}")
    _say("kvmvfio --help, doctor --json and inventory --json (fake sysfs) ran from the venv")


def _domain(metadata: str) -> str:
    return (
        "<domain type='kvm'><name>vm1</name>"
        "<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>"
        f"<metadata>{metadata}</metadata><devices/></domain>\n"
    )


def check_hook(kvmvfio: Path, python: Path, site: Path, work: Path) -> None:
    """Install the hook into a temp folder, and run its front as libvirt would."""
    hooks = work / "hooks"
    proc = _run([str(kvmvfio), "hook", "install", "--hooks-dir", str(hooks)], cwd=work)
    front = hooks / "qemu.d" / "kvmvfio"
    text = front.read_text()
    if f"python={python}\n" not in text and f"python='{python}'\n" not in text:
        raise CheckFailed(f"the front does not run the venv's {python}:\n{text}")
    if f"PYTHONPATH={site}\n" not in text and f"PYTHONPATH='{site}'\n" not in text:
        raise CheckFailed(f"the front does not pin the venv's {site}:\n{text}")
    if str(REPO) in text:
        raise CheckFailed(f"the front names the checkout {REPO}:\n{text}")
    if proc.stderr:
        raise CheckFailed(f"kvmvfio hook install warned from the venv: {proc.stderr}")
    _say(f"kvmvfio hook install: {proc.stdout.strip()}")

    # Not kvmvfio's domain: the shell answers, Python never starts.
    plain = _run([str(front), "vm1", "prepare", "begin", "-"], cwd=work, stdin=_domain(""))
    if plain.stdout or plain.stderr:
        raise CheckFailed(f"the front printed for a domain without kvmvfio: {plain}")
    # kvmvfio's domain with a misspelt attribute: Python starts, the metadata
    # parser refuses before anything on the host is touched (release end: no
    # prepare either way). PYTHONVERBOSE makes it list every module file it loads.
    bad = f'<kvmvfio:devices xmlns:kvmvfio="{NS}" coherency="sometimes"/>'
    env = dict(CLEAN_ENV, PYTHONVERBOSE="1")
    ran = _run(
        [str(front), "vm1", "release", "end", "-"],
        cwd=work,
        env=env,
        stdin=_domain(bad),
        ok=(1,),
    )
    said = [line for line in ran.stderr.splitlines() if line.startswith("kvmvfio:")]
    if not said or "coherency" not in said[0]:
        raise CheckFailed(f"the hook did not refuse the bad metadata in kvmvfio's words:\n{said}")
    # Lines such as "# code object from '.../kvmvfio/libvirt/__pycache__/hook....pyc'"
    # and "# .../hook....pyc matches .../kvmvfio/libvirt/hook.py".
    loaded = sorted(set(re.findall(r"(/[^\s']*/kvmvfio/[^\s']*)", ran.stderr)))
    if not any("/kvmvfio/libvirt/" in p and "/hook." in p for p in loaded):
        raise CheckFailed(f"the front's python did not load kvmvfio.libvirt.hook:\n{ran.stderr}")
    elsewhere = [p for p in loaded if not Path(p).is_relative_to(site)]
    if elsewhere:
        raise CheckFailed(f"the hook loaded kvmvfio files from outside the venv: {elsewhere}")
    _say(f"the front ran {python}, loaded kvmvfio from {site} only, and said: {said[0]}")
    _run([str(kvmvfio), "hook", "uninstall", "--hooks-dir", str(hooks)], cwd=work)


def check_checkout_pinned(python: Path, src: Path, work: Path) -> None:
    """Install the hook from a checkout (PYTHONPATH), then move it: both are told clearly.

    ``src`` is the copy of the checkout the build was made from, so moving it
    costs the real checkout nothing.
    """
    hooks = work / "hooks-checkout"
    env = dict(CLEAN_ENV, PYTHONPATH=str(src))
    argv = [str(python), "-m", "kvmvfio", "hook", "install", "--hooks-dir", str(hooks)]
    proc = _run(argv, cwd=work, env=env)
    if f"source checkout {src}" not in proc.stderr:
        raise CheckFailed(f"hook install from a checkout did not warn: {proc.stderr!r}")
    front = hooks / "qemu.d" / "kvmvfio"
    moved = src.with_name("src-moved")
    src.rename(moved)
    try:
        xml = _domain(f'<kvmvfio:devices xmlns:kvmvfio="{NS}"/>')
        ran = _run([str(front), "vm1", "prepare", "begin", "-"], cwd=work, stdin=xml, ok=(1,))
    finally:
        moved.rename(src)
    if "run `kvmvfio hook install` again" not in ran.stderr or "Traceback" in ran.stderr:
        raise CheckFailed(f"the front of a moved checkout did not say what to do: {ran.stderr!r}")
    _say(
        f"a hook pinned to a checkout warns at install, and once it is moved: {ran.stderr.strip()}"
    )


def check_agent_unit(kvmvfio: Path, python: Path, site: Path, work: Path) -> None:
    """Check ``kvmvfio agent --unit`` and ``recover --unit`` name the venv's interpreter."""
    version = _run([str(kvmvfio), "--version"], cwd=work).stdout.split()[-1]
    for kind in ("agent", "recover"):
        proc = _run([str(kvmvfio), kind, "--unit"], cwd=work)
        if proc.stderr:
            raise CheckFailed(f"kvmvfio {kind} --unit warned from the venv: {proc.stderr}")
        unit = proc.stdout
        execs = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
        if execs != [f"ExecStart={python} -m kvmvfio {kind}"]:
            raise CheckFailed(f"the {kind} unit does not start {python}: {execs}")
        if str(REPO) in unit or "PYTHONPATH" in unit:
            raise CheckFailed(f"the {kind} unit names the checkout or a PYTHONPATH:\n{unit}")
        if not unit.startswith(f"# kvmvfio {version} from {site}, Python "):
            raise CheckFailed(f"the {kind} unit does not record the venv's kvmvfio:\n{unit}")
        _say(f"kvmvfio {kind} --unit: {execs[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args(argv)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kvmvfio-package-"))
    if tmp.is_relative_to(REPO):
        raise SystemExit(f"package-check: the temp folder {tmp} is inside the checkout")
    try:
        src, dist, env_dir, work = tmp / "src", tmp / "dist", tmp / "venv", tmp / "work"
        for d in (src, dist, work):
            d.mkdir()
        copy_checkout(src)
        sdist, wheel = build(src, dist)
        _say(f"built {sdist.name} and {wheel.name}")
        check_contents(sdist, wheel)
        python = make_venv(env_dir, wheel)
        site = check_installed(python, work).parent
        kvmvfio = env_dir / "bin" / "kvmvfio"
        check_cli(kvmvfio, python, work)
        check_hook(kvmvfio, python, site, work)
        check_agent_unit(kvmvfio, python, site, work)
        check_checkout_pinned(python, src, work)
    except CheckFailed as err:
        print(f"package-check: FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            _say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"all checks passed in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
