"""What holds a display function beyond its driver, and the ``console`` safety check.

Fake trees shaped like what L1 shows for the lab's std VGA on bochs-drm
(fb0 under the function, vtcon1 "frame buffer device", card0 and its
node), plus a firmware framebuffer in /proc/iomem as efifb leaves one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fakesysfs import (
    Dev,
    Topology,
    add_drm,
    add_framebuffer,
    add_vtconsole,
    build_proc,
    write_attr,
)
from hypothesis import given
from hypothesis import strategies as st

from kvmvfio.cli import run
from kvmvfio.host import Host
from kvmvfio.host.console import (
    MemoryRange,
    console_use,
    parse_iomem,
    parse_resource,
)
from kvmvfio.prepare import prepare
from kvmvfio.prepare.safety import UnsafeToUnbind, check

GPU, AUDIO = "0000:00:04.0", "0000:00:04.1"
RESOURCE = (
    "0x00000000fd000000 0x00000000fdffffff 0x0000000000042208\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x00000000febf0000 0x00000000febf0fff 0x0000000000040200\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
    "0x000000000000c000 0x000000000000c01f 0x0000000000040101\n"
    "0x00000000000c0000 0x00000000000dffff 0x0000000000000212\n"
)
IOMEM = """00000000-00000fff : Reserved
000c0000-000dffff : Video ROM
fd000000-fdffffff : 0000:00:04.0
  fd000000-fdffffff : bochs-drm
febf0000-febf0fff : 0000:00:04.0
  febf0000-febf0fff : bochs-drm
