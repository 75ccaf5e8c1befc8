"""The ``gpu`` lab topology: a display and an audio function in one slot, as QEMU needs them.

QEMU realizes function 1 of a slot only when function 0 says multifunction,
and the lab kernel must have the host drivers the lab tests expect bound
(bochs-drm, snd_hda_intel). These checks say so on the host, in a second.
"""

from __future__ import annotations

from pathlib import Path

from kvmvfio.lab import topology as topo_mod

FRAGMENT = Path(__file__).parents[2] / "vm-images" / "kernel" / "fragment.config"


def test_the_gpu_topology() -> None:
    topo = topo_mod.load("gpu")
    assert topo.viommu == "intel-iommu"  # interrupt remapping, as VFIO needs
    assert topo.guest_address("edu0") == "0000:00:03.0"  # the tests every topology runs
    assert topo.guest_address("gpu0") == "0000:00:04.0"
    assert topo.guest_address("gpu0audio") == "0000:00:04.1"
    by_id = {d.id: d for d in topo.devices}
    display, audio = by_id["gpu0"], by_id["gpu0audio"]
    # std VGA: 1234:1111 with SeaBIOS's vgabios as its option ROM; intel-hda: 8086:2668.
    assert (display.driver, audio.driver) == ("VGA", "intel-hda")
    assert dict(display.props)["multifunction"] == "on"
    assert display.qemu_arg() == "VGA,id=gpu0,addr=0x04.0,multifunction=on"
    assert audio.qemu_arg() == "intel-hda,id=gpu0audio,addr=0x04.1"
    # Only what the tests need: one L1 boot in CI costs minutes.
    assert [d.driver for d in topo.devices] == ["edu", "VGA", "intel-hda"]
    assert not topo.disks


def test_the_lab_kernel_has_the_gpus_host_drivers() -> None:
    options = {
        line.split("=")[0]: line.split("=")[1]
        for line in FRAGMENT.read_text().splitlines()
        if line and not line.startswith("#")
    }
    for option in ("CONFIG_DRM", "CONFIG_DRM_BOCHS", "CONFIG_SND", "CONFIG_SND_HDA_INTEL"):
        assert options[option] == "y", option
    # defconfig's big DRM drivers stay out of the lab kernel.
    assert options["CONFIG_DRM_I915"] == "n"
