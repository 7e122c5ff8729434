# The pytest plugin that installing trio-socketserver registers (entry point pytest11). It
# only defines fixtures: no hooks, options or autouse fixtures, so a test suite that requests
# none of them runs exactly as without it, and a fixture of the same name in a conftest.py
# overrides the plugin's.
"""pytest fixtures for trio_socketserver: ``no_leaks``, ``serve``, ``serve_in_thread``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import pytest
import trio

from .._server import BaseServer
from ._leaks import THREAD_EXIT_TIMEOUT, ResourceSnapshot, raise_leaks
from ._serving import serving, serving_in_thread

ServerT = TypeVar("ServerT", bound=BaseServer)


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves open fds, threads or child processes behind.

    A sync fixture, so both snapshots are taken outside ``trio.run`` and trio's own fds are
    in neither. Threads the test started get ``THREAD_EXIT_TIMEOUT`` seconds to exit.
    """
    before = ResourceSnapshot.take()
    yield
    before.join_new_threads(THREAD_EXIT_TIMEOUT)
    raise_leaks("the test", before.leaks())


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``server = await serve(TCPServer(...))``: serve until the test ends (pytest-trio).

    Each server runs under :func:`~trio_socketserver.testing.serving` (keyword arguments
    are passed on to it), so at teardown it is shut down, closed and leak-checked; a leak
    fails the test there.
    """
    stop = trio.Event()

    async def serve_until_stop(
        server: BaseServer,
        options: dict[str, Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with serving(server, **options):
            task_status.started()
            await stop.wait()

    async with trio.open_nursery() as nursery:

        async def start(server: ServerT, **options: Any) -> ServerT:
            await nursery.start(serve_until_stop, server, options)
            return server

        yield start
        stop.set()


@pytest.fixture
def serve_in_thread() -> Iterator[Callable[..., Any]]:
    """``server = serve_in_thread(compat.TCPServer(...))``: serve on a thread until the
    test ends, for tests without trio; stopped, closed and leak-checked at teardown
    (keyword arguments go to :func:`~trio_socketserver.testing.serving_in_thread`)."""
    with ExitStack() as stack:

        def start(server: ServerT, **options: Any) -> ServerT:
            return stack.enter_context(serving_in_thread(server, **options))

        yield start
