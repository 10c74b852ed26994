"""Tests for sendarix.throttle: GCRA pacing, connection caps, adaptive rates."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.interfaces import IThrottle
from sendarix.throttle import AdaptiveRate, MemoryThrottle, is_rate_signal


class MemoryThrottleTests(SynchronousTestCase):
    """MemoryThrottle paces messages and caps connections."""

    def test_interface(self) -> None:
        """MemoryThrottle provides IThrottle."""
        self.assertTrue(verifyObject(IThrottle, MemoryThrottle()))

    @settings(max_examples=50, deadline=None)
    @given(
        rate=st.integers(1, 50),
        period=st.sampled_from([1.0, 60.0, 3600.0]),
        burst=st.integers(1, 5),
        spans=st.integers(1, 20),
    )
    def test_admits_exactly_the_rate(
        self, rate: int, period: float, burst: int, spans: int
    ) -> None:
        """A sender that retries exactly when told sends burst + rate per period
        over time, never more."""
        throttle = MemoryThrottle(burst=float(burst))
        # Stop half an interval short of the span, away from float ties.
        now, admitted, end = 0.0, 0, spans * period - period / rate / 2
        while now < end:
            wait = throttle.admit("k", rate, period, now)
            if wait == 0.0:
                admitted += 1
            else:
                self.assertGreater(wait, 0.0)
                now += wait
        # Admissions at t = 0, interval, 2*interval, ... before ``end`` plus the burst.
        self.assertEqual(admitted, rate * spans + burst - 1)

    def test_wait_does_not_count(self) -> None:
        """A refused ask is not counted: asking again early changes nothing."""
        throttle = MemoryThrottle()
        self.assertEqual(throttle.admit("k", 1, 10.0, 0.0), 0.0)
        self.assertEqual(throttle.admit("k", 1, 10.0, 1.0), 9.0)
        self.assertEqual(throttle.admit("k", 1, 10.0, 2.0), 8.0)
        self.assertEqual(throttle.admit("k", 1, 10.0, 10.0), 0.0)

    def test_keys_independent(self) -> None:
        """Pacing one key does not delay another."""
        throttle = MemoryThrottle()
        self.assertEqual(throttle.admit("a", 1, 60.0, 0.0), 0.0)
        self.assertEqual(throttle.admit("b", 1, 60.0, 0.0), 0.0)
        self.assertGreater(throttle.admit("a", 1, 60.0, 0.0), 0.0)

    def test_bad_rate(self) -> None:
        """A non-positive rate is a programming error."""
        self.assertRaises(ValueError, MemoryThrottle().admit, "k", 0, 1.0, 0.0)

    @settings(max_examples=50, deadline=None)
    @given(
        limit=st.integers(1, 10),
        ops=st.lists(st.booleans(), max_size=100),
    )
    def test_connection_cap_never_exceeded(self, limit: int, ops: list[bool]) -> None:
        """Whatever the order of acquires and releases, open connections stay
        within the limit and the count matches what was granted."""
        throttle = MemoryThrottle()
        held = 0
        for acquire in ops:
            if acquire:
                granted = throttle.acquire_connection("k", limit, 0.0)
                self.assertEqual(granted, held < limit)
                held += granted
            elif held:
                throttle.release_connection("k")
                held -= 1
            self.assertLessEqual(throttle.connections("k"), limit)
            self.assertEqual(throttle.connections("k"), held)


class AdaptiveRateTests(SynchronousTestCase):
    """AdaptiveRate halves on rate signals and recovers on success."""

    def test_halves_to_floor(self) -> None:
        """Each rate signal halves the rate, never below the floor."""
        rate = AdaptiveRate(100.0, 20.0)
        rate.throttled(0.0)
        self.assertEqual(rate.rate, 50.0)
        rate.throttled(0.0)
        self.assertEqual(rate.rate, 25.0)
        rate.throttled(0.0)
        self.assertEqual(rate.rate, 20.0)

    def test_recovers_additively(self) -> None:
        """Each success adds a twentieth of the base rate, up to the base rate."""
        rate = AdaptiveRate(100.0, 1.0)
        rate.throttled(0.0)
        for expected in (55.0, 60.0, 65.0):
            rate.success()
            self.assertAlmostEqual(rate.rate, expected)
        for _ in range(20):
            rate.success()
        self.assertEqual(rate.rate, 100.0)

    def test_suspension(self) -> None:
        """A throttle with suspend_for suspends until then."""
        rate = AdaptiveRate(10.0, 1.0)
        rate.throttled(100.0, suspend_for=60.0)
        self.assertTrue(rate.is_suspended(159.0))
        self.assertFalse(rate.is_suspended(160.0))

    def test_on_reply(self) -> None:
        """421 and 4.7.x throttle; 2xx recovers; other replies change nothing."""
        rate = AdaptiveRate(40.0, 1.0)
        self.assertTrue(rate.on_reply(421, None, 0.0))
        self.assertEqual(rate.rate, 20.0)
        self.assertTrue(rate.on_reply(451, "4.7.1", 0.0))
        self.assertEqual(rate.rate, 10.0)
        self.assertFalse(rate.on_reply(450, "4.2.0", 0.0))
        self.assertEqual(rate.rate, 10.0)
        self.assertFalse(rate.on_reply(250, "2.0.0", 0.0))
        self.assertEqual(rate.rate, 12.0)

    def test_is_rate_signal(self) -> None:
        """Only 421 and 4.7.x are rate signals."""
        self.assertTrue(is_rate_signal(421))
        self.assertTrue(is_rate_signal(450, "4.7.0"))
        self.assertFalse(is_rate_signal(550, "5.7.1"))
        self.assertFalse(is_rate_signal(451, "4.3.0"))

    def test_bad_floor(self) -> None:
        """The floor must be positive and at most the base rate."""
        self.assertRaises(ValueError, AdaptiveRate, 10.0, 20.0)
        self.assertRaises(ValueError, AdaptiveRate, 10.0, 0.0)
