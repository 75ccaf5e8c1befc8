"""Tell a stalled L1 from a slow one, from the host, through L1's human monitor.

Under Debian's packaged QEMU 7.2, L1 sometimes stopped taking interrupts for
good: TCG lost the request that makes the CPU poll its local APIC, so an
interrupt stayed pending in IRR, never delivered (docs/lab.md; the lab's own
QEMU build, ``vm-images/qemu``, fixes it). A run in that state would wait for
its ``--timeout`` (hours for the soak); :func:`watch` stays so that a stall of
any cause ends a run within minutes, with a :class:`~kvmvfio.errors.LabError`
that says what was seen and where L1's CPU was.

A working L1 takes its timer interrupt within moments and re-arms its
one-shot timer all the time, idle or busy. So a stall is: every
``window`` seconds, three looks at ``info lapic``, ``probe_gap`` apart, all
show the same vector pending in IRR and the same timer line (not re-armed).
That holds whether L1 halted (its QEMU then uses no CPU) or spins (an L2
guest on ``idle=poll`` kept it busy, and it still took no interrupt).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from kvmvfio.errors import LabError

_IRR = re.compile(rb"^IRR\s+(.*)$", re.MULTILINE)
_PROMPT = b"(qemu) "
#: What :func:`hmp` raises when the monitor is gone or does not answer.
_NO_MONITOR = (OSError, TimeoutError, asyncio.IncompleteReadError)


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

    Meant to run beside a lab run and be cancelled when the run ends;
    returns when QEMU is gone or its monitor cannot be reached.
    """
    while True:
        await asyncio.sleep(window)
        try:
            before = cpu_seconds(pid)
        except OSError:
            return  # QEMU is gone: the run itself reports why
        seen = []
        for _ in range(probes):
            try:
                lapic = await hmp(monitor, "info lapic")
            except _NO_MONITOR:
                return
            seen.append((pending_irr(lapic), _first_line(lapic, "Timer")))
            await asyncio.sleep(probe_gap)
        if seen[0][0] and all(s == seen[0] for s in seen):
            try:
                used = cpu_seconds(pid) - before
            except OSError:
                return
            record = await _record(monitor)
            raise LabError(
                f"L1 stopped taking interrupts: interrupt {seen[0][0]} stayed pending in its "
                f"local APIC, its timer not re-armed, for {probes * probe_gap:.0f} s (its QEMU "
                f"used {used:.1f} s of CPU meanwhile); see docs/lab.md. "
                f"Stopped the run{record}"
            )


async def _record(monitor: Path) -> str:
    """L1's instruction pointer, flags and halt state, for whoever looks into the stall."""
    try:
        registers = await hmp(monitor, "info registers")
    except _NO_MONITOR:
        return ""
    rip = _first_line(registers, "RIP=")
    return f"; L1's CPU then: {rip}" if rip else ""


def _first_line(text: str, prefix: str) -> str:
    """The first line of monitor output that starts with ``prefix``, stripped ("" if none)."""
    return next((ln.strip() for ln in text.splitlines() if ln.startswith(prefix)), "")
