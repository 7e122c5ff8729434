# Request handlers: what one request sees. A handler whose handle() is
# `async def` runs as a task on trio objects (streams, a buffered reader and
# writer); one whose handle() is a plain `def` runs on a thread with the
# stdlib's blocking socket and file objects, exactly as socketserver users
# write them. The mode is decided per class by handle(), nowhere else.
from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from typing import Any, Literal

import trio

from ._drain import BoundarySocketIO, Exchange
from ._engine import (
    TCP_FAMILIES,
    Connection,
    call_hook,
    drain_exchange,
    io_stream_for,
    is_async_handler,
    set_nodelay,
)
from ._proxy import ProxyHeader, current_proxy_header
from ._socket_stream import SocketFastStream
from ._streams import StreamReader, StreamWriter

# How long finishing a connection may spend sending TLS's close_notify: a
# peer that stopped reading must not hold the handler task past its end.
TLS_CLOSE_TIMEOUT = 1.0
# Where BaseRequestHandler.__init__ keeps the engine's Connection (its name-mangled
# ``self.__connection``), for _RequestOnFirstUse and StreamRequestHandler to find.
_CONNECTION = "_BaseRequestHandler__connection"


class _RequestOnFirstUse:
    """``self.request`` (and a stream handler's ``self.connection``) of a handler that was
    given the engine's Connection: asked for the first time, the connection makes its
    request stream, which from then on is a plain instance attribute. (No ``__set__``: a
    value in the instance always wins, so assigning ``self.request`` works as ever.)"""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, handler: object, owner: type | None = None) -> Any:
        if handler is None:
            return self
        connection: Connection | None = handler.__dict__.get(_CONNECTION)
        if connection is None:
            raise AttributeError(
                f"{type(handler).__name__!r} object has no attribute {self._name!r}"
            )
        request = handler.__dict__[self._name] = connection.request
        return request


class BaseRequestHandler:
    """One instance per request; override :meth:`handle` (and optionally
    :meth:`setup` / :meth:`finish`).

    ``self.request``, ``self.client_address`` and ``self.server`` are set
    before :meth:`setup`, and so is ``self.proxy_header``: the
    :class:`~trio_socketserver.ProxyHeader` a balancer sent on a server with
    ``proxy_protocol`` set, else None. :meth:`finish` runs even when
    :meth:`handle` raises (Python 3 semantics). With ``async def handle``,
    ``setup`` and ``finish`` may be sync or async, and the server awaits
    :meth:`run`; with a sync ``handle``, the constructor runs all three, as in
    the stdlib.
    """

    request: Any = _RequestOnFirstUse()
    proxy_header: ProxyHeader | None

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        if type(request) is Connection:
            # From the engine, through BaseServer.finish_request(): self.request is made
            # when first asked for (see Connection), most handlers never do.
            self.__connection = request
        else:
            self.request = request
        self.client_address = client_address
        self.server = server
        self.proxy_header = current_proxy_header()
        if not is_async_handler(type(self)):
            self.setup()
            try:
                self.handle()
            finally:
                self.finish()

    async def run(self) -> None:
        """Run setup(), handle(), finish() of an async handler.

        Cancellation: a shutdown past its grace, or a hard stop, cancels
        ``handle()``; ``finish()`` still runs (in the cancelled scope, so its
        own waits are cancelled too).
        """
        await call_hook(self.setup)
        try:
            # Called directly (it is async, or the server would not call run()): a
            # call_hook frame here would stay on the stack of every idle connection.
            await self.handle()
        finally:
            await call_hook(self.finish)

    def setup(self) -> Any:
        """Called before :meth:`handle`; the default does nothing.

        In an async handler the defaults of ``setup()`` and ``finish()`` (here and
        in the subclasses) return awaitables, so an override may ``await
        super().setup()`` as it would any async method.
        """
        return _nothing_to_await(self)

    def handle(self) -> Any:
        """Serve the request; the default does nothing."""

    def finish(self) -> Any:
        """Called after :meth:`handle`, even if it raised; the default does nothing."""
        return _nothing_to_await(self)


class _Done:
    """An awaitable that is already done: what a sync default returns to an async handler.

    Unlike a coroutine, it may be awaited any number of times, or never, without a warning.
    """

    def __await__(self) -> Iterator[None]:
        return iter(())


_DONE = _Done()


def _nothing_to_await(handler: BaseRequestHandler) -> _Done | None:
    return _DONE if is_async_handler(type(handler)) else None


