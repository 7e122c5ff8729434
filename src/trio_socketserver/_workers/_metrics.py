# What the supervisor knows of its workers' requests, added up: every worker reports its
# servers' statistics (_reporting.py); here they are summed per listening address, over the
# workers alive now (their last report) and every worker that has exited (its final one), so
# that the totals never go back when a worker is replaced. The stop report and the
# supervisor's health endpoint both read these sums.
"""Adding up the statistics the workers report."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from .._engine import ServerStatistics
from ._process import WorkerProcess
from ._wire import COUNTERS


def sum_statistics(statistics: Iterable[ServerStatistics]) -> ServerStatistics:
    """The counters added up; serving (draining) if any of them is."""
    statistics = list(statistics)
    return ServerStatistics(
        **{name: sum(getattr(s, name) for s in statistics) for name in COUNTERS},
        serving=any(s.serving for s in statistics),
        draining=any(s.draining for s in statistics),
    )


def totals(workers: Iterable[WorkerProcess]) -> dict[str, ServerStatistics]:
    """Each listening address's statistics summed over ``workers``, by address, in the
    order the workers report them. A worker that has exited has no active request, whatever
    it last reported (a killed worker's last report is from before it died)."""
    by_server: dict[str, list[ServerStatistics]] = {}
    for worker in workers:
        for figures in worker.figures:
            stats = figures.statistics
            if worker.popen.returncode is not None:
                stats = attrs.evolve(stats, active_requests=0, serving=False, draining=False)
            by_server.setdefault(figures.server, []).append(stats)
    return {server: sum_statistics(stats) for server, stats in by_server.items()}
