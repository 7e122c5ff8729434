# Tests for examples/echo.py, written with trio_socketserver.testing: the handler alone
# (no socket), then the handler behind a real server.
import pytest
from echo import Echo

import trio_socketserver
from trio_socketserver.testing import open_client, run_handler

pytestmark = pytest.mark.usefixtures("no_leaks")


async def test_echo_returns_every_line():
    run = await run_handler(Echo, b"hello\nworld\n")
    assert run.output == b"hello\nworld\n"
    assert run.error is None


async def test_echo_returns_a_last_line_without_newline():
    run = await run_handler(Echo, b"no newline")
    assert run.output == b"no newline"


async def test_echo_over_tcp(serve):
    server = await serve(trio_socketserver.TCPServer(("127.0.0.1", 0), Echo))
    async with await open_client(server) as client:
        await client.send_all(b"ping\n")
        assert await client.receive_line() == b"ping\n"
