"""A site's connections and window slots are counted while a session holds them and no
longer: a session that ends while those before it are still writing their outcomes
leaves its connection resting for the next one (it used to close it, as if those
sessions still held theirs), and a failure to write an outcome gives back no slot
but the session's own."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.delivery.test_routing import start_relay_on_dns, start_sink, submit_many
from tests.support.relay import in_thread

#: The provider's connection limit in these tests.
LIMIT = 2


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


class ConnectionCountTests(unittest.TestCase):
    """A relay delivering busy.test, allowed ``LIMIT`` connections, to one sink."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.sink = await start_sink(self, "127.0.0.2")
        self.relay = await start_relay_on_dns(
            self,
            {"busy.test": {"MX": [(10, "mx.busy.test")]}, "mx.busy.test": {"A": ["127.0.0.2"]}},
            self.sink.addresses[0][1],
            provider={"busymail": {"mx_suffixes": ["busy.test"], "max_connections": LIMIT}},
        )
        self.port = self.relay.ports["relay"]

    async def test_busy_site_keeps_its_connections(self) -> None:
        """Mail arriving from six clients at once, two connections allowed: every
        message goes over the first two connections.  (Sessions counted until their
        outcomes were written made those ending meanwhile close their connections,
        and the next sessions connect again: dozens of connections for 90 messages.)"""
        clients, each = 6, 15
        recipients = ["user@busy.test"] * each
        await gatherResults([in_thread(submit_many, self.port, recipients) for _ in range(clients)])
        await self.sink.wait_for(clients * each, timeout=30)
        stats = self.sink.stats
        self.assertEqual(stats.messages, clients * each)
        self.assertLessEqual(stats.max_concurrent, LIMIT)
        self.assertEqual(stats.connections, LIMIT)

    async def test_failed_outcome_frees_only_its_own_slot(self) -> None:
        """Writing a delivered session's outcome fails: the session's window slot was
        given back with its verdict, and the failure does not give back another's (a
        slot held by a session still open, here a stand-in taken by hand)."""
        delivery = self.relay.service.delivery
        spool = CompleteFails(delivery.spool)
        delivery.spool = spool
        window = delivery.shaping.get("busymail").window
        self.assertTrue(window.try_acquire(reactor.seconds()))  # the other session's slot
        await in_thread(submit_many, self.port, ["user@busy.test"])
        await self.sink.wait_for(1, timeout=10)
        for _ in range(100):
            if spool.failures:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(spool.failures, 1)
        self.assertEqual(window.active, 1)
        window.release()
        # The failure is logged, as every failed delivery is.
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
