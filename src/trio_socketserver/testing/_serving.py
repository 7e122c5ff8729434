# Serving a server for the length of a test, then proving it left nothing behind:
# serving() inside trio (serve_forever in a nursery) and serving_in_thread() for blocking
# code, plain pytest and unittest (serve_forever on a thread).
from __future__ import annotations

import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import trio

from .._server import BaseServer
from ._leaks import THREAD_EXIT_TIMEOUT, LeakError, ResourceSnapshot, raise_leaks

ServerT = TypeVar("ServerT", bound=BaseServer)

# The longest a test's server gets to stop gracefully before it is stopped hard: longer than
# the default shutdown_grace (5 s), so that a graceful stop that works is never cut.
STOP_TIMEOUT = 10.0


def _all_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return tasks


@asynccontextmanager
async def serving(
    server: ServerT,
    *,
    stop_timeout: float = STOP_TIMEOUT,
    thread_exit_timeout: float = THREAD_EXIT_TIMEOUT,
) -> AsyncIterator[ServerT]:
    """Serve ``server`` for the body of an ``async with``; stop, close and leak-check it on exit.

    ``serve_forever()`` runs in a nursery of its own and has reported started (the socket
    accepts) when the body begins, so ``server.server_address`` is ready to connect to::

        async with serving(TCPServer(("127.0.0.1", 0), Echo)) as server:
            async with await open_client(server) as client:
                ...

    On a clean exit of the body it calls :meth:`~trio_socketserver.BaseServer.shutdown`
    (graceful: in-flight requests get the server's ``shutdown_grace``), stops hard once
    ``stop_timeout`` seconds have passed, closes the server, then checks that nothing the
    body started outlived it.

    Errors:
      :exc:`LeakError` (an ``AssertionError``) if, after the server stopped and closed, a
      task started during the body is still running (a handler that spawned work into
      another nursery), a thread other than trio's idle worker cache is still alive
      ``thread_exit_timeout`` seconds later, or a file descriptor or child process opened
      during the body is still open. Close clients inside the body (``async with``).
      If the body raises, the server is stopped hard and the body's exception propagates
      without a leak check.

    Cancellation:
      Cancelling the body is a hard stop of the server, as cancelling ``serve_forever()``.
    """
    before = ResourceSnapshot.take()
    tasks_before = _all_tasks()
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        try:
            yield server
        finally:
            server.shutdown()
            nursery.cancel_scope.deadline = min(
                nursery.cancel_scope.deadline, trio.current_time() + stop_timeout
            )
    leaked_tasks = sorted(task.name for task in _all_tasks() - tasks_before)
    # Joining blocks, so it runs on one of trio's cached threads (which the check ignores).
    await trio.to_thread.run_sync(before.join_new_threads, thread_exit_timeout)
    leaks = before.leaks()
    if leaked_tasks:
        leaks.insert(0, f"tasks still running: {leaked_tasks}")
    raise_leaks(repr(server), leaks)


@contextmanager
def serving_in_thread(
    server: ServerT,
    *,
    stop_timeout: float = STOP_TIMEOUT,
    thread_exit_timeout: float = THREAD_EXIT_TIMEOUT,
) -> Iterator[ServerT]:
    """The blocking twin of :func:`serving`: ``serve_forever()`` runs on a thread.

    For ``trio_socketserver.compat`` servers (and native ones, which the thread runs under
    ``trio.run``), from plain pytest or ``unittest`` code: no trio in the test itself::

        with serving_in_thread(compat.ThreadingTCPServer(("127.0.0.1", 0), Handler)) as server:
            with socket.create_connection(server.server_address, timeout=5) as client:
                ...

    The server's socket listens from its constructor on, so clients can connect at once.
    On exit it calls ``shutdown()`` with ``shutdown_grace`` capped at ``stop_timeout`` (so
    handlers still running are cut after it), closes the server, and checks leaks as
    :func:`serving` does (threads, fds, child processes). An exception that ended
    ``serve_forever()`` is re-raised here.
    """
    before = ResourceSnapshot.take()
    failures: list[BaseException] = []

    # A compat server's serve_forever() blocks; a native one's is run here under trio.run().
    serve_forever: Callable[[], object] = server.serve_forever

    def serve() -> None:
        try:
            if inspect.iscoroutinefunction(serve_forever):
                trio.run(serve_forever)
            else:
                serve_forever()
        except BaseException as exc:  # re-raised in the test's thread on exit
            failures.append(exc)

    thread = threading.Thread(target=serve, name=f"serving {type(server).__name__}")
    thread.start()
    try:
        yield server
    finally:
        grace = server.shutdown_grace
        if grace is None or grace > stop_timeout:
            server.shutdown_grace = stop_timeout
        server.shutdown()  # from another thread: returns once serve_forever() has returned
        thread.join(stop_timeout)
        server.server_close()
        server.shutdown_grace = grace
    if thread.is_alive():
        raise LeakError(f"serve_forever() of {server!r} did not return after shutdown()")
    if failures:
        raise failures[0]
    before.join_new_threads(thread_exit_timeout)
    raise_leaks(repr(server), before.leaks())
