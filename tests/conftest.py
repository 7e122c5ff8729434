# Shared test fixtures and helpers: the leak check every server test ends with, short Unix
# socket paths, stdlib clients run on real threads, and small stream-reading helpers.
# Helpers are plain functions (imported as `from conftest import ...`); fixtures are opt-in
# (`pytestmark = pytest.mark.usefixtures("no_leaks")`) so other test files are unaffected.
from __future__ import annotations

import contextlib
import os
import select
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import trio
import trio.testing

from trio_socketserver import BaseServer

T = TypeVar("T")
ServerT = TypeVar("ServerT", bound=BaseServer)

# How long the leak check waits for a thread a test started to exit. A thread that is
# still alive after this is a leak (the engine promises none outlives serve_forever()).
THREAD_EXIT_TIMEOUT = 5.0
# The most bytes a helper reads while looking for one line: a broken server that never
# sends b"\n" fails the test instead of filling memory.
MAX_LINE = 65536
# How long serving_on_thread() waits for serve_forever() to return after shutdown().
SERVE_FOREVER_EXIT_TIMEOUT = 5.0
# Threads trio keeps idle in its process-wide cache for trio.to_thread; they are trio's
# pool (daemon, reused, exit after 10 s idle), not threads a server leaked.
TRIO_CACHE_THREAD_PREFIX = "Trio thread"


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the fd listdir itself used, already closed
    return fds


def child_processes() -> set[int]:
    """Pids of this process's children (forked by any of its threads)."""
    children: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            pass  # the thread exited while we looked
    return children


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if not t.name.startswith(TRIO_CACHE_THREAD_PREFIX)}


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves open fds, threads or child processes behind.

    It is a sync fixture, so the snapshots are taken outside ``trio.run``: trio's own
    fds (epoll, wakeup socketpair) are counted neither before nor after. Threads the
    test started are joined (bounded) before counting, so a thread on its way out is
    waited for, never slept for.
    """
    fds, threads, children = _open_fds(), _threads(), child_processes()
    yield
    for thread in _threads() - threads:
        thread.join(THREAD_EXIT_TIMEOUT)
    leaked_threads = [t.name for t in _threads() - threads]
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    now = _open_fds()
    leaked_fds = {fd: target for fd, target in now.items() if fds.get(fd) != target}
    assert len(now) == len(fds), f"fds: {len(fds)} before, {len(now)} after; new: {leaked_fds}"
    assert child_processes() <= children, f"child processes left: {child_processes() - children}"


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
