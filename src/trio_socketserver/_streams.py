from __future__ import annotations

# Buffered reading and writing over a trio stream: the ``rfile`` / ``wfile`` objects that a
# stream request handler exposes. Pure byte-shuffling logic on top of trio.abc.ReceiveStream and
# trio.abc.SendStream; nothing here knows about sockets, addresses or servers.
from collections.abc import Awaitable, Callable, Iterable

import trio

from ._drain import Exchange

# One receive_some per wakeup should fetch as much as the peer has sent: trio charges a fixed
# cost per call (a checkpoint, a trip through the scheduler), so big receives amortise it over
# many lines. The buffer only holds memory while data is actually unread, so a large value
# costs little for handlers that keep up with their peer.
DEFAULT_BUFFER_SIZE = 65536


class IncompleteReadError(EOFError):
    """The peer closed the connection before :meth:`StreamReader.readexactly` got enough bytes.

    Attributes:
      partial (bytes): The bytes that did arrive before end-of-file (fewer than ``expected``).
      expected (int): The number of bytes that were asked for.

    """

    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(
            f"peer closed the connection after {len(partial)} of {expected} expected bytes"
        )
        self.partial = partial
        self.expected = expected

    def __reduce__(self) -> tuple[type[IncompleteReadError], tuple[bytes, int]]:
        return type(self), (self.partial, self.expected)


