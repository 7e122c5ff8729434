# The engine: everything a server does between the stdlib's hooks. One Engine object per
# server, reached only through BaseServer's one name-mangled attribute, holds the serve loop,
# the handler nursery, the capacity limit, the stop machinery, the counters and the state of
# the current run, so that nothing here shares a namespace with users' server subclasses.
# What a server looks like from outside (the stdlib's hooks and names) lives in _server.py;
# how a sync request runs on a thread in _threading.py; the socket stream in _socket_stream.py.
from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import inspect
import logging
import math
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from ._drain import Drain, Exchange
from ._proxy import ProxyProtocolError
from ._proxy import _current as _current_proxy_header
from ._proxy_admission import (
    ProxySettings,
    proxied_address,
    proxy_settings,
    take_proxy_header,
    take_proxy_header_blocking,
)
from ._socket_stream import SocketFastStream
from ._threading import ThreadingMixIn, record_failure, run_in_thread

LOGGER = logging.getLogger("trio_socketserver")
# One line per request, at INFO: peer, outcome, duration and bytes. Opt-in: written only when
# this logger's own level is set (the CLI's --access-log does), never merely inherited, so an
# application whose root logger is at INFO does not start logging every request (a blocking
# logging handler, e.g. an HTTPHandler, would then run on the trio thread for each one).
ACCESS_LOG = logging.getLogger("trio_socketserver.access")
# The families whose sockets have TCP options (Nagle, TCP_NOTSENT_LOWAT).
TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# What trio.SocketStream sets TCP_NOTSENT_LOWAT to, where the platform has it.
NOTSENT_LOWAT_BYTES = 2**14


def _access_log_enabled() -> bool:
    return ACCESS_LOG.level != logging.NOTSET and ACCESS_LOG.isEnabledFor(logging.INFO)


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
# The most connections (or datagrams) a graceful stop takes from the kernel's queue after it
# stopped accepting: all of a backlog, but a bound on what a flood can add meanwhile.
BACKLOG_LIMIT = 4096
# How many connections the accept loop takes in a row without passing through trio's
# scheduler when capacity is free: a burst of clients costs one wake-up of the loop instead of
# one per client, and the requests' tasks still start at least this often under a flood.
ACCEPT_BATCH = 16
# How long shutdown_request() may take once a stop has cut its request: long enough for an
# async override to close the connection, short enough not to hold a hard stop.
END_REQUEST_TIMEOUT = 1.0


class _NoDeadline:
    """What a request runs in when the server has no request_deadline (the default): a
    cancel scope would cost every request a few microseconds for nothing. Reusable: it holds
    no state. Its methods are static because a ``with`` block keeps its manager's bound
    ``__exit__`` for as long as the block runs, a new object held by every idle connection,
    where a static method is the function itself."""

    @staticmethod
    def __enter__() -> None:
        return None

    @staticmethod
    def __exit__(*exc_info: object) -> None:
        return None


_NO_DEADLINE = _NoDeadline()
# The handler attributes that bound one rfile/wfile call of an async handler; a sync handler
# reads and writes with the stdlib's file objects, which they cannot bound.
NATIVE_DEADLINES = ("read_deadline", "write_deadline")
# Hooks that a sync handler's request calls on its own thread (or worker process), where
# nothing could await what an async override returns.
SYNC_REQUEST_HOOKS = (
    "finish_request",
    "handle_error",
    "shutdown_request",
    "close_request",
    "process_request_thread",
)


