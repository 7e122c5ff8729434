# The engine's promises under faults and cancellation, over real sockets: one request's
# error never stops the server, shutdown() never waits for a thread the run waits for,
# `async with server` never blocks the loop, which hooks may be async, and users'
# subclasses cannot clobber the engine's state.
from __future__ import annotations

import inspect
import itertools
import logging
import socket
import socketserver as stdlib_socketserver
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import AsyncEcho, SyncEcho, connect, receive_all, receive_line, serving
from trio_socketserver import compat
from trio_socketserver._engine import ACCEPT_BATCH

pytestmark = pytest.mark.usefixtures("no_leaks")
LOCALHOST = ("127.0.0.1", 0)


async def echo(server: Any, line: bytes = b"ping\n") -> bytes:
    async with await connect(server) as client:
        await client.send_all(line)
        return await receive_line(client)


# -- one request's failure stays with that request ----------------------------------------


@pytest.mark.parametrize("handler", [AsyncEcho, SyncEcho])
@pytest.mark.parametrize("hook", ["shutdown_request", "close_request"])
async def test_an_error_ending_one_request_goes_to_handle_error(handler: Any, hook: str) -> None:
    reported: list[BaseException] = []
    calls = 0

    class Server(ts.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            reported.append(sys.exc_info()[1])  # type: ignore[arg-type]

    def failing_once(self: Any, request: Any) -> None:
        nonlocal calls
        calls += 1
        request.close()
        if calls == 1:
            raise ValueError("cleanup failed")

    setattr(Server, hook, failing_once)
    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, handler)) as server:
            assert await echo(server) == b"ping\n"
            assert await echo(server, b"still serving\n") == b"still serving\n"
    assert [type(e) for e in reported] == [ValueError]
    assert server.statistics().failed_requests == 1


async def test_system_exit_in_a_threading_handler_ends_only_that_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hooked: list[type[BaseException]] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args.exc_type))

    class Exiting(ts.BaseRequestHandler):
        def handle(self) -> None:
            if self.request.recv(10) == b"exit":
                sys.exit(3)
            self.request.sendall(b"alive\n")

    with trio.fail_after(5):
        async with serving(ts.ThreadingTCPServer(LOCALHOST, Exiting)) as server:
            async with await connect(server) as client:
                await client.send_all(b"exit")
                assert await receive_all(client) == b""
            assert await echo(server, b"x") == b"alive\n"
    assert hooked == [SystemExit]  # as the stdlib's thread would report it


async def test_peer_errors_in_a_handler_nursery_are_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="trio_socketserver")

    class TwoReaders(ts.BaseRequestHandler):
        async def handle(self) -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(self.fail)

        async def fail(self) -> None:
            raise ConnectionResetError("peer went away")

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, TwoReaders)) as server,
            await connect(server) as client,
        ):
            assert await receive_all(client) == b""
    [record] = [r for r in caplog.records if r.name == "trio_socketserver"]
    assert (record.levelname, record.exc_info) == ("INFO", None)


# -- shutdown() never waits for a thread the run waits for --------------------------------


class StopsFromAWorkerThread(ts.BaseRequestHandler):
    async def handle(self) -> None:
        await trio.to_thread.run_sync(self.server.shutdown)


class StopsThroughFromThread(ts.BaseRequestHandler):
    def handle(self) -> None:
        trio.from_thread.run_sync(self.server.shutdown)


@pytest.mark.parametrize(
    ("server_class", "handler"),
    [
        (ts.TCPServer, StopsFromAWorkerThread),  # an async handler's trio.to_thread
        (ts.ThreadingTCPServer, StopsFromAWorkerThread),
        (ts.ThreadingTCPServer, StopsThroughFromThread),  # a sync handler's thread
    ],
)
async def test_shutdown_from_a_thread_of_the_run_does_not_deadlock(
    server_class: Any, handler: Any
) -> None:
    with trio.fail_after(5):
        server = server_class(LOCALHOST, handler)
        async with server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                assert await receive_all(client) == b""
        # serve_forever returned: the nursery could exit.
        assert not server.statistics().serving


# -- async with server: never blocks the loop ----------------------------------------------


