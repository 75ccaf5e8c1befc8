"""What the L2 guest's init prints about PCI uevents, read back (kvmvfio.lab.l2)."""

from __future__ import annotations

from kvmvfio.lab.l2 import PCI_EVENT, parse_pci_events


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
