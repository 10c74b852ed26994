"""The listeners' connections send a write at once when nothing waits before it, and
keep the order of what they write when the kernel cannot take it all."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor, tcp
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
