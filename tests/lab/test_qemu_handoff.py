"""Handing devices to an unprivileged L2 QEMU, and taking them back, for real.

QEMU runs as ``nobody`` and cannot open any VFIO file itself. The tests
check what QEMU holds (``/proc/PID/fd``), what QOM shows, what kvmvfio's
own process holds afterwards, and that the kernel lets a newcomer have the
device once it is back.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from typing import cast

import pytest
from vfiokit import assert_released, cdev_of, fd_table, group_of, raw_cdev_bind

from kvmvfio.errors import NoHotplugPort, NotAttached, QemuError, QemuPeerMismatch
from kvmvfio.lab.l2 import EDU_ID, NOBODY, L2Qemu
from kvmvfio.lab.topology import Topology
from kvmvfio.qemu import Qemu, attach, coldplug, detach, qdev_id, replies
from kvmvfio.qemu.handoff import IOMMUFD_OBJECT, memlock_limit

# The running guest boots once per module under nested KVM in TCG: usually in
# 10 to 20 s, but once in CI it took more than 300 s (LAB.md saw 147 s).
pytestmark = [
    pytest.mark.lab,
    pytest.mark.topology("default", "coherent"),
    pytest.mark.timeout(900),
]


@pytest.fixture
def edus(topology: Topology, vfio_bind: Callable[..., None]) -> tuple[str, str]:
    a, b = topology.guest_address("edu0"), topology.guest_address("edu1")
    vfio_bind(a, b)
    return a, b


@pytest.fixture
def paused() -> Iterator[L2Qemu]:
    """A paused L2 QEMU (no guest): enough for everything but unplug."""
    qemu = L2Qemu(ports=2)
    yield qemu
    qemu.kill()


@pytest.fixture(scope="module")
def running() -> Iterator[L2Qemu]:
    """An L2 QEMU with a booted guest that answers hotplug (one boot per module)."""
    qemu = L2Qemu.booted(ports=2)
    try:
        yield qemu
    finally:
        qemu.kill()


_VFIO_FILES = ("/dev/vfio", "/dev/iommu", "anon_inode:[vfio", "anon_inode:kvm-vfio")


def _vfio(fds: list[str]) -> list[str]:
    """The VFIO, iommufd and kvm-vfio files among ``fds``."""
    return sorted(f for f in fds if f.startswith(_VFIO_FILES))


def _ours() -> dict[int, str]:
    """This process's files, less sockets (the QMP connection) and the event loop's."""
    return {
        fd: path
        for fd, path in fd_table().items()
        if not path.startswith(("socket:", "anon_inode:[eventpoll]"))
    }


async def test_the_wrong_pid_is_refused_and_nothing_is_sent(paused: L2Qemu) -> None:
    with pytest.raises(QemuPeerMismatch) as refused:
        await Qemu(paused.qmp, pid=os.getpid()).connect()
    assert f"belongs to pid {paused.pid} (uid {NOBODY})" in str(refused.value)
    assert _vfio(paused.fds()) == []


async def test_unprivileged_qemu_cannot_open_vfio_itself(
    paused: L2Qemu, edus: tuple[str, str]
) -> None:
    """The premise: without kvmvfio, this QEMU has no way to the device."""
    async with Qemu(paused.qmp, pid=paused.pid) as qemu:
        with pytest.raises(QemuError, match="Permission denied"):
            await qemu.execute(
                "device_add", {"driver": "vfio-pci", "host": edus[0], "bus": "rp0", "id": "x"}
            )


_INTROSPECTED = {"str": "str", "bool": "bool", "size": "int"}  # QAPI builtin -> introspection


def _struct_problems(
    schema: dict[str, dict[str, object]], type_name: str, shape: replies.Struct
) -> list[str]:
    """How QEMU's introspected object type ``type_name`` differs from ``shape`` (kvmvfio's)."""
    entry = schema[type_name]
    if entry["meta-type"] != "object":
        return [f"{shape.name} is a {entry['meta-type']} in QEMU's schema"]
    members = {str(m["name"]): m for m in cast(list[dict[str, object]], entry["members"])}
    if shape is replies.EMPTY:
        return [f"QEMU returns members {sorted(members)}"] if members else []
    problems = []
    for m in shape.members:
        theirs = members.get(m.name)
        if theirs is None:
            problems.append(f"{shape.name} has no member {m.name!r} in QEMU")
            continue
        if theirs["type"] != _INTROSPECTED[m.type]:
            problems.append(f"{shape.name}.{m.name} is {theirs['type']} in QEMU, not {m.type}")
        if ("default" in theirs) != m.optional:  # introspection marks optional members so
            problems.append(f"{shape.name}.{m.name}: optional in QEMU is {'default' in theirs}")
    return problems


async def test_qemus_own_schema_gives_each_reply_the_shape_kvmvfio_checks(
    paused: L2Qemu,
) -> None:
    """kvmvfio's table of reply shapes (kvmvfio.qemu.replies) against the running QEMU's own.

    ``query-qmp-schema`` is QEMU's introspection of its QAPI schema: for each
    command kvmvfio sends, the type it returns, and for DEVICE_DELETED, its
    data. Each must be what kvmvfio checks replies against; and the replies
    of this QEMU pass those checks (the typed calls below, and every attach
    and detach in this file).
    """
    async with Qemu(paused.qmp, pid=paused.pid) as qemu:
        raw = await qemu.execute("query-qmp-schema")  # one message, under replies.MAX_MESSAGE
        version = await qemu.execute("query-version")
        assert isinstance(raw, list)
        schema = {str(e["name"]): e for e in raw}
        problems: list[str] = []
        for command, shape in replies.RETURNS.items():
            entry = schema.get(command)
            if entry is None or entry["meta-type"] != "command":
                problems.append(f"QEMU has no command {command}")
                continue
            ret = str(entry["ret-type"])
            if shape == replies.ANY:
                if ret != "any":
                    problems.append(f"{command} returns {ret}, not any")
            elif isinstance(shape, replies.ListOf):
                if schema[ret]["meta-type"] != "array":
                    problems.append(f"{command} returns a {schema[ret]['meta-type']}, not a list")
                else:
                    element = str(schema[ret]["element-type"])
                    problems += _struct_problems(schema, element, shape.element)
            else:
                problems += _struct_problems(schema, ret, shape)
        for name, data in replies.EVENTS.items():
            entry = schema.get(name)
            if entry is None or entry["meta-type"] != "event":
                problems.append(f"QEMU has no event {name}")
                continue
            problems += _struct_problems(schema, str(entry["arg-type"]), data)
        print(f"QEMU {version}: {len(raw)} schema entries; checked {sorted(replies.RETURNS)}")
        assert problems == []
        # This QEMU's own replies pass kvmvfio's checks.
        assert any(t.name == "iommufd" for t in await qemu.qom_list_types("iommufd"))
        ports = [p for p in await qemu.qom_list("/machine/peripheral") if p.child_type]
        assert {p.child_type for p in ports} == {"pcie-root-port"}
        assert (
            await qemu.qom_link(f"/machine/peripheral/{ports[0].name}", "parent_bus")
        ).startswith("/machine/")
        assert (await qemu.memory_size()).total >= 128 << 20


async def test_attach_two_by_fd_and_detach_from_a_running_guest(
    running: L2Qemu, edus: tuple[str, str]
) -> None:
    ours = _ours()
    since = running.wait_pci_events(EDU_ID, (0, 0), timeout=0)  # what the guest saw so far
    async with Qemu(running.qmp, pid=running.pid) as qemu:
        done = await attach(qemu, edus)
        assert [a.path for a in done] == ["cdev", "cdev"]
        # The guest itself enumerated both (its uevents, on its serial port).
        assert running.wait_pci_events(EDU_ID, (2, 0), since=since) == (2, 0)
        assert sorted(a.bus or "" for a in done) == ["rp0", "rp1"]
        peripherals = {i.name: i.type for i in await qemu.qom_list("/machine/peripheral")}
        for addr in edus:
            assert peripherals[qdev_id(addr)] == "child<vfio-pci>"
        held = running.fds()
        assert "/dev/iommu" in held
        for addr in edus:
            assert cdev_of(addr) in held
        assert "anon_inode:kvm-vfio" in held  # QEMU made the KVM association itself
        # QEMU binds the cdevs: nobody else may bind them meanwhile.
        with pytest.raises(OSError):  # noqa: PT011
            raw_cdev_bind(edus[0])
        assert memlock_limit(running.pid) >= (256 << 20) + (1 << 30)
        # kvmvfio keeps nothing of what it passed.
        assert _ours() == ours

        gone = await detach(qemu, edus, timeout=120)
        assert gone == [qdev_id(a) for a in edus]
        assert running.wait_pci_events(EDU_ID, (2, 2), since=since) == (2, 2)
        names = {i.name for i in await qemu.qom_list("/machine/peripheral")}
        assert not {qdev_id(a) for a in edus} & names
        # The VM's iommufd object stays for the next attach: QEMU never closes
        # an iommufd it was given by fd= (backends/iommufd.c: not "owned").
        objects = {o.name for o in await qemu.qom_list("/objects")}
        assert IOMMUFD_OBJECT in objects
        held = running.fds()
        assert not {cdev_of(a) for a in edus} & set(held)
        assert held.count("/dev/iommu") == 1
        for addr in edus:
            assert_released(addr)
        # ...and it can go back in at once, on the same iommufd: nothing piles up.
        again = await attach(qemu, edus[:1])
        assert again[0].qdev_id == qdev_id(edus[0])
        await detach(qemu, edus[:1], timeout=120)
        assert running.fds().count("/dev/iommu") == 1
    assert _ours() == ours


async def test_legacy_path_grants_and_revokes_the_group_node(
    running: L2Qemu, edus: tuple[str, str]
) -> None:
    node = f"/dev/vfio/{group_of(edus[0])}"
    async with Qemu(running.qmp, pid=running.pid) as qemu:
        (done,) = await attach(qemu, edus[:1], path="legacy")
        assert done.path == "group"
        assert node in running.fds()  # QEMU opened the group itself, through the grant
        acl = subprocess.run(["getfacl", "-n", node], capture_output=True, text=True, check=True)
        assert f"user:{NOBODY}:rw-" in acl.stdout
        await detach(qemu, edus[:1], timeout=120)
        assert node not in running.fds()
    acl = subprocess.run(["getfacl", "-n", node], capture_output=True, text=True, check=True)
    assert f"user:{NOBODY}:" not in acl.stdout
    assert_released(edus[0])


async def test_detach_of_what_was_not_attached(paused: L2Qemu, edus: tuple[str, str]) -> None:
    async with Qemu(paused.qmp, pid=paused.pid) as qemu:
        with pytest.raises(NotAttached, match=qdev_id(edus[0])):
            await detach(qemu, edus[:1])


async def test_no_free_port_is_said_plainly(edus: tuple[str, str]) -> None:
    bare = L2Qemu(ports=0)
    try:
        async with Qemu(bare.qmp, pid=bare.pid) as qemu:
            with pytest.raises(NoHotplugPort, match="pcie-root-port"):
                await attach(qemu, edus[:1])
        assert cdev_of(edus[0]) not in bare.fds()
    finally:
        bare.kill()
    assert_released(edus[0])


# The QMP commands of one fd attach, in order; QEMU is killed before each.
_STEPS = [
    "qom-list",  # /machine/peripheral: QEMU's VFIO devices (their backend) and ports, once
    "qom-list",  # /machine/peripheral-anon
    "qom-list-types",
    "query-memory-size-summary",
    "qom-list",  # /objects: is the iommufd object there?
    "getfd",
    "object-add",
    "getfd",
    "device_add",
]


@pytest.mark.parametrize("step", range(len(_STEPS)), ids=lambda i: f"{i}-{_STEPS[i]}")
async def test_qemu_killed_at_each_step(
    step: int, edus: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = L2Qemu(ports=2)
    ours = _ours()
    sent: list[str] = []
    real = Qemu.execute

    async def execute(
        self: Qemu, command: str, arguments: dict[str, object] | None = None
    ) -> object:
        if command in ("qom-get",):  # port probing: not a step of its own
            return await real(self, command, arguments)
        if len(sent) == step:
            os.kill(self.pid, signal.SIGKILL)
            victim.proc.wait(timeout=30)
        sent.append(command)
        return await real(self, command, arguments)

    monkeypatch.setattr(Qemu, "execute", execute)
    try:
        with pytest.raises(QemuError):
            async with Qemu(victim.qmp, pid=victim.pid) as qemu:
                await attach(qemu, edus[:1])
    finally:
        victim.kill()
    assert sent[: step + 1][-1] == _STEPS[step]
    assert _ours() == ours
    assert_released(edus[0])


async def test_cold_plug_starts_qemu_with_its_devices(edus: tuple[str, str]) -> None:
    with coldplug(edus, buses=["rp0", "rp1"]) as plug:
        qemu = L2Qemu(
            ports=2,
            extra=plug.args,
            pass_fds=plug.pass_fds,
            preexec_fn=plug.memlock_preexec(256 << 20),
        )
    try:
        assert qemu.proc.poll() is None, qemu.stderr.read_text()
        async with Qemu(qemu.qmp, pid=qemu.pid) as qmp:  # answers once devices are realized
            peripherals = {i.name for i in await qmp.qom_list("/machine/peripheral")}
        assert {qdev_id(a) for a in edus} <= peripherals
        held = qemu.fds()
        assert "/dev/iommu" in held
        for addr in edus:
            assert cdev_of(addr) in held
        assert "anon_inode:kvm-vfio" in held
    finally:
        qemu.kill()
    for addr in edus:
        assert_released(addr)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args], capture_output=True, text=True, timeout=300, check=False
    )


async def test_cli_detach_times_out_while_the_guest_is_stopped(
    running: L2Qemu, edus: tuple[str, str]
) -> None:
    """A guest that does not answer: a clear timeout, the device stays, never yanked.

    (A guest that never powered the slot, such as a VM paused since start,
    gets an instant unplug from QEMU; a stopped vCPU after the guest took
    the slot is the case that waits.)
    """
    where = ["--qmp", str(running.qmp), "--pidfile", str(running.pidfile)]
    done = _cli("attach", *where, "--json", edus[0])
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["qemu_pid"] == running.pid
    assert [a["qdev_id"] for a in doc["attached"]] == [qdev_id(edus[0])]
    await asyncio.sleep(10)  # pciehp powers the slot on (about 5 s after the event)
    # QMP serves one client at a time: each step below connects on its own.
    async with Qemu(running.qmp, pid=running.pid) as qemu:
        await qemu.execute("stop")
    try:
        done = _cli("detach", *where, "--timeout", "3", edus[0])
        assert done.returncode == 1
        assert "did not release" in done.stderr
        assert "Traceback" not in done.stderr
        async with Qemu(running.qmp, pid=running.pid) as qemu:
            names = {i.name for i in await qemu.qom_list("/machine/peripheral")}
        assert qdev_id(edus[0]) in names  # still attached, as QEMU has it
        assert cdev_of(edus[0]) in running.fds()
    finally:
        async with Qemu(running.qmp, pid=running.pid) as qemu:
            await qemu.execute("cont")
    # The request stays pending in QEMU; the guest answers it once it runs.
    async with Qemu(running.qmp, pid=running.pid) as qemu:
        for _ in range(240):
            names = {i.name for i in await qemu.qom_list("/machine/peripheral")}
            if qdev_id(edus[0]) not in names:
                break
            await asyncio.sleep(0.5)
    assert qdev_id(edus[0]) not in names
    # A second detach finishes kvmvfio's part, and says the device was gone.
    done = _cli("detach", *where, edus[0])
    assert done.returncode == 1
    assert "earlier detach timed out" in done.stderr
    assert_released(edus[0])


def test_cli_refuses_a_socket_of_another_process(paused: L2Qemu, edus: tuple[str, str]) -> None:
    done = _cli("attach", "--qmp", str(paused.qmp), "--pid", str(os.getpid()), edus[0])
    assert done.returncode == 1
    assert f"belongs to pid {paused.pid}" in done.stderr
    assert _vfio(paused.fds()) == []


async def test_a_second_qmp_client_is_told_the_socket_is_taken(paused: L2Qemu) -> None:
    async with Qemu(paused.qmp, pid=paused.pid):
        with pytest.raises(QemuError, match="serves one client at a time"):
            await Qemu(paused.qmp, pid=paused.pid, greeting_timeout=2).connect()
