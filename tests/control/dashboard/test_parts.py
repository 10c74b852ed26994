"""The dashboard's parts without a node: escaping, charts, figures and sessions."""

from __future__ import annotations

from attrs import evolve
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sendarix.control.dashboard.charts import _nice_max, stacked_bars
from sendarix.control.dashboard.figures import (
    DAY,
    HOUR,
    duration,
    provider_rates,
    queue_ages,
    series,
)
from sendarix.control.dashboard.markup import Html, escape, html, join, table
from sendarix.control.dashboard.pages import sites_section
from sendarix.model.dashboard import SessionRules, same_token, session_key
from sendarix.model.event import Event
from sendarix.model.message import (
    Envelope,
    MessageMeta,
    RecipientRecord,
    RecipientStatus,
    StoredMessage,
)

NOW = 1_800_000_000.0  # a whole hour


def event(kind: str, at: float, provider: str | None = None, n: int = 1) -> Event:
    recipients = tuple(f"r{i}@x.test" for i in range(n))
    return Event(id=f"{kind}{at}", type=kind, timestamp=at, provider=provider,
                 recipient=recipients[0], recipients=recipients if kind == "accepted" else ())


class MarkupTests(SynchronousTestCase):
    def test_values_are_escaped_markup_is_not(self) -> None:
        out = html("<p title=\"$t\">$b</p>", t='"x"', b=Html("<b>ok</b>"))
        self.assertEqual(out, '<p title="&quot;x&quot;"><b>ok</b></p>')
        self.assertEqual(escape(None), "")
        self.assertEqual(join(["<", Html("<br>")]), "&lt;<br>")

    def test_table_cells(self) -> None:
        out = table(["a"], [["<script>"]])
        self.assertIn("<td>&lt;script&gt;</td>", out)
        self.assertIn("none", table(["a"], []))


class ChartTests(SynchronousTestCase):
    def test_axis_top(self) -> None:
        self.assertEqual([_nice_max(v) for v in (0, 1, 3, 7, 12, 51)], [1, 1, 5, 10, 20, 100])

    def test_bars_stack_and_escape(self) -> None:
        svg = stacked_bars("T<", ["a", "b"], {"delivered": [2, 0], "bounced": [1, 0]})
        self.assertEqual(svg.count("<rect"), 2)
        self.assertIn("T&lt;", svg)
        self.assertNotIn("style=", svg)  # colours come from the stylesheet
        self.assertIn('class="series-bounced"', svg)


class FigureTests(SynchronousTestCase):
    def test_series_buckets(self) -> None:
        events = [event("delivered", NOW - 10), event("delivered", NOW - 299),
                  event("bounced", NOW - 3000), event("accepted", NOW - 5, n=3),
                  event("delivered", NOW - 4000)]
        hour = series(events, HOUR, NOW - 1)
        self.assertEqual(len(hour.labels), 12)
        self.assertEqual(hour.counts["delivered"][-1], 2)
        self.assertEqual(sum(hour.counts["delivered"]), 2)  # the older one is outside
        self.assertEqual(hour.counts["accepted"][-1], 3)
        self.assertEqual(sum(hour.counts["bounced"]), 1)
        self.assertEqual(hour.labels[-1], "07:55")
        day = series(events, DAY, NOW - 1)
        self.assertEqual(sum(day.counts["delivered"]), 3)
        self.assertEqual(day.pick(["expired"]), {"expired": [0] * 24})

    def test_provider_rates(self) -> None:
        events = [event("delivered", NOW, "gmail")] * 3 + [
            event("bounced", NOW, "gmail"), event("deferred", NOW, None),
            event("accepted", NOW, "gmail"),
        ]
        gmail, other = provider_rates(events)
        self.assertEqual((gmail.provider, gmail.attempts, gmail.bounce_rate), ("gmail", 4, 0.25))
        self.assertEqual((other.provider, other.deferral_rate), ("other", 1.0))

    def test_queue_ages(self) -> None:
        def message(
            qid: str, received: float, *records: tuple[str, RecipientStatus]
        ) -> StoredMessage:
            return StoredMessage(
                queue_id=qid, envelope=Envelope("a@b.test", tuple(a for a, _ in records)),
                meta=MessageMeta(tenant="t", received_at=received), size=1,
                recipients=tuple(RecipientRecord(a, a.split("@")[1], s) for a, s in records),
            )

        ages = queue_ages([
            message("1", NOW - 600, ("x@a.test", RecipientStatus.PENDING),
                    ("y@b.test", RecipientStatus.DELIVERED)),
            message("2", NOW - 60, ("z@a.test", RecipientStatus.DEFERRED),
                    ("w@b.test", RecipientStatus.PENDING)),
        ], NOW)
        self.assertEqual([(a.domain, a.waiting, a.oldest) for a in ages],
                         [("a.test", 2, 600.0), ("b.test", 1, 60.0)])
        self.assertEqual([duration(s) for s in (5, 600, 7200, 200000)],
                         ["5 s", "10 min", "2 h", "2 d"])

    def test_sites_section(self) -> None:
        state = {"sites": [{"site": "gmail", "max_connections": 5, "window": 2, "queued": 1,
                            "open": 0, "rate": None, "throttled": 0, "suspended_until": None,
                            "held_until": NOW + 600}],
                 "pools": {"relay": {"relay/10.0.0.1:25": "open"}}, "egress": []}
        out = sites_section(state, NOW, "tok")
        self.assertIn('id="resume-gmail"', out)
        self.assertIn("10 min", out)
        self.assertIn("status-open", out)


class SessionRuleTests(SynchronousTestCase):
    """When a session ends, decided without a store (time from a Clock)."""

    def test_idle_and_lifetime(self) -> None:
        clock = Clock()
        rules = SessionRules(idle=10.0, lifetime=25.0)
        s = rules.new("ops", "h", "*", True, clock.seconds())
        self.assertGreaterEqual(len(s.id), 40)
        self.assertNotEqual(s.id, s.csrf)
        self.assertEqual(rules.ends(s), 10.0)
        clock.advance(9)
        self.assertTrue(rules.live(s, clock.seconds()))
        s = evolve(s, seen=clock.seconds())  # a request: the idle time starts again
        clock.advance(9)
        self.assertTrue(rules.live(s, clock.seconds()))
        self.assertEqual(rules.left(s, clock.seconds()), 1.0)
        clock.advance(11)
        self.assertFalse(rules.live(s, clock.seconds()))
        self.assertEqual(rules.left(s, clock.seconds()), 0.0)
        t = rules.new("ops", "h", "*", True, clock.seconds())
        for _ in range(2):
            clock.advance(9)
            t = evolve(t, seen=clock.seconds())
        # The lifetime caps what is left, however recent the last request.
        self.assertEqual(rules.left(t, clock.seconds()), 7.0)
        clock.advance(9)
        self.assertFalse(rules.live(t, clock.seconds()))  # past its lifetime

    def test_stored_key_and_tokens(self) -> None:
        """The stores' key is a SHA-256 of the id, not the id; tokens compare in
        constant time."""
        s = SessionRules().new("a", "h", "t", False, 0.0)
        key = session_key(s.id)
        self.assertEqual(len(key), 64)
        self.assertNotIn(s.id, key)
        self.assertEqual(key, session_key(s.id))
        self.assertNotEqual(key, session_key(s.id + "x"))
        self.assertNotEqual(s.id, SessionRules().new("a", "h", "t", False, 0.0).id)
        self.assertTrue(same_token("x", "x"))
        self.assertFalse(same_token(None, "x"))
        self.assertFalse(same_token("y", "x"))
