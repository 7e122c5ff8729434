# The health endpoint: a tiny HTTP/1.1 server that answers a balancer's and an
# orchestrator's probes (GET /live, GET /ready) and Prometheus' scrapes (GET /metrics) about
# a list of servers, on a socket of its own. The wire format (parsing a request head,
# rendering answers and the metrics text) is sans-I/O functions at the top; HealthServer is
# a TCPServer with a fixed handler, so it is served by the engine like any other server, with
# its own capacity limit, and nothing a probe does can take capacity from the servers it
# reports on.
from __future__ import annotations

import http
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import trio

from ._families import TCPServer
from ._handlers import StreamRequestHandler
from ._server import LOGGER, BaseServer, ServerStatistics
from ._signals import describe_address, describe_server

# The request head (request line and headers) a probe may send: probes send a few hundred
# bytes; more is not a probe, and bounding it bounds what one connection can hold.
MAX_REQUEST_HEAD = 8192
# Prometheus' text exposition format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
METRIC_PREFIX = "trio_socketserver_"
# (name after the prefix, ServerStatistics field, help text): the counters of /metrics.
COUNTERS = (
    ("accepted_total", "accepted_requests", "Requests taken from the socket."),
    ("finished_total", "finished_requests", "Requests whose handler ran to completion."),
    ("failed_total", "failed_requests", "Requests whose handling raised (see handle_error)."),
    (
        "cut_short_total",
        "cancelled_requests",
        "Requests cut short by a stop (grace over, or a hard stop) or a deadline.",
    ),
    (
        "refused_total",
        "refused_requests",
        "Requests closed before a handler saw them (verify_request, PROXY header).",
    ),
    (
        "proxy_rejected_total",
        "proxy_rejected_requests",
        "Connections closed for a missing, malformed, slow or untrusted PROXY header.",
    ),
)
GAUGES = (("active_requests", "active_requests", "Requests being handled right now."),)

# RFC 9112: method SP request-target SP HTTP-version; a method is a token.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) (HTTP/\d\.\d)")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_SUPPORTED_VERSIONS = (b"HTTP/1.0", b"HTTP/1.1")