"""


def _gpu_host(tmp_path: Path, *, iomem: str = IOMEM) -> Host:
    sysfs, devfs = Topology(
        devices=[
            Dev(GPU, 0x1234, 0x1111, cls=0x030000, driver="bochs-drm", group=2, boot_vga=True),
            Dev(AUDIO, cls=0x040300, driver="snd_hda_intel", group=2),
        ]
    ).build(tmp_path / "root")
    write_attr(sysfs, GPU, "resource", RESOURCE.encode())
    build_proc(tmp_path / "root", iomem=iomem)
    return Host(sysfs, devfs, sysfs.parent / "proc")


def _console(host: Host, *, bound: bool = True) -> None:
    add_framebuffer(host.sysfs, GPU, "fb0")
    add_vtconsole(host.sysfs, "vtcon0", "(S) dummy device", bound=False)
    add_vtconsole(host.sysfs, "vtcon1", "(M) frame buffer device", bound=bound)


def _hold(host: Host, node: Path, pid: int = 4242, comm: str = "Xorg") -> None:
    folder = host.procfs / str(pid)
    (folder / "fd").mkdir(parents=True)
    (folder / "comm").write_text(f"{comm}\n")
    os.symlink(os.path.realpath(node), folder / "fd" / "12")


def test_nothing_holds_a_plain_display(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert (use.framebuffers, use.fbcon, use.drm, use.firmware) == ((), (), (), ())
    assert use.iomem_known
    assert not use.console
    assert use.notes() == []
    assert check(host.device(GPU), host.sysfs, force=["boot-vga"], proc=host.procfs) == [
        f"{GPU}: is the boot VGA device (accepted by force='boot-vga')"
    ]


def test_fbcon_on_the_functions_framebuffer_is_found(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    _console(host)
    add_drm(host.sysfs, host.devfs, GPU, "card0", "226:0")
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert [(f.name, f.id) for f in use.framebuffers] == [("fb0", "bochs-drmdrmfb")]
    assert use.fbcon == ("vtcon1",)
    assert use.console
    assert [(n.name, n.holders) for n in use.drm] == [("card0", ())]
    assert use.notes() == ["console on fb0"]
    # The audio function of the same slot has none of it.
    other = console_use(AUDIO, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert (other.framebuffers, other.drm, other.console) == ((), (), False)


def test_an_unbound_fbcon_is_no_console(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    _console(host, bound=False)
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert use.framebuffers
    assert use.fbcon == ()
    assert not use.console


def test_the_console_refusal_names_fbcon_and_what_frees_it(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    _console(host)
    with pytest.raises(UnsafeToUnbind) as refused:
        check(host.device(GPU), host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert refused.value.check == "console"
    assert str(refused.value) == (
        f"PCI device {GPU} (bochs-drm) carries the framebuffer console (fbcon on fb0, vtcon1): "
        "`echo 0 > /sys/class/vtconsole/vtcon1/bind` moves the console off it; taking it from "
        "the host could cut off what uses it. Pass force=['console'] to accept that"
    )
    accepted = check(
        host.device(GPU),
        host.sysfs,
        force=["console", "boot-vga"],
        proc=host.procfs,
        devfs=host.devfs,
    )
    assert accepted[0].endswith("(accepted by force='console')")


def test_a_held_drm_card_is_refused_naming_the_holder(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    node = add_drm(host.sysfs, host.devfs, GPU, "card0", "226:0")
    add_drm(host.sysfs, host.devfs, GPU, "renderD128", "226:128")
    _hold(host, node)
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert [(n.name, n.holders) for n in use.held] == [("card0", ("pid 4242 (Xorg)",))]
    assert use.notes() == ["card0 open"]
    with pytest.raises(UnsafeToUnbind) as refused:
        check(host.device(GPU), host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert refused.value.check == "console"
    assert f"has its DRM device {host.devfs}/dri/card0 open in pid 4242 (Xorg)" in str(
        refused.value
    )
    assert "stop the display manager" in str(refused.value)
    # On a real host the in-use check finds the same holder through the node's
    # device number, and asks for its own --force; here nodes are plain files.
    accepted = check(
        host.device(GPU), host.sysfs, force=["console", "boot-vga"], proc=host.procfs,
        devfs=host.devfs,
    )  # fmt: skip
    assert len(accepted) == 2


def test_a_firmware_framebuffer_in_a_bar_is_found(tmp_path: Path) -> None:
    iomem = IOMEM.replace(
        "  fd000000-fdffffff : bochs-drm\n",
        "  fd000000-fd2fffff : BOOTFB\n    fd000000-fd2fffff : simpledrm\n",
    )
    host = _gpu_host(tmp_path, iomem=iomem)
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert [(f.owner, str(f.range), f.bar) for f in use.firmware] == [
        ("BOOTFB", "0xfd000000-0xfd2fffff", 0),
        ("simpledrm", "0xfd000000-0xfd2fffff", 0),
    ]
    assert use.notes() == ["BOOTFB in BAR 0", "simpledrm in BAR 0"]
    with pytest.raises(UnsafeToUnbind, match=r"has a firmware framebuffer \(BOOTFB, 0xfd000000"):
        check(host.device(GPU), host.sysfs, proc=host.procfs, devfs=host.devfs)


def test_iomem_without_addresses_is_unknown(tmp_path: Path) -> None:
    # What a user who is not root reads: every address zero.
    zeros = "00000000-00000000 : 0000:00:04.0\n  00000000-00000000 : efifb\n"
    host = _gpu_host(tmp_path, iomem=zeros)
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert use.firmware == ()
    assert not use.iomem_known


def test_a_non_display_function_is_not_looked_at(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    add_vtconsole(host.sysfs, "vtcon1", "(M) frame buffer device", bound=True)
    add_framebuffer(host.sysfs, AUDIO, "fb0")  # nonsense, but nothing reads it
    assert check(host.device(AUDIO), host.sysfs, proc=host.procfs, devfs=host.devfs) == []


def test_prepare_is_refused_for_the_console_with_nothing_changed(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    _console(host)
    root = tmp_path / "run"
    with pytest.raises(UnsafeToUnbind) as refused:
        prepare([GPU, AUDIO], "vm1", host=host, root=root, force=["boot-vga"])
    assert refused.value.check == "console"
    assert host.device(GPU).driver == "bochs-drm"
    assert host.device(GPU).driver_override is None
    assert not list(root.rglob("*.json")) if root.exists() else True


def test_resource_and_iomem_parse() -> None:
    assert parse_resource(RESOURCE) == {
        0: MemoryRange(0xFD000000, 0xFDFFFFFF),
        2: MemoryRange(0xFEBF0000, 0xFEBF0FFF),
    }
    assert parse_iomem(IOMEM)[3] == ("bochs-drm", MemoryRange(0xFD000000, 0xFDFFFFFF))


@given(st.text(max_size=400))
def test_hostile_resource_and_iomem_never_raise(text: str) -> None:
    for bar, span in parse_resource(text).items():
        assert 0 <= bar < 6
        assert span.start < span.end
    for name, span in parse_iomem(text):
        assert span.start <= span.end
        assert len(name) <= 200


def test_hostile_class_entries_are_skipped(tmp_path: Path) -> None:
    host = _gpu_host(tmp_path)
    graphics = host.sysfs / "class" / "graphics"
    graphics.mkdir(parents=True)
    (graphics / "fb1").write_text("not a folder")  # no device link in it
    os.symlink("/nonexistent", graphics / "fb2")
    (graphics / "fbcon").mkdir()
    vt = host.sysfs / "class" / "vtconsole" / "vtcon9"
    vt.mkdir(parents=True)
    (vt / "name").write_bytes(b"\xff\xfe frame buffer device")
    (vt / "bind").write_text("yes")
    drm = host.sysfs / "class" / "drm" / "card0-HDMI-A-1"
    drm.mkdir(parents=True)
    use = console_use(GPU, host.sysfs, proc=host.procfs, devfs=host.devfs)
    assert (use.framebuffers, use.fbcon, use.drm) == ((), (), ())


def test_inventory_and_group_note_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = _gpu_host(tmp_path)
    _console(host)
    roots = ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs)]
    roots += ["--proc-root", str(host.procfs)]
    assert run(["inventory", *roots]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(GPU))
    assert row.endswith("boot VGA, console on fb0")
    assert run(["group", GPU, *roots]) == 1
    assert f"{GPU}: console on fb0" in capsys.readouterr().out.splitlines()
