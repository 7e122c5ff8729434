# The command line's decisions, without its I/O: parsing options and addresses,
# loading the handler class and TLS files, choosing the server class for each
# endpoint, and the words and exit statuses it answers with. Nothing here opens
# a socket, waits for a signal or configures logging (that is __main__.py, and
# serving until a signal is _signals.py), so every rule is unit-testable. Every
# mistake a user can make on the command line becomes a UsageError: one line
# saying what is wrong and what to do.
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import ipaddress
import os
import re
import socket
import socketserver
import ssl
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import attrs

from ._activation import InheritedSocket
from ._echo import DatagramEchoHandler, EchoHandler
from ._families import (
    TCPServer,
    ThreadingTCPServer,
    ThreadingUDPServer,
    ThreadingUnixDatagramServer,
    ThreadingUnixStreamServer,
    UDPServer,
    UnixDatagramServer,
    UnixStreamServer,
)
from ._handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from ._server import BaseServer
from ._signals import describe_address
from ._workers._policy import CRASH_LOOP, STABLE_AFTER

PROG = "trio-socketserver"
"""The program's name as the console script; ``python -m trio_socketserver`` names itself so."""
MODULE_PROG = "python -m trio_socketserver"
# Loopback unless told otherwise: starting a demo server must not expose a port
# to the network by surprise.
DEFAULT_HOST = "127.0.0.1"
# http.server's default, so the port is easy to remember; when it is taken the
# user gets "address already in use" and can pick another (0 picks a free one).
DEFAULT_PORT = 8000

EXIT_OK = 0
"""Stopped gracefully (a first SIGINT or SIGTERM)."""
EXIT_FAILURE = 1
"""Failed while serving; the error is logged with its traceback."""
EXIT_USAGE = 2
"""Could not start: a bad option, handler, address or TLS file (argparse's convention)."""


def epilog(prog: str) -> str:
    return f"""\
Handlers: MODULE:CLASS names a request handler class, imported from the
current directory or the Python path. Its handle() may be async (one task per
request) or sync (one request at a time; with --threading one thread each).
Stream handlers serve TCP and --unix; with --udp, datagram handlers.

Stopping: SIGINT (Ctrl-C) or SIGTERM starts draining: the server keeps
accepting for --drain-delay seconds, serves the connections already queued,
stops accepting, and gives in-flight requests --shutdown-grace seconds, then
cancels them; a connection waiting for its next message ends at once. A
second signal stops at once. Handler threads are daemon threads: none keeps the process alive.
TCP addresses are bound with SO_REUSEADDR, so a restart can bind them at once;
a Unix socket file left by a crashed server (nobody listens on it) is replaced.

Health: --health-bind HOST:PORT serves GET /live, GET /ready (503 while
starting and draining) and GET /metrics (Prometheus text) on a port of its own.

Service manager (systemd): with NOTIFY_SOCKET set it is told READY=1 once
every port accepts, STOPPING=1 when the drain begins, and WATCHDOG=1
when WATCHDOG_USEC asks. With socket activation (LISTEN_PID is this process,
LISTEN_FDS set) it serves the sockets passed from descriptor 3 on instead of
binding; --bind and --unix cannot be given then.

Workers: --workers N starts a supervisor that binds (or inherits) the
sockets once and keeps N worker processes serving them, each a fresh
interpreter running this command line. A worker that dies is replaced (pid and
cause logged); {CRASH_LOOP} in a row in one slot dying within {STABLE_AFTER:g} s of their start is
a crash loop: the supervisor stops and exits 1. SIGHUP reloads: new workers
import the handler afresh and the old ones drain once every new one is ready;
if one cannot start, the old ones keep serving. SIGTERM/SIGINT drains them all
and logs the sum of their stop reports. --health-bind answers for all of them.
No worker outlives the supervisor, however it ends.

Logging: to stderr, one line per event (with --workers, each names its
process: trio_socketserver[PID]). --access-log adds one line per
connection (logger trio_socketserver.access, INFO); --log-level DEBUG shows it
too, and the traceback behind a handler module that fails to import.

Exit status:
  {EXIT_OK}        stopped gracefully after a signal
  {EXIT_FAILURE}        failed while serving (the error is logged); with --workers, also a
           crash loop
  {EXIT_USAGE}        could not start: bad option, handler, address, address in use,
           TLS files (with --workers: the first workers could not start)
  130/143  stopped at once by a second signal (128 + its number: SIGINT, SIGTERM)

Examples:
  {prog}
      line echo on {DEFAULT_HOST}:{DEFAULT_PORT}
  {prog} --bind 127.0.0.1:0 --bind [::1]:0
      free ports, IPv4 and IPv6
  {prog} --udp --bind 127.0.0.1:9999
      datagram echo
  {prog} --handler app:Handler --threading --max-connections 64
  {prog} --handler app:Handler --workers 4 --health-bind 127.0.0.1:9000
      four worker processes; kill -HUP the supervisor to reload app
"""


