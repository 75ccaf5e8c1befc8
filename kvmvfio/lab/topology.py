"""Lab topologies: which vIOMMU and which PCI devices the L1 guest gets.

A topology is data, a small TOML file. The built-in ones live beside this
module (``topologies/NAME.toml``); a user adds one by writing a file and
passing its path. The format::

    description = "one line"
    kernel-args = ["extra=1"]          # optional, appended to L1's command line
    memory-mb = 2048                   # optional
    smp = 1                            # optional; see below
    common-tests = true                # optional: false runs only the tests marked for it

    [viommu]
    model = "intel-iommu"              # or "virtio-iommu"
    snoop-control = false              # intel-iommu only

    [[device]]                         # any QEMU -device, in order
    driver = "edu"
    id = "edu0"                        # optional
    bus = "br0"                        # optional: the id of a bridge above
    addr = "0x03"                      # optional: slot on that bus
    [device.props]                     # optional extra properties
    foo = "bar"

    [[disk]]                           # a disk of L1's own, on a PCI function of its own
    id = "data0"                       # names the drive and the device
    size-mb = 64                       # a sparse raw image in the job folder, empty at boot
    driver = "virtio-blk-pci"          # or "nvme" (a controller with one namespace)
    addr = "0x14"                      # slot on pcie.0, 0x14 to 0x1e
    serial = "data0"                   # optional (nvme: defaults to the id)

Disks sit after the lab's own devices (slots 0x10 to 0x13, the root disk at
0x10): virtio-blk names disks in probe order, i.e. slot order, so a
virtio-blk disk in a lower slot would take the root disk's name, /dev/vda,
and L1 would boot from it.

``smp`` defaults to 1: under TCG, L1 crashed early in boot ("Oops: int3" in
``sched_clock_cpu``) in a few percent of boots with ``-smp 2`` and never with
``-smp 1`` (shared/lab/LAB.md). Every field is checked; a mistake names the
file and the field.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kvmvfio.errors import LabError

VIOMMU_MODELS = ("intel-iommu", "virtio-iommu")

# QEMU option values are comma-separated key=value lists: anything that could
# smuggle another property or option in is refused.
_IDENT = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_ADDR = re.compile(r"^(0x[0-9a-fA-F]{1,2}|[0-9]{1,2})(\.[0-7])?$")
_VALUE = re.compile(r"^[A-Za-z0-9_.:/+-]{0,128}$")
_KARG = re.compile(r"^[A-Za-z0-9_.,:=/+-]{1,200}$")
# QEMU's nvme takes at most 20 characters of serial.
_SERIAL = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")

DISK_DRIVERS = ("virtio-blk-pci", "nvme")
#: Slots a disk may take on pcie.0: after the runner's own devices (root disk
#: 0x10, 9p shares, console up to 0x13), before the q35 chipset's 0x1f.
DISK_SLOTS = range(0x14, 0x1F)


@dataclass(frozen=True)
class LabDevice:
    """One ``-device`` of the L1 machine."""

    driver: str
    id: str | None = None
    bus: str | None = None
    addr: str | None = None
    props: tuple[tuple[str, str], ...] = ()

    def qemu_arg(self) -> str:
        """The value of this device's ``-device`` option."""
        parts = [self.driver]
        for key, value in (("id", self.id), ("bus", self.bus), ("addr", self.addr)):
            if value is not None:
                parts.append(f"{key}={value}")
        parts.extend(f"{k}={v}" for k, v in self.props)
        return ",".join(parts)


@dataclass(frozen=True)
class LabDisk:
    """A disk of L1: an empty raw image behind a virtio-blk or NVMe function of its own."""

    id: str
    size_mb: int
    driver: str
    addr: str
    serial: str | None = None

    def image_name(self) -> str:
        """The image's file name in the job folder."""
        return f"disk-{self.id}.img"

    def qemu_args(self, image: str) -> list[str]:
        """The ``-drive`` and ``-device`` options for this disk, its image at ``image``."""
        file = image.replace(",", ",,")  # QEMU's escape for a comma in an option value
        device = [self.driver, f"drive={self.id}", f"id={self.id}", f"addr={self.addr}"]
        serial = self.serial or (self.id if self.driver == "nvme" else None)
        if serial is not None:
            device.append(f"serial={serial}")
        return [
            "-drive", f"id={self.id},if=none,file={file},format=raw",
            "-device", ",".join(device),
        ]  # fmt: skip


