# Writing a PROXY protocol header in a test, as a balancer would send it, so a test can be the
# balancer in front of a server with proxy_protocol set. The bytes come from the same wire
# format module the server parses with (_proxy.py); this file only builds the header from
# plain addresses.
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from .._proxy import ProxyHeader, encode_header


def proxy_header(
    source: Any = None,
    destination: Any = None,
    *,
    version: int = 1,
    command: str = "PROXY",
    socket_type: int = socket.SOCK_STREAM,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """The PROXY protocol header a balancer sends first on a connection it forwards.

    ``source`` is the client's address and ``destination`` the one it connected to (the
    balancer's), both ``(host, port)`` with IPv4 or IPv6 hosts, or both Unix socket paths
    (version 2 only). Leave both out for a header that names no one: ``PROXY UNKNOWN`` in
    version 1, the unspecified family in version 2, or with ``command="LOCAL"`` (version 2)
    a balancer's own health check. ``version`` 1 is HAProxy's ``send-proxy``, 2 its
    ``send-proxy-v2``, which may carry ``tlvs``: ``(type, value)`` pairs.

    Send it before anything else::

        await client.send_all(proxy_header(("203.0.113.7", 41000), ("192.0.2.1", 443)))

    Errors: ``ValueError`` for what the version cannot carry (v1: Unix paths, datagrams,
    TLVs, ``LOCAL``) and for addresses that are not of one family.
    """
    family = _family_of(source, destination)
    header = ProxyHeader(
        version=version,
        command=command,
        family=family,
        socket_type=0 if family == socket.AF_UNSPEC else socket_type,
        source=_plain(source),
        destination=_plain(destination),
        tlvs=tuple(tlvs),
    )
    return encode_header(header)


def _family_of(source: Any, destination: Any) -> int:
    families = {_one_family(source), _one_family(destination)}
    if len(families) != 1:
        raise ValueError(
            f"source and destination must be of one family (IPv4, IPv6, Unix) or both None, "
            f"not {source!r} and {destination!r}"
        )
    return families.pop()


def _one_family(address: Any) -> int:
    if address is None:
        return socket.AF_UNSPEC
    if isinstance(address, str | bytes):
        return socket.AF_UNIX
    if isinstance(address, tuple) and len(address) == 2:
        try:
            host = ipaddress.ip_address(address[0])
        except ValueError:
            raise ValueError(f"{address[0]!r} is not an IP address") from None
        return socket.AF_INET if host.version == 4 else socket.AF_INET6
    raise ValueError(f"an address is (host, port) or a Unix socket path, not {address!r}")


def _plain(address: Any) -> Any:
    """The address as a header holds it: a host given as an ``ipaddress`` object as text."""
    if address is None or isinstance(address, str | bytes):
        return address
    return (str(address[0]), address[1])
