"""Reset scopes (what a bus reset also hits) and the dead-device refusal at release, on fake trees.

The lab shows both on a real kernel (tests/lab/test_reset.py); here the
readers meet shapes the lab has not: a bridge with a hotplug slot's worth of
functions, nested bridges, a function gone from sysfs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology, tree_files

from kvmvfio.errors import DeviceNotAnswering
from kvmvfio.host import Host, PciAddress
from kvmvfio.host.reset import answers, reset_scope
from kvmvfio.prepare import recover, release, release_owner
from kvmvfio.prepare.journal import Entry, Journal, Record
from kvmvfio.vfio.plan import make_plan

BuildHost = Callable[[Topology], Host]
GONE_PID = 2**22 + 12345

TOPOLOGY = Topology(
    devices=[
        # A GPU-like card behind a root port: display without FLR, audio with one.
        Dev("0000:00:01.0", bridge=True, driver="pcieport", group=1, children=[
            Dev("0000:01:00.0", cls=0x030000, driver="vfio-pci", group=2, reset_methods=()),
            Dev("0000:01:00.1", cls=0x040300, driver="snd_hda_intel", group=2,
                reset_methods=("flr",)),
        ]),
        # A switch: a bridge behind a bridge; its reset hits everything below.
        Dev("0000:00:02.0", bridge=True, driver="pcieport", group=3, children=[
            Dev("0000:02:00.0", bridge=True, driver="pcieport", group=3, children=[
                Dev("0000:03:00.0", driver="vfio-pci", group=4, reset_methods=()),
            ]),
        ]),
        # Alone on its bus: the kernel's own `bus` method resets it alone.
        Dev("0000:00:1c.0", bridge=True, driver="pcieport", group=5, children=[
            Dev("0000:04:00.0", driver="e1000e", group=6, reset_methods=("pm", "bus")),
        ]),
        # On the root bus, nothing of its own: no reset at all.
        Dev("0000:00:05.0", vendor=0x1234, device=0x11E8, driver="vfio-pci", group=7,
            reset_methods=()),
    ],
    drivers=("vfio-pci", "e1000e", "snd_hda_intel"),
)  # fmt: skip


@pytest.fixture
def host(build_host: BuildHost) -> Host:
    return build_host(TOPOLOGY)


def test_a_function_without_flr_behind_a_bridge_shares_its_reset(host: Host) -> None:
    scope = reset_scope(host.sysfs, host.device("0000:01:00.0"), host.devices())
    assert (scope.own, scope.bridge) == (False, PciAddress.parse("0000:00:01.0"))
    assert [(str(a.address), a.driver) for a in scope.affected] == [
        ("0000:01:00.1", "snd_hda_intel")
    ]
    assert [str(a.address) for a in scope.blocking_bus_reset()] == ["0000:01:00.1"]
    assert scope.summary() == (
        "reset: none of its own; only a bus reset by bridge 0000:00:01.0, which also resets "
        "0000:01:00.1 (snd_hda_intel); vfio-pci does that reset between users only once they "
        "are all on vfio-pci"
    )


def test_a_bus_reset_reaches_through_a_switch(host: Host) -> None:
    scope = reset_scope(host.sysfs, host.device("0000:02:00.0"), host.devices())
    assert str(scope.bridge) == "0000:00:02.0"
    assert [str(a.address) for a in scope.affected] == ["0000:03:00.0"]
    below = reset_scope(host.sysfs, host.device("0000:03:00.0"), host.devices())
    assert (str(below.bridge), below.affected) == ("0000:02:00.0", ())
    assert below.summary() == (
        "reset: none of its own; a bus reset by bridge 0000:02:00.0 hits only it"
    )


def test_a_bus_method_listed_before_a_neighbour_came_does_not_count(
    build_host: BuildHost,
) -> None:
    # As the kernel lists it for a GPU's function 0, probed before its audio function.
    host = build_host(
        Topology(devices=[Dev("0000:00:1c.0", bridge=True, driver="pcieport", group=1, children=[
            Dev("0000:01:00.0", cls=0x030000, group=2, reset_methods=("bus",)),
            Dev("0000:01:00.1", cls=0x040300, group=2),
        ])])
    )  # fmt: skip
    scope = reset_scope(host.sysfs, host.device("0000:01:00.0"), host.devices())
    assert (scope.methods, scope.stale, scope.own) == (("bus",), ("bus",), False)
    assert scope.summary() == (
        "reset: none of its own (the kernel lists bus, but refuses it while others share the "
        "bus); only a bus reset by bridge 0000:00:1c.0, which also resets 0000:01:00.1 "
        "(no driver); vfio-pci does that reset between users only once they are all on vfio-pci"
    )


def test_own_methods_are_named_in_the_kernels_order(host: Host) -> None:
    scope = reset_scope(host.sysfs, host.device("0000:04:00.0"), host.devices())
    assert scope.own
    assert scope.summary() == "reset: pm, bus (the kernel's own, tried in this order)"


def test_a_root_bus_function_with_no_method_has_no_reset(host: Host) -> None:
    scope = reset_scope(host.sysfs, host.device("0000:00:05.0"), host.devices())
    assert (scope.own, scope.bridge, scope.affected) == (False, None, ())
    assert scope.summary().startswith("reset: none; the kernel cannot reset it")


def test_the_plan_notes_a_shared_reset_and_stays_quiet_on_an_own_one(host: Host) -> None:
    plan = make_plan(["0000:00:05.0"], coherency="ignore", host=host)
    assert plan.notes == ()  # not a safety matter: its own line
    (dev,) = plan.devices
    assert dev.reset is not None
    assert dev.reset.startswith("none; the kernel cannot reset it")
    assert plan.lines()[-1].startswith("reset:      0000:00:05.0: none; the kernel cannot")
    assert plan.to_json()["devices"][0]["reset"] == dev.reset


def test_a_function_answers_with_its_vendor_id(host: Host) -> None:
    alive = answers(host.sysfs, "0000:00:05.0")
    assert (alive.vendor, alive.power_state, alive.dead) == (0x1234, "D0", False)
    gone = answers(host.sysfs, "0000:00:1f.7")  # not in sysfs: unknown, not dead
    assert (gone.vendor, gone.dead) == (None, False)


def _kill(host: Host, addr: str) -> None:
    """What the kernel reads from a function that fell off the bus: all ones."""
    (host.sysfs / "bus" / "pci" / "devices" / addr / "config").write_bytes(b"\xff" * 64)
    (host.sysfs / "bus" / "pci" / "devices" / addr / "power_state").write_bytes(b"D3cold\n")


def test_release_leaves_a_dead_device_on_vfio_pci_and_keeps_the_record(
    host: Host, tmp_path: Path
) -> None:
    root = tmp_path / "run"
    Journal(root).write(Record(7, "vm1", GONE_PID, devices=[Entry("0000:00:05.0", "e1000e", None)]))
    _kill(host, "0000:00:05.0")
    before = tree_files(host.sysfs)
    with pytest.raises(DeviceNotAnswering) as refused:
        release(["0000:00:05.0"], host=host, root=root)
    assert str(refused.value) == (
        "PCI device 0000:00:05.0 does not answer (vendor ID reads 0xffff, power state D3cold): "
        "it fell off the bus or its last reset failed. IOMMU group 7 stays on vfio-pci, its "
        "record kept, rather than given back to e1000e, whose probe would hang or fail on it. "
        "Bring the device back (a slot power cycle, or `echo 1 > "
        "/sys/bus/pci/devices/0000:00:05.0/remove` and a rescan of its bridge), then release "
        "it again"
    )
    assert (refused.value.address, refused.value.group) == ("0000:00:05.0", 7)
    assert tree_files(host.sysfs) == before  # nothing written: no unbind, no override
    assert Journal(root).read(7) is not None


def test_a_device_that_was_on_vfio_pci_before_is_not_asked(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "run"
    Journal(root).write(
        Record(7, "vm1", GONE_PID, devices=[Entry("0000:00:05.0", "vfio-pci", None)])
    )
    _kill(host, "0000:00:05.0")
    (done,) = release(["0000:00:05.0"], host=host, root=root)
    assert done.driver == "vfio-pci"
    assert Journal(root).read(7) is None


def test_inventory_notes_name_a_missing_reset_only_where_a_vm_could_get_it(host: Host) -> None:
    from kvmvfio.cli.host_cmds import render_inventory, resets_of  # noqa: PLC0415

    inv = host.inventory()
    rows = {
        line.split()[0]: line
        for line in render_inventory(inv, resets=resets_of(host, inv.devices, inv.devices))
        .split("\n\n")[0]
        .splitlines()[1:]
    }
    assert rows["0000:00:05.0"].endswith("no reset")
    assert rows["0000:01:00.0"].endswith("bus reset only")
    assert "reset" not in rows["0000:04:00.0"]  # pm, bus: its own
    assert "reset" not in rows["0000:00:01.0"]  # a bridge: no VM gets it


def test_a_virtual_function_reading_ffff_as_its_vendor_is_alive(host: Host) -> None:
    # By the SR-IOV spec a VF's vendor and device IDs read 0xffff; the rest is real.
    config = host.sysfs / "bus" / "pci" / "devices" / "0000:00:05.0" / "config"
    config.write_bytes(b"\xff\xff\xff\xff\x06\x04\x10\x00\x00\x00\x08\x01" + bytes(52))
    alive = answers(host.sysfs, "0000:00:05.0")
    assert (alive.vendor, alive.dead) == (0xFFFF, False)


@pytest.mark.parametrize("how", ["release", "release_owner", "recover"])
def test_a_reset_asked_at_prepare_is_done_by_every_release(
    host: Host, tmp_path: Path, how: str
) -> None:
    """The wish is the record's: a release that does not ask (the agent's for
    a stopped domain, ``recover`` after a crash) still resets the device."""
    root = tmp_path / "run"
    addr = "0000:00:05.0"
    journal = Journal(root)
    journal.write(Record(7, "vm1", GONE_PID, devices=[Entry(addr, "vfio-pci", None, reset=True)]))
    assert json.loads(journal.path(7).read_text())["devices"][0]["reset"] is True
    reset_file = host.sysfs / "bus" / "pci" / "devices" / addr / "reset"
    reset_file.write_text("")
    if how == "release":
        (done,) = release([addr], "vm1", host=host, root=root)
    elif how == "release_owner":
        (done,) = release_owner("vm1", host=host, root=root)
    else:
        (done,) = recover(host=host, root=root).restored
    assert done.reset
    assert reset_file.read_text() == "1"
    assert journal.read(7) is None


def test_no_reset_unless_asked(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "run"
    addr = "0000:00:05.0"
    journal = Journal(root)
    journal.write(Record(7, "vm1", GONE_PID, devices=[Entry(addr, "vfio-pci", None)]))
    assert "reset" not in json.loads(journal.path(7).read_text())["devices"][0]
    reset_file = host.sysfs / "bus" / "pci" / "devices" / addr / "reset"
    reset_file.write_text("")
    (done,) = release([addr], "vm1", host=host, root=root)
    assert not done.reset
    assert reset_file.read_text() == ""
