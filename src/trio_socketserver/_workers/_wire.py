# What travels from a worker to its supervisor, as bytes: sd_notify datagrams, the protocol
# systemd defines (newline-separated VARIABLE=value lines), so a worker talks to its
# supervisor exactly as it would talk to systemd. One variable is ours: a worker's servers'
# statistics, which systemd would ignore (custom variables start with X_, as its
# documentation asks). Sans-I/O: bytes in, values out; both processes use it.
"""The sd_notify messages between workers and their supervisor."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import attrs

from .._engine import ServerStatistics

STATISTICS = "X_TRIO_SOCKETSERVER_STATISTICS"
"""The variable a worker's statistics travel in: a JSON list, one object per server."""

MAX_DATAGRAM = 65536
"""The largest notify datagram read (systemd reads at most its page-sized buffer; a worker
with many servers writes a few hundred bytes per server)."""

COUNTERS = tuple(
    field.name for field in attrs.fields(ServerStatistics) if field.type in (int, "int")
)
"""The numeric fields of :class:`ServerStatistics` (the rest are flags)."""


@attrs.frozen
class ServerFigures:
    """One server's statistics as a worker reported them."""

    server: str
    """Where it listens, as the logs show it (``tcp 127.0.0.1:8000``)."""
    statistics: ServerStatistics


def parse_notify(datagram: bytes) -> dict[str, str]:
    """The variables of one sd_notify datagram; a later assignment wins, as in systemd.

    Lines without ``=`` are skipped, as systemd skips them; undecodable bytes are replaced.
    """
    variables = {}
    for line in datagram.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition("=")
        if sep and name:
            variables[name] = value
    return variables


def encode_statistics(figures: Iterable[ServerFigures]) -> str:
    """The ``X_TRIO_SOCKETSERVER_STATISTICS=...`` line for a worker's servers."""
    servers = [{"server": f.server, **attrs.asdict(f.statistics)} for f in figures]
    return f"{STATISTICS}={json.dumps(servers, separators=(',', ':'))}"


def decode_statistics(value: str) -> tuple[ServerFigures, ...]:
    """The servers' statistics in the value of an ``X_TRIO_SOCKETSERVER_STATISTICS`` line.

    Errors: ``ValueError`` for anything but the list :func:`encode_statistics` writes (a
    worker of another version, or something else writing to the socket).
    """
    try:
        servers = json.loads(value)
        if not isinstance(servers, list):
            raise TypeError("not a list")
        return tuple(_figures(server) for server in servers)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"not a statistics report: {value[:80]!r}") from exc


def _figures(server: Mapping[str, object]) -> ServerFigures:
    fields = {field.name: server[field.name] for field in attrs.fields(ServerStatistics)}
    if not isinstance(server["server"], str) or not all(
        isinstance(fields[name], int) for name in COUNTERS
    ):
        raise TypeError("wrong types")
    return ServerFigures(server["server"], ServerStatistics(**fields))  # type: ignore[arg-type]
