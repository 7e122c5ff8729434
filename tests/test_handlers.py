# Request handlers as a handler author sees them: what self.request / rfile / wfile are in an
# async handler, the rbufsize / wbufsize / timeout / disable_nagle_algorithm attributes, and
# the setup() -> handle() -> finish() sequence, for async and sync handlers.
from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import socket
import termios
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trio_socketserver as ts
from conftest import AsyncEcho, connect, receive_all, receive_line, serving
from trio_socketserver.testing import open_handler

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)


def unread_bytes(stream: trio.SocketStream) -> int:
    """How many bytes the kernel holds for ``stream`` that nobody read yet (FIONREAD).

    Loopback delivers a send into the peer's receive queue before send() returns, so this
    tells, without waiting, whether the server has sent anything.
    """
    count = array.array("i", [0])
    fcntl.ioctl(stream.socket.fileno(), termios.FIONREAD, count)
    return count[0]


async def exchange(server: Any, data: bytes) -> bytes:
    """Send ``data``, half-close, and return everything the server sends back."""
    async with await connect(server) as client:
        await client.send_all(data)
        await client.send_eof()
        return await receive_all(client)


# -- what an async handler gets ----------------------------------------------------------


async def test_async_handler_sees_trio_objects() -> None:
    seen: dict[str, Any] = {}

    class Inspect(ts.StreamRequestHandler):
        async def handle(self) -> None:
            seen.update(
                request=self.request,
                connection=self.connection,
                client_address=self.client_address,
                server=self.server,
                rfile=self.rfile,
                wfile=self.wfile,
            )

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Inspect)) as server,
            await connect(server) as client,
        ):
            assert await receive_all(client) == b""
            client_address = client.socket.getsockname()
    assert isinstance(seen["request"], trio.SocketStream)
    assert seen["connection"] is seen["request"]
    assert seen["client_address"] == client_address
    assert seen["server"] is server
    assert isinstance(seen["rfile"], ts.StreamReader)
    assert isinstance(seen["wfile"], ts.StreamWriter)


async def test_request_and_wfile_write_to_the_same_connection_in_order() -> None:
    # self.request is made when the handler first asks for it (most handlers never do): it
    # must be the very connection rfile/wfile use, with what was sent before it in order.
    class Mixed(ts.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            await self.wfile.write(b"wfile " + line)
            await self.request.send_all(b"request " + line)
            await self.wfile.write(b"wfile again\n")

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Mixed)) as server:
            assert await exchange(server, b"one\n") == b"wfile one\nrequest one\nwfile again\n"


@pytest.mark.parametrize("override", ["finish_request", "handler __init__"])
async def test_overrides_that_see_the_request_get_the_trio_stream(override: str) -> None:
    seen: list[Any] = []

    class Echo(ts.StreamRequestHandler):
        async def handle(self) -> None:
            seen.append(self.request)
            await self.wfile.write(await self.rfile.readline())

    class OwnInit(Echo):
        def __init__(self, request: Any, client_address: Any, server: Any) -> None:
            seen.append(request)
            super().__init__(request, client_address, server)

    class OwnFinishRequest(ts.TCPServer):
        def finish_request(self, request: Any, client_address: Any) -> Any:
            seen.append(request)
            return super().finish_request(request, client_address)

    if override == "finish_request":
        server_class, handler_class = OwnFinishRequest, Echo
    else:
        server_class, handler_class = ts.TCPServer, OwnInit
    with trio.fail_after(5):
        async with serving(server_class(LOCALHOST, handler_class)) as server:
            assert await exchange(server, b"ping\n") == b"ping\n"
    assert len(seen) == 2
    assert isinstance(seen[0], trio.SocketStream)
    assert seen[1] is seen[0]


async def test_a_handler_may_assign_self_request() -> None:
    seen: list[Any] = []

    class Replaced(ts.StreamRequestHandler):
        async def setup(self) -> None:
            await super().setup()
            self.request = "mine"

        async def handle(self) -> None:
            seen.append(self.request)

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Replaced)) as server:
            await exchange(server, b"")
    assert seen == ["mine"]


