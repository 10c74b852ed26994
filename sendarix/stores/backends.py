"""The node's stores, opened from configuration: the one place a backend is chosen.

The ``[spool] url`` picks the backend of everything persistent: ``sqlite:`` keeps it
all in one SQLite file (one machine: :mod:`sendarix.stores.sqlite.backend`); a Redis
URL keeps it all in that Redis, shared by every node and worker process
(:mod:`sendarix.stores.redis.backend`).  Callers get an :class:`IBackend` and never
ask which one it is.  The relay and the ``sendarix`` command open the stores the same
way, so the command works on a running relay's data.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.internet.defer import Deferred

from sendarix.config.settings import Config
from sendarix.events.sinks import FanoutSink, JSONLogSink
from sendarix.events.webhooks.endpoints import Subscriptions
from sendarix.events.webhooks.sink import Matcher, OutboxSink
from sendarix.interfaces import (
    IBackend,
    ICredentialStore,
    IDashboardSessions,
    IDomainStore,
    IEventLog,
    IEventSink,
    IIdempotencyStore,
    ISiteSuspensions,
    ISpool,
    IStatsStore,
    ISuppressionStore,
    ITemplateStore,
    ITenantHolds,
    IThrottle,
    IWebhookEndpointStore,
    IWebhookOutbox,
)
from sendarix.stores.redis.backend import RedisBackend
from sendarix.stores.sqlite.backend import SQLiteBackend
from sendarix.stores.sqlite.domains import count_stored_keys


def open_backend(config: Config, reactor: Any) -> IBackend:
    """The (not yet opened) backend ``config``'s ``[spool] url`` names."""
    if config.spool.sqlite_path is not None:
        return SQLiteBackend.from_config(config, reactor)
    return RedisBackend.from_config(config, reactor)


def stored_keys_before_start(config: Config) -> tuple[int, str | None] | None:
    """``(count, one encrypted key)`` of the stored DKIM keys, read before the reactor
    runs, when the backend allows it (a local file); None when the check has to wait
    until the stores are open."""
    path = config.spool.sqlite_path
    return count_stored_keys(path) if path is not None else None


@define
class Stores:
    """Everything persistent a node uses; ``open()`` before use, ``close()`` after.

    ``events`` is where outcome events go: the delivery log, and the JSON log too when
    ``[events] json_log`` asks for it.
    """

    config: Config
    backend: IBackend
    events: IEventSink

    @property
    def spool(self) -> ISpool:
        return self.backend.spool

    @property
    def credentials(self) -> ICredentialStore:
        return self.backend.credentials

    @property
    def eventlog(self) -> IEventLog:
        return self.backend.eventlog

    @property
    def suppressions(self) -> ISuppressionStore:
        return self.backend.suppressions

    @property
    def domains(self) -> IDomainStore:
        return self.backend.domains

    @property
    def idempotency(self) -> IIdempotencyStore:
        return self.backend.idempotency

    @property
    def outbox(self) -> IWebhookOutbox:
        return self.backend.outbox

    @property
    def webhook_endpoints(self) -> IWebhookEndpointStore:
        return self.backend.webhook_endpoints

    @property
    def templates(self) -> ITemplateStore:
        return self.backend.templates

    @property
    def stats(self) -> IStatsStore:
        return self.backend.stats

    @property
    def holds(self) -> ITenantHolds:
        return self.backend.holds

    @property
    def site_suspensions(self) -> ISiteSuspensions:
        return self.backend.site_suspensions

    @property
    def dashboard_sessions(self) -> IDashboardSessions:
        return self.backend.dashboard_sessions

    @property
    def location(self) -> str:
        """Where the stores are, for messages: the database path or the Redis server."""
        return str(self.backend.location)

    def make_throttle(self, node: str) -> IThrottle:
        """The outbound throttle for ``node`` (cluster-wide where the backend is
        shared; it stops with the stores)."""
        return self.backend.throttle(node)

    def open(self, wait: float | None = None) -> Deferred[None]:
        """Open the stores (a server: wait at most ``wait`` seconds for it, None for
        as long as it takes) and start the spool."""
        return self.backend.open(wait)

    def close(self) -> Deferred[None]:
        """Stop the spool and close the stores (queued writes finish first)."""
        return self.backend.close()


def open_stores(
    config: Config, reactor: Any, json_log: bool | None = None,
    webhooks: Matcher | None = None,
) -> Stores:
    """Build (not open) the stores ``config`` names, on the backend it names.

    With ``webhooks``, an event some endpoint subscribed to is logged and queued in the
    webhook outbox together (:class:`OutboxSink` takes the delivery log's place).  A
    node passes its webhook directory even when it has no endpoint yet: one may be
    added while it runs.
    """
    backend = open_backend(config, reactor)
    use_json = config.events.json_log if json_log is None else json_log
    logged: IEventSink = backend.eventlog
    if isinstance(webhooks, Subscriptions) and not webhooks.endpoints:
        webhooks = None
    if webhooks is not None:
        logged = OutboxSink(backend.eventlog, backend.outbox, webhooks)
    events: IEventSink = FanoutSink([logged, JSONLogSink()]) if use_json else logged
    return Stores(config, backend, events)
