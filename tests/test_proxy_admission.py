# Servers behind a balancer (proxy_protocol): real connections on loopback and Unix sockets,
# with headers a test writes as a balancer would. The original client's address and the
# header reach async handlers, sync handlers (plain and threading), TLS, compat and worker
# processes; the bytes after the header reach the handler intact; every refusal closes the
# connection, counts it, logs one line, runs nothing of the request and leaves the server
# serving; a slow header holds only its own connection.
from __future__ import annotations

import http.server
import ipaddress
import logging
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme

import trio_socketserver as ts
from conftest import haproxy_binary, receive_all
from trio_socketserver import ProxyHeader, compat, current_proxy_header
from trio_socketserver._proxy import V2_SIGNATURE
from trio_socketserver._proxy_admission import ProxySettings, proxied_address, trusts
from trio_socketserver.testing import StreamClient, open_client, proxy_header, serving

LOCALHOST = ("127.0.0.1", 0)
CLIENT = ("203.0.113.7", 41000)
BALANCER = ("192.0.2.1", 443)
# Bounds each test: a passing one takes a fraction of it.
TEST_TIMEOUT = 10.0
CLIENT_TIMEOUT = 5.0
TLVS = ((0x02, b"example.com"), (0x05, b"id-1"))
LOG = "trio_socketserver"


class Records:
    """A server mixin that records every verify_request() and what each handler saw."""

    seen: list[tuple[Any, ProxyHeader | None, bytes]]
    verified: list[Any]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified.append(client_address)
        return True


class AsyncReport(ts.StreamRequestHandler):
    """Records its client address, header and first line, then echoes lines."""

    async def handle(self) -> None:
        line = await self.rfile.readline()
        self.server.seen.append((self.client_address, self.proxy_header, line))
        await self.wfile.write(line)
        async for line in self.rfile:
            await self.wfile.write(line)


