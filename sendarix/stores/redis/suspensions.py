"""Destinations an operator suspended, in Redis, shared by every node: a hash
``sites:suspended`` (site -> until, POSIX seconds)."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ISiteSuspensions
from sendarix.stores.redis.connection import hash_pairs


@implementer(ISiteSuspensions)
@define
class RedisSiteSuspensions:
    """Suspended sites in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")

    @property
    def _key(self) -> str:
        return self._prefix + "sites:suspended"

    def suspend(self, site: str, until: float) -> Deferred[None]:
        d: Deferred[Any] = self._redis.execute_command("HSET", self._key, site, repr(until))
        return d.addCallback(lambda _: None)

    def resume(self, site: str) -> Deferred[bool]:
        d: Deferred[Any] = self._redis.execute_command("HDEL", self._key, site)
        return d.addCallback(lambda removed: bool(int(removed)))

    def active(self, now: float) -> Deferred[dict[str, float]]:
        return Deferred.fromCoroutine(self._active(now))

    async def _active(self, now: float) -> dict[str, float]:
        reply = await self._redis.execute_command("HGETALL", self._key)
        found = {site: float(until) for site, until in hash_pairs(reply)}
        expired = [site for site, until in found.items() if until <= now]
        if expired:
            await self._redis.execute_command("HDEL", self._key, *expired)
        return {site: until for site, until in found.items() if until > now}
