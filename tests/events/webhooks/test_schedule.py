"""When a failed webhook batch is tried again and when it is given up."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.events.webhooks.schedule import GiveUp, Retry, after_failure, parse_retry_after
from sendarix.model.webhook import STANDARD_RETRY_SCHEDULE

T0 = 1_800_000_000.0
HOUR = 3600.0

schedules = st.lists(st.floats(0.0, 48 * HOUR), min_size=1, max_size=12).map(
    lambda xs: tuple(sorted(xs))
)


class ScheduleTests(SynchronousTestCase):
    def test_standard_schedule(self) -> None:
        """Attempts when every one fails at once: the Standard Webhooks times, then
        the batch is given up (ten attempts in all, the last 24 h after the first)."""
        due = [T0]
        for failed in range(1, 11):
            decision = after_failure(T0, failed, due[-1])
            if isinstance(decision, GiveUp):
                break
            assert isinstance(decision, Retry)
            due.append(decision.due)
        self.assertEqual(
            [d - T0 for d in due],
            [0, 5, 300, 1800, 2 * HOUR, 5 * HOUR, 10 * HOUR, 14 * HOUR, 20 * HOUR, 24 * HOUR],
        )
        self.assertEqual(after_failure(T0, 10, T0 + 24 * HOUR), GiveUp())

    def test_late_attempt_goes_at_once(self) -> None:
        """An attempt that came late is followed by the next one at once, if that is due."""
        self.assertEqual(after_failure(T0, 1, T0 + 60), Retry(T0 + 60))

    def test_retry_after(self) -> None:
        """Retry-After puts the next attempt later, never earlier, never past the last."""
        self.assertEqual(after_failure(T0, 1, T0, retry_after=120), Retry(T0 + 120))
        self.assertEqual(after_failure(T0, 2, T0 + 5, retry_after=1), Retry(T0 + 300))
        self.assertEqual(
            after_failure(T0, 2, T0 + 5, retry_after=10 * 86400), Retry(T0 + 24 * HOUR)
        )

    def test_custom_schedule(self) -> None:
        self.assertEqual(after_failure(T0, 1, T0, (0, 1, 2)), Retry(T0 + 1))
        self.assertEqual(after_failure(T0, 3, T0 + 2, (0, 1, 2)), GiveUp())
        with self.assertRaises(ValueError):
            after_failure(T0, 1, T0, (5, 1))
        with self.assertRaises(ValueError):
            after_failure(T0, 0, T0)

    @given(schedules, st.integers(1, 20), st.floats(0, 72 * HOUR),
           st.none() | st.floats(0, 72 * HOUR))
    def test_properties(
        self, schedule: tuple[float, ...], failed: int, elapsed: float, retry_after: float | None
    ) -> None:
        """Never before now, never past the last attempt (unless now is past it), and
        given up exactly when the schedule is used up."""
        now = T0 + elapsed
        decision = after_failure(T0, failed, now, schedule, retry_after)
        if failed >= len(schedule):
            self.assertEqual(decision, GiveUp())
            return
        assert isinstance(decision, Retry)
        self.assertGreaterEqual(decision.due, now)
        self.assertGreaterEqual(decision.due, T0 + schedule[failed])
        self.assertLessEqual(decision.due, max(now, T0 + schedule[-1]))

    def test_standard_schedule_constant(self) -> None:
        self.assertEqual(STANDARD_RETRY_SCHEDULE[0], 0.0)
        self.assertEqual(STANDARD_RETRY_SCHEDULE[-1], 86400.0)


class RetryAfterTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_retry_after("120", T0), 120.0)
        when = datetime.fromtimestamp(T0 + 90, UTC)
        self.assertEqual(parse_retry_after(format_datetime(when, usegmt=True), T0), 90.0)
        self.assertEqual(parse_retry_after(format_datetime(when, usegmt=True), T0 + 100), 0.0)
        for bad in (None, "", "soon", "-5", "1.5"):
            self.assertIsNone(parse_retry_after(bad, T0), bad)
