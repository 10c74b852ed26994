"""The embedded backend: every store in one SQLite file, limits and routing state in
this process.

One machine, one node (or several worker processes, each counting its own limits,
and each taking its equal part of every limit so that together they keep it):
the spool, credentials, delivery log, suppression lists and sending domains share one
:class:`~sendarix.stores.sqlite.database.SQLiteDatabase` (WAL, group commit), and the
command line opens the same file while the relay runs.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from sendarix.config.settings import Config, EgressSourceConfig, PoolConfig
from sendarix.egress.sources import TieredSelector
from sendarix.ingress.authlimit import AuthLimiter
from sendarix.ingress.ratelimit import RateLimiter
from sendarix.interfaces import IBackend, IEgressSelector, IFailoverStrategy, IThrottle
from sendarix.routing.pool import EndpointPool
from sendarix.routing.throttle import MemoryThrottle
from sendarix.stores.errors import StoreUnavailable
from sendarix.stores.spool import open_spool
from sendarix.stores.sqlite.credentials import SQLiteCredentialStore
from sendarix.stores.sqlite.dashboard import SQLiteDashboardSessions
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.domains import SQLiteDomainStore
from sendarix.stores.sqlite.eventlog import SQLiteEventLog
from sendarix.stores.sqlite.holds import SQLiteTenantHolds
from sendarix.stores.sqlite.idempotency import SQLiteIdempotencyStore
from sendarix.stores.sqlite.outbox import SQLiteWebhookOutbox
from sendarix.stores.sqlite.stats import SQLiteStatsStore
from sendarix.stores.sqlite.suppression import SQLiteSuppressionStore
from sendarix.stores.sqlite.suspensions import SQLiteSiteSuspensions
from sendarix.stores.sqlite.templates import SQLiteTemplateStore
from sendarix.stores.sqlite.webhooks import SQLiteWebhookEndpointStore


@implementer(IBackend)
@define
class SQLiteBackend:
    """The stores of one SQLite file, and in-memory limits and routing state."""

    path: str
    db: SQLiteDatabase
    spool: Any
    credentials: SQLiteCredentialStore
    eventlog: SQLiteEventLog
    suppressions: SQLiteSuppressionStore
    domains: SQLiteDomainStore
    idempotency: SQLiteIdempotencyStore
    templates: SQLiteTemplateStore
    stats: SQLiteStatsStore
    holds: SQLiteTenantHolds
    site_suspensions: SQLiteSiteSuspensions
    dashboard_sessions: SQLiteDashboardSessions
    outbox: SQLiteWebhookOutbox
    webhook_endpoints: SQLiteWebhookEndpointStore
    #: This process's part of every limit it counts itself: 1/N in one of N worker
    #: processes (connection caps, rates, warmup caps and AUTH failure budgets are
    #: counted per process here, unlike with Redis).
    share: float = 1.0
    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
    shares_state: bool = False
    # The file can be read before the reactor runs (load_node_secret does).
    keys_checked_before_start: bool = True
    _opened: bool = field(default=False, init=False)

    @classmethod
    def from_config(cls, config: Config, reactor: Any) -> SQLiteBackend:
        """Build (not open) the stores of ``[spool] url``'s file."""
        path = config.spool.sqlite_path
        assert path is not None, "not a sqlite: spool URL"
        db = SQLiteDatabase(path, reactor)
        return cls(
            path=path,
            db=db,
            spool=open_spool(config.spool.url, reactor, db=db),
            credentials=SQLiteCredentialStore(db, reactor),
            eventlog=SQLiteEventLog(db),
            suppressions=SQLiteSuppressionStore(db, reactor),
            domains=SQLiteDomainStore(db),
            idempotency=SQLiteIdempotencyStore(db),
            templates=SQLiteTemplateStore(db),
            stats=SQLiteStatsStore(db),
            holds=SQLiteTenantHolds(db),
            site_suspensions=SQLiteSiteSuspensions(db),
            dashboard_sessions=SQLiteDashboardSessions(db),
            outbox=SQLiteWebhookOutbox(db),
            webhook_endpoints=SQLiteWebhookEndpointStore(db),
            share=1.0 / config.node.processes,
        )

    @property
    def location(self) -> str:
        return f"database {self.db.path}"

    def open(self, wait: float | None = None) -> Deferred[None]:
        return ensureDeferred(self._open())

    async def _open(self) -> None:
        try:
            await self.db.open()
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"cannot open the {self.location}: {e}") from e
        # The database closes only once it opened (close() of a database whose open
        # failed would never fire); a failing spool start still closes it.
        self._opened = True
        await self.spool.start()

    def close(self) -> Deferred[None]:
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        if not self._opened:
            return
        await self.spool.stop()
        await self.db.close()

    def throttle(self, node: str) -> IThrottle:
        return MemoryThrottle(share=self.share)

    def auth_limiter(self, max_failures: int, window: float, lockout: float) -> AuthLimiter:
        # A client's tries spread over the workers: each allows its part of them.
        return AuthLimiter(max_failures=max(1, int(max_failures * self.share)),
                           window=window, lockout=lockout)

    def rate_limiter(self) -> RateLimiter:
        return RateLimiter(share=self.share)

    def egress_selector(self, sources: tuple[EgressSourceConfig, ...]) -> IEgressSelector:
        return TieredSelector(sources, share=self.share)

    def endpoint_strategy(self, pool: PoolConfig) -> IFailoverStrategy:
        return EndpointPool(pool)
