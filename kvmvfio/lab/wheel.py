"""The wheel the lab tier installs in L1, built on the host from the checkout.

L1 has no setuptools (its Python gets packages from Debian and a few
wheels), so the wheel is built here, once per ``kvmvfio lab test``, and
shared with each topology's job folder; the lab test that installs it
(tests/lab/test_wheel.py) finds it by :data:`WHEEL_ENV`. It is built from a
copy of what a build reads (``pyproject.toml``, ``README.md``, ``kvmvfio/``
without bytecode), so the checkout gets no ``build/`` or ``*.egg-info``
and a leftover of an earlier build cannot slip into it. pip builds it in an
isolated environment, as ``pip install kvmvfio`` from an sdist would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmvfio.errors import LabError

#: The variable that names the wheel inside L1 (a path under ``/mnt/job``).
WHEEL_ENV = "KVMVFIO_LAB_WHEEL"
_SOURCES = ("pyproject.toml", "README.md")


def build_wheel(checkout: Path, dest: Path) -> Path:
    """Build kvmvfio's wheel from ``checkout`` into folder ``dest``; its path.

    Raises :class:`LabError` with pip's last lines when the build fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvmvfio-wheel-src-") as tmp:
        src = Path(tmp)
        for name in _SOURCES:
            shutil.copy2(checkout / name, src / name)
        shutil.copytree(
            checkout / "kvmvfio",
            src / "kvmvfio",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        done = subprocess.run(
            [
                sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                "--disable-pip-version-check",
                "--wheel-dir", str(dest), str(src),
            ],
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
    wheels = sorted(dest.glob("kvmvfio-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise LabError(
            f"cannot build kvmvfio's wheel from {checkout} for the lab (pip wheel exited "
            f"{done.returncode}, {len(wheels)} wheel(s) in {dest}): {tail or 'no output'}"
        )
    return wheels[0]