@attrs.frozen
class HealthRequest:
    """A parsed request head: what the endpoint needs of it."""

    method: str
    target: str
    """The request target as sent, e.g. ``/ready`` or ``/metrics?x=1``."""
    version: str
    """``HTTP/1.0`` or ``HTTP/1.1``."""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class BadRequest(Exception):
    """The client sent something that is not a request the endpoint answers: ``status`` is
    the HTTP status to answer with (400, 431 or 505) before closing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request(data: bytes, max_size: int = MAX_REQUEST_HEAD) -> HealthRequest | None:
    """The request whose head ``data`` starts with, or None if the head is not complete yet.

    Lenient where probes differ and strict where it costs nothing: empty lines before the
    request line are skipped, lines may end in CRLF or a bare LF, ``Host`` is not required
    (HTTP/1.0 probes, HAProxy's ``option httpchk`` among them, send none) and header values
    are not read. A body is never read: the answer closes the connection.

    Errors: :exc:`BadRequest`: 431 if no complete head fits in ``max_size`` bytes, 400 for a
    malformed request line or header line, 505 for an HTTP version other than 1.0 and 1.1.
    """
    start = len(data) - len(data.lstrip(b"\r\n"))
    end = _END_OF_HEAD.search(data, start)
    if end is None:
        if len(data) > max_size:
            raise BadRequest(431, f"no complete request head in {max_size} bytes")
        return None
    if end.end() > max_size:
        raise BadRequest(431, f"a request head longer than {max_size} bytes")
    request_line, *headers = data[start : end.start()].split(b"\n")
    match = _REQUEST_LINE.fullmatch(request_line.rstrip(b"\r"))
    if match is None:
        raise BadRequest(400, f"not an HTTP request line: {request_line[:80]!r}")
    method, target, version = match.groups()
    if version not in _SUPPORTED_VERSIONS:
        raise BadRequest(505, f"HTTP version {version.decode()} is not supported")
    for line in headers:
        name, colon, _ = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, f"not a header line: {line[:80]!r}")
    return HealthRequest(method.decode(), target.decode(), version.decode())


def render_response(
    status: int,
    body: str,
    *,
    content_type: str = TEXT_CONTENT_TYPE,
    head_only: bool = False,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """A complete response that ends the connection (``Connection: close``).

    ``head_only`` (a ``HEAD`` request): the same headers, ``Content-Length`` included, and
    no body.
    """
    payload = body.encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
        # A probe's answer is about this moment: no cache may answer for us.
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only else head + payload


def answer(request: HealthRequest, servers: Sequence[tuple[str, ServerStatistics]]) -> bytes:
    """The response to ``request``, about ``servers`` (each: its label and its statistics).

    ``/live``: 200. ``/ready``: 200 when every server is serving and none is draining,
    else 503 naming the ones that are not ready. ``/metrics``: the Prometheus text. Any
    other path: 404; a method other than ``GET`` and ``HEAD``: 405.
    """
    return route(
        request,
        lambda: [
            f"{label} is {'draining' if stats.draining else 'not serving'}"
            for label, stats in servers
            if stats.draining or not stats.serving
        ],
        lambda: render_metrics(servers),
    )


def route(
    request: HealthRequest,
    not_ready: Callable[[], Sequence[str]],
    metrics: Callable[[], str],
) -> bytes:
    """The response to ``request``: ``/live`` 200; ``/ready`` 200, or 503 with the reasons
    ``not_ready()`` gives; ``/metrics`` the text ``metrics()`` renders; any other path 404; a
    method other than ``GET`` and ``HEAD`` 405. What each endpoint reports on decides only
    the reasons and the metrics (a supervisor reports on its workers)."""
    head_only = request.method == "HEAD"
    if request.method not in ("GET", "HEAD"):
        return render_response(
            405, "only GET and HEAD\n", head_only=head_only, headers=[("Allow", "GET, HEAD")]
        )
    if request.path == "/live":
        return render_response(200, "live\n", head_only=head_only)
    if request.path == "/ready":
        reasons = not_ready()
        if reasons:
            return render_response(503, f"not ready: {'; '.join(reasons)}\n", head_only=head_only)
        return render_response(200, "ready\n", head_only=head_only)
    if request.path == "/metrics":
        return render_response(
            200, metrics(), content_type=METRICS_CONTENT_TYPE, head_only=head_only
        )
    return render_response(404, "not found: try /live, /ready or /metrics\n", head_only=head_only)


def render_metrics(servers: Sequence[tuple[str, ServerStatistics]]) -> str:
    """The Prometheus text format (0.0.4) of the servers' statistics, one series per server
    labelled ``server="tcp 127.0.0.1:8000"``."""
    return render_statistics([({"server": label}, stats) for label, stats in servers])


def render_statistics(series: Sequence[tuple[Mapping[str, str], ServerStatistics]]) -> str:
    """The Prometheus text of statistics, one series per entry, with the entry's labels."""
    lines: list[str] = []
    for kind, metrics in (("counter", COUNTERS), ("gauge", GAUGES)):
        for suffix, field, help_text in metrics:
            samples = [(labels, getattr(stats, field)) for labels, stats in series]
            lines += render_metric(METRIC_PREFIX + suffix, kind, help_text, samples)
    return "\n".join(lines) + "\n"


def render_metric(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], int]]
) -> list[str]:
    """The lines of one metric: its ``# HELP`` and ``# TYPE`` lines, then a sample line per
    label set."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        rendered = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
        lines.append(f"{name}{{{rendered}}} {value}" if rendered else f"{name} {value}")
    return lines


def _label_value(value: str) -> str:
    """Escaped as the text format wants a label value: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _HealthHandler(StreamRequestHandler):
    """One probe: read the request head, answer, close."""

    server: ProbeServer

    async def handle(self) -> None:
        server = self.server
        # One deadline for the whole exchange: a per-read timeout would let a client that
        # sends a byte now and then hold its connection forever.
        with trio.move_on_after(server.request_timeout):
            response = await self._respond(server)
            if response:
                await self.wfile.write(response)

    async def _respond(self, server: ProbeServer) -> bytes:
        head = b""
        try:
            while (request := parse_request(head, server.max_request_size)) is None:
                data = await self.rfile.read1(server.max_request_size + 1)
                if not data:
                    return b""  # the client left before asking anything
                head += data
        except BadRequest as exc:
            return render_response(exc.status, f"{exc}\n")
        return server.respond(request)


