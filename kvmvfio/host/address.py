"""PCI addresses: ``[domain:]bus:slot.function``, parsed strictly.

Linux names a PCI function after its position: the PCI domain (segment), the
bus, the slot (device number) and the function, printed ``%04x:%02x:%02x.%d``
(``drivers/pci/probe.c``). That name is the directory of the device in sysfs
and the name ``VFIO_GROUP_GET_DEVICE_FD`` takes, so a string that reaches a
path or an ioctl must be exactly such a name: anything else (``../x``, a
trailing newline, a NUL) is refused here, before it can go anywhere.

The domain is 16 bits on most hosts; Intel VMD puts its domains at 0x10000
and above (``drivers/pci/controller/vmd.c``), which Linux prints with five
hex digits. So the domain takes 4 to 8 hex digits and prints ``%04x`` like
the kernel; bus and slot take exactly 2, the function exactly 1.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Self

from kvmvfio.errors import InvalidAddress

#: Longest text worth looking at: an 8-digit domain, bus, slot and function.
_MAX_LEN = len("00000000:00:00.0")

_ADDRESS = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4,8}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<slot>[0-9a-fA-F]{2})\.(?P<function>[0-7])"
)
_HEX = frozenset("0123456789abcdefABCDEF")

MAX_DOMAIN = 0xFFFFFFFF
MAX_SLOT = 0x1F
MAX_FUNCTION = 7


def _why_not(text: str) -> str:
    """Explain in a few words why ``text`` does not match the address form."""
    if not text:
        return "empty"
    if len(text) > _MAX_LEN:
        return f"too long ({len(text)} characters)"
    if any(c.isspace() for c in text):
        return "contains whitespace"
    if "/" in text or "\0" in text or text in {".", ".."}:
        return "contains a path separator or NUL"
    head, dot, function = text.rpartition(".")
    if not dot:
        return "no '.' before the function"
    parts = head.split(":")
    if len(parts) not in (2, 3):
        return "expected one or two ':'"
    for part in [*parts, function]:
        if not part or not set(part) <= _HEX:
            return f"{part!r} is not hexadecimal"
    if len(parts) == 3 and not 4 <= len(parts[0]) <= 8:
        return "the domain takes 4 to 8 hex digits"
    if len(parts[-2]) != 2:
        return "the bus takes 2 hex digits"
    if len(parts[-1]) != 2:
        return "the slot takes 2 hex digits"
    if len(function) != 1 or int(function, 16) > MAX_FUNCTION:
        return "the function is one digit, 0 to 7"
    return "malformed"


@dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    """The address of one PCI function; ``str()`` is the kernel's name for it."""

    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        # One comparison chain first: this runs for every address read.
        d, b, s, f = self.domain, self.bus, self.slot, self.function
        if (
            type(d) is int
            and type(b) is int
            and type(s) is int
            and type(f) is int
            and 0 <= d <= MAX_DOMAIN
            and 0 <= b <= 0xFF
            and 0 <= s <= MAX_SLOT
            and 0 <= f <= MAX_FUNCTION
        ):
            return
        for name, value, top in (
            ("domain", self.domain, MAX_DOMAIN),
            ("bus", self.bus, 0xFF),
            ("slot", self.slot, MAX_SLOT),
            ("function", self.function, MAX_FUNCTION),
        ):
            # bool is an int; an address made of True/False is a bug upstream.
            if type(value) is not int or not 0 <= value <= top:
                raise InvalidAddress(
                    repr(self._fields()), f"{name} {value!r} is not in 0..{top:#x}"
                )

    def _fields(self) -> tuple[object, ...]:
        return (self.domain, self.bus, self.slot, self.function)

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse ``[DDDD:]BB:SS.F`` (hex, any case; the domain defaults to 0).

        Raise :class:`~kvmvfio.errors.InvalidAddress`, with the reason, for
        anything else: surrounding whitespace, path characters, a slot above
        0x1f, a function above 7, extra parts.
        """
        if not isinstance(text, str):
            raise InvalidAddress(repr(text), f"a {type(text).__name__}, not text")
        if cls is PciAddress:
            # Every scan parses each address several times (bus listing,
            # group listing, physfn/virtfn links); the values are immutable.
            return _parse_cached(text)  # type: ignore[return-value]
        return cls._parse(text)

    @classmethod
    def _parse(cls, text: str) -> Self:
        # fullmatch, not match + "$": "$" would let a trailing newline through.
        m = _ADDRESS.fullmatch(text) if len(text) <= _MAX_LEN else None
        if m is None:
            raise InvalidAddress(text, _why_not(text))
        slot = int(m["slot"], 16)
        if slot > MAX_SLOT:
            raise InvalidAddress(text, f"slot {slot:#04x} is above {MAX_SLOT:#04x}")
        domain = m["domain"]
        return cls(
            int(domain, 16) if domain else 0,
            int(m["bus"], 16),
            slot,
            int(m["function"]),
        )

    @classmethod
    def coerce(cls, value: str | PciAddress) -> PciAddress:
        """Return ``value`` if it is an address already, else parse it."""
        if isinstance(value, PciAddress):
            return value
        return cls.parse(value)

    @property
    def devfn(self) -> int:
        """Slot and function in one byte, as the PCI routing ID has them."""
        return self.slot << 3 | self.function

    @property
    def rid(self) -> int:
        """The 16-bit routing ID within the domain: bus and devfn."""
        return self.bus << 8 | self.devfn

    @classmethod
    def from_rid(cls, domain: int, rid: int) -> PciAddress:
        """Build the address of routing ID ``rid`` (bus << 8 | devfn) in ``domain``."""
        if not 0 <= rid <= 0xFFFF:
            raise InvalidAddress(hex(rid), "a routing ID is 16 bits")
        return cls(domain, rid >> 8, (rid >> 3) & 0x1F, rid & 7)

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"


@functools.lru_cache(maxsize=1 << 16)
def _parse_cached(text: str) -> PciAddress:
    return PciAddress._parse(text)
