"""End to end routing: a real relay delivering through smarthost pools, provider limits
and egress sources to in-process sinks on 127.0.0.x (docs/routing.md)."""

from __future__ import annotations

import datetime
import os
import smtplib
import time
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import FirstError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sendarix.control.cli.sink import SinkOptions, SinkServer, parse_fault
from sendarix.interfaces import IThrottle
from sendarix.model.event import EventQuery
from sendarix.routing.throttle import MemoryThrottle
from tests.delivery.test_service import BODY, RELAY_LISTENER, submit, wait_event
from tests.egress.test_client import ipv6_loopback_missing
from tests.support.dnsserver import start_dns
from tests.support.relay import Relay, in_thread, start_relay
from tests.support.tlsca import TestCA

SENDER = "app@example.com"
log = Logger()


def submit_many(port: int, recipients: list[str], body: bytes = BODY) -> None:
    """One message per recipient over one SMTP session (blocking; run it in a thread)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as s:
        for rcpt in recipients:
            s.sendmail(SENDER, [rcpt], body)


async def start_sink(
    testcase: unittest.TestCase, address: str, port: int = 0, *faults: str
) -> SinkServer:
    """A sink on ``address`` (stopped in the test's cleanup)."""
    sink = SinkServer(
        SinkOptions(
            listen=(f"tcp:{port}:interface={address}",),
            hostname=f"sink-{address}.test",
            idle_timeout=0,
            faults=tuple(parse_fault(f) for f in faults),
        ),
        reactor,
    )
    await sink.start()
    testcase.addCleanup(sink.stop)
    return sink


class PoolFailoverTests(unittest.TestCase):
    """A smarthost pool moves to its next endpoint at once when the first fails."""

    first_sink: SinkServer | None = None

    async def start(self, first: str | None, *faults: str) -> tuple[SinkServer, Any]:
        """A relay routing ``pooled.test`` to a pool whose first endpoint is ``first``
        (a sink with ``faults``; None: nothing listening) and whose second is a good
        sink on 127.0.0.3."""
        second = await start_sink(self, "127.0.0.3")
        port = second.addresses[0][1]
        if first is not None:
            self.first_sink = await start_sink(self, first, port, *faults)
        relay = await start_relay(
            self,
            [RELAY_LISTENER],
            delivery={"connect_timeout": "5s"},
            pool={
                "relays": {
                    "endpoints": [
                        {"host": first or "127.0.0.5", "port": port, "priority": 10},
                        {"host": "127.0.0.3", "port": port, "priority": 20},
                    ],
                    "cooldown": "30s",
                }
            },
            route=[{"match": {"recipient_domain": "pooled.test"}, "via": "pool:relays"}],
        )
        return second, relay

    async def _check_failover(self, second: SinkServer, relay: Any) -> float:
        started = time.monotonic()
        await in_thread(submit, relay.ports["relay"], SENDER, ["user@pooled.test"])
        (message,) = await second.wait_for(1, timeout=10)
        took = time.monotonic() - started
        self.assertEqual(message.recipients, ("user@pooled.test",))
        event = await wait_event(relay, "user@pooled.test", "delivered")
        self.assertEqual((event.mx, event.mx_ip), ("127.0.0.3", "127.0.0.3"))
        self.assertEqual(event.attempt, 1)
        return took

    async def test_refused_endpoint_fails_over(self) -> None:
        """Nothing listens at the first endpoint: the message arrives at the second
        on its first attempt, within 10 s."""
        second, relay = await self.start(None)
        took = await self._check_failover(second, relay)
        self.assertLess(took, 10.0)
        log.info("failover after a refused connection: {took:.2f} s", took=took)
        pool = relay.service.delivery.routes.routers["pool:relays"][1]
        key = f"relays/127.0.0.5:{second.addresses[0][1]}"
        self.assertEqual(pool.states(reactor.seconds())[key], "open")

    async def test_421_endpoint_fails_over(self) -> None:
        """The first endpoint greets with 421: the message arrives at the second on its
        first attempt, within 10 s."""
        second, relay = await self.start("127.0.0.4", "connect:421")
        took = await self._check_failover(second, relay)
        self.assertLess(took, 10.0)
        log.info("failover after a 421 greeting: {took:.2f} s", took=took)

    async def test_silent_endpoint_fails_over(self) -> None:
        """The first endpoint accepts the connection but never greets: after the
        connect timeout (1 s here) the message goes to the second endpoint."""
        second = await start_sink(self, "127.0.0.3")
        port = second.addresses[0][1]
        await start_sink(self, "127.0.0.4", port, "stall")
        relay = await start_relay(
            self,
            [RELAY_LISTENER],
            delivery={"connect_timeout": "1s"},
            pool={
                "relays": {
                    "endpoints": [
                        {"host": "127.0.0.4", "port": port, "priority": 1},
                        {"host": "127.0.0.3", "port": port, "priority": 2},
                    ]
                }
            },
            route=[{"match": {"recipient_domain": "pooled.test"}, "via": "pool:relays"}],
        )
        took = await self._check_failover(second, relay)
        log.info("failover from a silent endpoint: {took:.2f} s", took=took)

    async def test_resting_endpoint_skipped(self) -> None:
        """While the failed endpoint cools down, later messages go straight to the
        second endpoint (the first is not even connected to)."""
        second, relay = await self.start("127.0.0.4", "connect:421")
        await self._check_failover(second, relay)
        await in_thread(submit, relay.ports["relay"], SENDER, ["again@pooled.test"])
        await second.wait_for(2, timeout=10)
        event = await wait_event(relay, "again@pooled.test", "delivered")
        self.assertEqual(event.mx_ip, "127.0.0.3")
        assert self.first_sink is not None
        self.assertEqual(self.first_sink.stats.connections, 1)


@implementer(IThrottle)
class AsyncThrottle:
    """An IThrottle answering through Deferreds a reactor turn later, as a shared
    (Redis) throttle does; the counting is MemoryThrottle's."""

    def __init__(self) -> None:
        self.memory = MemoryThrottle()

    def _call(self, fn: Any, *args: Any) -> Any:
        return deferLater(reactor, 0, fn, *args)

    def acquire_connection(self, key: str, limit: int, now: float) -> Any:
        return self._call(self.memory.acquire_connection, key, limit, now)

    def release_connection(self, key: str) -> Any:
        return self._call(self.memory.release_connection, key)

    def admit(self, key: str, rate: float, period: float, now: float) -> Any:
        return self._call(self.memory.admit, key, rate, period, now)

    def connections(self, key: str) -> int:
        return self.memory.connections(key)


class ProviderShapingTests(unittest.TestCase):
    """Provider limits hold at the destination."""

    async def test_max_connections(self) -> None:
        """A provider with max_connections = 2 never sees more than 2 connections at
        once during a 200-message burst to ten of its domains."""
        await self._burst(None)

    async def test_max_connections_async_throttle(self) -> None:
        """The same with a throttle that answers through Deferreds (as a Redis one
        does)."""
        throttle = AsyncThrottle()
        verifyObject(IThrottle, throttle)
        await self._burst(throttle)

    async def _burst(self, throttle: IThrottle | None) -> None:
        sink = await start_sink(self, "127.0.0.2")
        records: dict[str, dict[str, Any]] = {"mx.bulk.test": {"A": ["127.0.0.2"]}}
        domains = [f"d{i}.test" for i in range(10)]
        for domain in domains:
            records[domain] = {"MX": [(10, "mx.bulk.test")]}
        relay = await start_relay_on_dns(
            self,
            records,
            sink.addresses[0][1],
            provider={
                "bulk": {
                    "mx_suffixes": ["bulk.test"],
                    "max_connections": 2,
                    "messages_per_connection": 5,
                }
            },
        )
        if throttle is not None:
            relay.service.delivery.throttle = throttle
        recipients = [f"user{n}@{domains[n % 10]}" for n in range(200)]
        body = b"Subject: burst\r\n\r\nx\r\n"
        await in_thread(submit_many, relay.ports["relay"], recipients, body)
        await sink.wait_for(200, timeout=60)
        log.info("max concurrent connections at the sink: {n}", n=sink.stats.max_concurrent)
        self.assertLessEqual(sink.stats.max_concurrent, 2)
        self.assertGreaterEqual(sink.stats.connections, 200 // 5)
        event = await wait_event(relay, recipients[0], "delivered")
        self.assertEqual(event.provider, "bulk")


    async def test_rate_paces(self) -> None:
        """A provider with rate = "10/s" receives a 30-message burst spread over at
        least 2.9 s (GCRA: one message every 0.1 s), all delivered."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {"paced.test": {"MX": [(10, "mx.paced.test")]}, "mx.paced.test": {"A": ["127.0.0.2"]}},
            sink.addresses[0][1],
            provider={"paced": {"mx_suffixes": ["paced.test"], "rate": "10/s"}},
        )
        recipients = [f"user{n}@paced.test" for n in range(30)]
        await in_thread(submit_many, relay.ports["relay"], recipients, b"Subject: p\r\n\r\nx\r\n")
        messages = await sink.wait_for(30, timeout=30)
        arrivals = sorted(m.received_at for m in messages)
        spread = arrivals[-1] - arrivals[0]
        log.info("30 messages at 10/s arrived over {spread:.2f} s", spread=spread)
        self.assertGreaterEqual(spread, 2.9 - 0.05)


class ReadyQueueTests(unittest.TestCase):
    """A slow provider's backlog waits in its ready queue, not in lease churn."""

    async def test_backlog_paced_without_churn(self) -> None:
        """300 messages to a provider paced at 30/s and 5 to one paced at 25/min (a
        message every 2.4 s) all arrive at their pace, over no more connections at once
        than the rates need, while the relay hands nothing back to the spool; mail to
        another site submitted after the backlog is not held up behind it."""
        sink = await start_sink(self, "127.0.0.2")
        port = sink.addresses[0][1]
        other = await start_sink(self, "127.0.0.3", port)
        slow = await start_sink(self, "127.0.0.4", port)
        relay = await start_relay_on_dns(
            self,
            {
                "paced.test": {"MX": [(10, "mx.paced.test")]},
                "mx.paced.test": {"A": ["127.0.0.2"]},
                "other.test": {"MX": [(10, "mx.other.test")]},
                "mx.other.test": {"A": ["127.0.0.3"]},
                "slow.test": {"MX": [(10, "mx.slow.test")]},
                "mx.slow.test": {"A": ["127.0.0.4"]},
            },
            port,
            provider={
                "paced": {"mx_suffixes": ["paced.test"], "rate": "30/s"},
                "slow": {"mx_suffixes": ["slow.test"], "rate": "25/min"},
            },
        )
        delivery = relay.service.delivery
        body = b"Subject: backlog\r\n\r\nx\r\n"
        await in_thread(
            submit_many, relay.ports["relay"], [f"s{n}@slow.test" for n in range(5)], body
        )
        await in_thread(
            submit_many, relay.ports["relay"], [f"user{n}@paced.test" for n in range(300)], body
        )
        await in_thread(
            submit_many, relay.ports["relay"], [f"o{n}@other.test" for n in range(5)], body
        )
        others = await other.wait_for(5, timeout=30)
        messages = await sink.wait_for(300, timeout=60)
        slow_arrivals = sorted(m.received_at for m in await slow.wait_for(5, timeout=30))
        arrivals = sorted(m.received_at for m in messages)
        log.info("backlog: {counters}, spread {spread:.2f} s", counters=delivery.counters,
                 spread=arrivals[-1] - arrivals[0])
        self.assertGreaterEqual(arrivals[-1] - arrivals[0], 299 / 30 - 0.05)
        log.info("slow site: spread {spread:.3f} s", spread=slow_arrivals[-1] - slow_arrivals[0])
        # The rate admits them exactly 2.4 s apart; what arrives also carries each
        # session's own time (a new connection for each: a connection rests 2 s),
        # which a loaded machine stretched by 80 ms for the first once (9.52 s).
        # Unpaced, the five would arrive within a few tens of milliseconds.
        self.assertGreaterEqual(slow_arrivals[-1] - slow_arrivals[0], 4 * 2.4 - 0.25)
        # A slow paced site gets the one connection its rate needs, not its window.
        self.assertEqual(slow.stats.max_concurrent, 1)
        # Before ready queues, mail the rate could not admit within 2 s went back to
        # the spool and was leased again at the next poll: the slow site alone caused
        # dozens of leases and releases (measured: 45 releases for 11 deliveries).
        self.assertEqual(delivery.counters["released"], 0)
        self.assertLessEqual(delivery.counters["parked"], 10)
        self.assertLessEqual(delivery.counters["leased"], 310 + 10)
        # The other site's mail did not wait for the backlog.
        last_other = max(m.received_at for m in others)
        self.assertGreaterEqual(sum(1 for t in arrivals if t > last_other), 10)


class ReadyQueueLeaseTests(unittest.TestCase):
    """Deliveries waiting in a ready queue keep their leases, and go back at stop."""

    async def test_leases_renewed_then_released_at_stop(self) -> None:
        """Mail for a provider paced at 1/min waits in the ready queue past its 3 s
        lease, still leased to this node (renewed); when the node stops it is handed
        back at once, so another node can lease it."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {
                "slow.test": {"MX": [(10, "mx.slow.test")]}, "mx.slow.test": {"A": ["127.0.0.2"]},
            },
            sink.addresses[0][1],
            spool={"url": "sqlite:var/spool.db", "lease_time": "3s"},
            provider={"slow": {"mx_suffixes": ["slow.test"], "rate": "1/min"}},
        )
        delivery = relay.service.delivery
        await in_thread(submit_many, relay.ports["relay"], [f"u{n}@slow.test" for n in range(5)])
        spool = relay.stores.spool
        for _ in range(100):
            if delivery.ready_queues.queued("slow") == 4:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(delivery.ready_queues.queued("slow"), 4)
        await deferLater(reactor, 4.0, lambda: None)
        self.assertEqual(delivery.ready_queues.queued("slow"), 4)
        self.assertEqual(await spool.lease_due("other-node", time.time(), 10, 60), [])
        await delivery.stopService()
        self.assertEqual(delivery.counters["released"], 4)
        taken = await spool.lease_due("other-node", time.time(), 10, 60)
        self.assertEqual(len(taken), 4)
        self.assertEqual(sink.stats.messages, 1)


class DeletedInFlightTests(unittest.TestCase):
    """A message deleted by an operator while it is being sent."""

    async def test_outcome_not_recorded_events_kept(self) -> None:
        """The destination's answer arrives after the delete: the spool refuses the
        outcome (the lease is gone), which the delivery agent reports as a warning,
        not an error; the message stays deleted and its ``delivered`` event is
        still written (it did go out)."""
        sink = await start_sink(self, "127.0.0.3", 0, "stall-data:2")
        relay = await start_relay(
            self, [RELAY_LISTENER],
            pool={"slow": {"endpoints": [{"host": "127.0.0.3",
                                          "port": sink.addresses[0][1]}]}},
            route=[{"match": {"recipient_domain": "slow.test"}, "via": "pool:slow"}],
        )
        await in_thread(submit, relay.ports["relay"], SENDER, ["user@slow.test"])
        (queued,) = (await relay.stores.spool.list_messages()) or [None]
        assert queued is not None
        await deferLater(reactor, 0.5, lambda: None)  # the sink holds the final 250
        self.assertTrue(await relay.stores.spool.delete(queued.queue_id))
        event = await wait_event(relay, "user@slow.test", "delivered")
        self.assertEqual(event.queue_id, queued.queue_id)
        self.assertIsNone(await relay.stores.spool.get(queued.queue_id))


class FlakySpool:
    """The relay's own spool, with ``body`` and ``release`` failing while ``down`` is
    set (a store outage, as when Redis restarts)."""

    def __init__(self, spool: Any) -> None:
        self.spool = spool
        self.down = False
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spool, name)

    def _check(self) -> None:
        if self.down:
            self.failures += 1
            raise OSError("spool unavailable (test outage)")

    def body(self, queue_id: str) -> Any:
        self._check()
        return self.spool.body(queue_id)

    def release(self, queue_id: str, domain: str, node: str) -> Any:
        self._check()
        return self.spool.release(queue_id, domain, node)


class SpoolOutageTests(unittest.TestCase):
    """A store outage while deliveries wait in the ready queue loses nothing."""

    async def test_outage_keeps_queued_deliveries(self) -> None:
        """While the spool fails, connections find no bodies and cannot hand the
        deliveries back: they stay queued (leased) and go out, once each, when the
        spool answers again, long before their leases would expire."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {
                "out.test": {"MX": [(10, "mx.out.test")]}, "mx.out.test": {"A": ["127.0.0.2"]},
            },
            sink.addresses[0][1],
            provider={"out": {"mx_suffixes": ["out.test"], "messages_per_connection": 2}},
        )
        delivery = relay.service.delivery
        # Through the lease poll: fresh mail taken from memory at its commit would
        # not read its body from the spool.
        delivery.active_queue = False
        flaky = FlakySpool(delivery.spool)
        flaky.down = True
        delivery.spool = flaky
        recipients = [f"u{n}@out.test" for n in range(6)]
        await in_thread(submit_many, relay.ports["relay"], recipients)
        for _ in range(100):
            if flaky.failures >= 4:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertGreaterEqual(flaky.failures, 4)
        self.assertEqual(sink.stats.messages, 0)
        flaky.down = False
        messages = await sink.wait_for(6, timeout=20)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(sorted(m.recipients[0] for m in messages), sorted(recipients))
        self.assertEqual(sink.stats.messages, 6)
        self.assertEqual(delivery.counters["released"], 0)
        self.flushLoggedErrors(OSError, FirstError)


