"""A chat room: every line a client sends goes to every other client.

    python examples/chat.py              # --port 0 picks a free port
    nc 127.0.0.1 8000                    # in several terminals

It shows state shared between handler tasks (the room), fan-out that a slow
client cannot stall, clients that may leave at any moment, even mid-line, and a
graceful stop: when the server drains, every client is told why before its
session ends.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio

import trio_socketserver

# The longest line a client may send. A longer one ends that client's session,
# so nobody can make the server buffer an endless line.
MAX_LINE = 4096
# Messages waiting for a client that is not reading. Past this it misses
# messages, rather than slowing the room down or growing memory without bound.
OUTBOX_SIZE = 100


class Room:
    """Who is here: each member's name and outbox.

    Every handler runs as a task on the same trio thread, and trio switches
    tasks only at an ``await``, so this shared dict needs no lock: nothing
    here awaits.
    """

    def __init__(self) -> None:
        self.outboxes: dict[str, trio.MemorySendChannel[bytes]] = {}

    def join(self, name: str, outbox: trio.MemorySendChannel[bytes]) -> None:
        others = len(self.outboxes)
        self.outboxes[name] = outbox
        outbox.send_nowait(f"* welcome {name}; also here: {others}\n".encode())
        self.broadcast(f"* {name} joined\n".encode(), sender=name)

    def leave(self, name: str) -> None:
        del self.outboxes[name]
        self.broadcast(f"* {name} left\n".encode(), sender=name)

    def broadcast(self, message: bytes, sender: str) -> None:
        for name, outbox in self.outboxes.items():
            if name != sender:
                try:
                    outbox.send_nowait(message)
                except trio.WouldBlock:
                    pass  # that client is not reading: it misses this message
                except trio.ClosedResourceError:
                    pass  # that client's session is ending: it was told why


class ChatHandler(trio_socketserver.StreamRequestHandler):
    server: ChatServer

    async def handle(self) -> None:
        host, port = self.client_address[:2]
        name = f"{host}:{port}"
        # Only this client's own task writes to its socket; others drop
        # messages into its outbox and never wait for its network.
        outbox, inbox = trio.open_memory_channel[bytes](OUTBOX_SIZE)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.deliver, inbox, nursery.cancel_scope)
            nursery.start_soon(self.part_on_shutdown, outbox)
            self.server.room.join(name, outbox)
            try:
                await self.relay(name)
            finally:
                # However the client left (EOF, reset, the server stopping), the
                # room forgets it and the others hear of it.
                self.server.room.leave(name)
                nursery.cancel_scope.cancel()

    async def relay(self, name: str) -> None:
        """Broadcast the client's lines until it leaves."""
        try:
            while True:
                line = await self.rfile.readline(MAX_LINE)
                if not line.endswith(b"\n"):
                    # End of file (perhaps mid-line) or a line over MAX_LINE:
                    # the session ends and the partial line is never shown.
                    return
                self.server.room.broadcast(f"<{name}> ".encode() + line, sender=name)
        except trio.BrokenResourceError:
            return  # the connection was reset: the client is gone

    async def part_on_shutdown(self, outbox: trio.MemorySendChannel[bytes]) -> None:
        """When the server drains, tell the client why, then end its session once
        everything before the goodbye has been delivered."""
        await self.server.wait_for_shutdown()
        with trio.move_on_after(1):  # a client that is not reading misses the goodbye
            await outbox.send(b"* the server is shutting down; please reconnect later\n")
        await outbox.aclose()

    async def deliver(
        self, inbox: trio.MemoryReceiveChannel[bytes], session: trio.CancelScope
    ) -> None:
        """Send the client its messages; when it cannot take them, or its outbox
        closes (the server is stopping), end its session."""
        try:
            async for message in inbox:
                await self.wfile.write(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        session.cancel()


class ChatServer(trio_socketserver.TCPServer):
    # A restart binds at once, though the last run's connections linger in TIME-WAIT.
    allow_reuse_address = True

    def __init__(self, server_address: tuple[str, int]) -> None:
        super().__init__(server_address, ChatHandler)
        self.room = Room()


async def main(host: str, port: int) -> int:
    async with ChatServer((host, port)) as server:
        # Ctrl-C or SIGTERM: every session says goodbye and ends; a second
        # signal stops at once.
        return await trio_socketserver.serve_until_signal(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A chat room over TCP.")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000; 0 picks a free one")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(trio.run(main, args.host, args.port))
