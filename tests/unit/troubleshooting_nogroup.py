"""The "no IOMMU group" messages docs/troubleshooting.md quotes, one per reason.

Each is built by the host model from the facts of a host (its IOMMU units,
command line, firmware tables, CPU vendor), as ``Host.group_of`` raises it.
Part of ``troubleshooting_cases.CASES``.
"""

from __future__ import annotations

from kvmvfio.errors import KvmvfioError, NoIommuGroup
from kvmvfio.host import HostIommu, IommuKind, IommuUnit, PciAddress, PciDevice

_VIRTIO = HostIommu(
    units=(IommuUnit("0000:00:02.0", IommuKind.VIRTIO, PciAddress.parse("0000:00:02.0")),),
    groups_supported=True,
    firmware_tables=("VIOT",),
    cpu_vendor="AuthenticAMD",
)
_VT_D = HostIommu(
    units=(IommuUnit("dmar0", IommuKind.INTEL_VTD), IommuUnit("dmar1", IommuKind.INTEL_VTD)),
    groups_supported=True,
    kernel_args=("intel_iommu=on",),
    firmware_tables=("DMAR",),
    cpu_vendor="GenuineIntel",
)


def _none(**facts: object) -> HostIommu:
    base: dict[str, object] = {
        "units": (),
        "groups_supported": True,
        "kernel_args": (),
        "firmware_tables": (),
        "cpu_vendor": "GenuineIntel",
    }
    return HostIommu(**{**base, **facts})  # type: ignore[arg-type]


def _case(
    iommu: HostIommu, addr: str = "0000:03:00.0", driver: str | None = "e1000e", cls: int = 0x020000
) -> NoIommuGroup:
    dev = PciDevice(PciAddress.parse(addr), 0x8086, 0x10D3, cls, driver=driver)
    return NoIommuGroup(addr, iommu.no_group(dev))


NO_GROUP_CASES: dict[str, KvmvfioError] = {
    "no group: not probed": _case(_VIRTIO, "0000:00:03.0", None),
    "no group: the IOMMU itself": _case(_VIRTIO, "0000:00:02.0", "virtio-pci"),
    "no group: not covered": _case(_VT_D, "0000:00:1f.0", "lpc_ich"),
    "no group: igfx_off": _case(
        _none(units=_VT_D.units, kernel_args=("intel_iommu=on,igfx_off",)),
        "0000:00:02.0",
        "i915",
        0x030000,
    ),
    "no group: off": _case(_none(kernel_args=("intel_iommu=off",), firmware_tables=("DMAR",))),
    "no group: amd off": _case(
        _none(kernel_args=("amd_iommu=off",), firmware_tables=("IVRS",), cpu_vendor="AuthenticAMD")
    ),
    "no group: not used": _case(_none(firmware_tables=("DMAR",))),
    "no group: none (Intel)": _case(_none()),
    "no group: none (AMD)": _case(_none(cpu_vendor="AuthenticAMD")),
    "no group: kernel without": _case(_none(groups_supported=False)),
}
