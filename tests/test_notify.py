# sd_notify: what a service manager listening on NOTIFY_SOCKET hears from the command line
# and from serve_until_signal(). The manager is played by the test: a bound AF_UNIX datagram
# socket, as systemd's own; the program is the real one, in a child process, stopped with
# real signals.
from __future__ import annotations

import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_socketserver
from serving_process import cli, read_until
from trio_socketserver._notify import notify, watchdog_interval

# Bounds each wait for a notification or a reply; a passing test never comes near it.
TIMEOUT = 10.0
SERVING_STATUS = re.compile(r"serving EchoHandler on tcp 127\.0\.0\.1:(\d+)")


def receive(manager: socket.socket) -> dict[str, str]:
    """The next notification, as its assignments (``{"READY": "1", "STATUS": ...}``)."""
    message = manager.recv(4096).decode()
    return dict(line.split("=", 1) for line in message.split("\n"))


def echo(client: socket.socket, line: bytes) -> None:
    client.sendall(line)
    assert read_until(client, b"\n") == line


@pytest.mark.usefixtures("no_leaks")
def test_ready_once_the_port_accepts_and_stopping_when_the_drain_begins(
    manager: socket.socket,
) -> None:
    env = {"NOTIFY_SOCKET": manager.getsockname()}
    # A drain delay longer than the test: the second signal ends it.
    args = ("--bind", "127.0.0.1:0", "--drain-delay", "3600")
    with cli(*args, env=env) as server:
        ready = receive(manager)
        assert ready["READY"] == "1"
        status = SERVING_STATUS.fullmatch(ready["STATUS"])
        assert status is not None, ready
        address = ("127.0.0.1", int(status[1]))
        # The port the STATUS names accepts and serves once READY=1 is sent.
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            echo(client, b"ready\n")
        server.send_signal(signal.SIGTERM)
        assert receive(manager) == {"STOPPING": "1", "STATUS": "shutting down (SIGTERM)"}
        # STOPPING=1 came at the start of the drain: the server still accepts new clients.
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            echo(client, b"still served\n")
        assert server.stop(signal.SIGTERM) == 143


@pytest.mark.usefixtures("no_leaks")
def test_watchdog_pings_every_half_of_watchdog_usec(manager: socket.socket) -> None:
    # 0.2 s: a ping every 0.1 s, so the pings counted below come within a second.
    env = {"NOTIFY_SOCKET": manager.getsockname(), "WATCHDOG_USEC": "200000"}
    with cli("--bind", "127.0.0.1:0", env=env) as server:
        messages = [receive(manager) for _ in range(6)]
        assert server.stop(signal.SIGTERM) == 0
    assert sum(m == {"WATCHDOG": "1"} for m in messages) >= 4  # the others: READY=1
    assert any(m.get("READY") == "1" for m in messages)


def test_watchdog_interval() -> None:
    pid = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, pid) == 15
    # Another process is watched (the variables were inherited): no pings from this one.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid) is None
    assert watchdog_interval({}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid) is None


async def test_an_abstract_notify_socket_is_spelled_with_an_at(unix_dir: Path) -> None:
    name = f"trio-socketserver-test-{unix_dir.name}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(b"\0" + name.encode())
        assert await notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert await sock.recv(100) == b"READY=1"


async def test_without_notify_socket_nothing_is_sent_and_nothing_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not await notify("READY=1", environ={})
    assert caplog.records == []


async def test_a_manager_that_is_gone_is_logged_and_serving_goes_on(
    unix_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    environ = {"NOTIFY_SOCKET": str(unix_dir / "nobody")}
    assert not await notify("READY=1", environ=environ)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "cannot notify the service manager (NOTIFY_SOCKET)" in record.getMessage()
    assert not await notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert "is not a Unix socket path or @abstract name" in caplog.records[-1].getMessage()


class Echo(trio_socketserver.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


@pytest.mark.usefixtures("no_leaks")
async def test_serve_until_signal_notifies_programs_of_the_api_too(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.getsockname())
    statuses: list[int] = []

    async def serve(server: Any, *, task_status: Any) -> None:
        statuses.append(await trio_socketserver.serve_until_signal(server, task_status=task_status))

    async with (
        trio_socketserver.TCPServer(("127.0.0.1", 0), Echo) as server,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve, server)  # READY=1 was sent before it reported started
        host, port = server.server_address
        assert receive(manager) == {
            "READY": "1",
            "STATUS": f"serving Echo on tcp {host}:{port}",
        }
        server.shutdown()  # a drain that no signal began: from a handler, say
    assert statuses == [0]
    assert receive(manager) == {"STOPPING": "1", "STATUS": "shutting down"}
