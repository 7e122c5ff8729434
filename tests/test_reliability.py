# Reliability: tests that try to break the servers. Bad peers (resets, slowloris, clients
# that never read, silence, garbage, oversized lines and datagrams, broken TLS), faults in our
# own code paths (setup/handle/finish/handle_error/verify_request raising, handler threads
# that never return, worker processes killed mid-request), shutdown under load, and security
# defaults (Unix socket permissions and symlinks, allow_reuse_address, the CLI's address).
# Every attack runs against each front door that exists: the native engine with async
# handlers, sync handlers on ThreadingMixIn, the compat drop-in and the worker-process pool.
# Servers run on a background thread (their own trio.run, or compat's blocking
# serve_forever) and the attackers are stdlib sockets, so one test body serves every door.
# Resource exhaustion (fd limits, memory per idle connection) is in test_exhaustion.py.
# Every test ends with conftest's leak check: same fds, threads and child processes.
from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import json
import logging
import os
import pickle
import signal
import socket
import socketserver
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme

import trio_socketserver as ts
from serving_process import cli
from trio_socketserver._threading import HANDLER_THREAD_PREFIX, THREAD_RELEASE_TIMEOUT

pytestmark = pytest.mark.usefixtures("no_leaks")

# The bound on anything that should happen "at once" on a loaded 2-core machine; a test
# that needs it is broken, not slow.
CLIENT_TIMEOUT = 5.0
# Slack on top of a configured limit (handler timeout, shutdown grace) before a test calls
# the limit broken: scheduling noise on a busy CI machine, never a sleep the test relies on.
SLACK = 1.0
# Handler threads of the engine's pool are named so.

# The idle/handshake timeout of handlers under attack: short, so the attacks end quickly.
PEER_TIMEOUT = 0.3
# readline(limit) of the test protocol: a line longer than this is refused.
LINE_LIMIT = 64 * 1024
# What a "flood" request writes per write() call; one shared buffer, so the handler's own
# memory stays at one reference per chunk.
CHUNK = bytes(64 * 1024)
# How long a "req" request works between its two replies: long enough that many requests
# are in flight when the load test calls shutdown().
WORK_TIME = 0.02


# ---------------------------------------------------------------------------------------------
# The test protocol (sans I/O) and its handlers


