"""IOMMU groups, and whether VFIO can use one (its *viability*).

The IOMMU translates DMA per *group*: the smallest set of devices it can
tell apart (functions behind a PCIe-to-PCI bridge, or without ACS between
them, share one). Linux lists each group in ``/sys/kernel/iommu_groups/N``:
``devices/`` holds a symlink per member, and ``name`` exists only when the
group was named, which VFIO does for the groups it makes itself
(``vfio-noiommu``, ``vfio_noiommu_group_alloc`` in ``drivers/vfio/group.c``):
the fake groups of no-IOMMU mode, and also the emulated-IOMMU group each
mediated device gets, which the name does not tell apart. Their /dev nodes
do: ``/dev/vfio/noiommu-N`` for the first, ``/dev/vfio/N`` for the second
(``vfio_create_group``); kvmvfio tells them apart by the members, since an
emulated group's only member is the mdev (seen on the lab's 6.12 kernel).

VFIO gives userspace a whole group or nothing, because every member can DMA
wherever the group's IOMMU domain allows. Since Linux 5.19 the kernel
decides this through DMA ownership (``drivers/iommu/iommu.c``): binding a
driver that does DMA through the kernel's DMA API claims the group for the
kernel (``iommu_device_use_default_domain``), and ``VFIO_GROUP_GET_STATUS``
reports the group *viable* only while no such claim is held
(``!iommu_group_dma_owner_claimed``). Drivers that set
``driver_managed_dma`` make no claim: vfio-pci and its variant drivers,
pci-stub, and pcieport (PCIe ports). A member with no driver makes none
either. So a group is viable when every member is unbound, or bound to one
of those; any other driver blocks it, a bridge's included (a PCI bridge on
``shpchp`` blocks its group; one on ``pcieport`` or on no driver does not).

A PCI function in no group at all cannot be given to a VM, and why depends
on the host (:class:`HostIommu`, :class:`NoGroup`). Each IOMMU the kernel
uses is an entry of ``/sys/class/iommu``, named by its driver: ``dmarN``
(Intel VT-d, ``drivers/iommu/intel/dmar.c``), ``ivhdN`` (AMD-Vi,
``amd/init.c``), ``smmu3.0x...`` / ``smmu.0x...`` (Arm SMMUv3 / v2). A
virtio-iommu is named after its transport (``virtio_bus_name``: the PCI
address of a virtio-iommu-pci, ``0000:00:02.0`` in the lab) and is known
by the driver of the virtio device its ``device`` link points to,
``virtio_iommu`` (``virtio-iommu.c``).
An empty class means no IOMMU is in use: absent from the firmware, turned
off on the kernel command line (``intel_iommu=off``, ``amd_iommu=off``,
``iommu=off``; VT-d's units are then not even registered), or not built
into the kernel (then ``/sys/kernel/iommu_groups`` is missing too). With
an IOMMU in use, a function may still have no group because:

- it *is* the IOMMU: a virtio-iommu is itself a PCI function, which the
  VIOT code refuses to translate ("We're not translating ourself",
  ``drivers/acpi/viot.c``);
- it has not been probed: IOMMUs that the firmware describes per device
  (virtio-iommu through ACPI VIOT, Arm SMMUs through IORT or the device
  tree) take a device when its driver binds (the "replay" of
  ``acpi_iommu_configure_id`` / ``of_iommu_configure`` at DMA
  configuration, Linux 6.12); VT-d and AMD-Vi probe every device when they
  register;
- the IOMMU does not cover it: it is outside every unit's scope in the
  firmware's table (DMAR device scopes, IVRS, VIOT ranges).

A function behind a bridge the IOMMU cannot see through is not in this
list: the kernel puts it in its bridge's group (``pci_device_group``).
"""

from __future__ import annotations

import enum
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmvfio.errors import Blocker, InvalidAddress, KernelError
from kvmvfio.host.address import PciAddress
from kvmvfio.host.pci import PciDevice, driver_managed_dma, is_vfio_driver

#: What the ``name`` file of a VFIO no-IOMMU group says.
NOIOMMU_NAME = "vfio-noiommu"


