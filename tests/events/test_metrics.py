"""Metrics counted from events, the delivery agent's state and the spool: label values
stay bounded, and each family moves when it should."""

from __future__ import annotations

import datetime
import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from sendarix.config.loader import parse_config
from sendarix.egress.sources import TieredSelector
from sendarix.events.metrics import Metrics, MetricsSink, QueueSampler
from sendarix.ingress.queueid import QueueIdGenerator
from sendarix.interfaces import IDeliveryObserver, IEventSink
from sendarix.model.event import Event
from sendarix.model.message import QueueStats, Reply
from sendarix.routing.mx import Hop
from sendarix.routing.pool import EndpointPool
from sendarix.routing.providers import ProviderTable
from sendarix.routing.shaping import Shaping
from sendarix.stores.sqlite.database import DatabaseClosed
from sendarix.stores.sqlite.spool import SQLiteSpool
from tests.support.spool_contract import T0, sample_message

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: Metrics) -> Samples:
    """Every sample of a scrape, by name and sorted labels (parsed from the text)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labelled(got: Samples, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly ``labels``."""
    return got[(name, tuple(sorted(labels.items())))]


def known_metrics() -> Metrics:
    return Metrics(
        providers=frozenset({"gmail"}), tenants=frozenset({"acme", "default"}),
        listeners=frozenset({"submission"}), pools=frozenset({"relay"}),
    )


class EventMetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = known_metrics()
        self.sink = MetricsSink(self.metrics)

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IEventSink, self.sink))
        self.assertTrue(verifyObject(IDeliveryObserver, self.metrics))

    def test_outcomes_and_bounces(self) -> None:
        self.sink.emit(Event.make("delivered", 1.0, tenant="acme", provider="gmail",
                                  recipient="a@gmail.com"))
        self.sink.emit(Event.make("bounced", 2.0, tenant="acme", provider="gmail",
                                  recipient="b@gmail.com", bounce_category="bad-mailbox",
                                  response=Reply(550, "5.1.1", "no")))
        self.sink.emit(Event.make("deferred", 2.0, tenant="nobody", provider="gmail",
                                  recipients=("c@gmail.com", "d@gmail.com")))
        self.sink.emit(Event.make("accepted", 0.5, tenant="acme", recipients=("a@x", "b@y")))
        got = samples(self.metrics)
        self.assertEqual(labelled(got, "sendarix_outcomes_total", outcome="delivered",
                                  provider="gmail", tenant="acme"), 1.0)
        self.assertEqual(labelled(got, "sendarix_outcomes_total", outcome="deferred",
                                  provider="gmail", tenant="other"), 2.0)
        self.assertEqual(labelled(got, "sendarix_bounces_total", category="bad-mailbox",
                                  provider="gmail"), 1.0)
        self.assertEqual(labelled(got, "sendarix_messages_accepted_total", tenant="acme"), 1.0)

    def test_delivery_latency_from_the_queue_id(self) -> None:
        """A delivery 90 s after the message arrived lands in the buckets from 120 s on;
        an event without a queue id observes nothing."""
        clock = Clock()
        clock.advance(T0)
        queue_id = QueueIdGenerator("node-a", clock).next()
        self.sink.emit(Event.make("delivered", T0 + 90.0, queue_id=queue_id,
                                  provider="gmail", recipient="a@gmail.com"))
        self.sink.emit(Event.make("delivered", T0 + 5.0, provider="gmail",
                                  recipient="b@gmail.com"))
        got = samples(self.metrics)
        name = "sendarix_delivery_latency_seconds_bucket"
        self.assertEqual(labelled(got, name, provider="gmail", le="60.0"), 0.0)
        self.assertEqual(labelled(got, name, provider="gmail", le="120.0"), 1.0)
        self.assertEqual(labelled(got, "sendarix_delivery_latency_seconds_count",
                                  provider="gmail"), 1.0)
        self.assertAlmostEqual(labelled(got, "sendarix_delivery_latency_seconds_sum",
                                        provider="gmail"), 90.0, places=2)

    def test_received_by_listener(self) -> None:
        self.metrics.message_received("submission", "acme")
        self.metrics.message_received("api", "acme")
        self.metrics.message_received("made-up", "made-up")
        got = samples(self.metrics)
        name = "sendarix_messages_received_total"
        self.assertEqual(labelled(got, name, listener="submission", tenant="acme"), 1.0)
        self.assertEqual(labelled(got, name, listener="api", tenant="acme"), 1.0)
        self.assertEqual(labelled(got, name, listener="other", tenant="other"), 1.0)

    def test_connections_waits_and_webhooks(self) -> None:
        self.metrics.outbound_connection("gmail", True)
        self.metrics.outbound_connection("mx:a.example.net", False)
        self.metrics.outbound_connection("pool:unknown", False)
        self.metrics.throttle_wait("gmail", 0.3)
        self.metrics.webhook_delivery("delivered")
        self.metrics.webhook_delivery("dead_lettered")
        self.metrics.webhook_delivery("teapot")
        got = samples(self.metrics)
        name = "sendarix_outbound_connections_total"
        self.assertEqual(labelled(got, name, site="gmail", result="session"), 1.0)
        self.assertEqual(labelled(got, name, site="other", result="failed"), 2.0)
        self.assertEqual(labelled(got, "sendarix_throttle_wait_seconds_bucket",
                                  site="gmail", le="0.25"), 0.0)
        self.assertEqual(labelled(got, "sendarix_throttle_wait_seconds_bucket",
                                  site="gmail", le="0.5"), 1.0)
        for result in ("delivered", "dead_lettered", "other"):
            self.assertEqual(labelled(got, "sendarix_webhook_deliveries_total",
                                      result=result), 1.0)

    def test_queue_gauges(self) -> None:
        self.metrics.set_queue(QueueStats(3, {"pending": 4, "deferred": 1}, {}))
        self.metrics.set_queue(QueueStats(1, {"pending": 1}, {}))
        self.metrics.set_oldest_age(12.5)
        got = samples(self.metrics)
        self.assertEqual(labelled(got, "sendarix_queue_messages"), 1.0)
        self.assertEqual(labelled(got, "sendarix_queue_recipients", status="deferred"), 0.0)
        self.assertEqual(labelled(got, "sendarix_queue_recipients", status="pending"), 1.0)
        self.assertEqual(labelled(got, "sendarix_queue_oldest_age_seconds"), 12.5)

    def test_build_info(self) -> None:
        names = {name for name, _ in samples(self.metrics)}
        self.assertIn("sendarix_build_info", names)

    @given(
        st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30),
        st.from_regex(r"[a-z0-9-]{1,20}\.(com|net|example)", fullmatch=True),
    )
    def test_labels_stay_bounded(self, provider: str, tenant: str, domain: str) -> None:
        """Whatever provider, tenant, listener or site an event or a call names, only
        known names or "other" become label values; a recipient domain never does."""
        metrics = known_metrics()
        metrics.observe_event(Event.make("deferred", 1.0, tenant=tenant, provider=provider,
                                         recipient=f"x@{domain}"))
        metrics.observe_event(Event.make("bounced", 1.0, tenant=tenant, provider=domain,
                                         recipient=f"x@{domain}"))
        metrics.message_received(domain, tenant)
        metrics.outbound_connection(domain, True)
        metrics.outbound_connection("mx:" + domain, True)
        metrics.throttle_wait(domain, 1.0)
        allowed = {
            "provider": {"gmail", "other"}, "tenant": {"acme", "default", "other"},
            "listener": {"submission", "api", "other"},
            "site": {"gmail", "pool:relay", "other"},
        }
        for _name, labels in samples(metrics):
            for key, value in labels:
                if key in allowed:
                    self.assertIn(value, allowed[key], key)
                self.assertNotIn(domain, value)


