# The server side of the PROXY protocol: what a server's proxy_* attributes mean (checked
# once, as serving starts), whom it trusts to send a header, and taking the header off a new
# connection before verify_request() sees it, in the connection's own task (or, for compat's
# inline handle_request(), the calling thread). The header is looked at with MSG_PEEK and
# then exactly its bytes are taken from the kernel: whatever the client sent after it stays in
# the socket for the next reader (rfile, a TLS handshake, a sync handler's own socket, a
# worker process), and nothing is buffered here. The wire format is _proxy.py's.
from __future__ import annotations

import ipaddress
import math
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from ._proxy import V1_MAX_LENGTH, Parsed, ProxyHeader, ProxyProtocolError, parse_header

# The values of a server's `proxy_protocol`, and the header versions each accepts.
PROXY_PROTOCOLS = {"v1": frozenset({1}), "v2": frozenset({2}), "auto": frozenset({1, 2})}
# Who may send a header unless `proxy_trusted` says otherwise: this host (a balancer on the
# same machine, a sidecar). An IPv4 peer on a dual-stack socket (::ffff:127.0.0.1) counts as
# its IPv4 address.
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1")
# The first look at a new connection: a whole v1 header, or a v2 header's fixed part and
# (for an ordinary v2 header) all of it.
FIRST_LOOK = V1_MAX_LENGTH

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class ProxySettings:
    """A server's PROXY protocol settings, checked."""

    versions: frozenset[int]
    trusted: tuple[Network, ...]
    timeout: float


def proxy_settings(server: Any) -> ProxySettings | None:
    """The checked settings of ``server``, or None when it takes no PROXY header.

    Errors: ``ValueError`` naming the attribute and what it takes.
    """
    mode = server.proxy_protocol
    if mode is None:
        return None
    if not isinstance(mode, str) or mode not in PROXY_PROTOCOLS:
        raise ValueError(f"proxy_protocol must be None, 'v1', 'v2' or 'auto', not {mode!r}")
    sock = getattr(server, "socket", None)
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        raise ValueError(
            f"proxy_protocol is for stream servers (TCPServer, UnixStreamServer); "
            f"{type(server).__name__} does not serve connections: leave it None"
        )
    timeout = server.proxy_header_timeout
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf
    ):
        raise ValueError(
            f"proxy_header_timeout must be a positive number of seconds, not {timeout!r}"
        )
    return ProxySettings(PROXY_PROTOCOLS[mode], _networks(server.proxy_trusted), float(timeout))


def _networks(value: Any) -> tuple[Network, ...]:
    example = "e.g. ['10.0.0.0/8', '2001:db8::/32']"
    if isinstance(value, str | bytes):
        raise ValueError(
            f"proxy_trusted must be a list of addresses or networks, {example}, "
            f"not the single {type(value).__name__} {value!r}"
        )
    try:
        items = list(value)
    except TypeError:
        raise ValueError(
            f"proxy_trusted must be a list of addresses or networks, {example}, not {value!r}"
        ) from None
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"proxy_trusted: {item!r} is not an address or network: {exc}"
            ) from None
    return tuple(networks)


def trusts(settings: ProxySettings, peer: Any) -> bool:
    """Whether ``peer`` (the connection's own address) may send a header.

    A Unix socket's peer always may: who can connect at all is the socket file's
    permissions (``socket_mode``), and such a peer has no network address to check.
    """
    if not isinstance(peer, tuple):
        return True
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in settings.trusted)


def proxied_address(header: ProxyHeader, request: socket.socket, peer: Any) -> Any:
    """The ``client_address`` a request with ``header`` gets: the original client's.

    ``peer`` itself when the header names no one (v1 ``UNKNOWN``, v2 ``LOCAL`` or the
    unspecified family). An IP source has the shape the server's own peers have: ``(host,
    port)``, or ``(host, port, 0, 0)`` on an IPv6 socket; a Unix source is its path.
    """
    if header.source is None:
        return peer
    if header.family != socket.AF_UNIX and request.family == socket.AF_INET6:
        host, port = header.source
        return (host, port, 0, 0)
    return header.source


