"""A keyed GCRA rate limiter (pure: time is passed in).

GCRA (the generic cell rate algorithm) keeps one number per key, the theoretical
arrival time, and admits a request when it is not too far ahead of ``now``.
"""

from __future__ import annotations

from attrs import define, field


@define
class RateLimiter:
    """Admits up to ``rate`` events per ``period`` seconds per key, with a burst of
    ``burst`` events (default: the rate itself)."""

    max_keys: int = 100_000
    _tat: dict[str, float] = field(factory=dict)

    def allow(
        self, key: str, rate: float, period: float, now: float, burst: float | None = None
    ) -> bool:
        """Admit one event for ``key`` at ``now``; False when over the rate."""
        if rate <= 0:
            return False
        interval = period / rate
        tolerance = interval * ((burst if burst is not None else rate) - 1)
        tat = max(self._tat.get(key, now), now)
        if tat - now > tolerance:
            return False
        if key not in self._tat and len(self._tat) >= self.max_keys:
            self._prune(now)
        self._tat[key] = tat + interval
        return True

    def _prune(self, now: float) -> None:
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]
        while len(self._tat) >= self.max_keys:
            self._tat.pop(next(iter(self._tat)))