class StreamRequestHandler(BaseRequestHandler):
    """A stream handler with ``self.rfile`` / ``self.wfile``.

    Async ``handle``: ``self.request`` (and ``self.connection``) is a
    ``trio.SocketStream`` or ``trio.SSLStream``; ``rfile`` a
    :class:`StreamReader` (``readline(limit)``, ``read(n)``,
    ``readexactly(n)``, ``async for line``), ``wfile`` a
    :class:`StreamWriter` (``write``, ``flush``).
    Sync ``handle``: the stdlib's socket and file objects.

    ``rbufsize``: read buffer size (-1: default). ``wbufsize``: 0 sends every
    write at once (the default), more buffers until flush. ``timeout``:
    seconds any single wait for the peer may take before ``TimeoutError``
    (``None``: forever), which bounds clients that send nothing or half a
    line. ``disable_nagle_algorithm``: set ``TCP_NODELAY``.

    Async ``handle`` only: ``read_deadline``: seconds one ``rfile`` call
    (``readline``, ``read``, ``readexactly``, ``read1``, one step of ``async
    for``) may take in total, however the bytes trickle in; ``write_deadline``:
    the same for one ``wfile.write``/``writelines``/``flush``. Exceeded: the
    call raises ``TimeoutError`` in the handler, which may answer the client
    before it returns; the default ``handle_error`` logs it as one INFO line.
    ``None`` (the default): no bound, and no cancel scope per call. A sync handler reads
    and writes with the stdlib's file objects, which they cannot bound: setting
    either on one is refused with ``ValueError`` when serving starts (bound its
    requests with the server's ``request_deadline`` instead).
    """

    rbufsize: int = -1
    wbufsize: int = 0
    timeout: float | None = None
    read_deadline: float | None = None
    write_deadline: float | None = None
    disable_nagle_algorithm: bool = False

    connection: Any = _RequestOnFirstUse()
    rfile: Any
    wfile: Any

    def setup(self) -> Any:
        if is_async_handler(type(self)):
            connection: Connection | None = self.__dict__.get(_CONNECTION)
            if connection is None:
                self.connection = self.request
                # trio.SocketStream turns Nagle off for every TCP stream; put it back
                # unless the handler asked for it off, as its attribute says.
                set_nodelay(_socket_of(self.request), self.disable_nagle_algorithm)
                io = io_stream_for(self.request)
                exchange = drain_exchange(self.server, self.request)
            else:
                connection.set_nodelay(self.disable_nagle_algorithm)
                io = connection.io
                exchange = drain_exchange(self.server, connection)
            self.rfile = StreamReader(
                io, self.rbufsize, self.timeout, exchange, deadline=self.read_deadline
            )
            self.wfile = StreamWriter(
                io, self.wbufsize, self.timeout, exchange, deadline=self.write_deadline
            )
            return _DONE
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        # Only TCP has Nagle: on a Unix socket the option would fail every request (as the
        # async path, it is skipped there, so one handler class serves both families).
        if self.disable_nagle_algorithm and self.connection.family in TCP_FAMILIES:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        exchange = drain_exchange(self.server, self.connection)
        self.rfile = _socket_file(self.connection, "rb", self.rbufsize, exchange)
        if self.wbufsize == 0:
            self.wfile = _SocketWriter(self.connection, exchange)
        else:
            self.wfile = _socket_file(self.connection, "wb", self.wbufsize, exchange)
        return None

    def finish(self) -> Any:
        if is_async_handler(type(self)):
            return self.__finish_async()
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                pass  # the peer is gone; there is nobody left to send to
        self.wfile.close()
        self.rfile.close()
        return None

    async def __finish_async(self) -> None:
        try:
            await self.wfile.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, TimeoutError):
            pass  # the peer is gone or stuck; the server closes the connection next
        # The engine's Connection, if it gave one, holds the TLS stream as its io; asking
        # self.request instead would make a plain connection's request stream for nothing.
        connection: Connection | None = self.__dict__.get(_CONNECTION)
        tls = self.request if connection is None else connection.io
        if isinstance(tls, trio.SSLStream):
            with trio.move_on_after(TLS_CLOSE_TIMEOUT) as scope:
                await tls.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(tls)


def _socket_of(stream: Any) -> trio.socket.SocketType | socket.socket | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream | SocketFastStream):
        return stream.socket
    return None


class DatagramRequestHandler(BaseRequestHandler):
    """A datagram handler: ``rfile`` holds the datagram, ``wfile`` collects the reply.

    ``self.packet`` is the data and ``self.socket`` the server's socket (a
    trio socket for an async handler). After :meth:`handle`, whatever was
    written to ``wfile`` is sent back to the client as one datagram.
    """

    rfile: io.BytesIO
    wfile: io.BytesIO

    def setup(self) -> Any:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()
        return _nothing_to_await(self)

    def finish(self) -> Any:
        if is_async_handler(type(self)):
            return self.socket.sendto(self.wfile.getvalue(), self.client_address)
        self.socket.sendto(self.wfile.getvalue(), self.client_address)
        return None


def _socket_file(
    sock: socket.socket, mode: Literal["rb", "wb"], bufsize: int, exchange: Exchange | None
) -> Any:
    """``sock.makefile(mode, bufsize)``, whose reads end at a message boundary when the
    server drains (see _drain.py) if ``exchange`` is given."""
    if exchange is None:
        return sock.makefile(mode, bufsize)
    raw = BoundarySocketIO(sock, mode, exchange)
    if bufsize == 0:
        return raw
    size = io.DEFAULT_BUFFER_SIZE if bufsize < 0 else bufsize
    return io.BufferedReader(raw, size) if mode == "rb" else io.BufferedWriter(raw, size)


class _SocketWriter(io.BufferedIOBase):
    """An unbuffered write-only file on a socket, as the stdlib's wbufsize=0 gives."""

    def __init__(self, sock: socket.socket, exchange: Exchange | None) -> None:
        self._sock = sock
        self._exchange = exchange

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self._exchange is not None:
            self._exchange.replied = True
        self._sock.sendall(b)
        if type(b) is bytes:
            return len(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()
