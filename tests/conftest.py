# Shared test fixtures and helpers: short Unix socket paths, stdlib clients run on real
# threads, a health probe, a service manager's notification socket, and small stream-reading
# helpers. Helpers are plain functions (imported as `from conftest import ...`). The leak
# check every server test ends with is the package's own pytest plugin's `no_leaks` fixture
# (trio_socketserver.testing), opt-in per file: `pytestmark = pytest.mark.usefixtures("no_leaks")`.
from __future__ import annotations

import contextlib
import http.client
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import trio
import trio.testing

from trio_socketserver import BaseServer, StreamRequestHandler
from trio_socketserver._threading import HANDLER_THREAD_PREFIX
from trio_socketserver.testing._leaks import ResourceSnapshot

# pytester runs small test suites against the package's pytest plugin (tests/test_testing.py).
pytest_plugins = ["pytester"]

T = TypeVar("T")
ServerT = TypeVar("ServerT", bound=BaseServer)

# The most bytes a helper reads while looking for one line: a broken server that never
# sends b"\n" fails the test instead of filling memory.
MAX_LINE = 65536

SRC = Path(__file__).resolve().parent.parent / "src"
# How long a run_python() subprocess may take: an interpreter start plus a few servers.
SUBPROCESS_TIMEOUT = 60.0

# How long serving_on_thread() waits for serve_forever() to return after shutdown().
SERVE_FOREVER_EXIT_TIMEOUT = 5.0

# How long a read on the `manager` socket waits for a notification.
NOTIFY_TIMEOUT = 10.0

# How long http_get() waits to connect and for each read; a passing test never comes near it.
HTTP_TIMEOUT = 10.0


def have_ipv6_loopback() -> bool:
    """Whether this machine can bind ``::1`` (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def runs_handler_code(thread: threading.Thread) -> bool:
    """Whether ``thread`` is running a server's handler code right now."""
    return thread.is_alive() and thread.name.startswith(HANDLER_THREAD_PREFIX)


def child_processes() -> set[int]:
    """Pids of this process's children (forked by any of its threads)."""
    return set(ResourceSnapshot.take().children)


def wait_for_exit(pids: set[int], timeout: float) -> set[int]:
    """Wait (pidfd, no polling) until every pid has exited; returns those still running."""
    remaining = set()
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            pass  # gone already
    try:
        for pid, fd in fds.items():
            if not _readable(fd, timeout):
                remaining.add(pid)
    finally:
        for fd in fds.values():
            os.close(fd)
    return remaining


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


@pytest.fixture
def unix_dir() -> Iterator[Path]:
    """A fresh short directory for Unix socket files (sun_path holds only 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tss-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def manager(unix_dir: Path) -> Iterator[socket.socket]:
    """A service manager's notification socket (``NOTIFY_SOCKET``), an AF_UNIX datagram
    socket as systemd's own; its path is ``manager.getsockname()``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(unix_dir / "notify"))
        sock.settimeout(NOTIFY_TIMEOUT)
        yield sock


@asynccontextmanager
async def serving(server: ServerT) -> AsyncIterator[ServerT]:
    """Run ``server.serve_forever()`` for the body; shut down and close it on the way out.

    Exiting waits for serve_forever() to return (the graceful path), then calls
    server_close() through ``async with server``.
    """
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        yield server
        server.shutdown()


@contextlib.contextmanager
def serving_on_thread(server: Any, poll_interval: float | None = 0.5) -> Iterator[threading.Thread]:
    """Run a blocking ``server.serve_forever()`` (compat's, the stdlib's) on a thread, as
    their users do; shut down, join and close on the way out."""
    thread = threading.Thread(
        target=server.serve_forever, args=(poll_interval,), name="test serve_forever"
    )
    thread.start()
    try:
        yield thread
    finally:
        server.shutdown()
        thread.join(SERVE_FOREVER_EXIT_TIMEOUT)
        server.server_close()
    assert not thread.is_alive(), "serve_forever() did not return after shutdown()"


class AsyncEcho(StreamRequestHandler):
    """Echoes every line, as a task."""

    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(line)


class SyncEcho(StreamRequestHandler):
    """Echoes every line, on a handler thread."""

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


