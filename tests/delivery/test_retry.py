"""Tests for sendarix.delivery.service over time: deferral and retry, greylisting, expiry,
several domains in one message, connection reuse and the verify TLS policy; a real
relay delivering to in-process sinks over loopback with short retry schedules."""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.internet import reactor, task
from twisted.trial import unittest

from sendarix.control.cli.sink import SinkOptions, SinkServer, parse_fault
from sendarix.model.event import EventQuery
from tests.delivery.test_service import RELAY_LISTENER, submit, wait_event
from tests.support.dnsserver import start_dns
from tests.support.relay import Relay, in_thread, start_relay
from tests.support.tlsca import TestCA

SENDER = "app@example.com"
DOMAINS = ("one.test", "two.test", "three.test")


def submit_many(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Send several messages over one client session (blocking; run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        for recipient, body in messages:
            s.sendmail(SENDER, [recipient], body)


class RetryTests(unittest.TestCase):
    """A relay with a one-second retry schedule, delivering to one sink per test."""

    timeout = 30

    async def start(self, *faults: str, **delivery: Any) -> Relay:
        """Start a sink with ``faults`` on 127.0.0.2 and a relay that routes
        ``DOMAINS`` to it."""
        self.sink = SinkServer(
            SinkOptions(
                listen=("tcp:0:interface=127.0.0.2",),
                hostname="sink.test",
                idle_timeout=0,
                faults=tuple(parse_fault(f) for f in faults),
            ),
            reactor,
        )
        await self.sink.start()
        self.addCleanup(self.sink.stop)
        records: dict[str, dict[str, Any]] = {"mx.sink.test": {"A": ["127.0.0.2"]}}
        for domain in DOMAINS:
            records[domain] = {"MX": [(10, "mx.sink.test")]}
        dns_port, stop_dns = start_dns(records)
        self.addCleanup(stop_dns)
        settings: dict[str, Any] = {
            "retry_schedule": ["1s"],
            "greylist_retry": "1s",
            "max_lifetime": "30s",
            "mx_port": self.sink.addresses[0][1],
        }
        settings.update(delivery)
        self.relay = await start_relay(
            self,
            [RELAY_LISTENER],
            delivery=settings,
            dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
        )
        self.port = self.relay.ports["relay"]
        return self.relay

    async def test_421_then_delivered(self) -> None:
        """A 421 at RCPT defers the recipient; the retry a second later delivers it."""
        relay = await self.start("first:1:421:4.7.0")
        await in_thread(submit, self.port, SENDER, ["user@one.test"])
        deferred = await wait_event(relay, "user@one.test", "deferred")
        assert deferred.response is not None
        self.assertEqual(deferred.response.code, 421)
        self.assertEqual(deferred.attempt, 1)
        delivered = await wait_event(relay, "user@one.test", "delivered")
        self.assertEqual(delivered.attempt, 2)
        self.assertEqual(delivered.queue_id, deferred.queue_id)
        self.assertEqual(len(self.sink.messages), 1)

    async def test_greylisted_then_delivered(self) -> None:
        """A greylisting 450 is retried after ``greylist_retry`` and then delivered.

        (The reply names no delay: a named one is honoured no sooner than 30 s.)"""
        relay = await self.start("first:1:450:4.2.0:Greylisted, please try again later")
        await in_thread(submit, self.port, SENDER, ["grey@one.test"])
        deferred = await wait_event(relay, "grey@one.test", "deferred")
        self.assertEqual(deferred.bounce_category, "greylist")
        delivered = await wait_event(relay, "grey@one.test", "delivered")
        self.assertEqual(delivered.attempt, 2)
        (message,) = await self.sink.wait_for(1)
        self.assertEqual(message.recipients, ("grey@one.test",))

    async def test_expired(self) -> None:
        """A recipient deferred until ``max_lifetime`` runs out expires and is
        suppressed with source "expired"."""
        relay = await self.start("rcpt:451:4.3.0:*", max_lifetime="3s")
        await in_thread(submit, self.port, SENDER, ["never@one.test"])
        expired = await wait_event(relay, "never@one.test", "expired", timeout=10)
        assert expired.response is not None
        self.assertEqual(expired.response.code, 451)
        self.assertGreater(expired.attempt or 0, 1)
        suppression = await relay.stores.suppressions.is_suppressed("default", "never@one.test")
        self.assertIsNotNone(suppression)
        self.assertEqual(suppression.source, "expired")
        stored = await relay.stores.spool.get(expired.queue_id)
        self.assertIsNone(stored)
        self.assertEqual(len(self.sink.messages), 0)

    async def test_three_domains(self) -> None:
        """One message to three domains: one accepted event, three delivered events,
        and each domain's copy carries only its own recipient."""
        relay = await self.start()
        rcpts = [f"user@{d}" for d in DOMAINS]
        await in_thread(submit, self.port, SENDER, rcpts)
        messages = await self.sink.wait_for(3)
        self.assertEqual(sorted(r for m in messages for r in m.recipients), sorted(rcpts))
        self.assertTrue(all(len(m.recipients) == 1 for m in messages))
        queue_ids = {(await wait_event(relay, r, "delivered")).queue_id for r in rcpts}
        self.assertEqual(len(queue_ids), 1)
        page = await relay.stores.eventlog.search(EventQuery(type="accepted"))
        self.assertEqual([e.queue_id for e in page.events], list(queue_ids))

    async def test_connection_reuse(self) -> None:
        """Ten messages queued for one domain go out over fewer connections than
        messages (all on one, with the default ``max_messages_per_connection``)."""
        relay = await self.start()
        delivery = relay.service.delivery
        await delivery.stopService()
        bodies = [
            (f"reuse{i}@two.test", f"Message-ID: <reuse{i}@test>\r\n\r\nbody {i}\r\n".encode())
            for i in range(10)
        ]
        await in_thread(submit_many, self.port, bodies)
        delivery.startService()
        self.addCleanup(delivery.stopService)
        messages = await self.sink.wait_for(10)
        self.assertEqual(
            sorted(m.message_id for m in messages), sorted(f"<reuse{i}@test>" for i in range(10))
        )
        self.assertEqual(self.sink.stats.connections, 1)

    async def test_verify_without_starttls(self) -> None:
        """With ``tls = "verify"`` a host that offers no STARTTLS gets nothing: the
        recipient is deferred."""
        ca = TestCA(os.path.abspath(self.mktemp()))
        relay = await self.start(tls="verify", ca_file=ca.ca_path)
        await in_thread(submit, self.port, SENDER, ["secure@three.test"])
        deferred = await wait_event(relay, "secure@three.test", "deferred")
        assert deferred.response is not None
        self.assertEqual(deferred.response.code // 100, 4)
        await task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.sink.messages), 0)
        self.assertEqual(self.sink.stats.messages, 0)
