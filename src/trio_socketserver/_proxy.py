# The PROXY protocol's wire format (versions 1 and 2, as HAProxy specifies them), sans I/O:
# bytes in, a parsed header or "need more" or a precise error out; a header out, bytes out.
# A balancer sends the header first on each connection it opens to us, to say whom it
# forwards. Nothing here reads a socket, knows a server or a clock: what a server does with
# a header (who may send one, reading it without taking a byte more, timeouts) lives in
# _proxy_admission.py. Also the one record of which header the running request came with
# (a context variable): here, away from trio, since ForkingMixIn's worker processes set it too.
from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import socket
import struct
from typing import Any

import attrs

V1_PREFIX = b"PROXY "
# The longest v1 header the specification allows, CRLF included ("PROXY UNKNOWN" followed by
# two IPv6 addresses and ports, with room to spare); a receiver may give up after that many.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# Signature, version/command, family/protocol and a 16-bit length of what follows.
V2_FIXED_LENGTH = 16
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF

_V2_LOCAL, _V2_PROXY = 0x0, 0x1
# The byte after the command: address family (high nibble) and transport (low nibble). The
# specification lists these seven and says receivers must reject any other.
_V2_UNSPEC = 0x00
_V2_FAMILIES: dict[int, tuple[socket.AddressFamily, socket.SocketKind]] = {
    0x11: (socket.AF_INET, socket.SOCK_STREAM),
    0x12: (socket.AF_INET, socket.SOCK_DGRAM),
    0x21: (socket.AF_INET6, socket.SOCK_STREAM),
    0x22: (socket.AF_INET6, socket.SOCK_DGRAM),
    0x31: (socket.AF_UNIX, socket.SOCK_STREAM),
    0x32: (socket.AF_UNIX, socket.SOCK_DGRAM),
}
_V2_FAMILY_BYTES: dict[tuple[int, int], int] = {pair: code for code, pair in _V2_FAMILIES.items()}
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
# A Unix address is sun_path: 108 bytes, NUL-padded.
_UNIX_PATH = 108
_UNIX = struct.Struct(f"!{_UNIX_PATH}s{_UNIX_PATH}s")
_ADDRESS_LENGTH = {socket.AF_INET: _INET.size, socket.AF_INET6: _INET6.size}
_ADDRESS_LENGTH[socket.AF_UNIX] = _UNIX.size
_TLV = struct.Struct("!BH")
_V1_FAMILIES = {"TCP4": socket.AF_INET, "TCP6": socket.AF_INET6}
_V1_NAMES: dict[int, str] = {family: name for name, family in _V1_FAMILIES.items()}
_V1_PORT = re.compile(r"[0-9]{1,5}\Z")


class ProxyProtocolError(Exception):
    """The peer sent no PROXY protocol header, or a bad one; the message says what is wrong."""


@attrs.frozen
class ProxyHeader:
    """What a balancer's PROXY protocol header said about a connection.

    The server has already used :attr:`source` as the request's ``client_address``; the
    handler finds the whole header as ``self.proxy_header`` (or through
    :func:`current_proxy_header`).
    """

    version: int
    """1 (the text header, HAProxy's ``send-proxy``) or 2 (binary, ``send-proxy-v2``)."""
    command: str
    """``"PROXY"``: the connection is forwarded for :attr:`source`. ``"LOCAL"`` (version 2
    only): the balancer opened it for itself, e.g. a health check, and no address is given."""
    family: int
    """``socket.AF_INET``, ``AF_INET6`` or ``AF_UNIX``; ``socket.AF_UNSPEC`` when no address
    is given (a v1 ``PROXY UNKNOWN``, a ``LOCAL`` command, or the v2 "unspecified" family)."""
    socket_type: int
    """``socket.SOCK_STREAM`` or ``SOCK_DGRAM``, the client's transport to the balancer; 0
    when no address is given."""
    source: Any
    """The client's address: ``(host, port)`` for IPv4 and IPv6, the socket path for
    ``AF_UNIX`` (``bytes`` for a Linux abstract name, as the socket module gives it); None
    when no address is given."""
    destination: Any
    """The address the client connected to (the balancer's), in the same form; None when no
    address is given."""
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """Version 2's type-length-value extensions, ``(type, value)`` in the order sent, e.g.
    ``0x01`` ALPN, ``0x02`` authority (the TLS SNI host name), ``0x05`` unique ID, ``0x20``
    TLS details (nested TLVs). Empty for version 1."""

    def tlv(self, type: int) -> bytes | None:
        """The value of the first TLV of ``type``, or None if there is none."""
        for kind, value in self.tlvs:
            if kind == type:
                return value
        return None


