"""The end-to-end test tier: pytest inside L1, one boot per topology.

Lab tests live in ``tests/lab`` and carry the ``lab`` marker (and optionally
``topology(...)`` to say which topologies they apply to). For each topology
the runner boots L1 once and runs pytest over the mounted checkout inside it;
pytest writes a JUnit report into the job folder, from which the host adds
up the results of all topologies into one closing line.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import LabError
from kvmvfio.lab.images import LabImages
from kvmvfio.lab.runner import GUEST_JOB, LabRun, run_in_lab
from kvmvfio.lab.topology import Topology
from kvmvfio.lab.wheel import WHEEL_ENV, build_wheel


@dataclass(frozen=True)
class TierResult:
    """Counts of one topology's pytest run inside L1."""

    topology: str
    exit_code: int
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        # pytest exits 5 when it collected nothing for this topology: not a failure.
        return self.exit_code in (0, 5) and not self.failed and not self.errors


def read_junit(path: Path, topology: str, exit_code: int) -> TierResult:
    """Add up a JUnit XML report written by pytest inside L1."""
    try:
        # The report is written by our own pytest in the guest; still, parse
        # it with the stdlib's non-expanding defaults and keep only counts.
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return TierResult(topology, exit_code)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {
        k: sum(int(s.get(k, "0")) for s in suites)
        for k in ("tests", "failures", "errors", "skipped")
    }
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return TierResult(
        topology,
        exit_code,
        passed=passed,
        failed=total["failures"],
        errors=total["errors"],
        skipped=total["skipped"],
    )


async def run_tier(
    topologies: Sequence[Topology],
    images: LabImages,
    checkout: Path,
    pytest_args: Sequence[str] = (),
    timeout: float = 1800.0,
) -> list[TierResult]:
    """Run the lab tests once per topology; return one result per topology.

    kvmvfio's wheel is built once, here, and shared with each topology's job
    folder (L1 cannot build it: :mod:`kvmvfio.lab.wheel`).
    """
    results = []
    with tempfile.TemporaryDirectory(prefix="kvmvfio-tier-wheel-") as built:
        wheel = build_wheel(checkout, Path(built))
        for topo in topologies:
            results.append(
                await _run_topology(
                    topo,
                    images,
                    checkout=checkout,
                    pytest_args=pytest_args,
                    timeout=timeout,
                    wheel=wheel,
                )
            )
    return results


async def _run_topology(
    topo: Topology,
    images: LabImages,
    *,
    checkout: Path,
    pytest_args: Sequence[str],
    timeout: float,
    wheel: Path,
) -> TierResult:
    print(f"lab: === topology {topo.name}: {topo.description}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"kvmvfio-tier-{topo.name}-") as tmp:
        job = Path(tmp)
        shutil.copy2(wheel, job / wheel.name)
        command = (
            "python3", "-m", "pytest", "tests/lab", "-m", "lab",
            "-p", "no:cacheprovider", "--junitxml=/mnt/job/junit.xml",
            f"--lab-topology={topo.name}", *pytest_args,
        )  # fmt: skip
        run = LabRun(
            topology=topo,
            images=images,
            checkout=checkout,
            command=command,
            env=((WHEEL_ENV, f"{GUEST_JOB}/{wheel.name}"),),
            timeout=timeout,
        )
        try:
            code = await run_in_lab(run, job_dir=job)
        except LabError as err:
            print(f"lab: topology {topo.name}: {err}", file=sys.stderr, flush=True)
            return TierResult(topo.name, -1, errors=1)
        return read_junit(job / "junit.xml", topo.name, code)


def summary(results: Sequence[TierResult]) -> str:
    """The closing line: ``N passed, N failed`` (with skipped), over all topologies."""
    passed = sum(r.passed for r in results)
    failed = sum(r.failed + r.errors for r in results)
    skipped = sum(r.skipped for r in results)
    return f"lab: {passed} passed, {failed} failed, {skipped} skipped"
