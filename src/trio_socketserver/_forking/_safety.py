# Fork safety: may the server process fork its fork server now, and what happens if another
# thread might hold a lock? The check, the three modes of `fork_safety`, the public error and
# warning, and the fork itself. Runs in the server process only, just before that one fork; the
# fork server and the workers are single-threaded, so their forks need no check. No trio here:
# trio's idle threads are recognised by where they wait, looked up by name and guarded.
"""Fork safety for ``ForkingMixIn``: ``fork_safety`` and what it checks.

A child forked while another thread holds a lock gets that lock locked, with no thread to
release it, and hangs the first time it needs it. ``fork_safety`` says what to do when other
Python threads of the process may be busy at the moment the worker pool's fork server is
forked (each ``serve_forever()`` / ``handle_request()``):

- ``"warn"`` (default): fork, and warn (:class:`ForkSafetyWarning`) naming those threads. The
  stdlib's ``ForkingMixIn`` forks regardless, so this never refuses what it would do.
- ``"strict"``: refuse; serving raises :class:`ForkSafetyError`, naming them.
- ``"off"``: fork without looking.

A thread counts as quiet, hence safe, when it is blocked in the kernel outside the lock
machinery (reading a socket, ``sleep``, ``poll``, ``waitpid``...) or waits for work where idle
pools wait (``Condition.wait``, hence ``Event``, ``Queue.get`` and a ``QueueListener``; an idle
``ThreadPoolExecutor`` worker; trio's thread cache (where handler threads wait too); ``join``).
Threads that are starting or finishing count as quiet too. Busy threads get
``THREAD_SETTLE_TIMEOUT`` to become quiet. This is a heuristic: a thread blocked in a read
while holding a lock of its own still passes, and C library threads are their library's
business (``pthread_atfork``), as for any fork.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from types import CodeType

FORK_SAFETY_MODES = ("strict", "warn", "off")
# A pool thread that has just handed back a result is still in its library's code for some
# microseconds, and a thread that has just been woken needs the interpreter lock (held here)
# to get back to its wait. Busy threads get up to this long, in millisecond sleeps that let
# them run, to become quiet; a thread that is really busy stays busy.
THREAD_SETTLE_TIMEOUT = 0.05

# Where idle threads wait while blocked on a lock (a futex, to the kernel), as (module,
# qualified name). Looked up in sys.modules only: a module nobody imported has no thread
# waiting in it. Names that no longer resolve are skipped, so a thread waiting there counts
# as busy (the safe side); tests/test_forking.py fails loudly if trio's entry stops resolving.
IDLE_WAITS: tuple[tuple[str, str], ...] = (
    ("threading", "Condition.wait"),  # Event.wait, Queue.get, Semaphore, QueueListener
    ("threading", "Thread.join"),
    ("threading", "Thread._wait_for_tstate_lock"),  # join() before 3.13
    ("threading", "Thread._bootstrap"),  # starting or finishing: threading's locks are
    ("threading", "Thread._bootstrap_inner"),  # re-created in the child
    ("threading", "Thread._delete"),
    ("concurrent.futures.thread", "_worker"),  # an idle ThreadPoolExecutor worker
    ("trio._core._thread_cache", "WorkerThread._work"),  # trio's idle cached threads
)

# The futex system calls, by machine: a thread blocked in one waits for a lock, or for the
# interpreter lock (it may be anywhere in Python code); blocked in any other call, it waits
# for I/O or time with the interpreter lock released. Machines not listed are judged on
# their Python frames alone.
_FUTEX_CALLS = {
    "x86_64": {202, 449},
    "aarch64": {98, 449},
    "riscv64": {98, 449},
    "loongarch64": {98, 449},
    "ppc64le": {221, 449},
    "s390x": {238, 449},
    "i686": {240, 422, 449},
    "i386": {240, 422, 449},
    "armv7l": {240, 422, 449},
    "armv6l": {240, 422, 449},
}


class ForkSafetyError(RuntimeError):
    """Serving refused to fork worker processes while other threads might hold a lock.

    Raised by ``serve_forever()`` / ``handle_request()`` of a ``ForkingMixIn`` server whose
    ``fork_safety`` is ``"strict"``; the message names the busy threads and what to do.
    """


class ForkSafetyWarning(RuntimeWarning):
    """Worker processes were forked while other threads might hold a lock (``fork_safety =
    "warn"``, the default); the message names the threads. Make it an error with
    ``fork_safety = "strict"`` or a warnings filter, silence it with ``"off"``."""


def check_mode(mode: object) -> str:
    """``mode`` if it is one of FORK_SAFETY_MODES. Errors: ``ValueError`` naming them."""
    if not isinstance(mode, str) or mode not in FORK_SAFETY_MODES:
        choices = ", ".join(repr(m) for m in FORK_SAFETY_MODES)
        raise ValueError(f"fork_safety must be one of {choices}, not {mode!r}")
    return mode


def check_threads(mode: str) -> None:
    """Apply ``mode`` to the threads running now, just before the fork.

    Errors: :class:`ForkSafetyError` (``"strict"``) if a thread is busy; ``"warn"`` warns.
    """
    if mode == "off":
        return
    busy = busy_threads()
    if not busy:
        return
    names = ", ".join(busy)
    if mode == "strict":
        raise ForkSafetyError(
            f"ForkingMixIn cannot start its worker processes: this process runs other threads "
            f"({names}), and a lock one of them holds would stay locked forever in the "
            "workers. Start serving before those threads start or while they wait, set "
            "fork_safety = 'warn' to fork anyway, or use ThreadingMixIn."
        )
    warnings.warn(
        f"ForkingMixIn forked its worker processes while other threads were busy ({names}): "
        "a lock one of them held stays locked in the workers, and a handler that needs it "
        "hangs. Set fork_safety = 'strict' to refuse instead, or 'off' to silence this.",
        ForkSafetyWarning,
        stacklevel=2,
    )


def fork() -> int:
    """``os.fork()``, without CPython's blanket warning about threads (3.12+).

    :func:`check_threads` is the precise version of that warning for Python threads, and
    ``fork_safety`` says what to do about them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        return os.fork()


