# The health endpoint: its wire format as pure functions (fuzzed), HealthServer in-process
# with real sockets and raw HTTP clients (including hostile ones), and the command line's
# --health-bind in a child process probed by the stdlib's HTTP client.
from __future__ import annotations

import re
import signal
import socket
import time
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trio_socketserver as ts
from conftest import connect, http_get, receive_all, receive_line, serving
from serving_process import cli, read_until
from trio_socketserver._health import (
    METRICS_CONTENT_TYPE,
    BadRequest,
    HealthRequest,
    answer,
    parse_request,
    render_metrics,
)

LOCALHOST = ("127.0.0.1", 0)
# Bounds each wait; a passing test never comes near it.
TIMEOUT = 10.0


def stats(**fields: Any) -> ts.ServerStatistics:
    values: dict[str, Any] = dict.fromkeys(
        [
            "active_requests",
            "accepted_requests",
            "finished_requests",
            "failed_requests",
            "cancelled_requests",
            "refused_requests",
            "proxy_rejected_requests",
        ],
        0,
    )
    values.update(serving=True, draining=False)
    values.update(fields)
    return ts.ServerStatistics(**values)


# -- parsing a request head (no I/O) --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "request_"),
    [
        (b"GET /ready HTTP/1.0\r\n\r\n", HealthRequest("GET", "/ready", "HTTP/1.0")),
        (
            b"GET /live HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.30\r\n\r\n",
            HealthRequest("GET", "/live", "HTTP/1.1"),
        ),
        (
            b"HEAD /metrics?debug=1 HTTP/1.1\n\n",
            HealthRequest("HEAD", "/metrics?debug=1", "HTTP/1.1"),
        ),
        (b"\r\nGET /ready HTTP/1.0\r\n\r\n", HealthRequest("GET", "/ready", "HTTP/1.0")),
        (b"OPTIONS * HTTP/1.1\r\n\r\n", HealthRequest("OPTIONS", "*", "HTTP/1.1")),
    ],
)
def test_parse_request(data: bytes, request_: HealthRequest) -> None:
    assert parse_request(data) == request_
    for cut in range(len(data.rstrip(b"\r\n"))):
        assert parse_request(data[:cut]) is None  # not complete yet: need more


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /ready\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  /ready HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS on a plain port
        (b"GET /ready HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /ready HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"GET /ready HTTP/2.0\r\n\r\n", 505),
        (b"GET /ready HTTP/1.1\r\nX: " + b"a" * 9000, 431),
        (b"GET /ready HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
)
def test_parse_request_refuses(data: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(data)
    assert raised.value.status == status


# Bytes, and bytes made of the pieces of requests, so that many of them are (almost) requests.
PIECES = [b"GET", b"HEAD", b" ", b"/ready", b"*", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]
PIECES += [b"\r\n", b"\n", b"\r", b"Host: x", b"X:", b":", b"\x00", b"\xff"]
REQUESTISH = st.binary(max_size=300) | st.lists(st.sampled_from(PIECES), max_size=30).map(b"".join)


@given(REQUESTISH, st.binary(max_size=50))
def test_parse_request_answers_any_bytes_and_is_stable_once_complete(
    data: bytes, more: bytes
) -> None:
    try:
        parsed = parse_request(data, max_size=256)
    except BadRequest as exc:
        assert exc.status in (400, 431, 505)
        return
    if parsed is not None:
        # Bytes after a complete head (a body, a pipelined request) change nothing.
        assert parse_request(data + more, max_size=256) == parsed


# -- answers and the metrics text (no I/O) --------------------------------------------


def get(path: str, method: str = "GET") -> HealthRequest:
    return HealthRequest(method, path, "HTTP/1.1")


def split(response: bytes) -> tuple[int, dict[str, str], str]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body.decode()


def test_ready_is_503_until_every_server_serves_and_from_the_drain_on() -> None:
    serving_, starting, draining = stats(), stats(serving=False), stats(draining=True)
    assert split(answer(get("/ready"), [("tcp a:1", serving_), ("unix /b", serving_)]))[::2] == (
        200,
        "ready\n",
    )
    status, _, body = split(answer(get("/ready"), [("tcp a:1", serving_), ("unix /b", starting)]))
    assert (status, body) == (503, "not ready: unix /b is not serving\n")
    status, _, body = split(answer(get("/ready"), [("tcp a:1", draining), ("unix /b", draining)]))
    assert (status, body) == (503, "not ready: tcp a:1 is draining; unix /b is draining\n")
    # Live whatever the servers do: the process answers.
    assert split(answer(get("/live"), [("tcp a:1", starting)]))[0] == 200


def test_head_has_the_headers_of_get_and_no_body() -> None:
    servers = [("tcp a:1", stats())]
    for path in ["/live", "/ready", "/metrics", "/nope"]:
        full = answer(get(path), servers)
        head = answer(get(path, "HEAD"), servers)
        assert full.startswith(head) and head.endswith(b"\r\n\r\n")
        assert split(head)[:2] == split(full)[:2]


def test_other_paths_are_404_and_other_methods_405() -> None:
    servers = [("tcp a:1", stats())]
    assert split(answer(get("/"), servers))[0] == 404
    assert split(answer(get("/ready/"), servers))[0] == 404
    status, headers, _ = split(answer(get("/ready", "POST"), servers))
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    status, headers, _ = split(answer(get("/metrics?name=x"), servers))
    assert (status, headers["Content-Type"]) == (200, METRICS_CONTENT_TYPE)
    assert headers["Connection"] == "close"


def test_metrics_text() -> None:
    text = render_metrics(
        [
            (
                "tcp 127.0.0.1:8000",
                stats(accepted_requests=5, finished_requests=3, active_requests=2),
            ),
            ('unix /run/a "b"\\c', stats(refused_requests=1, cancelled_requests=4)),
        ]
    )
    lines = text.splitlines()
    assert text.endswith("\n")
    assert 'trio_socketserver_accepted_total{server="tcp 127.0.0.1:8000"} 5' in lines
    assert 'trio_socketserver_finished_total{server="tcp 127.0.0.1:8000"} 3' in lines
    assert 'trio_socketserver_active_requests{server="tcp 127.0.0.1:8000"} 2' in lines
    # Label values escaped as the format wants: backslash and double quote.
    assert 'trio_socketserver_cut_short_total{server="unix /run/a \\"b\\"\\\\c"} 4' in lines
    assert 'trio_socketserver_refused_total{server="unix /run/a \\"b\\"\\\\c"} 1' in lines
    for what in ["accepted", "finished", "failed", "cut_short", "refused", "proxy_rejected"]:
        assert f"# TYPE trio_socketserver_{what}_total counter" in lines
        assert any(line.startswith(f"# HELP trio_socketserver_{what}_total ") for line in lines)
    assert "# TYPE trio_socketserver_active_requests gauge" in lines
    # Every sample line: name{labels} value.
    samples = [line for line in lines if not line.startswith("#")]
    assert len(samples) == 7 * 2
    assert all(line.rsplit(" ", 1)[1].isdigit() for line in samples)


# -- HealthServer, with real sockets ----------------------------------------------------


class Echo(ts.StreamRequestHandler):
    """Echoes lines; ``fail`` makes the handler raise; a held request waits for ``release``."""

    release = trio.Event()

    async def handle(self) -> None:
        async for line in self.rfile:
            if line == b"fail\n":
                raise ValueError("asked to fail")
            if line == b"hold\n":
                await self.wfile.write(b"holding\n")
                await type(self).release.wait()
            await self.wfile.write(line)


class Picky(ts.TCPServer):
    """Refuses clients while ``refusing`` is set (verify_request)."""

    refusing = False

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return not self.refusing


async def probe(health: ts.HealthServer, request: bytes) -> tuple[int, dict[str, str], str]:
    """Send ``request`` as is, read the answer to EOF: status, headers, body."""
    async with await connect(health) as stream:
        await stream.send_all(request)
        return split(await receive_all(stream))


async def get_path(health: ts.HealthServer, path: str) -> tuple[int, str]:
    status, _, body = await probe(health, f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    return status, body


@pytest.mark.usefixtures("no_leaks")
async def test_ready_follows_the_server_from_start_through_the_drain() -> None:
    Echo.release = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with (
            Picky(LOCALHOST, Echo) as server,
            serving(ts.HealthServer(LOCALHOST, [server])) as health,
        ):
            label = f"tcp 127.0.0.1:{server.server_address[1]}"
            assert await get_path(health, "/live") == (200, "live\n")
            # Created, not serving yet.
            assert await get_path(health, "/ready") == (503, f"not ready: {label} is not serving\n")
            server.shutdown_grace = TIMEOUT  # the held request keeps the drain going
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                assert await get_path(health, "/ready") == (200, "ready\n")
                async with await connect(server) as held:
                    await held.send_all(b"hold\n")
                    assert await receive_line(held) == b"holding\n"
                    server.shutdown()
                    assert server.statistics().draining
                    assert await get_path(health, "/ready") == (
                        503,
                        f"not ready: {label} is draining\n",
                    )
                    assert await get_path(health, "/live") == (200, "live\n")
                    Echo.release.set()
                    assert await receive_line(held) == b"hold\n"
            assert await get_path(health, "/ready") == (503, f"not ready: {label} is not serving\n")


@pytest.mark.usefixtures("no_leaks")
async def test_metrics_count_what_the_server_did() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            serving(Picky(LOCALHOST, Echo)) as server,
            serving(ts.HealthServer(LOCALHOST, [server])) as health,
        ):
            for line in [b"one\n", b"two\n"]:
                async with await connect(server) as client:
                    await client.send_all(line)
                    assert await receive_line(client) == line
            async with await connect(server) as client:
                await client.send_all(b"fail\n")
                assert await receive_all(client) == b""
            server.refusing = True
            async with await connect(server) as client:
                assert await receive_all(client) == b""  # refused by verify_request
            server.refusing = False
            async with await connect(server) as active:
                await active.send_all(b"three\n")
                assert await receive_line(active) == b"three\n"
                status, headers, body = await probe(health, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert (status, headers["Content-Type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
    label = f'{{server="tcp 127.0.0.1:{server.server_address[1]}"}}'
    lines = body.splitlines()
    for name, value in [
        ("accepted_total", 5),
        ("finished_total", 2),
        ("failed_total", 1),
        ("cut_short_total", 0),
        ("refused_total", 1),
        ("proxy_rejected_total", 0),
        ("active_requests", 1),
    ]:
        assert f"trio_socketserver_{name}{label} {value}" in lines


@pytest.mark.usefixtures("no_leaks")
async def test_http_1_0_without_host_head_404_405_and_431() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            serving(ts.TCPServer(LOCALHOST, Echo)) as server,
            serving(ts.HealthServer(LOCALHOST, [server])) as health,
        ):
            # What HAProxy's `option httpchk GET /ready` sends.
            status, headers, body = await probe(health, b"GET /ready HTTP/1.0\r\n\r\n")
            assert (status, body) == (200, "ready\n")
            assert headers["Connection"] == "close"
            assert headers["Content-Length"] == "6"
            status, headers, body = await probe(health, b"HEAD /ready HTTP/1.1\r\n\r\n")
            assert (status, headers["Content-Length"], body) == (200, "6", "")
            assert (await get_path(health, "/favicon.ico"))[0] == 404
            assert (await probe(health, b"DELETE /ready HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await probe(health, b"GET /x HTTP/1.1\r\nX: " + b"a" * 10000))[0] == 431
            assert (await probe(health, b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))[0] == 400


@pytest.mark.usefixtures("no_leaks")
async def test_a_client_that_trickles_its_head_is_cut_and_holds_up_nobody() -> None:
    class Health(ts.HealthServer):
        request_timeout = 0.5

    with trio.fail_after(TIMEOUT):
        async with (
            serving(ts.TCPServer(LOCALHOST, Echo)) as server,
            serving(Health(LOCALHOST, [server])) as health,
        ):
            # Before connecting: the endpoint's deadline starts when it accepts, after this.
            connecting = trio.current_time()
            async with await connect(health) as trickler, trio.open_nursery() as nursery:

                async def trickle() -> None:
                    # One header byte every 50 ms, for ever (bounded: 200 bytes, 10 s).
                    await trickler.send_all(b"GET /live HTTP/1.1\r\nX-Slow: ")
                    for _ in range(200):
                        try:
                            await trickler.send_all(b"a")
                        except trio.BrokenResourceError:
                            return  # cut, as it should be
                        await trio.sleep(0.05)

                nursery.start_soon(trickle)
                for _ in range(3):  # others are answered while it trickles
                    assert await get_path(health, "/live") == (200, "live\n")
                assert await receive_all(trickler) == b""  # closed without an answer
                cut_after = trio.current_time() - connecting
                nursery.cancel_scope.cancel()
    assert Health.request_timeout <= cut_after < 5.0


@pytest.mark.usefixtures("no_leaks")
async def test_idle_health_connections_do_not_stop_the_server_from_serving() -> None:
    # More idle clients than the endpoint takes at once (the rest wait in its backlog), and
    # a server that takes one client at a time: it serves as if they were not there.
    with trio.fail_after(TIMEOUT):
        async with (
            serving(ts.TCPServer(LOCALHOST, Echo)) as server,
            serving(ts.HealthServer(LOCALHOST, [server])) as health,
        ):
            server.max_connections = 1
            idle = [await connect(health) for _ in range(100)]
            try:
                with trio.fail_after(2):
                    for line in [b"one\n", b"two\n", b"three\n"]:
                        async with await connect(server) as client:
                            await client.send_all(line)
                            assert await receive_line(client) == line
                assert health.statistics().active_requests == ts.HealthServer.max_connections
            finally:
                for stream in idle:
                    await stream.aclose()


@pytest.mark.usefixtures("no_leaks")
async def test_health_server_from_a_socket_made_elsewhere() -> None:
    sock = socket.socket()
    sock.bind(LOCALHOST)
    sock.listen()
    with trio.fail_after(TIMEOUT):
        async with (
            serving(ts.TCPServer(LOCALHOST, Echo)) as server,
            serving(ts.HealthServer.from_socket(sock, [server])) as health,
        ):
            assert health.server_address == sock.getsockname()
            assert await get_path(health, "/ready") == (200, "ready\n")
    assert sock.fileno() == -1


def test_health_server_needs_a_server_and_takes_ipv6() -> None:
    with pytest.raises(ValueError, match="needs at least one server"):
        ts.HealthServer(LOCALHOST, [])
    server = ts.TCPServer(LOCALHOST, Echo, bind_and_activate=False)
    health = ts.HealthServer(("::1", 0), [server], bind_and_activate=False)
    try:
        assert health.socket.family == socket.AF_INET6
        assert health.allow_reuse_address  # a restart binds its port at once
    finally:
        health.server_close()
        server.server_close()


# -- the command line's --health-bind --------------------------------------------------


@pytest.mark.usefixtures("no_leaks")
def test_cli_health_bind_answers_through_serving_and_the_drain() -> None:
    # A drain delay longer than the test: the server keeps accepting while /ready says 503,
    # as a balancer polling it needs; the second signal ends it.
    args = ("--bind", "127.0.0.1:0", "--health-bind", "127.0.0.1:0", "--drain-delay", "3600")
    with cli(*args) as server:
        health = server.health_address()
        address = server.address()  # logged once it accepts
        label = f"tcp 127.0.0.1:{address[1]}"
        assert http_get(health, "/ready") == (200, "ready\n")
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            client.sendall(b"in flight\n")
            assert read_until(client, b"\n") == b"in flight\n"
            status, metrics = http_get(health, "/metrics")
            assert status == 200
            assert f'trio_socketserver_accepted_total{{server="{label}"}} 1' in metrics
            assert f'trio_socketserver_active_requests{{server="{label}"}} 1' in metrics
        server.send_signal(signal.SIGTERM)
        server.wait_for_line("SIGTERM: shutting down", stream="stderr")
        assert http_get(health, "/ready") == (503, f"not ready: {label} is draining\n")
        assert http_get(health, "/live") == (200, "live\n")
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            client.sendall(b"sent by a slow balancer\n")
            assert read_until(client, b"\n") == b"sent by a slow balancer\n"
        assert server.stop(signal.SIGTERM) == 143
    assert re.search(
        rf": stopped serving on {label} in \d+\.\d\d s: requests finished: \d, ", server.stderr
    )


@pytest.mark.usefixtures("no_leaks")
def test_cli_health_port_is_bound_again_at_once_after_a_stop() -> None:
    # The endpoint closes each connection first, so its port has connections in TIME-WAIT:
    # binding it again needs SO_REUSEADDR.
    args = ("--bind", "127.0.0.1:0", "--health-bind", "127.0.0.1:0")
    with cli(*args) as first:
        health = first.health_address()
        first.serving()
        assert http_get(health, "/live") == (200, "live\n")
        assert first.stop(signal.SIGTERM) == 0
    args = ("--bind", "127.0.0.1:0", "--health-bind", f"127.0.0.1:{health[1]}")
    with cli(*args) as second:
        second.serving()
        assert http_get(health, "/live") == (200, "live\n")
        assert second.stop(signal.SIGTERM) == 0


@pytest.mark.usefixtures("no_leaks")
def test_cli_health_address_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("--bind", "127.0.0.1:0", "--health-bind", f"127.0.0.1:{port}")
        with cli(*args) as server:
            started = time.monotonic()
            assert server.wait() == 2
    [line] = server.stderr_lines
    assert line.startswith(
        f"python -m trio_socketserver: error: cannot listen on tcp 127.0.0.1:{port} "
        "(--health-bind): "
    )
    assert "already in use" in line
    assert time.monotonic() - started < TIMEOUT
