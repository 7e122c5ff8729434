# ForkingMixIn: sync request handlers run in a pool of reused worker processes.
# Three kinds of process take part and the code of each is kept apart: the
# server process (ForkingMixIn, _Pool), the fork server that clones workers
# (_ForkServer) and the workers (_serve_requests). A worker runs the engine's
# stdlib request sequence (BaseServer._handle_blocking) and nothing else; what
# a handler sees is decided in _families.py and _handlers.py, as for threads.
"""Worker processes for sync request handlers: ``ForkingMixIn``.

Design
------
The stdlib forks once per request. Here a request is handed to a *worker*, a
process that serves one request at a time and then waits for the next: the
connection's file descriptor travels over a Unix socket (``SCM_RIGHTS``), the
worker runs ``finish_request()`` / ``handle_error()`` / ``shutdown_request()``
exactly as the stdlib's child does, and answers "done". Workers are started on
demand (the first request that finds none idle starts one) and kept until
``server_close()``, so the pool grows to the peak number of concurrent sync
requests and never beyond ``max_children``; when all of those are busy the
server stops accepting and new clients wait in the kernel backlog. The most
recently used idle worker takes the next request.

Workers are clones of the server process, so a handler class is found
wherever it was defined: a module, a script's ``__main__``, a test module, a
function body. Nothing is pickled but the client address and a datagram's
bytes. The clones are not made by the server process while it serves: a
process that runs trio (and, behind the blocking front door, other threads)
must not fork, because a lock held by another thread at that moment stays
locked forever in the child, which is why CPython 3.12 warns about it.
Instead, when the server is created, while the process is in a clean state,
it forks once: that child, the *fork server*, is single-threaded for good and
forks every worker on request. The fork happens

- in the constructor, if no other thread of the process is doing anything
  (idle trio and handler worker threads, which hold no lock, are allowed);
- otherwise at the start of the first ``serve_forever()`` or
  ``handle_request()``, under the same condition. If other threads still run
  then, serving fails at once with a ``RuntimeError`` that names them and
  says what to do (create the server before starting threads, or use
  ``ThreadingMixIn``), instead of risking a deadlocked worker.

Semantics that differ from the stdlib's fork per request
---------------------------------------------------------
A worker is a copy of the server process **as it was when the pool started**
(normally: when the constructor returned), and it **keeps its state from one
request to the next**::

    hits = 0

    class Count(StreamRequestHandler):
        def handle(self):
            global hits
            hits += 1                      # in the worker's memory only
            self.wfile.write(b"%d\\n" % hits)

    server = ForkingTCPServer(addr, Count)  # the pool starts here
    hits = 100                              # not seen by any worker
    server.greeting = "hi"                  # not seen either: set it in __init__

With the stdlib every client reads ``101``; here successive clients of one
worker read ``1``, ``2``, ``3``... (a second worker counts on its own). Set
up what handlers need before the server is created (or in its ``__init__``),
keep per-request state on the handler, and share state between requests
through something outside the process (a file, a database), as with any
multi-process server. File descriptors open when the pool started are
inherited by the workers, as with any fork.

Stopping
--------
``shutdown()`` waits ``shutdown_grace`` seconds for requests in workers. Then
each in-flight request is cut as a thread's is: its connection is shut down
so the handler's blocked socket I/O fails and it ends through
``handle_error()``/``finish()``, and the worker stays in the pool. A worker
that has still not finished ``WORKER_RELEASE_TIMEOUT`` seconds later (a
handler that is not waiting on its socket) is terminated (``SIGTERM``), then
killed (``SIGKILL``) after ``WORKER_KILL_TIMEOUT``. A hard stop (cancelling
``serve_forever``) does the same at once. ``server_close()`` stops the pool
and reaps every process, so afterwards the server process has no child left;
with ``block_on_close = False`` it kills the workers instead of letting them
exit. An exception in a handler goes to ``handle_error()`` in the worker, and
one that escapes ``handle_error()`` is logged there; the worker carries on. A
worker that dies while handling a request (``os._exit``, a signal, a
``SystemExit``) costs that request only: the client sees its connection
closed, the event is logged, and a new worker takes later requests. A worker
that dies while idle costs nothing: a request sent to it that it never read
(each worker counts what it took in memory shared with the server) goes to
another worker. If the server process dies, the fork server sees its control
socket close and stops the workers (``SIGTERM``, then ``SIGKILL``); idle
workers also exit by themselves when their own socket closes. If the fork
server is killed, running workers keep serving, but no new one can start
(logged; such requests are refused) until the server is restarted.

Inside a worker, ``server.shutdown()`` asks the server process to shut down
and returns at once; ``server_close()`` does nothing (the socket, the Unix
socket file and the pool belong to the server process). Workers ignore
``SIGINT``: a Ctrl-C in a terminal reaches every process of the group, and
the server process decides how its requests end. The pool needs Linux
(``AF_UNIX`` ``SOCK_SEQPACKET`` sockets, ``memfd_create``); elsewhere the
constructor says so.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from types import CodeType
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio

from ._engine import (
    ACCEPT_BACKOFF,
    ACCEPT_CAPACITY_ERRNOS,
    CapacitySlot,
    RateLimitedWarning,
    call_hook,
    is_async_handler,
    release_connection,
)
from ._families import TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer
from ._server import BaseServer, engine_of

if TYPE_CHECKING:
    _MixinBase = BaseServer
else:
    _MixinBase = object

LOGGER = logging.getLogger("trio_socketserver")

# After shutdown_grace an in-flight request's connection is shut down, so a
# handler blocked on its socket fails at once; this is how long it then gets
# to return before its worker is terminated. The second the thread path gives
# a handler thread in the same situation (THREAD_RELEASE_TIMEOUT).
WORKER_RELEASE_TIMEOUT = 1.0
# From SIGTERM to SIGKILL for a worker being stopped, and how long the fork
# server waits for a worker that is exiting before it kills it. A worker with
# default signal handling dies in microseconds; this bounds one that ignores
# SIGTERM.
WORKER_KILL_TIMEOUT = 1.0
# How long the server process waits for an answer from the fork server. A fork
# takes milliseconds even for a large process, and the longest the fork server
# is busy with one request is reaping a stuck worker (2 * WORKER_KILL_TIMEOUT);
# silence beyond this means it is stuck, and it is killed.
FORK_SERVER_TIMEOUT = 5.0
# A pool thread that has just handed back a result is still in its library's
# code for some microseconds. Before refusing to fork, the thread check waits
# up to this long, in millisecond sleeps that let other threads run, for such
# threads to reach their idle loop; a thread that is really busy stays busy.
THREAD_SETTLE_TIMEOUT = 0.05
# Room for the client address and pickling on top of a datagram's bytes.
MESSAGE_OVERHEAD = 4096
# The request counter a worker shares with the server (see _Worker.taken).
_COUNTER = "Q"
# Worker -> server messages, one byte each.
_DONE = b"d"
_SHUTDOWN = b"s"


class _PoolError(Exception):
    """The pool cannot take this request (no worker could be started)."""


# -- server process ---------------------------------------------------------


@attrs.define(eq=False)
class _Worker:
    """The server's end of one worker process."""

    pid: int
    sock: socket.socket
    taken: mmap.mmap
    """Shared with the worker: how many requests it has taken off its socket."""
    sent: int = 0
    """How many requests the server has sent it."""
    served: int = 0
    """How many it has finished."""
    has_server_socket: bool = False
    """Whether the datagram server's socket was passed to it (done once)."""

    def took_last_request(self) -> bool:
        """Whether it read the last request sent, i.e. began handling it.

        Read after the worker died: a request still queued on its socket when it
        died never reached a handler and can go to another worker.
        """
        taken: int = struct.unpack_from(_COUNTER, self.taken)[0]
        return taken >= self.sent