class StreamReader:
    """A buffered reader on top of a :class:`trio.abc.ReceiveStream`.

    This is the async counterpart of the binary file that ``socket.makefile("rb")`` returns:
    it offers :meth:`readline`, :meth:`read`, :meth:`read1`, :meth:`readexactly` and
    ``async for line in reader``. Each time it has to wait for the peer it asks the stream for
    up to ``bufsize`` bytes at once, and answers later calls from what is left over.

    Args:
      stream: The stream to read from. The reader does not close it.
      bufsize: The most bytes to ask for in one ``receive_some`` call. Zero or negative means
        :data:`DEFAULT_BUFFER_SIZE`, like the standard library's ``rbufsize = -1``.
      timeout: See :attr:`timeout`.
      exchange: A server connection's drain state: when the server drains, a read that waits
        for the peer's next message with nothing buffered returns end-of-file (see
        :meth:`BaseServer.shutdown`). None (the default) for a stream that never ends early.
      deadline: See :attr:`deadline`.

    Attributes:
      timeout (float | None): If not None, the longest time, in seconds, that any single wait
        for the peer may take. It bounds each ``receive_some`` call separately, not a whole
        :meth:`readline` or :meth:`read`, so a peer that keeps trickling data in never times
        out. It may be changed at any time; the new value applies from the next wait. It must
        be None or a non-negative number.
      deadline (float | None): If not None, the longest time, in seconds, that one read
        (:meth:`readline`, :meth:`read`, :meth:`readexactly`, :meth:`read1`, one step of
        ``async for``) may take in total, however the bytes trickle in. It may be changed at
        any time; the new value applies from the next read. It must be None or a
        non-negative number. None (the default) opens no cancel scope per read.

    Cancellation:
      A read is a checkpoint only when it has to receive from the stream; a read that can be
      answered from the buffer returns without yielding to the scheduler. If a read is
      cancelled, times out or passes its deadline, nothing is lost: the bytes received so far
      stay buffered and the next read sees them (the stream takes nothing from the peer once
      cancelled).

    Errors:
      Every read can raise whatever the underlying stream raises, e.g.
      :exc:`trio.BrokenResourceError` if the connection was reset,
      :exc:`trio.ClosedResourceError` if the stream was closed, or
      :exc:`trio.BusyResourceError` if another task is already waiting on the same stream. The
      reader is not meant to be shared by tasks that read concurrently.

    """

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        bufsize: int = DEFAULT_BUFFER_SIZE,
        timeout: float | None = None,
        exchange: Exchange | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        self._stream = stream
        self._bufsize = bufsize if bufsize > 0 else DEFAULT_BUFFER_SIZE
        self.timeout = timeout
        self._exchange = exchange
        self.deadline = deadline
        # True while a read runs inside the cancel scope of its deadline (see _within_deadline).
        self._bounded = False
        # Unread data is self._buf[self._pos:]. Consumed bytes are only cut off the front just
        # before the buffer grows (or all at once when everything has been read), so consuming
        # many small lines from one big receive copies nothing but the lines themselves.
        self._buf = bytearray()
        self._pos = 0
        # How many unread bytes (counted from self._pos) are known to contain no b"\n", so that
        # readline scans each received byte only once.
        self._scanned = 0
        self._eof = False

    async def readline(self, limit: int = -1) -> bytes:
        """Read one line, exactly like :meth:`io.BytesIO.readline`.

        Args:
          limit: If non-negative, return at most this many bytes, even if that splits a line
            (``limit=0`` returns ``b""`` at once). Negative means no limit.

        Returns:
          The bytes up to and including the first ``b"\\n"``. Without a newline: ``limit``
          bytes if that many arrived, otherwise whatever was left when the peer closed the
          connection. ``b""`` means end-of-file.

        While looking for the newline the reader holds at most ``limit + bufsize`` bytes, so a
        limit protects a server from a peer that sends an endless line. Without a limit the
        whole line is buffered, however long it is.

        Cancellation:
          A checkpoint only if it has to receive from the stream; see :class:`StreamReader`.

        Errors:
          TimeoutError: If :attr:`timeout` is set and the peer sent nothing for that long,
            or :attr:`deadline` is set and the line took longer than that in total. Bytes of
            the partial line stay buffered.

        """
        if self.deadline is not None and not self._bounded:
            return await self._within_deadline(self.deadline, self.readline, limit)
        while True:
            unread = len(self._buf) - self._pos
            stop = len(self._buf) if limit < 0 else min(len(self._buf), self._pos + limit)
            newline = self._buf.find(b"\n", self._pos + self._scanned, stop)
            if newline >= 0:
                return self._take(newline - self._pos + 1)
            self._scanned = max(self._scanned, stop - self._pos)
            if 0 <= limit <= unread:
                return self._take(limit)
            if not await self._fill():
                return self._take(unread)

    async def read(self, n: int = -1) -> bytes:
        """Read ``n`` bytes, or everything until end-of-file.

        Like a blocking ``socket.makefile("rb").read(n)``, this waits until ``n`` bytes have
        arrived; it returns fewer only if the peer closes the connection first.

        Args:
          n: How many bytes to read. Negative means: read until the peer closes the connection.
            Zero returns ``b""`` without waiting.

        Returns:
          The bytes read; shorter than ``n`` (or ``b""``) only at end-of-file.

        Cancellation:
          A checkpoint only if it has to receive from the stream; see :class:`StreamReader`.

        Errors:
          TimeoutError: If :attr:`timeout` is set and the peer sent nothing for that long,
            or :attr:`deadline` is set and the read took longer than that in total. The bytes
            received so far stay buffered.

        """
        if self.deadline is not None and not self._bounded:
            return await self._within_deadline(self.deadline, self.read, n)
        if n < 0:
            while await self._fill():
                pass
            return self._take(len(self._buf) - self._pos)
        while len(self._buf) - self._pos < n and await self._fill():
            pass
        return self._take(min(n, len(self._buf) - self._pos))

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes.

        Args:
          n: How many bytes to read. Zero returns ``b""`` without waiting.

        Returns:
          ``n`` bytes.

        Cancellation:
          A checkpoint only if it has to receive from the stream; see :class:`StreamReader`.

        Errors:
          IncompleteReadError: If the peer closed the connection before ``n`` bytes arrived.
            The bytes that did arrive are in its ``partial`` attribute and are consumed.
          TimeoutError: As for :meth:`read` (which bounds it, :attr:`deadline` included).
            The bytes received so far stay buffered.
          ValueError: If ``n`` is negative.

        """
        if n < 0:
            raise ValueError(f"readexactly() needs a non-negative size, not {n}")
        data = await self.read(n)
        if len(data) < n:
            raise IncompleteReadError(data, n)
        return data

    async def read1(self, n: int = -1) -> bytes:
        """Read whatever is available, waiting for the peer at most once.

        If the buffer holds data, return it without waiting; otherwise do one receive and
        return what it got. Use this to process data as soon as it arrives.

        Args:
          n: If non-negative, return at most this many bytes (zero returns ``b""`` without
            waiting). Negative means no limit.

        Returns:
          At least one byte, or ``b""`` at end-of-file.

        Cancellation:
          A checkpoint only if the buffer is empty; see :class:`StreamReader`.

        Errors:
          TimeoutError: If :attr:`timeout` or :attr:`deadline` is set and the peer sent
            nothing for that long.

        """
        if n == 0:
            return b""
        if self.deadline is not None and not self._bounded:
            return await self._within_deadline(self.deadline, self.read1, n)
        if self._pos == len(self._buf):
            await self._fill()
        unread = len(self._buf) - self._pos
        return self._take(unread if n < 0 else min(n, unread))

    def __aiter__(self) -> StreamReader:
        """Iterate over the lines from the peer: ``async for line in reader: ...``."""
        return self

    async def __anext__(self) -> bytes:
        """Return the next line (see :meth:`readline`); stop at end-of-file."""
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    def _take(self, n: int) -> bytes:
        """Consume and return the next ``n`` buffered bytes (``n`` must be available)."""
        if not self._pos and n == len(self._buf):
            # All of it (a request that came alone): one copy, not a slice and a copy.
            data = bytes(self._buf)
            self._buf.clear()
            self._scanned = 0
            return data
        data = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self._scanned = max(0, self._scanned - n)
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        return data

    async def _fill(self) -> bool:
        """Append one receive to the buffer; return False (and remember it) at end-of-file."""
        if self._eof:
            return False
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        exchange = self._exchange
        if exchange is None:
            data = await self._receive_some()
        elif not exchange.at_boundary or self._buf:
            data = await self._receive_some()
            exchange.received_data(data)
        # A receive at a message boundary, which a drain ends with end-of-file. Here, not in
        # a coroutine of its own: an idle connection waits here, holding every frame above.
        elif not exchange.start_waiting():
            await trio.lowlevel.checkpoint()
            data = b""
        else:
            data = b""
            try:
                data = await self._receive_some()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                # The drain ended the wait (see _drain.py); TLS reports it as a broken stream.
                if not exchange.drain.closing:
                    raise
            finally:
                exchange.stop_waiting(data)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _receive_some(self) -> Awaitable[bytes | bytearray]:
        """One receive, bounded by :attr:`timeout`.

        A plain function returning the awaitable, not a coroutine: every coroutine frame on
        the stack of an idle connection is memory that connection holds.
        """
        if self.timeout is None:
            return self._stream.receive_some(self._bufsize)
        return self._receive_with_timeout(self.timeout)

    async def _receive_with_timeout(self, wait_timeout: float) -> bytes | bytearray:
        with trio.move_on_after(wait_timeout):
            return await self._stream.receive_some(self._bufsize)
        raise TimeoutError(f"no data from the peer for {wait_timeout} s")

    async def _within_deadline(
        self, deadline: float, read: Callable[[int], Awaitable[bytes]], n: int
    ) -> bytes:
        """``await read(n)`` (a public read method), bounded in total by ``deadline``.

        One cancel scope around the whole call, opened only when a deadline is set, so that
        reads without one pay nothing for it; ``read`` sees ``_bounded`` and runs inside it.
        """
        self._bounded = True
        try:
            with trio.move_on_after(deadline):
                return await read(n)
        finally:
            self._bounded = False
        raise TimeoutError(f"read took longer than its deadline of {deadline} s")


class StreamWriter:
    """A (possibly) buffered writer on top of a :class:`trio.abc.SendStream`.

    This is the async counterpart of the binary file that ``socket.makefile("wb")`` returns.

    Args:
      stream: The stream to write to. The writer does not close it.
      bufsize: Zero (the default, like the standard library's ``wbufsize = 0``) sends every
        :meth:`write` at once. A positive value collects writes and sends them when at least
        ``bufsize`` bytes are waiting, or on :meth:`flush`. Negative means
        :data:`DEFAULT_BUFFER_SIZE`. Remember to :meth:`flush` a buffered writer before the
        connection is closed.
      timeout: See :attr:`timeout`.
      exchange: The connection's drain state, shared with its :class:`StreamReader`: a write
        tells the reader that the message it answered is complete.
      deadline: See :attr:`deadline`.

    Attributes:
      timeout (float | None): If not None, the longest time, in seconds, that any single
        ``send_all`` may take. It may be changed at any time; the new value applies from the
        next send. It must be None or a non-negative number.
      deadline (float | None): If not None, the longest time, in seconds, that one
        :meth:`write`, :meth:`writelines` or :meth:`flush` may take in total, however slowly
        the peer reads. Each of them sends at most once, so today this bounds the same
        ``send_all`` as :attr:`timeout`; set whichever names what you mean (the handler's
        ``timeout`` bounds reads too). It may be changed at any time; the new value applies
        from the next call. It must be None or a non-negative number.

    Cancellation:
      A write is a checkpoint only if it sends. If a send is cancelled, times out or fails, the
      data it was sending is dropped: part of it may already have reached the peer, so (as with
      trio's own ``send_all``) the stream is in an unknown state and should be closed.

    Errors:
      Every method that sends can raise whatever the underlying stream raises, e.g.
      :exc:`trio.BrokenResourceError` if the peer went away, :exc:`trio.ClosedResourceError`
      if the stream was closed, or :exc:`trio.BusyResourceError` if another task is sending on
      the same stream at the same time.

    """

    def __init__(
        self,
        stream: trio.abc.SendStream,
        bufsize: int = 0,
        timeout: float | None = None,
        exchange: Exchange | None = None,
        *,
        deadline: float | None = None,
    ) -> None:
        self._stream = stream
        self._bufsize = DEFAULT_BUFFER_SIZE if bufsize < 0 else bufsize
        self.timeout = timeout
        self._exchange = exchange
        self.deadline = deadline
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """The number of bytes written but not sent yet (always 0 for an unbuffered writer)."""
        return len(self._buf)

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write ``data``.

        An unbuffered writer sends it at once. A buffered writer adds it to the buffer, and
        sends the whole buffer once it holds at least ``bufsize`` bytes.

        Returns:
          ``len(data)``: everything is always accepted.

        Cancellation:
          A checkpoint only if it sends; see :class:`StreamWriter`.

        Errors:
          TimeoutError: If :attr:`timeout` or :attr:`deadline` is set and the peer did not
            accept the data for that long.

        """
        if self._exchange is not None:
            self._exchange.replied = True
        if not self._bufsize:
            await self._send(data)
        else:
            self._buf += data
            if len(self._buf) >= self._bufsize:
                await self.flush()
        return len(data)

    async def writelines(self, lines: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write the concatenation of ``lines`` (no newlines are added).

        Equivalent to one :meth:`write` call with the lines joined, so an unbuffered writer
        sends them all in a single ``send_all``.

        Cancellation:
          A checkpoint only if it sends; see :class:`StreamWriter`.

        Errors:
          TimeoutError: As for :meth:`write`.

        """
        await self.write(b"".join(lines))

    async def flush(self) -> None:
        """Send everything in the buffer.

        Does nothing (and is not a checkpoint) if the buffer is empty.

        Cancellation:
          If the send is cancelled the buffered data is dropped; see :class:`StreamWriter`.

        Errors:
          TimeoutError: If :attr:`timeout` or :attr:`deadline` is set and the peer did not
            accept the data for that long.

        """
        if self._buf:
            data, self._buf = self._buf, bytearray()
            await self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> Awaitable[None]:
        """One ``send_all``, bounded by :attr:`timeout` and :attr:`deadline` (every public
        method sends at most once, so bounding the send bounds the whole call).

        A plain function returning the awaitable, not a coroutine: an unbounded send (the
        default) is then one coroutine fewer per write.
        """
        if self.timeout is None and self.deadline is None:
            return self._stream.send_all(data)
        return self._send_bounded(data)

    async def _send_bounded(self, data: bytes | bytearray | memoryview) -> None:
        timeout = self.timeout
        deadline = self.deadline
        if timeout is None or (deadline is not None and deadline < timeout):
            bound, error = deadline, f"write took longer than its deadline of {deadline} s"
        else:
            bound, error = timeout, f"peer did not accept data for {timeout} s"
        assert bound is not None  # _send() comes here only with one of them set
        with trio.move_on_after(bound):
            await self._stream.send_all(data)
            return
        raise TimeoutError(error)
