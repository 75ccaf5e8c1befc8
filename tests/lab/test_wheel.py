"""kvmvfio installed from its wheel into a venv of its own, run in L1 as a user would.

``kvmvfio lab test`` builds the wheel on the host (L1 has no setuptools:
kvmvfio.lab.wheel) and shares it; here it goes into a fresh venv in L1 that
sees Debian's cffi, qemu.qmp and libvirt-python but not the checkout (every
command runs with the environment libvirt and systemd give: PATH only). The
checks: the CLI runs from the venv; the hook front that the venv's
``kvmvfio hook install`` writes is what libvirtd runs to start and stop a
domain with a device; the agent starts from its unit's ``ExecStart`` line
and reaches libvirt. ``tools/package_check.py`` (tox -e package) checks the
wheel's contents and the same commands natively, without libvirtd or VFIO.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from libvirtkit import HOOKS, create, destroy, hooked_libvirtd, metadata, qemu_fds, wait_for
from vfiokit import driver, group_of

from kvmvfio.lab.libvirtd import Libvirtd
from kvmvfio.lab.topology import Topology
from kvmvfio.lab.wheel import WHEEL_ENV
from kvmvfio.libvirt.monitor import qemu_pid
from kvmvfio.prepare import status

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

#: What libvirt and systemd give a process: no PYTHONPATH, so no checkout.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], env=CLEAN_ENV, cwd="/", capture_output=True, text=True, check=False
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding kvmvfio's wheel and nothing else of kvmvfio."""
    wheel = os.environ.get(WHEEL_ENV)
    assert wheel, f"{WHEEL_ENV} is unset: `kvmvfio lab test` builds and shares the wheel"
    root = tmp_path_factory.mktemp("wheel") / "venv"
    made = run("python3", "-m", "venv", "--without-pip", "--system-site-packages", root)
    assert made.returncode == 0, made.stderr
    got = run(
        "python3", "-m", "pip", "--python", root / "bin" / "python", "install", "--quiet",
        "--no-deps", "--no-index", "--disable-pip-version-check", wheel,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    return root


@pytest.fixture(scope="module")
def hooked_from_venv(venv: Path) -> Iterator[Libvirtd]:
    """libvirtd with the hook front written by the venv's kvmvfio."""
    done = run(venv / "bin" / "kvmvfio", "hook", "install")
    assert done.returncode == 0, done.stderr
    with hooked_libvirtd() as daemon:
        yield daemon


def test_the_cli_runs_from_the_venv(topology: Topology, venv: Path) -> None:
    where = run(venv / "bin" / "python", "-c", "import kvmvfio; print(kvmvfio.__file__)")
    assert where.stdout.startswith(f"{venv}/lib/"), where.stdout
    inventory = run(venv / "bin" / "kvmvfio", "inventory", "--json")
    assert inventory.returncode == 0, inventory.stderr
    addresses = {d["address"] for d in json.loads(inventory.stdout)["devices"]}
    assert topology.guest_address("edu0") in addresses
    doctor = run(venv / "bin" / "kvmvfio", "doctor", "--json")
    assert doctor.returncode in {0, 1}, doctor.stderr
    assert json.loads(doctor.stdout)


def test_libvirtd_runs_the_hook_the_wheel_installed(
    topology: Topology, venv: Path, hooked_from_venv: Libvirtd, tmp_path: Path
) -> None:
    front = (HOOKS / "qemu.d" / "kvmvfio").read_text()
    python = venv / "bin" / "python"
    assert f"python={shlex.quote(str(python))}\n" in front
    assert f"PYTHONPATH={shlex.quote(str(next(venv.glob('lib/python3*/site-packages'))))}\n" in (
        front
    )
    edu0 = topology.guest_address("edu0")
    assert driver(edu0) is None
    done = create(tmp_path, "wheeled", metadata=metadata(edu0), hostdevs=[edu0])
    assert done.returncode == 0, done.stderr
    assert driver(edu0) == "vfio-pci"
    (held,) = status()
    assert held.owner == "libvirt:wheeled"
    assert f"/dev/vfio/{group_of(edu0)}" in qemu_fds(qemu_pid("wheeled"))
    destroy("wheeled")
    wait_for(lambda: driver(edu0) is None, 30, "edu0 back on no driver")
    wait_for(lambda: status() == [], 30, "the record of edu0 gone")


def test_the_agent_starts_from_its_unit(
    venv: Path, hooked_from_venv: Libvirtd, tmp_path: Path
) -> None:
    unit = run(venv / "bin" / "kvmvfio", "agent", "--unit")
    assert unit.returncode == 0, unit.stderr
    (exec_start,) = [ln for ln in unit.stdout.splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[:3] == [str(venv / "bin" / "python"), "-m", "kvmvfio"], argv
    # -v (before the command) for its "connected" line, as the lab's agent runs.
    log = tmp_path / "agent.log"
    with (
        open(log, "wb") as out,
        subprocess.Popen(
            [*argv[:3], "-v", *argv[3:], "--resync", "5"],
            env=CLEAN_ENV,
            cwd="/",
            stdout=out,
            stderr=subprocess.STDOUT,
        ) as agent,
    ):
        try:
            wait_for(
                lambda: "connected to libvirt" in log.read_text() or agent.poll() is not None,
                60,
                "the agent connected to libvirt",
            )
            assert agent.poll() is None, f"the agent exited {agent.returncode}: {log.read_text()}"
        finally:
            agent.terminate()
            agent.wait(30)
    said = log.read_text()
    assert "connected to libvirt" in said
    assert "Traceback" not in said
