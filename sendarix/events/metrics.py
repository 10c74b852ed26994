"""Prometheus metrics of one process: outcomes counted from the events, queue depth
sampled from the spool, HTTP requests counted by the API.

Each :class:`Metrics` owns its registry (never prometheus-client's global one), so
several nodes in one process (tests, embedding applications) keep apart; with several
worker processes or nodes, each exposes its own and Prometheus adds them up.  Label
values are bounded: a provider outside the provider table and a tenant that is not
configured are counted as ``other``, never as a raw recipient domain or a name a
client made up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.interfaces import IEventSink, ISpool
from sendarix.model.event import Event
from sendarix.model.message import QueueStats
from sendarix.stores.errors import StoreUnavailable

log = Logger()

OTHER = "other"

#: Event types counted as outcomes (``accepted`` has its own counter).
OUTCOMES = ("delivered", "deferred", "bounced", "expired", "suppressed", "rejected",
            "complained", "cancelled")  # fmt: skip


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sendarix")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


@define
class Metrics:
    """The metric families of one process, in their own registry."""

    #: Provider names that may appear as label values (the provider table).
    providers: frozenset[str] = frozenset()
    #: Tenant names that may appear as label values (configured ones, ``default``).
    tenants: frozenset[str] = frozenset()
    registry: CollectorRegistry = field(factory=CollectorRegistry, init=False)
    accepted: Counter = field(init=False)
    outcomes: Counter = field(init=False)
    bounces: Counter = field(init=False)
    queue_recipients: Gauge = field(init=False)
    queue_messages: Gauge = field(init=False)
    http_requests: Counter = field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        Info("sendarix_build", "Sendarix build information", registry=r).info(
            {"version": _version()}
        )
        self.accepted = Counter(
            "sendarix_messages_accepted", "Messages accepted into the spool",
            ["tenant"], registry=r,
        )
        self.outcomes = Counter(
            "sendarix_outcomes", "Outcome events per recipient (delivered, deferred, ...)",
            ["outcome", "provider", "tenant"], registry=r,
        )
        self.bounces = Counter(
            "sendarix_bounces", "Bounced recipients by bounce category",
            ["provider", "category"], registry=r,
        )
        self.queue_recipients = Gauge(
            "sendarix_queue_recipients", "Recipients in the spool by status",
            ["status"], registry=r,
        )
        self.queue_messages = Gauge(
            "sendarix_queue_messages", "Messages in the spool", registry=r
        )
        self.http_requests = Counter(
            "sendarix_http_requests", "HTTP API requests by route and status code",
            ["route", "code"], registry=r,
        )

    def provider_label(self, provider: str | None) -> str:
        return provider if provider in self.providers else OTHER

    def tenant_label(self, tenant: str | None) -> str:
        return tenant if tenant in self.tenants else OTHER

    def observe_event(self, event: Event) -> None:
        """Count one event."""
        tenant = self.tenant_label(event.tenant)
        if event.type == "accepted":
            self.accepted.labels(tenant).inc()
            return
        if event.type not in OUTCOMES:
            return
        provider = self.provider_label(event.provider)
        count = max(1, len(event.all_recipients()))
        self.outcomes.labels(event.type, provider, tenant).inc(count)
        if event.type == "bounced":
            self.bounces.labels(provider, event.bounce_category or "unknown").inc(count)

    def set_queue(self, stats: QueueStats) -> None:
        """Queue depth from the spool's figures (statuses that vanished go to 0)."""
        self.queue_messages.set(stats.messages)
        for status in ("pending", "deferred", "delivered", "bounced", "expired",
                       "suppressed"):
            self.queue_recipients.labels(status).set(stats.by_status.get(status, 0))

    def http_request(self, route: str, code: int) -> None:
        self.http_requests.labels(route, str(code)).inc()


@implementer(IEventSink)
@define
class MetricsSink:
    """An event sink that counts every event into :class:`Metrics`."""

    metrics: Metrics

    def emit(self, event: Event) -> None:
        self.metrics.observe_event(event)


@define
class QueueSampler:
    """Samples the spool's queue depth into the gauges every ``interval`` seconds."""

    metrics: Metrics
    spool: ISpool
    clock: Any
    interval: float = 15.0
    _loop: LoopingCall | None = field(default=None, init=False)

    def start(self) -> None:
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("queue sampling stopped", f)
        )

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def sample(self) -> Deferred[None]:
        d: Deferred[Any] = self.spool.stats()
        d.addCallback(self.metrics.set_queue)

        def failed(failure: Any) -> None:
            if failure.check(StoreUnavailable):
                log.warn("queue depth not sampled: {why}", why=failure.getErrorMessage())
            else:
                log.failure("queue depth not sampled", failure)

        return d.addErrback(failed)


def label_sets(values: Iterable[str | None]) -> frozenset[str]:
    """Label values from names (None dropped)."""
    return frozenset(v for v in values if v)
