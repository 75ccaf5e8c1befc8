"""PciAddress: strict parsing, canonical text, order."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kvmvfio.errors import InvalidAddress, UsageError
from kvmvfio.host import PciAddress

addresses = st.builds(
    PciAddress,
    domain=st.integers(0, 0xFFFFFFFF),
    bus=st.integers(0, 0xFF),
    slot=st.integers(0, 0x1F),
    function=st.integers(0, 7),
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0000:00:03.0", PciAddress(0, 0, 3, 0)),
        ("00:03.0", PciAddress(0, 0, 3, 0)),
        ("0000:AF:1f.7", PciAddress(0, 0xAF, 0x1F, 7)),
        ("ffff:ff:1f.7", PciAddress(0xFFFF, 0xFF, 0x1F, 7)),
        ("10000:e1:00.0", PciAddress(0x10000, 0xE1, 0, 0)),  # Intel VMD domain
        ("0001abcd:02:00.1", PciAddress(0x1ABCD, 2, 0, 1)),
    ],
)
def test_parses_valid_addresses(text: str, expected: PciAddress) -> None:
    assert PciAddress.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("00:03.0", "0000:00:03.0"),
        ("0000:AF:1F.7", "0000:af:1f.7"),
        ("00000000:00:03.0", "0000:00:03.0"),
        ("00010000:e1:00.0", "10000:e1:00.0"),  # as Linux names it: %04x
    ],
)
def test_str_is_the_kernels_name(text: str, canonical: str) -> None:
    assert str(PciAddress.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("../x", "path separator"),
        ("0000:00:03.0/../../x", "too long"),
        ("00:03.0/", "path separator"),
        ("0000:00:03.0\n", "whitespace"),
        (" 0000:00:03.0", "whitespace"),
        ("0000:00:03.0\0", "path separator or NUL"),
        ("0000:00:03", "no '.'"),
        ("0000:00:00:03.0", "one or two ':'"),
        ("03.0", "one or two ':'"),
        ("0000:0g:03.0", "'0g' is not hexadecimal"),
        ("000:00:03.0", "domain takes 4 to 8"),
        ("0000:0:03.0", "bus takes 2"),
        ("0000:00:3.0", "slot takes 2"),
        ("0000:00:20.0", "slot 0x20 is above 0x1f"),
        ("0000:00:03.8", "0 to 7"),
        ("0000:00:03.10", "0 to 7"),
        ("0000:00:03.-1", "not hexadecimal"),
        ("+000:00:03.0", "not hexadecimal"),
        # Arabic-Indic digits, which int() takes
        ("\u0660" * 4 + ":\u0660\u0660:\u0660\u0663.\u0660", "not hexadecimal"),
        ("0x00:00:03.0", "not hexadecimal"),
        ("..", "path separator"),
    ],
)
def test_refuses_everything_else_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        PciAddress.parse(text)
    assert reason in info.value.reason
    assert info.value.text == text
    assert isinstance(info.value, UsageError)  # the CLI exits 2 for it
    assert "expected [DDDD:]BB:SS.F" in str(info.value)


def test_refuses_non_text() -> None:
    with pytest.raises(InvalidAddress, match="not text"):
        PciAddress.parse(b"0000:00:03.0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [(0, 0, 0x20, 0), (0, 0x100, 0, 0), (0, 0, 0, 8), (-1, 0, 0, 0), (0, 0, True, 0)],
)
def test_constructor_checks_ranges(fields: tuple[int, int, int, int]) -> None:
    with pytest.raises(InvalidAddress):
        PciAddress(*fields)


def test_order_is_numeric_not_textual() -> None:
    texts = ["10000:00:00.0", "0000:00:1f.0", "0000:00:03.1", "0000:01:00.0", "0000:00:03.0"]
    ordered = sorted(PciAddress.parse(t) for t in texts)
    assert [str(a) for a in ordered] == [
        "0000:00:03.0",
        "0000:00:03.1",
        "0000:00:1f.0",
        "0000:01:00.0",
        "10000:00:00.0",
    ]


def test_routing_id_round_trip() -> None:
    addr = PciAddress.parse("0000:3b:02.5")
    assert addr.devfn == 0x15
    assert addr.rid == 0x3B15
    assert PciAddress.from_rid(0, addr.rid) == addr
    with pytest.raises(InvalidAddress):
        PciAddress.from_rid(0, 0x10000)


def test_coerce_keeps_addresses_and_parses_text() -> None:
    addr = PciAddress(0, 1, 2, 3)
    assert PciAddress.coerce(addr) is addr
    assert PciAddress.coerce("0000:01:02.3") == addr


@given(addresses)
def test_round_trip_of_valid_addresses(addr: PciAddress) -> None:
    text = str(addr)
    assert PciAddress.parse(text) == addr
    assert PciAddress.parse(text.upper()) == addr
    if addr.domain == 0:
        assert PciAddress.parse(text[5:]) == addr


near_misses = st.text(alphabet="0123456789abcdefABCDEFgx:./ \n\x00-+", max_size=20)


@given(st.one_of(st.text(), near_misses))
@example("0000:00:03.0\n")
@example("0000:00:1f.7")
def test_any_text_gives_an_address_or_invalid_address(text: str) -> None:
    try:
        addr = PciAddress.parse(text)
    except InvalidAddress as err:
        refused: InvalidAddress | None = err
    else:
        refused = None
    if refused is not None:
        assert refused.text == text
        assert refused.reason
        return
    # Whatever was accepted is an address and prints as one that parses back.
    assert PciAddress.parse(str(addr)) == addr
    assert str(addr) == str(addr).lower()
    assert text.lower().endswith(str(addr)[-7:])
