"""Preparing host devices in L1: real drivers, real sysfs, crashes and races.

Each test checks the kernel's own view (the ``driver`` link, the netdev
coming back, ``driver_override``) and leaves the devices as it found them.
The journal goes to a folder per test (``--root``), not /run/kvmvfio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vfiokit import driver

from kvmvfio.errors import Busy
from kvmvfio.host import Host
from kvmvfio.lab.topology import Topology
from kvmvfio.prepare import ClaimedBy, prepare, recover, release, status
from kvmvfio.prepare.safety import UnsafeToUnbind

pytestmark = [pytest.mark.lab, pytest.mark.topology("default")]

PCI = Path("/sys/bus/pci/devices")


@pytest.fixture(autouse=True)
def _leave_nothing_behind(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left prepared is put back before the next one."""
    yield
    recover(root=tmp_path)


def override(addr: str) -> str:
    return (PCI / addr / "driver_override").read_text().strip()


def netdevs(addr: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (PCI / addr / "net").is_dir() and os.listdir(PCI / addr / "net"):
            return sorted(os.listdir(PCI / addr / "net"))
        time.sleep(0.05)
    return []


def snapshot(*addrs: str) -> dict[str, tuple[str | None, str]]:
    return {a: (driver(a), override(a)) for a in addrs}


def kvmvfio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kvmvfio", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_the_nic_goes_to_vfio_and_comes_back(topology: Topology, tmp_path: Path) -> None:
    nic = topology.guest_address("nic0")
    before = snapshot(nic)
    ifaces = netdevs(nic)
    assert before[nic][0] == "e1000e"
    assert ifaces  # eth0 or so
    (done,) = prepare([nic], "vm1", root=tmp_path)
    assert [e.address for e in done.moved] == [nic]
    assert driver(nic) == "vfio-pci"
    assert not (PCI / nic / "net").exists()
    assert Host().group_of(nic).viable
    assert [g.owner for g in status(root=tmp_path)] == ["vm1"]
    prepare([nic], "vm1", root=tmp_path)  # idempotent for its owner
    restored = release([nic], "vm1", root=tmp_path)
    assert [(r.address, r.driver) for r in restored] == [(nic, "e1000e")]
    assert snapshot(nic) == before
    assert netdevs(nic) == ifaces  # the interface came back
    assert status(root=tmp_path) == []
    assert release([nic], "vm1", root=tmp_path) == []  # idempotent


def test_recover_waits_for_the_owner_process_and_then_restores(
    topology: Topology, tmp_path: Path
) -> None:
    nic, edu0 = topology.guest_address("nic0"), topology.guest_address("edu0")
    before = snapshot(nic, edu0)
    ifaces = netdevs(nic)
    owner = subprocess.Popen(["sleep", "600"])
    try:
        got = kvmvfio(
            "prepare", "--root", str(tmp_path), "--owner", "vm1", "--owner-pid", str(owner.pid), nic
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        got = kvmvfio("prepare", "--root", str(tmp_path), "--owner", "by-hand", edu0)
        assert got.returncode == 0, got.stderr
        assert (driver(nic), driver(edu0)) == ("vfio-pci", "vfio-pci")
        # The owner runs: its claim stays; the claim by name alone has no
        # owner to watch and nothing holds it, so it is restored.
        got = kvmvfio("recover", "--root", str(tmp_path))
        assert got.returncode == 0, got.stderr
        group = Host().group_of(nic).number
        assert f"left IOMMU group {group} to vm1: process {owner.pid} runs" in got.stdout
        assert f"recover: {edu0} back on no driver" in got.stdout
        assert driver(nic) == "vfio-pci"
        assert snapshot(edu0) == {edu0: before[edu0]}
    finally:
        owner.kill()
        owner.wait()
    (held,) = status(root=tmp_path)
    assert (held.alive, held.why) == (False, f"process {owner.pid} has exited")
    got = kvmvfio("recover", "--root", str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert f"recover: {nic} back on e1000e" in got.stdout
    assert snapshot(nic, edu0) == before
    assert netdevs(nic) == ifaces
    assert status(root=tmp_path) == []


def test_one_device_of_the_bridge_group_moves_the_other_too(
    topology: Topology, tmp_path: Path
) -> None:
    bridge = topology.guest_address("br0")
    edu2, edu3 = topology.guest_address("edu2"), topology.guest_address("edu3")
    before = snapshot(bridge, edu2, edu3)
    (done,) = prepare([edu2], "vm1", root=tmp_path)
    assert sorted(e.address for e in done.moved) == [edu2, edu3]
    assert (driver(edu2), driver(edu3)) == ("vfio-pci", "vfio-pci")
    assert driver(bridge) == before[bridge][0]  # bridges stay put
    release([edu2], "vm1", root=tmp_path)
    assert snapshot(bridge, edu2, edu3) == before


#: The kvmvfio command, killed by SIGKILL right after its host change N (argv[1]):
#: the seam is passed in (kvmvfio.prepare.set_change_hook), never read from the environment.
KILLED_AT_CHANGE = """
import os, signal, sys
import kvmvfio.prepare
from kvmvfio.cli import run
n = int(sys.argv[1])
kvmvfio.prepare.set_change_hook(lambda k: k == n and os.kill(os.getpid(), signal.SIGKILL))
sys.exit(run(sys.argv[2:]))
"""


def kvmvfio_killed_at(n: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", KILLED_AT_CHANGE, str(n), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_host_crash_at_every_step_is_recovered(topology: Topology, tmp_path: Path) -> None:
    nic, edu2 = topology.guest_address("nic0"), topology.guest_address("edu2")
    edu3 = topology.guest_address("edu3")
    before = snapshot(nic, edu2, edu3)
    ifaces = netdevs(nic)
    # e1000e: override, unbind, probe; edu2 and edu3 (no driver): override, probe.
    steps = 7
    for n in range(1, steps + 1):
        killed = kvmvfio_killed_at(
            n, "prepare", "--root", str(tmp_path), "--owner", "vm1", nic, edu2
        )
        assert killed.returncode == -9, (n, killed.stderr)
        assert snapshot(nic, edu2, edu3) != before  # step n really changed the host
        done = kvmvfio("recover", "--root", str(tmp_path))
        assert done.returncode == 0, done.stderr
        assert "back on" in done.stdout
        assert snapshot(nic, edu2, edu3) == before, n
        again = kvmvfio("recover", "--root", str(tmp_path))
        assert again.stdout.strip() == "recover: nothing to do"
    assert netdevs(nic) == ifaces
    # One more than there are steps: the prepare completes.
    whole = kvmvfio_killed_at(
        steps + 1, "prepare", "--root", str(tmp_path), "--owner", "vm1", nic, edu2
    )
    assert whole.returncode == 0, whole.stderr
    kvmvfio("release", "--root", str(tmp_path), nic, edu2)
    assert snapshot(nic, edu2, edu3) == before


def test_two_claimers_one_winner_a_hundred_times(topology: Topology, tmp_path: Path) -> None:
    edu1 = topology.guest_address("edu1")
    before = snapshot(edu1)
    for i in range(100):
        results = _race(edu1, f"a{i}", f"b{i}", tmp_path)
        winners = [r for r in results if r.startswith("won")]
        losers = [r for r in results if r.startswith("lost")]
        assert len(winners) == 1, results
        assert len(losers) == 1, results
        winner = winners[0].split()[1]
        assert f"claimed by '{winner}'" in losers[0]
        release([edu1], winner, root=tmp_path)
    assert snapshot(edu1) == before


def _race(addr: str, a: str, b: str, root: Path) -> list[str]:
    """Fork two claimers that start at once; return what each said."""
    go_r, go_w = os.pipe()
    outs = []
    pids = []
    for owner in (a, b):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(go_w)
            os.read(go_r, 1)
            try:
                prepare([addr], owner, root=root)
                text = f"won {owner}"
            except ClaimedBy as err:
                text = f"lost {owner}: {err}"
            except BaseException as err:
                text = f"error {owner}: {err!r}"
            os.write(out_w, text.encode())
            os._exit(0)
        os.close(out_w)
        outs.append(out_r)
        pids.append(pid)
    os.close(go_r)
    os.write(go_w, b"xx")
    os.close(go_w)
    results = []
    for fd, pid in zip(outs, pids, strict=True):
        os.waitpid(pid, 0)
        results.append(os.read(fd, 4096).decode())
        os.close(fd)
    return results


def test_the_default_route_stops_a_prepare(topology: Topology, tmp_path: Path) -> None:
    nic = topology.guest_address("nic0")
    (iface,) = netdevs(nic)
    before = snapshot(nic)
    subprocess.run(["ip", "link", "set", iface, "up"], check=True)
    subprocess.run(["ip", "route", "add", "default", "dev", iface], check=True)
    try:
        with pytest.raises(UnsafeToUnbind) as refused:
            prepare([nic], "vm1", root=tmp_path)
        assert f"carries the default route ({iface})" in str(refused.value)
        # Advice in the caller's terms: an argument from Python, a flag from the CLI.
        assert "Pass force=['default-route'] to accept that" in str(refused.value)
        assert snapshot(nic) == before  # nothing changed
        assert status(root=tmp_path) == []
        done = kvmvfio("prepare", "--root", str(tmp_path), "--owner", "vm1", nic)
        assert done.returncode == 1
        assert "default route" in done.stderr
        assert "Pass --force default-route to accept that" in done.stderr
        (ok,) = prepare([nic], "vm1", root=tmp_path, force=["default-route"])
        assert ok.accepted
    finally:
        release([nic], "vm1", root=tmp_path)
        subprocess.run(["ip", "route", "del", "default", "dev", iface], check=False)
    assert snapshot(nic) == before


def holding(code: str) -> subprocess.Popen[str]:
    """A Python process that runs ``code`` (os and sys imported), says so, and
    keeps what it opened until its stdin is closed (``communicate("")``)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import os, sys\n{code}\nprint('ready', flush=True)\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != "ready":
        holder.kill()
        pytest.fail(f"the holder did not start: {code}")
    return holder


def test_release_refuses_while_a_process_holds_the_device(
    topology: Topology, tmp_path: Path
) -> None:
    edu0 = topology.guest_address("edu0")
    before = snapshot(edu0)
    prepare([edu0], "vm1", root=tmp_path)
    group = Host().group_of(edu0).number
    holder = holding(f"fd = os.open('/dev/vfio/{group}', os.O_RDWR)")
    try:
        with pytest.raises(Busy, match=f"pid {holder.pid}"):
            release([edu0], "vm1", root=tmp_path)
        assert driver(edu0) == "vfio-pci"  # untouched, and no hang
    finally:
        holder.communicate("", timeout=30)
    release([edu0], "vm1", root=tmp_path)
    assert snapshot(edu0) == before


def test_release_refuses_a_device_file_held_after_its_group_was_closed(
    topology: Topology, tmp_path: Path
) -> None:
    """No node under /dev names such a holder (its fd is an anonymous inode), and
    vfio-pci's unbind would wait for it: before this check, release hung here
    until the holder was killed. The kernel's count of enables finds it."""
    edu0 = topology.guest_address("edu0")
    before = snapshot(edu0)
    prepare([edu0], "vm1", root=tmp_path)
    group = Host().group_of(edu0).number
    enable = PCI / edu0 / "enable"
    assert enable.read_text().strip() == "0"  # on vfio-pci, nobody has it open
    holder = holding(
        "from kvmvfio.vfio.container import Container\n"
        "from kvmvfio.vfio.group import Group\n"
        f"c = Container(); g = Group({group}); g.set_container(c.fileno()); c.set_iommu()\n"
        f"d = g.open_device({edu0!r}); fd = os.dup(d.fileno()); d.close(); g.close(); c.close()"
    )
    try:
        fd_dir = f"/proc/{holder.pid}/fd"
        fds = [os.readlink(f"{fd_dir}/{n}") for n in os.listdir(fd_dir)]
        assert f"/dev/vfio/{group}" not in fds
        assert "anon_inode:[vfio-device]" in fds
        assert enable.read_text().strip() == "1"  # the kernel's word: open
        done = subprocess.run(
            ["kvmvfio", "release", "--root", str(tmp_path), "--owner", "vm1", edu0],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done
        assert "open by its device file alone" in done.stderr
        assert f"VFIO device file: pid {holder.pid} (python3))" in done.stderr
        assert "Traceback" not in done.stderr
        assert driver(edu0) == "vfio-pci"  # untouched, and no hang
        (held,) = status(root=tmp_path)
        assert len(held.holders) == 1
        assert f"pid {holder.pid}" in held.holders[0]
    finally:
        holder.communicate("", timeout=30)
    assert enable.read_text().strip() == "0"
    release([edu0], "vm1", root=tmp_path)
    assert snapshot(edu0) == before


def test_bad_input_changes_nothing(topology: Topology, tmp_path: Path) -> None:
    nic = topology.guest_address("nic0")
    before = snapshot(nic)
    done = kvmvfio("prepare", "--root", str(tmp_path), "--owner", "vm1", "00:1e.7")
    assert done.returncode == 1
    assert "0000:00:1e.7" in done.stderr
    done = kvmvfio("prepare", "--root", str(tmp_path), "--owner", "vm1", "00:99.9")
    assert done.returncode == 2  # slot 0x99 does not exist in PCI
    done = kvmvfio("prepare", "--root", str(tmp_path), "--owner", "vm 1", nic)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert snapshot(nic) == before


def test_release_can_reset_the_device(topology: Topology, tmp_path: Path) -> None:
    nic = topology.guest_address("nic0")
    methods = Host().device(nic).reset_methods
    assert methods  # QEMU's e1000e offers at least one (flr, pm or bus)
    before = snapshot(nic)
    ifaces = netdevs(nic)
    prepare([nic], "vm1", root=tmp_path)
    (restored,) = release([nic], "vm1", reset=True, root=tmp_path)
    assert restored.reset
    assert snapshot(nic) == before
    assert netdevs(nic) == ifaces


def test_a_reset_asked_at_prepare_is_done_by_the_release_that_comes(
    topology: Topology, tmp_path: Path
) -> None:
    """``prepare --reset`` journals the wish; ``recover`` after the owner died
    (as the agent's release of a stopped domain) resets without being asked."""
    nic = topology.guest_address("nic0")
    before = snapshot(nic)
    ifaces = netdevs(nic)
    owner = subprocess.Popen(["sleep", "600"])
    try:
        got = kvmvfio(
            "prepare", "--root", str(tmp_path), "--owner", "vm1", "--owner-pid", str(owner.pid),
            "--reset", nic,
        )  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert driver(nic) == "vfio-pci"
        (held,) = status(root=tmp_path)
        assert [(e.address, e.reset) for e in held.devices] == [(nic, True)]
    finally:
        owner.kill()
        owner.wait()
    got = kvmvfio("recover", "--root", str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert f"recover: {nic} back on e1000e, reset" in got.stdout
    assert snapshot(nic) == before
    assert netdevs(nic) == ifaces
    # Without the wish, a release gives it back unreset.
    prepare([nic], "vm2", root=tmp_path)
    (restored,) = release([nic], "vm2", root=tmp_path)
    assert not restored.reset
    assert snapshot(nic) == before
