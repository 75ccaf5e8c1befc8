"""Option ROMs: the image chain parsed from bytes built here, hostile bytes, sysfs, romfile."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmvfio.errors import KernelError
from kvmvfio.host import PciAddress, PciDevice
from kvmvfio.host import rom as rom_mod
from kvmvfio.host.rom import (
    CodeType,
    InvalidRom,
    RomUnreadable,
    check_romfile,
    parse_rom,
    read_sysfs_rom,
)

VGA = (0x1234, 0x1111)


def image(
    *,
    vendor: int = VGA[0],
    device: int = VGA[1],
    code: int = CodeType.X86,
    last: bool = True,
    blocks: int = 2,
    pcir_at: int = 0x1C,
    machine: int = 0x8664,
    revision: int = 3,
    device_list: tuple[int, ...] = (),
) -> bytes:
    """One ROM image of ``blocks`` 512-byte units, as a ROM's builder lays it out."""
    data = bytearray(blocks * 512)
    data[0:2] = b"\x55\xaa"
    data[2] = blocks
    if code == CodeType.EFI:
        data[2:4] = blocks.to_bytes(2, "little")
        data[4:8] = (0x0EF1).to_bytes(4, "little")
        data[8:10] = (11).to_bytes(2, "little")  # boot-service driver
        data[0x0A:0x0C] = machine.to_bytes(2, "little")
    data[0x18:0x1A] = pcir_at.to_bytes(2, "little")
    p = pcir_at
    data[p : p + 4] = b"PCIR"
    data[p + 4 : p + 6] = vendor.to_bytes(2, "little")
    data[p + 6 : p + 8] = device.to_bytes(2, "little")
    if device_list:
        data[p + 8 : p + 10] = (0x20).to_bytes(2, "little")
        for i, dev in enumerate((*device_list, 0)):
            data[p + 0x20 + 2 * i : p + 0x22 + 2 * i] = dev.to_bytes(2, "little")
    data[p + 0x0A : p + 0x0C] = (0x18).to_bytes(2, "little")
    data[p + 0x0C] = revision
    data[p + 0x0D : p + 0x10] = (0x030000).to_bytes(3, "little")
    data[p + 0x10 : p + 0x12] = blocks.to_bytes(2, "little")
    data[p + 0x14] = code
    data[p + 0x15] = 0x80 if last else 0
    if code == CodeType.X86:
        data[-1] = (-sum(data)) % 256  # the legacy checksum byte
    return bytes(data)


def pointing(pcir: int) -> bytes:
    """A good image whose PCIR pointer says ``pcir``."""
    data = bytearray(image())
    data[0x18:0x1A] = pcir.to_bytes(2, "little")
    return bytes(data)


def gpu_rom() -> bytes:
    """A GPU's ROM as vendors ship them: a legacy VGA BIOS image, then a UEFI GOP driver."""
    return image(last=False) + image(code=CodeType.EFI, blocks=4)


def test_a_legacy_and_an_efi_image() -> None:
    rom = parse_rom(gpu_rom() + b"\xff" * 1024, vendor=VGA[0], device=VGA[1])
    assert rom.valid
    assert rom.problem is None
    assert rom.size == 3 * 1024 + 1024
    legacy, efi = rom.images
    assert (legacy.offset, legacy.length, legacy.code_type_name) == (0, 1024, "x86")
    assert legacy.checksum_ok is True
    assert not legacy.last
    assert (efi.offset, efi.length, efi.code_type_name, efi.efi_machine_name) == (
        1024,
        2048,
        "efi",
        "x64",
    )
    assert efi.last
    assert efi.efi_subsystem == 11
    assert efi.efi_compressed is False
    assert rom.legacy_bios
    assert rom.uefi == ("x64",)
    assert rom.summary() == "ROM 4 KiB: x86, efi x64"


def test_what_the_firmware_finds_in_a_uefi_only_rom() -> None:
    rom = parse_rom(image(code=CodeType.EFI, machine=0xAA64))
    assert rom.valid
    assert not rom.legacy_bios
    assert rom.uefi == ("aarch64",)


