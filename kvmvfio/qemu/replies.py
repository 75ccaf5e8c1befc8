"""QEMU's QMP replies and events, checked against QEMU's schema and made typed values, once.

QEMU runs unprivileged, and a guest that escaped into it would answer for
it. So every reply and event kvmvfio uses is checked here, at the
boundary, against the shape QEMU's QAPI schema gives it (``qapi/qom.json``,
``qdev.json``, ``machine.json``, ``misc.json``), and deeper code sees only
the frozen values below, never a raw dict. A reply that does not fit
raises :class:`ReplyMisfit`, which :class:`~kvmvfio.qemu.qmp.Monitor`
turns into :class:`~kvmvfio.errors.QemuReplyInvalid` naming the command.

The rules, from QEMU's schema and its QMP specification
(``docs/interop/qmp-spec.rst``):

- A command without ``returns`` in the schema answers ``{"return": {}}``:
  an object (see :data:`EMPTY`).
- A struct's members that kvmvfio does not read are ignored, whatever they
  hold: the QMP specification lets QEMU add members, and asks clients to
  ignore the ones they do not know. Those kvmvfio reads must be there
  (unless optional) and of their type.
- QAPI's ``size`` is an unsigned 64-bit integer; a JSON ``true`` is not a
  number, nor is ``1.0``.

Bounds kvmvfio adds, because the schema sets none: one message of at most
:data:`MAX_MESSAGE` bytes (enforced on the wire, where it is read), lists
of at most :data:`MAX_ITEMS` entries, strings of at most :data:`MAX_TEXT`
printable characters (names, QOM types and paths: nothing QEMU makes
holds a control character), and guest RAM of less than :data:`MAX_RAM`.

:data:`RETURNS` and :data:`EVENTS` state, as data, what each command
kvmvfio sends returns and what the event it waits for carries; the parsers
are built on them, and the lab compares them with a running QEMU's own
``query-qmp-schema`` (``tests/lab/test_qemu_handoff.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

#: Longest QMP message kvmvfio reads, in bytes (QEMU 11's whole schema is a few hundred KiB).
MAX_MESSAGE = 1 << 20
#: Most entries kvmvfio takes in one list (``qom-list`` of a VM's devices, say).
MAX_ITEMS = 4096
#: Longest string kvmvfio takes in a reply (a name, a QOM type, a QOM path).
MAX_TEXT = 4096
#: Guest RAM beyond this is no machine's: a 52-bit physical address space (x86-64, arm64).
MAX_RAM = 1 << 52

_U64 = 1 << 64
_CHILD = re.compile(r"child<(.+)>")


class ReplyMisfit(Exception):
    """What was wrong with a reply; :class:`~kvmvfio.qemu.qmp.Monitor` names the command."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


# -- the shapes, as QEMU's schema gives them -----------------------------------------------

#: A member type kvmvfio reads: QAPI's builtin names (``size`` introspects as ``int``).
MemberType = Literal["str", "bool", "size"]


@dataclass(frozen=True)
class Member:
    """One member of a QAPI struct that kvmvfio reads."""

    name: str
    type: MemberType
    optional: bool = False


@dataclass(frozen=True)
class Struct:
    """A QAPI struct (a JSON object), as far as kvmvfio reads it."""

    name: str
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class ListOf:
    """A QAPI array (``['ObjectPropertyInfo']``)."""

    element: Struct


#: QAPI's ``any``: a value of any JSON type (what ``qom-get`` returns).
ANY: Literal["any"] = "any"
Shape = Struct | ListOf | Literal["any"]

#: What a command without ``returns`` answers: ``{}``.
EMPTY = Struct("{}")
OBJECT_PROPERTY_INFO = Struct("ObjectPropertyInfo", (Member("name", "str"), Member("type", "str")))
OBJECT_TYPE_INFO = Struct(
    "ObjectTypeInfo", (Member("name", "str"), Member("abstract", "bool", optional=True))
)
MEMORY_INFO = Struct(
    "MemoryInfo", (Member("base-memory", "size"), Member("plugged-memory", "size", optional=True))
)

