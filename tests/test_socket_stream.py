# SocketFastStream is a trio stream: trio's own conformance checks, and the cancellation
# rules that the fast path once broke (a cancelled read lost bytes, a write in a cancelled
# scope reached the peer, two writers interleaved), over real socket pairs and through a
# real server's rfile/wfile.
from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import connect, receive_line, serving
from trio_socketserver._socket_stream import SocketFastStream

pytestmark = pytest.mark.usefixtures("no_leaks")
LOCALHOST = ("127.0.0.1", 0)


def fast_pair() -> tuple[SocketFastStream, SocketFastStream]:
    a, b = socket.socketpair()
    return SocketFastStream(a), SocketFastStream(b)


async def test_conforms_to_trio_half_closeable_stream() -> None:
    async def maker() -> tuple[SocketFastStream, SocketFastStream]:
        return fast_pair()

    await trio.testing.check_half_closeable_stream(maker, None)


async def test_cancelled_receive_takes_nothing_from_the_kernel() -> None:
    reader, writer = fast_pair()
    async with reader, writer:
        await writer.send_all(b"kept")
        with trio.CancelScope() as scope:
            scope.cancel()
            await reader.receive_some(100)
        assert scope.cancelled_caught
        # The bytes the cancelled call would have taken are still there for the next read.
        assert await reader.receive_some(100) == b"kept"


async def test_send_in_a_cancelled_scope_sends_nothing() -> None:
    reader, writer = fast_pair()
    async with reader, writer:
        with trio.CancelScope() as scope:
            scope.cancel()
            await writer.send_all(b"never")
        assert scope.cancelled_caught
        assert writer.bytes_sent == 0
        await writer.send_all(b"then")
        assert await reader.receive_some(100) == b"then"


async def test_two_tasks_sending_at_once_get_busy_resource_error() -> None:
    reader, writer = fast_pair()
    big = b"x" * (16 * 1024 * 1024)  # more than the socket buffers: the first send waits
    async with reader, writer:
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.send_all, big)
                await trio.testing.wait_all_tasks_blocked()
                await writer.send_all(b"interleaved")
        # Nothing of the second writer reached the peer.
        assert b"interleaved" not in await reader.receive_some(65536)


async def test_a_cancelled_handler_read_loses_no_bytes() -> None:
    """Over a real server: the line is in the kernel when a cancelled readline() runs."""
    sent = trio.Event()
    results: list[bytes] = []

    class Patient(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await sent.wait()
            with trio.CancelScope() as scope:
                scope.cancel()
                await self.rfile.readline()
            results.append(await self.rfile.readline())
            await self.wfile.write(b"done\n")

    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, Patient)
        async with serving(server), await connect(server) as client:
            await client.send_all(b"whole line\n")  # on loopback: in the server's buffer
            sent.set()
            assert await receive_line(client) == b"done\n"
    assert results == [b"whole line\n"]


async def test_a_handler_write_in_a_cancelled_scope_reaches_no_one() -> None:
    class Careful(ts.StreamRequestHandler):
        async def handle(self) -> None:
            with trio.CancelScope() as scope:
                scope.cancel()
                await self.wfile.write(b"never\n")
            await self.wfile.write(b"only this\n")

    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, Careful)
        async with serving(server), await connect(server) as client:
            assert await receive_line(client) == b"only this\n"


async def test_two_handler_tasks_writing_one_wfile_get_busy_resource_error() -> None:
    errors: list[BaseException] = []

    class TwoWriters(ts.StreamRequestHandler):
        async def handle(self) -> None:
            big = b"y" * (16 * 1024 * 1024)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.wfile.write, big)
                    await trio.testing.wait_all_tasks_blocked()
                    await self.wfile.write(b"interleaved\n")
            except BaseException as exc:
                errors.append(exc)

    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, TwoWriters)
        async with serving(server), await connect(server) as client:
            await trio.testing.wait_all_tasks_blocked()
            while await client.receive_some(1 << 20):  # drain until the server closes
                pass
    [group] = errors  # the handler's nursery: the second writer was refused
    assert any(isinstance(e, trio.BusyResourceError) for e in getattr(group, "exceptions", []))
