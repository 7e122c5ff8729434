# The command line: option and address parsing as pure functions, the
# one-line errors in-process, and the real program (`python -m
# trio_socketserver`) in a child process, driven by stdlib clients and signals.
from __future__ import annotations

import math
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest
import trustme

import trio_socketserver
from serving_process import (
    ServerProcess,
    ip_address,
    read_until,
)
from trio_socketserver import __main__ as cli_main
from trio_socketserver._cli import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Config,
    Endpoint,
    UsageError,
    load_config,
    parse_bind,
    parse_handler_spec,
    parse_options,
    server_class,
)
from trio_socketserver._echo import DatagramEchoHandler, EchoHandler

# Bounds each client wait; a passing test never comes near it.
SOCKET_TIMEOUT = 10.0
CLI = ("-m", "trio_socketserver")

V4, V6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX


# -- parsing (no I/O) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("127.0.0.1:0", Endpoint(V4, ("127.0.0.1", 0))),
        ("0.0.0.0:65535", Endpoint(V4, ("0.0.0.0", 65535))),
        ("localhost:8080", Endpoint(V4, ("localhost", 8080))),
        ("[::1]:8000", Endpoint(V6, ("::1", 8000))),
        ("[::]:0", Endpoint(V6, ("::", 0))),
        ("9000", Endpoint(V4, (DEFAULT_HOST, 9000))),
    ],
)
def test_parse_bind(text: str, endpoint: Endpoint) -> None:
    assert parse_bind(text) == endpoint


@pytest.mark.parametrize(
    ("text", "advice"),
    [
        ("::1:8000", "put an IPv6 address in brackets"),
        ("[localhost]:80", "is not an IPv6 address"),
        (":8000", "give a host: 127.0.0.1:8000 for loopback"),
        ("localhost", "expected HOST:PORT"),
        ("localhost:http", "port must be a number from 0 to 65535"),
        ("localhost:65536", "port must be a number from 0 to 65535"),
        ("localhost:-1", "port must be a number from 0 to 65535"),
        ("", "expected HOST:PORT"),
    ],
)
def test_parse_bind_refuses(text: str, advice: str) -> None:
    with pytest.raises(UsageError, match=advice):
        parse_bind(text)


def test_parse_handler_spec() -> None:
    assert parse_handler_spec("pkg.mod:Outer.Handler") == ("pkg.mod", "Outer.Handler")
    for bad in ["foo", "mod:", ":Cls", "mod:1Cls", "my-mod:Cls", "mod:Cls:x"]:
        with pytest.raises(UsageError, match="expects MODULE:CLASS"):
            parse_handler_spec(bad)


def config_from(*argv: str) -> Config:
    return load_config(parse_options(argv))


def test_without_options_it_echoes_lines_on_loopback() -> None:
    config = config_from()
    assert config.endpoints == (Endpoint(V4, (DEFAULT_HOST, DEFAULT_PORT)),)
    assert config.handler is EchoHandler
    options = parse_options([])
    assert (options.log_level, options.access_log) == ("INFO", False)
    assert config_from("--udp").handler is DatagramEchoHandler


def test_unix_replaces_the_default_bind_and_binds_add_up() -> None:
    assert config_from("--unix", "/tmp/a.sock").endpoints == (Endpoint(UNIX, "/tmp/a.sock"),)
    config = config_from("--bind", "127.0.0.1:0", "--bind", "[::1]:0", "--unix", "s")
    assert [e.family for e in config.endpoints] == [V4, V6, UNIX]


def test_server_class_carries_the_options() -> None:
    config = Config(
        endpoints=(),
        handler=EchoHandler,
        threading=True,
        max_connections=3,
        shutdown_grace=0.5,
    )
    cls = server_class(config, Endpoint(V6, ("::1", 0)))
    assert issubclass(cls, trio_socketserver.ThreadingTCPServer)
    assert cls.address_family == V6
    assert (cls.max_connections, cls.max_threads, cls.shutdown_grace) == (3, 3, 0.5)
    assert cls.daemon_threads
    assert cls.allow_reuse_address  # a restart binds at once (TIME-WAIT)
    datagrams = Config(endpoints=(), handler=DatagramEchoHandler, udp=True)
    unix_cls = server_class(datagrams, Endpoint(UNIX, "x"))
    assert issubclass(unix_cls, trio_socketserver.UnixDatagramServer)
    assert not issubclass(unix_cls, trio_socketserver.ThreadingMixIn)
    assert unix_cls.remove_stale_socket  # type: ignore[attr-defined]
    assert unix_cls.shutdown_grace == trio_socketserver.BaseServer.shutdown_grace
    # The class attributes of the engine stay untouched.
    assert trio_socketserver.ThreadingTCPServer.address_family == V4


def test_shutdown_grace_may_be_infinite() -> None:
    assert config_from("--shutdown-grace", "inf").shutdown_grace == math.inf


# -- one-line errors (in-process: nothing is served) --------------------------


