# trio_socketserver.compat, the blocking drop-in for the stdlib's socketserver, tested the way
# its users run it: serve_forever() on a thread, stdlib clients (socket, urllib.request,
# http.client, xmlrpc.client), handlers written against the stdlib's classes, and the deliberate
# improvements over the stdlib. install() and the http CLI run in subprocesses, since they
# change which socketserver the whole interpreter sees.
from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import socketserver as stdlib_socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import run_python
from conftest import serving_on_thread as serving
from trio_socketserver import _threading, compat

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
SRC = Path(__file__).resolve().parent.parent / "src"
# Every blocking wait in these tests is bounded: a broken server fails a test, never hangs it.
WAIT = 5.0
# Attribute defaults that differ from the stdlib's on purpose (docs/compat.md says why).
DELIBERATE_DEFAULTS = {"request_queue_size": 1024}


class Echo(stdlib_socketserver.StreamRequestHandler):
    """A handler written against the *stdlib's* class: lines back until EOF."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


def client(server: Any) -> socket.socket:
    return socket.create_connection(server.server_address[:2], timeout=WAIT)


def echo_once(server: Any, line: bytes = b"ping\n") -> bytes:
    with client(server) as sock, sock.makefile("rb") as reader:
        sock.sendall(line)
        return reader.readline()


def elapsed_call(fn: Callable[[], object], limit: float = WAIT) -> float:
    """Seconds ``fn()`` took, run on a thread so that a hang fails the test after ``limit``;
    what it raised is raised here."""
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=call, name=f"test call {fn.__name__}")
    start = time.monotonic()
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"{fn.__name__}() still blocked after {limit} s"
    if errors:
        raise errors[0]
    return time.monotonic() - start


# -- the module's surface ----------------------------------------------------------------


def test_every_stdlib_name_is_there() -> None:
    missing = [name for name in stdlib_socketserver.__all__ if not hasattr(compat, name)]
    assert not missing
    assert set(stdlib_socketserver.__all__) <= set(compat.__all__)


def _parameters(fn: Any) -> list[tuple[str, Any, Any]]:
    """A signature without its annotations: names, kinds and defaults."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _public_api(cls: type) -> dict[str, Any]:
    return {
        name: value
        for klass in reversed(cls.__mro__[:-1])  # not object's
        for name, value in vars(klass).items()
        if not name.startswith("_") or name == "__init__"
    }


@pytest.mark.parametrize(
    "name", [n for n in stdlib_socketserver.__all__ if n.endswith(("Server", "MixIn"))]
)
def test_classes_have_the_stdlib_methods_signatures_and_defaults(name: str) -> None:
    ours, theirs = (
        _public_api(getattr(compat, name)),
        _public_api(getattr(stdlib_socketserver, name)),
    )
    for attr, value in theirs.items():
        assert attr in ours, f"{name}.{attr} is missing"
        if callable(value):
            # Same parameters and defaults; a blocking method stays a plain function.
            assert _parameters(ours[attr]) == _parameters(value), f"{name}.{attr}"
            assert not inspect.iscoroutinefunction(ours[attr]), f"{name}.{attr} is async"
        elif attr != "active_children":  # a set of pids in both; None before the first fork
            expected = DELIBERATE_DEFAULTS.get(attr, value)
            assert ours[attr] == expected, f"{name}.{attr} = {ours[attr]!r}, stdlib {value!r}"


