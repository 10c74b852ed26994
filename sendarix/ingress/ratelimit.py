"""A keyed submission rate limiter: yes or no for one more message under a rate, on the
relay's one GCRA (:mod:`sendarix.model.gcra`).  Pure: time is passed in."""

from __future__ import annotations

from attrs import define, field
from zope.interface import implementer

from sendarix.interfaces import IRateLimiter
from sendarix.model.gcra import GcraTable, Pacing


@implementer(IRateLimiter)
@define
class RateLimiter:
    """Admits up to ``rate`` events per ``period`` seconds per key, with a burst of
    ``burst`` events (default: the rate itself)."""

    table: GcraTable = field(factory=GcraTable)

    def allow(
        self, key: str, rate: float, period: float, now: float, burst: float | None = None
    ) -> bool:
        """Admit one event for ``key`` at ``now``; False when over the rate."""
        if rate <= 0 or period <= 0:
            return False
        pacing = Pacing.of(rate, period, rate if burst is None else burst)
        return self.table.admit(key, pacing, now) == 0.0
