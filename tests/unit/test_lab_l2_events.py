"""What the L2 guest's init prints about PCI uevents, read back (kvmvfio.lab.l2)."""

from __future__ import annotations

import subprocess
from typing import ClassVar

import pytest

from kvmvfio.lab.l2 import PCI_EVENT, READY, L2Qemu, parse_pci_events


def test_events_are_counted_by_action_and_id() -> None:
    text = (
        f"{PCI_EVENT} add 0000:01:00.0 1234:11E8\n"
        "[    3.1] some kernel line\n"
        f"{PCI_EVENT} add 0000:02:00.0 1234:11E8\n"
        f"{PCI_EVENT} remove 0000:01:00.0 1234:11E8\n"
    )
    counts, garbled = parse_pci_events(text)
    assert counts == {("add", "1234:11e8"): 2, ("remove", "1234:11e8"): 1}
    assert garbled == []


def test_a_line_garbled_by_a_kernel_message_is_kept_not_counted() -> None:
    broken = f"{PCI_EVENT} add 0000:0[   77.2] clocksource: Marking clocksource 'tsc' as unstable"
    counts, garbled = parse_pci_events(f"{broken}\n1:00.0 1234:11E8\n")
    assert counts == {}
    assert garbled == [broken]


class _FakeL2(L2Qemu):
    """An L2Qemu whose 'guest' prints what a test says, with a real (sleeping) process."""

    consoles: ClassVar[list[str]] = []
    made: ClassVar[list[_FakeL2]] = []

    def __init__(self, **kwargs: object) -> None:
        self.text = type(self).consoles.pop(0)
        self.proc = subprocess.Popen(["sleep", "60"])
        self.killed = False
        type(self).made.append(self)

    def console(self) -> str:
        return self.text

    def cpu_seconds(self) -> float:
        return 0.0

    def kill(self) -> None:
        self.killed = True
        self.proc.kill()
        self.proc.wait()


def test_a_stalled_boot_is_tried_again_and_said(capsys: pytest.CaptureFixture[str]) -> None:
    stall = "[  231.78] rcu: INFO: rcu_preempt self-detected stall on CPU\n"
    _FakeL2.consoles = [stall, f"boot\n{READY}\n"]
    _FakeL2.made = []
    qemu = _FakeL2.booted(timeouts=(30.0, 30.0))
    assert qemu is _FakeL2.made[1]
    assert _FakeL2.made[0].killed
    assert not qemu.killed
    qemu.kill()
    assert "L2 guest boot try 1 failed" in capsys.readouterr().err


def test_the_last_try_s_failure_is_raised() -> None:
    stall = "rcu: INFO: rcu_preempt self-detected stall on CPU\n"
    _FakeL2.consoles = [stall, stall]
    _FakeL2.made = []
    with pytest.raises(TimeoutError, match=r"no guest boot within 0\.3 s"):
        _FakeL2.booted(timeouts=(30.0, 0.3))
    assert all(q.killed for q in _FakeL2.made)
