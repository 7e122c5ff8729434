# Running one request handler with no server and no listening socket: bytes in, output and
# the error its server would have reported out. Async handlers talk over trio memory streams
# (so their timeouts follow trio's clock, autojump_clock included); sync handlers run on a
# thread with the stdlib's socket and file objects, over a socketpair.
from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from .._server import is_async_handler
from ._client import StreamClient
from ._leaks import LeakError
from ._serving import STOP_TIMEOUT

# What a handler under test sees as self.client_address unless the test says otherwise.
DEFAULT_CLIENT_ADDRESS = ("127.0.0.1", 50000)
# How long a sync handler's thread gets to return once its socket was shut down (what a
# stopping server does to blocked threads) before it counts as leaked.
THREAD_RELEASE_TIMEOUT = 1.0


@attrs.define(eq=False)
class HandlerClient(StreamClient):
    """The client end of :func:`open_handler`: a :class:`StreamClient` plus the handler's fate."""

    error: Exception | None = None
    """What the handler raised (what its server's ``handle_error()`` would report): set once
    the handler has finished, i.e. after the ``async with`` block. ``trio.TooSlowError`` if
    it was still running ``stop_timeout`` seconds after the block and had to be cancelled."""


@attrs.frozen
class HandlerRun:
    """The outcome of :func:`run_handler`."""

    output: bytes
    """Everything the handler sent, until it ended the connection."""
    error: Exception | None
    """What the handler raised, or None."""


@attrs.frozen
class DatagramRun:
    """The outcome of :func:`run_datagram_handler`."""

    sent: list[tuple[bytes, Any]]
    """Every ``(datagram, address)`` the handler sent, in order."""
    error: Exception | None
    """What the handler raised, or None."""
    client_address: Any = DEFAULT_CLIENT_ADDRESS
    """The address the handler saw as its client's."""

    @property
    def replies(self) -> list[bytes]:
        """The datagrams sent back to the client's address."""
        return [data for data, address in self.sent if address == self.client_address]


