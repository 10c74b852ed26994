"""The retry schedule: intervals with jitter, the repeating last interval, greylisting
and server-named delays, and expiry at the end of a message's lifetime."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sendarix.config.settings import DeliveryConfig
from sendarix.scheduler.classify import Classification, Verdict
from sendarix.scheduler.retry import (
    DEFAULT_INTERVALS,
    GREYLIST_HINT_BOUNDS,
    HINT_BOUNDS,
    RetrySchedule,
)

T0 = 1_700_000_000.0
DAY = 86400.0

intervals = st.lists(st.floats(1.0, 7 * DAY), min_size=1, max_size=10).map(tuple)
jitters = st.floats(0.0, 0.5)
attempt_counts = st.integers(1, 60)
seeds = st.integers(0, 2**32)
hints = st.floats(0.001, 30 * DAY)


def schedule_of(
    ivals: tuple[float, ...], jitter: float = 0.1, lifetime: float = 1e9
) -> RetrySchedule:
    return RetrySchedule(ivals, max_lifetime=lifetime, jitter=jitter)


def greylisted(retry_after: float | None = None) -> Classification:
    return Classification(Verdict.DEFERRED, "greylist", greylist=True, retry_after=retry_after)


def deferred(retry_after: float | None = None, throttle: bool = False) -> Classification:
    return Classification(
        Verdict.DEFERRED, "rate-limit", retry_after=retry_after, throttle=throttle
    )


class RetryScheduleTests(SynchronousTestCase):
    """RetrySchedule.next_attempt, delay, base_delay and expired."""

    def test_default(self) -> None:
        """The default: 1m 5m 15m 30m 1h 2h 4h, 5 days, 5m greylist, 10%."""
        s = RetrySchedule.default()
        self.assertEqual(s.intervals, (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0))
        self.assertEqual(s.intervals, DEFAULT_INTERVALS)
        self.assertEqual((s.max_lifetime, s.greylist_retry, s.jitter), (5 * DAY, 300.0, 0.10))

    def test_from_config(self) -> None:
        """A [delivery] section gives the schedule it describes."""
        cfg = DeliveryConfig(retry_schedule=(30.0, 90.0), max_lifetime=3600.0, greylist_retry=120.0)
        s = RetrySchedule.from_config(cfg)
        self.assertEqual(s, RetrySchedule((30.0, 90.0), 3600.0, greylist_retry=120.0))
        self.assertEqual(RetrySchedule.from_config(DeliveryConfig()), RetrySchedule.default())

    def test_validation(self) -> None:
        """Empty or non-positive intervals, lifetimes and bad jitter are refused."""
        for bad in (
            lambda: RetrySchedule((), 10.0),
            lambda: RetrySchedule((0.0,), 10.0),
            lambda: RetrySchedule((-1.0,), 10.0),
            lambda: RetrySchedule((math.inf,), 10.0),
            lambda: RetrySchedule((1.0,), 0.0),
            lambda: RetrySchedule((1.0,), 10.0, greylist_retry=0.0),
            lambda: RetrySchedule((1.0,), 10.0, jitter=1.0),
            lambda: RetrySchedule((1.0,), 10.0, jitter=-0.1),
        ):
            self.assertRaises(ValueError, bad)

    def test_attempts_must_be_positive(self) -> None:
        """attempts counts attempts made, so it is at least 1."""
        s = RetrySchedule.default()
        self.assertRaises(ValueError, s.next_attempt, 0, T0, T0, random.Random(1))
        self.assertRaises(ValueError, s.base_delay, 0)

    @given(ivals=intervals, jitter=jitters, attempts=attempt_counts, seed=seeds)
    def test_delay_within_jitter(
        self, ivals: tuple[float, ...], jitter: float, attempts: int, seed: int
    ) -> None:
        """The delay is the interval for this attempt times a factor in [1-j, 1+j]."""
        s = schedule_of(ivals, jitter)
        base = ivals[min(attempts, len(ivals)) - 1]
        self.assertEqual(s.base_delay(attempts), base)
        when = s.next_attempt(attempts, T0, T0 + 10.0, random.Random(seed))
        assert when is not None
        delay = when - (T0 + 10.0)
        slack = 1e-6 * base
        self.assertGreaterEqual(delay, base * (1 - jitter) - slack)
        self.assertLessEqual(delay, base * (1 + jitter) + slack)

    @given(ivals=intervals)
    def test_base_non_decreasing(self, ivals: tuple[float, ...]) -> None:
        """For an ascending interval list, the un-jittered delay never shrinks."""
        s = schedule_of(tuple(sorted(ivals)))
        bases = [s.base_delay(n) for n in range(1, len(ivals) + 20)]
        self.assertEqual(bases, sorted(bases))

    @given(ivals=intervals, extra=st.integers(0, 1000))
    def test_last_interval_repeats(self, ivals: tuple[float, ...], extra: int) -> None:
        """Past the end of the list, the last interval is used again and again."""
        s = schedule_of(ivals)
        self.assertEqual(s.base_delay(len(ivals) + extra), ivals[-1])

    @given(
        ivals=intervals,
        jitter=jitters,
        attempts=attempt_counts,
        seed=seeds,
        lifetime=st.floats(1.0, 10 * DAY),
        age=st.floats(0.0, 11 * DAY),
        classification=st.one_of(
            st.none(),
            st.builds(greylisted, st.one_of(st.none(), hints)),
            st.builds(deferred, st.one_of(st.none(), hints)),
        ),
    )
    def test_never_past_lifetime(
        self,
        ivals: tuple[float, ...],
        jitter: float,
        attempts: int,
        seed: int,
        lifetime: float,
        age: float,
        classification: Classification | None,
    ) -> None:
        """A retry is never scheduled past the lifetime; None exactly when it would be."""
        s = RetrySchedule(ivals, lifetime, jitter=jitter)
        now = T0 + age
        when = s.next_attempt(attempts, T0, now, random.Random(seed), classification)
        delay = s.delay(attempts, random.Random(seed), classification)
        if when is None:
            self.assertGreater(now + delay, T0 + lifetime)
        else:
            self.assertEqual(when, now + delay)
            self.assertLessEqual(when, T0 + lifetime)
            self.assertFalse(s.expired(T0, when))
            self.assertGreater(when, now)

    def test_expired(self) -> None:
        """expired is true only after received_at + max_lifetime."""
        s = RetrySchedule((60.0,), 3600.0)
        self.assertFalse(s.expired(T0, T0))
        self.assertFalse(s.expired(T0, T0 + 3600.0))
        self.assertTrue(s.expired(T0, T0 + 3600.001))
        self.assertEqual(s.deadline(T0), T0 + 3600.0)

    def test_expiry_near_deadline(self) -> None:
        """An attempt that would land after the deadline means: expire now."""
        s = RetrySchedule((600.0,), 3600.0, jitter=0.0)
        rng = random.Random(0)
        self.assertEqual(s.next_attempt(3, T0, T0 + 3000.0, rng), T0 + 3600.0)
        self.assertIsNone(s.next_attempt(3, T0, T0 + 3000.1, rng))

    @given(
        ivals=intervals, attempts=attempt_counts, seed=seeds, greylist_retry=st.floats(1.0, 3600.0)
    )
    def test_greylist_retry(
        self, ivals: tuple[float, ...], attempts: int, seed: int, greylist_retry: float
    ) -> None:
        """A greylisting reply is retried after greylist_retry, whatever the attempt count."""
        s = RetrySchedule(ivals, 1e9, greylist_retry=greylist_retry)
        when = s.next_attempt(attempts, T0, T0 + 5.0, random.Random(seed), greylisted())
        self.assertEqual(when, T0 + 5.0 + greylist_retry)

    @given(hint=hints, attempts=attempt_counts)
    def test_greylist_hint_bounded(self, hint: float, attempts: int) -> None:
        """A greylisting server's own delay is honoured between 30 s and 1 h."""
        s = RetrySchedule.default()
        when = s.next_attempt(attempts, T0, T0, random.Random(1), greylisted(hint))
        low, high = GREYLIST_HINT_BOUNDS
        self.assertEqual(when, T0 + min(max(hint, low), high))

    def test_greylist_examples(self) -> None:
        """300 s is kept; 5 s becomes 30 s; a day becomes an hour."""
        s = RetrySchedule.default()
        rng = random.Random(1)
        self.assertEqual(s.next_attempt(1, T0, T0, rng, greylisted(300.0)), T0 + 300.0)
        self.assertEqual(s.next_attempt(1, T0, T0, rng, greylisted(5.0)), T0 + 30.0)
        self.assertEqual(s.next_attempt(9, T0, T0, rng, greylisted(DAY)), T0 + 3600.0)

    @given(hint=hints, attempts=attempt_counts, throttle=st.booleans())
    def test_retry_hint_honoured(self, hint: float, attempts: int, throttle: bool) -> None:
        """Another reply naming a delay is retried after it (kept between 30 s and a day)."""
        s = RetrySchedule.default()
        when = s.next_attempt(attempts, T0, T0, random.Random(1), deferred(hint, throttle))
        low, high = HINT_BOUNDS
        self.assertEqual(when, T0 + min(max(hint, low), high))

    def test_bad_hints_ignored(self) -> None:
        """A non-finite or non-positive hint falls back to the schedule."""
        s = RetrySchedule((600.0,), 1e9, jitter=0.0)
        for hint in (math.nan, math.inf, 0.0, -5.0):
            self.assertEqual(
                s.next_attempt(1, T0, T0, random.Random(1), deferred(hint)), T0 + 600.0
            )
        c = Classification(Verdict.DEFERRED, "greylist", greylist=True, retry_after=math.nan)
        self.assertEqual(s.next_attempt(1, T0, T0, random.Random(1), c), T0 + 300.0)

    def test_plain_deferral_uses_schedule(self) -> None:
        """A classification without greylisting or a hint follows the intervals."""
        s = RetrySchedule((60.0, 300.0), 1e9, jitter=0.0)
        rng = random.Random(3)
        self.assertEqual(s.next_attempt(1, T0, T0, rng, deferred(throttle=True)), T0 + 60.0)
        self.assertEqual(s.next_attempt(2, T0, T0, rng, deferred()), T0 + 300.0)
        self.assertEqual(s.next_attempt(7, T0, T0, rng, None), T0 + 300.0)

    @given(seed=seeds, attempts=attempt_counts)
    def test_jitter_varies(self, seed: int, attempts: int) -> None:
        """Two generators give different delays; without jitter they agree."""
        s = RetrySchedule.default()
        a = s.next_attempt(attempts, T0, T0, random.Random(seed))
        b = s.next_attempt(attempts, T0, T0, random.Random(seed + 1))
        self.assertNotEqual(a, b)
        self.assertEqual(a, s.next_attempt(attempts, T0, T0, random.Random(seed)))
        flat = RetrySchedule(DEFAULT_INTERVALS, 5 * DAY, jitter=0.0)
        self.assertEqual(
            flat.next_attempt(attempts, T0, T0, random.Random(seed)),
            flat.next_attempt(attempts, T0, T0, random.Random(seed + 1)),
        )

    def test_jitter_spreads(self) -> None:
        """Across many messages the delays spread over most of the jitter band."""
        s = RetrySchedule.default()
        rng = random.Random(42)
        delays = [s.delay(5, rng) for _ in range(500)]
        self.assertLess(min(delays), 3600.0 * 0.92)
        self.assertGreater(max(delays), 3600.0 * 1.08)
        self.assertEqual(len(set(delays)), 500)

    def test_whole_lifetime(self) -> None:
        """Driven by a clock, a never-delivered recipient is retried on the documented
        schedule and expires after five days with about 35 attempts."""
        s = RetrySchedule.default()
        clock = Clock()
        clock.advance(T0)
        rng = random.Random(7)
        attempts = 1
        times = [clock.seconds()]
        while True:
            when = s.next_attempt(attempts, T0, clock.seconds(), rng)
            if when is None:
                break
            clock.advance(when - clock.seconds())
            attempts += 1
            times.append(clock.seconds())
        gaps = [b - a for a, b in zip(times, times[1:])]
        for gap, base in zip(gaps, DEFAULT_INTERVALS):
            self.assertTrue(base * 0.9 <= gap <= base * 1.1, (gap, base))
        for gap in gaps[len(DEFAULT_INTERVALS) :]:
            self.assertTrue(14400.0 * 0.9 <= gap <= 14400.0 * 1.1, gap)
        self.assertLessEqual(times[-1], T0 + 5 * DAY)
        self.assertGreater(times[-1] + 14400.0 * 1.1, T0 + 5 * DAY)
        self.assertTrue(32 <= attempts <= 38, attempts)
