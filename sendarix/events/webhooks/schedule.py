"""When a failed webhook batch is tried again, and when it is given up (pure).

A schedule lists, in seconds after the batch's first attempt, when each attempt is
due: the Standard Webhooks schedule is immediately, then 5 s, 5 min, 30 min, 2 h,
5 h, 10 h, 14 h, 20 h and 24 h (:data:`sendarix.model.webhook.STANDARD_RETRY_SCHEDULE`).
After the last attempt fails the batch is dead-lettered, so a batch is given up about
24 hours after it was first sent.  A ``Retry-After`` answer puts the next attempt
later (never earlier), but not past the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE


@frozen
class Retry:
    """Try again at ``due`` (POSIX seconds)."""

    due: float


@frozen
class GiveUp:
    """Dead-letter the batch."""


def _check(schedule: Sequence[float]) -> None:
    if not schedule or any(b < a for a, b in zip(schedule, schedule[1:], strict=False)):
        raise ValueError("a retry schedule is a non-empty list of non-decreasing offsets")


def after_failure(
    created: float,
    attempts_failed: int,
    now: float,
    schedule: Sequence[float] = STANDARD_RETRY_SCHEDULE,
    retry_after: float | None = None,
) -> Retry | GiveUp:
    """What to do after the ``attempts_failed``-th failure (1 for the first) of a batch
    whose first attempt was due at ``created``.

    The next attempt is the schedule's next entry (at once when that time has passed
    already), or ``now + retry_after`` when the receiver asked for more time, capped at
    the last entry; when the schedule has no entry left, give up.
    """
    _check(schedule)
    if attempts_failed < 1:
        raise ValueError("after_failure is asked after an attempt failed")
    if attempts_failed >= len(schedule):
        return GiveUp()
    due = max(now, created + schedule[attempts_failed])
    if retry_after is not None and retry_after > 0:
        due = max(due, min(now + retry_after, created + schedule[-1]))
    return Retry(due)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date),
    or None when there is none or it cannot be read."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
