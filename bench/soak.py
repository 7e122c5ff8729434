#!/usr/bin/env python3
# Soak: one server, in a child process, under a steady mix of well-behaved and hostile
# clients for a while, watched from outside (/proc): RSS, open fds and threads over time.
# It answers "does anything accumulate?" -- memory, descriptors, threads, errors -- which a
# short test cannot. tests/test_reliability.py runs it for a few seconds in the default test
# run and for a minute per front door under `-m slow`.
"""Soak a trio-socketserver front door with good and hostile clients; report leaks as JSON.

    python bench/soak.py                          # native-async, 60 s
    python bench/soak.py --door native-threads --seconds 600

Doors: native-async (TCPServer, async handler), native-threads (ThreadingTCPServer, sync
handler), forking (ForkingTCPServer, sync handler in worker processes), compat-threads and
compat-forking (the compat classes, blocking serve_forever). The server is a line echo with
a handler timeout of --peer-timeout seconds and readline(limit=64 KiB); the threading doors
have max_threads = 64, the forking doors the default max_children = 40.

Clients, each kind on its own threads, in a loop until the time is up:

  good        5 echo round trips of random lines; every byte must come back
  garbage     64 KiB of random bytes (with newlines), echoed byte for byte
  slowloris   half a line, then silence: the server must close it after the peer timeout
  silent      connects and sends nothing: likewise
  reset       half a line, then RST (SO_LINGER 0)
  never-read  sends 8 MiB and never reads the echo: the server's write times out

Pass (exit status 0, "ok": true in the JSON on stdout) when: no good or garbage session
failed, every slowloris/silent connection was closed within peer timeout + 2 s, once the
clients are gone no TCP connection is left open in the server's process tree and (but with a
worker pool, which keeps its workers) its open fds are back to their idle count, its RSS grew
by at most --max-rss-growth MiB over the second half of the run, and SIGTERM stopped it with
status 0 and no traceback on its stderr. Everything goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("soak")
ROOT = Path(__file__).resolve().parent.parent
DOORS = ("native-async", "native-threads", "compat-threads", "forking", "compat-forking")
LINE_LIMIT = 64 * 1024
# Client socket timeout: a server that stops answering fails the session instead of
# hanging the soak.
CLIENT_TIMEOUT = 10.0
# Slack on top of the peer timeout before a hostile connection counts as held too long.
CLOSE_SLACK = 2.0
# How often the server process is sampled.
SAMPLE_INTERVAL = 0.25
# max_threads of the threading doors, as a deployment sets it. The default (unbounded, as in
# the stdlib) lets a flood of resets pile up hundreds of handler threads that contend for the
# GIL: the pool then grows for as long as the flood lasts, which is what this soak would
# report as RSS growth.
MAX_THREADS = 64
# Threads per client kind: good traffic dominates, every attack runs concurrently with it.
WORKERS = {"good": 4, "garbage": 1, "slowloris": 2, "silent": 2, "reset": 1, "never-read": 1}


# ---------------------------------------------------------------------------------------------
# The server process (`--serve DOOR`)


def serve(door: str, peer_timeout: float) -> None:
    """Run the door's echo server on 127.0.0.1:0, print the port, stop on SIGTERM."""
    sys.path.insert(0, str(ROOT / "src"))
    import trio

    import trio_socketserver as ts

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    class AsyncEcho(ts.StreamRequestHandler):
        timeout = peer_timeout

        async def handle(self) -> None:
            while line := await self.rfile.readline(LINE_LIMIT):
                await self.wfile.write(line)

    class SyncEcho(ts.StreamRequestHandler):
        timeout = peer_timeout

        def handle(self) -> None:
            while line := self.rfile.readline(LINE_LIMIT):
                self.wfile.write(line)

    if door.startswith("compat-"):
        from trio_socketserver import compat

        server_class = (
            compat.ForkingTCPServer if door == "compat-forking" else compat.ThreadingTCPServer
        )
        blocking = server_class(("127.0.0.1", 0), SyncEcho)
        blocking.max_threads = MAX_THREADS
        _serve_blocking(blocking)
        return
    server: Any
    if door == "forking":
        server = ts.ForkingTCPServer(("127.0.0.1", 0), SyncEcho)
    elif door == "native-threads":
        server = ts.ThreadingTCPServer(("127.0.0.1", 0), SyncEcho)
        server.max_threads = MAX_THREADS
    else:
        server = ts.TCPServer(("127.0.0.1", 0), AsyncEcho)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with server, trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                print(server.server_address[1], flush=True)
                async for _ in signals:
                    server.shutdown()
                    break

    trio.run(main)


