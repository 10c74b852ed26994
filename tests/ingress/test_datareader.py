"""DATA and BDAT readers: end marker, dot-unstuffing, limits, smuggling defence."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.ingress.datareader import ChunkDataReader, DataResult, DotDataReader

MARKER = b"\r\n.\r\n"
KIB = 1024

# Lines rich in what matters here: dots, CR, LF and the letters of commands.
line_text = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dotty_lines = st.lists(
    st.one_of(line_text, st.sampled_from([b"", b".", b"..", b". ", b".x", b"...."])),
    max_size=30,
)
noisy = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"MAIL FROM:<x@y>", b"\r\n.\r\n"]),
    max_size=40,
).map(b"".join)


def stuff(lines: list[bytes]) -> bytes:
    """What a correct client sends for ``lines``: dot-stuffed, CRLF, end marker."""
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given positions (modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


def feed_all(reader: DotDataReader, pieces: list[bytes]) -> tuple[int, int]:
    """Feed pieces until the marker; return (piece index, consumed count in it)."""
    for i, piece in enumerate(pieces):
        used = reader.feed(piece)
        if used is not None:
            return i, used
    raise AssertionError("no end marker found")


def reference(data: bytes, normalize: bool = True) -> tuple[int, bytes, int, int]:
    """A slow, line-by-line model: (consumed, body, size, longest LF-line run)."""
    virtual = b"\r\n" + data
    m = virtual.find(MARKER)
    assert m >= 0
    content = virtual[2 : m + 2]
    lines = content.split(b"\r\n")
    out = []
    for ln in lines:
        if ln.startswith(b".") and ln[1:2] not in (b"\r", b"\n"):
            ln = ln[1:]
        out.append(ln)
    unstuffed = b"\r\n".join(out)
    longest = max((len(x) for x in unstuffed.split(b"\n")), default=0)
    body = unstuffed
    if normalize:
        body = re.sub(rb"\r\n|\r|\n", b"\r\n", unstuffed)
    return m + 5 - 2, body, len(unstuffed), longest


class DotDataReaderTests(SynchronousTestCase):
    """DotDataReader."""

    def read(
        self, data: bytes, max_size: int = 10 * KIB, max_line_length: int = 1000,
        bare_policy: str = "normalize",
    ) -> tuple[int | None, DataResult]:
        reader = DotDataReader(max_size, max_line_length, bare_policy)
        used = reader.feed(data)
        return used, reader.result()

    def test_simple_message(self) -> None:
        """The body keeps its final CRLF; the marker's dot line is not part of it."""
        used, r = self.read(b"Subject: x\r\n\r\nhello\r\n.\r\n")
        self.assertEqual(used, 24)
        self.assertEqual(r, DataResult(b"Subject: x\r\n\r\nhello\r\n", 21, False, False, False))

    def test_empty_message(self) -> None:
        """A '.' line right after DATA ends an empty message."""
        used, r = self.read(b".\r\nQUIT\r\n")
        self.assertEqual(used, 3)
        self.assertEqual((r.body, r.size), (b"", 0))

    def test_empty_line_message(self) -> None:
        """A message of one empty line is CRLF."""
        used, r = self.read(b"\r\n.\r\n")
        self.assertEqual((used, r.body), (5, b"\r\n"))

    def test_pipelined_rest(self) -> None:
        """The count stops at the marker; what follows is left for the command parser."""
        data = b"a\r\n.\r\nMAIL FROM:<a@b>\r\n.\r\n"
        used, r = self.read(data)
        self.assertEqual(data[used:], b"MAIL FROM:<a@b>\r\n.\r\n")
        self.assertEqual(r.body, b"a\r\n")

    def test_unstuffing(self) -> None:
        """A leading dot is removed from every line, the first one included."""
        _, r = self.read(b"..first\r\nx\r\n..\r\n...\r\n.x.\r\n.\r\n")
        self.assertEqual(r.body, b".first\r\nx\r\n.\r\n..\r\nx.\r\n")
        self.assertEqual(r.size, len(r.body))

    def test_unstuffing_across_buffers(self) -> None:
        """A stuffing dot whose CRLF came in the previous buffer is still removed."""
        for cut in range(1, 13):
            data = b"ab\r\n..cd\r\n.\r\n"
            reader = DotDataReader(1000)
            self.assertIsNone(reader.feed(data[:cut]))
            self.assertEqual(reader.feed(data[cut:]), len(data) - cut)
            self.assertEqual(reader.result().body, b"ab\r\n.cd\r\n", cut)

    def test_marker_split_everywhere(self) -> None:
        """The marker is found wherever the buffers are cut, also one byte at a time."""
        data = b"x\r\n.y\r\n.\r\nNOOP\r\n"
        for a in range(len(data) + 1):
            for b in range(a, len(data) + 1):
                reader = DotDataReader(1000)
                i, used = feed_all(reader, [data[:a], data[a:b], data[b:]])
                rest = [data[:a], data[a:b], data[b:]][i][used:] + b"".join(
                    [data[:a], data[a:b], data[b:]][i + 1 :]
                )
                self.assertEqual(rest, b"NOOP\r\n")
                self.assertEqual(reader.result().body, b"x\r\ny\r\n")
        reader = DotDataReader(1000)
        results = [reader.feed(data[i : i + 1]) for i in range(10)]
        self.assertEqual(results, [None] * 9 + [1])

    def test_feed_after_end(self) -> None:
        """Feeding after the end, or asking for the result before it, is an error."""
        reader = DotDataReader(1000)
        self.assertRaises(RuntimeError, reader.result)
        reader.feed(b".\r\n")
        self.assertRaises(RuntimeError, reader.feed, b"x")

    def test_bad_policy(self) -> None:
        """Only normalize and reject are policies."""
        self.assertRaises(ValueError, DotDataReader, 1000, 1000, "ignore")

    def test_smuggling_sequences(self) -> None:
        """Only CRLF.CRLF ends the data; the smuggled command stays inside the body."""
        for seq in [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"]:
            data = b"Subject: s\r\n\r\nhi" + seq + b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n.\r\n"
            used, r = self.read(data)
            self.assertEqual(used, len(data), seq)
            self.assertTrue(r.bare_line_ending, seq)
            self.assertIn(b"\r\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\n", r.body, seq)
            self.assertEqual(r.body.count(b"\r"), r.body.count(b"\n"), seq)
            used, r = self.read(data, bare_policy="reject")
            self.assertEqual(used, len(data), seq)
            self.assertTrue(r.bare_line_ending, seq)
            self.assertIn(b"hi" + seq + b"MAIL FROM", r.body, seq)

    def test_bare_lf_normalised(self) -> None:
        """Bare LF and bare CR become CRLF; CR CR LF is a bare CR and a CRLF."""
        _, r = self.read(b"a\nb\rc\r\r\nd\r\n.\r\n")
        self.assertEqual(r.body, b"a\r\nb\r\nc\r\n\r\nd\r\n")
        self.assertTrue(r.bare_line_ending)
        self.assertEqual(r.size, 11)

    def test_crlf_split_is_not_bare(self) -> None:
        """A CRLF split between buffers is not a bare CR or LF."""
        reader = DotDataReader(1000)
        reader.feed(b"abc\r")
        reader.feed(b"\ndef\r")
        reader.feed(b"\n.\r\n")
        r = reader.result()
        self.assertFalse(r.bare_line_ending)
        self.assertEqual(r.body, b"abc\r\ndef\r\n")

    def test_long_lines(self) -> None:
        """A line is too long when it has more than max_line_length octets with its CRLF."""
        ok = b"x" * 98 + b"\r\n"
        _, r = self.read(ok + b".\r\n", max_line_length=100)
        self.assertFalse(r.long_line)
        _, r = self.read(b"." + ok + b".\r\n", max_line_length=100)
        self.assertFalse(r.long_line, "the stuffing dot does not count")
        _, r = self.read(b"a\r\nx" + ok + b"b\r\n.\r\n", max_line_length=100)
        self.assertTrue(r.long_line)
        self.assertEqual(r.body, b"a\r\nx" + ok + b"b\r\n", "a long line is kept whole")

    def test_long_line_across_buffers(self) -> None:
        """A long line spread over many buffers is flagged and stays in DATA mode."""
        reader = DotDataReader(1000 * KIB, 1000)
        for _ in range(300):
            self.assertIsNone(reader.feed(b"y" * 999))
        self.assertIsNone(reader.feed(b"\r\nRSET\r\nMAIL FROM:<a@b>\r\n"))
        self.assertEqual(reader.feed(b".\r\nQUIT\r\n"), 3)
        r = reader.result()
        self.assertTrue(r.long_line)
        self.assertFalse(r.oversize)
        self.assertTrue(r.body.endswith(b"y\r\nRSET\r\nMAIL FROM:<a@b>\r\n"))
        self.assertEqual(len(r.body), 299700 + 25)

    def test_oversize(self) -> None:
        """Beyond max_size the body is dropped, the size still counted, the marker found."""
        reader = DotDataReader(1000)
        line = b"z" * 98 + b"\r\n"
        for _ in range(50):
            self.assertIsNone(reader.feed(line))
            self.assertLessEqual(reader.buffered, 1000 + 64 * KIB)
        self.assertEqual(reader.feed(b".\r\nNOOP\r\n"), 3)
        r = reader.result()
        self.assertTrue(r.oversize)
        self.assertEqual((r.body, r.size), (b"", 5000))

    def test_exactly_max_size(self) -> None:
        """A message of exactly max_size octets (after unstuffing) is not oversize."""
        _, r = self.read(b"..abc\r\n.\r\n", max_size=6)
        self.assertEqual((r.body, r.size, r.oversize), (b".abc\r\n", 6, False))
        _, r = self.read(b"..abc\r\n.\r\n", max_size=5)
        self.assertTrue(r.oversize)

    def test_oversize_long_line_memory(self) -> None:
        """Megabytes without a line end are not held in memory."""
        reader = DotDataReader(100 * KIB)
        for _ in range(64):
            reader.feed(b"q" * (32 * KIB))
            self.assertLessEqual(reader.buffered, 100 * KIB + 64 * KIB)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), 5)
        r = reader.result()
        self.assertTrue(r.oversize and r.long_line)
        self.assertEqual(r.size, 2 * KIB * KIB + 2)

    def test_huge_line_processed_early(self) -> None:
        """A line longer than 64 KiB is processed before its end; CRLF and dots survive."""
        reader = DotDataReader(1000 * KIB)
        self.assertIsNone(reader.feed(b"..a\r\n." + b"b" * (70 * KIB) + b"\r"))
        self.assertLess(reader.buffered - 70 * KIB, 16)
        self.assertEqual(reader.feed(b"\n.\r\n"), 4)
        r = reader.result()
        self.assertEqual(r.body, b".a\r\n" + b"b" * (70 * KIB) + b"\r\n")
        self.assertEqual((r.long_line, r.bare_line_ending, r.oversize), (True, False, False))

    @given(dotty_lines, st.lists(st.integers(min_value=0), max_size=6), noisy)
    def test_stuffing_round_trip(self, lines: list[bytes], cuts: list[int], after: bytes) -> None:
        """Stuffed lines fed in any split come back exactly; the rest of the input is intact."""
        stuffed = stuff(lines)
        data = stuffed + after
        pieces = splits(data, cuts)
        reader = DotDataReader(10 * KIB, 20)
        i, used = feed_all(reader, pieces)
        self.assertEqual(pieces[i][used:] + b"".join(pieces[i + 1 :]), after)
        r = reader.result()
        body = b"".join(ln + b"\r\n" for ln in lines)
        self.assertEqual(r.body, body)
        self.assertEqual(r.size, len(body))
        self.assertFalse(r.bare_line_ending)
        self.assertEqual(r.long_line, any(len(ln) + 2 > 20 for ln in lines))

    @given(noisy, st.lists(st.integers(min_value=0), max_size=6),
           st.sampled_from(["normalize", "reject"]))
    def test_matches_reference(self, data: bytes, cuts: list[int], policy: str) -> None:
        """On any input (bare CR/LF, smuggling, markers) the reader agrees with a slow model."""
        data += b"\r\n.\r\nTAIL"
        pieces = splits(data, cuts)
        reader = DotDataReader(10 * KIB, 8, policy)
        i, used = feed_all(reader, pieces)
        consumed = sum(len(p) for p in pieces[:i]) + used
        ref_used, ref_body, ref_size, longest = reference(data, policy == "normalize")
        self.assertEqual(consumed, ref_used)
        r = reader.result()
        self.assertEqual(r.body, ref_body)
        self.assertEqual(r.size, ref_size)
        self.assertEqual(r.long_line, longest >= 8)
        content = (b"\r\n" + data)[2 : ref_used - 5 + 2]
        self.assertEqual(r.bare_line_ending, re.search(rb"\r(?!\n)|(?<!\r)\n", content) is not None)
        if policy == "normalize":
            self.assertEqual(r.body.count(b"\r"), r.body.count(b"\r\n"))
            self.assertEqual(r.body.count(b"\n"), r.body.count(b"\r\n"))

    @settings(max_examples=30)
    @given(st.integers(min_value=0, max_value=3000), st.integers(min_value=1, max_value=700),
           st.integers(min_value=100, max_value=2000))
    def test_oversize_bound(self, max_size: int, chunk: int, total_lines: int) -> None:
        """Memory never exceeds max_size + 64 KiB; oversize exactly when size > max_size."""
        data = b"".join(b"%d\r\n" % i for i in range(total_lines)) + b".\r\n"
        reader = DotDataReader(max_size)
        used = None
        for start in range(0, len(data), chunk):
            used = reader.feed(data[start : start + chunk])
            self.assertLessEqual(reader.buffered, max_size + 64 * KIB)
            if used is not None:
                break
        r = reader.result()
        self.assertEqual(r.size, len(data) - 3)
        self.assertEqual(r.oversize, r.size > max_size)
        self.assertEqual(r.body, b"" if r.oversize else data[:-3])


