"""Metrics counted from events, without I/O: label values stay bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.events.metrics import Metrics, MetricsSink
from sendarix.interfaces import IEventSink
from sendarix.model.event import Event
from sendarix.model.message import QueueStats, Reply


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics(providers=frozenset({"gmail"}), tenants=frozenset({"acme"}))
        self.sink = MetricsSink(self.metrics)

    def test_sink_interface(self) -> None:
        self.assertTrue(verifyObject(IEventSink, self.sink))

    def test_outcomes_and_bounces(self) -> None:
        self.sink.emit(Event.make("delivered", 1.0, tenant="acme", provider="gmail",
                                  recipient="a@gmail.com"))
        self.sink.emit(Event.make("bounced", 2.0, tenant="acme", provider="gmail",
                                  recipient="b@gmail.com", bounce_category="bad-mailbox",
                                  response=Reply(550, "5.1.1", "no")))
        self.sink.emit(Event.make("accepted", 0.5, tenant="acme", recipients=("a@x", "b@y")))
        got = samples(self.metrics)
        self.assertEqual(got[("sendarix_outcomes_total", (
            ("outcome", "delivered"), ("provider", "gmail"), ("tenant", "acme")))], 1.0)
        self.assertEqual(got[("sendarix_bounces_total", (
            ("category", "bad-mailbox"), ("provider", "gmail")))], 1.0)
        self.assertEqual(got[("sendarix_messages_accepted_total", (("tenant", "acme"),))], 1.0)

    def test_queue_gauges(self) -> None:
        self.metrics.set_queue(QueueStats(3, {"pending": 4, "deferred": 1}, {}))
        self.metrics.set_queue(QueueStats(1, {"pending": 1}, {}))
        got = samples(self.metrics)
        self.assertEqual(got[("sendarix_queue_messages", ())], 1.0)
        self.assertEqual(got[("sendarix_queue_recipients", (("status", "deferred"),))], 0.0)

    @given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
    def test_labels_stay_bounded(self, provider: str, tenant: str) -> None:
        """Whatever provider or tenant an event names, only known names or "other"
        become label values."""
        metrics = Metrics(providers=frozenset({"gmail"}), tenants=frozenset({"acme"}))
        metrics.observe_event(Event.make("deferred", 1.0, tenant=tenant, provider=provider,
                                         recipient="x@example.com"))
        for _name, labels in samples(metrics):
            values = dict(labels)
            if "provider" in values:
                self.assertIn(values["provider"], {"gmail", "other"})
            if "tenant" in values:
                self.assertIn(values["tenant"], {"acme", "other"})