def _serve_blocking(server: Any) -> None:
    """A compat server: blocking serve_forever() here, shutdown() from a thread on SIGTERM
    (the stdlib's rule: never from the serving thread)."""
    stopper = threading.Thread(target=server.shutdown)
    signal.signal(signal.SIGTERM, lambda signum, frame: stopper.start())
    print(server.server_address[1], flush=True)
    with server:
        server.serve_forever()
    stopper.join()


# ---------------------------------------------------------------------------------------------
# Clients


class SessionFailed(Exception):
    """A client saw something the server must never do to it."""


def _connect(address: tuple[str, int]) -> socket.socket:
    return socket.create_connection(address, timeout=CLIENT_TIMEOUT)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(65536, n - len(data)))
        if not chunk:
            raise SessionFailed(f"EOF after {len(data)} of {n} echoed bytes")
        data += chunk
    return bytes(data)


def _held_until_closed(sock: socket.socket, limit: float) -> None:
    """Wait for the server to close ``sock``; fail if that takes longer than ``limit``."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):
            pass
    held = time.monotonic() - start
    if held > limit:
        raise SessionFailed(f"held {held:.1f} s, more than {limit:.1f} s")


def good(address: tuple[str, int], rng: random.Random, peer_timeout: float) -> None:
    with _connect(address) as sock:
        for _ in range(5):
            line = rng.randbytes(rng.randrange(200)).replace(b"\n", b".") + b"\n"
            sock.sendall(line)
            if _recv_exactly(sock, len(line)) != line:
                raise SessionFailed("echo differs")


def garbage(address: tuple[str, int], rng: random.Random, peer_timeout: float) -> None:
    payload = rng.randbytes(64 * 1024) + b"\n"
    with _connect(address) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        try:
            echoed = _recv_exactly(sock, len(payload))
        finally:
            sender.join(CLIENT_TIMEOUT)
        if echoed != payload:
            raise SessionFailed("garbage echo differs")


def slowloris(address: tuple[str, int], rng: random.Random, peer_timeout: float) -> None:
    with _connect(address) as sock:
        sock.sendall(b"GET / HTTP/1.1 and the rest never comes")
        _held_until_closed(sock, peer_timeout + CLOSE_SLACK)


def silent(address: tuple[str, int], rng: random.Random, peer_timeout: float) -> None:
    with _connect(address) as sock:
        _held_until_closed(sock, peer_timeout + CLOSE_SLACK)


def reset(address: tuple[str, int], rng: random.Random, peer_timeout: float) -> None:
    sock = _connect(address)
    sock.sendall(b"half a requ")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def never_read(address: tuple[str, int], rng: random.Random, peer_timeout: float) -> None:
    """Send lines and never read their echo: the server's writes stall, its timeout cuts it."""
    with _connect(address) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall((b"x" * 1023 + b"\n") * 8192)
        _held_until_closed(sock, peer_timeout + CLOSE_SLACK)


CLIENTS: dict[str, Callable[[tuple[str, int], random.Random, float], None]] = {
    "good": good,
    "garbage": garbage,
    "slowloris": slowloris,
    "silent": silent,
    "reset": reset,
    "never-read": never_read,
}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sessions: Counter[str] = Counter()
        self.failures: dict[str, list[str]] = {}

    def add(self, kind: str, error: BaseException | None) -> None:
        with self.lock:
            self.sessions[kind] += 1
            if error is not None:
                self.failures.setdefault(kind, []).append(repr(error))


