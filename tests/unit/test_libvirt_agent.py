"""The agent's bookkeeping against a fake libvirt connection: what it releases, and what not.

The handoff itself, and restarts of the agent and of libvirtd, are in the
lab (tests/lab/test_libvirt.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from fakesysfs import Dev, Topology

import kvmvfio.libvirt.agent as agent_mod
from kvmvfio.errors import CoherencyRefused, KvmvfioError
from kvmvfio.host import Host
from kvmvfio.libvirt.agent import Agent, DomainState, StateStore
from kvmvfio.libvirt.metadata import NAMESPACE
from kvmvfio.libvirt.status import StatusFile
from kvmvfio.prepare import status
from kvmvfio.prepare.journal import Journal, Record

BuildHost = Callable[[Topology], Host]


class NoDomain(Exception):
    def get_error_code(self) -> int:
        return 42  # VIR_ERR_NO_DOMAIN


class FakeDomain:
    def __init__(
        self, name: str, *, active: bool = True, uuid: str = "u-1", meta: str = ""
    ) -> None:
        self._name, self.active, self.uuid, self.meta = name, active, uuid, meta

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self.uuid

    def isActive(self) -> int:
        return int(self.active)

    def XMLDesc(self, flags: int = 0) -> str:
        return f"<domain><name>{self._name}</name><metadata>{self.meta}</metadata></domain>"


class FakeConn:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.name(): d for d in domains}

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        return list(self.domains.values())

    def lookupByName(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise NoDomain(name)
        return self.domains[name]


@pytest.fixture
def agent(tmp_path: Path, build_host: BuildHost) -> Agent:
    host = build_host(
        Topology(devices=[Dev("0000:00:03.0", group=1), Dev("0000:00:04.0", group=2)])
    )
    return Agent(root=tmp_path / "run", sysfs=host.sysfs, devfs=host.devfs)


def _claim(agent: Agent, group: int, owner: str) -> None:
    Journal(agent.root).write(Record(group, owner, 0))


def test_state_records_round_trip_and_refuse_path_names(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.write(DomainState("vm1", "u-1", {"0000:00:03.0": True}))
    assert store.read("vm1") == DomainState("vm1", "u-1", {"0000:00:03.0": True})
    assert store.names() == ["vm1"]
    store.remove("vm1")
    assert store.read("vm1") is None
    store.remove("vm1")  # idempotent
    with pytest.raises(KvmvfioError, match="cannot name a file"):
        store.read("../etc")


async def test_a_vanished_domain_loses_its_claims_and_nobody_else_does(agent: Agent) -> None:
    _claim(agent, 1, "libvirt:gone")
    _claim(agent, 2, "vm-cli")  # a claim `kvmvfio prepare --owner vm-cli` made
    agent.store.write(DomainState("gone", "u-9", {"0000:00:03.0": False}))
    await agent.reconcile_all(FakeConn())
    assert [(s.group, s.owner) for s in status(root=agent.root)] == [(2, "vm-cli")]
    assert agent.store.names() == []


async def test_a_stopped_domain_is_released_and_a_running_one_left_alone(agent: Agent) -> None:
    _claim(agent, 1, "libvirt:stopped")
    _claim(agent, 2, "libvirt:running")
    conn = FakeConn(FakeDomain("stopped", active=False), FakeDomain("running"))
    await agent.reconcile_all(conn)
    # "running" asks nothing of the agent (no handoff='agent' devices): its
    # claim is the hook's, for its own <hostdev>, and stays.
    assert [(s.group, s.owner) for s in status(root=agent.root)] == [(2, "libvirt:running")]


async def test_a_new_domain_of_an_old_name_does_not_inherit_its_record(agent: Agent) -> None:
    _claim(agent, 1, "libvirt:vm1")
    agent.store.write(DomainState("vm1", "old-uuid", {"0000:00:03.0": False}))
    await agent.reconcile(FakeConn(FakeDomain("vm1", uuid="new-uuid")), "vm1")
    assert status(root=agent.root) == []
    assert agent.store.read("vm1") is None


async def test_bad_metadata_of_one_domain_is_reported_not_fatal(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    bad = f'<k:devices xmlns:k="{NAMESPACE}"><k:device address="zz"/></k:devices>'
    _claim(agent, 2, "libvirt:gone")
    await agent.reconcile_all(FakeConn(FakeDomain("bad", meta=bad)))
    assert "domain 'bad': <kvmvfio:device address='zz'>" in caplog.text
    assert status(root=agent.root) == []  # the other domain's work still happened


class FakeMonitor:
    """What _converge needs of a DomainMonitor: an async context and a pid."""

    pid = 4242

    def __init__(self, dom: object, run_dir: object = None) -> None:
        pass

    async def __aenter__(self) -> FakeMonitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_one_refused_device_does_not_keep_the_others_from_the_domain(
    agent: Agent, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attached: list[str] = []
    prepared: list[tuple[list[str], str]] = []

    def fake_prepare(addrs: list[str], owner: str, **kw: object) -> None:
        prepared.append((addrs, owner))

    async def no_devices(monitor: object) -> list[str]:
        return []

    async def fake_attach(monitor: object, addrs: list[str], **kw: object) -> list[object]:
        if addrs == ["0000:00:03.0"]:
            raise CoherencyRefused("device 0000:00:03.0", addrs)
        attached.extend(addrs)
        return [SimpleNamespace(qdev_id="kvmvfio-0000-00-04-0", bus="rp1")]

    monkeypatch.setattr(agent_mod, "DomainMonitor", FakeMonitor)
    monkeypatch.setattr(agent_mod, "kvmvfio_devices", no_devices)
    monkeypatch.setattr(agent_mod, "attach", fake_attach)
    monkeypatch.setattr(agent_mod, "prepare", fake_prepare)
    meta = (
        f'<k:devices xmlns:k="{NAMESPACE}">'
        '<k:device address="00:03.0" handoff="agent" coherency="require"/>'
        '<k:device address="00:04.0" handoff="agent"/></k:devices>'
    )
    await agent.reconcile(FakeConn(FakeDomain("vm1", meta=meta)), "vm1")
    assert attached == ["0000:00:04.0"]
    assert "domain vm1: 0000:00:03.0 not attached:" in caplog.text
    assert "tried again at the next reconcile" in caplog.text
    # Both are the domain's (prepared, recorded): its stop gives both back.
    assert prepared == [(["0000:00:03.0"], "libvirt:vm1"), (["0000:00:04.0"], "libvirt:vm1")]
    state = agent.store.read("vm1")
    assert state is not None
    assert sorted(state.devices) == ["0000:00:03.0", "0000:00:04.0"]


# -- the status file ------------------------------------------------------------------------


async def test_the_status_file_says_what_was_attached_refused_and_released(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    present: list[str] = []

    async def in_qemu(monitor: object) -> list[str]:
        return list(present)

    async def fake_attach(monitor: object, addrs: list[str], **kw: object) -> list[object]:
        if addrs == ["0000:00:03.0"]:
            raise CoherencyRefused("device 0000:00:03.0", addrs)
        present.append("kvmvfio-0000-00-04-0")
        return [SimpleNamespace(qdev_id="kvmvfio-0000-00-04-0", bus="rp1")]

    monkeypatch.setattr(agent_mod, "DomainMonitor", FakeMonitor)
    monkeypatch.setattr(agent_mod, "kvmvfio_devices", in_qemu)
    monkeypatch.setattr(agent_mod, "attach", fake_attach)
    monkeypatch.setattr(agent_mod, "prepare", lambda *a, **kw: None)
    meta = (
        f'<k:devices xmlns:k="{NAMESPACE}">'
        '<k:device address="00:03.0" handoff="agent" coherency="require"/>'
        '<k:device address="00:04.0" handoff="agent"/></k:devices>'
    )
    dom = FakeDomain("vm1", meta=meta)
    conn = FakeConn(dom, FakeDomain("plain"))  # "plain" asks nothing: not listed
    await agent.reconcile_all(conn)
    st = StatusFile(agent.root).read()
    assert st is not None
    assert (st.pid, st.uri, st.connected) == (os.getpid(), "qemu:///system", False)
    assert st.pid_start is not None
    (vm1,) = st.domains
    assert (vm1.name, vm1.uuid, vm1.running, vm1.refusal) == ("vm1", "u-1", True, None)
    refused, attached = vm1.devices
    assert (refused.address, refused.action, refused.held) == ("0000:00:03.0", "refused", False)
    assert refused.refusal is not None
    assert refused.refusal.error == "CoherencyRefused"
    assert "0000:00:03.0" in refused.refusal.message
    assert refused.refusal.retry_at is not None
    assert refused.refusal.retry_at >= refused.refusal.at
    assert (attached.address, attached.action, attached.held) == ("0000:00:04.0", "attached", True)
    assert (attached.handoff, attached.path, attached.wanted) == ("agent", "cdev", True)

    # The next reconcile finds it in QEMU: nothing to do, the last action stays.
    await agent.reconcile_all(conn)
    st = StatusFile(agent.root).read()
    assert st is not None
    assert [(d.address, d.action) for d in st.domains[0].devices] == [
        ("0000:00:03.0", "refused"),
        ("0000:00:04.0", "attached"),
    ]

    # The domain stops: what the agent held is released, the domain is listed as stopped.
    monkeypatch.setattr(agent_mod, "release_owner", lambda *a, **kw: [])
    dom.active = False
    await agent.reconcile_all(conn)
    st = StatusFile(agent.root).read()
    assert st is not None
    (vm1,) = st.domains
    assert not vm1.running
    assert [(d.address, d.action, d.held, d.wanted) for d in vm1.devices] == [
        ("0000:00:03.0", "released", False, False),
        ("0000:00:04.0", "released", False, False),
    ]
    # Gone from libvirt with nothing left: gone from the status too.
    await agent.reconcile_all(FakeConn())
    st = StatusFile(agent.root).read()
    assert st is not None
    assert st.domains == ()


async def test_a_domain_refused_whole_is_in_the_status_until_it_is_fixed(agent: Agent) -> None:
    bad = f'<k:devices xmlns:k="{NAMESPACE}"><k:device address="zz"/></k:devices>'
    dom = FakeDomain("bad", meta=bad)
    await agent.reconcile_all(FakeConn(dom))
    st = StatusFile(agent.root).read()
    assert st is not None
    (entry,) = st.domains
    assert entry.refusal is not None
    assert entry.refusal.error == "MetadataError"
    assert "<kvmvfio:device address='zz'>" in entry.refusal.message
    dom.meta = ""
    await agent.reconcile_all(FakeConn(dom))
    st = StatusFile(agent.root).read()
    assert st is not None
    assert [(d.name, d.refusal) for d in st.domains] == [("bad", None)]


async def test_a_status_file_that_cannot_be_written_does_not_stop_the_agent(
    agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    (agent.root / "status").mkdir(parents=True)
    (agent.root / "status").chmod(0o755)  # not kvmvfio's: refused, the work goes on
    _claim(agent, 1, "libvirt:gone")
    await agent.reconcile_all(FakeConn())
    assert status(root=agent.root) == []
    await agent.reconcile_all(FakeConn())
    assert caplog.text.count("agent status not written:") == 1  # not at every reconcile
    assert "has mode 0755" in caplog.text
