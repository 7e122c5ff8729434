# The client side of a test: a small line/stream client over any trio stream (a real
# connection to a served server, or the memory stream a handler harness is fed through).
from __future__ import annotations

import socket
import ssl
from typing import Any

import attrs
import trio

from .._streams import StreamReader

# The longest line receive_line() accepts by default: a server that never sends b"\n"
# fails the test instead of filling memory.
MAX_LINE = 65536


@attrs.define(eq=False)
class StreamClient(trio.abc.AsyncResource):
    """A test's end of a connection: send bytes, receive lines, bytes or everything to EOF.

    Wraps any :class:`trio.abc.Stream`; reads are buffered (a
    :class:`~trio_socketserver.StreamReader`), so lines and exact counts come out whole
    however the bytes arrived. ``async with`` closes the stream.
    """

    stream: trio.abc.Stream
    """The underlying stream, for anything the helpers below do not cover."""
    _reader: StreamReader = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._reader = StreamReader(self.stream)

    async def send_all(self, data: bytes) -> None:
        """Send ``data``; returns once the stream took it all."""
        await self.stream.send_all(data)

    async def send_eof(self) -> None:
        """Close the sending direction (the handler reads end-of-file); keep receiving.

        Errors: ``TypeError`` if the stream cannot half-close (TLS): close it instead.
        """
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            raise TypeError(
                f"{type(self.stream).__name__} cannot half-close; use aclose() to end the stream"
            )
        await self.stream.send_eof()

    async def receive_line(self, limit: int = MAX_LINE) -> bytes:
        """The next line, ``b"\\n"`` included; what is left at end-of-file; ``b""`` at EOF.

        Errors: ``AssertionError`` if ``limit`` bytes arrived without a newline.
        """
        line = await self._reader.readline(limit)
        assert len(line) < limit or line.endswith(b"\n"), (
            f"no newline in {limit} bytes: {line[:80]!r}"
        )
        return line

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :exc:`~trio_socketserver.IncompleteReadError` at an early EOF."""
        return await self._reader.readexactly(n)

    async def receive_all(self) -> bytes:
        """Everything until the other end closes."""
        return await self._reader.read()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_client(
    server: Any,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    send_first: bytes = b"",
) -> StreamClient:
    """Connect a :class:`StreamClient` to a served stream server (TCP, IPv6 or Unix).

    With ``ssl_context`` the connection is TLS, checked against ``server_hostname``
    (default: the server's host). ``send_first`` is sent on the connection before anything
    else, the TLS handshake included: what a balancer's :func:`proxy_header` does. Use it as
    ``async with await open_client(server) as c:``.
    """
    host = None
    if server.address_family == socket.AF_UNIX:
        stream: trio.abc.Stream = await trio.open_unix_socket(server.server_address)
    else:
        host, port = server.server_address[:2]
        stream = await trio.open_tcp_stream(host, port)
    if send_first:
        try:
            await stream.send_all(send_first)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    if ssl_context is not None and host is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
    return StreamClient(stream)
