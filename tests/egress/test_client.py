"""Tests for sendarix.egress.client: real sessions against an in-process sink on 127.0.0.1."""

from __future__ import annotations

import re
import socket
from typing import Any
from unittest import SkipTest

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.control.cli.sink import SinkOptions, SinkServer, parse_fault
from sendarix.egress.client import (
    SessionCache,
    SmtpTransport,
    client_endpoint,
    deliver,
    dot_stuff,
)
from sendarix.interfaces import ITransport
from sendarix.model.session import Hop, OutboundMessage, SessionOptions, SessionResult
from tests.support.tlsca import TestCA

_reactor: Any = reactor
CHUNK = 16 * 1024


def unstuff(data: bytes) -> bytes:
    """Reference reader of DATA content: strip the end marker and one leading dot."""
    assert data.endswith(b".\r\n")
    lines = data[:-3].split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def body_with_dots_at_chunk_boundaries() -> bytes:
    """A body over 64 KiB with a "." line starting exactly at every 16 KiB offset."""
    out = bytearray(b"Subject: big\r\n\r\n")
    for k in range(1, 5):
        target = k * CHUNK
        while len(out) < target:
            room = target - len(out)
            n = min(room, 700) if room - min(room, 700) != 1 else 600
            n = max(n, 2)
            out += b"x" * (n - 2) + b"\r\n"
        assert len(out) == target
        out += b".dot line at a chunk boundary\r\n"
    out += b".\r\n..\r\nend\r\n"
    return bytes(out)


def msg(qid: str, body: bytes = b"Subject: t\r\n\r\nhi\r\n", *rcpts: str) -> OutboundMessage:
    return OutboundMessage(qid, "from@example.com", rcpts or ("to@example.net",), body)


class DotStuffTests(SynchronousTestCase):
    """The DATA encoding of a body."""

    def test_edge_cases(self) -> None:
        """First line ".", a lone "." line and ".." lines are stuffed; CRLF is added."""
        self.assertEqual(dot_stuff(b".\r\na\r\n.\r\n..x"), b"..\r\na\r\n..\r\n...x\r\n.\r\n")
        self.assertEqual(dot_stuff(b""), b".\r\n")

    @given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"a.", b"\r"]), max_size=12))
    def test_round_trip(self, lines: list[bytes]) -> None:
        """Reading the stuffed content back gives the body (with a final CRLF)."""
        body = b"\r\n".join(lines)
        expected = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
        self.assertEqual(unstuff(dot_stuff(body)), expected)

    @given(st.lists(st.sampled_from([b"", b".", b"..", b"a", b".a", b"\n.", b"\r"]), max_size=12))
    def test_every_line_start(self, lines: list[bytes]) -> None:
        """A dot is added after every LF, a bare one too (receivers read it as a line
        end), and at the very start; nowhere else."""
        body = b"\r\n".join(lines)
        with_crlf = body if not body or body.endswith(b"\r\n") else body + b"\r\n"
        expected = re.sub(rb"^\.", b"..", with_crlf, flags=re.MULTILINE) + b".\r\n"
        self.assertEqual(dot_stuff(body), expected)


