"""Assembling a node: ``makeService(config)`` returns a MultiService.

Children start in order (stores, then listeners) and stop in reverse: listeners
close first, sessions finish their transaction or get 421, then the stores close.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    ensureDeferred,
    gatherResults,
    maybeDeferred,
)
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from sendarix.cleanup.filters import filter_chains
from sendarix.cleanup.intake import Intake
from sendarix.cleanup.keyring import DomainKeyring, check_keys_open
from sendarix.cleanup.reference import KEY_PURPOSE as REFERENCE_KEY_PURPOSE
from sendarix.cleanup.reference import verp_address
from sendarix.config.errors import ConfigError
from sendarix.config.loader import default_config
from sendarix.config.secret import NodeSecret, SecretError, node_secret_from_env
from sendarix.config.settings import Config, ListenerConfig, report_domains
from sendarix.control.api.operations import HealthResource, MetricsResource, ReadyResource
from sendarix.delivery.notify import DSNNotifier
from sendarix.delivery.service import DeliveryService
from sendarix.events.guard import ComplaintGuard
from sendarix.events.metrics import Metrics, MetricsSink, QueueSampler, label_sets
from sendarix.events.sinks import FanoutSink
from sendarix.events.stats import StatsSink
from sendarix.events.webhooks.directory import WebhookDirectory
from sendarix.events.webhooks.dispatcher import WebhookDispatcher, guarded_agent
from sendarix.events.webhooks.endpoints import KEY_PURPOSE as WEBHOOK_KEY_PURPOSE
from sendarix.events.webhooks.endpoints import endpoints_from_config
from sendarix.ingress.activity import IntakeActivity
from sendarix.ingress.auth import submission_portal
from sendarix.ingress.feedback import FeedbackHandler
from sendarix.ingress.server import ListenerSettings, SubmissionFactory
from sendarix.ingress.tls import ReloadableServerTLS, ensure_certificate
from sendarix.ingress.xoauth2 import HMACTokenChecker
from sendarix.interfaces import IAuthLimiter, IEgressSelector, IFailoverStrategy, IRouter, IThrottle
from sendarix.model.address import domain_of
from sendarix.model.message import LeasedDelivery
from sendarix.node.http import HTTPService, make_api_site
from sendarix.node.listening import PortService
from sendarix.routing.mx import DNSResolver, MXRouter
from sendarix.routing.pool import PoolRouter
from sendarix.routing.providers import ProviderTable
from sendarix.routing.state import state_path
from sendarix.routing.throttle import MemoryThrottle
from sendarix.scheduler.classify import BounceRules
from sendarix.stores.backends import Stores, open_stores, stored_keys_before_start
from sendarix.stores.errors import StoreUnavailable

log = Logger()

#: Seconds a stopping node lets sessions finish their transaction.
SHUTDOWN_GRACE = 30.0


class NodeService(MultiService):
    """The node: children start in order and stop in reverse, each after the one
    added after it has finished stopping (listeners drain before the stores close)."""

    #: The listeners' TLS options (None when no listener uses TLS).
    tls: ReloadableServerTLS | None = None
    #: The node's parts, for embedding applications and tests (set by makeService).
    stores: Stores
    delivery: DeliveryService
    listeners: list[ListenerService]
    #: The HTTP API (None when ``[api] enabled = false``).
    api: HTTPService | None = None
    #: The webhook dispatcher.
    webhooks: WebhookDispatcher | None = None
    #: Every webhook endpoint the node sends to (configured and added at run time).
    webhook_directory: WebhookDirectory
    #: This process's Prometheus metrics.
    metrics: Metrics
    #: ``/metrics`` of the HTTP API (None when ``[api] enabled = false``).
    metrics_resource: MetricsResource | None = None
    #: The complaint-rate guard (holds tenants' mail).
    guard: ComplaintGuard
    #: Install a SIGHUP handler that reloads the TLS certificate (twistd does).
    reload_on_sighup = False

    def startService(self) -> None:
        super().startService()
        if self.reload_on_sighup:
            self.install_sighup_handler()

    def install_sighup_handler(self) -> None:
        """Make SIGHUP reload the TLS certificate (on the reactor thread)."""
        import signal

        from twisted.internet import reactor

        def on_hup(signum: int, frame: Any) -> None:
            cast(IReactorFromThreads, reactor).callFromThread(self.reload_tls)

        signal.signal(signal.SIGHUP, on_hup)

    def reload_tls(self) -> bool:
        """Read the TLS certificate and key again: new sessions get them, sessions
        already running keep theirs.  False (and the old certificate kept) when the
        files cannot be loaded."""
        if self.tls is None:
            return False
        try:
            self.tls.reload()
        except Exception:
            log.failure("TLS certificate reload failed; keeping the current certificate")
            return False
        log.info("TLS certificate reloaded from {cert}", cert=self.tls.cert_path)
        return True

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("error stopping {name}", name=service.name)


class StoresService(Service):
    """Opens the stores on start, closes them on stop; ``ready`` fires once open."""

    name = "stores"

    def __init__(
        self, stores: Stores, clock: Any, checks: Sequence[Callable[[], Awaitable[None]]] = ()
    ) -> None:
        self.stores = stores
        self.clock = clock
        #: Run once the stores are open; a failure keeps the node from serving.
        self.checks = list(checks)
        self._trimmer: LoopingCall | None = None
        #: Called once the stores are open and checked.
        self.on_open: list[Callable[[], None]] = []
        #: Called when the service stops, before the stores close (a Deferred is
        #: waited for).
        self.on_stop: list[Callable[[], Any]] = []
        self._ready: Deferred[None] | None = None
        #: Why the stores did not open (every ``ready()`` then fails with it).
        self._failure: Failure | None = None

    def ready(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        assert self._ready is not None, "not started"

        def relay(result: Any) -> Any:
            if self._failure is not None:
                d.errback(self._failure)
            else:
                d.callback(None)
            return result

        self._ready.addBoth(relay)
        return d

    def startService(self) -> None:
        super().startService()
        self._ready = ensureDeferred(self._open_and_check())
        self._ready.addCallback(self._start_retention)
        self._ready.addErrback(self._failed)

    async def _open_and_check(self) -> None:
        await self.stores.open()
        for check in self.checks:
            await check()

    #: How often old events are trimmed from the delivery log.
    retention_interval = 3600.0

    def _start_retention(self, _: object) -> None:
        for start in self.on_open:
            start()
        self._trimmer = LoopingCall(self._trim)
        self._trimmer.clock = self.clock
        self._trimmer.start(self.retention_interval, now=True).addErrback(
            lambda f: log.failure("event retention stopped", f)
        )

    def _trim(self) -> Deferred[Any]:
        before = self.clock.seconds() - self.stores.config.events.retention
        # Hourly statistics are kept as long as the events they count; ended dashboard
        # sessions go too.  The jobs are queued now, so a stop that closes the stores
        # lets them finish.
        d = gatherResults(
            [self.stores.eventlog.trim(before), self.stores.stats.trim(before),
             self.stores.dashboard_sessions.expire(self.clock.seconds())],
            consumeErrors=True,
        ).addCallback(lambda counts: counts[0])
        d.addErrback(_first_failure)

        def trimmed(count: int) -> None:
            if count:
                log.info("trimmed {count} events older than the retention", count=count)

        d.addCallback(trimmed)
        d.addErrback(self._trim_failed)
        return d

    def _trim_failed(self, failure: Failure) -> None:
        if failure.check(StoreUnavailable):  # Redis down, or closing under the trim
            log.warn("trimming the event log failed: {why}", why=failure.getErrorMessage())
        else:
            log.failure("trimming the event log failed", failure)

    def _failed(self, failure: Failure) -> None:
        # Logged once here; each ready() caller gets the failure to handle itself (so
        # no Deferred is left holding an unhandled error).
        log.failure("could not open the stores", failure)
        self._failure = failure

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._trimmer is not None and self._trimmer.running:
            self._trimmer.stop()
        return ensureDeferred(self._stop_then_close())

    async def _stop_then_close(self) -> None:
        for stop in self.on_stop:
            try:
                await maybeDeferred(stop)
            except Exception:
                log.failure("error while stopping before the stores close")
        await self.stores.close()


def _return_path(config: Config, key: bytes, delivery: LeasedDelivery) -> str:
    """The envelope sender ``delivery`` goes out with: a VERP address at its tenant's
    ``return_path_domain`` (never for the null sender), else the sender as given."""
    sender = delivery.envelope.sender
    domain = config.tenant(delivery.meta.tenant).return_path_domain
    if not sender or domain is None:
        return sender
    return verp_address(key, delivery.queue_id, domain)


def _first_failure(failure: Failure) -> Failure:
    """The failure inside a gatherResults FirstError (or the failure itself)."""
    error = failure.value
    if isinstance(error, FirstError):
        inner: Failure = error.subFailure
        return inner
    return failure


class IntakeService(Service):
    """Stops once every message the intake accepted has been handed to delivery and
    its event emitted (the intake does both just after the client's answer).  Added
    before the listeners and the API, it stops after them (no new mail) and before
    delivery and the stores."""

    name = "intake"

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def stopService(self) -> Deferred[None]:  # noqa: N802
        super().stopService()
        return self.intake.settled()


class ListenerService(PortService):
    """One SMTP listener: listens once the stores are ready, drains on stop."""

    def __init__(
        self, reactor: Any, config: ListenerConfig, factory: SubmissionFactory,
        stores: StoresService, wrap_tls: Any = None, shared: bool = False,
    ) -> None:
        def describe(host: str, port: str) -> str:
            return (f"listener {config.name} on {host}:{port} "
                    f"(tls={config.tls}, auth={config.auth})")

        super().__init__(reactor, config.endpoint, factory, stores.ready, describe,
                         tls=wrap_tls, shared=shared)
        self.name = f"listener:{config.name}"
        self.factory: SubmissionFactory = factory

    def stopService(self) -> Deferred[Any]:  # noqa: N802
        stopped = super().stopService()
        return DeferredList(
            [stopped, self.factory.drain(SHUTDOWN_GRACE)], consumeErrors=True
        )


async def readiness(node: NodeService) -> list[str]:
    """What keeps ``node`` from being ready: stores that do not answer, listeners not
    listening (empty when ready)."""
    problems = [f"{lc.name} is not listening" for lc in node.listeners if lc.port is None]
    try:
        # A store question that always reaches the database (an answer about one
        # recipient may come from memory).
        await node.stores.suppressions.list(tenant="", limit=1)
    except Exception as e:  # noqa: BLE001 - any failure means "not ready"
        problems.append(f"the stores do not answer ({e.__class__.__name__})")
    return problems


def load_node_secret(config: Config, environ: Any = None) -> NodeSecret | None:
    """The node secret from the environment, checked against the stored DKIM keys.

    Raises ConfigError (naming ``node.secret_key_env``) when the secret is too short,
    when it is unset although encrypted keys exist, or when it does not decrypt them:
    the relay refuses to start rather than send unsigned mail.  Reads the SQLite file
    directly: this runs once, before the reactor does.
    """
    env = config.node.secret_key_env
    try:
        secret = node_secret_from_env(env, environ)
    except SecretError as e:
        raise ConfigError("node.secret_key_env", str(e)) from None
    stored = stored_keys_before_start(config)
    if stored is None:
        return secret
    count, sample = stored
    if count and secret is None:
        raise ConfigError(
            "node.secret_key_env",
            f"${env} is not set, but {count} DKIM private key(s) are stored encrypted "
            "with it: set it to the node secret used by 'sendarix domains add'",
        )
    if secret is not None and sample is not None:
        try:
            secret.decrypt(sample)
        except SecretError as e:
            raise ConfigError("node.secret_key_env", str(e)) from None
    return secret


def make_throttle(config: Config, reactor: Any = None, stores: Stores | None = None) -> IThrottle:
    """The node's :class:`IThrottle`: connection counts and message rates per site.

    Built by the stores' backend (for the cluster where the stores are shared, and
    stopped when they close); without stores, in memory.  Callers treat every answer
    as possibly a Deferred (``maybeDeferred``).
    """
    if stores is not None:
        return stores.make_throttle(config.node.name)
    return MemoryThrottle()


def make_auth_limiter(config: Config, stores: Stores) -> IAuthLimiter:
    """The AUTH failure limiter from ``[limits]``, counted wherever the stores' backend
    keeps shared limits (the cluster, or this process)."""
    limits = config.limits
    return stores.backend.auth_limiter(
        limits.auth_max_failures, limits.auth_failure_window, limits.auth_lockout
    )


def make_routers(
    config: Config, resolver: DNSResolver, stores: Stores
) -> dict[str, tuple[IRouter, IFailoverStrategy]]:
    """A router and failover strategy for each ``[pool.NAME]``, keyed ``pool:NAME``
    (the ``via`` of the routes that use it); endpoint health is kept by the stores'
    backend (shared by every node where the stores are)."""
    return {
        f"pool:{name}": (PoolRouter(pool, resolver), stores.backend.endpoint_strategy(pool))
        for name, pool in config.pools.items()
    }


def make_selector(config: Config, stores: Stores) -> IEgressSelector | None:
    """The egress-source selector over ``[[egress.source]]``; None without sources.
    Warmup counts and deprioritization marks are kept by the stores' backend."""
    if not config.egress_sources:
        return None
    return stores.backend.egress_selector(config.egress_sources)


