"""Mediated devices made and removed through kvmvfio on a real kernel: mtty, in L1.

The lab kernel has the sample ``mtty`` built in: a virtual parent ``mtty``
with types ``mtty-1`` and ``mtty-2`` sharing 24 serial ports. These tests
make and remove mdevs through the CLI, refuse a reused UUID, a type with
no instance left and an mdev whose group node is open, and recover after a
kill at every step. Each also writes to the kernel directly where that
shows what kvmvfio protects against (EEXIST, ENOSPC, a remove that the
kernel does not refuse), and each removes what it made.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmvfio.host.mdev import read_mdev
from kvmvfio.prepare import mdev as pmdev

pytestmark = [pytest.mark.lab, pytest.mark.topology("default"), pytest.mark.timeout(600)]

MDEVS = Path("/sys/bus/mdev/devices")
TYPES = Path("/sys/class/mdev_bus/mtty/mdev_supported_types")

KILLED_AT_CHANGE = """
import os, signal, sys
import kvmvfio.prepare
from kvmvfio.cli import run
n = int(sys.argv[1])
kvmvfio.prepare.set_change_hook(lambda k: k == n and os.kill(os.getpid(), signal.SIGKILL))
sys.exit(run(sys.argv[2:]))
"""

HOLD = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
print("held", flush=True)
time.sleep(600)
"""


def _mdevs() -> list[str]:
    return sorted(os.listdir(MDEVS)) if MDEVS.is_dir() else []


def _available(type_id: str) -> int:
    return int((TYPES / type_id / "available_instances").read_text())


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _kvmvfio(*words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmvfio", *words],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture
def run_root(tmp_path: Path) -> Iterator[Path]:
    """A run folder and an mdevctl folder of the test's own; every mdev made is removed."""
    before = _mdevs()
    available = {t: _available(t) for t in ("mtty-1", "mtty-2")}
    root = tmp_path / "run"
    root.mkdir(mode=0o700)
    yield root
    for made in sorted(set(_mdevs()) - set(before)):
        _write(MDEVS / made / "remove", "1")
    assert _mdevs() == before
    assert {t: _available(t) for t in available} == available


def _args(root: Path) -> list[str]:
    return ["--root", str(root), "--mdevctl-root", str(root.parent / "mdevctl.d")]


def test_an_mdev_is_made_and_removed_through_the_cli(run_root: Path) -> None:
    left = _available("mtty-2")
    done = _kvmvfio("mdev", "create", "mtty", "mtty-2", "--owner", "vm1", "--persist", "--json",
                    *_args(run_root))  # fmt: skip
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)["created"]
    made = read_mdev(created["uuid"])
    assert made is not None
    assert (made.parent, made.type_id, made.group) == ("mtty", "mtty-2", created["group"])
    assert Path(f"/dev/vfio/{made.group}").exists()  # VFIO has it: its own group
    assert _available("mtty-2") == left - 1
    definition = run_root.parent / "mdevctl.d" / "mtty" / made.uuid
    assert json.loads(definition.read_text()) == {
        "mdev_type": "mtty-2", "start": "auto", "attrs": [],
    }  # fmt: skip
    listed = _kvmvfio("mdev", "list", "--json", *_args(run_root))
    (entry,) = [m for m in json.loads(listed.stdout)["mdevs"] if m["uuid"] == made.uuid]
    assert (entry["owner"], entry["persistent"], entry["uses"]) == ("vm1", True, [])
    gone = _kvmvfio("mdev", "remove", made.uuid, "--owner", "vm1", "--json", *_args(run_root))
    assert gone.returncode == 0, gone.stderr
    assert json.loads(gone.stdout)["removed"]["definition"] == str(definition)
    assert read_mdev(made.uuid) is None
    assert not definition.exists()
    assert _available("mtty-2") == left
    assert pmdev.MdevJournal(run_root).uuids() == []