@attrs.define(eq=False)
class _Pool:
    """The server process's side of the pool: the fork server and the workers.

    Every method but :meth:`close` runs on the trio thread; none does anything
    in a forked child (see _forget_pools_in_child).
    """

    fork_server_pid: int
    fork_server: socket.socket
    owner_pid: int = attrs.Factory(os.getpid)
    workers: set[_Worker] = attrs.Factory(set)
    idle: list[_Worker] = attrs.Factory(list)
    busy: int = 0
    """Requests being handed to or handled by workers right now."""
    lock: trio.Lock = attrs.Factory(trio.Lock)
    """Serialises the fork server's request/answer exchanges."""
    broken: str | None = None
    closing: bool = False
    kill_on_close: bool = False
    freed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    """Requests waiting for a worker while none can be started (out of fds or memory)."""
    spawning: int = 0
    """Workers being started right now."""
    capacity_warning: RateLimitedWarning = attrs.Factory(RateLimitedWarning)

    async def checkout(self) -> _Worker:
        """The most recently used idle worker, or a new one if none is idle.

        Out of fds or memory (the errors the accept loop backs off on) while workers are
        busy, it waits for one of them to finish, trying a new one every ACCEPT_BACKOFF
        seconds, as the accept loop does: the request waits as a client in the backlog
        would, instead of being dropped. Logged at most every CAPACITY_LOG_INTERVAL.

        Cancellation: waiting for a worker is cancellable.
        """
        while True:
            if self.idle:
                return self.idle.pop()
            self.spawning += 1
            try:
                return await self._spawn()
            except OSError as exc:
                error = exc
            finally:
                self.spawning -= 1
            # With no worker to wait for (none, and none being started by another
            # request), waiting could last forever: this request gives up its fds instead.
            if error.errno not in ACCEPT_CAPACITY_ERRNOS or not (self.workers or self.spawning):
                raise _PoolError(f"cannot start a worker process: {error}") from error
            self._log_capacity(error)
            with trio.move_on_after(ACCEPT_BACKOFF):
                await self.freed.park()

    def _log_capacity(self, exc: OSError) -> None:
        self.capacity_warning.log(
            "cannot start a worker process: %s; requests wait for a busy worker to finish "
            "(raise the fd limit, e.g. ulimit -n, or lower max_children)",
            exc,
        )

    async def give(self, worker: _Worker, parcel: _Parcel) -> bool:
        """Send the request to the worker; False if it has died (its socket is closed)."""
        fds = [parcel.sock.fileno()]
        if parcel.datagram and worker.has_server_socket:
            fds = []
        try:
            await _send(worker.sock, parcel.message, fds)
        except OSError:
            return False
        worker.sent += 1
        worker.has_server_socket = True
        return True

    async def wait_for(self, worker: _Worker, on_shutdown: Callable[[], None]) -> bool:
        """Wait until the worker has finished its request: True, or False if it died.

        Cancellation: a checkpoint; the worker is not interrupted.
        """
        while True:
            # The answer is never there yet: wait before reading, not after a failed read.
            await trio.lowlevel.wait_readable(worker.sock)
            message = await _receive(worker.sock)
            if message == _SHUTDOWN:
                on_shutdown()
                continue
            if message == _DONE:
                worker.served += 1
                return True
            return False

    def checkin(self, worker: _Worker) -> None:
        if self.closing:
            self.workers.discard(worker)
            _close(worker.sock)
            worker.taken.close()
        else:
            self.idle.append(worker)
            self.freed.unpark()

    async def discard(self, worker: _Worker, *, terminate: bool = False) -> int | None:
        """Remove a worker from the pool and reap it; returns its wait status if known.

        With ``terminate``, a worker that is still running is sent ``SIGTERM``
        and, ``WORKER_KILL_TIMEOUT`` later, ``SIGKILL``. Without it, the worker
        is expected to be exiting already (it closed its socket).
        """
        self.workers.discard(worker)
        status = None
        try:
            if terminate:
                await self._ask("terminate", worker.pid)
                with trio.move_on_after(WORKER_KILL_TIMEOUT):
                    while await _receive(worker.sock):
                        pass  # a late "done": the worker is going anyway
            status = (await self._ask("reap", worker.pid))[0]
        except _PoolError:
            pass  # the fork server is gone; whoever inherits the worker reaps it
        finally:
            _close(worker.sock)
            worker.taken.close()
            self.freed.unpark()  # its fds are free: a waiting request may start a worker
        return status

    async def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        counter = os.memfd_create("trio_socketserver worker", os.MFD_CLOEXEC)
        taken = None
        try:
            os.ftruncate(counter, struct.calcsize(_COUNTER))
            taken = mmap.mmap(counter, struct.calcsize(_COUNTER))
            answer = await self._ask("spawn", fds=[theirs.fileno(), counter])
            if answer[0] is None:
                raise _PoolError(answer[1])
        except BaseException:
            ours.close()
            if taken is not None:
                taken.close()
            raise
        finally:
            theirs.close()
            os.close(counter)
        ours.setblocking(False)
        worker = _Worker(answer[0], ours, taken)
        self.workers.add(worker)
        return worker

    async def _ask(self, *message: Any, fds: list[int] | None = None) -> tuple[Any, ...]:
        """One request/answer exchange with the fork server.

        Cancellation: waiting for the lock is cancellable; the exchange itself
        is shielded (bounded by FORK_SERVER_TIMEOUT), since an answer left
        unread would be taken by the next exchange.
        """
        async with self.lock:
            if self.broken is not None:
                raise _PoolError(self.broken)
            answer = b""
            with trio.CancelScope(shield=True), trio.move_on_after(FORK_SERVER_TIMEOUT) as waited:
                try:
                    await _send(self.fork_server, pickle.dumps(message), fds or [])
                    answer = await _receive(self.fork_server)
                except OSError:
                    pass  # it has exited: reported below
            if not answer:
                self._break(stuck=waited.cancelled_caught)
                raise _PoolError(self.broken)
        result: tuple[Any, ...] = pickle.loads(answer)
        return result

    def _break(self, *, stuck: bool) -> None:
        what = f"did not answer within {FORK_SERVER_TIMEOUT} s" if stuck else "has exited"
        self.broken = (
            f"the worker pool's fork server (pid {self.fork_server_pid}) {what}; no new worker "
            "process can be started until the server is restarted"
        )
        LOGGER.error("%s", self.broken)
        if stuck:
            # Alive, hence not reaped by anyone: the pid is still our child's.
            os.kill(self.fork_server_pid, signal.SIGKILL)

    def close(self, *, kill: bool) -> None:
        """Stop the pool: now if no request runs in it, else when the last one ends.

        Thread safety: any thread, when no request runs (the server has
        stopped); from the trio thread while requests run, the stop is left to
        the last of them. Idempotent.
        """
        if self.closing or os.getpid() != self.owner_pid:
            return
        self.closing = True
        self.kill_on_close = kill
        if not self.busy:
            self.stop()

    def stop(self) -> None:
        """Close every worker's socket, have the fork server stop them, reap it.

        Blocks until the fork server has exited: idle workers exit at once on
        EOF, so this takes milliseconds; it is bounded by FORK_SERVER_TIMEOUT.
        """
        for worker in self.workers:
            _close(worker.sock)
            worker.taken.close()
        self.workers.clear()
        self.idle.clear()
        try:
            self.fork_server.send(pickle.dumps(("stop", self.kill_on_close)))
        except OSError:
            pass  # it has exited already; it is reaped below
        if not _wait_for_eof(self.fork_server, FORK_SERVER_TIMEOUT):
            LOGGER.error(
                "the worker pool's fork server (pid %d) did not exit within %s s; killing it",
                self.fork_server_pid,
                FORK_SERVER_TIMEOUT,
            )
            os.kill(self.fork_server_pid, signal.SIGKILL)
        try:
            os.waitpid(self.fork_server_pid, 0)
        except ChildProcessError:
            pass  # reaped by someone's waitpid(-1) (the stdlib's ForkingMixIn does that)
        _close(self.fork_server)
        _POOLS.discard(self)

    def forget(self) -> None:
        """In a forked child: drop the copies of the server's ends, touch nothing else."""
        for sock in [self.fork_server, *(w.sock for w in self.workers)]:
            sock.close()


