"""Tests for sendarix.delivery.service: a real relay delivering to in-process sinks over loopback,
routed by an in-process DNS server; and the simulator domain."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor, task
from twisted.trial import unittest

from sendarix.control.cli.sink import SinkOptions, SinkServer, parse_fault
from sendarix.model.event import Event, EventQuery
from tests.support.dnsserver import start_dns
from tests.support.relay import Relay, in_thread, start_relay

RELAY_LISTENER = {
    "name": "relay",
    "endpoint": "tcp:0:interface=127.0.0.1",
    "tls": "none",
    "auth": "none",
    "trusted_networks": ["127.0.0.0/8"],
}

BODY = (
    b"From: app@example.com\r\nSubject: delivery test\r\n\r\n"
    b".a line starting with a dot\r\n"
    + bytes(range(32, 127))
    + b"\r\n"
    + (b"x" * 500 + b"\r\n") * 10
)


def submit(port: int, sender: str, recipients: list[str], body: bytes = BODY) -> Any:
    """Send one message through the relay listener (blocking; run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        return s.sendmail(sender, recipients, body)


async def wait_event(relay: Relay, recipient: str, type: str, timeout: float = 10.0) -> Event:
    """The newest ``type`` event for ``recipient``, polling the delivery log."""
    for _ in range(int(timeout / 0.1)):
        page = await relay.stores.eventlog.search(EventQuery(recipient=recipient, type=type))
        if page.events:
            return page.events[0]
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no {type} event for {recipient} within {timeout} s")


class DeliveryTests(unittest.TestCase):
    """End to end: submit to the relay, the delivery agent sends it to a sink."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = SinkServer(
            SinkOptions(
                listen=("tcp:0:interface=127.0.0.2",),
                hostname="sink.test",
                idle_timeout=0,
                faults=(parse_fault("rcpt:550:5.1.1:bad*"),),
            ),
            reactor,
        )
        await self.sink.start()
        self.addCleanup(self.sink.stop)
        port = self.sink.addresses[0][1]
        # Every MX host shares the delivery port: the fallback sink listens on the
        # same number on another loopback address.
        self.backup = SinkServer(
            SinkOptions(listen=(f"tcp:{port}:interface=127.0.0.3",), hostname="backup.test",
                        idle_timeout=0),
            reactor,
        )
        await self.backup.start()
        self.addCleanup(self.backup.stop)
        self.busy = SinkServer(
            SinkOptions(listen=(f"tcp:{port}:interface=127.0.0.4",), hostname="busy.test",
                        idle_timeout=0, faults=(parse_fault("connect:421"),)),
            reactor,
        )
        await self.busy.start()
        self.addCleanup(self.busy.stop)
        dns_port, stop_dns = start_dns(
            {
                "good.test": {"MX": [(10, "mx.good.test")]},
                "mx.good.test": {"A": ["127.0.0.2"]},
                "fallback.test": {"MX": [(10, "dead.fallback.test"), (20, "live.fallback.test")]},
                "dead.fallback.test": {"A": ["127.0.0.5"]},
                "live.fallback.test": {"A": ["127.0.0.3"]},
                "busy.test": {"MX": [(5, "mx1.busy.test"), (50, "mx2.busy.test")]},
                "mx1.busy.test": {"A": ["127.0.0.4"]},
                "mx2.busy.test": {"A": ["127.0.0.3"]},
                "nullmx.test": {"MX": [(0, ".")]},
            }
        )
        self.addCleanup(stop_dns)
        self.relay = await start_relay(
            self,
            [RELAY_LISTENER],
            delivery={"mx_port": port},
            dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
            provider={"goodmail": {"mx_suffixes": ["good.test"]}},
        )
        self.port = self.relay.ports["relay"]

    async def test_delivered_intact(self) -> None:
        """A submitted message reaches the MX host byte for byte (after our headers) and
        the log shows delivered with the MX, its address and the reply."""
        refused = await in_thread(submit, self.port, "app@example.com", ["User@good.test"])
        self.assertEqual(refused, {})
        (message,) = await self.sink.wait_for(1)
        self.assertEqual(message.recipients, ("User@good.test",))
        self.assertEqual(message.sender, "app@example.com")
        self.assertTrue(message.body.endswith(BODY.split(b"\r\n\r\n", 1)[1]), message.body[-200:])
        event = await wait_event(self.relay, "User@good.test", "delivered")
        self.assertEqual(event.mx, "mx.good.test")
        self.assertEqual(event.mx_ip, "127.0.0.2")
        self.assertEqual(event.provider, "goodmail")
        self.assertEqual(event.attempt, 1)
        self.assertEqual(event.node, "test-node")
        self.assertEqual(event.sender, "app@example.com")
        assert event.response is not None
        self.assertEqual(event.response.code, 250)
        self.assertEqual(len(self.backup.messages), 0)

    async def test_suspended_site(self) -> None:
        """Mail for a site the operator suspended is deferred, not sent; once resumed
        (and due) it goes out."""
        delivery = self.relay.service.delivery
        delivery.suspend("goodmail", reactor.seconds() + 600)
        await in_thread(submit, self.port, "app@example.com", ["held@good.test"])
        event = await wait_event(self.relay, "held@good.test", "deferred")
        assert event.response is not None and event.queue_id is not None
        self.assertEqual((event.response.code, event.response.text),
                         (451, "goodmail: suspended by the operator"))
        self.assertEqual(len(self.sink.messages), 0)
        self.assertTrue(delivery.resume("goodmail"))
        self.assertFalse(delivery.resume("goodmail"))
        await self.relay.stores.spool.retry(event.queue_id, reactor.seconds())
        await self.sink.wait_for(1)

    async def test_mx_fallback(self) -> None:
        """With nothing listening at the preferred MX, the next MX gets the message."""
        await in_thread(submit, self.port, "app@example.com", ["someone@fallback.test"])
        (message,) = await self.backup.wait_for(1)
        self.assertEqual(message.recipients, ("someone@fallback.test",))
        event = await wait_event(self.relay, "someone@fallback.test", "delivered")
        self.assertEqual(event.mx, "live.fallback.test")
        self.assertEqual(event.mx_ip, "127.0.0.3")
        self.assertEqual(len(self.sink.messages), 0)

    async def test_421_greeting_fallback(self) -> None:
        """A preferred MX that greets with 421 is skipped at once for the next one."""
        await in_thread(submit, self.port, "app@example.com", ["someone@busy.test"])
        (message,) = await self.backup.wait_for(1)
        self.assertEqual(message.recipients, ("someone@busy.test",))
        event = await wait_event(self.relay, "someone@busy.test", "delivered")
        self.assertEqual(event.mx, "mx2.busy.test")
        self.assertEqual(event.mx_ip, "127.0.0.3")

    async def test_hard_bounce_suppresses(self) -> None:
        """A 550 5.1.1 at RCPT bounces that recipient (bad-mailbox) and suppresses it,
        while the other recipient of the same message is delivered."""
        await in_thread(
            submit, self.port, "app@example.com", ["bad-user@good.test", "fine@good.test"]
        )
        (message,) = await self.sink.wait_for(1)
        self.assertEqual(message.recipients, ("fine@good.test",))
        bounced = await wait_event(self.relay, "bad-user@good.test", "bounced")
        self.assertEqual(bounced.bounce_category, "bad-mailbox")
        assert bounced.response is not None
        self.assertEqual((bounced.response.code, bounced.response.enhanced), (550, "5.1.1"))
        await wait_event(self.relay, "fine@good.test", "delivered")
        suppression = await self.relay.stores.suppressions.is_suppressed(
            "default", "bad-user@good.test"
        )
        self.assertIsNotNone(suppression)
        self.assertEqual(suppression.source, "bounce")
        self.assertIsNone(
            await self.relay.stores.suppressions.is_suppressed("default", "fine@good.test")
        )
        # Next time, the relay refuses the suppressed recipient at RCPT.
        refused = await in_thread(
            submit, self.port, "app@example.com", ["bad-user@good.test", "fine@good.test"]
        )
        self.assertEqual(refused["bad-user@good.test"], (550, b"5.1.1 recipient suppressed"))

    async def test_unknown_domain_bounces(self) -> None:
        """A domain that does not exist (NXDOMAIN) bounces with a 5.1.2 reply."""
        await in_thread(submit, self.port, "app@example.com", ["x@nowhere.test"])
        event = await wait_event(self.relay, "x@nowhere.test", "bounced")
        assert event.response is not None
        self.assertEqual(event.response.enhanced, "5.1.2")

    async def test_null_mx_bounces(self) -> None:
        """A domain publishing a null MX (RFC 7505) bounces at once, never retried."""
        await in_thread(submit, self.port, "app@example.com", ["x@nullmx.test"])
        event = await wait_event(self.relay, "x@nullmx.test", "bounced")
        assert event.response is not None
        self.assertEqual(event.response.enhanced, "5.1.10")
        self.assertEqual(event.attempt, 1)

    async def test_simulator(self) -> None:
        """Simulator recipients never leave the process: success is delivered, bounce
        is bounced and suppressed, defer is deferred and stays queued, suppressed is
        refused at RCPT (never queued), complaint is delivered then complained and
        suppressed."""
        domain = "simulator.sendarix.invalid"
        rcpts = [f"{p}@{domain}" for p in ("success", "bounce", "defer", "suppressed", "complaint")]
        refused = await in_thread(submit, self.port, "app@example.com", rcpts)
        self.assertEqual(list(refused), [rcpts[3]])
        delivered = await wait_event(self.relay, rcpts[0], "delivered")
        self.assertEqual(delivered.mx, "simulator")
        bounced = await wait_event(self.relay, rcpts[1], "bounced")
        self.assertEqual(bounced.bounce_category, "bad-mailbox")
        deferred = await wait_event(self.relay, rcpts[2], "deferred")
        assert deferred.response is not None
        self.assertEqual(deferred.response.code, 421)
        await wait_event(self.relay, rcpts[3], "suppressed")
        await wait_event(self.relay, rcpts[4], "delivered")
        await wait_event(self.relay, rcpts[4], "complained")
        complained = await self.relay.stores.suppressions.is_suppressed("default", rcpts[4])
        self.assertEqual(complained.source, "complaint")
        suppression = await self.relay.stores.suppressions.is_suppressed("default", rcpts[1])
        self.assertEqual(suppression.source, "bounce")
        stored = await self.relay.stores.spool.get(delivered.queue_id)
        assert stored is not None
        states = {r.address: r.status.value for r in stored.recipients}
        self.assertEqual(
            states,
            {rcpts[0]: "delivered", rcpts[1]: "bounced", rcpts[2]: "deferred",
             rcpts[4]: "delivered"},
        )
        self.assertEqual(len(self.sink.messages) + len(self.backup.messages), 0)
