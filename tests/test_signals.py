# serve_until_signal(): a stand-alone program run as a user runs it (a child process,
# `python program.py`), stopped with real signals; and how it shows addresses.
from __future__ import annotations

import logging
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_socketserver
from serving_process import ServerProcess, read_until
from trio_socketserver._signals import describe_address

# Bounds each client wait; a passing test never comes near it.
SOCKET_TIMEOUT = 10.0

V4, V6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX


class Echo(trio_socketserver.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


# The README's one-liner, plus a line that shows what it returned.
PROGRAM = """\
import logging
import sys

import trio
import trio_socketserver


class Echo(trio_socketserver.StreamRequestHandler):
    async def handle(self):
        async for line in self.rfile:
            await self.wfile.write(line)


async def main():
    async with trio_socketserver.TCPServer(("127.0.0.1", 0), Echo) as server:
        server.shutdown_grace = float(sys.argv[1])
        status = await trio_socketserver.serve_until_signal(server)
    print("serve_until_signal returned", status, flush=True)
    return status


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
sys.exit(trio.run(main))
"""


def program(tmp_path: Path, grace: float) -> ServerProcess:
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return ServerProcess(str(path), str(grace))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.usefixtures("no_leaks")
def test_a_signal_stops_the_program_gracefully_with_status_0(tmp_path: Path, signum: int) -> None:
    with program(tmp_path, grace=5) as server:
        [serving] = server.serving()
        assert (serving["what"], serving["kind"]) == ("Echo", "tcp")
        with socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"ping\n")
            assert read_until(client, b"\n") == b"ping\n"
        assert server.stop(signum) == 0
    assert server.stdout_lines == ["serve_until_signal returned 0"]
    assert f"{signal.Signals(signum).name}: shutting down" in server.stderr
    assert "requests finished: 1, failed: 0, cut short: 0, refused: 0" in server.stderr
    assert "Traceback" not in server.stderr  # no KeyboardInterrupt, no exception group


@pytest.mark.usefixtures("no_leaks")
def test_a_second_signal_stops_at_once_and_returns_128_plus_it(tmp_path: Path) -> None:
    # A grace far longer than the exit timeout: only the second signal can end it in time.
    with (
        program(tmp_path, grace=3600) as server,
        socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client,
    ):
        client.sendall(b"in flight\n")
        assert read_until(client, b"\n") == b"in flight\n"
        # Mid-line: the drain waits for this request (between two lines it would end it).
        client.sendall(b"half a li")
        server.send_signal(signal.SIGTERM)
        server.wait_for_line("SIGTERM: shutting down", stream="stderr")
        assert server.stop(signal.SIGINT) == 130
    assert server.stdout_lines == ["serve_until_signal returned 130"]
    assert "SIGINT again: stopping at once" in server.stderr
    assert "requests finished: 0, failed: 0, cut short: 1, refused: 0" in server.stderr
    assert "Traceback" not in server.stderr


async def test_it_needs_a_server() -> None:
    with pytest.raises(ValueError, match="needs at least one server"):
        await trio_socketserver.serve_until_signal()


class Refusing(trio_socketserver.TCPServer):
    def verify_request(self, request: Any, client_address: Any) -> bool:
        return False


@pytest.mark.usefixtures("no_leaks")
async def test_a_shutdown_from_elsewhere_ends_it_with_status_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")
    handler = trio_socketserver.StreamRequestHandler
    statuses: list[int] = []

    async def serve(server: trio_socketserver.TCPServer, *, task_status: Any) -> None:
        statuses.append(await trio_socketserver.serve_until_signal(server, task_status=task_status))

    async with (
        Refusing(("127.0.0.1", 0), handler) as server,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve, server)  # returns once the server accepts
        assert server.statistics().serving
        async with await trio.open_tcp_stream(*server.server_address) as client:
            assert await client.receive_some() == b""  # refused: closed at once
        server.shutdown()
    assert statuses == [0]
    # The stop took from the shutdown() to serve_forever()'s return.
    port = server.server_address[1]
    assert re.fullmatch(
        rf"stopped serving on tcp 127\.0\.0\.1:{port} in \d+\.\d\d s: "
        "requests finished: 0, failed: 0, cut short: 0, refused: 1",
        caplog.records[-1].getMessage(),
    )


def test_it_runs_only_in_the_main_thread() -> None:
    errors: list[BaseException] = []

    def serve_in_a_thread() -> None:
        async def main() -> None:
            async with trio_socketserver.TCPServer(("127.0.0.1", 0), Echo) as server:
                await trio_socketserver.serve_until_signal(server)

        try:
            trio.run(main)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve_in_a_thread)
    thread.start()
    thread.join(SOCKET_TIMEOUT)
    [error] = errors
    assert "main thread" in str(error)  # trio's own error: signals go to the main thread


def test_describe_address() -> None:
    stream = {"datagram": False, "tls": False}
    assert describe_address(V4, ("127.0.0.1", 80), **stream) == "tcp 127.0.0.1:80"
    assert describe_address(V6, ("::1", 80, 0, 0), **stream) == "tcp [::1]:80"
    assert describe_address(UNIX, "/run/x.sock", **stream) == "unix /run/x.sock"
    assert describe_address(UNIX, b"\0hidden", **stream) == r"unix '\x00hidden'"
    assert describe_address(V4, ("127.0.0.1", 443), datagram=False, tls=True) == (
        "tcp+tls 127.0.0.1:443"
    )
    assert describe_address(UNIX, "/run/t.sock", datagram=False, tls=True) == "unix+tls /run/t.sock"
    assert describe_address(V4, ("127.0.0.1", 53), datagram=True, tls=False) == "udp 127.0.0.1:53"
    assert describe_address(UNIX, "/run/d.sock", datagram=True, tls=False) == (
        "unix-dgram /run/d.sock"
    )
