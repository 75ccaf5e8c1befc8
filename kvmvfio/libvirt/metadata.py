"""What a libvirt domain asks of kvmvfio: its ``<metadata>``, read as untrusted input.

A domain asks by carrying one element in kvmvfio's XML namespace in its
``<metadata>``::

    <metadata>
      <kvmvfio:devices xmlns:kvmvfio="urn:kvmvfio:libvirt:1" coherency="require">
        <kvmvfio:device address="0000:03:00.0" handoff="agent"/>
        <kvmvfio:device address="0000:04:00.0" reset="yes"/>
        <kvmvfio:vfs pf="0000:05:00.0" count="2" handoff="agent"/>
      </kvmvfio:devices>
    </metadata>

Attributes of ``<kvmvfio:device>`` (each may also stand on
``<kvmvfio:devices>`` as the default of its devices):

``address``   the PCI function, or a mediated device's UUID (required, on
              devices only)
``handoff``   ``libvirt`` (default): the domain's own ``<hostdev
              managed='no'>`` uses the device, kvmvfio prepares and checks
              it; ``agent``: ``kvmvfio agent`` hands it to the running QEMU by
              file descriptor (iommufd), no ``<hostdev>`` needed; ``none``:
              kvmvfio moves it to vfio-pci with the rest of its IOMMU group
              and gives it to no one (a GPU's audio function the VM does
              not use), no ``<hostdev>``
``path``      the kernel path checked and used: ``group`` (default for
              ``libvirt``, what libvirt's QEMU opens) or ``cdev`` (default
              and only choice for ``agent``)
``coherency`` ``require``, ``warn`` (default) or ``ignore``: the policy on
              enforced DMA cache coherency (docs/coherency.md)
``reset``     ``yes`` or ``no`` (default): reset the device when it goes back
``romfile``   an option ROM file for the device instead of its own, an
              absolute path (QEMU's ``romfile``), checked against the device
              before it is prepared; on ``handoff='agent'`` devices only (for
              ``libvirt``, the ``<hostdev>``'s ``<rom file=...>`` says it)
``rombar``    ``yes`` (default) or ``no``: ``no`` shows the device to the guest
              without its ROM BAR (QEMU's ``rombar=0``); ``handoff='agent'``
              only (for ``libvirt``, ``<rom bar='off'/>`` in the ``<hostdev>``)
``accept``    findings of prepare's safety checks to accept for this device,
              space-separated, the names of ``kvmvfio prepare --force``
              (``boot-vga``, ``console``, ``disk-in-use``,
              ``default-route``, ``in-use``); on devices only, never a default, and logged
              when used. Unknown names are refused.

``<kvmvfio:vfs pf="ADDR" count="N">`` asks for N virtual functions of the
SR-IOV physical function at ADDR rather than naming them; it takes the
attributes of a device but ``address``, and ``handoff`` must be ``agent``
or ``none`` (a ``<hostdev>`` can only name a VF chosen beforehand).
:func:`resolve` picks the VFs (:func:`kvmvfio.prepare.sriov.pick_vfs`): the
ones the domain holds already, then free ones in VF order, so the hook's
prepare, the agent and the hook's release name the same VFs.

The XML comes from libvirt, but a domain definition is written by whoever
may define domains, so it is parsed as hostile: no DTD, no entity
declarations or external entities (refused, never expanded), bounded size
and depth, and every attribute in kvmvfio's namespace checked, unknown ones
refused rather than ignored (a misspelt ``coherency`` must not silently
become ``warn``). Only what kvmvfio needs is kept: the name, the UUID, its
metadata, and the PCI ``<hostdev>`` elements.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from kvmvfio.errors import InvalidAddress, InvalidMdevUuid, UsageError
from kvmvfio.host import Host
from kvmvfio.host.address import PciAddress
from kvmvfio.host.mdev import canonical_name, is_uuid
from kvmvfio.prepare import safety
from kvmvfio.prepare.journal import DEFAULT_ROOT
from kvmvfio.prepare.owners import LIBVIRT_PREFIX, libvirt_owner
from kvmvfio.vfio.policy import Coherency, VfioPath, old_spelling

log = logging.getLogger(__name__)

#: kvmvfio's XML namespace in libvirt domain metadata.
NAMESPACE = "urn:kvmvfio:libvirt:1"
#: The prefix (libvirt's "key") kvmvfio's element is written with.
PREFIX = "kvmvfio"
#: Larger domain XML is refused unread (libvirt's own RPC caps strings lower).
MAX_XML_BYTES = 16 << 20
#: Deeper nesting is refused; libvirt's domain XML nests about 6 deep.
MAX_DEPTH = 64
#: More devices in one domain's kvmvfio metadata are refused.
MAX_DEVICES = 256
#: Longest domain name or UUID text kept.
_MAX_TEXT = 1024

_SEP = "\x1f"  # expat's namespace separator: a character no XML name contains
_DEVICES = f"{NAMESPACE}{_SEP}devices"
_DEVICE = f"{NAMESPACE}{_SEP}device"
_VFS = f"{NAMESPACE}{_SEP}vfs"
#: More VFs asked for by one <kvmvfio:vfs> are refused (a PF has at most 65535).
MAX_POOL = 0xFFFF


class Handoff(enum.StrEnum):
    """Who gives a device to the domain's QEMU."""

    LIBVIRT = "libvirt"
    AGENT = "agent"
    NONE = "none"  # moved off its host driver with its group, given to no one