class ActiveQueueTests(unittest.TestCase):
    """Fresh mail is handed to delivery in memory at its commit (the active queue)."""

    async def test_fresh_mail_needs_no_poll_and_no_body_read(self) -> None:
        """Mail committed while delivery has room goes out without a lease poll and
        without reading its body back: with body reads failing, all of it arrives."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {
                "out.test": {"MX": [(10, "mx.out.test")]}, "mx.out.test": {"A": ["127.0.0.2"]},
            },
            sink.addresses[0][1],
        )
        delivery = relay.service.delivery
        flaky = FlakySpool(delivery.spool)
        flaky.down = True
        delivery.spool = flaky
        recipients = [f"u{n}@out.test" for n in range(6)]
        await in_thread(submit_many, relay.ports["relay"], recipients)
        messages = await sink.wait_for(6, timeout=20)
        self.assertEqual(sorted(m.recipients[0] for m in messages), sorted(recipients))
        self.assertEqual(flaky.failures, 0)
        self.assertEqual(delivery.counters["handed"], 6)
        self.assertEqual(delivery.counters["leased"], 0)


@implementer(IThrottle)
class FlakyThrottle(AsyncThrottle):
    """A throttle answering at once, whose every call fails while ``down`` is set (a
    shared throttle whose Redis is unreachable)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.failures = 0

    def _call(self, fn: Any, *args: Any) -> Any:
        if self.down:
            self.failures += 1
            raise OSError("throttle unavailable (test outage)")
        return fn(*args)