def test_a_reused_uuid_is_refused_and_the_kernel_says_eexist(run_root: Path) -> None:
    the_uuid = str(uuid.uuid4())
    first = _kvmvfio("mdev", "create", "mtty", "mtty-1", "--uuid", the_uuid, "--owner", "vm1",
                     *_args(run_root))  # fmt: skip
    assert first.returncode == 0, first.stderr
    before = _mdevs(), _available("mtty-1"), pmdev.MdevJournal(run_root).read(the_uuid)
    again = _kvmvfio("mdev", "create", "mtty", "mtty-2", "--uuid", the_uuid.upper(), "--owner",
                     "vm2", *_args(run_root))  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.startswith(f"kvmvfio: the UUID {the_uuid} is already used (by mdev")
    assert again.stderr.count("\n") == 1
    assert (_mdevs(), _available("mtty-1"), pmdev.MdevJournal(run_root).read(the_uuid)) == before
    # What kvmvfio spares the user: the kernel's own answer to the same write.
    with pytest.raises(FileExistsError) as kernel:
        _write(TYPES / "mtty-2" / "create", the_uuid)
    assert kernel.value.errno == errno.EEXIST
    assert _kvmvfio("mdev", "remove", the_uuid, "--owner", "vm1", *_args(run_root)).returncode == 0


def test_no_instance_left_is_refused_by_name_and_changes_nothing(run_root: Path) -> None:
    made = []
    for _ in range(32):  # 24 ports: 12 mtty-2 at most
        if _available("mtty-2") == 0:
            break
        done = _kvmvfio("mdev", "create", "mtty", "mtty-2", "--owner", "vm1", "--json",
                        *_args(run_root))  # fmt: skip
        assert done.returncode == 0, done.stderr
        made.append(json.loads(done.stdout)["created"]["uuid"])
    assert _available("mtty-2") == 0
    before = _mdevs(), pmdev.MdevJournal(run_root).uuids()
    refused = _kvmvfio("mdev", "create", "mtty", "mtty-2", "--owner", "vm1", *_args(run_root))
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "kvmvfio: mtty has no mtty-2 instance left to create; nothing was created."
    ), refused.stderr
    assert (_mdevs(), pmdev.MdevJournal(run_root).uuids()) == before
    # The kernel's answer: mtty refuses in its probe when its ports are gone.
    spare = str(uuid.uuid4())
    with pytest.raises(OSError, match="No space left on device") as kernel:
        _write(TYPES / "mtty-2" / "create", spare)
    assert kernel.value.errno == errno.ENOSPC, kernel.value
    assert read_mdev(spare) is None
    for u in made:
        done = _kvmvfio("mdev", "remove", u, "--owner", "vm1", *_args(run_root))
        assert done.returncode == 0, done.stderr


