# The command line: option and address parsing as pure functions, the
# one-line errors in-process, and the real program (`python -m
# trio_socketserver`) in a child process, driven by stdlib clients and signals.
from __future__ import annotations

import base64
import logging
import math
import re
import signal
import socket
import ssl
import sys
import time
import types
from pathlib import Path

import pytest
import trustme

import trio_socketserver
from conftest import have_ipv6_loopback
from serving_process import cli, ip_address, read_until
from trio_socketserver import __main__ as cli_main
from trio_socketserver.__main__ import ACCESS_LOGGER
from trio_socketserver._cli import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Config,
    Endpoint,
    UsageError,
    load_config,
    load_tls,
    parse_bind,
    parse_handler_spec,
    parse_options,
    server_class,
)
from trio_socketserver._echo import DatagramEchoHandler, EchoHandler

# Bounds each client wait; a passing test never comes near it.
SOCKET_TIMEOUT = 10.0

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
        drain_delay=2.5,
    )
    cls = server_class(config, Endpoint(V6, ("::1", 0)))
    assert issubclass(cls, trio_socketserver.ThreadingTCPServer)
    assert cls.address_family == V6
    assert (cls.max_connections, cls.max_threads, cls.shutdown_grace) == (3, 3, 0.5)
    assert cls.drain_delay == 2.5
    assert cls.daemon_threads
    assert cls.allow_reuse_address  # a restart binds at once (TIME-WAIT)
    datagrams = Config(endpoints=(), handler=DatagramEchoHandler, udp=True)
    unix_cls = server_class(datagrams, Endpoint(UNIX, "x"))
    assert issubclass(unix_cls, trio_socketserver.UnixDatagramServer)
    assert not issubclass(unix_cls, trio_socketserver.ThreadingMixIn)
    assert unix_cls.remove_stale_socket  # type: ignore[attr-defined]
    # Datagrams have no TIME-WAIT, and on Linux SO_REUSEADDR lets two UDP servers share a port.
    assert not unix_cls.allow_reuse_address
    assert not server_class(datagrams, Endpoint(V4, ("127.0.0.1", 0))).allow_reuse_address
    assert unix_cls.shutdown_grace == trio_socketserver.BaseServer.shutdown_grace
    # The class attributes of the engine stay untouched.
    assert trio_socketserver.ThreadingTCPServer.address_family == V4


def test_proxy_protocol_options_reach_the_server_class() -> None:
    config = config_from(
        "--proxy-protocol", "v2", "--proxy-trusted", "10.0.0.0/8", "--proxy-trusted", "::1"
    )
    assert (config.proxy_protocol, config.proxy_trusted) == ("v2", ("10.0.0.0/8", "::1"))
    cls = server_class(config, Endpoint(V4, ("127.0.0.1", 0)))
    assert (cls.proxy_protocol, cls.proxy_trusted) == ("v2", ("10.0.0.0/8", "::1"))
    # Without --proxy-trusted the server's own default (loopback) stays.
    default = server_class(config_from("--proxy-protocol", "auto"), Endpoint(UNIX, "x"))
    assert default.proxy_protocol == "auto"
    assert default.proxy_trusted == trio_socketserver.BaseServer.proxy_trusted
    assert server_class(config_from(), Endpoint(V4, ("127.0.0.1", 0))).proxy_protocol is None


def test_drain_delay_defaults_to_zero() -> None:
    assert config_from().drain_delay == 0
    assert config_from("--drain-delay", "1.5").drain_delay == 1.5


def test_sigterm_keeps_accepting_for_the_drain_delay() -> None:
    with cli("--bind", "127.0.0.1:0", "--drain-delay", "3600") as server:
        address = server.address()
        server.send_signal(signal.SIGTERM)
        server.wait_for_line("SIGTERM: shutting down", stream="stderr")
        # Draining, but a client that a balancer still sends is served.
        with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"still here\n")
            assert read_until(client, b"\n") == b"still here\n"
        server.send_signal(signal.SIGTERM)  # the second signal does not wait out the delay
        assert server.wait() == 143