def write_module(directory: Path, name: str, source: str) -> str:
    (directory / f"{name}.py").write_text(source)
    return name


@pytest.fixture
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path; restore sys.path (load_handler adds the current directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--handler", "foo"], "--handler expects MODULE:CLASS"),
        (["--handler", "no_such_module_xyz:Handler"], "no module named 'no_such_module_xyz'"),
        (["--handler", "no_such_pkg_xyz.mod:Handler"], "no module named 'no_such_pkg_xyz'"),
        (["--handler", "json:NoSuchThing"], "'json' has no attribute 'NoSuchThing'"),
        (["--handler", "json:dumps"], "is a function, not a request handler class"),
        (["--handler", "json:JSONDecoder"], "is a class, not a request handler class"),
        (
            ["--udp", "--handler", "trio_socketserver:StreamRequestHandler"],
            "is a stream handler and --udp serves datagrams",
        ),
        (["--handler", "socketserver:DatagramRequestHandler"], "add --udp to serve it"),
        (["--handler", "raises_on_import:H"], "RuntimeError: database not configured (at "),
        (["--handler", "bad_syntax:H"], "SyntaxError: "),
        (["--handler", "missing_dependency:H"], "No module named 'not_installed_xyz'"),
        (["--bind", "::1:80"], "put an IPv6 address in brackets"),
        (["--max-connections", "0"], "expected a whole number >= 1"),
        (["--shutdown-grace", "-1"], "expected seconds >= 0"),
        (["--shutdown-grace", "nan"], "expected seconds >= 0"),
        (["--log-level", "loud"], "invalid choice"),
        (["--tls-cert", "missing.pem"], "certificate file missing: missing.pem (--tls-cert)"),
        (["--tls-key", "key.pem"], "--tls-key needs --tls-cert"),
        (["--udp", "--tls-cert", "cert.pem"], "stream servers only; drop --udp"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    argv: list[str], message: str, in_tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_module(
        in_tmp_path, "raises_on_import", "\n\nraise RuntimeError('database not configured')\n"
    )
    write_module(in_tmp_path, "bad_syntax", "class H(:\n    pass\n")
    write_module(in_tmp_path, "missing_dependency", "import not_installed_xyz\n")
    assert cli_main.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("trio-socketserver: error: ")
    assert message in err
    assert "Traceback" not in err
    if "raises_on_import" in argv[-1]:
        assert "raises_on_import.py:3)" in err  # where the import broke


def test_help_documents_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for text in ["--bind HOST:PORT", "--shutdown-grace", "Exit status", "130/143"]:
        assert text in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("trio-socketserver ")


# -- the real program ---------------------------------------------------------


def echo(address: tuple[str, int], *lines: bytes, family: int = V4) -> None:
    with socket.socket(family) as client:
        client.settimeout(SOCKET_TIMEOUT)
        client.connect(address)
        for line in lines:
            client.sendall(line)
            assert read_until(client, b"\n") == line


@pytest.mark.usefixtures("no_leaks")
def test_sigint_stops_gracefully_with_status_0() -> None:
    with ServerProcess(*CLI, "--bind", "127.0.0.1:0") as server:
        [serving] = server.serving()
        assert serving["what"] == "EchoHandler"
        assert serving["kind"] == "tcp"
        host, port = ip_address(serving["where"])
        assert host == "127.0.0.1" and port != 0  # the real port, not the 0 asked for
        echo((host, port), b"hello\n", b"world\n")
        server.send_signal(signal.SIGINT)
        assert server.wait() == 0
    assert "Traceback" not in server.stderr
    assert "requests finished: 1, failed: 0, cut short: 0" in server.stderr


@pytest.mark.usefixtures("no_leaks")
def test_sigterm_gives_in_flight_connections_the_grace_then_eof() -> None:
    grace = 0.5
    with ServerProcess(*CLI, "--bind", "127.0.0.1:0", "--shutdown-grace", str(grace)) as server:
        with socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"before\n")
            assert read_until(client, b"\n") == b"before\n"  # the handler is in flight
            # The server's deadline is set after it gets the signal, so at least
            # `grace` seconds pass between here and EOF (same monotonic clock).
            signalled = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait_for_line("SIGTERM: shutting down", stream="stderr")
            # Stopped accepting, but the connection in flight is still served...
            client.sendall(b"during the grace\n")
            assert read_until(client, b"\n") == b"during the grace\n"
            # ...until the grace is over; then it is cut and the client sees EOF.
            assert client.recv(100) == b""
            assert time.monotonic() - signalled >= grace
        assert server.wait() == 0
    assert "requests finished: 0, failed: 0, cut short: 1" in server.stderr


@pytest.mark.parametrize(("second", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.usefixtures("no_leaks")
def test_second_signal_stops_at_once(second: int, status: int) -> None:
    # A grace far longer than the exit timeout: only the second signal can end it in time.
    with (
        ServerProcess(*CLI, "--bind", "127.0.0.1:0", "--shutdown-grace", "3600") as server,
        socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client,
    ):
        client.sendall(b"x\n")
        assert read_until(client, b"\n") == b"x\n"
        server.send_signal(signal.SIGINT)
        server.wait_for_line("SIGINT: shutting down", stream="stderr")
        server.send_signal(second)
        assert server.wait() == status
        try:
            assert client.recv(100) == b""
        except ConnectionResetError:
            pass  # a cut connection may also be reset: either way, it ended
    assert "again: stopping at once" in server.stderr
    assert "Traceback" not in server.stderr


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(V6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.usefixtures("no_leaks")
def test_several_binds_serve_together_and_stop_together() -> None:
    with ServerProcess(*CLI, "--bind", "127.0.0.1:0", "--bind", "[::1]:0") as server:
        # Both lines are logged once both listen.
        server.wait_for_line(r"on tcp \[::1\]:", stream="stderr")
        v4, v6 = server.serving()
        echo(ip_address(v4["where"]), b"four\n")
        echo(ip_address(v6["where"]), b"six\n", family=V6)
        server.send_signal(signal.SIGINT)
        assert server.wait() == 0
    assert server.stderr.count("requests finished: 1, failed: 0, cut short: 0") == 2


@pytest.mark.usefixtures("no_leaks")
def test_udp_echo() -> None:
    with ServerProcess(*CLI, "--udp", "--bind", "127.0.0.1:0") as server:
        [serving] = server.serving()
        assert (serving["what"], serving["kind"]) == ("DatagramEchoHandler", "udp")
        with socket.socket(V4, socket.SOCK_DGRAM) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.sendto(b"datagram", ip_address(serving["where"]))
            assert client.recvfrom(100)[0] == b"datagram"
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0


@pytest.mark.usefixtures("no_leaks")
def test_unix_echo_and_the_socket_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    with ServerProcess(*CLI, "--unix", str(path)) as server:
        [serving] = server.serving()
        assert (serving["kind"], serving["where"]) == ("unix", str(path))
        with socket.socket(UNIX) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"over a path\n")
            assert read_until(client, b"\n") == b"over a path\n"
        server.send_signal(signal.SIGINT)
        assert server.wait() == 0
    assert not path.exists()


@pytest.mark.usefixtures("no_leaks")
def test_tls_echo(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    args = ("--bind", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    with ServerProcess(*CLI, *args) as server:
        [serving] = server.serving()
        assert serving["kind"] == "tcp+tls"
        context = ssl.create_default_context()
        ca.configure_trust(context)
        address = ip_address(serving["where"])
        with (
            socket.create_connection(address, timeout=SOCKET_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as client,
        ):
            client.sendall(b"secret\n")
            assert read_until(client, b"\n") == b"secret\n"
        server.send_signal(signal.SIGINT)
        assert server.wait() == 0


SYNC_HANDLER = """\
import socketserver
import threading


class Upper(socketserver.StreamRequestHandler):
    # A stdlib-style handler, unchanged: blocking file objects on a thread.
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line.upper())
"""


@pytest.mark.usefixtures("no_leaks")
def test_threading_serves_a_sync_handler_module_concurrently(tmp_path: Path) -> None:
    write_module(tmp_path, "upper_handler", SYNC_HANDLER)
    args = ("--bind", "127.0.0.1:0", "--handler", "upper_handler:Upper", "--threading")
    # cwd=tmp_path: the handler module is found in the current directory.
    with ServerProcess(*CLI, *args, cwd=tmp_path) as server:
        address = server.address()
        with (
            socket.create_connection(address, timeout=SOCKET_TIMEOUT) as first,
            socket.create_connection(address, timeout=SOCKET_TIMEOUT) as second,
        ):
            first.sendall(b"one\n")
            assert read_until(first, b"\n") == b"ONE\n"
            # `first` still holds its thread; without --threading this would wait forever.
            second.sendall(b"two\n")
            assert read_until(second, b"\n") == b"TWO\n"
        server.send_signal(signal.SIGINT)
        assert server.wait() == 0


@pytest.mark.usefixtures("no_leaks")
def test_address_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ServerProcess(*CLI, "--bind", f"127.0.0.1:{port}") as server:
            assert server.wait() == 2
    assert server.stdout_lines == []
    [line] = server.stderr_lines
    # Named as it was run (python -m trio_socketserver), as its usage line names it.
    prefix = "python -m trio_socketserver: error: cannot listen on tcp"
    assert line.startswith(f"{prefix} 127.0.0.1:{port}: ")
    assert "already in use" in line


@pytest.mark.usefixtures("no_leaks")
def test_bad_handler_through_the_real_entry_point() -> None:
    with ServerProcess(*CLI, "--handler", "no_such_module_xyz:Handler") as server:
        assert server.wait() == 2
    assert server.stdout_lines == []
    [line] = server.stderr_lines
    assert "no module named 'no_such_module_xyz'" in line
