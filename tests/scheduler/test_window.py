"""The destination concurrency window: pure logic, with hypothesis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.scheduler.window import DestinationWindow, WindowSlot

events = st.lists(st.sampled_from(["acquire", "success", "failure", "release", "tick"]),
                  max_size=300)


class DestinationWindowTests(SynchronousTestCase):
    """Growth on success, shrink on failure, dead destinations, bounds."""

    @given(events)
    def test_never_over_limit_or_bounds(self, seq: list[str]) -> None:
        """Whatever happens, active connections never exceed the maximum and the
        window stays within [minimum, maximum]."""
        w = DestinationWindow(initial=2, maximum=6)
        now = 0.0
        for op in seq:
            if op == "acquire":
                w.try_acquire(now)
            elif op == "success" and w.active:
                w.success()
            elif op == "failure" and w.active:
                w.failure(now)
            elif op == "release":
                w.release()
            else:
                now += 100.0
            self.assertLessEqual(w.active, w.maximum)
            self.assertTrue(w.minimum <= w.window <= w.maximum)

    def test_successes_grow_the_window(self) -> None:
        """A cohort of successes adds about one slot, up to the maximum."""
        w = DestinationWindow(initial=2, maximum=4)
        for _ in range(2):
            self.assertTrue(w.try_acquire(0))
            w.success()
        self.assertEqual(w.limit, 3)
        for _ in range(50):
            w.try_acquire(0)
            w.success()
        self.assertEqual(w.limit, 4)

    def test_window_full(self) -> None:
        """No more slots than the window allows at once."""
        w = DestinationWindow(initial=2, maximum=4)
        self.assertTrue(w.try_acquire(0))
        self.assertTrue(w.try_acquire(0))
        self.assertFalse(w.try_acquire(0))

    def test_failures_shrink_then_dead_then_probe(self) -> None:
        """Failures shrink the window to its minimum; failed cohorts at the minimum
        declare the destination dead; after suspend_for one probe is allowed."""
        w = DestinationWindow(initial=3, maximum=5, dead_after=2, suspend_for=60)
        for _ in range(10):
            if not w.try_acquire(0):
                break
            w.failure(0)
        self.assertTrue(w.is_dead(1))
        self.assertFalse(w.try_acquire(30))
        self.assertTrue(w.try_acquire(61))
        self.assertFalse(w.try_acquire(61))
        w.success()
        self.assertFalse(w.is_dead(62))

    def test_success_resets_failed_cohorts(self) -> None:
        """A success between failures keeps the destination alive."""
        w = DestinationWindow(initial=1, maximum=2, dead_after=2)
        for _ in range(20):
            w.try_acquire(0)
            w.failure(0)
            w.try_acquire(0)
            w.success()
        self.assertFalse(w.is_dead(0))


#: Steps on a window's slots: take one, or give back slot number N (mod those taken)
#: in one of the three ways, any number of times.
slot_steps = st.lists(
    st.one_of(
        st.just(("acquire", 0)),
        st.tuples(st.sampled_from(["success", "failure", "release"]), st.integers(0, 50)),
    ),
    max_size=200,
)


class WindowSlotTests(SynchronousTestCase):
    """A connection's slot goes back once, however often its paths give it back."""

    @given(slot_steps)
    def test_active_counts_the_slots_held(self, steps: list[tuple[str, int]]) -> None:
        """Slots given back twice, or with a verdict after a release, never free
        another connection's: ``active`` is always the number of slots held."""
        w = DestinationWindow(initial=3, maximum=8, dead_after=10**6)
        slots: list[WindowSlot] = []
        for op, n in steps:
            if op == "acquire":
                slot = w.acquire(0.0)
                if slot is not None:
                    slots.append(slot)
            elif slots:
                slot = slots[n % len(slots)]
                if op == "failure":
                    slot.failure(0.0)
                else:
                    getattr(slot, op)()
            self.assertEqual(w.active, sum(s.held for s in slots))

    def test_only_the_first_verdict_counts(self) -> None:
        """A success after the slot went back does not grow the window."""
        w = DestinationWindow(initial=2, maximum=4)
        slot = w.acquire(0.0)
        assert slot is not None
        slot.failure(0.0)
        window = w.window
        slot.success()
        self.assertEqual((w.window, w.active), (window, 0))

    def test_full_window_gives_no_slot(self) -> None:
        w = DestinationWindow(initial=1, maximum=1)
        self.assertIsNotNone(w.acquire(0.0))
        self.assertIsNone(w.acquire(0.0))
