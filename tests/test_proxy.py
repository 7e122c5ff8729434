# The PROXY protocol wire format, sans I/O (_proxy.py): the specification's own examples, every
# way a header can be wrong, and hypothesis fuzzing: whatever the bytes, the parser answers
# "need more", a header, or ProxyProtocolError, never takes more than it was given, keeps to
# the protocol's size bounds, and gives back every header the encoder writes.
from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_socketserver import ProxyHeader
from trio_socketserver._proxy import (
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    NeedMore,
    Parsed,
    ProxyProtocolError,
    encode_header,
    parse_header,
)
from trio_socketserver.testing import proxy_header

V1, V2, BOTH = frozenset({1}), frozenset({2}), frozenset({1, 2})
TCP4 = ("203.0.113.7", 41000), ("192.0.2.1", 443)
# Bytes the client sends right after its header: never part of it.
AFTER = b"GET / HTTP/1.1\r\n"


def v2(command: int, family: int, body: bytes, *, length: int | None = None) -> bytes:
    """A v2 header by hand: signature, version 2 with ``command``, ``family``, ``body``."""
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + body


def inet4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


# -- what the specification shows --------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "family", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            socket.AF_INET,
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n",
            socket.AF_INET6,
            ("2001:db8::1", 65535),
            ("2001:db8::2", 0),
        ),
        (b"PROXY UNKNOWN\r\n", socket.AF_UNSPEC, None, None),
        # The rest of an UNKNOWN line is ignored, whatever it holds.
        (b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", socket.AF_UNSPEC, None, None),
    ],
)
def test_v1_headers(line: bytes, family: int, source: object, destination: object) -> None:
    result = parse_header(line + AFTER)
    assert result == Parsed(
        ProxyHeader(
            1,
            "PROXY",
            family,
            0 if source is None else socket.SOCK_STREAM,
            source,
            destination,
        ),
        len(line),
    )


def test_the_longest_v1_line_is_107_bytes() -> None:
    # The specification's worst case: UNKNOWN with two full IPv6 addresses and ports.
    longest = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(longest) == V1_MAX_LENGTH
    assert parse_header(longest + AFTER) == Parsed(
        ProxyHeader(1, "PROXY", socket.AF_UNSPEC, 0, None, None), V1_MAX_LENGTH
    )
    with pytest.raises(ProxyProtocolError, match="longer than 107 bytes"):
        parse_header(longest[:-2] + b" \r\n")


def test_v2_header_with_tlvs() -> None:
    tlvs = b"\x02\x00\x0bexample.com" + b"\x05\x00\x00"  # authority, then an empty unique ID
    data = v2(1, 0x11, inet4_block("10.1.2.3", "10.0.0.1", 50000, 443) + tlvs)
    result = parse_header(data + AFTER)
    assert isinstance(result, Parsed)
    assert result.consumed == len(data)
    header = result.header
    assert (header.version, header.command) == (2, "PROXY")
    assert (header.family, header.socket_type) == (socket.AF_INET, socket.SOCK_STREAM)
    assert (header.source, header.destination) == (("10.1.2.3", 50000), ("10.0.0.1", 443))
    assert header.tlvs == ((0x02, b"example.com"), (0x05, b""))
    assert header.tlv(0x02) == b"example.com"
    assert header.tlv(0x20) is None


def test_v2_local_and_unspecified_skip_the_rest_of_the_header() -> None:
    # LOCAL (a health check) and the unspecified family carry no address: whatever follows
    # the fixed part, up to the length, is skipped, even an unknown family's.
    for command, family, name in [(0, 0x00, "LOCAL"), (0, 0x99, "LOCAL"), (1, 0x00, "PROXY")]:
        data = v2(command, family, b"\xff" * 7)
        assert parse_header(data + AFTER) == Parsed(
            ProxyHeader(2, name, socket.AF_UNSPEC, 0, None, None), len(data)
        )


def test_v2_unix_addresses_read_as_the_socket_module_gives_them() -> None:
    path, abstract = b"/run/app.sock".ljust(108, b"\0"), b"\0name".ljust(108, b"\0")
    result = parse_header(v2(1, 0x31, path + abstract))
    assert isinstance(result, Parsed)
    assert (result.header.source, result.header.destination) == ("/run/app.sock", b"\0name")
    unnamed = parse_header(v2(1, 0x32, bytes(216)))
    assert isinstance(unnamed, Parsed)
    assert (unnamed.header.source, unnamed.header.socket_type) == ("", socket.SOCK_DGRAM)


# -- refusals ------------------------------------------------------------------------------

