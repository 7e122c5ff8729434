# Socket activation: the command line serving sockets it inherited, as systemd passes them
# (descriptors from 3 on, LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES). The service manager is
# played by serving_process.activated().
from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import have_ipv6_loopback
from serving_process import activated, ip_address, read_until
from trio_socketserver._activation import parse_listen_fds

# Bounds each client wait; a passing test never comes near it.
TIMEOUT = 10.0

# Answers each line with the activation variables it can see: none, once the program took
# its sockets (as sd_listen_fds() removes them before any handler runs).
SEES_ENV = """\
import os

import trio_socketserver


class SeesEnv(trio_socketserver.StreamRequestHandler):
    async def handle(self):
        async for line in self.rfile:
            seen = [v for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if v in os.environ]
            await self.wfile.write(("sees: %s\\n" % ",".join(seen)).encode())
"""


@pytest.fixture
def tcp_socket() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


STREAM_CASES = [
    "tcp",
    pytest.param(
        "tcp6", marks=pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback here")
    ),
    "unix",
]


def listening(case: str, unix_dir: Path) -> socket.socket:
    if case == "unix":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(unix_dir / "web.sock"))
    else:
        sock = socket.socket(socket.AF_INET6 if case == "tcp6" else socket.AF_INET)
        sock.bind(("::1" if case == "tcp6" else "127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("case", STREAM_CASES)
@pytest.mark.usefixtures("no_leaks")
def test_an_inherited_stream_socket_is_served(case: str, unix_dir: Path) -> None:
    with listening(case, unix_dir) as sock, activated([sock], names="web") as server:
        [serving] = server.serving()
        address = sock.getsockname()
        if case == "unix":
            assert (serving["kind"], serving["where"]) == ("unix", address)
        else:
            assert (serving["kind"], ip_address(serving["where"])) == ("tcp", address[:2])
        assert f"socket 'web' from the service manager: {serving['kind']} " in server.stderr
        with socket.socket(sock.family) as client:
            client.settimeout(TIMEOUT)
            client.connect(address)
            client.sendall(b"activated\n")
            assert read_until(client, b"\n") == b"activated\n"
        assert server.stop(signal.SIGTERM) == 0
        if case == "unix":
            # The socket file is the service manager's: the program leaves it in place.
            assert Path(address).is_socket()


@pytest.mark.usefixtures("no_leaks")
def test_a_client_that_connects_between_two_runs_is_served_by_the_next(
    tcp_socket: socket.socket,
) -> None:
    # The socket stays the service manager's (here: the test's) across a restart, so a
    # client that connects while no process runs waits in its backlog instead of being
    # refused.
    with activated([tcp_socket]) as first:
        first.serving()
        assert first.stop(signal.SIGTERM) == 0
    with socket.create_connection(tcp_socket.getsockname(), timeout=TIMEOUT) as client:
        client.sendall(b"while nobody served\n")
        with activated([tcp_socket]) as second:
            second.serving()
            assert read_until(client, b"\n") == b"while nobody served\n"
            client.close()
            assert second.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
@pytest.mark.usefixtures("no_leaks")
def test_an_inherited_datagram_socket_is_served_with_udp(family: int, unix_dir: Path) -> None:
    address: Any = ("127.0.0.1", 0) if family == socket.AF_INET else str(unix_dir / "d.sock")
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        with activated([sock], "--udp") as server:
            [serving] = server.serving()
            assert serving["kind"] == ("udp" if family == socket.AF_INET else "unix-dgram")
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.settimeout(TIMEOUT)
                if family == socket.AF_UNIX:
                    client.bind(str(unix_dir / "client.sock"))  # somewhere to reply to
                client.sendto(b"datagram", sock.getsockname())
                assert client.recv(100) == b"datagram"
            assert server.stop(signal.SIGTERM) == 0


@pytest.mark.usefixtures("no_leaks")
def test_several_named_sockets_and_the_variables_are_gone_before_handlers_run(
    tmp_path: Path, tcp_socket: socket.socket
) -> None:
    (tmp_path / "sees_env.py").write_text(SEES_ENV)
    with socket.socket() as second:
        second.bind(("127.0.0.1", 0))
        second.listen()
        sockets = [tcp_socket, second]
        args = ("--handler", "sees_env:SeesEnv")
        with activated(sockets, *args, names="public:admin", cwd=tmp_path) as server:
            server.wait_for_line(
                rf"serving SeesEnv on tcp .*:{second.getsockname()[1]} ", stream="stderr"
            )
            for sock in sockets:
                with socket.create_connection(sock.getsockname(), timeout=TIMEOUT) as client:
                    client.sendall(b"what do you see?\n")
                    assert read_until(client, b"\n") == b"sees: \n"
            assert server.stop(signal.SIGTERM) == 0
    assert "socket 'public' from the service manager: tcp " in server.stderr
    assert "socket 'admin' from the service manager: tcp " in server.stderr


@pytest.mark.usefixtures("no_leaks")
def test_listen_pid_of_another_process_is_ignored(
    tmp_path: Path, tcp_socket: socket.socket
) -> None:
    (tmp_path / "sees_env.py").write_text(SEES_ENV)
    args = ("--bind", "127.0.0.1:0", "--handler", "sees_env:SeesEnv")
    with activated([tcp_socket], *args, whose_pid="parent", cwd=tmp_path) as server:
        [serving] = server.serving()  # only its own --bind, not the inherited socket
        assert ip_address(serving["where"]) != tcp_socket.getsockname()
        with socket.create_connection(server.address(), timeout=TIMEOUT) as client:
            client.sendall(b"what do you see?\n")
            assert read_until(client, b"\n") == b"sees: \n"  # removed all the same
        assert server.stop(signal.SIGTERM) == 0
    assert "service manager" not in server.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--bind", "127.0.0.1:0"),
            "--bind cannot be used with socket activation (the service manager passes "
            "LISTEN_FDS=1): drop --bind, or start without LISTEN_FDS",
        ),
        (("--unix", "x.sock"), "--unix cannot be used with socket activation"),
        (("--reuse-port",), "--reuse-port cannot be used with socket activation"),
        (("--udp",), "LISTEN_FDS passes a stream socket: drop --udp"),
    ],
)
@pytest.mark.usefixtures("no_leaks")
def test_options_that_contradict_the_inherited_sockets_are_one_line_and_exit_2(
    args: tuple[str, ...], message: str, tcp_socket: socket.socket
) -> None:
    with activated([tcp_socket], *args) as server:
        assert server.wait() == 2
    [line] = server.stderr_lines
    assert line.startswith(f"python -m trio_socketserver: error: {message}")


