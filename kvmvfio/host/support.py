"""What this host's kernel offers for device assignment, from /dev and sysfs.

There are three ways to give a VM a device through VFIO, and each needs
its own files:

- the *group + container* path (legacy type1 IOMMU): ``/dev/vfio/vfio``
  (``CONFIG_VFIO_CONTAINER``) and the group files ``/dev/vfio/N``;
- the *group on iommufd* path: the group files and ``/dev/iommu``
  (``CONFIG_IOMMUFD``);
- the *device cdev* path: ``/dev/iommu`` and one file per device,
  ``/dev/vfio/devices/vfioN`` (``CONFIG_VFIO_DEVICE_CDEV``).

and all of them need ``/dev/kvm``, the vfio-pci driver, and an IOMMU the
kernel uses (``/sys/class/iommu`` lists one entry per IOMMU unit).

Device cdevs show only once a device is bound to a VFIO driver: before
that, nothing in /dev or /sys tells a kernel without them from one with
them and no device bound yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from kvmvfio.host.iommu import HostIommu


def _any_cdev(sysfs: Path) -> bool:
    """True when some VFIO device in ``/sys/class/vfio-dev`` has a device number."""
    try:
        names = os.listdir(sysfs / "class" / "vfio-dev")
    except OSError:
        return False
    return any(os.path.exists(sysfs / "class" / "vfio-dev" / n / "dev") for n in names)


def _nonempty_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class HostSupport:
    """Which VFIO, iommufd and KVM files this host has."""

    #: ``/dev/vfio/vfio``: the legacy container.
    vfio_container: bool
    #: ``/dev/iommu``: iommufd.
    iommufd: bool
    #: ``/dev/vfio/devices`` exists, or a bound device has a cdev number.
    device_cdev: bool
    #: ``/dev/kvm``.
    kvm: bool
    #: ``/sys/bus/pci/drivers/vfio-pci``: the vfio-pci module is loaded.
    vfio_pci_driver: bool
    #: ``/sys/class/iommu`` lists at least one IOMMU.
    iommu: bool

    @classmethod
    def probe(cls, sysfs: str | Path = "/sys", devfs: str | Path = "/dev") -> HostSupport:
        """Look at the files under ``sysfs`` and ``devfs``; change nothing."""
        sys_, dev = Path(sysfs), Path(devfs)
        return cls(
            vfio_container=os.path.exists(dev / "vfio" / "vfio"),
            iommufd=os.path.exists(dev / "iommu"),
            device_cdev=os.path.isdir(dev / "vfio" / "devices") or _any_cdev(sys_),
            kvm=os.path.exists(dev / "kvm"),
            vfio_pci_driver=os.path.isdir(sys_ / "bus" / "pci" / "drivers" / "vfio-pci"),
            iommu=_nonempty_dir(sys_ / "class" / "iommu"),
        )

    def as_dict(self) -> dict[str, bool]:
        """The fields by name (the ``host`` object of the CLI's JSON)."""
        return {f.name: bool(getattr(self, f.name)) for f in fields(self)}

    @property
    def usable(self) -> bool:
        """True when at least one path can hand a device to a VM."""
        return (
            self.kvm
            and self.iommu
            and self.vfio_pci_driver
            and (self.vfio_container or self.iommufd)
        )

    def missing(self, iommu: HostIommu | None = None) -> tuple[str, ...]:
        """What is absent, one phrase each, with the way to get it.

        ``iommu``, the host's IOMMU facts, makes the IOMMU's phrase say why
        there is none on this host (:meth:`HostIommu.absence`).
        """
        out = []
        if not self.iommu:
            absence = None if iommu is None else iommu.absence()
            out.append(
                "no IOMMU in use (`kvmvfio inventory` says why)"
                if absence is None
                else f"no IOMMU in use, because {absence[1]}"
            )
        if not self.vfio_pci_driver:
            out.append("no vfio-pci driver (modprobe vfio-pci)")
        if not self.vfio_container:
            out.append("no /dev/vfio/vfio, so no legacy container path (CONFIG_VFIO_CONTAINER)")
        if not self.iommufd:
            out.append("no /dev/iommu, so no iommufd (CONFIG_IOMMUFD; modprobe iommufd)")
        if not self.device_cdev:
            out.append(
                "no VFIO device cdevs yet (they appear when a device is bound to vfio-pci, "
                "if the kernel has CONFIG_VFIO_DEVICE_CDEV)"
            )
        if not self.kvm:
            out.append("no /dev/kvm (modprobe kvm_intel or kvm_amd)")
        return tuple(out)

    def explain(self, iommu: HostIommu | None = None) -> str:
        """One sentence on what this host can do and what it lacks.

        ``iommu``: as for :meth:`missing`.
        """
        paths = []
        if self.vfio_container:
            paths.append("group + container")
        if self.iommufd:
            paths.append("group on iommufd")
        if self.iommufd and self.device_cdev:
            paths.append("device cdev")
        missing = self.missing(iommu)
        if self.usable:
            text = f"Host can assign devices via: {', '.join(paths)}."
        else:
            text = "Host cannot assign devices to VMs."
        if missing:
            text += " Missing: " + "; ".join(missing) + "."
        return text
