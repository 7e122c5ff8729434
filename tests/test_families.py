# The four server families as a user meets them: construction (bind, listen, options,
# errors), server_close() and Unix socket files, and datagram requests. Serve-loop and
# lifecycle behaviour shared by every family is in test_server.py.
from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_socketserver as ts
from conftest import (
    AsyncEcho,
    connect,
    have_ipv6_loopback,
    in_thread,
    receive_line,
    serving,
    serving_on_thread,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

LOCALHOST = ("127.0.0.1", 0)


async def echo_once(stream: trio.abc.Stream, data: bytes = b"ping\n") -> bytes:
    async with stream:
        await stream.send_all(data)
        return await receive_line(stream)


# -- construction -----------------------------------------------------------------------


def test_constructor_binds_and_listens() -> None:
    with socket.socket() as client:
        server = ts.TCPServer(LOCALHOST, AsyncEcho)
        try:
            host, port = server.server_address
            assert (host, port != 0) == ("127.0.0.1", True)
            assert server.fileno() == server.socket.fileno() >= 0
            assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            # Listening already: the kernel completes the handshake before serve_forever().
            client.settimeout(5)
            client.connect(server.server_address)
        finally:
            server.server_close()


def test_address_in_use_names_the_address_and_leaks_nothing() -> None:
    first = ts.TCPServer(LOCALHOST, AsyncEcho)
    try:
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError) as caught:
            ts.TCPServer(first.server_address, AsyncEcho)
        assert caught.value.errno == errno.EADDRINUSE
        assert str(first.server_address[1]) in str(caught.value)
        assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        first.server_close()


async def test_bind_and_activate_false_then_manual_bind_and_activate() -> None:
    server = ts.TCPServer(LOCALHOST, AsyncEcho, bind_and_activate=False)
    # Nothing bound yet: the user can still set options on the socket.
    assert server.socket.getsockname() == ("0.0.0.0", 0)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    server.server_bind()
    assert server.server_address[1] != 0
    assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    server.server_activate()
    assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    with trio.fail_after(5):
        async with serving(server):
            assert await echo_once(await connect(server)) == b"ping\n"


@pytest.mark.parametrize("reuse", [False, True])
def test_allow_reuse_address_and_port(reuse: bool) -> None:
    class Server(ts.TCPServer):
        allow_reuse_address = reuse
        allow_reuse_port = reuse

    server = Server(LOCALHOST, AsyncEcho)
    try:
        sock = server.socket
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)) is reuse
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) is reuse
    finally:
        server.server_close()


def test_allow_reuse_port_lets_two_servers_share_a_port() -> None:
    class Server(ts.TCPServer):
        allow_reuse_port = True

    first = Server(LOCALHOST, AsyncEcho)
    try:
        second = Server(first.server_address, AsyncEcho)
        second.server_close()
    finally:
        first.server_close()


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_server() -> None:
    class Server6(ts.TCPServer):
        address_family = socket.AF_INET6

    with trio.fail_after(5):
        async with serving(Server6(("::1", 0), AsyncEcho)) as server:
            assert server.socket.family == socket.AF_INET6
            assert server.server_address[0] == "::1"
            assert await echo_once(await connect(server)) == b"ping\n"


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss(8) to read the backlog")
def test_request_queue_size_is_the_listen_backlog() -> None:
    class Server(ts.TCPServer):
        request_queue_size = 7

    server = Server(LOCALHOST, AsyncEcho)
    try:
        port = server.server_address[1]
        out = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
        # For a listening socket ss shows the backlog in the Send-Q column.
        state, _recv_q, send_q, *_ = out.split()
        assert (state, send_q) == ("LISTEN", "7")
    finally:
        server.server_close()


def test_allow_reuse_address_never_takes_a_port_someone_listens_on() -> None:
    class Restartable(ts.TCPServer):
        allow_reuse_address = True

    first = Restartable(LOCALHOST, AsyncEcho)
    try:
        with pytest.raises(OSError) as caught:
            Restartable(first.server_address, AsyncEcho)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        first.server_close()