class UsageError(Exception):
    """A mistake on the command line; the message is one line, shown as is."""


@attrs.frozen
class Endpoint:
    """One address to serve on: an IP host and port, or a Unix socket path."""

    family: int
    """``AF_INET``, ``AF_INET6`` or ``AF_UNIX``."""
    address: Any
    """``(host, port)`` for IP, the path for ``AF_UNIX``."""
    inherited: InheritedSocket | None = None
    """The socket the service manager passed for it (socket activation): served as it is,
    not bound."""


@attrs.frozen
class Config:
    """Everything the command line asked for, validated and loaded."""

    endpoints: tuple[Endpoint, ...]
    handler: type[Any]
    udp: bool = False
    threading: bool = False
    max_connections: int | None = None
    shutdown_grace: float | None = None
    """None: the server's default (``BaseServer.shutdown_grace``)."""
    request_deadline: float | None = None
    """None: no bound on how long one request (a stream server's connection) may run."""
    drain_delay: float = 0.0
    ssl_context: ssl.SSLContext | None = None
    proxy_protocol: str | None = None
    """``"v1"``, ``"v2"``, ``"auto"``, or None: no PROXY protocol header."""
    proxy_trusted: tuple[str, ...] | None = None
    """Who may send a PROXY header; None: the server's default (loopback)."""
    health: Endpoint | None = None
    """Where to serve the health endpoint (``--health-bind``), if anywhere."""
    reuse_port: bool = False
    """Bind TCP sockets with ``SO_REUSEPORT``: several processes can listen on one port."""


def parse_bind(text: str) -> Endpoint:
    """Parse ``HOST:PORT``, ``[IPv6]:PORT`` or a bare ``PORT`` (on loopback).

    Errors: ``UsageError`` naming the bad part. An empty host is refused
    rather than meaning "every interface": that must be said explicitly
    (``0.0.0.0:PORT`` or ``[::]:PORT``).
    """
    if text.isdigit():
        return Endpoint(socket.AF_INET, (DEFAULT_HOST, parse_port(text, text)))
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000 or [::1]:8000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
        return Endpoint(socket.AF_INET6, (host, parse_port(port, text)))
    if ":" in host:
        raise UsageError(f"{text!r}: put an IPv6 address in brackets, e.g. [::1]:8000")
    if not host:
        raise UsageError(
            f"{text!r}: give a host: {DEFAULT_HOST}:{port} for loopback, "
            f"0.0.0.0:{port} for every IPv4 interface"
        )
    return Endpoint(socket.AF_INET, (host, parse_port(port, text)))


def parse_port(port: str, text: str) -> int:
    """A TCP/UDP port number, 0 (the kernel picks a free one) to 65535."""
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{text!r}: the port must be a number from 0 to 65535")
    return int(port)