async def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call a hook that may be sync or async, and return its result."""
    result = hook(*args)
    # Most hooks are sync and return None, a bool or (get_request) a tuple: skip the (slow)
    # Awaitable ABC check.
    if result is None or result is True or result is False or type(result) is tuple:
        return result
    if inspect.isawaitable(result):
        return await result
    return result


def is_async_handler(handler_class: object) -> bool:
    """Whether ``handler_class`` has an ``async def handle`` (runs as a task)."""
    return _is_coroutine_function(getattr(handler_class, "handle", None))


# Asked several times per request; keyed by the function itself, so a class whose
# handle() is replaced is asked afresh.
_is_coroutine_function = functools.lru_cache(maxsize=1024)(inspect.iscoroutinefunction)


def check_deadlines(server: Any) -> float | None:
    """The server's ``request_deadline``, read once as serving starts; ValueError for one
    that is not None or seconds >= 0, and for ``read_deadline``/``write_deadline`` on a sync
    handler, which could not honour them."""
    deadline: float | None = server.request_deadline
    if deadline is not None and not deadline >= 0:
        raise ValueError(f"request_deadline must be >= 0 seconds or None, not {deadline!r}")
    handler_class = server.RequestHandlerClass
    if is_async_handler(handler_class):
        return deadline
    for name in NATIVE_DEADLINES:
        if getattr(handler_class, name, None) is not None:
            raise ValueError(
                f"{handler_class.__name__}.{name} is set, but its handle() is a plain def: a "
                "sync handler reads and writes with the stdlib's file objects, which only "
                "its timeout bounds (each wait); bound its requests with the server's "
                "request_deadline instead, or make handle() async"
            )
    return deadline


def reject_async_hooks(server: object, names: tuple[str, ...], where: str) -> None:
    """TypeError for a hook in ``names`` that ``server`` overrides with an ``async def``."""
    for name in names:
        if inspect.iscoroutinefunction(getattr(type(server), name, None)):
            raise TypeError(
                f"{type(server).__name__}.{name}() is async, but it runs {where}, where "
                "nothing can await it; make it a plain def (see 'Which hooks may be async' "
                "in the docs)"
            )


@attrs.frozen
class ServerStatistics:
    """Counters of one server, from :meth:`BaseServer.statistics`."""

    active_requests: int
    """Requests being handled right now."""
    accepted_requests: int
    """Requests taken from the socket since the server was created."""
    finished_requests: int
    """Requests whose handler ran to completion without raising."""
    failed_requests: int
    """Requests whose handling raised (reported through ``handle_error``)."""
    cancelled_requests: int
    """Requests cut short: by a shutdown (grace expired), a hard stop or ``request_deadline``."""
    refused_requests: int
    """Requests closed before any handler saw them: ``verify_request()`` said no, or a PROXY
    protocol header was rejected (those are also in ``proxy_rejected_requests``)."""
    proxy_rejected_requests: int
    """Connections closed because their PROXY protocol header was missing, malformed, too
    slow, or came from a peer not in ``proxy_trusted``."""
    serving: bool
    """Whether ``serve_forever()`` is running."""
    draining: bool
    """Whether a shutdown has begun and ``serve_forever()`` has not returned yet: a balancer
    should send no new clients (``/ready`` answers 503)."""


@attrs.define(eq=False)
class Connection:
    """What the engine made of one async stream request: the stream its rfile/wfile use
    (``io``: the fast socket stream under a plain connection, the TLS stream itself with TLS)
    and what the handler sees as ``self.request``.

    A plain connection's ``request`` (a ``trio.SocketStream``) is made the first time
    something asks for it. A handler that only reads and writes its rfile and wfile never
    does, and making one costs every connection three objects and three socket options (it
    turns Nagle off, then the handler's setup() puts it back as ``disable_nagle_algorithm``
    says). Until then the socket has what the stream would have given it, except Nagle,
    which is as the handler asked. See BaseRequestHandler.__init__ for how a handler gets its
    ``self.request`` from here.
    """

    sock: socket.socket
    io: trio.abc.Stream
    _request: trio.abc.Stream | None = None
    nodelay: bool | None = None
    """What the handler's setup() set TCP_NODELAY to (None: it did not), restored after the
    request stream is made, since trio.SocketStream turns Nagle off."""

    @classmethod
    def plain(cls, sock: socket.socket) -> Connection:
        connection = cls(sock, SocketFastStream(sock))
        # trio.SocketStream's other default, which the fast stream's sends rely on as much:
        # a send waits for the peer once 16 KiB are unsent, rather than buffer megabytes.
        if hasattr(socket, "TCP_NOTSENT_LOWAT"):
            with contextlib.suppress(OSError):  # not a TCP socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
        return connection

    @property
    def request(self) -> trio.abc.Stream:
        """The handler's ``self.request``, made now if it was not yet."""
        request = self._request
        if request is None:
            request = self._request = trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))
            if self.nodelay is not None:
                self.set_nodelay(self.nodelay)
        return request

    def set_nodelay(self, nodelay: bool) -> None:
        """TCP_NODELAY as a stream handler's ``disable_nagle_algorithm`` says (TCP only);
        kept if the request stream is made later."""
        self.nodelay = nodelay
        set_nodelay(self.sock, nodelay)


def set_nodelay(sock: trio.socket.SocketType | socket.socket | None, nodelay: bool) -> None:
    """TCP_NODELAY on ``sock`` if it is a TCP socket (there is no Nagle elsewhere)."""
    if sock is not None and sock.family in TCP_FAMILIES:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)


# The connection of the request the current task handles, when its handler got the request
# stream itself (see Engine._run_request): how its rfile/wfile find the fast stream under it.
# A context variable, because each request runs in its own task and the stdlib's hook
# signatures have no room for it.
_connection: contextvars.ContextVar[Connection] = contextvars.ContextVar(
    "trio_socketserver_connection"
)


def io_stream_for(request: object) -> Any:
    """The stream a stream handler's rfile/wfile should use for ``request``: the engine's
    fast stream when ``request`` is the connection the engine made for this task (or that
    connection itself), else ``request`` itself (a hook substituted its own, or a test passed
    a memory stream)."""
    if isinstance(request, Connection):
        return request.io
    connection = _connection.get(None)
    if connection is not None and connection.request is request:
        return connection.io
    return request


@functools.cache
def _lazy_request_defaults() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """BaseServer.finish_request and BaseRequestHandler.__init__ (see
    Engine._passes_connection); imported here, late, since their modules are built on this
    one."""
    from ._handlers import BaseRequestHandler
    from ._server import BaseServer

    return BaseServer.finish_request, BaseRequestHandler.__init__


def drain_exchange(server: object, request: object) -> Exchange | None:
    """The drain state of a stream handler's connection (see Engine.exchange_for); None for
    a server without an engine (a ForkingMixIn worker's view, a test's stand-in)."""
    engine: Engine | None = getattr(server, "_BaseServer__engine", None)
    return None if engine is None else engine.exchange_for(request)


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


