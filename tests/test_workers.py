# Several processes: `trio-socketserver --workers N` and serve_workers(), run as users run
# them (a child process), with real clients, real signals and real crashes: which workers
# serve, a worker killed under load, a reload under load, a reload that cannot start, the
# stop, and the supervisor killed. The rules without processes (crash policy, the notify
# messages, the workers' command line) are tested as plain functions at the end.
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
import trio
import trustme

from conftest import http_get, wait_for_exit
from serving_process import ServerProcess, activated, cli, ip_address, read_until
from trio_socketserver._cli import UsageError, endpoints_of, parse_options, worker_arguments
from trio_socketserver._engine import ServerStatistics
from trio_socketserver._workers._command import MIGRATE_SETTING, STOP_MARGIN, stop_timeout
from trio_socketserver._workers._factory import name_factory
from trio_socketserver._workers._policy import BACKOFF, CRASH_LOOP, STABLE_AFTER, CrashPolicy
from trio_socketserver._workers._supervisor import Supervisor
from trio_socketserver._workers._wire import (
    ServerFigures,
    decode_statistics,
    encode_statistics,
    parse_notify,
)

# Bounds every client wait; a passing test never comes near it.
TIMEOUT = 10.0
# A worker's death (SIGKILL) or its supervisor's reaches it at once; this bounds how long
# the test waits for the exits to be seen.
GONE_WITHIN = 2.0

SERVING = r": serving (?P<what>.+?) with (?P<n>\d+) workers on (?P<kind>\S+) (?P<where>.+) \(Ctrl-C"
READY = r"generation {} is ready \(workers (?P<pids>[\d, ]+)\)"

# Answers each line with the pid of the worker that serves it.
PID_HANDLER = """\
import os

import trio_socketserver


class Pid(trio_socketserver.StreamRequestHandler):
    async def handle(self):
        async for line in self.rfile:
            await self.wfile.write(b"%d %s" % (os.getpid(), line))
"""


@attrs.define
class Supervised:
    """A supervisor started for a test, once all its first workers are ready."""

    process: ServerProcess
    address: tuple[str, int]
    pids: set[int]

    def ready_pids(self, generation: int) -> set[int]:
        """The workers of ``generation`` once it is ready (waits for the log line)."""
        match = self.process.wait_for_line(READY.format(generation), stream="stderr")
        return {int(pid) for pid in match["pids"].split(", ")}


Start = Callable[..., Supervised]


@pytest.fixture
def handler_dir(tmp_path: Path) -> Path:
    (tmp_path / "pid_handler.py").write_text(PID_HANDLER)
    return tmp_path


@pytest.fixture
def supervise(handler_dir: Path) -> Iterator[Start]:
    """Start ``trio-socketserver --workers N ARGS...`` in ``handler_dir``; every process
    started is killed and reaped at the end of the test, whatever happened."""
    started: list[ServerProcess] = []

    def start(*args: str, workers: int = 2) -> Supervised:
        process = cli("--workers", str(workers), *args, cwd=handler_dir)
        started.append(process)
        process.__enter__()
        match = process.wait_for_line(SERVING, stream="stderr")
        address = ip_address(match["where"]) if match["kind"].startswith(("tcp", "udp")) else None
        supervised = Supervised(process, address, set())  # type: ignore[arg-type]
        supervised.pids = supervised.ready_pids(1)
        return supervised

    yield start
    for process in started:
        process.__exit__(None, None, None)


def ask(address: tuple[str, int], line: bytes = b"hello\n") -> tuple[int, bytes]:
    """One request on a fresh connection to the pid handler: (worker pid, echoed line)."""
    with socket.create_connection(address, timeout=TIMEOUT) as client:
        client.sendall(line)
        pid, _, echo = read_until(client, b"\n").partition(b" ")
        return int(pid), echo


# -- serving ------------------------------------------------------------------------


