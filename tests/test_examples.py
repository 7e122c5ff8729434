# The examples, run as a user runs them (`python examples/NAME.py --port 0`)
# in a child process, driven by stdlib clients, then stopped with a signal.
# Every example prints "serving ... on KIND HOST:PORT (Ctrl-C to stop)" once it
# listens and exits 0 after a graceful stop.
from __future__ import annotations

import signal
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from serving_process import (
    ROOT,
    ServerProcess,
    read_to_eof,
    read_until,
)

EXAMPLES = ROOT / "examples"
# Bounds each client wait; a passing test never comes near it.
SOCKET_TIMEOUT = 10.0

pytestmark = pytest.mark.usefixtures("no_leaks")


def example(name: str, *args: str) -> ServerProcess:
    return ServerProcess(str(EXAMPLES / name), "--port", "0", *args)


def connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=SOCKET_TIMEOUT)


def stop(server: ServerProcess) -> None:
    assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_every_example_is_tested() -> None:
    tested = {"echo.py", "chat.py", "udp_echo.py", "tls_echo.py", "threaded_sync.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_echo() -> None:
    with example("echo.py") as server:
        with connect(server.address()) as client:
            for line in [b"hello\n", b"world\n"]:
                client.sendall(line)
                assert read_until(client, b"\n") == line
        stop(server)


def test_chat_survives_a_client_that_leaves_mid_line() -> None:
    def name(client: socket.socket) -> str:
        host, port = client.getsockname()
        return f"{host}:{port}"

    def line(client: socket.socket) -> str:
        return read_until(client, b"\n").decode()

    with example("chat.py") as server:
        address = server.address()
        # Clients that connect at the same instant have no order: Bob comes once Alice is in.
        with connect(address) as alice:
            assert line(alice) == f"* welcome {name(alice)}; also here: 0\n"
            with connect(address) as bob:
                # Bob's welcome means he is in the room, so Alice hears of him.
                assert line(bob) == f"* welcome {name(bob)}; also here: 1\n"
                assert line(alice) == f"* {name(bob)} joined\n"
                with connect(address) as carol:
                    assert line(carol) == f"* welcome {name(carol)}; also here: 2\n"
                    carol_name = name(carol)
                    for member in (alice, bob):
                        assert line(member) == f"* {carol_name} joined\n"
                    carol.sendall(b"I was about to say")  # no newline: she leaves mid-line
                for member in (alice, bob):
                    assert line(member) == f"* {carol_name} left\n"
                # The partial line was never shown, and the room still works both ways.
                alice.sendall(b"still here?\n")
                assert line(bob) == f"<{name(alice)}> still here?\n"
                bob.sendall(b"yes\n")
                assert line(alice) == f"<{name(bob)}> yes\n"
        stop(server)


def test_chat_tells_its_clients_why_it_stops() -> None:
    with example("chat.py") as server:
        address = server.address()
        with connect(address) as alice:
            assert read_until(alice, b"\n").startswith(b"* welcome")
            with connect(address) as bob:
                assert read_until(bob, b"\n").startswith(b"* welcome")
                assert read_until(alice, b"\n").endswith(b" joined\n")
                bob.sendall(b"hi\n")
                assert read_until(alice, b"\n").endswith(b"> hi\n")
                server.send_signal(signal.SIGTERM)
                # A lurker and a talker alike: told why, then a clean end of the session
                # (no reset), without waiting for the shutdown grace.
                for client in (alice, bob):
                    rest = read_to_eof(client)
                    assert rest.endswith(b"* the server is shutting down; please reconnect later\n")
                assert server.wait() == 0
        assert "cut short: 0" in server.stderr


def test_udp_echo() -> None:
    with example("udp_echo.py") as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.sendto(b"one datagram", server.address())
            assert client.recvfrom(4096)[0] == b"one datagram"
        stop(server)


def tls_echo(server: ServerProcess, trust: ssl.SSLContext) -> None:
    [serving] = server.serving()
    assert serving["kind"] == "tcp+tls"
    with connect(server.address()) as raw, trust.wrap_socket(raw, server_hostname="127.0.0.1") as c:
        c.sendall(b"secret\n")
        assert read_until(c, b"\n") == b"secret\n"


def test_tls_echo_with_a_throwaway_certificate() -> None:
    with example("tls_echo.py") as server:
        ca_file = server.wait_for_line(r"clients must trust (\S+)$")[1]
        tls_echo(server, ssl.create_default_context(cafile=ca_file))
        stop(server)
    assert not Path(ca_file).exists()  # the throwaway CA went away with the server


def test_tls_echo_with_given_cert_and_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    with example("tls_echo.py", "--cert", str(cert), "--key", str(key)) as server:
        trust = ssl.create_default_context()
        ca.configure_trust(trust)
        tls_echo(server, trust)
        stop(server)


def test_threaded_sync_serves_clients_at_the_same_time() -> None:
    with example("threaded_sync.py") as server:
        address = server.address()
        with connect(address) as first, connect(address) as second:
            first.sendall(b"one\n")
            assert read_until(first, b"\n") == b"ONE\n"
            # `first` still holds its thread: only a threaded server answers now.
            second.sendall(b"two\n")
            assert read_until(second, b"\n") == b"TWO\n"
        stop(server)


def port_in_time_wait() -> int:
    """A loopback port that a server just served on and closed a connection first: the
    kernel keeps that connection in TIME-WAIT (about a minute), as after a Ctrl-C with a
    client connected."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port: int = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end goes to TIME-WAIT
            assert client.recv(1) == b""
    return port


@pytest.mark.parametrize("name", ["echo.py", "chat.py", "threaded_sync.py", "tls_echo.py"])
def test_tcp_examples_restart_on_a_port_in_time_wait(name: str) -> None:
    port = port_in_time_wait()
    with ServerProcess(str(EXAMPLES / name), "--port", str(port)) as server:
        assert server.address() == ("127.0.0.1", port)
        stop(server)