@attrs.define(eq=False)
class CapacitySlot:
    """One request's place under the server's capacity limit.

    The accept loop takes it before accepting. The request's task gives it back when the
    request ends, unless the request runs on a thread: this object is then the
    ``limiter`` of ``trio.to_thread.run_sync``, so the place is given back when the thread
    really returns, even after a stop abandoned it.
    """

    limiter: trio.CapacityLimiter
    held: bool = False
    on_thread: bool = False

    async def take(self) -> None:
        await self.limiter.acquire_on_behalf_of(self)
        self.held = True

    def take_nowait(self) -> bool:
        """Take the place if one is free now, without a checkpoint; False if none is."""
        try:
            self.limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            return False
        self.held = True
        return True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.limiter.release_on_behalf_of(self)

    # The limiter protocol of trio.to_thread.run_sync: the place is already taken.
    async def acquire_on_behalf_of(self, borrower: object) -> None:
        self.on_thread = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self.give_back()


@attrs.define(eq=False)
class _Run:
    """One call of serve_forever(): how other threads and tasks reach it."""

    token: trio.lowlevel.TrioToken
    stop_requested: bool = False
    stopping: trio.Event = attrs.Factory(trio.Event)
    accepting: trio.CancelScope = attrs.Factory(trio.CancelScope)
    drain: Drain = attrs.Factory(Drain)
    finished: threading.Event = attrs.Factory(threading.Event)

    def request_stop(self, closing: bool = False) -> None:
        """On the trio thread: begin the stop sequence (see Engine.serve_forever).
        ``closing``: the listening socket is about to be closed, so accepting ends now,
        with no drain delay and no backlog to take."""
        self.stop_requested = True
        self.stopping.set()
        if closing:
            self.accepting.cancel()


@attrs.define(eq=False)
class _Requests:
    """Where the requests of one serve_forever()/handle_request() call run."""

    nursery: trio.Nursery
    limiter: trio.CapacityLimiter
    # Whether get_request() may only be called once the socket is readable (see
    # Engine.stdlib_manners); decided once per run, not per accept.
    readable_first: bool
    # The server's PROXY protocol settings, checked as the run starts; None: no header.
    proxy: ProxySettings | None
    request_deadline: float | None  # validated once per run, like the capacity limit


# A request's body, run by start_request(): returns whether the request failed.
RequestRunner = Callable[[CapacitySlot, Any, Any], Awaitable[bool]]