def test_engine_names_do_not_shadow_what_stdlib_subclasses_define() -> None:
    """A private engine method named like one of SimpleXMLRPCDispatcher's (``_dispatch``)
    silently broke every XML-RPC server; keep the namespaces apart: class attributes, and
    the instance attributes each constructor sets."""
    import http.server
    import logging.config
    import wsgiref.simple_server
    import xmlrpc.server

    def names(server_class: Any, *args: Any, **kwargs: Any) -> set[str]:
        with server_class(*args, **kwargs) as server:
            return {n for klass in server_class.__mro__ for n in vars(klass)} | set(vars(server))

    ours = names(compat.ThreadingTCPServer, LOCALHOST, Echo) | names(
        compat.ForkingTCPServer, LOCALHOST, Echo
    )
    stdlib = names(stdlib_socketserver.ThreadingTCPServer, LOCALHOST, Echo) | names(
        stdlib_socketserver.ForkingTCPServer, LOCALHOST, Echo
    )
    subclasses: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = [
        (http.server.ThreadingHTTPServer, (LOCALHOST, Echo), {}),
        (xmlrpc.server.MultiPathXMLRPCServer, (LOCALHOST,), {"logRequests": False}),
        (xmlrpc.server.SimpleXMLRPCServer, (LOCALHOST,), {"logRequests": False}),
        (wsgiref.simple_server.WSGIServer, (LOCALHOST, Echo), {}),
        (logging.config.listen(0).rcvr, (), {"host": "127.0.0.1", "port": 0}),  # local class
    ]
    for server_class, args, kwargs in subclasses:
        theirs = names(server_class, *args, **kwargs) - stdlib
        assert not (theirs & ours), f"{server_class.__qualname__}: {sorted(theirs & ours)}"


# -- serving, with stdlib handlers and clients ---------------------------------------------


@pytest.mark.parametrize(
    "server_class", [compat.TCPServer, compat.ThreadingTCPServer, compat.ForkingTCPServer]
)
def test_stdlib_handler_serves_stdlib_clients(server_class: Any) -> None:
    with server_class(LOCALHOST, Echo) as server, serving(server):
        assert echo_once(server) == b"ping\n"
        assert echo_once(server, b"pong\n") == b"pong\n"
    assert server.fileno() == -1