@dataclass(frozen=True, slots=True)
class ForeignMember:
    """A member of an IOMMU group that is not a PCI function (a platform device, an mdev)."""

    name: str
    driver: str | None
    #: A mediated device (on the mdev bus): the only member of an emulated-IOMMU group,
    #: a VFIO device itself, never a blocker.
    mdev: bool = False


def blocker_of(device: PciDevice) -> Blocker | None:
    """Say why ``device`` keeps its group from VFIO, or None if it does not."""
    driver = device.driver
    if driver is None or driver_managed_dma(driver):
        return None
    if device.is_bridge:
        reason = (
            f"a bridge bound to {driver}, which does DMA through the kernel (only pcieport "
            "or no driver leave a bridge's group free); unbind it"
        )
    else:
        reason = f"bound to {driver}, a host driver that does DMA; rebind it to vfio-pci"
    return Blocker(str(device.address), driver, reason)


def _foreign_blocker(member: ForeignMember) -> Blocker | None:
    if member.mdev or member.driver is None or driver_managed_dma(member.driver):
        return None
    return Blocker(
        member.name,
        member.driver,
        f"a non-PCI device bound to {member.driver}, a host driver that does DMA; unbind it",
    )


@dataclass(frozen=True, slots=True)
class IommuGroup:
    """One IOMMU group: its members and, from their drivers, its viability."""

    number: int
    members: tuple[PciDevice, ...]
    noiommu: bool = False
    #: Members that are not PCI functions (rare on x86; platform devices on Arm; mdevs).
    foreign: tuple[ForeignMember, ...] = ()
    #: The emulated-IOMMU group of a mediated device: VFIO made it, the mdev is its only
    #: member, and its parent's driver (not an IOMMU) decides what the mdev may reach.
    emulated: bool = False

    @property
    def blockers(self) -> tuple[Blocker, ...]:
        """The members that keep the group from VFIO, each with the reason."""
        found = [blocker_of(m) for m in self.members]
        found += [_foreign_blocker(f) for f in self.foreign]
        return tuple(b for b in found if b is not None)

    @property
    def viable(self) -> bool:
        """True when VFIO can take the group now (the kernel's rule, see the module doc)."""
        return not self.blockers

    @property
    def vfio_bound(self) -> tuple[PciDevice, ...]:
        """The members bound to vfio-pci or a variant driver."""
        return tuple(m for m in self.members if is_vfio_driver(m.driver))

    @property
    def node_name(self) -> str:
        """The group's file name in ``/dev/vfio``: ``N``, or ``noiommu-N``."""
        return f"noiommu-{self.number}" if self.noiommu else str(self.number)

    def dev_node(self, devfs: str | Path = "/dev") -> Path:
        """The group's VFIO file, ``/dev/vfio/N`` (``/dev/vfio/noiommu-N``).

        It exists once a member is bound to a VFIO driver.
        """
        return Path(f"{devfs}/vfio/{self.node_name}")


# -- the IOMMUs themselves, and functions in no group ------------------------


class IommuKind(enum.Enum):
    """Which IOMMU a ``/sys/class/iommu`` entry is, from the name its driver gives it."""

    INTEL_VTD = "intel-vt-d"
    AMD_VI = "amd-vi"
    VIRTIO = "virtio-iommu"
    ARM_SMMU_V3 = "arm-smmu-v3"
    ARM_SMMU = "arm-smmu"
    OTHER = "other"

    @property
    def label(self) -> str:
        """The IOMMU's name for people (``Intel VT-d``)."""
        return _LABELS[self]

    @property
    def probes_at_bind(self) -> bool:
        """True when the kernel gives a device this IOMMU only once a driver binds it.

        VT-d and AMD-Vi take every device when they register; the IOMMUs the
        firmware describes per device (VIOT, IORT, device tree) take one at
        its DMA configuration, which happens at driver probe (Linux 6.12).
        """
        return self not in (IommuKind.INTEL_VTD, IommuKind.AMD_VI)

    @classmethod
    def of_unit(cls, name: str, driver: str | None = None) -> IommuKind:
        """The kind of the unit named ``name`` in ``/sys/class/iommu``.

        ``driver``: the driver of the device the unit's ``device`` link
        points to (``virtio_iommu`` for a virtio-iommu, whose name is its
        transport's), for the names that do not say.
        """
        for kind, pattern in _UNIT_NAMES:
            if pattern.fullmatch(name):
                return kind
        return _UNIT_DRIVERS.get(driver or "", cls.OTHER)