def test_shutdown_grace_may_be_infinite() -> None:
    assert config_from("--shutdown-grace", "inf").shutdown_grace == math.inf


def test_request_deadline_reaches_every_server_class() -> None:
    assert config_from().request_deadline is None
    config = config_from("--request-deadline", "2.5", "--udp", "--threading")
    cls = server_class(config, Endpoint(V4, ("127.0.0.1", 0)))
    assert issubclass(cls, trio_socketserver.ThreadingUDPServer)
    assert cls.request_deadline == 2.5
    default = server_class(config_from(), Endpoint(V4, ("127.0.0.1", 0)))
    assert default.request_deadline is None


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
        (["--request-deadline", "-1"], "expected seconds >= 0"),
        (["--drain-delay", "-1"], "expected seconds >= 0"),
        (["--log-level", "loud"], "invalid choice"),
        (["--tls-cert", "missing.pem"], "certificate file missing: missing.pem (--tls-cert)"),
        (["--tls-key", "key.pem"], "--tls-key needs --tls-cert"),
        (["--udp", "--tls-cert", "cert.pem"], "stream servers only; drop --udp"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--proxy-protocol", "v3"], "invalid choice: 'v3'"),
        (["--udp", "--proxy-protocol", "v1"], "--proxy-protocol works with stream servers only"),
        (["--proxy-trusted", "10.0.0.0/8"], "--proxy-trusted needs --proxy-protocol"),
        (
            ["--proxy-protocol", "v1", "--proxy-trusted", "10.0.0.1/8"],
            "expected an address or network, e.g. 10.0.0.0/8",
        ),
        (["--proxy-protocol", "v1", "--proxy-trusted", "lb.internal"], "address or network"),
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
    for text in ["--bind HOST:PORT", "--health-bind", "--shutdown-grace", "Exit status", "130/143"]:
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
    with cli("--bind", "127.0.0.1:0") as server:
        [serving] = server.serving()
        assert serving["what"] == "EchoHandler"
        assert serving["kind"] == "tcp"
        host, port = ip_address(serving["where"])
        assert host == "127.0.0.1" and port != 0  # the real port, not the 0 asked for
        echo((host, port), b"hello\n", b"world\n")
        assert server.stop() == 0
    assert "Traceback" not in server.stderr
    assert re.search(
        rf": stopped serving on tcp 127\.0\.0\.1:{port} in \d+\.\d\d s: "
        "requests finished: 1, failed: 0, cut short: 0, refused: 0$",
        server.stderr,
        re.MULTILINE,
    )


@pytest.mark.usefixtures("no_leaks")
def test_sigterm_ends_idle_connections_and_gives_busy_ones_the_grace() -> None:
    grace = 0.5
    with (
        cli("--bind", "127.0.0.1:0", "--shutdown-grace", str(grace)) as server,
        socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as idle,
        socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as busy,
    ):
        for client in (idle, busy):
            client.sendall(b"before\n")
            assert read_until(client, b"\n") == b"before\n"
        busy.sendall(b"half a li")  # the echo handler is in the middle of a line
        # The server's deadline is set after it gets the signal, so at least
        # `grace` seconds pass between here and the busy client's EOF.
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        # Waiting for its next line, the idle connection ends at once, cleanly...
        assert idle.recv(100) == b""
        # ...the busy one can still send during the grace, and is cut when it is over.
        busy.sendall(b"ne, and more")
        assert busy.recv(100) == b""
        assert time.monotonic() - signalled >= grace
        assert server.wait() == 0
    report = re.search(
        r" in (\S+) s: requests finished: 1, failed: 0, cut short: 1, refused: 0$",
        server.stderr,
        re.MULTILINE,
    )
    assert report is not None, server.stderr
    assert float(report[1]) >= grace  # the stop took the grace, counted from the signal


@pytest.mark.usefixtures("no_leaks")
def test_request_deadline_cuts_a_connection_logs_and_reports_it() -> None:
    deadline = 0.5
    with cli("--bind", "127.0.0.1:0", "--request-deadline", str(deadline)) as server:
        with socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client:
            connected = time.monotonic()
            peer = client.getsockname()
            try:
                assert client.recv(100) == b""  # a silent client, far inside the timeout
            except ConnectionResetError:
                pass  # a cut connection may also be reset: either way, it ended
            assert time.monotonic() - connected >= deadline
        server.wait_for_line(
            re.escape(
                f"request from {peer!r} cut short: it ran longer than request_deadline "
                f"({deadline} s)"
            ),
            stream="stderr",
        )
        echo(server.address(), b"still serving\n")
        assert server.stop() == 0
    assert "requests finished: 1, failed: 0, cut short: 1" in server.stderr


@pytest.mark.parametrize(("second", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.usefixtures("no_leaks")
def test_second_signal_stops_at_once(second: int, status: int) -> None:
    # A grace far longer than the exit timeout: only the second signal can end it in time.
    with (
        cli("--bind", "127.0.0.1:0", "--shutdown-grace", "3600") as server,
        socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client,
    ):
        client.sendall(b"x\n")
        assert read_until(client, b"\n") == b"x\n"
        # Mid-line: the drain waits for this request (between two lines it would end it).
        client.sendall(b"half a li")
        server.send_signal(signal.SIGINT)
        server.wait_for_line("SIGINT: shutting down", stream="stderr")
        assert server.stop(second) == status
        try:
            assert client.recv(100) == b""
        except ConnectionResetError:
            pass  # a cut connection may also be reset: either way, it ended
    assert "again: stopping at once" in server.stderr
    assert "Traceback" not in server.stderr


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.usefixtures("no_leaks")
def test_several_binds_serve_together_and_stop_together() -> None:
    with cli("--bind", "127.0.0.1:0", "--bind", "[::1]:0") as server:
        # Both lines are logged once both listen.
        server.wait_for_line(r"on tcp \[::1\]:", stream="stderr")
        v4, v6 = server.serving()
        echo(ip_address(v4["where"]), b"four\n")
        echo(ip_address(v6["where"]), b"six\n", family=V6)
        assert server.stop() == 0
    assert server.stderr.count("requests finished: 1, failed: 0, cut short: 0, refused: 0") == 2


@pytest.mark.usefixtures("no_leaks")
def test_behind_a_balancer_with_proxy_protocol() -> None:
    with cli("--bind", "127.0.0.1:0", "--proxy-protocol", "v1") as server:
        address = server.address()
        with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as client:
            header = b"PROXY TCP4 203.0.113.7 192.0.2.1 41000 443\r\n"
            client.sendall(header + b"forwarded\n")
            assert read_until(client, b"\n") == b"forwarded\n"  # the header is not echoed
        with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"no header\n")
            try:
                assert client.recv(100) == b""
            except ConnectionResetError:
                pass  # closed with the line unread: a reset is the same refusal
        server.wait_for_line(
            r"INFO trio_socketserver: refused the connection from \('127\.0\.0\.1', \d+\): "
            r"PROXY protocol: no PROXY protocol v1 header",
            stream="stderr",
        )
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.usefixtures("no_leaks")
def test_udp_echo() -> None:
    with cli("--udp", "--bind", "127.0.0.1:0") as server:
        [serving] = server.serving()
        assert (serving["what"], serving["kind"]) == ("DatagramEchoHandler", "udp")
        with socket.socket(V4, socket.SOCK_DGRAM) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.sendto(b"datagram", ip_address(serving["where"]))
            assert client.recvfrom(100)[0] == b"datagram"
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.usefixtures("no_leaks")
def test_unix_echo_and_the_socket_file_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    with cli("--unix", str(path)) as server:
        [serving] = server.serving()
        assert (serving["kind"], serving["where"]) == ("unix", str(path))
        with socket.socket(UNIX) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"over a path\n")
            assert read_until(client, b"\n") == b"over a path\n"
        assert server.stop() == 0
    assert not path.exists()


@pytest.mark.usefixtures("no_leaks")
def test_tls_echo(tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    args = ("--bind", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    with cli(*args) as server:
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
        assert server.stop() == 0


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
    with cli(*args, cwd=tmp_path) as server:
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
        assert server.stop() == 0


@pytest.mark.usefixtures("no_leaks")
def test_address_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with cli("--bind", f"127.0.0.1:{port}") as server:
            assert server.wait() == 2
    assert server.stdout_lines == []
    [line] = server.stderr_lines
    # Named as it was run (python -m trio_socketserver), as its usage line names it.
    prefix = "python -m trio_socketserver: error: cannot listen on tcp"
    assert line.startswith(f"{prefix} 127.0.0.1:{port}: ")
    assert "already in use" in line


@pytest.mark.usefixtures("no_leaks")
def test_bad_handler_through_the_real_entry_point() -> None:
    with cli("--handler", "no_such_module_xyz:Handler") as server:
        assert server.wait() == 2
    assert server.stdout_lines == []
    [line] = server.stderr_lines
    assert "no module named 'no_such_module_xyz'" in line


# -- what a new user ran into (issue: the first ten minutes) ----------------


@pytest.mark.usefixtures("no_leaks")
def test_restart_on_the_same_port_right_after_a_stop_with_a_client_connected() -> None:
    # The README's flow: a client connected (nc), Ctrl-C, start again at once. The server
    # closes the connection first, so the port has a connection in TIME-WAIT.
    with cli("--bind", "127.0.0.1:0", "--shutdown-grace", "0") as first:
        address = first.address()
        with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"connected\n")
            assert read_until(client, b"\n") == b"connected\n"
            assert first.stop() == 0
            assert client.recv(100) == b""  # the server closed it: TIME-WAIT is on its side
    with cli("--bind", f"127.0.0.1:{address[1]}") as second:
        assert second.address() == address
        echo(address, b"served again\n")
        assert second.stop() == 0


@pytest.mark.usefixtures("no_leaks")
def test_a_socket_file_left_by_kill_9_is_replaced(unix_dir: Path) -> None:
    path = unix_dir / "echo.sock"
    with cli("--unix", str(path)) as crashed:
        crashed.serving()
        assert crashed.stop(signal.SIGKILL) == -signal.SIGKILL
    assert path.is_socket()  # left behind: nobody listens on it
    with cli("--unix", str(path)) as server:
        server.serving()
        with socket.socket(UNIX) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"after the crash\n")
            assert read_until(client, b"\n") == b"after the crash\n"
        assert server.stop() == 0
    assert f"removed the stale socket file {path}: nobody listened on it" in server.stderr
    assert not path.exists()


@pytest.mark.usefixtures("no_leaks")
def test_a_socket_someone_listens_on_is_never_replaced(unix_dir: Path) -> None:
    path = unix_dir / "echo.sock"
    with cli("--unix", str(path)) as running:
        running.serving()
        with cli("--unix", str(path)) as second:
            assert second.wait() == 2
        [line] = second.stderr_lines
        assert line.startswith(f"python -m trio_socketserver: error: cannot listen on unix {path}")
        assert "another server listens on this socket" in line
        assert "port" not in line  # TCP advice does not apply to a path
        # The first server still owns its socket and serves on it.
        with socket.socket(UNIX) as client:
            client.settimeout(SOCKET_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"still mine\n")
            assert read_until(client, b"\n") == b"still mine\n"
        assert running.stop() == 0


@pytest.mark.usefixtures("no_leaks")
def test_the_serving_line_is_logged_to_stderr_with_a_timestamp() -> None:
    with cli("--bind", "127.0.0.1:0") as server:
        server.serving()
        assert server.stop() == 0
    assert server.stdout_lines == []
    [line] = [line for line in server.stderr_lines if ": serving " in line]
    # "2024-05-01 12:00:00,123 INFO trio_socketserver: serving EchoHandler on tcp ..."
    date, time_of_day, level, logger = line.split()[:4]
    assert len(date.split("-")) == 3 and len(time_of_day.split(":")) == 3
    assert (level, logger) == ("INFO", "trio_socketserver:")


ACCESS_HANDLER = """\
import logging

import trio_socketserver

ACCESS = logging.getLogger("trio_socketserver.access")


class Echo(trio_socketserver.StreamRequestHandler):
    # Logs on the access logger as the engine does, so this test sees what the command
    # line lets through, whatever the engine's line says.
    async def handle(self):
        async for line in self.rfile:
            await self.wfile.write(line)
        ACCESS.info("access line for %s", self.client_address[0])
"""


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ((), False),
        (("--access-log",), True),
        (("--log-level", "DEBUG"), True),
    ],
)
@pytest.mark.usefixtures("no_leaks")
def test_access_log_is_opt_in_and_part_of_debug(
    tmp_path: Path, options: tuple[str, ...], shown: bool
) -> None:
    write_module(tmp_path, "access_handler", ACCESS_HANDLER)
    args = ("--bind", "127.0.0.1:0", "--handler", "access_handler:Echo", *options)
    with cli(*args, cwd=tmp_path) as server:
        echo(server.address(), b"one request\n")
        assert server.stop() == 0
    assert ("access line for 127.0.0.1" in server.stderr) == shown


