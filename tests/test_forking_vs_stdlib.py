# The stdlib's ForkingMixIn patterns, each run twice in the same test: on the stdlib's
# socketserver (the reference: a fork per request) and on trio_socketserver.compat (a pool of
# reused workers). Servers run as their users run them: serve_forever() or handle_request()
# on a thread, stdlib clients, handlers written against the stdlib's classes. Where the stdlib
# has no equivalent (shutdown_requested, fork_safety), the reference is compat's threading
# server or the stdlib's own per-request fork, as the test says. Native-only behaviour of the
# pool is in test_forking.py.
from __future__ import annotations

import concurrent.futures
import contextlib
import logging.handlers
import os
import queue
import socket
import socketserver as stdlib_socketserver
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import trio_socketserver as ts
from conftest import child_processes, serving_on_thread, wait_for_exit
from trio_socketserver import compat

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)
SRC = Path(__file__).resolve().parent.parent / "src"
# Every blocking wait is bounded: a broken server fails a test, never hangs it.
WAIT = 5.0
SUBPROCESS_TIMEOUT = 60.0


@pytest.fixture(params=["stdlib", "compat"])
def socketserver(request: pytest.FixtureRequest) -> ModuleType:
    """The stdlib's socketserver (the reference), then compat in its place."""
    return stdlib_socketserver if request.param == "stdlib" else compat


class Reply(stdlib_socketserver.StreamRequestHandler):
    """Answers b"<pid> <what the server's ``reply`` attribute says>\\n", once per line."""

    def handle(self) -> None:
        for _ in self.rfile:
            self.wfile.write(b"%d %s\n" % (os.getpid(), self.server.reply.encode()))


class DatagramReply(stdlib_socketserver.DatagramRequestHandler):
    """Answers b"<pid> <reply> <length of the datagram>"."""

    def handle(self) -> None:
        data = self.rfile.read()
        self.wfile.write(b"%d %s %d" % (os.getpid(), self.server.reply.encode(), len(data)))


def ask(server: Any, line: bytes = b"go\n") -> tuple[int, bytes]:
    """One line on a new connection: (the handler's pid, the rest of its answer)."""
    with socket.create_connection(server.server_address, timeout=WAIT) as sock:
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline()
    pid, _, rest = answer.rstrip(b"\n").partition(b" ")
    return int(pid), rest


def ask_datagram(server: Any, data: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT)
        sock.sendto(data, server.server_address)
        pid, _, rest = sock.recv(1024).partition(b" ")
    return int(pid), rest


def request_ended(socketserver: ModuleType, pid: int) -> None:
    """Wait until what the request's process holds is let go: the stdlib's child exits with
    its request; a compat worker stays, and must hold nothing of the program's."""
    if socketserver is stdlib_socketserver:
        assert wait_for_exit({pid}, WAIT) == set()


# -- 1. workers see the server as it is when serving starts --------------------------------


@pytest.mark.parametrize("family", ["tcp", "udp"])
def test_state_set_after_the_constructor_reaches_handlers(
    socketserver: ModuleType, family: str
) -> None:
    """``server.x = ...`` after the constructor is seen by handlers; set between two
    serve_forever() calls, the second one sees the new value."""
    if family == "tcp":
        server, request = socketserver.ForkingTCPServer(LOCALHOST, Reply), ask
    else:
        server = socketserver.ForkingUDPServer(LOCALHOST, DatagramReply)
        request = ask_datagram
    with server:
        for reply in ["set after the constructor", "set between two serve_forever() calls"]:
            server.reply = reply
            thread = threading.Thread(target=server.serve_forever, name="test serving")
            thread.start()
            try:
                pid, answer = request(server, b"go\n")
            finally:
                server.shutdown()
                thread.join(WAIT)
            assert answer.startswith(reply.encode())
            assert pid != os.getpid()


def test_each_handle_request_sees_the_state_of_its_call(socketserver: ModuleType) -> None:
    with socketserver.ForkingTCPServer(LOCALHOST, Reply) as server:
        for reply in ["first", "second"]:
            server.reply = reply
            with concurrent.futures.ThreadPoolExecutor(1) as client:
                answer = client.submit(ask, server)
                server.handle_request()
                assert answer.result(WAIT)[1] == reply.encode()


