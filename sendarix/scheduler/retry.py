"""When to try a deferred recipient again, and when to give up.

The schedule is a pure function of the attempt count, the message's arrival time, the
current time and the last reply's classification (docs/delivery.md, "Retries and expiry"):

- the n-th retry waits ``intervals[n-1]``; the last interval repeats; every delay is
  multiplied by a random factor in [1 - jitter, 1 + jitter], because retries without
  jitter come back in synchronised storms;
- a greylisting reply is retried after ``greylist_retry`` (or the delay the server
  named, kept between 30 s and 1 h), not on the long schedule;
- another reply that names a delay ("try again in 10 minutes") is retried after it;
- nothing is scheduled past ``received_at + max_lifetime``: the recipient expires.

Randomness comes from a ``random.Random`` the caller passes, so tests are repeatable.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

from attrs import field, frozen

from sendarix.scheduler.classify import Classification

__all__ = [
    "DEFAULT_INTERVALS",
    "DEFAULT_MAX_LIFETIME",
    "GREYLIST_HINT_BOUNDS",
    "HINT_BOUNDS",
    "RetrySchedule",
]

#: The default schedule: 1m, 5m, 15m, 30m, 1h, 2h, 4h, then every 4h.
DEFAULT_INTERVALS: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
DEFAULT_MAX_LIFETIME = 5 * 86400.0

#: A greylisting server's own delay is honoured within these bounds (seconds).
GREYLIST_HINT_BOUNDS = (30.0, 3600.0)
#: Any other server-named delay: at least 30 s (no hammering), at most a day (a longer
#: one would only make the recipient expire early; the normal schedule is safer).
HINT_BOUNDS = (30.0, 86400.0)


class _DeliverySettings(Protocol):
    # The parts of sendarix.config.settings.DeliveryConfig a schedule is made from.
    @property
    def retry_schedule(self) -> tuple[float, ...]: ...
    @property
    def max_lifetime(self) -> float: ...
    @property
    def greylist_retry(self) -> float: ...


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return min(max(value, low), high)


def _positive(instance: object, attribute: object, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")


def _check_intervals(instance: object, attribute: object, value: tuple[float, ...]) -> None:
    if not value:
        raise ValueError("a retry schedule needs at least one interval")
    for v in value:
        _positive(instance, attribute, v)


def _check_jitter(instance: object, attribute: object, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"jitter must be in [0, 1), got {value!r}")


@frozen
class RetrySchedule:
    """Retry intervals (seconds), the lifetime of a message, the greylisting retry and
    the relative jitter applied to scheduled intervals."""

    intervals: tuple[float, ...] = field(
        converter=lambda v: tuple(float(x) for x in v), validator=_check_intervals
    )
    max_lifetime: float = field(converter=float, validator=_positive)
    greylist_retry: float = field(default=300.0, converter=float, validator=_positive)
    jitter: float = field(default=0.10, converter=float, validator=_check_jitter)

    @classmethod
    def default(cls) -> RetrySchedule:
        """The default schedule: 1m ... 4h, then every 4h, for 5 days."""
        return cls(DEFAULT_INTERVALS, DEFAULT_MAX_LIFETIME)

    @classmethod
    def from_config(cls, delivery: _DeliverySettings) -> RetrySchedule:
        """The schedule of a ``[delivery]`` section (``DeliveryConfig``)."""
        return cls(
            intervals=delivery.retry_schedule,
            max_lifetime=delivery.max_lifetime,
            greylist_retry=delivery.greylist_retry,
        )

    def deadline(self, received_at: float) -> float:
        """The time after which a message received at ``received_at`` is expired."""
        return received_at + self.max_lifetime

    def expired(self, received_at: float, now: float) -> bool:
        """True once ``now`` is past the message's lifetime.

        An attempt scheduled exactly at the deadline is still made.
        """
        return now > self.deadline(received_at)

    def base_delay(self, attempts: int) -> float:
        """The un-jittered delay after ``attempts`` attempts (the last interval repeats)."""
        if attempts < 1:
            raise ValueError(f"attempts counts attempts already made (>= 1), got {attempts}")
        return self.intervals[min(attempts, len(self.intervals)) - 1]

    def delay(
        self, attempts: int, rng: random.Random, classification: Classification | None = None
    ) -> float:
        """Seconds until the next attempt, ignoring the lifetime."""
        hint = classification.retry_after if classification is not None else None
        if hint is not None and not (math.isfinite(hint) and hint > 0):
            hint = None  # a nonsensical hint is no hint
        if classification is not None and classification.greylist:
            if hint is None:
                return self.greylist_retry
            return _clamp(hint, GREYLIST_HINT_BOUNDS)
        if hint is not None:
            return _clamp(hint, HINT_BOUNDS)
        base = self.base_delay(attempts)
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def next_attempt(
        self,
        attempts: int,
        received_at: float,
        now: float,
        rng: random.Random,
        classification: Classification | None = None,
    ) -> float | None:
        """When to try again after ``attempts`` attempts (>= 1), or None to expire.

        ``classification`` is the last reply's; a greylisting one or one naming a delay
        overrides the interval schedule.  None means the next attempt would fall past
        ``received_at + max_lifetime``.
        """
        if attempts < 1:
            raise ValueError(f"attempts counts attempts already made (>= 1), got {attempts}")
        when = now + self.delay(attempts, rng, classification)
        if when > self.deadline(received_at):
            return None
        return when
