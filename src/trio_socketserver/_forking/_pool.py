# The worker pool as the server process sees it, under trio: starting it (the one fork the
# server process makes, each time serving starts: the fork server), and the workers the fork
# server forked for it: hand a request to an idle worker or a new one, wait for its answer,
# take it back, retire or discard it, stop them all. Every method runs on the trio thread but
# close()/stop()/reap(), which server_close() may call from any thread once nothing is
# serving, and set_draining(), which shutdown() calls from anywhere.
"""The server process's side of the worker pool."""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .._engine import ACCEPT_BACKOFF, ACCEPT_CAPACITY_ERRNOS, RateLimitedWarning
from . import _safety
from ._forkserver import ForkServer, run_child
from ._wire import (
    DONE,
    MESSAGE_OVERHEAD,
    SHUTDOWN,
    WORKER_KILL_TIMEOUT,
    Parcel,
    SharedPage,
    decode,
    encode,
    encode_resize,
    flush_stdio,
    poll_readable,
)
from ._worker import WorkerSpec

LOGGER = logging.getLogger("trio_socketserver")

# How long the server process waits for an answer from the fork server. A fork takes
# milliseconds even for a large process, and the longest the fork server is busy with one
# request is reaping a stuck worker (2 * WORKER_KILL_TIMEOUT); silence beyond this means it is
# stuck, and it is killed.
FORK_SERVER_TIMEOUT = 5.0


class PoolError(Exception):
    """The pool cannot take this request (no worker could be started, or it is too large)."""


@attrs.define(eq=False)
class Worker:
    """The server's end of one worker process."""

    pid: int
    sock: socket.socket
    slot: int
    """Its word in the pool's shared page (see SharedPage)."""
    message_size: int
    """What it reads a request with (see _wire.encode_resize)."""
    sent: int = 0
    """How many requests the server has sent it."""
    served: int = 0
    """How many it has finished."""
    has_server_socket: bool = False
    """Whether the datagram server's socket was passed to it (done once)."""