class DeliverTests(TestCase):
    """deliver() against a real sink."""

    timeout = 20

    async def sink(self, *faults: str, **kw: Any) -> SinkServer:
        opts = SinkOptions(
            listen=("tcp:0:interface=127.0.0.1",),
            hostname="sink.test",
            faults=tuple(parse_fault(f) for f in faults),
            **kw,
        )
        server = SinkServer(opts, _reactor)
        await server.start()
        self.addCleanup(server.stop)
        return server

    def send(
        self, server: SinkServer, messages: list[OutboundMessage], **kw: Any
    ) -> Deferred[SessionResult]:
        host, port = server.addresses[0]
        kw.setdefault("helo", "relay.test")
        return deliver(_reactor, host, port, messages, **kw)

    def codes(self, result: SessionResult) -> list[list[tuple[int, str | None]]]:
        return [[(r.reply.code, r.reply.enhanced) for r in m.recipients] for m in result.results]

    async def test_byte_exact_on_one_connection(self) -> None:
        """Dot-stuffing edge cases arrive byte-exact, all on one connection, with SIZE."""
        bodies = [
            b".first line is a dot\r\nx\r\n",
            b"a\r\n.\r\nb\r\n",
            b"..\r\n...\r\n..x\r\n",
            body_with_dots_at_chunk_boundaries(),
            b"no final line end",
        ]
        server = await self.sink()
        messages = [msg(f"q{i}", b) for i, b in enumerate(bodies)]
        result = await self.send(server, messages)
        self.assertIsNone(result.connect_error)
        self.assertEqual([m.recipients[0].reply.code for m in result.results], [250] * 5)
        self.assertEqual(server.stats.connections, 1)
        got = [m.body for m in server.messages]
        self.assertEqual(got[:4], bodies[:4])
        self.assertEqual(got[4], b"no final line end\r\n")
        self.assertIn(f"SIZE={len(bodies[3])}", server.messages[3].mail_params)
        self.assertEqual(result.mx_ip, "127.0.0.1")
        self.assertIsNone(result.tls)

    async def test_three_messages_one_connection(self) -> None:
        """Three messages share one connection; each recipient gets the 250."""
        server = await self.sink()
        messages = [msg(f"q{i}", b"x\r\n", f"r{i}@example.net", "o@example.net") for i in range(3)]
        result = await self.send(server, messages)
        self.assertEqual(self.codes(result), [[(250, "2.0.0")] * 2] * 3)
        self.assertEqual([m.queue_id for m in result.results], ["q0", "q1", "q2"])
        self.assertEqual(server.stats.connections, 1)
        self.assertEqual(server.stats.messages, 3)

    async def test_session_cache_reuses(self) -> None:
        """A session rests in the cache after its messages; the next delivery to the same
        server reuses it (no new connection, no second EHLO); close() ends it."""
        server = await self.sink()
        cache = SessionCache(_reactor, idle_time=30.0)
        first = await self.send(server, [msg("a")], cache=cache, cache_site="s")
        self.assertEqual(len(cache), 1)
        second = await self.send(server, [msg("b"), msg("c")], cache=cache, cache_site="s")
        self.assertEqual(self.codes(first) + self.codes(second), [[(250, "2.0.0")]] * 3)
        self.assertTrue(second.greeted)
        self.assertEqual(server.stats.connections, 1)
        self.assertEqual(server.stats.messages, 3)
        self.assertEqual(cache.reused, 1)
        await cache.close()
        self.assertEqual(len(cache), 0)
        # Closed: no session rests any more.
        await self.send(server, [msg("d")], cache=cache, cache_site="s")
        self.assertEqual(len(cache), 0)

    async def test_session_cache_limits(self) -> None:
        """A session that carried ``reuse_limit`` messages, or finds no room, does not
        rest; another server of the same site closes a resting session."""
        server = await self.sink()
        other = await self.sink()
        cache = SessionCache(_reactor, idle_time=30.0)
        self.addCleanup(cache.close)
        await self.send(server, [msg("a"), msg("b")], cache=cache, cache_site="s",
                        reuse_limit=2)
        self.assertEqual(len(cache), 0)
        await self.send(server, [msg("c")], cache=cache, cache_site="s", cache_room=lambda: 0)
        self.assertEqual(len(cache), 0)
        await self.send(server, [msg("d")], cache=cache, cache_site="s")
        self.assertEqual(len(cache), 1)
        await self.send(other, [msg("e")], cache=cache, cache_site="s", cache_room=lambda: 2)
        self.assertEqual(len(cache), 2)
        # Reused, then no room to rest again (the other server's session rests).
        await self.send(other, [msg("f")], cache=cache, cache_site="s", cache_room=lambda: 1)
        self.assertEqual(len(cache), 1)
        self.assertEqual((server.stats.connections, other.stats.connections), (3, 1))
        self.assertEqual(cache.reused, 1)
        # Another server, no room: the resting session is closed first.
        third = await self.sink()
        await self.send(third, [msg("g")], cache=cache, cache_site="s", cache_room=lambda: 1)
        self.assertEqual(len(cache), 1)
        self.assertEqual(cache.resting("s"), 1)

    async def test_session_cache_reuse_limit(self) -> None:
        """A resting session takes no more than its reuse limit allows in all; the rest
        of the batch comes back unsent."""
        server = await self.sink()
        cache = SessionCache(_reactor, idle_time=30.0)
        self.addCleanup(cache.close)
        await self.send(server, [msg("a")], cache=cache, cache_site="s", reuse_limit=3)
        result = await self.send(server, [msg("b"), msg("c"), msg("d")], cache=cache,
                                 cache_site="s", reuse_limit=3)
        self.assertEqual([m.queue_id for m in result.results], ["b", "c"])
        self.assertEqual(result.unsent, ("d",))
        self.assertEqual(len(cache), 0)
        self.assertEqual(server.stats.connections, 1)

    async def test_session_cache_stale(self) -> None:
        """A resting session the server closed meanwhile is not used: the delivery
        connects anew and every message is sent once."""
        server = await self.sink(idle_timeout=0.2)
        cache = SessionCache(_reactor, idle_time=30.0)
        self.addCleanup(cache.close)
        await self.send(server, [msg("a")], cache=cache, cache_site="s")
        await deferLater(_reactor, 0.6, lambda: None)
        result = await self.send(server, [msg("b")], cache=cache, cache_site="s")
        self.assertEqual(self.codes(result), [[(250, "2.0.0")]])
        self.assertEqual(server.stats.connections, 2)
        self.assertEqual(server.stats.messages, 2)

    async def test_rcpt_refused(self) -> None:
        """Only the recipient matching the fault is refused; the others are delivered."""
        server = await self.sink("rcpt:550:5.1.1:bad*")
        m = msg("q", b"x\r\n", "good@example.net", "bad1@example.net", "ok@example.net")
        result = await self.send(server, [m])
        self.assertEqual(self.codes(result), [[(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")]])
        self.assertEqual(server.messages[0].recipients, ("good@example.net", "ok@example.net"))

    async def test_first_transaction_deferred(self) -> None:
        """A 451 to every RCPT of the first transaction defers it; the next goes through."""
        server = await self.sink("first:1:451:4.7.1")
        result = await self.send(server, [msg("a"), msg("b")])
        self.assertEqual(self.codes(result), [[(451, "4.7.1")], [(250, "2.0.0")]])
        self.assertIsNone(result.results[0].message_reply)
        self.assertEqual(server.stats.messages, 1)

    async def test_banner_421(self) -> None:
        """A 421 banner defers every message with that reply."""
        server = await self.sink("connect:421")
        result = await self.send(server, [msg("a"), msg("b")])
        self.assertIsNone(result.connect_error)
        self.assertEqual(self.codes(result), [[(421, "4.3.2")], [(421, "4.3.2")]])

    async def test_nothing_listening(self) -> None:
        """Connection refused: connect_error, and every recipient gets it too."""
        port = await TCP4ServerEndpoint(_reactor, 0, interface="127.0.0.1").listen(Factory())
        number = port.getHost().port
        await port.stopListening()
        result = await deliver(_reactor, "127.0.0.1", number, [msg("a")], helo="relay.test")
        error = result.connect_error
        assert error is not None
        self.assertEqual((error.code, error.enhanced), (421, "4.4.1"))
        self.assertEqual(result.results[0].recipients[0].reply, result.connect_error)
        self.assertIsNone(result.source_ip)

    async def test_drop_after_ehlo(self) -> None:
        """A drop after EHLO gives every message a 4xx, and the Deferred fires."""
        server = await self.sink("drop-after-ehlo")
        result = await self.send(server, [msg("a"), msg("b")])
        for m in result.results:
            self.assertEqual(m.recipients[0].reply.code // 100, 4)
            self.assertEqual(m.recipients[0].reply.enhanced, "4.4.2")
        self.assertEqual(server.stats.messages, 0)

    async def test_stalled_server_times_out(self) -> None:
        """No banner within command_timeout: a definite 451 4.4.2 timeout."""
        server = await self.sink("stall")
        result = await self.send(server, [msg("a")], command_timeout=0.3)
        reply = result.results[0].recipients[0].reply
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.2"))
        self.assertIn("timeout", reply.text)

    async def test_stall_after_data_times_out(self) -> None:
        """A server that answered every command but not the end of the data: the
        timer, moved on at each reply, still fires, and names what it waited for."""
        server = await self.sink("stall-data")
        result = await self.send(server, [msg("a")], command_timeout=0.3)
        reply = result.results[0].recipients[0].reply
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.2"))
        self.assertIn("timeout waiting for the reply to end of data", reply.text)

    async def test_size_limit_refused_locally(self) -> None:
        """A body over the server's SIZE gets 552 5.3.4 without being sent."""
        server = await self.sink(max_message_size=100)
        result = await self.send(server, [msg("big", b"y" * 200 + b"\r\n"), msg("small")])
        self.assertEqual(self.codes(result), [[(552, "5.3.4")], [(250, "2.0.0")]])
        self.assertEqual(server.stats.rejected_messages, 0)

    async def test_tls_verify(self) -> None:
        """tls=verify with the test CA: delivered over TLS, version and cipher reported."""
        ca = TestCA(self.mktemp())
        cert, key = ca.issue("mx.test")
        server = await self.sink(certificate=cert, key=key)
        with open(ca.ca_path, "rb") as f:
            root = ssl.Certificate.loadPEM(f.read())
        result = await self.send(
            server, [msg("a")], tls="verify", tls_hostname="mx.test", trust_root=root
        )
        self.assertEqual(self.codes(result), [[(250, "2.0.0")]])
        assert result.tls is not None
        self.assertTrue(result.tls.version.startswith("TLS"), result.tls)
        self.assertTrue(result.tls.cipher)
        self.assertIsNotNone(server.messages[0].tls)

    async def test_tls_verify_wrong_name(self) -> None:
        """A certificate for another name: deferred with 4.7.5, nothing delivered."""
        ca = TestCA(self.mktemp())
        cert, key = ca.issue("other.test")
        server = await self.sink(certificate=cert, key=key)
        with open(ca.ca_path, "rb") as f:
            root = ssl.Certificate.loadPEM(f.read())
        result = await self.send(
            server, [msg("a")], tls="verify", tls_hostname="mx.test", trust_root=root
        )
        self.assertEqual(self.codes(result), [[(451, "4.7.5")]])
        self.assertEqual(server.stats.messages, 0)

    async def test_tls_encrypt_not_offered(self) -> None:
        """tls=encrypt to a server without STARTTLS: deferred, nothing sent in clear."""
        server = await self.sink()
        result = await self.send(server, [msg("a"), msg("b")], tls="encrypt")
        self.assertEqual(self.codes(result), [[(451, "4.7.4")], [(451, "4.7.4")]])
        self.assertEqual(server.stats.messages, 0)
        self.assertEqual(server.stats.recipients, 0)

    async def test_bind_address(self) -> None:
        """The source address is the one asked for, as the sink sees it."""
        server = await self.sink()
        result = await self.send(server, [msg("a")], bind_address="127.0.0.2")
        self.assertEqual(result.source_ip, "127.0.0.2")
        self.assertEqual(server.messages[0].peer, "127.0.0.2")

    async def test_garbage_server(self) -> None:
        """A server that answers nonsense: a definite 4xx protocol error."""

        class Garbage(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"hello there\r\n")

        port = await TCP4ServerEndpoint(_reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Garbage)
        )
        self.addCleanup(port.stopListening)
        result = await deliver(
            _reactor, "127.0.0.1", port.getHost().port, [msg("a")], helo="relay.test"
        )
        reply = result.results[0].recipients[0].reply
        self.assertEqual((reply.code, reply.enhanced), (451, "4.5.0"))


class RoutingHooksTests(TestCase):
    """What routing asks of a session: pacing, the greeting timeout, AUTH."""

    timeout = 20
    sink = DeliverTests.sink
    send = DeliverTests.send
    codes = DeliverTests.codes

    async def test_pace_holds_back(self) -> None:
        """The pace callback is asked before each message; once it says no, the
        session ends and the rest are listed as unsent, without results."""
        server = await self.sink()
        answers = iter([True, True, False])
        asked: list[int] = []

        def pace() -> Deferred[bool]:
            asked.append(1)
            d: Deferred[bool] = Deferred()
            d.callback(next(answers))
            return d

        result = await self.send(server, [msg(f"q{i}") for i in range(4)], pace=pace)
        self.assertEqual([m.queue_id for m in result.results], ["q0", "q1"])
        self.assertEqual(result.unsent, ("q2", "q3"))
        self.assertEqual(len(asked), 3)
        self.assertEqual(server.stats.messages, 2)

    async def test_greeting_timeout(self) -> None:
        """A server that never greets: after greeting_timeout the session is marked
        not greeted (so routing can move on), whatever the command timeout."""
        server = await self.sink("stall")
        result = await self.send(server, [msg("a")], greeting_timeout=0.3, command_timeout=60)
        self.assertFalse(result.greeted)
        self.assertEqual(result.results[0].recipients[0].reply.code, 451)
        ok = await self.send(await self.sink(), [msg("b")])
        self.assertTrue(ok.greeted)

    async def test_auth_needs_tls(self) -> None:
        """Credentials are never sent in clear: without TLS the mail is deferred."""
        server = await self.sink(auth=("relay", "pw"))
        result = await self.send(server, [msg("a")], auth=("relay", "pw"))
        self.assertEqual(self.codes(result), [[(451, "4.7.0")]])
        self.assertEqual(server.stats.messages, 0)


def ipv6_loopback_missing() -> str | None:
    """Why IPv6 over ::1 cannot be tested here, or None when it can."""
    if not socket.has_ipv6:
        return "this Python has no IPv6 support (socket.has_ipv6 is false)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"cannot bind the IPv6 loopback address ::1 here: {e}"
    return None


class IPv6Tests(TestCase):
    """Sessions over IPv6, and the address-family check of the source."""

    timeout = 20

    async def test_delivers_over_ipv6(self) -> None:
        """A session to ::1 from source ::1 delivers; both ends are reported."""
        missing = ipv6_loopback_missing()
        if missing:
            raise SkipTest(missing)
        server = SinkServer(
            SinkOptions(listen=("tcp6:0:interface=\\:\\:1",), hostname="sink6.test"), _reactor
        )
        await server.start()
        self.addCleanup(server.stop)
        host, port = server.addresses[0]
        self.assertEqual(host, "::1")
        result = await deliver(_reactor, "::1", port, [msg("q6")], helo="relay.test",
                               bind_address="::1")
        self.assertIsNone(result.connect_error)
        self.assertEqual(result.results[0].recipients[0].reply.code, 250)
        self.assertEqual((result.mx_ip, result.source_ip), ("::1", "::1"))
        self.assertEqual(server.messages[0].peer, "::1")

    async def test_family_mismatch(self) -> None:
        """An IPv6 source cannot reach an IPv4 host: a connect error says so and no
        connection is tried."""
        result = await deliver(_reactor, "127.0.0.1", 9, [msg("q")], helo="relay.test",
                               bind_address="::1")
        assert result.connect_error is not None
        self.assertEqual(result.connect_error.code, 421)
        self.assertIn("other address family", result.connect_error.text)
        self.assertRaises(ValueError, client_endpoint, _reactor, "::1", 25, 5.0, "127.0.0.1")
        self.assertIsInstance(client_endpoint(_reactor, "::1", 25, 5.0), TCP6ClientEndpoint)
        self.assertIsInstance(client_endpoint(_reactor, "127.0.0.1", 25, 5.0), TCP4ClientEndpoint)


class SmtpTransportTests(TestCase):
    """SmtpTransport: the ITransport of hops reached over SMTP."""

    timeout = 20

    def test_provides(self) -> None:
        verifyObject(ITransport, SmtpTransport(_reactor))

    async def test_session_to_the_hop(self) -> None:
        """The hop's address and port, the options' EHLO name; a session left resting in
        the cache is taken again by the next delivery to the same hop."""
        server = SinkServer(
            SinkOptions(listen=("tcp:0:interface=127.0.0.1",), hostname="sink.test"), _reactor
        )
        await server.start()
        self.addCleanup(server.stop)
        cache = SessionCache(_reactor, 5.0)
        cache.open()
        self.addCleanup(cache.close)
        host, port = server.addresses[0]
        transport = SmtpTransport(_reactor, cache)
        hop = Hop("mx.example.net", host, port, 10)
        options = SessionOptions(helo="relay.test", cache_site="mx:example.net",
                                 cache_room=lambda: 2)
        first = await transport.deliver(hop, [msg("t1")], options)
        second = await transport.deliver(hop, [msg("t2")], options)
        self.assertEqual(
            [r.results[0].recipients[0].reply.code for r in (first, second)], [250, 250]
        )
        self.assertEqual(first.mx_ip, "127.0.0.1")
        self.assertEqual(server.stats.connections, 1)
        self.assertEqual([m.body for m in server.messages], [msg("t1").body] * 2)
