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
    ``burst`` events (default: the rate itself).

    ``share``: this process's part of every rate and burst (1/N for one of N worker
    processes that count on their own), so that together they admit no more than
    the rate.
    """

    table: GcraTable = field(factory=GcraTable)
    share: float = 1.0

    def allow(
        self, key: str, rate: float, period: float, now: float, burst: float | None = None
    ) -> bool:
        """Admit one event for ``key`` at ``now``; False when over the rate."""
        if rate <= 0 or period <= 0:
            return False
        burst = rate if burst is None else burst
        pacing = Pacing.of(rate * self.share, period, max(1.0, burst * self.share))
        return self.table.admit(key, pacing, now) == 0.0