def test_the_pci_3_device_list_counts_as_a_match() -> None:
    data = image(device=0x1111, device_list=(0x2222, 0x3333))
    assert parse_rom(data, vendor=VGA[0], device=0x3333).valid
    rom = parse_rom(data, vendor=VGA[0], device=0x4444)
    assert not rom.valid
    assert "is for 1234:1111, not 1234:4444" in (rom.problem or "")


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"\xff" * 4096, "empty"),
        (b"\x00" * 4096, "empty"),
        (b"MZ" + b"\x00" * 1022, "no 55 AA signature (found 4d 5a)"),
        (b"\x55\xaa" + b"\x01" * 10, "cut short before its PCIR pointer"),
        (pointing(0xFFF0), "PCIR pointer leads outside the ROM"),
        (pointing(0), "PCIR pointer leads outside the ROM"),
        (image()[:0x1C] + b"RICP" + image()[0x20:], "no PCIR signature at 0x1c"),
        (image(blocks=2)[:600], "runs past the end of the ROM"),
        (image(last=False), "not marked last, and no image follows it"),
        (image(last=False) + b"\xff" * 512, "image 1 (at 0x400): no 55 AA signature"),
        (image(code=CodeType.EFI)[:4] + b"\x00" * 4 + image(code=CodeType.EFI)[8:], "0x0EF1"),
    ],
)
def test_faults_are_named(data: bytes, problem: str) -> None:
    rom = parse_rom(data)
    assert not rom.valid
    assert problem in (rom.problem or ""), rom.problem
    assert rom.summary().startswith(f"ROM {rom.size // 1024 if rom.size % 1024 == 0 else ''}")


def test_a_zero_length_image_ends_the_walk() -> None:
    data = bytearray(image())
    data[0x1C + 0x10 : 0x1C + 0x12] = b"\x00\x00"
    assert "length of 0" in (parse_rom(bytes(data)).problem or "")


def test_an_image_for_another_device_names_both() -> None:
    rom = parse_rom(image(last=False) + image(vendor=0x10DE), vendor=VGA[0], device=VGA[1])
    assert rom.problem == "image 1 is for 10de:1111, not 1234:1111"
    assert len(rom.images) == 2  # what was read, for the report


def test_a_bad_legacy_checksum_is_reported_not_refused() -> None:
    data = bytearray(image())
    data[100] ^= 0xFF
    rom = parse_rom(bytes(data))
    assert rom.valid
    assert rom.images[0].checksum_ok is False


