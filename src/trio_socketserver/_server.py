# BaseServer: the face every server class shows its users and subclasses: the stdlib's hooks
# (get_request -> verify_request -> process_request -> finish_request -> shutdown_request),
# its blocking-free lifecycle methods and the documented knobs, nothing else. The machinery
# lives in one Engine object (_engine.py) behind one name-mangled attribute, so a subclass's
# own `_run`, `_closed` or `_workers` cannot break serving. Address families live in
# _families.py; what a handler sees lives in _handlers.py.
from __future__ import annotations

import math
import socket
import ssl
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import trio

from ._engine import LOGGER as LOGGER
from ._engine import Engine
from ._engine import ServerStatistics as ServerStatistics
from ._engine import call_hook as call_hook
from ._engine import is_async_handler as is_async_handler
from ._proxy_admission import DEFAULT_TRUSTED

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

T = TypeVar("T")

# Errors that mean the peer misbehaved or went away; handle_error logs them as
# one line rather than a traceback, since there is no bug to see.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    ssl.SSLError,  # a failed handshake (plaintext, aborted)
    trio.BrokenResourceError,
    trio.TooSlowError,
)


def engine_of(server: BaseServer) -> Engine:
    """The engine behind ``server``, for the families, mixins and compat."""
    return server._BaseServer__engine  # type: ignore[attr-defined, no-any-return]