def busy_threads() -> list[str]:
    """Names of the other Python threads that may hold a lock (after THREAD_SETTLE_TIMEOUT)."""
    me = threading.get_ident()
    idle = idle_wait_code()
    futex = _FUTEX_CALLS.get(os.uname().machine)
    deadline = time.monotonic() + THREAD_SETTLE_TIMEOUT
    while True:
        native = {t.ident: t.native_id for t in threading.enumerate()}
        busy = [
            ident
            for ident, frame in sys._current_frames().items()
            if ident != me and not _quiet(frame.f_code, native.get(ident), idle, futex)
        ]
        if not busy or time.monotonic() >= deadline:
            break
        time.sleep(0.001)
    names = {t.ident: t.name for t in threading.enumerate()}
    return sorted(names.get(ident, f"thread {ident:#x}") for ident in busy)


def idle_wait_code(waits: Iterable[tuple[str, str]] = IDLE_WAITS) -> frozenset[CodeType]:
    """The code objects of IDLE_WAITS that resolve in the modules imported now."""
    found = set()
    for module_name, qualname in waits:
        value: object = sys.modules.get(module_name)
        for part in qualname.split("."):
            value = getattr(value, part, None)
        code = getattr(value, "__code__", None)
        if isinstance(code, CodeType):
            found.add(code)
    return frozenset(found)


def _quiet(
    code: CodeType, tid: int | None, idle: frozenset[CodeType], futex: set[int] | None
) -> bool:
    if futex is not None and tid is not None:
        call = _blocked_in(tid)
        if call is not None and call not in futex:
            return True  # blocked in the kernel on I/O or time, interpreter lock released
    return code in idle


def _blocked_in(tid: int) -> int | None:
    """The system call thread ``tid`` of this process is blocked in; None if it runs or
    cannot be seen (``/proc/self/task/<tid>/syscall``)."""
    try:
        with open(f"/proc/self/task/{tid}/syscall", "rb") as f:
            first = f.read().split(maxsplit=1)[0]
        call = int(first)
    except (OSError, IndexError, ValueError):
        return None  # "running", an exited thread, or /proc is not readable here
    return call if call >= 0 else None
