# ForkingMixIn, the server process's side: when the pool is forked, how one sync request goes
# through it, and the stdlib's ForkingMixIn surface (active_children, collect_children,
# max_children, timeout, block_on_close). Which file of the package runs where:
#   _mixin.py       this file: the mixin                              server process, trio
#   _pool.py        the pool: fork server client, workers, stopping   server process, trio
#   _safety.py      fork_safety: the thread check before the fork     server process
#   _forkserver.py  the fork server: keeps what it needs, forks        fork server, no trio
#   _worker.py      a worker's request loop; the server seen from it  worker, no trio
#   _wire.py        messages, fd passing, the shared page             every process, no trio
#
# The engine contact surface, all of it:
#   start_serving()             called by the engine as serve_forever()/handle_request()
#                               start: forks this call's pool, returns max_children.
#   Engine.start_request()      process_request() hands a sync request to the engine with
#                               this mixin's runner (run it in a worker).
#   Engine.blocking_sequence()  handed to the workers: the stdlib's sequence for one request
#                               (wrapped to make its PROXY header current there).
#   Engine.end_request()        called: shutdown_request() for a request no worker took.
#   call_hook()                 called: close_request(), which may be async.
#   release_connection()        called: shut a cut request's connection down.
# _pool.py also takes the accept loop's back-off policy from _engine (ACCEPT_BACKOFF,
# ACCEPT_CAPACITY_ERRNOS, RateLimitedWarning). Everything else used is the stdlib's public
# surface: shutdown(), shutdown_requested, server_close(), service_actions(),
# close_request(), socket.
"""Worker processes for sync request handlers: ``ForkingMixIn``.

The stdlib forks once per request. Here a request is handed to a *worker*, a process that
serves one request at a time and then waits for the next: the connection's file descriptor
travels over a Unix socket (``SCM_RIGHTS``), the worker runs ``finish_request()`` /
``handle_error()`` / ``shutdown_request()`` exactly as the stdlib's child does, and answers
"done". Workers are started on demand and reused; the pool grows to the peak number of
concurrent sync requests and never beyond ``max_children``.

Workers are clones of the server process **as it is when serving starts** (each
``serve_forever()`` and ``handle_request()``): what the program set up after the
constructor (``server.config = ...``, functions registered on an XML-RPC server) is there.
They are not forked by the server process while it serves, since a process that runs trio
and other threads must not fork at any moment: when serving starts it forks once a *fork
server*, single-threaded for good, which forks every worker on request. ``fork_safety``
says what to do if other threads are busy at that moment (see ``_safety``). The fork server
keeps only what it needs of what it inherited (see ``_forkserver.close_inherited_fds``), so
a connection or a listening socket the server process closes later is really closed.

What still differs from a fork per request, and what stopping does, is in docs/forking.md.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._engine import CapacitySlot, call_hook, is_async_handler, release_connection
from .._families import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer
from .._proxy import ProxyHeader, current_proxy_header
from .._proxy import _current as _current_proxy_header
from .._server import BaseServer, engine_of
from . import _pool, _safety
from ._pool import Pool, PoolError, Worker, describe_exit
from ._wire import MESSAGE_OVERHEAD, Parcel
from ._worker import WorkerSpec, current_worker

if TYPE_CHECKING:
    _MixinBase = BaseServer
else:
    _MixinBase = object

LOGGER = logging.getLogger("trio_socketserver")

# After shutdown_grace an in-flight request's connection is shut down, so a handler blocked on
# its socket fails at once; this is how long it then gets to return before its worker is
# terminated. The second the thread path gives a handler thread in the same situation
# (THREAD_RELEASE_TIMEOUT).
WORKER_RELEASE_TIMEOUT = 1.0


class ForkingMixIn(_MixinBase):
    """Run each request of a sync ``handle()`` in a worker process from a reused pool.

    Put it first in the bases, as with the stdlib: ``class ForkingTCPServer(ForkingMixIn,
    TCPServer)``. Async handlers are unaffected: they always run as tasks in the server
    process. Workers are clones of the server process as it is when ``serve_forever()`` or
    ``handle_request()`` starts, and a worker keeps its state from one request to the next:
    see the module docstring and ``docs/forking.md``.

    ``max_children``: at most this many worker processes, hence requests at once (default
    40, as the stdlib); when all are busy the server stops accepting.
    ``max_requests_per_child``: a worker exits after this many requests and a fresh one takes
    the next (default ``None``: workers live until the server stops; the stdlib's child
    serves 1). ``fork_safety``: ``"warn"`` (default), ``"strict"`` or ``"off"``, what to do
    if other threads are busy when the pool is forked (see :class:`ForkSafetyError`).
    ``pass_fds``: inherited pipes and sockets the workers keep (file descriptors, as
    ``subprocess``'s ``pass_fds``); files and devices are always kept, every other
    inherited socket and pipe is released in the workers. ``timeout``: 300 s, as the
    stdlib's, is how long :meth:`handle_request` waits. ``block_on_close``:
    ``server_close()`` lets the workers exit (True, the default) or kills them (False);
    either way it reaps them, so no child process is left. ``active_children``: the pids of
    the live workers, ``None`` before the first one started, as in the stdlib.

    Cancellation: see ``serve_forever``; an in-flight request is cut by shutting its
    connection down, and its worker is terminated if it does not finish within
    ``WORKER_RELEASE_TIMEOUT`` seconds after that.

    Thread safety: as :class:`BaseServer`. In a worker process (a handler), ``shutdown()``
    asks the server process to shut down and returns at once, ``shutdown_requested`` is
    true once any process of the server asked, and ``server_close()`` does nothing.

    Resource handling: a pool (a fork server, its workers, one socket pair per worker and a
    shared page) is forked as each ``serve_forever()``/``handle_request()`` starts and
    replaces the previous one; ``server_close()`` closes every socket and reaps every
    process; call it (``with`` / ``async with`` do), as for the listening socket.

    Errors: with ``fork_safety = "strict"``, ``serve_forever()``/``handle_request()`` raise
    :class:`ForkSafetyError` at once if other threads are busy; a bad setting raises
    ``ValueError`` there. A request whose worker dies is logged and its connection closed;
    the server keeps serving.
    """

    max_children: int = 40
    max_requests_per_child: int | None = None
    fork_safety: str = "warn"
    pass_fds: Collection[int] = ()
    timeout: float | None = 300
    block_on_close: bool = True
    active_children: set[int] | None = None
    # The mixin's only state, name-mangled to stay out of subclasses' way; made on first use.
    __forking: _Forking | None = None

    def __state(self) -> _Forking:
        if self.__forking is None:
            self.__forking = _Forking()
        return self.__forking

    # -- serving starts: fork the pool --------------------------------------------------

    def __start_serving(self) -> int:
        """Serving starts: check the settings, fork this call's pool; ``max_children``."""
        limit = _positive_int("max_children", self.max_children)
        if self.max_requests_per_child is not None:
            _positive_int("max_requests_per_child", self.max_requests_per_child)
        # Serving starts: the workers of this call are clones of the process as it is now.
        self.__state().max_workers = limit
        self.__replace_pool()
        return limit

    def __replace_pool(self) -> Pool:
        """Stop the previous pool (idle: its serving call ended) and fork a new one."""
        spec = WorkerSpec(
            self,
            functools.partial(_with_proxy_header, engine_of(self).blocking_sequence),
            _fds("pass_fds", self.pass_fds),
            # A connection's request is its address; a datagram's, its bytes too.
            message_size=MESSAGE_OVERHEAD + getattr(self, "max_packet_size", 0),
        )
        fork_safety = _safety.check_mode(self.fork_safety)
        state = self.__state()
        old, state.pool = state.pool, None
        if old is not None:  # idle: its serving call is over. It exits while we go on.
            old.close(kill=False, wait=False)
            state.stopping.append(old)
        state.stopping = [pool for pool in state.stopping if not pool.reap(0)]
        state.pool = _pool.start_pool(
            spec,
            slots=state.max_workers,
            fork_safety=fork_safety,
            on_start=self.__child_started,
            on_end=self.__child_ended,
        )
        return state.pool

    def __child_started(self, pid: int) -> None:
        if self.active_children is None:
            self.active_children = set()
        self.active_children.add(pid)

    def __child_ended(self, pid: int) -> None:
        if self.active_children is not None:
            self.active_children.discard(pid)

    # -- one request ----------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the request: a sync handler's in a worker process; returns at once."""
        if is_async_handler(self.RequestHandlerClass):
            super().process_request(request, client_address)
        else:
            engine_of(self).start_request(request, client_address, self.__run_request)

    async def __run_request(self, slot: CapacitySlot, request: Any, client_address: Any) -> bool:
        """Run the request in a worker process; returns whether it failed to be served."""
        state = self.__state()
        if state.closed:
            LOGGER.error(
                "the request from %r came after server_close(); closing it", client_address
            )
            await engine_of(self).end_request(request, client_address)
            return True
        try:
            # None after collect_children(blocking=True) stopped the pool while serving.
            pool = state.pool or self.__replace_pool()
            parcel = Parcel.wrap(request, client_address, current_proxy_header())
        except (RuntimeError, ValueError, OSError, TypeError, pickle.PicklingError) as exc:
            LOGGER.error("cannot hand the request from %r to a worker: %s", client_address, exc)
            await engine_of(self).end_request(request, client_address)
            return True
        pool.busy += 1
        try:
            return await self.__run_in_worker(pool, parcel, request, client_address)
        finally:
            pool.busy -= 1
            if pool.closing and not pool.busy:
                pool.stop()

    async def __run_in_worker(
        self, pool: Pool, parcel: Parcel, request: Any, client_address: Any
    ) -> bool:
        worker = None  # the worker that owns the request, for __cut
        try:
            while True:
                worker = await pool.checkout()
                given = await pool.give(worker, parcel)
                if given and await pool.wait_for(worker, self.shutdown):
                    break
                dead, worker = worker, None
                if given and pool.took_last_request(dead):
                    await self.__lost(pool, dead, request, client_address)
                    return True
                # It died before reading the request (killed while idle): the request is
                # intact, another worker takes it. A new worker that dies at once is not
                # retried, so a worker that cannot start does not loop forever.
                status = await pool.discard(dead)
                what = f"worker process {dead.pid} {describe_exit(status)} before it took"
                if not dead.served:
                    raise PoolError(f"{what} its first request")
                LOGGER.warning(
                    "%s the request from %r; another worker takes it", what, client_address
                )
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.__cut(pool, worker, request, client_address)
            raise
        except PoolError as exc:
            LOGGER.error("cannot hand the request from %r to a worker: %s", client_address, exc)
            await engine_of(self).end_request(request, client_address)
            return True
        await self.__done(pool, worker)
        await call_hook(self.close_request, request)  # our copy; the worker ended it
        return False

    async def __done(self, pool: Pool, worker: Worker) -> None:
        """The worker finished a request: back to the pool, or retired after its quota."""
        quota = self.max_requests_per_child
        if quota is not None and worker.served >= quota:
            await pool.discard(worker)
        else:
            pool.checkin(worker)

    async def __lost(self, pool: Pool, worker: Worker, request: Any, client_address: Any) -> None:
        """The worker died during the request: log it, close the connection."""
        status = await pool.discard(worker)
        LOGGER.warning(
            "worker process %d %s while handling the request from %r; its connection is "
            "closed and a new worker will take later requests",
            worker.pid,
            describe_exit(status),
            client_address,
        )
        await engine_of(self).end_request(request, client_address)

    async def __cut(
        self, pool: Pool, worker: Worker | None, request: Any, client_address: Any
    ) -> None:
        """End a cancelled request (grace expired, hard stop or request_deadline); runs
        shielded, bounded."""
        if worker is None:
            await engine_of(self).end_request(request, client_address)
            return
        release_connection(request)  # blocked socket I/O in the worker fails at once
        finished = None
        with trio.move_on_after(WORKER_RELEASE_TIMEOUT):
            finished = await pool.wait_for(worker, self.shutdown)
        if finished:
            await self.__done(pool, worker)
            await call_hook(self.close_request, request)
        elif finished is None:
            status = await pool.discard(worker, terminate=True)
            LOGGER.warning(
                "worker process %d was still handling the request from %r %.1f s after its "
                "connection was cut; it %s",
                worker.pid,
                client_address,
                WORKER_RELEASE_TIMEOUT,
                "was stopped" if status is None else describe_exit(status),
            )
            await engine_of(self).end_request(request, client_address)
        else:
            await self.__lost(pool, worker, request, client_address)

    # -- the stdlib's surface, and what it means in a worker ---------------------------

    def collect_children(self, *, blocking: bool = False) -> None:
        """Forget the workers that have exited; with ``blocking``, stop every worker.

        The fork server reaps workers as they exit, so there is nothing to wait for: this
        drops the pids of idle workers that died from ``active_children``. With
        ``blocking=True``, as the stdlib's waits for every child to exit, the pool is
        stopped: idle workers exit now (this waits for them, milliseconds), busy ones when
        their request ends, and a request that comes later starts a new pool. Called by
        :meth:`service_actions`, as in the stdlib. In a worker it does nothing.

        Thread safety: the thread running the server, or any thread while it is not serving.
        """
        state = self.__forking
        if state is None or state.pool is None or current_worker(self) is not None:
            return
        if blocking:
            pool, state.pool = state.pool, None
            pool.close(kill=False)
        else:
            state.pool.prune()

    def service_actions(self) -> None:
        """Called by :meth:`serve_forever` after each request and every poll interval;
        collects workers that have exited (:meth:`collect_children`), as the stdlib does."""
        super().service_actions()
        self.collect_children()

    def shutdown(self) -> None:
        """As :meth:`BaseServer.shutdown`, and ``shutdown_requested`` turns true in the
        workers; in a worker process, asks the server process and returns at once."""
        side = current_worker(self)
        if side is not None:
            side.request_shutdown()
            return
        state = self.__forking
        if state is not None and state.pool is not None:
            state.pool.set_draining()
        super().shutdown()

    @property
    def shutdown_requested(self) -> bool:
        """As :attr:`BaseServer.shutdown_requested`; in a worker, true once ``shutdown()``
        was called on the server, in the server process or in any worker."""
        side = current_worker(self)
        if side is not None:
            return side.draining
        return super().shutdown_requested

    def server_close(self) -> None:
        """As :meth:`BaseServer.server_close`, then stop the pool and reap its processes.

        In a worker process it does nothing: what it would close belongs to the server
        process.
        """
        if current_worker(self) is not None:
            return
        super().server_close()
        state = self.__state()
        state.closed = True  # a request that comes later is refused, not given a new pool
        if state.pool is not None:
            state.pool.close(kill=not self.block_on_close)
        for pool in state.stopping:
            pool.reap(_pool.FORK_SERVER_TIMEOUT)
        state.stopping.clear()


def _with_proxy_header(
    sequence: Callable[[list[Any], Any], bool],
    connection: list[Any],
    client_address: Any,
    proxy_header: ProxyHeader | None,
) -> bool:
    """Run in a worker: the request's sequence, with its PROXY header as the handler's
    (``self.proxy_header``), which no trio task's context carries here."""
    token = _current_proxy_header.set(proxy_header)
    try:
        return sequence(connection, client_address)
    finally:
        _current_proxy_header.reset(token)


def start_serving(server: ForkingMixIn) -> int:
    """What the engine calls as serving starts (see the module comment)."""
    return server._ForkingMixIn__start_serving()  # type: ignore[attr-defined, no-any-return]


@attrs.define(eq=False)
class _Forking:
    """The mixin's state: the pool of the current serving call (or of the last one)."""

    pool: Pool | None = None
    max_workers: int = 0
    """``max_children`` as serving started: the capacity the engine enforces."""
    closed: bool = False
    """``server_close()`` was called: no new pool."""
    stopping: list[Pool] = attrs.Factory(list)
    """Pools of earlier serving calls, told to stop, whose fork server is not reaped yet."""


def _fds(name: str, value: Collection[int]) -> frozenset[int]:
    fds = frozenset(value)
    if not all(isinstance(fd, int) and not isinstance(fd, bool) and fd >= 0 for fd in fds):
        raise ValueError(f"{name} must be file descriptors (ints >= 0), not {value!r}")
    return fds


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
