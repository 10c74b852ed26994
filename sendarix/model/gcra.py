"""GCRA, the generic cell rate algorithm: the one pacing rule of the whole relay.

Each key keeps a single number, its theoretical arrival time (TAT).  An event is
admitted when the TAT, less the burst tolerance, is not after ``now``; it then moves
the TAT on by one interval.  A refused event changes nothing and is told how long to
wait, which is exactly when it will be admitted.

The rule lives here, in :mod:`sendarix.model`, because it is a value type with its
arithmetic and nothing else: a frozen :class:`Pacing` (the rate), the TAT (the state,
a plain float) and :func:`step` (the transition, time passed in).  Every stage may
import the model, and each of the three users does:

- the submission rate limiter (:mod:`sendarix.ingress.ratelimit`), yes or no;
- the outbound throttle (:mod:`sendarix.routing.throttle`), how long to wait;
- the cluster-wide throttle (:mod:`sendarix.stores.redis.throttle`), whose Lua script
  is :func:`step` again, so that the check and the update are one atomic step in
  Redis; it takes its parameters from :meth:`Pacing.of` and its results agree with
  this module's to the last bit (a property test pins that).

Shared pacing exchanges TATs, and merging keeps the later one: a later TAT has counted
every event the earlier one did, so two tables that swap their TATs agree and together
admit no more than one table would.
"""

from __future__ import annotations

from attrs import define, field, frozen

# Float sums of intervals drift by ulps; a caller that comes back after exactly the
# wait it was told must be admitted.
SLACK = 1e-9


@frozen
class Pacing:
    """One event every ``interval`` seconds, with up to ``tolerance`` seconds of them
    let through early (the burst)."""

    interval: float
    tolerance: float = 0.0

    @classmethod
    def of(cls, rate: float, period: float, burst: float = 1.0) -> Pacing:
        """``rate`` events per ``period`` seconds with ``burst`` events back to back
        (at least 1).  A non-positive rate or period is a ValueError."""
        if rate <= 0 or period <= 0:
            raise ValueError("rate and period must be positive")
        interval = period / rate
        return cls(interval, interval * (max(burst, 1.0) - 1.0))


@frozen
class Step:
    """What :func:`step` decided: ``wait`` (0.0: admitted) and the TAT to keep."""

    wait: float
    tat: float

    @property
    def admitted(self) -> bool:
        """True when the event was admitted (and counted in ``tat``)."""
        return self.wait == 0.0


def step(tat: float | None, pacing: Pacing, now: float) -> Step:
    """One event at ``now`` for a key whose TAT is ``tat`` (None: never seen).

    Admitted: ``wait`` is 0.0 and ``tat`` has moved on by one interval.  Refused: the
    seconds until it would be admitted, and the TAT unchanged (a refusal implies a TAT
    after ``now``, so it is the one given).
    """
    current = now if tat is None or tat < now else tat
    wait = current - pacing.tolerance - now
    if wait > SLACK:
        return Step(wait, current)
    return Step(0.0, current + pacing.interval)


@define
class GcraTable:
    """Theoretical arrival times per key, at most ``max_keys`` of them."""

    max_keys: int = 100_000
    _tat: dict[str, float] = field(factory=dict, init=False)

    def admit(self, key: str, pacing: Pacing, now: float) -> float:
        """0.0 when one event for ``key`` may happen at ``now`` (it is counted), else
        the seconds until it may (nothing is counted)."""
        result = step(self._tat.get(key), pacing, now)
        if not result.admitted:
            return result.wait
        if key not in self._tat and len(self._tat) >= self.max_keys:
            self._prune(now)
        self._tat[key] = result.tat
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
