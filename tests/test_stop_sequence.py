# The graceful stop as a balancer sees it: draining (still accepting for drain_delay), then
# the connections already queued are served, then persistent connections end between two
# messages with a clean FIN, for async handlers, sync handlers, and http.server under compat.
from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import (
    AsyncEcho,
    SyncEcho,
    connect,
    in_thread,
    receive_all,
    receive_line,
    run_python,
    serving,
)
from serving_process import read_to_eof

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
# Long enough that a test which relied on the grace running out would hit fail_after first.
LONG = 60.0


async def exchange(stream: trio.SocketStream, line: bytes) -> bytes:
    await stream.send_all(line)
    return await receive_line(stream)


@asynccontextmanager
async def one_client(server: ts.TCPServer) -> AsyncIterator[trio.SocketStream]:
    """Serve ``server`` with a grace no test waits out, and connect a client; the body calls
    shutdown(). Exiting closes the client and waits for serve_forever() to return."""
    server.shutdown_grace = LONG
    async with serving(server), await connect(server) as client:
        yield client


async def test_draining_keeps_accepting_for_the_drain_delay() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
            server.drain_delay = LONG
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                assert not server.statistics().draining
                server.shutdown()
                with trio.fail_after(1):
                    await server.wait_for_shutdown()
                assert server.shutdown_requested
                assert server.statistics().draining
                # A balancer has not noticed yet: this client is still served normally.
                async with await connect(server) as client:
                    assert await exchange(client, b"late\n") == b"late\n"
                assert server.statistics().serving
                nursery.cancel_scope.cancel()  # the test does not wait out the delay


async def test_after_the_drain_delay_serve_forever_returns_by_itself() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
            server.drain_delay = 0.1
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                server.shutdown()
            assert not server.statistics().serving
            assert not server.statistics().draining


async def test_a_bad_drain_delay_is_a_clear_error() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server, trio.open_nursery() as nursery:
            server.drain_delay = -1
            with pytest.raises(ValueError, match="drain_delay must be"):
                await nursery.start(server.serve_forever)


async def test_connections_queued_in_the_backlog_are_served() -> None:
    release = trio.Event()

    class Held(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await release.wait()
            await self.wfile.write(await self.rfile.readline())

    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, Held) as server:
            server.max_connections = 1  # the second client waits in the kernel's backlog
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                first, queued = await connect(server), await connect(server)
                await first.send_all(b"1\n")
                await queued.send_all(b"2\n")
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().accepted_requests == 1
                server.shutdown()
                await trio.testing.wait_all_tasks_blocked()
                release.set()
                assert await receive_line(first) == b"1\n"
                assert await receive_line(queued) == b"2\n"
            stats = server.statistics()
            assert (stats.accepted_requests, stats.finished_requests) == (2, 2)
            await first.aclose()
            await queued.aclose()


@pytest.mark.parametrize(
    "server_class, handler",
    [
        (ts.TCPServer, AsyncEcho),
        (ts.TCPServer, SyncEcho),
        (ts.ThreadingTCPServer, SyncEcho),
    ],
    ids=["async", "sync", "threading"],
)
async def test_a_persistent_connection_ends_between_two_messages(
    server_class: type[ts.TCPServer], handler: type[ts.StreamRequestHandler]
) -> None:
    server = server_class(LOCALHOST, handler)
    with trio.fail_after(5):
        async with one_client(server) as client:
            assert await exchange(client, b"one\n") == b"one\n"
            server.shutdown()
            # The handler was waiting for the next line: it gets end-of-file and the
            # connection closes with a FIN (a reset would be an error here).
            assert await client.receive_some() == b""
    stats = server.statistics()
    assert (stats.finished_requests, stats.cancelled_requests) == (1, 0)


