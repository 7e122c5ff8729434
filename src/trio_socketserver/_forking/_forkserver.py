# The fork server: the one process the server process forks, each time serving starts. It
# keeps only the file descriptors it needs, then forks workers, signals them and reaps them
# on the server process's request, single-threaded for its whole life, so that its forks are
# safe. It never imports trio: trio is in its memory (it is a clone of the server process) but
# never runs here, and no code path leads back into the server process's stack.
"""The fork server: what it keeps, and its request loop."""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable, Collection
from typing import Any, NoReturn

from ._wire import (
    MESSAGE_OVERHEAD,
    WORKER_KILL_TIMEOUT,
    SharedPage,
    decode,
    encode,
    flush_stdio,
    poll_readable,
    receive_message,
)
from ._worker import WorkerSpec, serve_requests

LOGGER = logging.getLogger("trio_socketserver")

# Inherited descriptors of these types are kept: they have no peer that could wait for their
# end (log files, a database file, /dev/null, a terminal), and handlers may write to them.
_KEPT_TYPES = frozenset({stat.S_IFREG, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK})
# How many exit statuses of workers nobody asked about (died while idle) are remembered.
_EXITED_KEPT = 1024


def run_child(main: Callable[[], int]) -> NoReturn:
    """The rest of a forked child's life: run ``main``; never unwind into the parent's stack."""
    status = 1
    try:
        status = main()
    except SystemExit:
        pass  # raised by a handler: the child ends, as the stdlib's does (status 1)
    except BaseException:
        LOGGER.exception("process %d of the worker pool failed", os.getpid())
    finally:
        flush_stdio()
        os._exit(status)


def close_inherited_fds(keep: Collection[int]) -> None:
    """Release every inherited socket, pipe and other kernel object but ``keep`` and 0-2.

    These are what the server process may close later and expect to see gone: a connection
    whose peer must see end-of-file, a listening socket whose port must stop accepting, a
    pipe to a subprocess, trio's own epoll and wakeup descriptors. Regular files, directories
    and devices stay (see _KEPT_TYPES). Each released fd is not simply closed, since Python
    objects in this process still hold its number and the next fd opened here (a client
    connection) would take it: it is replaced (``dup2``) by a dead end, a socket whose peer
    is closed, so a stale object reads end-of-file and fails to write (``EPIPE``).
    """
    dead, peer = socket.socketpair()
    peer.close()
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd <= 2 or fd in keep or fd == dead.fileno():
                continue
            try:
                kind = stat.S_IFMT(os.fstat(fd).st_mode)
            except OSError:
                continue  # the directory listing's own fd, closed already
            if kind not in _KEPT_TYPES:
                os.dup2(dead.fileno(), fd, inheritable=False)
    finally:
        dead.close()


def _ignore_signal(signum: int, frame: object) -> None:
    """SIGCHLD handler of the fork server: the wakeup fd does the work."""


class ForkServer:
    """The fork server's loop: fork workers, signal and reap them, on request.

    Requests and answers are listed in ``_wire``'s docstring.
    """

    def __init__(self, spec: WorkerSpec, control: socket.socket, page: SharedPage) -> None:
        self.spec = spec
        self.control = control
        self.page = page
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
        # Signals: Ctrl-C reaches the whole process group; the server process decides how
        # requests end. SIGTERM must stop a worker (see _Pool.discard), whatever handler the
        # server process had installed. The server's wakeup fd (trio's) must not be written.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        listening = getattr(self.spec.server, "socket", None)
        if isinstance(listening, socket.socket):
            listening.close()  # the server process owns it; datagram workers get it passed
        close_inherited_fds({self.control.fileno(), *self.spec.pass_fds})
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
                message, fds = receive_message(self.control, MESSAGE_OVERHEAD, 1)
                if not message:
                    return False  # the server process died: its workers must go too
                command, *args = decode(message)
                if command == "stop":
                    return bool(args[0])
                answer = self._commands[command](*args, *fds)
                self.control.send(encode(*answer))

    def _spawn(self, slot: int, fd: int) -> tuple[Any, ...]:
        sock = socket.socket(fileno=fd)
        try:
            pid = os.fork()
        except OSError as exc:
            return (None, f"fork() failed: {exc}")
        else:
            if pid == 0:
                run_child(lambda: self._become_worker(sock, slot))
            self.children.add(pid)
            return (pid,)
        finally:
            sock.close()

    def _become_worker(self, sock: socket.socket, slot: int) -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        self.control.close()
        return serve_requests(self.spec, sock, self.page, slot)

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
            if len(self.exited) > _EXITED_KEPT:
                del self.exited[next(iter(self.exited))]

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
            poll_readable(self.wakeup_r, remaining)
            self._collect()

    def _reap(self, pid: int) -> tuple[Any, ...]:
        if pid in self.children:
            # The server saw it close its socket (it is exiting), closed the socket itself
            # (the worker exits on EOF), or gave up on it after a SIGTERM: give it a moment,
            # then kill it.
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
