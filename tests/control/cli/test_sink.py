"""Tests for sendarix.control.cli.sink: fault parsing, the SMTP session, faults, TLS, the CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import smtplib
import socket
import ssl
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.control.cli.sink import (
    FaultKind,
    FaultSpecError,
    SinkCommandOptions,
    SinkFactory,
    SinkOptions,
    SinkProtocol,
    SinkServer,
    main,
    parse_fault,
)
from sendarix.model.message import Reply
from tests.support.paths import REPO_ROOT
from tests.support.tlsca import TestCA

_reactor: Any = reactor
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = REPO_ROOT


# --------------------------------------------------------------------------- helpers


def stuff(body: bytes) -> bytes:
    """Reference dot-stuffing of a CRLF body, plus the end marker."""
    lines = body.split(b"\r\n")
    out = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
    if not out.endswith(b"\r\n") and out:
        out += b"\r\n"
    return out + b".\r\n"


def final_codes(data: bytes) -> list[int]:
    """The codes of the complete replies in ``data`` (last line of each reply)."""
    return [int(line[:3]) for line in data.split(b"\r\n") if len(line) >= 4 and line[3:4] == b" "]


class Session:
    """One SinkProtocol on a StringTransport with a fake clock (no sockets)."""

    def __init__(self, *faults: str, **options: Any) -> None:
        self.clock = task.Clock()
        options.setdefault("hostname", "sink.test")
        options.setdefault("idle_timeout", 0)
        opts = SinkOptions(faults=tuple(parse_fault(f) for f in faults), **options)
        self.factory = SinkFactory(opts, self.clock)
        self.proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
        self.transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2525),
            peerAddress=IPv4Address("TCP", "127.0.0.9", 40000),
        )
        self.proto.makeConnection(self.transport)

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.proto.dataReceived(chunk)

    def codes(self) -> list[int]:
        return final_codes(self.transport.value())

    def text(self) -> str:
        return self.transport.value().decode("utf-8")


def make_certificate(directory: str) -> tuple[str, str, str]:
    """A certificate for localhost/127.0.0.1 from a test CA: (cert, key, CA file)."""
    ca = TestCA(directory)
    cert, key = ca.issue("localhost")
    return cert, key, ca.ca_path


class RawClient:
    """A blocking line-level SMTP client for exact protocol checks (run in a thread)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.pending = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def replies(self, n: int) -> list[str]:
        """Read ``n`` complete replies; return the last line of each."""
        out: list[str] = []
        while len(out) < n:
            while b"\r\n" not in self.pending:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"closed after {out!r}")
                self.pending += chunk
            line, self.pending = self.pending.split(b"\r\n", 1)
            if line[3:4] == b" ":
                out.append(line.decode("utf-8"))
        return out

    def closed(self) -> bool:
        """True when the server closes the connection (after any pending output)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (TimeoutError, OSError):
            return False

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- parse_fault


class ParseFaultTests(SynchronousTestCase):
    """parse_fault turns each documented spec into a Fault and refuses bad ones."""

    def test_simple_kinds(self) -> None:
        """refuse, drop-after-ehlo and the stalls parse, with optional seconds."""
        self.assertEqual(parse_fault("refuse").kind, FaultKind.REFUSE)
        self.assertEqual(parse_fault(" Drop-After-EHLO ").kind, FaultKind.DROP_AFTER_EHLO)
        self.assertIsNone(parse_fault("stall").seconds)
        self.assertEqual(parse_fault("stall:2.5").seconds, 2.5)
        stall_data = parse_fault("stall-data:0")
        self.assertEqual((stall_data.kind, stall_data.seconds), (FaultKind.STALL_DATA, 0.0))

    def test_connect(self) -> None:
        """connect:421 defaults to 4.3.2 and a standard text; text may be given."""
        fault = parse_fault("connect:421")
        self.assertEqual(fault.kind, FaultKind.CONNECT)
        self.assertEqual(
            fault.reply,
            Reply(421, "4.3.2", "Service not available, closing transmission channel"),
        )
        self.assertEqual(
            parse_fault("connect:554:5.7.1:Go away: now").reply,
            Reply(554, "5.7.1", "Go away: now"),
        )

    def test_rcpt(self) -> None:
        """rcpt takes an optional ENH, a glob and an optional text."""
        fault = parse_fault("rcpt:550:5.1.1:bad*@*")
        self.assertEqual(fault.reply, Reply(550, "5.1.1", "No such user here"))
        self.assertEqual(fault.pattern, "bad*@*")
        self.assertTrue(fault.matches("Bad.User@Example.COM"))
        self.assertFalse(fault.matches("good@example.com"))
        fault = parse_fault("rcpt:452:*@full.example:Over quota")
        self.assertEqual(fault.reply, Reply(452, "4.2.0", "Over quota"))
        self.assertEqual(fault.pattern, "*@full.example")

    def test_first(self) -> None:
        """first:N:450 defaults to greylisting wording; an explicit text wins."""
        fault = parse_fault("first:2:450")
        self.assertEqual(fault.count, 2)
        self.assertEqual(fault.reply, Reply(450, "4.2.0", "Greylisted, try again in 60 seconds"))
        fault = parse_fault("first:1:451:4.7.1:Greylisted, try again in 30 seconds")
        self.assertEqual(fault.reply, Reply(451, "4.7.1", "Greylisted, try again in 30 seconds"))

    def test_data(self) -> None:
        """data:554 answers with a 5.7.1 default."""
        self.assertEqual(parse_fault("data:554").reply, Reply(554, "5.7.1", "Message rejected"))
        self.assertEqual(parse_fault("data:451:4.3.0").reply.code, 451)  # type: ignore[union-attr]

    def test_bad_specs(self) -> None:
        """Each malformed spec raises FaultSpecError naming the spec and the syntax."""
        for spec in [
            "",
            "bogus",
            "refuse:1",
            "drop-after-ehlo:2",
            "connect",
            "connect:250",
            "connect:4x1",
            "rcpt:550",
            "rcpt:550:5.1.1",
            "rcpt:550:5.1.1:",
            "data:550:4.1.1",
            "first:0:451",
            "first:x:451",
            "first:1",
            "stall:-1",
            "stall:soon",
            "stall:1:2",
            "stall:nan",
        ]:
            with self.assertRaises(FaultSpecError, msg=spec) as cm:
                parse_fault(spec)
            self.assertIn(repr(spec), str(cm.exception))
            self.assertIn("expected one of", str(cm.exception))

    def test_command_line_bad_fault(self) -> None:
        """A bad --fault is a usage error, and main() exits 1 with one line on stderr."""
        with self.assertRaises(usage.UsageError):
            SinkCommandOptions().parseOptions(["--fault", "rcpt:550"])
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["--listen", "tcp:0", "--fault", "nope"]), 1)
        self.assertIn("unknown fault kind", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)

    def test_command_line_options(self) -> None:
        """Options map onto SinkOptions; --tls-cert needs --tls-key."""
        config = SinkCommandOptions()
        config.parseOptions(
            ["--listen", "tcp:0", "--listen", "tcp:1", "--fault", "refuse", "--hostname", "h"]
        )
        opts = config.sink_options()
        self.assertEqual(opts.listen, ("tcp:0", "tcp:1"))
        self.assertEqual(opts.hostname, "h")
        self.assertEqual([f.kind for f in opts.faults], [FaultKind.REFUSE])
        with self.assertRaises(usage.UsageError):
            SinkCommandOptions().parseOptions(["--tls-cert", __file__])


# --------------------------------------------------------------------------- session


HELLO = b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"


class SessionTests(SynchronousTestCase):
    """The SMTP session, driven through a StringTransport."""

    def test_pipelined_replies_in_order(self) -> None:
        """Commands in one write are answered in order, bad ones included."""
        s = Session("rcpt:550:5.1.1:bad*@*")
        s.feed(
            b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<bad@y>\r\nRCPT TO:<ok@y>\r\n"
            b"VRFY x\r\nDATA\r\nhello\r\n.\r\nNOOP\r\nBOGUS\r\nQUIT\r\n"
        )
        self.assertEqual(s.codes(), [220, 250, 250, 550, 250, 252, 354, 250, 250, 500, 221])
        self.assertTrue(s.transport.disconnecting)
        [message] = s.factory.messages
        self.assertEqual(message.recipients, ("ok@y",))
        self.assertEqual(message.body, b"hello\r\n")
        self.assertEqual((message.peer, message.peer_port), ("127.0.0.9", 40000))
        self.assertEqual(s.factory.stats.rejected_recipients, 1)

    def test_ehlo_capabilities(self) -> None:
        """EHLO lists the extensions; no STARTTLS without a certificate."""
        s = Session(chunking=True, max_message_size=1234)
        s.feed(b"EHLO c\r\n")
        for word in ["PIPELINING", "SIZE 1234", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]:
            self.assertIn(f"\r\n250-{word}\r\n", s.text())
        self.assertIn("\r\n250 CHUNKING\r\n", s.text())
        self.assertNotIn("STARTTLS", s.text())

    def test_sequence_errors(self) -> None:
        """MAIL before EHLO, RCPT before MAIL, DATA without recipients are refused."""
        s = Session("rcpt:550:*@*")
        s.feed(b"MAIL FROM:<a@x>\r\nHELO c\r\nRCPT TO:<b@y>\r\nMAIL FROM:<a@x>\r\n")
        s.feed(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nRCPT TO:bad\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 503, 250, 503, 250, 503, 550, 554, 501, 250])
        self.assertEqual(s.proto._mode.name, "COMMAND")

    @settings(max_examples=60, deadline=None)
    @given(
        lines=st.lists(
            st.one_of(
                st.sampled_from([b"", b".", b"..", b". x", b".\xe9", b"a.b", b"\xff\x00"]),
                st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            ),
            max_size=30,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    )
    def test_body_exact_at_any_split(self, lines: list[bytes], cuts: list[int]) -> None:
        """Whatever the packet boundaries, the body comes out unstuffed and byte-exact."""
        body = b"".join(line + b"\r\n" for line in lines)
        wire = HELLO + stuff(body) + b"QUIT\r\n"
        points = sorted({c % (len(wire) + 1) for c in cuts})
        s = Session()
        start = 0
        for p in [*points, len(wire)]:
            s.feed(wire[start:p])
            start = p
        self.assertEqual(s.codes(), [220, 250, 250, 250, 354, 250, 221])
        self.assertEqual(s.factory.messages[0].body, body)

    def test_end_marker_needs_crlf(self) -> None:
        """Bare-LF end markers do not end the data; only CRLF.CRLF does."""
        s = Session()
        s.feed(HELLO, b"one\n.\nQUIT\r\n", b"two\r\n.\r\n")
        self.assertEqual(s.factory.messages[0].body, b"one\n.\nQUIT\r\ntwo\r\n")

    def test_empty_body(self) -> None:
        """A body that is only the end marker gives an empty message."""
        s = Session()
        s.feed(HELLO, b".\r\n")
        self.assertEqual(s.factory.messages[0].body, b"")

    def test_message_too_big(self) -> None:
        """SIZE= over the limit gets 552 at MAIL; oversized data gets 552 and the
        session stays usable."""
        s = Session(max_message_size=100)
        s.feed(b"EHLO c\r\nMAIL FROM:<a@x> SIZE=101\r\n")
        s.feed(b"MAIL FROM:<a@x> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<b@y>\r\nDATA\r\n")
        for _ in range(50):
            s.feed(b"x" * 40 + b"\r\n")
        s.feed(b".\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 250, 552, 250, 250, 354, 552, 250])
        self.assertEqual(len(s.factory.messages), 0)
        self.assertLess(len(s.proto._body), 10)

    def test_bdat(self) -> None:
        """BDAT chunks (also pipelined with the next command) make one raw body."""
        s = Session(chunking=True)
        s.feed(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 6\r\n.a\r\n")
        s.feed(b"\r\nBDAT 4 LAST\r\n..\r\nNOOP\r\n")
        s.feed(b"BDAT 3\r\nabcRSET\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 250, 250, 250, 250, 503, 250])
        self.assertEqual(s.factory.messages[0].body, b".a\r\n\r\n..\r\n")

    def test_first_counts_transactions_across_sessions(self) -> None:
        """first:1 answers the first transaction's every RCPT, then no more."""
        s = Session("first:1:450")
        s.feed(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nRSET\r\n")
        self.assertIn("450 4.2.0 Greylisted, try again in 60 seconds", s.text())
        other = s.factory.buildProtocol(None)
        t = StringTransport()
        assert isinstance(other, SinkProtocol)
        other.makeConnection(t)
        other.dataReceived(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 450, 450, 250])
        self.assertEqual(final_codes(t.value()), [220, 250, 250, 250])

    def test_rcpt_421_closes(self) -> None:
        """A 421 reply to RCPT closes the session and ignores later input."""
        s = Session("rcpt:421:*@down.test")
        s.feed(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@down.test>\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 421])
        self.assertTrue(s.transport.disconnecting)

    def test_stall_data_delays_reply_and_keeps_order(self) -> None:
        """stall-data:5 holds the 250 (and what was pipelined after) for 5 seconds."""
        s = Session("stall-data:5")
        s.feed(HELLO, b"x\r\n.\r\nNOOP\r\n")
        self.assertEqual(s.codes(), [220, 250, 250, 250, 354])
        self.assertEqual(s.transport.producerState, "paused")
        s.clock.advance(5)
        self.assertEqual(s.codes(), [220, 250, 250, 250, 354, 250, 250])
        self.assertEqual(s.transport.producerState, "producing")
        self.assertEqual(s.factory.stats.messages, 1)

    def test_stall_data_for_ever(self) -> None:
        """stall-data without seconds never answers and records nothing."""
        s = Session("stall-data")
        s.feed(HELLO, b"x\r\n.\r\nNOOP\r\n")
        s.clock.advance(3600)
        self.assertEqual(s.codes(), [220, 250, 250, 250, 354])
        self.assertEqual(s.factory.stats.messages, 0)

    def test_stall_banner_seconds(self) -> None:
        """stall:2 sends the banner after 2 seconds; early input waits its turn."""
        s = Session("stall:2")
        s.feed(b"NOOP\r\n")
        self.assertEqual(s.codes(), [])
        s.clock.advance(2)
        self.assertEqual(s.codes(), [220, 250])

    def test_idle_timeout(self) -> None:
        """An idle session gets 421 4.4.2 and is closed, on the injected clock."""
        s = Session(idle_timeout=30)
        s.clock.advance(29)
        s.feed(b"NOOP\r\n")
        s.clock.advance(29)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(2)
        self.assertIn("421 4.4.2", s.text())
        self.assertTrue(s.transport.disconnecting)

    def test_line_too_long(self) -> None:
        """A command line without end beyond the limit is answered 500 and closed."""
        s = Session()
        s.feed(b"NOOP " + b"x" * 10000)
        self.assertEqual(s.codes(), [220, 500])
        self.assertTrue(s.transport.disconnecting)

    def test_message_id_and_params(self) -> None:
        """The Message-ID header (also folded) and MAIL parameters are recorded."""
        s = Session()
        s.feed(
            b"EHLO c\r\nMAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<b@y>\r\nDATA\r\n"
            b"Subject: x\r\nMessage-Id:\r\n <abc@x.test>\r\n\r\nMessage-ID: <no@x>\r\n.\r\n"
        )
        [m] = s.factory.messages
        self.assertEqual(m.message_id, "<abc@x.test>")
        self.assertEqual(m.sender, "")
        self.assertEqual(m.mail_params, ("BODY=8BITMIME", "SMTPUTF8"))
        self.assertEqual(s.factory.stats.message_ids, ["<abc@x.test>"])

    def test_memory_bound(self) -> None:
        """Only max_messages messages are kept; counters keep counting."""
        s = Session(max_messages=2)
        for i in range(3):
            prefix = HELLO if i == 0 else b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"
            s.feed(prefix, b"m%d\r\n.\r\n" % i)
        self.assertEqual([m.body for m in s.factory.messages], [b"m1\r\n", b"m2\r\n"])
        self.assertEqual(s.factory.stats.messages, 3)
        self.assertEqual(s.factory.stats.recipients, 3)


