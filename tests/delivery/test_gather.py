"""Fresh mail waits for company only while other clients are sending, and never
longer than they do: a relay with a long ``gather_time``, a sink, and raw clients that
hold a transaction open or let it go."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.delivery.test_routing import start_relay_on_dns, start_sink
from tests.support.relay import RawClient, in_thread

MESSAGE = (b"MAIL FROM:<app@example.com>\r\n", b"RCPT TO:<user@gather.test>\r\n",
           b"DATA\r\n", b"Subject: x\r\n\r\nhello\r\n.\r\n")


class GatherTests(unittest.TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = await start_sink(self, "127.0.0.2")
        self.relay = await start_relay_on_dns(
            self,
            {"gather.test": {"MX": [(10, "mx.gather.test")]},
             "mx.gather.test": {"A": ["127.0.0.2"]}},
            self.sink.addresses[0][1],
        )
        # Set here rather than in the configuration: the relay's helper writes the
        # [delivery] section itself.  A clock long enough that only the end of the
        # other clients' sending (or the target) can let the mail go in the test's time.
        self.relay.service.delivery.scheduler.gather_wait = 30.0
        self.relay.service.delivery.scheduler.gather_target = 2
        self.port = self.relay.ports["relay"]

    async def client(self) -> RawClient:
        client: RawClient = await in_thread(RawClient, self.port)
        self.addCleanup(client.close)
        await in_thread(client.reply)
        await self.talk(client, b"EHLO client.test\r\n")
        return client

    async def talk(self, client: RawClient, *lines: bytes) -> list[bytes]:
        replies: list[bytes] = await in_thread(client.exchange, *lines)
        return replies

    async def send(self, client: RawClient) -> None:
        replies = await self.talk(client, *MESSAGE)
        self.assertTrue(replies[-1].startswith(b"250 2.0.0"), replies)

    async def test_lone_message_goes_at_once(self) -> None:
        await self.send(await self.client())
        await self.sink.wait_for(1, timeout=10)

    async def test_waits_while_another_client_sends(self) -> None:
        """A message waits while another client is in its transaction, and goes as
        soon as that client drops it."""
        busy, sender = await self.client(), await self.client()
        await self.talk(busy, MESSAGE[0])
        await self.send(sender)
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(self.sink.stats.messages, 0)
        await self.talk(busy, b"RSET\r\n")
        await self.sink.wait_for(1, timeout=10)

    async def test_company_ends_the_wait(self) -> None:
        """The first message waits for a second (the target), then both go over one
        session, while a third client is still sending."""
        busy, first, second = await self.client(), await self.client(), await self.client()
        await self.talk(busy, MESSAGE[0])
        await self.send(first)
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(self.sink.stats.messages, 0)
        await self.send(second)
        received = await self.sink.wait_for(2, timeout=10)
        self.assertEqual(len({m.peer_port for m in received}), 1)
        self.assertEqual(self.sink.stats.connections, 1)