XMLRPC_SCRIPT = """
    import os, sys, threading, xmlrpc.client
    if sys.argv[1] == "compat":
        from trio_socketserver import compat
        compat.install()
    import socketserver, xmlrpc.server

    class ForkingXMLRPCServer(socketserver.ForkingMixIn, xmlrpc.server.SimpleXMLRPCServer):
        pass

    with ForkingXMLRPCServer(("127.0.0.1", 0), logRequests=False) as server:
        server.register_function(pow)  # after the constructor: the xmlrpc way
        server.register_function(os.getpid, "pid")
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            proxy = xmlrpc.client.ServerProxy("http://%s:%d" % server.server_address)
            print(socketserver.__name__, proxy.pow(2, 10), proxy.pid() != os.getpid())
        finally:
            server.shutdown()
            thread.join()
"""


@pytest.mark.parametrize("flavour", ["stdlib", "compat"])
def test_xmlrpc_functions_registered_after_the_constructor(flavour: str) -> None:
    """The standard XML-RPC pattern with socketserver.ForkingMixIn; compat by install(), in
    a fresh interpreter since install() changes what the whole interpreter imports."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(XMLRPC_SCRIPT), flavour],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    module = "socketserver" if flavour == "stdlib" else "trio_socketserver.compat"
    assert result.stdout == f"{module} 1024 True\n"


def test_max_packet_size_raised_on_the_instance(socketserver: ModuleType) -> None:
    """Raised after the constructor, then again while serving (the same warm worker takes
    the second datagram): every datagram arrives whole."""
    with socketserver.ForkingUDPServer(LOCALHOST, DatagramReply) as server:
        server.reply = "len"
        server.max_packet_size = 32 * 1024
        with serving_on_thread(server):
            assert ask_datagram(server, bytes(20_000))[1] == b"len 20000"
            server.max_packet_size = 60 * 1024
            assert ask_datagram(server, bytes(50_000))[1] == b"len 50000"


class Draining(stdlib_socketserver.StreamRequestHandler):
    """Says "started", then answers whether it saw shutdown_requested within WAIT."""

    def handle(self) -> None:
        self.wfile.write(b"started\n")
        deadline = time.monotonic() + WAIT
        while not self.server.shutdown_requested and time.monotonic() < deadline:
            time.sleep(0.005)
        self.wfile.write(b"drained\n" if self.server.shutdown_requested else b"not told\n")


@pytest.mark.parametrize("server_class", ["ThreadingTCPServer", "ForkingTCPServer"])
def test_shutdown_requested_is_seen_by_handlers_during_the_drain(server_class: str) -> None:
    """The stdlib has no shutdown_requested; the reference is compat's threads."""
    with getattr(compat, server_class)(LOCALHOST, Draining) as server:
        thread = threading.Thread(target=server.serve_forever, name="test serving")
        thread.start()
        try:
            with socket.create_connection(server.server_address, timeout=WAIT) as sock:
                reader = sock.makefile("rb")
                assert reader.readline() == b"started\n"
                server.shutdown()  # returns once the handler saw it and returned
                assert reader.readline() == b"drained\n"
        finally:
            server.shutdown()
            thread.join(WAIT)


# -- 2. workers keep nothing the program closes later ---------------------------------------


@contextlib.contextmanager
def after_one_request(socketserver: ModuleType) -> Iterator[Any]:
    """A ForkingTCPServer serving on a thread, once one request was served and its process
    let go of it (the stdlib's child exited; compat's worker stays, idle)."""
    with socketserver.ForkingTCPServer(LOCALHOST, Reply) as server:
        server.reply = "served"
        with serving_on_thread(server):
            pid, _ = ask(server)
            request_ended(socketserver, pid)
            yield server


def test_a_connection_and_a_pipe_closed_later_show_their_end(socketserver: ModuleType) -> None:
    """Open when serving starts, closed by the program after a request: the peer sees EOF."""
    ours, peer = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        with after_one_request(socketserver):
            ours.close()
            os.close(write_end)
            peer.settimeout(WAIT)
            assert peer.recv(1) == b""
            os.set_blocking(read_end, False)
            assert os.read(read_end, 1) == b""  # EOF, not "would block"
    finally:
        ours.close()
        peer.close()
        os.close(read_end)