class RoutingStateTests(SynchronousTestCase):
    """The site, endpoint and egress families, from the state of real shaping, pool
    and egress-source objects, read at scrape time."""

    def setUp(self) -> None:
        self.config = parse_config({
            "pool": {"relay": {"endpoints": ["10.0.0.1:2525", "10.0.0.2"]}},
            "egress": {"source": [{"name": "ip1", "address": "192.0.2.1",
                                   "warmup": {"start": "2026-12-01", "daily": [50, 100]}}]},
        }, os.path.abspath(self.mktemp()))
        self.now = datetime.datetime(2026, 12, 2, 12, tzinfo=datetime.UTC).timestamp()
        self.today = datetime.date(2026, 12, 2)
        self.shaping = Shaping(ProviderTable.default(), self.config.delivery)
        self.pool = EndpointPool(self.config.pools["relay"])
        self.selector = TieredSelector(self.config.egress_sources)
        self.open: dict[str, int] = {}
        self.reads = 0
        self.metrics = known_metrics()
        self.metrics.watch_routing(self.state)

    def state(self) -> dict[str, Any]:
        """As DeliveryService.routing_state puts it together."""
        self.reads += 1
        sites = []
        for site, shape in sorted(self.shaping.sites.items()):
            entry = shape.describe(self.now)
            entry["queued"] = 2
            entry["open"] = self.open.get(site, 0)
            sites.append(entry)
        return {
            "sites": sites,
            "pools": {"relay": self.pool.states(self.now)},
            "egress": self.selector.snapshot(self.now, self.today),
        }

    def test_sites(self) -> None:
        gmail = self.shaping.get("gmail")
        gmail.throttled(self.now)
        self.shaping.get("mx:a.example.net|b.example.net").throttled(self.now)
        self.shaping.get("mx:c.example.org")
        self.open.update({"gmail": 3, "mx:a.example.net|b.example.net": 1,
                          "mx:c.example.org": 2})
        got = samples(self.metrics)
        self.assertEqual(self.reads, 1)
        self.assertEqual(labelled(got, "sendarix_site_connections", site="gmail"), 3.0)
        self.assertEqual(labelled(got, "sendarix_site_connections", site="other"), 3.0)
        self.assertEqual(labelled(got, "sendarix_site_ready", site="other"), 4.0)
        self.assertEqual(labelled(got, "sendarix_site_throttled_total", site="gmail"), 1.0)
        self.assertEqual(labelled(got, "sendarix_site_throttled_total", site="other"), 1.0)
        # 3000/min halved by the rate-limit signal.
        self.assertEqual(labelled(got, "sendarix_site_rate_per_second", site="gmail"), 25.0)
        self.assertNotIn(("sendarix_site_rate_per_second", (("site", "other"),)), got)
        self.assertEqual(labelled(got, "sendarix_site_suspended", site="gmail"), 0.0)
        for _name, labels in got:
            for _key, value in labels:
                self.assertNotIn("example", value)

    def test_endpoint_health(self) -> None:
        hop = Hop("10.0.0.1", "10.0.0.1", 2525, 10, endpoint="relay/10.0.0.1:2525")
        self.pool.failed(hop, self.now)
        got = samples(self.metrics)
        name = "sendarix_pool_endpoint_state"
        self.assertEqual(labelled(got, name, pool="relay", endpoint="relay/10.0.0.1:2525",
                                  state="open"), 1.0)
        self.assertEqual(labelled(got, name, pool="relay", endpoint="relay/10.0.0.1:2525",
                                  state="closed"), 0.0)
        self.assertEqual(labelled(got, name, pool="relay", endpoint="relay/10.0.0.2:25",
                                  state="closed"), 1.0)

    def test_warmup(self) -> None:
        for _ in range(3):
            self.selector.record_send("ip1", "gmail", self.today)
        self.selector.record_send("ip1", "mx:a.example.net", self.today)
        self.selector.record_send("ip1", "mx:b.example.net", self.today)
        got = samples(self.metrics)
        self.assertEqual(labelled(got, "sendarix_egress_sent_today", source="ip1",
                                  site="gmail"), 3.0)
        self.assertEqual(labelled(got, "sendarix_egress_sent_today", source="ip1",
                                  site="other"), 2.0)
        # Day 2 of the schedule (it started yesterday).
        self.assertEqual(labelled(got, "sendarix_egress_warmup_cap", source="ip1"), 100.0)

    def test_unreadable_state(self) -> None:
        """A state that cannot be read leaves those families out of the scrape; the
        rest still renders (and the failure is logged)."""

        def broken() -> dict[str, Any]:
            raise RuntimeError("no state")

        metrics = known_metrics()
        metrics.watch_routing(broken)
        metrics.outbound_connection("gmail", True)
        got = samples(metrics)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn(("sendarix_outbound_connections_total",
                       (("result", "session"), ("site", "gmail"))), got)
        self.assertFalse([name for name, _ in got if name.startswith("sendarix_site_")])


