"""The operations endpoints (``/metrics``, ``/healthz``, ``/readyz``) served by a real
twisted.web Site on loopback and read with a real HTTP client."""

from __future__ import annotations

import json
from typing import Any

import treq
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.python import threadable
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from sendarix.control.api.operations import HealthResource, MetricsResource, ReadyResource
from sendarix.events.metrics import Metrics, MetricsSink
from sendarix.model.event import Event


class ThreadRecorder:
    """A collector noting whether each collection ran on the reactor thread."""

    def __init__(self) -> None:
        self.in_reactor_thread: list[bool] = []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.in_reactor_thread.append(threadable.isInIOThread())
        return [GaugeMetricFamily("test_collected", "a test gauge", value=1.0)]


class OperationsTests(unittest.TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.metrics = Metrics(providers=frozenset({"gmail"}), tenants=frozenset({"acme"}))
        self.recorder = ThreadRecorder()
        self.metrics.registry.register(self.recorder)
        self.problems: list[str] = []
        root = Resource()
        root.putChild(b"metrics", MetricsResource(self.metrics))
        root.putChild(b"healthz", HealthResource())
        root.putChild(b"readyz", ReadyResource(self.check))
        self.check_result: Any = None
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"

    def check(self) -> Deferred[list[str]]:
        if self.check_result is not None:
            return self.check_result  # type: ignore[no-any-return]
        return succeed(list(self.problems))

    async def get(self, path: str) -> tuple[int, bytes, Any]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(self.base + path, pool=pool)
        return response.code, await response.content(), response.headers

    async def test_metrics_on_the_reactor_thread(self) -> None:
        """Counters fed through the sink show up with their labels; the registry is
        collected on the reactor thread; the content type is Prometheus text."""
        sink = MetricsSink(self.metrics)
        for recipient in ("a@gmail.com", "b@gmail.com"):
            sink.emit(Event.make("delivered", 1.0, tenant="acme", provider="gmail",
                                 recipient=recipient))
        sink.emit(Event.make("deferred", 1.0, tenant="acme", provider="mx.rare.example",
                             recipient="c@rare.example"))
        code, body, headers = await self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), [CONTENT_TYPE_LATEST])
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        self.assertEqual(got[("sendarix_outcomes_total", (
            ("outcome", "delivered"), ("provider", "gmail"), ("tenant", "acme")))], 2.0)
        self.assertEqual(got[("sendarix_outcomes_total", (
            ("outcome", "deferred"), ("provider", "other"), ("tenant", "acme")))], 1.0)
        self.assertNotIn(b"rare.example", body)
        self.assertEqual(self.recorder.in_reactor_thread, [True])

    async def test_health(self) -> None:
        code, body, _ = await self.get("/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))

    async def test_ready_and_not_ready(self) -> None:
        code, body, _ = await self.get("/readyz")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ready"))
        self.problems.append("submission is not listening")
        code, body, _ = await self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["problems"], ["submission is not listening"])

    async def test_check_that_fails_is_not_ready(self) -> None:
        self.check_result = Deferred()
        self.check_result.errback(RuntimeError("stores gone"))
        code, body, _ = await self.get("/readyz")
        self.assertEqual(code, 503)
        self.assertIn("stores gone", json.loads(body)["problems"][0])

    async def test_slow_check(self) -> None:
        """The answer waits for a check that answers later (the reactor keeps going)."""
        self.check_result = deferLater(reactor, 0.05, lambda: [])
        code, body, _ = await self.get("/readyz")
        self.assertEqual((code, json.loads(body)["status"]), (200, "ready"))
