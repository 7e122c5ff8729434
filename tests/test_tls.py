# TLS on stream servers (ssl_context=): async handlers get a trio.SSLStream, sync handlers an
# ssl.SSLSocket; certificates are made per test with trustme; clients that speak plaintext,
# abort the handshake or never start it cost only their own connection.
from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trustme

import trio_socketserver as ts
from conftest import connect, in_thread, receive_all
from trio_socketserver.testing import open_client, serving

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
# Client-side socket timeout: every stdlib client call is bounded.
CLIENT_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class AsyncEcho(ts.StreamRequestHandler):
    async def handle(self) -> None:
        assert isinstance(self.request, trio.SSLStream)
        async for line in self.rfile:
            await self.wfile.write(line)


class SyncEcho(ts.StreamRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.request, ssl.SSLSocket)
        for line in self.rfile:
            self.wfile.write(line)


HANDLERS = [
    pytest.param(ts.TCPServer, AsyncEcho, id="async"),
    pytest.param(ts.TCPServer, SyncEcho, id="sync"),
    pytest.param(ts.ThreadingTCPServer, SyncEcho, id="sync-threading"),
]


def stdlib_tls_echo(address: Any, context: ssl.SSLContext, data: bytes = b"secret\n") -> bytes:
    with (
        socket.create_connection(address, timeout=CLIENT_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(data)
        return tls.makefile("rb").readline()


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="trio_socketserver")
    yield caplog


@pytest.mark.parametrize(("server_class", "handler"), HANDLERS)
async def test_tls_echo_with_a_stdlib_client(
    server_class: Any, handler: Any, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(5):
        server = server_class(LOCALHOST, handler, ssl_context=server_context)
        async with serving(server):
            reply = await in_thread(stdlib_tls_echo, server.server_address, client_context)
    assert reply == b"secret\n"


async def test_tls_echo_with_a_trio_client(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, AsyncEcho, ssl_context=server_context)
        async with (
            serving(server),
            await open_client(server, ssl_context=client_context, server_hostname="localhost") as c,
        ):
            await c.send_all(b"trio\n")
            assert await c.receive_line() == b"trio\n"


async def plaintext_client(server: Any) -> bytes:
    async with await connect(server) as client:
        await client.send_all(b"GET / HTTP/1.0\r\n\r\n")
        return await receive_all(client)


async def aborting_client(server: Any) -> None:
    """Starts a handshake (half a ClientHello), then resets the connection."""
    client = await connect(server)
    await client.send_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()


@pytest.mark.parametrize(("server_class", "handler"), HANDLERS)
async def test_bad_clients_cost_only_their_connection(
    server_class: Any,
    handler: Any,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    info_logs: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(5):
        server = server_class(LOCALHOST, handler, ssl_context=server_context)
        # The good client closes without TLS's close_notify, as HTTPS clients may.
        server.https_compatible = True
        async with serving(server):
            # The server answers plaintext with a TLS alert at most, never with data.
            assert b"HTTP" not in await plaintext_client(server)
            await aborting_client(server)
            reply = await in_thread(stdlib_tls_echo, server.server_address, client_context)
            assert reply == b"secret\n"
    assert server.statistics().accepted_requests == 3
    # Both failures are logged, as one line each: a peer's fault, not a server bug.
    failures = [r for r in info_logs.records if r.name == "trio_socketserver"]
    assert len(failures) == 2
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in failures)


async def test_silent_client_is_bounded_by_the_handler_timeout_on_a_sync_server(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    class TimedEcho(SyncEcho):
        timeout = 0.3  # also bounds the TLS handshake

    # A plain server runs one sync request at a time: a client that never starts its
    # handshake must not hold the server past the handler's timeout.
    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, TimedEcho, ssl_context=server_context)
        async with serving(server), await connect(server):
            reply = await in_thread(stdlib_tls_echo, server.server_address, client_context)
            assert reply == b"secret\n"


async def test_tls_hard_stop_closes_connections(server_context: ssl.SSLContext) -> None:
    started = trio.Event()

    class Waiting(ts.StreamRequestHandler):
        async def handle(self) -> None:
            started.set()
            await self.rfile.readline()

    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, Waiting, ssl_context=server_context) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await client.send_all(b"\x16")  # one byte of a ClientHello: handshake pending
                await started.wait()
                nursery.cancel_scope.cancel()
            assert await receive_all(client) == b""
            await client.aclose()
