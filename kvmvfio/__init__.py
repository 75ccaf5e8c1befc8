"""kvmvfio: hand PCI devices to QEMU/KVM virtual machines through Linux VFIO.

Layers, each importing only from those before it:

``kvmvfio.uapi``
    kernel structs and ioctl numbers (cffi), and the one ioctl helper.
``kvmvfio.host``
    the host as sysfs and /dev show it: PCI devices, IOMMU groups,
    viability, what the kernel supports. Pure reads.
``kvmvfio.lab``
    the nested vIOMMU lab in which every kernel-facing claim is tested.
``kvmvfio.cli``
    the ``kvmvfio`` command.
"""

__version__ = "0.1.0"
