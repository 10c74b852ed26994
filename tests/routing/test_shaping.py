"""Tests for sendarix.routing.shaping: per-site limits from the provider table and the
adaptive response to rate-limit replies."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sendarix.config.loader import parse_config
from sendarix.routing.providers import ProviderTable
from sendarix.routing.shaping import Shaping, strictest_tls
from sendarix.routing.throttle import MemoryThrottle


def shaping(delivery: dict[str, object] | None = None, **provider: object) -> Shaping:
    config = parse_config(
        {"provider": {"bulk": {"mx_suffixes": ["bulk.test"], **provider}},
         "delivery": {"concurrency": 8, "max_messages_per_connection": 40,
                      **(delivery or {})}},
        ".",
    )
    return Shaping(ProviderTable.default().merged(config.providers), config.delivery)


class ShapingTests(SynchronousTestCase):
    """What a site allows."""

    def test_provider_limits(self) -> None:
        """A provider's limits apply, never above [delivery]'s."""
        shape = shaping(max_connections=2, messages_per_connection=100, rate="120/min",
                        tls="required").get("bulk")
        self.assertEqual(shape.max_connections, 2)
        self.assertEqual(shape.messages_per_connection, 40)
        self.assertEqual(shape.tls, "encrypt")
        self.assertEqual((shape.current_rate, shape.period), (120.0, 60.0))
        self.assertLessEqual(shape.window.limit, 2)

    def test_per_source_cap(self) -> None:
        """max_connections_per_source is kept, never above the site's own cap; without
        it there is no per-source cap."""
        self.assertEqual(
            shaping(max_connections=3, max_connections_per_source=5)
            .get("bulk").max_connections_per_source, 3,
        )
        self.assertEqual(
            shaping(max_connections_per_source=1).get("bulk").max_connections_per_source, 1
        )
        self.assertIsNone(shaping().get("bulk").max_connections_per_source)

    def test_unknown_site(self) -> None:
        """A site that is no provider gets [delivery]'s limits and no pacing."""
        shape = shaping().get("mx:mx1.example.org")
        self.assertEqual((shape.max_connections, shape.messages_per_connection), (8, 40))
        self.assertIsNone(shape.current_rate)
        self.assertEqual(shape.tls, "may")

    def test_builtin_providers_require_tls(self) -> None:
        """The major providers of the built-in table require TLS."""
        self.assertEqual(shaping().get("gmail").tls, "encrypt")

    def test_same_object(self) -> None:
        """A site's state is kept between uses."""
        s = shaping()
        self.assertIs(s.get("bulk"), s.get("bulk"))

    def test_strictest_tls(self) -> None:
        """verify > encrypt > may; None entries are ignored."""
        self.assertEqual(strictest_tls("may", None, "encrypt"), "encrypt")
        self.assertEqual(strictest_tls("verify", "encrypt"), "verify")
        self.assertEqual(strictest_tls(None), "may")


class AdaptiveShapingTests(SynchronousTestCase):
    """421 and 4.7.x replies slow a site; repeated refusals pause it."""

    def test_throttled_halves_and_recovers(self) -> None:
        """A rate-limit reply halves the rate; successes recover it additively."""
        shape = shaping(rate="100/min").get("bulk")
        shape.throttled(0.0)
        self.assertEqual(shape.current_rate, 50.0)
        for _ in range(10):
            shape.delivered()
        self.assertEqual(shape.current_rate, 100.0)

    def test_refusals_suspend(self) -> None:
        """Three refused sessions in a row pause the site for suspend_for seconds; a
        session held in between starts the count again."""
        clock = Clock()
        shape = shaping().get("bulk")
        shape.throttled(clock.seconds(), refused=True)
        shape.throttled(clock.seconds(), refused=True)
        shape.held_session()
        shape.throttled(clock.seconds(), refused=True)
        self.assertFalse(shape.is_suspended(clock.seconds()))
        shape.throttled(clock.seconds(), refused=True)
        shape.throttled(clock.seconds(), refused=True)
        self.assertTrue(shape.is_suspended(clock.seconds()))
        clock.advance(shape.suspend_for - 0.5)
        self.assertTrue(shape.is_suspended(clock.seconds()))
        clock.advance(0.5)
        self.assertFalse(shape.is_suspended(clock.seconds()))
        self.assertIsNone(shape.describe(clock.seconds())["suspended_until"])

    def test_pauses_default(self) -> None:
        """Without settings a dead site rests 5 minutes and a refusing one 60 s."""
        shape = shaping().get("bulk")
        self.assertEqual((shape.window.suspend_for, shape.suspend_for), (300.0, 60.0))

    def test_pauses_configured(self) -> None:
        """[delivery] dead_site_suspension and rate_limit_pause set how long a site whose
        connections keep failing, or that keeps refusing with 421, rests: a destination
        back after an outage is tried again that soon."""
        shape = shaping({"dead_site_suspension": "10s", "rate_limit_pause": "7s"}).get("bulk")
        for _ in range(20):
            self.assertTrue(shape.window.try_acquire(100.0))
            shape.window.failure(100.0)
            if shape.window.is_dead(100.0):
                break
        self.assertTrue(shape.window.is_dead(109.9))
        self.assertFalse(shape.window.is_dead(110.0))
        for _ in range(3):
            shape.throttled(200.0, refused=True)
        self.assertTrue(shape.is_suspended(206.9))
        self.assertFalse(shape.is_suspended(207.0))

    @given(st.lists(st.sampled_from(["throttle", "ok"]), max_size=60),
           st.integers(1, 10))
    def test_gcra_never_above_current_rate(self, replies: list[str], seconds: int) -> None:
        """Paced through MemoryThrottle at the site's current rate, a site never gets
        more than that rate's worth of messages (plus one) in any run of time."""
        clock = Clock()
        shape = shaping(rate="60/min").get("bulk")
        throttle = MemoryThrottle()
        for reply in replies:
            if reply == "throttle":
                shape.throttled(clock.seconds())
            else:
                shape.delivered()
        rate = shape.current_rate
        assert rate is not None
        sent = 0
        for _ in range(seconds * 100):
            if throttle.admit("rate:bulk", rate, shape.period, clock.seconds()) == 0.0:
                sent += 1
            clock.advance(0.01)
        self.assertLessEqual(sent, rate / shape.period * seconds + 1)
        self.assertGreaterEqual(rate, 60 / 20)