class ThrottleOutageTests(unittest.TestCase):
    """A throttle outage delays delivery; it never wedges a site."""

    async def test_outage_then_delivery(self) -> None:
        """While the throttle fails for 3 s nothing is sent; afterwards every message
        goes out once, and no connection slot or window slot is left taken."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {
                "thr.test": {"MX": [(10, "mx.thr.test")]}, "mx.thr.test": {"A": ["127.0.0.2"]},
            },
            sink.addresses[0][1],
            provider={"thr": {"mx_suffixes": ["thr.test"], "messages_per_connection": 2,
                              "rate": "20/s"}},
        )
        delivery = relay.service.delivery
        throttle = FlakyThrottle()
        verifyObject(IThrottle, throttle)
        throttle.down = True
        delivery.throttle = throttle
        recipients = [f"u{n}@thr.test" for n in range(6)]
        await in_thread(submit_many, relay.ports["relay"], recipients)
        await deferLater(reactor, 3.0, lambda: None)
        self.assertGreater(throttle.failures, 0)
        self.assertEqual(sink.stats.messages, 0)
        throttle.down = False
        messages = await sink.wait_for(6, timeout=20)
        self.assertEqual(sorted(m.recipients[0] for m in messages), sorted(recipients))
        for _ in range(100):
            if (delivery.shaping.get("thr").window.active == 0
                    and throttle.memory.connections("conn:thr") == 0):
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(delivery.shaping.get("thr").window.active, 0)
        self.assertEqual(throttle.memory.connections("conn:thr"), 0)
        self.assertEqual(sink.stats.messages, 6)


class EgressSourceTests(unittest.TestCase):
    """Connections leave from the configured source addresses."""

    async def start(self, *faults: str) -> tuple[SinkServer, Any]:
        sink = await start_sink(self, "127.0.0.2", 0, *faults)
        relay = await start_relay_on_dns(
            self,
            {"src.test": {"MX": [(10, "mx.src.test")]}, "mx.src.test": {"A": ["127.0.0.2"]}},
            sink.addresses[0][1],
            provider={"srcmail": {"mx_suffixes": ["src.test"], "messages_per_connection": 1}},
            egress={
                "source": [
                    {"name": "ip10", "address": "127.0.0.10", "ehlo": "out10.relay.test"},
                    {"name": "ip11", "address": "127.0.0.11", "ehlo": "out11.relay.test"},
                ]
            },
        )
        return sink, relay

    async def test_sources_used(self) -> None:
        """The sink sees connections from both 127.0.0.10 and 127.0.0.11, with their
        EHLO names, and the events name the source address."""
        sink, relay = await self.start()
        recipients = [f"user{n}@src.test" for n in range(20)]
        await in_thread(submit_many, relay.ports["relay"], recipients)
        messages = await sink.wait_for(20, timeout=30)
        self.assertEqual({m.peer for m in messages}, {"127.0.0.10", "127.0.0.11"})
        self.assertEqual(
            {m.helo for m in messages}, {"out10.relay.test", "out11.relay.test"}
        )
        for m in messages:
            self.assertEqual(m.helo, f"out{m.peer.rsplit('.', 1)[1]}.relay.test")
        event = await wait_event(relay, recipients[0], "delivered")
        self.assertIn(event.source_ip, ("127.0.0.10", "127.0.0.11"))

    async def _check_shift(self, relay: Any, sink: SinkServer, first_type: str) -> None:
        await in_thread(submit, relay.ports["relay"], SENDER, ["first@src.test"])
        first = await wait_event(relay, "first@src.test", first_type)
        blocked_ip = first.source_ip
        self.assertIn(blocked_ip, ("127.0.0.10", "127.0.0.11"))
        recipients = [f"later{n}@src.test" for n in range(10)]
        await in_thread(submit_many, relay.ports["relay"], recipients)
        messages = await sink.wait_for(10, timeout=30)
        other = "127.0.0.11" if blocked_ip == "127.0.0.10" else "127.0.0.10"
        self.assertEqual({m.peer for m in messages}, {other})

    async def test_block_shifts_traffic(self) -> None:
        """After a 550 5.7.1 "blocked" reply to one source, the following mail to that
        provider leaves from the other source."""
        sink, relay = await self.start("first:1:550:5.7.1:Your IP address has been blocked")
        await self._check_shift(relay, sink, "bounced")

    async def test_rate_limit_shifts_traffic(self) -> None:
        """After a 421 4.7.0 rate-limit reply to one source, the following mail to that
        provider leaves from the other source."""
        sink, relay = await self.start("first:1:421:4.7.0:Too many messages, slow down")
        await self._check_shift(relay, sink, "deferred")


class IPv6EgressTests(unittest.TestCase):
    """IPv6 egress sources send to IPv6 hops, IPv4 sources to IPv4 hops."""

    async def test_mixed_families(self) -> None:
        """With one IPv4 and one IPv6 source and an MX host with A and AAAA records,
        every message is delivered, each source over its own family (peers 127.0.0.10
        and ::1 at the sinks)."""
        missing = ipv6_loopback_missing()
        if missing:
            raise SkipTest(missing)
        sink6 = await start_sink(self, "\\:\\:1")
        port = sink6.addresses[0][1]
        sink4 = await start_sink(self, "127.0.0.2", port)
        relay = await start_relay_on_dns(
            self,
            {
                "six.test": {"MX": [(10, "mx.six.test")]},
                "mx.six.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
            },
            port,
            provider={"six": {"mx_suffixes": ["six.test"], "messages_per_connection": 1}},
            egress={"source": [
                {"name": "v4", "address": "127.0.0.10"},
                {"name": "v6", "address": "::1"},
            ]},
        )
        recipients = [f"user{n}@six.test" for n in range(16)]
        await in_thread(submit_many, relay.ports["relay"], recipients)
        for _ in range(300):
            if sink4.stats.messages + sink6.stats.messages >= 16:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(sink4.stats.messages + sink6.stats.messages, 16)
        self.assertEqual({m.peer for m in sink6.messages}, {"::1"})
        self.assertEqual({m.peer for m in sink4.messages}, {"127.0.0.10"})
        self.assertTrue(sink6.messages and sink4.messages)
        events = [await wait_event(relay, r, "delivered") for r in recipients]
        for e in events:
            self.assertEqual(e.source_ip, e.mx_ip if e.mx_ip == "::1" else "127.0.0.10")


class SourceConnectionCapTests(unittest.TestCase):
    """max_connections_per_source caps connections per (egress source, site)."""

    async def test_cap_per_source(self) -> None:
        """With two sources, max_connections = 4 and max_connections_per_source = 1,
        the sink never sees two connections at once from the same address, and it sees
        both addresses."""
        sink = await start_sink(self, "127.0.0.2")
        relay = await start_relay_on_dns(
            self,
            {"cap.test": {"MX": [(10, "mx.cap.test")]}, "mx.cap.test": {"A": ["127.0.0.2"]}},
            sink.addresses[0][1],
            provider={"capped": {
                "mx_suffixes": ["cap.test"], "max_connections": 4,
                "max_connections_per_source": 1,
                "messages_per_connection": 2,
            }},
            egress={"source": [
                {"name": "ip10", "address": "127.0.0.10"},
                {"name": "ip11", "address": "127.0.0.11"},
            ]},
        )
        recipients = [f"user{n}@cap.test" for n in range(60)]
        await in_thread(submit_many, relay.ports["relay"], recipients, b"Subject: c\r\n\r\nx\r\n")
        await sink.wait_for(60, timeout=60)
        by_peer = sink.stats.max_concurrent_by_peer
        log.info("most connections at once per source: {by_peer}", by_peer=by_peer)
        self.assertEqual(set(by_peer), {"127.0.0.10", "127.0.0.11"})
        self.assertEqual(max(by_peer.values()), 1)
        self.assertGreaterEqual(sink.stats.connections, 30)


async def start_relay_on_dns(
    testcase: Any, records: dict[str, dict[str, Any]], mx_port: int, **sections: Any
) -> Any:
    """Serve ``records`` from a test DNS server and start a relay (one trusted-network
    listener) that resolves through it and delivers to ``mx_port``; both are stopped
    in the test's cleanup."""
    dns_port, stop_dns = start_dns(records)
    testcase.addCleanup(stop_dns)
    return await start_relay(
        testcase,
        [RELAY_LISTENER],
        delivery={"mx_port": mx_port},
        dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
        **sections,
    )