class QueueSamplerTests(TestCase):
    """Queue depth and the oldest message's age, sampled from a real SQLite spool on
    a task.Clock schedule."""

    async def test_depth_and_oldest_age(self) -> None:
        spool = SQLiteSpool.at_path(os.path.abspath(self.mktemp()), reactor)
        await spool.start()
        self.addCleanup(spool.stop)
        clock = Clock()
        clock.advance(T0 + 100.0)
        ids = QueueIdGenerator("node-a", clock)
        metrics = known_metrics()
        sampler = QueueSampler(metrics, spool, clock, interval=15.0)
        await sampler.sample()
        got = samples(metrics)
        self.assertEqual(labelled(got, "sendarix_queue_messages"), 0.0)
        self.assertEqual(labelled(got, "sendarix_queue_oldest_age_seconds"), 0.0)
        await spool.enqueue(sample_message(ids.next(), ("a@x.example", "b@y.example"),
                                           received_at=T0 + 10.0))
        clock.advance(1.0)
        await spool.enqueue(sample_message(ids.next(), received_at=T0 + 60.0))
        await sampler.sample()
        got = samples(metrics)
        self.assertEqual(labelled(got, "sendarix_queue_messages"), 2.0)
        self.assertEqual(labelled(got, "sendarix_queue_recipients", status="pending"), 3.0)
        self.assertEqual(labelled(got, "sendarix_queue_oldest_age_seconds"), 91.0)

    async def test_a_spool_that_fails_leaves_the_gauges(self) -> None:
        """The sample does not fail and the gauges keep their last values."""
        spool = SQLiteSpool.at_path(os.path.abspath(self.mktemp()), reactor)
        await spool.start()
        clock = Clock()
        clock.advance(T0 + 30.0)
        await spool.enqueue(sample_message(QueueIdGenerator("n", clock).next()))
        metrics = known_metrics()
        sampler = QueueSampler(metrics, spool, clock)
        await sampler.sample()
        await spool.stop()
        clock.advance(100.0)
        await sampler.sample()
        # Closed stores are unavailable stores: a warning, not a logged error.
        self.assertEqual(self.flushLoggedErrors(DatabaseClosed), [])
        got = samples(metrics)
        self.assertEqual(labelled(got, "sendarix_queue_messages"), 1.0)
        self.assertEqual(labelled(got, "sendarix_queue_oldest_age_seconds"), 30.0)

    def test_runs_on_the_clock(self) -> None:
        """start() samples at once and then every interval, until stop()."""
        calls: list[float] = []
        clock = Clock()

        class Counted(QueueSampler):
            def sample(self) -> Any:
                calls.append(clock.seconds())

        sampler = Counted(known_metrics(), SQLiteSpool.at_path(self.mktemp(), reactor),
                          clock, interval=15.0)
        sampler.start()
        clock.advance(15.0)
        clock.advance(15.0)
        sampler.stop()
        clock.advance(60.0)
        self.assertEqual(calls, [0.0, 15.0, 30.0])