_LABELS = {
    IommuKind.INTEL_VTD: "Intel VT-d",
    IommuKind.AMD_VI: "AMD-Vi",
    IommuKind.VIRTIO: "virtio-iommu",
    IommuKind.ARM_SMMU_V3: "Arm SMMUv3",
    IommuKind.ARM_SMMU: "Arm SMMU",
    IommuKind.OTHER: "the IOMMU",
}
# The names each driver gives its units (iommu_device_sysfs_add callers).
_UNIT_NAMES = (
    (IommuKind.INTEL_VTD, re.compile(r"dmar[0-9]{1,10}")),
    (IommuKind.AMD_VI, re.compile(r"ivhd[0-9]{1,10}")),
    (IommuKind.ARM_SMMU_V3, re.compile(r"smmu3\.0x[0-9a-f]{1,16}")),
    (IommuKind.ARM_SMMU, re.compile(r"smmu\.0x[0-9a-f]{1,16}")),
)
_UNIT_DRIVERS = {
    "virtio_iommu": IommuKind.VIRTIO,
    "arm-smmu-v3": IommuKind.ARM_SMMU_V3,
    "arm-smmu": IommuKind.ARM_SMMU,
}
#: ACPI tables that describe an IOMMU to the kernel, and which one. (IORT is
#: left out: Arm firmware has one for its interrupt controller, SMMU or not.)
FIRMWARE_TABLES = {"DMAR": IommuKind.INTEL_VTD, "IVRS": IommuKind.AMD_VI, "VIOT": IommuKind.VIRTIO}
#: ``vendor_id`` of ``/proc/cpuinfo``, and the IOMMU such a CPU's platform has.
CPU_VENDORS = {
    "GenuineIntel": IommuKind.INTEL_VTD,
    "AuthenticAMD": IommuKind.AMD_VI,
    "HygonGenuine": IommuKind.AMD_VI,
}
# Kernel parameters about IOMMUs, kept from /proc/cmdline as they are given.
_IOMMU_ARG = re.compile(
    r"(?:intel_iommu|amd_iommu|iommu|iommu\.passthrough|iommu\.strict|intremap)"
    r"=[A-Za-z0-9_.,-]{1,64}"
)
_VENDOR_LINE = re.compile(r"vendor_id\s*:\s*([\x21-\x7e]{1,16})\s*")
_DRIVER_OPTIONS = {
    IommuKind.INTEL_VTD: "CONFIG_INTEL_IOMMU",
    IommuKind.AMD_VI: "CONFIG_AMD_IOMMU",
    IommuKind.VIRTIO: "CONFIG_VIRTIO_IOMMU",
}
#: What is read of /proc/cmdline and /proc/cpuinfo (the CPU vendor is in the first lines).
_PROC_READ = 65536


@dataclass(frozen=True, slots=True)
class IommuUnit:
    """One IOMMU the kernel uses: an entry of ``/sys/class/iommu``."""

    name: str
    kind: IommuKind
    #: The PCI function that is this IOMMU (a virtio-iommu, AMD's IOMMU function), if any.
    function: PciAddress | None = None


def parse_cmdline(raw: bytes) -> tuple[str, ...]:
    """The IOMMU settings of a kernel command line (``/proc/cmdline``), in their order.

    Keeps ``intel_iommu=``, ``amd_iommu=``, ``iommu=``, ``iommu.passthrough=``,
    ``iommu.strict=`` and ``intremap=`` arguments whose value looks like the
    kernel's option lists; ignores everything else. Never raises.
    """
    text = raw[:_PROC_READ].decode("utf-8", "replace")
    return tuple(arg for arg in text.split() if _IOMMU_ARG.fullmatch(arg))


def parse_cpu_vendor(raw: bytes) -> str | None:
    """The first ``vendor_id`` of ``/proc/cpuinfo`` (``GenuineIntel``); None without one."""
    text = raw[:_PROC_READ].decode("utf-8", "replace")
    for line in text.split("\n"):
        m = _VENDOR_LINE.fullmatch(line)
        if m is not None:
            return m[1]
    return None


def _options(arg: str) -> list[str]:
    return arg.partition("=")[2].split(",")