def respond(line: bytes) -> tuple[list[bytes | float], bool]:
    """What to do for one request line: writes (bytes) and pauses (seconds), and whether
    the connection stays open for another line.

    ``b""`` (EOF) ends the connection; a line of LINE_LIMIT bytes without newline is refused
    with ``ERR``; ``flood N`` writes N bytes; ``req ID`` answers ``accepted ID``, works
    WORK_TIME, answers ``done ID`` and closes; ``pid`` answers the process id of the
    handler (a worker's, with forking); anything else is echoed.
    """
    if not line:
        return [], False
    if len(line) == LINE_LIMIT and not line.endswith(b"\n"):
        return [b"ERR line too long\n"], False
    command, _, arg = line.rstrip(b"\n").partition(b" ")
    if command == b"flood":
        return [CHUNK] * (int(arg) // len(CHUNK)), True
    if command == b"req":
        return [b"accepted " + arg + b"\n", WORK_TIME, b"done " + arg + b"\n"], False
    if command == b"pid":
        return [b"%d\n" % os.getpid()], True
    return [line], True


class AsyncLines(ts.StreamRequestHandler):
    timeout = CLIENT_TIMEOUT

    async def handle(self) -> None:
        keep = True
        while keep:
            steps, keep = respond(await self.rfile.readline(LINE_LIMIT))
            for step in steps:
                if isinstance(step, float):
                    await trio.sleep(step)
                else:
                    await self.wfile.write(step)


class SyncLines(ts.StreamRequestHandler):
    timeout = CLIENT_TIMEOUT

    def handle(self) -> None:
        keep = True
        while keep:
            steps, keep = respond(self.rfile.readline(LINE_LIMIT))
            for step in steps:
                if isinstance(step, float):
                    time.sleep(step)
                else:
                    self.wfile.write(step)


class AsyncDatagramLength(ts.DatagramRequestHandler):
    """Replies with the length of the datagram it received."""

    async def handle(self) -> None:
        self.wfile.write(b"%d" % len(self.packet))


class SyncDatagramLength(ts.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"%d" % len(self.packet))


class ErrorLog:
    """handle_error() calls, reported from any process: worker processes inherit the socket
    pair (it exists before the server forks, and worker doors list it in ``pass_fds``, as
    workers keep no other inherited socket), so an error in a worker reaches the test."""

    def __init__(self) -> None:
        self._receive, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def sender_fd(self) -> int:
        return self._send.fileno()

    def put(self, client_address: Any, error: BaseException | None) -> None:
        try:
            message = pickle.dumps((client_address, error))
        except (pickle.PicklingError, AttributeError, TypeError):  # e.g. a local class
            message = pickle.dumps((client_address, RuntimeError(repr(error))))
        self._send.send(message)

    def get(self) -> tuple[Any, BaseException | None]:
        """The next error (fails the test after CLIENT_TIMEOUT)."""
        self._receive.settimeout(CLIENT_TIMEOUT)
        try:
            message = self._receive.recv(65536)
        except TimeoutError:
            pytest.fail(f"handle_error() was not called within {CLIENT_TIMEOUT} s")
        error: tuple[Any, BaseException | None] = pickle.loads(message)
        return error

    def empty(self) -> bool:
        self._receive.setblocking(False)
        try:
            self._receive.recv(65536)
        except BlockingIOError:
            return True
        return False

    def close(self) -> None:
        self._receive.close()
        self._send.close()


class Recording:
    """Server mixin: every handle_error() call is also reported to ``errors``, after the
    default handle_error() logged it (so the log is written once the test sees the error)."""

    errors: ErrorLog

    def handle_error(self, request: Any, client_address: Any) -> None:
        super().handle_error(request, client_address)  # type: ignore[misc]
        self.errors.put(client_address, sys.exc_info()[1])


# ---------------------------------------------------------------------------------------------
# Front doors


@attrs.frozen
class Door:
    """One way users run handlers: which server classes, which handler flavour."""

    name: str
    stream_server: type
    datagram_server: type
    handler: type  # the test protocol's handler for this door
    datagram_handler: type
    # Sync handlers on threads (thread-specific attacks apply), with the stdlib's thread
    # semantics: what escapes a request thread (a handle_error that raises) goes to
    # threading.excepthook and ends that request only.
    threads: bool = False
    workers: bool = False  # sync handlers in worker processes (max_children bounds them)

    def server(
        self,
        *,
        handler: type | None = None,
        handler_attrs: dict[str, Any] | None = None,
        datagram: bool = False,
        **server_attrs: Any,
    ) -> Any:
        """A bound server of this door on 127.0.0.1:0 recording its handle_error() calls."""
        base = self.datagram_server if datagram else self.stream_server
        handler = handler or (self.datagram_handler if datagram else self.handler)
        if handler_attrs:
            handler = type(handler.__name__, (handler,), handler_attrs)
        ssl_context = server_attrs.pop("ssl_context", None)
        cls = type(f"Recording{base.__name__}", (Recording, base), server_attrs)
        kwargs = {"ssl_context": ssl_context} if ssl_context is not None else {}
        errors = ErrorLog()
        cls.errors = errors
        if self.workers:
            cls.pass_fds = (errors.sender_fd,)
        try:
            return cls(("127.0.0.1", 0), handler, **kwargs)
        except BaseException:
            errors.close()
            raise


def _optional_door(module: str, make: Callable[[Any], Door], name: str) -> Any:
    """A door from a module other engineers are writing, or a skip that names it."""
    try:
        door = make(importlib.import_module(module))
    except (ImportError, AttributeError) as exc:
        reason = f"{module} is missing or incomplete ({exc}); this front door is not attacked"
        return pytest.param(None, id=name, marks=pytest.mark.skip(reason=reason))
    return pytest.param(door, id=name)


NATIVE_ASYNC = Door("native-async", ts.TCPServer, ts.UDPServer, AsyncLines, AsyncDatagramLength)
NATIVE_THREADS = Door(
    "native-threads",
    ts.ThreadingTCPServer,
    ts.ThreadingUDPServer,
    SyncLines,
    SyncDatagramLength,
    threads=True,
)
COMPAT_THREADS = _optional_door(
    "trio_socketserver.compat",
    lambda compat: Door(
        "compat-threads",
        compat.ThreadingTCPServer,
        compat.ThreadingUDPServer,
        SyncLines,
        SyncDatagramLength,
        threads=True,
    ),
    "compat-threads",
)
FORKING = _optional_door(
    "trio_socketserver._forking",
    lambda forking: Door(
        "forking",
        forking.ForkingTCPServer,
        forking.ForkingUDPServer,
        SyncLines,
        SyncDatagramLength,
        workers=True,
    ),
    "forking",
)
COMPAT_FORKING = _optional_door(
    "trio_socketserver.compat._forking",
    lambda forking: Door(
        "compat-forking",
        forking.ForkingTCPServer,
        forking.ForkingUDPServer,
        SyncLines,
        SyncDatagramLength,
        workers=True,
    ),
    "compat-forking",
)

ALL_DOORS = [
    pytest.param(NATIVE_ASYNC, id="native-async"),
    pytest.param(NATIVE_THREADS, id="native-threads"),
    COMPAT_THREADS,
    FORKING,
    COMPAT_FORKING,
]
THREAD_DOORS = [pytest.param(NATIVE_THREADS, id="native-threads"), COMPAT_THREADS]
WORKER_DOORS = [FORKING, COMPAT_FORKING]
# TLS is a native-engine option (ssl_context=); the stdlib has no TLS server to mirror.
TLS_DOORS = [
    pytest.param(NATIVE_ASYNC, id="native-async"),
    pytest.param(NATIVE_THREADS, id="native-threads"),
    FORKING,
]


# ---------------------------------------------------------------------------------------------
# Running servers, clients, leak checks


def bounded(fn: Callable[[], object], seconds: float, what: str) -> float:
    """Call ``fn`` on a helper thread; fail if it has not returned after ``seconds``.

    Returns how long it took. A call that hangs fails the test instead of hanging it (its
    thread then shows up in the leak check, which is the point).
    """
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fn()
        except BaseException as exc:  # handed over to the test thread
            errors.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=call, name=f"bounded {what}")
    thread.start()
    thread.join(seconds)
    elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"{what} did not return within {seconds} s"
    if errors:
        raise errors[0]
    return elapsed


@contextlib.contextmanager
def background(server: Any) -> Iterator[Any]:
    """Run ``server.serve_forever()`` on a background thread for the ``with`` block.

    A native server gets its own ``trio.run`` and is reported started once it accepts; a
    compat server's blocking ``serve_forever`` is called directly. On exit: ``shutdown()``
    and ``server_close()`` (each bounded), the thread joined, and anything serve_forever
    raised is re-raised here.
    """
    failures: list[BaseException] = []
    started = threading.Event()

    def run() -> None:
        try:
            if inspect.iscoroutinefunction(server.serve_forever):

                async def main() -> None:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(server.serve_forever)
                        started.set()

                trio.run(main)
            else:
                started.set()  # blocking door: the listening socket already queues clients
                server.serve_forever()
        except BaseException as exc:  # re-raised on the test thread
            failures.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="test server")
    thread.start()
    try:
        assert started.wait(CLIENT_TIMEOUT), "serve_forever() did not start"
        yield server
    finally:
        bounded(server.shutdown, CLIENT_TIMEOUT + (server.shutdown_grace or 0), "shutdown()")
        bounded(server.server_close, CLIENT_TIMEOUT, "server_close()")
        server.errors.close()
        thread.join(CLIENT_TIMEOUT)
        assert not thread.is_alive(), "serve_forever() did not return after shutdown()"
    if failures:
        raise failures[0]


def connect(address: Any, *, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(CLIENT_TIMEOUT)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_line(sock: socket.socket) -> bytes:
    """Read up to and including b"\\n" (or EOF) one byte at a time: nothing is over-read."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def wait_closed(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (EOF or reset); return what came."""
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data)