async def test_each_async_handler_runs_in_its_own_task() -> None:
    blocked = trio.Event()

    class Echo(ts.StreamRequestHandler):
        async def handle(self) -> None:
            blocked.set()
            async for line in self.rfile:
                await self.wfile.write(line)

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Echo)) as server,
            await connect(server) as silent,
        ):
            await blocked.wait()  # the first handler waits on a client that sends nothing
            async with await connect(server) as other:
                await other.send_all(b"served\n")
                assert await receive_line(other) == b"served\n"
            await silent.send_all(b"me too\n")
            assert await receive_line(silent) == b"me too\n"


async def test_rfile_readline_read_readexactly_and_iteration() -> None:
    class Reader(ts.StreamRequestHandler):
        async def handle(self) -> None:
            parts = [
                await self.rfile.readline(4),  # a limit splits a long line
                await self.rfile.readline(),
                await self.rfile.read(3),
                await self.rfile.readexactly(2),
            ]
            parts += [line async for line in self.rfile]
            await self.wfile.write(repr(parts).encode())

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Reader)) as server:
            reply = await exchange(server, b"abcdefg\nxyzAB1\n2\n3")
    assert reply == repr([b"abcd", b"efg\n", b"xyz", b"AB", b"1\n", b"2\n", b"3"]).encode()


async def test_readexactly_at_eof_raises_incomplete_read() -> None:
    errors: list[BaseException] = []

    class Exact(ts.StreamRequestHandler):
        async def handle(self) -> None:
            try:
                await self.rfile.readexactly(10)
            except ts.IncompleteReadError as exc:
                errors.append(exc)

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Exact)) as server:
            await exchange(server, b"short")
    [error] = errors
    assert (error.partial, error.expected) == (b"short", 10)  # type: ignore[attr-defined]


async def test_readline_limit_bounds_an_endless_line() -> None:
    class Limited(ts.StreamRequestHandler):
        rbufsize = 1024

        async def handle(self) -> None:
            line = await self.rfile.readline(100)
            await self.wfile.write(b"%d\n" % len(line))

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Limited)) as server,
            await connect(server) as client,
        ):
            # A line with no end: the handler answers after 100 bytes, not at EOF.
            await client.send_all(b"x" * 5000)
            assert await receive_line(client) == b"100\n"


async def test_rbufsize_bounds_what_the_reader_takes_from_the_connection() -> None:
    class OneByte(ts.StreamRequestHandler):
        rbufsize = 1

        async def handle(self) -> None:
            first = await self.rfile.readline()
            # Reading byte by byte, the reader took nothing past the line: the rest is
            # still on the connection itself.
            rest = await self.request.receive_some()
            await self.wfile.write(first + rest)

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, OneByte)) as server:
            assert await exchange(server, b"line\nrest") == b"line\nrest"


async def test_wbufsize_buffers_until_flush_and_finish_flushes() -> None:
    wrote, flushed = trio.Event(), trio.Event()
    flush, last = trio.Event(), trio.Event()

    class Buffered(ts.StreamRequestHandler):
        wbufsize = 1024

        async def handle(self) -> None:
            await self.wfile.write(b"one\n")
            wrote.set()
            await flush.wait()
            await self.wfile.flush()
            flushed.set()
            await last.wait()
            await self.wfile.write(b"two\n")  # buffered, then sent by finish()

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Buffered)) as server,
            await connect(server) as client,
        ):
            await wrote.wait()
            assert unread_bytes(client) == 0
            flush.set()
            await flushed.wait()
            assert unread_bytes(client) == 4
            last.set()
            assert await receive_all(client) == b"one\ntwo\n"


