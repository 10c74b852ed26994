"""Message text readers for the DATA and BDAT phases of an SMTP session.

Both readers work on whole buffers with C-speed bytes operations (find, count,
replace); Python code runs once per received buffer, never once per line.

Smuggling (SMTP smuggling, 2023): the only end of DATA is CR LF "." CR LF.  ``\\n.\\n``,
``\\r.\\r``, ``\\n.\\r\\n`` and ``\\r\\n.\\n`` are ordinary message text.  A bare LF or bare
CR is reported (``bare_line_ending``); with the ``normalize`` policy it is turned into
CR LF, so these sequences end up as a ``"."`` line *inside* the message, where the egress
stuffs the dot again and no later hop can mistake it for an end marker.  A dot directly
followed by a bare CR or LF is therefore not taken as a stuffing dot.

The data phase starts right after the CR LF of the DATA command, so the reader
behaves as if the input were preceded by CR LF: ``.\\r\\n`` at the very start ends an
empty message.

Memory: the stored message never grows past ``max_size``; once a message is known to
be too big, the reader only counts octets and watches for the end marker.
"""

from __future__ import annotations

from attrs import frozen

MARKER = b"\r\n.\r\n"
CRLF = b"\r\n"
POLICIES = ("normalize", "reject")

# A line fragment longer than this (or than max_line_length) is processed without
# waiting for its end: the line is over-long anyway.
_PARTIAL_LINE = 64 * 1024


@frozen
class DataResult:
    """A received message and what was wrong with it.

    ``body`` has CR LF line endings and ends with CR LF (``b""`` for an empty message,
    and when ``oversize``).  ``size`` counts the octets of the message as received,
    after dot-unstuffing and before normalisation; it keeps counting past the limit.
    ``oversize`` is set when ``size`` (or the normalised body) exceeds ``max_size``.
    ``long_line``: some line is longer than ``max_line_length`` octets with its CR LF
    (stuffing dots not counted; lines are split at LF as received).
    ``bare_line_ending``: a bare LF or bare CR was seen; with the ``normalize`` policy
    the body has CR LF in its place, with ``reject`` the body is left as received.
    """

    body: bytes
    size: int
    oversize: bool
    long_line: bool
    bare_line_ending: bool


def _has_long_line(region: bytes, limit: int) -> bool:
    """Whether ``region`` (starting at a line start) has ``limit`` octets without LF.

    Jumps from the last LF of each ``limit``-octet window to the next, so the work
    is one short reverse search per ``limit`` octets, not one step per line.
    """
    n = len(region)
    pos = 0
    while pos + limit <= n:
        nl = region.rfind(b"\n", pos, pos + limit)
        if nl < 0:
            return True
        pos = nl + 1
    return False


def _normalize(region: bytes) -> bytes:
    """Turn every bare CR and bare LF into CR LF (three C-speed passes)."""
    return region.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


class _BodyBuilder:
    """Collects message text in whole-line regions; checks, unstuffs and stores them.

    Raw bytes are pushed with ``push``; complete lines are processed at once, an
    incomplete last line waits for its end (unless it is already over-long).
    Invariant: a processed region never ends with a CR, so a CR LF pair is never split
    between regions and bare line endings are counted exactly.
    """

    def __init__(
        self, max_size: int, max_line_length: int, bare_policy: str, unstuff: bool
    ) -> None:
        if bare_policy not in POLICIES:
            raise ValueError(f"bare_policy must be one of {POLICIES}, not {bare_policy!r}")
        if max_size < 0 or max_line_length < 3:
            raise ValueError("bad limits")
        self.max_size = max_size
        # A line of max_line_length octets holds max_line_length - 1 octets before its LF.
        self._run_limit = max_line_length
        self._partial_limit = max(_PARTIAL_LINE, max_line_length + 1)
        self._normalize = bare_policy == "normalize"
        self._unstuff = unstuff
        self._pending = bytearray()
        self._parts: list[bytes] = []
        self._stored = 0
        # Whether the next region starts right after a CR LF (a line start where a
        # stuffing dot may stand).  The data phase begins after the DATA command's CR LF.
        self._after_crlf = unstuff
        self.size = 0
        self.oversize = False
        self.long_line = False
        self.bare = False

    def push(self, data: bytes) -> None:
        """Take raw bytes; process all complete lines."""
        if not data:
            return
        start = 0
        if self._pending:
            # Complete the waiting line first, then the whole lines of ``data`` as one
            # region, without copying ``data`` into the pending buffer.
            nl = data.find(b"\n")
            if nl < 0:
                self._pending += data
                self._flush_partial()
                return
            start = nl + 1
            self._pending += data[:start]
            self._process(bytes(self._pending))
            self._pending.clear()
        cut = data.rfind(b"\n", start) + 1
        if cut > start:
            self._process(data if start == 0 and cut == len(data) else data[start:cut])
        else:
            cut = start
        if cut < len(data):
            self._pending += data[cut:]
            self._flush_partial()

    def _flush_partial(self) -> None:
        """Process an over-long line fragment now instead of holding it in memory."""
        pending = self._pending
        if len(pending) <= self._partial_limit:
            return
        cut = len(pending)
        if pending[cut - 1] == 0x0D:
            cut -= 1  # keep a CR back: its LF may come next
        self._process(bytes(pending[:cut]))
        del pending[:cut]

    @property
    def buffered(self) -> int:
        """Octets held in memory: the stored message and an unfinished line."""
        return self._stored + len(self._pending)

    def drop_tail(self, count: int) -> None:
        """Forget the last ``count`` unprocessed bytes (the start of the end marker)."""
        if count:
            if count > len(self._pending):
                raise AssertionError("end marker bytes were already processed")
            del self._pending[-count:]

    def finish(self) -> bytes:
        """Process what is left and return the stored message (b"" when oversize)."""
        if self._pending:
            self._process(bytes(self._pending))
            self._pending.clear()
        if self.oversize:
            return b""
        body = b"".join(self._parts)
        self._parts = []
        if body and body[-1] not in b"\r\n":
            # BDAT input need not end with CR LF; a stored message always does.
            body += CRLF
        return body

    def result(self, size: int) -> DataResult:
        """The message and what was found in it, ``size`` bytes received."""
        body = self.finish()
        return DataResult(
            body=body, size=size, oversize=self.oversize, long_line=self.long_line,
            bare_line_ending=self.bare,
        )

    def _process(self, region: bytes) -> None:
        starts_after_crlf = self._after_crlf
        self._after_crlf = region.endswith(CRLF)
        lf = region.count(b"\n")
        cr = region.count(b"\r")
        crlf = region.count(CRLF)
        bare = lf != crlf or cr != crlf
        if bare:
            self.bare = True
        if self._unstuff:
            region = self._unstuff_region(region, starts_after_crlf, bare)
        # Measured without the stuffing dots (RFC 5321 4.5.3.1.6), lines split at LF.
        if not self.long_line and len(region) >= self._run_limit:
            self.long_line = _has_long_line(region, self._run_limit)
        self.size += len(region)
        if self.oversize:
            return
        if bare and self._normalize:
            region = _normalize(region)
        if self.size > self.max_size or self._stored + len(region) > self.max_size:
            self.oversize = True
            self._parts = []
            self._stored = 0
            return
        self._parts.append(region)
        self._stored += len(region)

    @staticmethod
    def _unstuff_region(region: bytes, starts_after_crlf: bool, bare: bool) -> bytes:
        """Remove the stuffing dot at the start of every line (RFC 5321 4.5.2).

        A line start is a position after CR LF.  When there are bare line endings, a
        dot directly followed by CR or LF is kept: with normalisation it becomes a
        visible "." line instead of vanishing (the smuggling sequences stay visible).
        """
        if starts_after_crlf and region[:1] == b"." and not (
            bare and region[1:2] in (b"\r", b"\n")
        ):
            region = region[1:]
        if bare:
            parts = region.split(b"\r\n.")
            out = [parts[0]]
            for part in parts[1:]:
                # A dot followed by CR or LF here is always bare: CR LF "." CR LF
                # cannot occur before the end marker.
                out.append(b"\r\n." + part if part[:1] in (b"\r", b"\n") else CRLF + part)
            return b"".join(out)
        # Without any match, bytes.replace returns the region itself: no copy.
        return region.replace(b"\r\n.", CRLF)


