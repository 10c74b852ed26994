"""The node's stores, opened from configuration: spool, credentials, delivery log,
suppression lists, sending domains.

The ``[spool] url`` picks the backend of all of them: ``sqlite:`` keeps everything in
one SQLite file (one machine); a Redis URL keeps everything in that Redis, shared by
every node and worker process (DESIGN.md section 14), over one connection pool.
The relay and the ``sendarix`` command open the same stores the same way, so the
command works on a running relay's data (SQLite in WAL mode allows both).
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred

from sendarix.config.settings import Config
from sendarix.events.sinks import FanoutSink, JSONLogSink
from sendarix.interfaces import (
    ICredentialStore,
    IDomainStore,
    IEventLog,
    IEventSink,
    ISpool,
    ISuppressionStore,
    IThrottle,
)
from sendarix.routing.throttle import MemoryThrottle
from sendarix.stores.redis.connection import RedisClient, connect
from sendarix.stores.redis.credentials import RedisCredentialStore
from sendarix.stores.redis.domains import RedisDomainStore
from sendarix.stores.redis.eventlog import RedisEventLog
from sendarix.stores.redis.spool import RedisSpool
from sendarix.stores.redis.suppression import RedisSuppressionStore
from sendarix.stores.redis.throttle import RedisThrottle
from sendarix.stores.spool import open_spool
from sendarix.stores.sqlite.credentials import SQLiteCredentialStore
from sendarix.stores.sqlite.database import SQLiteDatabase
from sendarix.stores.sqlite.domains import SQLiteDomainStore
from sendarix.stores.sqlite.eventlog import SQLiteEventLog
from sendarix.stores.sqlite.suppression import SQLiteSuppressionStore

#: Key prefix of everything Sendarix keeps in Redis.
REDIS_PREFIX = "sendarix:"


@define
class Stores:
    """Everything persistent a node uses; ``open()`` before use, ``close()`` after.

    ``db`` is the SQLite database (None with Redis); ``redis`` the Redis connection
    pool (None with SQLite).
    """

    config: Config
    db: SQLiteDatabase | None
    spool: ISpool
    credentials: ICredentialStore
    eventlog: IEventLog
    events: IEventSink
    suppressions: ISuppressionStore
    domains: IDomainStore
    redis: RedisClient | None = None
    clock: Any = None
    _throttles: list[RedisThrottle] = field(factory=list, init=False)

    @classmethod
    def from_config(cls, config: Config, reactor: Any, json_log: bool | None = None) -> Stores:
        """Build (not open) the stores ``config`` names."""
        use_json = config.events.json_log if json_log is None else json_log
        path = config.spool.sqlite_path
        if path is None:
            return cls._redis_stores(config, reactor, use_json)
        db = SQLiteDatabase(path, reactor)
        spool = open_spool(config.spool.url, reactor, db=db)
        credentials = SQLiteCredentialStore(db, reactor)
        eventlog = SQLiteEventLog(db)
        events: IEventSink = (
            FanoutSink([eventlog, JSONLogSink()]) if use_json else eventlog
        )
        suppressions = SQLiteSuppressionStore(db)
        domains = SQLiteDomainStore(db)
        return cls(config, db, spool, credentials, eventlog, events, suppressions, domains,
                   clock=reactor)

    @classmethod
    def _redis_stores(cls, config: Config, reactor: Any, use_json: bool) -> Stores:
        sc = config.spool
        # WAIT takes a connection out of the pool while it waits: keep more of them.
        redis = connect(
            sc.url, password_env=sc.password_env, ca_file=sc.ca_file,
            poolsize=16 if sc.wait_replicas else 8,
        )
        spool = RedisSpool(
            redis, REDIS_PREFIX, allow_volatile=sc.allow_volatile, clock=reactor,
            outage_patience=sc.lease_time, wait_replicas=sc.wait_replicas,
            wait_timeout=sc.wait_timeout,
        )
        eventlog = RedisEventLog(redis, REDIS_PREFIX, reactor)
        events: IEventSink = (
            FanoutSink([eventlog, JSONLogSink()]) if use_json else eventlog
        )
        return cls(
            config, None, spool, RedisCredentialStore(redis, reactor, REDIS_PREFIX),
            eventlog, events, RedisSuppressionStore(redis, REDIS_PREFIX),
            RedisDomainStore(redis, REDIS_PREFIX), redis, reactor,
        )

    def make_throttle(self, node: str) -> IThrottle:
        """The outbound throttle for ``node``: shared by every node in Redis (limits
        hold for the cluster; call its ``stop()`` when the node stops), else in memory
        (limits per process)."""
        if self.redis is None:
            return MemoryThrottle()
        throttle = RedisThrottle(self.redis, self.clock, REDIS_PREFIX, node=node)
        self._throttles.append(throttle)
        return throttle

    @property
    def location(self) -> str:
        """Where the stores are, for messages: the database path or the Redis server."""
        if self.db is not None:
            return f"database {self.db.path}"
        assert self.redis is not None
        return f"Redis ({self.redis.describe})"

    def open(self, wait: float | None = None) -> Deferred[None]:
        """Open the database (or wait for Redis: at most ``wait`` seconds, None for
        as long as it takes) and start the spool."""
        return ensureDeferred(self._open(wait))

    async def _open(self, wait: float | None) -> None:
        if self.db is not None:
            await self.db.open()
        if self.redis is not None:
            await self.redis.wait_connected(self.clock, wait)
        await self.spool.start()

    def close(self) -> Deferred[None]:
        """Stop the spool and close the database or the Redis connections (queued
        writes finish first)."""
        return ensureDeferred(self._close())

    async def _close(self) -> None:
        for throttle in self._throttles:
            throttle.stop()  # its connection slots expire in Redis
        await self.spool.stop()
        if self.db is not None:
            await self.db.close()
        if self.redis is not None:
            if isinstance(self.eventlog, RedisEventLog):
                await self.eventlog.close()
            await self.redis.disconnect()
