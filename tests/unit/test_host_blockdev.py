"""Disks behind a PCI function and their uses, read from fake sysfs and /proc trees.

The same cases run on L1's real disks in tests/lab/test_disks_in_use.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Block, Dev, Mount, NvmeSubsystem, Stacked, Topology, build_proc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmvfio.host import Host
from kvmvfio.host.blockdev import (
    BlockUse,
    ExclusiveProbe,
    Holder,
    HostTables,
    UseKind,
    block_devices,
    disk_uses,
    exclusive_claim,
)

BuildHost = Callable[[Topology], Host]
VIRTIO = "0000:00:08.0"
NVME = "0000:00:09.0"


def virtio(*disks: Block, addr: str = VIRTIO) -> Dev:
    return Dev(
        addr, vendor=0x1AF4, device=0x1042, cls=0x010000, driver="virtio-pci", group=8, disks=disks
    )


def never(node: Path, number: str) -> bool | None:
    return False


def uses(
    host: Host, proc: Path, addr: str = VIRTIO, probe: ExclusiveProbe = never
) -> tuple[BlockUse, ...]:
    folder = host.sysfs / "bus" / "pci" / "devices" / addr
    return disk_uses(folder, sysfs=host.sysfs, proc=proc, devfs=host.devfs, probe=probe)


def test_disks_and_partitions_are_found_below_the_function(build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16", [Block("vdb1", "254:17")]))]))
    found = block_devices(host.sysfs / "bus/pci/devices" / VIRTIO, host.sysfs)
    assert [(d.name, d.number, d.disk, d.is_partition) for d in found] == [
        ("vdb", "254:16", "vdb", False),
        ("vdb1", "254:17", "vdb", True),
    ]


def test_an_unused_disk_has_no_uses(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16", [Block("vdb1", "254:17")]))]))
    proc = build_proc(tmp_path, mounts=[Mount("254:0", "/dev/root", "/")], swaps=["/dev/vda2"])
    assert uses(host, proc) == ()


def test_a_function_without_disks_reads_no_tables(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:05.0", driver="e1000e", group=3)]))
    assert uses(host, tmp_path / "no-proc", "0000:00:05.0") == ()


def test_the_root_file_system_is_found_by_number(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vda", "254:0"))]))
    proc = build_proc(tmp_path, mounts=[Mount("254:0", "/dev/root", "/")])
    assert uses(host, proc) == (BlockUse("vda", UseKind.MOUNTED, mountpoints=("/",)),)


def test_a_btrfs_mount_is_found_by_its_source(tmp_path: Path, build_host: BuildHost) -> None:
    # btrfs reports an anonymous device number (0:N); its source still names the disk.
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16"))]))
    proc = build_proc(tmp_path, mounts=[Mount("0:42", "/dev/vdb", "/srv", "btrfs")])
    assert uses(host, proc) == (BlockUse("vdb", UseKind.MOUNTED, mountpoints=("/srv",)),)


def test_mount_points_are_unescaped_and_listed_once(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16"))]))
    proc = build_proc(
        tmp_path,
        mounts=[
            Mount("254:16", "/dev/vdb", "/mnt/my disk"),
            Mount("254:16", "/dev/vdb", "/srv"),
            Mount("254:16", "/dev/vdb", "/srv"),
        ],
    )
    (use,) = uses(host, proc)
    assert use.mountpoints == ("/mnt/my disk", "/srv")


def test_an_lvm_chain_down_to_its_mount(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[virtio(Block("vdb", "254:16", [Block("vdb1", "254:17", holders=["dm-0"])]))],
            stacked=[Stacked("dm-0", "253:0", dm_name="vg0-data", dm_uuid="LVM-abc")],
        )
    )
    proc = build_proc(tmp_path, mounts=[Mount("253:0", "/dev/mapper/vg0-data", "/mnt/data")])
    lv = Holder("dm-0", "LVM", "vg0-data")
    assert uses(host, proc) == (
        BlockUse("vdb1", UseKind.MOUNTED, (lv,), mountpoints=("/mnt/data",)),
    )


def test_holders_of_holders_and_several_uses(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[virtio(Block("vdb", "254:16", holders=["dm-0"]))],
            stacked=[
                Stacked(
                    "dm-0",
                    "253:0",
                    dm_name="crypt0",
                    dm_uuid="CRYPT-LUKS2-x-crypt0",
                    holders=["dm-1", "dm-2"],
                ),
                Stacked("dm-1", "253:1", dm_name="vg1-root", dm_uuid="LVM-a"),
                Stacked("dm-2", "253:2", dm_name="vg1-swap", dm_uuid="LVM-b"),
            ],
        )
    )
    proc = build_proc(tmp_path, mounts=[Mount("253:1", "/dev/dm-1", "/")], swaps=["/dev/dm-2"])
    crypt = Holder("dm-0", "LUKS", "crypt0")
    assert uses(host, proc) == (
        BlockUse("vdb", UseKind.MOUNTED, (crypt, Holder("dm-1", "LVM", "vg1-root")), ("/",)),
        BlockUse("vdb", UseKind.SWAP, (crypt, Holder("dm-2", "LVM", "vg1-swap"))),
    )


def test_an_idle_holder_is_a_use(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[virtio(Block("vdd", "254:48", [Block("vdd1", "254:49", holders=["md0"])]))],
            stacked=[Stacked("md0", "9:0", md_level="raid1")],
        )
    )
    proc = build_proc(tmp_path)
    assert uses(host, proc) == (BlockUse("vdd1", UseKind.HELD, (Holder("md0", "RAID1"),)),)


def test_an_unreadable_holder_is_still_a_use(tmp_path: Path, build_host: BuildHost) -> None:
    # dm-7 is listed in holders/ but has no folder: its link leads nowhere.
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16", holders=["dm-7"]))]))
    assert uses(host, build_proc(tmp_path)) == (BlockUse("vdb", UseKind.HELD, (Holder("dm-7"),)),)


def test_a_holder_loop_ends(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[virtio(Block("vdb", "254:16", holders=["dm-0"]))],
            stacked=[
                Stacked("dm-0", "253:0", dm_name="a", holders=["dm-1"]),
                Stacked("dm-1", "253:1", dm_name="b", holders=["dm-0"]),
            ],
        )
    )
    (use,) = uses(host, build_proc(tmp_path))
    assert use.kind is UseKind.UNKNOWN
    assert [h.name for h in use.via] == ["dm-0", "dm-1", "dm-0"]
    assert "in a loop" in use.detail


def test_swap_on_a_partition(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[
                virtio(Block("vdc", "254:32", [Block("vdc1", "254:33"), Block("vdc2", "254:34")]))
            ]
        )
    )
    proc = build_proc(tmp_path, swaps=["/dev/vdc2"])
    assert uses(host, proc) == (BlockUse("vdc2", UseKind.SWAP),)


def test_the_kernel_claim_is_the_catch_all(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vde", "254:64", [Block("vde1", "254:65")]))]))
    asked: list[tuple[str, str]] = []

    def claimed(node: Path, number: str) -> bool:
        asked.append((node.name, number))
        return True

    # The partition is asked first; its claim makes the disk's no news.
    assert uses(host, build_proc(tmp_path), probe=claimed) == (BlockUse("vde1", UseKind.CLAIMED),)
    assert asked == [("vde1", "254:65")]
    asked.clear()
    proc = build_proc(tmp_path, mounts=[Mount("254:65", "/dev/vde1", "/x")])
    assert uses(host, proc, probe=claimed) == (BlockUse("vde1", UseKind.MOUNTED, (), ("/x",)),)
    assert asked == []  # a named use needs no probe, and makes the disk busy


def test_nvme_namespaces_below_the_controller(tmp_path: Path, build_host: BuildHost) -> None:
    nvme = Dev(
        NVME,
        cls=0x010802,
        driver="nvme",
        group=9,
        disk_folder="nvme/nvme0",
        disks=[Block("nvme0n1", "259:0", [Block("nvme0n1p1", "259:1")])],
    )
    host = build_host(Topology(devices=[nvme]))
    proc = build_proc(tmp_path, mounts=[Mount("259:1", "/dev/nvme0n1p1", "/boot")])
    assert uses(host, proc, NVME) == (BlockUse("nvme0n1p1", UseKind.MOUNTED, (), ("/boot",)),)


def test_nvme_multipath_namespaces_hang_off_the_subsystem(
    tmp_path: Path, build_host: BuildHost
) -> None:
    hidden = Block("nvme0c0n1", "259:9", files={"hidden": b"1\n"})
    nvme = Dev(NVME, cls=0x010802, driver="nvme", group=9, disk_folder="nvme/nvme0", disks=[hidden])
    other = Dev("0000:00:0a.0", cls=0x010802, driver="nvme", group=10, disk_folder="nvme/nvme1")
    host = build_host(
        Topology(
            devices=[nvme, other],
            nvme_subsystems=[
                NvmeSubsystem("nvme-subsys0", [(NVME, "nvme0")], [Block("nvme0n1", "259:0")]),
                NvmeSubsystem(
                    "nvme-subsys1", [("0000:00:0a.0", "nvme1")], [Block("nvme1n1", "259:2")]
                ),
            ],
        )
    )
    found = block_devices(host.sysfs / "bus/pci/devices" / NVME, host.sysfs)
    assert [d.name for d in found] == ["nvme0n1"]  # not the hidden path, not nvme1's
    proc = build_proc(tmp_path, mounts=[Mount("259:0", "/dev/nvme0n1", "/var")])
    assert uses(host, proc, NVME) == (BlockUse("nvme0n1", UseKind.MOUNTED, (), ("/var",)),)
    assert uses(host, proc, "0000:00:0a.0") == ()


def test_scsi_disks_deep_below_an_hba(tmp_path: Path, build_host: BuildHost) -> None:
    ahci = Dev(
        "0000:00:1f.2",
        cls=0x010601,
        driver="ahci",
        group=12,
        disk_folder="ata1/host0/target0:0:0/0:0:0:0/block",
        disks=[Block("sda", "8:0", [Block("sda1", "8:1")])],
    )
    host = build_host(Topology(devices=[ahci]))
    proc = build_proc(tmp_path, mounts=[Mount("8:1", "/dev/sda1", "/home")])
    assert uses(host, proc, "0000:00:1f.2") == (BlockUse("sda1", UseKind.MOUNTED, (), ("/home",)),)


def test_disks_of_functions_behind_a_bridge_are_theirs(
    tmp_path: Path, build_host: BuildHost
) -> None:
    behind = virtio(Block("vdb", "254:16"), addr="0000:01:00.0")
    bridge = Dev("0000:00:01.0", bridge=True, driver="pcieport", group=1, children=[behind])
    host = build_host(Topology(devices=[bridge]))
    proc = build_proc(tmp_path, mounts=[Mount("254:16", "/dev/vdb", "/")])
    assert uses(host, proc, "0000:00:01.0") == ()
    assert len(uses(host, proc, "0000:01:00.0")) == 1


@pytest.mark.parametrize(
    ("mountinfo", "detail"),
    [
        (None, "could not read"),
        (b"garbage\n", "line 1 of"),
        (b"20 1 x:y / / rw - ext4 /dev/vdb rw\n", "line 1 of"),
        (b"20 1 254:16 / / rw\n", "line 1 of"),
    ],
)
def test_an_unreadable_mount_table_is_not_taken_for_unused(
    tmp_path: Path, build_host: BuildHost, mountinfo: bytes | None, detail: str
) -> None:
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16"))]))
    proc = build_proc(tmp_path)
    if mountinfo is None:
        (proc / "self" / "mountinfo").unlink()
    else:
        (proc / "self" / "mountinfo").write_bytes(mountinfo)
    (use,) = uses(host, proc)
    assert (use.device, use.kind) == ("vdb", UseKind.UNKNOWN)
    assert detail in use.detail
    assert str(proc / "self" / "mountinfo") in use.detail


def test_no_proc_swaps_is_no_swap(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16"))]))
    proc = build_proc(tmp_path)
    (proc / "swaps").unlink()  # CONFIG_SWAP=n
    assert uses(host, proc) == ()


def test_a_bad_device_number_is_not_taken_for_unused(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(Topology(devices=[virtio(Block("vdb", "254:16", files={"dev": b"\xff\n"}))]))
    (use,) = uses(host, build_proc(tmp_path))
    assert use.kind is UseKind.UNKNOWN
    assert "device number" in use.detail


def test_names_from_sysfs_are_made_printable(tmp_path: Path, build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[virtio(Block("vdb", "254:16", holders=["dm-0"]))],
            stacked=[Stacked("dm-0", "253:0", dm_name="evil\x1b[2Jname" + "x" * 80)],
        )
    )
    (use,) = uses(host, build_proc(tmp_path))
    assert use.via[0].label.startswith("evil\\x1b[2Jname")
    assert len(use.via[0].label) == 64


def test_exclusive_claim_opens_only_block_nodes(tmp_path: Path) -> None:
    plain = tmp_path / "vdb"
    plain.write_bytes(b"")
    assert exclusive_claim(plain, "254:16") is None
    assert exclusive_claim(tmp_path / "gone", "254:16") is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert exclusive_claim(fifo, "0:0") is None  # not opened: it would block
    assert exclusive_claim(Path("/dev/null"), "1:3") is None  # a char device


def test_host_tables_read_the_kernels_formats(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/root rw\n"
        "30 22 0:25 / /mnt/src ro,relatime - 9p src ro,trans=virtio\n"
        "31 22 253:0 / /mnt/a\\040b rw master:2 - ext4 /dev/mapper/vg0-data rw\n"
    )
    (proc / "swaps").write_text(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        "/dev/vdc2                               partition\t1048572\t\t0\t\t-2\n"
    )
    tables = HostTables.read(proc, tmp_path / "dev")
    assert tables.mountpoints("254:0", ()) == ("/",)
    assert tables.mountpoints("253:0", ()) == ("/mnt/a b",)
    assert tables.mountpoints(None, ["/dev/mapper/vg0-data"]) == ("/mnt/a b",)
    assert tables.is_swap(None, ["/dev/vdc2"])
    assert not tables.is_swap("254:34", ["/dev/vdc3"])


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mountinfo=st.binary(max_size=300), swaps=st.binary(max_size=200))
def test_any_table_contents_give_an_answer_not_a_traceback(
    tmp_path: Path, mountinfo: bytes, swaps: bytes
) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "mountinfo").write_bytes(mountinfo)
    (proc / "swaps").write_bytes(swaps)
    tables = HostTables.read(proc, tmp_path / "dev")
    tables.mountpoints("254:0", ["/dev/vda"])
    tables.is_swap("254:0", ["/dev/vda"])


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dev=st.binary(max_size=20),
    uevent=st.binary(max_size=60),
    dm_name=st.binary(max_size=40),
    level=st.binary(max_size=20),
)
def test_any_sysfs_contents_give_an_answer_not_a_traceback(
    tmp_path_factory: pytest.TempPathFactory,
    dev: bytes,
    uevent: bytes,
    dm_name: bytes,
    level: bytes,
) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    sysfs, devfs = Topology(
        devices=[
            virtio(
                Block(
                    "vdb",
                    "254:16",
                    [Block("vdb1", "254:17", holders=["dm-0", "md0"])],
                    files={"dev": dev, "uevent": uevent},
                )
            )
        ],
        stacked=[
            Stacked("dm-0", "253:0", dm_name="x", files={"dev": dev}),
            Stacked("md0", "9:0", md_level="raid1"),
        ],
        filler=False,
    ).build(root)
    (sysfs / "class/block/dm-0/dm/name").write_bytes(dm_name)
    (sysfs / "class/block/md0/md/level").write_bytes(level)
    proc = build_proc(root, mounts=[Mount("254:16", "/dev/vdb", "/")])
    found = disk_uses(
        sysfs / "bus/pci/devices" / VIRTIO, sysfs=sysfs, proc=proc, devfs=devfs, probe=never
    )
    assert found  # vdb1 has holders: in use whatever else was read
