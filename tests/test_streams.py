from __future__ import annotations

import io
import pickle
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_socketserver._streams import (
    DEFAULT_BUFFER_SIZE,
    IncompleteReadError,
    StreamReader,
    StreamWriter,
)


class ChunkedReceiveStream(trio.abc.ReceiveStream):
    """A peer that sends ``chunks`` one per ``receive_some`` call, then closes.

    A chunk longer than ``max_bytes`` is split, the rest is returned by the next call. It
    records the largest ``max_bytes`` asked for and how many bytes it has handed out, calls
    ``on_receive(max_bytes)`` at the start of every call (that is, just before the reader's
    buffer can grow), and fails the test if it is asked for more data after reporting EOF.
    """

    def __init__(
        self, chunks: Iterable[bytes], on_receive: Callable[[int], None] | None = None
    ) -> None:
        self._chunks = deque(chunk for chunk in chunks if chunk)
        self.on_receive = on_receive
        self.largest_max_bytes = 0
        self.calls = 0
        self.handed_out = 0
        self.eof_reported = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        assert not self.eof_reported, "receive_some() called again after it returned b''"
        assert max_bytes is not None and max_bytes >= 1
        self.calls += 1
        self.largest_max_bytes = max(self.largest_max_bytes, max_bytes)
        if self.on_receive is not None:
            self.on_receive(max_bytes)
        if not self._chunks:
            self.eof_reported = True
            return b""
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.handed_out += len(chunk)
        return chunk

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class RecordingSendStream(trio.abc.SendStream):
    """A peer that accepts everything at once and records each ``send_all`` separately."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    @property
    def received(self) -> bytes:
        return b"".join(self.sends)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sends.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    """Cut ``data`` into chunks whose lengths cycle through ``sizes`` (one chunk if empty)."""
    if not sizes:
        return [data]
    chunks: list[bytes] = []
    start = 0
    while start < len(data):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(data[start : start + size])
        start += size
    return chunks


# ---------------------------------------------------------------------------------------------
# StreamReader: property test against io.BytesIO

payloads = st.one_of(
    st.binary(max_size=120),
    # Lines of assorted lengths, so that limits and chunk boundaries fall before, on and after
    # the newlines.
    st.lists(st.binary(max_size=15).map(lambda line: line.replace(b"\n", b"") + b"\n")).map(
        b"".join
    ),
    st.lists(
        st.sampled_from([b"a", b"bc", b"\n", b"\r\n", b"\n\n", b"xyz\n", b"\x00\xff"]),
        max_size=40,
    ).map(b"".join),
    # A long line: exercises readline(limit) against a peer that never sends a newline.
    st.integers(0, 400).map(lambda k: b"x" * k + b"\n" * (k % 2)),
)
operations = st.lists(
    st.tuples(
        st.sampled_from(["readline", "readline()", "read", "readexactly", "read1", "iterate"]),
        st.one_of(st.integers(-2, 12), st.integers(-2, 50)),
    ),
    max_size=12,
)


def check_against_bytesio(
    data: bytes, sizes: list[int], bufsize: int, ops: list[tuple[str, int]]
) -> None:
    """Run ``ops`` on a reader fed ``split(data, sizes)`` and on io.BytesIO(data); compare.

    Memory is checked at the start of every ``receive_some`` (the fake's ``on_receive`` hook),
    while an operation with a size bound ``b`` (readline(limit), read(n), readexactly(n); b=0
    for read1, which may only receive into an empty buffer) is running:

    * unread bytes held by the reader = bytes the fake handed out - bytes returned to us, and
      that plus this receive's ``max_bytes`` must stay <= b + bufsize;
    * the reader's whole internal bytearray (``reader._buf``, including already-consumed bytes
      it has not cut off yet) must obey the same bound, so compaction really happens.
    """
    effective_bufsize = bufsize if bufsize > 0 else DEFAULT_BUFFER_SIZE
    model = io.BytesIO(data)
    consumed = 0
    bound: int | None = None
    receives_in_op = 0

    def check_memory(max_bytes: int) -> None:
        nonlocal receives_in_op
        receives_in_op += 1
        assert max_bytes == effective_bufsize
        if bound is not None:
            held = stream.handed_out - consumed
            assert held + max_bytes <= bound + effective_bufsize
            assert len(reader._buf) + max_bytes <= bound + effective_bufsize

    stream = ChunkedReceiveStream(split(data, sizes), on_receive=check_memory)
    reader = StreamReader(stream, bufsize=bufsize)

    async def run_ops() -> None:
        nonlocal bound, consumed, receives_in_op
        for name, n in ops:
            receives_in_op = 0
            bound = n if n >= 0 else None
            if name == "readline":
                got = await reader.readline(n)
                assert got == model.readline(n)
            elif name == "readline()":
                bound = None
                got = await reader.readline()
                assert got == model.readline()
            elif name == "read":
                got = await reader.read(n)
                assert got == model.read(n)
            elif name == "readexactly":
                n = bound = abs(n)
                expected = model.read(n)
                if len(expected) == n:
                    got = await reader.readexactly(n)
                    assert got == expected
                else:
                    with pytest.raises(IncompleteReadError) as info:
                        await reader.readexactly(n)
                    assert (info.value.partial, info.value.expected) == (expected, n)
                    got = expected
            elif name == "read1":
                bound = 0
                got = await reader.read1(n)
                assert receives_in_op <= 1
                assert got == model.read(len(got))  # a prefix of what is left...
                assert n < 0 or len(got) <= n  # ...no longer than asked for...
                assert got or n == 0 or model.tell() == len(data)  # ...empty only at EOF
            else:
                bound = None
                lines = [line async for line in reader]
                assert lines == model.readlines()
                got = b"".join(lines)
            consumed += len(got)
        bound = None
        assert await reader.read() == model.read()
        assert stream.eof_reported
        # Past EOF everything is b"" (and the fake fails the test if it is asked again).
        assert await reader.readline() == b""
        assert await reader.read1() == b""
        assert await reader.read(5) == b""

    trio.run(run_ops)


chunk_sizes = st.lists(st.integers(1, 40), max_size=8)
bufsizes = st.one_of(st.sampled_from([-1, 0]), st.integers(1, 24))


@settings(max_examples=200, deadline=None)
@given(data=payloads, sizes=chunk_sizes, bufsize=bufsizes, ops=operations)
def test_reader_behaves_like_bytesio(
    data: bytes, sizes: list[int], bufsize: int, ops: list[tuple[str, int]]
) -> None:
    """Any mix of reads, on any chunking of ``data``, returns what io.BytesIO(data) would."""
    check_against_bytesio(data, sizes, bufsize, ops)


@settings(max_examples=200, deadline=None)
@given(
    data=payloads,
    sizes=chunk_sizes,
    bufsize=bufsizes,
    limits=st.lists(st.integers(-1, 20), max_size=20),
)
def test_readline_behaves_like_bytesio(
    data: bytes, sizes: list[int], bufsize: int, limits: list[int]
) -> None:
    """Runs of readline(limit) split and join lines exactly like io.BytesIO(data).readline."""
    check_against_bytesio(data, sizes, bufsize, [("readline", limit) for limit in limits])


# ---------------------------------------------------------------------------------------------
# StreamReader: examples


@pytest.mark.parametrize("bufsize", [4, DEFAULT_BUFFER_SIZE])
async def test_readline_with_limit_splits_long_lines(bufsize: int) -> None:
    reader = StreamReader(ChunkedReceiveStream([b"abcdef\ngh", b"i\n"]), bufsize=bufsize)
    assert await reader.readline(0) == b""
    assert await reader.readline(4) == b"abcd"
    assert await reader.readline(4) == b"ef\n"
    assert await reader.readline() == b"ghi\n"
    assert await reader.readline() == b""


async def test_lines_from_a_real_peer_via_async_for() -> None:
    client, server = trio.testing.memory_stream_pair()
    reader = StreamReader(server, bufsize=3)

    async def peer() -> None:
        for piece in [b"GET / HT", b"TP/1.0\r\nHost: x\r", b"\n\r\n", b"trailing"]:
            await client.send_all(piece)
            await trio.lowlevel.checkpoint()
        await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        lines = [line async for line in reader]
    assert lines == [b"GET / HTTP/1.0\r\n", b"Host: x\r\n", b"\r\n", b"trailing"]


async def test_readexactly_reports_what_arrived() -> None:
    reader = StreamReader(ChunkedReceiveStream([b"ab", b"c"]))
    with pytest.raises(IncompleteReadError) as info:
        await reader.readexactly(10)
    error = info.value
    assert isinstance(error, EOFError)
    assert (error.partial, error.expected) == (b"abc", 10)
    assert str(error) == "peer closed the connection after 3 of 10 expected bytes"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.partial, copy.expected, str(copy)) == (
        IncompleteReadError,
        b"abc",
        10,
        str(error),
    )
    with pytest.raises(ValueError, match="non-negative"):
        await reader.readexactly(-1)


async def test_read_waits_for_n_bytes_but_read1_does_not() -> None:
    reader = StreamReader(ChunkedReceiveStream([b"ab", b"cd", b"ef", b"gh"]))
    assert await reader.read(3) == b"abc"
    assert await reader.read1() == b"d"  # buffered: no receive
    assert await reader.read1(1) == b"e"  # one receive of b"ef", keeps b"f"
    assert await reader.read1(5) == b"f"
    assert await reader.read(-1) == b"gh"


async def test_zero_sized_reads_do_not_wait(autojump_clock: trio.testing.MockClock) -> None:
    _, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream)
    start = trio.current_time()
    with trio.fail_after(1):
        assert await reader.read(0) == b""
        assert await reader.read1(0) == b""
        assert await reader.readline(0) == b""
        assert await reader.readexactly(0) == b""
    assert trio.current_time() == start


@pytest.mark.parametrize(("bufsize", "expected"), [(0, 65536), (-1, 65536), (7, 7)])
async def test_reader_bufsize_is_the_receive_size(bufsize: int, expected: int) -> None:
    stream = ChunkedReceiveStream([b"x" * 100_000])
    reader = StreamReader(stream, bufsize=bufsize)
    assert await reader.read1() == b"x" * expected
    assert stream.largest_max_bytes == expected


async def test_eof_is_remembered() -> None:
    stream = ChunkedReceiveStream([b"last"])
    reader = StreamReader(stream)
    assert await reader.read() == b"last"
    calls = stream.calls
    for _ in range(3):
        assert await reader.readline() == b""
        assert await reader.read1() == b""
        assert [line async for line in reader] == []
    assert stream.calls == calls


# ---------------------------------------------------------------------------------------------
# StreamReader: timeouts

READS: list[Callable[[StreamReader], Awaitable[bytes]]] = [
    lambda r: r.readline(),
    lambda r: r.readline(10),
    lambda r: r.read(),
    lambda r: r.read(5),
    lambda r: r.readexactly(5),
    lambda r: r.read1(),
    lambda r: r.__anext__(),
]


async def assert_times_out(read: Awaitable[bytes], *, after: float, match: str) -> None:
    """``read`` raises TimeoutError, its message matching ``match``, ``after`` seconds from now."""
    start = trio.current_time()
    with pytest.raises(TimeoutError, match=match):
        await read
    assert trio.current_time() - start == pytest.approx(after)


# The per-wait timeout and the whole-read deadline (below) each end a wait on a silent peer.
@pytest.mark.parametrize(
    ("limit", "seconds", "match"),
    [
        ("timeout", 7.5, r"^no data from the peer for 7\.5 s$"),
        ("deadline", 2.5, r"^read took longer than its deadline of 2\.5 s$"),
    ],
)
@pytest.mark.parametrize("read", READS)
async def test_silent_peer_times_out(
    autojump_clock: trio.testing.MockClock,
    read: Callable[[StreamReader], Awaitable[bytes]],
    limit: str,
    seconds: float,
    match: str,
) -> None:
    _, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream, **{limit: seconds})
    await assert_times_out(read(reader), after=seconds, match=match)


async def test_timeout_bounds_each_wait_and_can_be_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream, timeout=1)

    async def trickle() -> None:
        for piece in [b"a", b"b", b"c", b"d", b"\n"]:
            await trio.sleep(0.9)
            await send_stream.send_all(piece)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        # 4.5 s in total, but never more than 0.9 s between two pieces.
        assert await reader.readline() == b"abcd\n"
    assert trio.current_time() - start == pytest.approx(4.5)

    reader.timeout = 2.5
    await assert_times_out(reader.readline(), after=2.5, match=r"for 2\.5 s$")


async def test_no_data_is_lost_when_a_read_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream, timeout=1)
    await send_stream.send_all(b"par")
    with pytest.raises(TimeoutError):
        await reader.readline()
    with pytest.raises(TimeoutError):
        await reader.readexactly(5)
    await send_stream.send_all(b"tial\nrest")
    assert await reader.readline() == b"partial\n"
    assert await reader.read1() == b"rest"


async def test_without_timeout_the_reader_waits_as_long_as_it_takes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream)

    async def late_peer() -> None:
        await trio.sleep(1000)
        await send_stream.send_all(b"finally\n")

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_peer)
        assert await reader.readline() == b"finally\n"
    assert trio.current_time() - start == pytest.approx(1000)


# ---------------------------------------------------------------------------------------------
# StreamReader: deadlines

# Reads that a peer sending one byte every 0.9 s does not complete within 3 s.
TRICKLED_READS: list[Callable[[StreamReader], Awaitable[bytes]]] = [
    lambda r: r.readline(),
    lambda r: r.readline(10),
    lambda r: r.read(),
    lambda r: r.read(5),
    lambda r: r.readexactly(5),
    lambda r: r.__anext__(),
]


@pytest.mark.parametrize("read", TRICKLED_READS)
async def test_deadline_bounds_a_whole_read_however_the_bytes_trickle(
    autojump_clock: trio.testing.MockClock, read: Callable[[StreamReader], Awaitable[bytes]]
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    # The per-wait timeout never fires: every byte comes 0.9 s after the one before.
    reader = StreamReader(receive_stream, timeout=1, deadline=3)

    async def trickle() -> None:
        for _ in range(100):  # far more than the deadline lets in
            await trio.sleep(0.9)
            await send_stream.send_all(b"a")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        await assert_times_out(
            read(reader), after=3, match=r"^read took longer than its deadline of 3 s$"
        )
        nursery.cancel_scope.cancel()
    # Nothing is lost: the bytes that came at 0.9, 1.8 and 2.7 s are still buffered.
    await send_stream.send_all(b"\n")
    assert await reader.readline() == b"aaa\n"


async def test_deadline_is_per_read_and_can_be_changed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream, deadline=2)

    async def peer() -> None:
        for line in [b"one\n", b"two\n", b"three\n"]:
            await trio.sleep(1.5)
            await send_stream.send_all(line)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        # 4.5 s for three lines, but each read takes only 1.5 s of its own 2 s.
        assert [await reader.readline() for _ in range(2)] == [b"one\n", b"two\n"]
        reader.deadline = 1
        with pytest.raises(TimeoutError, match=r"deadline of 1 s$"):
            await reader.readline()
        reader.deadline = None
        assert await reader.readline() == b"three\n"


async def test_deadline_and_timeout_bound_a_read_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    reader = StreamReader(receive_stream, timeout=1, deadline=10)
    await send_stream.send_all(b"half a li")
    # The peer went silent: the per-wait timeout comes first.
    await assert_times_out(reader.readline(), after=1, match=r"^no data from the peer for 1 s$")
    await send_stream.send_all(b"ne\n")
    assert await reader.readline() == b"half a line\n"


# ---------------------------------------------------------------------------------------------
# StreamWriter


async def test_unbuffered_writer_sends_immediately(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    writer = StreamWriter(send_stream)
    assert await writer.write(b"hello") == 5
    assert writer.buffered == 0
    with trio.fail_after(1):  # no flush: the peer must already have the bytes
        assert await receive_stream.receive_some() == b"hello"


async def test_unbuffered_writer_does_one_send_per_call() -> None:
    stream = RecordingSendStream()
    writer = StreamWriter(stream)
    assert await writer.write(bytearray(b"ab")) == 2
    assert await writer.write(memoryview(b"cde")) == 3
    await writer.writelines([b"line 1\n", b"line 2\n", bytearray(b"end")])
    await writer.writelines(iter([b"x", b"y"]))
    await writer.flush()  # nothing buffered: no send
    assert stream.sends == [b"ab", b"cde", b"line 1\nline 2\nend", b"xy"]


async def test_buffered_writer_holds_data_until_bufsize_or_flush() -> None:
    stream = RecordingSendStream()
    writer = StreamWriter(stream, bufsize=8)
    assert await writer.write(b"abc") == 3
    await writer.writelines([b"d", b"e"])
    assert (stream.sends, writer.buffered) == ([], 5)
    await writer.write(b"fghij")  # reaches 8: everything goes, in one send
    assert (stream.sends, writer.buffered) == ([b"abcdefghij"], 0)
    await writer.write(b"k")
    assert writer.buffered == 1
    await writer.flush()
    await writer.flush()
    assert (stream.sends, writer.buffered) == ([b"abcdefghij", b"k"], 0)


async def test_negative_writer_bufsize_means_default() -> None:
    stream = RecordingSendStream()
    writer = StreamWriter(stream, bufsize=-1)
    await writer.write(b"x" * (DEFAULT_BUFFER_SIZE - 1))
    assert stream.sends == []
    await writer.write(b"x")
    assert [len(data) for data in stream.sends] == [DEFAULT_BUFFER_SIZE]


write_ops = st.lists(st.one_of(st.binary(max_size=30), st.just(None)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(bufsize=st.integers(-1, 40), ops=write_ops)
def test_writer_delivers_exactly_what_was_written(bufsize: int, ops: list[bytes | None]) -> None:
    """Any mix of writes (bytes) and flushes (None) delivers the concatenation, in order."""

    async def main() -> None:
        stream = RecordingSendStream()
        writer = StreamWriter(stream, bufsize=bufsize)
        written = b""
        for op in ops:
            if op is None:
                await writer.flush()
                assert stream.received == written
                continue
            sends_before = len(stream.sends)
            assert await writer.write(op) == len(op)
            written += op
            if bufsize == 0:
                assert stream.sends[sends_before:] == [op]
            elif bufsize > 0:
                assert writer.buffered < bufsize
            assert stream.received + written[len(written) - writer.buffered :] == written
        await writer.flush()
        assert (stream.received, writer.buffered) == (written, 0)

    trio.run(main)


async def test_writer_surfaces_trio_errors_and_drops_the_failed_data() -> None:
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    await receive_stream.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await StreamWriter(send_stream).write(b"x")

    writer = StreamWriter(send_stream, bufsize=10)
    await writer.write(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await writer.flush()
    assert writer.buffered == 0

    await send_stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await writer.write(b"y" * 10)


async def test_writer_timeout_bounds_each_send(autojump_clock: trio.testing.MockClock) -> None:
    send_stream, receive_stream = trio.testing.lockstep_stream_one_way_pair()
    writer = StreamWriter(send_stream, bufsize=4, timeout=3)
    start = trio.current_time()
    await writer.write(b"ab")  # only buffered: no wait at all
    assert trio.current_time() == start
    with pytest.raises(TimeoutError, match=r"^peer did not accept data for 3 s$"):
        await writer.flush()  # nobody is reading
    assert trio.current_time() - start == pytest.approx(3)

    # A timed-out send leaves the stream in an unknown state, so start over with a fresh one.
    send_stream, receive_stream = trio.testing.lockstep_stream_one_way_pair()
    writer = StreamWriter(send_stream, timeout=3)

    async def slow_peer() -> None:
        await trio.sleep(2)
        assert await receive_stream.receive_some() == b"late"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_peer)
        await writer.write(b"late")  # accepted after 2 s: within the timeout


async def test_writer_deadline_bounds_a_whole_write_to_a_slow_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    send_stream, receive_stream = trio.testing.lockstep_stream_one_way_pair()
    # The peer accepts a byte every 0.5 s: each wait is short, the whole write is not.
    writer = StreamWriter(send_stream, deadline=3)
    received = bytearray()

    async def slow_reader() -> None:
        for _ in range(1000):
            received.extend(await receive_stream.receive_some(1))
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        start = trio.current_time()
        with pytest.raises(TimeoutError, match=r"^write took longer than its deadline of 3 s$"):
            await writer.write(b"x" * 100)
        assert trio.current_time() - start == pytest.approx(3)
        nursery.cancel_scope.cancel()
    assert 0 < len(received) < 100


@pytest.mark.parametrize(
    ("wait_timeout", "deadline", "after", "message"),
    [
        (None, 2, 2, "write took longer than its deadline of 2 s"),
        (5, 2, 2, "write took longer than its deadline of 2 s"),
        (2, 5, 2, "peer did not accept data for 2 s"),
    ],
)
async def test_writer_deadline_and_timeout_the_shorter_wins(
    autojump_clock: trio.testing.MockClock,
    wait_timeout: float | None,
    deadline: float,
    after: float,
    message: str,
) -> None:
    send_stream, _ = trio.testing.lockstep_stream_one_way_pair()
    writer = StreamWriter(send_stream, bufsize=4, timeout=wait_timeout, deadline=deadline)
    await writer.write(b"ab")  # only buffered: no wait, no deadline
    start = trio.current_time()
    with pytest.raises(TimeoutError, match=f"^{message}$"):
        await writer.flush()  # nobody is reading
    assert trio.current_time() - start == pytest.approx(after)