async def outcome(relay: Any, recipient: str, timeout: float = 15.0) -> Any:
    """The first delivered or deferred event of ``recipient``."""
    for _ in range(int(timeout / 0.1)):
        for kind in ("delivered", "deferred"):
            page = await relay.stores.eventlog.search(EventQuery(recipient=recipient, type=kind))
            if page.events:
                return page.events[0]
        await deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"no outcome for {recipient} within {timeout} s")


class RuleRoutingTests(unittest.TestCase):
    """[[route]] rules by tag and stream, a route's egress pool, warmup caps."""

    async def test_routes_by_tag_and_stream(self) -> None:
        """Tagged mail goes through the pool from the route's warming egress pool,
        never beyond its daily cap; mail of the sandbox stream is simulated."""
        sink = await start_sink(self, "127.0.0.3")
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        relay = await start_relay(
            self,
            [RELAY_LISTENER],
            pool={"relays": {"endpoints": [f"127.0.0.3:{sink.addresses[0][1]}"]}},
            route=[
                {"match": {"stream": "sandbox"}, "via": "simulator"},
                {"match": {"tag": ["relay-me"]}, "via": "pool:relays", "egress_pool": "warm"},
            ],
            egress={
                "source": [
                    {"name": "ip10", "address": "127.0.0.10"},
                    {"name": "ip11", "address": "127.0.0.11", "pool": "warm",
                     "warmup": {"start": today, "daily": [3, 10]}},
                ]
            },
        )
        tagged = b"X-Sendarix-Tags: relay-me\r\nSubject: tagged\r\n\r\nhello\r\n"
        recipients = [f"r{n}@any.test" for n in range(5)]
        await in_thread(submit_many, relay.ports["relay"], recipients, tagged)
        sandbox = b"X-Sendarix-Stream: sandbox\r\nSubject: sandbox\r\n\r\nhello\r\n"
        await in_thread(submit, relay.ports["relay"], SENDER, ["success@any.test"], sandbox)
        simulated = await wait_event(relay, "success@any.test", "delivered")
        self.assertEqual(simulated.mx, "simulator")
        # The simulator sends from no egress source (no address, no warmup count).
        self.assertIsNone(simulated.source_ip)
        outcomes = [await outcome(relay, r) for r in recipients]
        delivered = [e for e in outcomes if e.type == "delivered"]
        deferred = [e for e in outcomes if e.type == "deferred"]
        self.assertEqual((len(delivered), len(deferred)), (3, 2))
        self.assertEqual({e.source_ip for e in delivered}, {"127.0.0.11"})
        self.assertEqual({m.peer for m in sink.messages}, {"127.0.0.11"})
        self.assertEqual(len(sink.messages), 3)
        for e in deferred:
            assert e.response is not None
            self.assertIn("warmup", e.response.text)


    async def test_tenant_egress_pool(self) -> None:
        """A tenant's egress_pool picks the addresses its mail leaves from; other
        tenants use pool "default"."""
        sink = await start_sink(self, "127.0.0.3")
        acme = dict(RELAY_LISTENER, name="acme", tenant="acme")
        relay = await start_relay(
            self,
            [RELAY_LISTENER, acme],
            pool={"relays": {"endpoints": [f"127.0.0.3:{sink.addresses[0][1]}"]}},
            route=[{"via": "pool:relays"}],
            egress={"source": [
                {"name": "ip10", "address": "127.0.0.10"},
                {"name": "ip11", "address": "127.0.0.11", "pool": "acme-ips"},
            ]},
            tenant={"acme": {"egress_pool": "acme-ips"}},
        )
        await in_thread(submit, relay.ports["acme"], SENDER, ["a@any.test"])
        await in_thread(submit, relay.ports["relay"], SENDER, ["d@any.test"])
        from_acme = await wait_event(relay, "a@any.test", "delivered")
        from_default = await wait_event(relay, "d@any.test", "delivered")
        self.assertEqual((from_acme.tenant, from_acme.source_ip), ("acme", "127.0.0.11"))
        self.assertEqual((from_default.tenant, from_default.source_ip), ("default", "127.0.0.10"))


