# Shared by the tests that run a program (the command line, the examples): run a server
# program in a child process (the command line through cli(), or as a service manager would
# start it, for socket activation: activated()), read the "serving ... on KIND ADDRESS
# (Ctrl-C to stop)" line it logs (stderr) once it listens, signal it, and collect its exit
# status and stderr.
# Every wait is bounded by a deadline; nothing sleeps to let the child start.
# (The leak check these tests use is conftest.py's `no_leaks`.)
from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Generous bounds for a loaded 2-core CI machine: they only cap how long a
# broken test can hang, a passing one never waits for them.
STARTUP_TIMEOUT = 20.0
EXIT_TIMEOUT = 10.0

# The command line's program, as ``python -m``'s arguments.
CLI = ("-m", "trio_socketserver")

# After the log line's timestamp, level and logger name.
SERVING = re.compile(r": serving (?P<what>.+?) on (?P<kind>\S+) (?P<where>.+) \(Ctrl-C to stop\)$")
# What --health-bind logs once the endpoint listens; group 1 is its address.
HEALTH = r"health endpoint on tcp (\S+): GET /live, /ready, /metrics"


def ip_address(where: str) -> tuple[str, int]:
    """``127.0.0.1:8000`` or ``[::1]:8000`` -> (host, port)."""
    host, _, port = where.rpartition(":")
    return host.strip("[]"), int(port)


class ServerProcess:
    """A Python program run as ``python ARGS...`` with ``src`` on its path.

    ``PYTHONPATH=src`` makes the child import this tree whether or not the
    package is installed in the venv running the tests. ``env`` adds variables to
    the child's environment; ``pass_fds`` are descriptors it inherits (as
    :class:`subprocess.Popen` takes them).
    """

    def __init__(
        self,
        *args: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT / "src"), child_env.get("PYTHONPATH")) if p
        )
        child_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd or ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._open: list[IO[bytes]] = [self.proc.stdout, self.proc.stderr]
        self._buffers: dict[int, bytearray] = {}
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()

    def wait_for_line(self, pattern: str, *, stream: str = "stdout") -> re.Match[str]:
        """The first new line of ``stream`` matching ``pattern`` (a regex); fails on timeout."""
        lines = self.stdout_lines if stream == "stdout" else self.stderr_lines
        seen = 0
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            for line in lines[seen:]:
                if match := re.search(pattern, line):
                    return match
            seen = len(lines)
            if not self._read(deadline):
                pytest.fail(
                    f"no line matching {pattern!r} on {stream}; exit status "
                    f"{self.proc.poll()}\nstdout: {self.stdout_lines}\nstderr: {self.stderr_lines}"
                )

    def serving(self) -> list[re.Match[str]]:
        """Wait for the first "serving ..." line; return every one logged so far."""
        self.wait_for_line(SERVING.pattern, stream="stderr")
        return [m for line in self.stderr_lines if (m := SERVING.search(line))]

    def address(self) -> tuple[str, int]:
        """The IP address of the first server the program announced."""
        return ip_address(self.serving()[0]["where"])

    def health_address(self) -> tuple[str, int]:
        """Wait for the health endpoint's line (``--health-bind``); return its address."""
        return ip_address(self.wait_for_line(HEALTH, stream="stderr")[1])

    def send_signal(self, signum: int = signal.SIGINT) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Send ``signum`` (SIGINT: Ctrl-C) and wait for the exit, as :meth:`wait`; the status."""
        self.send_signal(signum)
        return self.wait()

    def wait(self) -> int:
        """Wait for the exit (bounded); read the rest of its output; return the status."""
        deadline = time.monotonic() + EXIT_TIMEOUT
        while self._read(deadline):
            pass
        try:
            return self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {EXIT_TIMEOUT} s; stderr: {self.stderr_lines}")

    @property
    def stderr(self) -> str:
        return "".join(line + "\n" for line in self.stderr_lines)

    def _read(self, deadline: float) -> bool:
        """Wait until a pipe has output and take it; False at the deadline or when both hit EOF."""
        while self._open:
            ready, _, _ = select.select(self._open, [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return False
            got_data = False
            for pipe in ready:
                data = os.read(pipe.fileno(), 65536)
                if data:
                    got_data = True
                    self._take_lines(pipe, data)
                else:
                    self._open.remove(pipe)
            if got_data:
                return True
        return False

    def _take_lines(self, pipe: IO[bytes], data: bytes) -> None:
        buffer = self._buffers.setdefault(pipe.fileno(), bytearray())
        buffer += data
        *complete, rest = buffer.split(b"\n")
        buffer[:] = rest
        lines = self.stdout_lines if pipe is self.proc.stdout else self.stderr_lines
        lines.extend(line.decode(errors="replace") for line in complete)


def cli(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> ServerProcess:
    """The command line, ``python -m trio_socketserver ARGS...``, in a child process."""
    return ServerProcess(*CLI, *args, cwd=cwd, env=env)


# The service manager of socket activation, played by a small exec wrapper: it puts the
# sockets on descriptors 3, 4, ..., sets the variables for its own pid and execs the real
# program, which keeps that pid. argv: FD,FD,... NAMES WHOSE-PID PROGRAM-ARGS...;
# WHOSE-PID "self" is activation for the program, "parent" names another process
# (LISTEN_PID inherited from an activated parent).
ACTIVATE = """\
import fcntl, os, sys

fds = [int(fd) for fd in sys.argv[1].split(",")]
names, whose_pid, program = sys.argv[2], sys.argv[3], sys.argv[4:]
# Out of the way first, so that moving one onto 3, 4, ... cannot overwrite another.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid() if whose_pid == "self" else os.getppid())
os.environ["LISTEN_FDS"] = str(len(fds))
if names:
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.executable, [sys.executable, *program])
"""


def activated(
    passed: list[socket.socket] | list[int],
    *args: str,
    names: str = "",
    whose_pid: str = "self",
    cwd: Path | None = None,
) -> ServerProcess:
    """The command line with ``args``, started as a service manager starts it with the
    sockets (or other descriptors) ``passed``."""
    fds = [fd if isinstance(fd, int) else fd.fileno() for fd in passed]
    spec = ",".join(map(str, fds))
    return ServerProcess("-c", ACTIVATE, spec, names, whose_pid, *CLI, *args, pass_fds=fds, cwd=cwd)


def read_to_eof(sock: socket.socket) -> bytes:
    """Receive from a blocking stdlib socket (with a timeout set) until the peer's FIN; a
    reset raises, so a test that calls this also asserts a clean end of the session."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def read_until(sock: socket.socket, end: bytes) -> bytes:
    """Receive from a blocking stdlib socket (with a timeout set) until ``end`` arrives.

    One byte at a time, so nothing after ``end`` is consumed: the next call sees it.
    """
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    return data