def test_udp_with_the_stdlib_datagram_handler() -> None:
    class Upper(stdlib_socketserver.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read().upper())

    with (
        compat.ThreadingUDPServer(LOCALHOST, Upper) as server,
        serving(server),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.settimeout(WAIT)
        sock.sendto(b"hi", server.server_address)
        assert sock.recv(100) == b"HI"


def test_unix_stream_server_removes_its_socket_file(unix_dir: Path) -> None:
    path = str(unix_dir / "s")
    with (
        compat.ThreadingUnixStreamServer(path, Echo) as server,
        serving(server),
        socket.socket(socket.AF_UNIX) as sock,
    ):
        sock.settimeout(WAIT)
        sock.connect(path)
        sock.sendall(b"unix\n")
        with sock.makefile("rb") as reader:
            assert reader.readline() == b"unix\n"
    assert not os.path.exists(path)


@pytest.mark.parametrize("server_class", [compat.TCPServer, compat.ThreadingTCPServer])
def test_tls_the_stdlib_way_with_an_ssl_context_attribute(server_class: Any) -> None:
    """werkzeug's dev server wraps its listening socket and keeps the context in
    ``self.ssl_context``: compat must not wrap each connection a second time."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)

    class WerkzeugLike(server_class):
        def __init__(self) -> None:
            super().__init__(LOCALHOST, Echo)
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.ssl_context = context

    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with (
        WerkzeugLike() as server,
        serving(server),
        client(server) as raw,
        client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        tls.makefile("rb") as reader,
    ):
        tls.sendall(b"secret\n")
        assert reader.readline() == b"secret\n"


def test_handle_request_honours_timeout_and_the_socket_timeout() -> None:
    timeouts = []

    class Server(compat.TCPServer):
        def handle_timeout(self) -> None:
            timeouts.append(threading.current_thread())

    with Server(LOCALHOST, Echo) as server:
        server.timeout = 0.01
        server.handle_request()
        server.timeout = None
        # The stdlib's pre-2.6 escape hatch, which test_xmlrpc still relies on.
        server.socket.settimeout(0.01)
        server.handle_request()
        assert server.socket.gettimeout() == 0.01  # found as the caller left it
    assert timeouts == [threading.current_thread()] * 2


def test_handle_request_serves_one_request() -> None:
    with (
        compat.ThreadingTCPServer(LOCALHOST, Echo) as server,
        client(server) as sock,
        sock.makefile("rb") as reader,
    ):
        sock.sendall(b"one\n")
        sock.shutdown(socket.SHUT_WR)
        server.handle_request()  # returns once the request is done
        assert reader.read() == b"one\n"


def test_sync_hook_overrides_are_called_as_the_stdlib_calls_them() -> None:
    calls: list[tuple[str, str]] = []

    def record(hook: str) -> None:
        calls.append((hook, threading.current_thread().name))

    class Server(compat.ThreadingTCPServer):
        def server_bind(self) -> None:
            record("server_bind")
            super().server_bind()

        def server_activate(self) -> None:
            record("server_activate")
            super().server_activate()

        def get_request(self) -> tuple[Any, Any]:
            record("get_request")
            return super().get_request()

        def verify_request(self, request: Any, client_address: Any) -> bool:
            record("verify_request")
            return bool(request.recv(1, socket.MSG_PEEK) == b"y")

        def process_request(self, request: Any, client_address: Any) -> None:
            record("process_request")
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            record("process_request_thread")  # Django's live server overrides this
            super().process_request_thread(request, client_address)

        def finish_request(self, request: Any, client_address: Any) -> None:
            record("finish_request")
            super().finish_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            record("shutdown_request")
            super().shutdown_request(request)

        def close_request(self, request: Any) -> None:
            record("close_request")
            super().close_request(request)

    server = Server(LOCALHOST, Echo, bind_and_activate=False)
    server.server_bind()
    server.server_activate()
    with server, serving(server):
        assert echo_once(server, b"yes\n") == b"yes\n"
        assert echo_once(server, b"no\n") == b""  # refused: closed without an answer
    assert [hook for hook, _ in calls[:2]] == ["server_bind", "server_activate"]
    # Each thread's own order is the stdlib's; the two threads interleave freely.
    serving_thread = "test serve_forever"
    on_serving_thread = [hook for hook, thread in calls[2:] if thread == serving_thread]
    accepted = ["get_request", "verify_request", "process_request"]
    refused = ["get_request", "verify_request", "shutdown_request", "close_request"]
    assert on_serving_thread == accepted + refused
    on_handler_thread = [hook for hook, thread in calls[2:] if thread != serving_thread]
    assert on_handler_thread == [
        "process_request_thread",
        "finish_request",
        "shutdown_request",
        "close_request",
    ]


def test_handle_error_gets_the_exception_and_the_server_keeps_serving() -> None:
    errors: list[BaseException | None] = []

    class Failing(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() == b"fail\n":
                raise ValueError("boom")
            self.wfile.write(b"fine\n")

    class Server(compat.ThreadingTCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(sys.exc_info()[1])

    with Server(LOCALHOST, Failing) as server, serving(server):
        assert echo_once(server, b"fail\n") == b""
        assert echo_once(server, b"again\n") == b"fine\n"
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


def test_service_actions_runs_every_poll_interval() -> None:
    called = threading.Event()

    class Server(compat.TCPServer):
        def service_actions(self) -> None:
            called.set()

    with Server(LOCALHOST, Echo) as server, serving(server, poll_interval=0.01):
        assert called.wait(WAIT)


def test_system_exit_in_a_threading_handler_ends_that_request_only() -> None:
    class Exiting(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() == b"exit\n":
                raise SystemExit(3)
            self.wfile.write(b"alive\n")

    seen: list[threading.ExceptHookArgs] = []
    original = threading.excepthook
    threading.excepthook = seen.append
    try:
        with compat.ThreadingTCPServer(LOCALHOST, Exiting) as server, serving(server):
            assert echo_once(server, b"exit\n") == b""
            assert echo_once(server, b"next\n") == b"alive\n"
    finally:
        threading.excepthook = original
    assert [args.exc_type for args in seen] == [SystemExit]


def test_system_exit_in_a_synchronous_handler_ends_serve_forever() -> None:
    class Exiting(stdlib_socketserver.BaseRequestHandler):
        def handle(self) -> None:
            raise SystemExit(3)

    with compat.TCPServer(LOCALHOST, Exiting) as server, client(server), pytest.raises(SystemExit):
        server.serve_forever()


# -- the deliberate improvements -------------------------------------------------------------


def test_shutdown_returns_promptly_whatever_the_poll_interval() -> None:
    with compat.TCPServer(LOCALHOST, Echo) as server, serving(server, poll_interval=3600):
        assert echo_once(server) == b"ping\n"  # serve_forever is running
        # The stdlib waits for the poll interval: an hour here.
        assert elapsed_call(server.shutdown) < WAIT


@pytest.mark.parametrize("server_class", [compat.TCPServer, compat.ThreadingTCPServer])
def test_shutdown_from_inside_a_handler_does_not_deadlock(server_class: Any) -> None:
    class Stopper(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.server.shutdown()  # the stdlib deadlocks here with a synchronous server
            self.wfile.write(b"stopping\n")

    with server_class(LOCALHOST, Stopper) as server, serving(server) as thread:
        assert echo_once(server) == b"stopping\n"
        thread.join(WAIT)
        assert not thread.is_alive()


@pytest.mark.parametrize("server_class", [compat.TCPServer, compat.ThreadingTCPServer])
def test_server_close_returns_within_the_grace_when_a_client_hangs(server_class: Any) -> None:
    entered = threading.Event()

    class Reader(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            entered.set()
            self.rfile.readline()  # the client never sends a line

    server = server_class(LOCALHOST, Reader)
    server.shutdown_grace = 0.2
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    with client(server):
        assert entered.wait(WAIT)
        # The stdlib would join the handler thread for as long as the client stays. Here:
        # the grace, then the connection is shut down so that readline() returns at once.
        assert elapsed_call(server.server_close) >= 0.2
        thread.join(WAIT)
    assert not thread.is_alive()


def test_daemon_threads_are_left_running_instead_of_waited_for() -> None:
    entered, release = threading.Event(), threading.Event()
    handler_threads: list[threading.Thread] = []

    class Stuck(stdlib_socketserver.BaseRequestHandler):
        def handle(self) -> None:
            handler_threads.append(threading.current_thread())
            entered.set()
            release.wait(WAIT)  # not on the socket: shutting the connection down cannot free it

    server = compat.ThreadingTCPServer(LOCALHOST, Stuck)
    server.daemon_threads = True
    server.shutdown_grace = 0.1
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    with client(server):
        assert entered.wait(WAIT)
        # Neither shutdown() nor server_close() waits for a daemon thread past the grace.
        assert elapsed_call(server.server_close) < _threading.THREAD_RELEASE_TIMEOUT
        thread.join(WAIT)
        assert not thread.is_alive()
        assert handler_threads[0].daemon and handler_threads[0].is_alive()
        release.set()
        handler_threads[0].join(WAIT)


def _accept_queue_length(port: int) -> int:
    """How many connections wait in the kernel's accept queue of the listener on ``port``."""
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "0A":  # LISTEN
                return int(fields[4].split(":")[1], 16)  # rx_queue: the accept backlog
    raise AssertionError(f"no listener on port {port}")


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc/net/tcp")
def chat_until_cut(server: Any, limit: float = WAIT) -> float:
    """A chatty, well-formed client: line after line, each answered, until the server ends
    the connection; returns how long that took."""
    start = time.monotonic()
    with client(server) as sock, sock.makefile("rb") as reader:
        for i in range(1_000_000):
            assert time.monotonic() - start < limit, "never cut"
            try:
                sock.sendall(b"%d\n" % i)
                line = reader.readline()
            except ConnectionError:  # reset, or a broken pipe: cut either way
                break
            if not line:
                break
            assert line == b"%d\n" % i
    return time.monotonic() - start


def test_request_deadline_cuts_a_chatty_client_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")

    class Server(compat.ThreadingTCPServer):
        request_deadline = 1.0

    with Server(LOCALHOST, Echo) as server, serving(server):
        elapsed = chat_until_cut(server)
        assert echo_once(server) == b"ping\n"
    # No sooner than the deadline; a loaded machine may take longer to get there.
    assert 1.0 <= elapsed < 1.0 + WAIT - 1
    stats = server.statistics()
    assert (stats.cancelled_requests, stats.finished_requests) == (1, 1)
    [record] = [r for r in caplog.records if "request_deadline" in r.getMessage()]
    assert record.getMessage().endswith("cut short: it ran longer than request_deadline (1.0 s)")


def test_request_deadline_in_handle_request_on_the_calling_thread() -> None:
    with compat.TCPServer(LOCALHOST, Echo) as server:
        server.request_deadline = 0.5
        chatting = threading.Thread(target=chat_until_cut, args=(server,), name="test client")
        chatting.start()
        try:
            elapsed = elapsed_call(server.handle_request)
        finally:
            chatting.join(WAIT)
    assert 0.5 <= elapsed < WAIT
    assert server.statistics().cancelled_requests == 1


@pytest.mark.parametrize("name", ["read_deadline", "write_deadline"])
def test_a_sync_handler_with_a_read_or_write_deadline_is_refused(name: str) -> None:
    class Sync(compat.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())

    setattr(Sync, name, 5.0)
    with (
        compat.TCPServer(LOCALHOST, Sync) as server,
        pytest.raises(ValueError, match=rf"^Sync\.{name} is set"),
    ):
        server.handle_request()


def test_a_full_threading_server_stops_accepting() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    class Held(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            started.release()
            release.wait(WAIT)
            self.wfile.write(b"done\n")

    server = compat.ThreadingTCPServer(LOCALHOST, Held)
    server.max_threads = 2
    with server, serving(server):
        clients = [client(server) for _ in range(2)]
        assert started.acquire(timeout=WAIT) and started.acquire(timeout=WAIT)
        clients.append(client(server))
        # Loopback completes the handshake before connect() returns: the third client is in
        # the backlog, and the server, full, has not taken it (the stdlib would start a thread).
        assert _accept_queue_length(server.server_address[1]) == 1
        assert server.statistics().accepted_requests == 2
        release.set()
        for sock in clients:
            with sock, sock.makefile("rb") as reader:
                assert reader.readline() == b"done\n"
    assert server.statistics().accepted_requests == 3


def test_shutdown_before_serve_forever_returns_and_the_next_serve_returns_at_once() -> None:
    with compat.TCPServer(LOCALHOST, Echo) as server:
        server.shutdown()  # the stdlib blocks here until some serve_forever() has run
        server.serve_forever()


# -- install(), the stdlib modules built on socketserver, the command line ----------------


def test_importing_compat_changes_nothing() -> None:
    run_python(
        """
        import sys
        import trio_socketserver.compat
        import socketserver
        assert socketserver.__name__ == "socketserver", socketserver
        assert "http.server" not in sys.modules
        """
    )


def test_install_runs_the_stdlib_servers_on_compat_with_stdlib_clients() -> None:
    run_python(
        """
        import threading
        from trio_socketserver import _server, compat
        compat.install()

        import http.client, http.server, logging, logging.config, socket, struct
        import urllib.request, wsgiref.simple_server, xmlrpc.client, xmlrpc.server
        import socketserver
        assert socketserver is compat

        def serving(server):
            thread = threading.Thread(target=server.serve_forever)
            thread.start()
            return thread

        def stop(server, thread):
            server.shutdown()
            thread.join(5)
            server.server_close()
            assert not thread.is_alive()

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        for cls in (http.server.HTTPServer, http.server.ThreadingHTTPServer):
            assert issubclass(cls, compat.TCPServer), cls.__mro__
            server = cls(("127.0.0.1", 0), Quiet)
            thread = serving(server)
            url = "http://127.0.0.1:%d/" % server.server_address[1]
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
            stop(server, thread)

        server = xmlrpc.server.SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False)
        assert isinstance(server, compat.TCPServer)
        server.register_function(pow)
        thread = serving(server)
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1:%d" % server.server_address[1])
        assert proxy.pow(2, 10) == 1024
        proxy("close")()
        stop(server, thread)

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"wsgi on compat"]

        class QuietWSGI(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args):
                pass

        server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=QuietWSGI)
        assert isinstance(server, compat.TCPServer)
        thread = serving(server)
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"wsgi on compat"
        conn.close()
        stop(server, thread)

        listener = logging.config.listen(0)
        assert issubclass(listener.rcvr, compat.ThreadingTCPServer)
        listener.start()
        listener.ready.wait(5)
        config = b'{"version": 1, "root": {"level": "WARNING"}, "disable_existing_loggers": false}'
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
            sock.sendall(struct.pack(">L", len(config)) + config)
        logging.config.stopListening()
        listener.join(5)
        assert not listener.is_alive()
        """
    )


def test_http_server_from_a_socket_made_elsewhere_under_install() -> None:
    # from_socket() runs HTTPServer.server_bind() (server_name, server_port) without binding
    # again; what socket activation needs from code built on the stdlib module.
    run_python(
        """
        import socket, threading
        from trio_socketserver import compat
        compat.install()
        import http.server, urllib.request

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = http.server.ThreadingHTTPServer.from_socket(sock, Quiet)
        assert server.server_port == sock.getsockname()[1]
        assert server.server_name
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        url = "http://127.0.0.1:%d/" % server.server_port
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        server.shutdown()
        thread.join(5)
        server.server_close()
        assert sock.fileno() == -1
        """
    )


def test_install_reloads_stdlib_modules_imported_before_it_and_uninstall_undoes_it() -> None:
    run_python(
        """
        import http.server, sys, xmlrpc.server
        import socketserver as stdlib
        from trio_socketserver import _server, compat

        del stdlib  # nothing but the stdlib's own dependents holds it now
        compat.install()
        compat.install()  # idempotent
        import socketserver
        assert socketserver is compat
        assert issubclass(http.server.HTTPServer, compat.TCPServer)
        assert issubclass(xmlrpc.server.SimpleXMLRPCServer, compat.TCPServer)
        assert http.server.ThreadingHTTPServer.daemon_threads

        compat.uninstall()
        compat.uninstall()
        import socketserver
        assert socketserver.__name__ == "socketserver"
        assert issubclass(http.server.HTTPServer, socketserver.TCPServer)
        assert not issubclass(http.server.HTTPServer, compat.BaseServer)
        del socketserver  # else install() refuses: __main__ would hold the stdlib module

        with compat.installed() as module:
            assert module is compat and sys.modules["socketserver"] is compat
        assert sys.modules["socketserver"].__name__ == "socketserver"
        """
    )


def test_install_refuses_when_stdlib_classes_are_held_elsewhere() -> None:
    result = run_python(
        """
        from http.server import HTTPServer  # bound here: a reload cannot reach it
        from trio_socketserver import _server, compat
        try:
            compat.install()
        except RuntimeError as exc:
            print(exc)
        else:
            raise AssertionError("install() kept the stdlib engine for __main__.HTTPServer")
        import socketserver
        assert socketserver.__name__ == "socketserver"  # nothing changed
        """
    )
    assert "__main__" in result.stdout
    assert "Call install() before importing them" in result.stdout


def test_http_command_line_serves_a_directory_on_the_trio_engine(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from compat\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "trio_socketserver.compat.http"]
    args = ["--bind", "127.0.0.1", "--directory", str(tmp_path), "0"]
    with subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...) ..."
            port = int(banner.split(" port ")[1].split()[0])
            url = f"http://127.0.0.1:{port}/hello.txt"
            with urllib.request.urlopen(url, timeout=WAIT) as response:
                assert response.read() == b"hello from compat\n"
            if os.path.exists(f"/proc/{process.pid}/fd"):
                # trio's loop owns an epoll instance; the stdlib's serve loop uses poll().
                fds = Path(f"/proc/{process.pid}/fd")
                links = [os.readlink(fd) for fd in fds.iterdir()]
                assert "anon_inode:[eventpoll]" in links
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=WAIT)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, err
    assert "Keyboard interrupt received, exiting." in out


