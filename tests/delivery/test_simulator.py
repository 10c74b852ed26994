"""The simulator end to end: a real relay takes mail over SMTP for the simulator domain
and delivers it through the simulator transport (same ready queue and sessions as
SMTP, site ``simulator``, no socket); each local part's outcome and events, the
complaint coming back through the feedback handler, ``suppressed`` refused at RCPT."""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.trial.unittest import TestCase

from sendarix.model.event import Event, EventQuery
from tests.cleanup.test_domains import SECRET
from tests.delivery.test_service import wait_event
from tests.support.relay import Relay, in_thread, start_relay

RELAY = {"name": "relay", "endpoint": "tcp:0:interface=127.0.0.1", "tls": "none",
         "auth": "none", "trusted_networks": ["127.0.0.1/32"], "tenant": "acme"}
DOMAIN = "simulator.sendarix.invalid"
BODY = b"From: app@sender.test\r\nSubject: simulated\r\n\r\nhello\r\n"
QUICK = {"retry_schedule": ["1s"], "greylist_retry": "1s", "max_lifetime": "30s"}


def send(port: int, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
    """Submit one message; the recipients refused at RCPT."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        return s.sendmail("app@sender.test", recipients, BODY)


async def events_of(relay: Relay, recipient: str) -> list[Event]:
    page = await relay.stores.eventlog.search(EventQuery(recipient=recipient))
    return sorted(page.events, key=lambda e: e.timestamp)


class SimulatorTests(TestCase):
    timeout = 60

    async def start(self, secret: bool = True, **sections: Any) -> Relay:
        if secret:
            self.patch(os, "environ", dict(os.environ, SENDARIX_SECRET_KEY=SECRET))
        sections.setdefault("delivery", QUICK)
        return await start_relay(self, [RELAY], **sections)

    async def test_each_local_part(self) -> None:
        """Every documented local part, over real SMTP: ``suppressed`` is refused at
        RCPT as a suppressed address is; the others are answered by the simulator
        transport, events carrying ``mx = "simulator"`` and no addresses; defer and
        greylist are delivered on their second attempt."""
        relay = await self.start()
        parts = ("success", "bounce", "defer", "greylist", "timeout", "complaint")
        rcpts = [f"{p}@{DOMAIN}" for p in parts]
        refused = await in_thread(send, relay.ports["relay"], [*rcpts, f"suppressed@{DOMAIN}"])
        self.assertEqual(refused, {f"suppressed@{DOMAIN}": (550, b"5.1.1 recipient suppressed")})
        await wait_event(relay, f"suppressed@{DOMAIN}", "suppressed")
        success, bounce, defer, greylist, timeout, complaint = rcpts
        delivered = await wait_event(relay, success, "delivered")
        self.assertEqual((delivered.mx, delivered.mx_ip, delivered.source_ip),
                         ("simulator", None, None))
        bounced = await wait_event(relay, bounce, "bounced")
        self.assertEqual((bounced.mx, bounced.bounce_category), ("simulator", "bad-mailbox"))
        entry = await relay.stores.suppressions.is_suppressed("acme", bounce)
        self.assertEqual(entry.source if entry else None, "bounce")
        for rcpt, code in ((defer, 421), (greylist, 450)):
            later = await wait_event(relay, rcpt, "delivered", timeout=20)
            self.assertEqual(later.attempt, 2)
            kinds = [(e.type, e.response.code if e.response else None, e.mx)
                     for e in await events_of(relay, rcpt) if e.type != "accepted"]
            self.assertEqual(kinds, [("deferred", code, "simulator"),
                                     ("delivered", 250, "simulator")])
        deferred = await wait_event(relay, timeout, "deferred")
        self.assertEqual(deferred.response.code if deferred.response else None, 451)
        await wait_event(relay, complaint, "delivered")
        # The routing state knows the simulator as a site of its own.
        sites = [s["site"] for s in relay.service.delivery.routing_state()["sites"]]
        self.assertIn("simulator", sites)

    async def test_complaint_comes_back_as_a_report(self) -> None:
        """A ``complaint`` recipient is delivered, then its ARF report reaches the
        feedback handler (found by the message's reference): a ``complained`` event
        and a ``complaint`` suppression, as for a provider's report."""
        relay = await self.start()
        rcpt = f"complaint+1@{DOMAIN}"
        await in_thread(send, relay.ports["relay"], [rcpt, f"ok@{DOMAIN}"])
        delivered = await wait_event(relay, rcpt, "delivered")
        complained = await wait_event(relay, rcpt, "complained")
        self.assertEqual((complained.queue_id, complained.tenant),
                         (delivered.queue_id, "acme"))
        self.assertEqual(complained.message_id, delivered.message_id)
        entry = await relay.stores.suppressions.is_suppressed("acme", rcpt)
        assert entry is not None
        self.assertEqual((entry.source, entry.reason), ("complaint", "complaint (feedback report)"))
        counter: Any = relay.service.metrics.feedback_reports
        self.assertEqual(counter.labels("recorded")._value.get(), 1)
        # Only the complaining recipient.
        self.assertIsNone(await relay.stores.suppressions.is_suppressed("acme", f"ok@{DOMAIN}"))

    async def test_complaint_without_node_secret(self) -> None:
        """Without a node secret (no reference header) the report is matched by the
        message's Message-ID."""
        relay = await self.start(secret=False)
        rcpt = f"complaint@{DOMAIN}"
        await in_thread(send, relay.ports["relay"], [rcpt])
        await wait_event(relay, rcpt, "complained")
        entry = await relay.stores.suppressions.is_suppressed("acme", rcpt)
        self.assertEqual(entry.source if entry else None, "complaint")

    async def test_stop_right_after_a_complaint(self) -> None:
        """A node stopped (in the cleanup) before a complaint's report is made leaves
        no timer behind: trial fails a test that leaves the reactor dirty."""
        relay = await self.start()
        rcpt = f"complaint@{DOMAIN}"
        await in_thread(send, relay.ports["relay"], [rcpt])
        await wait_event(relay, rcpt, "delivered")

    async def test_simulator_skips_egress_sources(self) -> None:
        """With egress sources configured, simulated mail is sent from none of them:
        no source address on its events, no warmup budget spent."""
        relay = await self.start(
            egress={"source": [{"name": "ip10", "address": "127.0.0.10"}]},
        )
        rcpt = f"success@{DOMAIN}"
        await in_thread(send, relay.ports["relay"], [rcpt])
        delivered = await wait_event(relay, rcpt, "delivered")
        self.assertIsNone(delivered.source_ip)
        (source,) = relay.service.delivery.routing_state()["egress"]
        self.assertEqual(source["sent_today"], {})