def assert_served(address: Any, payload: bytes = b"ping\n") -> None:
    """A well-behaved client gets its echo: whatever the attack, others are served."""
    with connect(address) as sock:
        sock.sendall(payload)
        assert recv_line(sock) == payload


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# Starts every record in the server log file, so records (with their tracebacks) split apart.
RECORD = "\x1e"


@attrs.frozen
class ServerLog:
    """What the "trio_socketserver" logger wrote, from this process and its workers."""

    path: Path

    def records(self, min_level: int = logging.NOTSET) -> list[str]:
        """Each record as "LEVEL message" plus its traceback, if any."""
        found = []
        for record in self.path.read_text().split(RECORD)[1:]:
            level = logging.getLevelName(record.split(" ", 1)[0])
            if isinstance(level, int) and level >= min_level:
                found.append(record)
        return found

    def assert_no_tracebacks(self) -> None:
        """Peer misbehaviour is logged as one line, never as a bug (ERROR with traceback)."""
        bugs = self.records(logging.ERROR)
        assert not bugs, bugs


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[ServerLog]:
    """The "trio_socketserver" logger from INFO on, to a file: worker processes inherit the
    handler (the server is created after this fixture), so their records land there too;
    caplog sees this process only. Read it once the server is closed: then every process
    that could write has finished."""
    log = ServerLog(tmp_path / "server.log")
    handler = logging.FileHandler(log.path)
    handler.setFormatter(logging.Formatter(RECORD + "%(levelname)s %(message)s"))
    logger = logging.getLogger("trio_socketserver")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield log
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


# ---------------------------------------------------------------------------------------------
# Bad peers


@pytest.mark.parametrize("door", ALL_DOORS)
def test_reset_mid_request_costs_one_connection(door: Door, server_log: ServerLog) -> None:
    """Half a request, then RST: that handler ends with a peer error logged on one line.

    Also a burst of clients that reset right after connecting, before or while being accepted
    (accept() may then fail with ECONNABORTED): the accept loop skips them.
    """
    with background(door.server()) as server:
        sock = connect(server.server_address)
        sock.sendall(b"half a requ")
        assert_served(server.server_address)  # while the half request is pending
        reset(sock)
        _, error = server.errors.get()
        assert isinstance(error, ConnectionError | trio.BrokenResourceError), error
        for _ in range(20):
            reset(connect(server.server_address))
        assert_served(server.server_address)
    server_log.assert_no_tracebacks()


@pytest.mark.parametrize("door", ALL_DOORS)
def test_slowloris_is_dropped_after_the_handler_timeout(door: Door, server_log: ServerLog) -> None:
    """Half a line, then silence: the connection is closed PEER_TIMEOUT after the last byte."""
    server = door.server(handler_attrs={"timeout": PEER_TIMEOUT})
    with background(server), connect(server.server_address) as sock:
        sock.sendall(b"GET / HTTP/1.1 (and never the rest of the line")
        start = time.monotonic()
        assert_served(server.server_address)  # meanwhile
        assert wait_closed(sock) == b""
        held = time.monotonic() - start
        assert PEER_TIMEOUT * 0.9 <= held < PEER_TIMEOUT + SLACK
        _, error = server.errors.get()
        assert isinstance(error, TimeoutError), error
    server_log.assert_no_tracebacks()


@pytest.mark.parametrize("door", ALL_DOORS)
def test_silent_client_is_dropped_after_the_handler_timeout(
    door: Door, server_log: ServerLog
) -> None:
    """Connect and send nothing: closed after PEER_TIMEOUT; others are served meanwhile."""
    server = door.server(handler_attrs={"timeout": PEER_TIMEOUT})
    with background(server), connect(server.server_address) as sock:
        start = time.monotonic()
        assert_served(server.server_address)
        assert wait_closed(sock) == b""
        assert PEER_TIMEOUT * 0.9 <= time.monotonic() - start < PEER_TIMEOUT + SLACK
    server_log.assert_no_tracebacks()


@pytest.mark.parametrize("door", ALL_DOORS)
def test_slots_held_by_silent_clients_free_up_after_the_timeout(door: Door) -> None:
    """With the server full of silent clients, a good client waits in the backlog and is
    served once the handler timeout frees a slot: the limit, not memory, bounds them."""
    limit = "max_threads" if door.threads else "max_children" if door.workers else "max_connections"
    server = door.server(handler_attrs={"timeout": PEER_TIMEOUT}, **{limit: 2})
    with background(server):
        silent = [connect(server.server_address) for _ in range(2)]
        start = time.monotonic()
        assert_served(server.server_address)
        waited = time.monotonic() - start
        for sock in silent:
            assert wait_closed(sock) == b""
            sock.close()
    assert PEER_TIMEOUT * 0.9 <= waited < PEER_TIMEOUT + SLACK


@pytest.mark.parametrize("door", ALL_DOORS)
def test_client_that_never_reads_is_cut_by_the_write_timeout(
    door: Door, server_log: ServerLog
) -> None:
    """Ask for 64 MiB and never read: once the socket buffers are full the handler's write
    blocks, and the handler timeout (a bound on every single wait for the peer) ends it."""
    requested = 64 * 1024 * 1024
    server = door.server(handler_attrs={"timeout": PEER_TIMEOUT})
    with background(server), connect(server.server_address, rcvbuf=64 * 1024) as sock:
        sock.sendall(b"flood %d\n" % requested)
        assert_served(server.server_address)  # while the flood is stuck
        _, error = server.errors.get()
        assert isinstance(error, TimeoutError), error
        got = len(wait_closed(sock))
        assert 0 < got < requested
    server_log.assert_no_tracebacks()


@pytest.mark.parametrize("door", ALL_DOORS)
def test_binary_garbage_is_just_bytes(door: Door) -> None:
    """1 MiB of random bytes (NULs, invalid UTF-8, lines up to LINE_LIMIT and beyond it
    split by the limit) comes back byte for byte."""
    payload = os.urandom(1024 * 1024)
    with background(door.server()) as server, connect(server.server_address) as sock:
        sender = threading.Thread(target=send_and_end, args=(sock, payload))
        sender.start()
        echoed = bytearray()
        while len(echoed) < len(payload) and (chunk := sock.recv(65536)):
            echoed += chunk
        sender.join(CLIENT_TIMEOUT)
        assert not sender.is_alive()
        assert echoed == payload