def test_access_log_below_info_keeps_its_info_lines() -> None:
    # --log-level WARNING --access-log: warnings, and the access lines too.
    access = logging.getLogger(ACCESS_LOGGER)
    try:
        for level, access_log, expected in [
            ("WARNING", True, logging.INFO),
            ("WARNING", False, logging.WARNING),
            ("ERROR", False, logging.ERROR),
            ("DEBUG", False, logging.DEBUG),
        ]:
            logging.getLogger().setLevel(level)
            cli_main.configure_logging(level, access_log=access_log)
            assert access.getEffectiveLevel() == expected
    finally:
        access.setLevel(logging.NOTSET)


@pytest.mark.usefixtures("no_leaks")
def test_plaintext_client_on_a_tls_port_is_logged_as_a_failed_handshake(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    args = ("--bind", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key))
    with cli(*args) as server:
        with socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"hello in plaintext\n")
            try:
                assert client.recv(100) == b""
            except ConnectionResetError:
                pass  # the server ended it either way
        server.wait_for_line("TLS handshake failed", stream="stderr")
        assert server.stop() == 0
    assert "TLS handshake failed: [SSL: " in server.stderr
    assert "BrokenResourceError" not in server.stderr


@pytest.mark.usefixtures("no_leaks")
def test_a_handler_module_that_fails_to_import_shows_its_traceback_at_debug(
    tmp_path: Path,
) -> None:
    write_module(
        tmp_path, "raises_on_import", "\n\nraise RuntimeError('database not configured')\n"
    )
    args = ("--handler", "raises_on_import:H")
    with cli(*args, "--log-level", "DEBUG", cwd=tmp_path) as debug:
        assert debug.wait() == 2
    assert "Traceback (most recent call last):" in debug.stderr
    assert "raise RuntimeError('database not configured')" in debug.stderr
    assert debug.stderr_lines[-1].startswith("python -m trio_socketserver: error: --handler ")
    with cli(*args, cwd=tmp_path) as quiet:
        assert quiet.wait() == 2
    [line] = quiet.stderr_lines
    assert "RuntimeError: database not configured (at " in line