@dataclass(frozen=True)
class Topology:
    """The L1 machine of one lab run."""

    name: str
    description: str
    viommu: str
    snoop_control: bool = False
    devices: tuple[LabDevice, ...] = ()
    kernel_args: tuple[str, ...] = ()
    memory_mb: int = 2048
    smp: int = 1
    disks: tuple[LabDisk, ...] = ()
    #: Whether the lab tests with no topology marker (every topology's) run on it too.
    common_tests: bool = True
    source: str = field(default="", compare=False)

    @property
    def file(self) -> Path | None:
        """The file this topology was read from (None for a built-in one)."""
        if not self.source or self.source.startswith("built-in "):
            return None
        return Path(self.source)

    def viommu_arg(self) -> str:
        """The value of the vIOMMU's ``-device`` option."""
        if self.viommu == "intel-iommu":
            # intremap=on: without interrupt remapping VFIO refuses the group
            # (EPERM, "No interrupt remapping support").
            snoop = "on" if self.snoop_control else "off"
            return f"intel-iommu,intremap=on,snoop-control={snoop}"
        return "virtio-iommu-pci,addr=0x02"

    def guest_address(self, device_id: str) -> str:
        """The PCI address L1's kernel gives the device with id ``device_id``.

        Devices on the root bus keep their slot; the kernel numbers the
        secondary buses of root-bus bridges 1, 2, ... in slot order (one
        level of bridges is supported, which is all the built-in topologies
        use). Raises :class:`LabError` for an unknown id or a device without
        a fixed ``addr``.
        """
        by_id = {d.id: d for d in self.devices if d.id is not None}
        by_id |= {d.id: LabDevice(d.driver, d.id, None, d.addr) for d in self.disks}
        dev = by_id.get(device_id)
        if dev is None:
            raise LabError(f"topology {self.name} has no device with id {device_id!r}")
        bridges = sorted(
            (_slot(d.addr), d.id)
            for d in self.devices
            if d.bus is None and d.addr is not None and d.driver in _BRIDGES
        )
        if dev.addr is None:
            raise LabError(f"device {device_id!r} of topology {self.name} has no fixed addr")
        slot = _slot(dev.addr)
        func = int(dev.addr.split(".")[1]) if "." in dev.addr else 0
        if dev.bus is None:
            return f"0000:00:{slot:02x}.{func}"
        order = [bridge_id for _, bridge_id in bridges]
        if dev.bus not in order:
            raise LabError(f"device {device_id!r}: bus {dev.bus!r} is not a root-bus bridge")
        return f"0000:{order.index(dev.bus) + 1:02x}:{slot:02x}.{func}"

    def kernel_cmdline(self) -> tuple[str, ...]:
        """Kernel arguments this topology needs (beyond the lab's own)."""
        base = ("intel_iommu=on",) if self.viommu == "intel-iommu" else ()
        return base + self.kernel_args


_BRIDGES = {"pcie-pci-bridge", "pci-bridge", "pcie-root-port", "ioh3420", "x3130-upstream"}


def _slot(addr: str) -> int:
    return int(addr.split(".", maxsplit=1)[0], 0)


def builtin_names() -> list[str]:
    """Names of the topologies that ship with kvmvfio."""
    folder = resources.files("kvmvfio.lab") / "topologies"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


#: How the lab runner tells a job in L1 which topology L1 was booted with
#: (a built-in name, or the path of a copy of its file).
BOOTED_ENV = "KVMVFIO_LAB_TOPOLOGY"


def booted() -> Topology:
    """The topology L1 was booted with, for a job inside L1 (``default`` if unset)."""
    return load(os.environ.get(BOOTED_ENV, "default"))