#: What each command kvmvfio sends returns, per QEMU's schema.
RETURNS: dict[str, Shape] = {
    "getfd": EMPTY,  # misc.json
    "closefd": EMPTY,
    "object-add": EMPTY,  # qom.json
    "object-del": EMPTY,
    "qom-list": ListOf(OBJECT_PROPERTY_INFO),
    "qom-list-types": ListOf(OBJECT_TYPE_INFO),
    "qom-get": ANY,  # link<> properties come back as their target's path, a str
    "device_add": EMPTY,  # qdev.json
    "device_del": EMPTY,
    "query-memory-size-summary": MEMORY_INFO,  # machine.json
}

#: The data of each event kvmvfio waits for, per QEMU's schema.
EVENTS: dict[str, Struct] = {
    "DEVICE_DELETED": Struct(
        "DEVICE_DELETED", (Member("device", "str", optional=True), Member("path", "str"))
    ),
}


# -- the typed values ---------------------------------------------------------------------


@dataclass(frozen=True)
class QomProperty:
    """One entry of ``qom-list``: a property of a QOM object (a child is one too)."""

    name: str
    type: str

    @property
    def child_type(self) -> str | None:
        """The QOM type of a ``child<TYPE>`` property; None for any other property."""
        match = _CHILD.fullmatch(self.type)
        return match.group(1) if match else None


@dataclass(frozen=True)
class QomType:
    """One entry of ``qom-list-types``."""

    name: str
    abstract: bool = False


@dataclass(frozen=True)
class MemorySize:
    """``query-memory-size-summary``: the guest's RAM in bytes."""

    base: int
    plugged: int = 0

    @property
    def total(self) -> int:
        """All the RAM VFIO will pin: the base memory and any plugged since."""
        return self.base + self.plugged


@dataclass(frozen=True)
class DeviceDeleted:
    """A ``DEVICE_DELETED`` event: a device is gone from the guest and from QEMU."""

    device: str | None
    path: str


# -- checking -----------------------------------------------------------------------------


def kind(value: object) -> str:
    """What JSON type ``value`` is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ReplyMisfit(f"{where} is {kind(value)}, not a string")
    if len(value) > MAX_TEXT:
        raise ReplyMisfit(f"{where} is {len(value)} characters long (at most {MAX_TEXT})")
    if not value.isprintable():
        raise ReplyMisfit(f"{where} holds control characters: {value[:40]!r}")
    return value


def _member(member: Member, value: object, where: str) -> object:
    if member.type == "str":
        return _text(value, where)
    if member.type == "bool":
        if not isinstance(value, bool):
            raise ReplyMisfit(f"{where} is {kind(value)}, not a boolean")
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReplyMisfit(f"{where} is {kind(value)}, not an integer")
    if not 0 <= value < _U64:
        raise ReplyMisfit(f"{where} is {value}, outside QAPI's size (0 to 2**64-1)")
    return value


def check_struct(shape: Struct, raw: object, where: str = "the reply") -> dict[str, object]:
    """The members of ``raw`` that ``shape`` names, checked; :class:`ReplyMisfit` otherwise."""
    if not isinstance(raw, dict):
        raise ReplyMisfit(f"{where} is {kind(raw)}, not an object ({shape.name})")
    out: dict[str, object] = {}
    for member in shape.members:
        if member.name not in raw:
            if member.optional:
                continue
            raise ReplyMisfit(f"{where} has no '{member.name}' ({shape.name})")
        out[member.name] = _member(member, raw[member.name], f"{where}'s '{member.name}'")
    return out


def check_list(shape: ListOf, raw: object) -> list[dict[str, object]]:
    """Each entry of ``raw`` checked against ``shape``'s element; :class:`ReplyMisfit` otherwise."""
    if not isinstance(raw, list):
        raise ReplyMisfit(f"the reply is {kind(raw)}, not a list of {shape.element.name}")
    if len(raw) > MAX_ITEMS:
        raise ReplyMisfit(f"the reply lists {len(raw)} entries (at most {MAX_ITEMS})")
    return [check_struct(shape.element, item, f"entry {i}") for i, item in enumerate(raw)]


