# trio_socketserver.testing: serving a real server for a test (and catching what outlives
# it: threads, tasks, fds), the socket-less handler harness, and the pytest plugin.
from __future__ import annotations

import socket
import socketserver
import threading
import time
import unittest
from typing import Any

import pytest
import trio

import trio_socketserver as ts
from conftest import AsyncEcho
from trio_socketserver import compat
from trio_socketserver.testing import (
    LeakError,
    open_client,
    open_handler,
    run_datagram_handler,
    run_handler,
    serving,
    serving_in_thread,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
# Bounds every stdlib client call; a passing test never comes near it.
CLIENT_TIMEOUT = 5.0


class SyncUpper(socketserver.StreamRequestHandler):
    """Written for the stdlib module: the stdlib's own handler class, blocking files."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line.upper())


# -- serving(): a real server for the length of a test -------------------------------------


async def test_serving_serves_then_stops_and_closes_the_server(unix_dir: Any) -> None:
    with trio.fail_after(5):
        server = ts.UnixStreamServer(str(unix_dir / "s"), AsyncEcho)
        async with serving(server), await open_client(server) as client:
            await client.send_all(b"hello\n")
            assert await client.receive_line() == b"hello\n"
        assert server.fileno() == -1
        assert not (unix_dir / "s").exists()


async def test_a_handler_that_leaves_a_thread_running_fails_the_test() -> None:
    release = threading.Event()
    threads: list[threading.Thread] = []

    class LeavesAThread(ts.StreamRequestHandler):
        async def handle(self) -> None:
            # Handler code that goes on after the request: the leak the check exists for.
            thread = threading.Thread(target=release.wait, args=(CLIENT_TIMEOUT,), name="left")
            thread.start()
            threads.append(thread)
            await self.wfile.write(b"done\n")

    with trio.fail_after(5):
        with pytest.raises(LeakError, match=r"threads still running: \['left'\]"):
            server = ts.TCPServer(LOCALHOST, LeavesAThread)
            async with serving(server, thread_exit_timeout=0), await open_client(server) as c:
                assert await c.receive_line() == b"done\n"
    release.set()
    threads[0].join()


async def test_a_handler_that_spawns_a_task_outside_the_server_fails_the_test() -> None:
    class SpawnsElsewhere(ts.StreamRequestHandler):
        async def handle(self) -> None:
            self.server.background.start_soon(trio.sleep_forever, name="left behind")
            await self.wfile.write(b"done\n")

    with trio.fail_after(5):
        async with trio.open_nursery() as background:
            server = ts.TCPServer(LOCALHOST, SpawnsElsewhere)
            server.background = background  # type: ignore[attr-defined]
            with pytest.raises(LeakError, match=r"tasks still running: \['left behind'\]"):
                async with serving(server), await open_client(server) as client:
                    assert await client.receive_line() == b"done\n"
            background.cancel_scope.cancel()


async def test_a_handler_that_keeps_a_socket_open_fails_the_test() -> None:
    kept: list[socket.socket] = []

    class KeepsASocket(ts.StreamRequestHandler):
        async def handle(self) -> None:
            kept.append(socket.socket())
            await self.wfile.write(b"done\n")

    with trio.fail_after(5):
        with pytest.raises(LeakError, match=r"file descriptors still open: \{\d+: 'socket:\["):
            server = ts.TCPServer(LOCALHOST, KeepsASocket)
            async with serving(server), await open_client(server) as client:
                assert await client.receive_line() == b"done\n"
    kept[0].close()


async def test_serving_stops_hard_after_stop_timeout(autojump_clock: trio.abc.Clock) -> None:
    class NeverEnds(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(b"in\n")
            await trio.sleep_forever()

    server = ts.TCPServer(LOCALHOST, NeverEnds)
    server.shutdown_grace = None  # a graceful stop alone would wait forever
    start = trio.current_time()
    async with serving(server, stop_timeout=7), await open_client(server) as client:
        assert await client.receive_line() == b"in\n"
    # The client is idle in the kernel, so nothing is in flight when the clock jumps 7 s.
    assert trio.current_time() - start == pytest.approx(7)
    assert server.statistics().cancelled_requests == 1


# -- serving_in_thread(): the blocking twin ---------------------------------------------------


def stdlib_upper(address: Any, line: bytes) -> bytes:
    with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as client:
        client.sendall(line)
        return client.makefile("rb").readline()


def test_serving_in_thread_runs_a_compat_server_for_plain_blocking_code() -> None:
    with serving_in_thread(compat.ThreadingTCPServer(LOCALHOST, SyncUpper)) as server:
        assert stdlib_upper(server.server_address, b"one\n") == b"ONE\n"
        assert stdlib_upper(server.server_address, b"two\n") == b"TWO\n"
    assert server.fileno() == -1


def test_serving_in_thread_runs_a_native_server_under_its_own_trio_run() -> None:
    with serving_in_thread(ts.ThreadingTCPServer(LOCALHOST, SyncUpper)) as server:
        assert stdlib_upper(server.server_address, b"native\n") == b"NATIVE\n"


def test_serving_in_thread_catches_a_handler_thread_left_running() -> None:
    release = threading.Event()

    class LeavesAThread(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            threading.Thread(target=release.wait, args=(CLIENT_TIMEOUT,), name="left").start()
            self.wfile.write(b"done\n")

    server = compat.TCPServer(LOCALHOST, LeavesAThread)
    with (
        pytest.raises(LeakError, match=r"threads still running: \['left'\]"),
        serving_in_thread(server, thread_exit_timeout=0),
    ):
        assert stdlib_upper(server.server_address, b"x\n") == b"done\n"
    release.set()


class UnittestUser(unittest.TestCase):
    """How a unittest suite uses it: enterContext, stdlib clients, no trio in sight."""

    def test_upper(self) -> None:
        server = self.enterContext(serving_in_thread(compat.TCPServer(LOCALHOST, SyncUpper)))
        self.assertEqual(stdlib_upper(server.server_address, b"unit\n"), b"UNIT\n")


# -- the handler harness: no server, no listening socket -------------------------------------


async def test_run_handler_feeds_bytes_to_an_async_handler() -> None:
    run = await run_handler(AsyncEcho, b"one\ntwo\n")
    assert run.output == b"one\ntwo\n"
    assert run.error is None


async def test_run_handler_runs_a_stdlib_sync_handler_on_a_thread() -> None:
    run = await run_handler(SyncUpper, b"one\ntwo\n")
    assert run.output == b"ONE\nTWO\n"
    assert run.error is None


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
async def test_run_handler_returns_what_the_handler_raised(asynchronous: bool) -> None:
    class Picky(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(b"? ")
            raise ValueError(f"not from {self.client_address}")

    class SyncPicky(ts.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"? ")
            raise ValueError(f"not from {self.client_address}")

    run = await run_handler(Picky if asynchronous else SyncPicky, client_address=("10.0.0.1", 9))
    assert run.output == b"? "
    assert isinstance(run.error, ValueError)
    assert str(run.error) == "not from ('10.0.0.1', 9)"


async def test_open_handler_scripts_a_conversation() -> None:
    class Counter(ts.StreamRequestHandler):
        async def handle(self) -> None:
            count = 0
            async for _ in self.rfile:
                count += 1
                await self.wfile.write(b"%d\n" % count)

    async with open_handler(Counter) as client:
        for expected in (b"1\n", b"2\n", b"3\n"):
            await client.send_all(b"tick\n")
            assert await client.receive_line() == expected
    assert client.error is None


async def test_a_handler_timeout_takes_no_wall_time(autojump_clock: trio.abc.Clock) -> None:
    class Patient(AsyncEcho):
        timeout = 600  # ten minutes of trio's clock

    wall, start = time.monotonic(), trio.current_time()
    async with open_handler(Patient) as client:
        assert await client.receive_all() == b""  # the handler gave up and closed
    assert isinstance(client.error, TimeoutError)
    assert trio.current_time() - start == pytest.approx(600)
    assert time.monotonic() - wall < 5


async def test_a_handler_that_ignores_eof_is_cancelled(autojump_clock: trio.abc.Clock) -> None:
    class Deaf(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await trio.sleep_forever()

    start = trio.current_time()
    async with open_handler(Deaf, stop_timeout=3) as client:
        pass
    assert isinstance(client.error, trio.TooSlowError)
    assert trio.current_time() - start == pytest.approx(3)


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
async def test_run_datagram_handler_collects_the_reply(asynchronous: bool) -> None:
    class Reverse(ts.DatagramRequestHandler):
        async def handle(self) -> None:
            self.wfile.write(self.rfile.read()[::-1])

    class SyncReverse(ts.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.read()[::-1])

    run = await run_datagram_handler(Reverse if asynchronous else SyncReverse, b"abc")
    assert run.replies == [b"cba"]
    assert run.error is None


async def test_run_datagram_handler_records_direct_sendto() -> None:
    class Echo2(ts.BaseRequestHandler):
        async def handle(self) -> None:
            data, sock = self.request
            await sock.sendto(data, self.client_address)
            await sock.sendto(data, ("127.0.0.1", 9))

    run = await run_datagram_handler(Echo2, b"hi", client_address=("127.0.0.1", 4000))
    assert run.sent == [(b"hi", ("127.0.0.1", 4000)), (b"hi", ("127.0.0.1", 9))]
    assert run.replies == [b"hi"]


# -- the pytest plugin ------------------------------------------------------------------------

LEAKY_SUITE = """
import socket
import threading

import trio_socketserver as ts
from trio_socketserver.testing import open_client

release = threading.Event()


class LeavesAThread(ts.StreamRequestHandler):
    async def handle(self):
        threading.Thread(target=release.wait, args=(5,), name="left").start()
        await self.wfile.write(b"done\\n")


async def test_leaky(serve):
    # A thread still alive at teardown is a leak at once (the default waits 5 s for it).
    server = await serve(ts.TCPServer(("127.0.0.1", 0), LeavesAThread), thread_exit_timeout=0)
    async with await open_client(server) as client:
        assert await client.receive_line() == b"done\\n"


def test_leaky_blocking(serve_in_thread):
    server = serve_in_thread(ts.TCPServer(("127.0.0.1", 0), LeavesAThread), thread_exit_timeout=0)
    with socket.create_connection(server.server_address, timeout=5) as client:
        assert client.makefile("rb").readline() == b"done\\n"


async def test_clean(serve, no_leaks):
    await serve(ts.TCPServer(("127.0.0.1", 0), LeavesAThread))  # no client: no thread


def teardown_module():
    release.set()
"""


def test_plugin_fixtures_fail_a_test_whose_server_leaks_a_thread(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under CI, pytest repeats each failure's full message in its short summary.
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_suite=LEAKY_SUITE)
    result = pytester.runpytest_subprocess("-q")
    # Each leaky test fails at teardown, where the fixture checks (pytest-trio reports a
    # trio fixture's teardown error as the test's failure, pytest a sync one's as an error
    # after the body passed).
    result.assert_outcomes(passed=2, failed=1, errors=1)
    assert result.stdout.str().count("left resources behind: threads still running: ['left']") == 2


def test_plugin_is_harmless_when_unused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)
    # It is loaded (by its entry point), and it can be turned off like any plugin.
    assert pytester.runpytest_subprocess("-q", "-p", "no:trio_socketserver").ret == 0