def test_an_mdev_whose_group_is_open_is_not_removed(run_root: Path) -> None:
    done = _kvmvfio("mdev", "create", "mtty", "mtty-1", "--owner", "vm1", "--json",
                    *_args(run_root))  # fmt: skip
    created = json.loads(done.stdout)["created"]
    the_uuid, group = created["uuid"], created["group"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, f"/dev/vfio/{group}"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        refused = _kvmvfio("mdev", "remove", the_uuid, "--owner", "vm1", *_args(run_root))
        assert refused.returncode == 1
        assert refused.stderr.startswith(
            f"kvmvfio: mediated device {the_uuid} is in use: it is open in pid {holder.pid} "
        ), refused.stderr
        assert read_mdev(the_uuid) is not None
        kept = _kvmvfio("recover", "--json", *_args(run_root))
        assert [s["uuid"] for s in json.loads(kept.stdout)["mdevs"]["skipped"]] == [the_uuid]
        # The kernel itself does not refuse: with only the group open (no device
        # file), the remove write returns at once and the mdev is gone under the holder.
        started = time.monotonic()
        writer = subprocess.Popen(["sh", "-c", f"echo 1 > {MDEVS / the_uuid / 'remove'}"])
        try:
            code = writer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"the kernel's remove: {code} after {time.monotonic() - started:.1f}s"
        assert read_mdev(the_uuid) is None
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    gone = _kvmvfio("recover", "--json", *_args(run_root))  # its record: the mdev went by hand
    assert gone.returncode == 0, gone.stderr
    assert pmdev.MdevJournal(run_root).uuids() == []


HOLD_DEVICE_ALONE = """
import os, sys, time
from kvmvfio.vfio.container import Container
from kvmvfio.vfio.group import Group
c = Container(); g = Group(int(sys.argv[1])); g.set_container(c.fileno()); c.set_iommu()
d = g.open_device(sys.argv[2]); fd = os.dup(d.fileno()); d.close(); g.close(); c.close()
print("held", flush=True)
time.sleep(600)
"""


def test_an_mdev_held_by_its_device_file_alone_is_not_removed(run_root: Path) -> None:
    """The holder closed the group after getting the device: /proc names no
    node of the mdev, and the kernel's remove would wait for the holder (the
    write hangs until it lets go). The kernel keeps the group open for such a
    file: kvmvfio asks it by opening the group node, and refuses."""
    done = _kvmvfio("mdev", "create", "mtty", "mtty-1", "--owner", "vm1", "--json",
                    *_args(run_root))  # fmt: skip
    created = json.loads(done.stdout)["created"]
    the_uuid, group = created["uuid"], created["group"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DEVICE_ALONE, str(group), the_uuid],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        fds = [
            os.readlink(f"/proc/{holder.pid}/fd/{n}") for n in os.listdir(f"/proc/{holder.pid}/fd")
        ]
        assert f"/dev/vfio/{group}" not in fds
        assert "anon_inode:[vfio-device]" in fds
        remove = subprocess.Popen(
            [sys.executable, "-m", "kvmvfio", "mdev", "remove", the_uuid, "--owner", "vm1",
             *_args(run_root)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _, err = remove.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()  # what lets the kernel's remove, and so the test, end
            remove.communicate(timeout=60)
            pytest.fail("kvmvfio mdev remove waited on the held device instead of refusing")
        assert remove.returncode == 1, err
        assert err.startswith(
            f"kvmvfio: mediated device {the_uuid} is in use: it is open by "
            f"its device file alone, which keeps IOMMU group {group} open"
        ), err
        assert f"VFIO device file: pid {holder.pid} (python3))" in err
        assert read_mdev(the_uuid) is not None
        kept = _kvmvfio("recover", "--json", *_args(run_root))
        assert [s["uuid"] for s in json.loads(kept.stdout)["mdevs"]["skipped"]] == [the_uuid]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    gone = _kvmvfio("mdev", "remove", the_uuid, "--owner", "vm1", *_args(run_root))
    assert gone.returncode == 0, gone.stderr
    assert read_mdev(the_uuid) is None


@pytest.mark.parametrize("persist", [False, True])
def test_a_kill_at_every_step_is_recovered(run_root: Path, persist: bool) -> None:
    definitions = run_root.parent / "mdevctl.d"
    for n in range(1, 3 if persist else 2):
        the_uuid = str(uuid.uuid4())
        extra = ["--persist"] if persist else []
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_AT_CHANGE, str(n), "mdev", "create", "mtty", "mtty-2",
             "--uuid", the_uuid, "--owner", "vm1", *extra, *_args(run_root)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert killed.returncode == -9, (n, killed.stderr)
        assert read_mdev(the_uuid) is not None  # made, then killed
        done = _kvmvfio("recover", "--json", *_args(run_root))
        assert done.returncode == 0, done.stderr
        removed = json.loads(done.stdout)["mdevs"]["removed"]
        assert [r["uuid"] for r in removed] == [the_uuid], (n, done.stdout)
        assert read_mdev(the_uuid) is None
        assert not (definitions / "mtty" / the_uuid).exists()
        assert pmdev.MdevJournal(run_root).uuids() == []
    # A kill during remove: the mdev is gone, its record ("removing") is finished by recover.
    made = _kvmvfio("mdev", "create", "mtty", "mtty-2", "--owner", "vm1", "--json",
                    *_args(run_root))  # fmt: skip
    the_uuid = json.loads(made.stdout)["created"]["uuid"]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_CHANGE, "1", "mdev", "remove", the_uuid, "--owner",
         "vm1", *_args(run_root)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert read_mdev(the_uuid) is None
    assert pmdev.MdevJournal(run_root).read(the_uuid).state == "removing"  # type: ignore[union-attr]
    done = _kvmvfio("recover", "--json", *_args(run_root))
    assert [r["uuid"] for r in json.loads(done.stdout)["mdevs"]["removed"]] == [the_uuid]
    assert pmdev.MdevJournal(run_root).uuids() == []
