# One worker process as the supervisor holds it: starting it (a fresh interpreter, given the
# listening sockets by the socket activation protocol and a notify socket of its own, as
# systemd would give them), waiting for it to exit, signalling it, and how its end is told in
# the log. No policy: which worker to start, stop or replace is _supervisor.py's.
"""Starting, watching and signalling one worker process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import attrs
import trio

from ._wire import MAX_DATAGRAM, STATISTICS, ServerFigures, decode_statistics, parse_notify

LINK = "TRIO_SOCKETSERVER_WORKER"
"""The environment variable that tells a worker what its supervisor gave it (JSON: the
supervisor's pid, ``sys.path``, the descriptors of the sockets and of the watch pipe). The
worker removes it before anything else runs, so a handler's own subprocesses never see it."""

# A worker is `python -c BOOTSTRAP MODE ARGS...`: the supervisor's sys.path is set first, so
# the worker imports the same trio_socketserver, and the same modules next to the program,
# as the supervisor would (multiprocessing's spawn does the same), whatever PYTHONPATH says.
BOOTSTRAP = (
    "import json, os, sys; "
    f"link = json.loads(os.environ.pop({LINK!r})); "
    "sys.path[:] = link['path']; "
    "from trio_socketserver._workers._worker import main; "
    "sys.exit(main(link, sys.argv[1:]))"
)

# The supervisor's own systemd variables: a worker gets its own, never these.
SUPERVISOR_VARIABLES = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
)


@attrs.define(eq=False)
class WorkerProcess:
    """A worker the supervisor started, and what it has said so far."""

    slot: int
    """Which of the N workers it is (0 to N-1); its replacement takes the same slot."""
    generation: int
    """Which start it belongs to: 1, then one more for every reload."""
    popen: subprocess.Popen[bytes]
    notify: socket.socket
    """The datagram socket only this worker sends its sd_notify messages to (non-blocking)."""
    notify_path: str
    started: float
    """When it was started, on trio's clock."""
    ready: bool = False
    """It sent ``READY=1``: every socket it serves accepts."""
    draining: bool = False
    """It sent ``STOPPING=1``."""
    asked_to_stop: bool = False
    """The supervisor sent it SIGTERM: its exit is no crash."""
    figures: tuple[ServerFigures, ...] = ()
    """Its servers' statistics, as last reported."""
    status: str = ""
    """Its last ``STATUS=`` line."""
    became_ready: trio.Event = attrs.Factory(trio.Event)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def state(self) -> str:
        """``starting`` (not ready yet), ``ready``, or ``draining`` (stopping)."""
        if self.asked_to_stop or self.draining:
            return "draining"
        return "ready" if self.ready else "starting"

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless the worker has been reaped (so never to a reused pid)."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signum)

    def take_message(self, datagram: bytes) -> None:
        """Update what is known of the worker from one of its sd_notify datagrams."""
        variables = parse_notify(datagram)
        if variables.get("READY") == "1" and not self.ready:
            self.ready = True
            self.became_ready.set()
        if variables.get("STOPPING") == "1":
            self.draining = True
        if "STATUS" in variables:
            self.status = variables["STATUS"]
        if STATISTICS in variables:
            with contextlib.suppress(ValueError):  # not ours: keep the last good report
                self.figures = decode_statistics(variables[STATISTICS])

    def take_pending_messages(self) -> None:
        """Take the datagrams waiting now (after the exit: what it said last, its final
        statistics)."""
        while True:
            try:
                datagram = self.notify.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            self.take_message(datagram)

    def close(self) -> None:
        self.notify.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)


def describe_exit(returncode: int) -> str:
    """``exited with status 1``, ``killed by SIGKILL``: how a worker ended, for the log."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def start_worker(
    command: Sequence[str],
    *,
    slot: int,
    generation: int,
    sockets: Sequence[socket.socket],
    names: Sequence[str] | None,
    watch_fd: int,
    notify_path: str,
) -> WorkerProcess:
    """Start a worker: ``python -c BOOTSTRAP *command`` with ``sockets`` at fd 3 onward.

    The worker gets the sockets (and the read end of the pipe it watches) at the numbers
    they have here and moves them to fd 3 onward itself (see _worker.py): done between fork
    and exec, that would take a ``preexec_fn``, which is unsafe in a process with threads.
    It runs in a session of its own, so a Ctrl-C in the terminal reaches the supervisor
    only, which then stops the workers in order (otherwise each worker would take the
    supervisor's SIGTERM after the terminal's SIGINT as a second signal: a hard stop).

    Blocking: it forks and execs on the calling thread, the supervisor's main (trio)
    thread, for a few milliseconds. On purpose: ``PR_SET_PDEATHSIG`` fires when the
    *thread* that forked the worker ends, and ``trio.lowlevel.open_process`` forks on a
    worker thread that ends once it has been idle 10 s, which would kill every worker.
    """
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(notify_path)
        notify.setblocking(False)
        env = {k: v for k, v in os.environ.items() if k not in SUPERVISOR_VARIABLES}
        env["NOTIFY_SOCKET"] = notify_path
        if names is not None:
            env["LISTEN_FDNAMES"] = ":".join(names)
        fds = [sock.fileno() for sock in sockets]
        env[LINK] = json.dumps(
            {"supervisor": os.getpid(), "path": sys.path, "sockets": fds, "watch": watch_fd}
        )
        popen = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, *command],
            env=env,
            pass_fds=(*fds, watch_fd),
            start_new_session=True,
        )
    except BaseException:
        notify.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        raise
    return WorkerProcess(slot, generation, popen, notify, notify_path, trio.current_time())


async def wait_for_exit(popen: subprocess.Popen[bytes]) -> int:
    """Wait until the process has exited, reap it, and return its return code.

    Cancellation: a checkpoint; cancelled, the process is left running (and unreaped).
    """
    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        # No pidfd (not Linux, or a kernel before 5.3): a thread waits for it instead.
        return await trio.to_thread.run_sync(popen.wait, abandon_on_cancel=True)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return popen.wait()