@pytest.mark.parametrize("door", [p for p in ALL_DOORS if p not in WORKER_DOORS])
def test_endless_line_holds_bounded_memory(door: Door) -> None:
    """A 10 MiB line without newline against readline(limit=64 KiB): the handler refuses it
    after LINE_LIMIT bytes, and the server's Python allocations peak far below the line.

    (Worker processes are measured by test_exhaustion's RSS tests; tracemalloc sees only this
    process.)
    """
    line = os.urandom(10 * 1024 * 1024).replace(b"\n", b"x")
    server = door.server()
    with background(server), connect(server.server_address) as sock:
        tracemalloc.start()
        try:
            sender = threading.Thread(target=_send_ignoring_reset, args=(sock, line))
            sender.start()
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                reply = recv_line(sock)
            sender.join(CLIENT_TIMEOUT)
            assert not sender.is_alive()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The reply can be lost to the RST the server sends when it closes with our unread
        # bytes queued; EOF or RST then, but never an echo of the line.
        assert reply in (b"ERR line too long\n", b"")
        # LINE_LIMIT + one receive buffer + temporaries; without the limit it is >= 10 MiB.
        print(f"\n{door.name}: 10 MiB line, readline(64 KiB): peak {peak / 1024:.0f} KiB traced")
        assert peak < 1024 * 1024, f"peak {peak} bytes of Python memory for one line"
        assert_served(server.server_address)


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(data)


def send_and_end(sock: socket.socket, data: bytes) -> None:
    """Send ``data``, then half-close: the handler sees EOF after the last (partial) line."""
    sock.sendall(data)
    # A server that closes at once (a failing handler) may have reset the connection
    # already: then there is nothing left to half-close.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("door", ALL_DOORS)
