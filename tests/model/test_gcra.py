"""Tests for :mod:`sendarix.model.gcra`, the one pacing rule of the relay."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.ingress.ratelimit import RateLimiter
from sendarix.interfaces import IRateLimiter
from sendarix.model.gcra import GcraTable, spacing

rates = st.integers(1, 50)
bursts = st.integers(1, 10)
# Non-decreasing arrival times: sorted offsets within a minute.
arrivals = st.lists(st.floats(0, 60, allow_nan=False), min_size=1, max_size=200).map(sorted)


class GcraTests(SynchronousTestCase):
    def test_spacing(self) -> None:
        self.assertEqual(spacing(10, 1.0, 1), (0.1, 0.0))
        self.assertEqual(spacing(2, 60.0, 3), (30.0, 60.0))
        self.assertRaises(ValueError, spacing, 0, 1.0, 1)

    def test_wait_is_exact(self) -> None:
        """A refused caller told to wait w is admitted after exactly w."""
        table = GcraTable()
        self.assertEqual(table.admit("k", 0.3, 0.0, 100.0), 0.0)
        wait = table.admit("k", 0.3, 0.0, 100.1)
        self.assertAlmostEqual(wait, 0.2)
        self.assertEqual(table.admit("k", 0.3, 0.0, 100.1 + wait), 0.0)

    @given(rates, bursts, arrivals)
    def test_never_over_rate(self, rate: int, burst: int, times: list[float]) -> None:
        """Over any span, admissions stay within burst + rate x span."""
        interval, tolerance = spacing(rate, 1.0, burst)
        table = GcraTable()
        admitted = [t for t in times if table.admit("k", interval, tolerance, t) == 0.0]
        for i, start in enumerate(admitted):
            for j in range(i, len(admitted)):
                span = admitted[j] - start
                self.assertLessEqual(j - i + 1, burst + rate * span + 1e-6)

    @given(rates, arrivals)
    def test_merge_keeps_the_later(self, rate: int, times: list[float]) -> None:
        """Two tables that exchange their arrival times never admit more together
        than one table alone would let a single process do, per exchanged key."""
        interval, tolerance = spacing(rate, 1.0, 1)
        one, two = GcraTable(), GcraTable()
        for n, t in enumerate(times):
            table, other = (one, two) if n % 2 == 0 else (two, one)
            if table.admit("k", interval, tolerance, t) == 0.0:
                tat = table.arrival("k")
                assert tat is not None
                other.merge("k", tat)
        self.assertEqual(one.arrival("k"), two.arrival("k"))

    def test_bounded_keys(self) -> None:
        """At most max_keys keys are kept; expired ones go first."""
        table = GcraTable(max_keys=3)
        for i in range(10):
            table.admit(f"k{i}", 1.0, 0.0, float(i))
        self.assertLessEqual(len(table), 3)


class RateLimiterTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRateLimiter, RateLimiter()))

    def test_burst_defaults_to_rate(self) -> None:
        limiter = RateLimiter()
        self.assertEqual([limiter.allow("c", 3, 60.0, 0.0) for _ in range(4)],
                         [True, True, True, False])
        self.assertFalse(limiter.allow("c", 0, 60.0, 0.0))