def off_setting(args: tuple[str, ...], expected: IommuKind | None) -> str | None:
    """The command-line argument that turns off the IOMMU of kind ``expected``, if any.

    The kernel reads each option by prefix, in order (``intel_iommu_setup``,
    ``parse_amd_iommu_options``, x86's ``iommu_setup``): a later
    ``intel_iommu=on`` undoes an earlier ``off``; ``iommu=off`` turns both
    off. With ``expected`` None, any of them counts.
    """
    intel = amd = every = None
    for arg in args:
        key, opts = arg.partition("=")[0], _options(arg)
        if key == "iommu" and any(o.startswith("off") for o in opts):
            every = arg
        elif key == "amd_iommu" and any(o.startswith("off") for o in opts):
            amd = arg
        elif key == "intel_iommu":
            for opt in opts:
                if opt.startswith("on"):
                    intel = None
                elif opt.startswith("off"):
                    intel = arg
    if every is not None:
        return every
    if expected is IommuKind.INTEL_VTD:
        return intel
    if expected is IommuKind.AMD_VI:
        return amd
    return intel or amd if expected is None else None


class NoGroupCause(enum.Enum):
    """Why a PCI function is in no IOMMU group."""

    #: The kernel was built without IOMMU support (no ``/sys/kernel/iommu_groups``).
    KERNEL_WITHOUT_IOMMU = "kernel-without-iommu"
    #: The kernel command line turns the IOMMU off.
    IOMMU_OFF = "iommu-off"
    #: No IOMMU is in use: none in the firmware, or one the kernel does not drive.
    NO_IOMMU = "no-iommu"
    #: The function is an IOMMU, which does not translate its own DMA.
    IS_IOMMU = "is-iommu"
    #: It has no driver, and the IOMMU takes a device only when a driver binds it.
    NOT_PROBED = "not-probed"
    #: The IOMMU in use does not cover it (outside its firmware-given scope).
    NOT_COVERED = "not-covered"


@dataclass(frozen=True, slots=True)
class NoGroup:
    """Why one PCI function is in no IOMMU group, and what would give it one."""

    address: PciAddress
    cause: NoGroupCause
    #: The IOMMU concerned: the one in use, or (for the host-wide causes)
    #: the one the firmware or the CPU says the host has; None if unknown.
    iommu: IommuKind | None
    #: The ``/sys/class/iommu`` units concerned.
    units: tuple[str, ...]
    #: The kernel argument concerned (``intel_iommu=off``), if one is.
    setting: str | None
    #: A sentence for people: why, and what to do. The wording may change.
    reason: str

    @property
    def bind_gives_group(self) -> bool:
        """True when binding a driver (vfio-pci) gives the function its group."""
        return self.cause is NoGroupCause.NOT_PROBED