# -- server_close -------------------------------------------------------------------------


def test_server_close_is_idempotent_and_invalidates_fileno() -> None:
    server = ts.TCPServer(LOCALHOST, AsyncEcho)
    server.server_close()
    assert server.socket.fileno() == -1
    server.server_close()
    assert server.socket.fileno() == -1


async def test_async_with_closes_the_socket() -> None:
    async with ts.TCPServer(LOCALHOST, AsyncEcho) as server:
        assert server.socket.fileno() >= 0
    assert server.socket.fileno() == -1


# -- Unix sockets ------------------------------------------------------------------------


async def unix_echo_once(path: str | bytes) -> bytes:
    return await echo_once(await trio.open_unix_socket(path))


async def test_unix_stream_server_serves_and_removes_its_socket_file(unix_dir: Path) -> None:
    path = str(unix_dir / "s.sock")
    with trio.fail_after(5):
        async with serving(ts.UnixStreamServer(path, AsyncEcho)) as server:
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert server.server_address == path
            assert await unix_echo_once(path) == b"ping\n"
    assert not await trio.Path(path).exists()


@pytest.mark.parametrize("family", [ts.UnixStreamServer, ts.UnixDatagramServer])
def test_unix_path_that_is_not_a_socket_is_refused(unix_dir: Path, family: Any) -> None:
    path = unix_dir / "data.txt"
    path.write_text("precious")
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="not a socket") as caught:
        family(str(path), AsyncEcho)
    assert str(path) in str(caught.value)
    assert path.read_text() == "precious"
    assert len(os.listdir("/proc/self/fd")) == fds


def test_unix_symlink_at_the_path_is_neither_followed_nor_replaced(unix_dir: Path) -> None:
    target = unix_dir / "target"
    link = unix_dir / "link.sock"
    link.symlink_to(target)  # dangling: bind() would create the socket at `target`
    with pytest.raises(OSError, match="not a socket"):
        ts.UnixStreamServer(str(link), AsyncEcho)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert not os.path.lexists(target)


def stale_socket_file(path: str, kind: int = socket.SOCK_STREAM) -> None:
    """Leave a socket file nobody listens on at ``path``, as a crashed server does."""
    with socket.socket(socket.AF_UNIX, kind) as old:
        old.bind(path)


@pytest.mark.parametrize(
    ("family", "kind"),
    [(ts.UnixStreamServer, socket.SOCK_STREAM), (ts.UnixDatagramServer, socket.SOCK_DGRAM)],
)
def test_unix_stale_socket_file_is_refused_with_how_to_remove_it(
    unix_dir: Path, family: Any, kind: int
) -> None:
    path = str(unix_dir / "stale.sock")
    stale_socket_file(path, kind)
    with pytest.raises(OSError) as caught:
        family(path, AsyncEcho)
    assert caught.value.errno == errno.EADDRINUSE  # what the stdlib's bind() raises
    assert caught.value.strerror == (
        f"stale socket file: {path!r}; nobody listens on it (a server that crashed left it "
        f"behind): remove it (rm {path}) and start again"
    )
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # not removed unless asked


