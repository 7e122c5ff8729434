# Sync handlers and threads: a plain `def handle` on a plain server (one request at a time on
# a worker thread, the trio loop free), ThreadingMixIn (a thread per request, max_threads,
# daemon_threads, block_on_close), and shutdown() from other threads and from inside
# handlers, with threads blocked in socket I/O released at the end of the grace.
from __future__ import annotations

import io
import logging
import socket
import threading
import time
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

import trio_socketserver as ts
from conftest import (
    SyncEcho,
    ThreadSignal,
    assert_third_client_waits_in_backlog,
    connect,
    in_thread,
    receive_all,
    receive_line,
    runs_handler_code,
    serving,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
# Every wait in a handler thread is bounded: a broken engine fails the test, never hangs it.
THREAD_WAIT = 5.0
# Under a MockClock, how long (real seconds) every task may stay blocked before the test
# counts as hung: far above a thread's wake-up latency, far below the test's budget.
HANG_THRESHOLD = 2.0


@pytest.fixture
def stepped_clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """A MockClock the test moves with jump(); if every task stays blocked for
    HANG_THRESHOLD real seconds (a hang), it jumps by itself, so fail_after() still fires.
    """
    mock_clock.autojump_threshold = HANG_THRESHOLD
    return mock_clock


def handler_threads() -> list[threading.Thread]:
    """Threads running handler code, once those whose request just returned got trio's name
    back (trio renames a worker thread a moment after its job returns)."""
    deadline = time.monotonic() + THREAD_WAIT
    while True:
        running = [t for t in threading.enumerate() if runs_handler_code(t)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.001)


class Held:
    """Holds sync handlers in handle() until released, and counts those that got there."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.entered = 0
        self.returned = 0
        self.threads: list[threading.Thread] = []
        self._changed = ThreadSignal()

    def hold(self) -> None:
        """Called in a handler thread."""
        with self.lock:
            self.entered += 1
            self.threads.append(threading.current_thread())
        self._changed.set()
        assert self.release.wait(THREAD_WAIT), "the test never released the handler"
        with self.lock:
            self.returned += 1

    async def wait_entered(self, n: int) -> None:
        while self.entered < n:
            await self._changed.wait()
            self._changed = ThreadSignal()


def held_handler(held: Held) -> type[ts.StreamRequestHandler]:
    class HeldHandler(ts.StreamRequestHandler):
        def handle(self) -> None:
            name = self.rfile.readline()
            held.hold()
            self.wfile.write(b"served " + name)

    return HeldHandler


async def shut_down_with_a_request_held(
    server: ts.TCPServer, held: Held, nursery: trio.Nursery
) -> trio.SocketStream:
    """Start ``server`` in ``nursery``, let ``held`` hold one client's request in handle(),
    and shut down; returns the client once every task waits (the grace is running)."""
    await nursery.start(server.serve_forever)
    client = await connect(server)
    await client.send_all(b"x\n")
    await held.wait_entered(1)
    server.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    return client


# -- a sync handler on a plain server ---------------------------------------------------------


async def test_sync_handler_gets_stdlib_objects_on_a_worker_thread() -> None:
    seen: dict[str, Any] = {}

    class Inspect(ts.StreamRequestHandler):
        def handle(self) -> None:
            seen.update(
                thread=threading.current_thread(),
                request=self.request,
                timeout=self.request.gettimeout(),
                rfile=self.rfile,
                client_address=self.client_address,
            )
            self.wfile.write(self.rfile.readline().upper())

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Inspect)) as server,
            await connect(server) as client,
        ):
            await client.send_all(b"hi\n")
            assert await receive_line(client) == b"HI\n"
            client_address = client.socket.getsockname()
    assert seen["thread"] is not threading.main_thread()
    assert type(seen["request"]) is socket.socket
    assert seen["timeout"] is None  # blocking, as stdlib handlers expect
    assert isinstance(seen["rfile"], io.BufferedReader)
    assert seen["client_address"] == client_address


async def test_stdlib_client_against_a_sync_handler() -> None:
    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, SyncEcho)) as server:

            def client() -> bytes:
                with socket.create_connection(server.server_address, timeout=5) as sock:
                    sock.sendall(b"stdlib\n")
                    return sock.makefile("rb").readline()

            assert await in_thread(client) == b"stdlib\n"


async def test_plain_server_runs_one_sync_request_at_a_time_without_blocking_trio() -> None:
    held = Held()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, held_handler(held))) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                first, second = await connect(server), await connect(server)
                await first.send_all(b"1\n")
                await second.send_all(b"2\n")
                await held.wait_entered(1)
                # The trio loop keeps running while the handler thread is blocked ...
                before = ticks
                for _ in range(10):
                    await trio.lowlevel.checkpoint()
                assert ticks > before
                # ... and the second client waits in the backlog, not accepted.
                assert server.statistics().accepted_requests == 1
                held.release.set()
                assert await receive_line(first) == b"served 1\n"
                assert await receive_line(second) == b"served 2\n"
                nursery.cancel_scope.cancel()
            await first.aclose()
            await second.aclose()
    assert held.entered == 2


@pytest.mark.parametrize("server_class", [ts.TCPServer, ts.ThreadingTCPServer])
async def test_sync_handler_error_goes_to_handle_error(
    server_class: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(ts.StreamRequestHandler):
        def handle(self) -> None:
            if self.rfile.readline() == b"fail\n":
                raise ZeroDivisionError("sync handler bug")
            self.wfile.write(b"ok\n")

    with trio.fail_after(5):
        async with serving(server_class(LOCALHOST, Failing)) as server:
            async with await connect(server) as client:
                await client.send_all(b"fail\n")
                assert await receive_all(client) == b""
            async with await connect(server) as client:
                await client.send_all(b"fine\n")
                assert await receive_line(client) == b"ok\n"
    [record] = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


async def test_sync_handle_error_that_raises_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Server(ts.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            raise RuntimeError("handle_error bug")

    class Failing(ts.BaseRequestHandler):
        def handle(self) -> None:
            raise ValueError("handler bug")

    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, Failing)) as server:
            for _ in range(2):
                async with await connect(server) as client:
                    assert await receive_all(client) == b""
    raised = [r for r in caplog.records if "handle_error() raised" in r.getMessage()]
    assert len(raised) == 2


async def test_handle_request_with_a_sync_handler() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, SyncEcho) as server, await connect(server) as client:
            await client.send_all(b"once\n")
            await client.send_eof()
            await server.handle_request()
            # It returned once the request was done, and took its thread with it.
            assert await receive_all(client) == b"once\n"
            assert not handler_threads()


async def test_client_sees_eof_even_if_a_sync_handler_keeps_a_file_open() -> None:
    kept: list[Any] = []

    class Leaky(ts.BaseRequestHandler):
        def handle(self) -> None:
            # An unclosed makefile() keeps the socket's fd open after close(): only the
            # server's shutdown(SHUT_WR) tells the client that the reply is complete.
            kept.append(self.request.makefile("rb"))
            self.request.sendall(b"reply\n")

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Leaky)) as server,
            await connect(server) as client,
        ):
            assert await receive_all(client) == b"reply\n"
    for file in kept:
        file.close()


async def test_sync_handler_timeout_bounds_a_silent_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")

    class Timed(SyncEcho):
        timeout = 0.2  # real seconds: the stdlib socket timeout

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Timed)) as server,
            await connect(server) as silent,
        ):
            assert await receive_all(silent) == b""  # hung up on after the timeout
    assert "timed out" in caplog.text


async def test_async_handler_on_a_threading_server_runs_as_a_task() -> None:
    threads: list[threading.Thread] = []

    class Async(ts.BaseRequestHandler):
        async def handle(self) -> None:
            threads.append(threading.current_thread())

    with trio.fail_after(5):
        async with (
            serving(ts.ThreadingTCPServer(LOCALHOST, Async)) as server,
            await connect(server) as client,
        ):
            assert await receive_all(client) == b""
    assert threads == [threading.current_thread()]


# -- ThreadingMixIn ------------------------------------------------------------------------


async def test_threading_server_runs_sync_requests_concurrently() -> None:
    clients = 3
    # Each handler waits for all the others: only concurrent handlers get past it.
    barrier = threading.Barrier(clients, timeout=THREAD_WAIT)

    class Meet(ts.StreamRequestHandler):
        def handle(self) -> None:
            name = self.rfile.readline()
            barrier.wait()
            self.wfile.write(b"met " + name)

    with trio.fail_after(5):
        async with serving(ts.ThreadingTCPServer(LOCALHOST, Meet)) as server:
            streams = [await connect(server) for _ in range(clients)]
            for i, stream in enumerate(streams):
                await stream.send_all(b"%d\n" % i)
            for i, stream in enumerate(streams):
                assert await receive_line(stream) == b"met %d\n" % i
                await stream.aclose()
    assert not handler_threads()


async def test_max_threads_bounds_concurrent_sync_requests() -> None:
    held = Held()

    class Server(ts.ThreadingTCPServer):
        max_threads = 2

    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, held_handler(held))) as server:
            await assert_third_client_waits_in_backlog(server, held)


@pytest.mark.parametrize("threading_server", [False, True])
async def test_sync_handlers_reach_the_trio_side_with_from_thread(threading_server: bool) -> None:
    """Sync handlers run on trio's worker threads: trio.from_thread works in them."""
    lock = trio.Lock()  # an async resource of the application
    log: list[bytes] = []

    async def record(line: bytes) -> None:
        async with lock:
            log.append(line)

    class Post(ts.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            trio.from_thread.check_cancelled()  # not cancelled: returns
            trio.from_thread.run(record, line)
            self.wfile.write(b"%d\n" % trio.from_thread.run_sync(len, log))

    server_class = ts.ThreadingTCPServer if threading_server else ts.TCPServer
    with trio.fail_after(5):
        async with serving(server_class(LOCALHOST, Post)) as server, await connect(server) as c:
            await c.send_all(b"hello\n")
            assert await receive_line(c) == b"1\n"
    assert log == [b"hello\n"]


async def test_daemon_threads_are_not_waited_for(stepped_clock: trio.testing.MockClock) -> None:
    held = Held()

    class Server(ts.ThreadingTCPServer):
        daemon_threads = True
        shutdown_grace = 1.0

    with trio.fail_after(60):  # virtual seconds
        async with Server(LOCALHOST, held_handler(held)) as server:
            async with trio.open_nursery() as nursery:
                client = await shut_down_with_a_request_held(server, held, nursery)
                stepped_clock.jump(1.0)  # the grace expires; nothing waits for the thread
            # serve_forever returned while the daemon thread is still in handle().
            [thread] = held.threads
            assert thread.is_alive() and thread.daemon
            server.server_close()  # daemon threads are not joined either
            assert thread.is_alive()
            held.release.set()
            thread.join(THREAD_WAIT)
            await client.aclose()


@pytest.mark.parametrize("block_on_close", [True, False])
async def test_block_on_close_joins_threads_a_shutdown_abandoned(
    stepped_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, block_on_close: bool
) -> None:
    held = Held()
    closing = threading.Event()

    class Server(ts.ThreadingTCPServer):
        shutdown_grace = 5.0  # also bounds server_close()'s join, in real seconds

        def server_close(self) -> None:
            closing.set()
            super().server_close()

    def release_once_closing() -> None:
        if closing.wait(THREAD_WAIT):
            held.release.set()

    Server.block_on_close = block_on_close
    with trio.fail_after(60):  # virtual seconds
        server = Server(LOCALHOST, held_handler(held))
        async with trio.open_nursery() as nursery:
            client = await shut_down_with_a_request_held(server, held, nursery)
            stepped_clock.jump(5.0)  # grace over: the connection is shut down, the thread
            await trio.testing.wait_all_tasks_blocked()  # ignores that (it is not in I/O)
            stepped_clock.jump(1.0)  # and after the release timeout it is abandoned
        assert "abandoning" in caplog.text
        [thread] = held.threads
        assert runs_handler_code(thread)
        if block_on_close:
            releaser = threading.Thread(target=release_once_closing)
            releaser.start()
            server.server_close()
            assert held.returned == 1  # server_close() waited for the handler
            releaser.join(THREAD_WAIT)
        else:
            server.server_close()
            assert runs_handler_code(thread)
            held.release.set()
        await client.aclose()


# -- shutdown from everywhere ---------------------------------------------------------------


async def test_shutdown_from_another_thread_returns_once_serve_forever_returned() -> None:
    in_handle = trio.Event()
    finished: list[str] = []

    class Waiting(ts.StreamRequestHandler):
        async def handle(self) -> None:
            in_handle.set()
            await self.rfile.readline()

        async def finish(self) -> None:
            finished.append("finish")
            await super().finish()

    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, Waiting) as server:
            server.shutdown_grace = 0
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                async with await connect(server) as client:
                    await in_handle.wait()

                    def stop() -> tuple[ts.ServerStatistics, list[str]]:
                        server.shutdown()
                        return server.statistics(), list(finished)

                    stats, finished_then = await in_thread(stop)
                    assert not stats.serving
                    assert (stats.active_requests, stats.cancelled_requests) == (0, 1)
                    assert finished_then == ["finish"]
                    assert await receive_all(client) == b""


async def test_shutdown_from_another_thread_without_serve_forever_returns() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, SyncEcho) as server:
            await in_thread(server.shutdown)
            await server.serve_forever()  # the pending shutdown makes it return at once