def load(name_or_path: str) -> Topology:
    """Load a built-in topology by name, or a topology file by path.

    Raises :class:`LabError` naming the topology, file or field at fault.
    """
    looks_like_path = "/" in name_or_path or name_or_path.endswith(".toml")
    if looks_like_path:
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise LabError(f"cannot read topology file {path}: {err.strerror}") from err
        return parse(text, name=path.stem, source=str(path))
    names = builtin_names()
    if name_or_path not in names:
        raise LabError(
            f"unknown topology {name_or_path!r}: built-in topologies are {', '.join(names)}, "
            "or give the path of a .toml file"
        )
    res = resources.files("kvmvfio.lab") / "topologies" / f"{name_or_path}.toml"
    return parse(
        res.read_text(encoding="utf-8"), name=name_or_path, source=f"built-in {name_or_path}"
    )


def parse(text: str, *, name: str, source: str) -> Topology:
    """Parse topology TOML ``text``; ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise LabError(f"topology {source}: not valid TOML: {err}") from err
    return _Checker(source).topology(name, data)


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> LabError:
        return LabError(f"topology {self.source}: {where}: {problem}")

    def keys(self, where: str, table: dict[str, object], allowed: set[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(
                where, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})"
            )

    def string(self, where: str, value: object, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, not {type(value).__name__}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(where, f"{value!r} is not allowed here")
        return value

    def integer(self, where: str, value: object, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(where, f"must be an integer from {low} to {high}, not {value!r}")
        return value

    def topology(self, name: str, data: dict[str, object]) -> Topology:
        self.keys(
            "top level",
            data,
            {
                "description",
                "viommu",
                "device",
                "disk",
                "kernel-args",
                "memory-mb",
                "smp",
                "common-tests",
            },
        )
        description = self.string("description", data.get("description", ""))
        viommu = data.get("viommu")
        if not isinstance(viommu, dict):
            raise self.fail(
                "viommu", "missing [viommu] table (model = one of " + ", ".join(VIOMMU_MODELS) + ")"
            )
        self.keys("[viommu]", viommu, {"model", "snoop-control"})
        model = self.string("viommu.model", viommu.get("model"))
        if model not in VIOMMU_MODELS:
            raise self.fail("viommu.model", f"{model!r} is not one of {', '.join(VIOMMU_MODELS)}")
        snoop = viommu.get("snoop-control", False)
        if not isinstance(snoop, bool):
            raise self.fail("viommu.snoop-control", "must be true or false")
        if snoop and model != "intel-iommu":
            raise self.fail("viommu.snoop-control", "only intel-iommu has snoop-control")
        raw_devices = data.get("device", [])
        if not isinstance(raw_devices, list):
            raise self.fail("device", "must be an array of tables ([[device]])")
        devices = tuple(self.device(i, d) for i, d in enumerate(raw_devices))
        ids = [d.id for d in devices if d.id is not None]
        if len(ids) != len(set(ids)):
            raise self.fail("device", "two devices have the same id")
        raw_disks = data.get("disk", [])
        if not isinstance(raw_disks, list):
            raise self.fail("disk", "must be an array of tables ([[disk]])")
        disks = tuple(self.disk(i, d) for i, d in enumerate(raw_disks))
        self.distinct(devices, disks)
        seen: set[str] = set()
        for i, dev in enumerate(devices):
            # QEMU creates devices in order: a bus must exist before its children.
            if dev.bus is not None and dev.bus not in seen:
                raise self.fail(
                    f"device[{i}].bus", f"{dev.bus!r} is not the id of a device above it"
                )
            if dev.id is not None:
                seen.add(dev.id)
        raw_args = data.get("kernel-args", [])
        if not isinstance(raw_args, list):
            raise self.fail("kernel-args", "must be an array of strings")
        kernel_args = tuple(
            self.string(f"kernel-args[{i}]", a, _KARG) for i, a in enumerate(raw_args)
        )
        common = data.get("common-tests", True)
        if not isinstance(common, bool):
            raise self.fail("common-tests", "must be true or false")
        return Topology(
            name=name,
            description=description,
            viommu=model,
            snoop_control=snoop,
            devices=devices,
            kernel_args=kernel_args,
            memory_mb=self.integer("memory-mb", data.get("memory-mb", 2048), 512, 16384),
            smp=self.integer("smp", data.get("smp", 1), 1, 8),
            disks=disks,
            common_tests=common,
            source=self.source,
        )

    def disk(self, index: int, raw: object) -> LabDisk:
        where = f"disk[{index}]"
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table")
        self.keys(where, raw, {"id", "size-mb", "driver", "addr", "serial"})
        for key in ("id", "size-mb", "driver", "addr"):
            if key not in raw:
                raise self.fail(where, f"missing field {key!r}")
        driver = self.string(f"{where}.driver", raw["driver"])
        if driver not in DISK_DRIVERS:
            raise self.fail(
                f"{where}.driver", f"{driver!r} is not one of {', '.join(DISK_DRIVERS)}"
            )
        addr = self.string(f"{where}.addr", raw["addr"], _ADDR)
        if _slot(addr) not in DISK_SLOTS or "." in addr:
            raise self.fail(
                f"{where}.addr",
                f"{addr!r}: a disk takes a slot from {DISK_SLOTS[0]:#x} to {DISK_SLOTS[-1]:#x} "
                "(function 0), after the lab's own devices",
            )
        serial = raw.get("serial")
        return LabDisk(
            id=self.string(f"{where}.id", raw["id"], _IDENT),
            size_mb=self.integer(f"{where}.size-mb", raw["size-mb"], 1, 4096),
            driver=driver,
            addr=addr,
            serial=None if serial is None else self.string(f"{where}.serial", serial, _SERIAL),
        )

    def distinct(self, devices: tuple[LabDevice, ...], disks: tuple[LabDisk, ...]) -> None:
        """Ids are unique across devices and disks, and no two take one slot of pcie.0."""
        ids = [d.id for d in devices if d.id is not None]
        for i, disk in enumerate(disks):
            if disk.id in ids:
                raise self.fail(
                    f"disk[{i}].id", f"{disk.id!r} is already the id of a device or disk"
                )
            ids.append(disk.id)
        slots: set[int] = {_slot(d.addr) for d in devices if d.bus is None and d.addr is not None}
        for i, disk in enumerate(disks):
            if _slot(disk.addr) in slots:
                raise self.fail(f"disk[{i}].addr", f"slot {disk.addr} is taken by another device")
            slots.add(_slot(disk.addr))

    def device(self, index: int, raw: object) -> LabDevice:
        where = f"device[{index}]"
        if not isinstance(raw, dict):
            raise self.fail(where, "must be a table")
        self.keys(where, raw, {"driver", "id", "bus", "addr", "props"})
        if "driver" not in raw:
            raise self.fail(where, "missing field 'driver' (a QEMU device name such as 'edu')")
        driver = self.string(f"{where}.driver", raw["driver"], _IDENT)
        opt: dict[str, str | None] = {}
        for key, pattern in (("id", _IDENT), ("bus", _IDENT), ("addr", _ADDR)):
            value = raw.get(key)
            opt[key] = None if value is None else self.string(f"{where}.{key}", value, pattern)
        props_raw = raw.get("props", {})
        if not isinstance(props_raw, dict):
            raise self.fail(f"{where}.props", "must be a table")
        props: list[tuple[str, str]] = []
        for key, value in props_raw.items():
            self.string(f"{where}.props key", key, _IDENT)
            if key in {"id", "bus", "addr", "driver"}:
                raise self.fail(f"{where}.props.{key}", "set it as a field of the device instead")
            if isinstance(value, bool):
                text = "on" if value else "off"
            elif isinstance(value, int):
                text = str(value)
            else:
                text = self.string(f"{where}.props.{key}", value, _VALUE)
            props.append((key, text))
        return LabDevice(
            driver=driver, id=opt["id"], bus=opt["bus"], addr=opt["addr"], props=tuple(props)
        )