async def test_wbufsize_zero_sends_each_write_at_once() -> None:
    wrote, done = trio.Event(), trio.Event()

    class Unbuffered(ts.StreamRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(b"now\n")
            wrote.set()
            await done.wait()

    with trio.fail_after(5):
        async with (
            serving(ts.TCPServer(LOCALHOST, Unbuffered)) as server,
            await connect(server) as client,
        ):
            await wrote.wait()
            assert unread_bytes(client) == 4
            done.set()
            assert await receive_all(client) == b"now\n"


@pytest.mark.parametrize("sent", [b"", b"half a li"], ids=["silent", "half-line"])
async def test_handler_timeout_bounds_a_stuck_client(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")

    class Lines(AsyncEcho):
        timeout = 2.0

    with trio.fail_after(60):
        async with (
            serving(ts.TCPServer(LOCALHOST, Lines)) as server,
            await connect(server) as client,
        ):
            await client.send_all(b"ok\n" + sent)
            assert await receive_line(client) == b"ok\n"
            start = trio.current_time()
            assert await receive_all(client) == b""  # the server hung up on it
            assert trio.current_time() - start == pytest.approx(2.0)
    assert server.statistics().failed_requests == 1
    assert "TimeoutError" in caplog.text


async def test_handler_timeout_bounds_a_client_that_stops_reading(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")
    chunk = b"x" * 2**20
    stuck_at: list[float] = []
    gave_up = trio.Event()

    class Flood(ts.StreamRequestHandler):
        timeout = 2.0

        async def handle(self) -> None:
            try:
                for _ in range(256):  # far more than the socket buffers hold
                    await self.wfile.write(chunk)
            finally:
                stuck_at.append(trio.current_time())
                gave_up.set()

    with trio.fail_after(60):
        async with (
            serving(ts.TCPServer(LOCALHOST, Flood)) as server,
            await connect(server),  # a client that never reads
        ):
            start = trio.current_time()
            await gave_up.wait()
    # The last send waited 2 s for a peer that did not read, then the handler ended.
    assert stuck_at[0] - start == pytest.approx(2.0)
    assert "TimeoutError" in caplog.text


# -- read_deadline / write_deadline ----------------------------------------------------------


async def test_read_deadline_bounds_a_trickled_line_and_the_handler_may_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Commands(ts.StreamRequestHandler):
        timeout = 2.0  # a silent client: 2 s
        read_deadline = 5.0  # one command line: 5 s in all

        async def handle(self) -> None:
            try:
                while line := await self.rfile.readline(1024):
                    await self.wfile.write(b"ok " + line)
            except TimeoutError:
                await self.wfile.write(b"too slow\n")
                raise

    async with open_handler(Commands) as client:
        await client.send_all(b"fast\n")
        assert await client.receive_line() == b"ok fast\n"
        start = trio.current_time()
        for byte in b"slo":  # 1.5 s apart: inside the timeout every time
            await trio.sleep(1.5)
            await client.send_all(bytes([byte]))
        assert await client.receive_line() == b"too slow\n"
        assert trio.current_time() - start == pytest.approx(5)
        assert await client.receive_all() == b""
    assert isinstance(client.error, TimeoutError)
    assert str(client.error) == "read took longer than its deadline of 5.0 s"


async def test_read_deadline_cuts_a_trickling_client_while_another_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")

    class Echo(AsyncEcho):
        read_deadline = 1.0

    async def trickle(stream: trio.SocketStream, until: trio.Event) -> None:
        # A byte every 0.1 s and never a newline: each wait is short, the line endless.
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(100):
                if until.is_set():
                    return
                await stream.send_all(b"x")
                await trio.sleep(0.1)

    async def chat(stream: trio.SocketStream, until: trio.Event) -> None:
        for i in range(100_000):
            if until.is_set():
                return
            await stream.send_all(b"%d\n" % i)
            assert await receive_line(stream) == b"%d\n" % i
            served.append(i)

    served: list[int] = []
    cut = trio.Event()
    with trio.fail_after(10):
        async with (
            serving(ts.TCPServer(LOCALHOST, Echo)) as server,
            await connect(server) as normal,
        ):
            start = trio.current_time()
            async with await connect(server) as trickler, trio.open_nursery() as nursery:
                nursery.start_soon(trickle, trickler, cut)
                nursery.start_soon(chat, normal, cut)
                assert await receive_all(trickler) == b""  # the server hung up on it
                elapsed = trio.current_time() - start
                cut.set()
            await normal.send_all(b"still here\n")
            assert await receive_line(normal) == b"still here\n"
    # Cut no sooner than the deadline (a loaded machine may take longer).
    assert Echo.read_deadline <= elapsed < Echo.read_deadline + 4
    assert served  # the normal client was answered while the trickler was held
    stats = server.statistics()
    assert (stats.failed_requests, stats.finished_requests) == (1, 1)
    [record] = [r for r in caplog.records if "deadline" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None  # a peer error: no traceback
    assert "read took longer than its deadline of 1.0 s" in record.getMessage()


async def test_write_deadline_cuts_a_client_reading_a_large_reply_slowly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_socketserver")
    reply_size = 32 * 2**20
    # Small kernel buffers on both ends, so the client's pace reaches the write at once.
    buffer_size = 16384
    write_time: list[float] = []
    gave_up = trio.Event()

    class Download(ts.StreamRequestHandler):
        write_deadline = 1.0

        async def handle(self) -> None:
            self.request.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
            await self.rfile.readline()
            start = trio.current_time()
            try:
                await self.wfile.write(b"x" * reply_size)
            finally:
                write_time.append(trio.current_time() - start)
                gave_up.set()

    received = 0
    with trio.fail_after(10):
        async with serving(ts.TCPServer(LOCALHOST, Download)) as server:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
            await sock.connect(server.server_address)
            async with trio.SocketStream(sock) as client:
                await client.send_all(b"GET\n")
                # 50 KiB/s, for as long as the server keeps trying.
                while not gave_up.is_set():
                    received += len(await client.receive_some(5 * 1024))
                    await trio.sleep(0.1)
    assert Download.write_deadline <= write_time[0] < Download.write_deadline + 4
    assert 0 < received < 2**20  # a sliver of the 32 MiB
    assert server.statistics().failed_requests == 1
    [record] = [r for r in caplog.records if "deadline" in r.getMessage()]
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "write took longer than its deadline of 1.0 s" in record.getMessage()


@pytest.mark.parametrize("name", ["read_deadline", "write_deadline"])
async def test_a_sync_handler_with_a_read_or_write_deadline_is_refused(name: str) -> None:
    class Sync(ts.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())

    setattr(Sync, name, 5.0)
    async with ts.TCPServer(LOCALHOST, Sync) as server:
        with pytest.raises(
            ValueError, match=rf"^Sync\.{name} is set, but its handle\(\) is a plain def"
        ):
            await server.serve_forever()


@pytest.mark.parametrize("disable", [False, True])
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_disable_nagle_algorithm_sets_tcp_nodelay(disable: bool, is_async: bool) -> None:
    seen: list[int] = []

    class Async(ts.StreamRequestHandler):
        disable_nagle_algorithm = disable

        async def handle(self) -> None:
            seen.append(self.request.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    class Sync(ts.StreamRequestHandler):
        disable_nagle_algorithm = disable

        def handle(self) -> None:
            seen.append(self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Async if is_async else Sync)) as server:
            await exchange(server, b"")
    assert [bool(v) for v in seen] == [disable]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_unix_stream_handler_with_nagle_disabled(unix_dir: Path, is_async: bool) -> None:
    # One handler class for TCP and Unix: the option is meaningless on a Unix socket, and
    # must be harmless there (setting TCP_NODELAY on it would fail every request).
    class AsyncEcho(ts.StreamRequestHandler):
        disable_nagle_algorithm = True

        async def handle(self) -> None:
            await self.wfile.write(await self.rfile.readline())

    class SyncEcho(ts.StreamRequestHandler):
        disable_nagle_algorithm = True

        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())

    path = str(unix_dir / "s.sock")
    handler = AsyncEcho if is_async else SyncEcho
    with trio.fail_after(5):
        async with (
            serving(ts.UnixStreamServer(path, handler)),
            await trio.open_unix_socket(path) as client,
        ):
            await client.send_all(b"unix\n")
            assert await receive_line(client) == b"unix\n"


# -- setup / handle / finish ----------------------------------------------------------------


def sequence_handler(log: list[str], *, is_async: bool, fail_in: str = "") -> type[Any]:
    """A StreamRequestHandler recording setup/handle/finish, raising in ``fail_in``."""

    def step(name: str) -> None:
        log.append(name)
        if name == fail_in:
            raise ValueError(f"{name} failed")

    if is_async:

        class Async(ts.StreamRequestHandler):
            async def setup(self) -> None:
                super().setup()
                await trio.lowlevel.checkpoint()
                step("setup")

            async def handle(self) -> None:
                await self.wfile.write(b"hi\n")
                step("handle")

            async def finish(self) -> None:
                step("finish")
                await super().finish()

        return Async

    class Sync(ts.StreamRequestHandler):
        def setup(self) -> None:
            super().setup()
            step("setup")

        def handle(self) -> None:
            self.wfile.write(b"hi\n")
            step("handle")

        def finish(self) -> None:
            step("finish")
            super().finish()

    return Sync


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("fail_in", "steps"),
    [
        ("", ["setup", "handle", "finish"]),
        ("handle", ["setup", "handle", "finish"]),  # finish() runs even when handle() raises
        ("setup", ["setup"]),  # as the stdlib: a failed setup() is not finished
    ],
    ids=["ok", "handle-raises", "setup-raises"],
)
async def test_setup_handle_finish(is_async: bool, fail_in: str, steps: list[str]) -> None:
    log: list[str] = []
    errors: list[Any] = []

    class Server(ts.TCPServer):
        def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(client_address)

    handler = sequence_handler(log, is_async=is_async, fail_in=fail_in)
    with trio.fail_after(5):
        async with serving(Server(LOCALHOST, handler)) as server:
            reply = await exchange(server, b"")
    assert log == steps
    assert len(errors) == (1 if fail_in else 0)
    assert reply == (b"" if fail_in == "setup" else b"hi\n")


async def test_sync_setup_and_finish_overrides_on_an_async_handler() -> None:
    log: list[str] = []

    class Mixed(ts.BaseRequestHandler):
        def setup(self) -> None:
            log.append("setup")

        async def handle(self) -> None:
            await self.request.send_all(b"hi\n")
            log.append("handle")

        def finish(self) -> None:
            log.append("finish")

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Mixed)) as server:
            assert await exchange(server, b"") == b"hi\n"
    assert log == ["setup", "handle", "finish"]