class SyncReport(ts.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        self.server.seen.append((self.client_address, self.proxy_header, line))
        self.wfile.write(line)
        for line in self.rfile:
            self.wfile.write(line)


# The three ways a stream request runs: a task, a thread one at a time, a thread each.
KINDS: dict[str, tuple[type[Any], type[Any], type[Any]]] = {
    "async": (ts.TCPServer, ts.UnixStreamServer, AsyncReport),
    "sync": (ts.TCPServer, ts.UnixStreamServer, SyncReport),
    "threading": (ts.ThreadingTCPServer, ts.ThreadingUnixStreamServer, SyncReport),
}


def make_server(kind: str, address: Any = LOCALHOST, **settings: Any) -> Any:
    tcp, unix, handler = KINDS[kind]
    base = unix if isinstance(address, str) else tcp
    settings.setdefault("proxy_protocol", "auto")
    if isinstance(address, tuple) and ":" in address[0]:
        settings["address_family"] = socket.AF_INET6
    server = type("Server", (Records, base), settings)(address, handler)
    server.seen, server.verified = [], []
    return server


def local_address(client: StreamClient) -> Any:
    """The client's end of the connection, as the server sees its peer."""
    sock = client.stream.socket  # type: ignore[attr-defined]
    return sock.getsockname()


def header(version: int, family: int, source: Any, destination: Any, **kw: Any) -> ProxyHeader:
    kind = 0 if family == socket.AF_UNSPEC else socket.SOCK_STREAM
    return ProxyHeader(version, kw.pop("command", "PROXY"), family, kind, source, destination, **kw)


IPV6_CLIENT, IPV6_BALANCER = ("2001:db8::7", 41000), ("2001:db8::1", 443)
# Each header, and the client address it gives: None for the connection's own peer.
HEADERS = {
    "v1 TCP4": (header(1, socket.AF_INET, CLIENT, BALANCER), CLIENT),
    "v1 TCP6": (header(1, socket.AF_INET6, IPV6_CLIENT, IPV6_BALANCER), IPV6_CLIENT),
    "v1 UNKNOWN": (header(1, socket.AF_UNSPEC, None, None), None),
    "v2 TCP4 with TLVs": (header(2, socket.AF_INET, CLIENT, BALANCER, tlvs=TLVS), CLIENT),
    "v2 TCP6": (header(2, socket.AF_INET6, IPV6_CLIENT, IPV6_BALANCER), IPV6_CLIENT),
    "v2 UDP6": (
        ProxyHeader(2, "PROXY", socket.AF_INET6, socket.SOCK_DGRAM, IPV6_CLIENT, IPV6_BALANCER),
        IPV6_CLIENT,
    ),
    "v2 UNIX": (header(2, socket.AF_UNIX, "/run/client.sock", "/run/lb.sock"), "/run/client.sock"),
    "v2 LOCAL": (header(2, socket.AF_UNSPEC, None, None, command="LOCAL"), None),
    "v2 unspecified": (header(2, socket.AF_UNSPEC, None, None), None),
}


def encode(value: ProxyHeader) -> bytes:
    """The bytes of ``value``, written by the testing toolkit's helper."""
    return proxy_header(
        value.source,
        value.destination,
        version=value.version,
        command=value.command,
        socket_type=value.socket_type or socket.SOCK_STREAM,
        tlvs=value.tlvs,
    )


@pytest.mark.parametrize("case", HEADERS)
@pytest.mark.parametrize("kind", KINDS)
async def test_the_handler_sees_the_original_client_and_the_header(kind: str, case: str) -> None:
    sent, address = HEADERS[case]
    with trio.fail_after(TEST_TIMEOUT):
        # The header and the client's first bytes in one segment.
        first = encode(sent) + b"hello\n"
        async with (
            serving(make_server(kind)) as server,
            await open_client(server, send_first=first) as client,
        ):
            assert await client.receive_line() == b"hello\n"
            peer = local_address(client)
            await client.send_all(b"more\n")
            assert await client.receive_line() == b"more\n"
    expected = peer if address is None else address
    assert server.verified == [expected]
    assert server.seen == [(expected, sent, b"hello\n")]
    stats = server.statistics()
    assert (stats.finished_requests, stats.refused_requests, stats.proxy_rejected_requests) == (
        1,
        0,
        0,
    )


@pytest.mark.parametrize("kind", ["async", "threading"])
async def test_an_ipv6_server_gives_addresses_in_its_own_shape(kind: str) -> None:
    # An IPv6 socket's peers are (host, port, flowinfo, scope_id): so are proxied clients.
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(make_server(kind, ("::1", 0))) as server:
            for sent in [proxy_header(CLIENT, BALANCER), proxy_header(IPV6_CLIENT, IPV6_BALANCER)]:
                async with await open_client(server, send_first=sent + b"x\n") as client:
                    assert await client.receive_line() == b"x\n"
            async with await open_client(server, send_first=proxy_header() + b"x\n") as client:
                assert await client.receive_line() == b"x\n"
                peer = local_address(client)
    assert peer[0] == "::1" and len(peer) == 4
    assert server.verified == [(*CLIENT, 0, 0), (*IPV6_CLIENT, 0, 0), peer]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_unix_server_takes_headers_from_its_peers(kind: str, unix_dir: Path) -> None:
    # No network address to check on a Unix socket: every peer may send a header.
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(make_server(kind, str(unix_dir / "s"), proxy_trusted=[])) as server:
            sent = proxy_header(CLIENT, BALANCER, version=2) + b"over unix\n"
            async with await open_client(server, send_first=sent) as client:
                assert await client.receive_line() == b"over unix\n"
    assert server.verified == [CLIENT]


@pytest.mark.parametrize("kind", KINDS)
async def test_every_byte_after_the_header_reaches_the_handler(kind: str) -> None:
    # Far more than one look at the socket takes; the first 32 KiB in the header's segment.
    body = bytes(range(256)) * 1024
    payload = b"".join(b"%d %s\n" % (i, body[i : i + 1000].hex().encode()) for i in range(200))
    sent = proxy_header(CLIENT, BALANCER, version=2, tlvs=TLVS) + payload[:32768]

    async def send_the_rest(client: StreamClient) -> None:
        await client.send_all(payload[32768:])
        await client.send_eof()

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(make_server(kind)) as server,
            await open_client(server, send_first=sent) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(send_the_rest, client)
            assert await client.receive_all() == payload


async def test_a_header_in_pieces_is_put_together() -> None:
    sent = proxy_header(IPV6_CLIENT, IPV6_BALANCER, version=2, tlvs=TLVS) + b"whole\n"
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(make_server("async")) as server, await open_client(server) as client:
            for i in range(len(sent)):
                await client.send_all(sent[i : i + 1])
                await trio.testing.wait_all_tasks_blocked()
            assert await client.receive_line() == b"whole\n"
    assert server.verified == [IPV6_CLIENT]


# -- TLS: the header comes before the handshake ---------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize("kind", KINDS)
async def test_tls_after_the_header(kind: str, ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = make_server(kind)
    server.ssl_context = server_context
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(server),
            await open_client(
                server,
                ssl_context=client_context,
                server_hostname="localhost",
                send_first=proxy_header(CLIENT, BALANCER, version=2, tlvs=TLVS),
            ) as client,
        ):
            await client.send_all(b"secret\n")
            assert await client.receive_line() == b"secret\n"
    assert server.seen == [
        (CLIENT, header(2, socket.AF_INET, CLIENT, BALANCER, tlvs=TLVS), b"secret\n")
    ]


# -- refusals ---------------------------------------------------------------------------------


def inet4_v2(tail: bytes) -> bytes:
    block = socket.inet_aton(CLIENT[0]) + socket.inet_aton(BALANCER[0])
    body = block + struct.pack("!HH", CLIENT[1], BALANCER[1]) + tail
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


# What the client sends, the server's proxy_protocol, whether the client then ends its side,
# and what the log line says.
REFUSALS = {
    "no header": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "auto", False, "no PROXY protocol"),
    "TLS first": (b"\x16\x03\x01\x00\x05hello", "auto", False, "no PROXY protocol"),
    "malformed v1": (b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n", "auto", False, "bad address"),
    "v1 over 107 bytes": (b"PROXY UNKNOWN " + b"x" * 120, "v1", False, "longer than 107 bytes"),
    "v2 to a v1 server": (proxy_header(CLIENT, BALANCER, version=2), "v1", False, "only v1"),
    "v1 to a v2 server": (proxy_header(CLIENT, BALANCER), "v2", False, "only v2"),
    "v2 TLV past the end": (inet4_v2(b"\x02\x00\x09short"), "auto", False, "runs past"),
    "v2 unknown version": (V2_SIGNATURE + b"\x31\x11\x00\x0c", "auto", False, "version 3"),
    "v2 unknown command": (V2_SIGNATURE + b"\x2f\x11\x00\x0c", "auto", False, "command 0xf"),
    "v2 unknown family": (V2_SIGNATURE + b"\x21\x41\x00\x0c", "auto", False, "family 0x41"),
    "closed before a header": (b"", "auto", True, "before sending a header"),
    "closed inside the header": (b"PROXY TCP4 1.2.3.4", "auto", True, "header was complete"),
}


async def assert_refused(
    server: Any, client: StreamClient, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection is closed, counted and logged once, nothing of it ran, and the server
    still serves the next client."""
    assert await receive_all(client.stream) == b""
    stats = server.statistics()
    assert (stats.proxy_rejected_requests, stats.refused_requests) == (1, 1)
    assert (stats.finished_requests, stats.failed_requests) == (0, 0)
    assert server.verified == [] and server.seen == []
    [record] = [r for r in caplog.records if r.name == LOG]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert reason in message and repr(local_address(client)) in message
    version = 2 if server.proxy_protocol == "v2" else 1
    sent = proxy_header(CLIENT, BALANCER, version=version) + b"next\n"
    async with await open_client(server, send_first=sent) as ok:
        assert await ok.receive_line() == b"next\n"
    assert server.verified == [CLIENT]


@pytest.mark.parametrize("case", REFUSALS)
@pytest.mark.parametrize("kind", ["async", "threading"])
async def test_refusals(kind: str, case: str, caplog: pytest.LogCaptureFixture) -> None:
    sent, mode, then_eof, reason = REFUSALS[case]
    caplog.set_level(logging.INFO, LOG)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(make_server(kind, proxy_protocol=mode)) as server,
            await open_client(server, send_first=sent) as client,
        ):
            if then_eof:
                await client.send_eof()
            await assert_refused(server, client, reason, caplog)


UNTRUSTED = {
    "no header": b"",
    "a valid header": proxy_header(CLIENT, BALANCER),
    "LOCAL": proxy_header(version=2, command="LOCAL"),
}


@pytest.mark.parametrize("sent", UNTRUSTED.values(), ids=list(UNTRUSTED))
async def test_an_untrusted_peer_is_closed_whatever_it_sends(
    sent: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(make_server("async", proxy_trusted=["10.0.0.0/8"])) as server:
            async with await open_client(server, send_first=sent) as client:
                # At once: the server does not wait for a header it would refuse anyway.
                assert await receive_all(client.stream) == b""
                stats = server.statistics()
                assert (stats.proxy_rejected_requests, stats.refused_requests) == (1, 1)
                assert server.verified == [] and server.seen == []
                [record] = [r for r in caplog.records if r.name == LOG]
                assert "not in proxy_trusted" in record.getMessage()
            server.proxy_trusted = ["127.0.0.1"]  # read as serving starts: no effect now
            async with await open_client(server, send_first=sent) as client:
                assert await receive_all(client.stream) == b""
    assert server.statistics().proxy_rejected_requests == 2


async def test_a_header_slower_than_its_timeout_is_refused(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOG)
    with trio.fail_after(60):
        async with serving(make_server("async", proxy_header_timeout=3.0)) as server:
            start = trio.current_time()
            async with await open_client(server, send_first=b"PROXY TCP4 1.2.3.4 ") as client:
                # Nothing more comes: after 3 s of trio's clock the server gives up.
                assert await receive_all(client.stream) == b""
                assert trio.current_time() - start == pytest.approx(3.0)
                [record] = [r for r in caplog.records if r.name == LOG]
                assert "no complete header within proxy_header_timeout (3 s)" in record.getMessage()
                assert server.statistics().proxy_rejected_requests == 1


@pytest.mark.parametrize("kind", ["async", "threading"])
async def test_a_stalled_header_does_not_delay_other_clients(kind: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(make_server(kind)) as server:
            whole = proxy_header(IPV6_CLIENT, IPV6_BALANCER, version=2, tlvs=TLVS)
            async with await open_client(server, send_first=whole[:20]) as stalled:
                await trio.testing.wait_all_tasks_blocked()
                sent = proxy_header(CLIENT, BALANCER) + b"second\n"
                async with await open_client(server, send_first=sent) as second:
                    assert await second.receive_line() == b"second\n"
                # The first one still waits, and gets served once its header is complete.
                assert server.verified == [CLIENT]
                await stalled.send_all(whole[20:] + b"first\n")
                assert await stalled.receive_line() == b"first\n"
    assert server.verified == [CLIENT, IPV6_CLIENT]
    assert server.statistics().proxy_rejected_requests == 0


async def test_a_pending_header_holds_its_place_under_the_capacity_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With room for one connection, a client that stalls in its header holds it until its
    # header times out (3 s); then the next client, waiting in the backlog, is served.
    server = make_server("async", max_connections=1, proxy_header_timeout=3.0)
    with trio.fail_after(60):
        async with serving(server):
            start = trio.current_time()
            async with await open_client(server, send_first=b"PROXY ") as stalled:
                sent = proxy_header(CLIENT, BALANCER) + b"next\n"
                async with await open_client(server, send_first=sent) as waiting:
                    assert await waiting.receive_line() == b"next\n"
                    assert trio.current_time() - start == pytest.approx(3.0)
                assert await receive_all(stalled.stream) == b""


async def test_a_stop_cuts_a_pending_header(autojump_clock: trio.testing.MockClock) -> None:
    # A connection whose header has not come is the server's: after shutdown() it gets the
    # shutdown_grace, then it is closed, and nothing of it is left (serving's leak check).
    server = make_server("async", shutdown_grace=1.0)
    with trio.fail_after(60):
        async with serving(server), await open_client(server, send_first=b"PROXY TCP4") as client:
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            server.shutdown()
            assert await receive_all(client.stream) == b""
            assert trio.current_time() - start == pytest.approx(1.0)
    stats = server.statistics()
    assert (stats.accepted_requests, stats.proxy_rejected_requests, stats.refused_requests) == (
        1,
        0,
        0,
    )


async def test_without_proxy_protocol_a_header_is_the_clients_data() -> None:
    sent = proxy_header(CLIENT, BALANCER)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            serving(make_server("async", proxy_protocol=None)) as server,
            await open_client(server, send_first=sent) as client,
        ):
            assert await client.receive_line() == sent
            peer = local_address(client)
    assert server.seen == [(peer, None, sent)]


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"proxy_protocol": "v3"}, "proxy_protocol must be None, 'v1', 'v2' or 'auto', not 'v3'"),
        ({"proxy_protocol": True}, "not True"),
        ({"proxy_trusted": "10.0.0.0/8"}, "not the single str '10.0.0.0/8'"),
        ({"proxy_trusted": 10}, "must be a list of addresses or networks"),
        ({"proxy_trusted": ["10.0.0.1/8"]}, "'10.0.0.1/8' is not an address or network"),
        ({"proxy_trusted": ["localhost"]}, "'localhost' is not an address or network"),
        ({"proxy_header_timeout": 0}, "proxy_header_timeout must be a positive number"),
        ({"proxy_header_timeout": float("inf")}, "not inf"),
        ({"proxy_header_timeout": None}, "not None"),
    ],
)
async def test_bad_settings_fail_as_serving_starts(settings: dict[str, Any], message: str) -> None:
    async with make_server("async", **settings) as server:
        with pytest.raises(ValueError) as raised:
            await server.serve_forever()
        assert message in str(raised.value)
        with pytest.raises(ValueError):
            await server.handle_request()


async def test_a_datagram_server_takes_no_proxy_protocol() -> None:
    async with ts.UDPServer(LOCALHOST, ts.DatagramRequestHandler) as server:
        server.proxy_protocol = "v2"
        with pytest.raises(ValueError, match="proxy_protocol is for stream servers"):
            await server.serve_forever()


def test_compat_servers_check_the_settings_too() -> None:
    with compat.UDPServer(LOCALHOST, compat.DatagramRequestHandler) as datagrams:
        datagrams.proxy_protocol = "v1"  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="proxy_protocol is for stream servers"):
            datagrams.serve_forever()
    with compat.TCPServer(LOCALHOST, SyncReport) as server:
        server.proxy_protocol = "v4"  # type: ignore[attr-defined]
        for serve in [server.serve_forever, server.handle_request]:
            with pytest.raises(ValueError, match="not 'v4'"):
                serve()


def test_trust_is_by_network_and_ipv4_in_ipv6_counts_as_ipv4() -> None:
    nets = tuple(ipaddress.ip_network(n) for n in ["127.0.0.0/8", "::1", "10.0.0.0/8"])
    settings = ProxySettings(frozenset({1}), nets, 1.0)
    for peer in [
        ("127.0.0.1", 1),
        ("::1", 1, 0, 0),
        ("::ffff:127.0.0.2", 1, 0, 0),
        ("10.9.8.7", 1),
    ]:
        assert trusts(settings, peer), peer
    for peer in [
        ("192.0.2.1", 1),
        ("::2", 1, 0, 0),
        ("::ffff:192.0.2.1", 1, 0, 0),
        ("fe80::1%lo", 1, 0, 0),
    ]:
        assert not trusts(settings, peer), peer
    assert trusts(settings, "") and trusts(settings, "/run/peer.sock")
    assert not trusts(ProxySettings(frozenset({1}), (), 1.0), ("127.0.0.1", 1))


async def test_trusted_networks_may_be_ipaddress_objects(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_address("127.0.0.1")]
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(make_server("async", proxy_trusted=trusted)) as server:
            sent = proxy_header(CLIENT, BALANCER) + b"trusted\n"
            async with await open_client(server, send_first=sent) as client:
                assert await client.receive_line() == b"trusted\n"
    assert server.verified == [CLIENT]


def test_the_default_trusts_loopback_only() -> None:
    assert list(ts.BaseServer.proxy_trusted) == ["127.0.0.0/8", "::1"]
    assert ts.BaseServer.proxy_protocol is None
    assert ts.BaseServer.proxy_header_timeout == 5.0


# -- compat, stdlib handlers, worker processes ----------------------------------------------


def stdlib_exchange(address: Any, data: bytes) -> bytes:
    """Send ``data`` from a blocking stdlib client, end its side, return everything back."""
    chunks = []
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        try:
            while chunk := client.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # closed with bytes unread: what arrived before is the answer
    return b"".join(chunks)


class Whoami(http.server.BaseHTTPRequestHandler):
    """A handler of the stdlib's own classes: it has no self.proxy_header, so it asks."""

    def do_GET(self) -> None:
        found = current_proxy_header()
        assert found is not None
        body = f"{self.address_string()} via {found.destination[0]} for {found.tlv(2)!r}\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test reads the answer


def test_compat_server_with_a_stdlib_handler() -> None:
    server = compat.ThreadingTCPServer(LOCALHOST, Whoami)
    server.proxy_protocol = "v2"  # type: ignore[attr-defined]
    with ts.testing.serving_in_thread(server):
        sent = proxy_header(CLIENT, BALANCER, version=2, tlvs=TLVS) + b"GET / HTTP/1.0\r\n\r\n"
        answer = stdlib_exchange(server.server_address, sent)
    assert answer.startswith(b"HTTP/1.0 200 ")
    assert answer.endswith(b"\r\n\r\n203.0.113.7 via 192.0.2.1 for b'example.com'\n")


def test_compat_handle_request_takes_the_header_in_the_calling_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A plain compat server with a sync handler serves handle_request() without trio: the
    # header is read there, blocking, with the same rules and its own timeout.
    caplog.set_level(logging.INFO, LOG)
    cls = type("Server", (Records, compat.TCPServer), {"proxy_protocol": "auto"})
    with cls(LOCALHOST, SyncReport) as server:
        server.seen, server.verified = [], []
        server.proxy_header_timeout = 0.5
        address = server.server_address
        results: list[bytes] = []
        exchanges = [
            proxy_header(CLIENT, BALANCER, version=2, tlvs=TLVS) + b"one\n",
            b"GET / HTTP/1.0\r\n\r\n",
            proxy_header(IPV6_CLIENT, IPV6_BALANCER)[:-2] + b"\r",
        ]
        for data in exchanges:
            client = threading.Thread(
                target=lambda d=data: results.append(stdlib_exchange(address, d))
            )
            client.start()
            server.handle_request()
            client.join(CLIENT_TIMEOUT)
        # The last client never finished its header; it ends its side, so the server's
        # look at the socket sees end of file, well before the timeout.
    assert results == [b"one\n", b"", b""]
    assert server.seen == [
        (CLIENT, header(2, socket.AF_INET, CLIENT, BALANCER, tlvs=TLVS), b"one\n")
    ]
    stats = server.statistics()
    assert (stats.finished_requests, stats.proxy_rejected_requests, stats.refused_requests) == (
        1,
        2,
        2,
    )
    reasons = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert "no PROXY protocol" in reasons[0] and "before its header was complete" in reasons[1]


def test_compat_handle_request_times_a_stalled_header_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    cls = type("Server", (Records, compat.TCPServer), {"proxy_protocol": "v1"})
    with (
        cls(LOCALHOST, SyncReport) as server,
        socket.create_connection(server.server_address, timeout=CLIENT_TIMEOUT) as client,
    ):
        server.seen, server.verified = [], []
        server.proxy_header_timeout = 0.2
        client.sendall(b"PROXY TCP4 ")
        server.handle_request()  # returns once the header's time is up
        assert client.recv(100) == b""
        assert server.statistics().proxy_rejected_requests == 1
    [record] = [r for r in caplog.records if r.name == LOG]
    assert "no complete header within proxy_header_timeout (0.2 s)" in record.getMessage()


class WorkerReport(ts.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        assert self.proxy_header is not None
        self.wfile.write(b"%r %r %s" % (self.client_address, self.proxy_header.tlv(5), line))


async def test_a_worker_process_gets_the_header() -> None:
    server = ts.ForkingTCPServer(LOCALHOST, WorkerReport)
    server.proxy_protocol = "v2"
    server.max_children = 1
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(server):
            sent = proxy_header(CLIENT, BALANCER, version=2, tlvs=TLVS) + b"in a worker\n"
            async with await open_client(server, send_first=sent) as client:
                answer = await client.receive_line()
    assert answer == b"('203.0.113.7', 41000) b'id-1' in a worker\n"


def test_proxied_address_keeps_the_peer_when_the_header_names_no_one() -> None:
    with socket.socket(socket.AF_INET6) as sock6, socket.socket() as sock4:
        local = header(2, socket.AF_UNSPEC, None, None, command="LOCAL")
        assert proxied_address(local, sock6, ("::1", 5, 0, 0)) == ("::1", 5, 0, 0)
        unix = header(2, socket.AF_UNIX, "/a", "/b")
        assert proxied_address(unix, sock6, ("::1", 5, 0, 0)) == "/a"
        assert proxied_address(header(1, socket.AF_INET6, ("::2", 1), ("::3", 2)), sock4, None) == (
            "::2",
            1,
        )


# -- a real balancer ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(LOCALHOST)
        return int(probe.getsockname()[1])


class Checked(AsyncReport):
    """Tells the test when HAProxy's first health check (a LOCAL header) has come."""

    async def handle(self) -> None:
        if self.proxy_header is not None and self.proxy_header.command == "LOCAL":
            self.server.checked.set()
            return
        await super().handle()


async def test_haproxy_send_proxy_and_send_proxy_v2(tmp_path: Path) -> None:
    haproxy_path = haproxy_binary()
    server = type("Server", (Records, ts.TCPServer), {"proxy_protocol": "auto"})(LOCALHOST, Checked)
    server.seen, server.verified, server.checked = [], [], trio.Event()
    v1_port, v2_port = free_port(), free_port()
    app = "{}:{}".format(*server.server_address)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend v1
    bind 127.0.0.1:{v1_port}
    default_backend v1
backend v1
    server app {app} send-proxy
frontend v2
    bind 127.0.0.1:{v2_port}
    unique-id-format conn-%ci-%cp
    default_backend v2
backend v2
    server app {app} send-proxy-v2 proxy-v2-options unique-id check inter 100ms
"""
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(server):
            haproxy = await trio.lowlevel.open_process(
                [haproxy_path, "-db", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                # Its health checks begin once its frontends listen.
                await server.checked.wait()
                peers = []
                for port in (v1_port, v2_port):
                    async with StreamClient(await trio.open_tcp_stream("127.0.0.1", port)) as c:
                        peers.append(local_address(c))
                        await c.send_all(b"through haproxy\n")
                        assert await c.receive_line() == b"through haproxy\n"
            finally:
                haproxy.terminate()
                with trio.CancelScope(shield=True):
                    await haproxy.wait()
    (v1_address, v1_header, _), (v2_address, v2_header, _) = server.seen
    assert (v1_address, v1_header.version, v1_header.source) == (peers[0], 1, peers[0])
    assert v1_header.destination == ("127.0.0.1", v1_port)
    assert (v2_address, v2_header.version, v2_header.source) == (peers[1], 2, peers[1])
    assert v2_header.tlv(0x05) == b"conn-127.0.0.1-%d" % peers[1][1]