def makeService(
    config: Config | None = None, reactor: Any = None, auth_limiter: IAuthLimiter | None = None
) -> NodeService:
    """The whole node as a MultiService (embed it with ``setServiceParent``).

    ``auth_limiter`` replaces the AUTH failure limiter built from ``[limits]``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if config is None:
        config = default_config()
    top = NodeService()
    # Webhook secrets are read now: a missing one stops the node before it serves.
    # Endpoints added at run time join the directory once the stores are open.
    webhooks = WebhookDirectory(endpoints_from_config(config, os.environ), reactor)
    stores = open_stores(config, reactor, webhooks=webhooks)
    webhooks.store = stores.webhook_endpoints
    stores_service = StoresService(stores, reactor)
    stores_service.setServiceParent(top)
    top.stores = stores
    top.webhook_directory = webhooks
    metrics = top.metrics = Metrics(
        providers=label_sets(ProviderTable.default().merged(config.providers).providers),
        tenants=label_sets(["default", *config.tenants, *(lc.tenant for lc in config.listeners)]),
        listeners=label_sets(lc.name for lc in config.listeners),
        pools=label_sets(config.pools), node=config.node.name,
    )
    # Every outcome reaches the delivery log (and JSON log) and the metrics.
    stats = StatsSink(stores.stats, reactor)
    events = FanoutSink([stores.events, MetricsSink(metrics), stats], clock=reactor)
    stores_service.on_open.append(stats.start)
    stores_service.on_stop.append(stats.stop)
    resolver = DNSResolver(
        config.dns.addresses(), config.dns.timeout, config.dns.cache_ttl_max, reactor, reactor
    )
    secret = load_node_secret(config)
    # Every message carries a reference reports can be traced back by (it needs the
    # node secret's key: without a secret, reports are matched by Message-ID only).
    reference_key = secret.derive(REFERENCE_KEY_PURPOSE) if secret is not None else None
    rules = (
        BounceRules.from_toml(config.delivery.bounce_rules)
        if config.delivery.bounce_rules else BounceRules.default()
    )
    # Reads the reports sent to the [feedback] domains, and always the simulator's
    # (its complaints come back the way a provider's do).
    feedback = FeedbackHandler(
        events=events, eventlog=stores.eventlog, suppressions=stores.suppressions,
        clock=reactor, node=config.node.name, key=reference_key, rules=rules,
        suppress_hard=lambda tenant: config.tenant(tenant).suppress_hard_bounces,
        on_result=metrics.feedback_report,
    )
    delivery = DeliveryService(
        config, stores.spool, events, stores.suppressions,
        MXRouter(resolver, port=config.delivery.mx_port), reactor, ready=stores_service.ready,
        rules=rules,
        routers=make_routers(config, resolver, stores),
        throttle=make_throttle(config, reactor, stores),
        selector=make_selector(config, stores),
        state_file=state_path(config),
        observer=metrics,
        feedback=feedback.handle,
        suspensions=stores.site_suspensions,
    )
    metrics.watch_routing(delivery.routing_state)
    delivery.setServiceParent(top)
    top.delivery = delivery

    def set_held(held: dict[str, str]) -> None:
        delivery.held_tenants = held
        metrics.set_held_tenants(held)

    guard = ComplaintGuard(
        stats=stores.stats, holds=stores.holds, clock=reactor,
        limit_of=lambda tenant: config.tenant(tenant).max_complaint_rate,
        on_held=set_held,
    )
    top.guard = guard
    stores_service.on_open.append(guard.start)
    stores_service.on_stop.append(guard.stop)
    # The stored endpoints are read before the node serves, then every few seconds.
    webhooks.key = secret.derive(WEBHOOK_KEY_PURPOSE) if secret is not None else None
    stores_service.checks.append(webhooks.refresh)
    stores_service.on_open.append(webhooks.start)
    stores_service.on_stop.append(webhooks.stop)
    agent, pool = guarded_agent(reactor, config.webhook_options.allow_private)
    top.webhooks = WebhookDispatcher(
        stores.outbox, webhooks, config.node.name, reactor, agent, pool,
        ready=stores_service.ready, dead_retention=config.events.retention,
        on_result=metrics.webhook_delivery,
    )
    top.webhooks.setServiceParent(top)
    keyring = DomainKeyring(stores.domains, secret, reactor)
    if not stores.backend.keys_checked_before_start:
        # The key check could not run before the reactor; the node does not serve
        # until it passes.
        stores_service.checks.append(
            lambda: check_keys_open(stores.domains, secret, config.node.secret_key_env)
        )
    require_verified = config.domains.require_verified_domains
    reports_to = report_domains(config)

    def is_report(address: str) -> bool:
        return bool(reports_to) and domain_of(address).rstrip(".") in reports_to

    if reference_key is not None:
        delivery.return_path = lambda d: _return_path(config, reference_key, d)
    intake = Intake(
        spool=stores.spool, events=events, clock=reactor,
        node=config.node.name, hostname=config.node.hostname,
        keyring=keyring, require_verified_domains=require_verified, on_queued=delivery.queued,
        active_queue=delivery,
        on_received=metrics.message_received, reference_key=reference_key,
        feedback=feedback if reports_to else None, is_feedback=is_report,
        chains=filter_chains(config, reactor), on_filtered=metrics.filter_decision,
    )
    IntakeService(intake).setServiceParent(top)
    # Delivery's own mail (DSNs) can be accepted while delivery stops, after the
    # intake service stopped: the stores wait for its hand-over and event first.
    stores_service.on_stop.insert(0, intake.settled)
    delivery.notifier = DSNNotifier(
        intake=intake, hostname=config.node.hostname, clock=reactor,
        tenant_default=lambda tenant: config.tenant(tenant).dsn,
    )
    tls_options = None
    if any(lc.tls != "none" for lc in config.listeners) or (
        config.api.enabled and config.api.tls
    ):
        cert, key = ensure_certificate(
            config.tls.certificate, config.tls.key, config.var_dir, config.node.hostname
        )
        tls_options = ReloadableServerTLS(cert, key, config.tls.min_version)
    top.tls = tls_options
    limits = config.limits
    auth_limiter = auth_limiter or make_auth_limiter(config, stores)
    # Credential and tenant rates count wherever the backend shares limits.
    rate_limiter = stores.backend.rate_limiter()
    tenant_rates = {
        name: limit for name, t in config.tenants.items()
        if (limit := t.rate_limit) is not None
    }
    token_checker = (
        HMACTokenChecker(stores.credentials, secret, reactor) if secret is not None else None
    )
    portal = submission_portal(stores.credentials, reactor, token_checker)
    top.listeners = []
    # Delivery lets fresh mail wait for company while clients are sending.
    activity = IntakeActivity()
    delivery.intake_busy = activity.busy
    activity.on_quiet(delivery.intake_quiet)
    for lc in config.listeners:
        settings = ListenerSettings(
            listener=lc, limits=limits, hostname=config.node.hostname, intake=intake,
            clock=reactor, portal=portal if lc.auth != "none" else None,
            credentials=stores.credentials, suppressions=stores.suppressions,
            auth_limiter=auth_limiter,
            rate_limiter=rate_limiter, tls_options=tls_options if lc.tls != "none" else None,
            tenant_rates=tenant_rates,
            keyring=keyring, require_verified_domains=require_verified,
            is_feedback=is_report, simulator_domain=config.simulator.domain,
            tenant_quotas={name: t.quota for name, t in config.tenants.items() if t.quota},
            activity=activity,
        )
        service = ListenerService(
            reactor, lc, SubmissionFactory(settings), stores_service,
            wrap_tls=tls_options if lc.wrap_tls else None, shared=config.node.processes > 1,
        )
        service.setServiceParent(top)
        top.listeners.append(service)
    sampler = QueueSampler(metrics, stores.spool, reactor)
    stores_service.on_open.append(sampler.start)
    stores_service.on_stop.append(sampler.stop)
    if config.api.enabled:
        top.metrics_resource = MetricsResource(metrics)
        extras = {
            "metrics": top.metrics_resource,
            "healthz": HealthResource(),
            "readyz": ReadyResource(lambda: Deferred.fromCoroutine(readiness(top))),
        }
        _, site = make_api_site(
            config, stores, intake, rate_limiter, keyring, tenant_rates, reactor,
            extras=extras, on_request=metrics.http_request, secret=secret,
            delivery=delivery,
        )
        # The API stops first (it is added last): no request reaches closing stores.
        top.api = HTTPService(
            reactor, config.api.endpoint, site, stores_service.ready,
            shared=config.node.processes > 1,
            tls=tls_options if config.api.tls else None,
        )
        top.api.setServiceParent(top)
    os.makedirs(config.var_dir, exist_ok=True)
    return top
