# The supervisor: N worker processes serving the same listening sockets, kept at N. It
# starts them, learns from their sd_notify messages when each is ready (as systemd would),
# replaces one that dies (with _policy.py's backoff, ending in a crash loop), reloads on
# SIGHUP (a new generation, and only once all of it is ready the old one drains), and stops
# them all on SIGTERM/SIGINT. It serves no request and imports no handler: the workers do
# both. What the process gets (sockets, options) is the command line's or serve_workers()'s
# business; how one worker is started and watched is _process.py's.
"""The supervisor of ``--workers N`` and :func:`serve_workers`."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence

import attrs
import trio

from .._cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .._engine import LOGGER
from .._notify import feed_watchdog, notify, watchdog_interval
from .._signals import report_stop
from ._metrics import totals
from ._policy import STABLE_AFTER, CrashPolicy
from ._process import WorkerProcess, describe_exit, start_worker, wait_for_exit

READY_TIMEOUT = 60.0
"""Seconds a new worker has to say ``READY=1``; after that it is killed, and counts as a
worker that died before it was ready. Generous: a large application imports for seconds,
and the old generation keeps serving meanwhile."""

HARD_STOP_TIMEOUT = 2.0
"""After a second signal the workers get it too (their own hard stop: handlers cancelled,
connections closed); one still running this many seconds later is SIGKILLed."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP


