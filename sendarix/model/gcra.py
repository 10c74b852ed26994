"""GCRA, the generic cell rate algorithm: the one pacing rule of the whole relay.

Each key keeps a single number, its theoretical arrival time (TAT).  An event is
admitted when the TAT, less the burst tolerance, is not after ``now``; it then moves
the TAT on by one interval.  The submission rate limiter, the outbound throttle and
the Redis script that shares pacing between nodes all follow this rule; the shared
variants exchange TATs (the later one wins), which is why the table can export and
merge them.  Pure: time is passed in.
"""

from __future__ import annotations

from attrs import define, field

# Float sums of intervals drift by ulps; a caller that comes back after exactly the
# wait it was told must be admitted.
SLACK = 1e-9


def spacing(rate: float, period: float, burst: float) -> tuple[float, float]:
    """``(interval, tolerance)`` of ``rate`` events per ``period`` seconds with ``burst``
    events back to back (at least 1)."""
    if rate <= 0 or period <= 0:
        raise ValueError("rate and period must be positive")
    interval = period / rate
    return interval, interval * (max(burst, 1.0) - 1.0)


@define
class GcraTable:
    """Theoretical arrival times per key, at most ``max_keys`` of them."""

    max_keys: int = 100_000
    _tat: dict[str, float] = field(factory=dict, init=False)

    def admit(self, key: str, interval: float, tolerance: float, now: float) -> float:
        """0.0 when one event for ``key`` may happen at ``now`` (it is counted), else
        the seconds until it may (nothing is counted)."""
        tat = max(self._tat.get(key, now), now)
        allowed_at = tat - tolerance
        if allowed_at - now > SLACK:
            return allowed_at - now
        if key not in self._tat and len(self._tat) >= self.max_keys:
            self._prune(now)
        self._tat[key] = tat + interval
        return 0.0

    def arrival(self, key: str) -> float | None:
        """``key``'s theoretical arrival time (None: no state), to share elsewhere."""
        return self._tat.get(key)

    def merge(self, key: str, tat: float) -> None:
        """Take a TAT counted elsewhere for ``key``: the later of the two wins."""
        if tat > self._tat.get(key, float("-inf")):
            self._tat[key] = tat

    def __len__(self) -> int:
        return len(self._tat)

    def _prune(self, now: float) -> None:
        # A key whose theoretical arrival time has passed holds no state worth keeping.
        for k in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[k]
        while len(self._tat) >= self.max_keys:
            self._tat.pop(next(iter(self._tat)))