@pytest.mark.parametrize("server_class", [ts.TCPServer, ts.ThreadingTCPServer])
async def test_shutdown_from_inside_a_sync_handler(server_class: Any) -> None:
    class Stopper(ts.StreamRequestHandler):
        def handle(self) -> None:
            self.server.shutdown()  # must not wait for serve_forever: it waits for us
            self.wfile.write(b"bye\n")

    with trio.fail_after(5):
        async with server_class(LOCALHOST, Stopper) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                async with await connect(server) as client:
                    assert await receive_line(client) == b"bye\n"
            assert server.statistics().finished_requests == 1
    assert not handler_threads()


async def test_server_close_from_another_thread_while_serving() -> None:
    with trio.fail_after(5):
        server = ts.ThreadingTCPServer(LOCALHOST, SyncEcho)
        server.shutdown_grace = 0.1  # the echo handler waits for its client until cut
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                await client.send_all(b"x\n")
                assert await receive_line(client) == b"x\n"

                def close() -> bool:
                    server.server_close()  # shuts down first, as documented
                    return server.statistics().serving

                assert await in_thread(close) is False
                assert await receive_all(client) == b""
        assert server.socket.fileno() == -1


@pytest.mark.parametrize("server_class", [ts.TCPServer, ts.ThreadingTCPServer])
async def test_sync_handler_blocked_in_recv_is_released_at_grace_expiry(
    server_class: Any, stepped_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    read: list[bytes] = []
    reading = ThreadSignal()

    class Blocked(ts.StreamRequestHandler):
        def handle(self) -> None:
            reading.set()
            read.append(self.rfile.readline())  # the client never sends

    with trio.fail_after(60):  # virtual seconds
        async with server_class(LOCALHOST, Blocked) as server:
            server.shutdown_grace = 2.0
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await reading.wait()
                server.shutdown()
                await trio.testing.wait_all_tasks_blocked()
                assert read == []  # the grace is running: the thread is still in recv
                stepped_clock.jump(2.0)
            # The connection was shut down under the thread: recv returned EOF, the
            # handler ended, and nobody had to be abandoned.
            assert read == [b""]
            assert server.statistics().cancelled_requests == 1
            assert await receive_all(client) == b""
            await client.aclose()
    assert "abandoning" not in caplog.text
    assert not handler_threads()


@pytest.mark.parametrize("server_class", [ts.TCPServer, ts.ThreadingTCPServer])
async def test_hard_stop_releases_sync_handlers_at_once(
    server_class: Any, caplog: pytest.LogCaptureFixture
) -> None:
    reading = ThreadSignal()

    class Blocked(ts.StreamRequestHandler):
        def handle(self) -> None:
            reading.set()
            self.rfile.readline()

    caplog.set_level(logging.WARNING)
    with trio.fail_after(5):
        async with server_class(LOCALHOST, Blocked) as server:
            server.shutdown_grace = 30
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await reading.wait()
                nursery.cancel_scope.cancel()
            assert await receive_all(client) == b""
            await client.aclose()
    assert "abandoning" not in caplog.text
    assert not handler_threads()


async def test_shutdown_from_another_thread_with_threads_in_flight() -> None:
    held = Held()

    with trio.fail_after(5):
        async with ts.ThreadingTCPServer(LOCALHOST, held_handler(held)) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                streams = [await connect(server) for _ in range(2)]
                for stream in streams:
                    await stream.send_all(b"x\n")
                await held.wait_entered(2)

                def stop() -> int:
                    # Let the handlers finish once shutdown() has asked for the stop.
                    threading.Thread(target=held.release.set).start()
                    server.shutdown()
                    return len(handler_threads())

                # shutdown() returned only after serve_forever, so every thread is gone.
                assert await in_thread(stop) == 0
            for stream in streams:
                assert await receive_line(stream) == b"served x\n"
                await stream.aclose()
