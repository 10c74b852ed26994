"""Held tenants in Redis, shared by every node: a hash ``holds`` (tenant -> JSON
reason and time) and a hash ``holds:released`` (tenant -> when released)."""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import ITenantHolds
from sendarix.stores.redis.connection import hash_pairs


@implementer(ITenantHolds)
@define
class RedisTenantHolds:
    """Held tenants in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")

    def hold(self, tenant: str, reason: str, now: float) -> Deferred[bool]:
        value = json.dumps({"reason": reason, "since": now})
        d: Deferred[Any] = self._redis.execute_command(
            "HSETNX", self._prefix + "holds", tenant, value
        )
        return d.addCallback(lambda added: bool(int(added)))

    def release(self, tenant: str, now: float) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._release(tenant, now))

    async def _release(self, tenant: str, now: float) -> bool:
        removed = await self._redis.execute_command("HDEL", self._prefix + "holds", tenant)
        if int(removed):
            await self._redis.execute_command(
                "HSET", self._prefix + "holds:released", tenant, repr(now)
            )
        return bool(int(removed))

    def all(self) -> Deferred[dict[str, tuple[str, float]]]:
        d: Deferred[Any] = self._redis.execute_command("HGETALL", self._prefix + "holds")

        def parse(reply: Any) -> dict[str, tuple[str, float]]:
            out = {}
            for tenant, text in hash_pairs(reply):
                value = json.loads(text)
                out[tenant] = (str(value["reason"]), float(value["since"]))
            return out

        return d.addCallback(parse)

    def released_at(self, tenant: str) -> Deferred[float | None]:
        d: Deferred[Any] = self._redis.execute_command(
            "HGET", self._prefix + "holds:released", tenant
        )
        return d.addCallback(lambda text: float(text) if text else None)
