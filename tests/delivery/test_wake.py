"""New mail wakes the delivery loop: it is leased at once, not at the next poll."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from sendarix.cleanup.intake import Intake, Submission
from sendarix.config.loader import parse_config
from sendarix.delivery.service import DeliveryService
from sendarix.model.event import EventQuery
from sendarix.model.message import Envelope, RecipientStatus
from sendarix.routing.mx import DNSResolver, MXRouter
from sendarix.stores.backends import open_stores

BODY = b"From: <app@example.com>\r\nSubject: wake\r\n\r\nhello\r\n"


class DeliveryWakeTests(unittest.TestCase):
    """A queued message is delivered without the poll clock moving."""

    async def setUp(self) -> None:  # type: ignore[override]
        directory = os.path.abspath(self.mktemp())
        config = parse_config(
            {"node": {"name": "wake-node", "hostname": "relay.test"},
             "spool": {"url": "sqlite:spool.db"}, "events": {"json_log": False}},
            directory,
        )
        self.stores = open_stores(config, reactor)
        await self.stores.open()
        self.addCleanup(self.stores.close)
        # The delivery loop runs on a clock that never moves by itself: only a wake
        # (a call at delay 0) can start a poll after the first one.
        self.clock = Clock()
        resolver = DNSResolver((("127.0.0.1", 9),), 0.5, 60.0, reactor, reactor)
        self.delivery = DeliveryService(
            config, self.stores.spool, self.stores.events, self.stores.suppressions,
            MXRouter(resolver), self.clock, poll_interval=3600.0,
        )
        self.delivery.startService()
        self.addCleanup(self.delivery.stopService)
        self.intake = Intake(
            spool=self.stores.spool, events=self.stores.events, clock=self.clock,
            node="wake-node", hostname="relay.test", on_queued=self.delivery.queued,
        )
        await self._settle()  # reclaim and the first (empty) poll

    async def _settle(self) -> None:
        """Let database jobs finish and run what is due now on the loop's clock."""
        for _ in range(20):
            self.clock.advance(0)
            await deferLater(reactor, 0.01, lambda: None)

    async def _delivered(self, queue_id: str) -> bool:
        page = await self.stores.eventlog.search(EventQuery(queue_id=queue_id, type="delivered"))
        return len(page.events) == 1

    async def test_queued_mail_is_delivered_at_once(self) -> None:
        """After accept, the loop polls at delay 0: the simulator delivers the message
        although the hour-long poll interval has not passed."""
        queue_id = self.intake.new_queue_id()
        sub = Submission(
            queue_id=queue_id,
            envelope=Envelope("app@example.com", ("success@simulator.sendarix.invalid",)),
            body=BODY, tenant="default",
        )
        await self.intake.accept(sub)
        for _ in range(50):
            await self._settle()
            if await self._delivered(queue_id):
                break
        self.assertTrue(await self._delivered(queue_id))
        self.assertIsNone(await self.stores.spool.get(queue_id))  # done: removed

    async def test_without_wake_mail_waits_for_the_poll(self) -> None:
        """The same message accepted without the wake hook stays pending."""
        self.intake.on_queued = None
        queue_id = self.intake.new_queue_id()
        sub = Submission(
            queue_id=queue_id,
            envelope=Envelope("app@example.com", ("success@simulator.sendarix.invalid",)),
            body=BODY, tenant="default",
        )
        await self.intake.accept(sub)
        await self._settle()
        stored = await self.stores.spool.get(queue_id)
        assert stored is not None
        self.assertEqual([r.status for r in stored.recipients], [RecipientStatus.PENDING])
        self.assertFalse(await self._delivered(queue_id))