def test_distinct_workers_serve(supervise: Start) -> None:
    # One request at a time per worker: while the first connection is open, its worker
    # accepts nothing more, so the second one must be served by the other worker.
    supervised = supervise("--handler", "pid_handler:Pid", "--max-connections", "1")
    assert len(supervised.pids) == 2
    with socket.create_connection(supervised.address, timeout=TIMEOUT) as first:
        first.sendall(b"one\n")
        pid_one = int(read_until(first, b"\n").split()[0])
        pid_two, echo = ask(supervised.address, b"two\n")
    assert echo == b"two\n"
    assert {pid_one, pid_two} == supervised.pids
    assert supervised.process.proc.pid not in supervised.pids  # the supervisor serves nothing
    # Each worker in a session of its own: a terminal's Ctrl-C reaches the supervisor only.
    assert len({os.getsid(pid) for pid in [supervised.process.proc.pid, *supervised.pids]}) == 3
    # One stderr for all: every line says whose it is.
    for pid in [supervised.process.proc.pid, *supervised.pids]:
        assert f" trio_socketserver[{pid}]: serving " in supervised.process.stderr
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_sigterm_drains_every_worker_and_reports_their_sum(supervise: Start) -> None:
    supervised = supervise("--handler", "pid_handler:Pid")
    for i in range(6):
        assert ask(supervised.address, b"%d\n" % i)[1] == b"%d\n" % i
    assert supervised.process.stop(signal.SIGTERM) == 0
    assert wait_for_exit(supervised.pids, GONE_WITHIN) == set()
    report = re.search(
        r"stopped serving on tcp [\d.:]+ in [\d.]+ s: requests finished: (\d+), failed: 0, "
        r"cut short: 0, refused: 0 \(summed over 2 workers\)",
        supervised.process.stderr,
    )
    assert report is not None, supervised.process.stderr
    assert int(report[1]) == 6


def test_a_second_signal_stops_at_once(supervise: Start, handler_dir: Path) -> None:
    (handler_dir / "stuck.py").write_text(
        "import trio, trio_socketserver\n"
        "class Stuck(trio_socketserver.StreamRequestHandler):\n"
        "    async def handle(self):\n"
        "        await self.rfile.readline()\n"
        "        await self.wfile.write(b'in\\n')\n"
        "        await trio.sleep_forever()\n"
    )
    supervised = supervise("--handler", "stuck:Stuck", "--shutdown-grace", "60")
    with socket.create_connection(supervised.address, timeout=TIMEOUT) as client:
        client.sendall(b"x\n")
        assert read_until(client, b"\n") == b"in\n"
        supervised.process.send_signal(signal.SIGTERM)
        supervised.process.wait_for_line(r"SIGTERM: stopping; every worker drains", stream="stderr")
        started = time.monotonic()
        assert supervised.process.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    assert time.monotonic() - started < TIMEOUT / 2
    assert wait_for_exit(supervised.pids, GONE_WITHIN) == set()


def test_no_worker_outlives_a_killed_supervisor(supervise: Start) -> None:
    supervised = supervise()
    supervised.process.proc.kill()
    supervised.process.proc.wait(TIMEOUT)
    assert wait_for_exit(supervised.pids, GONE_WITHIN) == set()


# Watches a pipe as a worker watches its supervisor's (without PR_SET_PDEATHSIG's help:
# its parent, the test, stays alive).
WATCHER = """\
import sys, threading, time
from trio_socketserver._workers._worker import _die_at_eof

threading.Thread(target=_die_at_eof, args=(int(sys.argv[1]),), daemon=True).start()
print("watching", flush=True)
time.sleep(60)
"""


def test_the_pipe_a_worker_watches_ends_it_when_its_write_end_closes() -> None:
    read_end, write_end = os.pipe()
    with ServerProcess("-c", WATCHER, str(read_end), pass_fds=[read_end]) as watcher:
        os.close(read_end)
        watcher.wait_for_line("watching")
        os.close(write_end)  # what the supervisor's exit does, however it exits
        assert watcher.proc.wait(GONE_WITHIN) == -signal.SIGKILL


# -- crashes --------------------------------------------------------------------------