#: The kernel path a device is checked on (and handed over by): kvmvfio's one
#: vocabulary, :class:`~kvmvfio.vfio.policy.VfioPath`. ``auto`` is ``cdev`` for
#: the agent (by fd) and ``group`` for libvirt (its QEMU opens the group node).
DevicePath = VfioPath


class MetadataError(UsageError):
    """A domain's XML or its kvmvfio metadata is malformed or refused."""

    def __init__(self, domain: str | None, problem: str) -> None:
        self.domain = domain
        self.problem = problem
        who = f"domain {domain!r}" if domain else "the domain XML"
        super().__init__(f"{who}: {problem}")


@dataclass(frozen=True)
class DeviceRequest:
    """One device a domain asks kvmvfio to manage."""

    address: str
    handoff: Handoff = Handoff.LIBVIRT
    path: VfioPath = VfioPath.GROUP
    coherency: Coherency = Coherency.WARN
    reset: bool = False
    accept: tuple[str, ...] = ()
    #: An option ROM file QEMU loads instead of the device's own (agent handoff).
    romfile: str | None = None
    #: False: QEMU shows the device without its ROM BAR (agent handoff).
    rombar: bool = True


@dataclass(frozen=True)
class VfPool:
    """``count`` VFs of PF ``pf``, each handed over as ``template`` says (its address aside)."""

    pf: str
    count: int
    template: DeviceRequest

    def device(self, address: str) -> DeviceRequest:
        """The request for one VF picked from the pool."""
        return dataclasses.replace(self.template, address=address)


@dataclass(frozen=True)
class Hostdev:
    """A PCI ``<hostdev>`` of the domain: its source address, ``managed``, its ROM file."""

    address: str
    managed: bool
    #: ``<rom file=...>``: the option ROM libvirt will have QEMU load instead of the device's.
    rom: str | None = None


@dataclass(frozen=True)
class DomainRequest:
    """What one domain asks of kvmvfio."""

    name: str
    uuid: str | None
    devices: tuple[DeviceRequest, ...]
    hostdevs: tuple[Hostdev, ...] = field(default=())
    pools: tuple[VfPool, ...] = field(default=())

    @property
    def owner(self) -> str:
        """The owner kvmvfio's journal claims the domain's IOMMU groups for."""
        return owner_of(self.name)

    @property
    def pci(self) -> tuple[DeviceRequest, ...]:
        """The PCI functions asked for (the devices kvmvfio moves between drivers)."""
        return tuple(d for d in self.devices if not is_uuid(d.address))

    def by_handoff(self, handoff: Handoff) -> tuple[DeviceRequest, ...]:
        """The devices handed over by ``handoff``."""
        return tuple(d for d in self.devices if d.handoff is handoff)