class ProbeServer(TCPServer):
    """What every health endpoint shares: the HTTP handling, its limits and defaults (see
    :class:`HealthServer`). A subclass says what it reports on, in :meth:`respond`."""

    allow_reuse_address = True
    max_connections: int | None = 64
    shutdown_grace: float | None = 1.0
    request_timeout: float = 3.0
    max_request_size: int = MAX_REQUEST_HEAD

    def __init__(self, server_address: Any, bind_and_activate: bool = True) -> None:
        if ":" in str(server_address[0]):
            self.address_family = socket.AF_INET6
        super().__init__(server_address, _HealthHandler, bind_and_activate)

    def respond(self, request: HealthRequest) -> bytes:
        """The whole response to ``request``, a parsed probe."""
        raise NotImplementedError


class HealthServer(ProbeServer):
    """An HTTP endpoint for health probes and metrics about ``servers``, on its own socket.

    ``GET /live``: 200 while the process runs. ``GET /ready``: 200 while every server is
    serving and none is draining; 503 before ``serve_forever()`` started and from the moment
    a shutdown begins (a balancer moves traffic away), naming the servers that are not
    ready. ``GET /metrics``: the servers' :meth:`~BaseServer.statistics` in Prometheus'
    text format (``text/plain; version=0.0.4``): counters
    ``trio_socketserver_accepted_total``, ``_finished_total``, ``_failed_total``,
    ``_cut_short_total``, ``_refused_total``, ``_proxy_rejected_total`` and the gauge
    ``trio_socketserver_active_requests``, each with a ``server`` label
    (``server="tcp 127.0.0.1:8000"``). Any other path: 404; ``HEAD`` works on each. It
    answers HTTP/1.0 and HTTP/1.1, with or without ``Host``, and closes the connection after
    each answer.

    Serve it like any server, alongside the ones it reports on, and shut it down after
    them, so that it answers 503 through their drain::

        async with HealthServer(("127.0.0.1", 9000), [server]) as health:
            async with trio.open_nursery() as nursery:
                await nursery.start(health.serve_forever)
                status = await trio_socketserver.serve_until_signal(server)
                health.shutdown()

    An address with a ``:`` in its host (``("::1", 9000)``) is served over IPv6.
    :meth:`~TCPServer.from_socket` builds one around a listening socket made elsewhere
    (``HealthServer.from_socket(sock, [server])``).

    A probe cannot hurt the servers it reports on: the endpoint has its own task group and
    capacity. What one client can hold is bounded: a request head of ``max_request_size``
    bytes (8192; more is answered 431), ``request_timeout`` seconds for the whole exchange
    (3.0: a probe sends its request at once; a client that trickles bytes is cut then), and
    ``max_connections`` clients at once (64; further ones wait in the listen backlog).
    Bind it to an address only probes and scrapers reach: a flood of slow clients can delay
    the probes themselves by up to ``request_timeout``.

    ``allow_reuse_address`` is True (a restart binds the port at once) and
    ``shutdown_grace`` is 1.0: an answer takes milliseconds, and a trickling client is not
    worth waiting for.

    Errors: ``ValueError`` without a server to report on; binding errors as
    :class:`TCPServer`'s.
    """

    def __init__(
        self,
        server_address: Any,
        servers: Sequence[BaseServer],
        bind_and_activate: bool = True,
    ) -> None:
        self.servers: tuple[BaseServer, ...] = tuple(servers)
        """The servers it reports on."""
        if not self.servers:
            raise ValueError("HealthServer needs at least one server to report on")
        super().__init__(server_address, bind_and_activate)

    def respond(self, request: HealthRequest) -> bytes:
        return answer(request, [(describe_server(s), s.statistics()) for s in self.servers])


async def serve_with_health(health: ProbeServer | None, serve: Callable[[], Awaitable[int]]) -> int:
    """``await serve()`` with ``health`` (if any) answering from before it starts until it
    has returned, so ``/ready`` is 503 while what it reports on starts and drains; returns
    what ``serve()`` returns. Logs where the endpoint listens once it does.

    Resource handling: ``health`` stays open (the caller closes it).
    """
    if health is None:
        return await serve()
    async with trio.open_nursery() as nursery:
        await nursery.start(health.serve_forever)
        LOGGER.info(
            "health endpoint on %s: GET /live, /ready, /metrics",
            describe_address(
                health.address_family, health.server_address, datagram=False, tls=False
            ),
        )
        status = await serve()
        health.shutdown()
    return status
