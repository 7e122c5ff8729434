# BaseServer: the engine every front door drives. It owns the serve loop, the
# handler nursery, the capacity limit, shutdown and the stdlib's hook sequence
# (get_request -> verify_request -> process_request -> finish_request ->
# shutdown_request). Address families live in _families.py; what a handler
# sees lives in _handlers.py. Hooks may be sync or async: the engine awaits
# whatever a hook returns when it is awaitable, so blocking front doors can
# override them with plain functions.
from __future__ import annotations

import contextvars
import errno
import functools
import inspect
import logging
import math
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from ._threading import HandlerThreads, running_handler_for

LOGGER = logging.getLogger("trio_socketserver")

T = TypeVar("T")

# Accept failures that mean "the process or system is out of something"; the
# pending connection stays in the backlog, so we back off and try again.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# How long the accept loop sleeps after a capacity error: long enough not to
# spin the CPU, short enough to pick up within a blink once fds free up.
ACCEPT_BACKOFF = 0.100
# At most one capacity warning per this many seconds: an fd shortage under load
# would otherwise write ten log lines a second.
CAPACITY_LOG_INTERVAL = 10.0
# Accept failures that concern only the one connection being accepted (it was
# reset or its route vanished before we took it): skip it and keep serving.
ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EPERM",
    )
    if hasattr(errno, name)
)
# Threads cannot be cancelled. When a handler thread outlives the shutdown
# grace, its connection is shut down so blocked socket I/O returns; a thread
# that still has not returned this many seconds later is abandoned (logged).
THREAD_RELEASE_TIMEOUT = 1.0
# How long shutdown_request() may take once a stop has cut its request: long enough for an
# async override to close the connection, short enough not to hold a hard stop.
END_REQUEST_TIMEOUT = 1.0

# Errors that mean the peer misbehaved or went away; handle_error logs them as
# one line rather than a traceback, since there is no bug to see.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    ssl.SSLError,  # a failed handshake (plaintext, aborted); trio reports it as broken
    trio.BrokenResourceError,
    trio.TooSlowError,
)


