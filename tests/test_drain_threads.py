# The drain against a sync handler's thread, where it can only end a blocked read with a
# shutdown that cannot be undone: the thread's read and the drain's decision race, and a
# message must be served whole or not at all. The races are forced here, not waited for: the
# drain runs at the exact moment the thread's read has returned, before the thread claims it.
from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

import trio_socketserver as ts
from conftest import SyncEcho, in_thread
from serving_process import read_to_eof
from trio_socketserver._drain import Drain, Exchange
from trio_socketserver._handlers import _socket_file, _SocketWriter

pytestmark = pytest.mark.usefixtures("no_leaks")

TIMEOUT = 5.0


class DrainFirst(set[Exchange]):
    """The drain's set of waiting reads, but the handler thread's first step out of it runs
    the drain first: the grace begins after the thread's read returned, before the thread
    could claim what the read got."""

    def __init__(self, drain: Drain, handler: Callable[[], threading.Thread | None]) -> None:
        super().__init__()
        self.drain = drain
        self.handler = handler
        self.drained = threading.Event()

    def discard(self, exchange: Exchange) -> None:
        if threading.current_thread() is self.handler() and not self.drained.is_set():
            self.drain.close_idle()
            self.drained.set()
        super().discard(exchange)


@contextmanager
def echo_thread(sock: socket.socket, drain: Drain) -> Iterator[threading.Thread]:
    """A sync echo handler's loop on ``sock``, with the files the engine gives it."""
    exchange = Exchange(drain, sock, threaded=True)

    def handle() -> None:
        rfile = _socket_file(sock, "rb", -1, exchange)
        wfile = _SocketWriter(sock, exchange)
        for line in rfile:
            wfile.write(line)
        sock.close()

    thread = threading.Thread(target=handle, name="handler")
    thread.start()
    try:
        yield thread
    finally:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        server, _ = listener.accept()
    return client, server


@pytest.mark.parametrize("before", [b"", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"])
def test_a_read_that_took_the_start_of_the_next_message_serves_it_whole(before: bytes) -> None:
    # The first bytes of the next message reached the thread before the drain decided; the
    # rest comes after. Served whole, then the connection ends at the next boundary. With
    # bytes taken off the socket before the handler's file (a PROXY header), the same.
    client, server = tcp_pair()
    drain = Drain()
    if before:
        client.sendall(before)
        assert server.recv(len(before)) == before
    thread: list[threading.Thread] = []
    drain.waiting = race = DrainFirst(drain, lambda: thread[0] if thread else None)
    with echo_thread(server, drain) as handler, client:
        thread.append(handler)
        client.sendall(b"one\n")
        assert client.recv(100) == b"one\n"
        client.sendall(b"hel")
        assert race.drained.wait(TIMEOUT)
        client.sendall(b"lo\n")
        assert read_to_eof(client) == b"hello\n"


async def test_a_threads_persistent_unix_connection_ends_between_two_messages(
    unix_dir: Path,
) -> None:
    # On a Unix socket the kernel does not count what arrived: the thread waits with a peek.
    path = str(unix_dir / "echo.sock")
    with trio.fail_after(TIMEOUT):
        async with ts.ThreadingUnixStreamServer(path, SyncEcho) as server:
            server.shutdown_grace = 60
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = socket.socket(socket.AF_UNIX)
                client.settimeout(TIMEOUT)
                with client:
                    await in_thread(client.connect, path)
                    await in_thread(client.sendall, b"one\n")
                    assert await in_thread(client.recv, 100) == b"one\n"
                    server.shutdown()
                    assert await in_thread(read_to_eof, client) == b""
            stats = server.statistics()
            assert (stats.finished_requests, stats.cancelled_requests) == (1, 0)


async def test_an_idle_connection_behind_a_proxy_header_ends_between_two_messages() -> None:
    # The header was taken off the socket before the handler's file counted anything: the
    # drain must still see that nothing of a next message arrived.
    with trio.fail_after(TIMEOUT):
        async with ts.ThreadingTCPServer(("127.0.0.1", 0), SyncEcho) as server:
            server.proxy_protocol = "v1"
            server.shutdown_grace = 60
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = socket.create_connection(server.server_address, timeout=TIMEOUT)
                with client:
                    header = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
                    await in_thread(client.sendall, header + b"one\n")
                    assert await in_thread(client.recv, 100) == b"one\n"
                    server.shutdown()
                    assert await in_thread(read_to_eof, client) == b""
            stats = server.statistics()
            assert (stats.finished_requests, stats.cancelled_requests) == (1, 0)