FAILING_HANDLER = """\
import trio_socketserver


class Fails(trio_socketserver.StreamRequestHandler):
    async def handle(self):
        await self.rfile.readline()
        raise ValueError("a bug in the handler")
"""


@pytest.mark.usefixtures("no_leaks")
def test_stop_report_counts_failed_requests_apart(tmp_path: Path) -> None:
    write_module(tmp_path, "failing_handler", FAILING_HANDLER)
    args = ("--bind", "127.0.0.1:0", "--handler", "failing_handler:Fails")
    with cli(*args, cwd=tmp_path) as server:
        with socket.create_connection(server.address(), timeout=SOCKET_TIMEOUT) as client:
            client.sendall(b"boom\n")
            assert client.recv(100) == b""
        assert server.stop() == 0
    assert "ValueError: a bug in the handler" in server.stderr  # handle_error's traceback
    assert "requests finished: 0, failed: 1, cut short: 0, refused: 0" in server.stderr


# -- TLS files: which file, what is wrong -------------------------------------


def tls_files(directory: Path) -> tuple[Path, Path]:
    """A certificate and its key, made by trustme, as PEM files in ``directory``."""
    issued = trustme.CA().issue_cert("127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    return cert, key


def test_tls_files_that_fit_load(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    assert load_tls(str(cert), str(key), udp=False) is not None
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    assert load_tls(str(both), None, udp=False) is not None


def tls_mistake(tmp_path: Path, case: str) -> tuple[str, str | None, str]:
    """``--tls-cert``, ``--tls-key`` and the error expected for one mistake a user makes."""
    cert, key = tls_files(tmp_path)
    if case == "key missing":
        missing = tmp_path / "missing-key.pem"
        return str(cert), str(missing), f"key file missing: {missing} (--tls-key)"
    if case == "certificate missing":
        missing = tmp_path / "missing.pem"
        return str(missing), str(key), f"certificate file missing: {missing} (--tls-cert)"
    if case == "certificate not PEM":
        der = _der(cert)
        return str(der), str(key), f"--tls-cert {der}: not a PEM certificate"
    if case == "key not PEM":
        der = _der(key)
        return str(cert), str(der), f"--tls-key {der}: not a PEM private key"
    if case == "swapped":
        return str(key), str(cert), f"certificate and key swapped: {key} holds a private key"
    if case == "another certificate's key":
        (tmp_path / "other").mkdir()
        _, other = tls_files(tmp_path / "other")
        return str(cert), str(other), f"don't match: {other} is not the private key of"
    if case == "encrypted key":
        return str(cert), str(_encrypted(key)), f"--tls-key {key}: the key is encrypted"
    if case == "no key given":
        return str(cert), None, f"--tls-cert {cert} holds no private key; give the key file"
    assert case == "a directory"
    return str(tmp_path), str(key), f"--tls-cert {tmp_path}: cannot read the certificate file"


@pytest.mark.parametrize(
    "case",
    [
        "key missing",
        "certificate missing",
        "certificate not PEM",
        "key not PEM",
        "swapped",
        "another certificate's key",
        "encrypted key",
        "no key given",
        "a directory",
    ],
)
def test_tls_file_errors_name_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    cert, key, message = tls_mistake(tmp_path, case)
    with pytest.raises(UsageError) as raised:
        load_tls(cert, key, udp=False)
    assert message in str(raised.value)
    assert "_ssl.c" not in str(raised.value)  # not OpenSSL's "[SSL] PEM lib (_ssl.c:3926)"
    assert "\n" not in str(raised.value)


def _der(pem: Path) -> Path:
    """The same certificate or key in DER (binary) form: a real file that is not PEM."""
    der = pem.with_name(pem.name + ".der")
    body = b"".join(line for line in pem.read_bytes().splitlines() if not line.startswith(b"-"))
    der.write_bytes(base64.b64decode(body))
    return der


def _encrypted(key: Path) -> Path:
    """``key`` rewritten as a password-protected PEM key."""
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return key


# -- naming ------------------------------------------------------------------


def test_usage_names_the_program_as_it_was_run() -> None:
    with cli("--help") as module_form:
        assert module_form.wait() == 0
    assert module_form.stdout_lines[0].startswith("usage: python -m trio_socketserver [-h]")
    assert "python -m trio_socketserver --bind 127.0.0.1:0" in "\n".join(module_form.stdout_lines)
    with cli("--frobnicate") as mistake:
        assert mistake.wait() == 2
    assert mistake.stderr_lines == [
        "python -m trio_socketserver: error: unrecognized arguments: --frobnicate "
        "(see python -m trio_socketserver --help)"
    ]


def test_the_package_exports_only_its_public_names() -> None:
    public = {
        name
        for name in dir(trio_socketserver)
        if not name.startswith("_")
        and not isinstance(getattr(trio_socketserver, name), types.ModuleType)
    }
    assert "annotations" not in public
    assert public == set(trio_socketserver.__all__)
