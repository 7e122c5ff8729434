# In a worker process: its servers' statistics, sent to its supervisor over the notify
# channel (_wire.py's custom variable) every REPORT_INTERVAL seconds while it serves and once
# more when its servers have stopped, so the supervisor can answer /metrics for all workers
# and report the sum of their stops. serve_until_signal() sends them when this process is a
# worker (the worker's start, _worker.py, says so); in any other process nothing is sent.
"""A worker's statistics reports to its supervisor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from .._notify import notify
from ._wire import ServerFigures, encode_statistics

REPORT_INTERVAL = 1.0
"""Seconds between two reports: how old the figures on the supervisor's ``/metrics`` may
be. A datagram of a few hundred bytes a second per worker costs nothing measurable."""

_supervised = False


def report_to_supervisor() -> None:
    """Mark this process as a worker: serve_until_signal() reports to the supervisor."""
    global _supervised
    _supervised = True


def supervised() -> bool:
    """Whether this process is a worker whose statistics go to a supervisor."""
    return _supervised


async def send_statistics(figures: Sequence[ServerFigures]) -> None:
    """Send one report (the supervisor keeps the last one it got from each worker)."""
    await notify(encode_statistics(figures))


async def report_statistics(
    figures: Callable[[], Sequence[ServerFigures]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``figures()`` now and every ``REPORT_INTERVAL`` seconds, until cancelled.

    Reports started once the first report is sent: started before ``READY=1``, the
    supervisor knows every address of a worker that it hears is ready.
    """
    await send_statistics(figures())
    task_status.started()
    while True:
        await trio.sleep(REPORT_INTERVAL)
        await send_statistics(figures())
