"""Lab topologies: which vIOMMU and which PCI devices the L1 guest gets.

A topology is data, a small TOML file. The built-in ones live beside this
module (``topologies/NAME.toml``); a user adds one by writing a file and
passing its path. The format::

    description = "one line"
    kernel-args = ["extra=1"]          # optional, appended to L1's command line
    memory-mb = 2048                   # optional
    smp = 1                            # optional; see below

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
            {"description", "viommu", "device", "kernel-args", "memory-mb", "smp"},
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
        return Topology(
            name=name,
            description=description,
            viommu=model,
            snoop_control=snoop,
            devices=devices,
            kernel_args=kernel_args,
            memory_mb=self.integer("memory-mb", data.get("memory-mb", 2048), 512, 16384),
            smp=self.integer("smp", data.get("smp", 1), 1, 8),
            source=self.source,
        )

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