@pytest.mark.parametrize("base", [ts.BaseRequestHandler, ts.StreamRequestHandler])
async def test_async_overrides_can_await_super_setup_and_finish(base: type) -> None:
    # The natural way to extend an async handler: `await super().setup()` must work for the
    # defaults too, and StreamRequestHandler's setup must still have made rfile/wfile.
    log: list[str] = []

    class Extended(base):  # type: ignore[valid-type, misc]
        async def setup(self) -> None:
            await super().setup()
            log.append("setup")

        async def handle(self) -> None:
            await self.request.send_all(b"hi\n")
            if base is ts.StreamRequestHandler:
                await self.wfile.write(b"also\n")

        async def finish(self) -> None:
            log.append("finish")
            await super().finish()

    with trio.fail_after(5):
        async with serving(ts.TCPServer(LOCALHOST, Extended)) as server:
            reply = await exchange(server, b"")
    assert reply == (b"hi\nalso\n" if base is ts.StreamRequestHandler else b"hi\n")
    assert log == ["setup", "finish"]


async def test_async_datagram_handler_can_await_super_setup() -> None:
    class Upper(ts.DatagramRequestHandler):
        async def setup(self) -> None:
            await super().setup()

        async def handle(self) -> None:
            self.wfile.write(self.rfile.read().upper())

    with trio.fail_after(5):
        async with serving(ts.UDPServer(LOCALHOST, Upper)) as server:
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                await client.sendto(b"ping", server.server_address)
                assert await client.recv(100) == b"PING"
