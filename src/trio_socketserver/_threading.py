# Threads for sync request handlers: ThreadingMixIn, and the per-run pool of
# reusable handler threads that every server uses to run a blocking handle().
# Nothing here knows about sockets; the server decides what to release when a
# thread must be abandoned.
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

_thread_names = itertools.count(1)
# An idle handler thread exits after this many seconds without work: a burst of clients
# (hostile ones included) must not leave its peak of threads and stacks behind for the rest
# of the run, while steady traffic keeps reusing the same threads (trio's cache also uses 10 s).
IDLE_THREAD_TIMEOUT = 10.0

# Which server (if any) the current thread is running a handler for. shutdown()
# reads it: waiting for serve_forever() from inside one of its own handler
# threads would wait for itself.
_current = threading.local()


def running_handler_for(server: object) -> bool:
    """Whether the calling thread is a handler thread of ``server``."""
    return getattr(_current, "server", None) is server


@attrs.define(eq=False)
class Job:
    """One call of a sync function on a pool thread, awaited from trio."""

    _fn: Callable[..., object]
    _args: tuple[Any, ...]
    _token: trio.lowlevel.TrioToken
    _server: object
    _done: trio.Event = attrs.Factory(trio.Event)
    _finished: threading.Event = attrs.Factory(threading.Event)
    _result: object = None
    _error: BaseException | None = None
    abandoned: bool = False
    """Set by the server when it stops waiting for this job (see HandlerThreads.close)."""

    @property
    def finished(self) -> bool:
        """True once the function has returned or raised, even if nobody waits any more."""
        return self._finished.is_set()

    def run(self) -> None:
        _current.server = self._server
        try:
            self._result = self._fn(*self._args)
        except BaseException as exc:  # handed over to the awaiting task
            self._error = exc
        finally:
            _current.server = None
            self._finished.set()
            try:
                self._token.run_sync_soon(self._done.set)
            except trio.RunFinishedError:
                pass  # the run that wanted the result is gone; nothing to wake

    async def wait(self) -> object:
        """Wait for the result, re-raising what the function raised.

        Cancellation: cancellable; the thread is **not** interrupted and keeps
        running. Call :meth:`wait` again (shielded) to keep waiting for it.
        """
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def join(self, timeout: float | None) -> bool:
        """Block the calling thread until the job finished; False on timeout."""
        return self._finished.wait(timeout)


@attrs.define(eq=False)
class HandlerThreads:
    """Reusable threads for one serve_forever() or handle_request() call.

    A thread is started only when no idle one is waiting, so the pool grows to
    the peak number of concurrent sync requests (bounded by the server's
    capacity) and no further; a thread idle for ``IDLE_THREAD_TIMEOUT``
    seconds exits, so a burst does not leave its peak behind. :meth:`close`
    makes every idle thread exit and joins it, so after a run the process has
    no handler thread left, except those still running abandoned jobs (see the
    server's shutdown rules).
    Unlike ``trio.to_thread``'s process-wide cache, whose idle threads linger
    for seconds, this keeps the "no thread outlives its server" promise.
    """

    daemon: bool
    server: object
    _jobs: queue.SimpleQueue[Job | None] = attrs.Factory(queue.SimpleQueue)
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _idle: int = 0
    _threads: list[threading.Thread] = attrs.Factory(list)
    _running: dict[threading.Thread, Job] = attrs.Factory(dict)

    @property
    def has_threads(self) -> bool:
        """Whether any thread of this pool may still be alive."""
        return any(t.is_alive() for t in self._threads)

    def submit(self, fn: Callable[..., object], *args: Any) -> Job:
        """Start ``fn(*args)`` on a pool thread; must be called from the trio thread."""
        job = Job(fn, args, trio.lowlevel.current_trio_token(), self.server)
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._jobs.put(job)
        if spawn:
            thread = threading.Thread(
                target=self._work,
                name=f"trio_socketserver handler {next(_thread_names)}",
                daemon=self.daemon,
            )
            with self._lock:  # a thread leaving idle takes itself off the list
                self._threads.append(thread)
            thread.start()
        return job

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_THREAD_TIMEOUT)
            except queue.Empty:
                with self._lock:
                    # Leave only as an unclaimed idle thread; if submit() has just claimed
                    # the last one (_idle is 0), its job is on the way: take it.
                    if self._idle > 0:
                        self._idle -= 1
                        self._threads.remove(me)
                        return
                continue
            if job is None:
                return
            with self._lock:
                self._running[me] = job
            job.run()
            with self._lock:
                del self._running[me]
                self._idle += 1

    def close(self) -> None:
        """Make every thread exit once idle; join all but those running abandoned jobs.

        Call it once no task waits for a job any more: every thread is then idle
        or finishing a job whose result was delivered (each exits at once on
        its sentinel, so these joins are short), or running an abandoned job;
        those exit when the job ends, and :meth:`join` waits for them.
        """
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        with self._lock:
            abandoned = {t for t, job in self._running.items() if job.abandoned}
        for thread in threads:
            if thread not in abandoned:
                thread.join()
        with self._lock:
            self._threads = [t for t in threads if t.is_alive()]

    def join(self, timeout: float | None) -> None:
        """Join threads still running abandoned jobs, up to ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]


class ThreadingMixIn:
    """Run each request of a sync ``handle()`` in its own (reused) thread.

    Put it first in the bases, as with the stdlib: ``class
    ThreadingTCPServer(ThreadingMixIn, TCPServer)``. Async handlers are
    unaffected: they always run as tasks.

    ``max_threads`` bounds the threads running handlers at once; when they are
    all busy the server stops accepting and new clients wait in the kernel
    backlog. Default ``None``: unbounded, like the stdlib.
    ``daemon_threads``: when True, shutdown does not wait for handler threads
    that are still running after ``shutdown_grace`` (they are abandoned and
    keep running). ``block_on_close``: when True, ``server_close()`` joins
    handler threads that shutdown had to abandon.
    """

    max_threads: int | None = None
    daemon_threads: bool = False
    block_on_close: bool = True

    def _sync_capacity(self) -> int | None:
        return self.max_threads
