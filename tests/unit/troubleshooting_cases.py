"""The errors docs/troubleshooting.md explains, each built as kvmvfio raises it.

Shared by tests/unit/test_docs.py, which checks that the page quotes each
message exactly as kvmvfio prints it: when a message changes, the page must.
"""

from __future__ import annotations

import errno
from pathlib import Path

from troubleshooting_nogroup import NO_GROUP_CASES

from kvmvfio.errors import (
    Blocker,
    Busy,
    CoherencyRefused,
    DetachTimeout,
    DeviceNotBoundToVfio,
    GroupNotViable,
    Interface,
    KernelUnsupported,
    KvmvfioError,
    MemlockTooLow,
    NoHotplugPort,
    NoInterruptRemapping,
    QemuConfined,
    QemuNoAnswer,
    QemuReplyInvalid,
    SysfsError,
    speaking_to,
)
from kvmvfio.libvirt.metadata import MetadataError
from kvmvfio.prepare import ClaimedBy, UntrustedFile
from kvmvfio.prepare.journal import JournalError
from kvmvfio.prepare.owners import Liveness
from kvmvfio.prepare.safety import UnsafeToUnbind


def build() -> dict[str, KvmvfioError]:
    """Every case, worded for the interface in force (see kvmvfio.errors.speaking_to)."""
    return {
        "not viable": GroupNotViable(
            "14",
            [
                Blocker(
                    "0000:01:00.1",
                    "snd_hda_intel",
                    "bound to snd_hda_intel, a host driver that does DMA; rebind it to vfio-pci",
                )
            ],
        ),
        "not listed": GroupNotViable(
            "9",
            [
                Blocker(
                    "0000:03:00.1",
                    "snd_hda_intel",
                    "on host driver snd_hda_intel, and domain 'vm1' does not list it in its "
                    "kvmvfio metadata; list it to have kvmvfio move it too "
                    "(with handoff='none' if the VM does not use it)",
                )
            ],
        ),
        "busy": Busy(16, "open", "/dev/vfio/14", "IOMMU group 14", "pid 4242 (qemu-system-x86)"),
        "no interrupt remapping": NoInterruptRemapping(
            errno.EPERM, "VFIO_SET_IOMMU", "/dev/vfio/vfio", "the container of IOMMU group 14"
        ),
        "no hotplug port": NoHotplugPort("0000:03:00.0", []),
        "qemu confined": QemuConfined(
            "0000:03:00.0",
            4242,
            "libvirt-6f1c2a3e-8d4b-4e55-9a0e-2b7c1d9e8f10",
            ["/dev/vfio/14"],
            "opening the group node of",
        ),
        "coherency refused": CoherencyRefused("IOMMU group 14", ["0000:03:00.0"]),
        "not on vfio-pci": DeviceNotBoundToVfio("0000:03:00.0", "e1000e"),
        "memlock": MemlockTooLow(
            4242, 8 << 20, (256 << 20) + (1 << 30), "kvmvfio was told not to raise it"
        ),
        "unsafe to unbind": UnsafeToUnbind(
            "0000:00:05.0", "e1000e", "default-route", "carries the default route (eth0)"
        ),
        "disk in use": UnsafeToUnbind(
            "0000:00:14.0",
            "virtio-pci",
            "disk-in-use",
            "has disks in use: vdb is used by dm-0 (LVM vg0-data), which is mounted on /mnt/data",
        ),
        "claimed": ClaimedBy(14, "vm1", 4242, Liveness(False, "process 4242 has exited")),
        "detach timeout": DetachTimeout("0000:03:00.0", "kvmvfio-0000-03-00-0", 30),
        "QEMU does not answer": QemuNoAnswer("device_add", 4242, 120),
        "QEMU's reply does not fit": QemuReplyInvalid(
            "qom-list", "entry 3's 'name' is a list, not a string", 4242
        ),
        **NO_GROUP_CASES,
        "no cdev": KernelUnsupported(
            "the cdev path", "the kernel has no /dev/iommu (CONFIG_IOMMUFD); use --path group"
        ),
        "bad metadata": MetadataError(
            "vm1",
            "<kvmvfio:device> has an unknown attribute 'coherncy' (known: address, handoff, "
            "path, coherency, reset, accept)",
        ),
        "journal record refused": JournalError(
            Path("/run/kvmvfio/journal/group-3.json"),
            "devices[1] 0000:00:04.0 is in IOMMU group 4 on this host, not 3",
        ),
        "journal folder is a link": UntrustedFile(
            Path("/run/kvmvfio/journal"),
            "is a symbolic link",
            "a folder owned by uid 0 with mode 0700",
        ),
        "journal file mode": UntrustedFile(
            Path("/run/kvmvfio/journal/group-3.json"),
            "has mode 0644",
            "a regular file owned by uid 0 with mode 0600",
            "chmod 600 /run/kvmvfio/journal/group-3.json",
        ),
        "lock file is a FIFO": UntrustedFile(
            Path("/run/kvmvfio/locks/group-3.lock"),
            "is a FIFO",
            "a regular file owned by uid 0 with mode 0600",
        ),
        "driver_override not a driver name": SysfsError(
            "/sys/bus/pci/devices/0000:03:00.0/driver_override",
            "'vfio pci' is not a driver name (it holds whitespace)",
        ),
    }


# The page quotes what the kvmvfio command prints.
with speaking_to(Interface.CLI):
    CASES = build()
