"""The cluster backend: every store in one Redis, and the limits and routing state that
must hold for the whole cluster (throttles, AUTH lockouts, submission rates, endpoint
health, egress warmup) shared there too.

Every node and worker process that names the same Redis works on the same data; each
store keeps its keys under its own part of :data:`PREFIX`.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from sendarix.config.settings import Config, EgressSourceConfig, PoolConfig
from sendarix.interfaces import IBackend, IEgressSelector, IFailoverStrategy, IThrottle
from sendarix.stores.redis.connection import RedisClient, connect
from sendarix.stores.redis.credentials import RedisCredentialStore
from sendarix.stores.redis.dashboard import RedisDashboardSessions
from sendarix.stores.redis.domains import RedisDomainStore
from sendarix.stores.redis.endpoints import SharedEndpointPool
from sendarix.stores.redis.eventlog import RedisEventLog
from sendarix.stores.redis.holds import RedisTenantHolds
from sendarix.stores.redis.idempotency import RedisIdempotencyStore
from sendarix.stores.redis.limits import SharedAuthLimiter, SharedRateLimiter
from sendarix.stores.redis.outbox import RedisWebhookOutbox
from sendarix.stores.redis.selector import SharedTieredSelector
from sendarix.stores.redis.spool import RedisSpool
from sendarix.stores.redis.stats import RedisStatsStore
from sendarix.stores.redis.suppression import RedisSuppressionStore
from sendarix.stores.redis.suspensions import RedisSiteSuspensions
from sendarix.stores.redis.templates import RedisTemplateStore
from sendarix.stores.redis.throttle import RedisThrottle
from sendarix.stores.redis.webhooks import RedisWebhookEndpointStore

#: Key prefix of everything Sendarix keeps in Redis.
PREFIX = "sendarix:"


@implementer(IBackend)
@define
class RedisBackend:
    """The stores in one Redis, over one connection pool, and the shared limits."""

    redis: RedisClient
    clock: Any
    spool: RedisSpool
    credentials: RedisCredentialStore
    eventlog: RedisEventLog
    suppressions: RedisSuppressionStore
    domains: RedisDomainStore
    idempotency: RedisIdempotencyStore
    templates: RedisTemplateStore
    stats: RedisStatsStore
    holds: RedisTenantHolds
    site_suspensions: RedisSiteSuspensions
    dashboard_sessions: RedisDashboardSessions
    outbox: RedisWebhookOutbox
    webhook_endpoints: RedisWebhookEndpointStore
    # ResponseError: Redis answered, but refused (a wrong password, a read-only replica).
    errors: tuple[type[BaseException], ...] = (
        txredisapi.ConnectionError, txredisapi.ResponseError, OSError,
    )
    shares_state: bool = True
    # Reading the keys needs the reactor: the node checks them once the stores open.
    keys_checked_before_start: bool = False
    _throttles: list[RedisThrottle] = field(factory=list, init=False)

    @classmethod
    def from_config(cls, config: Config, reactor: Any) -> RedisBackend:
        """Build the stores of ``[spool] url``; the pool starts connecting at once."""
        sc = config.spool
        # WAIT takes a connection out of the pool while it waits: keep more of them.
        redis = connect(
            sc.url, password_env=sc.password_env, ca_file=sc.ca_file,
            poolsize=16 if sc.wait_replicas else 8,
        )
        return cls(
            redis=redis,
            clock=reactor,
            spool=RedisSpool(
                redis, PREFIX, allow_volatile=sc.allow_volatile, clock=reactor,
                outage_patience=sc.lease_time, wait_replicas=sc.wait_replicas,
                wait_timeout=sc.wait_timeout,
            ),
            credentials=RedisCredentialStore(redis, reactor, PREFIX),
            eventlog=RedisEventLog(redis, PREFIX, reactor),
            suppressions=RedisSuppressionStore(redis, PREFIX),
            domains=RedisDomainStore(redis, PREFIX),
            idempotency=RedisIdempotencyStore(redis, PREFIX),
            templates=RedisTemplateStore(redis, PREFIX),
            stats=RedisStatsStore(redis, PREFIX, retention=config.events.retention),
            holds=RedisTenantHolds(redis, PREFIX),
            site_suspensions=RedisSiteSuspensions(redis, PREFIX),
            dashboard_sessions=RedisDashboardSessions(redis, PREFIX),
            outbox=RedisWebhookOutbox(redis, PREFIX, reactor),
            webhook_endpoints=RedisWebhookEndpointStore(redis, PREFIX),
        )

    @property
    def location(self) -> str:
        return f"Redis ({self.redis.describe})"

    def open(self, wait: float | None = None) -> Deferred[None]:
        return ensureDeferred(self._open(wait))

    async def _open(self, wait: float | None) -> None:
        await self.redis.wait_connected(self.clock, wait)
        await self.spool.start()

    def close(self) -> Deferred[None]:
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        for throttle in self._throttles:
            throttle.stop()  # its connection slots expire in Redis
        await self.spool.stop()
        await self.eventlog.close()
        await self.outbox.close()
        await self.redis.disconnect()

    def throttle(self, node: str) -> IThrottle:
        throttle = RedisThrottle(self.redis, self.clock, PREFIX, node=node)
        self._throttles.append(throttle)
        return throttle

    def auth_limiter(self, max_failures: int, window: float, lockout: float) -> SharedAuthLimiter:
        return SharedAuthLimiter(
            self.redis, max_failures=max_failures, window=window, lockout=lockout
        )

    def rate_limiter(self) -> SharedRateLimiter:
        return SharedRateLimiter(redis=self.redis)

    def egress_selector(self, sources: tuple[EgressSourceConfig, ...]) -> IEgressSelector:
        return SharedTieredSelector.over(sources, redis=self.redis)

    def endpoint_strategy(self, pool: PoolConfig) -> IFailoverStrategy:
        return SharedEndpointPool(pool, redis=self.redis)
