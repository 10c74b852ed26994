"""A site's connections and window slots are counted while a session holds them and no
longer: a session that ends while those before it are still writing their outcomes
leaves its connection resting for the next one (it used to close it, as if those
sessions still held theirs), and a failure to write an outcome gives back no slot
but the session's own."""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial import unittest

from sendarix.control.cli.sink import SinkOptions, SinkServer
from tests.support.dnsserver import start_dns
from tests.support.relay import in_thread, start_relay

RELAY_LISTENER = {
    "name": "relay",
    "endpoint": "tcp:0:interface=127.0.0.1",
    "tls": "none",
    "auth": "none",
    "trusted_networks": ["127.0.0.0/8"],
}

BODY = b"From: app@example.com\r\nSubject: reuse\r\n\r\n" + (b"x" * 500 + b"\r\n") * 4

#: The provider's connection limit in these tests.
LIMIT = 2


def submit_one(port: int, recipient: str) -> None:
    """Send one message to ``recipient`` (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        s.sendmail("app@example.com", [recipient], BODY)


def submit_many(port: int, count: int) -> None:
    """Send ``count`` messages to user@busy.test over one session (blocking)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        for _ in range(count):
            s.sendmail("app@example.com", ["user@busy.test"], BODY)


class ConnectionReuseTests(unittest.TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = SinkServer(
            SinkOptions(listen=("tcp:0:interface=127.0.0.2",), hostname="sink.test",
                        idle_timeout=0),
            reactor,
        )
        await self.sink.start()
        self.addCleanup(self.sink.stop)
        dns_port, stop_dns = start_dns(
            {"busy.test": {"MX": [(10, "mx.busy.test")]}, "mx.busy.test": {"A": ["127.0.0.2"]}}
        )
        self.addCleanup(stop_dns)
        self.relay = await start_relay(
            self,
            [RELAY_LISTENER],
            delivery={"mx_port": self.sink.addresses[0][1]},
            dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
            provider={"busymail": {"mx_suffixes": ["busy.test"], "max_connections": LIMIT}},
        )

    async def test_busy_site_keeps_its_connections(self) -> None:
        """Mail arriving from six clients at once, two connections allowed: every
        message goes over the first two connections.  (Sessions counted until their
        outcomes were written made those ending meanwhile close their connections,
        and the next sessions connect again: dozens of connections for 90 messages.)"""
        clients, each = 6, 15
        port = self.relay.ports["relay"]
        await gatherResults([in_thread(submit_many, port, each) for _ in range(clients)])
        await self.sink.wait_for(clients * each, timeout=30)
        stats = self.sink.stats
        self.assertEqual(stats.messages, clients * each)
        self.assertLessEqual(stats.max_concurrent, LIMIT)
        self.assertEqual(stats.connections, LIMIT)


class CompleteFails:
    """The relay's own spool, whose ``complete`` (writing a session's outcomes) fails
    the first ``times`` calls."""

    def __init__(self, spool: Any, times: int = 1) -> None:
        self.spool = spool
        self.times = times
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spool, name)

    def complete(self, *args: Any) -> Any:
        if self.failures < self.times:
            self.failures += 1
            raise OSError("spool unavailable (test outage)")
        return self.spool.complete(*args)


class WindowSlotTests(unittest.TestCase):
    async def test_failed_outcome_frees_only_its_own_slot(self) -> None:
        """Writing a delivered session's outcome fails: the session's window slot was
        given back with its verdict, and the failure does not give back another's (a
        slot held by a session still open, here a stand-in taken by hand)."""
        sink = SinkServer(
            SinkOptions(listen=("tcp:0:interface=127.0.0.2",), hostname="sink.test",
                        idle_timeout=0),
            reactor,
        )
        await sink.start()
        self.addCleanup(sink.stop)
        dns_port, stop_dns = start_dns(
            {"win.test": {"MX": [(10, "mx.win.test")]}, "mx.win.test": {"A": ["127.0.0.2"]}}
        )
        self.addCleanup(stop_dns)
        relay = await start_relay(
            self,
            [RELAY_LISTENER],
            delivery={"mx_port": sink.addresses[0][1]},
            dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
            provider={"winmail": {"mx_suffixes": ["win.test"], "max_connections": LIMIT}},
        )
        delivery = relay.service.delivery
        spool = CompleteFails(delivery.spool)
        delivery.spool = spool
        window = delivery.shaping.get("winmail").window
        self.assertTrue(window.try_acquire(reactor.seconds()))  # the other session's slot
        await in_thread(submit_one, relay.ports["relay"], "user@win.test")
        await sink.wait_for(1, timeout=10)
        for _ in range(100):
            if spool.failures:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(spool.failures, 1)
        self.assertEqual(window.active, 1)
        window.release()
        # The failure is logged, as every failed delivery is.
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