def test_a_closed_servers_port_stops_accepting(socketserver: ModuleType) -> None:
    other = socketserver.TCPServer(LOCALHOST, Reply)  # another server of the program
    with after_one_request(socketserver) as server:
        other.server_close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(other.server_address, timeout=WAIT).close()
    with pytest.raises(ConnectionRefusedError):  # the forking server's own, closed now
        socket.create_connection(server.server_address, timeout=WAIT).close()


# -- 3. fork safety: idle threads are no reason to refuse -----------------------------------


def test_idle_threads_of_the_program_do_not_stop_serving(socketserver: ModuleType) -> None:
    """An idle QueueListener and ThreadPoolExecutor, and the thread that waits for answers:
    the stdlib forks regardless; compat, even with fork_safety = "strict", finds them
    quiet, so it neither refuses nor warns."""
    listener = logging.handlers.QueueListener(queue.Queue())
    listener.start()
    executor = concurrent.futures.ThreadPoolExecutor(1)
    try:
        executor.submit(lambda: None).result()
        with socketserver.ForkingTCPServer(LOCALHOST, Reply) as server:
            server.reply = "served"
            server.fork_safety = "strict"  # an attribute the stdlib ignores
            with warnings.catch_warnings():
                warnings.simplefilter("error", ts.ForkSafetyWarning)
                with serving_on_thread(server):
                    assert ask(server)[1] == b"served"
    finally:
        listener.stop()
        executor.shutdown()
    assert compat.ForkSafetyError is ts.ForkSafetyError
    assert compat.ForkSafetyWarning is ts.ForkSafetyWarning


# -- 4. the stdlib's ForkingMixIn surface ----------------------------------------------------


def test_timeout_active_children_and_collect_children(socketserver: ModuleType) -> None:
    assert socketserver.ForkingMixIn.timeout == 300
    with socketserver.ForkingTCPServer(LOCALHOST, Reply) as server:
        server.reply = "served"
        assert server.active_children is None  # before the first child
        server.active_children = set()  # assignable, as the stdlib's is
        with concurrent.futures.ThreadPoolExecutor(1) as client:
            answer = client.submit(ask, server)
            server.handle_request()
            pid = answer.result(WAIT)[0]
        assert pid in server.active_children
        server.collect_children()  # does not wait; the child may still run
        server.collect_children(blocking=True)  # every child has exited
        assert server.active_children == set()
        assert child_processes() == set()


def test_subclasses_call_the_hooks_through_the_mixin(socketserver: ModuleType) -> None:
    """As stdlib code does: ``ForkingMixIn.process_request(self, ...)``, not ``super()``."""
    mixin = socketserver.ForkingMixIn
    calls = []

    class Explicit(mixin, socketserver.TCPServer):
        timeout = 0.05  # nobody connects during the first handle_request()

        def handle_timeout(self) -> None:
            calls.append("handle_timeout")
            mixin.handle_timeout(self)

        def process_request(self, request: Any, client_address: Any) -> None:
            calls.append("process_request")
            mixin.process_request(self, request, client_address)

    with Explicit(LOCALHOST, Reply) as server:
        server.reply = "served"
        server.handle_request()
        with concurrent.futures.ThreadPoolExecutor(1) as client:
            answer = client.submit(ask, server)
            server.handle_request()
            pid, reply = answer.result(WAIT)
        mixin.service_actions(server)
    assert calls == ["handle_timeout", "process_request"]
    assert (pid != os.getpid(), reply) == (True, b"served")


@pytest.mark.parametrize(
    ("flavour", "per_child", "expected"),
    [
        ("stdlib", None, [0, 1, 2, 3, 4, 5]),  # a child per request
        ("compat", 1, [0, 1, 2, 3, 4, 5]),
        ("compat", 2, [0, 0, 1, 1, 2, 2]),
    ],
)
def test_max_requests_per_child_recycles_workers(
    flavour: str, per_child: int | None, expected: list[int]
) -> None:
    """One request at a time (max_children = 1); which process served each, numbered in
    order of appearance."""
    module = stdlib_socketserver if flavour == "stdlib" else compat
    with module.ForkingTCPServer(LOCALHOST, Reply) as server:
        server.reply = "served"
        server.max_children = 1
        server.max_requests_per_child = per_child
        with serving_on_thread(server):
            pids = [ask(server)[0] for _ in range(6)]
    order = list(dict.fromkeys(pids))
    assert [order.index(pid) for pid in pids] == expected