# --------------------------------------------------------------------------- sockets


class SocketTests(TestCase):
    """A SinkServer on 127.0.0.1 port 0, talked to by real clients."""

    timeout = 20

    async def start(self, *faults: str, **options: Any) -> tuple[SinkServer, int]:
        options.setdefault("hostname", "sink.test")
        opts = SinkOptions(
            listen=("tcp:0:interface=127.0.0.1",),
            faults=tuple(parse_fault(f) for f in faults),
            **options,
        )
        server = SinkServer(opts, _reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server, server.addresses[0][1]

    def run_start(self, *faults: str, **options: Any) -> defer.Deferred[tuple[SinkServer, int]]:
        return defer.Deferred.fromCoroutine(self.start(*faults, **options))

    @defer.inlineCallbacks
    def test_smtplib_delivery(self) -> Any:
        """smtplib's dot-stuffed, 8-bit message arrives byte-exact with its envelope."""
        server, port = yield self.run_start()
        body = (
            b"From: a@x.test\r\nMessage-ID: <m1@x.test>\r\n\r\n"
            b".leading dot\r\n..two dots\r\n.\r\ncaf\xc3\xa9 \xff\r\n"
        )

        def send() -> Any:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5) as c:
                return c.sendmail("a@x.test", ["b@y.test", "c@y.test"], body)

        refused = yield deferToThread(send)
        self.assertEqual(refused, {})
        [m] = yield server.wait_for(1)
        self.assertEqual(m.body, body)
        self.assertEqual((m.sender, m.recipients), ("a@x.test", ("b@y.test", "c@y.test")))
        self.assertEqual((m.helo, m.peer, m.tls), ("client.test", "127.0.0.1", None))
        self.assertEqual(m.local, f"127.0.0.1:{port}")
        self.assertEqual(server.stats.recipients, 2)

    @defer.inlineCallbacks
    def test_large_body_and_pipelining(self) -> Any:
        """An 8 MiB body and the commands around it, all in one stream, come out whole."""
        server, port = yield self.run_start()
        line = b"." + b"y" * 75 + b"\r\n"
        body = line * (8 * 1024 * 1024 // len(line))

        def talk() -> list[str]:
            c = RawClient(port)
            c.replies(1)
            c.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n")
            first = c.replies(5)
            c.send(stuff(body) + b"QUIT\r\n")
            rest = c.replies(2)
            c.close()
            return first + rest

        replies = yield deferToThread(talk)
        self.assertEqual(
            [r[:3] for r in replies], ["250", "250", "250", "250", "354", "250", "221"]
        )
        [m] = yield server.wait_for(1)
        self.assertEqual(len(m.body), len(body))
        self.assertTrue(m.body == body)

    @defer.inlineCallbacks
    def test_refuse(self) -> Any:
        """refuse: the connection is accepted and closed without a banner."""
        server, port = yield self.run_start("refuse")

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return sock.recv(100)

        self.assertEqual((yield deferToThread(talk)), b"")
        self.assertEqual(server.stats.connections, 1)

    @defer.inlineCallbacks
    def test_connect_421(self) -> Any:
        """connect:421: a 421 4.3.2 banner, then the connection is closed."""
        _, port = yield self.run_start("connect:421")

        def talk() -> tuple[list[str], bool]:
            c = RawClient(port)
            try:
                return c.replies(1), c.closed()
            finally:
                c.close()

        replies, closed = yield deferToThread(talk)
        self.assertTrue(replies[0].startswith("421 4.3.2 "))
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_rcpt_and_data_faults(self) -> Any:
        """rcpt pattern faults refuse matching recipients; data:554 refuses the message."""
        server, port = yield self.run_start("rcpt:550:5.1.1:bad*@*", "data:554:5.7.1:No thanks")

        def send() -> tuple[Any, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                try:
                    c.sendmail("a@x", ["bad1@y", "good@y"], b"x\r\n")
                except smtplib.SMTPDataError as e:
                    data_error = (e.smtp_code, e.smtp_error)
                try:
                    c.sendmail("a@x", ["bad2@y"], b"x\r\n")
                except smtplib.SMTPRecipientsRefused as e:
                    refused = e.recipients
                return data_error, refused

        data_error, refused = yield deferToThread(send)
        self.assertEqual(data_error, (554, b"5.7.1 No thanks"))
        self.assertEqual(refused, {"bad2@y": (550, b"5.1.1 No such user here")})
        self.assertEqual(server.stats.messages, 0)
        self.assertEqual(server.stats.rejected_messages, 1)
        self.assertEqual(server.stats.rejected_recipients, 2)

    @defer.inlineCallbacks
    def test_greylisting(self) -> Any:
        """first:1:451:4.7.1 defers the first attempt; the retry is accepted."""
        server, port = yield self.run_start("first:1:451:4.7.1")

        def send() -> tuple[Any, Any]:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                try:
                    c.sendmail("a@x", ["b@y"], b"x\r\n")
                except smtplib.SMTPRecipientsRefused as e:
                    first = e.recipients
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                return first, c.sendmail("a@x", ["b@y"], b"x\r\n")

        first, second = yield deferToThread(send)
        self.assertEqual(first, {"b@y": (451, b"4.7.1 Greylisted, try again in 60 seconds")})
        self.assertEqual(second, {})
        self.assertEqual(server.stats.messages, 1)

    @defer.inlineCallbacks
    def test_stall(self) -> Any:
        """stall: no banner ever comes; the client times out."""
        _, port = yield self.run_start("stall")

        def connect() -> None:
            smtplib.SMTP("127.0.0.1", port, timeout=0.3)

        yield self.assertFailure(deferToThread(connect), smtplib.SMTPServerDisconnected)

    @defer.inlineCallbacks
    def test_stall_data(self) -> Any:
        """stall-data: the end of DATA is never answered and nothing is recorded."""
        server, port = yield self.run_start("stall-data")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=0.5) as c:
                c.sendmail("a@x", ["b@y"], b"x\r\n")

        yield self.assertFailure(deferToThread(send), smtplib.SMTPServerDisconnected)
        self.assertEqual(server.stats.messages, 0)

    @defer.inlineCallbacks
    def test_drop_after_ehlo(self) -> Any:
        """drop-after-ehlo: EHLO is answered, then the connection is closed."""
        _, port = yield self.run_start("drop-after-ehlo")

        def talk() -> tuple[int, bool]:
            c = smtplib.SMTP("127.0.0.1", port, timeout=5)
            code, _ = c.ehlo()
            try:
                c.mail("a@x")
            except smtplib.SMTPServerDisconnected:
                return code, True
            finally:
                c.close()
            return code, False

        self.assertEqual((yield deferToThread(talk)), (250, True))

    @defer.inlineCallbacks
    def test_starttls(self) -> Any:
        """STARTTLS with a generated certificate; TLS version recorded, no STARTTLS
        advertised inside TLS."""
        cert, key, ca_file = make_certificate(self.mktemp())
        server, port = yield self.run_start(certificate=cert, key=key)
        ctx = ssl.create_default_context(cafile=ca_file)

        def send() -> tuple[bool, bool]:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                c.ehlo()
                before = c.has_extn("starttls")
                c.starttls(context=ctx)
                c.ehlo()
                after = c.has_extn("starttls")
                c.sendmail("a@x", ["b@y"], b"secret\r\n")
                return before, after

        before, after = yield deferToThread(send)
        self.assertEqual((before, after), (True, False))
        [m] = yield server.wait_for(1)
        assert m.tls is not None
        self.assertIn(m.tls.version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(m.tls.cipher)

    @defer.inlineCallbacks
    def test_starttls_discards_pipelined_input(self) -> Any:
        """Input pipelined after STARTTLS is dropped and the session starts afresh."""
        cert, key, ca_file = make_certificate(self.mktemp())
        _, port = yield self.run_start(certificate=cert, key=key)
        ctx = ssl.create_default_context(cafile=ca_file)

        def talk() -> list[str]:
            c = RawClient(port)
            c.replies(1)
            c.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\n")
            c.replies(2)
            c.send(b"STARTTLS\r\nRSET\r\n")
            out = c.replies(1)
            c.starttls(ctx)
            c.send(b"NOOP\r\nMAIL FROM:<a@x>\r\n")
            out += c.replies(2)
            c.close()
            return out

        replies = yield deferToThread(talk)
        self.assertEqual([r[:9] for r in replies], ["220 2.0.0", "250 2.0.0", "503 5.5.1"])
        self.assertEqual(replies[1], "250 2.0.0 OK")

    @defer.inlineCallbacks
    def test_max_concurrent(self) -> Any:
        """Connections open at once are counted, in all and per client address; active
        drops back to zero."""
        server, port = yield self.run_start()
        banners: list[defer.Deferred[None]] = []

        class Client(Protocol):
            def __init__(self) -> None:
                self.banner: defer.Deferred[None] = defer.Deferred()
                banners.append(self.banner)

            def dataReceived(self, data: bytes) -> None:
                if not self.banner.called:
                    self.banner.callback(None)

        endpoint = TCP4ClientEndpoint(_reactor, "127.0.0.1", port)
        other = TCP4ClientEndpoint(_reactor, "127.0.0.1", port, bindAddress=("127.0.0.2", 0))
        clients = yield defer.gatherResults(
            [connectProtocol(endpoint, Client()) for _ in range(3)]
            + [connectProtocol(other, Client()) for _ in range(2)]
        )
        yield defer.gatherResults(banners)
        self.assertEqual((server.stats.active, server.stats.max_concurrent), (5, 5))
        for c in clients:
            c.transport.loseConnection()
        for _ in range(100):
            if server.stats.active == 0:
                break
            yield task.deferLater(_reactor, 0.01, lambda: None)
        self.assertEqual((server.stats.active, server.stats.max_concurrent), (0, 5))
        self.assertEqual(server.stats.connections, 5)
        self.assertEqual(
            server.stats.max_concurrent_by_peer, {"127.0.0.1": 3, "127.0.0.2": 2}
        )
        self.assertEqual(server.stats.active_by_peer, {})

    @defer.inlineCallbacks
    def test_maildir_and_stats_file(self) -> Any:
        """With maildir each message is one .eml and one .json; the stats file holds
        the counters and Message-IDs after stop."""
        base = self.mktemp()
        maildir, stats = os.path.join(base, "mail"), os.path.join(base, "stats.json")
        os.makedirs(base)
        server, port = yield self.run_start(maildir=maildir, stats_file=stats)
        with open(stats) as fh:
            self.assertEqual(json.load(fh)["messages"], 0)
        body = b"Message-ID: <x/1@y>\r\n\r\nhi\r\n"

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                c.sendmail("a@x", ["b@y"], body)
                c.sendmail("a@x", ["b@y", "c@y"], body)

        yield deferToThread(send)
        messages = yield server.wait_for(2)
        self.assertEqual(messages, [])  # kept on disk, not in memory
        yield server.stop()
        names = sorted(os.listdir(maildir))
        self.assertEqual(
            names,
            [
                "0000000001-x_1@y.eml",
                "0000000001-x_1@y.json",
                "0000000002-x_1@y.eml",
                "0000000002-x_1@y.json",
            ],
        )
        with open(os.path.join(maildir, names[2]), "rb") as raw:
            self.assertEqual(raw.read(), body)
        with open(os.path.join(maildir, names[3])) as fh:
            meta = json.load(fh)
        self.assertEqual((meta["sender"], meta["recipients"]), ("a@x", ["b@y", "c@y"]))
        self.assertEqual((meta["peer"], meta["tls"]), ("127.0.0.1", None))
        with open(stats) as fh:
            data = json.load(fh)
        self.assertEqual(
            {k: data[k] for k in ("connections", "messages", "recipients", "max_concurrent")},
            {"connections": 1, "messages": 2, "recipients": 3, "max_concurrent": 1},
        )
        self.assertEqual(data["message_ids"], ["<x/1@y>", "<x/1@y>"])

    @defer.inlineCallbacks
    def test_wait_for_times_out(self) -> Any:
        """wait_for fails with TimeoutError when too few messages arrive."""
        server, _ = yield self.run_start()
        yield self.assertFailure(server.wait_for(1, timeout=0.05), defer.TimeoutError)


class _Process(ProcessProtocol):
    """Collects a child's output; ``port`` fires with the port it listens on."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.port: defer.Deferred[int] = defer.Deferred()
        self.reason: Failure | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        for line in self.out.splitlines():
            if line.startswith(b"listening on ") and not self.port.called:
                self.port.callback(int(line.rsplit(b":", 1)[1]))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(self.err.decode("utf-8", "replace")))
        self.reason = reason
        self.ended.callback(None)


class CommandTests(TestCase):
    """``python -m sendarix.control.cli.sink`` as a separate process."""

    timeout = 30

    @defer.inlineCallbacks
    def test_subprocess(self) -> Any:
        """The process prints its port, counts mail in the stats file, and exits 0 on
        SIGTERM after a final stats write."""
        stats = os.path.abspath(self.mktemp())
        proto = _Process()
        env = dict(os.environ, PYTHONPATH=ROOT)
        args = [sys.executable, "-m", "sendarix.control.cli.sink",
                "--listen", "tcp:0:interface=127.0.0.1"]
        args += ["--stats-file", stats, "--verbose", "--fault", "rcpt:550:no@*"]
        process = _reactor.spawnProcess(proto, sys.executable, args, env=env, path=ROOT)
        try:
            port = yield proto.port

            def send() -> Any:
                with smtplib.SMTP("127.0.0.1", port, timeout=5) as c:
                    return c.sendmail("a@x", ["b@y", "no@y"], b"Message-ID: <p@x>\r\n\r\nhi\r\n")

            refused = yield deferToThread(send)
            self.assertEqual(list(refused), ["no@y"])
            data: dict[str, Any] = {}
            for _ in range(300):  # the file is rewritten at most once per second
                if os.path.exists(stats):
                    with open(stats) as fh:
                        data = json.load(fh)
                    if data["messages"]:
                        break
                yield task.deferLater(_reactor, 0.02, lambda: None)
            self.assertEqual((data["messages"], data["recipients"]), (1, 1))
        finally:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
            yield proto.ended
        reason = proto.reason
        assert reason is not None
        self.assertTrue(reason.check(ProcessDone), (reason, proto.err))
        self.assertNotIsInstance(reason.value, ProcessTerminated)
        self.assertIn(b"received 0000000001 from=<a@x> to=<b@y>", proto.out)
        with open(stats) as fh:
            self.assertEqual(json.load(fh)["message_ids"], ["<p@x>"])
