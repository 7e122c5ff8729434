# Tests of ForkingMixIn (trio_socketserver._forking): sync handlers in a reused pool of
# worker processes. Real sockets and real processes; every server test ends with the leak
# check (fds, threads and child processes as before), and tests that start other
# interpreters bound them with timeouts.
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import connect, receive_all, receive_line, serving
from trio_socketserver import _forking

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
    sleeps in a way a connection shutdown does not interrupt.
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


class Echo(ts.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"%d %s" % (os.getpid(), self.rfile.read()))


class FailingHandleError(ts.ForkingTCPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        raise RuntimeError("handle_error failed on purpose")


async def ask(server: Any, line: bytes) -> bytes:
    """One request on a new TCP connection: everything the server sent before closing."""
    async with await connect(server) as stream:
        await stream.send_all(line)
        return await receive_all(stream)


def pid_of(answer: bytes) -> int:
    return int(answer.split()[0])


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.update(int(p) for p in f.read().split())
    return found


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def wait_for_exit(pids: set[int], timeout: float) -> set[int]:
    """Wait (pidfd, no polling) until every pid has exited; returns those still running."""
    remaining = set()
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            pass  # gone already
    try:
        for pid, fd in fds.items():
            if not _forking._poll_readable(fd, timeout):
                remaining.add(pid)
    finally:
        for fd in fds.values():
            os.close(fd)
    return remaining


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


async def test_handle_request_reuses_one_worker() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            pids = []
            for i in range(3):
                async with await connect(server) as stream:
                    await stream.send_all(b"r%d\n" % i)
                    await server.handle_request()  # returns once the worker is done
                    pids.append(pid_of(await receive_all(stream)))
            assert len(set(pids)) == 1
            assert pids[0] != os.getpid()


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
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            async with await connect(server) as stream:
                await stream.send_all(b"one\n")
                await server.handle_request()
                idle = pid_of(await receive_all(stream))
            # Stopped, the idle worker cannot read what is sent to it: the next request
            # is queued on its socket when it dies, the case a plain kill of an idle
            # worker races with.
            os.kill(idle, signal.SIGSTOP)
            async with await connect(server) as stream, trio.open_nursery() as nursery:
                await stream.send_all(b"two\n")
                nursery.start_soon(server.handle_request)
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
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        async with await connect(server) as stream:
            await stream.send_all(b"one\n")
            await server.handle_request()  # returns with the worker idle again
            worker = pid_of(await receive_all(stream))
        (fork_server,) = children_of(os.getpid())
        pidfd = os.pidfd_open(fork_server)
        os.kill(fork_server, signal.SIGKILL)
        try:
            await trio.lowlevel.wait_readable(pidfd)  # it has exited (not reaped yet)
        finally:
            os.close(pidfd)
        # The idle worker does not depend on the fork server ...
        async with serving(server), await connect(server) as holding:
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


async def test_reused_worker_keeps_state_and_sees_the_process_as_the_pool_started() -> None:
    global GREETING
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.max_children = 1
        GREETING = b"changed after the pool started"
        try:
            async with serving(server):
                answers = [await ask(server, b"count\n") for _ in range(3)]
        finally:
            GREETING = b"as constructed"
    assert [a.split(b"\n")[1] for a in answers] == [
        b"1 as constructed",
        b"2 as constructed",
        b"3 as constructed",
    ]
    assert REQUESTS_SEEN == 0  # the workers' counter, not ours


# -- stopping -------------------------------------------------------------------------


async def test_grace_expiry_shuts_the_connection_and_keeps_the_worker() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.shutdown_grace = 0
        async with server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                stream = await connect(server)
                await stream.send_all(b"hold\n")
                worker = pid_of(await receive_line(stream))
                server.shutdown()
            # serve_forever has returned: the handler's readline() failed when the
            # connection was shut down, it returned, and the worker went back to the pool.
            assert server.statistics().cancelled_requests == 1
            assert server.active_children == {worker}
            assert await receive_all(stream) == b""
            await stream.aclose()


async def test_stuck_worker_is_terminated_after_the_release_timeout(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The handler waits for a signal, not on its socket, so only SIGTERM ends it. The
    # timeout is shortened so the test does not wait a real second for it.
    monkeypatch.setattr(_forking, "WORKER_RELEASE_TIMEOUT", 0.05)
    with trio.fail_after(TEST_TIMEOUT):
        server = ts.ForkingTCPServer(("127.0.0.1", 0), Commands)
        server.shutdown_grace = 0
        async with server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                stream = await connect(server)
                await stream.send_all(b"stuck\n")
                worker = pid_of(await receive_line(stream))
                server.shutdown()
            assert worker not in server.active_children
            assert await receive_all(stream) == b""
            await stream.aclose()
    [record] = [r for r in caplog.records if "still handling" in r.message]
    assert f"worker process {worker}" in record.message
    assert "SIGTERM" in record.message


async def test_hard_stop_cuts_in_flight_requests() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                stream = await connect(server)
                await stream.send_all(b"hold\n")
                await receive_line(stream)
                nursery.cancel_scope.cancel()
            assert server.statistics().cancelled_requests == 1
            assert await receive_all(stream) == b""
            await stream.aclose()


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


@pytest.mark.xfail(
    strict=True,
    reason="the worker pool now starts at the first request, so busy threads fail that "
    "request (logged) instead of serve_forever(); the forking rewrite checks at serving start",
)
async def test_busy_threads_make_serving_fail_with_one_clear_error() -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait, name="busy test thread")
    thread.start()
    try:
        with trio.fail_after(TEST_TIMEOUT):
            async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
                assert children_of(os.getpid()) == set()  # not forked at construction
                with pytest.raises(RuntimeError, match=r"other threads \(busy test thread\)"):
                    await server.serve_forever()  # raises before it starts serving
    finally:
        release.set()
        thread.join(TEST_TIMEOUT)
    assert children_of(os.getpid()) == set()


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


async def test_max_children_must_be_a_positive_int() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with ts.ForkingTCPServer(("127.0.0.1", 0), Commands) as server:
            server.max_children = 0
            with pytest.raises(ValueError, match="max_children must be a positive int"):
                await server.handle_request()
