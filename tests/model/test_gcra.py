"""Tests for :mod:`sendarix.model.gcra`, the one pacing rule of the relay."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sendarix.ingress.ratelimit import RateLimiter
from sendarix.interfaces import IRateLimiter
from sendarix.model.gcra import GcraTable, Pacing, step

rates = st.integers(1, 50)
bursts = st.integers(1, 10)
periods = st.sampled_from([1.0, 60.0, 3600.0])
# Non-decreasing arrival times: sorted offsets within a minute.
arrivals = st.lists(st.floats(0, 60, allow_nan=False), min_size=1, max_size=200).map(sorted)
# Any state a key may be in: never seen, or a TAT somewhere around ``now``.
tats = st.none() | st.floats(-100, 200, allow_nan=False)


def fold(pacing: Pacing, times: list[float]) -> tuple[list[float], float | None]:
    """The times :func:`step` admits out of ``times``, and the TAT left."""
    tat: float | None = None
    admitted = []
    for t in times:
        result = step(tat, pacing, t)
        tat = result.tat
        if result.admitted:
            admitted.append(t)
    return admitted, tat


class PacingTests(SynchronousTestCase):
    def test_of(self) -> None:
        """A rate per period and a burst make an interval and a tolerance."""
        self.assertEqual(Pacing.of(10, 1.0, 1), Pacing(0.1, 0.0))
        self.assertEqual(Pacing.of(2, 60.0, 3), Pacing(30.0, 60.0))
        self.assertEqual(Pacing.of(2, 60.0, 0.5), Pacing(30.0, 0.0))  # burst at least 1
        self.assertRaises(ValueError, Pacing.of, 0, 1.0, 1)
        self.assertRaises(ValueError, Pacing.of, 1, 0.0, 1)


class StepTests(SynchronousTestCase):
    def test_first_event(self) -> None:
        """A key never seen is admitted, its TAT one interval after ``now``."""
        result = step(None, Pacing(2.0), 10.0)
        self.assertTrue(result.admitted)
        self.assertEqual(result.tat, 12.0)

    def test_refusal_keeps_the_tat(self) -> None:
        """A refused event changes nothing and is told the wait."""
        result = step(12.0, Pacing(2.0), 10.5)
        self.assertFalse(result.admitted)
        self.assertEqual((result.wait, result.tat), (1.5, 12.0))

    @given(tats, rates, periods, bursts, st.floats(0, 100, allow_nan=False))
    def test_wait_is_exact(
        self, tat: float | None, rate: int, period: float, burst: int, now: float
    ) -> None:
        """Whatever the state, a refused caller is refused until just before its
        wait is over and admitted after exactly that wait."""
        pacing = Pacing.of(rate, period, burst)
        result = step(tat, pacing, now)
        if result.admitted:
            return
        self.assertGreater(result.wait, 0.0)
        self.assertEqual(result.tat, tat)
        self.assertTrue(step(tat, pacing, now + result.wait).admitted)
        self.assertFalse(step(tat, pacing, now + result.wait * 0.99 - 1e-6).admitted)

    @given(rates, periods, bursts, arrivals)
    def test_never_over_rate(
        self, rate: int, period: float, burst: int, times: list[float]
    ) -> None:
        """Over any span, admissions stay within burst + rate x span / period."""
        admitted, _ = fold(Pacing.of(rate, period, burst), times)
        for i, start in enumerate(admitted):
            for j in range(i, len(admitted)):
                span = admitted[j] - start
                self.assertLessEqual(j - i + 1, burst + rate * span / period + 1e-6)

    @given(rates, bursts, arrivals)
    def test_burst_at_once(self, rate: int, burst: int, times: list[float]) -> None:
        """Events all at one instant: exactly ``burst`` are admitted."""
        admitted, _ = fold(Pacing.of(rate, 1.0, burst), [times[0]] * (burst + 3))
        self.assertEqual(len(admitted), burst)


class GcraTableTests(SynchronousTestCase):
    def test_wait_is_exact(self) -> None:
        """A refused caller told to wait w is admitted after exactly w."""
        table = GcraTable()
        pacing = Pacing(0.3)
        self.assertEqual(table.admit("k", pacing, 100.0), 0.0)
        wait = table.admit("k", pacing, 100.1)
        self.assertAlmostEqual(wait, 0.2)
        self.assertEqual(table.admit("k", pacing, 100.1 + wait), 0.0)

    @given(rates, bursts, arrivals)
    def test_is_the_fold_of_step(self, rate: int, burst: int, times: list[float]) -> None:
        """A table admits what :func:`step` admits and keeps the TAT it leaves."""
        pacing = Pacing.of(rate, 1.0, burst)
        table = GcraTable()
        admitted = [t for t in times if table.admit("k", pacing, t) == 0.0]
        self.assertEqual((admitted, table.arrival("k")), fold(pacing, times))

    @given(rates, bursts, arrivals)
    def test_never_over_rate(self, rate: int, burst: int, times: list[float]) -> None:
        """Over any span, admissions stay within burst + rate x span."""
        pacing = Pacing.of(rate, 1.0, burst)
        table = GcraTable()
        admitted = [t for t in times if table.admit("k", pacing, t) == 0.0]
        for i, start in enumerate(admitted):
            for j in range(i, len(admitted)):
                span = admitted[j] - start
                self.assertLessEqual(j - i + 1, burst + rate * span + 1e-6)

    @given(rates, arrivals)
    def test_merge_keeps_the_later(self, rate: int, times: list[float]) -> None:
        """Two tables that exchange their arrival times never admit more together
        than one table alone would let a single process do, per exchanged key."""
        pacing = Pacing.of(rate, 1.0, 1)
        one, two = GcraTable(), GcraTable()
        for n, t in enumerate(times):
            table, other = (one, two) if n % 2 == 0 else (two, one)
            if table.admit("k", pacing, t) == 0.0:
                tat = table.arrival("k")
                assert tat is not None
                other.merge("k", tat)
        self.assertEqual(one.arrival("k"), two.arrival("k"))

    @given(rates, bursts, arrivals, st.lists(st.integers(0, 2), min_size=200, max_size=200))
    def test_exchanging_tables_act_as_one(
        self, rate: int, burst: int, times: list[float], who: list[int]
    ) -> None:
        """Three tables that pass on each admission's TAT at once admit exactly what
        one table seeing every event would, whichever table each event reaches."""
        pacing = Pacing.of(rate, 1.0, burst)
        tables = [GcraTable() for _ in range(3)]
        alone = GcraTable()
        for t, n in zip(times, who, strict=False):
            shared = tables[n].admit("k", pacing, t)
            self.assertEqual(shared, alone.admit("k", pacing, t))
            tat = tables[n].arrival("k")
            if shared == 0.0 and tat is not None:
                for other in tables:
                    other.merge("k", tat)
        self.assertEqual({t.arrival("k") for t in tables}, {alone.arrival("k")})

    @given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=6))
    def test_merge_order_does_not_matter(self, tats: list[float]) -> None:
        """Merged TATs leave the latest of them, in whatever order they come."""
        ends = set()
        for order in itertools.islice(itertools.permutations(tats), 24):
            table = GcraTable()
            for tat in order:
                table.merge("k", tat)
            ends.add(table.arrival("k"))
        self.assertEqual(ends, {max(tats)})

    def test_bounded_keys(self) -> None:
        """At most max_keys keys are kept; expired ones go first."""
        table = GcraTable(max_keys=3)
        for i in range(10):
            table.admit(f"k{i}", Pacing(1.0), float(i))
        self.assertLessEqual(len(table), 3)


class RateLimiterTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRateLimiter, RateLimiter()))

    def test_burst_defaults_to_rate(self) -> None:
        limiter = RateLimiter()
        self.assertEqual([limiter.allow("c", 3, 60.0, 0.0) for _ in range(4)],
                         [True, True, True, False])
        self.assertFalse(limiter.allow("c", 0, 60.0, 0.0))