def test_unknown_code_types_and_machines_are_named_by_number() -> None:
    rom = parse_rom(image(code=0x42) + b"")
    assert rom.images[0].code_type_name == "0x42"
    efi = parse_rom(image(code=CodeType.EFI, machine=0x1234)).images[0]
    assert efi.efi_machine_name == "0x1234"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_any_bytes_give_an_answer(data: bytes) -> None:
    rom = parse_rom(data, vendor=VGA[0], device=VGA[1])
    assert rom.valid == (rom.problem is None and bool(rom.images))
    rom.summary()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_roms_give_an_answer(data: st.DataObject) -> None:
    raw = bytearray(gpu_rom())
    for _ in range(data.draw(st.integers(0, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    rom = parse_rom(bytes(raw[:cut]), vendor=VGA[0], device=VGA[1])
    # A chain never claims bytes it does not have, and images do not overlap.
    end = 0
    for img in rom.images:
        assert img.offset == end
        assert img.length > 0
        end = img.offset + img.length
        assert end <= rom.size


def test_a_huge_input_is_read_only_up_to_the_bound() -> None:
    big = gpu_rom() + b"\xff" * (rom_mod.MAX_ROM_SIZE)
    assert parse_rom(big).size == rom_mod.MAX_ROM_SIZE


# -- sysfs --------------------------------------------------------------------


class KernelRom:
    """The kernel's sysfs ``rom`` file: reads EINVAL until enabled; "0\\n" turns reads off."""

    def __init__(self, data: bytes, *, enabled: bool = False, read_error: int | None = None):
        self.data = data
        self.enabled = enabled
        self.read_error = read_error
        self.writes: list[str] = []

    def read(self, path: str) -> bytes:
        if not self.enabled:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        if self.read_error is not None:
            raise OSError(self.read_error, os.strerror(self.read_error), path)
        return self.data

    def write(self, path: str, text: str) -> None:
        self.writes.append(text)
        # drivers/pci/pci-sysfs.c, pci_write_rom: only "0" and a newline (2 bytes) is off.
        self.enabled = not (text.startswith("0") and len(text) == 2)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    dev = tmp_path / "bus" / "pci" / "devices" / "0000:00:04.0"
    dev.mkdir(parents=True)
    (dev / "rom").write_bytes(b"")
    return tmp_path


def _kernel(monkeypatch: pytest.MonkeyPatch, kernel: KernelRom) -> None:
    monkeypatch.setattr(rom_mod, "_read_all", kernel.read)
    monkeypatch.setattr(rom_mod, "_write_switch", kernel.write)


def test_read_enables_then_disables(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = KernelRom(gpu_rom())
    _kernel(monkeypatch, kernel)
    assert read_sysfs_rom(sysfs, "0000:00:04.0") == gpu_rom()
    assert kernel.writes == ["1", "0\n"]
    assert not kernel.enabled


def test_read_leaves_an_enabled_switch_on(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = KernelRom(gpu_rom(), enabled=True)
    _kernel(monkeypatch, kernel)
    assert read_sysfs_rom(sysfs, "0000:00:04.0") == gpu_rom()
    assert kernel.writes == []
    assert kernel.enabled


def test_a_failed_read_still_disables(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = KernelRom(gpu_rom(), read_error=errno.EIO)
    _kernel(monkeypatch, kernel)
    with pytest.raises(RomUnreadable, match="Input/output error") as info:
        read_sysfs_rom(sysfs, "0000:00:04.0")
    assert isinstance(info.value.__cause__, OSError)
    assert kernel.writes == ["1", "0\n"]
    assert not kernel.enabled


def test_a_failed_disable_is_said(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = KernelRom(gpu_rom())
    _kernel(monkeypatch, kernel)

    def write(path: str, text: str) -> None:
        if text != "1":
            raise OSError(errno.EPERM, "Operation not permitted", path)
        kernel.write(path, text)

    monkeypatch.setattr(rom_mod, "_write_switch", write)
    with pytest.raises(KernelError, match="ROM reads of this function were left on"):
        read_sysfs_rom(sysfs, "0000:00:04.0")


def test_no_rom_file_and_not_root(sysfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RomUnreadable, match="has no ROM BAR"):
        read_sysfs_rom(sysfs, "0000:00:05.0")

    def denied(path: str) -> bytes:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(rom_mod, "_read_all", denied)
    with pytest.raises(RomUnreadable, match="takes root"):
        read_sysfs_rom(sysfs, "0000:00:04.0")


def test_a_real_file_reads_whole(sysfs: Path) -> None:
    (sysfs / "bus/pci/devices/0000:00:04.0/rom").write_bytes(gpu_rom())
    assert read_sysfs_rom(sysfs, "0000:00:04.0") == gpu_rom()


# -- romfile ------------------------------------------------------------------

DISPLAY = PciDevice(PciAddress.parse("0000:00:04.0"), VGA[0], VGA[1], 0x030000)


def test_a_romfile_for_the_device(tmp_path: Path) -> None:
    path = tmp_path / "vbios.rom"
    path.write_bytes(gpu_rom())
    assert check_romfile(path, DISPLAY).uefi == ("x64",)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"#!/bin/sh\n", "no 55 AA signature"),
        (image(vendor=0x10DE, device=0x2204), "image 0 is for 10de:2204, not 1234:1111"),
        (b"", "empty"),
    ],
)
def test_a_romfile_that_is_not_a_rom_for_it(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.rom"
    path.write_bytes(content)
    with pytest.raises(InvalidRom) as info:
        check_romfile(path, DISPLAY)
    assert str(info.value) == f"{path} is not an option ROM for 0000:00:04.0: {info.value.reason}"
    assert reason in info.value.reason


def test_a_romfile_that_is_no_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRom, match="not a regular file"):
        check_romfile(tmp_path, DISPLAY)
    (tmp_path / "vbios.rom").write_bytes(gpu_rom())
    (tmp_path / "link.rom").symlink_to(tmp_path / "vbios.rom")
    assert check_romfile(tmp_path / "link.rom", DISPLAY).valid  # followed, as QEMU does
    with pytest.raises(KernelError) as info:
        check_romfile(tmp_path / "missing.rom", DISPLAY)
    assert info.value.errno == errno.ENOENT


#: iPXE's ROM for QEMU's e1000e as Debian ships it (ipxe-qemu): a real ROM with both image kinds.
IPXE_E1000E = Path("/usr/lib/ipxe/qemu/efi-e1000e.rom")


@pytest.mark.skipif(not IPXE_E1000E.exists(), reason=f"no {IPXE_E1000E} (Debian's ipxe-qemu)")
def test_ipxes_rom_for_e1000e() -> None:
    rom = parse_rom(IPXE_E1000E.read_bytes(), vendor=0x8086, device=0x10D3)
    assert rom.valid, rom.problem
    assert [i.describe() for i in rom.images] == ["x86", "efi x64"]
    assert rom.legacy_bios
    assert rom.uefi == ("x64",)
    nic = PciDevice(PciAddress.parse("0000:00:05.0"), 0x8086, 0x10D3, 0x020000)
    assert check_romfile(IPXE_E1000E, nic) == rom
    with pytest.raises(InvalidRom, match="image 0 is for 8086:10d3, not 1234:1111"):
        check_romfile(IPXE_E1000E, DISPLAY)