def haproxy_binary() -> str:
    """The haproxy program for the tests that run behind a real one.

    Missing, the test is skipped with the reason, unless TRIO_SOCKETSERVER_REQUIRE_HAPROXY=1
    (CI sets it, after installing haproxy), which makes a missing haproxy a failure: CI can
    never skip these tests.
    """
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )
    if found is not None:
        return found
    if os.environ.get("TRIO_SOCKETSERVER_REQUIRE_HAPROXY") == "1":
        pytest.fail("TRIO_SOCKETSERVER_REQUIRE_HAPROXY=1, but haproxy is not installed")
    pytest.skip(
        "haproxy is not installed (apt install haproxy); "
        "TRIO_SOCKETSERVER_REQUIRE_HAPROXY=1 turns this skip into a failure"
    )


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this checkout; fail on a non-zero exit.

    For what changes process-wide state, such as ``compat.install()``.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    """GET ``path`` with the stdlib's HTTP client, as a balancer's probe does: (status, body).

    Blocking: for a server in another process (``--health-bind``), or from a thread.
    """
    connection = http.client.HTTPConnection(*address, timeout=HTTP_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


async def connect(server: Any) -> trio.SocketStream:
    """A trio TCP client connected to ``server`` (IPv4 or IPv6)."""
    host, port = server.server_address[:2]
    return await trio.open_tcp_stream(host, port)


async def receive_line(stream: trio.abc.ReceiveStream) -> bytes:
    """Read up to and including b"\\n" (one byte at a time, so nothing is over-read).

    Returns what arrived before EOF if the peer closes first.
    """
    line = bytearray()
    while not line.endswith(b"\n"):
        assert len(line) < MAX_LINE, f"no newline in {MAX_LINE} bytes: {bytes(line[:80])!r}"
        byte = await stream.receive_some(1)
        if not byte:
            break
        line += byte
    return bytes(line)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Read until EOF (a reset counts as EOF: the test asks only what arrived)."""
    data = bytearray()
    try:
        while chunk := await stream.receive_some():
            data += chunk
    except trio.BrokenResourceError:
        pass  # connection reset: what arrived before it is the answer
    return bytes(data)


class HandlerHold(Protocol):
    """Holds handlers inside handle() until ``release`` is set, counting them in ``entered``."""

    entered: int

    @property
    def release(self) -> trio.Event | threading.Event: ...

    async def wait_entered(self, n: int) -> None: ...


async def assert_third_client_waits_in_backlog(server: BaseServer, hold: HandlerHold) -> None:
    """With room for two requests, both held: a third client is connected (kernel backlog)
    but not accepted until the hold is released; then all three are served, in order.

    The handlers read a name line and answer ``b"served " + name``.
    """
    streams = [await connect(server) for _ in range(3)]
    for i, stream in enumerate(streams):
        await stream.send_all(b"%d\n" % i)
    await hold.wait_entered(2)
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().accepted_requests == 2
    assert hold.entered == 2
    hold.release.set()
    for i, stream in enumerate(streams):
        assert await receive_line(stream) == b"served %d\n" % i
        await stream.aclose()
    assert server.statistics().accepted_requests == 3


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking ``fn(*args)`` on a fresh thread (a stdlib client, a cross-thread call).

    A plain ``threading.Thread`` that is joined before returning, rather than
    ``trio.to_thread``, whose cached idle threads would outlive the test. ``fn`` must
    bound its own blocking (socket timeouts, join timeouts): threads cannot be cancelled.
    """
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append((True, fn(*args)))
        except BaseException as exc:  # handed back to the awaiting task
            outcome.append((False, exc))
        finally:
            token.run_sync_soon(done.set)

    thread = threading.Thread(target=work, name=f"test client {fn.__name__}")
    thread.start()
    with trio.CancelScope(shield=True):
        await done.wait()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class ThreadSignal:
    """A trio.Event that a handler thread can set, for the test to await."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.event = trio.Event()

    def set(self) -> None:
        """Set the event; callable from any thread (the trio thread included)."""
        self._token.run_sync_soon(self.event.set)

    async def wait(self) -> None:
        await self.event.wait()
