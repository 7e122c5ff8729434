# Rolling restarts behind a real HAProxy, configured as docs/production.md shows: three
# instances, each restarted in turn with SIGTERM under a continuous load of fresh and
# persistent connections, lose no request, and every handler sees the clients' own address
# (PROXY protocol v2). Without haproxy they skip, or fail under CI: see conftest.haproxy_binary.
from __future__ import annotations

import contextlib
import functools
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from conftest import haproxy_binary
from serving_process import ROOT, ServerProcess, cli

pytestmark = pytest.mark.usefixtures("no_leaks")

HERE = Path(__file__).resolve().parent
# The clients come from here, so a handler that sees it sees the client, not HAProxy.
CLIENT_HOST = "127.0.0.2"
# The documented configuration's ports, replaced by free ones.
FRONTEND_PORT, INSTANCE_PORTS, HEALTH_PORTS = 8000, (8001, 8002, 8003), (9001, 9002, 9003)
# Shorter than the documented 500 ms checks (and one good check to come back, not two), so
# that a restart takes a fraction of a second; the drain delay stays above inter x fall.
CHECK_INTERVAL = "100ms"
DRAIN_DELAY = "0.4"
# Bounds only: a passing test never waits for them.
TIMEOUT = 15.0
CLIENT_TIMEOUT = 10.0


def documented_config(first_line: str) -> str:
    """The HAProxy configuration block of docs/production.md that starts with ``first_line``."""
    text = (ROOT / "docs" / "production.md").read_text()
    for block in re.findall(r"```text\n(.*?)```", text, re.DOTALL):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no block starting with {first_line!r} in docs/production.md")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@attrs.define
class Ports:
    frontend: int = attrs.Factory(free_port)
    instances: list[int] = attrs.Factory(lambda: [free_port() for _ in INSTANCE_PORTS])
    health: list[int] = attrs.Factory(lambda: [free_port() for _ in HEALTH_PORTS])

    def apply(self, config: str) -> str:
        mapping = {FRONTEND_PORT: self.frontend}
        mapping.update(zip(INSTANCE_PORTS, self.instances, strict=True))
        mapping.update(zip(HEALTH_PORTS, self.health, strict=True))
        return re.sub(
            r"(127\.0\.0\.1:|port )(\d{4})\b", lambda m: m[1] + str(mapping[int(m[2])]), config
        )


