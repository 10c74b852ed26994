"""The delivery agent's connections send a write at once when nothing waits before it,
and keep the order of what they write when the kernel cannot take it all."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from sendarix.egress.client import client_endpoint
from sendarix.egress.transport import EagerClient, EagerConnecting
from tests.support.relay import in_thread
from tests.support.streams import MARKER, Flooding, flood, peek, read_until_closed


def _listening() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


class EagerClientTests(TestCase):
    timeout = 30

    async def _seen_after_write(self, endpoint_to: Any) -> tuple[bytes, Any]:
        """Connect with the endpoint ``endpoint_to(port)``, write a line, and peek at
        once at the server's end: what had left when ``write`` returned, and the
        transport."""
        server = _listening()
        self.addCleanup(server.close)
        seen: Deferred[tuple[bytes, Any]] = Deferred()

        class Writing(Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                peer, _ = server.accept()  # the handshake is done: it is waiting
                self.peer = peer
                peer.setblocking(False)
                self.transport.write(b"EHLO client.test\r\n")
                seen.callback((peek(peer), self.transport))

            def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
                self.peer.close()

        endpoint = endpoint_to(server.getsockname()[1])
        protocol = await endpoint.connect(Factory.forProtocol(Writing))
        self.addCleanup(protocol.transport.loseConnection)
        return await seen

    async def test_line_leaves_before_write_returns(self) -> None:
        waiting, transport = await self._seen_after_write(
            lambda port: TCP4ClientEndpoint(EagerConnecting(reactor), "127.0.0.1", port)
        )
        self.assertEqual(waiting, b"EHLO client.test\r\n")
        self.assertIsInstance(transport, EagerClient)

    async def test_twisted_alone_buffers(self) -> None:
        """Twisted's own client transport still holds the line until its next pass
        (if a later Twisted sends at once by itself, this fails and the module can
        go)."""
        waiting, transport = await self._seen_after_write(
            lambda port: TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        self.assertEqual(waiting, b"")
        self.assertNotIsInstance(transport, EagerClient)

    async def test_delivery_connections_are_eager(self) -> None:
        """The endpoint the delivery agent connects with, bound to a source address,
        gives the eager transport."""
        waiting, transport = await self._seen_after_write(
            lambda port: client_endpoint(reactor, "127.0.0.1", port, 5.0, "127.0.0.1")
        )
        self.assertEqual(waiting, b"EHLO client.test\r\n")
        self.assertIsInstance(transport, EagerClient)

    async def test_order_kept_when_the_kernel_is_full(self) -> None:
        """A write the kernel takes only in part leaves its rest in the buffer, and
        a later write waits behind it: the server reads every byte in order."""
        big = flood()
        buffered: list[bool] = []
        server = _listening()
        self.addCleanup(server.close)
        reading = in_thread(lambda: read_until_closed(server.accept()[0]))
        endpoint = TCP4ClientEndpoint(
            EagerConnecting(reactor), "127.0.0.1", server.getsockname()[1]
        )
        await endpoint.connect(Factory.forProtocol(lambda: Flooding(big, buffered)))
        received = await reading
        self.assertEqual(buffered, [True])
        self.assertEqual(len(received), len(big) + len(MARKER))
        self.assertTrue(received == big + MARKER)
