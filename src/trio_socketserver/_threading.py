# Sync request handlers on threads: ThreadingMixIn, and how the engine runs one blocking
# request on one of trio's worker threads (trio.to_thread), so trio.from_thread works in
# handlers, and what a stop does to a thread that cannot be cancelled. Nothing here knows
# about sockets; the engine says how to release a stuck thread's connection.
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
LOGGER = logging.getLogger("trio_socketserver")

# What a trio worker thread is called while it runs a request's handler code (trio gives it
# back its own name, "Trio thread N", once the request returns).
HANDLER_THREAD_PREFIX = "trio_socketserver handler"
# Threads cannot be cancelled. When a stop cuts a request whose thread is still running, the
# engine shuts its connection down so blocked socket I/O returns; a thread that has still not
# returned this many seconds later is abandoned (logged), so a stop stays bounded.
THREAD_RELEASE_TIMEOUT = 1.0


# Whether the request the current handler thread runs failed: process_request_thread() marks
# it, so statistics count the request as failed, not finished. None (or unset) on a thread
# that runs no request.
_current = threading.local()


def record_failure(process_request_thread: Callable[..., object], *args: Any) -> bool:
    """Run ``process_request_thread(*args)`` (which reports its own errors) on this handler
    thread; returns whether it marked its request failed. What it raises propagates."""
    _current.failed = False
    try:
        process_request_thread(*args)
        return bool(_current.failed)
    finally:
        _current.failed = None


def mark_failed() -> None:
    """Count the current handler thread's request as failed (no-op elsewhere)."""
    if getattr(_current, "failed", None) is not None:
        _current.failed = True


async def run_in_thread(
    body: Callable[[], T],
    *,
    limiter: Any,
    release: Callable[[], None],
    wait_for_release: bool,
    who: object,
    abandoned: list[threading.Event],
) -> T:
    """Run ``body()`` on one of trio's worker threads and return what it returns.

    Cancellation: the thread cannot be interrupted. When the call is cancelled and the
    thread is still running, ``release()`` is called (it makes the thread's blocked I/O
    return); with ``wait_for_release`` the call then waits, shielded, up to
    :data:`THREAD_RELEASE_TIMEOUT` for the thread to return. A thread still running after
    that **keeps running in the background**: it is abandoned, its "finished" event goes
    to ``abandoned`` (for server_close() to wait on), and Cancelled is re-raised.
    """
    end = _ThreadEnd(trio.lowlevel.current_trio_token())

    def on_thread() -> T:
        try:
            return body()
        finally:
            end.reached()

    try:
        return await trio.to_thread.run_sync(
            on_thread,
            limiter=limiter,
            abandon_on_cancel=True,
            thread_name=f"{HANDLER_THREAD_PREFIX} for {who!r}",
        )
    except trio.Cancelled:
        if not end.done:
            release()
            if wait_for_release:
                with trio.CancelScope(shield=True), trio.move_on_after(THREAD_RELEASE_TIMEOUT):
                    await end.wait()
            if not end.done:
                # Forget threads that have returned since: a server that cuts requests at
                # their request_deadline, and never stops, must not collect them forever.
                abandoned[:] = [finished for finished in abandoned if not finished.is_set()]
                abandoned.append(end.finished())
                if wait_for_release:
                    LOGGER.warning(
                        "handler thread for %r still running %.1f s after its connection was "
                        "shut down; abandoning it (threads cannot be cancelled)",
                        who,
                        THREAD_RELEASE_TIMEOUT,
                    )
                else:
                    LOGGER.debug("not waiting for the daemon handler thread for %r", who)
        raise


class _ThreadEnd:
    """When a handler thread returns, for a stop that waits for it after the request was
    cut. The thread wakes trio only if a task watches, and sets a threading.Event only if a
    stop abandoned it, so a request that was not cut costs neither an event nor an extra
    trip through trio's loop. Set-then-check on both sides (``done``, then the watcher and
    the event, on the thread; the reverse in :meth:`wait` and :meth:`finished`), so one
    side always sees the other.
    """

    __slots__ = ("_finished", "_returned", "done", "token")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.done = False
        self._returned: trio.Event | None = None
        self._finished: threading.Event | None = None

    def reached(self) -> None:
        """On the thread, as it returns."""
        self.done = True
        finished = self._finished
        if finished is not None:
            finished.set()
        returned = self._returned
        if returned is not None:
            try:
                self.token.run_sync_soon(returned.set)
            except trio.RunFinishedError:
                pass  # the run that waited for it is gone; nobody to wake

    async def wait(self) -> None:
        """Until the thread returns (cancellable)."""
        returned = self._returned = trio.Event()
        if not self.done:
            await returned.wait()

    def finished(self) -> threading.Event:
        """An event set once the thread has returned, for whoever must wait for it later."""
        finished = self._finished = threading.Event()
        if self.done:
            finished.set()
        return finished


class ThreadingMixIn:
    """Run each request of a sync ``handle()`` on its own thread.

    Put it first in the bases, as with the stdlib: ``class
    ThreadingTCPServer(ThreadingMixIn, TCPServer)``. Async handlers are
    unaffected: they always run as tasks.

    Threads are trio's worker threads (``trio.to_thread``), so a handler can call into the
    trio side with ``trio.from_thread.run()`` / ``run_sync()``, and
    ``trio.from_thread.check_cancelled()`` tells it that a stop cut its request.

    ``max_threads`` bounds the threads running handlers at once; when they are
    all busy the server stops accepting and new clients wait in the kernel
    backlog. Default ``None``: unbounded, like the stdlib.
    ``daemon_threads``: when True, a stop does not wait for handler threads
    that are still running after ``shutdown_grace`` (they are abandoned and
    keep running). ``block_on_close``: when True, ``server_close()`` waits for
    handler threads that a stop had to abandon, for at most ``shutdown_grace``.
    """

    max_threads: int | None = None
    daemon_threads: bool = False
    block_on_close: bool = True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """One request on its thread, as the stdlib's: finish, report errors, shut down.

        Override it to wrap every request (the engine calls it on the handler thread).
        What escapes it goes to ``threading.excepthook`` and ends that request only.
        """
        server: Any = self
        try:
            server.finish_request(request, client_address)
        except Exception:
            mark_failed()
            server.handle_error(request, client_address)
        finally:
            server.shutdown_request(request)