# Pools of this process. A child forked by anyone (our fork server, the user,
# multiprocessing) must not keep their sockets open: the fork server and idle
# workers learn that the server process died from these sockets' EOF.
_POOLS: weakref.WeakSet[_Pool] = weakref.WeakSet()
_fork_hook_registered = False


def _forget_pools_in_child() -> None:
    for pool in list(_POOLS):
        pool.forget()
    _POOLS.clear()


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_forget_pools_in_child)
        _fork_hook_registered = True


class _ThreadsRunning(RuntimeError):
    """Other threads run, so forking the fork server now could deadlock it."""


def _idle_thread_code() -> frozenset[CodeType]:
    """Code a thread can be in while it holds no lock a forked child could need.

    Idle pool threads wait for work in these loops (trio's thread cache, the
    engine's handler threads), and a thread that is starting or has finished
    is in threading's bootstrap, whose locks the child re-creates.
    """
    functions: list[Any] = [
        getattr(threading.Thread, "_bootstrap", None),
        getattr(threading.Thread, "_bootstrap_inner", None),
        getattr(threading.Thread, "_delete", None),
    ]
    try:
        from trio._core._thread_cache import WorkerThread

        functions.append(WorkerThread._work)
    except (ImportError, AttributeError):
        pass  # another trio: its idle threads then count as busy, the safe side
    return frozenset(f.__code__ for f in functions if f is not None)


