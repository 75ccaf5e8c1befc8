"""Advice that works: every command, flag, attribute and argument a message suggests is accepted.

Each error docs/troubleshooting.md explains is built under each interface
(kvmvfio.errors.speaking_to); what it tells the user to run or write is
then handed to the thing that would take it: the CLI parser (through
tests/docpages.py's ``cli_refusal``, which checks the guides' commands
too), the domain metadata parser, or the Python API's own validation.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docpages import PLACEHOLDERS, cli_refusal
from troubleshooting_cases import build

from kvmvfio.errors import CoherencyRefused, DeviceNotBoundToVfio, Interface, speaking_to
from kvmvfio.libvirt.metadata import NAMESPACE, Handoff, MetadataError, parse_domain
from kvmvfio.prepare import safety
from kvmvfio.prepare.safety import UnsafeToUnbind

DOCS = Path(__file__).resolve().parents[2] / "docs"
ADDR = PLACEHOLDERS["ADDR"]
_COMMAND = re.compile(r"[`(](kvmvfio [^`()]+)[`)]")


def _domain(device_attrs: str, *, hostdev: bool) -> str:
    dev = (
        "<hostdev mode='subsystem' type='pci' managed='no'><source>"
        "<address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></source></hostdev>"
        if hostdev
        else ""
    )
    return (
        f"<domain><name>vm1</name><metadata><kvmvfio:devices xmlns:kvmvfio='{NAMESPACE}'>"
        f"<kvmvfio:device {device_attrs}/></kvmvfio:devices></metadata>"
        f"<devices>{dev}</devices></domain>"
    )


def _all_cases() -> list[tuple[Interface, str, str]]:
    out = []
    for where in Interface:
        with speaking_to(where):
            cases = build()
            for check in safety.CHECKS:
                cases[f"unsafe {check}"] = UnsafeToUnbind(ADDR, "e1000e", check, "is used")
        out += [(where, name, str(err)) for name, err in cases.items()]
    return out


@pytest.mark.parametrize(("where", "case", "message"), _all_cases())
def test_every_suggested_command_is_accepted(where: Interface, case: str, message: str) -> None:
    for command in _COMMAND.findall(message):
        assert cli_refusal(command) == "", f"{case} ({where.value}) suggests `{command}`"
    flag = re.search(r"Pass (--force \S+) to accept", message)
    if flag:
        assert where is Interface.CLI
        assert cli_refusal(f"kvmvfio prepare --owner vm1 {flag[1]} {ADDR}") == ""
    coherency = re.search(r"Use (--coherency=\S+) to accept", message)
    if coherency:
        assert where is Interface.CLI
        assert cli_refusal(f"kvmvfio check {coherency[1]} {ADDR}") == ""
    attribute = re.search(r"(?:Add|Set) (\w+)='([^']+)' (?:to|on) the device", message)
    if attribute:
        assert where is Interface.METADATA
        attrs = f"address='{ADDR}' {attribute[1]}='{attribute[2]}'"
        parsed = parse_domain(_domain(attrs, hostdev=True))
        assert parsed is not None
    argument = re.search(r"Pass force=\['([^']+)'\]", message)
    if argument:
        assert where is Interface.API
        assert safety.canonical(argument[1]) in safety.CHECKS


@pytest.mark.parametrize("where", list(Interface))
def test_refusals_that_can_be_accepted_say_how_in_the_callers_terms(where: Interface) -> None:
    with speaking_to(where):
        unsafe = str(UnsafeToUnbind(ADDR, "e1000e", "boot-vga", "is the boot VGA device"))
        coherency = str(CoherencyRefused("IOMMU group 4", [ADDR]))
        unbound = str(DeviceNotBoundToVfio(ADDR, "e1000e"))
    expected = {
        Interface.CLI: ("Pass --force boot-vga", "Use --coherency=warn", "--owner NAME"),
        Interface.METADATA: ("Add accept='boot-vga'", "Set coherency='warn'", "metadata"),
        Interface.API: ("Pass force=['boot-vga']", "Pass coherency='warn'", "prepare(["),
    }[where]
    assert expected[0] in unsafe
    assert expected[1] in coherency
    assert expected[2] in unbound


_XML_DEVICE = re.compile(r"<kvmvfio:device ([^>]*?)/>")


def _documented_devices() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for attrs in _XML_DEVICE.findall(page.read_text()):
            found.append((page.name, attrs))
    assert found
    return found


@pytest.mark.parametrize(("page", "attrs"), _documented_devices())
def test_every_documented_device_element_is_accepted(page: str, attrs: str) -> None:
    # A libvirt handoff needs the domain's <hostdev>; agent and none must not have one.
    address = re.search(r"address=[\"']([^\"']+)", attrs)
    assert address is not None
    attrs = attrs.replace(address[1], ADDR)
    handoff = re.search(r"handoff=[\"'](\w+)", attrs)
    hostdev = handoff is None or handoff[1] == Handoff.LIBVIRT
    try:
        assert parse_domain(_domain(attrs, hostdev=hostdev)) is not None
    except MetadataError as err:
        pytest.fail(f"{page}: <kvmvfio:device {attrs}/> is refused: {err}")
