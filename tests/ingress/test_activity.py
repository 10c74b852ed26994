"""The count of clients sending mail, which delivery reads to tell a lone message from
one of a burst: the count itself, and what SMTP sessions on a real node add to it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase, TestCase

from sendarix.ingress.activity import IntakeActivity
from tests.support.relay import RawClient, in_thread, start_relay, until

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.0/8"]}


class IntakeActivityTests(SynchronousTestCase):
    def test_busy_while_counted(self) -> None:
        activity = IntakeActivity()
        self.assertFalse(activity.busy())
        activity.began()
        self.assertTrue(activity.busy())
        activity.ended()
        self.assertFalse(activity.busy())

    def test_quiet_when_the_last_ends(self) -> None:
        activity = IntakeActivity()
        told: list[int] = []
        activity.on_quiet(lambda: told.append(activity.receiving))
        activity.began()
        activity.began()
        activity.ended()
        self.assertEqual(told, [])
        activity.ended()
        self.assertEqual(told, [0])
        activity.ended()
        self.assertEqual(told, [0])

    def test_never_below_zero(self) -> None:
        activity = IntakeActivity()
        activity.ended()
        self.assertEqual(activity.receiving, 0)
        activity.began()
        self.assertEqual(activity.receiving, 1)


class SessionCountTests(TestCase):
    """What a real node's SMTP sessions count, seen from raw clients."""

    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.relay = await start_relay(self, [RELAY])
        self.activity = self.relay.service.listeners[0].factory.settings.activity
        self.port = self.relay.ports["relay"]

    async def talk(self, client: RawClient, *lines: bytes) -> list[bytes]:
        replies: list[bytes] = await in_thread(client.exchange, *lines)
        return replies

    async def connect(self) -> RawClient:
        client: RawClient = await in_thread(RawClient, self.port)
        self.addCleanup(client.close)
        await in_thread(client.reply)
        return client

    async def test_counted_from_connection_to_the_first_answer(self) -> None:
        """A new client counts from its connection (through its greeting) to the
        reply that ends its first transaction; afterwards only from MAIL to that
        reply, and RSET drops the count with the transaction."""
        client = await self.connect()
        self.assertEqual(self.activity.receiving, 1)
        await self.talk(client, b"EHLO client.test\r\n")
        self.assertEqual(self.activity.receiving, 1)
        replies = await self.talk(
            client, b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n",
            b"DATA\r\n", b"Subject: x\r\n\r\nhi\r\n.\r\n",
        )
        self.assertTrue(replies[-1].startswith(b"250 2.0.0"), replies)
        self.assertEqual(self.activity.receiving, 0)
        await self.talk(client, b"NOOP\r\n")
        self.assertEqual(self.activity.receiving, 0)
        await self.talk(client, b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(self.activity.receiving, 1)
        await self.talk(client, b"RSET\r\n")
        self.assertEqual(self.activity.receiving, 0)

    async def test_leaving_ends_the_count(self) -> None:
        first, second = await self.connect(), await self.connect()
        self.assertTrue(self.activity.busy())
        await self.talk(first, b"EHLO client.test\r\n", b"MAIL FROM:<a@example.com>\r\n")
        second.close()
        await until(lambda: self.activity.receiving == 1, 10, "the count fell to 1")
        first.close()
        await until(lambda: self.activity.receiving == 0, 10, "the count fell to 0")