def _busy_threads() -> list[str]:
    """Names of the other Python threads that may hold a lock (after THREAD_SETTLE_TIMEOUT)."""
    me = threading.get_ident()
    idle = _idle_thread_code()
    deadline = time.monotonic() + THREAD_SETTLE_TIMEOUT
    while True:
        busy = [
            ident
            for ident, frame in sys._current_frames().items()
            if ident != me and frame.f_code not in idle
        ]
        if not busy or time.monotonic() >= deadline:
            break
        time.sleep(0.001)
    names = {t.ident: t.name for t in threading.enumerate()}
    return sorted(names.get(ident, f"thread {ident:#x}") for ident in busy)


def _start_pool(server: BaseServer) -> _Pool:
    """Fork the fork server from this (clean) process; see the module docstring.

    Errors: ``_ThreadsRunning`` if another thread may hold a lock; ``OSError``
    if the socket pair or the fork fails.
    """
    if not (hasattr(socket, "SOCK_SEQPACKET") and hasattr(os, "memfd_create")):
        raise RuntimeError(
            "ForkingMixIn needs Linux (AF_UNIX SOCK_SEQPACKET sockets and memfd_create); "
            "use ThreadingMixIn on this system"
        )
    busy = _busy_threads()
    if busy:
        raise _ThreadsRunning(
            f"ForkingMixIn cannot start its worker processes: this process runs other threads "
            f"({', '.join(busy)}), and a lock one of them holds would stay locked forever in "
            "the workers. Create the server before starting threads (its workers are forked "
            "when it is created or first serves), or use ThreadingMixIn."
        )
    _register_fork_hook()
    # Output still buffered now would be written again by every worker that flushes.
    _flush_stdio()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with warnings.catch_warnings():
            # CPython 3.12+ warns whenever the process has another OS thread.
            # The check above is the precise version of that warning for
            # Python threads (none is doing anything); threads of C libraries
            # are theirs to make fork-safe (pthread_atfork), as for any fork.
            warnings.filterwarnings(
                "ignore", "This process .* is multi-threaded", DeprecationWarning
            )
            pid = os.fork()
    except BaseException:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        ours.close()
        _run_child(_ForkServer(server, theirs).run)
    theirs.close()
    ours.setblocking(False)
    pool = _Pool(pid, ours)
    _POOLS.add(pool)
    return pool