@attrs.define(eq=False)
class Engine:
    """The machinery behind one server; see the module comment."""

    server: Any
    stdlib_manners: bool = False
    """compat's: an overriding get_request() is called only once the socket is readable,
    and an OSError from it costs that request only, as in the stdlib; the server's
    ``ssl_context`` attribute is the user's (stdlib subclasses use that name for their own
    context), so the engine does no TLS."""
    run: _Run | None = None
    _shutdown_pending: bool = False
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _requests: _Requests | None = None
    _closed: bool = False
    adopting_socket: bool = False
    """from_socket() is running server_bind() on a socket bound elsewhere: the families
    record its address instead of binding it, and a Unix socket file is not theirs."""
    shared_socket: bool = False
    """The server's socket was made elsewhere (from_socket()): it may be shared with other
    processes, so its blocking mode is left alone once serving ends."""
    abandoned_threads: list[threading.Event] = attrs.Factory(list)
    _admissions: dict[trio.lowlevel.Task, CapacitySlot] = attrs.Factory(dict)
    """The place under the capacity limit of each request between get_request() and
    process_request(), until process_request() hands it to the request's task (see
    start_request); keyed by the task that admits it: the serve loop's, one request after
    another, or with the PROXY protocol each connection's own, several at once. Not a context
    variable: each request's task would inherit it, and hold it (in a context of its own)
    for as long as its connection lives."""
    _trio_socket: trio.socket.SocketType | None = None
    _capacity_warning: RateLimitedWarning = attrs.Factory(RateLimitedWarning)
    _accepted: int = 0
    _finished: int = 0
    _failed: int = 0
    _cancelled: int = 0
    _refused: int = 0
    proxy_rejected: int = 0
    _active: int = 0

    # -- serving ------------------------------------------------------------

    async def serve_forever(
        self, poll_interval: float | None, task_status: trio.TaskStatus[None]
    ) -> None:
        """The serve loop and the stop sequence of shutdown():

        1. draining: ``shutdown_requested`` turns true and ``wait_for_shutdown()`` returns,
           while the server keeps accepting for ``drain_delay`` seconds (a balancer that
           polls readiness moves its traffic away before anything is refused);
        2. the accept loop stops, the connections the kernel already queued are taken and
           served, and the listening socket is left alone from then on;
        3. the grace: requests in flight get ``shutdown_grace`` seconds, persistent
           connections end at a message boundary (see _drain.py), then the rest is cancelled.

        A shutdown() before serve_forever() makes it return at once (the stdlib's manners);
        cancelling the caller is a hard stop at any step.
        """
        run = _Run(trio.lowlevel.current_trio_token())
        drain_delay = self._drain_delay()
        # Under the lock, so that a shutdown() from another thread either sees this
        # run or leaves _shutdown_pending for it: never neither.
        with self._lock:
            self.check_can_serve()
            if self._shutdown_pending:
                self._shutdown_pending = False
                run.request_stop()
            self.run = run
        try:
            async with self._open_requests() as requests:
                deadline = math.inf
                drain = not run.stop_requested
                try:
                    with run.accepting:
                        async with trio.open_nursery() as loops:
                            loops.start_soon(self._serve_requests, requests)
                            if poll_interval is not None:
                                loops.start_soon(self._run_service_actions, poll_interval)
                            task_status.started()
                            await run.stopping.wait()
                            if drain:
                                await trio.sleep(drain_delay)
                            loops.cancel_scope.cancel()
                    grace = self.server.shutdown_grace
                    deadline = math.inf if grace is None else trio.current_time() + grace
                    # Idle persistent connections end first: with a capacity limit, the
                    # backlog's clients may be waiting for the places they hold.
                    run.drain.close_idle()
                    if drain and not run.accepting.cancel_called:
                        with trio.move_on_at(deadline):
                            await self._accept_backlog(requests)
                finally:
                    requests.nursery.cancel_scope.deadline = deadline
                    run.drain.close_idle()
        finally:
            self.run = None
            run.finished.set()

    def _drain_delay(self) -> float:
        delay = self.server.drain_delay
        if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay >= 0:
            raise ValueError(f"drain_delay must be a number of seconds >= 0, not {delay!r}")
        return float(delay)

    async def _accept_backlog(self, requests: _Requests) -> None:
        """Take and serve what is already queued on the listening socket: clients that
        connected (or datagrams that arrived) before the server stopped accepting.

        All of it is taken first, without yielding, so that clients served meanwhile cannot
        keep the queue full: what arrives after this sweep is left to the kernel.
        """
        server = self.server
        poller = select.poll()
        poller.register(server.socket, select.POLLIN)
        queued: list[tuple[Any, Any]] = []
        # get_request() may be a subclass's blocking one: call it only when there is a request.
        while len(queued) < BACKLOG_LIMIT and poller.poll(0):
            try:
                queued.append(await call_hook(server.get_request))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in ACCEPT_SKIP_ERRNOS:
                    LOGGER.info("stopped taking queued connections on %s: %r", server, exc)
                    break
        try:
            while queued:
                slot = CapacitySlot(requests.limiter)
                await slot.take()
                request, client_address = queued.pop(0)
                await self._admit_request(requests, slot, request, client_address)
        finally:
            # The grace ran out while they waited for a place: no handler saw them.
            for request, client_address in queued:
                self._refused += 1
                await self.end_request(request, client_address)

    async def handle_request(self) -> None:
        self.check_can_serve()
        timeout = self.server.timeout
        async with self._open_requests() as requests:
            with trio.move_on_after(math.inf if timeout is None else timeout) as waited:
                request, client_address = await self._get_request(requests)
            if waited.cancelled_caught:
                await call_hook(self.server.handle_timeout)
                return
            slot = CapacitySlot(requests.limiter)
            await slot.take()
            await self._admit_request(requests, slot, request, client_address)

    def handle_request_blocking(self, timeout: float | None) -> None:
        """compat's handle_request() for a sync handler: the stdlib's steps, in the calling
        thread, with no trio run (the stdlib's own cost for one request)."""
        self.check_can_serve()
        server = self.server
        reject_async_hooks(server, SYNC_REQUEST_HOOKS, "on a sync handler's thread")
        request_deadline = check_deadlines(server)
        proxy = proxy_settings(server)
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            if not selector.select(timeout):
                server.handle_timeout()
                return
        try:
            request, client_address = server.get_request()
        except OSError:
            return  # as the stdlib: the client went away, or another thread took it
        self._accepted += 1
        connection = [request]
        deadline = DeadlineTimer(connection)
        try:
            header = None
            if proxy is not None:
                try:
                    header = take_proxy_header_blocking(request, client_address, proxy)
                except ProxyProtocolError as error:
                    self._refuse_proxied(client_address, error)
                    self._end_request_blocking(request, client_address)
                    return
                client_address = proxied_address(header, request, client_address)
            token = _current_proxy_header.set(header)
            try:
                if not server.verify_request(request, client_address):
                    self._refused += 1
                    self._end_request_blocking(request, client_address)
                    return
                deadline.start(request_deadline)
                failed = self.blocking_sequence(connection, client_address)
            finally:
                _current_proxy_header.reset(token)
        except Exception:
            failed = True
            self._report_error_blocking(request, client_address)
            self._end_request_blocking(request, client_address)
        finally:
            deadline.stop()
        if deadline.passed:
            self._cancelled += 1
            _log_deadline(client_address, request_deadline)
        elif failed:
            self._failed += 1
        else:
            self._finished += 1

    def check_can_serve(self) -> None:
        if self.is_closed():
            raise RuntimeError(
                "the server's socket is closed; create a new server (or assign an open "
                "socket to server.socket) to serve again"
            )
        if self.run is not None:
            raise RuntimeError("serve_forever() is already running; call shutdown() first")

    def is_closed(self) -> bool:
        """Closed means: this server's socket is closed (a server without one: server_close()
        was called). A stdlib pattern gives a closed server a new socket and serves again."""
        sock = getattr(self.server, "socket", None)
        if isinstance(sock, socket.socket):
            return sock.fileno() == -1
        return self._closed

    @asynccontextmanager
    async def _open_requests(self) -> AsyncIterator[_Requests]:
        server = self.server
        request_deadline = check_deadlines(server)
        limit = self._request_limit()
        proxy = proxy_settings(server)
        if not is_async_handler(server.RequestHandlerClass):
            reject_async_hooks(server, SYNC_REQUEST_HOOKS, "on a sync handler's thread")
        limiter = trio.CapacityLimiter(math.inf if limit is None else limit)
        # get_request() must not block the trio thread: the engine waits for readability
        # itself and treats BlockingIOError as "nothing yet". The socket's own mode is put
        # back afterwards, for a caller that uses it blocking again; not a socket made
        # elsewhere (from_socket()): the mode belongs to the socket, shared by every process
        # that holds it, and other processes may be serving it still (the workers of a
        # supervisor: one put back to blocking would block the others' accepts).
        sock = getattr(server, "socket", None)
        saved_timeout = sock.gettimeout() if isinstance(sock, socket.socket) else None
        if isinstance(sock, socket.socket):
            sock.setblocking(False)
        try:
            async with trio.open_nursery() as nursery:
                readable_first = self.stdlib_manners and not _engine_get_request(server)
                self._requests = _Requests(
                    nursery, limiter, readable_first, proxy, request_deadline
                )
                yield self._requests
        finally:
            self._requests = None
            if isinstance(sock, socket.socket) and sock.fileno() != -1 and not self.shared_socket:
                sock.settimeout(saved_timeout)

    def _request_limit(self) -> int | None:
        """How many requests may run at once: the limit that stops the accept loop.

        ``max_connections`` for async handlers; for sync ones ``max_threads`` with
        ThreadingMixIn, ``max_children`` with ForkingMixIn's pool (forked here, as serving
        starts), else one at a time.
        """
        server = self.server
        grace = server.shutdown_grace
        if grace is not None and not grace >= 0:
            raise ValueError(f"shutdown_grace must be >= 0 seconds or None, not {grace!r}")
        if is_async_handler(server.RequestHandlerClass):
            name = "max_connections"
        elif isinstance(server, ThreadingMixIn):
            name = "max_threads"
        else:
            # Imported here: the forking package is built on this module.
            from ._forking import _mixin

            if isinstance(server, _mixin.ForkingMixIn):
                return _mixin.start_serving(server)  # forks this call's pool
            return 1
        limit: int | None = getattr(server, name)
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"{name} must be a positive int or None, not {limit!r}")
        return limit

    async def _serve_requests(self, requests: _Requests) -> None:
        unyielded = 0
        while True:
            slot = CapacitySlot(requests.limiter)
            if unyielded < ACCEPT_BATCH and slot.take_nowait():
                unyielded += 1
            else:
                await slot.take()
                unyielded = 1
            # acquire() may not check for cancellation; shutdown() must take
            # effect before the next accept even under a flood of clients.
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
                request, client_address = await self._get_request(requests)
            except BaseException:
                slot.give_back()
                raise
            await self._admit_request(requests, slot, request, client_address)
            await call_hook(self.server.service_actions)

    async def _admit_request(
        self, requests: _Requests, slot: CapacitySlot, request: Any, client_address: Any
    ) -> None:
        """Admit a request just taken from the socket, owning ``slot`` until a task takes it."""
        self._accepted += 1
        if requests.proxy is None:
            await self._verify_and_process(slot, request, client_address)
        else:
            # In the connection's own task: a client slow to send its header holds only its
            # own connection, never the accept loop.
            requests.nursery.start_soon(
                self._admit_behind_proxy, requests.proxy, slot, request, client_address
            )

    async def _admit_behind_proxy(
        self, proxy: ProxySettings, slot: CapacitySlot, request: Any, peer: Any
    ) -> None:
        """Take the PROXY header off the connection, then admit it as the original client's."""
        try:
            header = await take_proxy_header(request, peer, proxy)
        except ProxyProtocolError as error:
            self._refuse_proxied(peer, error)
            slot.give_back()
            await self.end_request(request, peer)
            return
        except Exception:
            # Not a connection a header can be read from (see take_proxy_header).
            self._failed += 1
            slot.give_back()
            await self.report_error(request, peer)
            await self.end_request(request, peer)
            return
        except BaseException:
            # A stop cut the wait: no task owns the request yet.
            slot.give_back()
            await self.end_request(request, peer)
            raise
        # In this task's context, so the request's task (and its thread) see it.
        _current_proxy_header.set(header)
        await self._verify_and_process(slot, request, proxied_address(header, request, peer))

    def _refuse_proxied(self, peer: Any, error: ProxyProtocolError) -> None:
        """Count and log a connection refused for its PROXY header (the caller closes it)."""
        self.proxy_rejected += 1
        self._refused += 1
        LOGGER.info("refused the connection from %r: PROXY protocol: %s", peer, error)

    async def _verify_and_process(
        self, slot: CapacitySlot, request: Any, client_address: Any
    ) -> None:
        """verify_request, then process_request; gives the slot back if no task took it."""
        server = self.server
        task = trio.lowlevel.current_task()
        self._admissions[task] = slot
        try:
            try:
                verified = await call_hook(server.verify_request, request, client_address)
            except trio.Cancelled:
                # A stop cut an async verify_request(): no task owns the request yet.
                await self.end_request(request, client_address)
                raise
            if verified:
                await call_hook(server.process_request, request, client_address)
            else:
                self._refused += 1
                await self.end_request(request, client_address)
        except Exception:
            self._failed += 1
            await self.report_error(request, client_address)
            await self.end_request(request, client_address)
        finally:
            if self._admissions.pop(task, None) is not None:
                slot.give_back()

    async def _get_request(self, requests: _Requests) -> tuple[Any, Any]:
        """get_request(), waiting until the socket is readable; survives fd exhaustion."""
        server = self.server
        while True:
            try:
                if requests.readable_first:
                    await trio.lowlevel.wait_readable(server.socket)
                request: tuple[Any, Any] = await call_hook(server.get_request)
                return request
            except (BlockingIOError, InterruptedError):
                await trio.lowlevel.wait_readable(server.socket)
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP_ERRNOS:
                    await trio.lowlevel.checkpoint()
                elif exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    self.log_capacity(exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                elif self.stdlib_manners:
                    # The stdlib ignores it: a get_request() that wraps the connection in
                    # TLS must not end the server when one client fails the handshake.
                    LOGGER.info("get_request() failed on %s: %r; skipped", server, exc)
                else:
                    raise

    def log_capacity(self, exc: OSError) -> None:
        self._capacity_warning.log(
            "cannot accept on %s: %s; retrying every %.1f s until resources free up "
            "(raise the fd limit, e.g. ulimit -n, or lower max_connections)",
            self.server.server_address,
            exc,
            ACCEPT_BACKOFF,
        )

    async def _run_service_actions(self, poll_interval: float) -> None:
        while True:
            await trio.sleep(poll_interval)
            await call_hook(self.server.service_actions)

    # -- running one request ---------------------------------------------

    def start_request(
        self, request: Any, client_address: Any, runner: RequestRunner | None = None
    ) -> None:
        """Start handling the request in its own task (``runner``, or the engine's own
        way: an async handler in the task, a sync one on a thread); returns at once."""
        requests = self._requests
        slot = self._admissions.pop(trio.lowlevel.current_task(), None)
        if requests is None or slot is None:
            raise RuntimeError(
                "process_request() starts a request only when the serve loop calls it"
            )
        requests.nursery.start_soon(
            self._run_request,
            slot,
            request,
            client_address,
            runner or self._run_on_thread,
            requests.request_deadline,
        )

    async def _run_request(
        self,
        slot: CapacitySlot,
        request: Any,
        client_address: Any,
        runner: RequestRunner,
        request_deadline: float | None,
    ) -> None:
        self._active += 1
        started = trio.current_time()
        outcome = "cut short"
        connection: Connection | None = None
        # At the deadline the request is cut as a stop cuts it after shutdown_grace: the task
        # is cancelled (a thread's connection is shut down, a worker's too, see the runners).
        deadline = (
            None
            if request_deadline is None
            else trio.CancelScope(deadline=started + request_deadline)
        )
        try:
            with _NO_DEADLINE if deadline is None else deadline:
                if is_async_handler(self.server.RequestHandlerClass):
                    # Inline, not in a runner: every coroutine frame under this task is memory
                    # that each idle connection holds for as long as it lives.
                    failed = False
                    try:
                        lazy = self._passes_connection()
                        connection = self._open_connection(request, lazy)
                        if connection is None:
                            handler_request = self.async_request(request)
                        else:
                            handler_request = connection if lazy else connection.request
                        running = self.server.finish_request(handler_request, client_address)
                        if inspect.isawaitable(running):
                            await running
                    except Exception:
                        failed = True
                        await self.report_error(request, client_address)
                    finally:
                        failed = not await self.end_request(request, client_address) or failed
                else:
                    failed = await runner(slot, request, client_address)
                if failed:
                    self._failed += 1
                    outcome = "failed"
                else:
                    self._finished += 1
                    outcome = "finished"
            if deadline is not None and deadline.cancelled_caught:
                self._cancelled += 1
                _log_deadline(client_address, request_deadline)
        except trio.Cancelled:
            self._cancelled += 1
            raise
        finally:
            self._active -= 1
            if not slot.on_thread:
                slot.give_back()
            if _access_log_enabled():
                _log_access(client_address, outcome, trio.current_time() - started, connection)

    def _open_connection(self, request: Any, lazy: bool) -> Connection | None:
        """Make the trio objects an async handler gets; None when the request stays as it
        is (a datagram's request is converted in place, see async_request).

        ``lazy``: the handler gets the Connection itself (see _passes_connection), so a plain
        connection's request stream is made on first use; otherwise it gets the stream, and
        the connection is left where its rfile/wfile find it (``_connection``).
        """
        if not isinstance(request, socket.socket) or request.type != socket.SOCK_STREAM:
            return None
        server = self.server
        context = None if self.stdlib_manners else getattr(server, "ssl_context", None)
        if context is not None:
            # The handshake happens on the handler's first read or write, bounded by its
            # timeout.
            tls = trio.SSLStream(
                SocketFastStream(request),
                context,
                server_side=True,
                https_compatible=getattr(server, "https_compatible", False),
            )
            connection = Connection(request, tls, tls)
        # trio.socket.from_stdlib_socket() takes a plain socket.socket only: another kind
        # fails here, as it always did, not in the handler.
        elif lazy and type(request) is socket.socket:
            return Connection.plain(request)
        else:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(request))
            connection = Connection(request, SocketFastStream(request), stream)
        if not lazy:
            _connection.set(connection)
        return connection

    def _passes_connection(self) -> bool:
        """Whether finish_request() gets the Connection rather than the request stream: when
        it is BaseServer's, which gives it to the handler class, and that class's __init__
        is BaseRequestHandler's, which makes ``self.request`` from it on first use. A
        subclass's own finish_request() or __init__ gets the stream, as documented."""
        finish_request, handler_init = _lazy_request_defaults()
        server = self.server
        return (
            getattr(server.finish_request, "__func__", None) is finish_request
            and getattr(server.RequestHandlerClass, "__init__", None) is handler_init
        )

    def async_request(self, request: Any) -> Any:
        """What an async handler's ``self.request`` is for a datagram request: the data and
        the server's trio socket (stream requests: see _open_connection)."""
        if (
            isinstance(request, tuple)
            and len(request) == 2
            and isinstance(request[1], socket.socket)
        ):
            data, sock = request
            if self._trio_socket is None or self._trio_socket.fileno() != sock.fileno():
                self._trio_socket = trio.socket.from_stdlib_socket(sock)
            return (data, self._trio_socket)
        return request

    def blocking_request(self, request: Any) -> Any:
        """A sync handler's ``self.request``; runs on its thread (TLS handshakes there)."""
        context = None if self.stdlib_manners else getattr(self.server, "ssl_context", None)
        if context is None or not isinstance(request, socket.socket):
            return request
        # wrap_socket() moves the fd into a new object, out of reach of the engine's release
        # of a stuck thread (a shutdown() of `request`): handshake on a duplicate, so that
        # `request` can still release it, then close `request`. The handshake runs before
        # setup() applies the handler's timeout, so it gets that timeout here: a client that
        # stalls mid-handshake must not hold the thread.
        raw = request.dup()
        try:
            raw.settimeout(getattr(self.server.RequestHandlerClass, "timeout", None))
            tls = context.wrap_socket(raw, server_side=True)
        except BaseException:
            raw.close()
            raise
        request.close()
        return tls

    async def _run_on_thread(self, slot: CapacitySlot, request: Any, client_address: Any) -> bool:
        """A sync handler's request: the stdlib's sequence on one of trio's worker threads."""
        server = self.server
        connection = [request]
        if isinstance(server, ThreadingMixIn):
            wait = not server.daemon_threads
        else:
            # A plain server runs its requests as the stdlib does on the serving thread: a
            # stop waits for them unless that thread is a daemon (the process may exit).
            wait = not threading.current_thread().daemon
        failed: bool = await run_in_thread(
            functools.partial(self.blocking_sequence, connection, client_address),
            limiter=slot,
            release=lambda: release_connection(connection[0]),
            wait_for_release=wait,
            who=client_address,
            abandoned=self.abandoned_threads,
        )
        return failed

    def blocking_sequence(self, connection: list[Any], client_address: Any) -> bool:
        """The stdlib's request sequence, on a handler thread; returns whether it failed.

        ``connection[0]`` is the request; it is replaced by what blocking_request() made of
        it, so a stop can release that.
        """
        server = self.server
        try:
            connection[0] = self.blocking_request(connection[0])
        except Exception:
            self._report_error_blocking(connection[0], client_address)
            self._end_request_blocking(connection[0], client_address)
            return True
        if isinstance(server, ThreadingMixIn):
            return _on_own_thread(server.process_request_thread, connection[0], client_address)
        failed = False
        try:
            server.finish_request(connection[0], client_address)
        except Exception:
            failed = True
            self._report_error_blocking(connection[0], client_address)
        finally:
            failed = not self._end_request_blocking(connection[0], client_address) or failed
        return failed

    def _report_error_blocking(self, request: Any, client_address: Any) -> None:
        try:
            self.server.handle_error(request, client_address)
        except Exception:
            LOGGER.exception("handle_error() raised while reporting %r", client_address)

    def _end_request_blocking(self, request: Any, client_address: Any) -> bool:
        """shutdown_request() on a handler thread; False if it raised (reported)."""
        try:
            self.server.shutdown_request(request)
        except Exception:
            self._report_error_blocking(request, client_address)
            return False
        return True

    async def end_request(self, request: Any, client_address: Any) -> bool:
        """shutdown_request(); False if it raised (reported through handle_error).

        An async override is awaited shielded, so a stop cannot cut it before it closed the
        connection, and bounded, so it cannot hold a stop either.
        """
        try:
            result = self.server.shutdown_request(request)
            if inspect.isawaitable(result):
                with trio.CancelScope(shield=True), trio.move_on_after(END_REQUEST_TIMEOUT):
                    await result
        except Exception:
            await self.report_error(request, client_address)
            return False
        return True

    async def report_error(self, request: Any, client_address: Any) -> None:
        """handle_error() from inside an except block; what it raises is logged."""
        try:
            await call_hook(self.server.handle_error, request, client_address)
        except Exception:
            LOGGER.exception("handle_error() raised while reporting %r", client_address)

    # -- stopping --------------------------------------------------------

    def shutdown(self, closing: bool = False) -> None:
        """shutdown(); ``closing``: server_close() is about to close the listening socket."""
        with self._lock:
            run = self.run
            if run is None:
                self._shutdown_pending = True
                return
        try:
            on_trio_thread = trio.lowlevel.current_trio_token() is run.token
        except RuntimeError:
            on_trio_thread = False
        if on_trio_thread:
            run.request_stop(closing)
            return
        try:
            run.token.run_sync_soon(run.request_stop, closing)
        except trio.RunFinishedError:
            return
        # A thread that this very run started (a sync handler's, or an async handler's
        # trio.to_thread) may be one the run waits for: waiting here would deadlock.
        if not _thread_of_run(run.token):
            run.finished.wait()

    @property
    def shutdown_requested(self) -> bool:
        run = self.run
        return run is not None and run.stop_requested

    async def wait_for_shutdown(self) -> None:
        run = self.run
        if run is None:
            raise RuntimeError(
                "wait_for_shutdown() waits for the shutdown of a running serve_forever(), "
                "and the server is not serving"
            )
        await run.stopping.wait()

    def exchange_for(self, request: Any) -> Exchange | None:
        """The drain state for a stream handler's connection ``request`` (see _drain.py), or
        None when no serve_forever() runs (the connection then never ends early)."""
        run = self.run
        if run is None:
            return None
        if isinstance(request, socket.socket):
            # Before the handler, only a PROXY header is taken off the connection.
            taken_before = None if _current_proxy_header.get() else 0
            return Exchange(run.drain, request, threaded=True, kernel_offset=taken_before)
        connection = request if isinstance(request, Connection) else _connection.get(None)
        if connection is not None and (connection is request or connection.request is request):
            return Exchange(run.drain, connection.sock, threaded=False)
        return None

    def stop_serving(self) -> None:
        """server_close()'s first step: a running serve_forever() is shut down."""
        if self.run is not None:
            self.shutdown(closing=True)
        self._closed = True

    async def astop_serving(self) -> None:
        """aclose()'s first step: shut a running serve_forever() down and wait for it."""
        run = self.run
        if run is not None:
            self.shutdown(closing=True)
            await trio.to_thread.run_sync(run.finished.wait, abandon_on_cancel=True)
        self._closed = True

    def join_abandoned_threads(self, timeout: float | None) -> None:
        """Wait, up to ``timeout`` seconds in all, for threads a stop had to abandon."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for finished in list(self.abandoned_threads):
            left = None if deadline is None else deadline - time.monotonic()
            finished.wait(None if left is None else max(0.0, left))
        self.abandoned_threads[:] = [f for f in self.abandoned_threads if not f.is_set()]

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            active_requests=self._active,
            accepted_requests=self._accepted,
            finished_requests=self._finished,
            failed_requests=self._failed,
            cancelled_requests=self._cancelled,
            refused_requests=self._refused,
            proxy_rejected_requests=self.proxy_rejected,
            serving=self.run is not None,
            draining=self.shutdown_requested,
        )


def _on_own_thread(process_request_thread: Callable[[Any, Any], None], *args: Any) -> bool:
    """ThreadingMixIn's request: process_request_thread() as the stdlib's thread runs it.

    What escapes it (``SystemExit``, an exception from ``handle_error``) goes to
    ``threading.excepthook`` and ends that request only, as it ends only its thread in the
    stdlib. Returns whether the request failed.
    """
    try:
        return record_failure(process_request_thread, *args)
    except BaseException:
        exc_type, exc, traceback = sys.exc_info()
        threading.excepthook(
            threading.ExceptHookArgs([exc_type, exc, traceback, threading.current_thread()])
        )
        del exc, traceback  # break the frame <-> traceback cycle
        return True


@attrs.define(eq=False)
class DeadlineTimer:
    """``request_deadline`` for a sync request that runs in the calling thread with no trio
    run (compat's handle_request()): a timer thread shuts the connection down at the
    deadline, as the engine releases a handler thread's connection when its task is cut.

    A datagram request has no connection of its own to shut down; it runs to its end.
    """

    connection: list[Any]
    passed: bool = False
    """Whether the deadline passed while the request ran (its connection was shut down)."""
    _running: bool = False
    _timer: threading.Timer | None = None
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def start(self, seconds: float | None) -> None:
        if seconds is None or not isinstance(self.connection[0], socket.socket):
            return
        self._running = True
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True
        self._timer.name = "trio_socketserver request_deadline"
        self._timer.start()

    def stop(self) -> None:
        """Once the request has ended; returns when the timer thread has."""
        with self._lock:
            self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()

    def _cut(self) -> None:
        with self._lock:  # never after stop(): a request that has ended was not cut
            if self._running:
                self.passed = True
                release_connection(self.connection[0])


def release_connection(request: Any) -> None:
    """Make blocked I/O on a sync handler's socket return, from another thread.

    The plain socket method is used even on an ``ssl.SSLSocket``, whose own
    ``shutdown()`` would also tear down its TLS state under the reading thread.
    """
    if isinstance(request, socket.socket):
        try:
            socket.socket.shutdown(request, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected: nothing is blocked on it


def _thread_of_run(token: trio.lowlevel.TrioToken) -> bool:
    """Whether the calling (non-trio) thread was started by the trio run of ``token``."""
    try:
        return trio.from_thread.run_sync(trio.lowlevel.current_trio_token) is token
    except RuntimeError:
        return False  # not a trio thread, or its run is over


def _engine_get_request(server: object) -> bool:
    """Whether ``server`` uses a family's own get_request(), which raises BlockingIOError
    when nothing is ready (so it may be called before the socket is readable)."""
    from ._families import TCPServer, UDPServer

    get_request = type(server).get_request  # type: ignore[attr-defined]
    return get_request in (TCPServer.get_request, UDPServer.get_request)


def _log_deadline(client_address: Any, request_deadline: float | None) -> None:
    LOGGER.info(
        "request from %r cut short: it ran longer than request_deadline (%s s)",
        client_address,
        request_deadline,
    )


def _log_access(
    client_address: Any, outcome: str, duration: float, connection: Connection | None
) -> None:
    io = None if connection is None else connection.io
    if isinstance(io, trio.SSLStream):
        io = io.transport_stream
    if isinstance(io, SocketFastStream):
        ACCESS_LOG.info(
            "%s %s in %.3f s, %d bytes in, %d bytes out",
            client_address,
            outcome,
            duration,
            io.bytes_received,
            io.bytes_sent,
        )
    else:
        ACCESS_LOG.info("%s %s in %.3f s", client_address, outcome, duration)
