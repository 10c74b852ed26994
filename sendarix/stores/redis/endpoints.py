"""Smarthost endpoint health shared in Redis.

:class:`SharedEndpointPool` is the :class:`~sendarix.routing.pool.EndpointPool` whose
circuit breakers every node shares: an endpoint that failed on one node (connection
error, timeout, 421) rests on all of them until that node's cooldown ends.  A node
whose session succeeded clears the shared mark, so nodes that have not yet taken it
over never do; a node that has keeps its own breaker open until the cooldown ends.
Keys under ``prefix``: ``ep:open``, a hash endpoint key -> the time its breaker is
open until.

Writes go out as they happen (not waited for); every ``sync_interval`` seconds
``order`` starts a refresh that opens a local breaker the others opened for longer.
The choice itself stays synchronous and local.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.config.settings import PoolConfig
from sendarix.interfaces import IFailoverStrategy
from sendarix.routing.mx import Hop
from sendarix.routing.pool import EndpointPool
from sendarix.stores.redis.connection import hash_pairs

log = Logger()

# KEYS: the hash.  ARGV: endpoint key, open until.  Keeps the later time.
_OPEN = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '')
if old == nil or old < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


@implementer(IFailoverStrategy)
@define
class SharedEndpointPool:
    """An :class:`EndpointPool` whose breakers are shared through ``redis``: the local
    pool orders the hops; Redis tells it which endpoints other nodes saw fail."""

    pool: PoolConfig
    redis: Any = None
    prefix: str = "sendarix:"
    sync_interval: float = 2.0
    rng: random.Random = field(factory=random.Random)
    local: EndpointPool = field(init=False)
    _last_sync: float = field(default=float("-inf"), init=False)
    _syncing: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.local = EndpointPool(self.pool, rng=self.rng)

    @property
    def _key(self) -> str:
        return self.prefix + "ep:open"

    def _fire(self, d: Deferred[Any]) -> None:
        d.addErrback(lambda f: log.warn("endpoint health not shared: {why}",
                                        why=f.getErrorMessage()))

    def order(self, hops: Sequence[Hop], now: float) -> tuple[Hop, ...]:
        """As EndpointPool's; refreshes the shared health now and then."""
        if not self._syncing and now - self._last_sync >= self.sync_interval:
            self._fire(self.sync(now))
        return self.local.order(hops, now)

    def failed(self, hop: Hop, now: float) -> None:
        """Open ``hop``'s breaker here and for every node."""
        self.local.failed(hop, now)
        until = self.local.opened_until(hop)
        self._fire(self.redis.eval(_OPEN, [self._key],
                                   [self.local.endpoint_of(hop), repr(until)]))

    def succeeded(self, hop: Hop, now: float) -> None:
        """Close ``hop``'s breaker here, and clear the shared mark."""
        self.local.succeeded(hop, now)
        self._fire(self.redis.execute_command("HDEL", self._key, self.local.endpoint_of(hop)))

    def states(self, now: float) -> dict[str, str]:
        """As EndpointPool's (what this node has heard)."""
        return self.local.states(now)

    def sync(self, now: float) -> Deferred[None]:
        """Open the local breakers other nodes opened (for longer than ours)."""
        self._syncing = True
        self._last_sync = now
        return Deferred.fromCoroutine(self._sync(now))

    async def _sync(self, now: float) -> None:
        try:
            reply = await self.redis.execute_command("HGETALL", self._key)
        finally:
            self._syncing = False
        for key, value in hash_pairs(reply):
            self.local.merge_open(key, float(value), now)
