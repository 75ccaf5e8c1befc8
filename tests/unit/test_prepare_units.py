"""The parts of kvmvfio.prepare that need no kernel: journal, claims, safety checks.

The driver moves themselves, crashes at every step and claim races run in
the lab (tests/lab/test_prepare.py).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fakerun import put
from fakesysfs import Dev, Topology

from kvmvfio.errors import UsageError
from kvmvfio.host import Host
from kvmvfio.prepare import ClaimedBy, prepare, status
from kvmvfio.prepare.journal import Entry, Journal, JournalError, Record
from kvmvfio.prepare.safety import UnsafeToUnbind, check

BuildHost = Callable[[Topology], Host]


def test_journal_round_trip_is_private(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    record = Record(4, "vm1", 0, steps=2, devices=[Entry("0000:01:01.0", "e1000e", None)])
    journal.write(record)
    assert journal.read(4) == record
    assert stat.S_IMODE(os.stat(journal.path(4)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(journal.dir).st_mode) == 0o700
    assert not list(journal.dir.glob("*.tmp"))
    assert journal.records() == [record]
    journal.remove(4)
    assert journal.read(4) is None
    journal.remove(4)  # idempotent


_GOOD = {"version": 1, "group": 1, "owner": "vm1", "pid": 0, "steps": 0, "devices": []}
_DEV = {"address": "0000:00:03.0", "driver": "e1000e", "override": None}


def _doc(**changes: object) -> bytes:
    doc = {**_GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not _DROP}).encode()


def _dev(**changes: object) -> dict[str, object]:
    return {k: v for k, v in {**_DEV, **changes}.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "it is not JSON: Expecting property name enclosed in double quotes"),
        (b"", "it is not JSON: Expecting value at line 1 column 1"),
        (b"\xff{}", "it is not UTF-8 text (byte 0)"),
        (b"[1]", "it is a list, not a JSON object"),
        (b"[" * 100_000, "it is nested too deeply"),
        (b"x" * (2 << 20), "it is larger than 1048576 bytes"),
        (b'{"version": 2, "group": 1}', "version 2, expected 1"),
        (b'{"group": 1}', "it has no 'version'"),
        (_doc(version=True), "version true, expected 1"),
        (_doc(version=1.0), "version 1.0, expected 1"),
        (b'{"version": 1, "group": 1}', "it has no 'owner'"),
        (_doc(color="red"), 'it has an unknown key "color" (known: version, group, owner'),
        (b'{"version": 1, "version": 1}', 'the key "version" appears twice'),
        (_doc(group="x"), "'group' must be a whole number in 0..2147483647, not \"x\""),
        (_doc(group=True), "'group' must be a whole number in 0..2147483647, not true"),
        (_doc(group=2), "it is the file of IOMMU group 1 but its 'group' is 2"),
        (_doc(group=-1), "'group' must be a whole number in 0..2147483647, not -1"),
        (_doc(pid=2**70), "'pid' must be a whole number in 0..2147483647, not 1180591620717"),
        (_doc(pid=1.5), "'pid' must be a whole number in 0..2147483647, not 1.5"),
        (_doc(steps=-1), "'steps' must be a whole number in 0..9223372036854775807, not -1"),
        (_doc(owner=""), "'owner' \"\" is refused: it is empty"),
        (_doc(owner="vm 1"), "'owner' \"vm 1\" is refused: it holds whitespace"),
        (_doc(owner="a\0b"), "'owner' \"a\\u0000b\" is refused: it holds a NUL"),
        (_doc(owner=7), "'owner' must be text, not 7"),
        (_doc(devices={}), "'devices' must be a list, not an object"),
        (_doc(devices=["x"]), 'devices[0] must be an object, not "x"'),
        (_doc(devices=[_dev(address=_DROP)]), "devices[0] has no 'address'"),
        (_doc(devices=[_dev(extra=1)]), 'devices[0] has an unknown key "extra"'),
        (_doc(devices=[_DEV, _DEV]), "devices[1].address 0000:00:03.0 appears twice"),
        (
            _doc(devices=[_dev(address="../../../../etc")]),
            'devices[0].address "../../../../etc" is not a PCI address',
        ),
        (
            _doc(devices=[_dev(address="00:03.0")]),
            'devices[0].address "00:03.0" is not as kvmvfio writes it (0000:00:03.0)',
        ),
        (
            _doc(devices=[_dev(driver="../../../../tmp")]),
            "devices[0].driver \"../../../../tmp\" is refused: it holds a '/'",
        ),
        (_doc(devices=[_dev(driver="..")]), "devices[0].driver \"..\" is refused: it is '..'"),
        (_doc(devices=[_dev(driver="")]), 'devices[0].driver "" is refused: it is empty'),
        (
            _doc(devices=[_dev(override="vfio-pci\n")]),
            'devices[0].override "vfio-pci\\n" is refused: it holds whitespace',
        ),
        (_doc(devices=[_dev(driver=False)]), "devices[0].driver must be text, not false"),
        (_doc(devices=[_dev(reset="yes")]), 'devices[0].reset must be true or false, not "yes"'),
        (_doc(devices=[_dev(reset=1)]), "devices[0].reset must be true or false, not 1"),
    ],
)
def test_a_damaged_journal_is_named_and_left_alone(
    tmp_path: Path, content: bytes, words: str
) -> None:
    journal = Journal(tmp_path)
    put(journal.path(1), content)
    with pytest.raises(JournalError) as failed:
        journal.read(1)
    assert words in str(failed.value)
    assert str(journal.path(1)) in str(failed.value)
    assert "kvmvfio acted on none of it" in str(failed.value)
    assert journal.path(1).read_bytes() == content


@pytest.mark.parametrize(
    ("literal", "shown"), [("1e400", "1e400"), (str(2**70), "1180591620717411303424")]
)
def test_numbers_python_cannot_hold_are_refused_with_a_sentence(
    tmp_path: Path, literal: str, shown: str
) -> None:
    journal = Journal(tmp_path)
    text = _doc().decode().replace('"pid": 0', f'"pid": {literal}')
    put(journal.path(1), text)
    with pytest.raises(JournalError, match=f"'pid' must be a whole number .*, not {shown}"):
        journal.read(1)
    put(journal.path(1), text.replace(literal, "9" * 5000))  # beyond Python's int limit
    with pytest.raises(JournalError, match="'pid' must be a whole number"):
        journal.read(1)
    put(journal.path(1), text.replace(literal, "NaN"))
    with pytest.raises(JournalError, match="it holds NaN, which JSON does not have"):
        journal.read(1)


def _nic_host(build_host: BuildHost) -> Host:
    host = build_host(Topology(devices=[Dev("0000:00:05.0", driver="e1000e", group=3)]))
    (host.sysfs / "bus/pci/devices/0000:00:05.0/net/eth0").mkdir(parents=True)
    return host


def _proc(tmp_path: Path, route: str = "", mounts: str = "") -> Path:
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True, exist_ok=True)
    (proc / "self").mkdir(exist_ok=True)
    header = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
    (proc / "net" / "route").write_text(header + route)
    (proc / "self" / "mounts").write_text(mounts)
    return proc


def test_the_default_route_is_found_and_can_be_accepted(
    tmp_path: Path, build_host: BuildHost
) -> None:
    host = _nic_host(build_host)
    dev = host.device("0000:00:05.0")
    proc = _proc(tmp_path, "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\n")
    with pytest.raises(UnsafeToUnbind) as refused:
        check(dev, host.sysfs, proc=proc, devfs=host.devfs)
    assert refused.value.check == "default-route"
    assert str(refused.value) == (
        "PCI device 0000:00:05.0 (e1000e) carries the default route (eth0); taking it from "
        "the host could cut off what uses it. Pass force=['default-route'] to accept that"
    )
    accepted = check(dev, host.sysfs, force=["default-route"], proc=proc, devfs=host.devfs)
    assert accepted == [
        "0000:00:05.0: carries the default route (eth0) (accepted by force='default-route')"
    ]


def test_a_route_that_is_not_the_default_is_fine(tmp_path: Path, build_host: BuildHost) -> None:
    host = _nic_host(build_host)
    proc = _proc(tmp_path, "eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n")
    assert check(host.device("0000:00:05.0"), host.sysfs, proc=proc, devfs=host.devfs) == []


def test_the_boot_vga_is_found(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:01:00.0", cls=0x030000, driver="amdgpu", group=1, boot_vga=True)]
        )
    )
    with pytest.raises(UnsafeToUnbind, match="is the boot VGA device"):
        check(host.device("0000:01:00.0"), host.sysfs, proc=_proc(tmp_path), devfs=host.devfs)


def test_another_owner_holds_the_group(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:03.0", group=1)]))
    Journal(tmp_path).write(Record(1, "vm1", 2**22 + 12345))
    with pytest.raises(ClaimedBy) as refused:
        prepare(["0000:00:03.0"], "vm2", host=host, root=tmp_path)
    assert "claimed by 'vm1'" in str(refused.value)
    assert "is gone" in str(refused.value)  # no such pid
    (held,) = status(root=tmp_path)
    assert (held.owner, held.alive) == ("vm1", False)


@pytest.mark.parametrize("owner", ["", "vm 1", "x" * 201])
def test_owner_names_are_checked(owner: str) -> None:
    with pytest.raises(UsageError):
        prepare(["0000:00:03.0"], owner)


def test_unknown_force_is_refused() -> None:
    with pytest.raises(UsageError, match="unknown --force boot_vga"):
        prepare(["0000:00:03.0"], "vm1", force=["boot_vga"])


def test_a_node_is_found_by_its_kernel_name_without_udev(
    tmp_path: Path, build_host: BuildHost
) -> None:
    """No /dev/char or /dev/block links (no udev): DEVNAME names the node."""
    host = build_host(Topology(devices=[Dev("0000:00:07.0", driver="mydrv", group=5)]))
    unit = host.sysfs / "bus/pci/devices/0000:00:07.0/misc/gadget0"
    unit.mkdir(parents=True)
    (unit / "dev").write_text("1:3\n")  # /dev/null's number: a node any test can open
    (unit / "uevent").write_text("MAJOR=1\nMINOR=3\nDEVNAME=gadget0\n")
    node = host.devfs / "gadget0"
    try:
        os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")
    assert not (host.devfs / "char").exists()
    proc = _proc(tmp_path)
    assert check(host.device("0000:00:07.0"), host.sysfs, proc=proc, devfs=host.devfs) == []
    with node.open("rb") as f:
        user = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        with pytest.raises(UnsafeToUnbind) as refused:
            check(host.device("0000:00:07.0"), host.sysfs, devfs=host.devfs)
        assert refused.value.found == f"is in use by pid {user.pid} (sleep)"
    finally:
        user.kill()
        user.wait()