@attrs.frozen
class NeedMore:
    """The data is the start of a header: give :func:`parse_header` more of it."""

    at_most: int
    """How many more bytes may still belong to the header (read no more than this far)."""


@attrs.frozen
class Parsed:
    """A complete header."""

    header: ProxyHeader
    consumed: int
    """Its length: the data after this many bytes is the client's own."""


def parse_header(data: bytes, versions: frozenset[int] = frozenset({1, 2})) -> NeedMore | Parsed:
    """Parse the PROXY protocol header at the start of ``data`` (everything received so far).

    ``versions`` says which versions are accepted. A :class:`NeedMore` answer means all of
    ``data`` belongs to the header; a :class:`Parsed` one never consumes more than ``data``.

    Errors: :exc:`ProxyProtocolError` as soon as ``data`` cannot begin an accepted header:
    no header, a version not accepted, a v1 line longer than 107 bytes or with bad fields,
    an unknown v2 version, command or family, an address block too short for its family, or
    a TLV that runs past the header's length.
    """
    if not versions <= {1, 2} or not versions:
        raise ValueError(f"versions must be a non-empty set of 1 and 2, not {versions!r}")
    looks_v1 = _starts_like(data, V1_PREFIX)
    looks_v2 = _starts_like(data, V2_SIGNATURE)
    if looks_v1 and 1 in versions:
        return _parse_v1(data)
    if looks_v2 and 2 in versions:
        return _parse_v2(data)
    if looks_v1 and len(data) >= len(V1_PREFIX):
        raise ProxyProtocolError("a PROXY protocol v1 header, but only v2 is accepted")
    if looks_v2 and len(data) >= len(V2_SIGNATURE):
        raise ProxyProtocolError("a PROXY protocol v2 header, but only v1 is accepted")
    accepted = " or ".join(f"v{v}" for v in sorted(versions))
    raise ProxyProtocolError(
        f"no PROXY protocol {accepted} header: the connection starts with {data[:16]!r}"
    )


def _starts_like(data: bytes, signature: bytes) -> bool:
    """Whether ``data`` and ``signature`` agree as far as both go."""
    common = min(len(data), len(signature))
    return data[:common] == signature[:common]


def _parse_v1(data: bytes) -> NeedMore | Parsed:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"a v1 header longer than {V1_MAX_LENGTH} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("a v1 header with a line break before its CRLF")
        return NeedMore(V1_MAX_LENGTH - len(data))
    line = data[len(V1_PREFIX) : end]
    if b"\n" in line or b"\r" in line:
        raise ProxyProtocolError("a v1 header with a line break before its CRLF")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"a v1 header that is not ASCII: {line!r}") from None
    fields = text.split(" ")
    consumed = end + 2
    if fields[0] == "UNKNOWN":
        # The specification lets the rest of an UNKNOWN line be anything: it is ignored.
        return Parsed(ProxyHeader(1, "PROXY", socket.AF_UNSPEC, 0, None, None), consumed)
    family = _V1_FAMILIES.get(fields[0])
    if family is None:
        raise ProxyProtocolError(f"a v1 header with the unknown protocol {fields[0]!r}")
    if len(fields) != 5:
        raise ProxyProtocolError(f"a v1 header that is not 'PROXY {fields[0]} SRC DST SPORT DPORT'")
    source = (_v1_host(family, fields[1]), _v1_port(fields[3]))
    destination = (_v1_host(family, fields[2]), _v1_port(fields[4]))
    header = ProxyHeader(1, "PROXY", family, socket.SOCK_STREAM, source, destination)
    return Parsed(header, consumed)