REFUSALS = {
    "no header": (b"GET / HTTP/1.1\r\n", BOTH, "no PROXY protocol v1 or v2 header"),
    "TLS first": (b"\x16\x03\x01\x02\x00", BOTH, "starts with b'\\x16\\x03"),
    "v1 where v2 only": (b"PROXY TCP4 ", V2, "v1 header, but only v2 is accepted"),
    "v2 where v1 only": (V2_SIGNATURE, V1, "v2 header, but only v1 is accepted"),
    "v1 too long": (b"PROXY TCP4 " + b"1" * 200, BOTH, "longer than 107 bytes"),
    "v1 bare LF": (b"PROXY TCP4 1.2.3.4\n", BOTH, "line break before its CRLF"),
    "v1 bare CR": (b"PROXY TCP4\r1.2.3.4", BOTH, "line break before its CRLF"),
    "v1 protocol": (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", BOTH, "unknown protocol 'TCP5'"),
    "v1 fields": (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", BOTH, "not 'PROXY TCP4 SRC DST"),
    "v1 double space": (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", BOTH, "not 'PROXY TCP4"),
    "v1 address": (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", BOTH, "bad address '1.2.3.256'"),
    "v1 family mismatch": (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", BOTH, "bad address '::1'"),
    "v1 scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", BOTH, "bad address 'fe80::1%eth0'"),
    "v1 port": (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", BOTH, "bad port '65536'"),
    "v1 sign": (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", BOTH, "bad port '+1'"),
    "v1 not ASCII": (b"PROXY TCP4 \xff\r\n", BOTH, "not ASCII"),
    "v2 version": (V2_SIGNATURE + b"\x11\x11\x00\x0c", BOTH, "unknown version 1"),
    "v2 command": (V2_SIGNATURE + b"\x22\x11\x00\x0c", BOTH, "unknown command 0x2"),
    "v2 family": (v2(1, 0x13, bytes(12)), BOTH, "unknown family 0x13"),
    "v2 family nibble": (v2(1, 0x41, bytes(12)), BOTH, "unknown family 0x41"),
    "v2 short for family": (v2(1, 0x21, bytes(12)), BOTH, "too short for its AF_INET6"),
    "v2 TLV past the end": (
        v2(1, 0x11, inet4_block("1.2.3.4", "1.2.3.4", 1, 2) + b"\x02\x00\x05abc"),
        BOTH,
        "TLV (type 0x02, 5 bytes) that runs past the header's length",
    ),
    "v2 TLV header cut": (
        v2(1, 0x11, inet4_block("1.2.3.4", "1.2.3.4", 1, 2) + b"\x02\x00"),
        BOTH,
        "ends inside a TLV's type and length",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_say_what_is_wrong(case: str) -> None:
    data, versions, reason = REFUSALS[case]
    with pytest.raises(ProxyProtocolError) as refused:
        parse_header(data + AFTER, versions)
    assert reason in str(refused.value)


def test_a_refusal_comes_as_soon_as_the_bytes_show_it() -> None:
    # No waiting for a CRLF or a length's worth of bytes that could not fix the header.
    for early in [b"G", b"PROXY TCP4 1.2\n", V2_SIGNATURE + b"\x21\x99", b"\r\n\r\n\x00\r\nQ!"]:
        with pytest.raises(ProxyProtocolError):
            parse_header(early)


def test_versions_must_be_one_or_two() -> None:
    for versions in [frozenset(), frozenset({3})]:
        with pytest.raises(ValueError, match="non-empty set of 1 and 2"):
            parse_header(b"", versions)


# -- the encoder (what trio_socketserver.testing.proxy_header writes) -----------------------


def test_proxy_header_infers_the_family() -> None:
    assert proxy_header(*TCP4) == b"PROXY TCP4 203.0.113.7 192.0.2.1 41000 443\r\n"
    assert proxy_header(("::1", 1), ("::2", 2)) == b"PROXY TCP6 ::1 ::2 1 2\r\n"
    assert proxy_header() == b"PROXY UNKNOWN\r\n"
    assert proxy_header(version=2, command="LOCAL") == V2_SIGNATURE + b"\x20\x00\x00\x00"
    unix = parse_header(proxy_header("/a", "/b", version=2))
    assert isinstance(unix, Parsed)
    assert (unix.header.family, unix.header.source) == (socket.AF_UNIX, "/a")
    hosts = (ipaddress.ip_address("10.0.0.1"), 1), (ipaddress.ip_address("10.0.0.2"), 2)
    assert proxy_header(*hosts) == b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": TCP4[0], "destination": ("::1", 1)}, "one family"),
        ({"source": TCP4[0]}, "one family"),
        ({"source": ("example.com", 1), "destination": TCP4[1]}, "not an IP address"),
        ({"source": ("1.2.3.4",), "destination": TCP4[1]}, "is (host, port)"),
        ({"source": "/a", "destination": "/b"}, "use version 2"),
        ({"source": TCP4[0], "destination": TCP4[1], "tlvs": [(1, b"h2")]}, "use version 2"),
        ({"command": "LOCAL"}, "use version 2"),
        ({"command": "HELLO", "version": 2}, "'PROXY' or 'LOCAL'"),
        ({"version": 3}, "version must be 1 or 2"),
        ({"source": ("1.2.3.4", 70000), "destination": TCP4[1]}, "from 0 to 65535"),
        ({"source": ("1.2.3.4", 70000), "destination": TCP4[1], "version": 2}, "0 to 65535"),
        ({"source": TCP4[0], "destination": TCP4[1], "socket_type": 99}, "use version 2"),
        ({"version": 2, "source": "/" * 109, "destination": "/"}, "at most 108 bytes"),
        ({"version": 2, "tlvs": [(1, b"x")]}, "carries no address and no TLVs"),
        (
            {"version": 2, "source": TCP4[0], "destination": TCP4[1], "tlvs": [(1, bytes(65530))]},
            "at most 65535 bytes",
        ),
    ],
)
def test_proxy_header_refuses_what_its_version_cannot_say(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        proxy_header(**kwargs)  # type: ignore[arg-type]
    assert message in str(refused.value)


# -- fuzzing -------------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
paths = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")).filter(
        lambda p: len(p.encode()) <= 108
    ),
    # Linux abstract names: a NUL, then a name (which cannot end in NUL: the padding).
    st.binary(min_size=1, max_size=107)
    .filter(lambda b: not b.endswith(b"\0"))
    .map(lambda b: b"\0" + b),
)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=5).map(tuple)


def addressed(
    version: int, family: int, socket_type: int, hosts: st.SearchStrategy
) -> st.SearchStrategy:
    addresses = st.tuples(hosts, ports) if family != socket.AF_UNIX else hosts
    return st.builds(
        ProxyHeader,
        st.just(version),
        st.just("PROXY"),
        st.just(family),
        st.just(socket_type),
        addresses,
        addresses,
        tlvs if version == 2 else st.just(()),
    )


headers = st.one_of(
    addressed(1, socket.AF_INET, socket.SOCK_STREAM, ipv4),
    addressed(1, socket.AF_INET6, socket.SOCK_STREAM, ipv6),
    st.just(ProxyHeader(1, "PROXY", socket.AF_UNSPEC, 0, None, None)),
    *[
        addressed(2, family, kind, hosts)
        for family, hosts in [
            (socket.AF_INET, ipv4),
            (socket.AF_INET6, ipv6),
            (socket.AF_UNIX, paths),
        ]
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
    ],
    st.sampled_from(
        [ProxyHeader(2, command, socket.AF_UNSPEC, 0, None, None) for command in ("PROXY", "LOCAL")]
    ),
)
BOUND = {1: V1_MAX_LENGTH, 2: V2_MAX_LENGTH}


def check_answer(data: bytes, versions: frozenset[int] = BOTH) -> NeedMore | Parsed | None:
    """parse_header's promises for any ``data``: its answer, or None for a refusal."""
    try:
        result = parse_header(data, versions)
    except ProxyProtocolError as error:
        assert str(error)
        return None
    bound = max(BOUND[v] for v in versions)
    if isinstance(result, Parsed):
        assert 0 < result.consumed <= len(data)
        assert result.consumed <= BOUND[result.header.version]
        assert result.header.version in versions
    else:
        assert result.at_most > 0
        assert len(data) + result.at_most <= bound
    return result


@settings(max_examples=300, deadline=None)
@given(header=headers, after=st.binary(max_size=50))
def test_every_header_round_trips(header: ProxyHeader, after: bytes) -> None:
    data = encode_header(header)
    assert len(data) <= BOUND[header.version]
    assert parse_header(data + after) == Parsed(header, len(data))
    assert parse_header(data, frozenset({header.version})) == Parsed(header, len(data))
    other = frozenset({3 - header.version})
    with pytest.raises(ProxyProtocolError, match="but only"):
        parse_header(data, other)


@settings(max_examples=300, deadline=None)
@given(header=headers, cut=st.integers(0, V2_MAX_LENGTH))
def test_every_start_of_a_header_asks_for_more(header: ProxyHeader, cut: int) -> None:
    data = encode_header(header)
    # All of a start belongs to the header: never a refusal, never a header.
    assert isinstance(check_answer(data[: cut % len(data)]), NeedMore)


@settings(max_examples=500, deadline=None)
@given(
    start=st.sampled_from(
        [b"", V1_PREFIX, V1_PREFIX + b"TCP4 ", V1_PREFIX + b"TCP6 ", V2_SIGNATURE]
    ),
    rest=st.binary(max_size=300),
    versions=st.sampled_from([V1, V2, BOTH]),
)
def test_any_bytes_get_an_answer_or_a_refusal(
    start: bytes, rest: bytes, versions: frozenset[int]
) -> None:
    check_answer(start + rest, versions)


@settings(max_examples=500, deadline=None)
@given(
    header=headers, position=st.integers(0), value=st.integers(0, 255), after=st.binary(max_size=20)
)
def test_damaged_headers_get_an_answer_or_a_refusal(
    header: ProxyHeader, position: int, value: int, after: bytes
) -> None:
    data = bytearray(encode_header(header) + after)
    data[position % len(data)] = value
    check_answer(bytes(data))


@settings(max_examples=200, deadline=None)
@given(header=headers, after=st.binary(max_size=20))
def test_a_header_fed_in_pieces_ends_where_it_ends(header: ProxyHeader, after: bytes) -> None:
    # What a server does: look at what arrived, ask for at most at_most more.
    data = encode_header(header) + after
    seen = 0
    result = parse_header(b"")
    while isinstance(result, NeedMore):
        seen = min(len(data), seen + result.at_most)
        result = parse_header(data[:seen])
    assert result == Parsed(header, len(data) - len(after))