class HAProxy:
    """haproxy in the foreground, with an admin socket to read its view of the servers."""

    def __init__(self, config: str, directory: Path) -> None:
        self.admin = directory / "admin.sock"
        config = config.replace(
            "global\n", f"global\n    stats socket {self.admin} level admin\n", 1
        )
        config = config.replace(
            "inter 500ms fall 1 rise 2", f"inter {CHECK_INTERVAL} fall 1 rise 1"
        )
        path = directory / "haproxy.cfg"
        path.write_text(config)
        self.proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers, by server name."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(CLIENT_TIMEOUT)
            sock.connect(str(self.admin))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        header, *rows = data.decode().strip("# \n").splitlines()
        names = header.split(",")
        stats = [dict(zip(names, row.split(","), strict=False)) for row in rows]
        return {s["svname"]: s for s in stats if s["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_until(self, what: str, done: Callable[[dict[str, dict[str, str]]], bool]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                if done(self.servers()):
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"HAProxy: {what} did not happen within {TIMEOUT} s")
            time.sleep(0.02)  # polling HAProxy's view; it has no way to notify us


@contextlib.contextmanager
def running_haproxy(config: str, directory: Path, names: list[str]) -> Iterator[HAProxy]:
    haproxy = HAProxy(config, directory)
    try:
        haproxy.wait_until("every server UP", lambda s: all(s[n]["status"] == "UP" for n in names))
        yield haproxy
    finally:
        haproxy.stop()


@attrs.define
class Load:
    """Clients through HAProxy until ``stop`` is set, counting what happened to each request."""

    frontend: int
    stop: threading.Event = attrs.Factory(threading.Event)
    lock: threading.Lock = attrs.Factory(threading.Lock)
    answered: int = 0
    resent: int = 0
    lost: list[str] = attrs.Factory(list)
    seen_addresses: set[str] = attrs.Factory(set)

    def connect(self) -> socket.socket:
        sock = socket.socket()
        sock.settimeout(CLIENT_TIMEOUT)
        sock.bind((CLIENT_HOST, 0))
        sock.connect(("127.0.0.1", self.frontend))
        return sock

    def record(self, request: bytes, answer: bytes) -> None:
        address, _, echoed = answer.partition(b" ")
        with self.lock:
            self.seen_addresses.add(address.decode())
            if echoed == request:
                self.answered += 1
            else:
                self.lost.append(f"{request!r} -> {answer!r}")

    def http(self, client: int, keep_alive: bool) -> None:
        """GET requests, on one kept-alive connection or one connection each: a request
        without its 200 and body is lost."""
        conn = None
        try:
            for n in range(10**6):
                if self.stop.is_set():
                    return
                if conn is None or not keep_alive:
                    if conn is not None:
                        conn.close()
                    conn = http.client.HTTPConnection(
                        "127.0.0.1",
                        self.frontend,
                        timeout=CLIENT_TIMEOUT,
                        source_address=(CLIENT_HOST, 0),
                    )
                try:
                    conn.request("GET", "/hello.txt")
                    response = conn.getresponse()
                    answer = b"%d %s" % (response.status, response.read())
                except (OSError, http.client.HTTPException) as exc:
                    answer = repr(exc).encode()
                    conn.close()
                    conn = None
                with self.lock:
                    if answer == b"200 hello":
                        self.answered += 1
                    else:
                        self.lost.append(f"GET {client}/{n} -> {answer!r}")
        finally:
            if conn is not None:
                conn.close()

    def fresh(self, client: int) -> None:
        """One request per connection: a request without its answer is lost."""
        for n in range(10**6):
            if self.stop.is_set():
                return
            request = b"fresh %d %d\n" % (client, n)
            try:
                with self.connect() as sock:
                    sock.sendall(request)
                    answer = read_line(sock)
            except OSError as exc:
                answer = repr(exc).encode()
            self.record(request, answer)

    def persistent(self, client: int) -> None:
        """Requests back to back on one connection. When an instance ends the connection
        between two messages (EOF before any byte of an answer), the request was never read:
        it is sent again on a new connection, as HTTP clients do; anything else is lost."""
        sock = self.connect()
        try:
            for n in range(10**6):
                if self.stop.is_set():
                    return
                request = b"persistent %d %d\n" % (client, n)
                try:
                    sock.sendall(request)
                    answer = read_line(sock)
                except ConnectionResetError:
                    answer = b""
                if not answer:
                    with self.lock:
                        self.resent += 1
                    sock.close()
                    sock = self.connect()
                    sock.sendall(request)
                    answer = read_line(sock)
                self.record(request, answer)
        finally:
            sock.close()


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def loaded(load: Load, *clients: Callable[[], None]) -> Iterator[Load]:
    """Run ``clients`` on threads for the body; then stop and join them."""
    threads = [threading.Thread(target=client) for client in clients]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads)


def restart_in_turn(haproxy: HAProxy, names: list[str], restart: Callable[[int], None]) -> None:
    """Restart each instance (``restart(i)`` stops it and starts its successor), and wait
    until HAProxy sends the new one traffic again before going on to the next."""
    for i, name in enumerate(names):
        sessions = int(haproxy.servers()[name]["stot"])
        restart(i)
        haproxy.wait_until(
            f"{name} serves again after its restart",
            lambda s, name=name, sessions=sessions: (
                s[name]["status"] == "UP" and int(s[name]["stot"]) > sessions
            ),
        )


NAMES = ["one", "two", "three"]


def cli_instance(ports: Ports, i: int) -> ServerProcess:
    return cli(
        "--handler",
        "haproxy_instance:AddressEcho",
        "--bind",
        f"127.0.0.1:{ports.instances[i]}",
        "--health-bind",
        f"127.0.0.1:{ports.health[i]}",
        "--proxy-protocol",
        "v2",
        "--drain-delay",
        DRAIN_DELAY,
        cwd=HERE,
    )


