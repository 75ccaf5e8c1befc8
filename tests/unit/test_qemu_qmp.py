"""kvmvfio's side of QMP against a fake peer: identity, errors, ports, unplug.

Real QEMU is in the lab (tests/lab/test_qemu_handoff.py). Here the peer is
this test process itself, so SO_PEERCRED reports our own pid.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fakeqmp import SILENT, Error, FakeQmp
from fakesysfs import Dev, Topology

from kvmvfio.errors import (
    DetachTimeout,
    NoHotplugPort,
    NotAttached,
    QemuError,
    QemuNoAnswer,
    QemuPeerMismatch,
    QemuRefused,
)
from kvmvfio.host import Host
from kvmvfio.qemu import Qemu, attach, detach, free_ports, qdev_id

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeQmp]:
    peer = await FakeQmp(tmp_path / "qmp.sock").start()
    yield peer
    await peer.stop()


def _peripheral(*children: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": "type", "type": "string"}] + [
        {"name": n, "type": f"child<{t}>"} for n, t in children
    ]


async def test_the_peer_must_be_the_named_pid(fake: FakeQmp) -> None:
    async with Qemu(fake.path, pid=os.getpid()) as qemu:
        assert (qemu.pid, qemu.uid) == (os.getpid(), os.getuid())
    with pytest.raises(QemuPeerMismatch, match=f"belongs to pid {os.getpid()}"):
        await Qemu(fake.path, pid=os.getpid() + 100000).connect()
    # Only the first connection negotiated; the refused one sent nothing.
    assert [c for c, _ in fake.received] == ["qmp_capabilities"]


async def test_an_unreachable_socket(tmp_path: Path) -> None:
    with pytest.raises(QemuError, match="cannot connect to the QMP socket"):
        await Qemu(tmp_path / "none.sock", pid=1).connect()


async def test_a_silent_monitor_is_named(fake: FakeQmp) -> None:
    fake.greet = False
    with pytest.raises(QemuError, match="serves one client at a time"):
        await Qemu(fake.path, greeting_timeout=0.5).connect()


async def test_qemu_errors_keep_class_and_words(fake: FakeQmp) -> None:
    fake.replies["device_add"] = Error("GenericError", "Bus 'pcie.0' does not support hotplugging")
    async with Qemu(fake.path) as qemu:
        with pytest.raises(QemuRefused) as refused:
            await qemu.execute("device_add", {"driver": "vfio-pci"})
    assert refused.value.error_class == "GenericError"
    assert str(refused.value) == (
        "QEMU refused device_add: Bus 'pcie.0' does not support hotplugging (GenericError)"
    )


async def test_free_ports(fake: FakeQmp) -> None:
    listing = _peripheral(
        ("rp10", "pcie-root-port"),
        ("rp2", "pcie-root-port"),
        ("rp0", "pcie-root-port"),
        ("nic", "e1000e"),
    )
    fake.replies["qom-list"] = lambda a: listing if a["path"] == "/machine/peripheral" else []
    fake.replies["qom-get"] = "/machine/peripheral/rp0/rp0"  # the NIC sits on rp0
    async with Qemu(fake.path) as qemu:
        assert await free_ports(qemu) == (["rp2", "rp10"], ["rp0"])


async def test_attach_without_a_free_port_sends_no_fd(
    fake: FakeQmp, build_host: Callable[[Topology], Host]
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", driver="vfio-pci", group=1, **EDU)]))
    fake.replies["qom-list-types"] = [{"name": "iommufd"}]
    fake.replies["query-memory-size-summary"] = {"base-memory": 1 << 20}
    fake.replies["qom-list"] = lambda a: []
    async with Qemu(fake.path) as qemu:
        with pytest.raises(NoHotplugPort, match="pcie-root-port"):
            await attach(qemu, ["0000:00:03.0"], coherency="ignore", host=host)
    assert fake.fds_received == 0
    assert "getfd" not in [c for c, _ in fake.received]


async def test_detach_retries_while_the_guest_is_busy(fake: FakeQmp) -> None:
    ident = qdev_id("0000:00:03.0")
    calls = {"device_del": 0}

    def device_del(args: dict[str, object]) -> object:
        calls["device_del"] += 1
        if calls["device_del"] < 3:
            return Error(
                "GenericError", "Hot-unplug failed: guest is busy (power indicator blinking)"
            )
        return {}

    fake.replies["device_del"] = device_del
    fake.events["device_del"] = [{"event": "DEVICE_DELETED", "data": {"device": ident}}]
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    async with Qemu(fake.path) as qemu:
        assert await detach(qemu, ["0000:00:03.0"], host=Host("/nonexistent")) == [ident]
    assert calls["device_del"] == 3


async def test_detach_times_out_and_yanks_nothing(fake: FakeQmp) -> None:
    ident = qdev_id("0000:00:03.0")
    fake.replies["device_del"] = {}
    fake.replies["qom-list"] = lambda a: (
        _peripheral((ident, "vfio-pci")) if a["path"] == "/machine/peripheral" else []
    )
    fake.replies["qom-get"] = "/objects/kvmvfio-iommufd"
    async with Qemu(fake.path) as qemu:
        with pytest.raises(DetachTimeout, match="stays attached as QEMU has it"):
            await detach(qemu, ["0000:00:03.0"], timeout=0.3)
    assert "object-del" not in [c for c, _ in fake.received]


async def test_detach_of_a_device_kvmvfio_did_not_attach(fake: FakeQmp) -> None:
    fake.replies["qom-list"] = lambda a: []
    async with Qemu(fake.path) as qemu:
        with pytest.raises(NotAttached, match="kvmvfio-0000-00-03-0"):
            await detach(qemu, ["0000:00:03.0"], host=Host("/nonexistent"))


async def test_events_nobody_waits_for_are_not_kept(fake: FakeQmp) -> None:
    """A long-lived connection (1000 cycles in the soak) must not hoard QEMU's events."""
    fake.replies["query-status"] = {"running": True}
    fake.events["query-status"] = [
        {"event": "DEVICE_DELETED", "data": {"device": f"d{i}"}} for i in range(50)
    ]
    async with Qemu(fake.path) as qemu:
        for _ in range(4):
            await qemu.execute("query-status")
        await asyncio.sleep(0.1)  # let the reader take in the events
        queued = sum(
            listener._queue.qsize() + len(listener._history)  # qemu.qmp keeps both
            for listener in qemu.client._listeners
        )
        assert queued == 0


async def test_a_qemu_that_does_not_answer_is_named_not_waited_for_forever(
    fake: FakeQmp,
) -> None:
    fake.replies["query-status"] = SILENT
    async with Qemu(fake.path, pid=os.getpid(), command_timeout=0.3) as qemu:
        with pytest.raises(QemuNoAnswer) as stuck:
            await qemu.execute("query-status")
    said = str(stuck.value)
    assert f"QEMU pid {os.getpid()} did not answer query-status within 0.3 s" in said
    assert f"/proc/{os.getpid()}/task/*/stack" in said