def _v1_host(family: int, text: str) -> str:
    try:
        if family == socket.AF_INET:
            ipaddress.IPv4Address(text)
        elif "%" in text:  # a scope means nothing on the receiving host
            raise ValueError(text)
        else:
            ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(
            f"a v1 {_V1_NAMES[family]} header with the bad address {text!r}"
        ) from None
    return text


def _v1_port(text: str) -> int:
    if not _V1_PORT.match(text) or int(text) > 0xFFFF:
        raise ProxyProtocolError(f"a v1 header with the bad port {text!r}")
    return int(text)


def _parse_v2(data: bytes) -> NeedMore | Parsed:
    _check_v2_fixed_part(data)
    if len(data) < V2_FIXED_LENGTH:
        return NeedMore(V2_FIXED_LENGTH - len(data))
    command, family_byte = data[12] & 0x0F, data[13]
    total = V2_FIXED_LENGTH + int.from_bytes(data[14:16], "big")
    # LOCAL, and the unspecified family, carry no address: the specification has receivers
    # skip the rest of the header, whatever it holds.
    if command == _V2_LOCAL or family_byte == _V2_UNSPEC:
        if len(data) < total:
            return NeedMore(total - len(data))
        name = "LOCAL" if command == _V2_LOCAL else "PROXY"
        return Parsed(ProxyHeader(2, name, socket.AF_UNSPEC, 0, None, None), total)
    family, socket_type = _V2_FAMILIES[family_byte]
    addresses_end = V2_FIXED_LENGTH + _ADDRESS_LENGTH[family]
    if total < addresses_end:
        raise ProxyProtocolError(
            f"a v2 header of {total} bytes, too short for its {family.name} addresses"
        )
    if len(data) < total:
        return NeedMore(total - len(data))
    source, destination = _v2_addresses(family, data[V2_FIXED_LENGTH:addresses_end])
    tlvs = _v2_tlvs(data[addresses_end:total])
    header = ProxyHeader(2, "PROXY", family, socket_type, source, destination, tlvs)
    return Parsed(header, total)


def _check_v2_fixed_part(data: bytes) -> None:
    """Refuse a bad version, command or family as soon as its byte is there, without
    waiting for bytes that could not mend it."""
    if len(data) <= 12:
        return
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"a v2 signature with the unknown version {version}")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"a v2 header with the unknown command {command:#x}")
    family_byte = data[13] if len(data) > 13 else _V2_UNSPEC
    if command == _V2_PROXY and family_byte != _V2_UNSPEC and family_byte not in _V2_FAMILIES:
        raise ProxyProtocolError(f"a v2 header with the unknown family {family_byte:#04x}")


def _v2_addresses(family: int, block: bytes) -> tuple[Any, Any]:
    if family == socket.AF_INET:
        src, dst, sport, dport = _INET.unpack(block)
        return (str(ipaddress.IPv4Address(src)), sport), (str(ipaddress.IPv4Address(dst)), dport)
    if family == socket.AF_INET6:
        src, dst, sport, dport = _INET6.unpack(block)
        return (str(ipaddress.IPv6Address(src)), sport), (str(ipaddress.IPv6Address(dst)), dport)
    src, dst = _UNIX.unpack(block)
    return _unix_path(src), _unix_path(dst)


def _unix_path(raw: bytes) -> str | bytes:
    """A NUL-padded sun_path as the socket module returns one: a ``str`` path, ``bytes`` for
    a Linux abstract name (which starts with NUL), ``""`` for an unnamed socket."""
    if raw[:1] == b"\0":
        name = raw.rstrip(b"\0")
        return b"\0" + name[1:] if name else ""
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _v2_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < _TLV.size:
            raise ProxyProtocolError("a v2 header that ends inside a TLV's type and length")
        kind, length = _TLV.unpack_from(block, offset)
        offset += _TLV.size
        if offset + length > len(block):
            raise ProxyProtocolError(
                f"a v2 TLV (type {kind:#04x}, {length} bytes) that runs past the header's length"
            )
        tlvs.append((kind, block[offset : offset + length]))
        offset += length
    return tuple(tlvs)