def client_loop(
    kind: str, address: tuple[str, int], until: float, seed: int, peer_timeout: float, tally: Tally
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        try:
            CLIENTS[kind](address, rng, peer_timeout)
        except (OSError, SessionFailed) as exc:
            tally.add(kind, exc)
        else:
            tally.add(kind, None)


# ---------------------------------------------------------------------------------------------
# Watching the server


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (worker processes, with forking)."""
    tree, i = [pid], 0
    while i < len(tree):
        with contextlib.suppress(FileNotFoundError):
            for task in os.listdir(f"/proc/{tree[i]}/task"):
                with open(f"/proc/{tree[i]}/task/{task}/children") as f:
                    tree += [int(child) for child in f.read().split()]
        i += 1
    return tree


def tcp_connections(pid: int) -> int:
    """TCP connections (not listeners) open in the process tree of ``pid``: sockets of its
    fds that /proc/net/tcp{,6} lists in a state other than LISTEN."""
    inodes = set()
    for member in process_tree(pid):
        with contextlib.suppress(FileNotFoundError):
            for fd in os.listdir(f"/proc/{member}/fd"):
                with contextlib.suppress(FileNotFoundError):
                    target = os.readlink(f"/proc/{member}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                fields = line.split()
                count += fields[3] != "0A" and fields[9] in inodes  # 0A: LISTEN
    return count


def sample(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return {
        "t": time.monotonic(),
        "rss": rss(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": threads,
    }


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(name="soak sampler")
        self.pid = pid
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL):
            self.samples.append(sample(self.pid))


def _read_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30.0)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise RuntimeError(f"the server did not start (status {proc.poll()}): {line!r}")
    return int(line)


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` (a /proc reading: there is nothing to wait on) until true."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def soak(door: str, seconds: float, peer_timeout: float, max_rss_growth: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    command = [sys.executable, __file__, "--serve", door, "--peer-timeout", str(peer_timeout)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stderr: list[bytes] = []
    assert proc.stderr is not None
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), name="soak stderr")  # type: ignore[arg-type]
    drain.start()
    problems: list[str] = []
    try:
        address = ("127.0.0.1", _read_port(proc))
        idle = sample(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        tally = Tally()
        until = time.monotonic() + seconds
        workers = [
            threading.Thread(
                target=client_loop,
                args=(kind, address, until, n * 1000 + i, peer_timeout, tally),
                name=f"soak {kind} {i}",
            )
            for n, (kind, count) in enumerate(WORKERS.items())
            for i in range(count)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(seconds + 4 * CLIENT_TIMEOUT)
            if worker.is_alive():
                problems.append(f"{worker.name} still running")
        # The server closes what the clients left (they closed theirs) within moments. A
        # worker pool keeps its workers' control sockets, so there only connections count.
        if not _wait_for(lambda: tcp_connections(proc.pid) == 0, peer_timeout + 5):
            problems.append(f"{tcp_connections(proc.pid)} TCP connections left open")
        if "forking" not in door and sample(proc.pid)["fds"] > idle["fds"]:
            problems.append("open fds did not return to their idle count")
        sampler.stop.set()
        sampler.join()
        after = sample(proc.pid)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(30)
        stop_seconds = time.monotonic() - stopping
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join(10)
        assert proc.stdout is not None
        proc.stdout.close()
        proc.stderr.close()
    log = b"".join(stderr).decode(errors="replace")
    samples = sampler.samples or [after]
    half = [
        s for s in samples if s["t"] >= samples[0]["t"] + (samples[-1]["t"] - samples[0]["t"]) / 2
    ]
    growth = (max(s["rss"] for s in half) - min(s["rss"] for s in half)) / 2**20
    for kind in ("good", "garbage", "slowloris", "silent"):
        if tally.failures.get(kind):
            problems.append(f"{len(tally.failures[kind])} {kind} sessions failed")
    if growth > max_rss_growth:
        problems.append(f"RSS grew {growth:.1f} MiB over the second half")
    if status != 0:
        problems.append(f"exit status {status} after SIGTERM")
    if "Traceback" in log:
        problems.append("traceback on the server's stderr")
    return {
        "door": door,
        "seconds": seconds,
        "peer_timeout": peer_timeout,
        "sessions": dict(tally.sessions),
        "failures": {kind: errors[:5] for kind, errors in tally.failures.items()},
        "failure_counts": {kind: len(errors) for kind, errors in tally.failures.items()},
        "rss_mib": {
            "idle": idle["rss"] / 2**20,
            "peak": max(s["rss"] for s in samples) / 2**20,
            "end": after["rss"] / 2**20,
            "second_half_growth": growth,
        },
        "fds": {"idle": idle["fds"], "peak": max(s["fds"] for s in samples), "end": after["fds"]},
        "threads": {
            "idle": idle["threads"],
            "peak": max(s["threads"] for s in samples),
            "end": after["threads"],
        },
        "stop_seconds": stop_seconds,
        "exit_status": status,
        "server_log_tail": log.splitlines()[-5:],
        "problems": problems,
        "ok": not problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--door", choices=DOORS, default="native-async")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--peer-timeout", type=float, default=0.5)
    parser.add_argument("--max-rss-growth", type=float, default=16.0, metavar="MIB")
    parser.add_argument("--serve", choices=DOORS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.peer_timeout)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    LOGGER.info("soaking %s for %.0f s", args.door, args.seconds)
    report = soak(args.door, args.seconds, args.peer_timeout, args.max_rss_growth)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
