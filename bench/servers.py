"""Line-echo servers for the benchmark suite.

Usage::

    python bench/servers.py NAME [--port 0] [--grace 0.0]
    python bench/servers.py --check NAME      # prints one JSON line: availability
    python bench/servers.py --list

Every server binds 127.0.0.1, prints its bound port as the first line on stdout, echoes
newline-terminated lines until SIGTERM/SIGINT, then shuts down and exits.  How each one shuts
down is part of what the benchmark measures, so each follows the library's documented way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socketserver
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"

# Benchmark the working tree: prefer ./src over any installed copy of the library.
if (SRC / "trio_socketserver" / "__init__.py").exists() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def announce(port: int) -> None:
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- stdlib


class StdlibEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


def serve_sync(server: Any) -> None:
    """Run a socketserver-style server; SIGTERM/SIGINT -> shutdown() from a thread."""
    main_pid = os.getpid()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:  # a forked child inherited this handler
            os._exit(1)
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    announce(server.server_address[1])
    try:
        server.serve_forever()
    finally:
        server.server_close()


def run_stdlib_threading(port: int, grace: float) -> None:
    serve_sync(socketserver.ThreadingTCPServer((HOST, port), StdlibEcho))


def run_stdlib_forking(port: int, grace: float) -> None:
    serve_sync(socketserver.ForkingTCPServer((HOST, port), StdlibEcho))


# ----------------------------------------------------------------------------- trio


def run_trio_raw(port: int, grace: float) -> None:
    import trio

    async def echo(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while (i := buf.find(b"\n")) >= 0:
                    line = bytes(buf[: i + 1])
                    del buf[: i + 1]
                    await stream.send_all(line)
        except trio.BrokenResourceError:
            return

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, echo, port, host=HOST))
            announce(listeners[0].socket.getsockname()[1])
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    trio.run(main)


# -------------------------------------------------------------------------- asyncio


def run_asyncio(port: int, grace: float) -> None:
    import asyncio

    handlers: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.add(writer)
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writers.discard(writer)
            handlers.discard(task)
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, HOST, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        announce(server.sockets[0].getsockname()[1])
        await stop.wait()
        server.close()
        # Python 3.11 has no Server.close_clients(): close every connection ourselves, so each
        # handler's readline() sees EOF and returns, then wait for the handlers (bounded).
        for w in list(writers):
            w.close()
        if handlers:
            await asyncio.wait(list(handlers), timeout=max(grace, 1.0))

    asyncio.run(main())


# ------------------------------------------------------------------ trio_socketserver


def _load_native() -> ModuleType:
    mod = importlib.import_module("trio_socketserver")
    for attr in ("TCPServer", "StreamRequestHandler"):
        if not hasattr(mod, attr):
            raise ImportError(f"trio_socketserver has no {attr}")
    return mod


def _load_compat(attr: str) -> ModuleType:
    mod = importlib.import_module("trio_socketserver.compat")
    if not hasattr(mod, attr):
        raise ImportError(f"trio_socketserver.compat has no {attr}")
    return mod


def _native_echo(tss: ModuleType) -> type[Any]:
    class Echo(tss.StreamRequestHandler):  # type: ignore[name-defined,misc]
        async def handle(self) -> None:
            async for line in self.rfile:
                await self.wfile.write(line)

    return Echo


def run_native(port: int, grace: float) -> None:
    import trio

    tss = _load_native()

    async def main() -> None:
        async with tss.TCPServer((HOST, port), _native_echo(tss)) as server:
            server.shutdown_grace = grace
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                announce(server.server_address[1])
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        server.shutdown()
                        break

    trio.run(main)


# The workers' shutdown_grace: a worker imports this module afresh and calls native_worker(),
# so the supervisor hands the --grace value down in its environment.
GRACE_VARIABLE = "BENCH_WORKER_GRACE"


def native_worker(sock: Any) -> Any:
    """serve_workers()'s factory: native's server, around the socket the supervisor bound."""
    tss = _load_native()
    server = tss.TCPServer.from_socket(sock, _native_echo(tss))
    server.shutdown_grace = float(os.environ[GRACE_VARIABLE])
    return server


def run_workers(workers: int, port: int, grace: float) -> None:
    """native's server in `workers` worker processes under serve_workers()'s supervisor."""
    import socket

    import trio

    tss = _load_native()
    os.environ[GRACE_VARIABLE] = str(grace)
    with socket.create_server((HOST, port), backlog=1024) as sock:
        announce(sock.getsockname()[1])
        sys.exit(trio.run(tss.serve_workers, native_worker, [sock], workers))


def _compat_handler_base(compat: ModuleType) -> type[Any]:
    base: type[Any] = getattr(compat, "StreamRequestHandler", socketserver.StreamRequestHandler)
    return base


def _make_compat_handler(compat: ModuleType) -> type[Any]:
    base = _compat_handler_base(compat)

    class CompatEcho(base):  # type: ignore[valid-type,misc]
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(line)

    return CompatEcho


def run_compat_threading(port: int, grace: float) -> None:
    compat = _load_compat("ThreadingTCPServer")
    serve_sync(compat.ThreadingTCPServer((HOST, port), _make_compat_handler(compat)))


def run_compat_forking(port: int, grace: float) -> None:
    compat = _load_compat("ForkingTCPServer")
    serve_sync(compat.ForkingTCPServer((HOST, port), _make_compat_handler(compat)))


# ---------------------------------------------------------------------------- table

SERVERS: dict[str, Callable[[int, float], None]] = {
    "stdlib-threading": run_stdlib_threading,
    "stdlib-forking": run_stdlib_forking,
    "trio-raw": run_trio_raw,
    "asyncio": run_asyncio,
    "native": run_native,
    "compat-threading": run_compat_threading,
    "compat-forking": run_compat_forking,
    "workers-1": partial(run_workers, 1),
    "workers-2": partial(run_workers, 2),
}


def check(name: str) -> dict[str, Any]:
    """Is server `name` runnable here?  Never starts a server."""
    try:
        if name == "native":
            mod = _load_native()
            detail = f"trio_socketserver from {getattr(mod, '__file__', '?')}"
        elif name.startswith("workers-"):
            mod = _load_native()
            if not hasattr(mod, "serve_workers"):
                raise ImportError("trio_socketserver has no serve_workers")
            detail = f"serve_workers, trio_socketserver from {getattr(mod, '__file__', '?')}"
        elif name in ("compat-threading", "compat-forking"):
            attr = "ThreadingTCPServer" if name == "compat-threading" else "ForkingTCPServer"
            compat = _load_compat(attr)
            base = _compat_handler_base(compat)
            detail = f"compat.{attr}, handler base {base.__module__}.{base.__qualname__}"
        elif name in ("trio-raw",):
            import trio

            detail = f"trio {trio.__version__}"
        elif name in SERVERS:
            detail = f"python {sys.version.split()[0]}"
        else:
            return {"name": name, "available": False, "reason": "unknown server name"}
    except Exception as exc:  # ImportError, or a half-written library raising anything
        return {"name": name, "available": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "available": True, "detail": detail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--grace",
        type=float,
        default=0.0,
        help="native and workers-N only: shutdown_grace in seconds (default 0)",
    )
    parser.add_argument("--check", metavar="NAME", help="report whether NAME is available")
    parser.add_argument("--list", action="store_true", help="list server names")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SERVERS))
        return 0
    if args.check:
        print(json.dumps(check(args.check)))
        return 0
    if not args.name:
        parser.error("a server NAME is required")
    SERVERS[args.name](args.port, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
