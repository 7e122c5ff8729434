# Tests of ForkingMixIn (the trio_socketserver._forking package): sync handlers in a reused
# pool of worker processes, on the native server classes. Real sockets and real processes;
# every server test ends with the leak check (fds, threads and child processes as before),
# and tests that start other interpreters bound them with timeouts. The stdlib's patterns,
# with the stdlib's ForkingMixIn side by side with compat's, are in test_forking_vs_stdlib.py.
from __future__ import annotations

import ast
import concurrent.futures
import json
import logging
import logging.handlers
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import connect, receive_all, receive_line, serving, wait_for_exit
from trio_socketserver._forking import _mixin, _safety, _wire

pytestmark = pytest.mark.usefixtures("no_leaks")

REPO = Path(__file__).resolve().parent.parent
# Every async test is bounded: generous for a loaded 2-core machine, far from a hang.
TEST_TIMEOUT = 20
# Subprocess tests: an interpreter start plus a few forks.
SUBPROCESS_TIMEOUT = 60

# Changed by handlers in workers, and by a test after the pool started: shows which
# process sees what (docs/forking.md, "Semantics").
REQUESTS_SEEN = 0
GREETING = b"as constructed"


class Commands(ts.StreamRequestHandler):
    """Reads one command line, answers b"<worker pid> <line>", or fails on request.

    ``hold``: answers, then waits for a second line (or EOF) before returning.
    ``exit``: os._exit(3). ``raise``: an exception in handle(). ``stuck``: answers, then
    sleeps in a way a connection shutdown does not interrupt. ``close``: calls
    collect_children(blocking=True) and server_close() (nothing to do in a worker).
    """

    def handle(self) -> None:
        line = self.rfile.readline()
        command = line.strip()
        if command == b"exit":
            os._exit(3)
        if command == b"raise":
            raise ValueError("handler failed on purpose")
        self.wfile.write(b"%d %s" % (os.getpid(), line))
        if command == b"hold":
            self.rfile.readline()
        elif command == b"stuck":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
            signal.sigtimedwait({signal.SIGUSR1}, 30)
        elif command == b"count":
            global REQUESTS_SEEN
            REQUESTS_SEEN += 1
            self.wfile.write(b"%d %s\n" % (REQUESTS_SEEN, GREETING))
        elif command == b"shutdown":
            self.server.shutdown()
        elif command == b"close":
            self.server.collect_children(blocking=True)
            self.server.server_close()


class Echo(ts.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"%d %s" % (os.getpid(), self.rfile.read()))