#: Owners of journal records kvmvfio's libvirt integration made start with this.
OWNER_PREFIX = LIBVIRT_PREFIX
#: The journal owner of the domain called ``name``.
owner_of = libvirt_owner


# -- the parser --------------------------------------------------------------------------


_YES_NO = {"yes": True, "no": False}
#: The ``<hostdev type=...>`` kvmvfio reads: PCI functions, and mediated devices by UUID.
_HOSTDEVS = ("pci", "mdev")
_DEVICE_ATTRS = (
    "address", "handoff", "path", "coherency", "reset", "accept", "romfile", "rombar"
)  # fmt: skip
_POOL_ATTRS = ("pf", "count", "handoff", "path", "coherency", "reset", "accept")
#: Attributes of <kvmvfio:devices>: defaults for its devices (never an address or an accept).
_DEFAULT_ATTRS = ("handoff", "path", "coherency", "reset")


def _choice(enum_type: type[enum.StrEnum], attr: str, value: str, where: str) -> str:
    allowed = [m.value for m in enum_type]
    if value not in allowed:
        raise ValueError(f"{where} has {attr}={value!r}; expected one of {', '.join(allowed)}")
    return value


def _options(attrs: Mapping[str, str], where: str, base: dict[str, str]) -> dict[str, str]:
    """Check the attributes of a kvmvfio element and lay them over ``base``."""
    allowed = {"<kvmvfio:device>": _DEVICE_ATTRS, "<kvmvfio:vfs>": _POOL_ATTRS}.get(
        where, _DEFAULT_ATTRS
    )
    out = dict(base)
    for name, value in attrs.items():
        if name not in allowed:
            raise ValueError(
                f"{where} has an unknown attribute {name.replace(_SEP, ' ')!r} "
                f"(known: {', '.join(allowed)})"
            )
        if name == "handoff":
            _choice(Handoff, name, value, where)
        elif name == "path":
            notice = old_spelling(value, "path=")
            if notice:
                log.info("%s: %s", where, notice)
            else:
                _choice(VfioPath, name, value, where)
        elif name == "coherency":
            _choice(Coherency, name, value, where)
        elif name in ("reset", "rombar") and value not in _YES_NO:
            raise ValueError(f"{where} has {name}={value!r}; expected yes or no")
        elif name == "accept":
            _accepted(value, where)
        elif name == "romfile":
            _romfile(value, where)
        out[name] = value
    return out


def _device(opts: dict[str, str]) -> DeviceRequest:
    text = opts.get("address")
    if text is None:
        raise ValueError("<kvmvfio:device> has no address attribute")
    try:
        address = canonical_name(text)
    except InvalidAddress as err:
        raise ValueError(f"<kvmvfio:device address={text[:40]!r}>: {err.reason}") from None
    except InvalidMdevUuid:
        raise ValueError(
            f"<kvmvfio:device address={text[:40]!r}>: neither a PCI address nor an mdev's UUID"
        ) from None
    handoff = Handoff(opts.get("handoff", Handoff.LIBVIRT))
    default_path = VfioPath.CDEV if handoff is Handoff.AGENT else VfioPath.GROUP
    path = VfioPath(opts.get("path", default_path))
    if path is VfioPath.AUTO:
        path = default_path
    if path is VfioPath.GROUP_IOMMUFD and handoff is not Handoff.NONE:
        raise ValueError(
            f"device {address} has path='group-iommufd': no QEMU opens a group on iommufd "
            "(that path is kvmvfio's own sessions'); use path='cdev' or path='group'"
        )
    if handoff is Handoff.AGENT and path is not VfioPath.CDEV:
        raise ValueError(
            f"device {address} has handoff='agent' with path={path.value!r}: the agent hands "
            "devices over by file descriptor, which QEMU accepts only on the iommufd (cdev) path"
        )
    romfile = opts.get("romfile")
    if romfile is not None and handoff is not Handoff.AGENT:
        raise ValueError(
            f"device {address} has romfile= with handoff={handoff.value!r}: only the agent "
            "hands QEMU a ROM file; with libvirt's handoff, put <rom file='...'/> in its <hostdev>"
        )
    rombar = _YES_NO[opts.get("rombar", "yes")]
    if not rombar and handoff is not Handoff.AGENT:
        raise ValueError(
            f"device {address} has rombar='no' with handoff={handoff.value!r}: only the agent "
            "hands QEMU the device; with libvirt's handoff, put <rom bar='off'/> in its <hostdev>"
        )
    if not rombar and romfile is not None:
        raise ValueError(f"device {address} has both romfile= and rombar='no': choose one")
    return DeviceRequest(
        address=address,
        handoff=handoff,
        path=path,
        coherency=Coherency(opts.get("coherency", Coherency.WARN)),
        reset=_YES_NO[opts.get("reset", "no")],
        accept=_accepted(opts.get("accept", ""), "<kvmvfio:device>"),
        romfile=romfile,
        rombar=rombar,
    )