@attrs.define(eq=False)
class Supervisor:
    """Keeps ``workers`` worker processes running ``command`` on ``sockets``.

    ``command`` is what follows the worker bootstrap: ``["cli", *options]`` or
    ``["factory", where, qualname, log_level]`` (see _worker.py). ``addresses`` are the listening
    addresses as the log shows them, ``what`` what is served (``app:Handler``).
    ``stop_timeout``: seconds a worker asked to stop may take before it is SIGKILLed (None:
    as long as it takes; the worker bounds its own drain).

    Its own service manager (``NOTIFY_SOCKET``, if set) hears ``READY=1`` once every worker
    of the first generation is ready, ``RELOADING=1`` and ``READY=1`` around a reload,
    ``STOPPING=1`` when it stops, ``STATUS=`` lines, and ``WATCHDOG=1`` if asked.
    """

    command: Sequence[str]
    workers: int
    sockets: Sequence[socket.socket]
    names: Sequence[str] | None
    what: str
    addresses: Sequence[str]
    stop_timeout: float | None = None
    ready_timeout: float = READY_TIMEOUT

    _phase: str = "starting"  # then "serving", and "stopping"
    _current: list[WorkerProcess | None] = attrs.Factory(list)
    """The workers of the serving generation, by slot (None: a replacement is due)."""
    _incoming: list[WorkerProcess] | None = None
    """The new generation while a reload waits for it to be ready."""
    _alive: set[WorkerProcess] = attrs.Factory(set)
    _exited: list[WorkerProcess] = attrs.Factory(list)
    _generation: int = 1
    _last_generation: int = 1
    _reload_pending: bool = False
    _policy: CrashPolicy = attrs.Factory(CrashPolicy)
    _status: int = EXIT_OK
    _done: trio.Event = attrs.Factory(trio.Event)
    _ready: trio.Event = attrs.Factory(trio.Event)
    _nursery: trio.Nursery | None = None
    _notify_dir: str = ""
    _watch_fd: int = -1
    _serial: int = 0
    _stop_began: float | None = None
    crashes: int = 0
    """Workers that died without being asked to stop."""
    # What the service manager is told, in order, by one task (see _tell).
    _notices: trio.MemorySendChannel[tuple[str, ...]] | None = None

    def __attrs_post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers!r}")
        self._current = [None] * self.workers

    # -- the run -------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Supervise until stopped; return the exit status.

        Reports started once every worker of the first generation is ready.

        Cancellation: a hard stop: every worker is SIGKILLed and reaped before it returns.
        """
        self._notify_dir = tempfile.mkdtemp(prefix="trio-socketserver-")
        # The workers watch the read end; the write end lives here only, so the read end
        # sees EOF the moment this process is gone, however it ends.
        watch_fd, keep_fd = os.pipe()
        self._watch_fd = watch_fd
        self._notices, notices = trio.open_memory_channel[tuple[str, ...]](math.inf)
        try:
            with trio.open_signal_receiver(*STOP_SIGNALS, RELOAD_SIGNAL) as signals:
                async with trio.open_nursery() as telling:
                    telling.start_soon(self._send_notices, notices)
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._take_signals, signals)
                        interval = watchdog_interval(os.environ, os.getpid())
                        if interval is not None:
                            nursery.start_soon(feed_watchdog, interval)
                        for slot in range(self.workers):
                            self._current[slot] = self._start(slot, self._generation)
                        nursery.start_soon(self._report_started, task_status)
                        await self._done.wait()
                        nursery.cancel_scope.cancel()
                    self._notices.close()  # what is queued is still sent
        finally:
            with trio.CancelScope(shield=True):
                await self._kill_the_rest()
            os.close(watch_fd)
            os.close(keep_fd)
            shutil.rmtree(self._notify_dir, ignore_errors=True)
        self._report_stop()
        return self._status

    def _report_stop(self) -> None:
        """The stop report of every address: the sum of the workers' own."""
        elapsed = None if self._stop_began is None else trio.current_time() - self._stop_began
        note = f" (summed over {len(self._exited)} workers)"
        for where, stats in totals(self._exited).items():
            report_stop(where, stats, elapsed, note=note)

    async def _send_notices(self, receive: trio.MemoryReceiveChannel[tuple[str, ...]]) -> None:
        async for assignments in receive:
            await notify(*assignments)

    def _tell(self, *assignments: str) -> None:
        """Notify the service manager (in the order of the calls, without waiting)."""
        if self._notices is not None:
            with contextlib.suppress(trio.ClosedResourceError):  # stopped: nobody listens
                self._notices.send_nowait(assignments)

    async def _report_started(self, task_status: trio.TaskStatus[None]) -> None:
        await self._ready.wait()
        task_status.started()

    async def _kill_the_rest(self) -> None:
        """After a cancellation or an error: no worker may outlive run()."""
        for worker in list(self._alive):
            worker.signal(signal.SIGKILL)
            await wait_for_exit(worker.popen)
            worker.close()

    def _start(self, slot: int, generation: int) -> WorkerProcess:
        assert self._nursery is not None
        self._serial += 1
        worker = start_worker(
            self.command,
            slot=slot,
            generation=generation,
            sockets=self.sockets,
            names=self.names,
            watch_fd=self._watch_fd,
            notify_path=os.path.join(self._notify_dir, f"{self._serial}.sock"),
        )
        self._alive.add(worker)
        self._nursery.start_soon(self._watch, worker)
        LOGGER.debug("started worker %d (generation %d)", worker.pid, generation)
        return worker

    async def _watch(self, worker: WorkerProcess) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take_messages, worker)
            nursery.start_soon(self._expect_ready, worker)
            returncode = await wait_for_exit(worker.popen)
            nursery.cancel_scope.cancel()
        worker.take_pending_messages()
        worker.close()
        self._alive.discard(worker)
        self._exited.append(worker)
        self._worker_exited(worker, returncode)

    async def _take_messages(self, worker: WorkerProcess) -> None:
        while True:
            await trio.lowlevel.wait_readable(worker.notify)
            was_ready = worker.ready
            worker.take_pending_messages()
            if worker.ready and not was_ready:
                self._worker_ready(worker)

    async def _expect_ready(self, worker: WorkerProcess) -> None:
        with trio.move_on_after(self.ready_timeout):
            await worker.became_ready.wait()
            return
        if not worker.asked_to_stop:
            LOGGER.warning(
                "worker %d sent no READY=1 within %s s of its start; killing it",
                worker.pid,
                self.ready_timeout,
            )
            worker.signal(signal.SIGKILL)

    async def _kill_if_stuck(self, worker: WorkerProcess, after: float) -> None:
        await trio.sleep(after)
        if worker in self._alive:
            LOGGER.warning(
                "worker %d still running %s s after SIGTERM; killing it", worker.pid, after
            )
            worker.signal(signal.SIGKILL)

    # -- events ----------------------------------------------------------------

    def _worker_ready(self, worker: WorkerProcess) -> None:
        LOGGER.debug("worker %d (generation %d) is ready", worker.pid, worker.generation)
        if self._incoming is not None and worker in self._incoming:
            if all(w.ready for w in self._incoming):
                self._finish_reload()
        elif self._phase == "starting" and all(w is not None and w.ready for w in self._current):
            self._phase = "serving"
            for address in self.addresses:
                LOGGER.info(
                    "serving %s with %d workers on %s (Ctrl-C to stop)",
                    self.what,
                    self.workers,
                    address,
                )
            LOGGER.info("generation 1 is ready (workers %s)", _pid_list(self._current))
            self._tell("READY=1", f"STATUS={self._describe_workers()}")
            self._ready.set()
            if self._reload_pending:
                self._reload_pending = False
                self._begin_reload()
        elif self._phase == "serving" and worker in self._current:
            LOGGER.info("worker %d is ready (it replaces one that died)", worker.pid)

    def _worker_exited(self, worker: WorkerProcess, returncode: int) -> None:
        how = describe_exit(returncode)
        if worker.asked_to_stop:
            LOGGER.info("worker %d (generation %d) %s", worker.pid, worker.generation, how)
        elif self._phase == "stopping":
            LOGGER.warning("worker %d %s while stopping", worker.pid, how)
        elif self._incoming is not None and worker in self._incoming:
            self._abandon_reload(worker, how)
        else:
            self._replace(worker, returncode, how)
        if self._phase == "stopping" and not self._alive:
            self._done.set()

    def _replace(self, worker: WorkerProcess, returncode: int, how: str) -> None:
        self.crashes += 1
        slot = worker.slot
        if self._current[slot] is worker:
            self._current[slot] = None
        if self._phase == "starting" and not worker.ready and returncode == EXIT_USAGE:
            LOGGER.error(
                "worker %d could not start (%s; its error is logged above); stopping",
                worker.pid,
                how,
            )
            self._stop(EXIT_USAGE)
            return
        uptime = trio.current_time() - worker.started
        verdict = self._policy.worker_died(slot, uptime)
        if verdict.delay is None:
            LOGGER.error(
                "crash loop: %d workers in a row died within %s s of their start "
                "(the last, %d, %s); stopping",
                verdict.streak,
                STABLE_AFTER,
                worker.pid,
                how,
            )
            self._stop(EXIT_FAILURE)
            return
        LOGGER.warning(
            "worker %d %s after %.1f s; starting a replacement%s",
            worker.pid,
            how,
            uptime,
            f" in {verdict.delay} s" if verdict.delay else "",
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._start_replacement, worker, verdict.delay)

    async def _start_replacement(self, dead: WorkerProcess, delay: float) -> None:
        await trio.sleep(delay)
        if self._phase != "stopping" and self._current[dead.slot] is None:
            worker = self._start(dead.slot, self._generation)
            self._current[dead.slot] = worker
            LOGGER.info("worker %d started in place of %d", worker.pid, dead.pid)

    async def _take_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == RELOAD_SIGNAL:
                self._reload_requested(name)
            elif self._phase != "stopping":
                LOGGER.info(
                    "%s: stopping; every worker drains (send it again to stop at once)", name
                )
                self._stop(EXIT_OK)
            else:
                LOGGER.warning("%s again: stopping at once", name)
                self._stop_at_once(signum)

    # -- reload -----------------------------------------------------------------

    def _reload_requested(self, name: str) -> None:
        if self._phase == "stopping":
            LOGGER.info("%s: ignored, the workers are stopping", name)
        elif self._phase == "starting" or self._incoming is not None:
            LOGGER.info("%s: a reload follows once the new workers are ready", name)
            self._reload_pending = True
        else:
            LOGGER.info("%s: reloading", name)
            self._begin_reload()

    def _begin_reload(self) -> None:
        self._last_generation += 1
        generation = self._last_generation
        LOGGER.info(
            "starting generation %d: %d new workers; the old ones serve until all are ready",
            generation,
            self.workers,
        )
        self._tell(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
            f"STATUS=reloading: starting generation {generation}",
        )
        self._incoming = [self._start(slot, generation) for slot in range(self.workers)]

    def _finish_reload(self) -> None:
        assert self._incoming is not None
        old = [w for w in self._current if w is not None]
        self._current = list(self._incoming)
        self._incoming = None
        self._generation = self._current[0].generation  # type: ignore[union-attr]
        LOGGER.info(
            "generation %d is ready (workers %s); the old workers drain (%s)",
            self._generation,
            _pid_list(self._current),
            _pid_list(old),
        )
        for worker in old:
            self._ask_to_stop(worker)
        self._tell("READY=1", f"STATUS={self._describe_workers()}")
        self._reload_again_if_asked()

    def _abandon_reload(self, failed: WorkerProcess, how: str) -> None:
        assert self._incoming is not None
        LOGGER.error(
            "reload failed: new worker %d %s before it was ready (its error is logged "
            "above); generation %d keeps serving",
            failed.pid,
            how,
            self._generation,
        )
        for worker in self._incoming:
            self._ask_to_stop(worker)
        self._incoming = None
        self._tell("READY=1", f"STATUS=reload failed; {self._describe_workers()}")
        self._reload_again_if_asked()

    def _reload_again_if_asked(self) -> None:
        if self._reload_pending:
            self._reload_pending = False
            self._begin_reload()

    # -- stopping -----------------------------------------------------------------

    def stop(self) -> None:
        """Stop as the first SIGTERM does: every worker drains, and run() returns 0 once all
        have exited. On the trio thread of run(); idempotent."""
        if self._phase != "stopping":
            self._stop(EXIT_OK)

    def _stop(self, status: int) -> None:
        self._phase = "stopping"
        self._stop_began = trio.current_time()
        self._status = status
        self._tell("STOPPING=1", f"STATUS=stopping {len(self._alive)} workers")
        self._incoming = None
        for worker in list(self._alive):
            self._ask_to_stop(worker)
        if not self._alive:
            self._done.set()

    def _ask_to_stop(self, worker: WorkerProcess) -> None:
        if worker.asked_to_stop or worker not in self._alive:
            return
        worker.asked_to_stop = True
        worker.signal(signal.SIGTERM)
        if self.stop_timeout is not None and math.isfinite(self.stop_timeout):
            assert self._nursery is not None
            self._nursery.start_soon(self._kill_if_stuck, worker, self.stop_timeout)

    def _stop_at_once(self, signum: int) -> None:
        self._status = 128 + signum
        assert self._nursery is not None
        for worker in list(self._alive):
            worker.signal(signum)
            self._nursery.start_soon(self._kill_if_stuck, worker, HARD_STOP_TIMEOUT)

    # -- what it says -------------------------------------------------------------

    def _describe_workers(self) -> str:
        return f"{self.workers} workers serving (generation {self._generation}): " + _pid_list(
            self._current
        )

    def not_ready(self) -> list[str]:
        """Why the workers are not ready to serve (empty: every worker of the serving
        generation is ready, and the supervisor is not stopping)."""
        if self._phase == "stopping":
            return ["the supervisor is stopping"]
        reasons = []
        for slot, worker in enumerate(self._current):
            if worker is None:
                reasons.append(f"worker {slot + 1} of {self.workers} died; its replacement is due")
            elif worker.state != "ready":
                reasons.append(f"worker {worker.pid} is {worker.state}")
        return reasons

    def live_workers(self) -> list[WorkerProcess]:
        """The workers running now, oldest first."""
        return sorted(self._alive, key=lambda w: w.started)

    def exited_workers(self) -> list[WorkerProcess]:
        """Every worker that has exited so far."""
        return list(self._exited)


def _pid_list(workers: Iterable[WorkerProcess | None]) -> str:
    return ", ".join(str(w.pid) for w in workers if w is not None)
