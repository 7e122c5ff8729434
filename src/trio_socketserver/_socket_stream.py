# SocketFastStream: a trio stream straight on a connected, non-blocking stdlib socket. It is
# what async stream handlers' rfile/wfile (and TLS) run on: trio.SocketStream's semantics with
# less of its per-call machinery. Nothing here knows about servers or handlers; the rules are
# trio's (checkpoint_if_cancelled before a syscall that consumes or emits data, a conflict
# detector per direction), tested with trio's own stream conformance helpers.
from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

import trio

# What receive_some asks for when the caller gives no size (trio.SocketStream's default).
DEFAULT_RECEIVE_SIZE = 65536


class SocketFastStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.abc.HalfCloseableStream` on a connected stdlib socket.

    Same behaviour as :class:`trio.SocketStream` on that socket, faster:

    - ``receive_some`` takes its checkpoint first, then calls ``recv()``, and registers a
      wait with the kernel only when nothing is there.
    - ``send_all`` yields once the data is handed to the kernel. With the receive's own
      yield before its ``recv()``, the peer has two turns of the scheduler to answer, and
      the next receive usually finds data instead of registering a wait (what makes
      request/response traffic cheap).

    ``bytes_received`` and ``bytes_sent`` count what crossed this stream.

    Cancellation:
      Every call is a checkpoint, and checks for cancellation *before* it takes data from
      or gives data to the kernel, never after: a cancelled ``receive_some`` has consumed
      nothing, and a ``send_all`` in an already-cancelled scope sends nothing. A
      ``send_all`` cancelled while waiting for the peer to accept more may have sent part
      of the data (as trio's).

    Errors:
      As :class:`trio.SocketStream`: :exc:`trio.ClosedResourceError` once closed,
      :exc:`trio.BrokenResourceError` (chained to the ``OSError``) for what the kernel
      reports, :exc:`trio.BusyResourceError` when two tasks receive (or send) at once.

    Resource handling:
      :meth:`aclose` closes the socket.
    """

    # Every idle connection holds one: no per-instance dict. The conflict detector of each
    # direction is a flag (trio's ConflictDetector is an object and a `with` block, which
    # a waiting receive would hold for as long as the peer is idle).
    __slots__ = ("_eof_sent", "_receiving", "_sending", "bytes_received", "bytes_sent", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.bytes_received = 0
        self.bytes_sent = 0
        self._eof_sent = False
        self._receiving = False
        self._sending = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes!r}")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        try:
            # The checkpoint (a schedule point, and a cancel point before anything is taken
            # from the kernel), then nothing between recv() and the return.
            await trio.lowlevel.checkpoint()
            while True:
                data = _receive(self.socket, max_bytes)
                if data is not None:
                    self.bytes_received += len(data)
                    return data
                await self._wait(trio.lowlevel.wait_readable)
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self.socket.fileno() == -1:
                raise trio.ClosedResourceError("the connection was already closed")
            if self._eof_sent:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            with memoryview(data) as view:
                offset = 0
                while offset < len(view):
                    sent = _send(self.socket, view[offset:] if offset else view)
                    if sent is None:
                        await self._wait(trio.lowlevel.wait_writable)
                    else:
                        offset += sent
                        self.bytes_sent += sent
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._sending = True
        try:
            await self._wait(trio.lowlevel.wait_writable)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._eof_sent:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            self._eof_sent = True
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise _stream_error(exc) from exc
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()

    def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> Awaitable[None]:
        """trio's wait for the socket, unless it is closed. A plain function returning the
        awaitable, not a coroutine: every frame on the stack of an idle connection is
        memory that connection holds. (If another task closes the socket meanwhile, trio's
        wait raises ClosedResourceError, as trio.SocketStream's does.)"""
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("the connection was already closed")
        return wait(self.socket)


# recv() and send() in functions of their own that return None for "would block": an
# exception raised inside a coroutine gives its frame a frame object for the rest of its life
# (about 0.2 KiB), and a receive that waits lives as long as its peer is idle.


def _receive(sock: socket.socket, max_bytes: int) -> bytes | None:
    try:
        return sock.recv(max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


def _send(sock: socket.socket, view: memoryview) -> int | None:
    try:
        return sock.send(view)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The stream error trio.SocketStream raises for this OSError."""
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("the connection was already closed")
    return trio.BrokenResourceError(f"connection broken: {exc}")