def _romfile(value: str, where: str) -> str:
    """A ``romfile`` attribute: an absolute path the kernel can take (not looked up here)."""
    if not value.startswith("/") or "\0" in value or len(value.encode()) >= 4096:
        raise ValueError(
            f"{where} has romfile={value[:60]!r}; expected an absolute path to a ROM file"
        )
    return value


def _pool(opts: dict[str, str]) -> VfPool:
    text, count_text = opts.pop("pf", None), opts.pop("count", None)
    if text is None:
        raise ValueError("<kvmvfio:vfs> has no pf attribute (the physical function's address)")
    try:
        pf = str(PciAddress.parse(text))
    except InvalidAddress as err:
        raise ValueError(f"<kvmvfio:vfs pf={text[:40]!r}>: {err.reason}") from None
    if count_text is None:
        raise ValueError(f"<kvmvfio:vfs pf='{pf}'> has no count attribute")
    if not (count_text.isascii() and count_text.isdigit()) or not 1 <= int(count_text) <= MAX_POOL:
        raise ValueError(
            f"<kvmvfio:vfs pf='{pf}'> has count={count_text[:20]!r}; expected a whole number "
            f"from 1 to {MAX_POOL}"
        )
    handoff = opts.get("handoff", Handoff.LIBVIRT)
    if handoff == Handoff.LIBVIRT:
        raise ValueError(
            f"<kvmvfio:vfs pf='{pf}'> would be handed over by libvirt, but no <hostdev> can name "
            "a VF that is picked when the domain starts: set handoff='agent' (by fd) or name "
            "the VFs with <kvmvfio:device address=...>"
        )
    # The address is the PF's only while the template is checked; each VF gets its own.
    return VfPool(pf, int(count_text), _device({**opts, "address": pf}))


def _accepted(value: str, where: str) -> tuple[str, ...]:
    names = value.split()
    unknown = [n for n in names if safety.canonical(n) not in safety.CHECKS]
    if unknown:
        raise ValueError(
            f"{where} has accept={value[:80]!r}: {unknown[0][:40]!r} is not a finding kvmvfio "
            f"knows; one of {', '.join(safety.CHECKS)}"
        )
    return tuple(dict.fromkeys(safety.canonical(n) for n in names))


def _hex(text: str | None, what: str) -> int:
    if text is None:
        raise ValueError(f"a PCI <hostdev> source address has no {what}")
    digits = text[2:] if text[:2].lower() == "0x" else text
    if not digits or len(digits) > 8 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        raise ValueError(f"a PCI <hostdev> source address has {what}={text[:20]!r}")
    return int(digits, 16)