class RestartTests(unittest.TestCase):
    """Warmup counts and marks survive a restart of the node."""

    async def test_warmup_cap_holds_across_restart(self) -> None:
        """A warming source that sent its 3 messages for today sends nothing more after
        the node restarts on the same directory: the next message is deferred."""
        sink = await start_sink(self, "127.0.0.3")
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        sections: dict[str, Any] = {
            "pool": {"relays": {"endpoints": [f"127.0.0.3:{sink.addresses[0][1]}"]}},
            "route": [{"via": "pool:relays"}],
            "egress": {"source": [
                {"name": "ip11", "address": "127.0.0.11",
                 "warmup": {"start": today, "daily": [3, 10]}},
            ]},
        }
        directory = self.mktemp()
        first = await Relay(directory, [RELAY_LISTENER], **sections).start()
        try:
            recipients = [f"r{n}@any.test" for n in range(3)]
            await in_thread(submit_many, first.ports["relay"], recipients)
            for r in recipients:
                self.assertEqual((await outcome(first, r)).type, "delivered")
        finally:
            await first.stop()
        second = await Relay(directory, [RELAY_LISTENER], **sections).start()
        self.addCleanup(second.stop)
        await in_thread(submit, second.ports["relay"], SENDER, ["late@any.test"])
        event = await outcome(second, "late@any.test")
        self.assertEqual(event.type, "deferred")
        assert event.response is not None
        self.assertIn("warmup", event.response.text)
        self.assertEqual(len(sink.messages), 3)