class FailingHandleError(ts.ForkingTCPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        raise RuntimeError("handle_error failed on purpose")


class Tracked(ts.ForkingTCPServer):
    """Counts, in the server process, the requests that came back from their worker.

    close_request() runs there once the worker is back in the pool (and in the worker too,
    from shutdown_request(), where it is not counted), so ``await wait_finished(n)`` tells a
    test that the worker of the n-th request is idle again.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.server_pid = os.getpid()
        self.finished = 0
        self._changed = trio.Event()

    def close_request(self, request: Any) -> None:
        super().close_request(request)
        if os.getpid() == self.server_pid:
            self.finished += 1
            self._changed.set()
            self._changed = trio.Event()

    async def wait_finished(self, n: int) -> None:
        while self.finished < n:
            await self._changed.wait()


async def ask(server: Any, line: bytes) -> bytes:
    """One request on a new TCP connection: everything the server sent before closing."""
    async with await connect(server) as stream:
        await stream.send_all(line)
        return await receive_all(stream)


def pid_of(answer: bytes) -> int:
    return int(answer.split()[0])


async def stop_during_a_request(
    server: ts.ForkingTCPServer, command: bytes, *, hard: bool = False
) -> tuple[int, bytes]:
    """Serve; once a worker has answered ``command`` on a new connection, stop: shutdown(),
    or a hard stop (serve_forever() cancelled). Returns, after serve_forever() returned, the
    worker's pid and what the client received after the answer, up to EOF."""
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        stream = await connect(server)
        await stream.send_all(command)
        worker = pid_of(await receive_line(stream))
        if hard:
            nursery.cancel_scope.cancel()
        else:
            server.shutdown()
    async with stream:
        return worker, await receive_all(stream)


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.update(int(p) for p in f.read().split())
    return found


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# -- the package: which code runs where -------------------------------------------------

# The files whose code runs in the fork server and the workers (and _safety, which runs just
# before the fork): none of them may import trio, or code that does.
CHILD_MODULES = ("_forkserver", "_worker", "_wire", "_safety")


def test_code_that_runs_in_children_never_imports_trio() -> None:
    package = Path(_wire.__file__).parent
    for module in CHILD_MODULES:
        tree = ast.parse((package / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the other child modules
                    assert node.level == 1 and node.module in CHILD_MODULES, (module, node.module)
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "trio", f"{module}.py imports {name}"


# -- where requests run ------------------------------------------------------------


async def test_requests_run_in_reused_workers_forked_from_a_fork_server() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        # Sequential clients, yet a worker reports "done" just after its client saw the
        # end of the reply, so the next request may find it still busy and start another.
        # Two slots: without reuse, 20 requests would take 20 processes.
        server.max_children = 2
        async with serving(server):
            answers = [await ask(server, b"n%d\n" % i) for i in range(20)]
            pids = {pid_of(a) for a in answers}
            assert answers[7].endswith(b" n7\n")
            assert os.getpid() not in pids
            assert len(pids) <= 2
            assert pids <= server.active_children
            (fork_server,) = children_of(os.getpid())
            assert {parent_of(pid) for pid in pids} == {fork_server}
    assert server.active_children == set()
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # noqa: ASYNC222 - does not wait: WNOHANG


async def test_a_socket_made_elsewhere_is_served_by_the_workers() -> None:
    # A socket a service manager passed (socket activation), served by the worker processes.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer.from_socket(sock, Commands)
        server.max_children = 1
        async with serving(server):
            answer = await ask(server, b"activated\n")
            assert answer.endswith(b" activated\n")
            assert pid_of(answer) != os.getpid()
    assert sock.fileno() == -1


async def test_each_handle_request_forks_the_workers_afresh() -> None:
    """Each handle_request() is a serving call: its worker is a clone of the process as it
    is then, so what changed since the last call is seen (and a worker's own state is not)."""
    global GREETING
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            answers = []
            try:
                for greeting in (b"first", b"second"):
                    GREETING = greeting
                    async with await connect(server) as stream:
                        await stream.send_all(b"count\n")
                        await server.handle_request()  # returns once the worker is done
                        answers.append(await receive_all(stream))
            finally:
                GREETING = b"as constructed"
            pids = {pid_of(a) for a in answers}
            assert len(pids) == 2
            assert os.getpid() not in pids
            # The first call's pool was stopped as the second call started.
            assert server.active_children == {pid_of(answers[1])}
            assert wait_for_exit({pid_of(answers[0])}, TEST_TIMEOUT) == set()
    assert [a.split(b"\n")[1] for a in answers] == [b"1 first", b"1 second"]


async def test_async_handler_runs_as_a_task_without_any_process() -> None:
    class AsyncEcho(ts.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            await self.wfile.write(b"%d %s" % (os.getpid(), line))

    with trio.fail_after(TEST_TIMEOUT):
        async with serving(ts.ForkingTCPServer(("127.0.0.1", 0), AsyncEcho)) as server:
            assert pid_of(await ask(server, b"hi\n")) == os.getpid()
            assert children_of(os.getpid()) == set()


async def test_max_children_bounds_workers_and_stops_accepting() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.max_children = 2
        async with serving(server):
            first, second, third = [await connect(server) for _ in range(3)]
            for stream in (first, second):
                await stream.send_all(b"hold\n")
            busy = {pid_of(await receive_line(first)), pid_of(await receive_line(second))}
            await third.send_all(b"hold\n")
            # The third client is in the kernel backlog: with a free slot, the accept loop
            # (woken by the readable socket before trio calls it idle) would have taken it.
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().accepted_requests == 2
            assert server.active_children == busy
            await first.send_all(b"done\n")
            assert await receive_all(first) == b""
            # The freed worker takes the waiting client: still two processes in all.
            assert pid_of(await receive_line(third)) in busy
            for stream in (second, third):
                await stream.send_all(b"done\n")
                await receive_all(stream)
                await stream.aclose()
            await first.aclose()
            assert server.active_children == busy


# -- crashes --------------------------------------------------------------------


async def test_crashes_cost_only_their_own_requests(caplog: pytest.LogCaptureFixture) -> None:
    """Four clients keep the pool busy while workers die in every way; count the losses."""
    caplog.set_level(logging.INFO, logger="trio_socketserver")
    lost: list[bytes] = []
    served: list[bytes] = []

    async def steady(server: Any, n: int) -> None:
        for i in range(n):
            line = b"steady %d\n" % i
            answer = await ask(server, line)
            (served if answer.endswith(line) else lost).append(line)

    async def killed_mid_request(server: Any) -> None:
        async with await connect(server) as stream:
            await stream.send_all(b"hold\n")
            os.kill(pid_of(await receive_line(stream)), signal.SIGKILL)
            assert await receive_all(stream) == b""

    with trio.fail_after(TEST_TIMEOUT):
        async with serving(FailingHandleError(("127.0.0.1", 0), Commands)) as server:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(steady, server, 25)
                for _ in range(3):
                    await killed_mid_request(server)
                    assert await ask(server, b"exit\n") == b""
                    assert await ask(server, b"raise\n") == b""  # handle_error raises too
            assert len(served) == 100
            assert lost == []
            # The pool still serves, with new workers where old ones died.
            assert await ask(server, b"after\n") != b""
    deaths = [r.getMessage() for r in caplog.records if "while handling the request" in r.message]
    assert sum("was killed by SIGKILL" in m for m in deaths) == 3
    assert sum("exited with status 3" in m for m in deaths) == 3
    assert len(deaths) == 6


async def test_worker_killed_while_idle_loses_no_request(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(Tracked(("127.0.0.1", 0), Commands)) as server:
            idle = pid_of(await ask(server, b"one\n"))
            await server.wait_finished(1)
            # Stopped, the idle worker cannot read what is sent to it: the next request
            # is queued on its socket when it dies, the case a plain kill of an idle
            # worker races with.
            os.kill(idle, signal.SIGSTOP)
            async with await connect(server) as stream:
                await stream.send_all(b"two\n")
                await trio.testing.wait_all_tasks_blocked()  # sent; waiting for "done"
                os.kill(idle, signal.SIGKILL)
                answer = await receive_all(stream)
            assert answer.endswith(b" two\n")
            assert pid_of(answer) != idle
    [record] = [r for r in caplog.records if f"worker process {idle}" in r.message]
    assert "was killed by SIGKILL before it took the request" in record.message


async def test_killed_fork_server_leaves_running_workers_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(Tracked(("127.0.0.1", 0), Commands)) as server:
            worker = pid_of(await ask(server, b"one\n"))
            await server.wait_finished(1)  # the worker is idle again
            (fork_server,) = children_of(os.getpid())
            pidfd = os.pidfd_open(fork_server)
            os.kill(fork_server, signal.SIGKILL)
            try:
                await trio.lowlevel.wait_readable(pidfd)  # it has exited (not reaped yet)
            finally:
                os.close(pidfd)
            # The idle worker does not depend on the fork server ...
            async with await connect(server) as holding:
                await holding.send_all(b"hold\n")
                assert pid_of(await receive_line(holding)) == worker
                # ... but a second worker cannot start: this request is refused, logged.
                assert await ask(server, b"two\n") == b""
                await holding.send_all(b"done\n")
                assert await receive_all(holding) == b""
    broken, refused = [r.message for r in caplog.records if "fork server" in r.message]
    assert f"fork server (pid {fork_server}) has exited" in broken
    assert refused.startswith("cannot hand the request")


# -- families -----------------------------------------------------------------------


async def test_udp_replies_come_from_workers() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingUDPServer(("127.0.0.1", 0), Echo)
        server.max_children = 2  # as in the TCP test: reuse, not a process per datagram
        async with serving(server):
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                pids = set()
                for i in range(10):
                    await client.sendto(b"ping %d" % i, server.server_address)
                    reply = await client.recv(100)
                    assert reply.endswith(b" ping %d" % i)
                    pids.add(pid_of(reply))
            assert os.getpid() not in pids
            assert len(pids) <= 2


async def test_unix_stream_and_datagram(unix_dir: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        path = str(unix_dir / "stream")
        async with serving(ts.ForkingUnixStreamServer(path, Commands)):
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                await client.connect(path)
                await client.send(b"unix\n")
                stream = trio.SocketStream(client)
                answer = await receive_all(stream)
            assert answer.endswith(b" unix\n")
            assert pid_of(answer) != os.getpid()
        path = str(unix_dir / "datagram")
        async with serving(ts.ForkingUnixDatagramServer(path, Echo)):
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
                await client.bind(str(unix_dir / "client"))
                await client.sendto(b"ping", path)
                reply = await client.recv(100)
            assert reply.endswith(b" ping")
            assert pid_of(reply) != os.getpid()
        assert not Path(path).exists()  # noqa: ASYNC240 - a stat, no waiting


# -- where the handler class comes from --------------------------------------------


async def test_handler_class_defined_in_a_function() -> None:
    closure = b"from the enclosing function"

    class Local(ts.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"%d %s\n" % (os.getpid(), closure))

    with trio.fail_after(TEST_TIMEOUT):
        async with serving(ts.ForkingTCPServer(("127.0.0.1", 0), Local)) as server:
            answer = await ask(server, b"")
    assert answer.endswith(closure + b"\n")
    assert pid_of(answer) != os.getpid()


MAIN_SCRIPT = """
    import os, socket, threading, trio
    import trio_socketserver as ts

    class Main(ts.StreamRequestHandler):   # lives in __main__ only
        def handle(self):
            self.wfile.write(b"%d %s" % (os.getpid(), self.rfile.readline()))

    async def main():
        print("buffered before the pool started;", end=" ")  # stdout is a pipe: buffered
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Main) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                stream = await trio.open_tcp_stream(*server.server_address)
                await stream.send_all(b"from main\\n")
                reply = b""
                while chunk := await stream.receive_some():
                    reply += chunk
                print(os.getpid(), reply.decode(), end="", flush=True)
                server.shutdown()

    trio.run(main)
"""


def run_script(script: str, tmp_path: Path, *args: str, python: str = sys.executable) -> Any:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("PYTHONUNBUFFERED", None)  # buffered stdout, as usual when it is a pipe
    return subprocess.run(
        [python, *args, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def test_handler_class_defined_in_a_main_script(tmp_path: Path) -> None:
    result = run_script(MAIN_SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr
    # Written once: the buffer was flushed before the fork, so no worker repeats it.
    before, printed = result.stdout.split("; ")
    assert before == "buffered before the pool started"
    server_pid, worker_pid, text = printed.split(maxsplit=2)
    assert text == "from main\n"
    assert worker_pid != server_pid


# -- semantics that differ from the stdlib ---------------------------------------


async def test_reused_worker_keeps_state_and_sees_the_process_as_serving_started() -> None:
    global GREETING
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.max_children = 1
        GREETING = b"set after the constructor"  # seen: the workers are forked later
        try:
            async with serving(server):
                GREETING = b"changed while serving"  # not seen by the running workers
                answers = [await ask(server, b"count\n") for _ in range(3)]
        finally:
            GREETING = b"as constructed"
    assert [a.split(b"\n")[1] for a in answers] == [
        b"1 set after the constructor",
        b"2 set after the constructor",
        b"3 set after the constructor",
    ]
    assert REQUESTS_SEEN == 0  # the workers' counter, not ours


class Inherited(ts.StreamRequestHandler):
    """Uses what the server process opened before serving: ``server.log`` (a file) and
    ``server.channel`` (one end of a socket pair); answers what became of them."""

    def handle(self) -> None:
        self.server.log.write(f"from worker {os.getpid()}\n")
        self.server.log.flush()
        try:
            self.server.channel.send(b"from the worker")
            channel = b"open"
        except BrokenPipeError:
            channel = b"dead end" if self.server.channel.recv(1) == b"" else b"?"
        self.wfile.write(b"%d %s\n" % (os.getpid(), channel))


def link_ids(pid: int, kinds: tuple[str, ...] = ("socket:", "pipe:")) -> set[str]:
    """What the fds of ``pid`` refer to, for sockets and pipes ("socket:[1234]")."""
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
        if int(name) > 2 and target.startswith(kinds):
            found.add(target)
    return found


async def test_children_hold_none_of_the_server_processes_sockets_pipes_or_epoll() -> None:
    """Sockets, pipes and trio's epoll of the server process (open when serving starts) are
    not held by the fork server or an idle worker; they have their own, and dead ends."""
    read_end, write_end = os.pipe()
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with serving(Tracked(("127.0.0.1", 0), Commands)) as server:
                worker = pid_of(await ask(server, b"one\n"))
                await server.wait_finished(1)
                (fork_server,) = children_of(os.getpid())
                ours = link_ids(os.getpid())
                assert f"pipe:[{os.fstat(read_end).st_ino}]" in ours
                for child in (fork_server, worker):
                    assert not link_ids(child) & ours
                    assert not link_ids(child, ("anon_inode:",))  # trio's epoll, eventfds
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_files_stay_and_released_sockets_are_dead_ends(tmp_path: Path) -> None:
    """A log file opened before serving is written by the workers; a socket the program
    holds reads as closed in them and fails to write, however the program uses it."""
    log_path = tmp_path / "log"
    ours, theirs = socket.socketpair()
    try:
        with open(log_path, "a") as log, trio.fail_after(TEST_TIMEOUT):  # noqa: ASYNC230
            server = ts.ForkingTCPServer(("127.0.0.1", 0), Inherited)
            server.log, server.channel = log, ours
            async with serving(server):
                answer = await ask(server, b"")
        assert answer.endswith(b" dead end\n")
        assert log_path.read_text() == f"from worker {pid_of(answer)}\n"
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)  # nothing came through
    finally:
        ours.close()
        theirs.close()


async def test_pass_fds_keeps_an_inherited_socket_for_the_workers(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    try:
        with open(tmp_path / "log", "a") as log, trio.fail_after(TEST_TIMEOUT):  # noqa: ASYNC230
            server = ts.ForkingTCPServer(("127.0.0.1", 0), Inherited)
            server.log, server.channel = log, ours
            server.pass_fds = [ours.fileno()]
            async with serving(server):
                assert (await ask(server, b"")).endswith(b" open\n")
        assert theirs.recv(100) == b"from the worker"
    finally:
        ours.close()
        theirs.close()


class Syslog(ts.StreamRequestHandler):
    """Logs one record through ``server.syslog``, a SysLogHandler connected before serving."""

    def handle(self) -> None:
        record = logging.makeLogRecord({"msg": f"from worker {os.getpid()}"})
        self.server.syslog.handle(record)
        self.wfile.write(b"%d logged\n" % os.getpid())


async def test_a_syslog_handler_connected_before_serving_reconnects_from_the_worker(
    unix_dir: Path,
) -> None:
    """Its socket is a dead end in the worker; SysLogHandler reconnects on the error."""
    path = str(unix_dir / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog_daemon:
        syslog_daemon.bind(path)
        syslog = logging.handlers.SysLogHandler(address=path)
        try:
            with trio.fail_after(TEST_TIMEOUT):
                server = ts.ForkingTCPServer(("127.0.0.1", 0), Syslog)
                server.syslog = syslog
                async with serving(server):
                    worker = pid_of(await ask(server, b""))
            syslog_daemon.settimeout(TEST_TIMEOUT)
            assert syslog_daemon.recv(1000).endswith(b"from worker %d\x00" % worker)
        finally:
            syslog.close()


async def test_in_a_worker_collect_children_and_server_close_do_nothing() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(ts.ForkingTCPServer(("127.0.0.1", 0), Commands)) as server:
            worker = pid_of(await ask(server, b"close\n"))
            assert pid_of(await ask(server, b"again\n")) in {worker, *server.active_children}


async def test_collect_children_forgets_workers_that_died_while_idle() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(Tracked(("127.0.0.1", 0), Commands)) as server:
            worker = pid_of(await ask(server, b"one\n"))
            await server.wait_finished(1)
            assert server.active_children == {worker}
            os.kill(worker, signal.SIGKILL)
            assert wait_for_exit({worker}, TEST_TIMEOUT) == set()
            server.collect_children()
            assert server.active_children == set()
            assert pid_of(await ask(server, b"two\n")) != worker


async def test_collect_children_blocking_stops_the_pool_and_later_requests_start_one() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(Tracked(("127.0.0.1", 0), Commands)) as server:
            first = pid_of(await ask(server, b"one\n"))
            await server.wait_finished(1)
            (fork_server,) = children_of(os.getpid())
            server.collect_children(blocking=True)
            assert server.active_children == set()
            assert children_of(os.getpid()) == set()
            assert wait_for_exit({first, fork_server}, 0) == set()
            second = pid_of(await ask(server, b"two\n"))
            assert second != first
            assert server.active_children == {second}


async def test_collect_children_blocking_lets_a_busy_worker_finish_its_request() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with serving(Tracked(("127.0.0.1", 0), Commands)) as server:
            async with await connect(server) as holding:
                await holding.send_all(b"hold\n")
                busy = pid_of(await receive_line(holding))
                server.collect_children(blocking=True)
                assert server.active_children == {busy}  # until its request ends
                fresh = pid_of(await ask(server, b"two\n"))  # from a new pool
                assert fresh != busy
                await holding.send_all(b"done\n")
                assert await receive_all(holding) == b""
            await server.wait_finished(2)
            assert wait_for_exit({busy}, TEST_TIMEOUT) == set()
            assert server.active_children == {fresh}


async def test_service_actions_collect_children_as_the_stdlib() -> None:
    calls: list[bool] = []

    class Counting(ts.ForkingTCPServer):
        def collect_children(self, *, blocking: bool = False) -> None:
            calls.append(blocking)
            super().collect_children(blocking=blocking)

    with trio.fail_after(TEST_TIMEOUT):
        async with serving(Counting(("127.0.0.1", 0), Commands)) as server:
            await ask(server, b"one\n")  # accepted, then service_actions()
    assert False in calls


async def test_max_requests_per_child_must_be_a_positive_int_or_none() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            server.max_requests_per_child = 0
            with pytest.raises(ValueError, match="max_requests_per_child must be a positive"):
                await server.handle_request()
            server.max_requests_per_child = None
            server.pass_fds = ["not an fd"]  # type: ignore[list-item]
            with pytest.raises(ValueError, match="pass_fds must be file descriptors"):
                await server.handle_request()


# -- stopping -------------------------------------------------------------------------


async def test_grace_expiry_shuts_the_connection_and_keeps_the_worker() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.shutdown_grace = 0
        async with server:
            worker, rest = await stop_during_a_request(server, b"hold\n")
            # serve_forever has returned: the handler's readline() failed when the
            # connection was shut down, it returned, and the worker went back to the pool.
            assert server.statistics().cancelled_requests == 1
            assert server.active_children == {worker}
            assert rest == b""


async def test_request_deadline_shuts_the_connection_and_keeps_the_worker() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = Tracked(("127.0.0.1", 0), Commands)
        server.request_deadline = 0.5
        async with serving(server):
            start = trio.current_time()
            async with await connect(server) as stream:
                await stream.send_all(b"hold\n")
                worker = pid_of(await receive_line(stream))
                # The handler waits for a second line that never comes: cut at the deadline.
                assert await receive_all(stream) == b""
            assert trio.current_time() - start >= 0.5
            await server.wait_finished(1)  # its worker returned and is idle again
            async with await connect(server) as stream:
                await stream.send_all(b"again\n")
                assert pid_of(await receive_line(stream)) == worker  # back in the pool
    assert server.statistics().cancelled_requests == 1


async def test_stuck_worker_is_terminated_after_the_release_timeout(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler waits for a signal, not on its socket, so only SIGTERM ends it. The
    # timeout is shortened so the test does not wait a real second for it.
    monkeypatch.setattr(_mixin, "WORKER_RELEASE_TIMEOUT", 0.05)
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.shutdown_grace = 0
        async with server:
            worker, rest = await stop_during_a_request(server, b"stuck\n")
            assert worker not in server.active_children
            assert rest == b""
    [record] = [r for r in caplog.records if "still handling" in r.message]
    assert f"worker process {worker}" in record.message
    assert "SIGTERM" in record.message


async def test_hard_stop_cuts_in_flight_requests() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            _, rest = await stop_during_a_request(server, b"hold\n", hard=True)
            assert server.statistics().cancelled_requests == 1
            assert rest == b""


async def test_shutdown_from_a_handler_in_a_worker_stops_the_server() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                assert (await ask(server, b"shutdown\n")).endswith(b" shutdown\n")
            # the nursery exited: serve_forever returned on the worker's request
            assert not server.statistics().serving


async def test_block_on_close_false_kills_the_workers() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.block_on_close = False
        async with serving(server):
            worker = pid_of(await ask(server, b"one\n"))
    # server_close() reaped the fork server, which had killed and reaped its workers.
    assert children_of(os.getpid()) == set()
    assert wait_for_exit({worker}, 0) == set()


SERVER_SCRIPT = """
    import json, os, sys, time, trio
    import trio_socketserver as ts
    sys.path.insert(0, sys.argv[1])
    from test_forking import Commands

    async def main():
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            # A child of the application's own, forked while the pool runs: it must not
            # keep the pool's sockets open, or the pool would not see the server die.
            bystander = os.fork()
            if bystander == 0:
                time.sleep(60)
                os._exit(0)
            print(json.dumps([server.server_address, bystander]), flush=True)
            await trio.sleep_forever()   # until SIGKILL

    trio.run(main)
"""


def test_workers_exit_when_the_server_process_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "server.py"
    path.write_text(textwrap.dedent(SERVER_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    server = subprocess.Popen(
        [sys.executable, str(path), str(REPO / "tests")], stdout=subprocess.PIPE, env=env
    )
    clients: list[socket.socket] = []
    bystander = None
    try:
        assert server.stdout is not None
        address, pid = json.loads(server.stdout.readline())
        address = tuple(address)
        bystander = os.pidfd_open(pid)
        workers = set()
        for _ in range(3):  # three busy workers ...
            client = socket.create_connection(address, timeout=SUBPROCESS_TIMEOUT)
            clients.append(client)
            client.sendall(b"hold\n")
            workers.add(int(client.recv(100).split()[0]))
        clients[-1].sendall(b"done\n")  # ... one of them idle again
        assert clients[-1].recv(100) == b""
        (fork_server,) = children_of(server.pid) - {pid}
        assert {parent_of(worker) for worker in workers} == {fork_server}
        server.kill()
        server.wait(SUBPROCESS_TIMEOUT)
        # The fork server sees its control socket close and stops every worker (busy
        # ones with SIGTERM), so all go within one WORKER_KILL_TIMEOUT or so; 10 s is
        # slack for a loaded machine, well short of the bystander's 60 s.
        assert wait_for_exit({fork_server, *workers}, 10) == set()
        for client in clients[:2]:
            assert client.recv(100) == b""
    finally:
        for client in clients:
            client.close()
        if bystander is not None:
            signal.pidfd_send_signal(bystander, signal.SIGKILL)
            os.close(bystander)
        if server.poll() is None:
            server.kill()
            server.wait(SUBPROCESS_TIMEOUT)
        if server.stdout is not None:
            server.stdout.close()


# -- forking and threads ----------------------------------------------------------------


async def test_strict_fork_safety_refuses_busy_threads_with_one_clear_error() -> None:
    release = threading.Event()
    thread = threading.Thread(target=_spin_until, args=(release,), name="busy test thread")
    thread.start()
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
                server.fork_safety = "strict"
                assert children_of(os.getpid()) == set()  # not forked at construction
                with pytest.raises(ts.ForkSafetyError, match=r"other threads \(busy test thread\)"):
                    await server.serve_forever()  # raises before it starts serving
    finally:
        release.set()
        thread.join(TEST_TIMEOUT)
    assert children_of(os.getpid()) == set()
    assert issubclass(ts.ForkSafetyError, RuntimeError)


def _spin_until(release: threading.Event) -> None:
    """Busy in Python code (not waiting) until ``release`` is set."""
    while not release.is_set():
        sum(range(1000))


async def test_warn_fork_safety_forks_anyway_and_names_the_busy_threads() -> None:
    release = threading.Event()
    thread = threading.Thread(target=_spin_until, args=(release,), name="busy test thread")
    thread.start()
    try:
        with trio.fail_after(TEST_TIMEOUT):
            server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
            assert server.fork_safety == "warn"  # the default
            with pytest.warns(ts.ForkSafetyWarning, match=r"busy \(busy test thread\)"):
                async with serving(server):
                    assert (await ask(server, b"served\n")).endswith(b" served\n")
            server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
            server.fork_safety = "off"
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                async with serving(server):
                    assert (await ask(server, b"served\n")).endswith(b" served\n")
    finally:
        release.set()
        thread.join(TEST_TIMEOUT)


async def test_quiet_threads_pass_the_strict_check() -> None:
    """Threads that wait (an idle QueueListener, ThreadPoolExecutor and trio thread, a
    thread blocked reading a socket) hold no lock a worker could need."""
    listener = logging.handlers.QueueListener(queue.Queue())
    listener.start()
    executor = concurrent.futures.ThreadPoolExecutor(1)
    reader, writer = socket.socketpair()
    blocked = threading.Thread(target=reader.recv, args=(1,), name="blocked reader")
    try:
        executor.submit(lambda: None).result()
        blocked.start()
        await trio.to_thread.run_sync(lambda: None)  # an idle trio thread from now on
        with trio.fail_after(TEST_TIMEOUT):
            server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
            server.fork_safety = "strict"
            async with serving(server):
                assert (await ask(server, b"served\n")).endswith(b" served\n")
    finally:
        writer.send(b"x")
        blocked.join(TEST_TIMEOUT)
        listener.stop()
        executor.shutdown()
        reader.close()
        writer.close()


def test_the_idle_waits_of_threading_and_trio_are_found() -> None:
    """The check knows idle threads by where they wait, some of it private names of trio
    and the stdlib, looked up by name. If trio (or Python) moves them, idle threads would
    count as busy: this fails first, loudly."""
    for wait in _safety.IDLE_WAITS:
        if wait[0] == "trio_socketserver._threading":
            continue  # the engine's own handler threads may go (trio.to_thread instead)
        if wait[1] == "Thread._wait_for_tstate_lock" and sys.version_info >= (3, 13):
            continue  # join() waits in Thread.join itself from 3.13
        assert _safety.idle_wait_code([wait]), f"{wait} no longer resolves"


async def test_fork_safety_must_be_a_known_mode() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            server.fork_safety = "sometimes"
            with pytest.raises(ValueError, match="fork_safety must be one of 'strict', 'warn'"):
                await server.handle_request()


def python_312() -> str | None:
    """An interpreter >= 3.12 that can import trio and attrs (its fork() warns on threads)."""
    candidates = [os.environ.get("TRIO_SOCKETSERVER_PY312", ""), "/tmp/v312/bin/python"]
    if sys.version_info >= (3, 12):
        candidates.insert(0, sys.executable)
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            probe = subprocess.run(
                [candidate, "-c", "import sys, trio, attrs; assert sys.version_info >= (3, 12)"],
                capture_output=True,
                timeout=SUBPROCESS_TIMEOUT,
                check=False,
            )
            if probe.returncode == 0:
                return candidate
    return None


THREADED_SCRIPT = """
    import os, socket, threading, trio
    import trio_socketserver as ts

    class Pid(ts.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d\\n" % os.getpid())

    def clients(address, replies):
        for _ in range(5):
            with socket.create_connection(address, timeout=30) as client:
                replies.append(client.makefile("rb").readline())

    async def main():
        await trio.to_thread.run_sync(lambda: None)  # an idle trio thread exists from now on
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Pid) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                replies = []
                thread = threading.Thread(target=clients, args=(server.server_address, replies))
                thread.start()  # workers are forked while this thread runs
                await trio.to_thread.run_sync(thread.join)
                server.shutdown()
        assert len(replies) == 5 and all(int(r) != os.getpid() for r in replies), replies
        print("served", len(replies), flush=True)

    trio.run(main)
"""

NAIVE_FORK = """
    import os, threading
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    release.set()
    thread.join()
"""


def test_no_fork_deprecation_warning_on_python_312(tmp_path: Path) -> None:
    python = python_312()
    if python is None:
        pytest.skip("no Python >= 3.12 with trio and attrs (set TRIO_SOCKETSERVER_PY312)")
    # CPython swallows its fork-with-threads warning under "-W error", so the warning is
    # made visible ("always") and every other DeprecationWarning is an error.
    flags = ["-W", "error::DeprecationWarning", "-W", "always:This process:DeprecationWarning"]
    control = run_script(NAIVE_FORK, tmp_path, *flags, python=python)
    assert "is multi-threaded, use of fork()" in control.stderr  # the check can fail
    result = run_script(THREADED_SCRIPT, tmp_path, *flags, python=python)
    assert result.returncode == 0, result.stderr
    assert "served 5" in result.stdout
    assert "DeprecationWarning" not in result.stderr


def test_the_stdlib_defaults_of_the_mixin() -> None:
    assert (ts.ForkingMixIn.max_children, ts.ForkingMixIn.timeout) == (40, 300)
    assert ts.ForkingMixIn.active_children is None
    assert ts.ForkingMixIn.block_on_close is True


async def test_max_children_must_be_a_positive_int() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            server.max_children = 0
            with pytest.raises(ValueError, match="max_children must be a positive int"):
                await server.handle_request()
