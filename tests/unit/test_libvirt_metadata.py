"""kvmvfio's domain metadata: what is read, what is refused, and the hook's refusals.

The hook and agent on a real libvirtd are in the lab (tests/lab/test_libvirt.py).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from fakesysfs import Dev, Topology
from hypothesis import given
from hypothesis import strategies as st

from kvmvfio.errors import GroupNotViable, Interface, speaking_to
from kvmvfio.host import Host
from kvmvfio.libvirt import hook
from kvmvfio.libvirt.metadata import (
    MAX_DEPTH,
    NAMESPACE,
    DevicePath,
    DeviceRequest,
    Handoff,
    Hostdev,
    MetadataError,
    parse_domain,
    to_xml,
)
from kvmvfio.prepare import prepare, status
from kvmvfio.prepare.safety import UnsafeToUnbind
from kvmvfio.vfio.policy import Coherency

NS = f'xmlns:k="{NAMESPACE}"'


def domain(meta: str = "", devices: str = "", name: str = "vm1") -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>u-1</uuid>"
        f"<metadata>{meta}</metadata><devices>{devices}</devices></domain>"
    )


def hostdev(addr: str, managed: str = "no") -> str:
    dom, bus, rest = addr.split(":")
    slot, fn = rest.split(".")
    return (
        f"<hostdev mode='subsystem' type='pci' managed='{managed}'><source>"
        f"<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/>"
        "</source></hostdev>"
    )


def test_no_metadata_is_none_even_when_the_namespace_is_mentioned() -> None:
    assert parse_domain(domain()) is None
    # The shell front lets this through; the parser says "nothing for kvmvfio".
    assert parse_domain(domain(f"<other xmlns='x'><d>{NAMESPACE}</d></other>")) is None
    assert parse_domain(domain(f"<k:devices {NS}/>").replace("<metadata>", "<x>")
                        .replace("</metadata>", "</x>")) is None  # fmt: skip


def test_defaults_per_handoff_and_overrides() -> None:
    meta = (
        f'<k:devices {NS} coherency="require">'
        '<k:device address="03:00.0" handoff="agent"/>'
        '<k:device address="0000:04:00.1" reset="yes" coherency="ignore"/>'
        "</k:devices>"
    )
    req = parse_domain(domain(meta, hostdev("0000:04:00.1")), expected_name="vm1")
    assert req is not None
    assert req.name == "vm1"
    assert req.uuid == "u-1"
    assert req.owner == "libvirt:vm1"
    assert req.devices == (
        DeviceRequest("0000:03:00.0", Handoff.AGENT, DevicePath.CDEV, Coherency.REQUIRE, False),
        DeviceRequest("0000:04:00.1", Handoff.LIBVIRT, DevicePath.GROUP, Coherency.IGNORE, True),
    )
    assert req.hostdevs == (Hostdev("0000:04:00.1", managed=False),)
    assert [d.address for d in req.by_handoff(Handoff.AGENT)] == ["0000:03:00.0"]


def test_to_xml_round_trips() -> None:
    devices = (
        DeviceRequest("0000:03:00.0", Handoff.AGENT, DevicePath.CDEV, Coherency.REQUIRE, True),
        DeviceRequest("0000:04:00.0", Handoff.AGENT),
    )
    devices = tuple(
        d if d.handoff is not Handoff.AGENT else DeviceRequest(
            d.address, d.handoff, DevicePath.CDEV, d.coherency, d.reset
        )
        for d in devices
    )  # fmt: skip
    req = parse_domain(domain(to_xml(devices)))
    assert req is not None
    assert req.devices == devices
    # What virDomainSetMetadata stores from the naked form: every element bound to
    # the namespace under libvirt's key (virXMLInjectNamespace).
    naked = to_xml(devices, naked=True)
    assert "xmlns" not in naked
    stored = naked.replace("<devices>", f"<k:devices {NS}>").replace("<device ", "<k:device ")
    stored = stored.replace("</devices>", "</k:devices>")
    req = parse_domain(domain(stored))
    assert req is not None
    assert req.devices == devices


@pytest.mark.parametrize(
    ("meta", "devices", "words"),
    [
        ('<k:device address="00:03.0" handoff="agent" coherncy="x"/>', "",
         "unknown attribute 'coherncy'"),
        ('<k:device address="00:03.0" handoff="agent" coherency="maybe"/>', "",
         "coherency='maybe'; expected one of require, warn, ignore"),
        ('<k:device address="00:03.0" handoff="agent" reset="1"/>', "", "expected yes or no"),
        ('<k:device address="../x" handoff="agent"/>', "", "contains a path separator"),
        ('<k:device address="00:03.0\n" handoff="agent"/>', "", "whitespace"),
        ('<k:device handoff="agent"/>', "", "has no address"),
        ('<k:device address="00:03.0" handoff="agent" path="group"/>', "",
         "QEMU accepts only on the iommufd (cdev) path"),
        ('<k:device address="00:03.0"/>', "", "has no <hostdev> for it"),
        ('<k:device address="00:03.0"/>', hostdev("0000:00:03.0", "yes"), "managed='yes'"),
        ('<k:device address="00:03.0" handoff="agent"/>', hostdev("0000:00:03.0"),
         "a <hostdev> too"),
        ('<k:device address="00:03.0" handoff="agent"/><k:device address="0000:00:03.0" '
         'handoff="agent"/>', "", "listed twice"),
        ('<k:other/>', "", "only <kvmvfio:device> and <kvmvfio:vfs> elements belong there"),
        ('<k:device address="00:03.0" handoff="agent"><x/></k:device>', "", "must be empty"),
        ('<k:device address="00:03.0" handoff="agent" accept="boot_vga"/>', "",
         "'boot_vga' is not a finding kvmvfio knows; one of boot-vga, console, disk-in-use"),
        ('<k:device address="00:03.0" handoff="agent" accept="in-use routes"/>', "",
         "'routes' is not a finding"),
        ('<k:device address="00:03.0" handoff="none"/>', hostdev("0000:00:03.0"),
         "handoff='none' but the domain has a <hostdev>"),
    ],
)  # fmt: skip
def test_bad_metadata_is_refused_by_name(meta: str, devices: str, words: str) -> None:
    with pytest.raises(MetadataError) as refused:
        parse_domain(domain(f"<k:devices {NS}>{meta}</k:devices>", devices))
    assert words in str(refused.value)
    assert str(refused.value).startswith("domain 'vm1': ")


def test_two_kvmvfio_elements_are_refused() -> None:
    with pytest.raises(MetadataError, match="two <kvmvfio:devices>"):
        parse_domain(domain(f"<k:devices {NS}/><k:devices {NS}/>"))


@pytest.mark.parametrize(
    ("xml", "words"),
    [
        ('<!DOCTYPE d [<!ENTITY a "x">]><domain><name>v</name></domain>', "DOCTYPE"),
        ('<!DOCTYPE d SYSTEM "http://x/d.dtd"><domain/>', "DOCTYPE"),
        ("<domain><name>v</name>&amp;&lol;</domain>", "not well formed (undefined entity"),
        ("<domain><name>v</name>", "not well formed (no element found"),
        ("<notdomain/>", "root element is <notdomain>"),
        ("<domain><uuid>x</uuid></domain>", "has no <name>"),
        ("<domain><name>" + "n" * 2000 + "</name></domain>", "longer than 1024"),
        ("<domain>" + "<a>" * (MAX_DEPTH + 1) + "</a>" * (MAX_DEPTH + 1) + "</domain>", "deeper"),
        (b"<domain><name>\xff</name></domain>", "not well formed (not well-formed (invalid token)"),
    ],
)
def test_hostile_or_broken_xml_is_refused(xml: str | bytes, words: str) -> None:
    with pytest.raises(MetadataError, match=None) as refused:
        parse_domain(xml)
    assert words in str(refused.value)


def test_huge_xml_is_refused_unread() -> None:
    with pytest.raises(MetadataError, match="more than 16777216 refused"):
        parse_domain(b"<domain>" + b" " * (16 << 20) + b"</domain>")


def test_a_name_other_than_libvirts_is_refused() -> None:
    with pytest.raises(MetadataError, match="the XML is of domain 'other'"):
        parse_domain(domain(name="other"), expected_name="vm1")


def test_a_name_with_whitespace_cannot_own_claims() -> None:
    meta = f'<k:devices {NS}><k:device address="00:03.0" handoff="agent"/></k:devices>'
    with pytest.raises(MetadataError, match="whitespace"):
        parse_domain(domain(meta, name="my vm"))


@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_are_refused_cleanly(data: bytes) -> None:
    # Anything but MetadataError (a traceback in libvirt's log) fails the test.
    with contextlib.suppress(MetadataError):
        parse_domain(data)


@given(st.text(max_size=60))
def test_any_address_text_is_read_or_refused_cleanly(text: str) -> None:
    meta = f"<k:devices {NS}><k:device handoff='agent' address=''/></k:devices>"
    xml = domain(meta).replace("address=''", "address=" + repr(text).replace("&", "&amp;")
                               .replace("<", "&lt;"))  # fmt: skip
    try:
        req = parse_domain(xml)
    except MetadataError:
        return
    assert req is not None
    (dev,) = req.devices
    assert dev.address.count(":") == 2


# -- the hook's own refusals, on a fake host -----------------------------------------------

BuildHost = Callable[[Topology], Host]


def _two_in_a_group(build_host: BuildHost) -> Host:
    return build_host(
        Topology(
            devices=[
                Dev("0000:00:03.0", vendor=0x1234, device=0x11E8, cls=0x00FF00, group=7),
                Dev("0000:00:04.0", driver="e1000e", group=7),
            ],
            drivers=("vfio-pci", "e1000e"),
        )
    )


def test_an_unlisted_member_on_a_host_driver_stops_the_start(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host = _two_in_a_group(build_host)
    meta = f'<k:devices {NS}><k:device address="00:03.0" handoff="agent"/></k:devices>'
    req = parse_domain(domain(meta))
    assert req is not None
    with pytest.raises(GroupNotViable) as refused:
        hook.prepare_domain(req, host=host, root=tmp_path)
    assert "IOMMU group 7 is not viable: 0000:00:04.0 (on host driver e1000e" in str(refused.value)
    assert status(root=tmp_path) == []  # refused before any change
    assert host.device("0000:00:04.0").driver == "e1000e"


def test_the_hook_ignores_other_events_and_domains(build_host: BuildHost, tmp_path: Path) -> None:
    host = _two_in_a_group(build_host)
    err = io.StringIO()
    meta = f'<k:devices {NS}><k:device address="00:03.0" handoff="agent"/></k:devices>'
    for args, xml in [
        (["vm1", "started", "begin", "-"], domain(meta)),
        (["vm1", "prepare", "begin", "-"], domain()),
    ]:
        stdin = io.BytesIO(xml.encode())
        assert hook.main(args, stdin, err, host=host, root=tmp_path) == 0
    assert err.getvalue() == ""
    assert status(root=tmp_path) == []


def test_the_hook_says_one_sentence_and_exits_1(build_host: BuildHost, tmp_path: Path) -> None:
    host = _two_in_a_group(build_host)
    err = io.StringIO()
    meta = f'<k:devices {NS}><k:device address="00:03.0" handoff="agent"/></k:devices>'
    stdin = io.BytesIO(domain(meta).encode())
    assert hook.main(["vm1", "prepare", "begin", "-"], stdin, err, host=host, root=tmp_path) == 1
    (line,) = err.getvalue().splitlines()
    assert line.startswith("kvmvfio: IOMMU group 7 is not viable")
    assert hook.main(["vm1"], io.BytesIO(), err, host=host, root=tmp_path) == 2


def test_findings_are_accepted_per_device_by_their_force_names() -> None:
    meta = (
        f'<k:devices {NS}><k:device address="00:03.0" handoff="agent" '
        'accept=" default-route  mounted default-route"/>'
        '<k:device address="00:04.0" handoff="none"/></k:devices>'
    )
    req = parse_domain(domain(meta))
    assert req is not None
    first, second = req.devices
    # The old spelling is read as the new one; each name once, in order.
    assert first.accept == ("default-route", "disk-in-use")
    assert (second.handoff, second.accept) == (Handoff.NONE, ())
    assert parse_domain(domain(to_xml(req.devices))) == req


def test_accept_is_never_a_default_for_every_device() -> None:
    meta = f'<k:devices {NS} accept="boot-vga"><k:device address="00:03.0" handoff="agent"/>'
    with pytest.raises(MetadataError, match="unknown attribute 'accept'"):
        parse_domain(domain(f"{meta}</k:devices>"))


def test_the_hook_refusal_names_the_attribute_that_accepts_it(
    build_host: BuildHost, tmp_path: Path
) -> None:
    host = build_host(Topology(devices=[Dev("0000:00:05.0", driver="e1000e", group=3)]))
    (host.sysfs / "bus/pci/devices/0000:00:05.0/net/eth0").mkdir(parents=True)
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "net" / "route").write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
        "eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\n"
    )
    meta = f'<k:devices {NS}><k:device address="00:05.0" handoff="agent"/></k:devices>'
    req = parse_domain(domain(meta))
    assert req is not None
    with speaking_to(Interface.METADATA), pytest.raises(UnsafeToUnbind) as refused:
        prepare(["0000:00:05.0"], req.owner, host=Host(host.sysfs, host.devfs, proc), root=tmp_path)
    assert str(refused.value).endswith(
        "Add accept='default-route' to the device's <kvmvfio:device> element in the domain's "
        "metadata to accept that"
    )
    assert status(root=tmp_path, host=host) == []


def test_the_hook_with_stdin_closed_says_so(
    build_host: BuildHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = _two_in_a_group(build_host)
    monkeypatch.setattr("sys.stdin", None)  # what Python sets when fd 0 is closed at start
    err = io.StringIO()
    assert hook.main(["vm1", "prepare", "begin", "-"], None, err, host=host, root=tmp_path) == 1
    assert err.getvalue() == (
        "kvmvfio hook: no domain XML from libvirt (stdin is closed); refused\n"
    )

    class Unreadable(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(9, "Bad file descriptor")

    err = io.StringIO()
    stdin = Unreadable()
    assert hook.main(["vm1", "prepare", "begin", "-"], stdin, err, host=host, root=tmp_path) == 1
    assert "cannot read stdin: Bad file descriptor" in err.getvalue()
    assert status(root=tmp_path, host=host) == []


MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def mdev_hostdev(uuid: str) -> str:
    return (
        "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
        f"<address uuid='{uuid}'/></source><address type='pci' bus='0x01' slot='0x00'/></hostdev>"
    )


def test_a_mediated_device_is_named_by_its_uuid() -> None:
    meta = (
        f'<k:devices {NS}><k:device address="{MDEV.upper()}"/>'
        f'<k:device address="{MDEV[:-1]}2" handoff="agent"/></k:devices>'
    )
    req = parse_domain(domain(meta, mdev_hostdev(MDEV.upper())))
    assert req is not None
    assert [d.address for d in req.devices] == [MDEV, MDEV[:-1] + "2"]
    assert req.hostdevs == (Hostdev(MDEV, False),)
    assert req.pci == ()
    # The libvirt handoff of an mdev needs libvirt's own mdev <hostdev>.
    with pytest.raises(MetadataError, match=f"device {MDEV} has handoff='libvirt' but"):
        parse_domain(domain(f'<k:devices {NS}><k:device address="{MDEV}"/></k:devices>'))
    with pytest.raises(MetadataError, match="neither a PCI address nor an mdev's UUID"):
        parse_domain(domain(f'<k:devices {NS}><k:device address="{MDEV}x"/></k:devices>'))


def test_a_hostdev_rom_file_for_another_device_stops_the_start(
    build_host: BuildHost, tmp_path: Path
) -> None:
    from test_host_rom import image  # noqa: PLC0415 (a sibling test module's builder)

    host = build_host(
        Topology(devices=[Dev("0000:00:03.0", vendor=0x1234, device=0x11E8, group=3)])
    )
    wrong = tmp_path / "efi-e1000e.rom"
    wrong.write_bytes(image(vendor=0x8086, device=0x10D3))
    right = tmp_path / "edu.rom"
    right.write_bytes(image(vendor=0x1234, device=0x11E8))
    meta = f'<k:devices {NS}><k:device address="00:03.0"/></k:devices>'

    def with_rom(path: Path) -> str:
        return hostdev("0000:00:03.0").replace("</hostdev>", f"<rom file='{path}'/></hostdev>")

    req = parse_domain(domain(meta, with_rom(wrong)))
    assert req is not None
    assert req.hostdevs == (Hostdev("0000:00:03.0", False, str(wrong)),)
    err = io.StringIO()
    stdin = io.BytesIO(domain(meta, with_rom(wrong)).encode())
    assert hook.main(["vm1", "prepare", "begin", "-"], stdin, err, host=host, root=tmp_path) == 1
    assert err.getvalue() == (
        f"kvmvfio: {wrong} is not an option ROM for 0000:00:03.0: image 0 is for 8086:10d3, "
        "not 1234:11e8\n"
    )
    assert status(root=tmp_path) == []  # refused before any change
    assert host.device("0000:00:03.0").driver is None
    good = parse_domain(domain(meta, with_rom(right)))
    assert good is not None
    hook.check_roms(good, host)  # the device's own ROM passes


def test_an_agent_device_names_a_romfile_and_round_trips() -> None:
    meta = (
        f'<k:devices {NS}><k:device address="00:03.0" handoff="agent" '
        'romfile="/var/lib/kvmvfio/vbios.rom"/></k:devices>'
    )
    req = parse_domain(domain(meta))
    assert req is not None
    (dev,) = req.devices
    assert (dev.romfile, dev.rombar) == ("/var/lib/kvmvfio/vbios.rom", True)
    again = parse_domain(domain(to_xml(req.devices)))
    assert again is not None
    assert again.devices == req.devices


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ('handoff="agent" romfile="vbios.rom"', "expected an absolute path to a ROM file"),
        ('romfile="/x.rom"', "only the agent hands QEMU a ROM file"),
        ('rombar="no"', "only the agent hands QEMU the device"),
        ('handoff="agent" rombar="off"', "rombar='off'; expected yes or no"),
        ('handoff="agent" rombar="no" romfile="/x.rom"', "both romfile= and rombar='no'"),
    ],
)
def test_a_bad_romfile_is_refused(attrs: str, words: str) -> None:
    meta = f'<k:devices {NS}><k:device address="00:03.0" {attrs}/></k:devices>'
    with pytest.raises(MetadataError, match=words):
        parse_domain(domain(meta))


def test_an_agent_device_without_its_rom_bar_round_trips() -> None:
    meta = f'<k:devices {NS}><k:device address="00:03.0" handoff="agent" rombar="no"/></k:devices>'
    req = parse_domain(domain(meta))
    assert req is not None
    assert req.devices[0].rombar is False
    again = parse_domain(domain(to_xml(req.devices)))
    assert again is not None
    assert again.devices == req.devices