@dataclass(frozen=True, slots=True)
class HostIommu:
    """The IOMMUs the kernel uses, and the facts that say why there are none."""

    units: tuple[IommuUnit, ...]
    #: ``/sys/kernel/iommu_groups`` exists: the kernel has IOMMU support.
    groups_supported: bool
    #: The IOMMU settings of the kernel command line, in order.
    kernel_args: tuple[str, ...] = ()
    #: ACPI tables that describe an IOMMU (of :data:`FIRMWARE_TABLES`);
    #: None when the host shows no ACPI tables at all.
    firmware_tables: tuple[str, ...] | None = None
    #: ``vendor_id`` of ``/proc/cpuinfo``; None when it has none (not x86).
    cpu_vendor: str | None = None

    @classmethod
    def probe(cls, sysfs: str | Path = "/sys", procfs: str | Path = "/proc") -> HostIommu:
        """Read ``/sys/class/iommu``, the ACPI table names, the command line and CPU vendor.

        Changes nothing. Raise :class:`~kvmvfio.errors.KernelError` when a
        read fails for another reason than the file not being there.
        """
        sys_, proc = Path(sysfs), Path(procfs)
        tables = _listdir(sys_ / "firmware" / "acpi" / "tables")
        return cls(
            units=_units(sys_ / "class" / "iommu"),
            groups_supported=os.path.isdir(sys_ / "kernel" / "iommu_groups"),
            kernel_args=parse_cmdline(_read(proc / "cmdline") or b""),
            firmware_tables=None
            if tables is None
            else tuple(t for t in FIRMWARE_TABLES if t in tables),
            cpu_vendor=parse_cpu_vendor(_read(proc / "cpuinfo") or b""),
        )

    @property
    def in_use(self) -> bool:
        """True when the kernel uses at least one IOMMU."""
        return bool(self.units)

    @property
    def expected(self) -> IommuKind | None:
        """The IOMMU this host should have: the firmware's, else the CPU vendor's."""
        for table in self.firmware_tables or ():
            return FIRMWARE_TABLES[table]
        return CPU_VENDORS.get(self.cpu_vendor or "")

    @property
    def off_by(self) -> str | None:
        """The command-line argument that turns this host's IOMMU off, if one does."""
        return off_setting(self.kernel_args, self.expected)

    def absence(self) -> tuple[NoGroupCause, str] | None:
        """Why no IOMMU is in use, and what to do, as a cause and a phrase; None when one is."""
        if self.units:
            return None
        kind = self.expected
        if not self.groups_supported:
            driver = _DRIVER_OPTIONS.get(kind, "the IOMMU's driver") if kind else "its driver"
            return NoGroupCause.KERNEL_WITHOUT_IOMMU, (
                "this kernel has no IOMMU support (no /sys/kernel/iommu_groups): boot one "
                f"built with CONFIG_IOMMU_SUPPORT and {driver}"
            )
        off = self.off_by
        if off is not None:
            which = "every IOMMU" if off.startswith("iommu=") else (kind or _kind_of(off)).label
            return NoGroupCause.IOMMU_OFF, (
                f"the kernel command line turns {which} off ({off}): remove {off} and reboot"
            )
        return NoGroupCause.NO_IOMMU, self._not_in_use(kind)

    def _not_in_use(self, kind: IommuKind | None) -> str:
        table = next(iter(self.firmware_tables or ()), None)
        if table is not None:
            fix = {
                IommuKind.INTEL_VTD: "boot with intel_iommu=on, on a kernel built with "
                "CONFIG_INTEL_IOMMU (`dmesg | grep DMAR` says more)",
                IommuKind.AMD_VI: "it needs a kernel built with CONFIG_AMD_IOMMU "
                "(`dmesg | grep AMD-Vi` says more)",
                IommuKind.VIRTIO: "it needs a kernel with the virtio_iommu driver "
                "(CONFIG_VIRTIO_IOMMU)",
            }[FIRMWARE_TABLES[table]]
            return (
                f"the firmware describes {FIRMWARE_TABLES[table].label} (ACPI {table} table) "
                f"but the kernel does not use it: {fix}"
            )
        own = {IommuKind.INTEL_VTD: "DMAR", IommuKind.AMD_VI: "IVRS"}.get(kind) if kind else None
        if self.firmware_tables is None:
            found = "the kernel found no IOMMU"
        elif own is not None:
            found = f"the firmware describes no IOMMU (no ACPI {own} table)"
        else:
            found = "the firmware describes no IOMMU"
        if kind is IommuKind.INTEL_VTD:
            return f"{found}: enable VT-d in the firmware setup, then boot with intel_iommu=on"
        if kind is IommuKind.AMD_VI:
            return f"{found}: enable the IOMMU (AMD-Vi) in the firmware setup"
        return f"{found}: enable the platform's IOMMU in the firmware setup, if it has one"

    def no_group(self, device: PciDevice) -> NoGroup | None:
        """Why ``device`` is in no IOMMU group; None when it is in one."""
        if device.iommu_group is not None:
            return None
        absent = self.absence()
        if absent is not None:
            cause, reason = absent
            setting = self.off_by if cause is NoGroupCause.IOMMU_OFF else None
            return NoGroup(device.address, cause, self.expected, (), setting, reason)
        return self._in_use_but_no_group(device)

    def _in_use_but_no_group(self, device: PciDevice) -> NoGroup:
        own = [u for u in self.units if u.function == device.address]
        if own:
            unit = own[0]
            return NoGroup(
                device.address,
                NoGroupCause.IS_IOMMU,
                unit.kind,
                (unit.name,),
                None,
                f"it is the IOMMU itself ({_unit_text(unit)}), which does not translate its "
                "own DMA: it cannot be given to a VM",
            )
        lazy = [u for u in self.units if u.kind.probes_at_bind]
        if lazy and device.driver is None:
            kind, names = lazy[0].kind, tuple(u.name for u in lazy)
            return NoGroup(
                device.address,
                NoGroupCause.NOT_PROBED,
                kind,
                names,
                None,
                f"it has no driver, and {kind.label} ({_names(names)}) takes a device only "
                "when a driver binds it: bind it to vfio-pci (driver_override, then "
                "drivers_probe) and it gets its group",
            )
        return self._not_covered(device)

    def _not_covered(self, device: PciDevice) -> NoGroup:
        kinds = {u.kind for u in self.units}
        kind = self.units[0].kind if len(kinds) == 1 else None
        names = tuple(u.name for u in self.units)
        igfx = next(
            (
                a
                for a in self.kernel_args
                if a.startswith("intel_iommu=") and "igfx_off" in _options(a)
            ),
            None,
        )
        if igfx is not None and device.class_code >> 16 == 0x03 and device.address.bus == 0:
            return NoGroup(
                device.address,
                NoGroupCause.NOT_COVERED,
                kind,
                names,
                igfx,
                f"the kernel command line keeps integrated graphics out of Intel VT-d ({igfx}): "
                "remove igfx_off and reboot",
            )
        scope = (
            {
                IommuKind.INTEL_VTD: "the device scopes of the ACPI DMAR table",
                IommuKind.AMD_VI: "the ACPI IVRS table",
                IommuKind.VIRTIO: "the endpoint ranges of the ACPI VIOT table",
            }.get(kind, "what the firmware gives the IOMMU")
            if kind
            else "what the firmware gives them"
        )
        who = f"{kind.label} ({_names(names)})" if kind else f"the IOMMUs ({_names(names)})"
        return NoGroup(
            device.address,
            NoGroupCause.NOT_COVERED,
            kind,
            names,
            None,
            f"{who} does not translate it: it is outside {scope}, so it cannot be given to a VM "
            "on this host (another slot, or a firmware update, may change that)",
        )