def run_http_command_line(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "trio_socketserver.compat.http", *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_http_command_line_help_says_it_is_the_trio_one() -> None:
    with run_http_command_line("--help") as process:
        out, err = process.communicate(timeout=WAIT)
    assert process.returncode == 0, err
    assert out.startswith("usage: python -m trio_socketserver.compat.http [-h]")
    assert "server.py" not in out
    assert "running on trio-socketserver's trio engine" in out
    assert "--directory" in out  # the stdlib's options, all of them


@pytest.mark.skipif(sys.version_info < (3, 11), reason="http.server has --protocol from 3.11")
# ThreadingHTTPServer has daemon threads: at stop the engine shuts an idle keep-alive
# connection down and does not wait, without a warning (the stdlib is silent too).
def test_http_command_line_ctrl_c_with_an_idle_keep_alive_client(tmp_path: Path) -> None:
    import http.client

    (tmp_path / "hello.txt").write_text("hello\n")
    args = ["--bind", "127.0.0.1", "--directory", str(tmp_path), "--protocol", "HTTP/1.1", "0"]
    with run_http_command_line(*args) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...) ..."
            port = int(banner.split(" port ")[1].split()[0])
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            try:
                connection.request("GET", "/hello.txt")
                response = connection.getresponse()
                assert response.read() == b"hello\n"
                # HTTP/1.1: the connection stays open, its handler thread waits in a read.
                assert not response.will_close
                process.send_signal(signal.SIGINT)
                out, err = process.communicate(timeout=WAIT)
            finally:
                connection.close()
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, err
    assert "Keyboard interrupt received, exiting." in out
    # A keep-alive thread idle in a read, released at stop, is normal: nothing to warn about.
    assert "abandoning" not in err, err
    assert "Traceback" not in err, err