class _Reader:
    """Streaming expat handlers keeping only what kvmvfio needs."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.name: str | None = None
        self.uuid: str | None = None
        self.text: list[str] | None = None
        self.seen_devices = False
        self.defaults: dict[str, str] = {}
        self.devices: list[DeviceRequest] = []
        self.pools: list[VfPool] = []
        self.hostdevs: list[Hostdev] = []
        self._hostdev: dict[str, str] | None = None

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        depth = len(self.stack)
        if depth >= MAX_DEPTH:
            raise ValueError(f"elements nest deeper than {MAX_DEPTH} levels")
        if depth == 0 and tag != "domain":
            raise ValueError(f"the root element is <{tag.replace(_SEP, ' ')}>, not <domain>")
        parent = self.stack[-1] if self.stack else None
        self.stack.append(tag)
        if depth == 1 and tag in ("name", "uuid"):
            self.text = []
        elif parent == "metadata" and depth == 2 and tag == _DEVICES:
            if self.seen_devices:
                raise ValueError("there are two <kvmvfio:devices> elements in <metadata>")
            self.seen_devices = True
            self.defaults = _options(attrs, "<kvmvfio:devices>", {})
            self.defaults.pop("address", None)
        elif parent == _DEVICES:
            if tag not in (_DEVICE, _VFS):
                raise ValueError(
                    f"<kvmvfio:devices> holds <{tag.replace(_SEP, ':')}>; "
                    "only <kvmvfio:device> and <kvmvfio:vfs> elements belong there"
                )
            if len(self.devices) + len(self.pools) >= MAX_DEVICES:
                raise ValueError(f"more than {MAX_DEVICES} devices are listed")
            if tag == _DEVICE:
                self.devices.append(_device(_options(attrs, "<kvmvfio:device>", self.defaults)))
            else:
                self.pools.append(_pool(_options(attrs, "<kvmvfio:vfs>", self.defaults)))
        elif parent in (_DEVICE, _VFS):
            raise ValueError(f"<kvmvfio:{parent.rpartition(_SEP)[2]}> must be empty")
        elif self.stack[:3] == ["domain", "devices", "hostdev"] and depth == 2:
            if attrs.get("mode", "subsystem") == "subsystem" and attrs.get("type") in _HOSTDEVS:
                # " kind": no attribute name has a space, so the source address cannot overwrite it.
                self._hostdev = {"managed": attrs.get("managed", "no"), " kind": attrs["type"]}
        elif self._hostdev is not None and depth == 4 and self.stack[3:] == ["source", "address"]:
            self._hostdev.update(attrs)
        elif self._hostdev is not None and depth == 3 and tag == "rom" and attrs.get("file"):
            self._hostdev[" rom"] = attrs["file"]  # " rom": as " kind", no attribute's name

    def end(self, tag: str) -> None:
        self.stack.pop()
        depth = len(self.stack)
        if depth == 1 and tag in ("name", "uuid") and self.text is not None:
            value = "".join(self.text).strip()
            if tag == "name":
                self.name = value
            else:
                self.uuid = value
            self.text = None
        elif depth == 2 and tag == "hostdev" and self._hostdev is not None:
            h, self._hostdev = self._hostdev, None
            if h[" kind"] == "mdev":
                if "uuid" in h and is_uuid(h["uuid"]):
                    # libvirt's own mdev hostdevs are never managed the PCI way.
                    self.hostdevs.append(Hostdev(h["uuid"].lower(), False))
                return
            if "bus" not in h:
                return  # a hostdev by other means
            addr = PciAddress(
                _hex(h.get("domain", "0"), "domain"),
                _hex(h.get("bus"), "bus"),
                _hex(h.get("slot"), "slot"),
                _hex(h.get("function"), "function"),
            )
            self.hostdevs.append(Hostdev(str(addr), h["managed"] == "yes", h.get(" rom")))

    def chars(self, data: str) -> None:
        if self.text is not None:
            if sum(map(len, self.text)) + len(data) > _MAX_TEXT:
                raise ValueError(f"<{self.stack[-1]}> is longer than {_MAX_TEXT} characters")
            self.text.append(data)


class _Refused(Exception):
    pass


def _refuse(what: str) -> int:
    raise _Refused(what)


def parse_domain(xml: bytes | str, *, expected_name: str | None = None) -> DomainRequest | None:
    """Read a libvirt domain XML; None when it asks nothing of kvmvfio.

    Raises :class:`MetadataError` for XML that is not well formed, is too
    large or too deep, has a DTD, an entity declaration or an external
    reference (refused, never expanded), or whose kvmvfio metadata is
    malformed (unknown or bad attributes, a bad PCI address, a device
    twice), and when the domain's name differs from ``expected_name``
    (what libvirt's hook command line says).
    """
    data = xml.encode() if isinstance(xml, str) else xml
    who = expected_name
    if len(data) > MAX_XML_BYTES:
        raise MetadataError(who, f"the XML is {len(data)} bytes; more than {MAX_XML_BYTES} refused")
    reader = _Reader()
    parser = expat.ParserCreate("UTF-8", namespace_separator=_SEP)
    # No DTD at all: entity declarations (the "billion laughs") live in one,
    # and libvirt never writes one.
    parser.StartDoctypeDeclHandler = lambda *_: _refuse("a DOCTYPE (DTD)")
    parser.EntityDeclHandler = lambda *_: _refuse("an entity declaration")
    parser.ExternalEntityRefHandler = lambda *_: _refuse("an external entity")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.chars
    try:
        parser.Parse(data, True)
    except _Refused as err:
        raise MetadataError(who, f"the XML has {err}, which kvmvfio refuses") from None
    except expat.ExpatError as err:
        raise MetadataError(
            who,
            f"the XML is not well formed ({expat.errors.messages[err.code]}, "
            f"line {err.lineno} column {err.offset})",
        ) from None
    except ValueError as err:
        raise MetadataError(reader.name or who, str(err)) from None
    name = reader.name
    if not name:
        raise MetadataError(who, "the XML has no <name>")
    if expected_name is not None and name != expected_name:
        raise MetadataError(who, f"the XML is of domain {name[:80]!r}")
    if not reader.seen_devices:
        return None
    if any(c.isspace() or not c.isprintable() for c in name):
        raise MetadataError(
            name,
            "its name has whitespace or control characters; kvmvfio names its claims "
            "after the domain and needs a name without them",
        )
    request = DomainRequest(
        name, reader.uuid, tuple(reader.devices), tuple(reader.hostdevs), tuple(reader.pools)
    )
    validate(request)
    return request


def validate(request: DomainRequest) -> None:
    """Check a request against itself and the domain's ``<hostdev>`` elements.

    Raises :class:`MetadataError` for a device listed twice, a device that a
    ``managed='yes'`` hostdev also names (libvirt would move it itself,
    behind the journal's back), a ``handoff='libvirt'`` device with no
    hostdev to use it, and an ``agent`` device that a hostdev names too.
    """
    seen: set[str] = set()
    hostdevs = {h.address: h for h in request.hostdevs}
    pfs: set[str] = set()
    for pool in request.pools:
        if pool.pf in pfs:
            raise MetadataError(
                request.name, f"PF {pool.pf} has two <kvmvfio:vfs>: ask for all its VFs in one"
            )
        pfs.add(pool.pf)
    for dev in request.devices:
        if dev.address in seen:
            raise MetadataError(request.name, f"device {dev.address} is listed twice")
        seen.add(dev.address)
        hostdev = hostdevs.get(dev.address)
        if hostdev is not None and hostdev.managed:
            raise MetadataError(
                request.name,
                f"device {dev.address} has a <hostdev managed='yes'>: libvirt would then move "
                "it between drivers itself; use managed='no' and let kvmvfio prepare it",
            )
        if dev.handoff is Handoff.LIBVIRT and hostdev is None:
            raise MetadataError(
                request.name,
                f"device {dev.address} has handoff='libvirt' but the domain has no <hostdev> "
                "for it: add <hostdev mode='subsystem' type='pci' managed='no'> with its "
                "address, or set handoff='agent'",
            )
        if dev.handoff is Handoff.AGENT and hostdev is not None:
            raise MetadataError(
                request.name,
                f"device {dev.address} has handoff='agent' and a <hostdev> too: QEMU would be "
                "given it twice; drop one of them",
            )
        if dev.handoff is Handoff.NONE and hostdev is not None:
            raise MetadataError(
                request.name,
                f"device {dev.address} has handoff='none' but the domain has a <hostdev> for "
                "it: drop handoff='none' to give it to the VM, or the <hostdev> not to",
            )


def _quoted(value: str) -> str:
    """``value`` as a double-quoted XML attribute value, whitespace kept.

    Not ``xml.sax.saxutils.quoteattr``: importing it imports ``urllib.request``
    and with it ``http.client``, ``email`` and ``ssl``, which cost the hook's
    every Python start about a third of kvmvfio's import time.
    """
    escaped = html.escape(value, quote=True)
    return '"' + escaped.replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;") + '"'


def _attributes(d: DeviceRequest) -> list[str]:
    """The attributes of ``d`` that differ from their defaults, address aside."""
    default = _device({"address": d.address, "handoff": d.handoff.value})
    attrs = []
    if d.handoff is not Handoff.LIBVIRT:
        attrs.append(f'handoff="{d.handoff.value}"')
    if d.path is not default.path:
        attrs.append(f'path="{d.path.value}"')
    if d.coherency is not default.coherency:
        attrs.append(f'coherency="{d.coherency.value}"')
    if d.reset:
        attrs.append('reset="yes"')
    if d.accept:
        attrs.append(f'accept="{" ".join(d.accept)}"')
    if d.romfile is not None:
        attrs.append(f"romfile={_quoted(d.romfile)}")
    if not d.rombar:
        attrs.append('rombar="no"')
    return attrs


def to_xml(
    devices: Sequence[DeviceRequest], *, pools: Sequence[VfPool] = (), naked: bool = False
) -> str:
    """The ``<kvmvfio:devices>`` element for ``devices`` and VF ``pools``.

    ``naked``: without prefix and namespace declaration, the form
    ``virDomainSetMetadata`` (``virsh metadata --set``) takes: libvirt binds
    every element of the fragment to the namespace itself, and refuses a
    fragment that declares kvmvfio's prefix already.
    """
    p = "" if naked else f"{PREFIX}:"
    lines = [f"<{p}devices>" if naked else f'<{p}devices xmlns:{PREFIX}="{NAMESPACE}">']
    for d in devices:
        attrs = [f'address="{d.address}"', *_attributes(d)]
        lines.append(f"  <{p}device {' '.join(attrs)}/>")
    for pool in pools:
        attrs = [f'pf="{pool.pf}"', f'count="{pool.count}"', *_attributes(pool.template)]
        lines.append(f"  <{p}vfs {' '.join(attrs)}/>")
    lines.append(f"</{p}devices>")
    return "\n".join(lines)


def resolve(
    request: DomainRequest,
    *,
    held_only: bool = False,
    host: Host | None = None,
    root: str | Path = DEFAULT_ROOT,
) -> DomainRequest:
    """``request`` with each ``<kvmvfio:vfs>`` replaced by the VFs it names now.

    The domain's own VFs (the journal holds them for its owner) come first,
    then free ones (:func:`kvmvfio.prepare.sriov.pick_vfs`); a VF the domain
    names by address is never picked for it. ``held_only``: only the VFs
    the domain holds (to give them back; none is an answer, not an error).
    Raises :class:`~kvmvfio.prepare.sriov.NotEnoughVfs` and what reading a
    PF raises, each naming the PF.
    """
    if not request.pools:
        return request
    from kvmvfio.prepare import sriov  # noqa: PLC0415 (the prepare layer; not for parsing)

    host = host or Host()
    named = {d.address for d in request.devices}
    devices = list(request.devices)
    for pool in request.pools:
        picked = sriov.pick_vfs(
            pool.pf,
            pool.count,
            request.owner,
            exclude=frozenset(named),
            held_only=held_only,
            host=host,
            root=root,
        )
        named.update(picked)
        devices += [pool.device(vf) for vf in picked]
        log.info("domain %s: VFs %s of PF %s", request.name, ", ".join(picked) or "none", pool.pf)
    return dataclasses.replace(request, devices=tuple(devices), pools=())
