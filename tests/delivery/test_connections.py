"""Connections to a busy site are kept: a session that ends while the sessions before
it are still writing their outcomes leaves its connection resting for the next one,
instead of closing it because those sessions still counted against the site's limit."""

from __future__ import annotations

import smtplib

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
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
