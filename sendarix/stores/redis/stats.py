"""Hourly event counts in Redis, shared by every node: one hash per hour
(``stats:h:<hour start>``, field ``tenant NUL type NUL provider``), expiring with the
event retention."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from zope.interface import implementer

from sendarix.interfaces import IStatsStore
from sendarix.stores.redis.connection import hash_pairs

_SEP = "\x00"

#: The most hours one query reads (31 days).
MAX_HOURS = 31 * 24

Row = tuple[float, str, str, str, int]


@implementer(IStatsStore)
@define
class RedisStatsStore:
    """Hourly counts in Redis (see the module docstring)."""

    _redis: Any
    _prefix: str = field(default="sendarix:", alias="prefix")
    #: How long an hour's counts are kept (seconds).
    retention: float = 30 * 86400.0

    def _key(self, hour: float) -> str:
        return f"{self._prefix}stats:h:{int(hour)}"

    def add(self, counts: Mapping[tuple[float, str, str, str], int]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._add(counts))

    async def _add(self, counts: Mapping[tuple[float, str, str, str], int]) -> None:
        for (hour, tenant, kind, provider), n in counts.items():
            if n:
                key = self._key(hour)
                await self._redis.execute_command(
                    "HINCRBY", key, _SEP.join((tenant, kind, provider)), n
                )
                await self._redis.execute_command("EXPIRE", key, int(self.retention) + 3600)

    def query(
        self, since: float, until: float, tenant: str | None = None
    ) -> Deferred[builtins.list[Row]]:
        return Deferred.fromCoroutine(self._query(since, until, tenant))

    async def _query(self, since: float, until: float, tenant: str | None) -> builtins.list[Row]:
        first = int(since // 3600) * 3600
        hours = [h for h in range(first, int(until), 3600) if h >= since][:MAX_HOURS]
        rows: builtins.list[Row] = []
        for hour in hours:
            reply = await self._redis.execute_command("HGETALL", self._key(hour))
            for name, n in hash_pairs(reply):
                who, kind, provider = name.split(_SEP)
                if tenant is None or who == tenant:
                    rows.append((float(hour), who, kind, provider, int(n)))
        return rows

    def trim(self, before: float) -> Deferred[int]:
        # Each hour expires by itself after the retention.
        return Deferred.fromCoroutine(_none())


async def _none() -> int:
    return 0