def test_rolling_restart_of_cli_instances_behind_haproxy_loses_nothing(tmp_path: Path) -> None:
    ports = Ports()
    config = ports.apply(documented_config("# haproxy.cfg: three trio-socketserver instances"))
    instances = [cli_instance(ports, i) for i in range(len(NAMES))]

    def restart(i: int) -> None:
        old = instances[i]
        old.send_signal(signal.SIGTERM)
        with old:
            assert old.wait() == 0, old.stderr
        assert "cut short: 0" in old.stderr, old.stderr
        instances[i] = cli_instance(ports, i)
        instances[i].serving()

    try:
        for proc in instances:
            proc.serving()
        load = Load(ports.frontend)
        clients = [functools.partial(load.fresh, n) for n in range(4)]
        clients += [functools.partial(load.persistent, n) for n in range(4)]
        with running_haproxy(config, tmp_path, NAMES) as haproxy, loaded(load, *clients):
            restart_in_turn(haproxy, NAMES, restart)
    finally:
        for proc in instances:
            with proc:
                pass
    print(
        f"\nrolling restart of {len(NAMES)} CLI instances behind HAProxy: {load.answered} "
        f"requests answered, {len(load.lost)} lost, {load.resent} re-sent after an instance "
        "ended a persistent connection between two messages"
    )
    assert load.lost == []
    assert load.answered > 100, "too little traffic to prove anything"
    assert load.seen_addresses == {CLIENT_HOST}


def documented_program(marker: str) -> str:
    """The Python block of docs/production.md that contains ``marker``."""
    text = (ROOT / "docs" / "production.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
        if marker in block:
            return str(block)
    raise AssertionError(f"no Python block with {marker!r} in docs/production.md")


class HTTPInstance:
    """The documented compat http.server program, serving ``directory``; its log (one line per
    request, from http.server) goes to a file, so a busy instance never blocks on a pipe."""

    def __init__(self, program: Path, port: int, health_port: int, log: Path) -> None:
        self.log = log
        with open(log, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, str(program), str(port), str(health_port)],
                cwd=program.parent,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"an http.server instance did not stop within {TIMEOUT} s")


def test_rolling_restart_of_http_server_instances_behind_haproxy_fails_no_request(
    tmp_path: Path,
) -> None:
    ports = Ports()
    config = ports.apply(documented_config("# haproxy.cfg: http.server instances"))
    program = tmp_path / "instance.py"
    documented = documented_program("class Server(http.server.ThreadingHTTPServer)")
    assert "drain_delay = 2.0" in documented  # shortened like the checks: see CHECK_INTERVAL
    program.write_text(
        documented.replace("drain_delay = 2.0", f"drain_delay = {DRAIN_DELAY}")
        + "\n\nimport sys\n\nserve(int(sys.argv[1]), int(sys.argv[2]))\n"
    )
    (tmp_path / "hello.txt").write_bytes(b"hello")
    logs = [tmp_path / f"{name}.log" for name in NAMES]

    def start(i: int) -> HTTPInstance:
        return HTTPInstance(program, ports.instances[i], ports.health[i], logs[i])

    instances = [start(i) for i in range(len(NAMES))]

    def restart(i: int) -> None:
        assert instances[i].stop() == 0, logs[i].read_text()
        instances[i] = start(i)

    try:
        load = Load(ports.frontend)
        clients = [functools.partial(load.http, n, keep_alive=True) for n in range(4)]
        clients += [functools.partial(load.http, n, keep_alive=False) for n in range(4, 6)]
        with running_haproxy(config, tmp_path, NAMES) as haproxy, loaded(load, *clients):
            restart_in_turn(haproxy, NAMES, restart)
    finally:
        for proc in instances:
            if proc.proc.poll() is None:
                proc.proc.kill()
            proc.proc.wait()
    print(
        f"\nrolling restart of {len(NAMES)} http.server instances behind HAProxy: "
        f"{load.answered} requests answered, {len(load.lost)} failed"
    )
    assert load.lost == []
    assert load.answered > 100, "too little traffic to prove anything"
    # http.server logs every request with the client's address: HAProxy's PROXY header
    # made it the client's own.
    requests = [
        line for log in logs for line in log.read_text().splitlines() if '"GET /hello.txt' in line
    ]
    assert len(requests) >= load.answered
    assert {line.split()[0] for line in requests} == {CLIENT_HOST}
