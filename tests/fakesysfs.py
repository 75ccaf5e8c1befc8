"""Fake sysfs and /dev trees, built from a declarative topology.

The tree is laid out as Linux lays out the real one, symlinks included::

    sys/devices/pci0000:00/0000:00:01.0/                a bridge (root port)
    sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/   a function behind it
        vendor device class subsystem_* driver_override numa_node reset_method
        driver -> ../../../../bus/pci/drivers/<name>
        iommu_group -> ../../../../kernel/iommu_groups/<N>
        sriov_totalvfs sriov_numvfs virtfn<i> -> ../<vf>    (physical function)
        physfn -> ../<pf>                                   (virtual function)
        vfio-dev/vfio<k>/dev                                (bound to a VFIO driver)
    sys/bus/pci/devices/<addr> -> ../../../devices/...
    sys/bus/pci/drivers/<name>/<addr> -> ../../../../devices/...
    sys/kernel/iommu_groups/<N>/devices/<addr> -> ../../../../devices/...
    sys/kernel/iommu_groups/<N>/name                    ("vfio-noiommu", no-IOMMU only)
    sys/class/iommu/dmar0 -> ../../devices/virtual/iommu/dmar0
    sys/class/iommu/0000:00:02.0 -> ../../devices/pci0000:00/0000:00:02.0/virtio0/iommu/0000:00:02.0
        device -> ../../../virtio0, virtio0/driver -> bus/virtio/drivers/virtio_iommu
    sys/class/vfio-dev/vfio<k> -> ...
    sys/firmware/acpi/tables/DMAR ...                   (``Topology.acpi_tables``)
    dev/vfio/vfio dev/iommu dev/kvm dev/vfio/<N> dev/vfio/devices/vfio<k>
    proc/cmdline proc/cpuinfo                           (beside sys/ and dev/)

Block devices (``Dev.disks``, ``Topology.stacked``, ``Topology.nvme_subsystems``)::

    <function>/<disk_folder>/<disk>/                  a disk (virtio0/block/vdb, nvme/nvme0/...)
        dev uevent size subsystem -> sys/class/block holders/<h> -> <h's folder> slaves/
        <disk>/<part>/ dev partition uevent subsystem holders/
    sys/devices/virtual/block/<name>/                 dm-N (dm/name, dm/uuid), mdN (md/level)
    sys/devices/virtual/nvme-subsystem/<name>/<disk>/ NVMe multipath namespaces, and
        <controller> -> <function>/nvme/<controller>  links to the subsystem's controllers
    sys/class/block/<name>, sys/block/<disk>, sys/class/nvme-subsystem/<name>: links
    dev/<name>                                        (a plain file, like every node here)

Mediated devices (``Topology.mdev_parents``, ``Topology.mdevs``)::

    sys/devices/virtual/<name>/<name>/                a virtual parent (mtty, mdpy), or a
        mdev_supported_types/<type>/                  PCI function's folder (``Parent.function``)
            name description device_api available_instances create devices/<uuid> -> mdev
        <uuid>/                                       an mdev: uevent remove
            subsystem -> sys/bus/mdev  mdev_type -> ../mdev_supported_types/<type>
            driver -> sys/bus/mdev/drivers/<d>  iommu_group -> kernel/iommu_groups/<N>
            vfio-dev/vfio<k>/dev                      (with a group: VFIO has it)
    sys/class/mdev_bus/<name> -> the parent
    sys/bus/mdev/devices/<uuid> -> the mdev
    sys/kernel/iommu_groups/<N>/devices/<uuid> -> the mdev  (its own, emulated group,
    sys/kernel/iommu_groups/<N>/name                           named "vfio-noiommu" by VFIO)

:func:`build_proc` writes the /proc files the safety checks read
(``self/mountinfo``, ``swaps``, ``net/route``).

Device nodes are plain files: the host model only checks that they exist.
VFs sit next to their PF (the kernel puts them under the PF's parent), at
routing ID ``PF + vf_offset + i * vf_stride`` as SR-IOV places them.

Example::

    sysfs, devfs = Topology(devices=[
        Dev("0000:00:01.0", bridge=True, driver="pcieport", group=1, children=[
            Dev("0000:01:00.0", driver="e1000e", group=1),
        ]),
        Dev("0000:00:03.0", vendor=0x1234, device=0x11E8, cls=0x00FF00,
            driver="vfio-pci", group=3),
        Dev("0000:02:00.0", vfs=4, vf_group=10, vf_driver="vfio-pci", group=9),
    ]).build(tmp_path)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmvfio.host import PciAddress, is_vfio_driver

#: Files and directories a real PCI function has that the host model does
#: not read; they make directory listings as long as the kernel's.
_FILLER_FILES = (
    "ari_enabled",
    "broken_parity_status",
    "config",
    "consistent_dma_mask_bits",
    "current_link_speed",
    "current_link_width",
    "d3cold_allowed",
    "dma_mask_bits",
    "enable",
    "irq",
    "local_cpulist",
    "local_cpus",
    "max_link_speed",
    "max_link_width",
    "modalias",
    "msi_bus",
    "power_state",
    "remove",
    "rescan",
    "resource",
    "resource0",
    "revision",
    "uevent",
)
_FILLER_DIRS = ("power", "msi_irqs", "link")


@dataclass
class Dev:
    """One PCI function; a bridge lists the functions behind it as ``children``."""

    address: str
    vendor: int = 0x8086
    device: int = 0x10D3
    #: 24-bit class code; default Ethernet, or PCI bridge with ``bridge=True``.
    cls: int | None = None
    subsystem_vendor: int | None = None
    subsystem_device: int = 0x0000
    driver: str | None = None
    driver_override: str | None = None
    group: int | None = None
    numa_node: int = -1
    #: Written to ``reset_method``; empty: no such file (cannot be reset).
    reset_methods: tuple[str, ...] = ("flr", "bus")
    bridge: bool = False
    children: Sequence[Dev] = ()
    #: SR-IOV: VFs enabled now; ``totalvfs`` defaults to ``vfs`` (None: not SR-IOV).
    vfs: int = 0
    totalvfs: int | None = None
    vf_offset: int = 0x80
    vf_stride: int = 1
    vf_device: int | None = None
    vf_driver: str | None = None
    #: Group of the first VF; VF ``i`` is in ``vf_group + i`` (None: no groups).
    vf_group: int | None = None
    boot_vga: bool | None = None
    #: Raw file contents that replace (or, with None, remove) what is written.
    files: Mapping[str, bytes | None] = field(default_factory=dict)
    #: Disks behind this function, in ``disk_folder`` below it.
    disks: Sequence[Block] = ()
    disk_folder: str = "virtio0/block"

    @property
    def pci_address(self) -> PciAddress:
        return PciAddress.parse(self.address)

    @property
    def class_code(self) -> int:
        if self.cls is not None:
            return self.cls
        return 0x060400 if self.bridge else 0x020000

    def vf_addresses(self) -> list[PciAddress]:
        pf = self.pci_address
        return [
            PciAddress.from_rid(pf.domain, pf.rid + self.vf_offset + i * self.vf_stride)
            for i in range(self.vfs)
        ]

    def virtual_functions(self) -> list[Dev]:
        """The VFs this PF has enabled, as functions of their own."""
        return [
            Dev(
                str(addr),
                vendor=self.vendor,
                device=self.vf_device if self.vf_device is not None else self.device,
                cls=self.class_code,
                driver=self.vf_driver,
                group=None if self.vf_group is None else self.vf_group + i,
                numa_node=self.numa_node,
                reset_methods=("flr",),
            )
            for i, addr in enumerate(self.vf_addresses())
        ]


@dataclass
class Block:
    """A disk, or a partition (in a disk's ``partitions``): a block device in sysfs."""

    name: str
    #: ``MAJ:MIN``, written to ``dev``.
    number: str
    partitions: Sequence[Block] = ()
    #: Kernel names of the devices stacked on it (``holders/``); a name that
    #: is not in ``Topology.stacked`` makes a link to nowhere.
    holders: Sequence[str] = ()
    #: Raw file contents that replace (or, with None, remove) what is written.
    files: Mapping[str, bytes | None] = field(default_factory=dict)


@dataclass
class Stacked:
    """A device-mapper device or md array: ``/sys/devices/virtual/block/<name>``."""

    name: str
    number: str
    #: ``dm/name`` and ``dm/uuid`` (device mapper), or ``md/level`` (md).
    dm_name: str | None = None
    dm_uuid: str = ""
    md_level: str | None = None
    holders: Sequence[str] = ()
    files: Mapping[str, bytes | None] = field(default_factory=dict)


@dataclass
class NvmeSubsystem:
    """NVMe native multipath: namespaces that hang off a subsystem, not a controller."""

    name: str
    #: ``(PCI address, controller name)``: ``("0000:02:00.0", "nvme0")`` is
    #: the folder ``nvme/nvme0`` of that function (``Dev.disk_folder``).
    controllers: Sequence[tuple[str, str]]
    disks: Sequence[Block] = ()


@dataclass
class Foreign:
    """A member of an IOMMU group that is not a PCI function (a platform device)."""

    name: str
    group: int
    driver: str | None = None


@dataclass
class Iommu:
    """An IOMMU unit in /sys/class/iommu; ``function``: the PCI function it is, if any.

    With ``virtio``, a virtio-iommu as the kernel shows one: named after its
    PCI function, under that function's virtio device (on ``virtio_iommu``).
    """

    name: str
    function: str | None = None
    virtio: bool = False

    @classmethod
    def virtio_pci(cls, function: str) -> Iommu:
        return cls(function, function, virtio=True)


@dataclass
class ParentType:
    """One type a mediated-device parent offers (``mdev_supported_types/<id>``)."""

    #: The folder's name: the parent driver's name, a dash, the type's (``mtty-2``).
    id: str
    #: ``name``: the kernel writes the type's pretty name, else its own name.
    name: str | None = None
    #: ``description``: absent when the parent driver has none (mtty has none).
    description: str | None = None
    device_api: str = "vfio-pci"
    available: int = 1
    #: Raw file contents that replace (or, with None, remove) what is written.
    files: Mapping[str, bytes | None] = field(default_factory=dict)


@dataclass
class Parent:
    """A device that can have mdevs: a virtual one (``sys/devices/virtual/<name>/<name>``,
    like the kernel's samples), or the PCI function ``function`` (a GPU)."""

    name: str
    types: Sequence[ParentType] = ()
    function: str | None = None


@dataclass
class Mediated:
    """A mediated device: ``uuid`` under its parent (by name), of type ``type``.

    With a ``group``, its driver has registered it with VFIO: it is that
    group's only member and has ``vfio-dev/vfio<k>``.
    """

    uuid: str
    parent: str
    type: str
    driver: str | None = None
    group: int | None = None


DEFAULT_NODES = frozenset({"vfio", "iommu", "kvm"})


@dataclass
class Topology:
    """A host: its PCI functions, groups, drivers, and which /dev nodes exist."""

    devices: Sequence[Dev] = ()
    foreign: Sequence[Foreign] = ()
    noiommu_groups: Collection[int] = ()
    #: Of ``vfio`` (/dev/vfio/vfio), ``iommu`` (/dev/iommu), ``kvm`` (/dev/kvm).
    dev_nodes: Collection[str] = DEFAULT_NODES
    #: An IOMMU in /sys/class/iommu (``dmar0``), unless ``iommus`` names them.
    iommu: bool = True
    iommus: Sequence[Iommu] | None = None
    #: /sys/kernel/iommu_groups exists (the kernel has IOMMU support).
    groups_dir: bool = True
    #: Names in /sys/firmware/acpi/tables; None: no such directory.
    acpi_tables: Collection[str] | None = None
    #: /proc/cmdline, and the vendor_id of /proc/cpuinfo (None: no such line).
    cmdline: str = "BOOT_IMAGE=/boot/vmlinuz-6.12.0 root=/dev/sda1 ro quiet"
    cpu_vendor: str | None = "GenuineIntel"
    #: The kernel has VFIO device cdevs (``vfio-dev/vfioN/dev``, /dev/vfio/devices).
    cdev: bool = True
    #: Drivers registered whether or not a device is bound to them.
    drivers: Collection[str] = ("vfio-pci",)
    #: Also write the files the model does not read, as a real tree has them.
    filler: bool = True
    stacked: Sequence[Stacked] = ()
    nvme_subsystems: Sequence[NvmeSubsystem] = ()
    #: Mediated devices: their parents (``sys/class/mdev_bus``) and the mdevs.
    mdev_parents: Sequence[Parent] = ()
    mdevs: Sequence[Mediated] = ()

    def all_devices(self) -> Iterator[tuple[Dev, PciAddress | None]]:
        """Every function, VFs included, with the address of its PF if it is a VF."""
        stack = list(reversed(self.devices))
        while stack:
            dev = stack.pop()
            yield dev, None
            for vf in dev.virtual_functions():
                yield vf, dev.pci_address
            stack.extend(reversed(dev.children))

    def build(self, root: str | Path) -> tuple[Path, Path]:
        """Write the tree under ``root``; return ``(sysfs, devfs)`` (procfs: ``root/proc``)."""
        return _Builder(self, Path(root)).build()


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def _uevent(dev: Dev, addr: PciAddress, sub_vendor: int) -> bytes:
    """The ``uevent`` of a PCI function, as dev_uevent and pci_uevent write it."""
    cls = dev.class_code
    lines = [f"DRIVER={dev.driver}"] if dev.driver is not None else []
    lines += [
        f"PCI_CLASS={cls:04X}",
        f"PCI_ID={dev.vendor:04X}:{dev.device:04X}",
        f"PCI_SUBSYS_ID={sub_vendor:04X}:{dev.subsystem_device:04X}",
        f"PCI_SLOT_NAME={addr}",
        f"MODALIAS=pci:v{dev.vendor:08X}d{dev.device:08X}sv{sub_vendor:08X}"
        f"sd{dev.subsystem_device:08X}bc{cls >> 16:02X}sc{cls >> 8 & 0xFF:02X}i{cls & 0xFF:02X}",
    ]
    return "".join(f"{line}\n" for line in lines).encode()


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


class _Builder:
    def __init__(self, topo: Topology, root: Path) -> None:
        self.topo = topo
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.paths: dict[PciAddress, Path] = {}
        self.cdevs = 0
        #: Block device folders, and the holders to link once every folder exists.
        self.blocks: dict[str, Path] = {}
        self.holder_links: list[tuple[Path, str]] = []

    def build(self) -> tuple[Path, Path]:
        for d in ("devices", "bus/pci/devices", "bus/pci/drivers"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        if self.topo.groups_dir:
            (self.sys / "kernel" / "iommu_groups").mkdir(parents=True)
        (self.sys / "class" / "iommu").mkdir(parents=True)
        (self.sys / "class" / "vfio-dev").mkdir(parents=True)
        (self.dev / "vfio").mkdir(parents=True)
        for name in self.topo.drivers:
            self._driver_dir(name)
        for node, path in (("vfio", "vfio/vfio"), ("iommu", "iommu"), ("kvm", "kvm")):
            if node in self.topo.dev_nodes:
                _write(self.dev / path, b"")
        for dev in self.topo.devices:
            parent = (
                self.sys / "devices" / f"pci{dev.pci_address.domain:04x}:{dev.pci_address.bus:02x}"
            )
            self._function(dev, parent, None)
        for f in self.topo.foreign:
            self._foreign(f)
        iommus = self.topo.iommus
        if iommus is None:
            iommus = [Iommu("dmar0")] if self.topo.iommu else []
        for unit in iommus:
            self._iommu(unit)
        self._firmware_and_proc()
        self._block_devices()
        self._mediated()
        return self.sys, self.dev

    def _iommu(self, unit: Iommu) -> None:
        if unit.function is None:  # VT-d: no parent device
            parent = None
            path = self.sys / "devices" / "virtual" / "iommu" / unit.name
        else:  # AMD-Vi: under its PCI function; virtio-iommu: under its virtio device
            parent = self.paths[PciAddress.parse(unit.function)]
            if unit.virtio:
                parent = parent / "virtio0"
                parent.mkdir()
                _link(parent / "driver", self.sys / "bus" / "virtio" / "drivers" / "virtio_iommu")
            path = parent / "iommu" / unit.name
        (path / "devices").mkdir(parents=True)
        _write(path / "uevent", b"")
        if parent is not None:
            _link(path / "device", parent)
        _link(self.sys / "class" / "iommu" / unit.name, path)

    def _firmware_and_proc(self) -> None:
        if self.topo.acpi_tables is not None:
            tables = self.sys / "firmware" / "acpi" / "tables"
            tables.mkdir(parents=True)
            for name in self.topo.acpi_tables:
                _write(tables / name, b"")
        proc = self.sys.parent / "proc"
        proc.mkdir(exist_ok=True)
        _write(proc / "cmdline", self.topo.cmdline.encode() + b"\n")
        lines = ["processor\t: 0"]
        if self.topo.cpu_vendor is not None:
            lines.append(f"vendor_id\t: {self.topo.cpu_vendor}")
        lines += ["cpu family\t: 6", "model name\t: a CPU", "", ""]
        _write(proc / "cpuinfo", "\n".join(lines).encode())

    def _driver_dir(self, name: str) -> Path:
        path = self.sys / "bus" / "pci" / "drivers" / name
        if not path.exists():
            path.mkdir(parents=True)
            for f in ("bind", "unbind", "new_id", "remove_id", "uevent"):
                _write(path / f, b"")
        return path

    def _group_dir(self, number: int) -> Path:
        path = self.sys / "kernel" / "iommu_groups" / str(number)
        if not path.exists():
            (path / "devices").mkdir(parents=True)
            _write(path / "type", b"DMA\n")
            _write(path / "reserved_regions", b"")
            if number in self.topo.noiommu_groups:
                _write(path / "name", b"vfio-noiommu\n")
        return path

    def _function(self, dev: Dev, parent: Path, physfn: PciAddress | None) -> None:
        addr = dev.pci_address
        if addr in self.paths:
            raise ValueError(f"{addr} appears twice in the topology")
        path = parent / str(addr)
        path.mkdir(parents=True)
        self.paths[addr] = path
        sub_vendor = dev.vendor if dev.subsystem_vendor is None else dev.subsystem_vendor
        files: dict[str, bytes] = {
            "uevent": _uevent(dev, addr, sub_vendor),
            "vendor": b"0x%04x\n" % dev.vendor,
            "device": b"0x%04x\n" % dev.device,
            "class": b"0x%06x\n" % dev.class_code,
            "subsystem_vendor": b"0x%04x\n" % sub_vendor,
            "subsystem_device": b"0x%04x\n" % dev.subsystem_device,
            "driver_override": (dev.driver_override or "(null)").encode() + b"\n",
            "numa_node": b"%d\n" % dev.numa_node,
            # The header's first dword (vendor, device), as the kernel reads it to root.
            "config": dev.vendor.to_bytes(2, "little")
            + dev.device.to_bytes(2, "little")
            + bytes(60),
            "power_state": b"D0\n",
        }
        if dev.reset_methods:
            files["reset_method"] = " ".join(dev.reset_methods).encode() + b"\n"
        totalvfs = dev.totalvfs if dev.totalvfs is not None else (dev.vfs or None)
        if totalvfs is not None:
            files["sriov_totalvfs"] = b"%d\n" % totalvfs
            files["sriov_numvfs"] = b"%d\n" % dev.vfs
            files["sriov_drivers_autoprobe"] = b"1\n"
        if dev.boot_vga is not None:
            files["boot_vga"] = b"1\n" if dev.boot_vga else b"0\n"
        if self.topo.filler:
            files.setdefault("enable", b"0\n")  # the kernel's count: nobody enabled it
            for name in _FILLER_FILES:
                files.setdefault(name, b"")
            for name in _FILLER_DIRS:
                (path / name).mkdir()
            _link(path / "subsystem", self.sys / "bus" / "pci")
        for name, data in dev.files.items():
            if data is None:
                files.pop(name, None)
            else:
                files[name] = data
        for name, data in files.items():
            _write(path / name, data)

        _link(self.sys / "bus" / "pci" / "devices" / str(addr), path)
        if dev.driver is not None:
            drv = self._driver_dir(dev.driver)
            _link(path / "driver", drv)
            _link(drv / str(addr), path)
        if dev.group is not None:
            group = self._group_dir(dev.group)
            _link(path / "iommu_group", group)
            _link(group / "devices" / str(addr), path)
            if is_vfio_driver(dev.driver):
                node = (
                    f"noiommu-{dev.group}"
                    if dev.group in self.topo.noiommu_groups
                    else str(dev.group)
                )
                _write(self.dev / "vfio" / node, b"")
        if is_vfio_driver(dev.driver):
            self._vfio_device(path)
        if physfn is not None:
            _link(path / "physfn", self.paths[physfn])
        for i, vf in enumerate(dev.virtual_functions()):
            self._function(vf, parent, addr)
            _link(path / f"virtfn{i}", self.paths[vf.pci_address])
        for child in dev.children:
            self._function(child, path, None)

    def _block_devices(self) -> None:
        for dev, _ in self.topo.all_devices():
            folder = self.paths[dev.pci_address] / dev.disk_folder
            for disk in dev.disks:
                self._block(folder, disk, disk=True)
        (self.sys / "class" / "block").mkdir(parents=True, exist_ok=True)
        virtual = self.sys / "devices" / "virtual" / "block"
        for st in self.topo.stacked:
            path = self._block(virtual, Block(st.name, st.number, files=st.files), disk=True)
            self.holder_links += [(path / "holders", h) for h in st.holders]
            if st.dm_name is not None:
                (path / "dm").mkdir()
                _write(path / "dm" / "name", st.dm_name.encode() + b"\n")
                _write(path / "dm" / "uuid", st.dm_uuid.encode() + b"\n")
            if st.md_level is not None:
                (path / "md").mkdir()
                _write(path / "md" / "level", st.md_level.encode() + b"\n")
        for sub in self.topo.nvme_subsystems:
            folder = self.sys / "devices" / "virtual" / "nvme-subsystem" / sub.name
            folder.mkdir(parents=True)
            _link(self.sys / "class" / "nvme-subsystem" / sub.name, folder)
            for addr, ctrl in sub.controllers:
                target = self.paths[PciAddress.parse(addr)] / "nvme" / ctrl
                target.mkdir(parents=True, exist_ok=True)
                _link(folder / ctrl, target)
            for disk in sub.disks:
                self._block(folder, disk, disk=True)
        for holders, name in self.holder_links:
            _link(holders / name, virtual / name)
            if name in self.blocks:  # the kernel's reverse link
                _link(self.blocks[name] / "slaves" / holders.parent.name, holders.parent)

    def _block(self, parent: Path, block: Block, *, disk: bool, index: int = 0) -> Path:
        path = parent / block.name
        path.mkdir(parents=True)
        self.blocks[block.name] = path
        major, minor = block.number.split(":")
        devtype = "disk" if disk else "partition"
        files: dict[str, bytes | None] = {
            "dev": block.number.encode() + b"\n",
            "uevent": (
                f"MAJOR={major}\nMINOR={minor}\nDEVNAME={block.name}\nDEVTYPE={devtype}\n"
            ).encode(),
            "size": b"131072\n",
        }
        if not disk:
            files["partition"] = b"%d\n" % index
        files.update(block.files)
        for name, data in files.items():
            if data is not None:
                _write(path / name, data)
        for sub in ("holders", "slaves", "power", "queue"):
            (path / sub).mkdir()
        _link(path / "subsystem", self.sys / "class" / "block")
        _link(self.sys / "class" / "block" / block.name, path)
        if disk:
            _link(self.sys / "block" / block.name, path)
        _write(self.dev / block.name, b"")
        self.holder_links += [(path / "holders", h) for h in block.holders]
        for i, part in enumerate(block.partitions, start=1):
            self._block(path, part, disk=False, index=i)
        return path

    def _vfio_device(self, path: Path) -> None:
        name = f"vfio{self.cdevs}"
        node = path / "vfio-dev" / name
        node.mkdir(parents=True)
        _write(node / "uevent", b"")
        if self.topo.cdev:
            _write(node / "dev", b"511:%d\n" % self.cdevs)
            (self.dev / "vfio" / "devices").mkdir(exist_ok=True)
            _write(self.dev / "vfio" / "devices" / name, b"")
        _link(self.sys / "class" / "vfio-dev" / name, node)
        self.cdevs += 1

    def _mediated(self) -> None:
        if not self.topo.mdev_parents and not self.topo.mdevs:
            return
        for d in ("bus/mdev/devices", "bus/mdev/drivers", "class/mdev_bus"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        parents = {p.name: self._mdev_parent(p) for p in self.topo.mdev_parents}
        for m in self.topo.mdevs:
            self._mdev(m, parents[m.parent])

    def _mdev_parent(self, parent: Parent) -> Path:
        if parent.function is not None:
            path = self.paths[PciAddress.parse(parent.function)]
        else:
            path = self.sys / "devices" / "virtual" / parent.name / parent.name
            path.mkdir(parents=True)
            _write(path / "uevent", b"")
        for t in parent.types:
            folder = path / "mdev_supported_types" / t.id
            (folder / "devices").mkdir(parents=True)
            files: dict[str, bytes | None] = {
                "name": (t.name or t.id).encode() + b"\n",
                "device_api": t.device_api.encode() + b"\n",
                "available_instances": b"%d\n" % t.available,
                "create": b"",
            }
            if t.description is not None:
                files["description"] = t.description.encode() + b"\n"
            files.update(t.files)
            for name, data in files.items():
                if data is not None:
                    _write(folder / name, data)
        _link(self.sys / "class" / "mdev_bus" / parent.name, path)
        return path

    def _mdev(self, m: Mediated, parent: Path) -> None:
        path = parent / m.uuid
        path.mkdir()
        _write(path / "uevent", f"MDEV_TYPE={m.type}\n".encode())
        _write(path / "remove", b"")
        (path / "power").mkdir()
        _link(path / "subsystem", self.sys / "bus" / "mdev")
        type_dir = parent / "mdev_supported_types" / m.type
        _link(path / "mdev_type", type_dir)
        _link(type_dir / "devices" / m.uuid, path)
        _link(self.sys / "bus" / "mdev" / "devices" / m.uuid, path)
        if m.driver is not None:
            drv = self.sys / "bus" / "mdev" / "drivers" / m.driver
            drv.mkdir(parents=True, exist_ok=True)
            _link(path / "driver", drv)
            _link(drv / m.uuid, path)
        if m.group is not None:
            group = self._group_dir(m.group)
            # vfio_noiommu_group_alloc names emulated-IOMMU groups so too (6.12).
            _write(group / "name", b"vfio-noiommu\n")
            _link(path / "iommu_group", group)
            _link(group / "devices" / m.uuid, path)
            _write(self.dev / "vfio" / str(m.group), b"")
            self._vfio_device(path)

    def _foreign(self, f: Foreign) -> None:
        path = self.sys / "devices" / "platform" / f.name
        path.mkdir(parents=True)
        _write(path / "uevent", b"")
        if f.driver is not None:
            drv = self.sys / "bus" / "platform" / "drivers" / f.driver
            drv.mkdir(parents=True, exist_ok=True)
            _link(path / "driver", drv)
        group = self._group_dir(f.group)
        _link(group / "devices" / f.name, path)
        _link(path / "iommu_group", group)


@dataclass
class Mount:
    """One line of a fake ``/proc/self/mountinfo``."""

    #: ``MAJ:MIN`` of the mounted file system's device (0:N for btrfs, 9p...).
    number: str
    source: str
    mountpoint: str
    fstype: str = "ext4"


def _escape(path: str) -> str:
    """A path as /proc writes it: space, tab, newline and backslash in octal."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def build_proc(
    root: str | Path,
    *,
    mounts: Sequence[Mount] = (),
    swaps: Sequence[str] = (),
    route: str = "",
    iomem: str = "",
) -> Path:
    """Write a fake /proc under ``root`` (``self/mountinfo``, ``swaps``, ``net/route``,
    ``iomem``)."""
    proc = Path(root) / "proc"
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "net").mkdir(exist_ok=True)
    lines = [
        f"{20 + i} 1 {m.number} / {_escape(m.mountpoint)} rw,relatime shared:{i + 1} - "
        f"{m.fstype} {_escape(m.source)} rw"
        for i, m in enumerate(mounts)
    ]
    (proc / "self" / "mountinfo").write_text("".join(f"{line}\n" for line in lines))
    header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    body = "".join(f"{_escape(s)}\tpartition\t1048572\t\t0\t\t-2\n" for s in swaps)
    (proc / "swaps").write_text(header + body)
    route_header = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
    (proc / "net" / "route").write_text(route_header + route)
    (proc / "iomem").write_text(iomem)
    return proc


# -- the console and DRM of a display function ---------------------------------


def add_framebuffer(
    sysfs: Path, addr: str, name: str = "fb0", ident: str = "bochs-drmdrmfb"
) -> None:
    """Register framebuffer ``name`` of function ``addr``: ``<function>/graphics/fbN``,
    ``sys/class/graphics/fbN`` linking to it, its ``device`` link and ``name``."""
    function = device_dir(sysfs, addr)
    folder = function / "graphics" / name
    folder.mkdir(parents=True)
    (folder / "name").write_text(f"{ident}\n")
    _link(folder / "device", function)
    _link(sysfs / "class" / "graphics" / name, folder)


def add_vtconsole(sysfs: Path, name: str, label: str, bound: bool) -> None:
    """A console driver in ``sys/class/vtconsole`` (``(M) frame buffer device``, ...)."""
    folder = sysfs / "devices" / "virtual" / "vtconsole" / name
    folder.mkdir(parents=True)
    (folder / "name").write_text(f"{label}\n")
    (folder / "bind").write_text("1\n" if bound else "0\n")
    _link(sysfs / "class" / "vtconsole" / name, folder)


def add_drm(sysfs: Path, devfs: Path, addr: str, name: str, number: str) -> Path:
    """DRM minor ``name`` (card0, renderD128) of function ``addr``, and its node in
    ``dev/dri``; returns the node."""
    function = device_dir(sysfs, addr)
    folder = function / "drm" / name
    folder.mkdir(parents=True)
    (folder / "dev").write_text(f"{number}\n")
    (folder / "uevent").write_text(f"DEVNAME=dri/{name}\n")
    _link(folder / "device", function)
    _link(sysfs / "class" / "drm" / name, folder)
    node = devfs / "dri" / name
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_text("")
    return node


# -- changing a built tree (hotplug, corruption) ----------------------------


def device_dir(sysfs: Path, addr: str) -> Path:
    """The real directory of function ``addr`` (through its bus symlink)."""
    return (sysfs / "bus" / "pci" / "devices" / addr).resolve()


def mdev_dir(sysfs: Path, uuid: str) -> Path:
    """The real directory of the mdev ``uuid`` (through its bus symlink)."""
    return (sysfs / "bus" / "mdev" / "devices" / uuid).resolve()


def write_attr(sysfs: Path, addr: str, name: str, data: bytes) -> None:
    """Overwrite one file of function ``addr``."""
    (device_dir(sysfs, addr) / name).write_bytes(data)


def unplug(sysfs: Path, addr: str) -> None:
    """Remove the function's directory but leave the links to it, as a scan racing
    with hot unplug sees it: listed, then gone."""
    shutil.rmtree(device_dir(sysfs, addr))


def tree_files(root: str | Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes: a snapshot to show nothing was written."""
    out = {}
    for top, _, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                out[path] = f.read()
    return out