@attrs.frozen
class _Parcel:
    """A request as it travels to a worker."""

    message: bytes
    """The pickled (client address, datagram bytes or None for a connection)."""
    sock: socket.socket
    """The connection, or the datagram server's socket (passed once per worker)."""
    datagram: bool

    @classmethod
    def wrap(cls, request: Any, client_address: Any) -> _Parcel:
        """Errors: ``TypeError`` (or a pickling error) for what cannot travel."""
        if isinstance(request, socket.socket):
            return cls(pickle.dumps((client_address, None)), request, False)
        if (
            isinstance(request, tuple)
            and len(request) == 2
            and isinstance(request[0], bytes)
            and isinstance(request[1], socket.socket)
        ):
            return cls(pickle.dumps((client_address, request[0])), request[1], True)
        raise TypeError(
            f"a worker process can only take a socket or a (bytes, socket) datagram request, "
            f"not {type(request).__name__}; override get_request() to return one of these"
        )


async def _send(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    while True:
        try:
            socket.send_fds(sock, [message], fds)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _receive(sock: socket.socket) -> bytes:
    """One message from a non-blocking SEQPACKET socket; b"" at EOF."""
    while True:
        try:
            return sock.recv(MESSAGE_OVERHEAD)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except ConnectionResetError:
            return b""


def _wait_for_eof(sock: socket.socket, timeout: float) -> bool:
    """Block until the peer has closed ``sock``; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not _poll_readable(sock.fileno(), deadline - time.monotonic()):
            return False
        try:
            if not sock.recv(MESSAGE_OVERHEAD):
                return True
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return True


def _poll_readable(fd: int, timeout: float) -> bool:
    """Block until ``fd`` is readable (True) or ``timeout`` seconds passed (False).

    A ``timeout`` of 0 or less just looks. poll(), not select(): the fd may be
    above select()'s FD_SETSIZE.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def _close(sock: socket.socket) -> None:
    try:
        trio.lowlevel.notify_closing(sock)
    except RuntimeError:
        pass  # not inside trio: nothing can be waiting on it
    sock.close()


def _describe_exit(status: int | None) -> str:
    if status is None:
        return "exited"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"was killed by {name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


# -- children: the fork server and the workers --------------------------------


def _run_child(main: Callable[[], int]) -> NoReturn:
    """The rest of a forked child's life: run ``main``; never unwind into the parent's stack."""
    status = 1
    try:
        status = main()
    except SystemExit:
        pass  # raised by a handler: the child ends, as the stdlib's does (status 1)
    except BaseException:
        LOGGER.exception("process %d of the worker pool failed", os.getpid())
    finally:
        _flush_stdio()
        os._exit(status)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # closed or broken: nothing left to save


class _ForkServer:
    """The fork server's loop: fork workers, signal and reap them, on request.

    It is single-threaded for its whole life, so its forks are safe. Requests
    (pickled tuples) and answers:

    - ``("spawn",)`` with the worker's socket as fd -> ``(pid,)`` or ``(None, why)``
    - ``("terminate", pid)`` -> ``()``: SIGTERM now, SIGKILL after WORKER_KILL_TIMEOUT
    - ``("reap", pid)`` -> ``(wait status or None,)``: waits for it to exit
      (killing it after WORKER_KILL_TIMEOUT)
    - ``("stop", kill)`` or EOF: stop every worker (SIGKILL at once with
      ``kill``, else SIGTERM then SIGKILL), reap them, exit.
    """

    def __init__(self, server: BaseServer, control: socket.socket) -> None:
        self.server = server
        self.control = control
        self.children: set[int] = set()
        self.exited: dict[int, int] = {}
        self.kill_at: dict[int, float] = {}
        self.wakeup_r = -1
        self.wakeup_w = -1
        self._commands: dict[str, Callable[..., tuple[Any, ...]]] = {
            "spawn": self._spawn,
            "terminate": self._terminate,
            "reap": self._reap,
        }

    def run(self) -> int:
        # Signals: Ctrl-C reaches the whole process group; the server process
        # decides how requests end. SIGTERM must stop a worker (see discard),
        # whatever handler the server process had installed. The server's
        # wakeup fd (trio's) must not be written from here.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        listening = getattr(self.server, "socket", None)
        if isinstance(listening, socket.socket):
            listening.close()  # the server process owns it; datagram workers get it passed
        gc.freeze()  # what was inherited stays shared with the workers, not copied by the GC
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _ignore_signal)  # a handler, so SIGCHLD wakes poll()
        kill = True
        try:
            kill = self._serve()
        finally:
            self._stop_workers(kill)
        return 0

    def _serve(self) -> bool:
        """Answer requests until told to stop; returns whether to kill the workers."""
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.wakeup_r, select.POLLIN)
        while True:
            timeout = None
            if self.kill_at:
                timeout = max(0.0, min(self.kill_at.values()) - time.monotonic()) * 1000
            events = poller.poll(timeout)
            self._collect()
            self._kill_overdue()
            if any(fd == self.control.fileno() for fd, _ in events):
                message, fds, _, _ = socket.recv_fds(self.control, MESSAGE_OVERHEAD, 2)
                if not message:
                    return False  # the server process died: its workers must go too
                command, *args = pickle.loads(message)
                if command == "stop":
                    return bool(args[0])
                answer = self._commands[command](*args, *fds)
                self.control.send(pickle.dumps(answer))

    def _spawn(self, fd: int, counter: int) -> tuple[Any, ...]:
        sock = socket.socket(fileno=fd)
        try:
            pid = os.fork()
        except OSError as exc:
            return (None, f"fork() failed: {exc}")
        else:
            if pid == 0:
                _run_child(lambda: self._become_worker(sock, counter))
            self.children.add(pid)
            return (pid,)
        finally:
            sock.close()
            os.close(counter)

    def _become_worker(self, sock: socket.socket, counter: int) -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        self.control.close()
        taken = mmap.mmap(counter, struct.calcsize(_COUNTER))
        os.close(counter)
        return _serve_requests(self.server, sock, taken)

    def _terminate(self, pid: int) -> tuple[Any, ...]:
        if pid in self.children:
            os.kill(pid, signal.SIGTERM)
            self.kill_at.setdefault(pid, time.monotonic() + WORKER_KILL_TIMEOUT)
        return ()

    def _collect(self) -> None:
        """Reap every worker that has exited (non-blocking)."""
        try:
            while os.read(self.wakeup_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.kill_at.pop(pid, None)
            self.exited[pid] = status

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for pid, when in list(self.kill_at.items()):
            if when <= now:
                os.kill(pid, signal.SIGKILL)
                del self.kill_at[pid]

    def _wait_for_children(self, pids: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pids & self.children:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            _poll_readable(self.wakeup_r, remaining)
            self._collect()

    def _reap(self, pid: int) -> tuple[Any, ...]:
        if pid in self.children:
            # The server saw it close its socket (it is exiting) or gave up on
            # it after a SIGTERM: give it a moment, then kill it.
            self._wait_for_children({pid}, WORKER_KILL_TIMEOUT)
            if pid in self.children:
                os.kill(pid, signal.SIGKILL)
                self._wait_for_children({pid}, WORKER_KILL_TIMEOUT)
        return (self.exited.pop(pid, None),)

    def _stop_workers(self, kill: bool) -> None:
        for pid in self.children:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        self._wait_for_children(set(self.children), WORKER_KILL_TIMEOUT)
        for pid in self.children:
            os.kill(pid, signal.SIGKILL)
        for pid in self.children:
            os.waitpid(pid, 0)


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGCHLD handler of the fork server: the wakeup fd does the work."""


@attrs.define(eq=False)
class _WorkerSide:
    """What a worker process knows about the server it works for."""

    server: BaseServer
    sock: socket.socket

    def request_shutdown(self) -> None:
        self.sock.send(_SHUTDOWN)


# Set in a worker process only: lets server.shutdown() in a handler reach the
# server process.
_worker_side: _WorkerSide | None = None


def _serve_requests(server: BaseServer, sock: socket.socket, taken: mmap.mmap) -> int:
    """A worker's loop: one request at a time until the server closes the socket.

    ``taken`` counts the requests read off the socket, for the server to tell,
    should this process die, whether it had begun the last one.
    """
    global _worker_side
    _worker_side = _WorkerSide(server, sock)
    limit = getattr(server, "max_packet_size", 0) + MESSAGE_OVERHEAD
    server_socket: socket.socket | None = None
    count = 0
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, limit, 1)
        except ConnectionResetError:
            message = b""
        if not message:
            return 0  # the pool is stopping, or the server process died
        count += 1
        struct.pack_into(_COUNTER, taken, 0, count)
        client_address, data = pickle.loads(message)
        if data is None:
            request: Any = socket.socket(fileno=fds[0])
        else:
            if fds:
                server_socket = server.socket = socket.socket(fileno=fds[0])
            request = (data, server_socket)
        engine_of(server).blocking_sequence([request], client_address)
        _flush_stdio()
        try:
            sock.send(_DONE)
        except (BrokenPipeError, ConnectionResetError):
            return 0  # the server process died during the request


# -- the mixin ---------------------------------------------------------------


class ForkingMixIn(_MixinBase):
    """Run each request of a sync ``handle()`` in a worker process from a reused pool.

    Put it first in the bases, as with the stdlib: ``class
    ForkingTCPServer(ForkingMixIn, TCPServer)``. Async handlers are
    unaffected: they always run as tasks in the server process. The module
    docstring (and ``docs/forking.md``) explains the design and how it differs
    from the stdlib's fork per request: a worker keeps its state between
    requests and sees the server process as it was when the pool started.

    ``max_children``: at most this many worker processes, hence requests at
    once (default 40, as the stdlib); when all are busy the server stops
    accepting. ``block_on_close``: ``server_close()`` lets the workers exit
    (True, the default) or kills them (False); either way it reaps them, so
    no child process is left.

    Cancellation: see ``serve_forever``; an in-flight request is cut by
    shutting its connection down, and its worker is terminated if it does not
    finish within ``WORKER_RELEASE_TIMEOUT`` seconds after that.

    Thread safety: as :class:`BaseServer`. In a worker process (a handler),
    ``shutdown()`` asks the server process to shut down and returns at once,
    and ``server_close()`` does nothing.

    Resource handling: the pool (a fork server, its workers, one socket pair
    and one shared counter page per worker) lives from the constructor to
    ``server_close()``, which closes every socket and reaps every process;
    call it (``with`` / ``async with`` do), as for the listening socket.

    Errors: if the pool cannot start because other threads are running,
    ``serve_forever()``/``handle_request()`` raise ``RuntimeError`` at once,
    saying why and what to do. A request whose worker dies is logged and its
    connection closed; the server keeps serving.
    """

    max_children: int = 40
    block_on_close: bool = True
    _forking_pool: _Pool | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Fork the fork server now, while the process is most likely clean. A
        # subclass constructor may already have served (and started it), or
        # closed the server.
        if (
            self._forking_pool is None
            and not engine_of(self).is_closed()
            and not is_async_handler(self.RequestHandlerClass)
        ):
            try:
                self._forking_pool = _start_pool(self)
            except _ThreadsRunning:
                LOGGER.debug("other threads run; the worker pool will start when serving starts")
            except BaseException:
                self.server_close()
                raise

    @property
    def active_children(self) -> set[int]:
        """Pids of the worker processes alive now (busy or idle); empty once closed."""
        pool = self._forking_pool
        if pool is None or pool.closing:
            return set()
        return {worker.pid for worker in pool.workers}

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the request: a sync handler's in a worker process; returns at once."""
        if is_async_handler(self.RequestHandlerClass):
            super().process_request(request, client_address)
        else:
            engine_of(self).start_request(request, client_address, self._handle_sync)

    def _pool(self) -> _Pool:
        pool = self._forking_pool
        if pool is None:
            pool = self._forking_pool = _start_pool(self)
        return pool

    async def _handle_sync(self, slot: CapacitySlot, request: Any, client_address: Any) -> bool:
        """Run the request in a worker process; see the class docstring."""
        try:
            pool = self._pool()
            parcel = _Parcel.wrap(request, client_address)
        except (RuntimeError, OSError, TypeError, pickle.PicklingError) as exc:
            LOGGER.error("cannot hand the request from %r to a worker: %s", client_address, exc)
            await engine_of(self).end_request(request, client_address)
            return True
        if pool.closing:
            LOGGER.error(
                "the request from %r came after server_close(); closing it", client_address
            )
            await engine_of(self).end_request(request, client_address)
            return True
        pool.busy += 1
        try:
            await self._run_in_worker(pool, parcel, request, client_address)
            return False
        finally:
            pool.busy -= 1
            if pool.closing and not pool.busy:
                pool.stop()

    async def _run_in_worker(
        self, pool: _Pool, parcel: _Parcel, request: Any, client_address: Any
    ) -> None:
        worker = None  # the worker that owns the request, for _cut
        try:
            while True:
                worker = await pool.checkout()
                given = await pool.give(worker, parcel)
                if given and await pool.wait_for(worker, self.shutdown):
                    break
                dead, worker = worker, None
                if given and dead.took_last_request():
                    await self._lost(pool, dead, request, client_address)
                    return
                # It died before reading the request (killed while idle): the request
                # is intact, another worker takes it. A new worker that dies at once is
                # not retried, so a worker that cannot start does not loop forever.
                status = await pool.discard(dead)
                what = f"worker process {dead.pid} {_describe_exit(status)} before it took"
                if not dead.served:
                    raise _PoolError(f"{what} its first request")
                LOGGER.warning(
                    "%s the request from %r; another worker takes it", what, client_address
                )
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._cut(pool, worker, request, client_address)
            raise
        except _PoolError as exc:
            LOGGER.error("cannot hand the request from %r to a worker: %s", client_address, exc)
            await engine_of(self).end_request(request, client_address)
            return
        pool.checkin(worker)
        await call_hook(self.close_request, request)  # our copy; the worker ended it

    async def _lost(self, pool: _Pool, worker: _Worker, request: Any, client_address: Any) -> None:
        """The worker died during the request: log it, close the connection."""
        status = await pool.discard(worker)
        LOGGER.warning(
            "worker process %d %s while handling the request from %r; its connection is "
            "closed and a new worker will take later requests",
            worker.pid,
            _describe_exit(status),
            client_address,
        )
        await engine_of(self).end_request(request, client_address)

    async def _cut(
        self, pool: _Pool, worker: _Worker | None, request: Any, client_address: Any
    ) -> None:
        """End a cancelled request (grace expired or hard stop); runs shielded, bounded."""
        if worker is None:
            await engine_of(self).end_request(request, client_address)
            return
        release_connection(request)  # blocked socket I/O in the worker fails at once
        finished = None
        with trio.move_on_after(WORKER_RELEASE_TIMEOUT):
            finished = await pool.wait_for(worker, self.shutdown)
        if finished:
            pool.checkin(worker)
            await call_hook(self.close_request, request)
        elif finished is None:
            status = await pool.discard(worker, terminate=True)
            LOGGER.warning(
                "worker process %d was still handling the request from %r %.1f s after the "
                "shutdown cut its connection; it %s",
                worker.pid,
                client_address,
                WORKER_RELEASE_TIMEOUT,
                "was stopped" if status is None else _describe_exit(status),
            )
            await engine_of(self).end_request(request, client_address)
        else:
            await self._lost(pool, worker, request, client_address)

    def shutdown(self) -> None:
        """As :meth:`BaseServer.shutdown`; in a worker process, asks the server process."""
        side = _worker_side
        if side is not None and side.server is self:
            side.request_shutdown()
            return
        super().shutdown()

    def server_close(self) -> None:
        """As :meth:`BaseServer.server_close`, then stop the pool and reap its processes.

        In a worker process it does nothing: what it would close belongs to
        the server process.
        """
        side = _worker_side
        if side is not None and side.server is self:
            return
        super().server_close()
        if self._forking_pool is not None:
            self._forking_pool.close(kill=not self.block_on_close)


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