@pytest.mark.parametrize("handler", [AsyncEcho, SyncEcho], ids=["async", "sync"])
async def test_a_connection_is_always_served_its_first_message(
    handler: type[ts.StreamRequestHandler],
) -> None:
    server = ts.ThreadingTCPServer(LOCALHOST, handler)
    with trio.fail_after(5):
        async with one_client(server) as client:
            await trio.testing.wait_all_tasks_blocked()
            server.shutdown()
            await trio.testing.wait_all_tasks_blocked()
            # Nothing had arrived when the drain began: its first message is served.
            assert await exchange(client, b"first\n") == b"first\n"
            assert await client.receive_some() == b""


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "sync"])
async def test_a_message_in_progress_is_finished(is_async: bool) -> None:
    # A header line, then a body: the read of the body is not at a message boundary,
    # although nothing is buffered when it starts (nothing was written in between).
    class AsyncBody(ts.StreamRequestHandler):
        async def handle(self) -> None:
            while size := await self.rfile.readline():
                body = await self.rfile.readexactly(int(size))
                await self.wfile.write(body[::-1] + b"\n")

    class SyncBody(ts.StreamRequestHandler):
        def handle(self) -> None:
            while size := self.rfile.readline():
                body = self.rfile.read(int(size))
                self.wfile.write(body[::-1] + b"\n")

    server = ts.ThreadingTCPServer(LOCALHOST, AsyncBody if is_async else SyncBody)
    with trio.fail_after(5):
        async with one_client(server) as client:
            assert await exchange(client, b"3\nabc") == b"cba\n"
            await client.send_all(b"5\n")
            await trio.testing.wait_all_tasks_blocked()
            server.shutdown()
            await trio.testing.wait_all_tasks_blocked()
            assert await exchange(client, b"hello") == b"olleh\n"
            assert await client.receive_some() == b""


async def test_handlers_can_await_the_drain_and_say_why_they_close() -> None:
    class Notices(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(b"welcome\n")
            await self.server.wait_for_shutdown()
            await self.wfile.write(b"server going away\n")

    server = ts.TCPServer(LOCALHOST, Notices)
    with trio.fail_after(5):
        async with one_client(server) as client:
            assert await receive_line(client) == b"welcome\n"
            server.shutdown()
            assert await receive_all(client) == b"server going away\n"


async def test_wait_for_shutdown_outside_serving_is_a_clear_error() -> None:
    async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
        with pytest.raises(RuntimeError, match="not serving"):
            await server.wait_for_shutdown()


def test_http_server_keep_alive_under_compat_closes_after_the_response() -> None:
    # http.server's own handler, unmodified, on compat's engine: its keep-alive loop reads
    # the next request line, gets end-of-file, and closes the connection; the stop does not
    # wait for the grace.
    run_python(
        """
        import threading
        from trio_socketserver import compat
        compat.install()
        import http.client, http.server

        class KeepAlive(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"hello")

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
        server.shutdown_grace = 60
        serving = threading.Thread(target=server.serve_forever)
        serving.start()
        conn = http.client.HTTPConnection(*server.server_address, timeout=5)
        for _ in range(2):  # the same connection, kept alive
            conn.request("GET", "/")
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"hello")
        stopping = threading.Thread(target=server.shutdown)
        stopping.start()
        stopping.join(5)
        assert not stopping.is_alive(), "the keep-alive connection held the stop"
        conn.sock.settimeout(5)
        assert conn.sock.recv(1) == b""  # a FIN, not a reset
        conn.close()
        serving.join(5)
        server.server_close()
        stats = server.statistics()
        assert (stats.finished_requests, stats.cancelled_requests) == (1, 0), stats
        """
    )


async def test_a_request_already_sent_when_the_drain_begins_is_served() -> None:
    # The client's second message is in the server's kernel buffer (not yet read) when the
    # grace begins: it is served before the connection ends.
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, SyncEcho) as server:
            server.shutdown_grace = LONG
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                sock = socket.create_connection(server.server_address, timeout=5)
                sock.sendall(b"one\n")
                assert await in_thread(sock.recv, 100) == b"one\n"
                sock.sendall(b"two\n")
                server.shutdown()
                assert await in_thread(read_to_eof, sock) == b"two\n"
            sock.close()