class ChunkDataReaderTests(SynchronousTestCase):
    """ChunkDataReader (BDAT)."""

    def test_chunks_raw(self) -> None:
        """Chunks are taken as they are: no unstuffing, no end marker."""
        reader = ChunkDataReader(1000)
        reader.add_chunk(b"..a\r\n.\r\n")
        reader.add_chunk(b"b\r\n")
        self.assertEqual(reader.size, 11)
        r = reader.result()
        self.assertEqual(r, DataResult(b"..a\r\n.\r\nb\r\n", 11, False, False, False))
        self.assertRaises(RuntimeError, reader.add_chunk, b"x")

    def test_final_crlf_added(self) -> None:
        """A message not ending in CRLF is stored with one; size counts what was sent."""
        reader = ChunkDataReader(1000)
        reader.add_chunk(b"abc")
        r = reader.result()
        self.assertEqual((r.body, r.size), (b"abc\r\n", 3))

    def test_empty(self) -> None:
        """No octets at all is an empty message."""
        reader = ChunkDataReader(1000)
        reader.add_chunk(b"")
        self.assertEqual(reader.result().body, b"")

    def test_bare_and_long(self) -> None:
        """Bare line endings and long lines are found across chunk boundaries."""
        reader = ChunkDataReader(1000, 10)
        reader.add_chunk(b"abc\r")
        reader.add_chunk(b"\n12345")
        reader.add_chunk(b"6789\r\n")
        r = reader.result()
        self.assertEqual((r.bare_line_ending, r.long_line), (False, True))
        reader = ChunkDataReader(1000, 10)
        reader.add_chunk(b"a\nb\r")
        r = reader.result()
        self.assertEqual((r.bare_line_ending, r.long_line), (True, False))
        self.assertEqual(r.body, b"a\r\nb\r\n")

    def test_reject_policy_keeps_text(self) -> None:
        """With the reject policy the bare line endings are left as they came."""
        reader = ChunkDataReader(1000, 1000, "reject")
        reader.add_chunk(b"a\nb\r\n")
        r = reader.result()
        self.assertEqual((r.body, r.bare_line_ending), (b"a\nb\r\n", True))

    def test_oversize(self) -> None:
        """Beyond max_size the body is dropped and the size still counted."""
        reader = ChunkDataReader(100)
        for _ in range(10):
            reader.add_chunk(b"0123456789" * 5)
            self.assertLessEqual(reader.buffered, 100 + 64 * KIB)
        r = reader.result()
        self.assertEqual((r.body, r.size, r.oversize), (b"", 500, True))

    @given(st.lists(st.binary(max_size=40), max_size=8))
    def test_any_chunks(self, chunks: list[bytes]) -> None:
        """Whatever the chunks, the body is their concatenation, CRLF-normalised."""
        reader = ChunkDataReader(10 * KIB, 12)
        for c in chunks:
            reader.add_chunk(c)
        data = b"".join(chunks)
        r = reader.result()
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        self.assertEqual(r.body, expected)
        self.assertEqual(r.size, len(data))
        self.assertEqual(r.bare_line_ending, re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None)
        self.assertEqual(r.long_line, max(len(x) for x in data.split(b"\n")) >= 12)
