"""Tell a stalled L1 from a slow one, from the host, through L1's human monitor.

Under TCG, L1 sometimes stops taking interrupts for good (docs/lab.md): its
QEMU then uses no CPU, and its local APIC keeps an interrupt pending in IRR
that is never delivered. A run in that state would wait for its
``--timeout`` (hours for the soak); :func:`watch` ends it within minutes
with a :class:`~kvmvfio.errors.LabError` that says what was seen.

An idle L1 also uses little CPU, but its timer interrupts are delivered:
IRR is empty, or holds another vector a moment later. So a stall is: QEMU
used less than ``MIN_CPU`` seconds of CPU over ``window`` seconds, *and*
the same vector sat in IRR at each of several probes of ``info lapic``.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from kvmvfio.errors import LabError

#: Less CPU than this over a window is "idle" (a busy L1 uses ~1 s/s).
MIN_CPU = 2.0
_IRR = re.compile(rb"^IRR\s+(.*)$", re.MULTILINE)
_PROMPT = b"(qemu) "


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` (user + system); raises OSError once it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def hmp(socket_path: Path, command: str, timeout: float = 10.0) -> str:
    """Run one human-monitor command on a QEMU ``-monitor unix:...`` socket; its output."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            await reader.readuntil(_PROMPT)  # the banner
            writer.write(command.encode() + b"\n")
            await writer.drain()
            out = await reader.readuntil(_PROMPT)
        finally:
            writer.close()
    # The monitor echoes the line with terminal escapes; keep what follows it.
    text = re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", out).decode(errors="replace")
    return text.rsplit("(qemu)", 1)[0].split("\n", 1)[-1]


def pending_irr(lapic: str) -> str:
    """The IRR line of ``info lapic`` ("" when nothing is pending)."""
    match = _IRR.search(lapic.encode())
    vectors = match.group(1).decode().strip() if match else ""
    return "" if vectors == "(none)" else vectors


async def watch(
    pid: int,
    monitor: Path,
    *,
    window: float = 120.0,
    probes: int = 3,
    probe_gap: float = 10.0,
) -> None:
    """Return never; raise :class:`LabError` once L1 (QEMU ``pid``) is seen stalled.

    Meant to run beside a lab run and be cancelled when the run ends.
    """
    while True:
        try:
            before = cpu_seconds(pid)
        except OSError:
            return  # QEMU is gone: the run itself reports why
        await asyncio.sleep(window)
        try:
            used = cpu_seconds(pid) - before
        except OSError:
            return
        if used >= MIN_CPU:
            continue
        seen = []
        for _ in range(probes):
            try:
                seen.append(pending_irr(await hmp(monitor, "info lapic")))
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                break
            await asyncio.sleep(probe_gap)
        if len(seen) == probes and seen[0] and all(s == seen[0] for s in seen):
            raise LabError(
                f"L1 stopped taking interrupts: its QEMU used {used:.1f} s of CPU in "
                f"{window:.0f} s, and interrupt {seen[0]} stayed pending in its local APIC "
                f"for {probes * probe_gap:.0f} s (a known TCG problem, docs/lab.md); "
                "stopped the run"
            )
