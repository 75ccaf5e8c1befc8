"""The lab's stall detector against a fake human monitor and an idle process."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmvfio.errors import LabError
from kvmvfio.lab import stall

# What QEMU 7.2's monitor sent for `info lapic` on a stalled L1 (trimmed).
LAPIC_STALLED = """dumping local APIC state for CPU 0 \r
\r
LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)\r
Timer\t DCR=0x3 (divide by 16) initial_count = 6665 current_count = 0\r
ISR\t (none)\r
IRR\t 236 \r
\r
APR 0x00 TPR 0x10 DFR 0x0f LDR 0x00 PPR 0x10\r
"""
LAPIC_IDLE = LAPIC_STALLED.replace("IRR\t 236 ", "IRR\t (none)")


# The start of QEMU 7.2's `info registers` on a stalled L1 (trimmed).
REGISTERS = (
    "RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000\r\n"
    "RIP=ffffffff81e2a1b4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
)


class FakeMonitor:
    """A UNIX socket that talks like QEMU's human monitor (banner, echo, prompt)."""

    def __init__(self, path: Path, lapic: str) -> None:
        self.path, self.lapic, self.commands = path, lapic, []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
        line = (await reader.readline()).decode().strip()
        self.commands.append(line)
        echo = "".join(f"{line[: i + 1]}\x1b[K\x1b[{i + 1}D" for i in range(len(line)))
        reply = REGISTERS if line == "info registers" else self.lapic
        writer.write(f"{echo}\r\n{reply}(qemu) ".encode())
        await writer.drain()
        writer.close()


@pytest.fixture
def idle_pid() -> Iterator[int]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


async def _monitor(tmp_path: Path, lapic: str) -> tuple[FakeMonitor, asyncio.Server]:
    fake = FakeMonitor(tmp_path / "l1-monitor.sock", lapic)
    server = await asyncio.start_unix_server(fake.serve, path=str(fake.path))
    return fake, server


def test_the_irr_line_is_read() -> None:
    assert stall.pending_irr(LAPIC_STALLED) == "236"
    assert stall.pending_irr(LAPIC_IDLE) == ""
    assert stall.pending_irr("garbage") == ""


async def test_hmp_returns_the_output_without_echo_or_prompt(tmp_path: Path) -> None:
    fake, server = await _monitor(tmp_path, LAPIC_STALLED)
    async with server:
        out = await stall.hmp(fake.path, "info lapic")
    assert fake.commands == ["info lapic"]
    assert out.lstrip().startswith("dumping local APIC state")
    assert "(qemu)" not in out
    assert stall.pending_irr(out) == "236"


async def test_a_stalled_l1_ends_the_run_with_what_was_seen(tmp_path: Path, idle_pid: int) -> None:
    fake, server = await _monitor(tmp_path, LAPIC_STALLED)
    async with server:
        with pytest.raises(LabError) as stalled:
            await asyncio.wait_for(stall.watch(idle_pid, fake.path, window=0.2, probe_gap=0.05), 10)
    said = str(stalled.value)
    assert said.startswith("L1 stopped taking interrupts: interrupt 236 stayed pending")
    assert "its timer not re-armed" in said
    assert fake.commands == ["info lapic"] * 3 + ["info registers"]
    # Where L1's CPU was is in the sentence (the job folder may be a temporary one).
    assert said.endswith(
        "L1's CPU then: RIP=ffffffff81e2a1b4 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1"
    )


async def test_an_idle_l1_whose_interrupts_arrive_is_left_alone(
    tmp_path: Path, idle_pid: int
) -> None:
    fake, server = await _monitor(tmp_path, LAPIC_IDLE)
    async with server:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                stall.watch(idle_pid, fake.path, window=0.2, probe_gap=0.05), 1.5
            )
    assert len(fake.commands) >= 3  # it looked, and found nothing stuck


async def test_a_busy_l1_whose_timer_is_re_armed_is_left_alone(
    tmp_path: Path, idle_pid: int
) -> None:
    """The timer fires and is re-armed: a vector seen in IRR at each look is a coincidence."""
    fake, server = await _monitor(tmp_path, LAPIC_STALLED)
    counts = iter(range(1000, 100000, 7))

    async def rearming(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fake.lapic = LAPIC_STALLED.replace(
            "initial_count = 6665", f"initial_count = {next(counts)}"
        )
        await FakeMonitor.serve(fake, reader, writer)

    server.close()
    await server.wait_closed()
    fake.path.unlink()
    server = await asyncio.start_unix_server(rearming, path=str(fake.path))
    async with server:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                stall.watch(idle_pid, fake.path, window=0.2, probe_gap=0.05), 1.5
            )
    assert len(fake.commands) >= 3


async def test_a_gone_qemu_ends_the_watch_quietly(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    await asyncio.wait_for(stall.watch(proc.pid, tmp_path / "none.sock", window=0.1), 5)
