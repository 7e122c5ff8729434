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


class _Busy:
    """trio's conflict detector: two tasks may not use one direction of a stream at once."""

    __slots__ = ("_active", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self._active = False

    def __enter__(self) -> None:
        if self._active:
            raise trio.BusyResourceError(self._message)
        self._active = True

    def __exit__(self, *exc_info: object) -> None:
        self._active = False


class SocketFastStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.abc.HalfCloseableStream` on a connected stdlib socket.

    Same behaviour as :class:`trio.SocketStream` on that socket, faster:

    - ``receive_some`` calls ``recv()`` first and registers a wait with the kernel only when
      nothing is there.
    - ``send_all`` yields once the data is handed to the kernel, so by the time the task runs
      again its peer has usually answered and the next receive finds data instead of
      registering a wait (what makes request/response traffic cheap).

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

    # Every idle connection holds one: no per-instance dict.
    __slots__ = ("_eof_sent", "_receiving", "_sending", "bytes_received", "bytes_sent", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.bytes_received = 0
        self.bytes_sent = 0
        self._eof_sent = False
        self._receiving = _Busy("another task is already receiving on this connection")
        self._sending = _Busy("another task is already sending on this connection")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_SIZE
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes!r}")
        with self._receiving:
            while True:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    data = self.socket.recv(max_bytes)
                except BlockingIOError:
                    pass  # wait below, outside the except block: see _wait
                except OSError as exc:
                    raise _stream_error(exc) from exc
                else:
                    self.bytes_received += len(data)
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                await self._wait(trio.lowlevel.wait_readable)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self.socket.fileno() == -1:
                raise trio.ClosedResourceError("the connection was already closed")
            if self._eof_sent:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            with memoryview(data) as view:
                offset = 0
                while offset < len(view):
                    try:
                        sent = self.socket.send(view[offset:])
                    except BlockingIOError:
                        pass  # wait below, outside the except block: see _wait
                    except OSError as exc:
                        raise _stream_error(exc) from exc
                    else:
                        offset += sent
                        self.bytes_sent += sent
                        continue
                    await self._wait(trio.lowlevel.wait_writable)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            await self._wait(trio.lowlevel.wait_writable)

    async def send_eof(self) -> None:
        with self._sending:
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

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        # Called outside the ``except BlockingIOError`` block on purpose: waiting inside it
        # would keep the exception and its traceback alive for as long as the peer is idle,
        # about 0.5 KiB for every idle connection.
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("the connection was already closed")
        try:
            await wait(self.socket)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the connection was closed while waiting") from None


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The stream error trio.SocketStream raises for this OSError."""
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("the connection was already closed")
    return trio.BrokenResourceError(f"connection broken: {exc}")
