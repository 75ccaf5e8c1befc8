"""A GPU as hosts have one: display and audio in one group, an option ROM (issue 18).

The fake host mirrors the lab's ``gpu`` topology: QEMU's std VGA (the boot
VGA, on bochs-drm, with an option ROM) and its intel-hda (on snd_hda_intel)
in IOMMU group 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology
from test_host_rom import gpu_rom, image

from kvmvfio.cli import run
from kvmvfio.errors import Interface, UsageError, speaking_to
from kvmvfio.host import Host
from kvmvfio.host.rom import InvalidRom
from kvmvfio.prepare import UnlistedMembers, prepare
from kvmvfio.prepare.safety import UnsafeToUnbind
from kvmvfio.qemu import coldplug
from kvmvfio.vfio.errors import GroupNotViable

BuildHost = Callable[[Topology], Host]
DISPLAY, AUDIO = "0000:00:04.0", "0000:00:04.1"


def gpu(rom: bytes | None = None) -> Topology:
    files = {} if rom is None else {"rom": rom}
    return Topology(
        devices=[
            Dev("0000:00:03.0", vendor=0x1234, device=0x11E8, cls=0x00FF00, group=1),
            Dev(DISPLAY, vendor=0x1234, device=0x1111, cls=0x030000, driver="bochs-drm",
                group=2, boot_vga=True, files=files),
            Dev(AUDIO, vendor=0x8086, device=0x2668, cls=0x040300, driver="snd_hda_intel",
                group=2),
        ],
        drivers=("vfio-pci", "bochs-drm", "snd_hda_intel"),
    )  # fmt: skip


def _tree(host: Host) -> dict[str, str]:
    """What prepare could change: each function's driver link and driver_override."""
    out = {}
    for addr in (DISPLAY, AUDIO):
        folder = host.sysfs / "bus" / "pci" / "devices" / addr
        out[addr] = f"{os.readlink(folder / 'driver')} {(folder / 'driver_override').read_text()}"
    return out


def test_prepare_of_the_display_alone_names_the_audio_function(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host = build_host(gpu())
    before = _tree(host)
    with pytest.raises(UnlistedMembers) as info:
        prepare([DISPLAY], "vm1", host=host, root=tmp_path / "run")
    err = info.value
    assert isinstance(err, GroupNotViable)  # what callers already catch for a group
    assert (err.group, err.asked, [b.address for b in err.blockers]) == ("2", (DISPLAY,), [AUDIO])
    assert str(err) == (
        f"{DISPLAY} cannot go to vfio-pci without the rest of IOMMU group 2: {AUDIO} "
        "(HD audio device 8086:2668, on host driver snd_hda_intel). A group goes to VFIO whole, "
        "and kvmvfio takes a function from its host driver only when it is named: pass "
        f"'{AUDIO}' in addresses too"
    )
    assert _tree(host) == before
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("group-*.json"))


def test_the_refusal_speaks_to_each_interface(build_host: BuildHost, tmp_path: Path) -> None:
    host = build_host(gpu())
    with speaking_to(Interface.CLI), pytest.raises(UnlistedMembers) as cli:
        prepare([AUDIO], "vm1", host=host, root=tmp_path)
    assert str(cli.value).endswith(
        f"`kvmvfio prepare --owner NAME {AUDIO} {DISPLAY}` moves them all"
    )
    assert f"{DISPLAY} (VGA controller 1234:1111, on host driver bochs-drm)" in str(cli.value)
    with speaking_to(Interface.METADATA), pytest.raises(UnlistedMembers) as meta:
        prepare([AUDIO], "vm1", host=host, root=tmp_path)
    assert f"list {DISPLAY} in the domain's kvmvfio metadata too" in str(meta.value)