def encode_header(header: ProxyHeader) -> bytes:
    """The bytes a balancer sends for ``header``: :func:`parse_header` gives it back.

    Errors: ``ValueError`` for what its version cannot say (v1: a ``LOCAL`` command, a Unix
    or datagram address, TLVs; v2: more than 65535 bytes after the fixed part) and for
    addresses that do not fit :attr:`ProxyHeader.family`.
    """
    bare = header.family == socket.AF_UNSPEC or header.command == "LOCAL"
    if header.command not in ("PROXY", "LOCAL"):
        raise ValueError(f"command must be 'PROXY' or 'LOCAL', not {header.command!r}")
    if bare and (header.source is not None or header.destination is not None or header.tlvs):
        raise ValueError("a LOCAL or AF_UNSPEC header carries no address and no TLVs")
    if header.version == 1:
        return _encode_v1(header, bare)
    if header.version == 2:
        return _encode_v2(header, bare)
    raise ValueError(f"version must be 1 or 2, not {header.version!r}")


def _encode_v1(header: ProxyHeader, bare: bool) -> bytes:
    if header.command != "PROXY" or header.tlvs:
        raise ValueError("a v1 header has no LOCAL command and no TLVs; use version 2")
    if bare:
        return V1_PREFIX + b"UNKNOWN\r\n"
    name = _V1_NAMES.get(header.family)
    if name is None or header.socket_type != socket.SOCK_STREAM:
        raise ValueError("a v1 header carries TCP over IPv4 or IPv6 only; use version 2")
    (src, sport), (dst, dport) = header.source, header.destination
    for host in (src, dst):
        _check_host(header.family, host)
    for port in (sport, dport):
        _check_port(port)
    return f"PROXY {name} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def _encode_v2(header: ProxyHeader, bare: bool) -> bytes:
    command = _V2_LOCAL if header.command == "LOCAL" else _V2_PROXY
    if bare:
        family_byte, body = _V2_UNSPEC, b""
    else:
        family_byte = _V2_FAMILY_BYTES.get((header.family, header.socket_type), -1)
        if family_byte < 0:
            raise ValueError(
                f"no v2 family for {header.family!r} with socket type {header.socket_type!r}"
            )
        body = _v2_address_block(header)
        for kind, value in header.tlvs:
            body += _TLV.pack(kind, len(value)) + value
    if len(body) > 0xFFFF:
        raise ValueError(
            f"a v2 header holds at most 65535 bytes after its fixed part, not {len(body)}"
        )
    return V2_SIGNATURE + bytes([0x20 | command, family_byte]) + len(body).to_bytes(2, "big") + body


def _v2_address_block(header: ProxyHeader) -> bytes:
    if header.family == socket.AF_UNIX:
        return _UNIX.pack(_raw_path(header.source), _raw_path(header.destination))
    (src, sport), (dst, dport) = header.source, header.destination
    packed = [_check_host(header.family, host).packed for host in (src, dst)]
    for port in (sport, dport):
        _check_port(port)
    layout = _INET if header.family == socket.AF_INET else _INET6
    return layout.pack(*packed, sport, dport)


def _check_host(family: int, host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host)
    if (family == socket.AF_INET) != (address.version == 4):
        raise ValueError(f"{host!r} is not an address of family {family!r}")
    return address


def _check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"a port is an int from 0 to 65535, not {port!r}")


def _raw_path(path: str | bytes) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > _UNIX_PATH:
        raise ValueError(f"a Unix socket path holds at most {_UNIX_PATH} bytes: {path!r}")
    return raw


# The header of the request the current task or handler thread serves. A context variable:
# each request runs in its own task, trio.to_thread carries it to a handler's thread, and a
# worker process sets it around each request.
_current: contextvars.ContextVar[ProxyHeader | None] = contextvars.ContextVar(
    "trio_socketserver_proxy_header", default=None
)


def current_proxy_header() -> ProxyHeader | None:
    """The PROXY protocol header of the request being handled, or None.

    None on a server whose ``proxy_protocol`` is None, and outside a request. Call it from
    the handler (async or sync, on any server class) or from code the handler calls; a
    :class:`~trio_socketserver.BaseRequestHandler` has it as ``self.proxy_header``. For
    handler classes that derive from the stdlib's ``socketserver`` classes, this function
    is the way.
    """
    return _current.get()
