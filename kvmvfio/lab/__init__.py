"""The nested vIOMMU lab, where every kernel-facing claim of kvmvfio is tested.

The host this runs on may have no VFIO and no IOMMU. The lab boots an L1
guest under QEMU TCG with an emulated IOMMU (intel-iommu or virtio-iommu) and
emulated PCI devices (QEMU's ``edu``, an ``e1000e``, a PCIe-to-PCI bridge):
inside it the kernel has real VFIO (group, container and device cdev), real
iommufd and real KVM (nested), and Debian trixie's QEMU and libvirt.

- :mod:`kvmvfio.lab.topology`: which vIOMMU and devices L1 has (TOML files).
- :mod:`kvmvfio.lab.images`: the L1 kernel and root filesystem, built from
  ``vm-images/`` and cached by recipe hash.
- :mod:`kvmvfio.lab.runner`: boot L1, run one command, stream its output,
  return its exit status, always stop the VM.
- :mod:`kvmvfio.lab.tier`: the end-to-end test tier (pytest inside L1, one
  boot per topology).
- :mod:`kvmvfio.lab.demo`: the story a user cares about, told inside L1.
"""
