"""The feedback loop end to end: a message goes out carrying its reference, the
mailbox provider sends back an ARF complaint or a DSN to the feedback domain from an
untrusted address, and the node records ``complained`` / ``bounced`` for the right
recipient and suppresses it; a forged reference changes nothing."""

from __future__ import annotations

import os
import re
import smtplib
from typing import Any

from twisted.trial.unittest import TestCase

from sendarix.cleanup.reference import header_line
from sendarix.model.event import EventQuery
from tests.cleanup.test_domains import SECRET
from tests.delivery.test_routing import start_sink
from tests.delivery.test_service import wait_event
from tests.support.relay import RawClient, in_thread, start_relay
from tests.support.reports import arf, dsn

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.1/32"], "tenant": "acme"}


class _Harness(TestCase):
    """A node with a sink, sending from the trusted address and reporting from an
    untrusted one."""

    timeout = 60
    port = 0

    async def setUp(self) -> None:  # type: ignore[override]
        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        self.sink = await start_sink(self, "127.0.0.3")
        self.relay = await start_relay(
            self, [RELAY],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
            feedback={"domains": ["fbl.relay.test"]},
        )
        self.port = self.relay.ports["relay"]

    async def delivered(self, recipient: str) -> bytes:
        """Send a message to ``recipient`` from the trusted address; the bytes the
        destination got."""
        def send() -> None:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
                s.sendmail("app@sender.test", [recipient],
                           b"From: app@sender.test\r\nTo: " + recipient.encode()
                           + b"\r\nSubject: hi\r\n\r\nhello\r\n")

        await in_thread(send)
        await wait_event(self.relay, recipient, "delivered")
        got = [m for m in self.sink.messages if recipient in m.recipients]
        return bytes(got[-1].body)

    def report(self, to: str, body: bytes) -> list[bytes]:
        """From 127.0.0.5, outside the trusted networks, as a provider would."""
        c = RawClient(self.port, source="127.0.0.5")
        try:
            c.reply()
            c.send(b"EHLO mx.provider.test\r\nMAIL FROM:<fbl@provider.test>\r\nRCPT TO:<"
                   + to.encode() + b">\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n")
            replies = c.codes(5)
            if replies[-1].startswith(b"354"):
                c.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                replies += c.codes(1)
            return replies
        finally:
            c.close()



class FeedbackLoopTests(_Harness):
    async def test_complaint(self) -> None:
        original = await self.delivered("user@sink.test")
        self.assertIn(b"X-Sendarix-Ref: ", original)
        replies = await in_thread(self.report, "abuse@fbl.relay.test",
                                  arf(original, "user@sink.test"))
        self.assertEqual(replies[2], b"250 2.1.5 Recipient OK")
        self.assertTrue(replies[3].startswith(b"554 5.7.1"), replies)  # never relayed
        self.assertTrue(replies[-1].startswith(b"250"), replies)
        event = await wait_event(self.relay, "user@sink.test", "complained")
        self.assertEqual(event.tenant, "acme")
        entry = await self.relay.stores.suppressions.is_suppressed("acme", "user@sink.test")
        self.assertEqual(entry.source if entry else None, "complaint")
        self.assertEqual(len(self.sink.messages), 1)  # the report went nowhere
        queued = await self.relay.stores.spool.stats()
        self.assertEqual(queued.messages, 0)

    async def test_late_bounce_and_message_id_matching(self) -> None:
        """A DSN without the reference (a provider that returns less of the header)
        is matched by Message-ID; a hard failure bounces and suppresses."""
        original = await self.delivered("gone@sink.test")
        stripped = re.sub(rb"X-Sendarix-Ref: [^\r]*\r\n", b"", original)
        await in_thread(self.report, "bounces@fbl.relay.test", dsn(stripped, "gone@sink.test"))
        event = await wait_event(self.relay, "gone@sink.test", "bounced")
        self.assertEqual(event.response.code if event.response else None, 550)
        self.assertIsNotNone(event.bounce_category)
        self.assertIsNotNone(
            await self.relay.stores.suppressions.is_suppressed("acme", "gone@sink.test"))

    async def test_forged_and_foreign_reports_change_nothing(self) -> None:
        """A reference made with another key, and a report naming an address the
        message never went to, record nothing."""
        original = await self.delivered("user@sink.test")
        queue_id = re.search(rb"X-Sendarix-Ref: ([^.\r]+(?:\.[^.\r]+)*?)\.[^.\r]+\.[^.\r]+\r\n",
                             original)
        assert queue_id is not None
        forged = re.sub(rb"X-Sendarix-Ref: [^\r]*\r\n",
                        header_line(b"x" * 32, queue_id.group(1).decode(), "acme"), original)
        await in_thread(self.report, "abuse@fbl.relay.test", arf(forged, "user@sink.test"))
        await in_thread(self.report, "abuse@fbl.relay.test", arf(original, "ceo@sink.test"))
        await in_thread(self.report, "abuse@fbl.relay.test", b"Subject: hi\r\n\r\nnot a report\r\n")
        page = await self.relay.stores.eventlog.search(EventQuery(type="complained"))
        self.assertEqual(page.events, ())
        for address in ("user@sink.test", "ceo@sink.test"):
            self.assertIsNone(await self.relay.stores.suppressions.is_suppressed("acme", address))
        counter: Any = self.relay.service.metrics.feedback_reports
        self.assertEqual(counter.labels("dropped")._value.get(), 3)


class ReturnPathTests(_Harness):
    """A tenant with a return-path domain: its mail leaves with a VERP envelope
    sender there, and a bounce to that address finds its message by the address
    alone."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        self.sink = await start_sink(self, "127.0.0.3")
        self.relay = await start_relay(
            self, [RELAY],
            pool={"sink": {"endpoints": [f"127.0.0.3:{self.sink.addresses[0][1]}"]}},
            route=[{"via": "pool:sink"}],
            tenant={"acme": {"return_path_domain": "bounces.relay.test"}},
        )
        self.port = self.relay.ports["relay"]

    async def test_verp_bounce(self) -> None:
        original = await self.delivered("late@sink.test")
        (received,) = [m for m in self.sink.messages if "late@sink.test" in m.recipients]
        self.assertRegex(received.sender, r"^b-.+-[0-9a-f]{20}@bounces\.relay\.test$")
        # A provider that returns nothing of the original: only the address tells.
        bare = b"From: x@y\r\n\r\n"
        replies = await in_thread(self.report, received.sender, dsn(bare, "late@sink.test"))
        self.assertTrue(replies[-1].startswith(b"250"), replies)
        await wait_event(self.relay, "late@sink.test", "bounced")
        # A made-up VERP address names nothing.
        forged = re.sub(r"-[0-9a-f]{20}@", "-" + "0" * 20 + "@", received.sender)
        await in_thread(self.report, forged, dsn(bare, "late@sink.test"))
        page = await self.relay.stores.eventlog.search(EventQuery(type="bounced"))
        self.assertEqual(len(page.events), 1)
        self.assertIn(b"X-Sendarix-Ref", original)