def test_datagram_larger_than_max_packet_size_is_truncated(door: Door) -> None:
    """A 60,000-byte datagram reaches the handler as max_packet_size bytes (as the stdlib);
    a client that vanishes before its reply (ICMP port unreachable) costs nothing."""
    server = door.server(datagram=True, max_packet_size=1024)
    with background(server):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.sendto(b"never read the reply", server.server_address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(CLIENT_TIMEOUT)
            client.sendto(b"x" * 60_000, server.server_address)
            assert client.recv(65536) == b"1024"
            client.sendto(b"hello", server.server_address)
            assert client.recv(65536) == b"5"


@attrs.frozen
class TLS:
    server: ssl.SSLContext
    client: ssl.SSLContext

    def client_hello(self) -> bytes:
        """The first flight of a real TLS client, for attackers that stop half-way."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        return outgoing.read()


@pytest.fixture(scope="module")
def tls() -> TLS:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TLS(server, client)


def assert_tls_served(address: Any, tls: TLS) -> None:
    with tls.client.wrap_socket(connect(address), server_hostname="127.0.0.1") as sock:
        sock.sendall(b"ping\n")
        assert recv_line(sock) == b"ping\n"


@pytest.mark.parametrize("door", TLS_DOORS)
def test_tls_bad_clients_cost_their_own_connection(
    door: Door, tls: TLS, server_log: ServerLog
) -> None:
    """Plaintext to a TLS port, a handshake aborted with RST, a handshake that stalls half-way
    (bounded by the handler timeout): each ends its own connection, logged on one line."""
    server = door.server(ssl_context=tls.server, handler_attrs={"timeout": PEER_TIMEOUT})
    hello = tls.client_hello()
    with background(server):
        address = server.server_address
        with connect(address) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert b"GET" not in wait_closed(plain)  # an alert at most, never an answer
        aborted = connect(address)
        aborted.sendall(hello[: len(hello) // 2])
        assert_tls_served(address, tls)
        reset(aborted)
        with connect(address) as stalled:
            stalled.sendall(hello[: len(hello) // 2])
            start = time.monotonic()
            assert_tls_served(address, tls)  # meanwhile
            wait_closed(stalled)
            assert time.monotonic() - start < PEER_TIMEOUT + SLACK
        assert_tls_served(address, tls)
    server_log.assert_no_tracebacks()


@pytest.mark.parametrize("door", THREAD_DOORS)
def test_handler_threads_of_a_burst_do_not_outstay_it(door: Door) -> None:
    """50 clients at once take 50 handler threads; once they are gone, none of those threads
    runs handler code any more, while the server keeps serving. The idle threads are trio's
    worker cache (process-wide, reused by the next requests, gone after 10 s idle), so a
    burst of hostile clients leaves no thread of the server's behind."""
    server = door.server()
    with background(server):
        burst = [connect(server.server_address) for _ in range(50)]
        try:
            for sock in burst:
                sock.sendall(b"ping\n")
            for sock in burst:  # 50 handlers at once, each on a thread
                assert recv_line(sock) == b"ping\n"
            # trio's cache reuses threads across runs: count those running handlers now.
            pool = [t for t in threading.enumerate() if t.name.startswith(HANDLER_THREAD_PREFIX)]
            assert len(pool) >= 50
        finally:
            for sock in burst:
                sock.close()
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while [
            t for t in pool if t.name.startswith(HANDLER_THREAD_PREFIX)
        ] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [t.name for t in pool if t.name.startswith(HANDLER_THREAD_PREFIX)], (
            "handlers still running"
        )
        assert_served(server.server_address)


# ---------------------------------------------------------------------------------------------
# Faults in our own code paths


class Boom(Exception):
    """The bug a test plants in a hook."""


def faulty_handler(door: Door, where: str, armed: Path) -> type:
    """The door's handler with a bug in ``where`` (setup, handle or finish), which strikes
    while the file ``armed`` exists; otherwise it is the door's handler.

    A file, because worker processes are clones made when the server was created: only
    something outside the process can switch the bug off for the next client. The handler
    buffers its writes (wbufsize), so the client seeing ``partial`` proves that finish() ran
    and flushed after handle() raised.
    """
    base: type = door.handler
    methods: dict[str, Any] = {"wbufsize": property(lambda self: 65536 if armed.exists() else 0)}
    if where == "setup":

        def setup(self: Any) -> Any:
            if armed.exists():
                raise Boom("setup")
            return base.setup(self)

        methods["setup"] = setup
    elif where == "handle" and door.handler is AsyncLines:

        async def handle_async(self: Any) -> None:
            # One stat() of a local file: not worth a thread (ASYNC240).
            if not armed.exists():  # noqa: ASYNC240
                return await base.handle(self)  # type: ignore[no-any-return]
            await self.wfile.write(b"partial\n")
            raise Boom("handle")

        methods["handle"] = handle_async
    elif where == "handle":

        def handle(self: Any) -> None:
            if not armed.exists():
                return base.handle(self)  # type: ignore[no-any-return]
            self.wfile.write(b"partial\n")
            raise Boom("handle")

        methods["handle"] = handle
    elif door.handler is AsyncLines:

        async def finish_async(self: Any) -> None:
            await base.finish(self)
            if armed.exists():  # noqa: ASYNC240
                raise Boom("finish")

        methods["finish"] = finish_async
    else:

        def finish(self: Any) -> None:
            base.finish(self)
            if armed.exists():
                raise Boom("finish")

        methods["finish"] = finish
    return type(f"Faulty{where}", (base,), methods)


@pytest.mark.parametrize("where", ["setup", "handle", "finish"])
@pytest.mark.parametrize("door", ALL_DOORS)
def test_handler_that_raises_is_reported_and_the_server_keeps_serving(
    door: Door, where: str, server_log: ServerLog, tmp_path: Path
) -> None:
    """handle_error() gets the exception once, with a traceback in the log (it is a bug);
    finish() still runs when handle() raised; the connection is closed; others are served."""
    armed = tmp_path / "armed"
    armed.touch()
    server = door.server(handler=faulty_handler(door, where, armed))
    with background(server):
        with connect(server.server_address) as sock:
            send_and_end(sock, b"ping\n")
            received = wait_closed(sock)
        _, error = server.errors.get()
        assert isinstance(error, Boom) and error.args == (where,)
        expected = {"setup": b"", "handle": b"partial\n", "finish": b"ping\n"}[where]
        assert received == expected
        armed.unlink()
        assert_served(server.server_address)
        assert server.errors.empty()
    logged = [r for r in server_log.records() if f"Boom: {where}" in r]
    assert len(logged) == 1 and logged[0].startswith("ERROR ")


@pytest.mark.parametrize("door", ALL_DOORS)
def test_handle_error_that_raises_is_logged_and_serving_goes_on(
    door: Door, server_log: ServerLog, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The native engine (and a worker process) logs it with its traceback; a threading
    server hands it to threading.excepthook, as the stdlib's request thread does. Either way
    only that request ends."""
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))

    def handle_error(self: Any, request: Any, client_address: Any) -> None:
        raise Broken("in handle_error")

    armed = tmp_path / "armed"
    armed.touch()
    handler = faulty_handler(door, "handle", armed)
    server = door.server(handler=handler, handle_error=handle_error)
    with background(server):
        with connect(server.server_address) as sock:
            sock.sendall(b"ping\n")
            assert wait_closed(sock) == b"partial\n"
        armed.unlink()
        assert_served(server.server_address)
    logged = [
        r
        for r in server_log.records(logging.ERROR)
        if "handle_error() raised" in r and "Broken" in r
    ]
    if door.threads:
        assert len(escaped) == 1 and isinstance(escaped[0], Broken) and not logged
    else:
        assert len(logged) == 1 and not escaped


class Broken(Exception):
    """The bug a test plants in handle_error()."""


@pytest.mark.parametrize("door", ALL_DOORS)
def test_verify_request_that_raises_refuses_that_request_only(door: Door) -> None:
    calls = 0

    def verify_request(self: Any, request: Any, client_address: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Boom("verify_request")
        return True

    server = door.server(verify_request=verify_request)
    with background(server):
        with connect(server.server_address) as sock:
            sock.sendall(b"ping\n")
            assert wait_closed(sock) == b""
        _, error = server.errors.get()
        assert isinstance(error, Boom)
        assert_served(server.server_address)


@pytest.mark.parametrize("daemon_threads", [False, True])
@pytest.mark.parametrize("door", THREAD_DOORS)
def test_thread_that_never_returns_does_not_hold_shutdown(
    door: Door, daemon_threads: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync handler that ignores its socket and loops until a flag is set.

    shutdown() waits shutdown_grace, shuts the connection down (no effect on this thread),
    waits THREAD_RELEASE_TIMEOUT more unless daemon_threads, then abandons the thread with a
    warning and returns. server_close() then joins it for at most shutdown_grace
    (block_on_close) unless daemon_threads. The test sets the flag and joins the thread.
    """
    caplog.set_level(logging.DEBUG, logger="trio_socketserver")
    grace = 0.2
    stop = threading.Event()
    entered = threading.Event()

    class Stuck(SyncLines):
        def handle(self) -> None:
            entered.set()
            while not stop.is_set():
                time.sleep(0.01)

    threads_before = set(threading.enumerate())
    server = door.server(handler=Stuck, shutdown_grace=grace, daemon_threads=daemon_threads)
    try:
        with background(server), connect(server.server_address):
            assert entered.wait(CLIENT_TIMEOUT)
            took = bounded(server.shutdown, grace + THREAD_RELEASE_TIMEOUT + SLACK, "shutdown")
            closing = bounded(server.server_close, grace + SLACK, "server_close")
    finally:
        stop.set()
        for thread in set(threading.enumerate()) - threads_before:
            thread.join(CLIENT_TIMEOUT)
    expected = grace if daemon_threads else grace + THREAD_RELEASE_TIMEOUT
    assert expected <= took < expected + SLACK
    assert closing < (SLACK if daemon_threads else grace + SLACK)
    # A daemon thread is not waited for by choice: that is logged at DEBUG, not warned about.
    said = "not waiting for the daemon" if daemon_threads else "abandoning"
    assert any(said in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("door", "blocked_in"),
    [
        *[
            pytest.param(*door.values, "readline", id=f"{door.id}-readline")
            for door in THREAD_DOORS
        ],
        # ssl_context= is the native engine's; compat has the stdlib's constructor.
        pytest.param(NATIVE_THREADS, "tls-handshake", id="native-threads-tls-handshake"),
    ],
)
def test_thread_blocked_on_its_socket_is_released_after_the_grace(
    door: Door, blocked_in: str, tls: TLS, server_log: ServerLog
) -> None:
    """A handler thread blocked on a silent client, with no timeout: in the handler's
    readline(), or still in the TLS handshake (before the handler exists). After the grace
    the connection is shut down, the blocked call returns, and shutdown() returns at once."""
    grace = 0.2
    accepted = threading.Event()

    def verify_request(self: Any, request: Any, client_address: Any) -> bool:
        accepted.set()
        return True

    extra = {"ssl_context": tls.server} if blocked_in == "tls-handshake" else {}
    server = door.server(
        handler_attrs={"timeout": None},
        shutdown_grace=grace,
        verify_request=verify_request,
        **extra,
    )
    with background(server), connect(server.server_address) as sock:
        assert accepted.wait(CLIENT_TIMEOUT)
        if blocked_in == "readline":
            sock.sendall(b"hello\n")
            assert recv_line(sock) == b"hello\n"
            # Mid-line, its readline() waits for us now (between two lines, the drain would
            # have ended it at once).
            sock.sendall(b"half a li")
        took = bounded(server.shutdown, grace + SLACK, "shutdown")
        wait_closed(sock)
    assert grace <= took < grace + SLACK
    server_log.assert_no_tracebacks()


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def assert_ours(pid: int) -> None:
    """``pid`` descends from this process (a worker of a pool this test started): the only
    kind of process a test may kill."""
    ancestor = pid
    while ancestor > 1:
        ancestor = parent_pid(ancestor)
        if ancestor == os.getpid():
            return
    pytest.fail(f"process {pid} is not a descendant of the test process")


@pytest.mark.parametrize("door", WORKER_DOORS)
def test_worker_killed_mid_request_costs_that_request_only(
    door: Door, server_log: ServerLog
) -> None:
    """SIGKILL to the worker serving one client: that client's connection is closed, the
    death is logged, the client served by another worker carries on, later clients are
    served, and nothing is left behind (conftest's leak check: no child process)."""
    server = door.server()
    with background(server):
        with connect(server.server_address) as victim, connect(server.server_address) as other:
            victim.sendall(b"pid\n")
            pid = int(recv_line(victim))
            other.sendall(b"pid\n")
            assert int(recv_line(other)) != pid  # two requests at once: two workers
            assert_ours(pid)
            os.kill(pid, signal.SIGKILL)
            assert wait_closed(victim) == b""
            other.sendall(b"still here\n")
            assert recv_line(other) == b"still here\n"
        assert_served(server.server_address)
    deaths = [r for r in server_log.records() if f"{pid} was killed by SIGKILL" in r]
    assert len(deaths) == 1, server_log.records()


@pytest.mark.parametrize("ignores_sigterm", [False, True])
@pytest.mark.parametrize("door", WORKER_DOORS)
def test_worker_that_never_returns_is_stopped_after_the_grace(
    door: Door, ignores_sigterm: bool, tmp_path: Path
) -> None:
    """A handler in a worker that ignores its socket (a sleep loop until a file goes away),
    and may ignore SIGTERM too. shutdown() waits shutdown_grace, cuts the connection (no
    effect), waits WORKER_RELEASE_TIMEOUT, sends SIGTERM, and SIGKILL WORKER_KILL_TIMEOUT
    later: it returns within that sum, and server_close() leaves no process behind."""
    from trio_socketserver._forking import WORKER_KILL_TIMEOUT, WORKER_RELEASE_TIMEOUT

    grace = 0.2
    running = tmp_path / "running"
    running.touch()

    class Stuck(SyncLines):
        def handle(self) -> None:
            if ignores_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.wfile.write(b"stuck\n")
            while running.exists():
                time.sleep(0.01)

    server = door.server(handler=Stuck, shutdown_grace=grace)
    try:
        with background(server), connect(server.server_address) as sock:
            assert recv_line(sock) == b"stuck\n"
            bound = grace + WORKER_RELEASE_TIMEOUT + WORKER_KILL_TIMEOUT + SLACK
            took = bounded(server.shutdown, bound, "shutdown")
    finally:
        running.unlink()
    expected = grace + WORKER_RELEASE_TIMEOUT + (WORKER_KILL_TIMEOUT if ignores_sigterm else 0)
    assert expected <= took < expected + SLACK


# ---------------------------------------------------------------------------------------------
# Shutdown under load


@attrs.define
class LoadRecord:
    """What the hammering clients saw (request id -> when), updated under ``lock``."""

    lock: threading.Lock = attrs.Factory(threading.Lock)
    greeted: dict[bytes, float] = attrs.Factory(dict)
    answered: dict[bytes, float] = attrs.Factory(dict)
    lost: dict[bytes, object] = attrs.Factory(dict)
    enough: threading.Event = attrs.Factory(threading.Event)


def hammer(address: Any, client: int, record: LoadRecord, enough: int) -> None:
    """One request per connection, in a loop, until the server is gone.

    A connection counts as accepted once its handler has greeted it (``accepted ID``, the
    handler's first act); from then on the request must be answered (``done ID``), or it is
    lost. A connection the server never accepted sees EOF or a reset before any greeting,
    and a refused connect means the server is closed: the client stops.
    """
    for n in range(10**6):
        ident = b"%d-%d" % (client, n)
        try:
            sock = connect(address)
        except OSError:
            return
        with sock:
            try:
                sock.sendall(b"req " + ident + b"\n")
                greeting = recv_line(sock)
            except OSError:
                return
            if not greeting:
                return
            now = time.monotonic()
            with record.lock:
                record.greeted[ident] = now
            try:
                answer = recv_line(sock)
            except OSError as exc:
                answer = repr(exc).encode()
            with record.lock:
                if greeting != b"accepted " + ident + b"\n" or answer != b"done " + ident + b"\n":
                    record.lost[ident] = (greeting, answer)
                else:
                    record.answered[ident] = time.monotonic()
                if len(record.answered) >= enough:
                    record.enough.set()


@pytest.mark.parametrize("door", ALL_DOORS)
def test_shutdown_under_load_loses_no_accepted_request(door: Door) -> None:
    """50 clients hammer the server; shutdown() is called mid-flight.

    "Accepted before the call": the server accept()ed the connection before the stop took
    effect in its serve loop (from another thread, shutdown() hands the stop to the trio
    thread; an accept that runs before it there is before the call). Such a connection's
    handler greets the client first thing and must answer within shutdown_grace: 0 lost. The
    server's own count of accepted connections, taken when shutdown() returned, must equal the
    greeted ones at the end: none accepted and dropped unanswered, none greeted after
    shutdown() returned. A client that connects after it (into the backlog, the socket is
    still open until server_close()) is never greeted: it sees the connection reset.
    """
    clients, grace = 50, 3.0
    record = LoadRecord()
    server = door.server(shutdown_grace=grace)
    threads = [
        threading.Thread(target=hammer, args=(server.server_address, n, record, 200))
        for n in range(clients)
    ]
    with background(server):
        for thread in threads:
            thread.start()
        assert record.enough.wait(10 * CLIENT_TIMEOUT), "the clients were not served"
        called = time.monotonic()
        took = bounded(server.shutdown, grace + SLACK, "shutdown under load")
        stats = server.statistics()
        with connect(server.server_address) as late:
            late.sendall(b"req late\n")
            bounded(server.server_close, CLIENT_TIMEOUT, "server_close")
            assert wait_closed(late) == b""
        for thread in threads:
            thread.join(CLIENT_TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)
    in_flight = sum(
        1 for ident, at in record.answered.items() if record.greeted[ident] < called < at
    )
    print(
        f"\n{door.name}: {len(record.answered)} requests answered, {len(record.lost)} lost, "
        f"{in_flight} in flight at shutdown(), shutdown() took {took:.3f} s"
    )
    assert record.lost == {}
    assert record.answered.keys() == record.greeted.keys()
    assert in_flight > 0, "nothing was in flight at shutdown(): the test proved nothing"
    assert max(record.answered.values()) < called + grace
    assert took < grace
    assert stats.accepted_requests == len(record.greeted)
    assert stats.cancelled_requests == 0 and stats.active_requests == 0


# ---------------------------------------------------------------------------------------------
# Security defaults


class UnixEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_unix_socket_mode_is_applied_before_anyone_can_connect(tmp_path: Path, mode: int) -> None:
    """socket_mode is set in server_bind(), before listen(): no window with other modes in
    which a client could connect."""
    path = str(tmp_path / "s")
    server_class = type("Server", (ts.UnixStreamServer,), {"socket_mode": mode})
    server = server_class(path, UnixEcho, bind_and_activate=False)
    try:
        server.server_bind()
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        server.server_activate()
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    finally:
        server.server_close()
    assert not os.path.exists(path)


def test_unix_socket_default_mode_is_the_umask_as_in_the_stdlib(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        ours = ts.UnixStreamServer(str(tmp_path / "ours"), UnixEcho)
        ours.server_close()  # the mode was set at bind time; the file goes with the server
        with socketserver.UnixStreamServer(str(tmp_path / "theirs"), UnixEcho):
            theirs_mode = stat.S_IMODE(os.stat(tmp_path / "theirs").st_mode)
        ours = ts.UnixStreamServer(str(tmp_path / "ours"), UnixEcho)
        try:
            ours_mode = stat.S_IMODE(os.stat(tmp_path / "ours").st_mode)
        finally:
            ours.server_close()
    finally:
        os.umask(old)
    os.unlink(tmp_path / "theirs")  # the stdlib leaves its socket file behind
    assert ours_mode == theirs_mode == 0o700


@pytest.mark.parametrize("server_class", [ts.UnixStreamServer, ts.UnixDatagramServer])
@pytest.mark.parametrize("target_kind", ["file", "dangling", "socket"])
def test_unix_server_never_follows_a_symlink(
    tmp_path: Path, server_class: type, target_kind: str
) -> None:
    """A symlink at the socket path is refused whatever it points at; nothing is touched."""
    target = tmp_path / "target"
    link = tmp_path / "link"
    other = None
    if target_kind == "file":
        target.write_bytes(b"precious")
        os.chmod(target, 0o640)
    elif target_kind == "socket":
        other = ts.UnixStreamServer(str(target), UnixEcho)
    link.symlink_to(target)
    before = os.lstat(target) if target_kind != "dangling" else None
    try:
        with pytest.raises(FileExistsError, match="not a socket"):
            server_class(str(link), UnixEcho)
        assert os.readlink(link) == str(target)
        if before is None:
            assert not os.path.lexists(target)
        else:
            after = os.lstat(target)
            assert (after.st_ino, after.st_mode, after.st_mtime_ns, after.st_size) == (
                before.st_ino,
                before.st_mode,
                before.st_mtime_ns,
                before.st_size,
            )
        if target_kind == "file":
            assert target.read_bytes() == b"precious"
    finally:
        if other is not None:
            other.server_close()


def test_unix_server_close_removes_only_its_own_socket(tmp_path: Path) -> None:
    """If the socket file was replaced while serving, server_close() leaves the new file."""
    path = tmp_path / "s"
    server = ts.UnixStreamServer(str(path), UnixEcho)
    path.unlink()
    path.write_bytes(b"someone else's")
    server.server_close()
    assert path.read_bytes() == b"someone else's"


def _bind_outcome(make: Callable[[int], Any], port: int) -> str:
    try:
        server = make(port)
    except OSError as exc:
        return os.strerror(exc.errno or 0)
    server.server_close()
    return "bound"


def _time_wait_port() -> int:
    """A loopback port whose server side is in TIME_WAIT (the server closed first)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as client:
            conn, _ = listener.accept()
            conn.close()
            assert client.recv(1) == b""
    return port


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("state", ["listening", "time-wait"])
def test_allow_reuse_address_matches_the_stdlib(state: str, reuse: bool) -> None:
    """Same default (False), same outcome binding a port in use: EADDRINUSE while another
    socket listens (reuse or not), and with a TIME_WAIT connection on the port only when
    allow_reuse_address is False."""
    assert ts.TCPServer.allow_reuse_address is socketserver.TCPServer.allow_reuse_address
    # allow_reuse_port came to the stdlib in 3.11; before that it is as if False.
    assert ts.TCPServer.allow_reuse_port is getattr(
        socketserver.TCPServer, "allow_reuse_port", False
    )

    def make(base: type) -> Callable[[int], Any]:
        cls = type("Server", (base,), {"allow_reuse_address": reuse})
        return lambda port: cls(("127.0.0.1", port), UnixEcho)

    with contextlib.ExitStack() as stack:
        if state == "listening":
            holder = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            port = holder.getsockname()[1]
        else:
            port = _time_wait_port()
        theirs = _bind_outcome(make(socketserver.TCPServer), port)
        ours = _bind_outcome(make(ts.TCPServer), port)
    assert ours == theirs
    assert theirs == ("bound" if reuse and state == "time-wait" else os.strerror(errno.EADDRINUSE))


# ---------------------------------------------------------------------------------------------
# The command line (python -m trio_socketserver), in a child process

# The command line imports the test protocol's handlers from this module, run from here.
TESTS = Path(__file__).resolve().parent
CLI_DOORS = {
    "async": ["--handler", "test_reliability:AsyncLines"],
    "threads": ["--handler", "test_reliability:SyncLines", "--threading"],
}
STOP_REPORT = (
    r"stopped serving on .* in [\d.]+ s: "
    r"requests finished: (\d+), failed: (\d+), cut short: (\d+), refused: (\d+)"
)


@pytest.mark.parametrize("door", sorted(CLI_DOORS))
def test_sigterm_under_load_through_the_cli_loses_no_accepted_request(door: str) -> None:
    """As test_shutdown_under_load_loses_no_accepted_request, with SIGTERM to the program:
    every greeted request is answered, the program's stop report counts exactly the greeted
    ones as finished and none cut short (so none was accepted and dropped, or accepted after
    the signal took effect), and it exits 0 within the grace."""
    clients, grace = 50, 3.0
    record = LoadRecord()
    args = ["--bind", "127.0.0.1:0", "--shutdown-grace", str(grace), *CLI_DOORS[door]]
    with cli(*args, cwd=TESTS) as proc:
        address = proc.address()
        threads = [
            threading.Thread(target=hammer, args=(address, n, record, 200)) for n in range(clients)
        ]
        for thread in threads:
            thread.start()
        try:
            assert record.enough.wait(10 * CLIENT_TIMEOUT), "the clients were not served"
            called = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            status = proc.wait()
            took = time.monotonic() - called
        finally:
            for thread in threads:
                thread.join(CLIENT_TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)
    assert status == 0, proc.stderr
    report = proc.wait_for_line(STOP_REPORT, stream="stderr").groups()
    finished, failed, cut, refused = map(int, report)
    print(
        f"\ncli {door}: {len(record.answered)} answered, {len(record.lost)} lost, "
        f"SIGTERM to exit {took:.3f} s"
    )
    assert record.lost == {}
    assert record.answered.keys() == record.greeted.keys()
    assert (finished, failed, cut, refused) == (len(record.greeted), 0, 0, 0)
    assert took < grace


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses (kernel hex notation) of TCP sockets listening on ``port``, IPv4 and
    IPv6, from /proc/<pid>/net: what the kernel has, not what the program says."""
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                local, state = line.split()[1:4:2]
                if state == "0A" and int(local.rpartition(":")[2], 16) == port:  # 0A: LISTEN
                    found.add(local)
    return found


def test_cli_binds_to_loopback_unless_told_otherwise() -> None:
    """``--bind PORT`` names no host: the program listens on 127.0.0.1 only. An empty host
    is refused rather than read as "all interfaces"."""
    with cli("--bind", "0") as proc:
        host, port = proc.address()
        listening = listening_addresses(proc.proc.pid, port)
        assert proc.stop(signal.SIGTERM) == 0
    assert host == "127.0.0.1"
    assert listening == {f"0100007F:{port:04X}"}  # 127.0.0.1, little-endian hex
    with cli("--bind", ":0") as proc:
        assert proc.wait() == 2
    assert "give a host" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Soak (bench/soak.py): good and hostile clients at once, watching for anything that grows

SOAK = TESTS.parent / "bench" / "soak.py"
SOAK_DOORS = ["native-async", "native-threads", "forking", "compat-threads", "compat-forking"]


def run_soak(door: str, seconds: float) -> dict[str, Any]:
    """Run bench/soak.py on ``door``; return its JSON report, failing on any problem."""
    command = [sys.executable, str(SOAK), "--door", door, "--seconds", str(seconds)]
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, env=env)
    report: dict[str, Any] = json.loads(done.stdout)
    print(
        f"\nsoak {door} {seconds:.0f} s: sessions {report['sessions']}, failures "
        f"{report['failure_counts']}, RSS MiB {report['rss_mib']}, fds {report['fds']}, "
        f"threads {report['threads']}, stop {report['stop_seconds']:.3f} s"
    )
    assert done.returncode == 0 and report["ok"], report["problems"]
    assert report["sessions"]["good"] > 0 and all(report["sessions"].values())
    return report


@pytest.mark.parametrize("door", ["native-async", "forking"])
def test_soak_short(door: str) -> None:
    """The soak's short form, in the default run: 2 s of every client kind at once."""
    run_soak(door, 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("door", SOAK_DOORS)
def test_soak(door: str) -> None:
    """A minute of good and hostile clients per front door: no good request fails, no
    connection, fd or thread is left once they stop, RSS stays flat over the second half."""
    run_soak(door, 60.0)