def test_compat_logs_through_the_project_logger(caplog: pytest.LogCaptureFixture) -> None:
    class Failing(stdlib_socketserver.BaseRequestHandler):
        def handle(self) -> None:
            raise ValueError("logged, not printed")

    with (
        caplog.at_level(logging.ERROR, logger="trio_socketserver"),
        compat.TCPServer(LOCALHOST, Failing) as server,
        client(server),
    ):
        server.handle_request()
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [str(e) for e in errors] == ["logged, not printed"]


@pytest.mark.parametrize("server_class", ["TCPServer", "ThreadingTCPServer"])
def test_handle_request_loop_serves_in_order_and_counts(server_class: str) -> None:
    """handle_request() in a loop (logging.config.listen's pattern) serves each client and
    keeps the statistics, including a refused and a failed request."""

    class Server(getattr(compat, server_class)):  # type: ignore[misc]
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return self.statistics().accepted_requests != 2  # refuse the second

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the third request's ValueError: counted, not logged

    class Picky(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if line == b"fail\n":
                raise ValueError("bad request")
            self.wfile.write(line)

    with Server(LOCALHOST, Picky) as server:
        replies = []
        for line in (b"one\n", b"refused\n", b"fail\n", b"four\n"):
            with client(server) as sock, sock.makefile("rb") as reader:
                sock.sendall(line)
                server.handle_request()
                replies.append(reader.readline())
        stats = server.statistics()
    assert replies == [b"one\n", b"", b"", b"four\n"]
    assert (stats.accepted_requests, stats.finished_requests, stats.failed_requests) == (4, 2, 1)


def test_handle_request_awaits_an_async_verify_request() -> None:
    seen: list[str] = []

    class Server(compat.TCPServer):
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            seen.append("verified")
            return True

    with Server(LOCALHOST, Echo) as server, client(server) as sock:
        sock.sendall(b"ping\n")
        sock.shutdown(socket.SHUT_WR)
        server.handle_request()
        assert sock.makefile("rb").read() == b"ping\n"
    assert seen == ["verified"]