async def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call a hook that may be sync or async, and return its result."""
    result = hook(*args)
    # Most hooks are sync and return None or a bool: skip the (slow) Awaitable ABC check.
    if result is None or result is True or result is False:
        return result
    if inspect.isawaitable(result):
        return await result
    return result


# The connection socket the current handler task was accepted with: lets the handler's
# reader and writer use it directly (see accepted_socket_under). A context variable, because
# each request runs in its own task and the stdlib's hook signatures have no room for it.
_accepted_socket: contextvars.ContextVar[socket.socket] = contextvars.ContextVar(
    "trio_socketserver_accepted_socket"
)


def accepted_socket_under(stream: object) -> socket.socket | None:
    """The accepted stdlib socket under ``stream``, if ``stream`` is a plain
    ``trio.SocketStream`` on it (not TLS, not a stream a hook substituted)."""
    sock = _accepted_socket.get(None)
    if (
        sock is None
        or not isinstance(stream, trio.SocketStream)
        or stream.socket.fileno() != sock.fileno()
    ):
        return None
    return sock


def is_async_handler(handler_class: object) -> bool:
    """Whether ``handler_class`` has an ``async def handle`` (runs as a task)."""
    return _is_coroutine_function(getattr(handler_class, "handle", None))


# Asked several times per request; keyed by the function itself, so a class whose
# handle() is replaced is asked afresh.
_is_coroutine_function = functools.lru_cache(maxsize=1024)(inspect.iscoroutinefunction)


@attrs.define(eq=False)
class RateLimitedWarning:
    """A warning logged at most once per ``CAPACITY_LOG_INTERVAL`` seconds.

    Measured on trio's clock, not time.monotonic(): the same clock as the backoff sleeps
    between the retries it reports, so the rate holds under a MockClock too.
    """

    _last: float = -math.inf

    def log(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now - self._last >= CAPACITY_LOG_INTERVAL:
            self._last = now
            LOGGER.warning(message, *args)


@attrs.frozen
class ServerStatistics:
    """Counters of one server, from :meth:`BaseServer.statistics`."""

    active_requests: int
    """Requests being handled right now."""
    accepted_requests: int
    """Requests taken from the socket since the server was created."""
    finished_requests: int
    """Requests whose handling ran to completion (successfully or with an error)."""
    cancelled_requests: int
    """Requests cut by a shutdown (grace expired) or a hard stop."""
    serving: bool
    """Whether ``serve_forever()`` is running."""
    failed_requests: int = 0
    """Requests whose handler raised (reported through ``handle_error``)."""


@attrs.define(eq=False)
class _Run:
    """One call of serve_forever(): how other threads and tasks reach it."""

    token: trio.lowlevel.TrioToken
    loops: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stop_requested: bool = False
    finished: threading.Event = attrs.Factory(threading.Event)

    def request_stop(self) -> None:
        self.stop_requested = True
        self.loops.cancel()


@attrs.define(eq=False)
class _Workers:
    """Where the requests of one serve_forever()/handle_request() call run."""

    nursery: trio.Nursery
    limiter: trio.CapacityLimiter
    threads: HandlerThreads
    slot: object = None  # the capacity token of the request being dispatched


class BaseServer:
    """The serve loop, lifecycle and hooks shared by every server class.

    The hook sequence and names are the stdlib's. Each request runs in its own
    task in the server's handler nursery: an ``async def handle`` directly, a
    sync ``handle`` on a reusable thread (one at a time unless a mixin says
    otherwise), without ever blocking the trio loop.

    Class attributes (set them on a subclass or an instance):

    ``timeout``: seconds :meth:`handle_request` waits for a request before
    calling :meth:`handle_timeout`; ``None`` waits forever.

    ``shutdown_grace``: seconds in-flight requests get after :meth:`shutdown`
    before they are cancelled; ``None`` waits for them however long they take
    (the stdlib's behaviour). Default 5.0: enough for ordinary requests to
    finish, well inside the 30 s (Kubernetes) or 90 s (systemd) a supervisor
    allows before killing a process that is stopping.

    ``max_connections``: how many requests with an async handler may run at
    once; when that many run, the server stops accepting and new clients wait
    in the kernel backlog (``request_queue_size``) instead of in memory.
    Default ``None``: bounded only by the process's file descriptors.
    """

    socket: socket.socket
    timeout: float | None = None
    shutdown_grace: float | None = 5.0
    max_connections: int | None = None
    daemon_threads: bool = False
    block_on_close: bool = True

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
    ) -> None:
        self.server_address: Any = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self._run: _Run | None = None
        self._shutdown_pending = False
        self._run_lock = threading.Lock()
        self._closed = False
        self._workers: _Workers | None = None
        self._leftover_threads: list[HandlerThreads] = []
        self._capacity_warning = RateLimitedWarning()
        self._accepted = 0
        self._finished = 0
        self._cancelled = 0
        self._active = 0

    # -- serving ------------------------------------------------------------

    async def serve_forever(
        self,
        poll_interval: float | None = 0.5,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Handle requests until :meth:`shutdown` is called or the caller is cancelled.

        Reports started (for ``await nursery.start(server.serve_forever)``) once
        the socket is accepting. :meth:`service_actions` runs after every
        request and every ``poll_interval`` seconds (``None``: only after
        requests); shutdown never waits for the interval.

        Cancellation: cancelling the scope around it is a hard stop: handler
        tasks are cancelled at once and every connection socket is closed;
        handler threads get their sockets shut down so blocked I/O returns.
        :meth:`shutdown` is the graceful stop: no new requests are accepted,
        in-flight ones get ``shutdown_grace`` seconds, then are cancelled as
        above. It returns once every handler task and (non-daemon) handler
        thread has finished.

        Errors: a handler's exception goes to :meth:`handle_error` and the
        server keeps serving. ``RuntimeError`` if it is already running (call
        :meth:`shutdown` first) or the server was closed.
        """
        run = _Run(trio.lowlevel.current_trio_token())
        # Under the lock, so that a shutdown() from another thread either sees this
        # run or leaves _shutdown_pending for it: never neither.
        with self._run_lock:
            self._check_can_serve()
            if self._shutdown_pending:
                # shutdown() before serve_forever(): as in the stdlib, it makes the
                # next serve_forever() return at once.
                self._shutdown_pending = False
                run.request_stop()
            self._run = run
        try:
            async with self._open_workers() as workers:
                try:
                    with run.loops:
                        async with trio.open_nursery() as loops:
                            loops.start_soon(self._serve_requests, workers, run)
                            if poll_interval is not None:
                                loops.start_soon(self._run_service_actions, poll_interval)
                            task_status.started()
                            if run.stop_requested:
                                loops.cancel_scope.cancel()
                finally:
                    grace = self.shutdown_grace
                    if grace is not None:
                        workers.nursery.cancel_scope.deadline = trio.current_time() + grace
        finally:
            self._run = None
            run.finished.set()

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever`: stop accepting, drain, return.

        Idempotent. Without a running :meth:`serve_forever`, it makes the next
        one return at once (as the stdlib).

        Thread safety: callable from the trio thread (any task, a handler
        included), from any other thread, and from inside a sync handler. On
        the trio thread it requests the stop and returns at once; from a
        handler thread of this server likewise (waiting there would wait for
        itself, the stdlib's deadlock); from any other thread it returns once
        :meth:`serve_forever` has returned, as the stdlib's does.
        """
        with self._run_lock:
            run = self._run
            if run is None:
                self._shutdown_pending = True
                return
        try:
            on_trio_thread = trio.lowlevel.current_trio_token() is run.token
        except RuntimeError:
            on_trio_thread = False
        if on_trio_thread:
            run.request_stop()
            return
        try:
            run.token.run_sync_soon(run.request_stop)
        except trio.RunFinishedError:
            return
        if not running_handler_for(self):
            run.finished.wait()

    @property
    def shutdown_requested(self) -> bool:
        """True once :meth:`shutdown` was called on the running server.

        Handlers can poll it during ``shutdown_grace`` to finish early, e.g. to
        close a keep-alive connection after the current request.
        """
        return self._run is not None and self._run.stop_requested

    async def handle_request(self) -> None:
        """Wait for one request, handle it to completion, return.

        Waits at most ``timeout`` seconds, then calls :meth:`handle_timeout`.
        Unlike the stdlib with a threading mixin, it returns only once that
        request's handler has finished, so nothing outlives the call.

        Cancellation: as a hard stop of :meth:`serve_forever`.
        """
        self._check_can_serve()
        async with self._open_workers() as workers:
            with trio.move_on_after(math.inf if self.timeout is None else self.timeout) as waited:
                request, client_address = await self._get_request()
            if waited.cancelled_caught:
                await call_hook(self.handle_timeout)
                return
            await self._admit_request(workers, request, client_address)

    def _check_can_serve(self) -> None:
        if self._closed:
            raise RuntimeError("the server is closed; create a new server to serve again")
        if self._run is not None:
            raise RuntimeError("serve_forever() is already running; call shutdown() first")

    @asynccontextmanager
    async def _open_workers(self) -> AsyncIterator[_Workers]:
        capacity = self._capacity()
        limiter = trio.CapacityLimiter(math.inf if capacity is None else capacity)
        threads = HandlerThreads(daemon=self.daemon_threads, server=self)
        # get_request() must not block the trio thread: the engine waits for
        # readability itself and treats BlockingIOError as "nothing yet".
        self.socket.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                self._workers = _Workers(nursery, limiter, threads)
                yield self._workers
        finally:
            self._workers = None
            threads.close()
            if threads.has_threads:
                self._leftover_threads.append(threads)

    def _capacity(self) -> int | None:
        """How many requests may run at once: the limit that stops the accept loop."""
        limit = self.max_connections if self._handler_is_async() else self._sync_capacity()
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"request limit must be a positive int or None, not {limit!r}")
        grace = self.shutdown_grace
        if grace is not None and not grace >= 0:
            raise ValueError(f"shutdown_grace must be >= 0 seconds or None, not {grace!r}")
        return limit

    def _sync_capacity(self) -> int | None:
        """Concurrent sync requests: one, a synchronous server; mixins raise it."""
        return 1

    def _handler_is_async(self) -> bool:
        return is_async_handler(self.RequestHandlerClass)

    async def _serve_requests(self, workers: _Workers, run: _Run) -> None:
        while True:
            slot = object()
            await workers.limiter.acquire_on_behalf_of(slot)
            # acquire() may not check for cancellation; shutdown() must take
            # effect before the next accept even under a flood of clients.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                request, client_address = await self._get_request()
            except BaseException:
                workers.limiter.release_on_behalf_of(slot)
                raise
            workers.slot = slot
            await self._admit_request(workers, request, client_address)
            await call_hook(self.service_actions)

    async def _admit_request(self, workers: _Workers, request: Any, client_address: Any) -> None:
        """verify_request, then process_request; frees the capacity slot if no task took it."""
        self._accepted += 1
        try:
            try:
                verified = await call_hook(self.verify_request, request, client_address)
            except trio.Cancelled:
                # A stop cut an async verify_request(): no task owns the request yet.
                await self._end_request(request)
                raise
            if verified:
                await call_hook(self.process_request, request, client_address)
            else:
                await self._end_request(request)
        except Exception:
            await self._report_error(request, client_address)
            await self._end_request(request)
        finally:
            if workers.slot is not None:
                workers.limiter.release_on_behalf_of(workers.slot)
                workers.slot = None

    async def _get_request(self) -> tuple[Any, Any]:
        """get_request(), waiting until the socket is readable; survives fd exhaustion."""
        while True:
            try:
                request: tuple[Any, Any] = await call_hook(self.get_request)
                return request
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(self.socket)
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP_ERRNOS:
                    await trio.lowlevel.checkpoint()
                elif exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    self._log_capacity(exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                else:
                    raise

    def _log_capacity(self, exc: OSError) -> None:
        self._capacity_warning.log(
            "cannot accept on %s: %s; retrying every %.1f s until resources free up "
            "(raise the fd limit, e.g. ulimit -n, or lower max_connections)",
            self.server_address,
            exc,
            ACCEPT_BACKOFF,
        )

    async def _run_service_actions(self, poll_interval: float) -> None:
        while True:
            await trio.sleep(poll_interval)
            await call_hook(self.service_actions)

    # -- running one request ---------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start handling the request in its own task; returns at once.

        An async handler runs in the task; a sync one on a handler thread,
        where :meth:`finish_request`, :meth:`handle_error` and
        :meth:`shutdown_request` are called as the stdlib calls them.
        Must be called from the serve loop (the trio thread).
        """
        workers = self._workers
        if workers is None:
            raise RuntimeError("process_request() is only called while the server is serving")
        slot, workers.slot = workers.slot, None
        workers.nursery.start_soon(self._handle, workers, slot, request, client_address)

    async def _handle(
        self, workers: _Workers, slot: object, request: Any, client_address: Any
    ) -> None:
        self._active += 1
        try:
            if self._handler_is_async():
                # Inline, not in a helper: every coroutine frame under this task is memory
                # that each idle connection holds for as long as it lives.
                if isinstance(request, socket.socket):
                    _accepted_socket.set(request)
                try:
                    running = self.finish_request(self._async_request(request), client_address)
                    if inspect.isawaitable(running):
                        await running
                except Exception:
                    await self._report_error(request, client_address)
                finally:
                    await self._end_request(request)
            else:
                await self._handle_sync(workers, request, client_address)
            self._finished += 1
        except trio.Cancelled:
            self._cancelled += 1
            raise
        finally:
            self._active -= 1
            if slot is not None:
                workers.limiter.release_on_behalf_of(slot)

    async def _end_request(self, request: Any) -> None:
        """shutdown_request(); an async override is awaited shielded, so a stop cannot cut
        it before it closed the connection, and bounded, so it cannot hold a stop either.
        """
        result = self.shutdown_request(request)
        if inspect.isawaitable(result):
            with trio.CancelScope(shield=True), trio.move_on_after(END_REQUEST_TIMEOUT):
                await result

    def _async_request(self, request: Any) -> Any:
        """What an async handler's ``self.request`` is for this raw request."""
        return request

    def _blocking_request(self, request: Any) -> Any:
        """A sync handler's ``self.request``; runs on its thread (TLS handshakes there)."""
        return request

    def _handle_blocking(self, connection: list[Any], client_address: Any) -> None:
        """The stdlib's request sequence, run on a handler thread.

        ``connection[0]`` is the request; it is replaced by what
        _blocking_request() made of it, so a shutdown can release that.
        """
        try:
            connection[0] = self._blocking_request(connection[0])
            self.finish_request(connection[0], client_address)
        except Exception:
            try:
                self.handle_error(connection[0], client_address)
            except Exception:
                LOGGER.exception("handle_error() raised while reporting %r", client_address)
        finally:
            self.shutdown_request(connection[0])

    async def _handle_sync(self, workers: _Workers, request: Any, client_address: Any) -> None:
        """Run a sync handler's request to completion: on a handler thread.

        The one place a mixin changes to run sync requests elsewhere (worker
        processes); it must call the stdlib sequence (:meth:`_handle_blocking`)
        or its equivalent, and on cancellation release blocked I/O.
        """
        connection = [request]
        job = workers.threads.submit(self._handle_blocking, connection, client_address)
        try:
            await job.wait()
        except trio.Cancelled:
            if not job.finished:
                _release(connection[0])
            if not self.daemon_threads:
                with trio.CancelScope(shield=True), trio.move_on_after(THREAD_RELEASE_TIMEOUT):
                    await job.wait()
            if not job.finished:
                job.abandoned = True
                LOGGER.warning(
                    "handler thread for %r did not return after its connection was shut "
                    "down; abandoning it (threads cannot be cancelled)",
                    client_address,
                )
            raise

    async def _report_error(self, request: Any, client_address: Any) -> None:
        try:
            await call_hook(self.handle_error, request, client_address)
        except Exception:
            LOGGER.exception("handle_error() raised while reporting %r", client_address)

    # -- hooks (the stdlib's names and order) -----------------------------

    def server_activate(self) -> None:
        """Called by a family's constructor after binding; the stdlib's BaseServer does nothing."""

    def service_actions(self) -> None:
        """Called by :meth:`serve_forever` after each request and every poll interval."""

    def get_request(self) -> tuple[Any, Any]:
        """Take one request from the socket without blocking.

        Raise ``BlockingIOError`` when none is ready; the engine then waits
        until the socket is readable and calls it again.
        """
        raise NotImplementedError

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return False to refuse the request (the client sees the connection closed)."""
        return True

    def finish_request(self, request: Any, client_address: Any) -> Any:
        """Build the handler. For an async handler, returns the awaitable that runs it."""
        handler = self.RequestHandlerClass(request, client_address, self)
        if is_async_handler(type(handler)):
            return handler.run()
        return None

    def shutdown_request(self, request: Any) -> Any:
        """Called once a request is done to end it; the default closes it.

        Returns what :meth:`close_request` returns, so the engine awaits an async override.
        """
        return self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Clean up a request; the default does nothing."""

    def handle_timeout(self) -> None:
        """Called when :meth:`handle_request` saw no request within ``timeout``."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Report an exception from handling a request; the server keeps serving.

        Called from inside the ``except`` block. The default logs the traceback
        through ``logging.getLogger("trio_socketserver")``; a peer that reset,
        timed out or broke the connection is logged as one line at INFO.
        """
        error = sys.exc_info()[1]
        # trio reports a failed TLS handshake (a plaintext client, say) as a broken stream
        # caused by the SSLError: name the handshake, not the stream.
        if isinstance(error, trio.BrokenResourceError) and isinstance(
            error.__cause__, ssl.SSLError
        ):
            error = error.__cause__
        if isinstance(error, ssl.SSLError):
            LOGGER.info("connection from %r: TLS handshake failed: %s", client_address, error)
        elif isinstance(error, PEER_ERRORS):
            LOGGER.info("connection from %r ended: %r", client_address, error)
        else:
            LOGGER.exception("exception while handling a request from %r", client_address)

    # -- resources -------------------------------------------------------

    def server_close(self) -> None:
        """Close the server socket; afterwards ``fileno()`` is -1.

        If :meth:`serve_forever` is running, it is shut down first (see
        :meth:`shutdown` for which threads wait). With ``block_on_close``, it
        then joins handler threads a shutdown had to abandon, for at most
        ``shutdown_grace`` seconds. Idempotent.
        """
        if self._run is not None:
            self.shutdown()
        self._closed = True
        self._close_socket()
        if self.block_on_close and not self.daemon_threads:
            for threads in self._leftover_threads:
                threads.join(self.shutdown_grace)
        self._leftover_threads = [t for t in self._leftover_threads if t.has_threads]

    def _close_socket(self) -> None:
        """Close what the server listens on; BaseServer has no socket of its own (the
        stdlib's ``BaseServer.server_close()`` does nothing either), the families close theirs."""

    def fileno(self) -> int:
        """The server socket's file descriptor."""
        raise NotImplementedError

    def statistics(self) -> ServerStatistics:
        """Request counters, for monitoring and stop reports."""
        return ServerStatistics(
            active_requests=self._active,
            accepted_requests=self._accepted,
            finished_requests=self._finished,
            cancelled_requests=self._cancelled,
            serving=self._run is not None,
        )

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.server_close()


def _release(request: Any) -> None:
    """Make blocked I/O on a sync handler's socket return, from another thread.

    The plain socket method is used even on an ``ssl.SSLSocket``, whose own
    ``shutdown()`` would also tear down its TLS state under the reading thread.
    """
    if isinstance(request, socket.socket):
        try:
            socket.socket.shutdown(request, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected: nothing is blocked on it