def parse_handler_spec(text: str) -> tuple[str, str]:
    """Split ``package.module:Class`` (or ``module:Outer.Inner``) into its two names."""
    module, sep, name = text.partition(":")
    if not (sep and _dotted(module) and _dotted(name)):
        raise UsageError(
            f"--handler expects MODULE:CLASS, e.g. myapp.handlers:EchoHandler, not {text!r}"
        )
    return module, name


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def load_handler(text: str, *, udp: bool) -> type[Any]:
    """Import the handler class ``text`` names and check it fits the server.

    The current directory is searched first, as ``python -m`` does, so
    ``--handler myhandlers:Echo`` finds ``./myhandlers.py`` from the console
    script too.

    Errors: ``UsageError`` for a module that is missing or fails to import
    (with the exception and where it was raised, not a traceback), a missing
    attribute, something that is not a request handler class, and a stream
    handler with ``--udp`` or a datagram handler without it.
    """
    module_name, attribute = parse_handler_spec(text)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise UsageError(
                f"--handler {text}: no module named {exc.name!r} "
                "(it is looked up in the current directory and on PYTHONPATH)"
            ) from None
        raise UsageError(
            f"--handler {text}: importing {module_name!r} failed: {_one_line(exc)}"
        ) from exc
    # Any exception from the user's module is reported, not re-raised: the
    # promise is one line saying where it broke, not a traceback. The exception stays the
    # UsageError's cause: --log-level DEBUG shows its traceback.
    except Exception as exc:
        raise UsageError(
            f"--handler {text}: importing {module_name!r} failed: {_one_line(exc)}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(
                f"--handler {text}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    return check_handler(text, target, udp=udp)


_ANY_HANDLER = (BaseRequestHandler, socketserver.BaseRequestHandler)
_STREAM_HANDLER = (StreamRequestHandler, socketserver.StreamRequestHandler)
_DATAGRAM_HANDLER = (DatagramRequestHandler, socketserver.DatagramRequestHandler)


def check_handler(text: str, target: object, *, udp: bool) -> type[Any]:
    """Return ``target`` if it is a request handler class of the right kind for ``udp``."""
    if not (isinstance(target, type) and issubclass(target, _ANY_HANDLER)):
        kind = "a class" if isinstance(target, type) else f"a {type(target).__name__}"
        raise UsageError(
            f"--handler {text} is {kind}, not a request handler class; subclass "
            "trio_socketserver.StreamRequestHandler, DatagramRequestHandler or BaseRequestHandler"
        )
    if udp and issubclass(target, _STREAM_HANDLER):
        raise UsageError(
            f"--handler {text} is a stream handler and --udp serves datagrams; "
            "drop --udp or use a DatagramRequestHandler"
        )
    if not udp and issubclass(target, _DATAGRAM_HANDLER):
        raise UsageError(f"--handler {text} is a datagram handler; add --udp to serve it")
    return target


def cannot_listen(
    endpoint: Endpoint, exc: OSError, *, udp: bool = False, tls: bool = False, option: str = ""
) -> UsageError:
    """The error for an address that cannot be bound (in use, no permission, unknown host,
    a path that is not a socket); ``option`` names the option it came from, if not
    ``--bind``/``--unix``."""
    where = describe_address(endpoint.family, endpoint.address, datagram=udp, tls=tls)
    if option:
        where += f" ({option})"
    return UsageError(f"cannot listen on {where}: {exc.strerror or exc}")


def _one_line(exc: BaseException) -> str:
    """``Type: message (at file:line)``: where an import broke, without a traceback."""
    message = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if isinstance(exc, SyntaxError):
        return message  # its message already names the file and line
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        message += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return message


def load_tls(cert: str | None, key: str | None, *, udp: bool) -> ssl.SSLContext | None:
    """A server-side TLS context from PEM files, or None without ``--tls-cert``.

    ``--tls-key`` may be left out when the certificate file holds the key too.
    Errors: ``UsageError`` for a key without a certificate, TLS with ``--udp``
    (no DTLS), and files that are missing, unreadable, not PEM, swapped,
    encrypted, or a certificate and key that do not belong together, each
    naming the file and what is wrong with it (OpenSSL's own errors name
    neither: ``[SSL] PEM lib (_ssl.c:3926)``).
    """
    if cert is None:
        if key is not None:
            raise UsageError("--tls-key needs --tls-cert (the certificate the key belongs to)")
        return None
    if udp:
        raise UsageError("--tls-cert works with stream servers only; drop --udp")
    cert_labels = _pem_labels(cert, "--tls-cert", "certificate")
    key_labels = cert_labels if key is None else _pem_labels(key, "--tls-key", "key")
    if key is not None and _holds_key(cert_labels) and "CERTIFICATE" in key_labels:
        raise UsageError(
            f"certificate and key swapped: {cert} holds a private key and {key} a certificate; "
            f"use --tls-cert {key} --tls-key {cert}"
        )
    if "CERTIFICATE" not in cert_labels:
        raise UsageError(
            f"--tls-cert {cert}: not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)"
        )
    if not _holds_key(key_labels):
        if key is None:
            raise UsageError(
                f"--tls-cert {cert} holds no private key; give the key file with --tls-key"
            )
        raise UsageError(
            f"--tls-key {key}: not a PEM private key (no '-----BEGIN PRIVATE KEY-----' line)"
        )
    key_file = cert if key is None else key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A password callback, or OpenSSL would prompt on the terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise UsageError(
            f"--tls-key {key_file}: the key is encrypted (password protected); give an "
            f"unencrypted key, e.g. from: openssl pkey -in {key_file} -out plain-key.pem"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise UsageError(
                f"the certificate and key don't match: {key_file} is not the private key "
                f"of the certificate in {cert}"
            ) from None
        files = cert if key is None else f"{cert} / {key}"
        raise UsageError(
            f"cannot load the TLS certificate and key ({files}): {exc.reason or exc}"
        ) from None
    return context


# The labels of PEM blocks ("CERTIFICATE", "PRIVATE KEY", "EC PRIVATE KEY", ...).
_PEM_LABEL = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----\s*$", re.MULTILINE)
# A certificate chain is a few kilobytes; reading no more bounds a wrong file given by mistake.
_MAX_PEM_BYTES = 1 << 20


def _pem_labels(path: str, option: str, what: str) -> set[str]:
    """The PEM block labels in ``path``; ``UsageError`` if it is missing or unreadable."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_PEM_BYTES)
    except FileNotFoundError:
        raise UsageError(f"{what} file missing: {path} ({option})") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read the {what} file: {exc.strerror}") from None
    return {label.decode() for label in _PEM_LABEL.findall(data)}


def _holds_key(labels: set[str]) -> bool:
    return any(label.endswith("PRIVATE KEY") for label in labels)


class _EncryptedKey(Exception):
    """Raised by the password callback: the key needs a password the CLI does not take."""


def _refuse_password() -> str:
    raise _EncryptedKey


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, e.g. 0.5, not {text!r}")
    return value


def _network(text: str) -> str:
    try:
        ipaddress.ip_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an address or network, e.g. 10.0.0.0/8 or 2001:db8::/32: {exc}"
        ) from None
    return text


def _bind(text: str) -> Endpoint:
    try:
        return parse_bind(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block) raised as UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


PROXY_PROTOCOL_CHOICES = ("v1", "v2", "auto")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Serve a socketserver-style request handler on trio.\n"
        f"Without options: a line echo on {DEFAULT_HOST}:{DEFAULT_PORT}.",
        epilog=epilog(prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_argument_group("where to listen")
    where.add_argument(
        "--bind",
        action="append",
        type=_bind,
        default=[],
        metavar="HOST:PORT",
        help=f"an IP address and port (IPv6 in brackets: [::1]:8000; port 0 picks a free "
        f"one); repeat for several (default: {DEFAULT_HOST}:{DEFAULT_PORT}, unless --unix "
        "is given)",
    )
    where.add_argument(
        "--unix", action="append", default=[], metavar="PATH", help="a Unix socket path; repeatable"
    )
    where.add_argument("--udp", action="store_true", help="serve datagrams instead of streams")
    where.add_argument(
        "--health-bind",
        type=_bind,
        metavar="HOST:PORT",
        help="serve the health endpoint (GET /live, /ready, /metrics) on this address",
    )
    what = parser.add_argument_group("what to serve")
    what.add_argument(
        "--handler",
        metavar="MODULE:CLASS",
        help="the request handler class (default: a built-in line echo, "
        "or datagram echo with --udp)",
    )
    what.add_argument(
        "--threading",
        action="store_true",
        help="run each request of a sync handler on its own thread",
    )
    what.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="at most N requests at once (connections, or handler threads with "
        "--threading); further clients wait in the listen backlog (default: no limit)",
    )
    what.add_argument(
        "--shutdown-grace",
        type=_seconds,
        metavar="SECONDS",
        help="how long in-flight requests may run after SIGINT/SIGTERM before they are "
        f"cancelled (default: {BaseServer.shutdown_grace})",
    )
    what.add_argument(
        "--request-deadline",
        type=_seconds,
        metavar="SECONDS",
        help="the longest one request may run (for streams: the whole connection), so "
        "that a client trickling bytes cannot hold it forever; then it is cut as at the "
        "end of --shutdown-grace and logged (default: no limit)",
    )
    what.add_argument(
        "--drain-delay",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="after SIGINT/SIGTERM, keep accepting this long while reporting that the server "
        "is draining (/ready answers 503), so a load balancer moves traffic away before "
        "anything is refused; set it above the balancer's health-check interval (default: 0)",
    )
    what.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate")
    what.add_argument(
        "--tls-key", metavar="FILE", help="its PEM private key (if not in the certificate file)"
    )
    balancer = parser.add_argument_group("behind a load balancer")
    balancer.add_argument(
        "--proxy-protocol",
        choices=PROXY_PROTOCOL_CHOICES,
        help="every connection starts with a PROXY protocol header of this version (auto: "
        "either), as HAProxy's send-proxy / send-proxy-v2 send it; handlers see the "
        "original client's address. A connection without one is closed",
    )
    balancer.add_argument(
        "--proxy-trusted",
        action="append",
        type=_network,
        metavar="CIDR",
        help="a peer address or network that may send the header, e.g. 10.0.0.0/8; "
        "repeatable; replaces the default, loopback (127.0.0.0/8 and ::1). Peers on a Unix "
        "socket are always trusted",
    )
    processes = parser.add_argument_group("several processes")
    processes.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="serve with N worker processes under a supervisor that binds the sockets once, "
        "replaces a worker that dies and reloads them all on SIGHUP (default: serve in "
        "this one process)",
    )
    processes.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind TCP sockets with SO_REUSEPORT; with --workers each worker binds its own "
        "and the kernel spreads connections among them (see the docs for the trade-off)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        metavar="LEVEL",
        help=f"log to stderr from this level on: {', '.join(LOG_LEVELS)} (default: INFO); "
        "DEBUG includes the access log",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per connection: peer, duration, bytes, outcome",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def version() -> str:
    try:
        return importlib.metadata.version("trio-socketserver")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: running from a source tree)"


def parse_options(argv: Sequence[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    """Parse the command line (nothing is imported or read yet: logging can be set up first).

    Errors: ``UsageError`` for every mistake; ``SystemExit(0)`` for
    ``--help`` and ``--version``, as argparse does.
    """
    return build_parser(prog).parse_args(argv)


def load_config(options: argparse.Namespace, inherited: Sequence[InheritedSocket] = ()) -> Config:
    """Import the handler and read the TLS files that ``options`` name.

    ``inherited``: the sockets the service manager passed (socket activation); they are
    served instead of any address.

    Errors: ``UsageError`` for every mistake; one raised for a handler module
    that failed to import has that exception as its ``__cause__``.
    """
    if inherited:
        endpoints = tuple(activated_endpoints(options, inherited))
    else:
        endpoints = endpoints_of(options)
    if options.handler is None:
        handler: type[Any] = DatagramEchoHandler if options.udp else EchoHandler
    else:
        handler = load_handler(options.handler, udp=options.udp)
    if options.proxy_protocol is not None and options.udp:
        raise UsageError(
            "--proxy-protocol works with stream servers only (a balancer's connections); drop --udp"
        )
    if options.proxy_trusted and options.proxy_protocol is None:
        raise UsageError("--proxy-trusted needs --proxy-protocol (v1, v2 or auto)")
    return Config(
        endpoints=endpoints,
        handler=handler,
        udp=options.udp,
        threading=options.threading,
        max_connections=options.max_connections,
        shutdown_grace=options.shutdown_grace,
        request_deadline=options.request_deadline,
        drain_delay=options.drain_delay,
        ssl_context=load_tls(options.tls_cert, options.tls_key, udp=options.udp),
        proxy_protocol=options.proxy_protocol,
        proxy_trusted=None if options.proxy_trusted is None else tuple(options.proxy_trusted),
        health=options.health_bind,
        reuse_port=options.reuse_port,
    )


def activated_endpoints(
    options: argparse.Namespace, inherited: Sequence[InheritedSocket]
) -> list[Endpoint]:
    """An endpoint per socket the service manager passed, once the options fit them.

    Errors: ``UsageError`` for ``--bind``, ``--unix`` or ``--reuse-port`` (the manager
    decides where to listen, and binds), and for ``--udp`` with stream sockets or datagram
    sockets without it.
    """
    if options.bind or options.unix or options.reuse_port:
        option = "--bind" if options.bind else "--unix" if options.unix else "--reuse-port"
        raise UsageError(
            f"{option} cannot be used with socket activation (the service manager passes "
            f"LISTEN_FDS={len(inherited)}): drop {option}, or start without LISTEN_FDS"
        )
    datagram = [entry.socket.type == socket.SOCK_DGRAM for entry in inherited]
    if any(datagram) and not all(datagram):
        raise UsageError(
            "LISTEN_FDS passes stream and datagram sockets mixed; one process serves one "
            "kind: pass it only stream sockets, or only datagram sockets with --udp"
        )
    kind = "datagram" if all(datagram) else "stream"
    passes = (
        f"LISTEN_FDS passes a {kind} socket"
        if len(inherited) == 1
        else f"LISTEN_FDS passes {kind} sockets"
    )
    if all(datagram) and not options.udp:
        raise UsageError(f"{passes}: add --udp")
    if not any(datagram) and options.udp:
        raise UsageError(f"{passes}: drop --udp")
    return [Endpoint(entry.socket.family, entry.socket.getsockname(), entry) for entry in inherited]


def endpoints_of(options: argparse.Namespace) -> tuple[Endpoint, ...]:
    """Where ``options`` ask to listen: every ``--bind``, then every ``--unix``.

    Errors: ``UsageError`` for ``--reuse-port`` with a Unix socket or ``--udp`` (it only
    shares TCP ports).
    """
    endpoints = list(options.bind)
    endpoints += [Endpoint(socket.AF_UNIX, path) for path in options.unix]
    if not endpoints:
        endpoints.append(Endpoint(socket.AF_INET, (DEFAULT_HOST, DEFAULT_PORT)))
    if options.reuse_port and options.udp:
        raise UsageError(
            "--reuse-port shares TCP ports only; with --udp every worker serves one shared socket"
        )
    if options.reuse_port and options.unix:
        raise UsageError(
            "--reuse-port shares TCP ports only, not Unix socket paths; drop --unix or --reuse-port"
        )
    return tuple(endpoints)


# The options a supervisor (--workers) acts on itself: it binds the addresses (or, with
# --reuse-port, gives each worker the address it bound) and serves the health endpoint.
SUPERVISOR_OPTIONS = frozenset({"workers", "bind", "unix", "reuse_port", "health_bind"})


def worker_arguments(options: argparse.Namespace) -> list[str]:
    """The options a worker of ``--workers`` gets: all that were given but the supervisor's.

    Written back from the parsed values (``str()`` of each), so an abbreviated or
    ``--opt=value`` spelling reaches the worker in one canonical form.
    """
    arguments = []
    # argparse keeps its options in a private list; it has kept it there since 2010.
    for action in build_parser()._actions:
        if not action.option_strings or action.dest in SUPERVISOR_OPTIONS:
            continue
        value = getattr(options, action.dest, action.default)
        if value == action.default:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if action.nargs == 0:
            arguments.append(flag)
        elif isinstance(value, list):
            for item in value:
                arguments += [flag, str(item)]
        else:
            arguments += [flag, str(value)]
    return arguments


_SERVER_CLASSES: dict[tuple[bool, bool, bool], type[TCPServer]] = {
    # (unix, udp, threading)
    (False, False, False): TCPServer,
    (False, False, True): ThreadingTCPServer,
    (False, True, False): UDPServer,
    (False, True, True): ThreadingUDPServer,
    (True, False, False): UnixStreamServer,
    (True, False, True): ThreadingUnixStreamServer,
    (True, True, False): UnixDatagramServer,
    (True, True, True): ThreadingUnixDatagramServer,
}


def server_class(config: Config, endpoint: Endpoint) -> type[TCPServer]:
    """The server class for ``endpoint``, with the command line's settings as class attributes."""
    base = _SERVER_CLASSES[(endpoint.family == socket.AF_UNIX, config.udp, config.threading)]
    settings: dict[str, Any] = {
        "address_family": endpoint.family,
        # A restart binds at once, although connections of the previous run linger in
        # TIME-WAIT (http.server sets it too); it never takes a port someone listens on.
        # Not for datagrams: they have no TIME-WAIT, and on Linux SO_REUSEADDR would let a
        # second server bind the same UDP port silently instead of failing.
        "allow_reuse_address": not config.udp,
        # The process exits after stopping: a sync handler stuck outside socket
        # I/O (which the engine releases) must not keep it alive after a
        # forced stop, so handler threads are daemons and nobody waits for
        # them past the grace.
        "daemon_threads": True,
    }
    if endpoint.family == socket.AF_UNIX:
        # A socket file a crashed run left behind (nobody listens on it) is replaced, with a
        # warning; one a live server listens on never is.
        settings["remove_stale_socket"] = True
    if config.max_connections is not None:
        settings["max_connections"] = config.max_connections
        if config.threading:
            settings["max_threads"] = config.max_connections
    if config.shutdown_grace is not None:
        settings["shutdown_grace"] = config.shutdown_grace
    if config.request_deadline is not None:
        settings["request_deadline"] = config.request_deadline
    if config.proxy_protocol is not None:
        settings["proxy_protocol"] = config.proxy_protocol
    if config.proxy_trusted is not None:
        settings["proxy_trusted"] = config.proxy_trusted
    settings["drain_delay"] = config.drain_delay
    if config.reuse_port and endpoint.family != socket.AF_UNIX:
        settings["allow_reuse_port"] = True
    return type(base.__name__, (base,), settings)
