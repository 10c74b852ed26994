"""The bench's report: a ratio is printed only against a Postfix figure that means
something in its own units."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.bench.run import METRICS, _reference


class ReferenceTests(SynchronousTestCase):
    def test_a_median_shown_as_zero_gives_no_ratio(self) -> None:
        """Postfix goes quiet within the second: its 0.4 s shows as "0 s", and a
        ratio against it would be a huge number about nothing."""
        fmt = METRICS["backlog_quiet_s"][2]
        self.assertIsNone(_reference([0.4, 0.2, 0.3], fmt))
        self.assertEqual(_reference([0.4, 2.0, 3.0], fmt), 2.0)

    def test_small_figures_in_a_finer_format_are_kept(self) -> None:
        fmt = METRICS["backlog_down_cpu_ms_per_msg"][2]
        self.assertEqual(_reference([1.38], fmt), 1.38)
        self.assertIsNone(_reference([0.001], fmt))

    def test_no_figure_no_ratio(self) -> None:
        self.assertIsNone(_reference(None, "{:.1f}"))
        self.assertIsNone(_reference([], "{:.1f}"))