# -- per command --------------------------------------------------------------------------


def empty(raw: object) -> None:
    """The reply of a command without ``returns``: ``{}``."""
    check_struct(EMPTY, raw)


def qom_list(raw: object) -> tuple[QomProperty, ...]:
    """``qom-list``: ``[ObjectPropertyInfo]``."""
    return tuple(
        QomProperty(str(item["name"]), str(item["type"]))
        for item in check_list(ListOf(OBJECT_PROPERTY_INFO), raw)
    )


def qom_list_types(raw: object) -> tuple[QomType, ...]:
    """``qom-list-types``: ``[ObjectTypeInfo]``."""
    return tuple(
        QomType(str(item["name"]), item.get("abstract") is True)
        for item in check_list(ListOf(OBJECT_TYPE_INFO), raw)
    )


def qom_path(raw: object) -> str:
    """``qom-get`` of a ``link<>`` property: its target's QOM path ("" when unset)."""
    return _text(raw, "the reply")


def memory_size(raw: object) -> MemorySize:
    """``query-memory-size-summary``: ``MemoryInfo``, with RAM below :data:`MAX_RAM`."""
    info = check_struct(MEMORY_INFO, raw)
    base, plugged = info["base-memory"], info.get("plugged-memory", 0)
    assert isinstance(base, int)  # checked as sizes
    assert isinstance(plugged, int)
    if base + plugged >= MAX_RAM:
        raise ReplyMisfit(
            f"the guest's RAM would be {base + plugged} bytes, more than a 52-bit physical "
            "address space holds"
        )
    return MemorySize(base, plugged)


def device_deleted(data: object) -> DeviceDeleted:
    """A ``DEVICE_DELETED`` event's data."""
    info = check_struct(EVENTS["DEVICE_DELETED"], data, "its data")
    device = info.get("device")
    return DeviceDeleted(None if device is None else str(device), str(info["path"]))


# -- a whole reply, as libvirt passes it on -------------------------------------------------


def decode(text: str) -> object:
    """A QMP message from its JSON text, at most :data:`MAX_MESSAGE` bytes long."""
    if len(text) > MAX_MESSAGE:
        raise ReplyMisfit(f"the reply is {len(text)} characters long (at most {MAX_MESSAGE})")
    try:
        return json.loads(text)
    except RecursionError:
        raise ReplyMisfit("the reply is JSON nested too deeply") from None
    except ValueError as err:  # not JSON, or an integer of thousands of digits
        raise ReplyMisfit(f"the reply is not JSON kvmvfio reads ({err})") from None


@dataclass(frozen=True)
class Refusal:
    """An error reply: QEMU's error class and its words."""

    error_class: str
    desc: str


def outcome(raw: object) -> object | Refusal:
    """The ``return`` value of a reply, or its :class:`Refusal` (``{"error": ...}``)."""
    if not isinstance(raw, dict):
        raise ReplyMisfit(f"the reply is {kind(raw)}, not an object")
    if "error" in raw:
        error = raw["error"]
        if not isinstance(error, dict):
            raise ReplyMisfit(f"its 'error' is {kind(error)}, not an object")
        cls, desc = error.get("class"), error.get("desc")
        if not isinstance(cls, str) or not isinstance(desc, str):
            raise ReplyMisfit("its 'error' has no string 'class' and 'desc'")
        return Refusal(cls, desc)
    if "return" not in raw:
        raise ReplyMisfit("it has neither 'return' nor 'error'")
    value: object = raw["return"]
    return value