def test_a_worker_killed_under_load_is_replaced_and_costs_only_its_requests(
    supervise: Start,
) -> None:
    supervised = supervise("--handler", "pid_handler:Pid")
    victim = min(supervised.pids)
    load = Load(supervised.address, clients=4)
    with load.running():
        load.wait_for(20)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        replacement = supervised.process.wait_for_line(
            rf"worker (\d+) started in place of {victim}", stream="stderr"
        )[1]
        supervised.process.wait_for_line(
            rf"worker {replacement} is ready \(it replaces one that died\)", stream="stderr"
        )
        replaced_in = time.monotonic() - killed
        load.wait_for(load.served + 20)
    assert f"worker {victim} killed by SIGKILL" in supervised.process.stderr
    assert int(replacement) not in supervised.pids
    # "Within a second or two"; bounded loosely, for a loaded machine.
    assert replaced_in < TIMEOUT / 2
    # Each client has one request in flight at a time: at most that many were the killed
    # worker's; a connection still waiting in the shared backlog went to another worker.
    assert load.failed <= load.clients, load.errors
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_a_crash_loop_ends_the_supervisor_with_status_1(handler_dir: Path) -> None:
    # Every worker dies as soon as it serves: a fast crash, again and again.
    (handler_dir / "dies.py").write_text(
        "import os, threading, trio_socketserver\n"
        "threading.Timer(0.05, os._exit, (3,)).start()\n"
        "class Dies(trio_socketserver.StreamRequestHandler):\n"
        "    async def handle(self):\n"
        "        pass\n"
    )
    with cli("--workers", "1", "--handler", "dies:Dies", cwd=handler_dir) as sup:
        assert sup.wait() == 1
    assert f"crash loop: {CRASH_LOOP} workers in a row died within {STABLE_AFTER} s" in sup.stderr
    assert sup.stderr.count("exited with status 3") == CRASH_LOOP


def test_a_handler_that_does_not_import_stops_the_start_with_status_2(handler_dir: Path) -> None:
    (handler_dir / "broken.py").write_text("raise RuntimeError('no database')\n")
    with cli("--workers", "2", "--handler", "broken:H", cwd=handler_dir) as sup:
        assert sup.wait() == 2
    assert "RuntimeError: no database" in sup.stderr
    assert "could not start (exited with status 2; its error is logged above); stopping" in (
        sup.stderr
    )


# -- reload ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reloads", "clients", "persistent"),
    [(1, 3, 2), pytest.param(6, 6, 4, marks=pytest.mark.slow, id="long")],
)
def test_a_reload_under_load_loses_nothing_and_leaves_only_new_workers(
    supervise: Start, reloads: int, clients: int, persistent: int
) -> None:
    # The old workers' persistent connections end at a message boundary (or, with a
    # request still in them, when the grace runs out); either way their clients go on
    # on new connections.
    supervised = supervise("--handler", "pid_handler:Pid", "--shutdown-grace", "1")
    old = supervised.pids
    load = Load(supervised.address, clients=clients, persistent=persistent)
    with load.running():
        load.wait_for(20)
        for generation in range(2, reloads + 2):
            supervised.process.send_signal(signal.SIGHUP)
            new = supervised.ready_pids(generation)
            assert new.isdisjoint(old)
            assert wait_for_exit(old, TIMEOUT) == set()  # the old ones drained
            after = load.served
            load.wait_for(after + 30)
            assert load.pids_since(after) <= new  # only the new workers answer
            old = new
    assert load.failed == 0, load.errors
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_a_reload_that_cannot_start_keeps_the_old_workers(
    supervise: Start, handler_dir: Path
) -> None:
    supervised = supervise("--handler", "pid_handler:Pid")
    (handler_dir / "pid_handler.py").write_text("raise ImportError('half-deployed')\n")
    supervised.process.send_signal(signal.SIGHUP)
    supervised.process.wait_for_line(
        r"reload failed: new worker \d+ exited with status 2 before it was ready "
        r"\(its error is logged above\); generation 1 keeps serving",
        stream="stderr",
    )
    assert "ImportError: half-deployed" in supervised.process.stderr
    for _ in range(4):
        assert ask(supervised.address)[0] in supervised.pids
    # Fixed, the next reload goes through.
    (handler_dir / "pid_handler.py").write_text(PID_HANDLER)
    supervised.process.send_signal(signal.SIGHUP)
    new = supervised.ready_pids(3)
    assert wait_for_exit(supervised.pids, TIMEOUT) == set()
    assert ask(supervised.address)[0] in new
    assert supervised.process.stop(signal.SIGTERM) == 0


# -- every kind of socket, TLS, socket activation ---------------------------------------