@asynccontextmanager
async def open_handler(
    handler_class: Callable[..., Any],
    *,
    client_address: Any = DEFAULT_CLIENT_ADDRESS,
    server: Any = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> AsyncIterator[HandlerClient]:
    """Run one stream handler and talk to it as its client, with no server and no listener.

    ``handler_class`` is built as its server would build it, with ``client_address`` and
    ``server`` (any object the handler expects as ``self.server``; default None):

    - ``async def handle``: ``self.request`` is one end of a
      :func:`trio.testing.memory_stream_pair`; ``rfile``, ``wfile`` and ``timeout`` work as
      on a connection, on trio's clock (under ``autojump_clock`` a timeout takes no time).
    - ``def handle``: the handler runs on a thread and ``self.request`` is one end of a
      :func:`socket.socketpair` (``AF_UNIX``), with the stdlib's ``rfile``/``wfile`` files.

    On a clean exit of the block the client sends end-of-file and waits (``stop_timeout``
    seconds at most) for the handler to finish, then cancels it (an async handler) or shuts
    its socket down (a sync one), as a stopping server does; read what you expect inside
    the block. Afterwards ``client.error`` holds what the handler raised.

    Errors: :exc:`LeakError` if a sync handler's thread did not return after its socket was
    shut down.
    """
    done = trio.Event()
    cutoff = trio.CancelScope()
    if is_async_handler(handler_class):
        client_stream, handler_stream = trio.testing.memory_stream_pair()
        client = HandlerClient(client_stream)

        async def run() -> None:
            try:
                with cutoff:
                    handler = handler_class(handler_stream, client_address, server)
                    await handler.run()
            except Exception as exc:
                client.error = exc
            finally:
                await trio.aclose_forcefully(handler_stream)
                done.set()

    else:
        client_socket, handler_socket = socket.socketpair()
        client = HandlerClient(trio.SocketStream(trio.socket.from_stdlib_socket(client_socket)))

        def handle() -> None:
            try:
                handler_class(handler_socket, client_address, server)
            except Exception as exc:
                client.error = exc

        async def run() -> None:
            try:
                with cutoff:
                    await call_in_thread(handle, release=lambda: _shut_down(handler_socket))
            finally:
                handler_socket.close()
                done.set()

    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(run)
        try:
            yield client
        except BaseException:
            cutoff.cancel()
            raise
        try:
            await client.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the handler already closed its end: nothing to tell it
        with trio.move_on_after(stop_timeout):
            await done.wait()
        if not done.is_set():
            client.error = trio.TooSlowError(
                f"the handler was still running {stop_timeout} s after its client finished"
            )
            cutoff.cancel()


async def run_handler(
    handler_class: Callable[..., Any],
    data: bytes = b"",
    *,
    client_address: Any = DEFAULT_CLIENT_ADDRESS,
    server: Any = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> HandlerRun:
    """Send ``data`` and end-of-file to a stream handler; return all it sent, and its error.

    The one-call form of :func:`open_handler` (same arguments): sending and receiving run
    at once, so a handler that answers as it reads never waits for the test.
    """
    async with (
        open_handler(
            handler_class, client_address=client_address, server=server, stop_timeout=stop_timeout
        ) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_send_then_eof, client, data)
        output = await client.receive_all()
    return HandlerRun(output, client.error)


async def run_datagram_handler(
    handler_class: Callable[..., Any],
    packet: bytes,
    *,
    client_address: Any = DEFAULT_CLIENT_ADDRESS,
    server: Any = None,
) -> DatagramRun:
    """Run a datagram handler on one ``packet``; return what it sent, and its error.

    ``self.request`` is ``(packet, socket)`` where the socket records ``sendto()`` calls
    (awaitable for an ``async def handle``, plain on the thread a sync handler runs on),
    so :class:`~trio_socketserver.DatagramRequestHandler`'s ``wfile`` reply and direct
    ``sendto()`` calls both show up in :attr:`DatagramRun.sent`.
    """
    sent: list[tuple[bytes, Any]] = []
    error: Exception | None = None
    if is_async_handler(handler_class):
        try:
            handler = handler_class((packet, _AsyncRecordingSocket(sent)), client_address, server)
            await handler.run()
        except Exception as exc:
            error = exc
    else:
        errors: list[Exception] = []

        def handle() -> None:
            try:
                handler_class((packet, _RecordingSocket(sent)), client_address, server)
            except Exception as exc:
                errors.append(exc)

        await call_in_thread(handle, release=lambda: None)
        error = errors[0] if errors else None
    return DatagramRun(sent, error, client_address)


async def _send_then_eof(client: StreamClient, data: bytes) -> None:
    try:
        await client.send_all(data)
        await client.send_eof()
    except trio.BrokenResourceError:
        pass  # the handler stopped reading and closed: what it sent is the answer


def _shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed: nothing is blocked on it


async def call_in_thread(fn: Callable[[], object], *, release: Callable[[], object]) -> None:
    """Run ``fn()`` on a new thread (not trio's cache, so a leak check sees it) and wait.

    Cancellation: calls ``release()`` (which must make ``fn`` return, e.g. by shutting its
    socket down), waits ``THREAD_RELEASE_TIMEOUT`` for the thread, then re-raises; a thread
    still running then raises :exc:`LeakError` instead.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def target() -> None:
        try:
            fn()
        finally:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the test's trio.run is over; nobody waits any more

    thread = threading.Thread(target=target, name="trio_socketserver.testing handler")
    thread.start()
    try:
        await done.wait()
    except trio.Cancelled:
        release()
        with trio.CancelScope(shield=True), trio.move_on_after(THREAD_RELEASE_TIMEOUT):
            await done.wait()
        if not done.is_set():
            raise LeakError(
                f"handler thread still running {THREAD_RELEASE_TIMEOUT} s after its "
                "connection was shut down"
            ) from None
        raise
    thread.join()  # it has set `done`: only its return is left


@attrs.define(eq=False)
class _RecordingSocket:
    """What a sync datagram handler's ``self.request[1]`` is: records what it sends."""

    _sent: list[tuple[bytes, Any]]

    def sendto(self, data: bytes, address: Any) -> int:
        self._sent.append((bytes(data), address))
        return len(data)


@attrs.define(eq=False)
class _AsyncRecordingSocket:
    """What an async datagram handler's ``self.request[1]`` is: an awaitable ``sendto``."""

    _sent: list[tuple[bytes, Any]]

    async def sendto(self, data: bytes, address: Any) -> int:
        await trio.lowlevel.checkpoint()
        self._sent.append((bytes(data), address))
        return len(data)
