# The first code a worker process runs (started by _process.py's bootstrap): it ties the
# worker's life to the supervisor's, puts the listening sockets where the socket activation
# protocol says (fd 3 onward, LISTEN_FDS, LISTEN_PID = this process), then hands over to
# the ordinary command line, or to the program's server factory. Nothing here serves: a
# worker serves exactly as a stand-alone `trio-socketserver` under systemd would.
"""A worker process's start: the link to its supervisor, then the command line."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from . import _reporting

LISTEN_FDS_START = 3
"""The first inherited socket's descriptor, as sd_listen_fds() defines it."""

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1


def main(link: Mapping[str, Any], argv: Sequence[str]) -> int:
    """Run the worker; ``argv`` is ``cli ARGS...`` or ``factory MODULE:NAME``."""
    watch_fd = _move_above(link["watch"], LISTEN_FDS_START + len(link["sockets"]))
    follow_supervisor(link["supervisor"], watch_fd)
    place_sockets(link["sockets"])
    _reporting.report_to_supervisor()
    mode, *args = argv
    if mode == "cli":
        from .. import __main__

        return __main__.main(args)
    from ._factory import serve_factory

    return serve_factory(*args)


def follow_supervisor(supervisor: int, watch_fd: int) -> None:
    """Have this process killed (SIGKILL) as soon as the supervisor is gone.

    Two ways, so that no worker outlives its supervisor by more than a moment, however
    the supervisor ends (even SIGKILLed): on Linux the kernel sends the signal when the
    parent dies (``PR_SET_PDEATHSIG``); everywhere, a thread waits on a pipe whose write
    end only the supervisor holds, which reads EOF once the supervisor has exited. SIGKILL,
    not SIGTERM: without a supervisor nobody would stop a worker whose drain hangs, and a
    supervisor restarted meanwhile (systemd's Restart=) must not share its sockets with an
    orphan that serves old code.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGKILL)  # it died before the line above took effect
    threading.Thread(
        target=_die_at_eof, args=(watch_fd,), name="trio-socketserver supervisor watch", daemon=True
    ).start()


def _die_at_eof(fd: int) -> None:
    while os.read(fd, 1):
        pass  # nobody writes to it: only its end matters
    os.kill(os.getpid(), signal.SIGKILL)


def place_sockets(fds: Sequence[int]) -> None:
    """Move the inherited sockets to fd 3 onward and announce them as systemd does.

    Sets ``LISTEN_FDS`` and ``LISTEN_PID`` (this process: the command line serves inherited
    sockets only when it names itself); the supervisor has set ``LISTEN_FDNAMES``. The
    descriptors are close-on-exec: a handler's subprocess does not inherit them. Without
    sockets (each worker binds its own, ``--reuse-port``) nothing is set.
    """
    if not fds:
        return
    end = LISTEN_FDS_START + len(fds)
    # First out of the way of the targets (one of them may already sit on 3, 4, ...).
    moved = [_move_above(fd, end) for fd in fds]
    for target, fd in enumerate(moved, LISTEN_FDS_START):
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
    os.environ["LISTEN_FDS"] = str(len(fds))
    os.environ["LISTEN_PID"] = str(os.getpid())


def _move_above(fd: int, lowest: int) -> int:
    """Move ``fd`` to a close-on-exec descriptor numbered ``lowest`` or above."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return moved