async def test_async_close_waits_for_abandoned_threads_without_blocking_the_loop() -> None:
    release = threading.Event()
    entered = trio.Event()
    token = trio.lowlevel.current_trio_token()

    class Stuck(ts.BaseRequestHandler):
        def handle(self) -> None:
            token.run_sync_soon(entered.set)
            release.wait(5)  # not on the socket: shutting the connection down cannot free it

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            outer.start_soon(ticker)
            server = ts.ThreadingTCPServer(LOCALHOST, Stuck)
            server.shutdown_grace = 0.5  # also bounds how long closing waits for the thread
            async with server:
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve_forever)
                    client = await connect(server)
                    await entered.wait()
                    server.shutdown()  # cut after the grace, abandoned 1 s later
                before = ticks
                threading.Timer(0.2, release.set).start()
            # __aexit__ awaited the abandoned thread (block_on_close) while the loop ran.
            assert ticks > before
            assert not any(t.name.startswith("trio_socketserver") for t in threading.enumerate())
            outer.cancel_scope.cancel()
        await client.aclose()


# -- which hooks may be async ---------------------------------------------------------------


@pytest.mark.parametrize("hook", ["finish_request", "handle_error", "shutdown_request"])
async def test_async_hook_on_a_sync_handlers_thread_is_a_type_error(hook: str) -> None:
    async def async_hook(self: Any, *args: Any) -> None:
        pass

    Server = type("Server", (ts.TCPServer,), {hook: async_hook})
    async with Server(LOCALHOST, SyncEcho) as server:
        with pytest.raises(TypeError, match=rf"Server\.{hook}\(\) is async.*plain def"):
            await server.serve_forever()


@pytest.mark.parametrize("hook", ["server_bind", "server_activate"])
def test_async_constructor_hook_is_a_type_error(hook: str) -> None:
    async def async_hook(self: Any) -> None:
        pass

    Server = type("Server", (ts.TCPServer,), {hook: async_hook})
    with pytest.raises(TypeError, match=rf"Server\.{hook}\(\) is async"):
        Server(LOCALHOST, AsyncEcho)


async def test_async_hooks_with_an_async_handler_are_awaited() -> None:
    seen: list[str] = []

    class Server(ts.TCPServer):
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            seen.append("verify")
            return True

        async def shutdown_request(self, request: Any) -> None:
            seen.append("shutdown_request")
            request.close()

    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, AsyncEcho)) as server:
            assert await echo(server) == b"ping\n"
            await trio.testing.wait_all_tasks_blocked()
    assert seen == ["verify", "shutdown_request"]


# -- users' subclasses own their namespace --------------------------------------------------

SERVER_CLASSES = [
    ts.TCPServer,
    ts.UDPServer,
    ts.UnixStreamServer,
    ts.UnixDatagramServer,
    ts.ThreadingTCPServer,
    ts.ForkingTCPServer,
    compat.TCPServer,
    compat.ThreadingTCPServer,
]


def _own_private_names(cls: type) -> set[str]:
    """Single-underscore names a class has that the stdlib's socketserver classes lack."""
    stdlib_names = set()
    for name in stdlib_socketserver.__all__:
        stdlib_names |= set(dir(getattr(stdlib_socketserver, name)))
    return {
        n for n in dir(cls) if n.startswith("_") and not n.startswith("__") and "__" not in n[1:]
    } - stdlib_names


@pytest.mark.parametrize("cls", SERVER_CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_server_classes_add_no_single_underscore_names(cls: type) -> None:
    # Anything beyond the stdlib's names is public API or name-mangled, so a subclass's own
    # `_run`, `_closed` or `_workers` (and those of http.server, xmlrpc.server, wsgiref,
    # werkzeug, ...) cannot shadow the engine's.
    assert _own_private_names(cls) == set()


async def test_a_subclass_with_its_own_private_names_still_serves() -> None:
    class Mine(ts.ThreadingTCPServer):
        def __init__(self, *args: Any) -> None:
            self._run = "mine"
            self._closed = "mine"
            self._workers = "mine"
            self._lock = "mine"
            self._requests = "mine"
            super().__init__(*args)

        def _handle(self) -> None:
            raise AssertionError("the engine must not call a subclass's _handle")

    with trio.fail_after(5):
        async with serving(Mine(LOCALHOST, SyncEcho)) as server:
            assert await echo(server) == b"ping\n"
    assert (server._run, server._closed, server._workers) == ("mine", "mine", "mine")


# -- smaller promises -------------------------------------------------------------------------


async def test_serve_forever_leaves_the_socket_blocking_mode_as_found() -> None:
    async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
        server.socket.settimeout(7.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            server.shutdown()
        assert server.socket.gettimeout() == 7.0


def test_tls_https_compatible_defaults_to_trios_false() -> None:
    assert ts.TCPServer.https_compatible is False


async def test_native_threading_server_honours_process_request_thread() -> None:
    wrapped: list[Any] = []

    class Server(ts.ThreadingTCPServer):
        def process_request_thread(self, request: Any, client_address: Any) -> None:
            wrapped.append(client_address)
            super().process_request_thread(request, client_address)

    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, SyncEcho)) as server:
            assert await echo(server) == b"ping\n"
    assert len(wrapped) == 1


