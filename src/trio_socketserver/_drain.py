# How persistent connections end when a server drains: at a message boundary, not in the
# middle of a request. When a stop reaches its grace period, a connection whose handler is
# waiting for the peer's *next* message, with nothing buffered, gets end-of-file from its rfile,
# so `async for line in self.rfile` (or http.server's keep-alive loop under compat) ends cleanly
# and the connection closes with a FIN between two messages.
#
# "Waiting for the next message" is decided without knowing the protocol: the handler has
# received something and written a reply since, and its read finds the buffer empty. A read in
# the middle of a request (a body after its headers: nothing written in between) is never at a
# boundary, and neither is a connection's first message, which is always served.
#
# A read that reaches a boundary once the grace has begun returns end-of-file at once, unless
# the peer's next message has already arrived in the kernel (it is then served). A read already
# waiting at a boundary when the grace begins is woken: a trio task through
# trio.lowlevel.notify_closing (its wait ends, the socket stays as it is), a sync handler's
# thread by shutdown(SHUT_RD), the only way to end a blocked recv() from another thread (and one
# that cannot be undone: a thread whose next message has already arrived is left to read it).
# The hot path pays no cancel scope: only a set insertion around a read that waits.
from __future__ import annotations

import socket
import ssl
from typing import Any, Literal

import attrs
import trio


@attrs.define(eq=False)
class Drain:
    """One serve_forever() run's view of its persistent connections."""

    closing: bool = False
    """The grace period has begun: reads at a message boundary return end-of-file."""
    waiting: set[Exchange] = attrs.Factory(set)
    """Connections whose handler is waiting at a message boundary right now."""

    def close_idle(self) -> None:
        """Start the grace period: wake every connection waiting at a message boundary.

        Runs on the trio thread while sync handlers' threads add and remove themselves:
        ``closing`` is set first and every reader adds itself before it looks at it, so each
        waiting reader is either woken here or sees ``closing`` itself.
        """
        self.closing = True
        for exchange in list(self.waiting):
            exchange.end_reading()


@attrs.define(eq=False)
class Exchange:
    """One connection's request/reply state, shared by its reader and writer."""

    drain: Drain
    socket: socket.socket
    """The connection's socket (with TLS, the one under it)."""
    threaded: bool
    """Whether a sync handler's thread reads it (else a trio task)."""
    received: bool = False
    """Something arrived since the connection opened."""
    replied: bool = False
    """The handler wrote since the last bytes arrived."""

    @property
    def at_boundary(self) -> bool:
        """Whether a read that finds nothing buffered waits for the peer's next message."""
        return self.received and self.replied

    def start_waiting(self) -> bool:
        """Before a read at a message boundary; False: end-of-file instead of reading (the
        grace has begun and the peer's next message has not arrived)."""
        self.drain.waiting.add(self)
        if self.drain.closing:
            # Already too late to be woken: decide here, and never leave a read to a wake-up.
            self.drain.waiting.discard(self)
            return self._data_arrived()
        return True

    def stop_waiting(self, data: object) -> None:
        self.drain.waiting.discard(self)
        self.received_data(data)

    def received_data(self, data: object) -> None:
        if data:
            self.received = True
            self.replied = False

    def end_reading(self) -> None:
        """Wake a read waiting at the boundary: it returns end-of-file."""
        if not self.threaded:
            trio.lowlevel.notify_closing(self.socket)
            return
        if self._data_arrived():
            # The thread is about to return with the peer's next message: a shutdown now
            # would make the rest of that message read as end-of-file.
            return
        try:
            # The plain socket's method, also under TLS: ssl.SSLSocket's own would end the
            # TLS session under the reading thread.
            socket.socket.shutdown(self.socket, socket.SHUT_RD)
        except OSError:
            pass  # closed or reset already: its read returns at once anyway

    def _data_arrived(self) -> bool:
        if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
            return True
        try:
            return bool(socket.socket.recv(self.socket, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return True  # let the read itself report what is wrong


class BoundarySocketIO(socket.SocketIO):
    """A sync handler's raw socket file that takes part in the drain (see the module)."""

    def __init__(self, sock: socket.socket, mode: Literal["rb", "wb"], exchange: Exchange) -> None:
        super().__init__(sock, mode)
        # socket.makefile() counts the files open on a socket, so that closing the socket
        # while a file is open waits for the file; keep that bookkeeping.
        sock._io_refs += 1  # type: ignore[attr-defined]
        self._exchange = exchange

    def readinto(self, b: Any) -> int | None:
        # Every read of a sync handler's rfile passes here, so Exchange's at_boundary,
        # start_waiting() and stop_waiting() are spelled out: four calls fewer per read.
        exchange = self._exchange
        if exchange.received and exchange.replied:  # at a message boundary
            drain = exchange.drain
            drain.waiting.add(exchange)
            if drain.closing:
                drain.waiting.discard(exchange)
                if not exchange._data_arrived():
                    return 0
            try:
                n = socket.SocketIO.readinto(self, b)
            finally:
                drain.waiting.discard(exchange)
        else:
            n = socket.SocketIO.readinto(self, b)
        if n:
            exchange.received = True
            exchange.replied = False
        return n

    def write(self, b: Any) -> int | None:
        self._exchange.replied = True
        return super().write(b)
