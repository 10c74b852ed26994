"""Egress-source state shared in Redis: warmup counts and deprioritization marks.

:class:`SharedTieredSelector` is the :class:`~sendarix.egress.sources.TieredSelector`
(the choice stays synchronous and local) whose two kinds of memory every node shares:

- each message sent from a source to a site is also counted in Redis
  (``sel:sent:YYYY-MM-DD``, a hash ``source|site`` -> count, kept two days), so a
  warming IP's daily cap holds for the cluster, not per node;
- each block or rate-limit mark is also added in Redis (``sel:pen``, a hash
  ``source|site`` -> ``value|since``, decayed with the same half-life), so every
  node moves traffic away from an IP a provider pushed back on.

Writes go out as they happen (not waited for: a lost write costs precision, never
mail).  Every ``sync_interval`` seconds, ``choose`` starts a refresh that takes the
larger of the local and the shared count or mark.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from sendarix.egress.sources import Mark, Source, TieredSelector, source_name
from sendarix.interfaces import IEgressSelector
from sendarix.stores.redis.connection import hash_pairs

log = Logger()

# ARGV: key, field, ttl seconds.
_COUNT = """
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the marks hash.  ARGV: field, now, half-life.  TieredSelector.penalize in one
# atomic step: the stored ``value|since`` decayed to now (Mark.at), plus one, as of now.
_PENALIZE = """
local now, half_life = tonumber(ARGV[2]), tonumber(ARGV[3])
local value = 0
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local i = string.find(old, '|', 1, true)
  local v, since = tonumber(string.sub(old, 1, i - 1)), tonumber(string.sub(old, i + 1))
  value = v * math.pow(0.5, math.max(0, now - since) / half_life)
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.17g|%.17g', value + 1, now))
return 1
"""


@implementer(IEgressSelector)
@define
class SharedTieredSelector:
    """A :class:`TieredSelector` whose warmup counts and marks are shared through
    ``redis``: the local selector chooses; Redis tells it what other nodes counted."""

    local: TieredSelector
    redis: Any = None
    prefix: str = "sendarix:"
    sync_interval: float = 2.0
    _last_sync: float = field(default=float("-inf"), init=False)
    _syncing: bool = field(default=False, init=False)

    @classmethod
    def over(
        cls, sources: tuple[Any, ...], redis: Any, rng: random.Random | None = None,
        **kwargs: Any,
    ) -> SharedTieredSelector:
        """A shared selector over ``sources`` (the ``[[egress.source]]`` entries)."""
        local = TieredSelector(sources, rng=rng if rng is not None else random.Random())
        return cls(local, redis=redis, **kwargs)

    def _sent_key(self, today: datetime.date) -> str:
        return f"{self.prefix}sel:sent:{today.isoformat()}"

    def _fire(self, d: Deferred[Any]) -> None:
        d.addErrback(lambda f: log.warn("egress state not shared: {why}", why=f.getErrorMessage()))

    def choose(
        self, pool: str, provider: str, now: float, today: datetime.date
    ) -> Source | None:
        """As TieredSelector's; refreshes the shared state now and then."""
        if not self._syncing and now - self._last_sync >= self.sync_interval:
            self._fire(self.sync(now, today))
        return self.local.choose(pool, provider, now, today)

    def record_send(self, source: Source | str, provider: str, today: datetime.date) -> None:
        """Count one message here and in Redis."""
        self.local.record_send(source, provider, today)
        self._fire(self.redis.eval(
            _COUNT, [self._sent_key(today)], [f"{source_name(source)}|{provider}", "172800"]
        ))

    def penalize(self, source: Source | str, provider: str, now: float) -> None:
        """Mark ``source`` for ``provider`` here and in Redis."""
        self.local.penalize(source, provider, now)
        self._fire(self.redis.eval(
            _PENALIZE, [self.prefix + "sel:pen"],
            [f"{source_name(source)}|{provider}", repr(float(now)),
             repr(float(self.local.half_life))],
        ))

    def remaining(self, source: Source, provider: str, today: datetime.date) -> int | None:
        """As TieredSelector's (what this node has heard)."""
        return self.local.remaining(source, provider, today)

    def sent(self, source: Source | str, provider: str, today: datetime.date) -> int:
        """As TieredSelector's (what this node has heard)."""
        return self.local.sent(source, provider, today)

    def penalty(self, source: Source | str, provider: str, now: float) -> float:
        """As TieredSelector's (what this node has heard)."""
        return self.local.penalty(source, provider, now)

    def snapshot(self, now: float, today: datetime.date) -> list[dict[str, object]]:
        """This node's view of the shared state (for ``queue stats``)."""
        return self.local.snapshot(now, today)

    def restore(
        self, entries: list[dict[str, object]], written_at: float, today: datetime.date
    ) -> int:
        """Nothing to take back from a local file: the state lives in Redis."""
        return 0

    def sync(self, now: float, today: datetime.date) -> Deferred[None]:
        """Take the other nodes' counts and marks (the larger of ours and theirs)."""
        self._syncing = True
        self._last_sync = now
        return Deferred.fromCoroutine(self._sync(now, today))

    async def _sync(self, now: float, today: datetime.date) -> None:
        try:
            sent = await self.redis.execute_command("HGETALL", self._sent_key(today))
            marks = await self.redis.execute_command("HGETALL", self.prefix + "sel:pen")
        finally:
            self._syncing = False
        for key, value in hash_pairs(sent):
            name, _, provider = key.partition("|")
            self.local.merge_sent(name, provider, today, int(value))
        for key, value in hash_pairs(marks):
            name, _, provider = key.partition("|")
            mark, _, since = value.partition("|")
            self.local.merge_mark(name, provider, Mark(float(mark), float(since)), now)
