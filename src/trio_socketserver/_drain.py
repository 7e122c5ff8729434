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
# thread by shutdown(SHUT_RD), the only way to end a blocked recv() from another thread.
#
# A shutdown cannot be undone, so for a thread the drain decides under a lock, and a message is
# either served whole or never seen by the handler: as its read returns, the thread waits for
# any decision under way about it, and if the drain shut the socket meanwhile, whatever the read
# got is dropped and the handler sees end-of-file (the peer sent it as the server gave up; it
# is never half served).
# The drain shuts a thread's socket only when no byte of a next message has reached the kernel
# since the thread began to wait: none is queued, and (plain TCP on Linux) the kernel's count of
# bytes arrived is what the handler's file has counted, so a read that already took the first
# bytes is left to serve them. Elsewhere (TLS, Unix sockets) the kernel cannot tell what a read
# took, and the thread waits with a peek (MSG_PEEK takes nothing) before it reads. A handler
# that reads its socket around its rfile makes the counts disagree: its idle connection is then
# not ended early, but cut when the grace runs out. The hot path pays no cancel scope, no extra
# system call on plain TCP and no lock until the drain begins: a set insertion and removal
# around a read that waits.
from __future__ import annotations

import fcntl
import socket
import ssl
import sys
import termios
import threading
from typing import Any, Literal

import attrs
import trio

# struct tcp_info (Linux 4.1+) and where its tcpi_bytes_received lies: every byte of data that
# arrived in order since the connection opened (the peer's FIN counts one).
TCP_INFO_SIZE = 136
BYTES_RECEIVED = slice(128, 136)
KERNEL_COUNTS = sys.platform == "linux" and hasattr(socket, "TCP_INFO")


@attrs.define(eq=False)
class Drain:
    """One serve_forever() run's view of its persistent connections."""

    closing: bool = False
    """The grace period has begun: reads at a message boundary return end-of-file."""
    waiting: set[Exchange] = attrs.Factory(set)
    """Connections whose handler is waiting at a message boundary right now."""
    lock: threading.Lock = attrs.Factory(threading.Lock)
    """Decides, for a sync handler's thread, between its next message and the drain."""

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
    ended: bool = False
    """The drain shut the reading side of a sync handler's socket down."""
    taken: int = 0
    """Bytes a sync handler's file has read from the socket."""
    kernel_offset: int | None = None
    """Bytes the kernel handed out before the file counted (a PROXY header); None: not known
    yet (learnt at the first boundary if countable, else the thread waits with a peek)."""
    countable: bool = attrs.field(init=False)
    """Whether the kernel can say how many bytes arrived (plain TCP on Linux, threads)."""

    def __attrs_post_init__(self) -> None:
        self.countable = (
            self.threaded
            and KERNEL_COUNTS
            and type(self.socket) is socket.socket
            and self.socket.family in (socket.AF_INET, socket.AF_INET6)
        )
        if not self.countable:
            self.kernel_offset = None

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
        with self.drain.lock:
            # Still waiting, and no byte of its next message has reached the kernel.
            if self not in self.drain.waiting or self._data_arrived() or self._read_took_some():
                return
            self.ended = True
            try:
                # The plain socket's method, also under TLS: ssl.SSLSocket's own would end
                # the TLS session under the reading thread.
                socket.socket.shutdown(self.socket, socket.SHUT_RD)
            except OSError:
                pass  # closed or reset already: its wait returns at once anyway

    def receive_next_message(self, file: BoundarySocketIO, buffer: Any) -> int | None:
        """A sync handler's thread reads ``file`` at a message boundary, as
        ``SocketIO.readinto(buffer)`` would; 0 (end-of-file) when the drain ends the wait,
        or the grace had begun with nothing arrived."""
        drain = self.drain
        if self.countable and self.kernel_offset is None:
            self._count_from_here()
        drain.waiting.add(self)
        if drain.closing:
            with drain.lock:
                drain.waiting.discard(self)
                if self.ended or not self._data_arrived():
                    return 0
            return socket.SocketIO.readinto(file, buffer)
        if self.kernel_offset is not None:
            try:
                received = socket.SocketIO.readinto(file, buffer)
            finally:
                ended = self._wait_ended()
            return 0 if ended else received
        try:
            if isinstance(self.socket, ssl.SSLSocket) and self.socket.pending():
                arrived = True
            else:
                # Honours the socket's timeout, as the read would (TimeoutError).
                arrived = bool(socket.socket.recv(self.socket, 1, socket.MSG_PEEK))
        finally:
            ended = self._wait_ended()
        if ended or not arrived:
            return 0
        return socket.SocketIO.readinto(file, buffer)

    def _wait_ended(self) -> bool:
        """A thread's wait is over: whether the drain ended it. Without the lock unless the
        drain has begun: it sets ``closing`` before it looks at ``waiting``, so a drain that
        has not begun will not find this thread there."""
        drain = self.drain
        drain.waiting.discard(self)
        if not drain.closing:
            return False
        with drain.lock:  # a decision about this thread may be under way: wait for it
            return self.ended

    def _count_from_here(self) -> None:
        """Learn what the kernel handed out before the file counted: with nothing of the
        next message read yet, what arrived in all less what is queued and what the file
        took. Those are two system calls, so the count is read on both sides of the queue's
        length: if a byte arrived in between, this connection waits with a peek instead."""
        try:
            arrived = self._bytes_arrived()
            queued = int.from_bytes(
                fcntl.ioctl(self.socket, termios.FIONREAD, bytes(4)), sys.byteorder
            )
            if arrived is not None and self._bytes_arrived() == arrived:
                self.kernel_offset = arrived - queued - self.taken
                return
        except OSError:
            pass
        self.countable = False

    def _read_took_some(self) -> bool:
        """With nothing queued: whether the thread's read has taken bytes its file has not
        counted yet, i.e. it has begun to receive its next message. Any disagreement counts
        as taken: the connection is then left to the end of the grace, never cut short."""
        if self.kernel_offset is None:
            return False  # the thread peeks: it takes nothing while it waits
        try:
            arrived = self._bytes_arrived()
        except OSError:
            return True
        return arrived != self.kernel_offset + self.taken

    def _bytes_arrived(self) -> int | None:
        info = self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        if len(info) < TCP_INFO_SIZE:
            return None  # a kernel older than tcpi_bytes_received
        return int.from_bytes(info[BYTES_RECEIVED], sys.byteorder)

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
        exchange = self._exchange
        if exchange.received and exchange.replied:
            n = exchange.receive_next_message(self, b)
        else:
            n = socket.SocketIO.readinto(self, b)
        if n:
            exchange.received = True
            exchange.replied = False
            exchange.taken += n
        return n

    def write(self, b: Any) -> int | None:
        self._exchange.replied = True
        return super().write(b)
