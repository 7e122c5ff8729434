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
        """Call the function on this thread; then :meth:`deliver` wakes the waiting task."""
        _current.server = self._server
        try:
            self._result = self._fn(*self._args)
        except BaseException as exc:  # handed over to the awaiting task
            self._error = exc
        finally:
            _current.server = None
            self._finished.set()

    def deliver(self) -> None:
        """Wake the task waiting in :meth:`wait` (thread-safe)."""
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


@attrs.define(eq=False)
class _Worker:
    """One pool thread and the queue it takes its jobs from."""

    thread: threading.Thread = attrs.field(init=False)
    inbox: queue.SimpleQueue[Job | None] = attrs.Factory(queue.SimpleQueue)
    job: Job | None = None  # the job it runs (guarded by the pool's lock)


@attrs.define(eq=False)
class HandlerThreads:
    """Reusable threads for one serve_forever() or handle_request() call.

    A thread is started only when no idle one is waiting, so the pool grows to
    the peak number of concurrent sync requests (bounded by the server's
    capacity) and no further. Work goes to the most recently idle thread, and
    a thread marks itself idle *before* it wakes the task that waited for its
    job, so steady traffic keeps reusing a few threads while the rest of a
    burst's peak sits idle for ``IDLE_THREAD_TIMEOUT`` seconds and exits.
    :meth:`close` makes every idle thread exit and joins it, so after a run the
    process has no handler thread left, except those still running abandoned
    jobs (see the server's shutdown rules).
    Unlike ``trio.to_thread``'s process-wide cache, whose idle threads linger
    for seconds, this keeps the "no thread outlives its server" promise.
    """

    daemon: bool
    server: object
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _idle: list[_Worker] = attrs.Factory(list)  # most recently idle last
    _workers: list[_Worker] = attrs.Factory(list)

    @property
    def has_threads(self) -> bool:
        """Whether any thread of this pool may still be alive."""
        return any(w.thread.is_alive() for w in self._workers)

    def submit(self, fn: Callable[..., object], *args: Any) -> Job:
        """Start ``fn(*args)`` on a pool thread; must be called from the trio thread."""
        job = Job(fn, args, trio.lowlevel.current_trio_token(), self.server)
        with self._lock:
            if self._idle:
                worker, start = self._idle.pop(), False
            else:
                worker, start = self._new_worker(), True
            worker.job = job
        worker.inbox.put(job)
        if start:
            worker.thread.start()
        return job

    def _new_worker(self) -> _Worker:
        worker = _Worker()
        worker.thread = threading.Thread(
            target=self._work,
            args=(worker,),
            name=f"trio_socketserver handler {next(_thread_names)}",
            daemon=self.daemon,
        )
        self._workers.append(worker)
        return worker

    def _work(self, worker: _Worker) -> None:
        while True:
            try:
                job = worker.inbox.get(timeout=IDLE_THREAD_TIMEOUT)
            except queue.Empty:
                with self._lock:
                    # Leave only while nobody has claimed this thread; if submit() just
                    # did, its job is on the way: take it.
                    if worker in self._idle:
                        self._idle.remove(worker)
                        self._workers.remove(worker)
                        return
                continue
            if job is None:
                return
            job.run()
            with self._lock:
                worker.job = None
                self._idle.append(worker)
            job.deliver()

    def close(self) -> None:
        """Make every thread exit once idle; join all but those running abandoned jobs.

        Call it once no task waits for a job any more: every thread is then idle
        or finishing a job whose result was delivered (each exits at once on
        its sentinel, so these joins are short), or running an abandoned job;
        those exit when the job ends, and :meth:`join` waits for them.
        """
        with self._lock:
            workers = list(self._workers)
            abandoned = [w for w in workers if w.job is not None and w.job.abandoned]
        for worker in workers:
            worker.inbox.put(None)
        for worker in workers:
            if worker not in abandoned:
                worker.thread.join()
        with self._lock:
            self._workers = [w for w in workers if w.thread.is_alive()]

    def join(self, timeout: float | None) -> None:
        """Join threads still running abandoned jobs, up to ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            worker.thread.join(remaining)
        self._workers = [w for w in self._workers if w.thread.is_alive()]


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