def test_both_functions_named_pass_to_the_safety_checks(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host = build_host(gpu())
    # Past the group rule, the display is still the boot VGA: the next refusal.
    with pytest.raises(UnsafeToUnbind, match="boot VGA"):
        prepare([DISPLAY, AUDIO], "vm1", host=host, root=tmp_path)
    with pytest.raises(UnsafeToUnbind, match="boot VGA"):
        prepare([DISPLAY], "vm1", host=host, root=tmp_path, listed=[AUDIO])


def test_the_cli_refuses_with_exit_status_1(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    host = build_host(gpu())
    code = run(["prepare", "--owner", "vm1", DISPLAY, "--root", str(tmp_path),
                "--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs)])  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert f"`kvmvfio prepare --owner NAME {DISPLAY} {AUDIO}` moves them all" in err


def _roots(host: Host) -> list[str]:
    return ["--sysfs-root", str(host.sysfs), "--dev-root", str(host.devfs),
            "--proc-root", str(host.procfs)]  # fmt: skip


def test_group_reports_the_rom_and_what_firmware_finds(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(gpu(gpu_rom()))
    assert run(["group", DISPLAY, *_roots(host)]) == 1
    out = capsys.readouterr().out
    assert (
        f"{DISPLAY}: ROM 3 KiB: x86, efi x64; a legacy BIOS runs its x86 image, UEFI (x64) "
        "loads its EFI driver"
    ) in out
    assert AUDIO + ":" not in out  # no ROM BAR, no line
    assert run(["group", "2", "--json", *_roots(host)]) == 1
    doc = json.loads(capsys.readouterr().out)
    display, audio = doc["devices"]
    assert audio["rom"] is None
    rom = display["rom"]
    assert (rom["read"], rom["size"], rom["valid"], rom["problem"]) == (True, 3072, True, None)
    assert (rom["legacy_bios"], rom["uefi"]) == (True, ["x64"])
    assert [(i["code_type"], i["efi_machine"], i["last"]) for i in rom["images"]] == [
        ("x86", None, False),
        ("efi", "x64", True),
    ]
    assert rom["images"][0] == {
        "offset": 0, "length": 1024, "vendor": "0x1234", "device": "0x1111",
        "code_type": "x86", "efi_machine": None, "efi_subsystem": None,
        "checksum_ok": True, "last": False,
    }  # fmt: skip


def test_inventory_notes_a_rom_compactly(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    host = build_host(gpu(image(vendor=0x10DE, device=0x2204)))
    assert run(["inventory", *_roots(host)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(DISPLAY))
    assert row.endswith("boot VGA, ROM invalid")
    assert run(["inventory", "--json", *_roots(host)]) == 0
    (display,) = [
        d for d in json.loads(capsys.readouterr().out)["devices"] if d["address"] == DISPLAY
    ]
    assert display["rom"]["problem"] == "image 0 is for 10de:2204, not 1234:1111"
    assert display["rom"]["valid"] is False


def test_a_rom_in_use_by_a_vm_is_not_read(
    build_host: BuildHost, capsys: pytest.CaptureFixture[str]
) -> None:
    topo = gpu(gpu_rom())
    display = topo.devices[1]
    topo = Topology(
        devices=[
            topo.devices[0],
            Dev(DISPLAY, vendor=0x1234, device=0x1111, cls=0x030000, driver="vfio-pci", group=2,
                files={"rom": gpu_rom(), "enable": b"1\n"}),
            Dev(AUDIO, vendor=0x8086, device=0x2668, cls=0x040300, driver="vfio-pci", group=2),
        ]
    )  # fmt: skip
    assert display.driver == "bochs-drm"
    host = build_host(topo)
    assert run(["group", "2", "--json", *_roots(host)]) == 0
    rom = json.loads(capsys.readouterr().out)["devices"][0]["rom"]
    assert (rom["read"], rom["size"], rom["images"]) == (False, None, [])
    assert rom["reason"] == "in use through vfio-pci (not read under a running VM)"
    assert run(["inventory", *_roots(host)]) == 0
    assert "ROM not read" in capsys.readouterr().out


# -- a ROM file for QEMU ----------------------------------------------------------

ON_VFIO = Topology(
    devices=[
        Dev(DISPLAY, vendor=0x1234, device=0x1111, cls=0x030000, driver="vfio-pci", group=2),
        Dev(AUDIO, vendor=0x8086, device=0x2668, cls=0x040300, driver="vfio-pci", group=2),
    ]
)  # fmt: skip


def test_coldplug_passes_a_checked_romfile(build_host: BuildHost, tmp_path: Path) -> None:
    host = build_host(ON_VFIO)
    folder = tmp_path / "roms,1"
    folder.mkdir()
    (folder / "vbios.rom").write_bytes(gpu_rom())
    (tmp_path / "link.rom").symlink_to(folder / "vbios.rom")
    with coldplug(
        [DISPLAY, AUDIO], coherency="ignore", host=host, romfiles={"00:04.0": tmp_path / "link.rom"}
    ) as plug:
        display, audio = plug.args[3], plug.args[5]
    # The file itself, by absolute path, its comma doubled as QEMU's options want.
    assert display.endswith(f",romfile={tmp_path}/roms,,1/vbios.rom")
    assert "romfile" not in audio


def test_coldplug_refuses_a_romfile_before_opening_anything(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host = build_host(ON_VFIO)
    before = set(os.listdir("/proc/self/fd"))
    wrong = tmp_path / "nvidia.rom"
    wrong.write_bytes(image(vendor=0x10DE, device=0x2204))
    with pytest.raises(InvalidRom, match="image 0 is for 10de:2204, not 1234:1111"):
        coldplug([DISPLAY, AUDIO], coherency="ignore", host=host, romfiles={DISPLAY: wrong})
    with pytest.raises(UsageError, match="not one of the devices"):
        coldplug([DISPLAY], coherency="ignore", host=host, romfiles={AUDIO: wrong})
    assert set(os.listdir("/proc/self/fd")) == before


def test_coldplug_shows_a_device_without_its_rom_bar(build_host: BuildHost, tmp_path: Path) -> None:
    host = build_host(ON_VFIO)
    with coldplug([DISPLAY, AUDIO], coherency="ignore", host=host, no_rombar=["00:04.0"]) as plug:
        display, audio = plug.args[3], plug.args[5]
    assert display.endswith(",rombar=0")
    assert "rombar" not in audio
    rom = tmp_path / "vbios.rom"
    rom.write_bytes(gpu_rom())
    with pytest.raises(UsageError, match="given a ROM file and no ROM BAR"):
        coldplug(
            [DISPLAY], coherency="ignore", host=host, romfiles={DISPLAY: rom}, no_rombar=[DISPLAY]
        )
    with pytest.raises(UsageError, match="which is not one of the devices"):
        coldplug([DISPLAY], coherency="ignore", host=host, no_rombar=[AUDIO])