class BaseServer:
    """The serve loop, lifecycle and hooks shared by every server class.

    The hook sequence and names are the stdlib's. Each request runs in its own
    task in the server's handler nursery: an ``async def handle`` directly, a
    sync ``handle`` on one of trio's worker threads (``trio.to_thread``; one at
    a time unless a mixin says otherwise), without ever blocking the trio loop.

    Class attributes (set them on a subclass or an instance):

    ``timeout``: seconds :meth:`handle_request` waits for a request before
    calling :meth:`handle_timeout`; ``None`` waits forever.

    ``shutdown_grace``: seconds in-flight requests get after :meth:`shutdown`
    before they are cancelled; ``None`` waits for them however long they take
    (the stdlib's behaviour). Default 5.0: enough for ordinary requests to
    finish, well inside the 30 s (Kubernetes) or 90 s (systemd) a supervisor
    allows before killing a process that is stopping.

    ``drain_delay``: seconds a graceful stop keeps accepting after :meth:`shutdown`, while
    the server already reports that it is draining, so that a load balancer polling its
    readiness moves traffic away before anything is refused. Default 0.

    ``max_connections``: how many requests with an async handler may run at
    once; when that many run, the server stops accepting and new clients wait
    in the kernel backlog (``request_queue_size``) instead of in memory.
    Default ``None``: bounded only by the process's file descriptors.

    ``request_deadline``: the longest, in seconds, that one request may run
    in total (for a stream server: the connection, every message on it),
    so that a client that trickles bytes just inside every ``timeout`` cannot
    hold its task or thread forever. Exceeded: the request is cut exactly as
    at the end of ``shutdown_grace`` (an async handler is cancelled; a sync
    handler's connection is shut down so its thread returns), counted in
    ``statistics().cancelled_requests``, and logged as one INFO line naming
    the peer and the deadline. Default ``None``: no bound, as the stdlib.

    ``proxy_protocol`` (stream servers): ``"v1"``, ``"v2"`` or ``"auto"`` (either) to
    take a PROXY protocol header, which a balancer such as HAProxy (``send-proxy``,
    ``send-proxy-v2``) sends first on each connection to say whom it forwards. The header
    is read in the connection's own task before :meth:`verify_request`; from then on
    ``client_address`` is the original client's, and the handler finds the whole header
    (destination, v2 TLVs) as ``self.proxy_header``. A connection without a valid header
    is closed (one log line at INFO; ``statistics().proxy_rejected_requests``). Default
    ``None``: no header is expected, and one sent is the client's data.

    ``proxy_trusted``: the addresses and networks (``"10.0.0.0/8"``, ``"2001:db8::1"``)
    that may send a header; a peer not in it is closed whatever it sends. Default
    loopback, for a balancer on the same host. Peers on a Unix socket are always trusted:
    who may connect there is the socket file's permissions (``socket_mode``).

    ``proxy_header_timeout``: seconds a client has to send its whole header; default
    5.0, far beyond what a balancer on the same network needs. A connection holds its place
    under the capacity limit from the moment it is accepted, header included.
    """

    socket: socket.socket
    timeout: float | None = None
    shutdown_grace: float | None = 5.0
    request_deadline: float | None = None
    drain_delay: float = 0.0
    max_connections: int | None = None
    proxy_protocol: str | None = None
    proxy_trusted: Iterable[Any] = DEFAULT_TRUSTED
    proxy_header_timeout: float = 5.0
    daemon_threads: bool = False
    block_on_close: bool = True

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Callable[..., Any],
    ) -> None:
        self.server_address: Any = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.__engine = Engine(self)

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
        :meth:`shutdown` first) or the server's socket is closed.
        """
        await self.__engine.serve_forever(poll_interval, task_status)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` gracefully: drain, stop accepting, finish, return.

        The stop sequence: :attr:`shutdown_requested` turns true and
        :meth:`wait_for_shutdown` returns at once; the server keeps accepting for
        ``drain_delay`` seconds; then it takes the connections already queued in the
        kernel's backlog and stops accepting; in-flight requests get ``shutdown_grace``
        seconds, during which a persistent connection whose handler waits for the peer's
        next message gets end-of-file from its ``rfile`` (a connection's first request is
        always served); then what still runs is cancelled.

        Idempotent. Without a running :meth:`serve_forever`, it makes the next
        one return at once (as the stdlib).

        Thread safety: callable from the trio thread (any task, a handler
        included), from any other thread, and from inside a sync handler. On
        the trio thread it requests the stop and returns at once; from a
        thread that the serving trio run started (a sync handler's, or an
        async handler's ``trio.to_thread`` call) likewise, since the run may be
        waiting for that very thread (the stdlib's deadlock); from any other
        thread it returns once :meth:`serve_forever` has returned, as the
        stdlib's does.
        """
        self.__engine.shutdown()

    @property
    def shutdown_requested(self) -> bool:
        """True once :meth:`shutdown` was called on the running server.

        Handlers can poll it to finish early, e.g. to close a keep-alive connection
        after the current request; :meth:`wait_for_shutdown` is the same to await.
        """
        return self.__engine.shutdown_requested

    async def wait_for_shutdown(self) -> None:
        """Return once :meth:`shutdown` was called on the running server (at once if it was).

        For handlers that should act when the drain begins rather than poll: a chat
        server telling its clients why it is about to close, a stream of events ending
        at the next event boundary::

            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.relay_events)
                await self.server.wait_for_shutdown()
                await self.wfile.write(b"server going away\\n")
                nursery.cancel_scope.cancel()

        Cancellation: a checkpoint; cancelling it has no other effect.

        Errors: ``RuntimeError`` if :meth:`serve_forever` is not running.
        """
        await self.__engine.wait_for_shutdown()

    async def handle_request(self) -> None:
        """Wait for one request, handle it to completion, return.

        Waits at most ``timeout`` seconds, then calls :meth:`handle_timeout`.
        Unlike the stdlib with a threading mixin, it returns only once that
        request's handler has finished, so nothing outlives the call.

        Cancellation: as a hard stop of :meth:`serve_forever`.
        """
        await self.__engine.handle_request()

    # -- running one request ---------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start handling the request in its own task; returns at once.

        An async handler runs in the task; a sync one on a handler thread,
        where :meth:`finish_request`, :meth:`handle_error` and
        :meth:`shutdown_request` are called as the stdlib calls them.
        Must be called from the serve loop (the trio thread).
        """
        self.__engine.start_request(request, client_address)

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
        timed out, broke the connection or failed the TLS handshake is logged as
        one line at INFO (also when a handler's own nursery wrapped such errors
        in an exception group).
        """
        error = sys.exc_info()[1]
        tls_error = _tls_error(error)
        if tls_error is not None:
            LOGGER.info("connection from %r: TLS handshake failed: %s", client_address, tls_error)
        elif error is not None and _is_peer_error(error):
            LOGGER.info("connection from %r ended: %r", client_address, error)
        else:
            LOGGER.exception("exception while handling a request from %r", client_address)

    # -- resources -------------------------------------------------------

    def server_close(self) -> None:
        """Stop serving and release the server's resources; afterwards ``fileno()`` is -1.

        If :meth:`serve_forever` is running, it is shut down first (see
        :meth:`shutdown` for which threads wait). With ``block_on_close`` (and
        not ``daemon_threads``), it then waits for handler threads that a stop
        had to abandon, for at most ``shutdown_grace`` seconds. Idempotent.

        Thread safety: any thread. On the trio thread, prefer ``await``
        :meth:`aclose` (or ``async with server``), which never blocks the loop.
        """
        engine = self.__engine
        engine.stop_serving()
        if self.block_on_close and not self.daemon_threads:
            engine.join_abandoned_threads(self.shutdown_grace)

    async def aclose(self) -> None:
        """:meth:`server_close` for the trio thread: the same steps, but the waits are
        trio waits, so the event loop keeps running (``async with server`` calls it).

        Cancellation: a checkpoint; if cancelled while waiting for abandoned handler
        threads, it stops waiting (the threads keep running; the socket is closed).
        """
        engine = self.__engine
        await engine.astop_serving()
        # server_close() below closes the socket; the threads are waited for here, with trio.
        abandoned, engine.abandoned_threads[:] = list(engine.abandoned_threads), []
        self.server_close()
        if abandoned and self.block_on_close and not self.daemon_threads:
            grace = self.shutdown_grace
            with trio.move_on_after(math.inf if grace is None else grace):
                for finished in abandoned:
                    await trio.to_thread.run_sync(finished.wait, abandon_on_cancel=True)
        await trio.lowlevel.checkpoint()

    def fileno(self) -> int:
        """The server socket's file descriptor."""
        raise NotImplementedError

    def statistics(self) -> ServerStatistics:
        """Request counters, for monitoring and stop reports."""
        return self.__engine.statistics()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _is_peer_error(error: BaseException) -> bool:
    """A peer error, or a group (a handler's nursery) made only of peer errors."""
    if isinstance(error, BaseExceptionGroup):
        return all(_is_peer_error(e) for e in error.exceptions)
    return isinstance(error, PEER_ERRORS)


def _tls_error(error: BaseException | None) -> ssl.SSLError | None:
    """The TLS error behind ``error`` (trio reports a failed handshake as broken)."""
    while error is not None:
        if isinstance(error, ssl.SSLError) and not isinstance(error, ssl.SSLEOFError):
            return error
        if not isinstance(error, trio.BrokenResourceError):
            return None
        error = error.__cause__
    return None