@attrs.define(eq=False)
class Pool:
    """The fork server of one serving call, and the workers it forked.

    ``on_start(pid)`` / ``on_end(pid)`` are called as workers join and leave the pool (the
    mixin keeps ``active_children`` with them).
    """

    fork_server_pid: int
    fork_server: socket.socket
    page: SharedPage
    message_size: int
    """What new workers read a request with (WorkerSpec.message_size)."""
    on_start: Callable[[int], None]
    on_end: Callable[[int], None]
    owner_pid: int = attrs.Factory(os.getpid)
    workers: set[Worker] = attrs.Factory(set)
    idle: list[Worker] = attrs.Factory(list)
    """Most recently used last: it takes the next request, so a light load keeps one warm."""
    idle_sockets: select.poll = attrs.Factory(select.poll)
    """The idle workers' sockets, for prune() to look at all of them in one call."""
    free_slots: list[int] = attrs.field(init=False)
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

    def __attrs_post_init__(self) -> None:
        self.free_slots = list(reversed(range(self.page.slots)))

    # -- a request's way through the pool -----------------------------------------------

    async def checkout(self) -> Worker:
        """The most recently used idle worker, or a new one if none is idle.

        Out of fds or memory (the errors the accept loop backs off on) while workers are
        busy, it waits for one of them to finish, trying a new one every ACCEPT_BACKOFF
        seconds, as the accept loop does: the request waits as a client in the backlog
        would, instead of being dropped. Logged at most every CAPACITY_LOG_INTERVAL.

        Cancellation: waiting for a worker is cancellable.
        """
        while True:
            if self.idle:
                worker = self.idle.pop()
                self.idle_sockets.unregister(worker.sock)
                return worker
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
                raise PoolError(f"cannot start a worker process: {error}") from error
            self.capacity_warning.log(
                "cannot start a worker process: %s; requests wait for a busy worker to finish "
                "(raise the fd limit, e.g. ulimit -n, or lower max_children)",
                error,
            )
            with trio.move_on_after(ACCEPT_BACKOFF):
                await self.freed.park()

    async def give(self, worker: Worker, parcel: Parcel) -> bool:
        """Send the request to the worker; False if it has died (its socket is closed).

        Errors: ``PoolError`` for a datagram too large to pass to a worker.
        """
        fds = [parcel.sock.fileno()]
        if parcel.datagram and worker.has_server_socket:
            fds = []
        try:
            if len(parcel.message) > worker.message_size:
                await _send(worker.sock, encode_resize(len(parcel.message)), [])
                worker.message_size = len(parcel.message)
            await _send(worker.sock, parcel.message, fds)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                return False
            # Larger than the socket's send buffer (a Unix datagram server with a large
            # max_packet_size): make room once, as far as the system allows.
            try:
                worker.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, len(parcel.message) + MESSAGE_OVERHEAD
                )
                await _send(worker.sock, parcel.message, fds)
            except OSError as again:
                if again.errno != errno.EMSGSIZE:
                    return False
                raise PoolError(
                    f"the datagram ({len(parcel.message)} bytes with its address) is larger "
                    "than a worker's socket can take (raise net.core.wmem_max)"
                ) from again
        worker.sent += 1
        worker.has_server_socket = True
        return True

    async def wait_for(self, worker: Worker, on_shutdown: Callable[[], None]) -> bool:
        """Wait until the worker has finished its request: True, or False if it died.

        Cancellation: a checkpoint; the worker is not interrupted.
        """
        while True:
            # The answer is never there yet: wait before reading, not after a failed read.
            await trio.lowlevel.wait_readable(worker.sock)
            message = await _receive(worker.sock)
            if message == SHUTDOWN:
                on_shutdown()
                continue
            if message == DONE:
                worker.served += 1
                return True
            return False

    def took_last_request(self, worker: Worker) -> bool:
        """Whether the worker read the last request sent, i.e. began handling it.

        Read after the worker died: a request still queued on its socket when it died never
        reached a handler and can go to another worker.
        """
        return self.page.taken(worker.slot) >= worker.sent

    def checkin(self, worker: Worker) -> None:
        if self.closing:
            self._drop(worker)  # it exits on EOF; the fork server reaps it as it stops
        else:
            self.idle.append(worker)
            self.idle_sockets.register(worker.sock, select.POLLIN)
            self.freed.unpark()

    async def discard(self, worker: Worker, *, terminate: bool = False) -> int | None:
        """Remove a worker from the pool and reap it; returns its wait status if known.

        Its socket is closed first, so a worker that is alive and idle exits at once (a
        worker retired after ``max_requests_per_child``). With ``terminate``, a worker that
        is still running is sent ``SIGTERM`` and, ``WORKER_KILL_TIMEOUT`` later, ``SIGKILL``.
        """
        self.workers.discard(worker)
        status = None
        try:
            if terminate:
                await self._ask("terminate", worker.pid)
                with trio.move_on_after(WORKER_KILL_TIMEOUT):
                    while await _receive(worker.sock):
                        pass  # a late "done": the worker is going anyway
            _close(worker.sock)
            status = (await self._ask("reap", worker.pid))[0]
        except PoolError:
            pass  # the fork server is gone; whoever inherits the worker reaps it
        finally:
            self._drop(worker)
            self.freed.unpark()  # its fds are free: a waiting request may start a worker
        return status

    def prune(self) -> None:
        """Forget the idle workers that have exited (their socket reads as closed: an idle
        worker sends nothing); the fork server reaps them. One poll(), no wait."""
        gone = {fd for fd, _ in self.idle_sockets.poll(0)}
        if not gone:
            return  # the usual case, after every request: keep it cheap
        for worker in [w for w in self.idle if w.sock.fileno() in gone]:
            self.idle.remove(worker)
            self.idle_sockets.unregister(worker.sock)
            self._drop(worker)

    def set_draining(self) -> None:
        """``shutdown()`` was called: ``shutdown_requested`` is now true in the workers.

        Thread safety: any thread (``shutdown()`` may come from anywhere).
        """
        if not self.page.closed:  # stopped: server_close() came first
            self.page.set_draining()

    # -- starting workers, and talking to the fork server ------------------------------

    async def _spawn(self) -> Worker:
        if not self.free_slots:
            raise PoolError("every worker slot is taken (max_children changed while serving?)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        slot = self.free_slots.pop()
        self.page.set_taken(slot, 0)
        try:
            answer = await self._ask("spawn", slot, fds=[theirs.fileno()])
            if answer[0] is None:
                raise PoolError(answer[1])
        except BaseException:
            ours.close()
            self.free_slots.append(slot)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        worker = Worker(answer[0], ours, slot, self.message_size)
        self.workers.add(worker)
        self.on_start(worker.pid)
        return worker

    def _drop(self, worker: Worker) -> None:
        """Out of the pool: its socket closed, its slot free, its pid out of
        ``active_children``. Idempotent for the socket; called once per worker."""
        self.workers.discard(worker)
        _close(worker.sock)
        self.free_slots.append(worker.slot)
        self.on_end(worker.pid)

    async def _ask(self, *message: Any, fds: list[int] | None = None) -> tuple[Any, ...]:
        """One request/answer exchange with the fork server.

        Cancellation: waiting for the lock is cancellable; the exchange itself is shielded
        (bounded by FORK_SERVER_TIMEOUT), since an answer left unread would be taken by the
        next exchange.
        """
        async with self.lock:
            if self.broken is not None:
                raise PoolError(self.broken)
            answer = b""
            with trio.CancelScope(shield=True), trio.move_on_after(FORK_SERVER_TIMEOUT) as waited:
                try:
                    await _send(self.fork_server, encode(*message), fds or [])
                    answer = await _receive(self.fork_server)
                except OSError:
                    pass  # it has exited: reported below
            if not answer:
                self._break(stuck=waited.cancelled_caught)
                raise PoolError(self.broken)
        return decode(answer)

    def _break(self, *, stuck: bool) -> None:
        what = f"did not answer within {FORK_SERVER_TIMEOUT} s" if stuck else "has exited"
        self.broken = (
            f"the worker pool's fork server (pid {self.fork_server_pid}) {what}; no new worker "
            "process can be started until the server serves again"
        )
        LOGGER.error("%s", self.broken)
        if stuck:
            # Alive, hence not reaped by anyone: the pid is still our child's.
            os.kill(self.fork_server_pid, signal.SIGKILL)

    # -- stopping -------------------------------------------------------------------------

    def close(self, *, kill: bool, wait: bool = True) -> None:
        """Stop the pool: now if no request runs in it, else when the last one ends.

        ``wait``: see :meth:`stop`.

        Thread safety: any thread, when no request runs (the server has stopped); from the
        trio thread while requests run, the stop is left to the last of them. Idempotent.
        """
        if self.closing or os.getpid() != self.owner_pid:
            return
        self.closing = True
        self.kill_on_close = kill
        if not self.busy:
            self.stop(wait=wait)

    def stop(self, *, wait: bool = True) -> None:
        """Close every worker's socket and have the fork server stop them and exit.

        With ``wait``, reap it: idle workers exit at once on EOF, so this blocks for
        milliseconds, and at most FORK_SERVER_TIMEOUT. Without, :meth:`reap` does it later.
        """
        for worker in self.workers:
            _close(worker.sock)
            self.on_end(worker.pid)
        self.workers.clear()
        self.idle.clear()
        self.idle_sockets = select.poll()
        try:
            self.fork_server.send(encode("stop", self.kill_on_close))
        except OSError:
            pass  # it has exited already; it is reaped below
        if wait:
            self.reap(FORK_SERVER_TIMEOUT)

    def reap(self, timeout: float) -> bool:
        """Reap the fork server of a stopped pool; True once done (or done before).

        Waits up to ``timeout`` seconds for it to exit, then kills it; with 0, only looks.
        """
        if self.fork_server.fileno() == -1:
            return True
        if not _wait_for_eof(self.fork_server, timeout):
            if timeout <= 0:
                return False
            LOGGER.error(
                "the worker pool's fork server (pid %d) did not exit within %s s; killing it",
                self.fork_server_pid,
                timeout,
            )
            os.kill(self.fork_server_pid, signal.SIGKILL)
        try:
            os.waitpid(self.fork_server_pid, 0)
        except ChildProcessError:
            pass  # reaped by someone's waitpid(-1) (the stdlib's ForkingMixIn does that)
        _close(self.fork_server)
        self.page.close()
        _POOLS.discard(self)
        return True

    def forget(self) -> None:
        """In a forked child: drop the copies of the server's ends, touch nothing else."""
        for sock in [self.fork_server, *(w.sock for w in self.workers)]:
            sock.close()


def start_pool(
    spec: WorkerSpec,
    *,
    slots: int,
    fork_safety: str,
    on_start: Callable[[int], None],
    on_end: Callable[[int], None],
) -> Pool:
    """Fork the fork server: its workers will be clones of this process as it is now.

    ``slots`` bounds the workers alive at once (``max_children``).

    Errors: ``ForkSafetyError`` (``fork_safety = "strict"``) if another thread may hold a
    lock; ``RuntimeError`` off Linux; ``OSError`` if the socket pair or the fork fails.
    """
    if not hasattr(socket, "SOCK_SEQPACKET") or not os.path.isdir("/proc/self/fd"):
        raise RuntimeError(
            "ForkingMixIn needs Linux (AF_UNIX SOCK_SEQPACKET sockets and /proc); "
            "use ThreadingMixIn on this system"
        )
    _register_fork_hook()
    page = SharedPage(slots)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        _safety.check_threads(fork_safety)  # as late as can be: threads move
        # Output still buffered now would be written again by every worker that flushes.
        flush_stdio()
        pid = _safety.fork()
    except BaseException:
        ours.close()
        theirs.close()
        page.close()
        raise
    if pid == 0:
        ours.close()
        run_child(ForkServer(spec, theirs, page).run)
    theirs.close()
    ours.setblocking(False)
    pool = Pool(pid, ours, page, spec.message_size, on_start, on_end)
    _POOLS.add(pool)
    return pool


# Pools of this process. A child forked by anyone (our fork server, the user,
# multiprocessing) must not keep their sockets open: the fork server and idle workers learn
# that the server process died from these sockets' EOF.
_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()
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
        if not poll_readable(sock.fileno(), deadline - time.monotonic()):
            return False
        try:
            if not sock.recv(MESSAGE_OVERHEAD):
                return True
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return True


def _close(sock: socket.socket) -> None:
    """Close ``sock``, waking any trio task that waits on it; idempotent."""
    if sock.fileno() == -1:
        return
    try:
        trio.lowlevel.notify_closing(sock)
    except RuntimeError:
        pass  # not inside trio: nothing can be waiting on it
    sock.close()


def describe_exit(status: int | None) -> str:
    """How a worker ended, for a log line: "exited with status 3", "was killed by SIGKILL"."""
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
