# What the supervisor knows of its workers' requests, added up, and its health endpoint.
# Every worker reports its servers' statistics (_reporting.py); here they are summed per
# listening address, over the workers alive now (their last report) and every worker that
# has exited (its final one), so that the totals never go back when a worker is replaced.
# The stop report reads these sums; the supervisor's `--health-bind` endpoint shows them
# next to each live worker's own figures, and answers /ready for the workers as a whole.
"""The workers' statistics added up, and the supervisor's health endpoint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .._engine import ServerStatistics
from .._health import (
    METRIC_PREFIX,
    HealthRequest,
    ProbeServer,
    render_metric,
    render_statistics,
    route,
)
from ._process import WorkerProcess
from ._wire import COUNTERS

if TYPE_CHECKING:
    from ._supervisor import Supervisor

# The label of the series that add up every worker since the supervisor started.
ALL_WORKERS = "all"


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


def render_workers(supervisor: Supervisor) -> str:
    """The supervisor's ``/metrics``: each live worker's statistics (``worker="<pid>"``),
    their sums over every worker since the start (``worker="all"``), and the workers
    themselves: how many run in each state, how many died unasked."""
    live = supervisor.live_workers()
    series: list[tuple[Mapping[str, str], ServerStatistics]] = [
        ({"server": figures.server, "worker": str(worker.pid)}, figures.statistics)
        for worker in live
        for figures in worker.figures
    ]
    everyone = [*supervisor.exited_workers(), *live]
    series += [
        ({"server": server, "worker": ALL_WORKERS}, stats)
        for server, stats in totals(everyone).items()
    ]
    states = {"starting": 0, "ready": 0, "draining": 0}
    for worker in live:
        states[worker.state] += 1
    lines = render_metric(
        METRIC_PREFIX + "workers",
        "gauge",
        "Worker processes running, by state.",
        [({"state": state}, count) for state, count in states.items()],
    )
    lines += render_metric(
        METRIC_PREFIX + "worker_crashes_total",
        "counter",
        "Workers that died without being asked to stop (each was replaced).",
        [({}, supervisor.crashes)],
    )
    return render_statistics(series) + "\n".join(lines) + "\n"


class WorkersHealthServer(ProbeServer):
    """The supervisor's health endpoint (``--workers N --health-bind HOST:PORT``).

    ``/ready``: 200 while every worker of the serving generation is ready; 503 while they
    start, while a dead worker's replacement starts, and from the moment the supervisor
    stops, naming why. ``/metrics``: see :func:`render_workers`. The rest, and every limit,
    as :class:`~trio_socketserver.HealthServer`.
    """

    def __init__(
        self, server_address: Any, supervisor: Supervisor, bind_and_activate: bool = True
    ) -> None:
        self.supervisor = supervisor
        super().__init__(server_address, bind_and_activate)

    def respond(self, request: HealthRequest) -> bytes:
        return route(request, self.supervisor.not_ready, lambda: render_workers(self.supervisor))