def _unit_text(unit: IommuUnit) -> str:
    # A virtio-iommu-pci is named after its own address: the name adds nothing.
    if unit.function is not None and unit.name == str(unit.function):
        return unit.kind.label
    return f"{unit.kind.label} {unit.name}"


def _kind_of(arg: str) -> IommuKind:
    return IommuKind.AMD_VI if arg.startswith("amd_iommu=") else IommuKind.INTEL_VTD


def _names(names: tuple[str, ...]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]}, {names[1]} and {len(names) - 2} more"


_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENODEV})


def _listdir(path: Path) -> list[str] | None:
    try:
        return os.listdir(path)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise KernelError(err.errno or errno.EIO, "listdir", str(path)) from err


def _read(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(_PROC_READ)
    except OSError as err:
        if err.errno in _GONE:
            return None
        raise KernelError(err.errno or errno.EIO, "read", str(path)) from err


def _units(base: Path) -> tuple[IommuUnit, ...]:
    """The entries of ``/sys/class/iommu``, sorted by name, each with its PCI function."""
    out = []
    for name in sorted(_listdir(base) or ()):
        if not name.isprintable():
            continue  # not a name a driver gives
        target = _readlink(base / name) or ""
        driver = _readlink(base / name / "device" / "driver")
        kind = IommuKind.of_unit(name, None if driver is None else driver.rpartition("/")[2])
        out.append(IommuUnit(name, kind, _function_in(target)))
    return tuple(out)


def _readlink(path: Path) -> str | None:
    """A symlink's target; None when it is not there (or not a link, as in a fake tree)."""
    try:
        return os.readlink(path)
    except OSError as err:
        if err.errno in (*_GONE, errno.EINVAL):
            return None
        raise KernelError(err.errno or errno.EIO, "readlink", str(path)) from err


def _function_in(target: str) -> PciAddress | None:
    """The PCI function a unit's sysfs path runs through: the one the IOMMU is.

    ``.../pci0000:00/0000:00:02.0/virtio0/iommu/0000:00:02.0``: the last
    PCI address before the unit's own name (which may be one).
    """
    found = None
    for part in target.split("/")[:-1]:
        try:
            found = PciAddress.parse(part)
        except InvalidAddress:
            continue
    return found
