# BaseServer as a user drives it: serve_forever()/handle_request(), the stdlib's hooks (sync
# and async overrides) and their order, error reporting, shutdown and hard stop, the
# connection limit, running out of fds in accept, and statistics(). Async handlers only;
# sync handlers and threads are in test_threading.py.
from __future__ import annotations

import errno
import inspect
import itertools
import logging
import math
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import (
    AsyncEcho,
    assert_third_client_waits_in_backlog,
    connect,
    receive_all,
    receive_line,
    serving,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
LOGGER_NAME = "trio_socketserver"


async def echo_once(server: ts.TCPServer, data: bytes = b"ping\n") -> bytes:
    async with await connect(server) as client:
        await client.send_all(data)
        return await receive_line(client)


class Gate:
    """Lets a test hold handlers inside handle() and count how many got there."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = trio.Event()
        self._entered_changed = trio.Event()

    async def pass_through(self) -> None:
        self.entered += 1
        self._entered_changed.set()
        await self.release.wait()

    async def wait_entered(self, n: int) -> None:
        while self.entered < n:
            self._entered_changed = trio.Event()
            await self._entered_changed.wait()


def hook(body: Callable[..., Any], *, is_async: bool) -> Callable[..., Any]:
    """``body`` as a server hook: itself, or an ``async def`` that checkpoints, then does what
    ``body`` does, awaiting what it returns (as the engine awaits what a sync hook returns)."""
    if not is_async:
        return body

    async def async_body(*args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        result = body(*args)
        return await result if inspect.isawaitable(result) else result

    return async_body


def gated_handler(gate: Gate, reply: bytes = b"done\n") -> type[ts.StreamRequestHandler]:
    class Gated(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await gate.pass_through()
            await self.wfile.write(reply)

    return Gated


# -- serve_forever ------------------------------------------------------------------------


async def test_serve_forever_reports_started_once_accepting() -> None:
    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, AsyncEcho)
        assert not server.statistics().serving
        async with serving(server):
            assert server.statistics().serving
            assert await echo_once(server) == b"ping\n"
        assert not server.statistics().serving


async def test_serve_forever_twice_at_once_is_a_clear_error() -> None:
    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, AsyncEcho)) as server:
            with pytest.raises(RuntimeError, match=r"already running.*shutdown\(\)"):
                await server.serve_forever()
            assert await echo_once(server) == b"ping\n"  # the first one is unharmed


async def test_handle_request_while_serving_is_an_error() -> None:
    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, AsyncEcho)) as server:
            with pytest.raises(RuntimeError, match="already running"):
                await server.handle_request()


async def test_serve_forever_after_server_close_is_an_error() -> None:
    server = ts.TCPServer(LOCALHOST, AsyncEcho)
    server.server_close()
    with pytest.raises(RuntimeError, match="closed"):
        await server.serve_forever()
    with pytest.raises(RuntimeError, match="closed"):
        await server.handle_request()


async def test_shutdown_before_serve_forever_makes_it_return_at_once() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
            server.shutdown()
            await server.serve_forever()
            # The request was used up: the next serve_forever() serves normally.
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                assert await echo_once(server) == b"ping\n"
                server.shutdown()


async def test_serve_forever_can_run_again_after_shutdown() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
            for _ in range(2):
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve_forever)
                    assert await echo_once(server) == b"ping\n"
                    server.shutdown()


async def test_handle_request_serves_exactly_one_request() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
            first, second = await connect(server), await connect(server)
            async with first, second:
                await first.send_all(b"one\n")
                await second.send_all(b"two\n")
                await first.send_eof()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.handle_request)
                    assert await receive_line(first) == b"one\n"
                # handle_request() returned: the second client is still in the backlog.
                assert server.statistics().accepted_requests == 1
                await second.send_eof()
                await server.handle_request()
                assert await receive_line(second) == b"two\n"
                assert server.statistics().accepted_requests == 2


@pytest.mark.parametrize("is_async", [False, True])
async def test_handle_request_timeout_calls_handle_timeout(
    autojump_clock: trio.testing.MockClock, is_async: bool
) -> None:
    calls: list[float] = []

    class Server(ts.TCPServer):
        timeout = 3.0
        handle_timeout = hook(lambda self: calls.append(trio.current_time()), is_async=is_async)

    with trio.fail_after(60):
        async with Server(LOCALHOST, AsyncEcho) as server:
            start = trio.current_time()
            await server.handle_request()
            assert calls == [start + 3.0]
            # Within the timeout it serves instead.
            async with await connect(server) as client:
                await client.send_all(b"x\n")
                await client.send_eof()
                await server.handle_request()
                assert await receive_line(client) == b"x\n"
            assert len(calls) == 1


@pytest.mark.parametrize("is_async", [False, True])
async def test_service_actions_runs_every_poll_interval_and_after_requests(
    autojump_clock: trio.testing.MockClock, is_async: bool
) -> None:
    calls: list[float] = []

    class Server(ts.TCPServer):
        service_actions = hook(lambda self: calls.append(trio.current_time()), is_async=is_async)

    with trio.fail_after(60):
        async with Server(LOCALHOST, AsyncEcho) as server, trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(server.serve_forever, 0.5)
            await trio.sleep(2.25)
            # Every 0.5 s: at 0.5, 1.0, 1.5 and 2.0.
            assert [t - start for t in calls] == pytest.approx([0.5, 1.0, 1.5, 2.0])
            assert await echo_once(server) == b"ping\n"
            await trio.testing.wait_all_tasks_blocked()
            # One more, right after the request was dispatched (no time passed).
            assert len(calls) == 5 and calls[-1] == pytest.approx(start + 2.25)
            server.shutdown()


async def test_shutdown_never_waits_for_the_poll_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever, 1000)
            start = trio.current_time()
            server.shutdown()
        assert trio.current_time() == start


async def test_shutting_down_one_server_leaves_another_serving() -> None:
    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, AsyncEcho)) as other,
            ts.TCPServer(LOCALHOST, AsyncEcho) as server,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                server.shutdown()
            assert not server.statistics().serving
            assert await echo_once(other) == b"ping\n"


async def test_server_close_while_serving_stops_it() -> None:
    with trio.fail_after(5):
        server = ts.TCPServer(LOCALHOST, AsyncEcho)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            assert await echo_once(server) == b"ping\n"
            server.server_close()
        assert server.socket.fileno() == -1
        assert not server.statistics().serving


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_system_exit_in_a_handler_propagates(is_async: bool) -> None:
    class AsyncExit(ts.BaseRequestHandler):
        async def handle(self) -> None:
            raise SystemExit(3)

    class SyncExit(ts.BaseRequestHandler):
        def handle(self) -> None:
            raise SystemExit(3)

    # As in the stdlib, it is not handle_error()'s business: it stops the server.
    with trio.fail_after(5), pytest.RaisesGroup(SystemExit, flatten_subgroups=True):
        async with (
            ts.TCPServer(LOCALHOST, AsyncExit if is_async else SyncExit) as server,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                await receive_all(client)
    assert server.socket.fileno() == -1


# -- hooks ------------------------------------------------------------------------------


def recording_server(log: list[str], *, is_async: bool) -> type[ts.TCPServer]:
    """A TCPServer whose every hook records its name, then does what the default does."""

    def recorded(body: Callable[..., Any]) -> Callable[..., Any]:
        return hook(body, is_async=is_async)

    class Recording(ts.TCPServer):
        @recorded
        def get_request(self) -> Any:
            request = super().get_request()
            log.append("get_request")
            return request

        @recorded
        def verify_request(self, request: Any, client_address: Any) -> bool:
            log.append("verify_request")
            return super().verify_request(request, client_address)

        @recorded
        def process_request(self, request: Any, client_address: Any) -> None:
            log.append("process_request")
            super().process_request(request, client_address)

        @recorded
        def finish_request(self, request: Any, client_address: Any) -> Any:
            log.append("finish_request")
            return super().finish_request(request, client_address)

        @recorded
        def shutdown_request(self, request: Any) -> Any:
            log.append("shutdown_request")
            # The default returns what close_request() returns: the async one's coroutine.
            return super().shutdown_request(request)

        @recorded
        def close_request(self, request: Any) -> None:
            log.append("close_request")
            super().close_request(request)

    return Recording


def recording_handler(log: list[str], *, fail: bool = False) -> type[ts.StreamRequestHandler]:
    class Recording(ts.StreamRequestHandler):
        async def setup(self) -> None:
            log.append("setup")
            super().setup()  # the base setup() does no I/O: it is sync

        async def handle(self) -> None:
            log.append("handle")
            await self.wfile.write(await self.rfile.readline())
            if fail:
                raise ValueError("handler bug")

        async def finish(self) -> None:
            log.append("finish")
            await super().finish()

    return Recording


# The stdlib's order, with the handler's own three steps inside finish_request.
HOOK_ORDER = [
    "get_request",
    "verify_request",
    "process_request",
    "finish_request",
    "setup",
    "handle",
    "finish",
    "shutdown_request",
    "close_request",
]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync-hooks", "async-hooks"])
async def test_hooks_run_in_the_documented_order(is_async: bool) -> None:
    log: list[str] = []
    server_class = recording_server(log, is_async=is_async)
    with trio.fail_after(5):
        async with (
            serving(server_class(LOCALHOST, recording_handler(log))) as server,
            await connect(server) as client,
        ):
            await client.send_all(b"hello\n")
            assert await receive_line(client) == b"hello\n"
            # The server closed its end: shutdown_request/close_request did their job.
            assert await receive_all(client) == b""
    assert log == HOOK_ORDER


@pytest.mark.parametrize("is_async", [False, True], ids=["sync-hooks", "async-hooks"])
async def test_finish_runs_and_handle_error_is_called_when_handle_raises(
    is_async: bool,
) -> None:
    log: list[str] = []
    errors: list[tuple[Any, Any, BaseException | None]] = []
    requests: list[Any] = []

    class Server(recording_server(log, is_async=is_async)):  # type: ignore[misc]
        def get_request(self) -> Any:
            request = ts.TCPServer.get_request(self)
            requests.append(request)
            return request

        async def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append((request, client_address, sys.exc_info()[1]))
            log.append("handle_error")

    with trio.fail_after(5):
        async with (
            serving(Server(LOCALHOST, recording_handler(log, fail=True))) as server,
            await connect(server) as client,
        ):
            await client.send_all(b"hello\n")
            assert await receive_line(client) == b"hello\n"
            assert await receive_all(client) == b""
            client_address = client.socket.getsockname()
    assert log[log.index("handle") :] == [
        "handle",
        "finish",
        "handle_error",
        "shutdown_request",
        "close_request",
    ]
    [(request, address, error)] = errors
    # handle_error gets the request as get_request() returned it, and the client's address.
    assert request is requests[0][0]
    assert address == client_address
    assert isinstance(error, ValueError)
    assert server.statistics().failed_requests == 1


@pytest.mark.parametrize("is_async", [False, True])
async def test_verify_request_false_closes_the_connection_unhandled(is_async: bool) -> None:
    handled: list[str] = []
    shut: list[Any] = []

    class Refusing(ts.TCPServer):
        verify_request = hook(lambda self, request, client_address: False, is_async=is_async)

        def shutdown_request(self, request: Any) -> None:
            shut.append(request)
            super().shutdown_request(request)

    class Handler(ts.StreamRequestHandler):
        async def handle(self) -> None:
            handled.append("handled")

    with trio.fail_after(5):
        async with serving(Refusing(LOCALHOST, Handler)) as server, await connect(server) as client:
            assert await receive_all(client) == b""
    assert handled == []
    assert len(shut) == 1
    stats = server.statistics()
    assert (stats.accepted_requests, stats.finished_requests) == (1, 0)


async def test_verify_request_raising_goes_to_handle_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Server(ts.TCPServer):
        refuse_next = True

        def verify_request(self, request: Any, client_address: Any) -> bool:
            if self.refuse_next:
                self.refuse_next = False
                raise PermissionError("verify_request bug")
            return True

    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, AsyncEcho)) as server:
            async with await connect(server) as client:
                assert await receive_all(client) == b""
            assert await echo_once(server) == b"ping\n"
    assert "verify_request bug" in caplog.text


async def test_handle_error_that_raises_is_logged_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Server(ts.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            raise RuntimeError("handle_error bug")

    class Failing(ts.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            if line == b"fail\n":
                raise ValueError("handler bug")
            await self.wfile.write(line)

    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, Failing)) as server:
            async with await connect(server) as client:
                await client.send_all(b"fail\n")
                assert await receive_all(client) == b""
            assert await echo_once(server) == b"ping\n"
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.name == LOGGER_NAME
    assert "handle_error() raised" in record.getMessage()
    assert "handle_error bug" in caplog.text


async def test_default_handle_error_logs_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    class Failing(ts.StreamRequestHandler):
        async def handle(self) -> None:
            raise ZeroDivisionError("handler bug")

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Failing)) as server:
            async with await connect(server) as client:
                assert await receive_all(client) == b""
                client_address = client.socket.getsockname()
            assert server.statistics().failed_requests == 1
    [record] = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert repr(client_address) in record.getMessage()


async def test_peer_reset_is_logged_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    gone = trio.Event()

    class Reader(ts.StreamRequestHandler):
        async def handle(self) -> None:
            try:
                await self.rfile.readline()
            finally:
                gone.set()

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Reader)) as server:
            client = await connect(server)
            await client.send_all(b"half a line")
            await trio.testing.wait_all_tasks_blocked()
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()
            await gone.wait()
    [record] = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert (record.levelno, record.exc_info) == (logging.INFO, None)
    assert "\n" not in record.getMessage()


# -- lifecycle ----------------------------------------------------------------------------


async def test_shutdown_on_the_trio_thread_returns_at_once_and_drains() -> None:
    gate = Gate()
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, gated_handler(gate)) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                async with await connect(server) as client:
                    await gate.wait_entered(1)
                    server.shutdown()
                    # Returned at once: the request is still in flight, and serving.
                    assert server.shutdown_requested
                    assert server.statistics().active_requests == 1
                    server.shutdown()  # idempotent
                    gate.release.set()
                    assert await receive_line(client) == b"done\n"
            assert server.statistics().cancelled_requests == 0


async def test_shutdown_from_inside_an_async_handler() -> None:
    class Stopper(ts.StreamRequestHandler):
        async def handle(self) -> None:
            self.server.shutdown()
            await self.wfile.write(b"bye\n")

    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, Stopper) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                async with await connect(server) as client:
                    assert await receive_line(client) == b"bye\n"
            # serve_forever returned by itself, the handler finished normally.
            assert server.statistics().finished_requests == 1


async def test_shutdown_serves_what_is_queued_then_stops_accepting() -> None:
    gate = Gate()
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, gated_handler(gate)) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                first = await connect(server)
                await gate.wait_entered(1)
                server.shutdown()
                # Connected before the server stopped accepting: it is served, not reset.
                queued = await connect(server)
                await gate.wait_entered(2)
                gate.release.set()
                assert await receive_line(first) == b"done\n"
                assert await receive_line(queued) == b"done\n"
            # serve_forever() has returned: nothing accepts any more. The kernel still
            # completes a handshake on the open socket, and closing the listener resets it.
            late = await connect(server)
            server.server_close()
            assert await receive_all(late) == b""
            for client in (first, queued, late):
                await client.aclose()
    assert gate.entered == 2


async def test_in_flight_handler_finishes_within_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Slow(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await trio.sleep(1)
            await self.wfile.write(b"done\n")

    with trio.fail_after(60):
        async with ts.TCPServer(LOCALHOST, Slow) as server:
            server.shutdown_grace = 5
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                server.shutdown()
            # serve_forever returned as soon as the handler was done, not at the grace.
            assert trio.current_time() - start == pytest.approx(1)
            assert await receive_line(client) == b"done\n"
            await client.aclose()
    stats = server.statistics()
    assert (stats.finished_requests, stats.cancelled_requests) == (1, 0)


async def test_handler_outliving_the_grace_is_cancelled_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[float] = []

    class TooSlow(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await trio.sleep(10)
            await self.wfile.write(b"done\n")

        async def finish(self) -> None:
            finished.append(trio.current_time())
            await super().finish()

    with trio.fail_after(60):
        async with ts.TCPServer(LOCALHOST, TooSlow) as server:
            server.shutdown_grace = 5
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                server.shutdown()
            assert trio.current_time() - start == pytest.approx(5)
            assert finished == [pytest.approx(start + 5)]  # finish() still ran
            assert await receive_all(client) == b""  # cut before writing
            await client.aclose()
    stats = server.statistics()
    assert (stats.finished_requests, stats.cancelled_requests) == (0, 1)


async def test_shutdown_grace_none_waits_for_handlers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class VerySlow(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await trio.sleep(100)
            await self.wfile.write(b"done\n")

    with trio.fail_after(600):
        async with ts.TCPServer(LOCALHOST, VerySlow) as server:
            server.shutdown_grace = None
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await trio.testing.wait_all_tasks_blocked()
                server.shutdown()
            assert await receive_line(client) == b"done\n"
            await client.aclose()


async def test_handler_can_see_the_drain_and_finish_early(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Polite(ts.StreamRequestHandler):
        async def handle(self) -> None:
            # Work in steps of 0.25 s, checking between steps whether the server drains.
            for step in range(1000):
                if self.server.shutdown_requested:
                    await self.wfile.write(b"draining after %d steps\n" % step)
                    return
                await trio.sleep(0.25)

    with trio.fail_after(60):
        async with ts.TCPServer(LOCALHOST, Polite) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                client = await connect(server)
                await trio.sleep(1.1)
                server.shutdown()
            assert await receive_line(client) == b"draining after 5 steps\n"
            await client.aclose()


async def test_cancelling_serve_forever_is_a_hard_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = Gate()
    with trio.fail_after(60):
        async with ts.TCPServer(LOCALHOST, gated_handler(gate)) as server:
            server.shutdown_grace = 30
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                clients = [await connect(server) for _ in range(3)]
                await gate.wait_entered(3)
                start = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() == start  # no grace on a hard stop
            for client in clients:
                # Every connection was closed at once, before any handler could reply.
                assert await receive_all(client) == b""
                await client.aclose()
    stats = server.statistics()
    assert (stats.active_requests, stats.cancelled_requests) == (0, 3)


async def test_async_verify_request_cut_by_shutdown_still_ends_the_request() -> None:
    ended: list[Any] = []
    verifying = trio.Event()

    class Server(ts.TCPServer):
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            verifying.set()
            await trio.sleep_forever()
            return True  # pragma: no cover

        def shutdown_request(self, request: Any) -> None:
            ended.append(request)
            super().shutdown_request(request)

    with trio.fail_after(5):
        async with Server(LOCALHOST, AsyncEcho) as server, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                await verifying.wait()
                server.shutdown()
                assert await receive_all(client) == b""
    assert len(ended) == 1


# -- request_deadline ---------------------------------------------------------------------


async def test_request_deadline_cuts_a_connection_counts_and_logs_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    caplog.set_level(logging.INFO, logger="trio_socketserver.access")
    with trio.fail_after(600):
        server = ts.TCPServer(LOCALHOST, AsyncEcho)
        server.request_deadline = 30
        async with serving(server):
            start = trio.current_time()
            async with await connect(server) as client:
                peer = client.socket.getsockname()
                assert await receive_all(client) == b""  # the server hung up
                assert trio.current_time() - start == pytest.approx(30)
            assert await echo_once(server) == b"ping\n"  # and keeps serving
    stats = server.statistics()
    assert (stats.cancelled_requests, stats.failed_requests, stats.finished_requests) == (1, 0, 1)
    cut = [r for r in caplog.records if r.name == LOGGER_NAME]
    assert [(r.levelno, r.getMessage()) for r in cut] == [
        (
            logging.INFO,
            f"request from {peer!r} cut short: it ran longer than request_deadline (30 s)",
        )
    ]
    access = [r.getMessage() for r in caplog.records if r.name == "trio_socketserver.access"]
    assert access[0].startswith(f"{peer!r} cut short in 30.000 s")


async def test_request_deadline_cuts_a_datagram_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    entered = trio.Event()
    cut = trio.Event()

    class Stuck(ts.DatagramRequestHandler):
        async def handle(self) -> None:
            entered.set()
            try:
                await trio.sleep_forever()
            finally:
                cut.set()

    with trio.fail_after(600):
        server = ts.UDPServer(LOCALHOST, Stuck)
        server.request_deadline = 5
        async with serving(server):
            with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
                await sock.sendto(b"hi", server.server_address)
                await entered.wait()
                start = trio.current_time()
                await cut.wait()
                assert trio.current_time() - start == pytest.approx(5)
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().cancelled_requests == 1


@pytest.mark.parametrize("bad", [-1, math.nan])
async def test_invalid_request_deadline_is_refused(bad: float) -> None:
    async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
        server.request_deadline = bad
        with pytest.raises(ValueError, match=r"request_deadline must be >= 0 seconds or None"):
            await server.serve_forever()


# -- capacity ---------------------------------------------------------------------------


async def test_max_connections_leaves_extra_clients_in_the_backlog() -> None:
    gate = Gate()

    class Held(ts.StreamRequestHandler):
        async def handle(self) -> None:
            name = await self.rfile.readline()
            await gate.pass_through()
            await self.wfile.write(b"served " + name)

    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, Held) as server:
            server.max_connections = 2
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                await assert_third_client_waits_in_backlog(server, gate)
                server.shutdown()


async def test_max_connections_frees_a_slot_when_a_client_leaves() -> None:
    with trio.fail_after(5):
        async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
            server.max_connections = 1
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                first = await connect(server)
                await first.send_all(b"a\n")
                assert await receive_line(first) == b"a\n"
                second = await connect(server)
                await second.send_all(b"b\n")
                await trio.testing.wait_all_tasks_blocked()
                assert server.statistics().accepted_requests == 1
                await first.aclose()  # the echo loop sees EOF and the slot frees
                assert await receive_line(second) == b"b\n"
                await second.aclose()
                server.shutdown()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
async def test_invalid_max_connections_is_refused(bad: Any) -> None:
    async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
        server.max_connections = bad
        with pytest.raises(ValueError, match="positive int"):
            await server.serve_forever()


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE], ids=["EMFILE", "ENFILE"])
async def test_accept_out_of_fds_backs_off_logs_and_recovers(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    failures = 150
    attempts: list[float] = []

    class Exhausted(ts.TCPServer):
        def get_request(self) -> Any:
            attempts.append(trio.current_time())
            if len(attempts) <= failures:
                raise OSError(code, os.strerror(code))
            return super().get_request()

    with trio.fail_after(60):
        async with Exhausted(LOCALHOST, AsyncEcho) as server:
            client = await connect(server)  # waits in the backlog meanwhile
            await client.send_all(b"ping\n")
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                await nursery.start(server.serve_forever)
                assert await receive_line(client) == b"ping\n"
                await client.aclose()
                server.shutdown()
    # One retry every 0.1 s: failures at 0, 0.1, ..., 14.9, the accept at 15.0.
    gaps = [b - a for a, b in itertools.pairwise(attempts[: failures + 1])]
    assert gaps == pytest.approx([0.1] * failures)
    assert attempts[failures] == pytest.approx(start + 15.0)
    # A warning at most every 10 s: at 0 and at 10, not 150 of them.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all(r.name == LOGGER_NAME and "ulimit" in r.getMessage() for r in warnings)


async def test_accept_error_for_one_connection_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []

    class Flaky(ts.TCPServer):
        def get_request(self) -> Any:
            attempts.append(trio.current_time())
            if len(attempts) == 1:
                raise OSError(errno.ECONNABORTED, "Software caused connection abort")
            return super().get_request()

    with trio.fail_after(60):
        async with serving(Flaky(LOCALHOST, AsyncEcho)) as server:
            assert await echo_once(server) == b"ping\n"
    assert attempts[1] == attempts[0]  # retried at once, no backoff


# -- statistics -------------------------------------------------------------------------


async def test_statistics_counts_requests() -> None:
    class Server(ts.TCPServer):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return self.statistics().accepted_requests != 2  # refuse the second

    gate = Gate()

    class Handler(ts.StreamRequestHandler):
        async def handle(self) -> None:
            if await self.rfile.readline() == b"hold\n":
                await gate.pass_through()
            await self.wfile.write(b"ok\n")

    with trio.fail_after(5):
        async with Server(LOCALHOST, Handler) as server:
            server.shutdown_grace = 0
            assert server.statistics() == ts.ServerStatistics(
                active_requests=0,
                accepted_requests=0,
                finished_requests=0,
                failed_requests=0,
                cancelled_requests=0,
                refused_requests=0,
                proxy_rejected_requests=0,
                serving=False,
                draining=False,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                assert await echo_once(server, b"go\n") == b"ok\n"
                refused = await connect(server)
                assert await receive_all(refused) == b""
                await refused.aclose()
                held = await connect(server)
                await held.send_all(b"hold\n")
                await gate.wait_entered(1)
                assert server.statistics() == ts.ServerStatistics(
                    active_requests=1,
                    accepted_requests=3,
                    finished_requests=1,
                    failed_requests=0,
                    cancelled_requests=0,
                    refused_requests=1,
                    proxy_rejected_requests=0,
                    serving=True,
                    draining=False,
                )
                server.shutdown()  # grace 0: the held request is cancelled
            await held.aclose()
    assert server.statistics() == ts.ServerStatistics(
        active_requests=0,
        accepted_requests=3,
        finished_requests=1,
        failed_requests=0,
        cancelled_requests=1,
        refused_requests=1,
        proxy_rejected_requests=0,
        serving=False,
        draining=False,
    )