def test_datagrams_are_served_by_workers(supervise: Start) -> None:
    supervised = supervise("--udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(TIMEOUT)
        for i in range(4):
            client.sendto(b"datagram %d" % i, supervised.address)
            assert client.recv(100) == b"datagram %d" % i
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_a_unix_socket_is_served_by_workers_and_removed_by_the_supervisor(
    supervise: Start, unix_dir: Path
) -> None:
    path = str(unix_dir / "workers.sock")
    supervised = supervise("--unix", path, "--handler", "pid_handler:Pid")
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(TIMEOUT)
        client.connect(path)
        client.sendall(b"unix\n")
        pid, _, echo = read_until(client, b"\n").partition(b" ")
    assert (int(pid) in supervised.pids, echo) == (True, b"unix\n")
    assert supervised.process.stop(signal.SIGTERM) == 0
    assert not os.path.exists(path)


def test_tls_is_served_by_workers(supervise: Start, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    supervised = supervise("--tls-cert", str(tmp_path / "server.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        socket.create_connection(supervised.address, timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as client,
    ):
        client.sendall(b"secret\n")
        assert read_until(client, b"\n") == b"secret\n"
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_the_supervisor_takes_sockets_from_its_service_manager(handler_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        args = ("--workers", "2", "--handler", "pid_handler:Pid", "--max-connections", "1")
        with activated([sock], *args, names="web", cwd=handler_dir) as process:
            match = process.wait_for_line(SERVING, stream="stderr")
            assert ip_address(match["where"]) == sock.getsockname()
            pids = Supervised(process, sock.getsockname(), set()).ready_pids(1)
            with socket.create_connection(sock.getsockname(), timeout=TIMEOUT) as first:
                first.sendall(b"one\n")
                pid_one = int(read_until(first, b"\n").split()[0])
                pid_two = ask(sock.getsockname())[0]
            assert {pid_one, pid_two} == pids
            assert process.stop(signal.SIGTERM) == 0
    # Each worker was given the socket under the service manager's name.
    assert process.stderr.count("socket 'web' from the service manager: tcp ") == 2


def test_the_proxy_protocol_reaches_every_worker(supervise: Start, handler_dir: Path) -> None:
    (handler_dir / "peer.py").write_text(
        "import trio_socketserver\n"
        "class Peer(trio_socketserver.StreamRequestHandler):\n"
        "    async def handle(self):\n"
        "        await self.wfile.write(self.client_address[0].encode() + b'\\n')\n"
    )
    supervised = supervise("--handler", "peer:Peer", "--proxy-protocol", "v1")
    for i in range(4):
        with socket.create_connection(supervised.address, timeout=TIMEOUT) as client:
            client.sendall(b"PROXY TCP4 203.0.113.%d 127.0.0.1 5555 80\r\n" % i)
            assert read_until(client, b"\n") == b"203.0.113.%d\n" % i
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_a_stop_drains_the_workers_as_one_server_drains(supervise: Start) -> None:
    # DESIGN's stop sequence, across the processes: the supervisor's /ready turns 503 at
    # once, while every worker keeps accepting for --drain-delay.
    supervised = supervise(
        "--handler", "pid_handler:Pid", "--drain-delay", "30", "--health-bind", "127.0.0.1:0"
    )
    health = supervised.process.health_address()
    supervised.process.send_signal(signal.SIGTERM)
    supervised.process.wait_for_line(r"SIGTERM: stopping; every worker drains", stream="stderr")
    status, body = http_get(health, "/ready")
    assert (status, body) == (503, "not ready: the supervisor is stopping\n")
    for _ in range(4):
        assert ask(supervised.address)[0] in supervised.pids
    # A second signal ends the delay: the workers stop at once.
    assert supervised.process.stop(signal.SIGTERM) == 128 + signal.SIGTERM
    assert wait_for_exit(supervised.pids, GONE_WITHIN) == set()


# -- --reuse-port -------------------------------------------------------------------------


def test_with_reuse_port_each_worker_binds_its_own_socket(supervise: Start) -> None:
    supervised = supervise("--handler", "pid_handler:Pid", "--reuse-port")
    # The log says what a reload costs here, unless the kernel migrates queued connections.
    setting = Path(MIGRATE_SETTING)
    if setting.exists():
        mentioned = "sysctl net.ipv4.tcp_migrate_req=1 hands it to" in supervised.process.stderr
        assert mentioned == (setting.read_text().strip() == "0")
    # The kernel spreads connections by a hash of their addresses: 20 connections from
    # fresh ports all going to one of two workers has odds of one in half a million.
    assert {ask(supervised.address)[0] for _ in range(20)} == supervised.pids
    supervised.process.send_signal(signal.SIGHUP)
    new = supervised.ready_pids(2)
    assert wait_for_exit(supervised.pids, TIMEOUT) == set()
    assert {ask(supervised.address)[0] for _ in range(20)} == new
    assert supervised.process.stop(signal.SIGTERM) == 0


# -- what the supervisor tells -------------------------------------------------------------


# Workers started while the file `hold` exists wait at import until the test lets them go
# (see Gate), so the test can ask the supervisor while they certainly are not ready.
GATED_HANDLER = """\
import os
import socket

if os.path.exists("hold"):
    with socket.socket(socket.AF_UNIX) as gate:
        gate.connect("gate.sock")
        gate.recv(1)

from pid_handler import Pid
"""


@attrs.define
class Gate:
    """Holds back the gated handler's workers at import."""

    directory: Path
    listener: socket.socket = attrs.field(init=False)
    waiting: list[socket.socket] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(self.directory / "gate.sock"))
        self.listener.listen()
        self.listener.settimeout(TIMEOUT)

    def hold(self) -> None:
        (self.directory / "hold").touch()

    def wait_for(self, workers: int) -> None:
        """Until ``workers`` workers wait at the gate."""
        while len(self.waiting) < workers:
            self.waiting.append(self.listener.accept()[0])

    def release(self) -> None:
        (self.directory / "hold").unlink()
        for worker in self.waiting:
            worker.close()  # its recv() returns: it goes on importing
        self.waiting.clear()


@pytest.fixture
def gate(handler_dir: Path) -> Iterator[Gate]:
    (handler_dir / "gated.py").write_text(GATED_HANDLER)
    gate = Gate(handler_dir)
    yield gate
    for worker in gate.waiting:
        worker.close()
    gate.listener.close()


def test_the_health_endpoint_answers_for_all_the_workers(supervise: Start, gate: Gate) -> None:
    supervised = supervise("--handler", "gated:Pid", "--health-bind", "127.0.0.1:0")
    health = supervised.process.health_address()
    assert http_get(health, "/ready") == (200, "ready\n")
    status, metrics = http_get(health, "/metrics")
    assert status == 200
    for pid in supervised.pids:
        assert re.search(
            rf'^trio_socketserver_accepted_total{{server="tcp [^"]+",worker="{pid}"}} 0$',
            metrics,
            re.M,
        )
    assert re.search(
        r'^trio_socketserver_finished_total\{server="tcp [^"]+",worker="all"\} 0$', metrics, re.M
    )
    assert 'trio_socketserver_workers{state="ready"} 2' in metrics
    assert "trio_socketserver_worker_crashes_total 0" in metrics

    # A worker dies: not ready until its replacement is.
    gate.hold()
    victim = min(supervised.pids)
    os.kill(victim, signal.SIGKILL)
    gate.wait_for(1)
    replacement = supervised.process.wait_for_line(
        rf"worker (\d+) started in place of {victim}", stream="stderr"
    )[1]
    assert http_get(health, "/ready") == (503, f"not ready: worker {replacement} is starting\n")
    gate.release()
    supervised.process.wait_for_line(r"is ready \(it replaces one that died\)", stream="stderr")
    assert http_get(health, "/ready") == (200, "ready\n")
    assert "trio_socketserver_worker_crashes_total 1" in http_get(health, "/metrics")[1]

    # A reload: ready all along, the old generation serving until the new one is.
    gate.hold()
    supervised.process.send_signal(signal.SIGHUP)
    gate.wait_for(2)
    assert http_get(health, "/ready") == (200, "ready\n")
    assert 'trio_socketserver_workers{state="starting"} 2' in http_get(health, "/metrics")[1]
    gate.release()
    supervised.ready_pids(2)
    assert http_get(health, "/ready") == (200, "ready\n")
    assert supervised.process.stop(signal.SIGTERM) == 0


def test_the_supervisor_tells_its_service_manager(
    handler_dir: Path, manager: socket.socket
) -> None:
    env = {"NOTIFY_SOCKET": manager.getsockname()}
    args = ("--workers", "2", "--bind", "127.0.0.1:0")
    with cli(*args, cwd=handler_dir, env=env) as process:
        ready = parse_notify(manager.recv(4096))
        # Only once every worker is ready, and only the supervisor's word: the
        # workers tell the supervisor, not the service manager.
        assert ready["READY"] == "1"
        assert process.wait_for_line(READY.format(1), stream="stderr")
        assert ready["STATUS"].startswith("2 workers serving (generation 1): ")
        process.send_signal(signal.SIGHUP)
        reloading = parse_notify(manager.recv(4096))
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
        assert parse_notify(manager.recv(4096))["READY"] == "1"
        assert process.wait_for_line(READY.format(2), stream="stderr")
        process.send_signal(signal.SIGTERM)
        assert parse_notify(manager.recv(4096))["STOPPING"] == "1"
        assert process.wait() == 0


# -- serve_workers(), for programs that build their servers in code ------------------------

PROGRAM = """\
import logging
import socket
import sys

import trio

import trio_socketserver
from pid_handler import Pid


def make_server(sock):
    return trio_socketserver.TCPServer.from_socket(sock, Pid)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sock = socket.create_server(("127.0.0.1", 0))
    sys.exit(trio.run(trio_socketserver.serve_workers, make_server, [sock], 2))
"""


def test_serve_workers_runs_a_program_s_own_factory(handler_dir: Path) -> None:
    (handler_dir / "program.py").write_text(PROGRAM)
    with ServerProcess("program.py", cwd=handler_dir) as process:
        match = process.wait_for_line(SERVING, stream="stderr")
        assert match["what"] == "make_server"
        address = ip_address(match["where"])
        pids = Supervised(process, address, set()).ready_pids(1)
        assert ask(address)[0] in pids
        assert process.stop(signal.SIGTERM) == 0
    assert wait_for_exit(pids, GONE_WITHIN) == set()


def test_a_sighup_during_a_reload_is_not_lost(supervise: Start, gate: Gate) -> None:
    supervised = supervise("--handler", "gated:Pid")
    gate.hold()
    supervised.process.send_signal(signal.SIGHUP)
    gate.wait_for(2)  # generation 2 is starting
    supervised.process.send_signal(signal.SIGHUP)
    supervised.process.wait_for_line(
        r"SIGHUP: a reload follows once the new workers are ready", stream="stderr"
    )
    gate.release()
    second = supervised.ready_pids(2)
    third = supervised.ready_pids(3)
    assert wait_for_exit(supervised.pids | second, TIMEOUT) == set()
    assert ask(supervised.address)[0] in third
    assert supervised.process.stop(signal.SIGTERM) == 0


# -- the supervisor in this process: its timeouts ----------------------------------------


@contextlib.contextmanager
def logged(text: str) -> Iterator[trio.Event]:
    """An event set when the project's logger logs a message containing ``text``."""
    seen = trio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in record.getMessage():
                seen.set()

    watch = Watch()
    logger = logging.getLogger("trio_socketserver")
    logger.addHandler(watch)
    try:
        yield seen
    finally:
        logger.removeHandler(watch)


def in_process_supervisor(
    handler_dir: Path, module: str, source: str, sock: socket.socket, **settings: float
) -> Supervisor:
    """A supervisor of one command-line worker serving ``module:H`` on ``sock``."""
    (handler_dir / f"{module}.py").write_text(source)
    return Supervisor(
        command=["cli", "--handler", f"{module}:H", "--shutdown-grace", "0"],
        workers=1,
        sockets=[sock],
        names=None,
        what=f"{module}:H",
        addresses=["tcp"],
        **settings,
    )


async def test_a_worker_that_never_gets_ready_is_killed(
    handler_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(handler_dir)  # the worker's current directory, where its handler is
    source = "import time\ntime.sleep(60)\n"
    with socket.create_server(("127.0.0.1", 0)) as sock:
        supervisor = in_process_supervisor(handler_dir, "never", source, sock, ready_timeout=0.5)
        with trio.fail_after(TIMEOUT), logged("killed by SIGKILL") as replaced:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(supervisor.run)
                await replaced.wait()
                nursery.cancel_scope.cancel()  # a hard stop: its replacement is killed too
    assert "sent no READY=1 within 0.5 s" in caplog.text
    assert "killed by SIGKILL" in caplog.text
    assert supervisor.live_workers() == []
    assert wait_for_exit({w.pid for w in supervisor.exited_workers()}, GONE_WITHIN) == set()


async def test_a_worker_whose_stop_hangs_is_killed(
    handler_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(handler_dir)
    # A thread nobody stops keeps the interpreter from exiting once the servers stopped.
    source = (
        "import threading, time, trio_socketserver\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "class H(trio_socketserver.StreamRequestHandler):\n"
        "    async def handle(self):\n"
        "        pass\n"
    )
    with socket.create_server(("127.0.0.1", 0)) as sock:
        supervisor = in_process_supervisor(handler_dir, "hangs", source, sock, stop_timeout=0.5)
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                status = []

                async def supervise(task_status: trio.TaskStatus[None]) -> None:
                    status.append(await supervisor.run(task_status))

                await nursery.start(supervise)  # returns once the worker is ready
                supervisor.stop()
    assert status == [0]
    assert "still running 0.5 s after SIGTERM; killing it" in caplog.text
    [worker] = supervisor.exited_workers()
    assert worker.popen.returncode == -signal.SIGKILL


# -- the client load ---------------------------------------------------------------------


@attrs.define(eq=False)
class Load:
    """Clients sending requests to the pid handler until stopped: ``clients`` on a fresh
    connection per request, ``persistent`` on one connection each.

    A persistent client that finds its connection closed before any byte of an answer
    arrived (the server ended it at a message boundary, without reading the request) sends
    that request again on a new connection, as an HTTP client retries on a keep-alive
    connection the server closed. Anything else is a failure: a refused or reset connection,
    a fresh connection closed before its answer, a partial or wrong answer.
    """

    address: tuple[str, int]
    clients: int
    persistent: int = 0
    served: int = 0
    failed: int = 0
    errors: list[str] = attrs.Factory(list)
    answers: list[tuple[float, int]] = attrs.Factory(list)
    """(when, pid) of every answer."""
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _stop: threading.Event = attrs.Factory(threading.Event)
    _progress: threading.Condition = attrs.Factory(threading.Condition)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        threads = [
            threading.Thread(target=self._fresh, name=f"fresh client {i}")
            for i in range(self.clients)
        ] + [
            threading.Thread(target=self._persistent, name=f"persistent client {i}")
            for i in range(self.persistent)
        ]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self._stop.set()
            for thread in threads:
                thread.join(TIMEOUT)
            assert not any(t.is_alive() for t in threads)

    def wait_for(self, served: int) -> None:
        """Until ``served`` answers arrived in all (fails the test after ``TIMEOUT`` s)."""
        with self._progress:
            if not self._progress.wait_for(lambda: self.served >= served, TIMEOUT):
                pytest.fail(f"{self.served} answers, not {served}; errors: {self.errors}")

    def pids_since(self, served: int) -> set[int]:
        return {pid for _, pid in self.answers[served:]}

    def _answered(self, pid: int) -> None:
        with self._progress:
            self.served += 1
            self.answers.append((time.monotonic(), pid))
            self._progress.notify_all()

    def _failure(self, what: str) -> None:
        with self._lock:
            self.failed += 1
            self.errors.append(what)

    def _fresh(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            line = b"fresh %d\n" % count
            try:
                pid, echo = ask(self.address, line)
            except (OSError, EOFError, ValueError) as exc:
                self._failure(f"fresh request {count}: {exc!r}")
                continue
            if echo != line:
                self._failure(f"fresh request {count}: {echo!r}")
            else:
                self._answered(pid)

    def _persistent(self) -> None:
        count = 0
        connection: socket.socket | None = None
        while not self._stop.is_set():
            count += 1
            line = b"persistent %d\n" % count
            for _attempt in range(3):
                if connection is None:
                    connection = socket.create_connection(self.address, timeout=TIMEOUT)
                try:
                    connection.sendall(line)
                    first = connection.recv(1)
                except ConnectionResetError:
                    first = b""
                if first:
                    break
                connection.close()  # ended at a message boundary: again, on a new one
                connection = None
            else:
                self._failure(f"persistent request {count}: connection closed 3 times")
                continue
            try:
                pid, _, echo = (first + read_until(connection, b"\n")).partition(b" ")
            except (OSError, EOFError) as exc:
                self._failure(f"persistent request {count}: cut in its answer: {exc!r}")
                connection.close()
                connection = None
                continue
            if echo != line:
                self._failure(f"persistent request {count}: {echo!r}")
            else:
                self._answered(int(pid))
        if connection is not None:
            connection.close()


# -- the rules, without processes ---------------------------------------------------------


def test_backoff_doubles_and_the_fifth_fast_crash_in_a_slot_is_a_crash_loop() -> None:
    policy = CrashPolicy()
    delays = [policy.worker_died(0, uptime=0.5).delay for _ in range(CRASH_LOOP)]
    assert delays == [*BACKOFF, None]
    assert BACKOFF == (0.0, 0.25, 0.5, 1.0)


def test_a_worker_that_ran_long_enough_starts_its_slot_afresh() -> None:
    policy = CrashPolicy()
    for _ in range(CRASH_LOOP - 1):
        policy.worker_died(0, uptime=1.0)
    assert policy.worker_died(1, uptime=1.0).streak == 1  # slots count apart
    slow = policy.worker_died(0, uptime=STABLE_AFTER)
    assert (slow.fast, slow.streak, slow.delay) == (False, 0, 0.0)
    assert policy.worker_died(0, uptime=1.0).delay == 0.0


def test_notify_messages_are_parsed_as_systemd_parses_them() -> None:
    assert parse_notify(b"READY=1\nSTATUS=serving on x=1\nnonsense\n=3\nREADY=0") == {
        "READY": "0",
        "STATUS": "serving on x=1",
    }


def test_statistics_travel_in_a_custom_variable() -> None:
    stats = ServerStatistics(1, 2, 3, 4, 5, 6, 7, serving=True, draining=False)
    figures = (ServerFigures("tcp 127.0.0.1:80", stats),)
    line = encode_statistics(figures)
    assert line.startswith("X_TRIO_SOCKETSERVER_STATISTICS=")
    assert decode_statistics(parse_notify(line.encode())["X_TRIO_SOCKETSERVER_STATISTICS"]) == (
        figures
    )
    for bad in ["{}", "[1]", '[{"server": 1}]', "nope"]:
        with pytest.raises(ValueError):
            decode_statistics(bad)


def test_workers_get_every_option_but_the_supervisors() -> None:
    argv = [
        "--workers=3",
        "--bind",
        "127.0.0.1:0",
        "--unix",
        "x.sock",
        "--health-bind",
        "127.0.0.1:0",
        "--handler",
        "app:H",
        "--threading",
        "--max-conn",  # abbreviated: the worker gets it spelled out
        "7",
        "--shutdown-grace",
        "0.5",
        "--request-deadline",
        "30",
        "--drain-delay=2",
        "--tls-cert",
        "cert.pem",
        "--tls-key",
        "key.pem",
        "--proxy-protocol",
        "v2",
        "--proxy-trusted",
        "10.0.0.0/8",
        "--proxy-trusted",
        "::1",
        "--log-level",
        "debug",
        "--access-log",
    ]
    options = parse_options(argv)
    arguments = worker_arguments(options)
    assert arguments[:5] == ["--handler", "app:H", "--threading", "--max-connections", "7"]
    for supervisors in ["--workers", "--bind", "--unix", "--health-bind", "--reuse-port"]:
        assert supervisors not in arguments
    # Every other option reaches the worker, with the value it was given.
    supervisors_own = {"workers": None, "bind": [], "unix": [], "health_bind": None}
    assert vars(parse_options(arguments)) == {**vars(options), **supervisors_own}
    # Every option the parser knows was given above (a new one is added to this test).
    given = {o for o in vars(options) if getattr(options, o) != parse_options([]).__dict__[o]}
    assert given == set(vars(options)) - {"udp", "reuse_port"}


def test_a_stopping_worker_gets_its_drain_and_grace_before_it_is_killed() -> None:
    assert stop_timeout(parse_options([])) == 0 + 5.0 + STOP_MARGIN  # the default grace: 5 s
    options = parse_options(["--drain-delay", "2", "--shutdown-grace", "3"])
    assert stop_timeout(options) == 2 + 3 + STOP_MARGIN
    assert stop_timeout(parse_options(["--shutdown-grace", "inf"])) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reuse-port", "--udp"], "--reuse-port shares TCP ports only"),
        (["--reuse-port", "--unix", "x.sock"], "not Unix socket paths"),
    ],
)
def test_reuse_port_is_for_tcp(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        endpoints_of(parse_options(argv))


def made_here(sock: socket.socket) -> None:
    """A factory at the top of a module: workers can import it."""


def test_a_factory_must_be_importable_by_name() -> None:
    assert name_factory(made_here) == (__name__, "made_here")
    with pytest.raises(TypeError, match="workers can import by name"):
        name_factory(lambda sock: None)  # type: ignore[arg-type, return-value]

    def nested(sock: socket.socket) -> None: ...

    with pytest.raises(TypeError, match="workers can import by name"):
        name_factory(nested)  # type: ignore[arg-type]