async def take_proxy_header(request: Any, peer: Any, settings: ProxySettings) -> ProxyHeader:
    """Read the PROXY header off the new connection ``request`` from ``peer``.

    Cancellation: a checkpoint; cancelled, it has taken only header bytes.

    Errors: :exc:`ProxyProtocolError` saying why the connection must be refused: an
    untrusted peer (refused before anything is read), no or a bad header, end of file or an
    error before it was complete, or ``settings.timeout`` seconds passed first.
    ``TypeError`` if ``request`` is not a plain stream socket.
    """
    reader = _HeaderReader(_plain_socket(request), settings.versions)
    if not trusts(settings, peer):
        raise ProxyProtocolError(_UNTRUSTED)
    with _timeout_restored(reader.sock), trio.move_on_after(settings.timeout):
        reader.sock.setblocking(False)
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                header = reader.step()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(reader.sock)
                continue
            if header is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return header
    raise ProxyProtocolError(_too_slow(settings.timeout))


def take_proxy_header_blocking(request: Any, peer: Any, settings: ProxySettings) -> ProxyHeader:
    """:func:`take_proxy_header` in the calling thread, blocking it (at most
    ``settings.timeout`` seconds)."""
    reader = _HeaderReader(_plain_socket(request), settings.versions)
    if not trusts(settings, peer):
        raise ProxyProtocolError(_UNTRUSTED)
    deadline = time.monotonic() + settings.timeout
    with _timeout_restored(reader.sock):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProxyProtocolError(_too_slow(settings.timeout))
            reader.sock.settimeout(left)  # a look waits at most this long for bytes
            try:
                header = reader.step()
            except TimeoutError:
                raise ProxyProtocolError(_too_slow(settings.timeout)) from None
            if header is not None:
                return header


_UNTRUSTED = "the peer is not in proxy_trusted"


def _too_slow(timeout: float) -> str:
    return f"no complete header within proxy_header_timeout ({timeout:g} s)"


def _plain_socket(request: Any) -> socket.socket:
    # A TLS socket already did its handshake, which the header must come before, and cannot
    # be peeked at.
    if not isinstance(request, socket.socket) or isinstance(request, ssl.SSLSocket):
        raise TypeError(
            f"proxy_protocol needs get_request() to return the accepted socket itself, not "
            f"{type(request).__name__}: the header comes before anything else, TLS included "
            "(use the server's ssl_context, which wraps the connection after the header)"
        )
    return request


@contextmanager
def _timeout_restored(sock: socket.socket) -> Iterator[None]:
    """The body may change the socket's timeout (or blocking mode): it is put back after."""
    timeout = sock.gettimeout()
    try:
        yield
    finally:
        if sock.fileno() != -1:
            sock.settimeout(timeout)


@attrs.define(eq=False)
class _HeaderReader:
    """Takes one header off a socket, one look at a time."""

    sock: socket.socket
    versions: frozenset[int]
    taken: bytes = b""
    look: int = FIRST_LOOK

    def step(self) -> ProxyHeader | None:
        """Look at what has arrived and take from the kernel what belongs to the header.

        Returns the header once complete, else None: call again (on a non-blocking socket,
        once it is readable if the look raised ``BlockingIOError``: nothing had arrived).
        A look waits as the socket's mode says: ``BlockingIOError`` or ``TimeoutError``
        when nothing arrived in time.

        Errors: :exc:`ProxyProtocolError` for a bad header, end of file or a failed
        connection.
        """
        seen = self._receive(self.look, socket.MSG_PEEK)
        if not seen:
            what = "its header was complete" if self.taken else "sending a header"
            raise ProxyProtocolError(f"the client closed the connection before {what}")
        result = parse_header(self.taken + seen, self.versions)
        if isinstance(result, Parsed):
            self._take(result.consumed - len(self.taken))
            return result.header
        # Not complete: everything seen is header, so take it, and the next look waits for
        # new bytes instead of finding these again.
        self._take(len(seen))
        self.taken += seen
        self.look = result.at_most
        return None

    def _take(self, count: int) -> None:
        """Take ``count`` bytes that a look saw (so they are there) from the kernel."""
        while count > 0:
            taken = self._receive(count, 0)
            if not taken:
                raise ProxyProtocolError("the connection ended while its header was taken")
            count -= len(taken)

    def _receive(self, size: int, flags: int) -> bytes:
        try:
            return self.sock.recv(size, flags)
        except (BlockingIOError, TimeoutError):
            raise
        except OSError as exc:
            raise ProxyProtocolError(f"the connection failed before its header: {exc}") from None