@pytest.mark.parametrize("module", [stdlib_socketserver, compat], ids=["stdlib", "compat"])
def test_a_closed_server_serves_again_on_a_socket_assigned_to_it(module: Any) -> None:
    """A dev server's reloader: bind_and_activate=False, server_close() drops the placeholder
    socket, an inherited listening socket is assigned to server.socket, then it serves."""

    class Echo(stdlib_socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())

    inherited = socket.create_server(("127.0.0.1", 0))
    server = module.TCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
    server.server_close()
    server.socket = inherited
    server.server_address = inherited.getsockname()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    try:
        with socket.create_connection(server.server_address, timeout=5) as client:
            client.sendall(b"again\n")
            assert client.makefile("rb").readline() == b"again\n"
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()


@pytest.mark.parametrize("module", ["socketserver", "trio_socketserver.compat"])
def test_a_plain_server_on_a_daemon_thread_lets_the_process_exit(module: str) -> None:
    """The stdlib runs a plain server's handler on the serving (daemon) thread, so the
    process can exit while a request is stuck; so must compat."""
    program = textwrap.dedent(
        f"""
        import socket, threading, time
        import {module} as socketserver

        entered = threading.Event()

        class Stuck(socketserver.BaseRequestHandler):
            def handle(self):
                entered.set()
                time.sleep(60)

        server = socketserver.TCPServer(("127.0.0.1", 0), Stuck)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = socket.create_connection(server.server_address)
        assert entered.wait(5)
        print("exiting", flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "exiting\n"


def test_every_hook_named_in_the_async_rule_exists() -> None:
    from trio_socketserver._engine import SYNC_REQUEST_HOOKS

    for name in SYNC_REQUEST_HOOKS:
        assert inspect.isfunction(getattr(ts.ThreadingTCPServer, name)), name


async def test_access_log_is_one_line_per_request_once_enabled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    access = logging.getLogger("trio_socketserver.access")
    caplog.set_level(logging.INFO)
    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, AsyncEcho)) as server:
            assert await echo(server) == b"ping\n"  # root at INFO: still silent
            await trio.testing.wait_all_tasks_blocked()  # that request has ended
            access.setLevel(logging.INFO)
            try:
                assert await echo(server, b"logged\n") == b"logged\n"
                await trio.testing.wait_all_tasks_blocked()
            finally:
                access.setLevel(logging.NOTSET)
    [line] = [r.getMessage() for r in caplog.records if r.name == access.name]
    assert " finished in " in line
    assert line.endswith("7 bytes in, 7 bytes out")


async def test_process_request_outside_the_serve_loop_is_a_clear_error() -> None:
    # The capacity place of a request belongs to the task that admitted it: a handler (or
    # any other task) calling process_request() has none to hand over.
    errors: list[BaseException] = []

    class Reentrant(ts.StreamRequestHandler):
        async def handle(self) -> None:
            try:
                self.server.process_request(self.request, self.client_address)
            except RuntimeError as error:
                errors.append(error)
            await self.wfile.write(b"done\n")

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Reentrant)) as server:
            async with await connect(server) as client:
                assert await receive_line(client) == b"done\n"
            with pytest.raises(RuntimeError, match="only when the serve loop calls it"):
                server.process_request(None, None)
    assert [str(e) for e in errors] == [
        "process_request() starts a request only when the serve loop calls it"
    ]


async def test_a_burst_of_clients_does_not_starve_other_tasks() -> None:
    # Clients already queued in the backlog are accepted several at a time, without a trip
    # through the scheduler each, but other tasks still run while the burst is taken.
    burst = 3 * ACCEPT_BATCH
    seen: list[int] = []
    async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
        server.shutdown_grace = 0
        clients = [socket.create_connection(server.server_address) for _ in range(burst)]
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                while (accepted := server.statistics().accepted_requests) < burst:
                    seen.append(accepted)
                    await trio.lowlevel.checkpoint()
                server.shutdown()
        finally:
            for client in clients:
                client.close()
    assert any(0 < accepted < burst for accepted in seen), seen
    # Between two turns of this task, at most two of the loop's: trio runs the tasks that are
    # ready together in either order.
    most = 2 * ACCEPT_BATCH
    assert all(later - earlier <= most for earlier, later in itertools.pairwise(seen)), seen
