"""kvmvfio.uapi against the real Linux 6.12 uAPI headers, through a C compiler.

The cffi declarations are hand-copied from the headers; a field in the wrong
place would not fail at import, it would corrupt a kernel call. So this test
installs the 6.12 uAPI headers from the Debian source tarball
(``make headers_install``, cached under ``~/.cache/kvmvfio/work/``), writes a
C program that prints every ioctl number, struct size, field offset and
constant that ``python -m kvmvfio.uapi --full`` names (generated from that
output, so nothing can be forgotten), compiles it against those headers and
compares the two answers exactly.

Without the tarball or a compiler the test is skipped, unless
``KVMVFIO_REQUIRE_HEADERS=1`` (``make test`` sets it), where it fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kvmvfio import uapi

pytestmark = pytest.mark.headers

TARBALL = Path(
    os.environ.get("KVMVFIO_KERNEL_SOURCE", f"/usr/src/linux-source-{uapi.KERNEL_RELEASE}.tar.xz")
)
TOOLS = ("cc", "make", "tar", "xz")

# What `make headers_install` reads from the tree: the top Makefile and
# scripts, the generic and the arch uapi headers, and the bits of tools/ the
# arch Makefile's host tools include. Everything else (90% of the tarball)
# stays packed.
_MEMBERS = (
    "Makefile",
    "Kbuild",
    "Kconfig",
    "scripts",
    "include",
    "usr",
    "arch/{arch}",
    "tools/include",
    "tools/arch/{arch}",
)


def _cache_root() -> Path:
    env = os.environ.get("KVMVFIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kvmvfio"


def _kernel_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "x86", "i686": "x86", "aarch64": "arm64"}.get(machine, machine)


def _unavailable(reason: str) -> None:
    if os.environ.get("KVMVFIO_REQUIRE_HEADERS") == "1":
        pytest.fail(f"{reason} (KVMVFIO_REQUIRE_HEADERS=1 makes this a failure)")
    pytest.skip(reason)


def install_headers(tarball: Path, dest: Path, arch: str) -> Path:
    """Install the uAPI headers of ``tarball`` into ``dest`` once; return ``dest/include``.

    Concurrent runs take turns on a lock file, and the tree appears at
    ``dest`` by one rename, so a reader never sees half of it.
    """
    marker = dest / "include" / "linux" / "vfio.h"
    if marker.exists():
        return dest / "include"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():  # another run finished while we waited
            return dest / "include"
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f"{dest.name}.tmp-") as tmp:
            src = Path(tmp) / "src"
            out = Path(tmp) / "out"
            src.mkdir()
            members = [f"*/{m.format(arch=arch)}" for m in _MEMBERS]
            subprocess.run(
                [
                    "tar",
                    "-xJf",
                    str(tarball),
                    "-C",
                    str(src),
                    "--strip-components=1",
                    "--wildcards",
                    "--no-wildcards-match-slash",
                    *members,
                ],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [
                    "make",
                    "-s",
                    f"-j{os.cpu_count() or 1}",
                    "-C",
                    str(src),
                    f"ARCH={arch}",
                    f"INSTALL_HDR_PATH={out}",
                    "headers_install",
                ],
                check=True,
                capture_output=True,
            )
            os.rename(out, dest)
    return dest / "include"


@pytest.fixture(scope="session")
def uapi_include() -> Path:
    if not TARBALL.exists():
        _unavailable(f"{TARBALL} is absent (apt-get install linux-source-{uapi.KERNEL_RELEASE})")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not found (apt-get install gcc make xz-utils)")
    dest = _cache_root() / "work" / f"uapi-headers-{uapi.KERNEL_RELEASE}"
    try:
        return install_headers(TARBALL, dest, _kernel_arch())
    except subprocess.CalledProcessError as err:
        stderr = err.stderr.decode(errors="replace") if err.stderr else ""
        pytest.fail(f"installing the uAPI headers failed: {err.cmd}:\n{stderr[-3000:]}")


def _cli(*args: str) -> dict[str, dict[str, int]]:
    done = subprocess.run(
        [sys.executable, "-m", "kvmvfio.uapi", *args], check=True, capture_output=True, text=True
    )
    result: dict[str, dict[str, int]] = json.loads(done.stdout)
    return result


def c_program(report: dict[str, dict[str, int]], headers: list[str]) -> str:
    """A C program printing, for every name in ``report``, the value the headers give."""
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{h}>" for h in headers]
    lines += ["", "int main(void)", "{"]

    def emit(section: str, name: str, expr: str, signed: bool = False) -> None:
        ctype, fmt = ("long long", "%lld") if signed else ("unsigned long long", "%llu")
        lines.append(f'\tprintf("{section} {name} {fmt}\\n", ({ctype})({expr}));')

    for name in report["ioctls"]:
        emit("ioctls", name, name)
    for name in report["sizes"]:
        emit("sizes", name, f"sizeof(struct {name})")
    for key in report.get("offsets", {}):
        struct, field = key.split(".")
        emit("offsets", key, f"offsetof(struct {struct}, {field})")
    for name in report.get("constants", {}):
        emit("constants", name, name, signed=True)
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


def run_c(source: str, include: Path, workdir: Path) -> dict[str, dict[str, int]]:
    """Compile ``source`` against ``include``, run it and parse its ``section name value`` lines."""
    (workdir / "uapi.c").write_text(source)
    compiled = subprocess.run(
        ["cc", "-std=gnu11", "-Wall", f"-I{include}", "uapi.c", "-o", "uapi"],
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, (
        "the C compiler rejects names kvmvfio.uapi declares (a misspelt field or a struct or "
        f"constant the headers lack):\n{compiled.stderr[-4000:]}"
    )
    done = subprocess.run([str(workdir / "uapi")], check=True, capture_output=True, text=True)
    out: dict[str, dict[str, int]] = {}
    for line in done.stdout.splitlines():
        section, name, value = line.split()
        out.setdefault(section, {})[name] = int(value)
    return out


def _differences(ours: dict[str, dict[str, int]], kernel: dict[str, dict[str, int]]) -> str:
    rows = []
    for section in sorted(set(ours) | set(kernel)):
        a, b = ours.get(section, {}), kernel.get(section, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                rows.append(f"  {section} {name}: kvmvfio {a.get(name)}, headers {b.get(name)}")
    return "\n".join(rows)


def _headers() -> list[str]:
    return sorted({op.header for op in uapi.IOCTLS.values()} | set(uapi.STRUCT_HEADERS.values()))


def test_json_is_the_ioctls_and_sizes_of_full() -> None:
    short, full = _cli("--json"), _cli("--full")
    assert set(short) == {"ioctls", "sizes"}
    assert short == {"ioctls": full["ioctls"], "sizes": full["sizes"]}


def test_uapi_matches_linux_headers(uapi_include: Path, tmp_path: Path) -> None:
    report = _cli("--full")
    kernel = run_c(c_program(report, _headers()), uapi_include, tmp_path)
    assert kernel == report, (
        f"kvmvfio.uapi differs from the Linux {uapi.KERNEL_RELEASE} headers:\n"
        + _differences(report, kernel)
    )


def test_a_wrong_declaration_would_be_caught(uapi_include: Path, tmp_path: Path) -> None:
    # The comparison itself must be able to fail: move kvm_device_attr.addr.
    report = _cli("--full")
    report["offsets"]["kvm_device_attr.addr"] = 8
    kernel = run_c(c_program(report, _headers()), uapi_include, tmp_path)
    assert kernel["offsets"]["kvm_device_attr.addr"] == 16
    assert "kvm_device_attr.addr: kvmvfio 8, headers 16" in _differences(report, kernel)


def test_headers_are_cached(uapi_include: Path) -> None:
    # The second call finds the tree and returns without touching the tarball.
    again = install_headers(Path("/nonexistent.tar.xz"), uapi_include.parent, _kernel_arch())
    assert again == uapi_include
    assert (uapi_include / "linux" / "kvm.h").exists()
