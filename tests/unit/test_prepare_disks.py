"""The disk-in-use check: each way a disk is used stops prepare, in words, with nothing changed.

The same cases on L1's real disks: tests/lab/test_disks_in_use.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Block, Dev, Mount, Stacked, Topology, build_proc, device_dir

from kvmvfio.cli import make_parser
from kvmvfio.errors import KvmvfioError
from kvmvfio.host import Host
from kvmvfio.host.blockdev import BlockUse, Holder, UseKind
from kvmvfio.prepare import prepare, safety
from kvmvfio.prepare.safety import UnsafeToUnbind, check, describe_use

BuildHost = Callable[[Topology], Host]
ADDR = "0000:00:08.0"

#: Every case: the disks behind the controller, what else the host has, the
#: /proc tables, and what the refusal says.
CASES: dict[str, tuple[list[Block], list[Stacked], list[Mount], list[str], str]] = {
    "partition mounted": (
        [Block("vdb", "254:16", [Block("vdb1", "254:17")])],
        [],
        [Mount("254:17", "/dev/vdb1", "/mnt/data")], [],
        "has disks in use: vdb1 is mounted on /mnt/data",
    ),
    "root as /dev/root": (
        [Block("vda", "254:0")],
        [],
        [Mount("254:0", "/dev/root", "/")], [],
        "has disks in use: vda is mounted on /",
    ),
    "LVM": (
        [Block("vdb", "254:16", [Block("vdb1", "254:17", holders=["dm-0"])])],
        [Stacked("dm-0", "253:0", dm_name="vg0-data", dm_uuid="LVM-Zx3")],
        [Mount("253:0", "/dev/mapper/vg0-data", "/mnt/data")], [],
        "has disks in use: vdb1 is used by dm-0 (LVM vg0-data), which is mounted on /mnt/data",
    ),
    "LUKS": (
        [Block("vdc", "254:32", holders=["dm-1"])],
        [Stacked("dm-1", "253:1", dm_name="secret", dm_uuid="CRYPT-LUKS2-0f1e-secret")],
        [], [],
        "has disks in use: vdc is used by dm-1 (LUKS secret)",
    ),
    "LUKS under LVM, mounted": (
        [Block("vdc", "254:32", holders=["dm-1"])],
        [
            Stacked("dm-1", "253:1", dm_name="secret", dm_uuid="CRYPT-LUKS2-0f1e-secret",
                    holders=["dm-2"]),
            Stacked("dm-2", "253:2", dm_name="vg1-home", dm_uuid="LVM-a"),
        ],
        [Mount("253:2", "/dev/mapper/vg1-home", "/home")], [],
        "has disks in use: vdc is used by dm-1 (LUKS secret), which is used by "
        "dm-2 (LVM vg1-home), which is mounted on /home",
    ),
    "md member": (
        [Block("vdd", "254:48", [Block("vdd1", "254:49", holders=["md0"])])],
        [Stacked("md0", "9:0", md_level="raid1")],
        [], [],
        "has disks in use: vdd1 is a member of md0 (RAID1)",
    ),
    "md array mounted": (
        [Block("vdd", "254:48", holders=["md0"])],
        [Stacked("md0", "9:0", md_level="raid1")],
        [Mount("9:0", "/dev/md0", "/srv")], [],
        "has disks in use: vdd is a member of md0 (RAID1), which is mounted on /srv",
    ),
    "swap": (
        [Block("vdc", "254:32", [Block("vdc1", "254:33"), Block("vdc2", "254:34")])],
        [],
        [], ["/dev/vdc2"],
        "has disks in use: vdc2 is swap",
    ),
    "two disks, two uses": (
        [Block("vda", "254:0"), Block("vdb", "254:16", holders=["md0"])],
        [Stacked("md0", "9:0", md_level="raid1")],
        [Mount("254:0", "/dev/root", "/")], [],
        "has disks in use: vda is mounted on /; vdb is a member of md0 (RAID1)",
    ),
}  # fmt: skip


def _controller(disks: list[Block]) -> Dev:
    return Dev(ADDR, vendor=0x1AF4, device=0x1042, cls=0x010000, driver="virtio-pci",
               group=8, disks=disks)  # fmt: skip


def _build(tmp_path: Path, build_host: BuildHost, case: str) -> tuple[Host, Path, str]:
    disks, stacked, mounts, swaps, said = CASES[case]
    host = build_host(Topology(devices=[_controller(disks)], stacked=stacked))
    proc = build_proc(tmp_path, mounts=mounts, swaps=swaps)
    return host, proc, said


def _state(host: Host) -> tuple[str, bytes]:
    folder = device_dir(host.sysfs, ADDR)
    return os.readlink(folder / "driver"), (folder / "driver_override").read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_a_disk_in_use_is_named_and_nothing_moves(
    tmp_path: Path, build_host: BuildHost, case: str
) -> None:
    host, proc, said = _build(tmp_path, build_host, case)
    before = _state(host)
    root = tmp_path / "run"
    with pytest.raises(UnsafeToUnbind) as refused:
        prepare([ADDR], "vm1", host=Host(host.sysfs, host.devfs, proc), root=root)
    assert (refused.value.check, refused.value.found) == ("disk-in-use", said)
    assert said in str(refused.value)
    assert _state(host) == before  # driver and driver_override untouched
    assert not list(root.rglob("group-*.json"))  # no claim, no journal record


@pytest.mark.parametrize("force", ["disk-in-use", "mounted"])
def test_force_accepts_it_by_either_name(tmp_path: Path, build_host: BuildHost, force: str) -> None:
    host, proc, said = _build(tmp_path, build_host, "root as /dev/root")
    accepted = check(host.device(ADDR), host.sysfs, force=[force], proc=proc, devfs=host.devfs)
    (note,) = accepted  # worded for the interface used: the API here
    assert note.startswith(f"{ADDR}: {said} (accepted by ")
    assert "disk-in-use" in note


def test_the_old_name_is_still_a_force_value(tmp_path: Path) -> None:
    assert "disk-in-use" in safety.CHECKS
    assert "mounted" not in safety.CHECKS
    assert safety.canonical("mounted") == "disk-in-use"
    assert safety.canonical("boot-vga") == "boot-vga"
    args = make_parser().parse_args(
        ["prepare", "--owner", "vm1", "--force", "mounted", "--force", "disk-in-use", ADDR]
    )
    assert args.force == ["mounted", "disk-in-use"]
    # prepare takes it too: the refusal below is of the address, not of the name.
    with pytest.raises(KvmvfioError, match=r"0000:00:1e\.7") as refused:
        prepare(
            ["0000:00:1e.7"],
            "vm1",
            force=["mounted"],
            host=Host(tmp_path, tmp_path),
            root=tmp_path / "run",
        )
    assert "unknown --force" not in str(refused.value)


def test_an_unused_disk_passes(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(devices=[_controller([Block("vdb", "254:16", [Block("vdb1", "254:17")])])])
    )
    proc = build_proc(tmp_path, mounts=[Mount("254:0", "/dev/root", "/")], swaps=["/dev/vda2"])
    assert check(host.device(ADDR), host.sysfs, proc=proc, devfs=host.devfs) == []


def test_the_kernel_claim_is_named(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[_controller([Block("vde", "254:64")])]))
    with pytest.raises(UnsafeToUnbind) as refused:
        check(
            host.device(ADDR),
            host.sysfs,
            proc=build_proc(tmp_path),
            devfs=host.devfs,
            probe=lambda node, number: node.name == "vde",
        )
    assert refused.value.found == (
        "has disks in use: vde is claimed exclusively by the kernel (a file system, RAID or "
        "device mapper kvmvfio could not name)"
    )


def test_what_could_not_be_read_is_said(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[_controller([Block("vdb", "254:16", holders=["dm-9"])])]))
    proc = build_proc(tmp_path)
    (proc / "self" / "mountinfo").unlink()
    with pytest.raises(UnsafeToUnbind) as refused:
        check(host.device(ADDR), host.sysfs, proc=proc, devfs=host.devfs)
    mountinfo = proc / "self" / "mountinfo"
    assert refused.value.found == (
        f"has disks in use: vdb might be in use (kvmvfio could not read {mountinfo} "
        "(No such file or directory)); vdb is used by dm-9"
    )


def test_many_uses_are_counted_not_all_named() -> None:
    uses = tuple(BlockUse(f"vd{c}", UseKind.SWAP) for c in "abcdefgh")
    said = safety._disks_finding(uses)
    assert said == (
        "has disks in use: vda is swap; vdb is swap; vdc is swap; vdd is swap; vde is swap; "
        "vdf is swap; and 2 more"
    )


@pytest.mark.parametrize(
    ("use", "said"),
    [
        (BlockUse("vda", UseKind.MOUNTED, (), ("/", "/var")), "vda is mounted on /, /var"),
        (BlockUse("vdb", UseKind.HELD, (Holder("dm-3"),)), "vdb is used by dm-3"),
        (
            BlockUse("vdb", UseKind.SWAP, (Holder("dm-3", "device mapper", "x"),)),
            "vdb is used by dm-3 (device mapper x), which is swap",
        ),
        (
            BlockUse(
                "", UseKind.UNKNOWN, detail="kvmvfio could not read /sys/x (Permission denied)"
            ),
            "kvmvfio could not read /sys/x (Permission denied)",
        ),
    ],
)
def test_each_use_in_words(use: BlockUse, said: str) -> None:
    assert describe_use(use) == said