async def test_unix_stale_socket_file_is_replaced_when_asked(
    unix_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Replacing(ts.UnixStreamServer):
        remove_stale_socket = True

    path = str(unix_dir / "stale.sock")
    stale_socket_file(path)
    with trio.fail_after(5):
        async with serving(Replacing(path, AsyncEcho)):
            assert await unix_echo_once(path) == b"ping\n"  # a connect to the stale file fails
    assert f"removed the stale socket file {path}: nobody listened on it" in caplog.text


@pytest.mark.parametrize("remove_stale_socket", [False, True])
def test_unix_socket_someone_listens_on_is_never_removed(
    unix_dir: Path, remove_stale_socket: bool
) -> None:
    class Server(ts.UnixStreamServer):
        pass

    Server.remove_stale_socket = remove_stale_socket
    path = str(unix_dir / "live.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        inode = os.lstat(path).st_ino
        with pytest.raises(OSError) as caught:
            Server(path, AsyncEcho)
        assert caught.value.errno == errno.EADDRINUSE
        assert caught.value.strerror == (
            f"address already in use: {path!r}; another server listens on this socket: "
            "stop it or choose another path"
        )
        assert os.lstat(path).st_ino == inode
        # Its owner still takes connections on it.
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            live.accept()[0].close()


def test_unix_socket_with_a_full_backlog_counts_as_listened_on(unix_dir: Path) -> None:
    class Replacing(ts.UnixStreamServer):
        remove_stale_socket = True

    path = str(unix_dir / "busy.sock")
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(path)
        busy.listen(0)
        waiting = []
        try:
            # Fill the backlog: a further connect would block (EAGAIN when non-blocking).
            for _ in range(16):
                client = socket.socket(socket.AF_UNIX)
                waiting.append(client)
                client.setblocking(False)
                try:
                    client.connect(path)
                except BlockingIOError:
                    break
            with pytest.raises(OSError, match="another server listens"):
                Replacing(path, AsyncEcho)
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
        finally:
            for client in waiting:
                client.close()


def test_server_close_removes_only_the_file_it_created(unix_dir: Path) -> None:
    path = unix_dir / "s.sock"
    server = ts.UnixStreamServer(str(path), AsyncEcho)
    # Someone replaced the socket file meanwhile: it is theirs, not the server's.
    path.unlink()
    path.write_text("someone else's")
    server.server_close()
    assert path.read_text() == "someone else's"


async def test_unix_abstract_namespace(unix_dir: Path) -> None:
    name = f"\0trio-socketserver-test-{os.getpid()}-{unix_dir.name}"
    with trio.fail_after(5):
        async with serving(ts.UnixStreamServer(name, AsyncEcho)) as server:
            assert await unix_echo_once(name) == b"ping\n"
    assert server.socket.fileno() == -1
    assert not os.listdir(unix_dir)


def test_unix_socket_mode(unix_dir: Path) -> None:
    class Private(ts.UnixStreamServer):
        socket_mode = 0o600

    path = str(unix_dir / "private.sock")
    server = Private(path, AsyncEcho)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        server.server_close()


# -- datagram servers ---------------------------------------------------------------------


class AsyncUpper(ts.BaseRequestHandler):
    async def handle(self) -> None:
        data, sock = self.request
        assert isinstance(sock, trio.socket.SocketType)
        await sock.sendto(data.upper(), self.client_address)


class SyncUpper(ts.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        assert type(sock) is socket.socket
        assert threading.current_thread() is not threading.main_thread()
        sock.sendto(data.upper(), self.client_address)


class AsyncDatagramUpper(ts.DatagramRequestHandler):
    async def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


class SyncDatagramUpper(ts.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read().upper())


DATAGRAM_HANDLERS = [AsyncUpper, SyncUpper, AsyncDatagramUpper, SyncDatagramUpper]


async def udp_exchange(family: int, server_address: Any, data: bytes, bind: Any = None) -> bytes:
    with trio.socket.socket(family, socket.SOCK_DGRAM) as client:
        await client.bind(bind if bind is not None else ("127.0.0.1", 0))
        await client.sendto(data, server_address)
        return await client.recv(65536)


@pytest.mark.parametrize("handler", DATAGRAM_HANDLERS)
async def test_udp_server(handler: Any) -> None:
    with trio.fail_after(5):
        async with serving(ts.UDPServer(LOCALHOST, handler)) as server:
            for word in (b"one", b"two"):
                reply = await udp_exchange(socket.AF_INET, server.server_address, word)
                assert reply == word.upper()
        assert server.statistics().finished_requests == 2


@pytest.mark.parametrize("handler", DATAGRAM_HANDLERS)
async def test_unix_datagram_server(handler: Any, unix_dir: Path) -> None:
    path = str(unix_dir / "d.sock")
    with trio.fail_after(5):
        async with serving(ts.UnixDatagramServer(path, handler)):
            reply = await udp_exchange(socket.AF_UNIX, path, b"hi", bind=str(unix_dir / "c"))
            assert reply == b"HI"
    assert sorted(os.listdir(unix_dir)) == ["c"]


async def test_threading_udp_server() -> None:
    with trio.fail_after(5):
        async with serving(ts.ThreadingUDPServer(LOCALHOST, SyncDatagramUpper)) as server:
            assert await udp_exchange(socket.AF_INET, server.server_address, b"x") == b"X"


async def test_max_packet_size_truncates_datagrams() -> None:
    class Small(ts.UDPServer):
        max_packet_size = 4

    with trio.fail_after(5):
        async with serving(Small(LOCALHOST, AsyncDatagramUpper)) as server:
            assert await udp_exchange(socket.AF_INET, server.server_address, b"abcdefgh") == b"ABCD"


async def test_udp_handler_error_does_not_stop_the_server(caplog: pytest.LogCaptureFixture) -> None:
    class Picky(ts.DatagramRequestHandler):
        async def handle(self) -> None:
            data = self.rfile.read()
            if data == b"bad":
                raise ValueError("bad datagram")
            self.wfile.write(data)

    with trio.fail_after(5):
        async with serving(ts.UDPServer(LOCALHOST, Picky)) as server:
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                await client.bind(("127.0.0.1", 0))
                await client.sendto(b"bad", server.server_address)
                await client.sendto(b"good", server.server_address)
                # finish() runs even when handle() raised, so the bad datagram gets the
                # (empty) reply its wfile holds, as with the stdlib.
                replies = {await client.recv(100), await client.recv(100)}
                assert replies == {b"", b"good"}
    assert "bad datagram" in caplog.text


async def test_stdlib_udp_client() -> None:
    with trio.fail_after(5):
        async with serving(ts.UDPServer(LOCALHOST, SyncDatagramUpper)) as server:

            def client() -> bytes:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(5)
                    s.sendto(b"stdlib", server.server_address)
                    return s.recv(100)

            assert await in_thread(client) == b"STDLIB"


# -- a server around a socket made elsewhere (from_socket) ------------------------------


def made_elsewhere(family: int, kind: int, address: Any) -> socket.socket:
    """A socket as a service manager passes it: bound, and listening if it is a stream."""
    sock = socket.socket(family, kind)
    sock.bind(address)
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


async def test_from_socket_serves_a_listening_socket_and_closes_it() -> None:
    sock = made_elsewhere(socket.AF_INET, socket.SOCK_STREAM, LOCALHOST)
    server = ts.TCPServer.from_socket(sock, AsyncEcho)
    assert server.socket is sock
    assert server.server_address == sock.getsockname()
    assert server.address_family == socket.AF_INET
    with trio.fail_after(5):
        async with serving(server):
            assert await echo_once(await connect(server)) == b"ping\n"
    assert sock.fileno() == -1  # server_close() closed it: the server owns it


async def test_from_socket_leaves_a_shared_socket_non_blocking() -> None:
    # The blocking mode belongs to the socket, shared by every process that holds it (the
    # workers of a supervisor): put back to blocking when one server stops, the others'
    # accept() would block their event loops.
    sock = made_elsewhere(socket.AF_INET, socket.SOCK_STREAM, LOCALHOST)
    with sock.dup() as elsewhere:  # the same socket, as another process holds it
        server = ts.TCPServer.from_socket(sock, AsyncEcho)
        with trio.fail_after(5):
            async with serving(server):
                assert await echo_once(await connect(server)) == b"ping\n"
        assert not os.get_blocking(elsewhere.fileno())


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no IPv6 loopback")
async def test_from_socket_takes_the_family_from_the_socket() -> None:
    # TCPServer's class attribute says AF_INET; the socket is IPv6.
    sock = made_elsewhere(socket.AF_INET6, socket.SOCK_STREAM, ("::1", 0))
    server = ts.ThreadingTCPServer.from_socket(sock, AsyncEcho)
    assert server.address_family == socket.AF_INET6
    assert ts.ThreadingTCPServer.address_family == socket.AF_INET
    with trio.fail_after(5):
        async with serving(server):
            assert await echo_once(await connect(server)) == b"ping\n"


async def test_from_socket_leaves_a_unix_socket_file_to_whoever_made_it(unix_dir: Path) -> None:
    path = str(unix_dir / "passed.sock")
    sock = made_elsewhere(socket.AF_UNIX, socket.SOCK_STREAM, path)
    os.chmod(path, 0o600)

    class Restrictive(ts.UnixStreamServer):
        socket_mode = 0o666  # applies to files the server binds, not to this one

    server = Restrictive.from_socket(sock, AsyncEcho)
    assert server.server_address == path
    with trio.fail_after(5):
        async with serving(server):
            assert await unix_echo_once(path) == b"ping\n"
    # Not removed, not chmod-ed: the server did not create it.
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize(
    ("cls", "family", "address"),
    [(ts.UDPServer, socket.AF_INET, LOCALHOST), (ts.UnixDatagramServer, socket.AF_UNIX, None)],
)
async def test_from_socket_serves_datagram_sockets(
    cls: Any, family: int, address: Any, unix_dir: Path
) -> None:
    address = address or str(unix_dir / "d.sock")
    server = cls.from_socket(made_elsewhere(family, socket.SOCK_DGRAM, address), AsyncUpper)
    client_address = ("127.0.0.1", 0) if family == socket.AF_INET else str(unix_dir / "c")
    with trio.fail_after(5):
        async with serving(server):
            reply = await udp_exchange(family, server.server_address, b"hi", client_address)
            assert reply == b"HI"


@pytest.mark.parametrize(
    ("cls", "family", "kind", "listen", "message"),
    [
        (ts.TCPServer, socket.AF_INET, socket.SOCK_DGRAM, False, "is a UDP socket; use UDPServer"),
        (ts.UDPServer, socket.AF_INET, socket.SOCK_STREAM, True, "is a TCP socket; use TCPServer"),
        (ts.TCPServer, socket.AF_UNIX, socket.SOCK_STREAM, True, "use UnixStreamServer"),
        (ts.UnixStreamServer, socket.AF_INET, socket.SOCK_STREAM, True, "use TCPServer"),
        (ts.TCPServer, socket.AF_INET, socket.SOCK_STREAM, False, "not listening; call listen()"),
    ],
)
def test_from_socket_refuses_a_socket_it_cannot_serve_and_leaves_it_open(
    cls: Any, family: int, kind: int, listen: bool, message: str, unix_dir: Path
) -> None:
    with socket.socket(family, kind) as sock:
        sock.bind(LOCALHOST if family == socket.AF_INET else str(unix_dir / "s"))
        if listen:
            sock.listen()
        with pytest.raises(ValueError, match=message) as raised:
            cls.from_socket(sock, AsyncEcho)
        assert str(raised.value).startswith(f"{cls.__name__}.from_socket(sock): sock ")
        assert sock.fileno() != -1
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="is closed"):
        ts.TCPServer.from_socket(closed, AsyncEcho)


def test_compat_from_socket_and_the_stdlib_pattern_serve_blocking(unix_dir: Path) -> None:
    from trio_socketserver import compat

    class Upper(compat.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline().upper())

    def ask(address: Any) -> bytes:
        with socket.create_connection(address, timeout=5) as client:
            client.sendall(b"hi\n")
            return client.recv(100)

    sock = made_elsewhere(socket.AF_INET, socket.SOCK_STREAM, LOCALHOST)
    with compat.TCPServer.from_socket(sock, Upper) as server, serving_on_thread(server):
        assert ask(server.server_address) == b"HI\n"
    assert sock.fileno() == -1
    # What stdlib code does: no bind, then the socket and its address assigned by hand.
    sock = made_elsewhere(socket.AF_INET, socket.SOCK_STREAM, LOCALHOST)
    server = compat.TCPServer(("", 0), Upper, bind_and_activate=False)
    server.socket.close()
    server.socket, server.server_address = sock, sock.getsockname()
    with server, serving_on_thread(server):
        assert ask(server.server_address) == b"HI\n"
    assert sock.fileno() == -1
