"""Disks in lab topologies: the ``[[disk]]`` format, its checks, and what the runner makes of it."""

from __future__ import annotations

import io
import os
import sys
import textwrap
from pathlib import Path

import pytest

from kvmvfio.errors import LabError
from kvmvfio.lab import topology as topo_mod
from kvmvfio.lab.images import LabImages
from kvmvfio.lab.runner import LabRun, qemu_argv, run_in_lab

TOP = '[viommu]\nmodel = "intel-iommu"\n'
DISK = '[[disk]]\nid = "d0"\nsize-mb = 64\ndriver = "virtio-blk-pci"\naddr = "0x14"\n'


def _images(tmp_path: Path) -> LabImages:
    for name in ("bzImage", "rootfs.img", "qemu"):
        (tmp_path / name).write_bytes(b"x")
    return LabImages(tmp_path / "bzImage", tmp_path / "rootfs.img", tmp_path / "qemu")


def test_the_disks_topology() -> None:
    topo = topo_mod.load("disks")
    assert "disks" in topo_mod.builtin_names()
    assert topo.viommu == "intel-iommu"
    assert [(d.id, d.driver) for d in topo.disks] == [
        ("lvm", "virtio-blk-pci"),
        ("luks", "virtio-blk-pci"),
        ("raid", "virtio-blk-pci"),
        ("swap", "virtio-blk-pci"),
        ("spare", "virtio-blk-pci"),
        ("nvme", "nvme"),
    ]
    assert topo.guest_address("lvm") == "0000:00:14.0"
    assert topo.guest_address("nvme") == "0000:00:19.0"
    assert topo.guest_address("edu0") == "0000:00:03.0"  # the tests every topology runs


def test_disks_on_the_qemu_command_line(tmp_path: Path) -> None:
    topo = topo_mod.parse(
        TOP + DISK + '[[disk]]\nid = "n0"\nsize-mb = 8\ndriver = "nvme"\naddr = "0x15"\n',
        name="t",
        source="t.toml",
    )
    run = LabRun(topology=topo, images=_images(tmp_path), checkout=tmp_path, command=("true",))
    job = tmp_path / "a,b"
    argv = qemu_argv(run, job, tmp_path / "c.log")
    drive = f"id=d0,if=none,file={tmp_path}/a,,b/disk-d0.img,format=raw"
    assert argv[argv.index(drive) - 1 : argv.index(drive) + 3] == [
        "-drive",
        drive,
        "-device",
        "virtio-blk-pci,drive=d0,id=d0,addr=0x14",
    ]
    assert "nvme,drive=n0,id=n0,addr=0x15,serial=n0" in argv  # QEMU's nvme needs a serial
    # After the vIOMMU, before L1's root disk (which must stay /dev/vda).
    first_disk = argv.index(drive)
    assert argv.index("intel-iommu,intremap=on,snoop-control=off") < first_disk
    assert first_disk < next(i for i, a in enumerate(argv) if a.startswith("id=root,"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('disk = "x"\n' + TOP, r"disk: must be an array of tables"),
        (TOP + '[[disk]]\nsize-mb = 1\ndriver = "nvme"\naddr = "0x14"\n', r"missing field 'id'"),
        (TOP + DISK.replace("64", "0"), r"disk\[0\].size-mb: must be an integer from 1 to 4096"),
        (TOP + DISK.replace("64", '"64"'), r"disk\[0\].size-mb: must be an integer"),
        (TOP + DISK.replace("virtio-blk-pci", "ide-hd"), r"'ide-hd' is not one of"),
        (TOP + DISK.replace('"d0"', '"d0,file=/etc/shadow"'), r"disk\[0\].id: .* not allowed"),
        (TOP + DISK.replace("0x14", "0x08"), r"disk\[0\].addr: '0x08': a disk takes a slot from"),
        (TOP + DISK.replace("0x14", "0x10"), r"disk\[0\].addr: '0x10'"),
        (TOP + DISK.replace("0x14", "0x14.1"), r"disk\[0\].addr: '0x14.1'"),
        (TOP + DISK.replace("0x14", "0x14,x=1"), r"disk\[0\].addr: .* not allowed"),
        (TOP + DISK + 'serial = "a,b"\n', r"disk\[0\].serial: 'a,b' is not allowed"),
        (TOP + DISK + 'serial = "x123456789012345678901"\n', r"disk\[0\].serial"),
        (TOP + DISK + "cache = 1\n", r"disk\[0\]: unknown field 'cache'"),
        (TOP + DISK + DISK.replace("0x14", "0x15"), r"disk\[1\].id: 'd0' is already the id"),
        (TOP + DISK + DISK.replace('"d0"', '"d1"'), r"disk\[1\].addr: slot 0x14 is taken"),
        (
            TOP + '[[device]]\ndriver = "edu"\nid = "d0"\naddr = "0x03"\n' + DISK,
            r"disk\[0\].id: 'd0' is already the id",
        ),
        (
            TOP + '[[device]]\ndriver = "edu"\naddr = "0x14"\n' + DISK,
            r"disk\[0\].addr: slot 0x14 is taken",
        ),
    ],
)
def test_bad_disks_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(LabError, match=message) as info:
        topo_mod.load(str(path))
    assert str(path) in str(info.value)


# Prints the size and allocated bytes of every -drive file, as L1 would see the disks.
FAKE_QEMU = """\
#!{python}
import os, re, sys
argv = sys.argv[1:]
job = next(re.search(r"path=([^,]+)", a).group(1) for a in argv if a.startswith("local,id=job,"))
for a in argv:
    m = re.match(r"id=(\\w+),if=none,file=([^,]+),format=raw$", a)
    if m:
        st = os.stat(m.group(2))
        print(m.group(1), st.st_size, st.st_blocks * 512)
open(os.path.join(job, "rc"), "w").write("0")
"""


async def test_the_runner_makes_sparse_images(tmp_path: Path) -> None:
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable))
    qemu.chmod(0o755)
    mine = tmp_path / "two.toml"
    mine.write_text(
        textwrap.dedent(
            """
            [viommu]
            model = "intel-iommu"
            [[disk]]
            id = "a"
            size-mb = 64
            driver = "virtio-blk-pci"
            addr = "0x14"
            [[disk]]
            id = "b"
            size-mb = 2048
            driver = "nvme"
            addr = "0x1e"
            serial = "b-1"
            """
        )
    )
    run = LabRun(
        topology=topo_mod.load(str(mine)),
        images=_images(tmp_path),
        checkout=tmp_path,
        command=("true",),
        qemu=str(qemu),
    )
    out = io.BytesIO()
    job = tmp_path / "job"
    assert await run_in_lab(run, out=out, job_dir=job) == 0
    sizes = {line.split()[0]: line.split()[1:] for line in out.getvalue().decode().splitlines()}
    assert sizes["a"][0] == str(64 << 20)
    assert sizes["b"][0] == str(2048 << 20)
    assert int(sizes["b"][1]) < 1 << 20  # sparse: nothing written
    assert {"disk-a.img", "disk-b.img"} <= set(os.listdir(job))


async def test_a_disk_image_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "disk-d0.img").mkdir()  # in the way
    run = LabRun(
        topology=topo_mod.parse(TOP + DISK, name="t", source="built-in t"),
        images=_images(tmp_path),
        checkout=tmp_path,
        command=("true",),
    )
    with pytest.raises(LabError, match=r"cannot create disk image .*disk-d0.img for L1"):
        await run_in_lab(run, out=io.BytesIO(), job_dir=job)
