"""Functions in no IOMMU group: which IOMMU the host has, and why a function has no group."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fakesysfs import Dev, Iommu, Topology
from hypothesis import given
from hypothesis import strategies as st

from kvmvfio.errors import NoIommuGroup
from kvmvfio.host import (
    Host,
    HostIommu,
    IommuKind,
    IommuUnit,
    NoGroupCause,
    PciAddress,
)
from kvmvfio.host.iommu import off_setting, parse_cmdline, parse_cpu_vendor

BuildHost = Callable[[Topology], Host]

EDU = {"vendor": 0x1234, "device": 0x11E8, "cls": 0x00FF00}
#: The lab's virtio-iommu topology as L1 shows it: the virtio-iommu-pci
#: function at 00:02.0 (on virtio-pci), edu devices without a driver, an
#: e1000e on its driver.
VIRTIO_IOMMU = Topology(
    devices=[
        Dev("0000:00:02.0", vendor=0x1AF4, device=0x1057, cls=0x00FF00, driver="virtio-pci"),
        Dev("0000:00:03.0", **EDU),
        Dev("0000:00:05.0", driver="e1000e", group=1),
    ],
    iommus=[Iommu.virtio_pci("0000:00:02.0")],
    acpi_tables=["APIC", "FACP", "VIOT"],
    cpu_vendor="AuthenticAMD",
)


def _why(host: Host, addr: str) -> tuple[NoGroupCause, str]:
    why = host.no_group(addr)
    assert why is not None
    return why.cause, why.reason


def test_a_function_in_a_group_has_no_reason(build_host: BuildHost) -> None:
    host = build_host(VIRTIO_IOMMU)
    assert host.no_group("0000:00:05.0") is None


def test_virtio_iommu_units_and_their_function(build_host: BuildHost) -> None:
    iommu = build_host(VIRTIO_IOMMU).iommu()
    assert iommu.units == (
        IommuUnit("0000:00:02.0", IommuKind.VIRTIO, PciAddress.parse("0000:00:02.0")),
    )
    assert iommu.in_use
    assert iommu.firmware_tables == ("VIOT",)
    assert iommu.cpu_vendor == "AuthenticAMD"
    assert iommu.absence() is None


def test_the_virtio_iommu_function_is_the_iommu_itself(build_host: BuildHost) -> None:
    why = build_host(VIRTIO_IOMMU).no_group("0000:00:02.0")
    assert why is not None
    assert (why.cause, why.iommu, why.units) == (
        NoGroupCause.IS_IOMMU,
        IommuKind.VIRTIO,
        ("0000:00:02.0",),
    )
    assert not why.bind_gives_group
    assert why.reason == (
        "it is the IOMMU itself (virtio-iommu), which does not translate its own DMA: "
        "it cannot be given to a VM"
    )


def test_a_function_without_driver_waits_for_one_under_virtio_iommu(build_host: BuildHost) -> None:
    why = build_host(VIRTIO_IOMMU).no_group("0000:00:03.0")
    assert why is not None
    assert why.cause is NoGroupCause.NOT_PROBED
    assert why.bind_gives_group
    assert why.reason == (
        "it has no driver, and virtio-iommu (0000:00:02.0) takes a device only when a driver binds "
        "it: bind it to vfio-pci (driver_override, then drivers_probe) and it gets its group"
    )


def test_a_function_on_a_driver_still_without_group_is_not_covered(build_host: BuildHost) -> None:
    topo = Topology(
        devices=[*VIRTIO_IOMMU.devices, Dev("0000:00:06.0", driver="e1000e")],
        iommus=VIRTIO_IOMMU.iommus,
    )
    assert _why(build_host(topo), "0000:00:06.0") == (
        NoGroupCause.NOT_COVERED,
        "virtio-iommu (0000:00:02.0) does not translate it: it is outside the endpoint ranges of "
        "the ACPI VIOT table, so it cannot be given to a VM on this host (another slot, or a "
        "firmware update, may change that)",
    )


def test_vt_d_takes_every_device_at_boot_so_no_group_is_not_covered(
    build_host: BuildHost,
) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", group=3), Dev("0000:00:1f.0")],
            iommus=[Iommu("dmar0"), Iommu("dmar1")],
        )
    )
    why = host.no_group("0000:00:1f.0")
    assert why is not None
    assert (why.cause, why.iommu, why.units) == (
        NoGroupCause.NOT_COVERED,
        IommuKind.INTEL_VTD,
        ("dmar0", "dmar1"),
    )
    assert why.reason.startswith(
        "Intel VT-d (dmar0, dmar1) does not translate it: it is outside the device scopes of "
        "the ACPI DMAR table"
    )


def test_many_units_are_abbreviated(build_host: BuildHost) -> None:
    host = build_host(
        Topology(devices=[Dev("0000:00:1f.0")], iommus=[Iommu(f"dmar{i}") for i in range(8)])
    )
    assert "Intel VT-d (dmar0, dmar1 and 6 more)" in _why(host, "0000:00:1f.0")[1]


def test_igfx_off_keeps_the_integrated_gpu_out(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:02.0", cls=0x030000, driver="i915")],
            cmdline="root=/dev/sda1 intel_iommu=on,igfx_off",
        )
    )
    why = host.no_group("0000:00:02.0")
    assert why is not None
    assert (why.cause, why.setting) == (NoGroupCause.NOT_COVERED, "intel_iommu=on,igfx_off")
    assert why.reason == (
        "the kernel command line keeps integrated graphics out of Intel VT-d "
        "(intel_iommu=on,igfx_off): remove igfx_off and reboot"
    )


# -- no IOMMU in use --------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "tables", "vendor", "setting", "reason"),
    [
        # The lab: an intel-iommu under an AMD CPU (TCG's max), told off at the end.
        (
            "console=ttyS0 intel_iommu=on intel_iommu=off",
            ["DMAR"],
            "AuthenticAMD",
            "intel_iommu=off",
            "the kernel command line turns Intel VT-d off (intel_iommu=off): remove "
            "intel_iommu=off and reboot",
        ),
        (
            "quiet amd_iommu=off",
            ["IVRS"],
            "AuthenticAMD",
            "amd_iommu=off",
            "the kernel command line turns AMD-Vi off (amd_iommu=off): remove amd_iommu=off "
            "and reboot",
        ),
        (
            "iommu=pt,off",
            [],
            "GenuineIntel",
            "iommu=pt,off",
            "the kernel command line turns every IOMMU off (iommu=pt,off): remove iommu=pt,off "
            "and reboot",
        ),
        # No firmware table, no CPU vendor: whichever is off.
        (
            "amd_iommu=off",
            None,
            None,
            "amd_iommu=off",
            "the kernel command line turns AMD-Vi off (amd_iommu=off): remove amd_iommu=off "
            "and reboot",
        ),
    ],
)
def test_the_iommu_turned_off_on_the_command_line(
    build_host: BuildHost,
    cmdline: str,
    tables: list[str] | None,
    vendor: str | None,
    setting: str,
    reason: str,
) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0")],
            iommu=False,
            cmdline=cmdline,
            acpi_tables=tables,
            cpu_vendor=vendor,
        )
    )
    why = host.no_group("0000:00:03.0")
    assert why is not None
    assert (why.cause, why.setting, why.units) == (NoGroupCause.IOMMU_OFF, setting, ())
    assert why.reason == reason
    assert host.iommu().off_by == setting


@pytest.mark.parametrize(
    ("cmdline", "tables", "vendor", "kind", "reason"),
    [
        # A later "on" undoes "off"; VT-d is still not in use: the kernel's own choice.
        (
            "intel_iommu=off intel_iommu=on",
            ["DMAR"],
            "GenuineIntel",
            IommuKind.INTEL_VTD,
            "the firmware describes Intel VT-d (ACPI DMAR table) but the kernel does not use "
            "it: boot with intel_iommu=on, on a kernel built with CONFIG_INTEL_IOMMU "
            "(`dmesg | grep DMAR` says more)",
        ),
        (
            "",
            ["IVRS"],
            "AuthenticAMD",
            IommuKind.AMD_VI,
            "the firmware describes AMD-Vi (ACPI IVRS table) but the kernel does not use it: "
            "it needs a kernel built with CONFIG_AMD_IOMMU (`dmesg | grep AMD-Vi` says more)",
        ),
        (
            "",
            ["VIOT"],
            "AuthenticAMD",
            IommuKind.VIRTIO,
            "the firmware describes virtio-iommu (ACPI VIOT table) but the kernel does not use "
            "it: it needs a kernel with the virtio_iommu driver (CONFIG_VIRTIO_IOMMU)",
        ),
        # The firmware table wins over the CPU vendor.
        (
            "amd_iommu=off",
            ["DMAR"],
            "AuthenticAMD",
            IommuKind.INTEL_VTD,
            "the firmware describes Intel VT-d (ACPI DMAR table) but the kernel does not use "
            "it: boot with intel_iommu=on, on a kernel built with CONFIG_INTEL_IOMMU "
            "(`dmesg | grep DMAR` says more)",
        ),
        (
            "",
            ["APIC"],
            "GenuineIntel",
            IommuKind.INTEL_VTD,
            "the firmware describes no IOMMU (no ACPI DMAR table): enable VT-d in the firmware "
            "setup, then boot with intel_iommu=on",
        ),
        (
            "",
            ["APIC"],
            "HygonGenuine",
            IommuKind.AMD_VI,
            "the firmware describes no IOMMU (no ACPI IVRS table): enable the IOMMU (AMD-Vi) "
            "in the firmware setup",
        ),
        (
            "",
            None,
            None,
            None,
            "the kernel found no IOMMU: enable the platform's IOMMU in the firmware setup, "
            "if it has one",
        ),
        (
            "",
            None,
            "GenuineIntel",
            IommuKind.INTEL_VTD,
            "the kernel found no IOMMU: enable VT-d in the firmware setup, then boot with "
            "intel_iommu=on",
        ),
    ],
)
def test_no_iommu_in_use(
    build_host: BuildHost,
    cmdline: str,
    tables: list[str] | None,
    vendor: str | None,
    kind: IommuKind | None,
    reason: str,
) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="e1000e")],
            iommu=False,
            cmdline=cmdline,
            acpi_tables=tables,
            cpu_vendor=vendor,
        )
    )
    why = host.no_group("0000:00:03.0")
    assert why is not None
    assert (why.cause, why.iommu, why.setting) == (NoGroupCause.NO_IOMMU, kind, None)
    assert why.reason == reason


@pytest.mark.parametrize(
    ("vendor", "driver"),
    [
        ("GenuineIntel", "CONFIG_INTEL_IOMMU"),
        ("AuthenticAMD", "CONFIG_AMD_IOMMU"),
        (None, "its driver"),
    ],
)
def test_a_kernel_without_iommu_support(
    build_host: BuildHost, vendor: str | None, driver: str
) -> None:
    host = build_host(
        Topology(devices=[Dev("0000:00:03.0")], iommu=False, groups_dir=False, cpu_vendor=vendor)
    )
    assert _why(host, "0000:00:03.0") == (
        NoGroupCause.KERNEL_WITHOUT_IOMMU,
        "this kernel has no IOMMU support (no /sys/kernel/iommu_groups): boot one built with "
        f"CONFIG_IOMMU_SUPPORT and {driver}",
    )


# -- where it shows: the error, the support sentence, the inventory ----------


def test_group_of_raises_the_reason(build_host: BuildHost) -> None:
    host = build_host(VIRTIO_IOMMU)
    with pytest.raises(NoIommuGroup) as info:
        host.group_of("00:03.0")
    err = info.value
    assert err.address == "0000:00:03.0"
    assert err.why is not None
    assert err.why.cause is NoGroupCause.NOT_PROBED
    assert str(err) == f"PCI device 0000:00:03.0 is in no IOMMU group: {err.why.reason}"


def test_the_error_without_a_reason() -> None:
    err = NoIommuGroup("0000:03:00.0")
    assert err.why is None
    assert str(err) == (
        "PCI device 0000:03:00.0 is in no IOMMU group: the host's IOMMU does not translate it"
    )


def test_the_support_sentence_says_why_there_is_no_iommu(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:03.0", driver="vfio-pci")],
            iommu=False,
            cmdline="intel_iommu=off",
            acpi_tables=["DMAR"],
        )
    )
    support, iommu = host.support(), host.iommu()
    assert support.missing(iommu)[0] == (
        "no IOMMU in use, because the kernel command line turns Intel VT-d off "
        "(intel_iommu=off): remove intel_iommu=off and reboot"
    )
    assert support.missing()[0] == "no IOMMU in use (`kvmvfio inventory` says why)"
    assert "Missing: no IOMMU in use, because the kernel command line" in support.explain(iommu)


def test_inventory_carries_the_iommus_and_the_reasons(build_host: BuildHost) -> None:
    inv = build_host(VIRTIO_IOMMU).inventory()
    assert inv.iommu.units[0].name == "0000:00:02.0"
    causes = {str(d.address): getattr(inv.no_group(d), "cause", None) for d in inv.devices}
    assert causes == {
        "0000:00:02.0": NoGroupCause.IS_IOMMU,
        "0000:00:03.0": NoGroupCause.NOT_PROBED,
        "0000:00:05.0": None,
    }


# -- the parts, one by one ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("dmar0", IommuKind.INTEL_VTD),
        ("dmar12", IommuKind.INTEL_VTD),
        ("ivhd0", IommuKind.AMD_VI),
        ("virtio3", IommuKind.OTHER),
        ("smmu3.0x0000000009050000", IommuKind.ARM_SMMU_V3),
        ("smmu.0x0000000009050000", IommuKind.ARM_SMMU),
        ("apple-dart.3", IommuKind.OTHER),
        ("dmar", IommuKind.OTHER),
    ],
)
def test_unit_kinds_by_name(name: str, kind: IommuKind) -> None:
    assert IommuKind.of_unit(name) is kind


def test_a_virtio_iommu_is_known_by_its_driver() -> None:
    # Named after its transport (virtio_bus_name): the lab's is 0000:00:02.0.
    assert IommuKind.of_unit("0000:00:02.0", "virtio_iommu") is IommuKind.VIRTIO
    assert IommuKind.of_unit("0000:00:02.0", "virtio-pci") is IommuKind.OTHER
    assert IommuKind.of_unit("arm-smmu-v3.0.auto", "arm-smmu-v3") is IommuKind.ARM_SMMU_V3


def test_only_vt_d_and_amd_vi_probe_every_device_at_boot() -> None:
    assert {k for k in IommuKind if not k.probes_at_bind} == {
        IommuKind.INTEL_VTD,
        IommuKind.AMD_VI,
    }


def test_smmu_units_wait_for_a_driver_too(build_host: BuildHost) -> None:
    host = build_host(
        Topology(
            devices=[Dev("0000:00:01.0")],
            iommus=[Iommu("smmu3.0x0000000009050000")],
            cpu_vendor=None,
        )
    )
    assert _why(host, "0000:00:01.0")[0] is NoGroupCause.NOT_PROBED


def test_the_unit_of_a_pci_function_without_pci_in_its_name(build_host: BuildHost) -> None:
    # An AMD IOMMU is a PCI function too (00:00.2), named ivhdN.
    host = build_host(
        Topology(
            devices=[Dev("0000:00:00.2", cls=0x080600)], iommus=[Iommu("ivhd0", "0000:00:00.2")]
        )
    )
    assert _why(host, "0000:00:00.2")[0] is NoGroupCause.IS_IOMMU


def test_cmdline_keeps_the_iommu_settings_in_order() -> None:
    raw = (
        b"BOOT_IMAGE=/vmlinuz root=UUID=1 ro intel_iommu=on iommu=pt console=ttyS0 "
        b'quiet intremap=on foo="intel_iommu=off" amd_iommu=off,fullflush iommu.strict=1\n'
    )
    assert parse_cmdline(raw) == (
        "intel_iommu=on",
        "iommu=pt",
        "intremap=on",
        "amd_iommu=off,fullflush",
        "iommu.strict=1",
    )


@pytest.mark.parametrize(
    ("args", "expected", "off"),
    [
        (("intel_iommu=on",), IommuKind.INTEL_VTD, None),
        (("intel_iommu=off",), IommuKind.INTEL_VTD, "intel_iommu=off"),
        (("intel_iommu=on", "intel_iommu=off"), IommuKind.INTEL_VTD, "intel_iommu=off"),
        (("intel_iommu=off,sm_on",), IommuKind.INTEL_VTD, "intel_iommu=off,sm_on"),
        (("intel_iommu=off", "intel_iommu=sm_on,on"), IommuKind.INTEL_VTD, None),
        (("intel_iommu=off",), IommuKind.AMD_VI, None),
        (("amd_iommu=fullflush,off",), IommuKind.AMD_VI, "amd_iommu=fullflush,off"),
        (("amd_iommu=off",), IommuKind.INTEL_VTD, None),
        (("iommu=pt",), IommuKind.INTEL_VTD, None),
        (("iommu=off",), IommuKind.VIRTIO, "iommu=off"),
        (("intel_iommu=off",), None, "intel_iommu=off"),
        (("intel_iommu=igfx_off",), IommuKind.INTEL_VTD, None),
    ],
)
def test_which_setting_turns_the_iommu_off(
    args: tuple[str, ...], expected: IommuKind | None, off: str | None
) -> None:
    assert off_setting(args, expected) == off


def test_cpu_vendor() -> None:
    raw = b"processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
    assert parse_cpu_vendor(raw) == "GenuineIntel"
    assert parse_cpu_vendor(b"processor\t: 0\nCPU implementer\t: 0x41\n") is None
    assert parse_cpu_vendor(b"") is None


def test_a_host_with_nothing_to_read(tmp_path: object) -> None:
    iommu = HostIommu.probe(str(tmp_path), str(tmp_path))
    assert iommu == HostIommu((), False, (), None, None)
    assert iommu.absence() is not None


@given(st.binary(max_size=600))
def test_cmdline_parser_takes_any_bytes(raw: bytes) -> None:
    args = parse_cmdline(raw)
    words = raw.decode("utf-8", "replace").split()
    assert all(a in words and a.isprintable() and "=" in a for a in args)
    off_setting(args, None)
    parse_cpu_vendor(raw)


@given(st.lists(st.sampled_from(["on", "off", "pt", "igfx_off", "sm_on", "offx", ""]), max_size=4))
def test_intel_iommu_follows_the_last_on_or_off(opts: list[str]) -> None:
    arg = "intel_iommu=" + ",".join(opts)
    last = [o for o in opts if o.startswith(("on", "off"))][-1:]
    off = bool(last) and last[0].startswith("off")
    assert (off_setting((arg,), IommuKind.INTEL_VTD) == arg) is off