class DotDataReader:
    """Reads a DATA phase: finds the end marker, unstuffs dots, checks the text.

    Call ``feed`` with each received buffer until it returns the number of bytes it
    used (the rest of that buffer is pipelined commands), then ``result``.
    """

    def __init__(
        self, max_size: int, max_line_length: int = 1000, bare_policy: str = "normalize"
    ) -> None:
        self._builder = _BodyBuilder(max_size, max_line_length, bare_policy, unstuff=True)
        # The last (up to four) bytes seen, so a marker split across buffers is found.
        self._tail = CRLF
        self._result: DataResult | None = None

    @property
    def buffered(self) -> int:
        """Octets of message text held in memory now (bounded by max_size + 64 KiB)."""
        return self._builder.buffered

    @property
    def done(self) -> bool:
        """True once the end marker has been seen."""
        return self._result is not None

    def feed(self, data: bytes) -> int | None:
        """Consume ``data``; None while the end marker is still to come, else the
        number of bytes of ``data`` up to and including the end marker."""
        if self._result is not None:
            raise RuntimeError("the end of data was already seen")
        tail = self._tail
        t = len(tail)
        # A marker that starts in the tail is found in this small window first.
        pos = (tail + data[:4]).find(MARKER)
        if pos < 0:
            found = data.find(MARKER)
            pos = -1 if found < 0 else t + found
        if pos < 0:
            self._builder.push(data)
            self._tail = (tail + data[-4:])[-4:]
            return None
        # Window coordinates: ``tail + data``; the message ends after the marker's CR LF.
        end = pos + 2
        if end >= t:
            self._builder.push(data[: end - t])
        else:
            self._builder.drop_tail(t - end)
        self._finish()
        return pos + len(MARKER) - t

    def _finish(self) -> None:
        self._result = self._builder.result(self._builder.size)

    def result(self) -> DataResult:
        """The message, once ``feed`` has returned a count."""
        if self._result is None:
            raise RuntimeError("the end of data has not been seen yet")
        return self._result


class ChunkDataReader:
    """Collects the chunks of a BDAT transfer (RFC 3030): no dot-stuffing, no marker."""

    def __init__(
        self, max_size: int, max_line_length: int = 1000, bare_policy: str = "normalize"
    ) -> None:
        self._builder = _BodyBuilder(max_size, max_line_length, bare_policy, unstuff=False)
        self._received = 0
        self._result: DataResult | None = None

    @property
    def size(self) -> int:
        """Octets received so far, including any beyond the limit."""
        return self._received

    @property
    def buffered(self) -> int:
        """Octets of message text held in memory now (bounded by max_size + 64 KiB)."""
        return self._builder.buffered

    def add_chunk(self, data: bytes) -> None:
        """Take the octets of one BDAT chunk, exactly as sent."""
        if self._result is not None:
            raise RuntimeError("the last chunk was already taken")
        self._received += len(data)
        self._builder.push(data)

    def result(self) -> DataResult:
        """The message after the LAST chunk (stored with a final CR LF)."""
        if self._result is None:
            self._result = self._builder.result(self._received)
        return self._result
