"""The listeners' connections send a write at once when nothing waits before it, and
keep the order of what they write when the kernel cannot take it all."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from sendarix.node.transport import EagerServer, send_eagerly
from tests.support.relay import in_thread, until
from tests.support.streams import MARKER, Flooding, flood, peek, read_until_closed


class _Answering(Protocol):
    """Answers each chunk it receives with ``reply``, then peeks at the client's
    socket: what it finds is what had left when ``write`` returned."""

    def __init__(self, client: list[socket.socket], seen: list[bytes]) -> None:
        self.client = client
        self.seen = seen

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(b"reply\r\n")
        self.seen.append(peek(self.client[0]))


class EagerWriteTests(TestCase):
    timeout = 30

    async def _first_reply_seen(self, eager: bool) -> bytes:
        client: list[socket.socket] = []
        seen: list[bytes] = []
        factory = Factory.forProtocol(lambda: _Answering(client, seen))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        if eager:
            send_eagerly(port)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        sock.setblocking(False)
        client.append(sock)
        # Sent from the reactor's thread: nothing reads the reply before the peek.
        sock.send(b"ping\r\n")
        await until(lambda: seen, 10, "an answer")
        return seen[0]

    async def test_reply_leaves_before_write_returns(self) -> None:
        """On an eager port, the reply is in the client's socket as soon as
        ``write`` returns."""
        self.assertEqual(await self._first_reply_seen(eager=True), b"reply\r\n")

    async def test_twisted_alone_buffers(self) -> None:
        """Without it, Twisted's own transport still holds the reply until the
        reactor's next pass (what this module is for; if a later Twisted sends at
        once by itself, this fails and the module can go)."""
        self.assertEqual(await self._first_reply_seen(eager=False), b"")

    async def test_order_kept_when_the_kernel_is_full(self) -> None:
        """A write the kernel takes only in part leaves its rest in the buffer, and
        a later write waits behind it: the client reads every byte in order."""
        big = flood()
        buffered: list[bool] = []
        port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: Flooding(big, buffered)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        send_eagerly(port)
        address = ("127.0.0.1", port.getHost().port)
        received = await in_thread(lambda: read_until_closed(socket.create_connection(address)))
        self.assertEqual(buffered, [True])
        self.assertEqual(len(received), len(big) + len(MARKER))
        self.assertTrue(received == big + MARKER)

    async def test_sends_at_once_says_whether_a_write_would_wait(self) -> None:
        """``sends_at_once`` is true on a fresh connection and false while part of
        an earlier write still waits in Twisted's buffer (an SMTP session asks it
        when it hands a message to the intake)."""
        said: list[bool] = []

        class Asking(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                transport: Any = self.transport
                transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
                said.append(transport.sends_at_once())
                transport.write(flood())
                said.append(transport.sends_at_once())
                transport.loseConnection()

        port = reactor.listenTCP(0, Factory.forProtocol(Asking), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        send_eagerly(port)
        address = ("127.0.0.1", port.getHost().port)
        await in_thread(lambda: read_until_closed(socket.create_connection(address)))
        self.assertEqual(said, [True, False])

    async def test_pull_producer_still_driven(self) -> None:
        """A producer registered on the connection is asked for more as Twisted's
        buffer empties, so its writes go through that buffer: all of it arrives."""
        chunks = [bytes([65 + i]) * 1024 for i in range(5)]

        class Pulling:
            def __init__(self, transport: Any) -> None:
                self.transport = transport
                self.left = list(chunks)

            def resumeProducing(self) -> None:  # noqa: N802
                if self.left:
                    self.transport.write(self.left.pop(0))
                else:
                    self.transport.unregisterProducer()
                    self.transport.loseConnection()

            def stopProducing(self) -> None:  # noqa: N802
                self.left = []

        class Producing(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                self.transport.registerProducer(Pulling(self.transport), False)

        port = reactor.listenTCP(0, Factory.forProtocol(Producing), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        send_eagerly(port)

        address = ("127.0.0.1", port.getHost().port)
        received = await in_thread(
            lambda: read_until_closed(socket.create_connection(address), timeout=10)
        )
        self.assertEqual(received, b"".join(chunks))


class _Closing(Protocol):
    """On the first data: writes ``before``, closes, then writes ``after`` (a write
    made after ``loseConnection`` still leaves before the close, as in Twisted).
    Counts the times the reactor was asked to watch for writability, and keeps the
    reason its connection was lost."""

    def __init__(self, before: bytes, after: bytes, seen: dict[str, Any]) -> None:
        self.before, self.after, self.seen = before, after, seen
        seen["watched"] = 0

    def connectionMade(self) -> None:  # noqa: N802
        transport: Any = self.transport
        if self.after:
            # As in Flooding: a small send buffer, so that the kernel cannot take the
            # write made after the close whole and leave nothing to flush.
            transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        start = transport.startWriting

        def counted() -> None:
            self.seen["watched"] += 1
            start()

        transport.startWriting = counted

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.transport.write(self.before)
        self.transport.loseConnection()
        if self.after:
            self.transport.write(self.after)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.seen["reason"] = reason


class EagerCloseTests(TestCase):
    timeout = 30

    async def _session(self, before: bytes, after: bytes) -> tuple[bytes, dict[str, Any]]:
        seen: dict[str, Any] = {}
        port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _Closing(before, after, seen)),
            interface="127.0.0.1",
        )
        self.addCleanup(port.stopListening)
        send_eagerly(port)
        address = ("127.0.0.1", port.getHost().port)

        def talk() -> bytes:
            sock = socket.create_connection(address)
            sock.sendall(b"QUIT\r\n")
            return read_until_closed(sock, timeout=10)

        received = await in_thread(talk)
        await until(lambda: "reason" in seen, 10, "the connection lost")
        return received, seen

    async def test_nothing_waits_no_writable_pass(self) -> None:
        """With everything sent, the close does not ask the reactor to watch the
        socket for writability: the client gets the last reply, then the end, and
        the protocol hears of a clean close."""
        received, seen = await self._session(b"221 bye\r\n", b"")
        self.assertEqual(received, b"221 bye\r\n")
        self.assertEqual(seen["watched"], 0)
        self.assertTrue(seen["reason"].check(ConnectionDone))

    async def test_written_after_the_close_still_leaves(self) -> None:
        """What is written after ``loseConnection`` and more than the kernel takes
        at once goes out in full, in order, before the close."""
        big = flood()
        received, seen = await self._session(b"221 bye\r\n", big + MARKER)
        self.assertEqual(len(received), len(b"221 bye\r\n") + len(big) + len(MARKER))
        self.assertTrue(received == b"221 bye\r\n" + big + MARKER)
        self.assertGreater(seen["watched"], 0)
        self.assertTrue(seen["reason"].check(ConnectionDone))


class SendEagerlyTests(TestCase):
    def test_tcp_port_gets_the_eager_transport(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        send_eagerly(port)
        self.assertIs(port.transport, EagerServer)
        self.assertTrue(issubclass(EagerServer, tcp.Server))

    def test_other_ports_left_alone(self) -> None:
        path = self.mktemp()
        port = reactor.listenUNIX(path, Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        before = port.transport
        send_eagerly(port)
        self.assertIs(port.transport, before)
