"""Prometheus metrics of one process: outcomes counted from the events, queue depth
sampled from the spool, HTTP requests counted by the API, and what the delivery agent
knows about sites, smarthost endpoints and egress sources read when scraped.

Each :class:`Metrics` owns its registry (never prometheus-client's global one), so
several nodes in one process (tests, embedding applications) keep apart.  The worker
processes of one node each count their own, and the one answering a scrape merges
them all (:mod:`sendarix.events.metricsmerge`): each gauge family has its rule for
that in :data:`GAUGE_RULES`.  Several nodes each expose their own, and Prometheus
adds them up.

Label values are bounded, so no client and no recipient can grow a scrape without
limit:

* ``provider`` is a name from the provider table (built in plus ``[provider.NAME]``),
  else ``other``;
* ``site`` is such a provider name or ``pool:NAME`` of a configured pool, else
  ``other`` (an ``mx:`` rollup of some recipient domain's MX hosts is never a value);
* ``tenant`` is a configured tenant (``[tenant.NAME]``, a listener's ``tenant``) or
  ``default``, else ``other``;
* ``listener`` is a configured listener's name or ``api``, else ``other``;
* ``source``, ``pool`` and ``endpoint`` come from the configuration only;
* every other label (``outcome``, ``category``, ``status``, ``result``, ``route``,
  ``code``, ``filter``, ``action``) has a fixed set of values or comes from a fixed
  set in the code calling.

Everything here runs on the reactor thread; so does the rendering (see
:mod:`sendarix.control.api.operations`), so a scrape sees consistent figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.events.metricsmerge import GaugeRule
from sendarix.ingress.queueid import is_queue_id, queue_id_time
from sendarix.interfaces import IDeliveryObserver, IEventSink, ISpool
from sendarix.model.event import Event
from sendarix.model.message import QueueStats, RecipientStatus
from sendarix.stores.errors import StoreUnavailable

log = Logger()

#: The label value of everything outside the known names.
OTHER = "other"

#: The listener name of messages sent through the HTTP API.
API_LISTENER = "api"

#: Event types counted as outcomes (``accepted`` has its own counter).
OUTCOMES = ("delivered", "deferred", "bounced", "expired", "suppressed", "rejected",
            "complained", "cancelled")  # fmt: skip

#: Results of one webhook POST: the endpoint took it, it failed and will be retried,
#: or it failed for the last time and went to the dead-letter list.
WEBHOOK_RESULTS = ("delivered", "failed", "dead_lettered")

#: A content filter's actions (rspamd's, ``accept`` and ``error``); others count as ``other``.
FILTER_ACTIONS = (
    "accept", "no action", "greylist", "add header", "rewrite subject", "soft reject",
    "reject", "error",
)

#: The breaker states of a smarthost endpoint (``sendarix.routing.pool``).
ENDPOINT_STATES = ("closed", "half-open", "open")

#: Upper bounds (seconds) of the delivery latency histogram: from a second to three days.
LATENCY_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                   7200.0, 21600.0, 86400.0, 259200.0)  # fmt: skip

#: Upper bounds (seconds) of the throttle wait histogram.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: How the readings of each gauge family of the worker processes of one node make
#: the node's (see :class:`~sendarix.events.metricsmerge.GaugeRule`).  A new gauge
#: family gets its rule here; one without a rule is added up.
GAUGE_RULES: Mapping[str, GaugeRule] = {
    # Sampled from the spool every worker shares: the same reading, a few seconds apart.
    "sendarix_queue_recipients": GaugeRule.MAX,
    "sendarix_queue_messages": GaugeRule.MAX,
    "sendarix_queue_oldest_age_seconds": GaugeRule.MAX,
    # Every worker's guard reads the same shared statistics and holds.
    "sendarix_tenant_held": GaugeRule.MAX,
    "sendarix_tenant_provider_held": GaugeRule.MAX,
    # 1 when any worker has the site paused, or sees the endpoint in that state.
    "sendarix_site_suspended": GaugeRule.MAX,
    "sendarix_pool_endpoint_state": GaugeRule.MAX,
    # Connections a worker has open and deliveries it queued are its own.
    "sendarix_site_connections": GaugeRule.SUM,
    "sendarix_site_ready": GaugeRule.SUM,
    # The site's adaptive window and rate, and a source's configured warmup cap, are
    # the site's whole figures in every worker (the throttle applies each worker's
    # part), so adding them up would show N times the site's limit.
    "sendarix_site_window": GaugeRule.MAX,
    "sendarix_site_rate_per_second": GaugeRule.MAX,
    "sendarix_egress_warmup_cap": GaugeRule.MAX,
    # Each worker's own sends on SQLite; the cluster's count, read by each, on Redis.
    "sendarix_egress_sent_today": GaugeRule.PARTS,
}

#: A callable returning what the delivery agent knows about sites, pools and egress
#: sources (``DeliveryService.routing_state``: the routing state file's content).
RoutingState = Callable[[], Mapping[str, Any]]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("sendarix")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


@implementer(IDeliveryObserver)
@define
class Metrics:
    """The metric families of one process, in their own registry.

    The ``providers``, ``pools``, ``tenants`` and ``listeners`` sets are the names that
    may appear as label values; anything else is counted as ``other``.
    """

    #: Provider names that may appear as label values (the provider table).
    providers: frozenset[str] = frozenset()
    #: Tenant names that may appear as label values (configured ones, ``default``).
    tenants: frozenset[str] = frozenset()
    #: Listener names that may appear as label values (``api`` always may).
    listeners: frozenset[str] = frozenset()
    #: Smarthost pool names (a site ``pool:NAME`` is a label value when NAME is one).
    pools: frozenset[str] = frozenset()
    #: This process's node name (``<name>-wI`` for worker I), in the build info.
    node: str = ""
    registry: CollectorRegistry = field(factory=CollectorRegistry, init=False)
    accepted: Counter = field(init=False)
    received: Counter = field(init=False)
    outcomes: Counter = field(init=False)
    bounces: Counter = field(init=False)
    latency: Histogram = field(init=False)
    queue_recipients: Gauge = field(init=False)
    queue_messages: Gauge = field(init=False)
    queue_oldest: Gauge = field(init=False)
    outbound_connections: Counter = field(init=False)
    throttle_waits: Histogram = field(init=False)
    http_requests: Counter = field(init=False)
    feedback_reports: Counter = field(init=False)
    tenants_held: Gauge = field(init=False)
    tenant_providers_held: Gauge = field(init=False)
    _held_pairs: set[tuple[str, str]] = field(factory=set, init=False)
    webhook_deliveries: Counter = field(init=False)
    filter_decisions: Counter = field(init=False)
    #: Labelled children already looked up, by family and label values.
    _children: dict[tuple[int, tuple[str, ...]], Any] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        Info("sendarix_build", "Sendarix build information", registry=r).info(
            {"version": _version(), "node": self.node}
        )
        self.accepted = Counter(
            "sendarix_messages_accepted", "Messages accepted into the spool",
            ["tenant"], registry=r,
        )
        self.received = Counter(
            "sendarix_messages_received", "Messages taken in, by listener (api: HTTP)",
            ["listener", "tenant"], registry=r,
        )
        self.outcomes = Counter(
            "sendarix_outcomes", "Outcome events per recipient (delivered, deferred, ...)",
            ["outcome", "provider", "tenant"], registry=r,
        )
        self.bounces = Counter(
            "sendarix_bounces", "Bounced recipients by bounce category",
            ["provider", "category"], registry=r,
        )
        self.latency = Histogram(
            "sendarix_delivery_latency_seconds",
            "Seconds from a message's arrival to a recipient's delivery",
            ["provider"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_recipients = Gauge(
            "sendarix_queue_recipients", "Recipients in the spool by status",
            ["status"], registry=r,
        )
        self.queue_messages = Gauge(
            "sendarix_queue_messages", "Messages in the spool", registry=r
        )
        self.queue_oldest = Gauge(
            "sendarix_queue_oldest_age_seconds",
            "Age of the oldest message in the spool (0 when empty)", registry=r,
        )
        self.outbound_connections = Counter(
            "sendarix_outbound_connections",
            "Outbound connections tried, by site and result (session or failed)",
            ["site", "result"], registry=r,
        )
        self.throttle_waits = Histogram(
            "sendarix_throttle_wait_seconds",
            "Seconds a message waited for its site's rate before it was sent",
            ["site"], buckets=WAIT_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "sendarix_http_requests", "HTTP API requests by route and status code",
            ["route", "code"], registry=r,
        )
        self.tenants_held = Gauge(
            "sendarix_tenant_held", "1 while a tenant's outgoing mail is held (complaint rate)",
            ["tenant"], registry=r,
        )
        self.tenant_providers_held = Gauge(
            "sendarix_tenant_provider_held",
            "1 while a tenant's mail to one provider is held (complaint rate there)",
            ["tenant", "provider"], registry=r,
        )
        self.feedback_reports = Counter(
            "sendarix_feedback_reports", "Mail to the feedback domains by result",
            ["result"], registry=r,
        )
        self.webhook_deliveries = Counter(
            "sendarix_webhook_deliveries", "Webhook POSTs by result",
            ["result"], registry=r,
        )
        self.filter_decisions = Counter(
            "sendarix_filter_decisions", "Content-filter decisions by filter and action",
            ["filter", "action"], registry=r,
        )

    # -- label values ----------------------------------------------------------------

    def provider_label(self, provider: str | None) -> str:
        """``provider`` when it is in the provider table, else ``other``."""
        return provider if provider in self.providers else OTHER

    def tenant_label(self, tenant: str | None) -> str:
        """``tenant`` when it is configured (or ``default``), else ``other``."""
        return tenant if tenant in self.tenants else OTHER

    def listener_label(self, listener: str | None) -> str:
        """``listener`` when it is a configured listener or ``api``, else ``other``."""
        if listener == API_LISTENER or listener in self.listeners:
            return listener  # type: ignore[return-value]
        return OTHER

    def site_label(self, site: str | None) -> str:
        """A provider name or ``pool:NAME`` of a configured pool, else ``other``."""
        if site is None:
            return OTHER
        if site in self.providers:
            return site
        if site.startswith("pool:") and site[5:] in self.pools:
            return site
        return OTHER

    def _child(self, family: Any, *values: str) -> Any:
        """``family.labels(*values)``, looked up once: prometheus-client checks the
        values and takes a lock on every ``labels`` call, and the event path calls it
        several times per message."""
        key = (id(family), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    # -- recording ---------------------------------------------------------------------

    def observe_event(self, event: Event) -> None:
        """Count one event (and a delivery's latency)."""
        tenant = self.tenant_label(event.tenant)
        if event.type == "accepted":
            self._child(self.accepted, tenant).inc()
            return
        if event.type not in OUTCOMES:
            return
        provider = self.provider_label(event.provider)
        count = max(1, len(event.all_recipients()))
        self._child(self.outcomes, event.type, provider, tenant).inc(count)
        if event.type == "bounced":
            self._child(self.bounces, provider, event.bounce_category or "unknown").inc(count)
        elif event.type == "delivered" and event.queue_id and is_queue_id(event.queue_id):
            # The queue id says when the message arrived (to the millisecond).
            seconds = max(0.0, event.timestamp - queue_id_time(event.queue_id))
            histogram = self._child(self.latency, provider)
            for _ in range(count):
                histogram.observe(seconds)

    def message_received(self, listener: str, tenant: str) -> None:
        """A message was taken into the spool through ``listener``."""
        self._child(self.received, self.listener_label(listener), self.tenant_label(tenant)).inc()

    def set_queue(self, stats: QueueStats) -> None:
        """Queue depth from the spool's figures (statuses that vanished go to 0)."""
        self.queue_messages.set(stats.messages)
        for status in RecipientStatus:
            self.queue_recipients.labels(status.value).set(
                stats.by_status.get(status.value, 0)
            )

    def set_oldest_age(self, seconds: float) -> None:
        """The age of the oldest spooled message (0 for an empty spool)."""
        self.queue_oldest.set(max(0.0, seconds))

    def outbound_connection(self, site: str, ok: bool) -> None:
        """An outbound connection to ``site`` held a session (``ok``) or did not."""
        result = "session" if ok else "failed"
        self._child(self.outbound_connections, self.site_label(site), result).inc()

    def throttle_wait(self, site: str, seconds: float) -> None:
        """A message for ``site`` waited ``seconds`` for the site's rate."""
        self._child(self.throttle_waits, self.site_label(site)).observe(max(0.0, seconds))

    def set_held_tenants(self, held: Mapping[str, str]) -> None:
        """Which holds are in force now (keys: a tenant, or ``tenant/provider``); the
        tenants and pairs not held are shown 0."""
        tenants = {k for k in held if "/" not in k}
        for tenant in self.tenants | tenants:
            self.tenants_held.labels(self.tenant_label(tenant)).set(
                1 if tenant in tenants else 0)
        pairs = {(t, p) for t, _, p in (k.partition("/") for k in held if "/" in k)}
        for tenant, provider in pairs | self._held_pairs:
            self.tenant_providers_held.labels(
                self.tenant_label(tenant), self.provider_label(provider)
            ).set(1 if (tenant, provider) in pairs else 0)
        self._held_pairs |= pairs

    def feedback_report(self, result: str) -> None:
        """A report read (``recorded``) or ``dropped``."""
        self.feedback_reports.labels("dropped" if result.startswith("dropped") else
                                     "recorded").inc()

    def http_request(self, route: str, code: int) -> None:
        """One API request answered (``route`` is the route's name, never a path)."""
        self._child(self.http_requests, route, str(code)).inc()

    def webhook_delivery(self, result: str) -> None:
        """One webhook POST ended with ``result`` (see :data:`WEBHOOK_RESULTS`)."""
        self.webhook_deliveries.labels(result if result in WEBHOOK_RESULTS else OTHER).inc()

    def filter_decision(self, name: str, action: str) -> None:
        """Content filter ``name`` decided ``action`` (rspamd's words, or ``error``)."""
        known = action if action in FILTER_ACTIONS else OTHER
        self.filter_decisions.labels(name, known).inc()

    def watch_routing(self, state: RoutingState) -> None:
        """Read ``state`` at each scrape for the site, endpoint and egress families
        (see :class:`RoutingCollector`)."""
        self.registry.register(RoutingCollector(self, state))


# -- the delivery agent's state, read when scraped -------------------------------------


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


@define(eq=False)
class RoutingCollector:
    """Families made from the delivery agent's routing state at scrape time.

    Sites outside the known names are added up under ``other`` (connections, queued,
    rate-limit signals) or left out (the current rate, which only providers with a
    rate limit have).
    """

    metrics: Metrics
    state: RoutingState

    def describe(self) -> list[Metric]:
        """Nothing to check at registration (the families depend on the traffic)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families, from one reading of the state."""
        try:
            state = self.state()
        except Exception:
            log.failure("the routing state could not be read for the metrics")
            return
        yield from self._sites(state.get("sites", ()))
        yield from self._pools(state.get("pools", {}))
        yield from self._egress(state.get("egress", ()))

    def _sites(self, sites: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
        label = self.metrics.site_label
        open_ = _gauge("sendarix_site_connections", "Outbound connections open by site",
                       ["site"])
        queued = _gauge("sendarix_site_ready", "Deliveries routed and waiting for a "
                        "connection by site", ["site"])
        window = _gauge("sendarix_site_window", "Connections a site may have open now "
                        "(its adaptive concurrency window)", ["site"])
        rate = _gauge("sendarix_site_rate_per_second", "Messages per second a site "
                      "allows now (its adaptive rate; sites with a rate limit only)",
                      ["site"])
        suspended = _gauge("sendarix_site_suspended", "1 while a site is paused after "
                           "refusing every connection", ["site"])
        throttled = CounterMetricFamily(
            "sendarix_site_throttled", "Rate-limit signals (421, 4.7.x) received by site",
            labels=["site"],
        )
        sums: dict[str, dict[str, float]] = {}
        for s in sites:
            site = label(s.get("site"))
            acc = sums.setdefault(site, {"open": 0, "queued": 0, "window": 0,
                                         "suspended": 0, "throttled": 0})
            acc["open"] += s.get("open", 0) or 0
            acc["queued"] += s.get("queued", 0) or 0
            acc["window"] += s.get("window", 0) or 0
            acc["throttled"] += s.get("throttled", 0) or 0
            if s.get("suspended_until") is not None:
                acc["suspended"] = 1
            if site != OTHER and s.get("rate") is not None and s.get("period"):
                rate.add_metric([site], float(s["rate"]) / float(s["period"]))
        for site, acc in sorted(sums.items()):
            open_.add_metric([site], acc["open"])
            queued.add_metric([site], acc["queued"])
            window.add_metric([site], acc["window"])
            suspended.add_metric([site], acc["suspended"])
            throttled.add_metric([site], acc["throttled"])
        yield from (open_, queued, window, rate, suspended, throttled)

    def _pools(self, pools: Mapping[str, Mapping[str, str]]) -> Iterator[Metric]:
        family = _gauge(
            "sendarix_pool_endpoint_state",
            "Smarthost endpoint health: 1 for the breaker's current state "
            "(closed: healthy, open: resting after a failure, half-open: on probation)",
            ["pool", "endpoint", "state"],
        )
        for pool, endpoints in sorted(pools.items()):
            if pool not in self.metrics.pools:
                continue
            for endpoint, current in sorted(endpoints.items()):
                for state in ENDPOINT_STATES:
                    family.add_metric([pool, endpoint, state], 1.0 if current == state else 0.0)
        yield family

    def _egress(self, sources: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
        sent = _gauge("sendarix_egress_sent_today", "Messages an egress source sent today "
                      "(UTC) by site, counted against its warmup cap", ["source", "site"])
        cap = _gauge("sendarix_egress_warmup_cap", "Messages an egress source may send "
                     "per site today under its warmup schedule", ["source"])
        label = self.metrics.site_label
        for source in sources:
            name = str(source.get("name"))
            by_site: dict[str, float] = {}
            for site, n in (source.get("sent_today") or {}).items():
                key = label(site)
                by_site[key] = by_site.get(key, 0) + n
            for site, n in sorted(by_site.items()):
                sent.add_metric([name, site], n)
            if source.get("warmup_cap") is not None:
                cap.add_metric([name], float(source["warmup_cap"]))
        yield from (sent, cap)


# -- sinks and samplers ------------------------------------------------------------


@implementer(IEventSink)
@define
class MetricsSink:
    """An event sink that counts every event into :class:`Metrics`."""

    metrics: Metrics

    def emit(self, event: Event) -> None:
        """Count ``event``."""
        self.metrics.observe_event(event)


@define
class QueueSampler:
    """Samples the spool's queue depth and its oldest message's age into the gauges
    every ``interval`` seconds of ``clock``; a spool that does not answer leaves the
    gauges as they were (and says so in the log)."""

    metrics: Metrics
    spool: ISpool
    clock: Any
    interval: float = 15.0
    _loop: LoopingCall | None = field(default=None, init=False)

    def start(self) -> None:
        """Sample now and then every ``interval`` seconds."""
        self._loop = LoopingCall(self.sample)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("queue sampling stopped", f)
        )

    def stop(self) -> None:
        """Stop sampling."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def sample(self) -> Deferred[None]:
        """One sample; fires when it is recorded (never fails)."""
        return Deferred.fromCoroutine(self._sample())

    async def _sample(self) -> None:
        try:
            stats = await self.spool.stats()
            # Queue ids sort by arrival, and finished messages leave the spool: the
            # first one listed is the oldest still waiting.
            first = await self.spool.list_messages(limit=1)
        except StoreUnavailable as e:
            log.warn("queue depth not sampled: {why}", why=e)
            return
        except Exception:
            log.failure("queue depth not sampled")
            return
        self.metrics.set_queue(stats)
        oldest = first[0].meta.received_at if first else None
        self.metrics.set_oldest_age(
            0.0 if oldest is None else self.clock.seconds() - oldest
        )


def label_sets(values: Iterable[str | None]) -> frozenset[str]:
    """Label values from names (None and empty names dropped)."""
    return frozenset(v for v in values if v)