class TenantRateTests(unittest.TestCase):
    """[tenant.NAME] rate limits submissions at MAIL."""

    async def test_tenant_rate(self) -> None:
        """With rate = "2/min", the third message of the minute gets 450 4.7.1."""
        relay = await start_relay(self, [RELAY_LISTENER], tenant={"default": {"rate": "2/min"}})

        def three() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", relay.ports["relay"], timeout=30) as s:
                s.sendmail(SENDER, ["a@simulator.sendarix.invalid"], BODY)
                s.sendmail(SENDER, ["b@simulator.sendarix.invalid"], BODY)
                try:
                    s.sendmail(SENDER, ["c@simulator.sendarix.invalid"], BODY)
                except smtplib.SMTPSenderRefused as e:
                    return e.smtp_code, e.smtp_error
            return 250, b""

        code, text = await in_thread(three)
        self.assertEqual(code, 450)
        self.assertTrue(text.startswith(b"4.7.1"), text)


class PoolAuthTests(unittest.TestCase):
    """A pool endpoint's AUTH credentials are sent with AUTH PLAIN inside TLS."""

    async def start(self, password: str) -> tuple[SinkServer, Any]:
        ca = TestCA(self.mktemp())
        cert, key = ca.issue("smarthost.test")
        sink = SinkServer(
            SinkOptions(
                listen=("tcp:0:interface=127.0.0.3",), hostname="smarthost.test",
                idle_timeout=0, certificate=cert, key=key, auth=("relay", "s3cret"),
            ),
            reactor,
        )
        await sink.start()
        self.addCleanup(sink.stop)
        os.environ["SENDARIX_TEST_RELAY_PW"] = password
        self.addCleanup(os.environ.pop, "SENDARIX_TEST_RELAY_PW", None)
        relay = await start_relay(
            self,
            [RELAY_LISTENER],
            pool={
                "auth": {
                    "endpoints": [{"host": "127.0.0.3", "port": sink.addresses[0][1]}],
                    "tls": "required",
                    "username": "relay",
                    "password_env": "SENDARIX_TEST_RELAY_PW",
                }
            },
            route=[{"via": "pool:auth"}],
        )
        return sink, relay

    async def test_auth(self) -> None:
        """The smarthost sees the message from the authenticated user, over TLS."""
        sink, relay = await self.start("s3cret")
        await in_thread(submit, relay.ports["relay"], SENDER, ["user@anywhere.test"])
        (message,) = await sink.wait_for(1)
        self.assertEqual(message.auth_user, "relay")
        self.assertIsNotNone(message.tls)
        event = await wait_event(relay, "user@anywhere.test", "delivered")
        self.assertIsNotNone(event.tls)

    async def test_wrong_password_defers(self) -> None:
        """A refused AUTH defers the mail (our configuration is wrong), never
        bounces it."""
        sink, relay = await self.start("wrong")
        await in_thread(submit, relay.ports["relay"], SENDER, ["user@anywhere.test"])
        event = await wait_event(relay, "user@anywhere.test", "deferred")
        assert event.response is not None
        self.assertEqual(event.response.enhanced, "4.7.8")
        self.assertEqual(len(sink.messages), 0)