@pytest.mark.usefixtures("no_leaks")
def test_datagram_sockets_need_udp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with activated([sock]) as server:
            assert server.wait() == 2
    [line] = server.stderr_lines
    assert line.endswith("LISTEN_FDS passes a datagram socket: add --udp")


@pytest.mark.usefixtures("no_leaks")
def test_a_descriptor_that_is_not_a_socket_is_one_line_and_exit_2() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    try:
        with activated([read_end]) as server:
            assert server.wait() == 2
    finally:
        os.close(read_end)
    [line] = server.stderr_lines
    assert line.startswith(
        "python -m trio_socketserver: error: "
        "LISTEN_FDS: descriptor 3 ('unknown') is not an open socket: "
    )


@pytest.mark.usefixtures("no_leaks")
def test_a_stream_socket_that_is_not_listening_is_one_line_and_exit_2() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with activated([sock], names="web") as server:
            assert server.wait() == 2
    assert server.stderr_lines == [
        "python -m trio_socketserver: error: LISTEN_FDS: descriptor 3 ('web') is a TCP socket "
        "that is not listening; call listen() first"
    ]


# -- reading the variables (no I/O) ---------------------------------------------------


def test_parse_listen_fds() -> None:
    pid = 1234
    assert parse_listen_fds({}, pid) == []
    env = {"LISTEN_PID": "1234", "LISTEN_FDS": "2"}
    assert parse_listen_fds(env, pid) == [(3, "unknown"), (4, "unknown")]
    named = {**env, "LISTEN_FDNAMES": "web:admin"}
    assert parse_listen_fds(named, pid) == [(3, "web"), (4, "admin")]
    assert parse_listen_fds({**env, "LISTEN_PID": "999"}, pid) == []  # another process's
    assert parse_listen_fds({**env, "LISTEN_FDS": "0"}, pid) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me': expected a process id"),
        ({"LISTEN_PID": "1234"}, "LISTEN_FDS='': expected a number of descriptors"),
        (
            {"LISTEN_PID": "1234", "LISTEN_FDS": "-1"},
            "LISTEN_FDS='-1': expected a number of descriptors",
        ),
        (
            {"LISTEN_PID": "1234", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"},
            "LISTEN_FDNAMES='web': 1 name(s) for the LISTEN_FDS=2 descriptor(s)",
        ),
    ],
)
def test_malformed_variables_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        parse_listen_fds(env, 1234)
    assert str(raised.value) == message
