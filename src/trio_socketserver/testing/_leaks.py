# What "nothing outlived the server" means, measured: the process's open file descriptors,
# its threads (except trio's own idle worker cache) and its child processes, compared before
# and after. Only sync snapshots live here; serving() adds the trio task check on top.
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping

import attrs

from .._threading import HANDLER_THREAD_PREFIX

# trio.to_thread's process-wide cache of idle worker threads: daemon threads, reused, that
# exit after 10 s idle. They are trio's, not something a server leaked.
TRIO_CACHE_THREAD_PREFIX = "Trio thread"
# How long the check waits for a new thread that is still alive to exit: a thread on its way
# out is waited for (never slept for); one still running after this is a leak.
THREAD_EXIT_TIMEOUT = 5.0


class LeakError(AssertionError):
    """Something the server started outlived it: a task, thread, child process or fd.

    An ``AssertionError``, so pytest and unittest report it as a test failure.
    """


def _fd_directory() -> str:
    # /proc names what each fd is (a socket's inode, a file's path); /dev/fd elsewhere.
    return "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"


def _open_fds() -> dict[int, str]:
    directory = _fd_directory()
    fds = {}
    for name in os.listdir(directory):
        try:
            fds[int(name)] = os.readlink(f"{directory}/{name}")
        except OSError:
            pass  # the fd listdir itself used, already closed (or not a link on this system)
    return fds


def _child_processes() -> frozenset[int]:
    children: set[int] = set()
    if not os.path.isdir("/proc/self/task"):
        return frozenset()  # without /proc, child processes are not checked
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                children.update(int(pid) for pid in f.read().split())
        except OSError:
            pass  # the thread exited while we looked
    return frozenset(children)


def _threads() -> frozenset[threading.Thread]:
    return frozenset(
        t for t in threading.enumerate() if not t.name.startswith(TRIO_CACHE_THREAD_PREFIX)
    )


def _runs_handler_code(thread: threading.Thread) -> bool:
    return thread.is_alive() and thread.name.startswith(HANDLER_THREAD_PREFIX)


@attrs.frozen
class ResourceSnapshot:
    """The process's fds, threads and child processes at one moment."""

    fds: Mapping[int, str]
    threads: frozenset[threading.Thread]
    children: frozenset[int]

    @classmethod
    def take(cls) -> ResourceSnapshot:
        return cls(_open_fds(), _threads(), _child_processes())

    def join_new_threads(self, timeout: float) -> None:
        """Wait (blocking, ``timeout`` seconds in all) for threads started since this snapshot."""
        deadline = time.monotonic() + timeout
        # The calling thread may be new itself (a trio worker running this join).
        for thread in _threads() - self.threads - {threading.current_thread()}:
            if thread.name.startswith(HANDLER_THREAD_PREFIX):
                # A trio worker running a handler outlives its request: wait for the request
                # (trio renames the thread back once it returns), not for the thread.
                while _runs_handler_code(thread) and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                thread.join(max(0.0, deadline - time.monotonic()))

    def leaks(self) -> list[str]:
        """What is open or running now that was not at this snapshot, one line per kind."""
        found = []
        threads = sorted(t.name for t in _threads() - self.threads)
        if threads:
            found.append(f"threads still running: {threads}")
        fds = {fd: target for fd, target in _open_fds().items() if self.fds.get(fd) != target}
        if fds:
            found.append(f"file descriptors still open: {fds}")
        children = sorted(_child_processes() - self.children)
        if children:
            found.append(f"child processes still alive: {children}")
        return found


def raise_leaks(what: str, leaks: list[str]) -> None:
    """Raise :class:`LeakError` naming ``what`` leaked them, if there are any."""
    if leaks:
        raise LeakError(f"{what} left resources behind: " + "; ".join(leaks))
